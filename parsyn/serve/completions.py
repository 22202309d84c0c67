"""Chat completions in OpenAI's shapes: plain chats (n rows sharing the prompt's K/V) and parsyn
workflows (workers, then the synthesis as the completion; branches and routes in a `parsyn` object)."""

from __future__ import annotations

import time
import uuid
from dataclasses import asdict

from fastapi.responses import StreamingResponse

from ..synthesis import Synthesis
from ..workers import Fork
from . import schemas as S
from .bridge import Bridge, Limits, events, finish_reason, first_event


def _completion_id() -> str:
    return f"chatcmpl-{uuid.uuid4().hex[:24]}"


def _usage(prompt: int, completion: int, cached: int = 0) -> dict:
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion,
            "prompt_tokens_details": {"cached_tokens": cached}}


def _chunk(cid: str, model: str, choices: list, **more) -> dict:
    return {"id": cid, "object": "chat.completion.chunk", "created": int(time.time()), "model": model,
            "choices": choices, **more}


async def chat(http, engine, job, body: S.ChatRequest, model: str, limits: Limits, metrics):
    bridge = Bridge(engine, job, limits.timeout_s)
    cid, t0 = _completion_id(), time.perf_counter()
    if not body.stream:
        prompt, choices = await bridge.result(http)
        metrics.chat(time.perf_counter() - t0)
        return {"id": cid, "object": "chat.completion", "created": int(time.time()), "model": model,
                "choices": [{"index": i, "message": {"role": "assistant", "content": c.text},
                             "finish_reason": c.finish, "logprobs": None} for i, c in enumerate(choices)],
                "usage": _usage(prompt, sum(c.tokens for c in choices))}
    first = await first_event(bridge, http)
    usage = body.stream_options is not None and body.stream_options.include_usage
    said: set[int] = set()

    def deltas(event):
        if event[0] != "token":
            return []
        index, token = event[1], event[2]
        out = []
        if index not in said:
            said.add(index)
            metrics.ttft("chat", event[3] - t0)
            out.append(_chunk(cid, model, [{"index": index, "delta": {"role": "assistant", "content": ""},
                                            "finish_reason": None}]))
        if token.text or token.finish:
            out.append(_chunk(cid, model, [{"index": index, "delta": {"content": token.text} if token.text else {},
                                            "finish_reason": finish_reason(token.finish)}]))
        return out

    def last(value):
        prompt, choices = value
        return [_chunk(cid, model, [], usage=_usage(prompt, sum(c.tokens for c in choices)))] if usage else []

    return StreamingResponse(events(http, bridge, first, deltas, last), media_type="text/event-stream")


def answer(s: Synthesis, fork: Fork) -> dict:
    context = context_tokens(fork)
    return {"route": s.route, "layout": s.layout, "answer": s.answer, "tokens": len(s.token_ids),
            "ttft_s": s.ttft_s, "total_s": s.total_s, "prefill_tokens": s.prefill_tokens,
            "cached_tokens": context if s.route == "cache" else 0, "provenance": [asdict(p) for p in s.provenance],
            **({"gate": s.gate} if s.gate is not None else {})}



async def workflow(http, engine, job, body: S.ChatRequest, routes: list[str], model: str, limits: Limits, metrics):
    bridge = Bridge(engine, job, limits.timeout_s)
    cid, primary = _completion_id(), routes[0]

    def finished(value) -> dict:
        fork, answers = value
        metrics.synthesized(answers, fork)
        main = answer(answers[primary], fork)
        return {"parsyn": {"fork": fork_summary(fork), "answers": {r: answer(a, fork) for r, a in answers.items()}},
                "usage": _usage(main["prefill_tokens"] + main["cached_tokens"], main["tokens"], main["cached_tokens"]),
                "answer": answers[primary]}

    if not body.stream:
        done = finished(await bridge.result(http))
        s = done.pop("answer")
        finish = "stop" if s.token_ids and s.token_ids[-1] in engine.lm.stop_ids else "length"
        return {"id": cid, "object": "chat.completion", "created": int(time.time()), "model": model,
                "choices": [{"index": 0, "message": {"role": "assistant", "content": s.answer},
                             "finish_reason": finish, "logprobs": None}], **done}
    first = await first_event(bridge, http)
    usage = body.stream_options is not None and body.stream_options.include_usage
    opened = []

    def deltas(event):
        if event[0] != "token":
            return []
        key, token = event[1], event[2]
        if key != primary:  # workers' and the racing route's tokens ride beside the completion
            name = {"branch": key[1]} if isinstance(key, tuple) else {"route": key}
            return [_chunk(cid, model, [], parsyn={**name, "delta": token.text})] if token.text else []
        out = []
        if not opened:
            opened.append(True)
            out.append(_chunk(cid, model, [{"index": 0, "delta": {"role": "assistant", "content": ""},
                                            "finish_reason": None}]))
        if token.text or token.finish:
            out.append(_chunk(cid, model, [{"index": 0, "delta": {"content": token.text} if token.text else {},
                                            "finish_reason": finish_reason(token.finish)}]))
        return out

    def last(value):
        done = finished(value)
        return [_chunk(cid, model, [], parsyn=done["parsyn"], **({"usage": done["usage"]} if usage else {}))]

    return StreamingResponse(events(http, bridge, first, deltas, last), media_type="text/event-stream")


def context_tokens(fork: Fork) -> int:
    """Tokens of the synthesis context the branches' K/V already hold: the prefix and every branch."""
    return len(fork.prefix_ids) + sum(len(b.token_ids) for b in fork.branches)


def fork_summary(fork: Fork) -> dict:
    return {"question": fork.question, "prefix_tokens": len(fork.prefix_ids),
            "branches": [{"id": f"b{i}", "role": b.role, "text": b.text, "tokens": len(b.token_ids)}
                         for i, b in enumerate(fork.branches)]}
