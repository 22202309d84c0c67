"""Nested fork/join: a join's branches gathered from other forks, other joins and texts."""

from __future__ import annotations

import pytest
import torch
from conftest import tiny_lm
from test_workers import assert_branches_match_fresh_prefill

from parsyn import fork, from_texts, synthesize
from parsyn.rope import rope_of
from parsyn.sampling import SamplingParams
from parsyn.workflow import gather

Q, SUB = "Plan a trip to Lyon.", "What should one eat in Lyon?"


@pytest.fixture(scope="module")
def lm(tokenizer):
    return tiny_lm("qwen3", tokenizer)


def test_texts_are_gathered_as_from_texts_makes_them(lm):
    texts = ["Take the train.", "Stay near the old town."]
    ours, theirs = gather(lm, Q, texts), from_texts(lm, Q, texts)
    assert ours.prefix_ids == theirs.prefix_ids
    assert [b.token_ids for b in ours.branches] == [b.token_ids for b in theirs.branches]
    assert_branches_match_fresh_prefill(lm, ours, atol=1e-4)


def test_branches_of_a_fork_on_the_same_question_keep_their_exact_kv(lm):
    f = fork(lm, Q, workers=2, sampling=SamplingParams(8, temperature=1.0, seed=1))
    g = gather(lm, Q, [f, "One more note."])
    assert [b.token_ids for b in g.branches[:2]] == [b.token_ids for b in f.branches]
    for a, b in zip(g.branches, f.branches):
        for x, y in zip(a.kv.keys + a.kv.values, b.kv.keys + b.kv.values):
            torch.testing.assert_close(x, y, atol=1e-5, rtol=0)
    assert_branches_match_fresh_prefill(lm, g, atol=1e-4)


def test_a_join_of_joins_reads_sub_forks_rerotated_and_syntheses_as_text(lm):
    sub = fork(lm, SUB, workers=2, sampling=SamplingParams(6, temperature=1.0, seed=2))
    joined = synthesize(lm, sub, route="cache", sampling=SamplingParams(6))
    g = gather(lm, Q, [joined, sub.branches[1]])
    start = len(g.prefix_ids)
    first, moved = g.branches
    assert first.role == "synthesis (cache)" and first.text == joined.answer.strip()
    assert moved.kv.positions.tolist() == list(range(start, start + moved.kv.length))
    back = rope_of(lm.model).rerotate(moved.kv.keys, moved.kv.positions, sub.branches[1].kv.positions)
    for k, want in zip(back, sub.branches[1].kv.keys):
        torch.testing.assert_close(k, want, atol=1e-4, rtol=0)  # the keys moved by the re-rotation only
    answer = synthesize(lm, g, route="cache", sampling=SamplingParams(4))
    assert [p.source for p in answer.provenance] == ["prefix", "branch", "branch", "prompt"]


def test_bad_parts_are_refused(lm):
    with pytest.raises(ValueError, match="at least one part"):
        gather(lm, Q, [])
    with pytest.raises(TypeError, match="not int"):
        gather(lm, Q, [3])
    with pytest.raises(ValueError, match="empty"):
        gather(lm, Q, ["  "])
