"""Re-rotation is exact: keys moved by Δ equal the keys the model itself stores at the new positions."""

from __future__ import annotations

import pytest
import torch
from conftest import FAMILIES, tiny_lm
from hypothesis import given, settings
from hypothesis import strategies as st
from transformers import DynamicCache, GPT2Config, GPT2LMHeadModel

from parsyn import model as M
from parsyn.rope import rope_of, rotate

ROPES = {
    "default": {"rope_type": "default", "rope_theta": 10000.0},
    "linear": {"rope_type": "linear", "rope_theta": 10000.0, "factor": 2.0},
    "llama3": {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
               "high_freq_factor": 4.0, "original_max_position_embeddings": 256},
    "yarn": {"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0, "original_max_position_embeddings": 1024},
}


def cached_keys(lm, ids, start):
    # a DynamicCache without config keeps every entry (with a config, sliding layers truncate)
    pos = torch.arange(start, start + ids.shape[1])[None]
    with torch.inference_mode():
        cache = lm.model(input_ids=ids, position_ids=pos, cache=DynamicCache(), use_cache=True).cache
    return [layer.keys for layer in cache.layers], [layer.values for layer in cache.layers]


def assert_rerotation_exact(lm, n, shift):
    """Layer-0 keys depend on position only through RoPE: re-rotation must match them to fp32 rounding.
    Deeper layers also carry the model's own fp32 noise from computing at other angles (it shows in the
    values, which re-rotation never touches), so they get a looser bound."""
    ids = torch.randint(3, 40000, (1, n), generator=torch.Generator().manual_seed(n))
    k0, v0 = cached_keys(lm, ids, 0)
    k1, v1 = cached_keys(lm, ids, shift)
    old, new = torch.arange(n), torch.arange(n) + shift
    moved = rope_of(lm.model).rerotate(k0, old, new)
    torch.testing.assert_close(moved[0], k1[0], atol=1e-5, rtol=1e-6)  # rtol: Qwen2 keys reach ~1e2
    for layer, (a, b) in enumerate(zip(moved, k1)):
        torch.testing.assert_close(a, b, atol=2e-4, rtol=0, msg=f"layer {layer}")
    # the check can fail: keys left where they were are far from the model's keys
    assert min((a - b).abs().max() for a, b in zip(k0, k1)) > 0.1


@pytest.mark.parametrize("family", FAMILIES)
def test_rerotation_exact_per_family(tokenizer, family):
    assert_rerotation_exact(tiny_lm(family, tokenizer), n=40, shift=517)


@pytest.mark.parametrize("kind", sorted(ROPES))
@pytest.mark.parametrize("family", ["llama", "qwen3"])
def test_rerotation_exact_per_rope_type(tokenizer, family, kind):
    assert_rerotation_exact(tiny_lm(family, tokenizer, rope=ROPES[kind]), n=40, shift=1301)


def test_gemma3_uses_a_base_per_layer_type(tokenizer):
    rope = rope_of(tiny_lm("gemma3", tokenizer).model)
    assert not torch.equal(rope.inv_freq[0], rope.inv_freq[1])


@pytest.mark.slow
def test_rerotation_exact_on_default_model(default_lm):
    assert_rerotation_exact(default_lm, n=160, shift=517)


@settings(max_examples=40, deadline=None)
@given(a=st.integers(0, 4000), b=st.integers(0, 4000), c=st.integers(0, 4000))
def test_rotations_compose_and_leave_input_alone(a, b, c):
    keys = torch.randn(1, 2, 3, 16, generator=torch.Generator().manual_seed(a + b + c))
    before = keys.clone()
    freq = 1.0 / (10000 ** (torch.arange(0, 16, 2).float() / 16))
    at = lambda p: torch.full((3,), p)
    twice = rotate(rotate(keys, freq, at(a), at(b)), freq, at(b), at(c))
    torch.testing.assert_close(twice, rotate(keys, freq, at(a), at(c)), atol=1e-5, rtol=0)
    torch.testing.assert_close(rotate(keys, freq, at(a), at(a)), keys, atol=0, rtol=0)
    assert torch.equal(keys, before)


def test_dynamic_rope_is_refused(tokenizer):
    lm = tiny_lm("llama", tokenizer, rope={"rope_type": "dynamic", "rope_theta": 10000.0, "factor": 2.0})
    with pytest.raises(ValueError, match="dynamic"):
        rope_of(lm.model)


def test_model_without_rotary_positions_is_refused(tokenizer):
    gpt2 = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=100))
    with pytest.raises(ValueError, match="no rotary position embeddings"):
        M.wrap(gpt2, tokenizer, "gpt2")
