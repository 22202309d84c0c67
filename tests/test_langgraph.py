"""The LangGraph integration: a Send fan-out of parsyn workers joined by a synthesis, equal to a local fork."""

from __future__ import annotations

import pytest
import torch
from conftest import tiny_lm

from parsyn import fork, synthesize
from parsyn.integrations.langgraph import fork_join_graph
from parsyn.sampling import SamplingParams, alone_seed, row_seed
from parsyn.workflow import gather

QUESTION, ROLES = "Why is the sky blue?", ["Be brief.", "Explain the physics.", "Give an example."]


def test_the_seed_of_a_worker_alone_is_its_row_seed():
    for seed, row in [(0, 0), (0, 5), (123, 2), (2**62 + 7, 3)]:
        assert row_seed(alone_seed(seed, row), 0) == row_seed(seed, row)


def test_a_send_fan_out_joined_by_parsyn_equals_a_local_fork_and_synthesis(tokenizer):
    lm = tiny_lm("llama", tokenizer)
    sampling = SamplingParams(8, temperature=1.0, top_p=0.9, seed=4)
    graph = fork_join_graph(lm, worker_sampling=sampling, sampling=SamplingParams(6), route="cache")
    out = graph.invoke({"question": QUESTION, "roles": ROLES})
    local = fork(lm, QUESTION, workers=3, roles=ROLES, sampling=sampling)
    by_role = {b.role: b for b in out["branches"]}  # Send branches may arrive in any order
    assert sorted(by_role) == sorted(ROLES)
    for b in local.branches:
        assert by_role[b.role].token_ids == b.token_ids
        torch.testing.assert_close(by_role[b.role].kv.keys[0], b.kv.keys[0], atol=1e-5, rtol=0)
    ordered = fork_join_graph(lm, worker_sampling=sampling, sampling=SamplingParams(6))
    assert out["answer"] == out["synthesis"].answer and out["synthesis"].route == "cache"
    again = synthesize(lm, gather(lm, QUESTION, out["branches"]), sampling=SamplingParams(6))
    assert out["answer"] == again.answer and out["synthesis"].token_ids == again.token_ids
    assert ordered.invoke({"question": QUESTION, "roles": ROLES[:1]})["branches"][0].role == ROLES[0]


def test_texts_from_other_nodes_join_too(tokenizer):
    from parsyn.integrations.langgraph import join_node

    lm = tiny_lm("llama", tokenizer)
    out = join_node(lm, sampling=SamplingParams(4), route="text")({"question": QUESTION,
                                                                    "branches": ["Rayleigh scattering."]})
    assert out["synthesis"].route == "text" and len(out["synthesis"].token_ids) == 4
    with pytest.raises(ValueError, match="no branches"):
        join_node(lm)({"question": QUESTION, "branches": []})
