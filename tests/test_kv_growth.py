"""A cache layer that grows in place holds exactly what a plain DynamicLayer holds, after any sequence of
updates, crops, batch selections, row compactions, dropped fronts and stacks, and never changes a tensor
it handed out before (save across the operations documented to reuse its memory)."""

from __future__ import annotations

import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from transformers import DynamicCache
from transformers.cache_utils import DynamicLayer

from parsyn.kv import KV, growing, layer_tensors, stacked, to_cache

H, D = 2, 4


def states(batch: int, q: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(batch, H, q, D, generator=g), torch.randn(batch, H, q, D, generator=g)


ops = st.lists(
    st.one_of(
        st.tuples(st.just("update"), st.integers(1, 40)),
        st.tuples(st.just("crop"), st.integers(1, 5)),
        st.tuples(st.just("select"), st.integers(1, 3)),
        st.tuples(st.just("read"), st.just(0)),
        st.tuples(st.just("keep"), st.integers(1, 7)),
        st.tuples(st.just("front"), st.integers(1, 5)),
        st.tuples(st.just("stack"), st.integers(1, 3)),
    ),
    min_size=1, max_size=30,
)


@settings(max_examples=150, deadline=None)
@given(first=st.integers(1, 50), ops=ops, inference=st.booleans())
def test_growth_matches_a_plain_layer_and_keeps_handed_out_views(first, ops, inference):
    k0, v0 = states(3, first, 0)
    grown = to_cache(KV((k0,), (v0,), torch.arange(first))).layers[0]
    plain = DynamicLayer()
    mode = torch.inference_mode() if inference else torch.no_grad()
    with mode:
        plain.update(k0.clone(), v0.clone())
        handed: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]] = []
        for i, (op, n) in enumerate(ops):
            batch = plain.keys.shape[0]
            if op == "update":
                k, v = states(batch, n, i + 1)
                out = grown.update(k, v)
                plain.update(k, v)
                handed.append((out[0], out[1], out[0].clone(), out[1].clone()))
            elif op == "crop" and plain.keys.shape[-2] > n:
                grown.crop(-n)
                plain.crop(-n)
            elif op == "select":
                rows = torch.arange(batch).flip(0)[: max(1, min(n, batch))]
                grown.batch_select_indices(rows)
                plain.batch_select_indices(rows)
            elif op in ("keep", "front", "stack"):
                handed.clear()  # these reuse the buffer: views handed out before are invalid
                if op == "keep":  # a non-empty ascending subset, from the bits of n
                    rows = [r for r in range(batch) if n >> r & 1] or [0]
                    grown.keep_rows_(rows)
                    plain.batch_select_indices(torch.tensor(rows))
                elif op == "front" and plain.keys.shape[-2] > n:
                    grown.drop_front_(n)
                    plain.keys, plain.values = plain.keys[:, :, n:], plain.values[:, :, n:]
                elif op == "stack":  # this layer's rows, then n new rows with a shorter history in front
                    t = plain.keys.shape[-2]
                    k, v = states(n, max(1, t - 2), i + 100)
                    grown = stacked([[layer_tensors(grown)], [(k, v)]], t).layers[0]
                    pad = (0, 0, t - k.shape[-2], 0)
                    plain.keys = torch.cat([plain.keys, torch.nn.functional.pad(k, pad)])
                    plain.values = torch.cat([plain.values, torch.nn.functional.pad(v, pad)])
            elif op == "read":
                keys, values = layer_tensors(grown)
                handed.append((keys, values, keys.clone(), values.clone()))
            keys, values = layer_tensors(grown)
            assert torch.equal(keys, plain.keys) and torch.equal(values, plain.values)
            assert grown.get_seq_length() == plain.get_seq_length()
        for keys, values, k_then, v_then in handed:
            assert torch.equal(keys, k_then) and torch.equal(values, v_then)


def test_a_buffer_made_in_inference_mode_takes_updates_under_no_grad():
    k, v = states(2, 5, 0)
    with torch.inference_mode():
        layer = to_cache(KV((k,), (v,), torch.arange(5))).layers[0]
        layer.update(*states(2, 1, 1))
    with torch.no_grad():
        keys, _ = layer.update(*states(2, 1, 2))
    assert keys.shape[-2] == 7 and torch.equal(keys[:, :, :5], k)


def test_growing_wraps_plain_layers_and_decode_steps_stop_copying():
    cache = DynamicCache()
    cache.update(*states(1, 8, 0), 0)
    assert type(cache.layers[0]) is DynamicLayer
    growing(cache)
    with torch.inference_mode():
        first, _ = cache.layers[0].update(*states(1, 1, 1))
        second, _ = cache.layers[0].update(*states(1, 1, 2))
    assert second.shape[-2] == 10 and first.data_ptr() == second.data_ptr()  # one buffer, written in place


def test_autograd_keeps_the_copying_path():
    k, v = states(1, 4, 0)
    layer = to_cache(KV((k,), (v,), torch.arange(4))).layers[0]
    q = torch.randn(1, H, 1, D, requires_grad=True)
    keys, _ = layer.update(q * 2, q * 3)
    keys.sum().backward()
    assert torch.equal(q.grad, torch.full_like(q, 2.0))
