"""Early joins that keep the stragglers: the early fork is the quorum fork, the rest is the full join."""

from __future__ import annotations

from collections import Counter

import pytest
import torch
from conftest import tiny_lm
from test_workers import QUESTION, ROLES, assert_branches_match_fresh_prefill

from parsyn.sampling import SamplingParams
from parsyn.stragglers import fork_early
from parsyn.synthesis import prompt_tokens, synthesize
from parsyn.workers import fork

SAMPLING = SamplingParams(max_new_tokens=30, temperature=1.0, seed=2, stop=("a",))  # random text stops soon


@pytest.fixture(scope="module")
def lm(tokenizer):
    return tiny_lm("llama", tokenizer)


@pytest.mark.parametrize("join", [dict(quorum=1), dict(quorum=2), dict(deadline_s=1e-9)])
def test_the_early_fork_is_the_quorum_fork_and_the_rest_is_the_full_join(lm, join):
    full = fork(lm, QUESTION, workers=3, roles=ROLES, sampling=SAMPLING)
    cut = fork(lm, QUESTION, workers=3, roles=ROLES, sampling=SAMPLING, **join)
    seen = Counter()
    early = fork_early(lm, QUESTION, workers=3, roles=ROLES, sampling=SAMPLING,
                       on_token=lambda w, _: seen.update([w]), **join)
    assert early.fork.cut == cut.cut != () and not early.done
    assert [b.token_ids for b in early.fork.branches] == [b.token_ids for b in cut.branches]
    assert_branches_match_fresh_prefill(lm, early.fork, atol=1e-4)
    rest = early.rest()
    assert early.done and early.rest() is rest and rest.cut == ()
    assert [b.token_ids for b in rest.branches] == [b.token_ids for b in full.branches]
    assert [b.role for b in rest.branches] == list(ROLES)
    for got, want in zip(rest.branches, full.branches):  # the same batch ran every step
        torch.testing.assert_close(torch.stack(got.kv.keys), torch.stack(want.kv.keys), atol=1e-5, rtol=0)
    assert_branches_match_fresh_prefill(lm, rest, atol=1e-4)
    assert seen == Counter({w: b.generated for w, b in enumerate(rest.branches)})  # every token reported once
    kept = [i for i in range(3) if i not in early.fork.cut]  # the early branches are the full fork's own
    for i, b in zip(kept, early.fork.branches):
        torch.testing.assert_close(torch.stack(b.kv.values), torch.stack(rest.branches[i].kv.values), atol=0, rtol=0)


def test_a_follow_up_synthesis_over_the_rest_answers_as_over_the_full_join(lm):
    greedy = SamplingParams(max_new_tokens=6, temperature=0.0)
    full = fork(lm, QUESTION, workers=3, roles=ROLES, sampling=SAMPLING)
    early = fork_early(lm, QUESTION, workers=3, roles=ROLES, sampling=SAMPLING, quorum=1)
    for route in ("text", "cache"):
        folded = synthesize(lm, early.rest(), route=route, sampling=greedy)
        assert folded.token_ids == synthesize(lm, full, route=route, sampling=greedy).token_ids
    folded = synthesize(lm, early.rest(), route="cache", sampling=greedy)
    assert folded.prefill_tokens == len(prompt_tokens(lm, full))  # branches read again, not prefilled


def test_a_join_that_waits_for_everyone_is_refused(lm):
    with pytest.raises(ValueError, match="needs a quorum or a deadline"):
        fork_early(lm, QUESTION, workers=3)
    with pytest.raises(ValueError, match="quorum of 4 needs at least 4 workers"):
        fork_early(lm, QUESTION, workers=3, quorum=4)
    with pytest.raises(ValueError, match="quorum must be a positive"):
        fork_early(lm, QUESTION, workers=3, quorum=0)
    everyone = fork_early(lm, QUESTION, workers=2, roles=ROLES[:2], sampling=SAMPLING, quorum=2)
    assert everyone.done and everyone.fork.cut == () and everyone.rest().cut == ()
