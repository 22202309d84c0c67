"""route="auto": the risk score, each choice against the route it stands for, calibration within a budget."""

from __future__ import annotations

import math

import numpy as np
import pytest
from conftest import tiny_lm

from parsyn.auto import Gate, risk, synthesize_auto
from parsyn.eval import gate as G
from parsyn.eval.run import EvalConfig, read_predictions, run
from parsyn.sampling import SamplingParams
from parsyn.synthesis import CacheOptions, synthesize
from parsyn.workers import from_texts

GREEDY = SamplingParams(6, 0.0)


def test_risk_reads_doubt_and_layout_disagreement():
    sure = [(1, math.log(0.98)), (2, math.log(0.01))]
    torn = [(1, math.log(0.5)), (2, math.log(0.45))]
    assert risk(sure) == pytest.approx(0.02) and risk(torn) == pytest.approx(0.5)
    assert risk(sure, sure) == pytest.approx(0.01)  # same distribution in both layouts: doubt / 2
    flipped = [(2, math.log(0.98)), (1, math.log(0.01))]
    assert risk(sure, flipped) == pytest.approx(0.5 * (0.02 + 0.97))


@pytest.mark.parametrize("gate, choice, same_as", [
    (Gate(cache_below=2, recompute_below=2), "cache", dict(route="cache")),
    (Gate(cache_below=2, recompute_below=2, layout="sequential"), "cache", dict(route="cache", layout="sequential")),
    (Gate(cache_below=0, recompute_below=2, recompute=3), "recompute",
     dict(route="cache", options=CacheOptions(recompute=3))),
    (Gate(cache_below=0, recompute_below=0), "text", dict(route="text")),
    (Gate(signal="layouts", cache_below=0, recompute_below=0), "text", dict(route="text")),
])
def test_each_choice_is_the_route_it_stands_for(tokenizer, gate, choice, same_as):
    lm = tiny_lm("qwen3", tokenizer)
    f = from_texts(lm, "Who lives where?", ["Vera lives in Oslo.", "Ann lives in Lima and likes coffee."])
    got, decision = synthesize_auto(lm, f, gate, sampling=GREEDY)
    want = synthesize(lm, f, sampling=GREEDY, **same_as)
    assert got.token_ids == want.token_ids and got.prefill_tokens == want.prefill_tokens
    assert got.route == want.route and decision["choice"] == choice and 0 <= decision["risk"] <= 1


def test_a_gate_round_trips_and_bad_ones_are_refused(tmp_path):
    gate = Gate("layouts", 0.1, 0.3, max_regress=0.02, model="m", calibration={"n": 5})
    gate.save(tmp_path / "gate.json")
    assert Gate.load(tmp_path / "gate.json") == gate
    for bad, message in ((dict(max_regress=1.5), r"in \[0, 1\]"), (dict(max_regress=-0.1), r"in \[0, 1\]"),
                         (dict(signal="vibes"), "unknown gate signal"), (dict(layout="diagonal"), "gate layout"),
                         (dict(cache_below=0.5, recompute_below=0.2), "cache_below <= recompute_below")):
        with pytest.raises(ValueError, match=message):
            Gate(**bad)
    (tmp_path / "other.json").write_text('{"format": "something"}')
    with pytest.raises(ValueError, match="not a parsyn gate file"):
        Gate.load(tmp_path / "other.json")
    with pytest.raises(ValueError, match="calibrated without a trained synthesizer"):
        synthesize_auto(None, None, Gate(), synthesizer=object())


def case(i, risk_, cache_right, text_right=True):
    return {"id": f"x{i}", "task": "t", "risk": {"confidence": risk_, "layouts": risk_},
            "score": {"cache": cache_right, "recompute": cache_right, "text": text_right},
            "ttft": {"cache": 0.1, "other": 0.1, "recompute": 0.15, "text": 1.0}}


def test_calibration_keeps_within_the_budget_and_sends_only_risky_items_to_text():
    items = [case(i, i / 100, cache_right=i < 70) for i in range(100)]  # the cache route fails above 0.7
    strict = G.calibrate(items, 0.02, trained=False)
    got = G.replay(items, strict)
    assert got["regression_rate"] <= 0.01 and got["chosen"]["cache"] >= 60 and got["ttft_mean_s"] < 0.5
    assert G.replay(items, G.calibrate(items, 0.0, trained=False))["chosen"]["text"] == 100  # nothing certifies 0
    loose = G.replay(items, G.calibrate(items, 0.2, trained=False))
    assert loose["regression_rate"] <= 0.2 and loose["ttft_mean_s"] <= got["ttft_mean_s"]
    assert G.replay(items, G.calibrate(items, 1.0, trained=False))["chosen"]["cache"] == 100
    with pytest.raises(ValueError, match="no evaluation item"):
        G.calibrate([], 0.02, trained=False)


def test_the_tradeoff_is_measured_from_evaluation_records(tmp_path, tokenizer):
    lm = tiny_lm("llama", tokenizer)
    config = EvalConfig(tasks=("boolq", "facts"), methods=("text", "cache-parallel", "cache-sequential",
                                                          "cache-recompute", "cacheblend"),
                        limit=6, workers=2, worker_tokens=4, answer_tokens=3, adapter="none")
    run(lm, config, tmp_path)
    rows = read_predictions(tmp_path / "predictions.jsonl")
    result = G.tradeoff(rows, "cache-parallel", trained=False)
    assert result["calibration_items"] + result["held_out_items"] == 12
    methods = [p["method"] for p in result["points"]]
    assert {"text", "cache-parallel", "cacheblend"} <= set(methods) and "auto ≤2%" in methods
    text = next(p for p in result["points"] if p["method"] == "text")
    assert text["regression_rate"] == 0
    assert G.pareto_plot(result) is not None


def test_the_budget_holds_for_new_items_by_conformal_risk_control():
    items = [case(i, i / 100, cache_right=i < 70) for i in range(100)]
    gate = G.calibrate(items, 0.05, trained=True)  # (100 * rate + 1) / 101 <= 0.05: at most 4 regressions
    rate = G.replay(items, gate)["regression_rate"]
    assert 0.03 <= rate <= 0.04 and gate.calibration["bound"] == pytest.approx((100 * rate + 1) / 101)
    five = G.replay(items, Gate(cache_below=0.745, recompute_below=0.745, trained=True))  # 75 kept: 5 regress
    assert five["regression_rate"] == 0.05 and not G.within(five, 0.05) and G.within(five, 0.06)
    assert G.replay(items[:40], G.calibrate(items[:40], 0.02, trained=True))["chosen"]["text"] == 40  # < 1/b - 1
    # A weak signal: risk and regressions barely related. Calibrated on 120 items and replayed on new ones, the
    # rate stays within the budget on average.
    rng = np.random.default_rng(0)
    pool = [case(i, r, cache_right=rng.random() > 0.02 + 0.06 * r) for i, r in enumerate(rng.random(4000))]
    draw = lambda: [pool[j] for j in rng.choice(2000, 120, replace=False)]  # noqa: E731
    new = [G.replay(pool[2000:], G.calibrate(draw(), 0.02, trained=True)) for _ in range(60)]
    assert np.mean([g["regression_rate"] for g in new]) <= 0.02
    assert np.mean([g["chosen"]["cache"] for g in new]) > 0  # not text everywhere
    again = G.resampled(pool[:240], 0.02, trained=True, draws=20)
    assert again["draws"] == 20 and again["calibration_items"] == 120
    assert again["regression_rate"]["mean"] <= 0.02 < again["speedup_vs_text"]["p10_50_90"][2]


def test_a_gate_for_a_trained_synthesizer_reads_its_own_doubt_and_never_the_raw_arms():
    items = [case(i, i / 100, cache_right=i < 70) for i in range(100)]
    gate = G.calibrate(items, 0.05, trained=True)
    assert gate.trained and gate.signal == "confidence" and gate.cache_below == gate.recompute_below
    chosen = G.replay(items, gate)["chosen"]
    assert chosen["recompute"] == 0 and chosen["cache"] > 60


def test_separation_measures_how_well_a_signal_finds_the_regressions():
    items = [case(i, i / 100, cache_right=i < 90) for i in range(100)]  # the riskiest ten regress
    sep = G.separation(items)
    assert sep["regressions"] == 10 and sep["confidence"]["auc"] == 1.0
    low, high = sep["confidence"]["auc_ci"]
    assert low <= 1.0 <= high and low > 0.9
    blind = [case(i, 0.3, cache_right=i % 10 != 0) for i in range(100)]  # every risk the same: chance
    assert G.separation(blind)["confidence"]["auc"] == 0.5
    assert "confidence" not in G.separation([case(0, 0.1, True)])  # no regression: nothing to separate


def record(i, seq_top, par_top):
    first = lambda top: [[top, math.log(0.9)], [top + 1, math.log(0.1)]]  # noqa: E731
    method = lambda top, score, s=0.1: {"score": score, "ttft_s": s, "first_top": first(top)}  # noqa: E731
    return {"id": f"r{i}", "task": "t", "methods": {
        "text": method(5, True, 1.0), "cache-recompute": method(5, True), "cache-parallel": method(5, True),
        "cache-sequential": method(5, True), "cache-lora-seq": method(seq_top, seq_top == par_top),
        "cache-lora": method(par_top, True)}}


def test_a_trained_gate_reads_the_same_synthesizers_other_layout_where_it_ran():
    rows = [record(i, 5, 5 if i % 4 else 9) for i in range(40)]  # the two LoRA layouts disagree: it regresses
    items = G.cases(rows, "cache-lora-seq")
    assert [c["risk"]["layouts"] > 0.3 for c in items] == [i % 4 == 0 for i in range(40)]
    gate = G.calibrate(items, 0.05, trained=True, layouts=True)
    assert gate.signal == "layouts" and G.replay(items, gate)["chosen"] == {"cache": 30, "recompute": 0, "text": 10}
    assert G.calibrate(items, 0.0, trained=True).signal == "confidence"  # no sibling given: its doubt only
    assert G.tradeoff(rows, "cache-lora-seq", trained=True)["separation"]["layouts"]["auc"] == 1.0


def test_a_trained_gate_needs_no_recomputing_route():
    rows = [record(i, 5, 5 if i % 4 else 9) for i in range(8)]
    for r in rows[:4]:
        del r["methods"]["cache-recompute"]  # added to only some items, as a rerun adding methods leaves them
    assert len(G.cases(rows, "cache-lora-seq", trained=True)) == 8
    assert len(G.cases(rows, "cache-parallel")) == 4  # an untrained gate may recompute: it needs the route
    assert "recompute" not in G.cases(rows, "cache-lora-seq", trained=True)[0]["score"]


def test_a_gate_no_faster_than_text_on_held_out_items_is_flagged():
    blind = [record(i, 5, 5) for i in range(80)]  # every risk the same, and one item in five regresses
    for row in blind[::5]:
        row["methods"]["cache-lora-seq"]["score"] = False
    result = G.tradeoff(blind, "cache-lora-seq", trained=True, budgets=(0.0, 0.03, 0.5))
    assert [p["budget"] for p in result["points"] if "budget" in p] == [0.0, 0.03, 0.5]
    slow = G.no_faster(result, 0.03)  # only always-text keeps the budget: the cache route tried first costs extra
    assert slow["chosen"]["cache"] == 0 and slow["ttft_mean_s"] > slow["text_ttft_mean_s"] == 1.0
    assert G.no_faster(result, 0.5) is None  # a budget above the 20% rate: always the cache route
    seen = [record(i, 5, 5 if i % 4 else 9) for i in range(80)]  # the layouts' disagreement finds every regression
    assert G.no_faster(G.tradeoff(seen, "cache-lora-seq", trained=True, budgets=(0.05,)), 0.05) is None
    assert G.no_faster(result, 0.07) is None  # a budget not measured
