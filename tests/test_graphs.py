"""Synthesis at static shapes, as CUDA graphs replay it: on CPU (graphs off) its prefill gives the plain
prefill's logits and its decode steps the plain decode steps', for both routes, every layout and models with
sliding-window layers."""

from __future__ import annotations

import pytest
import torch
from conftest import tiny_lm

from parsyn import from_texts
from parsyn.compose import compose
from parsyn.eval.bench import ttft_cell
from parsyn.forward import feed_, prefill_rows
from parsyn.graphs import GraphedSynthesis, text_context
from parsyn.rope import rope_of
from parsyn.sampling import SamplingParams
from parsyn.synthesis import prefill_over, prompt_tokens, synthesize, text_row

TEXTS = ["The red key opens the blue door of the north tower.", "Lunch is at noon in the main hall.",
         "The train to Porto leaves from platform four at 9:12 and arrives a little after eleven."]


def composed_of(lm, f, layout):
    return compose(f.prefix, [b.kv for b in f.branches], rope_of(lm.model), layout=layout)


@pytest.mark.parametrize("layout", ["parallel", "sequential"])
@pytest.mark.parametrize("family", ["llama", "qwen3", "gemma3"])
def test_static_prefill_and_decode_steps_are_the_plain_ones(tokenizer, family, layout):
    lm = tiny_lm(family, tokenizer)
    graphed = GraphedSynthesis(lm, key_bucket=16, prompt_bucket=8)
    assert not graphed.graphs  # on CPU the same forwards run eagerly
    for texts in (TEXTS, TEXTS[:2], TEXTS):  # buffers reused and refilled; a shorter cache leaves stale slots
        f = from_texts(lm, "What do the notes say?", texts)
        composed, prompt = composed_of(lm, f, layout), prompt_tokens(lm, f)
        with torch.inference_mode():
            plain = prefill_over(lm, composed, prompt)
            got = graphed.prefill(composed, prompt, room=4)
            torch.testing.assert_close(got, plain.logits, atol=1e-4, rtol=1e-4)
            for token in (11, 542, 7, 90):  # decode steps: the same tokens fed to both
                want = feed_(lm, plain.state, [[token]])
                torch.testing.assert_close(graphed.step(token), want, atol=1e-4, rtol=1e-4)
    with pytest.raises(ValueError, match="no room left"):
        for _ in range(16):
            graphed.step(3)
    exact = GraphedSynthesis(lm, key_bucket=int(composed.positions.numel()) + len(prompt), prompt_bucket=len(prompt))
    torch.testing.assert_close(exact.prefill(composed, prompt), plain.logits, atol=1e-4, rtol=1e-4)  # no padding


@pytest.mark.parametrize("family", ["qwen3", "gemma3"])
def test_static_text_route_is_the_text_prefill(tokenizer, family):
    lm = tiny_lm(family, tokenizer)
    f = from_texts(lm, "What do the notes say?", TEXTS)
    prompt, branch_ids = prompt_tokens(lm, f), [b.token_ids for b in f.branches]
    context, row = text_context(f.prefix, branch_ids, prompt)
    with torch.inference_mode():
        _, want = prefill_rows(lm, [text_row(f.prefix_ids, branch_ids, prompt)])
        got = GraphedSynthesis(lm, key_bucket=32, prompt_bucket=16).prefill(context, row)
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)


def test_static_greedy_generation_gives_the_cache_routes_tokens(tokenizer):
    lm = tiny_lm("qwen3", tokenizer)
    f = from_texts(lm, "What do the notes say?", TEXTS)
    want = synthesize(lm, f, route="cache", layout="sequential",
                      sampling=SamplingParams(max_new_tokens=12, temperature=0.0)).token_ids
    got = GraphedSynthesis(lm).generate(composed_of(lm, f, "sequential"), prompt_tokens(lm, f), 12)
    assert got == list(want)


def test_graphs_need_a_gpu_and_bad_arguments_are_refused(tokenizer):
    lm = tiny_lm("llama", tokenizer)
    with pytest.raises(ValueError, match="CUDA device"):
        GraphedSynthesis(lm, graphs=True)
    with pytest.raises(ValueError, match="buckets must be positive"):
        GraphedSynthesis(lm, key_bucket=0)
    graphed = GraphedSynthesis(lm)
    with pytest.raises(ValueError, match="follows a prefill"):
        graphed.step(1)
    f = from_texts(lm, "What do the notes say?", TEXTS[:1])
    with pytest.raises(ValueError, match="at least one prompt token"):
        graphed.prefill(composed_of(lm, f, "parallel"), [])


def test_the_bench_cell_times_the_static_routes_where_graphs_are_off(tokenizer):
    lm = tiny_lm("qwen3", tokenizer)
    cell = ttft_cell(lm, 2, 24, repeats=1, graphs=False)
    for key in ("graphed_floor_s", "graphed_cache_ttft_s", "graphed_text_ttft_s", "decode_step_s",
                "graphed_decode_step_s", "graphed_speedup"):
        assert cell[key] > 0, key
