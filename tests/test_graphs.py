"""The bucketed static-shape prefill that CUDA graphs replay: on CPU (graphs off) its padded forward gives
the plain prefill's logits, for every layout and for models with sliding-window layers."""

from __future__ import annotations

import pytest
import torch
from conftest import tiny_lm

from parsyn import from_texts
from parsyn.compose import compose
from parsyn.eval.bench import ttft_cell
from parsyn.graphs import GraphedPrefill
from parsyn.rope import rope_of
from parsyn.synthesis import prefill_over, prompt_tokens

TEXTS = ["The red key opens the blue door of the north tower.", "Lunch is at noon in the main hall.",
         "The train to Porto leaves from platform four at 9:12 and arrives a little after eleven."]


@pytest.mark.parametrize("layout", ["parallel", "sequential"])
@pytest.mark.parametrize("family", ["llama", "qwen3", "gemma3"])
def test_the_padded_static_prefill_is_the_plain_prefill(tokenizer, family, layout):
    lm = tiny_lm(family, tokenizer)
    graphed = GraphedPrefill(lm, key_bucket=16, prompt_bucket=8)
    assert not graphed.graphs  # on CPU the same forward runs eagerly
    for texts in (TEXTS, TEXTS[:2]):  # two calls into one bucket or two: buffers reused, refilled
        f = from_texts(lm, "What do the notes say?", texts)
        composed = compose(f.prefix, [b.kv for b in f.branches], rope_of(lm.model), layout=layout)
        prompt = prompt_tokens(lm, f)
        with torch.inference_mode():
            want = prefill_over(lm, composed, prompt).logits
        torch.testing.assert_close(graphed(composed, prompt), want, atol=1e-4, rtol=1e-4)
    exact = GraphedPrefill(lm, key_bucket=int(composed.positions.numel()), prompt_bucket=len(prompt))
    torch.testing.assert_close(exact(composed, prompt), want, atol=1e-4, rtol=1e-4)  # no padding at all


def test_graphs_need_a_gpu_and_buckets_must_be_positive(tokenizer):
    lm = tiny_lm("llama", tokenizer)
    with pytest.raises(ValueError, match="CUDA device"):
        GraphedPrefill(lm, graphs=True)
    with pytest.raises(ValueError, match="buckets must be positive"):
        GraphedPrefill(lm, key_bucket=0)


def test_the_bench_cell_times_the_graphed_route_where_graphs_are_off(tokenizer):
    lm = tiny_lm("qwen3", tokenizer)
    cell = ttft_cell(lm, 2, 24, repeats=1, graphed=GraphedPrefill(lm, graphs=False))
    assert cell["graphed_floor_s"] > 0 and cell["graphed_cache_ttft_s"] > 0 and cell["graphed_speedup"] > 0
