"""An HTML report with PNG plots from `parsyn eval` results (DIR/summary.json) and, optionally, one or more
`parsyn bench --out` files (e.g. the embedded model on a CPU and a larger model on a GPU).

The report is one self-contained file: inline CSS, plots embedded as base64 data URIs, no scripts, no links.
The PNGs are also written next to it. Paths are arguments; nothing depends on the working directory.
"""

from __future__ import annotations

import base64
import html
import math
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path

from matplotlib.figure import Figure  # a bare Figure renders with Agg and leaves pyplot's global state alone
from matplotlib.lines import Line2D

from ..files import atomic_write, read_json
from . import headline as H

DPI = 110
MARKERS = "osD^v<>ph*"
# (key in a bench cell, legend name, line style, colour): one line per route; the floor is dashed.
ROUTES = (("text_ttft_s", "text route", "-", "C3"), ("cache_ttft_s", "cache route", "-", "C0"),
          ("floor_s", "floor (prompt over composed cache)", "--", "C7"))
CSS = """body{font-family:system-ui,sans-serif;max-width:1150px;margin:2em auto;padding:0 1em;color:#222}
h1{font-size:1.6em}h2{margin-top:1.6em;border-bottom:1px solid #ddd}
table{border-collapse:collapse;margin:.4em 0 1.2em;font-size:.92em}th,td{border:1px solid #ccc;padding:.25em .6em}
th{background:#f3f3f3;text-align:left}td.n{text-align:right;font-variant-numeric:tabular-nums}
pre{background:#f6f6f6;padding:.6em;overflow-x:auto;white-space:pre-wrap}img{max-width:100%}figure{margin:1em 0}
p.warn{background:#fff3cd;padding:.5em}"""


def _num(x: object) -> float | None:
    """A finite number as float, else None (bools, strings, null, NaN and inf are not numbers here)."""
    if isinstance(x, bool) or not isinstance(x, (int, float)) or not math.isfinite(x):
        return None
    return float(x)


def _label(x: object) -> str:
    return str(x).replace("$", r"\$")  # a '$' would switch matplotlib to mathtext, which can fail to parse


def _unique(values: Iterable[object]) -> list[str]:
    return list(dict.fromkeys(str(v) for v in values))


def _order(v: object) -> tuple:
    """Sort key: numbers (also as strings, "16" after "2") first and numerically, then other text."""
    try:
        return (0, float(v), "")
    except (TypeError, ValueError):
        return (1, 0.0, str(v))


def _entries(data: object, key: str, fields: tuple[str, ...], source: object) -> list[dict]:
    """data[key] checked to be a list of objects that each hold `fields`; ValueError naming `source` otherwise."""
    entries = data.get(key) if isinstance(data, dict) else None
    if not isinstance(entries, list):
        raise ValueError(f"malformed results file {source}: expected a JSON object with a list under {key!r}")
    for i, e in enumerate(entries):
        if not isinstance(e, dict) or any(f not in e for f in fields):
            raise ValueError(f"malformed results file {source}: {key}[{i}] = {e!r} lacks one of {fields}")
    return entries


def load_results(path: Path, key: str, fields: tuple[str, ...]) -> dict:
    """Read a results JSON object whose `key` lists entries with `fields`; one ValueError naming the file
    when it is missing, unreadable or malformed."""
    data = read_json(path, "results file")
    _entries(data, key, fields, path)
    return data


def _speedup(cell: dict) -> float | None:
    given, text, cache = _num(cell.get("speedup")), _num(cell.get("text_ttft_s")), _num(cell.get("cache_ttft_s"))
    if given is None and text is not None and cache:
        return text / cache
    return given


def _total_tokens(cell: dict) -> float | None:
    tokens = cell.get("branch_tokens")
    if isinstance(tokens, list) and tokens and all(_num(t) is not None for t in tokens):
        return float(sum(tokens))
    b, n = _num(cell.get("branches")), _num(cell.get("length"))
    return b * n if b is not None and n is not None else None


def _bars(rows: list[dict], key: str, title: str) -> Figure | None:
    """Grouped bars of rows[key] (a fraction, drawn in %) per task, one bar per method; None when no values."""
    tasks, methods = _unique(r["task"] for r in rows), _unique(r["method"] for r in rows)
    values = {(str(r["task"]), str(r["method"])): _num(r.get(key)) for r in rows}
    if all(v is None for v in values.values()):
        return None
    fig = Figure(figsize=(max(6.0, 1.1 + 0.35 * len(tasks) * len(methods)), 4.2), layout="constrained")
    ax, width = fig.add_subplot(), 0.8 / len(methods)
    for j, method in enumerate(methods):
        shown = [(i, values[(t, method)]) for i, t in enumerate(tasks) if values.get((t, method)) is not None]
        xs = [i + (j - (len(methods) - 1) / 2) * width for i, _ in shown]
        bars = ax.bar(xs, [100 * v for _, v in shown], width, label=_label(method))
        ax.bar_label(bars, fmt="%.0f", fontsize=7, padding=1)
    ax.set_xticks(range(len(tasks)), [_label(t) for t in tasks])
    ax.set(xlabel="task", ylabel=f"{title} (%)", title=title, ylim=(0, 108))
    ax.grid(axis="y", alpha=0.3)
    ax.legend(title="method", fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    return fig


def _model(bench: dict) -> str:
    env = bench.get("environment")
    return str(env.get("model") or "") if isinstance(env, dict) else ""


def _ttft(cells: list[dict], model: str = "") -> Figure | None:
    """TTFT (ms) against total branch tokens: colour and line style per route, marker per number of branches."""
    cells = sorted((c for c in cells if _total_tokens(c) is not None), key=_total_tokens)
    counts = sorted(_unique(c["branches"] for c in cells), key=_order)
    fig = Figure(figsize=(7.5, 4.6), layout="constrained")
    ax, xs, ys = fig.add_subplot(), [], []
    for key, _, style, colour in ROUTES:
        for i, count in enumerate(counts):
            pts = [(_total_tokens(c), 1000 * _num(c.get(key))) for c in cells
                   if str(c["branches"]) == count and _num(c.get(key)) is not None]
            if pts:
                ax.plot(*zip(*pts), linestyle=style, color=colour, marker=MARKERS[i % len(MARKERS)])
                xs, ys = xs + [p[0] for p in pts], ys + [p[1] for p in pts]
    if not ys:
        return None
    if min(ys) > 0 and max(ys) / min(ys) > 10:
        ax.set_yscale("log")
    if min(xs) > 0 and max(xs) / min(xs) >= 8:
        ax.set_xscale("log", base=2)
    handles = [Line2D([], [], linestyle=s, color=c, label=name) for _, name, s, c in ROUTES]
    handles += [Line2D([], [], linestyle="none", color="k", marker=MARKERS[i % len(MARKERS)],
                       label=f"{_label(n)} branch{'es' if n != '1' else ''}") for i, n in enumerate(counts)]
    ax.legend(handles=handles, fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    ax.set(xlabel="total branch tokens (tokens)", ylabel="time to first token (ms)",
           title="Time to first token of the synthesizer by route" + (f"\n{model}" if model else ""))
    ax.grid(alpha=0.3, which="both")
    return fig


def _speedup_map(cells: list[dict], model: str = "") -> Figure | None:
    """Heat map of text TTFT / cache TTFT: rows are branch counts, columns branch lengths, cells annotated."""
    grid = {(str(c["branches"]), str(c["length"])): _speedup(c) for c in cells if _speedup(c) is not None}
    if not grid:
        return None
    rows = sorted({b for b, _ in grid}, key=_order)
    cols = sorted({n for _, n in grid}, key=_order)
    data = [[grid.get((b, n), math.nan) for n in cols] for b in rows]
    fig = Figure(figsize=(2.6 + 1.1 * len(cols), 1.8 + 0.75 * len(rows)), layout="constrained")
    ax = fig.add_subplot()
    image = ax.imshow(data, cmap="viridis", aspect="auto", origin="lower")
    middle = (min(grid.values()) + max(grid.values())) / 2
    for (b, n), v in grid.items():
        ax.text(cols.index(n), rows.index(b), f"{v:.1f}×", ha="center", va="center", fontsize=9,
                color="white" if v < middle else "black")
    ax.set_xticks(range(len(cols)), [_label(n) for n in cols])
    ax.set_yticks(range(len(rows)), [_label(b) for b in rows])
    ax.set(xlabel="branch length (tokens)", ylabel="branches",
           title="Speed-up of the cache route (text TTFT / cache TTFT)" + (f"\n{model}" if model else ""))
    fig.colorbar(image, ax=ax, label="speed-up (×)")
    return fig


def _benches(bench: dict | Sequence[dict] | None) -> list[dict]:
    return [] if bench is None else [bench] if isinstance(bench, dict) else list(bench)


def plots(summary: dict, bench: dict | Sequence[dict] | None, out_dir: Path) -> list[Path]:
    """Write the report's PNGs into `out_dir` (created if needed) and return their paths.

    accuracy.png, vs-text.png and agreement.png come from summary["rows"]; ttft.png and speedup.png from the first
    bench result, ttft-2.png and speedup-2.png from the second, and so on. A plot with no values to draw
    (e.g. every agreement null) is left out. Inputs are not mutated.
    """
    rows = _entries(summary, "rows", ("task", "method"), "summary")
    figures = {"accuracy.png": _bars(rows, "accuracy", "Accuracy"), "vs-text.png": H.diff_plot(rows),
               "agreement.png": _bars(rows, "agreement", "Agreement with text synthesis")}
    for i, one in enumerate(_benches(bench)):
        cells, tag = _entries(one, "cells", ("branches", "length"), "bench"), "" if i == 0 else f"-{i + 1}"
        figures |= {f"ttft{tag}.png": _ttft(cells, _model(one)), f"speedup{tag}.png": _speedup_map(cells, _model(one))}
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = []
    for name, fig in figures.items():
        if fig is not None:
            fig.savefig(out_dir / name, dpi=DPI)
            paths.append(out_dir / name)
    return paths


def _cell(value: object, fmt: Callable[[float], str]) -> str:
    if value is None or value == "" or (isinstance(value, float) and not math.isfinite(value)):
        return '<td class="n">—</td>'
    text = fmt(_num(value)) if _num(value) is not None else str(value)
    return f'<td class="n">{html.escape(text)}</td>'


def _table(columns: tuple, rows: list[dict]) -> str:
    """columns: (key, header, formatter or None for plain text)."""
    head = "".join(f"<th>{html.escape(h)}</th>" for _, h, _ in columns)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(_text(r.get(k)))}</td>" if f is None else _cell(r.get(k), f)
                                    for k, _, f in columns) + "</tr>\n" for r in rows)
    return f"<table><tr>{head}</tr>\n{body}</table>"


def _text(x: object) -> str:
    return "—" if x is None else str(x)


def _pct(x: float) -> str:
    return f"{100 * x:.1f}%"


def _ms(x: float) -> str:
    return f"{1000 * x:.0f}"


SUMMARY_COLUMNS = (
    ("task", "task", None), ("method", "method", None), ("n", "n", "{:.0f}".format),
    ("accuracy_text", "accuracy [95% CI]", None), ("diff_text", "minus text, points [95% CI]", None),
    ("regressions", "regressions (text right, method wrong)", "{:.0f}".format),
    ("rescues", "rescues (text wrong, method right)", "{:.0f}".format),
    ("accuracy", "accuracy", _pct), ("agreement", "agreement with text (final answer)", _pct),
    ("identical", "identical to text", _pct),
    ("ttft_median_s", "TTFT median (ms)", _ms), ("ttft_p90_s", "TTFT p90 (ms)", _ms),
    ("prefill_tokens_mean", "prefill tokens (mean)", "{:.1f}".format),
    ("latency_median_s", "latency median (s)", "{:.2f}".format))
BENCH_COLUMNS = (
    ("branches", "branches", "{:.0f}".format), ("length", "branch length (tokens)", "{:.0f}".format),
    ("total_tokens", "total branch tokens", "{:.0f}".format), ("text_ttft_s", "text TTFT (ms)", _ms),
    ("cache_ttft_s", "cache TTFT (ms)", _ms), ("floor_s", "floor (ms)", _ms),
    ("speedup", "speed-up", "{:.1f}×".format), ("overhead", "overhead over floor", _pct))


def _environment(summary: dict, benches: list[dict]) -> str:
    sources = {"eval": summary.get("environment")}
    for i, one in enumerate(benches):
        sources["bench" if i == 0 else f"bench {i + 1}"] = one.get("environment")
    sources = {k: v if isinstance(v, dict) else {} for k, v in sources.items()}
    keys = _unique(k for env in sources.values() for k in env)
    rows = [{"key": k, **{s: env.get(k) for s, env in sources.items()}} for k in keys]
    return _table((("key", "", None), *((s, s, None) for s in sources)), rows) if keys else "<p>not recorded</p>"


def _figures(pngs: list[Path]) -> str:
    parts = []
    for p in pngs:
        data = base64.b64encode(p.read_bytes()).decode("ascii")
        parts.append(f'<figure><img src="data:image/png;base64,{data}" alt="{html.escape(p.stem)}">'
                     f"<figcaption>{html.escape(p.name)}</figcaption></figure>")
    return "\n".join(parts)


def _html(summary: dict, benches: list[dict], pngs: list[Path]) -> str:
    commands = [str(d["command"]) for d in (summary, *benches) if d.get("command")]
    env = summary.get("environment") if isinstance(summary.get("environment"), dict) else {}
    model = env.get("model")
    title = "parsyn evaluation report" + (f" — {model}" if model else "")
    config = summary.get("config") if isinstance(summary.get("config"), dict) else {}
    parts = [f"<h1>{html.escape(title)}</h1>",
             f"<p>created: {html.escape(str(summary.get('created') or 'not recorded'))}</p>",
             "<h2>Commands</h2>" + "".join(f"<pre>{html.escape(c)}</pre>" for c in commands),
             "<h2>Environment</h2>" + _environment(summary, benches)]
    if config:
        parts.append("<h2>Configuration</h2>" + _table((("key", "key", None), ("value", "value", None)),
                                                        [{"key": k, "value": v} for k, v in config.items()]))
    parts.append("<h2>Results by task and method</h2>" + H.partial(summary)
                 + H.lead(summary["rows"], summary.get("chance"))
                 + _table(SUMMARY_COLUMNS, [H.flat(r) for r in summary["rows"]]))
    for one in benches:
        cells = [{**c, "speedup": _speedup(c), "total_tokens": _total_tokens(c)} for c in one["cells"]]
        layout = (("layout", "layout", None),) if any("layout" in c for c in cells) else ()
        model = f" — {_model(one)}" if _model(one) else ""
        parts.append(f"<h2>Time to first token by route{html.escape(model)}</h2>"
                     + _table(layout + BENCH_COLUMNS, cells))
    parts.append("<h2>Plots</h2>" + _figures(pngs))
    body = "\n".join(parts)
    return (f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8"><title>{html.escape(title)}</title>'
            f"<style>{CSS}</style></head>\n<body>\n{body}\n</body></html>\n")


def write_report(results_dir: Path, *, bench: Path | Sequence[Path] | None = None, out: Path | None = None) -> Path:
    """Write an HTML report of results_dir/summary.json (and of the bench JSON file or files at `bench`).

    The PNGs of `plots` are written next to the HTML (default results_dir/report.html) and embedded in it.
    ValueError naming the file when summary.json or the bench file is missing, unreadable or malformed.
    Returns the path of the HTML file.
    """
    results_dir = Path(results_dir)
    raw = read_json(results_dir / "summary.json", "evaluation summary")
    if isinstance(raw, dict) and "tasks" in raw and "rows" not in raw:  # an agentic evaluation
        from . import agentic_report

        return agentic_report.write(results_dir, raw, out)
    summary = load_results(results_dir / "summary.json", "rows", ("task", "method"))
    paths = [] if bench is None else [bench] if isinstance(bench, (str, Path)) else list(bench)
    benches = [load_results(Path(p), "cells", ("branches", "length")) for p in paths]
    out = Path(out) if out is not None else results_dir / "report.html"
    pngs = plots(summary, benches, out.parent)
    atomic_write(out, lambda p: p.write_text(_html(summary, benches, pngs), encoding="utf-8"))
    return out
