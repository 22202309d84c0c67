"""The HTML report of an agentic evaluation (`parsyn eval --tasks agent_...`): accuracy first, with its
interval and the paired difference from text synthesis on the same handover, then times and tokens, and
two plots (accuracy; TTFT by route and handover). Self-contained like `report.py`'s."""

from __future__ import annotations

import html
from pathlib import Path

from matplotlib.figure import Figure

from ..files import atomic_write
from . import report as R

SMOKE = '<p class="warn">Fewer than 30 items per task: these tables show the harness, not a result.</p>'
TIMED = ("text-final", "cache-final", "text-trajectory", "cache-trajectory")


def rows(summary: dict) -> list[dict]:
    """One flat row per task and method."""
    out = []
    for task, entry in summary["tasks"].items():
        for method, m in entry["methods"].items():
            low, high = m["accuracy_ci"]
            v = m.get("vs_text")
            out.append({"task": task, "method": method, "n": m["n"], "smoke": entry["smoke"],
                        "accuracy": m["accuracy"],
                        "accuracy_text": f"{100 * m['accuracy']:.0f}% [{100 * low:.0f}, {100 * high:.0f}]",
                        "diff_text": (f"{100 * v['diff']:+.0f} [{100 * v['diff_ci'][0]:+.0f}, "
                                      f"{100 * v['diff_ci'][1]:+.0f}]") if v else None,
                        "regressions": v["regressions"] if v else None, "rescues": v["rescues"] if v else None,
                        "ttft_s": m.get("ttft_s"), "e2e_first_s": m.get("e2e_first_s", m["latency_s"]),
                        "prefill_tokens": m.get("prefill_tokens"), "tool_calls": entry["tool_calls"]})
    return out


COLUMNS = (("task", "task", None), ("method", "method", None), ("n", "n", "{:.0f}".format),
           ("accuracy_text", "accuracy [95% CI]", None), ("diff_text", "minus text, same handover [95% CI]", None),
           ("regressions", "regressions", "{:.0f}".format), ("rescues", "rescues", "{:.0f}".format),
           ("ttft_s", "TTFT median (ms)", R._ms),
           ("e2e_first_s", "question → first token, median (s)", "{:.1f}".format),
           ("prefill_tokens", "prefill tokens (mean)", "{:.0f}".format),
           ("tool_calls", "tool calls per item", "{:.1f}".format))


def _ttft(summary: dict) -> Figure | None:
    tasks = list(summary["tasks"])
    if not tasks:
        return None
    fig = Figure(figsize=(max(6.0, 2.2 * len(tasks)), 4.2), layout="constrained")
    ax, width = fig.add_subplot(), 0.8 / len(TIMED)
    for j, method in enumerate(TIMED):
        values = [summary["tasks"][t]["methods"][method]["ttft_s"] * 1000 for t in tasks]
        xs = [i + (j - (len(TIMED) - 1) / 2) * width for i in range(len(tasks))]
        bars = ax.bar(xs, values, width, label=method, color=f"C{3 if method.startswith('text') else 0}",
                      alpha=1.0 if method.endswith("trajectory") else 0.55)
        ax.bar_label(bars, fmt="%.0f", fontsize=7, padding=1)
    ax.set_xticks(range(len(tasks)), tasks)
    ax.set(ylabel="TTFT median (ms)", title="Time to first token: text vs cache, final turn vs whole trajectory")
    ax.grid(axis="y", alpha=0.3)
    ax.legend(fontsize=8)
    return fig


def write(results_dir: Path, summary: dict, out: Path | None = None) -> Path:
    results_dir = Path(results_dir)
    out = Path(out) if out is not None else results_dir / "report.html"
    out.parent.mkdir(parents=True, exist_ok=True)
    flat = rows(summary)
    pngs = []
    for name, fig in (("accuracy.png", R._bars(flat, "accuracy", "Accuracy")), ("ttft.png", _ttft(summary))):
        if fig is not None:
            fig.savefig(out.parent / name, dpi=R.DPI)
            pngs.append(out.parent / name)
    smoke = any(r["smoke"] for r in flat)
    ratios = "".join(f"<li>{html.escape(t)}: final {e['ttft_ratio']['final']:.1f}×, trajectory "
                     f"{e['ttft_ratio']['trajectory']:.1f}× (branch tokens {e['branch_tokens']['final']:.0f} vs "
                     f"{e['branch_tokens']['trajectory']:.0f})</li>" for t, e in summary["tasks"].items())
    title = f"parsyn agentic evaluation — {summary.get('model', '')}"
    body = "\n".join([
        f"<h1>{html.escape(title)}</h1>",
        SMOKE if smoke else "",
        "<h2>Results by task and method</h2>" + R._table(COLUMNS, flat),
        "<h2>Text TTFT / cache TTFT by handover</h2><ul>" + ratios + "</ul>",
        "<h2>Plots</h2>" + R._figures(pngs)])
    page = (f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8"><title>{html.escape(title)}</title>'
            f"<style>{R.CSS}</style></head>\n<body>\n{body}\n</body></html>\n")
    atomic_write(out, lambda p: p.write_text(page, encoding="utf-8"))
    return out
