"""Branch-KV compression: the attention it ranks by (the synthesizer's prompt's, or a branch tail's) is
the model's, dropping a token equals masking it, int8 storage stays within half a step of every channel's
scale, and bad settings are refused."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from conftest import tiny_config, tiny_lm
from transformers import AutoModelForCausalLM

from parsyn import SamplingParams, from_texts, synthesize
from parsyn.compose import compose
from parsyn.compress import Compression, compress, kept, quantize, stored_bytes, window_attention
from parsyn.cpu import attention_probs
from parsyn.forward import State, feed_
from parsyn.model import wrap
from parsyn.rope import rope_of
from parsyn.synthesis import prompt_tokens
from parsyn.variants import CacheOptions

TEXTS = ["The red key opens the blue door of the north tower, and the guard keeps it in a drawer.",
         "Lunch is served at noon in the main hall; on Fridays the menu has fish and a lemon cake.",
         "The train to Porto leaves from platform four at 9:12 and arrives a little after eleven."]


def fork_of(lm, texts=TEXTS):
    return from_texts(lm, "Tell me what the notes say.", texts)


def test_attention_probs_are_the_attention_sdpa_applies():
    g = torch.Generator().manual_seed(0)
    q = torch.randn(2, 4, 5, 8, generator=g)
    k, v = torch.randn(2, 2, 9, 8, generator=g), torch.randn(2, 2, 9, 8, generator=g)
    low = torch.finfo(torch.float32).min
    mask = torch.zeros(2, 1, 5, 9).masked_fill(torch.rand(2, 1, 5, 9, generator=g) < 0.3, low)
    mask[..., 0] = 0  # every query sees something
    lower_right = torch.zeros(5, 9).masked_fill(~torch.ones(5, 9, dtype=torch.bool).tril(9 - 5), low)
    for m, causal, applied in ((mask, False, mask), (None, True, lower_right), (None, False, None)):
        probs = attention_probs(q, k, m, None, causal)  # [B, H_kv, g, q, k]
        want = F.scaled_dot_product_attention(q, k, v, attn_mask=applied, enable_gqa=True)
        got = (probs @ v[:, :, None]).reshape(2, 4, 5, 8)
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(probs.sum(-1), torch.ones(2, 2, 2, 5))


def test_the_ranking_is_the_attention_an_eager_model_reports(tokenizer):
    """The window's attention, read through parsyn's attention, equals what transformers' eager attention
    returns for the same tokens (a plain prefill of the prefix and the branch)."""
    lm = tiny_lm("llama", tokenizer)
    eager = AutoModelForCausalLM.from_config(tiny_config("llama"), dtype=torch.float32, attn_implementation="eager")
    eager.load_state_dict(lm.model.state_dict())
    f = fork_of(lm)
    w = 6
    scores = window_attention(lm, f, w)
    for b, s in zip(f.branches, scores):
        ids = torch.tensor([list(f.prefix_ids) + list(b.token_ids)])
        with torch.no_grad():
            att = eager(input_ids=ids, output_attentions=True).attentions  # per layer [1, H, T, T]
        start, n = len(f.prefix_ids), len(b.token_ids)
        want = sum(a[0, :, -w:, start : start + n - w].sum((0, 1)) for a in att)
        torch.testing.assert_close(s, want, atol=1e-4, rtol=1e-4)
    prompt = prompt_tokens(lm, f)  # by="prompt": the synthesizer's prompt, read right after each branch
    for b, s in zip(f.branches, window_attention(lm, f, w, prompt)):
        ids = torch.tensor([list(f.prefix_ids) + list(b.token_ids) + prompt])
        with torch.no_grad():
            att = eager(input_ids=ids, output_attentions=True).attentions
        start, n = len(f.prefix_ids), len(b.token_ids)
        want = sum(a[0, :, -len(prompt):, start : start + n - w].sum((0, 1)) for a in att)
        torch.testing.assert_close(s, want, atol=1e-4, rtol=1e-4)
    assert not torch.equal(s, scores[-1])  # the two windows rank differently


@pytest.mark.parametrize("layout", ["parallel", "sequential"])
@pytest.mark.parametrize("family", ["llama", "qwen3", "gemma3"])
def test_a_dropped_token_is_a_masked_token(tokenizer, family, layout):
    """Synthesis over compressed branches equals synthesis over the whole branches with the dropped
    tokens masked out: nothing else moves (kept tokens keep their positions)."""
    lm = tiny_lm(family, tokenizer)
    f = fork_of(lm)
    c = Compression(keep=0.5, window=4)
    small = compress(lm, f, c)
    assert all(s.kv.length < b.kv.length for s, b in zip(small.branches, f.branches))
    prompt = prompt_tokens(lm, f)
    composed = compose(f.prefix, [b.kv for b in f.branches], rope_of(lm.model), layout=layout)
    key_pos = composed.positions[None].clone()
    at = f.prefix.length
    for b, s in zip(f.branches, small.branches):
        gone = torch.tensor([p not in set(s.kv.positions.tolist()) for p in b.kv.positions.tolist()])
        key_pos[0, at : at + b.kv.length][gone] = -1
        at += b.kv.length
    state = State.over(composed.segments, key_pos)
    start = composed.next_position
    with torch.inference_mode():
        want = feed_(lm, state, [prompt], [list(range(start, start + len(prompt)))])
    got = synthesize(lm, f, route="cache", layout=layout, options=CacheOptions(keep=0.5, keep_window=4),
                     sampling=SamplingParams(1))
    direct = synthesize(lm, small, route="cache", layout=layout, sampling=SamplingParams(1))
    assert got.token_ids == direct.token_ids == (int(want[0].argmax()),)
    lp = torch.log_softmax(want[0], -1)
    for tok, value in direct.first_top:
        assert abs(lp[tok].item() - value) < 1e-4
    assert any(s.how == "compressed" for s in direct.provenance)


def test_compressed_spans_keep_their_place(tokenizer):
    lm = tiny_lm("llama", tokenizer)
    f = fork_of(lm)
    small = compress(lm, f, Compression(keep=0.3, window=4))
    full = synthesize(lm, f, route="cache", layout="sequential", sampling=SamplingParams(1))
    part = synthesize(lm, small, route="cache", layout="sequential", sampling=SamplingParams(1))
    assert [(s.start, s.length) for s in full.provenance] == [(s.start, s.length) for s in part.provenance]


def test_kept_tokens_hold_the_sinks_the_window_and_the_best_rest():
    scores = torch.zeros(20)
    scores[9] = 5.0
    out = kept(scores, 26, Compression(keep=0.5, window=6, sinks=2, pool=3))
    assert {0, 1} | set(range(20, 26)) <= set(out) and {8, 9, 10} <= set(out) and len(out) == 13
    assert kept(scores, 26, Compression(keep=1.0)) == list(range(26))
    assert kept(torch.zeros(0), 5, Compression(keep=0.1, window=6)) == list(range(5))  # shorter than its window


def test_int8_is_within_half_a_step_of_every_channel_and_a_quarter_of_the_bytes(tokenizer):
    lm = tiny_lm("qwen2", tokenizer)
    f = fork_of(lm)
    kv = f.branches[0].kv
    q = quantize(kv)
    back = q.dequantize()
    for a, b, s in zip(kv.keys + kv.values, back.keys + back.values, q.key_scales + q.value_scales):
        assert q.keys[0].dtype == torch.int8 and bool(((a - b).abs() <= s / 2 + 1e-6).all())
    full = stored_bytes(f, Compression())
    assert stored_bytes(f, Compression(bits=8)) < 0.3 * full
    before = [t.clone() for t in kv.keys]
    compress(lm, f, Compression(keep=0.5, bits=8, window=4))
    assert all(torch.equal(a, b) for a, b in zip(before, kv.keys))  # the input fork is not written to


@pytest.mark.slow
def test_int8_answers_like_the_model_s_own_dtype(default_lm):
    f = from_texts(default_lm, "What is the capital of France?", ["Paris is the capital of France.", "It is Paris."])
    plain = synthesize(default_lm, f, route="cache", sampling=SamplingParams(8))
    eight = synthesize(default_lm, f, route="cache", options=CacheOptions(kv_bits=8), sampling=SamplingParams(8))
    assert eight.answer == plain.answer
    assert abs(dict(eight.first_top)[plain.token_ids[0]] - plain.first_top[0][1]) < 0.05


def test_bad_settings_are_one_clear_error(tokenizer):
    for bad in (dict(keep=0), dict(keep=1.5), dict(bits=4), dict(pool=4), dict(window=0), dict(by="query")):
        with pytest.raises(ValueError):
            Compression(**bad)
    with pytest.raises(ValueError, match="does not combine"):
        CacheOptions(keep=0.5, recompute=4)
    lm = tiny_lm("llama", tokenizer)
    small = compress(lm, fork_of(lm), Compression(keep=0.5, window=4))
    with pytest.raises(ValueError, match="already compressed"):
        compress(lm, small, Compression(keep=0.5, window=4))
    assert compress(lm, small, Compression()) is small


def test_without_parsyn_attention_keeping_tokens_is_refused(tokenizer):
    model = AutoModelForCausalLM.from_config(tiny_config("llama"), dtype=torch.float32, attn_implementation="eager")
    lm = wrap(model, tokenizer, "tiny-eager", pack=False)
    with pytest.raises(ValueError, match="parsyn's CPU attention"):
        compress(lm, fork_of(lm), Compression(keep=0.5, window=4))
