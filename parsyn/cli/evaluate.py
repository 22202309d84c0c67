"""`parsyn bench`, `eval` and `report`: the TTFT sweep, the evaluation harness and its HTML report."""

from __future__ import annotations

import json
import sys
from contextlib import nullcontext
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.console import Console
from rich.table import Table

from ..eval.run import METHODS
from ..model import check_device
from .common import MODEL_HELP, app, err, load_model, names, resumable, steps


@app.command()
def bench(
    branches: Annotated[str, typer.Option(help="Numbers of branches, comma-separated.")] = "1,2,4,8",
    lengths: Annotated[str, typer.Option(help="Branch lengths in tokens, comma-separated.")] = "128,256,512,1024",
    repeats: Annotated[int, typer.Option(help="Timed repeats per cell (after one warm-up); medians are reported.")] = 3,
    layout: Annotated[str, typer.Option(help="Layout of the cache route.")] = "parallel",
    as_json: Annotated[bool, typer.Option("--json", help="Print the list of cells as JSON.")] = False,
    out: Annotated[Optional[Path], typer.Option(
        help="Also write the full result (command, environment, cells) here.")] = None,
    model: Annotated[Optional[str], typer.Option("--model", help=MODEL_HELP)] = None,
    random_shape: Annotated[Optional[str], typer.Option(
        help="Time a randomly initialised model of this shape instead (e.g. qwen3-14b).")] = None,
    device: Annotated[str, typer.Option(help="Device for --random-shape (cpu or cuda).")] = "cpu",
    tokenizer: Annotated[Optional[Path], typer.Option(
        help="Tokenizer folder for --random-shape (default: the embedded model's).")] = None,
    graphs: Annotated[bool, typer.Option(
        help="Also time both routes' prefills and a decode step replayed from CUDA graphs (CUDA only).")] = False,
) -> None:
    """Time to first token, text vs cache, over a grid of branch counts and lengths."""
    from transformers import AutoTokenizer

    from ..eval.bench import environment, parse_ints, random_lm, slopes, sweep
    from ..files import write_json

    counts, sizes = parse_ints(branches, "branches"), parse_ints(lengths, "lengths")
    if repeats < 1:
        raise ValueError(f"--repeats must be at least 1, got {repeats}")
    check_device(device)
    if graphs and device != "cuda":
        raise ValueError("--graphs replays CUDA graphs: it needs --device cuda")
    if random_shape:
        if tokenizer is not None and not (tokenizer / "tokenizer_config.json").is_file():
            raise ValueError(f"--tokenizer: no tokenizer_config.json in '{tokenizer}'")
        source = (AutoTokenizer.from_pretrained(tokenizer) if tokenizer
                  else load_model(model).tokenizer if model else None)
        lm = random_lm(random_shape, source, device)
    else:
        lm = load_model(model, device)
    with steps("cells", len(counts) * len(sizes)) as tick:
        cells = sweep(lm, counts, sizes, repeats=repeats, layout=layout, progress=tick, graphs=graphs)
    result = {"command": "parsyn " + " ".join(sys.argv[1:]), "environment": environment(lm), "cells": cells,
              "slopes": slopes(cells)}
    if out:
        write_json(out, result)
    if as_json:
        print(json.dumps(cells, indent=2))
        return
    _show_sweep(result, lm.name, layout)


def _show_sweep(result: dict, name: str, layout: str) -> None:
    """The sweep's table, any CUDA-graphed timings, and how each route's TTFT grows."""
    cells = result["cells"]
    table = Table(title=f"time to first token ({name}, {layout})", title_justify="left")
    for column in ("branches", "length", "text", "cache", "floor", "bare prompt", "speed-up", "overhead"):
        table.add_column(column, justify="right")
    for c in cells:
        if c.get("skipped"):
            table.add_row(str(c["branches"]), str(c["length"]), "—", "—", "—", "—", "—", c["skipped"])
            continue
        table.add_row(str(c["branches"]), str(c["length"]), f"{c['text_ttft_s'] * 1000:.0f} ms",
                      f"{c['cache_ttft_s'] * 1000:.0f} ms", f"{c['floor_s'] * 1000:.0f} ms",
                      f"{c['bare_prompt_s'] * 1000:.0f} ms", f"{c['speedup']:.1f}×", f"{100 * c['overhead']:+.1f}%")
    Console().print(table)
    for c in cells:
        if "graphed_cache_ttft_s" in c:
            Console().print(f"{c['branches']} × {c['length']}: CUDA-graphed floor "
                            f"{c['graphed_floor_s'] * 1000:.1f} ms, cache route "
                            f"{c['graphed_cache_ttft_s'] * 1000:.1f} ms ({c['graphed_speedup']:.1f}× text)")
    if result["slopes"]:
        fit = result["slopes"]
        Console().print("TTFT growth, ms per 1,000 branch tokens (least squares over the cells): " + ", ".join(
            f"{route} {fit[route]['ms_per_1k_tokens']:.1f}" for route in ("text", "cache", "floor") if route in fit)
            + f"; text grows {fit['text_over_cache']:.1f}× faster than cache")


@app.command(name="eval")
def evaluate(
    tasks: Annotated[str, typer.Option(help="Tasks, comma-separated (see parsyn/eval/tasks.py).")],
    out: Annotated[Path, typer.Option(help="Results folder (resumes if it holds this evaluation).")],
    methods: Annotated[str, typer.Option(help="Methods, comma-separated.")] = ",".join(METHODS),
    limit: Annotated[int, typer.Option(help="Items per task (a deterministic subset by seed).")] = 20,
    seed: Annotated[int, typer.Option(help="Seed of the subsets and of the workers' sampling (each item's workers "
                                           "draw from a seed of their own, made from it and the item's id).")] = 0,
    workers: Annotated[int, typer.Option(help="Workers per item.")] = 3,
    max_new_tokens: Annotated[Optional[int], typer.Option(
        help="Token limit of the workers and of every synthesizer (default: by task kind).")] = None,
    worker_tokens: Annotated[Optional[int], typer.Option(help="Workers' token limit (overrides the above).")] = None,
    answer_tokens: Annotated[Optional[int], typer.Option(help="Synthesizers' token limit (overrides).")] = None,
    adapter: Annotated[str, typer.Option(help="Synthesizer for cache-trained: auto, none or a checkpoint.")] = "auto",
    max_turns: Annotated[int, typer.Option(help="Agentic tasks: tool turns per agent.")] = 3,
    model: Annotated[Optional[str], typer.Option("--model", help=MODEL_HELP)] = None,
    ray: Annotated[Optional[str], typer.Option(
        help="Shard the items over Ray actors: a cluster's HOST:PORT, auto, or local (a throwaway two-node "
             "cluster on this machine).")] = None,
    ray_actors: Annotated[int, typer.Option(help="Model replicas (Ray actors, one CPU each) for --ray.")] = 2,
) -> None:
    """Accuracy, agreement with text synthesis and TTFT per task and method, on the same branches. Agentic
    tasks (agent_docs, agent_sql, agent_mbpp) run tool-using workers and compare handovers instead."""
    if any(t.startswith("agent_") for t in names(tasks)):
        if ray is not None:
            raise ValueError("--ray shards the item evaluation; agentic tasks run in one process")
        return _agentic(names(tasks), out, limit, seed, workers, max_turns, adapter, model)
    from ..eval.run import ADDING, EvalConfig
    from ..eval.run import run as run_eval

    config = EvalConfig(tasks=names(tasks), methods=names(methods), limit=limit, seed=seed, workers=workers,
                        worker_tokens=worker_tokens or max_new_tokens, answer_tokens=answer_tokens or max_new_tokens,
                        adapter=adapter)
    from ..eval.run import read_predictions

    shards = _shards(ray, ray_actors, model)
    lm = load_model(model)
    kept = lambda: (f"{len(read_predictions(out / 'predictions.jsonl'))} finished items are in "
                    f"{out / 'predictions.jsonl'}; run the same command to resume")
    with resumable(kept), steps("items", 1) as tick, shards or nullcontext():
        summary = run_eval(lm, config, out, command="parsyn " + " ".join(sys.argv[1:]),
                           progress=lambda done, n, what: tick(done, n, what if what == ADDING else None),
                           shards=shards)
    print_summary(summary, out)


def _shards(address: Optional[str], actors: int, model: Optional[str]):
    """The Ray shards of --ray (None without it), checked before the model loads."""
    if address is None:
        return None
    from ..dist.cluster import require
    from ..eval.shard import Shards
    from ..registry import default

    require()
    return Shards(address, model=model or default(), actors=actors)


def _agentic(tasks, out: Path, limit, seed, workers, max_turns, adapter, model) -> None:
    from ..eval import agentic
    from ..files import read_records

    if not all(t.startswith("agent_") for t in tasks):
        raise ValueError("agentic tasks (agent_*) run in an evaluation of their own; list them without the others")
    config = agentic.AgenticConfig(tasks=tuple(tasks), limit=limit, seed=seed, workers=workers, max_turns=max_turns,
                                   adapter=adapter)
    lm = load_model(model)
    kept = lambda: (f"{len(read_records(out / 'predictions.jsonl'))} finished items are in "
                    f"{out / 'predictions.jsonl'}; run the same command to resume")
    with resumable(kept), steps("items", 1) as tick:
        summary = agentic.run(lm, config, out, progress=lambda done, n, task: tick(done, n))
    table = Table(title=f"agentic evaluation ({out})", title_justify="left")
    for column in ("task", "method", "n", "accuracy [95% CI]", "vs text [95% CI]", "TTFT p50", "question → first token",
                   "prefilled"):
        table.add_column(column)
    for task, entry in summary["tasks"].items():
        for method, m in entry["methods"].items():
            low, high = m["accuracy_ci"]
            versus = m.get("vs_text")
            table.add_row(task, method, f"{m['n']}" + (" (smoke)" if entry["smoke"] else ""),
                          f"{100 * m['accuracy']:.0f}% [{100 * low:.0f}, {100 * high:.0f}]",
                          f"{100 * versus['diff']:+.0f} [{100 * versus['diff_ci'][0]:+.0f}, "
                          f"{100 * versus['diff_ci'][1]:+.0f}]" if versus else "—",
                          f"{m['ttft_s'] * 1000:.0f} ms" if "ttft_s" in m else "—",
                          f"{m.get('e2e_first_s', m['latency_s']):.1f} s",
                          f"{m['prefill_tokens']:.0f}" if "prefill_tokens" in m else "—")
    Console().print(table)


def print_summary(summary: dict, out: Path) -> None:
    """Accuracy first: with its interval, the paired difference from text, regressions and rescues."""
    from ..eval.headline import at_chance, levels, unfinished

    part = unfinished(summary)
    table = Table(title=f"evaluation ({out}{'' if part is None else ', ' + part})", title_justify="left")
    for column in ("task", "method", "n", "accuracy [95% CI]", "vs text [95% CI]", "regr.", "resc.", "agree",
                   "TTFT p50"):
        table.add_column(column)
    pct = lambda x: f"{100 * x:.0f}"
    for r in summary["rows"]:
        low, high = r["accuracy_ci"]
        versus = r.get("vs_text")
        table.add_row(r["task"], r["method"], f"{r['n']}" + (" (smoke)" if r["smoke"] else ""),
                      f"{pct(r['accuracy'])}% [{pct(low)}, {pct(high)}]",
                      f"{100 * versus['diff']:+.0f} [{100 * versus['diff_ci'][0]:+.0f}, "
                      f"{100 * versus['diff_ci'][1]:+.0f}]" if versus else "—",
                      str(versus["regressions"]) if versus else "—", str(versus["rescues"]) if versus else "—",
                      "—" if r["agreement"] is None else f"{pct(r['agreement'])}%",
                      f"{r['ttft_median_s'] * 1000:.0f} ms")
    Console().print(table)
    luck = at_chance(summary["rows"], summary.get("chance"))
    if luck:
        Console().print(f"at chance (text synthesis not above a uniform guess): {levels(luck)}")


@app.command()
def report(
    results: Annotated[Path, typer.Argument(help="Folder of `parsyn eval` (holds summary.json).")],
    bench_files: Annotated[Optional[list[Path]], typer.Option(
        "--bench", help="JSON written by `parsyn bench --out` (repeatable).")] = None,
) -> None:
    """Write results/report.html (self-contained) and its PNG plots."""
    from ..eval.report import write_report

    err.print(f"report: {write_report(results, bench=bench_files or None)}")




@app.command()
def calibrate(
    results: Annotated[Path, typer.Argument(help="Folder of `parsyn eval` (holds predictions.jsonl).")],
    max_regress: Annotated[float, typer.Option(
        help="Regression budget: the largest share of items where text is right and auto is wrong.")] = 0.02,
    out: Annotated[Optional[Path], typer.Option(help="Gate file to write (default RESULTS/gate.json).")] = None,
    method: Annotated[Optional[str], typer.Option(
        help="The cache method the gate guards (default: cache-trained where the items have it, else "
             "cache-parallel).")] = None,
) -> None:
    """Calibrate route=auto on an evaluation's items for a regression budget; plot the trade-off."""
    from ..auto import check_budget

    check_budget(max_regress)  # before anything is read
    from ..eval import gate as G
    from ..eval.run import read_predictions
    from ..files import write_json

    rows = read_predictions(results / "predictions.jsonl") if (results / "predictions.jsonl").is_file() else []
    if not rows:
        raise ValueError(f"no finished evaluation items in {results / 'predictions.jsonl'}")
    from ..eval.run import TRAINED

    cache = method or ("cache-trained" if any("cache-trained" in r["methods"] for r in rows) else "cache-parallel")
    if cache not in G.GUARDED or not any(cache in r["methods"] for r in rows):
        raise ValueError(f"--method {cache}: a gate guards one of {', '.join(G.GUARDED)}, held by these items")
    trained = cache in TRAINED
    summary = results / "summary.json"
    model = json.loads(summary.read_text()).get("environment", {}).get("model", "") if summary.is_file() else ""
    items, layouts = G.cases(rows, cache, trained=trained), G.same_synthesizer(cache, trained)
    gate = G.calibrate(items, max_regress, trained=trained, model=model, layouts=layouts, layout=G.GUARDED[cache])
    target = out or results / "gate.json"
    gate.save(target)
    tradeoff = G.tradeoff(rows, cache, trained=trained, budgets=(*G.BUDGETS, max_regress))
    tradeoff["resampled"] = G.resampled(items, max_regress, trained=trained, layouts=layouts)
    write_json(results / "tradeoff.json", tradeoff)
    figure = G.pareto_plot(tradeoff)
    if figure is not None:
        figure.savefig(results / "tradeoff.png", dpi=110)
    _print_calibration(gate, target, tradeoff, cache, max_regress)


def _print_calibration(gate, target: Path, tradeoff: dict, cache: str, max_regress: float) -> None:
    """The gate, what it did on all items and on resampled halves, its signals' separation and the trade-off."""
    from ..auto import SIGNALS
    from ..eval import gate as G

    c = gate.calibration
    err.print(f"gate: {target} ({gate.signal}, cache below {gate.cache_below:.3f}, recompute below "
              f"{gate.recompute_below:.3f}); on all {c['n']} items: accuracy {100 * c['accuracy']:.1f}%, regressions "
              f"{100 * c['regression_rate']:.1f}% (bound on new items {100 * c['bound']:.1f}%), mean TTFT "
              f"{1000 * c['ttft_mean_s']:.0f} ms, chose {c['chosen']}")
    again = tradeoff["resampled"]
    if again["draws"]:
        rate, speed = again["regression_rate"], again["speedup_vs_text"]
        err.print(f"calibrated on {again['draws']} random halves ({again['calibration_items']} items) and replayed on "
                  f"the others: regressions {100 * rate['mean']:.1f}% on average (10th-90th percentile "
                  f"{100 * rate['p10_50_90'][0]:.1f}-{100 * rate['p10_50_90'][2]:.1f}%), {speed['p10_50_90'][1]:.2f}x "
                  f"below text at the median ({speed['p10_50_90'][0]:.2f}-{speed['p10_50_90'][2]:.2f}x)")
    sep = tradeoff["separation"]
    for signal in (s for s in SIGNALS if s in sep):
        low, high = sep[signal]["auc_ci"]
        err.print(f"signal {signal}: AUC {sep[signal]['auc']:.2f} [{low:.2f}, {high:.2f}] for the "
                  f"{sep['regressions']} regressions of {cache} among {sep['items']} items (0.5: chance)")
    for p in tradeoff["points"]:
        print(f"{p['method']:>18}  n={p['n']:<4} accuracy {100 * p['accuracy']:5.1f}%  regressions "
              f"{100 * p['regression_rate']:5.1f}%  mean TTFT {1000 * p['ttft_mean_s']:6.0f} ms")
    slow = G.no_faster(tradeoff, max_regress)
    if slow is not None:
        err.print(f"warning: at {100 * max_regress:g}% the gate is no faster than text on the {slow['n']} held-out "
                  f"items ({slow['ttft_mean_s']:.2f} s against {slow['text_ttft_mean_s']:.2f} s): its signal finds "
                  "too few of the cache route's regressions, or too few items certify the budget (a budget b needs "
                  "1/b - 1 of them before any request keeps the cache route); allow more regressions or calibrate on "
                  "more items")
