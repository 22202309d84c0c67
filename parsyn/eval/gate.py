"""Calibrating `route="auto"` on evaluation records, and the accuracy/regression-against-TTFT trade-off.

Every finished item of a `parsyn eval` run holds, per method, its score, its time to first token and its
first-token alternatives, all on the same branches. So the gate can be replayed offline: for thresholds
(a, b) an item whose risk is below a takes the cache route, below b the cache route with recomputed tokens,
else text; its time to first token is the cache route's (plus the other layout's for the `layouts`
signal), plus the route it falls back to. Items are split in two by a hash of their id: thresholds are
chosen on one half (the fewest seconds within the regression budget) and reported on the other.

The budget is meant for new requests, not for the items it was fitted on: the fewest seconds with an
in-sample rate at the budget overshoots it on new items (on 110 long-branch items, 3.0% on average for a 2%
budget). So a gate counts as within the budget by conformal risk control (Angelopoulos et al., 2022): with
a regression costing at most one item, (n * rate + 1) / (n + 1) <= budget on the n calibration items bounds
the expected rate on a new item drawn like them. The bound is exact for one signal and two routes (the
regressions fall as the threshold tightens); across signals or with the recomputing route it is the same
rule without the proof. Always-text never regresses and always qualifies: a budget b needs at least
1 / b - 1 items before any request may keep the cache route.
"""

from __future__ import annotations

import hashlib
import statistics
from collections.abc import Sequence
from dataclasses import asdict, replace

import numpy as np
from matplotlib.figure import Figure

from ..auto import SIGNALS, Gate, check_budget, risk
from .run import CACHE_METHODS, TRAINED
from .stats import RESAMPLES

RECOMPUTE = "cache-recompute"
BUDGETS = (0.0, 0.01, 0.02, 0.05, 0.1, 0.2)
CUTS = 40  # thresholds tried per signal: the risks' 40-quantiles
FIXED = ("text", "cache-parallel", "cache-sequential", "cache-trained", "cache-lora", "cache-lora-seq",
         "cache-recompute", "cacheblend", "ape", "relay")


# The cache methods a gate can guard (the plain cache route, raw or trained), with the layout the evaluation ran
# them in and `synthesize_auto` then runs (None: the synthesizer's own).
GUARDED = {m: CACHE_METHODS[m]["layout"] for m in ("cache-parallel", "cache-sequential")} | {
    m: layout for m, (_, layout) in TRAINED.items()}


def half(item_id: str) -> int:
    """0 (calibration) or 1 (held out), from a hash of the id: the same split for every run."""
    return hashlib.sha256(item_id.encode()).digest()[0] & 1


# A trained method's other layout, the same synthesizer laid out the other way (what `synthesize_auto` runs for
# the `layouts` signal); methods without one read the raw other layout, and a trained gate then its doubt only.
SIBLING = {"cache-lora-seq": "cache-lora", "cache-lora": "cache-lora-seq"}


def other_layout(cache: str) -> str:
    return SIBLING.get(cache) or ("cache-sequential" if cache != "cache-sequential" else "cache-parallel")


def same_synthesizer(cache: str, trained: bool) -> bool:
    """Whether `cache`'s other layout (`other_layout`) ran the same synthesizer: the `layouts` signal is then
    what the gate would read."""
    return not trained or cache in SIBLING


def cases(rows: Sequence[dict], cache: str, *, trained: bool = False) -> list[dict]:
    """Per item that ran every method the gate needs: its risks, scores and times by choice. A trained
    gate never recomputes (see `calibrate`), so its items need no recomputing route."""
    other = other_layout(cache)
    need = {cache, other, "text"} | (set() if trained else {RECOMPUTE})
    choices = ("cache", "text") if trained else ("cache", "recompute", "text")
    method = {"cache": cache, "recompute": RECOMPUTE, "text": "text"}
    out = []
    for r in rows:
        m = r["methods"]
        if not need <= m.keys() or not all(m[k].get("first_top") for k in (cache, other)):
            continue
        out.append({"id": r["id"], "task": r["task"],
                    "risk": {"confidence": risk(m[cache]["first_top"]),
                             "layouts": risk(m[cache]["first_top"], m[other]["first_top"])},
                    "score": {c: m[method[c]]["score"] for c in choices},
                    "ttft": {"other": m[other]["ttft_s"]} | {c: m[method[c]]["ttft_s"] for c in choices}})
    return out


def replay(items: Sequence[dict], gate: Gate) -> dict:
    """What the gate would have done on `items`: accuracy, regressions (text right, gate wrong), mean TTFT
    and how often it chose each route."""
    if not items:
        raise ValueError("no items to replay the gate on")
    chosen, right, regress, ttft = {"cache": 0, "recompute": 0, "text": 0}, 0, 0, []
    for c in items:
        choice = gate.choose(c["risk"][gate.signal])
        chosen[choice] += 1
        right += bool(c["score"][choice])
        regress += bool(c["score"]["text"]) and not c["score"][choice]
        spent = c["ttft"]["cache"] + (c["ttft"]["other"] if gate.signal == "layouts" else 0.0)
        ttft.append(spent + (c["ttft"][choice] if choice != "cache" else 0.0))
    n = len(items)
    return {"n": n, "accuracy": right / n, "regression_rate": regress / n, "ttft_mean_s": statistics.mean(ttft),
            "chosen": chosen}


def calibrate(items: Sequence[dict], max_regress: float, *, trained: bool, model: str = "",
              layouts: bool | None = None, layout: str | None = None) -> Gate:
    """The gate with the lowest mean TTFT on `items` whose regressions stay within `max_regress` by conformal
    risk control (`within`; always-text, thresholds 0 and 0, has none, so one always exists). layouts: whether
    the items' other layout ran the same synthesizer (default: only untrained); layout: the guarded method's
    (`GUARDED`), recorded for the gate to run in."""
    check_budget(max_regress)
    if not items:
        raise ValueError("no evaluation item holds every method the gate needs (text, the cache route in both "
                         f"layouts and, for a gate without a trained synthesizer, {RECOMPUTE}); run `parsyn eval` "
                         "with them")
    best = None
    # With a trained synthesizer the recomputing route is measured raw, not trained: such a gate chooses
    # between the cache route and text, and reads the other layout only where it ran trained too.
    for signal in SIGNALS if (not trained if layouts is None else layouts) else ("confidence",):
        risks = sorted(c["risk"][signal] for c in items)
        quantiles = {risks[min(len(risks) - 1, round(q * (len(risks) - 1) / CUTS))] for q in range(CUTS + 1)}
        cuts = sorted({0.0, 1.0 + 1e-6, *(r + 1e-9 for r in quantiles)})  # just above a risk: that item passes
        for i, low in enumerate(cuts):
            for high in cuts[i:] if not trained else (low,):
                gate = Gate(signal, low, high, trained=trained, layout=layout, max_regress=max_regress, model=model)
                got = replay(items, gate)
                key = (got["ttft_mean_s"], got["regression_rate"])
                always_text = high == 0.0
                if (always_text or within(got, max_regress)) and (best is None or key < best[0]):
                    best = (key, gate, got)
    return replace(best[1], calibration=best[2] | {"bound": bound(best[2])})


def bound(replayed: dict) -> float:
    """Conformal risk control's bound on the expected regression rate of a new item, from a replay."""
    return (replayed["n"] * replayed["regression_rate"] + 1) / (replayed["n"] + 1)


def within(replayed: dict, max_regress: float) -> bool:
    return bound(replayed) <= max_regress + 1e-12


def resampled(items: Sequence[dict], max_regress: float, *, trained: bool, layouts: bool | None = None,
              draws: int = 50, seed: int = 0) -> dict:
    """The gate calibrated on a random half and replayed on the other, `draws` times: the held-out regression
    rate and mean TTFT against always-text's (mean and 10th/50th/90th percentiles). One split of a few hundred
    items swings by whole points; this says what to expect from a calibration on this many items."""
    rng = np.random.default_rng(seed)
    cut = len(items) // 2
    rates, speedups = [], []
    for _ in range(draws if cut else 0):  # fewer than two items: no half to calibrate on
        order = rng.permutation(len(items))
        calib, held = [items[i] for i in order[:cut]], [items[i] for i in order[cut:]]
        got = replay(held, calibrate(calib, max_regress, trained=trained, layouts=layouts))
        rates.append(got["regression_rate"])
        speedups.append(statistics.mean(c["ttft"]["text"] for c in held) / got["ttft_mean_s"])
    return {"budget": max_regress, "draws": len(rates), "calibration_items": cut,
            **({"regression_rate": _spread(rates), "speedup_vs_text": _spread(speedups)} if rates else {})}


def _spread(values: Sequence[float]) -> dict:
    return {"mean": float(np.mean(values)), "p10_50_90": [float(q) for q in np.quantile(values, [0.1, 0.5, 0.9])]}


def separation(items: Sequence[dict], *, seed: int = 0) -> dict:
    """How well each risk signal tells the items the cache route regresses on (text right, cache wrong)
    from the others: the AUC (0.5: no better than chance; 1: every regression riskier than every other
    item) with a 95% bootstrap interval. A tight budget is met cheaply only where this is well above 0.5."""
    bad = np.array([bool(c["score"]["text"]) and not c["score"]["cache"] for c in items])
    out = {"items": len(items), "regressions": int(bad.sum())}
    if not 0 < bad.sum() < len(items):
        return out
    draws = np.random.default_rng(seed).integers(0, len(items), size=(RESAMPLES, len(items)))
    for signal in SIGNALS:
        risks = np.array([c["risk"][signal] for c in items])
        samples = [_auc(risks[d], bad[d]) for d in draws]
        low, high = np.nanquantile(samples, [0.025, 0.975])
        out[signal] = {"auc": _auc(risks, bad), "auc_ci": [float(low), float(high)]}
    return out


def _auc(risks: np.ndarray, bad: np.ndarray) -> float:
    """P(a regression's risk > another item's), ties counting half (Mann-Whitney)."""
    diff = risks[bad][:, None] - risks[~bad][None, :]
    return float(((diff > 0) + 0.5 * (diff == 0)).mean()) if diff.size else float("nan")


def tradeoff(rows: Sequence[dict], cache: str, *, trained: bool, budgets: Sequence[float] = BUDGETS) -> dict:
    """Fixed methods and the gate at several budgets, all measured on the held-out half (the gate
    calibrated on the other half): accuracy, regressions and mean TTFT of each."""
    items, layouts = cases(rows, cache, trained=trained), same_synthesizer(cache, trained)
    calib, held = [c for c in items if half(c["id"]) == 0], [c for c in items if half(c["id"]) == 1]
    held_ids = {c["id"] for c in held}
    points = []
    for method in FIXED:
        got = [r["methods"] for r in rows if r["id"] in held_ids and method in r["methods"]]
        if got:
            points.append({"method": method, "n": len(got),
                           "accuracy": sum(bool(m[method]["score"]) for m in got) / len(got),
                           "regression_rate": sum(bool(m["text"]["score"]) and not m[method]["score"]
                                                  for m in got) / len(got),
                           "ttft_mean_s": statistics.mean(m[method]["ttft_s"] for m in got)})
    for budget in sorted(set(budgets)):
        if calib and held:
            gate = calibrate(calib, budget, trained=trained, layouts=layouts)
            points.append({"method": f"auto ≤{100 * budget:g}%", "budget": budget, "gate": asdict(gate),
                           **replay(held, gate)})
    return {"cache_method": cache, "calibration_items": len(calib), "held_out_items": len(held), "points": points,
            "separation": separation(items)}


def no_faster(result: dict, budget: float) -> dict | None:
    """The held-out replay of the gate calibrated for `budget` where it is no faster than always-text (its
    signal finds too few of the cache route's regressions, or the items are too few to certify the budget
    otherwise), with text's mean TTFT beside it; None where it is faster or either was not measured."""
    auto = next((p for p in result["points"] if p.get("budget") == budget), None)
    text = next((p for p in result["points"] if p["method"] == "text"), None)
    if auto is None or text is None or auto["ttft_mean_s"] < text["ttft_mean_s"]:
        return None
    return auto | {"text_ttft_mean_s": text["ttft_mean_s"]}


def pareto_plot(result: dict) -> Figure | None:
    """Regressions and accuracy against mean TTFT, one point per fixed method, a line for the gate."""
    points = result["points"]
    if not points:
        return None
    fig = Figure(figsize=(10, 4.2), layout="constrained")
    for ax, key, label in zip(fig.subplots(1, 2), ("regression_rate", "accuracy"),
                              ("regressions (text right, method wrong, %)", "accuracy (%)")):
        auto = [p for p in points if "budget" in p]
        for i, p in enumerate(p for p in points if "budget" not in p):
            ax.scatter(p["ttft_mean_s"], 100 * p[key], color=f"C{i % 10}", label=p["method"], zorder=3)
        if auto:
            ax.plot([p["ttft_mean_s"] for p in auto], [100 * p[key] for p in auto], "k-o", ms=3, label="auto",
                    zorder=2)
            for p in auto:
                ax.annotate(p["method"].removeprefix("auto "), (p["ttft_mean_s"], 100 * p[key]), fontsize=6,
                            xytext=(3, 3), textcoords="offset points")
        ax.set(xscale="log", xlabel="mean time to first token (s, log)", ylabel=label)
        ax.grid(alpha=0.3)
    fig.axes[1].legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    fig.suptitle(f"Held-out half ({result['held_out_items']} items); auto calibrated on the other half")
    return fig
