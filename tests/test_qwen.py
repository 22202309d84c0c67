"""Exactness on the default model, Qwen2.5-Coder-0.5B-Instruct (a real qwen2 model with biases on q/k/v)."""

from __future__ import annotations

import pytest
from test_rope import assert_rerotation_exact
from test_synthesis import QUESTION, assert_cache_route_is_text_route
from test_workers import ROLES, assert_branches_match_fresh_prefill

from parsyn.sampling import SamplingParams
from parsyn.workers import fork

pytestmark = pytest.mark.slow


def test_it_is_the_model_it_says(qwen):
    assert qwen.name == "Qwen2.5-Coder-0.5B-Instruct" and qwen.config.model_type == "qwen2"
    assert qwen.config.num_hidden_layers == 24 and qwen.tokenizer.decode(qwen.stop_ids) == "<|im_end|>"


def test_rerotation_is_exact(qwen):
    assert_rerotation_exact(qwen, n=96, shift=517)


def test_batched_branches_match_fresh_prefill_and_one_branch_is_the_text_route(qwen):
    f = fork(qwen, QUESTION, workers=2, roles=ROLES[:2], sampling=SamplingParams(max_new_tokens=10, temperature=0.8,
                                                                                  seed=1))
    assert_branches_match_fresh_prefill(qwen, f, atol=2e-4)
    one = fork(qwen, QUESTION, workers=1, sampling=SamplingParams(max_new_tokens=10, temperature=0.7, seed=2))
    assert_cache_route_is_text_route(qwen, one)


def test_the_packaged_synthesizer_fits_the_default_model_only(qwen, default_lm):
    from pathlib import Path

    import parsyn
    from parsyn.adapter import load, resolve

    trained = resolve(qwen, "auto")
    assert trained is not None and trained.recipe["train"]["steps"] == 800
    # derived from the trained checkpoint: its LoRA alone, in the sequential layout (README, Evaluation)
    assert trained.mapper is None and trained.layout == "sequential"
    assert trained.recipe["derived"]["mapper"] == "dropped"
    folder = Path(parsyn.__file__).parent / "checkpoints" / "qwen2.5-coder-0.5b-instruct"
    with pytest.raises(ValueError, match="Qwen2.5-Coder-0.5B-Instruct") as refused:
        load(default_lm, folder)
    assert len(str(refused.value).splitlines()) == 1
