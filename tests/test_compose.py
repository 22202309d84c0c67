"""Composition builds a new cache under a layout and never writes into its inputs."""

from __future__ import annotations

import pytest
import torch
from conftest import tiny_lm
from hypothesis import given
from hypothesis import strategies as st

from parsyn.compose import compose
from parsyn.kv import KV, cat, to_cache
from parsyn.layout import place
from parsyn.rope import rope_of


def segment(start: int, length: int, layers: int = 2, seed: int = 0) -> KV:
    g = torch.Generator().manual_seed(seed)
    return KV(
        tuple(torch.randn(1, 2, length, 16, generator=g) for _ in range(layers)),
        tuple(torch.randn(1, 2, length, 16, generator=g) for _ in range(layers)),
        torch.arange(start, start + length),
    )


@given(prefix=st.integers(0, 50), lengths=st.lists(st.integers(1, 40), min_size=1, max_size=6))
def test_layouts(prefix, lengths):
    par = place(prefix, lengths, "parallel")
    assert par.starts == tuple([prefix] * len(lengths)) and par.next_position == prefix + max(lengths)
    seq = place(prefix, lengths, "sequential")
    assert seq.starts[0] == prefix and seq.next_position == prefix + sum(lengths)
    assert all(b - a == n for a, b, n in zip(seq.starts, seq.starts[1:], lengths))


def test_unknown_layout_names_the_value():
    with pytest.raises(ValueError, match="'diagonal'"):
        place(3, [2], "diagonal")


@pytest.mark.parametrize("layout", ["parallel", "sequential"])
def test_compose_positions_provenance_and_inputs_untouched(tokenizer, layout):
    rope = rope_of(tiny_lm("llama", tokenizer).model)
    prefix = segment(0, 5)
    branches = [segment(5, n, seed=i + 1) for i, n in enumerate([4, 7, 3])]
    before = [[t.clone() for t in (*b.keys, *b.values, b.positions)] for b in [prefix, *branches]]
    out = compose(prefix, branches, rope, layout=layout)
    for seg, saved in zip([prefix, *branches], before):
        assert all(torch.equal(a, b) for a, b in zip((*seg.keys, *seg.values, seg.positions), saved))
    assert out.kv.length == 5 + 4 + 7 + 3
    hows = [s.how for s in out.spans]
    if layout == "parallel":
        assert out.kv.positions.tolist() == list(range(5)) + list(range(5, 9)) + list(range(5, 12)) + list(range(5, 8))
        assert out.next_position == 12 and hows == ["reused"] * 4
        assert torch.equal(out.kv.keys[0][:, :, 9:16], branches[1].keys[0])
    else:
        assert out.kv.positions.tolist() == list(range(19))
        assert out.next_position == 19 and hows == ["reused", "reused", "rerotated", "rerotated"]
        assert not torch.equal(out.kv.keys[0][:, :, 9:16], branches[1].keys[0])
    assert all(torch.equal(a, b) for a, b in zip(out.kv.values, cat([prefix, *branches]).values))
    assert out.kv.keys[0].data_ptr() not in {b.keys[0].data_ptr() for b in [prefix, *branches]}


def test_running_the_model_on_an_adopted_cache_leaves_the_kv_alone(tokenizer):
    lm = tiny_lm("llama", tokenizer)
    ids = torch.randint(3, 40000, (1, 12), generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        cache = lm.model(input_ids=ids, use_cache=True).cache
        kv = KV(tuple(layer.keys.clone() for layer in cache.layers),
                tuple(layer.values.clone() for layer in cache.layers), torch.arange(12))
        saved = [t.clone() for t in (*kv.keys, *kv.values)]
        lm.model(input_ids=ids[:, :3], position_ids=torch.arange(12, 15)[None], cache=to_cache(kv), use_cache=True)
    assert all(torch.equal(a, b) for a, b in zip((*kv.keys, *kv.values), saved))
