"""Workers: one shared prefix, one batch, per-row stopping, and branches that hold every token's K/V."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from conftest import tiny_lm
from transformers import DynamicCache

from parsyn.kv import KV
from parsyn.sampling import SamplingParams
from parsyn.synthesis import synthesize
from parsyn.workers import fork, fork_many, from_texts

QUESTION = "Name one planet of the solar system."
ROLES = ("Answer in one word.", "Answer with a full sentence.", "Answer and add a fun fact.")


def fresh_kv(lm, ids):
    """K/V of `ids` prefilled from scratch in one plain forward: the model's own truth."""
    with torch.inference_mode():
        cache = lm.model(input_ids=torch.tensor([ids]), cache=DynamicCache(), use_cache=True).cache
    return [layer.keys for layer in cache.layers], [layer.values for layer in cache.layers]


def assert_branches_match_fresh_prefill(lm, f, atol):
    start = len(f.prefix_ids)
    for b in f.branches:
        assert b.kv.length == len(b.token_ids)
        assert b.kv.positions.tolist() == list(range(start, start + len(b.token_ids)))
        keys, values = fresh_kv(lm, list(f.prefix_ids) + list(b.token_ids))
        for k, v, ck, cv in zip(b.kv.keys, b.kv.values, keys, values):
            torch.testing.assert_close(k, ck[:, :, start:], atol=atol, rtol=0)
            torch.testing.assert_close(v, cv[:, :, start:], atol=atol, rtol=0)


@pytest.mark.parametrize("family", ["llama", "gemma3", "mistral"])
def test_batched_branches_hold_the_kv_of_every_token(tokenizer, family):
    lm = tiny_lm(family, tokenizer)
    f = fork(lm, QUESTION, workers=3, roles=ROLES, sampling=SamplingParams(max_new_tokens=30, temperature=1.0, seed=3))
    assert len({len(b.token_ids) for b in f.branches}) > 1  # rows of unequal length share the batch
    assert_branches_match_fresh_prefill(lm, f, atol=1e-4)


@pytest.mark.slow
def test_default_model_branches_end_closed_and_match_fresh_prefill(default_lm):
    f = fork(default_lm, QUESTION, workers=3, roles=ROLES,
             sampling=SamplingParams(max_new_tokens=24, temperature=0.8, seed=1))
    for b in f.branches:
        assert b.token_ids[-1] in default_lm.stop_ids  # the final token is part of the branch, with its K/V
        assert b.text and b.generated <= 24
    assert_branches_match_fresh_prefill(default_lm, f, atol=1e-4)


@pytest.mark.slow
def test_batched_workers_answer_like_workers_run_one_by_one(default_lm):
    greedy = SamplingParams(max_new_tokens=16, temperature=0.0)
    batched = fork(default_lm, QUESTION, workers=3, roles=ROLES, sampling=greedy)
    alone = fork(default_lm, QUESTION, workers=3, roles=ROLES, sampling=greedy, batched=False)
    assert [b.token_ids for b in batched.branches] == [b.token_ids for b in alone.branches]


@pytest.mark.parametrize("join", [dict(quorum=1), dict(quorum=2), dict(deadline_s=1e-9)])
def test_a_quorum_or_deadline_join_keeps_the_first_finished_branches_exactly(tokenizer, join):
    lm = tiny_lm("llama", tokenizer)
    sampling = SamplingParams(max_new_tokens=30, temperature=1.0, seed=2, stop=("a",))  # random text stops soon
    full = fork(lm, QUESTION, workers=3, roles=ROLES, sampling=sampling)
    lengths = [b.generated for b in full.branches]
    assert len(set(lengths)) == 3 and lengths != sorted(lengths)  # they finish at different steps, not in order
    keep = sorted(lengths)[: join.get("quorum", 1)]
    early = fork(lm, QUESTION, workers=3, roles=ROLES, sampling=sampling, **join)
    kept = [i for i, n in enumerate(lengths) if n in keep]
    assert [b.token_ids for b in early.branches] == [full.branches[i].token_ids for i in kept]
    assert early.cut == tuple(i for i in range(3) if i not in kept) and full.cut == ()
    assert [b.role for b in early.branches] == [ROLES[i] for i in kept]
    assert_branches_match_fresh_prefill(lm, early, atol=1e-4)
    # per question: a second question's workers are cut on their own count
    both = fork_many(lm, [QUESTION, QUESTION], roles=ROLES, sampling=sampling, **join)
    assert [[b.token_ids for b in f.branches] for f in both] == [[b.token_ids for b in early.branches]] * 2


@pytest.mark.parametrize("join, message", [(dict(quorum=4), "quorum of 4 needs at least 4 workers"),
                                           (dict(quorum=0), "quorum must be a positive"),
                                           (dict(deadline_s=-1), "deadline must be a positive"),
                                           (dict(quorum=1, batched=False), "needs the workers batched")])
def test_a_join_that_cannot_be_kept_is_refused(tokenizer, join, message):
    with pytest.raises(ValueError, match=message):
        fork(tiny_lm("llama", tokenizer), QUESTION, workers=3, **join)


def test_sampling_is_seeded(tokenizer):
    lm = tiny_lm("qwen3", tokenizer)
    run = lambda seed: [b.token_ids
                        for b in fork(lm, QUESTION, workers=2, sampling=SamplingParams(8, 1.0, 0.9, seed)).branches]
    assert run(5) == run(5) and run(5) != run(6)


def test_given_texts_are_prefilled_after_the_prefix(tokenizer):
    lm = tiny_lm("llama", tokenizer)
    f = from_texts(lm, QUESTION, ["Mars.", "Jupiter is the largest planet.", "Venus"])
    assert [b.text for b in f.branches] == ["Mars.", "Jupiter is the largest planet.", "Venus"]
    assert_branches_match_fresh_prefill(lm, f, atol=1e-4)


@pytest.mark.parametrize(
    "call, message",
    [
        (lambda lm: fork(lm, "   "), "question is empty"),
        (lambda lm: fork(lm, QUESTION, workers=0), "at least one worker"),
        (lambda lm: fork(lm, QUESTION, workers=3, roles=["a", "b"]), "2 roles for 3 workers"),
        (lambda lm: fork(lm, QUESTION, workers=10**7), "GiB"),
        (lambda lm: fork(lm, QUESTION, sampling=SamplingParams(max_new_tokens=5000)), "positions"),
        (lambda lm: from_texts(lm, QUESTION, ["word " * 5000]), "positions"),
    ],
)
def test_bad_input_gets_a_clear_error(tokenizer, call, message):
    with pytest.raises(ValueError, match=message):
        call(tiny_lm("llama", tokenizer))


def test_fork_many_forks_each_question_as_fork_does(tokenizer):
    lm = tiny_lm("qwen3", tokenizer)
    greedy = SamplingParams(max_new_tokens=12)
    questions = ["Name one planet.", "Which is the largest planet of the solar system, and why is it so large?"]
    roles = [["Answer in one word.", "Answer with a sentence."], ["Be brief.", "Add a fact.", "Explain."]]
    many = fork_many(lm, questions, roles=roles, sampling=greedy)
    for f, q, r in zip(many, questions, roles):
        alone = fork(lm, q, workers=len(r), roles=r, sampling=greedy)
        assert f.prefix_ids == alone.prefix_ids and [b.role for b in f.branches] == r
        assert [b.token_ids for b in f.branches] == [b.token_ids for b in alone.branches]
        for a, b in zip((f.prefix, *(x.kv for x in f.branches)), (alone.prefix, *(x.kv for x in alone.branches))):
            assert torch.equal(a.positions, b.positions)
            for x, y in zip(a.keys + a.values, b.keys + b.values):
                torch.testing.assert_close(x, y, atol=1e-4, rtol=0)
    with pytest.raises(ValueError, match="role lists for 1 questions"):
        fork_many(lm, questions, roles=[["a"]])
    # one sampling per question: a greedy agent decodes beside sampled workers as it would alone
    sampled = SamplingParams(max_new_tokens=8, temperature=0.9, seed=3)
    workers, agent = fork_many(lm, [questions[0]] * 2, roles=[roles[0], [None]], sampling=[sampled, greedy])
    assert ([b.token_ids for b in agent.branches] == [b.token_ids for b in fork(lm, questions[0], workers=1,
                                                                              sampling=greedy).branches])
    assert ([b.token_ids for b in workers.branches]
            == [b.token_ids for b in fork(lm, questions[0], roles=roles[0], workers=2, sampling=sampled).branches])
    with pytest.raises(ValueError, match="2 sampling settings for 1 questions"):
        fork_many(lm, questions[:1], sampling=[greedy, greedy])


def test_kv_bytes_round_trip_and_are_refused_by_another_model(tokenizer):
    lm = tiny_lm("llama", tokenizer)
    f = from_texts(lm, QUESTION, ["Mars.", "Jupiter is the largest planet."])
    kv = f.branches[1].kv
    back = KV.from_bytes(kv.to_bytes(lm.fingerprint), model=lm.fingerprint)
    assert torch.equal(back.positions, kv.positions)
    assert all(torch.equal(a, b) for a, b in zip(back.keys + back.values, kv.keys + kv.values))
    half = KV(tuple(k.bfloat16() for k in kv.keys), tuple(v.bfloat16() for v in kv.values), kv.positions)
    assert KV.from_bytes(half.to_bytes("m"), model="m").keys[0].dtype == torch.bfloat16
    # a fork rebuilt from shipped bytes synthesizes exactly as the original
    shipped = dataclasses.replace(f, branches=tuple(
        dataclasses.replace(b, kv=KV.from_bytes(b.kv.to_bytes(lm.fingerprint), model=lm.fingerprint))
        for b in f.branches))
    greedy = SamplingParams(max_new_tokens=8)
    assert synthesize(lm, shipped, sampling=greedy).token_ids == synthesize(lm, f, sampling=greedy).token_ids
    assert tiny_lm("llama", tokenizer).fingerprint == lm.fingerprint  # the same weights, loaded again
    other = tiny_lm("llama", tokenizer, seed=1)
    with pytest.raises(ValueError, match="computed by model"):
        KV.from_bytes(kv.to_bytes(lm.fingerprint), model=other.fingerprint)
    with pytest.raises(ValueError, match="not parsyn KV"):
        KV.from_bytes(b"\x00" * 40, model=lm.fingerprint)
