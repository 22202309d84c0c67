"""Timing programs: time to first token by route (with its floor), and batched against one-by-one workers.

Every figure is a median over repeats taken round-robin (text, cache, floor, text, ...), so slow drift
of a shared machine hits all three alike. Results are plain dicts ready for JSON, units in their names.
"""

from __future__ import annotations

import os
import platform
import statistics
import time
from collections.abc import Callable, Sequence

import numpy as np
import torch

from ..adapter import Synthesizer
from ..compose import compose
from ..forward import feed_, prefill_rows
from ..graphs import GraphedSynthesis, text_context
from ..model import LM, wrap
from ..model import tokenizer as named_tokenizer
from ..rope import rope_of
from ..sampling import SamplingParams
from ..synthesis import prefill_over, prompt_tokens, synthesize
from ..workers import Fork, fork, from_texts

FIRST_TOKEN = SamplingParams(max_new_tokens=1, temperature=0.0)

# Filler prose for branches of a chosen length; timing does not depend on what the tokens say.
_PROSE = (
    "Step {i}: the worker checks the figures it was given, compares them with the earlier estimate, "
    "and notes where the two disagree. It then explains which assumption causes the gap and how large "
    "the effect is, before moving on to the next part of the question. "
)


def branch_text(lm: LM, tokens: int) -> str:
    """A branch text of about `tokens` tokens."""
    text, i = "", 0
    while len(lm.tokenizer(text, add_special_tokens=False)["input_ids"]) < tokens:
        text += _PROSE.format(i=i)
        i += 1
    ids = lm.tokenizer(text, add_special_tokens=False)["input_ids"][:tokens]
    return lm.tokenizer.decode(ids)


def timed(work: Callable[[], torch.Tensor]) -> Callable[[], float]:
    """A timer of `work` (which returns logits): seconds until its next token is known on the host."""
    def run() -> float:
        t0 = time.perf_counter()
        with torch.inference_mode():
            work().argmax(-1).tolist()  # .tolist() waits for a GPU
        return time.perf_counter() - t0
    return run


def ttft_cell(lm: LM, branches: int, length: int, *, repeats: int = 5, layout: str = "parallel",
              synthesizer: Synthesizer | None = None, graphs: bool | None = None) -> dict:
    """Text and cache TTFT for `branches` branches of ~`length` tokens, plus the cache route's floor
    (prefilling only the synthesizer's prompt over an already composed cache) and the same prompt's prefill
    with no context at all (`bare`: floor - bare is what attention over the composed cache costs). With a
    `synthesizer`, also the trained cache route (in the layout it was trained for: the default route) and
    its overhead above the raw route. With `graphs` (True: CUDA graphs; False: the same static forwards run
    eagerly), also both raw routes and the floor at static shapes (`graphs.GraphedSynthesis`, composition
    included in the cache route's), and one decode step after the cache route's prompt, plain and static."""
    f = from_texts(lm, "Summarize the findings of the workers.", [branch_text(lm, length)] * branches)
    prompt_ids = prompt_tokens(lm, f)
    rope = rope_of(lm.model)
    composed = compose(f.prefix, [b.kv for b in f.branches], rope, layout=layout)

    timers = {
        "text": lambda: synthesize(lm, f, route="text", sampling=FIRST_TOKEN).ttft_s,
        "cache": lambda: synthesize(lm, f, route="cache", layout=layout, sampling=FIRST_TOKEN).ttft_s,
        "floor": timed(lambda: prefill_over(lm, composed, prompt_ids).logits),
        "bare": timed(lambda: prefill_rows(lm, [list(prompt_ids)])[1]),
    }
    if graphs is not None:
        timers |= static_timers(lm, f, composed, prompt_ids, layout, graphs, repeats, rope)
    if synthesizer is not None:
        timers["trained"] = lambda: synthesize(lm, f, route="cache", synthesizer=synthesizer,  # its own layout
                                               sampling=FIRST_TOKEN).ttft_s
    times = round_robin(timers, repeats)
    text, cache, low, bare = (statistics.median(times[k]) for k in ("text", "cache", "floor", "bare"))
    extra = {}
    if graphs is not None:
        extra |= {f"{k}_ttft_s" if k in ("graphed_cache", "graphed_text") else f"{k}_s": statistics.median(times[k])
                  for k in STATIC}
        # text at its best: its static forward carries an explicit mask (no causal flash kernel), so the
        # plain one can be the faster at long prompts
        extra["graphed_speedup"] = min(text, extra["graphed_text_ttft_s"]) / extra["graphed_cache_ttft_s"]
    if synthesizer is not None:
        t = statistics.median(times["trained"])
        extra |= {"trained_layout": synthesizer.layout, "trained_ttft_s": t, "trained_speedup": text / t,
                  "trained_overhead_vs_raw": (t - cache) / cache}
    return {
        "branches": branches,
        "length": length,
        "branch_tokens": [len(b.token_ids) for b in f.branches],
        "prefix_tokens": len(f.prefix_ids),
        "prompt_tokens": len(prompt_ids),
        "layout": layout,
        "text_ttft_s": text,
        "cache_ttft_s": cache,
        "floor_s": low,
        "bare_prompt_s": bare,
        "speedup": text / cache,
        "overhead": (cache - low) / low,
        "overhead_share_of_cache_ttft": (cache - low) / cache,
        **extra,
        "repeats": repeats,
    }


STATIC = ("graphed_floor", "graphed_cache", "graphed_text", "decode_step", "graphed_decode_step")


def static_timers(lm: LM, f: Fork, composed, prompt_ids: list[int], layout: str, graphs: bool, repeats: int,
                  rope) -> dict:
    """Timers of the static routes (`ttft_cell` with graphs), captured in the warm-up round: the floor, the
    cache route (composition included), the text route (over the reused prefix: a little less work than
    the plain text route, which prefills the prefix again), and decode steps after the cache route's
    prompt, plain (the cache grows in place) and static."""
    routes, steps = GraphedSynthesis(lm, graphs=graphs), GraphedSynthesis(lm, graphs=graphs)
    context, row = text_context(f.prefix, [b.token_ids for b in f.branches], prompt_ids)
    with torch.inference_mode():
        state = prefill_over(lm, composed, prompt_ids).state
        steps.prefill(composed, prompt_ids, room=repeats + 1)
    return {
        "graphed_floor": timed(lambda: routes.prefill(composed, prompt_ids)),
        "graphed_cache": timed(lambda: routes.prefill(
            compose(f.prefix, [b.kv for b in f.branches], rope, layout=layout), prompt_ids)),
        "graphed_text": timed(lambda: routes.prefill(context, row)),
        "decode_step": timed(lambda: feed_(lm, state, [[lm.pad_id]])),
        "graphed_decode_step": timed(lambda: steps.step(lm.pad_id)),
    }


def sweep(lm: LM, branches: Sequence[int], lengths: Sequence[int], *, repeats: int = 3, layout: str = "parallel",
          progress: Callable[[int, int], None] | None = None, graphs: bool = False) -> list[dict]:
    """`ttft_cell` over the grid; cells beyond the model's positions are reported as skipped. graphs: time
    both routes' prefills and a decode step replayed from CUDA graphs too (a CUDA device only)."""
    cells, total = [], len(branches) * len(lengths)
    for n in branches:
        for length in lengths:
            need = n * length + 128  # prefix, openings and the synthesizer's prompt
            if need > lm.max_positions:
                cells.append({"branches": n, "length": length,
                              "skipped": f"needs ~{need} positions, model has {lm.max_positions}"})
            else:
                cells.append(ttft_cell(lm, n, length, repeats=repeats, layout=layout, graphs=graphs or None))
            if progress:
                progress(len(cells), total)
    return cells


def slopes(cells: Sequence[dict]) -> dict:
    """How each route's TTFT grows with the total branch tokens of a sweep: least-squares lines over the
    timed cells, in ms per 1,000 branch tokens (and the intercept, ms). The floor's slope is what attention
    over the composed cache costs by itself; a cache slope near it means composing adds no growth."""
    timed = [c for c in cells if not c.get("skipped")]
    if len({sum(c["branch_tokens"]) for c in timed}) < 2:
        return {}
    x = np.array([sum(c["branch_tokens"]) / 1000 for c in timed])
    out = {"cells": len(timed)}
    for route, key in (("text", "text_ttft_s"), ("cache", "cache_ttft_s"), ("floor", "floor_s"),
                       ("trained", "trained_ttft_s"), ("graphed_cache", "graphed_cache_ttft_s"),
                       ("graphed_text", "graphed_text_ttft_s"), ("graphed_floor", "graphed_floor_s")):
        if all(key in c for c in timed):
            slope, intercept = np.polyfit(x, np.array([c[key] * 1000 for c in timed]), 1)
            out[route] = {"ms_per_1k_tokens": float(slope), "intercept_ms": float(intercept)}
    out["text_over_cache"] = out["text"]["ms_per_1k_tokens"] / out["cache"]["ms_per_1k_tokens"]
    return out


# Shapes for timing without weights: timing does not depend on weight values.
SHAPES = {
    "qwen3-14b": dict(vocab_size=151936, hidden_size=5120, intermediate_size=17408, num_hidden_layers=40,
                      num_attention_heads=40, num_key_value_heads=8, head_dim=128, max_position_embeddings=40960,
                      rope_parameters={"rope_type": "default", "rope_theta": 1000000.0}),
    "tiny-qwen3": dict(vocab_size=49152, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                       num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=4096),
}


def random_lm(shape: str, tokenizer=None, device: str = "cpu") -> LM:
    """A randomly initialised Qwen3 of a named shape (bf16 on GPUs, fp32 on CPU); the tokenizer defaults
    to the embedded model's (its ids fit any larger vocabulary)."""
    from transformers import AutoModelForCausalLM, Qwen3Config

    if shape not in SHAPES:
        raise ValueError(f"unknown shape '{shape}' (choose from {', '.join(SHAPES)})")
    if device != "cpu" and not torch.cuda.is_available():
        raise ValueError(f"device '{device}' is not available here")
    tokenizer = tokenizer or named_tokenizer()
    dtype = torch.float32 if device == "cpu" else torch.bfloat16
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(Qwen3Config(**SHAPES[shape]), dtype=dtype, attn_implementation="sdpa")
    return wrap(model, tokenizer, f"random {shape}")


def round_robin(timers: dict[str, Callable[[], float]], repeats: int) -> dict[str, list[float]]:
    """Seconds per timer: one warm-up call each, then `repeats` rounds taking the timers in turn."""
    for timer in timers.values():  # warm-up
        timer()
    times: dict[str, list[float]] = {k: [] for k in timers}
    for _ in range(repeats):
        for k, timer in timers.items():
            times[k].append(timer())
    return times


def worker_speed(lm: LM, *, workers: int = 3, max_new_tokens: int = 64, repeats: int = 2) -> dict:
    """Greedy workers decoded as one batch against the same workers one after another (same tokens)."""
    roles = [f"Answer in detail, as expert number {i + 1}." for i in range(workers)]
    sampling = SamplingParams(max_new_tokens=max_new_tokens, temperature=0.0)
    question = "Explain how a refrigerator keeps food cold."

    def run(batched: bool) -> Fork:
        return fork(lm, question, workers=workers, roles=roles, sampling=sampling, batched=batched)

    run(True)  # warm-up
    results: dict[bool, list[Fork]] = {True: [], False: []}
    for _ in range(repeats):
        for batched in (True, False):
            results[batched].append(run(batched))
    tokens = sum(b.generated for b in results[True][0].branches)
    same = [b.token_ids for b in results[True][0].branches] == [b.token_ids for b in results[False][0].branches]
    batched_s = statistics.median(f.prefill_s + f.decode_s for f in results[True])
    alone_s = statistics.median(f.prefill_s + f.decode_s for f in results[False])
    return {
        "workers": workers,
        "max_new_tokens": max_new_tokens,
        "generated_tokens": tokens,
        "same_tokens": same,
        "batched_s": batched_s,
        "one_by_one_s": alone_s,
        "batched_tokens_per_s": tokens / batched_s,
        "one_by_one_tokens_per_s": tokens / alone_s,
        "speedup": alone_s / batched_s,
        "repeats": repeats,
    }


def environment(lm: LM) -> dict:
    import transformers

    return {
        "model": lm.name,
        "dtype": str(lm.dtype).replace("torch.", ""),
        "device": str(lm.device),
        "gpu": torch.cuda.get_device_name(lm.device) if lm.device.type == "cuda" else None,
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "threads": torch.get_num_threads(),
        "cpu_count": os.cpu_count(),
        "machine": platform.machine(),
        "processor": _cpu_name(),
        "python": platform.python_version(),
    }


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()


def parse_ints(text: str, what: str) -> Sequence[int]:
    try:
        values = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise ValueError(f"--{what} takes comma-separated integers, got '{text}'") from None
    if not values or min(values) < 1:
        raise ValueError(f"--{what} needs positive integers, got '{text}'")
    return values
