"""Multi-turn synthesis: a follow-up runs over the same synthesizer state, exactly as the whole
conversation prefilled at once (text route: from scratch; cache route: over the same composed cache)."""

from __future__ import annotations

import pytest
import torch
from conftest import tiny_lm
from test_decode import fresh_logits

from parsyn.chat import ChatFormat
from parsyn.conversation import Conversation
from parsyn.sampling import SamplingParams
from parsyn.synthesis import cache_inputs, prompt_tokens, run_cache, text_row
from parsyn.workers import from_texts

QUESTION = "Where and when is the meeting?"
NOTES = ["The meeting is on Thursday.", "It takes place in room 204."]
FOLLOW = "And who should come?"


def _logprobs(logits: torch.Tensor) -> torch.Tensor:
    return torch.log_softmax(logits.float(), -1)


def _whole(lm, f, chat):
    """Token ids after the context: the instruction prompt, each turn (closed by its end-of-turn token)
    and each follow-up, as the conversation ran them."""
    fmt = ChatFormat(lm.tokenizer)
    ids = list(prompt_tokens(lm, f))
    for turn in chat.turns[:-1]:
        ids += list(turn.token_ids) + ([] if turn.token_ids[-1] in lm.stop_ids else [lm.stop_ids[0]])
        ids += list(fmt.ids(fmt.follow_up(f.question, f.system, FOLLOW)))
    return ids


@pytest.mark.parametrize("route", ["text", "cache"])
def test_a_follow_up_continues_exactly_where_the_whole_conversation_would(tokenizer, route):
    lm = tiny_lm("qwen3", tokenizer)
    f = from_texts(lm, QUESTION, NOTES)
    before = [k.clone() for b in f.branches for k in b.kv.keys + b.kv.values]
    chat = Conversation(lm, f, route=route, sampling=SamplingParams(6))
    first = chat.ask()
    second = chat.ask(FOLLOW)
    third = chat.ask(FOLLOW)
    assert len(first.token_ids) == 6 and second.prefill_tokens < first.prefill_tokens
    assert third.prefill_tokens == second.prefill_tokens  # a follow-up prefills only its own tokens
    ids = _whole(lm, f, chat)
    if route == "text":
        want = fresh_logits(lm, text_row(f.prefix_ids, [b.token_ids for b in f.branches], ids))
    else:
        state, logits = run_cache(lm, [cache_inputs(lm, f, ids, layout="parallel")])
        want = logits[0]
    got = dict(third.first_top)
    expect = _logprobs(want)
    for token, logprob in got.items():
        assert abs(logprob - float(expect[token])) < 1e-4
    assert list(got) == expect.topk(5).indices.tolist()
    after = [k for b in f.branches for k in b.kv.keys + b.kv.values]
    assert all(x.equal(y) for x, y in zip(before, after))  # the fork is untouched


@pytest.mark.slow
def test_the_default_model_answers_a_follow_up_over_the_same_cache(default_lm):
    f = from_texts(default_lm, QUESTION, NOTES)
    chat = Conversation(default_lm, f, route="cache", sampling=SamplingParams(24))
    chat.ask()
    again = chat.ask("Which room is it in? Answer with the room number.")
    assert "204" in again.answer and again.prefill_tokens < 40


def test_turns_are_asked_in_order(tokenizer):
    lm = tiny_lm("llama", tokenizer)
    chat = Conversation(lm, from_texts(lm, QUESTION, NOTES), sampling=SamplingParams(2))
    with pytest.raises(ValueError, match="first turn is the synthesis"):
        chat.ask(FOLLOW)
    chat.ask()
    with pytest.raises(ValueError, match="needs a question"):
        chat.ask("  ")
    with pytest.raises(ValueError, match="stop strings"):
        Conversation(lm, from_texts(lm, QUESTION, NOTES), sampling=SamplingParams(2, stop=("x",)))


@pytest.mark.slow
def test_the_synthesizer_calls_a_tool_of_the_fork_and_answers_from_its_result(qwen):
    from parsyn.agents import run_agents
    from parsyn.tools import Toolbox, calculator_tool

    box = Toolbox([calculator_tool()])
    question = "What is 1234 times 5678?"
    run = run_agents(qwen, question, box, workers=2, max_turns=0, sampling=SamplingParams(24))  # no calls run
    chat = Conversation(qwen, run.fork, route="cache", tools=box, sampling=SamplingParams(64),
                        instruction="The answers above may be wrong. Check the product with the calculator "
                                    "tool, then answer: {question}")
    s = chat.ask()
    turn, *_ = chat.tool_turns[-1]  # (it may check again: up to max_tool_turns)
    assert turn.calls[0].name == "calculator" and turn.results[0].text == "7006652"
    assert "7006652" in s.answer.replace(",", "") and "<tool_call>" not in s.answer
    none = Conversation(qwen, run.fork, route="cache", tools=box, max_tool_turns=0, sampling=SamplingParams(64),
                        instruction=chat.instruction)
    none.ask()
    assert all(not t.results for t in none.tool_turns[-1])  # a call it writes is not run
    with pytest.raises(ValueError, match="tools must be the ones the fork's prefix offers"):
        Conversation(qwen, from_texts(qwen, question, ["7006652"]), tools=box)
