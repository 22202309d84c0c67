"""The step-shaped decode loop: the routes' tokens as before, and rows that leave, join, pause and extend.

`golden/decode.json` holds greedy token ids recorded from the callback-driven loop this one replaced
(commit f7991ed): workers, both routes one by one and batched, the data teacher's answers and top-k
ids, on tiny random models and on the embedded model with and without the packaged synthesizer.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import tiny_lm
from transformers import DynamicCache

from parsyn import adapter as A
from parsyn.batch import answers
from parsyn.decode import Batch, Row, decode
from parsyn.detok import Detokenizer, StopText
from parsyn.forward import prefill_rows
from parsyn.probe import probe_items
from parsyn.sampling import SamplingParams, draw
from parsyn.synthesis import stream, synthesize
from parsyn.train.data import DataConfig, _teach, specs
from parsyn.workers import fork, from_texts

GOLDEN = json.loads((Path(__file__).parent / "golden" / "decode.json").read_text())
QUESTION = "Which is larger, 3 or 5?"
ROLES = ["Answer in one word.", "Answer with a full sentence.", "Answer and add a fun fact."]
TEXTS = ["Vera lives in Oslo. Tom has a pet cat.", "Ann lives in Lima.", "The answer is 5."]
GREEDY = SamplingParams(max_new_tokens=12)
ROUTES = [("text", None), ("cache", "parallel"), ("cache", "sequential")]


@pytest.mark.parametrize("family", ["llama", "gemma3", "qwen3", "mistral"])
def test_routes_give_the_recorded_tokens(tokenizer, family):
    lm, want = tiny_lm(family, tokenizer), GOLDEN[family]
    f = fork(lm, QUESTION, workers=3, roles=ROLES, sampling=SamplingParams(max_new_tokens=20))
    assert [list(b.token_ids) for b in f.branches] == want["fork_greedy"]
    g = from_texts(lm, QUESTION, TEXTS)
    forks = [from_texts(lm, QUESTION, TEXTS[:k]) for k in (1, 2, 3)] + [f]
    for route, layout in ROUTES:
        assert list(synthesize(lm, g, route=route, layout=layout, sampling=GREEDY).token_ids) == \
            want[f"synth_{route}_{layout}"]
        got = answers(lm, forks, route=route, layout=layout, sampling=GREEDY)
        assert [list(t) for t, _ in got] == want[f"batch_{route}_{layout}"]


def test_data_teacher_gives_the_recorded_tokens_and_distributions(tokenizer):
    lm = tiny_lm("llama", tokenizer)
    config = DataConfig(items=10, batch=5, answer_tokens=6, topk=8, worker_tokens=6,
                        mix=(("facts", 0.5), ("evidence", 0.3), ("chat", 0.2)))
    todo = specs(config)
    got = [r for start in range(0, len(todo), 5) for r in _teach(lm, todo[start : start + 5], config)]
    # evidence items are left out: their passages are now split by the evaluation's splitter
    kept = lambda rows: [{k: r[k] for k in ("id", "answer_ids", "topk_ids")} for r in rows
                         if r["id"].split("-")[0] in ("facts", "chat")]
    assert len(kept(got)) >= 6 and kept(got) == kept(GOLDEN["data_llama"])


@pytest.mark.slow
def test_embedded_model_gives_the_recorded_tokens(default_lm):
    lm, want = default_lm, GOLDEN["default"]
    f = fork(lm, QUESTION, workers=3, roles=ROLES, sampling=SamplingParams(max_new_tokens=24))
    assert [list(b.token_ids) for b in f.branches] == want["fork_greedy"]
    trained = A.resolve(lm, "auto")
    for name, kw in [("text", dict(route="text")), ("parallel", dict(layout="parallel")),
                     ("sequential", dict(layout="sequential")), ("trained", dict(synthesizer=trained)),
                     ("trained_sequential", dict(synthesizer=trained, layout="sequential"))]:
        assert list(synthesize(lm, f, sampling=SamplingParams(24), **kw).token_ids) == want["synth_" + name], name
    probe = [from_texts(lm, p.question, p.branches) for p in probe_items(12)]
    for name, kw in [("text", dict(route="text")), ("parallel", dict(route="cache", layout="parallel")),
                     ("trained", dict(route="cache", synthesizer=trained))]:
        assert [list(t) for t, _ in answers(lm, probe, sampling=SamplingParams(16), **kw)] == want["batch_" + name]


def fresh_logits(lm, ids):
    """Last-token logits of `ids` prefilled from scratch: the model's own truth."""
    with torch.inference_mode():
        return lm.model(input_ids=torch.tensor([ids]), cache=DynamicCache(), use_cache=True).logits[0, -1].float()


def test_a_paused_row_extended_with_new_tokens_continues_as_a_fresh_prefill(tokenizer):
    """The shape a tool call takes: a row pauses, tokens are appended to its own context (K/V extended,
    nothing recomputed) while the other row keeps decoding, and it goes on from there."""
    lm = tiny_lm("qwen3", tokenizer)
    prompts = [[5, 17, 300, 41], [7, 8, 9]]
    state, logits = prefill_rows(lm, prompts)
    batch = Batch(lm, state, logits, [Row("a", SamplingParams(8)), Row("b", SamplingParams(12))])
    steps = batch.steps()
    next(steps)  # one token each
    batch.pause("a")
    next(steps)
    with pytest.raises(ValueError, match="only a paused row"):
        batch.extend("b", [1, 2])
    tool = [901, 902, 903, 904, 905]
    batch.extend("a", tool)
    a_before = list(batch._find("a").tokens)
    events = next(steps)
    assert [e.key for e in events] == ["a", "b"]  # a ran its new tokens while b decoded one more
    torch.testing.assert_close(batch.logits[0], fresh_logits(lm, prompts[0] + a_before + tool), atol=1e-4, rtol=0)
    for _ in steps:
        pass
    a, b = batch.results["a"], batch.results["b"]
    assert len(a.tokens) == 8 and a.tokens[: len(a_before)] == tuple(a_before)
    alone = decode(lm, *prefill_rows(lm, [prompts[1]]), [Row("b", SamplingParams(12))])[0]
    assert b.tokens == alone.tokens  # the other row never noticed


def test_rows_join_and_leave_between_steps(tokenizer):
    lm = tiny_lm("llama", tokenizer)
    alone = {k: decode(lm, *prefill_rows(lm, [p]), [Row(k, SamplingParams(10))])[0].tokens
             for k, p in (("a", [4, 5, 6]), ("b", [9, 10, 11, 12, 13, 14]), ("c", [20, 21]))}
    batch = Batch(lm, *prefill_rows(lm, [[4, 5, 6], [20, 21]]),
                  [Row("a", SamplingParams(10)), Row("c", SamplingParams(10))])
    steps = batch.steps()
    for _ in range(3):
        next(steps)
    batch.add(Batch(lm, *prefill_rows(lm, [[9, 10, 11, 12, 13, 14]]), [Row("b", SamplingParams(10))]))
    next(steps)
    batch.remove(["c"])
    for _ in steps:
        pass
    assert batch.results["a"].tokens == alone["a"] and batch.results["b"].tokens == alone["b"]
    assert batch.results["c"].finish == "removed" and batch.results["c"].tokens == alone["c"][:4]


@pytest.mark.parametrize("family", ["llama", "gemma3"])
def test_a_batch_that_never_empties_drops_the_padding_rows_leave_behind(tokenizer, family):
    """A long row leaves and a short one joins, again and again (a serving engine under load): the cache
    stays as wide as its longest live row, and every row still decodes as a fresh prefill would."""
    lm = tiny_lm(family, tokenizer)
    batch = Batch(lm, *prefill_rows(lm, [list(range(5, 45)), [7, 8, 9]]),
                  [Row("long", SamplingParams(2)), Row("s0", SamplingParams(30))])
    steps = batch.steps()
    for k in range(1, 6):
        for _ in range(3):
            next(steps)
        batch.add(Batch(lm, *prefill_rows(lm, [list(range(100, 140))]), [Row(f"long{k}", SamplingParams(2))]))
    for _ in range(3):
        next(steps)
    assert set(batch.keys) == {"s0"}
    assert (batch.state.key_pos >= 0).any(0).all()  # no slot is padding in every row
    s0 = batch._find("s0")
    torch.testing.assert_close(batch.logits[0], fresh_logits(lm, [7, 8, 9] + s0.tokens[:-1]), atol=1e-4, rtol=0)
    for _ in steps:
        pass
    alone = decode(lm, *prefill_rows(lm, [[7, 8, 9]]), [Row("s0", SamplingParams(30))])[0]
    assert batch.results["s0"].tokens == alone.tokens
    assert all(batch.results[f"long{k}"].tokens == batch.results["long1"].tokens for k in range(2, 6))


def test_sampled_rows_do_not_depend_on_their_batch(tokenizer):
    lm = tiny_lm("qwen3", tokenizer)
    hot = SamplingParams(max_new_tokens=12, temperature=1.0, top_p=0.9, seed=3)
    batched = fork(lm, QUESTION, workers=3, roles=ROLES, sampling=hot)
    alone = fork(lm, QUESTION, workers=3, roles=ROLES, sampling=hot, batched=False)
    assert [b.token_ids for b in batched.branches] == [b.token_ids for b in alone.branches]
    same_role = fork(lm, QUESTION, workers=2, sampling=hot)
    assert same_role.branches[0].token_ids != same_role.branches[1].token_ids  # each row has its own seed


def test_stop_strings_end_the_row_and_are_cut_from_the_text(default_lm):
    f = from_texts(default_lm, "What is the capital of France?", ["Paris is the capital of France."])
    full = synthesize(default_lm, f, route="text", sampling=SamplingParams(24))
    words = full.answer.split()
    assert len(words) > 3, full.answer
    stop = " " + words[2]
    cut = synthesize(default_lm, f, route="text", sampling=SamplingParams(24, stop=(stop,)))
    assert cut.answer == full.answer[: full.answer.index(stop)].strip()
    assert len(cut.token_ids) < len(full.token_ids)
    pieces = [e.text for e in stream(default_lm, f, route="text", sampling=SamplingParams(24, stop=(stop,)))]
    assert "".join(pieces).strip() == cut.answer and stop not in "".join(pieces)


def test_streamed_text_never_splits_a_character_and_matches_the_whole_decode(tokenizer):
    text = "Größe: 42 km² — 東京タワー 🗼🚀, naïve café. Ünïcödé ✓"
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    assert len(ids) > len(text.split())  # some characters span several tokens
    detok = Detokenizer(tokenizer)
    pieces = [detok.add(i) for i in ids]
    assert all("\ufffd" not in p for p in pieces)
    assert "".join(pieces) == tokenizer.decode(ids, skip_special_tokens=True) == detok.text
    assert len(detok.ids) == len(ids) and detok._start > 0  # a window, not the whole answer, is decoded


def test_stop_text_holds_back_what_may_begin_a_stop_string():
    held = StopText(["###", "END"])
    assert held.release("Hello #") == "Hello "
    assert held.release("Hello ##") == ""
    assert held.release("Hello ##!") == "##!"
    assert held.release("Hello ##! E") == " "
    assert held.release("Hello ##! EN") == ""
    assert held.release("Hello ##! END more") == "" and held.cut == len("Hello ##! ")
    assert held.release("anything") == ""
    plain = StopText([])
    assert plain.release("abc") == "abc" and plain.release("abcd") == "d"


def reference_nucleus(probs: torch.Tensor, top_p: float) -> set[int]:
    sorted_p, order = probs.sort(descending=True)
    return set(order[(sorted_p.cumsum(-1) - sorted_p) <= top_p].tolist())


@pytest.mark.parametrize("peaked", [True, False])
def test_nucleus_draws_stay_in_the_full_sort_nucleus(peaked):
    """The nucleus is searched among the most likely tokens first; a flat distribution whose nucleus is
    larger than that falls back to the whole vocabulary. Either way the draws come from the same set."""
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(2000, generator=g) * (0.05 if not peaked else 1.0)
    if peaked:
        logits[[7, 3, 11]] = torch.tensor([12.0, 11.5, 10.8])
    params = SamplingParams(4, temperature=1.0, top_p=0.9)
    allowed = reference_nucleus(torch.softmax(logits, -1), 0.9)
    assert (len(allowed) < 10) == peaked and (len(allowed) > 512) != peaked
    gen = torch.Generator().manual_seed(1)
    drawn = {int(draw(logits[None], [params], [gen])[0]) for _ in range(300)}
    assert drawn <= allowed and (drawn == allowed if peaked else len(drawn) > 100)


def test_item_seeds_are_stable_and_distinct():
    from parsyn.sampling import item_seed

    seeds = {item_seed(0, f"item-{i}") for i in range(1000)}
    assert len(seeds) == 1000 and all(0 <= s < 2**63 for s in seeds)
    assert item_seed(0, "item-1") == item_seed(0, "item-1") != item_seed(1, "item-1")
