"""The two routes: the cache route is the text route when it should be, and differs when it should."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from conftest import FAMILIES, tiny_lm

from parsyn import adapter as A
from parsyn.batch import answers
from parsyn.mapper import MapperConfig
from parsyn.sampling import SamplingParams
from parsyn.synthesis import FIRST_TOP, prepare, synthesize
from parsyn.workers import fork, from_texts

QUESTION = "Which is larger, 3 or 5?"
GREEDY = SamplingParams(max_new_tokens=12, temperature=0.0)


def assert_cache_route_is_text_route(lm, f, atol=1e-4):
    text = prepare(lm, f, route="text")
    cache = prepare(lm, f, route="cache", layout="sequential")
    torch.testing.assert_close(cache.logits, text.logits, atol=atol, rtol=0)
    a = synthesize(lm, f, route="text", sampling=GREEDY)
    b = synthesize(lm, f, route="cache", layout="sequential", sampling=GREEDY)
    assert a.token_ids == b.token_ids and a.answer == b.answer


@pytest.mark.parametrize("family", FAMILIES)
def test_one_worker_sequential_cache_route_is_the_text_route(tokenizer, family):
    lm = tiny_lm(family, tokenizer)
    f = fork(lm, QUESTION, workers=1, sampling=SamplingParams(max_new_tokens=40, temperature=1.0, seed=1))
    # the branch (plus prefix) is longer than the tiny models' 24-token windows
    assert len(f.prefix_ids) + len(f.branches[0].token_ids) > 24
    assert_cache_route_is_text_route(lm, f)


@pytest.mark.slow
def test_one_worker_sequential_cache_route_is_the_text_route_on_default_model(default_lm):
    f = fork(default_lm, QUESTION, workers=1, sampling=SamplingParams(max_new_tokens=40, temperature=0.7, seed=2))
    assert_cache_route_is_text_route(default_lm, f)


@pytest.mark.slow
def test_independent_branches_are_not_the_text_route(default_lm):
    """With several branches the cache route reads independently computed K/V: it must differ from the
    text route (this is what the mapper and adapter are for) — the exactness checks above can fail."""
    f = from_texts(default_lm, QUESTION, ["5 is larger.", "3 is smaller than 5.", "The answer is 5."])
    text = prepare(default_lm, f, route="text")
    cache = prepare(default_lm, f, route="cache", layout="sequential")
    assert (cache.logits - text.logits).abs().max() > 1e-2


@pytest.mark.parametrize("family", ["llama", "gemma3"])
def test_parallel_route_does_not_depend_on_branch_order(tokenizer, family):
    lm = tiny_lm(family, tokenizer)
    f = fork(lm, QUESTION, workers=3, sampling=SamplingParams(max_new_tokens=20, temperature=1.0, seed=4))
    swapped = dataclasses.replace(f, branches=tuple(reversed(f.branches)))
    a = prepare(lm, f, route="cache", layout="parallel")
    b = prepare(lm, swapped, route="cache", layout="parallel")
    torch.testing.assert_close(a.logits, b.logits, atol=1e-4, rtol=0)
    assert synthesize(lm, f, sampling=GREEDY).token_ids == synthesize(lm, swapped, sampling=GREEDY).token_ids
    # the sequential layout does depend on the order, as concatenated text would
    c = prepare(lm, f, route="cache", layout="sequential")
    d = prepare(lm, swapped, route="cache", layout="sequential")
    assert (c.logits - d.logits).abs().max() > 1e-3


def test_synthesis_never_changes_the_fork(tokenizer):
    lm = tiny_lm("mistral", tokenizer)
    f = fork(lm, QUESTION, workers=2, sampling=SamplingParams(max_new_tokens=10, temperature=1.0, seed=5))
    saved = [t.clone() for b in f.branches for t in (*b.kv.keys, *b.kv.values, b.kv.positions)]
    first = [synthesize(lm, f, layout=layout, sampling=GREEDY) for layout in ("sequential", "parallel")]
    again = [synthesize(lm, f, layout=layout, sampling=GREEDY) for layout in ("sequential", "parallel")]
    assert [s.token_ids for s in first] == [s.token_ids for s in again]
    after = [t for b in f.branches for t in (*b.kv.keys, *b.kv.values, b.kv.positions)]
    assert all(torch.equal(a, b) for a, b in zip(saved, after))


def test_results_report_prefill_tokens_ttft_and_provenance(tokenizer):
    lm = tiny_lm("qwen3", tokenizer)
    f = from_texts(lm, QUESTION, ["five", "5 is larger than 3"])
    text = synthesize(lm, f, route="text", sampling=GREEDY)
    par = synthesize(lm, f, route="cache", layout="parallel", sampling=GREEDY)
    seq = synthesize(lm, f, route="cache", layout="sequential", sampling=GREEDY)
    n_branches = sum(len(b.token_ids) for b in f.branches)
    assert text.prefill_tokens == len(f.prefix_ids) + n_branches + par.prefill_tokens
    assert [s.how for s in text.provenance] == ["recomputed"] * 4
    assert [s.how for s in par.provenance] == ["reused", "reused", "reused", "recomputed"]
    assert [s.how for s in seq.provenance] == ["reused", "reused", "rerotated", "recomputed"]
    assert [s.start for s in par.provenance][1:3] == [len(f.prefix_ids)] * 2
    assert 0 < par.ttft_s <= par.total_s and 0 < text.ttft_s <= text.total_s


def test_unknown_route_and_too_long_answers_are_refused(tokenizer):
    lm = tiny_lm("llama", tokenizer)
    f = from_texts(lm, QUESTION, ["5"])
    with pytest.raises(ValueError, match="unknown route 'image'"):
        synthesize(lm, f, route="image")
    with pytest.raises(ValueError, match="positions"):
        synthesize(lm, f, sampling=SamplingParams(max_new_tokens=4090))


@pytest.mark.parametrize("family", ["llama", "gemma3"])
@pytest.mark.parametrize("trained", [False, True])
def test_batched_answers_are_the_one_by_one_answers(tokenizer, family, trained):
    """Every agreement figure comes from `batch.answers`; it must give what `synthesize` gives alone."""
    lm = tiny_lm(family, tokenizer)
    synthesizer = None
    if trained:  # a synthesizer whose parts all change the route: random LoRA, tagged mapper with random tags
        synthesizer = A.attach(lm, A.AdapterConfig(rank=4, alpha=8, mapper=MapperConfig(kind="tagged")))
        g = torch.Generator().manual_seed(7)
        with torch.no_grad():
            for p in synthesizer.parameters():
                p.copy_(torch.randn(p.shape, generator=g) * 0.05)
    texts = ["Vera lives in Oslo.", "Ann lives in Lima and likes tea.", "5", "The larger one is 5, not 3."]
    forks = [from_texts(lm, QUESTION, texts[:k]) for k in (1, 2, 3, 4)]
    forks.append(fork(lm, QUESTION, workers=2, sampling=SamplingParams(max_new_tokens=15, temperature=1.0, seed=2)))
    for route, layout in [("text", None), ("cache", "parallel"), ("cache", "sequential")]:
        together = answers(lm, forks, route=route, layout=layout, sampling=GREEDY, synthesizer=synthesizer, batch=3)
        alone = [synthesize(lm, f, route=route, layout=layout, sampling=GREEDY, synthesizer=synthesizer) for f in forks]
        assert [t for t, _ in together] == [s.token_ids for s in alone], (route, layout)
        assert [a for _, a in together] == [s.answer for s in alone]
    if trained:  # the trained parts were in play: the raw route answers differently
        raw = answers(lm, forks, route="cache", sampling=GREEDY)
        assert [t for t, _ in raw] != [t for t, _ in answers(lm, forks, route="cache", sampling=GREEDY,
                                                              synthesizer=synthesizer)]


def test_a_synthesis_reports_its_first_token_alternatives(tokenizer):
    lm = tiny_lm("qwen2", tokenizer)
    f = from_texts(lm, QUESTION, ["5 is larger.", "The answer is 5."])
    for route in ("text", "cache"):
        s = synthesize(lm, f, route=route, sampling=GREEDY)
        want = torch.log_softmax(prepare(lm, f, route=route).logits[0].float(), dim=-1)
        assert len(s.first_top) == FIRST_TOP and s.first_top[0][0] == s.token_ids[0]  # greedy takes the top one
        assert [p for _, p in s.first_top] == sorted((p for _, p in s.first_top), reverse=True)
        for token, logprob in s.first_top:
            assert abs(logprob - want[token].item()) < 1e-5
