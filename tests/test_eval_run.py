"""The evaluation harness, the TTFT sweep and the baselines, on tiny random models (real data, real files)."""

from __future__ import annotations

import json
import math
from dataclasses import replace

import pytest
import torch
from conftest import random_synthesizer, tiny_lm
from transformers import DynamicCache

from parsyn.eval import tasks as T
from parsyn.eval.bench import random_lm, sweep
from parsyn.eval.run import BUDGETS, TRAINED, EvalConfig, _vote, final_answer, read_predictions, run
from parsyn.eval.tasks import load
from parsyn.sampling import SamplingParams
from parsyn.synthesis import CacheOptions, prepare, synthesize
from parsyn.variants import partial_keys_values
from parsyn.workers import from_texts

SMALL = dict(limit=2, workers=2, worker_tokens=6, answer_tokens=6, adapter="none")


def test_every_method_answers_scores_and_resumes(tmp_path, tokenizer):
    lm = tiny_lm("llama", tokenizer)
    config = EvalConfig(tasks=("gsm8k", "squad_split"), **SMALL)
    summary = run(lm, config, tmp_path, command="test")
    rows = read_predictions(tmp_path / "predictions.jsonl")
    item_of = {i.id: i for t in config.tasks for i in load(t, limit=2, seed=0, parts=2)}
    assert len(rows) == 4 and {r["task"] for r in rows} == {"gsm8k", "squad_split"}
    methods = set(config.methods) - set(TRAINED)  # no adapter fits a tiny random model
    for r in rows:
        item = item_of[r["id"]]
        assert set(r["methods"]) == methods and len(r["branches"]) == 2 and r["methods"]["single"]["agrees"] is None
        text = r["methods"]["text"]
        for m in r["methods"].values():  # scores and agreement, recomputed from the stored answers
            assert m["score"] == T.score(item, m["answer"])
            if m is not r["methods"]["single"]:
                assert m["agrees"] == (final_answer(item, m["answer"]) == final_answer(item, text["answer"]))
        assert text["prefill_tokens"] > r["methods"]["cache-parallel"]["prefill_tokens"]
    evidence = next(r for r in rows if r["task"] == "squad_split")
    assert all(b["role"].startswith("Evidence:") for b in evidence["branches"])
    assert ({(s["task"], s["method"]) for s in summary["rows"]}
            == {(t, m) for t in (*config.tasks, "all") for m in methods})
    pooled = {s["method"]: s for s in summary["rows"] if s["task"] == "all"}
    for method, s in pooled.items():  # pooled rows count every item once
        got = [r["methods"][method] for r in rows]
        assert s["n"] == 4 and s["accuracy"] == sum(bool(g["score"]) for g in got) / 4
        if method != "single":
            assert s["agreement"] == sum(g["agrees"] for g in got) / 4
    for s in summary["rows"]:  # accuracy first: its interval, and the paired comparison with text
        assert s["accuracy_ci"][0] <= s["accuracy"] <= s["accuracy_ci"][1] and s["smoke"]
        if s["method"] != "text":
            mine = [r for r in rows if s["task"] in ("all", r["task"])]
            regressions = sum(r["methods"]["text"]["score"] and not r["methods"][s["method"]]["score"] for r in mine)
            rescues = sum(r["methods"][s["method"]]["score"] and not r["methods"]["text"]["score"] for r in mine)
            assert (s["vs_text"]["regressions"], s["vs_text"]["rescues"]) == (regressions, rescues)
    for r in rows:  # the branches' exact tokens are kept, so methods can be run on them again
        assert all(len(b["token_ids"]) == b["tokens"] for b in r["branches"]) and r["prefix_ids"]
    assert json.loads((tmp_path / "summary.json").read_text())["rows"] == summary["rows"]
    assert summary["items"] == {"finished": 4, "total": 4}
    # a killed run: the last line cut short; the rerun finishes it without counting anything twice
    lines = (tmp_path / "predictions.jsonl").read_text().splitlines(keepends=True)
    (tmp_path / "predictions.jsonl").write_text("".join(lines[:2]) + lines[2][:40])
    again = run(lm, config, tmp_path)
    assert [r["id"] for r in read_predictions(tmp_path / "predictions.jsonl")] == [r["id"] for r in rows]
    assert [s["n"] for s in again["rows"]] == [s["n"] for s in summary["rows"]]


def test_bad_settings_are_refused(tmp_path, tokenizer):
    with pytest.raises(ValueError, match="unknown task.*nosuch"):
        EvalConfig(tasks=("nosuch",))
    with pytest.raises(ValueError, match="unknown method.*telepathy"):
        EvalConfig(tasks=("gsm8k",), methods=("telepathy",))
    lm = tiny_lm("llama", tokenizer)
    run(lm, EvalConfig(tasks=("boolq",), methods=("text",), **SMALL), tmp_path)
    with pytest.raises(ValueError, match="other settings"):
        run(lm, EvalConfig(tasks=("boolq",), methods=("text",), **{**SMALL, "seed": 1}), tmp_path)
    # a rerun may add a method: it runs on the same branches, and the record lists both
    added = run(lm, EvalConfig(tasks=("boolq",), methods=("text", "ape"), **SMALL), tmp_path)
    assert {r["method"] for r in added["rows"]} == {"text", "ape"}
    assert json.loads((tmp_path / "config.json").read_text())["methods"] == ["text", "ape"]
    # a rerun may raise the limit: the new items extend the old ones, which are kept; a lower one is refused
    before = read_predictions(tmp_path / "predictions.jsonl")
    grown = run(lm, EvalConfig(tasks=("boolq",), methods=("text",), **{**SMALL, "limit": 3}), tmp_path)
    after = read_predictions(tmp_path / "predictions.jsonl")
    assert grown["items"] == {"finished": 3, "total": 3} and after[:len(before)] == before
    assert sorted({r["id"] for r in after}) == sorted(i.id for i in load("boolq", limit=3, seed=0, parts=2))
    with pytest.raises(ValueError, match="3 items per task"):
        run(lm, EvalConfig(tasks=("boolq",), methods=("text",), **SMALL), tmp_path)
    (tmp_path / "predictions.jsonl").write_text('{"id": 1}\nnot json\n')
    with pytest.raises(ValueError, match="line 1"):
        read_predictions(tmp_path / "predictions.jsonl")


def test_cacheblend_recomputes_the_chosen_share_and_moves_towards_text(tokenizer):
    lm = tiny_lm("qwen3", tokenizer)
    f = from_texts(lm, "Who lives where?", ["Vera lives in Oslo and likes tea.", "Ann lives in Lima and likes coffee."])
    options = CacheOptions(blend=0.3, check_layer=1)
    blended = synthesize(lm, f, layout="sequential", options=options, sampling=SamplingParams(3))
    recomputed = sum(s.length for s in blended.provenance if s.source == "branch" and s.how == "recomputed")
    total = sum(len(b.token_ids) for b in f.branches)
    assert recomputed == round(0.3 * total)
    text = prepare(lm, f, route="text").logits
    raw = prepare(lm, f, layout="sequential").logits
    full = prepare(lm, f, layout="sequential", options=CacheOptions(blend=1.0)).logits
    torch.testing.assert_close(full, text, atol=1e-4, rtol=0)  # recomputing everything is the text route
    assert (raw - text).abs().max() > 1e-3


def test_ape_scales_attention_on_branches(tokenizer):
    lm = tiny_lm("llama", tokenizer)
    f = from_texts(lm, "Who lives where?", ["Vera lives in Oslo.", "Ann lives in Lima."])
    plain = prepare(lm, f, layout="parallel").logits
    neutral = prepare(lm, f, layout="parallel", options=CacheOptions(temperature=1.0, branch_bias=0.0)).logits
    ape = prepare(lm, f, layout="parallel", options=CacheOptions(temperature=0.9, branch_bias=math.log(0.8))).logits
    torch.testing.assert_close(neutral, plain, atol=0, rtol=0)
    assert (ape - plain).abs().max() > 1e-3


def test_ttft_sweep_reports_every_cell(tokenizer):
    lm = random_lm("tiny-qwen3", tokenizer)
    cells = sweep(lm, [1, 2], [32, 3000], repeats=1)
    assert [(c["branches"], c["length"]) for c in cells] == [(1, 32), (1, 3000), (2, 32), (2, 3000)]
    assert "skipped" in cells[3] and "positions" in cells[3]["skipped"]
    for c in cells[:3]:
        assert c["text_ttft_s"] > 0 and c["cache_ttft_s"] > 0 and c["floor_s"] > 0
        # each branch holds the asked-for text plus its turn's opening and end
        assert (len(c["branch_tokens"]) == c["branches"]
                and all(c["length"] < n < c["length"] + 16 for n in c["branch_tokens"]))
        assert 0 < c["bare_prompt_s"] and "trained_ttft_s" not in c


def test_a_ttft_cell_times_the_trained_route_beside_the_raw_one(tokenizer):
    from parsyn import adapter as A
    from parsyn.eval.bench import ttft_cell
    from parsyn.mapper import MapperConfig

    lm = tiny_lm("qwen2", tokenizer)
    trained = random_synthesizer(lm, A.AdapterConfig(rank=2, alpha=4, mapper=MapperConfig(kind="tagged")), std=0.5)
    c = ttft_cell(lm, 2, 24, repeats=1, synthesizer=trained)
    assert c["trained_ttft_s"] > 0 and c["trained_speedup"] == c["text_ttft_s"] / c["trained_ttft_s"]
    assert c["trained_overhead_vs_raw"] == (c["trained_ttft_s"] - c["cache_ttft_s"]) / c["cache_ttft_s"]
    A.attach(lm, A.AdapterConfig(lora=False, mapper=MapperConfig()))


@pytest.mark.parametrize("family", ["llama", "gemma3"])
def test_cacheblend_partial_prefill_is_the_models_own_first_layers(tokenizer, family):
    """The check layers run on a decoder that shares the model's modules; the model is not touched."""
    lm = tiny_lm(family, tokenizer)
    layers = lm.model.get_decoder().layers
    ids = torch.randint(3, 40000, (30,), generator=torch.Generator().manual_seed(5)).tolist()
    keys, values = partial_keys_values(lm, ids, 1)
    with torch.inference_mode():
        full = lm.model(input_ids=torch.tensor([ids]), cache=DynamicCache(), use_cache=True).cache
    assert len(keys) == 1 and lm.model.get_decoder().layers is layers and len(layers) == 2
    torch.testing.assert_close(keys[0], full.layers[0].keys, atol=1e-5, rtol=0)
    torch.testing.assert_close(values[0], full.layers[0].values, atol=1e-5, rtol=0)


def test_majority_voting_takes_the_most_common_final_answer(tokenizer):
    lm = tiny_lm("llama", tokenizer)
    item = load("gsm8k", limit=1, seed=0)[0]
    f = from_texts(lm, item.question, ["So the answer is 12.", "The answer is 7.", "I think it is 7, the answer is 7."])
    voted = _vote(item, f)
    assert voted["answer"] == "The answer is 7." and voted["votes"] == 2 and voted["prefill_tokens"] == 0
    f = from_texts(lm, item.question, ["No idea.", "The answer is 3.", "Hmm."])  # an answer beats no answer
    assert _vote(item, f)["answer"] == "The answer is 3."


def test_budgets_follow_the_task_kind_unless_set():
    config = EvalConfig(tasks=("gsm8k", "boolq"))
    assert config.budget("gsm8k") == BUDGETS["number"] and config.budget("boolq") == BUDGETS["yesno"]
    assert EvalConfig(tasks=("gsm8k",), answer_tokens=5).budget("gsm8k") == (BUDGETS["number"][0], 5)


def test_a_synthesizer_that_fits_later_completes_the_finished_items_on_their_branches(tmp_path, tokenizer,
                                                                                       monkeypatch):
    from parsyn import adapter as A
    from parsyn.mapper import MapperConfig

    lm = tiny_lm("llama", tokenizer)
    monkeypatch.setattr(A, "PACKAGED", tmp_path / "packaged")
    config = EvalConfig(tasks=("boolq",), methods=("text", "cache-parallel", "cache-trained"),
                        **{**SMALL, "adapter": "auto"})
    first = run(lm, config, tmp_path / "eval")
    before = read_predictions(tmp_path / "eval" / "predictions.jsonl")
    assert {s["method"] for s in first["rows"]} == {"text", "cache-parallel"}  # none fits yet
    torch.manual_seed(0)
    trained = random_synthesizer(lm, A.AdapterConfig(rank=2, alpha=4, mapper=MapperConfig(kind="tagged")), std=0.5)
    A.save(trained, lm, tmp_path / "packaged" / "tiny")
    again = run(lm, config, tmp_path / "eval")
    after = read_predictions(tmp_path / "eval" / "predictions.jsonl")
    assert [r["id"] for r in after] == [r["id"] for r in before]  # each item once, in its place
    for old, new in zip(before, after):
        assert {k: v for k, v in new.items() if k != "methods"} == {k: v for k, v in old.items() if k != "methods"}
        assert {m: new["methods"][m] for m in old["methods"]} == old["methods"]  # what was there is kept
        assert new["methods"]["cache-trained"]["agrees"] == (
            new["methods"]["cache-trained"]["final"] == old["methods"]["text"]["final"])
    assert {s["method"] for s in again["rows"]} == {"text", "cache-parallel", "cache-trained"}
    A.attach(lm, A.AdapterConfig(lora=False, mapper=MapperConfig()))


def test_methods_decoded_together_answer_as_each_alone(tokenizer):
    """The harness runs every method alone to its first token, then decodes them all in one batch (the
    trained one in its own): the tokens are those each gives alone, its TTFT its own prefill's."""
    from parsyn import adapter as A
    from parsyn.eval.run import CACHE_METHODS, REVERSED, _syntheses
    from parsyn.mapper import MapperConfig

    lm = tiny_lm("qwen2", tokenizer)
    torch.manual_seed(0)
    trained = random_synthesizer(lm, A.AdapterConfig(rank=2, alpha=4, mapper=MapperConfig(kind="tagged")), std=0.5)
    f = from_texts(lm, "What is 12 times 3?", ["It is 36.", "Twelve threes make thirty-six, so 36.", "36"])
    sampling = SamplingParams(10, 0.0)
    other = from_texts(lm, "What is 12 times 4?", ["48", "It is 48."])  # a second item in the same batch
    methods = [*CACHE_METHODS, *TRAINED]
    together = _syntheses(lm, [((j, m), g) for j, g in enumerate((f, other)) for m in methods], sampling, trained)
    assert [k for k in together] == [(j, m) for j in (0, 1) for m in methods]
    def given(g, method):  # the fork each method reads: the reversed text route takes the branches backwards
        return replace(g, branches=g.branches[::-1]) if method in REVERSED else g

    assert all(together[1, m]["answer"] == synthesize(lm, given(other, m), sampling=sampling,
                                                      **CACHE_METHODS[m]).answer for m in CACHE_METHODS)
    joint = {m: together[0, m] for m in methods}
    for method, got in joint.items():
        keep, layout = TRAINED.get(method, (True, None))
        route = (dict(route="cache", synthesizer=trained if keep else replace(trained, mapper=None), layout=layout)
                 if method in TRAINED else CACHE_METHODS[method])
        alone = synthesize(lm, given(f, method), sampling=sampling, **route)
        assert got["answer"] == alone.answer, method
        assert got["prefill_tokens"] == alone.prefill_tokens and 0 < got["ttft_s"] <= got["latency_s"]
        assert [i for i, _ in got["first_top"]] == [i for i, _ in alone.first_top]
    assert joint["cache-trained"]["answer"] != joint["cache-parallel"]["answer"]  # the adapter did apply
    assert joint["cache-lora"]["first_top"] != joint["cache-trained"]["first_top"]  # and the mapper was off
    spans = {m: [p["length"] for p in joint[m]["provenance"] if p["source"] == "branch"] for m in ("text", *REVERSED)}
    assert spans["text-reversed"] == spans["text"][::-1] != spans["text"]
    A.attach(lm, A.AdapterConfig(lora=False, mapper=MapperConfig()))


def test_every_item_samples_its_workers_from_its_own_stream(tokenizer):
    """Worker i of two items asking the same question draws different tokens (one seed for all made every
    item's worker pick the same quantile of its distribution at each step); the same item draws the same."""
    from parsyn.eval.run import evaluate_items

    lm = tiny_lm("llama", tokenizer)
    config = EvalConfig(tasks=("boolq",), methods=("vote",), **{**SMALL, "worker_tokens": 8})
    ask = "Is the sky blue?\n\nAnswer yes or no."
    items = [T.Item(id=name, task="boolq", question=ask, gold=("yes",)) for name in ("a", "b", "a")]
    texts = [[b["text"] for b in r["branches"]] for r in evaluate_items(lm, items, config, ["vote"], None)]
    assert texts[0] == texts[2] and texts[0] != texts[1]


def test_a_stopped_run_leaves_the_summary_of_what_it_finished(tmp_path, tokenizer):
    """The summary is written after every group: stopped after the first, it holds that group's items and
    says so (CLI title, report warning); the same command then finishes the rest."""
    from parsyn.eval.report import write_report

    lm = tiny_lm("llama", tokenizer)
    config = EvalConfig(tasks=("boolq", "facts"), methods=("vote", "text", "cache-sequential"), **SMALL)

    def stop(done, total, task):
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        run(lm, config, tmp_path, progress=stop)
    partial = json.loads((tmp_path / "summary.json").read_text())
    assert partial["items"] == {"finished": 2, "total": 4}
    assert {r["task"] for r in partial["rows"]} == {"boolq", "all"} and all(r["n"] == 2 for r in partial["rows"])
    assert "<b>Partial</b>: 2 of 4 items" in write_report(tmp_path).read_text()
    done = run(lm, config, tmp_path)
    assert done["items"] == {"finished": 4, "total": 4}
    assert "Partial" not in write_report(tmp_path).read_text()


def test_a_stopped_rerun_that_adds_methods_leaves_their_summary_so_far(tmp_path, tokenizer, monkeypatch):
    """A rerun adding a method to finished items writes the summary after every group too, and the report
    says which methods cover fewer items than the rest."""
    from parsyn.eval import run as R
    from parsyn.eval.report import write_report

    lm = tiny_lm("llama", tokenizer)
    config = EvalConfig(tasks=("boolq", "facts"), methods=("text", "cache-sequential"), **SMALL)
    run(lm, config, tmp_path)
    real, calls = R.complete_items, []

    def stop_after_one(*args, **kwargs):
        calls.append(1)
        if len(calls) > 1:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(R, "complete_items", stop_after_one)
    more = EvalConfig(tasks=("boolq", "facts"), methods=("text", "cache-sequential", "cache-parallel"), **SMALL)
    with pytest.raises(KeyboardInterrupt):
        run(lm, more, tmp_path)
    partial = json.loads((tmp_path / "summary.json").read_text())
    assert [r["n"] for r in partial["rows"] if r["method"] == "cache-parallel"] == [2, 2]  # boolq and all
    assert "<b>Partial</b>: cache-parallel: 2 of 4 items" in write_report(tmp_path).read_text()
    assert partial["chance"] == {"boolq": 0.5, "facts": 0.0, "all": 0.25}  # a guess: yes or no; a written span
    monkeypatch.setattr(R, "complete_items", real)
    seen = []
    done = run(lm, more, tmp_path, progress=lambda *step: seen.append(step))
    assert all(r["n"] == 4 for r in done["rows"] if r["task"] == "all")
    assert seen[-1] == (2, 2, R.ADDING)  # the facts items still lacked the method: the rerun shows it adding them
    assert "Partial" not in write_report(tmp_path).read_text()
