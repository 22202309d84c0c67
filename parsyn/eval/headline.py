"""The report's lead: accuracy with intervals, the paired difference from text synthesis, regressions and
rescues, and on how many tasks each method holds parity with text. Agreement and timings come after."""

from __future__ import annotations

import html

from matplotlib.figure import Figure

from .stats import SMOKE

PARITY = -0.03  # a method holds parity on a task when its paired interval does not go below -3 points


def flat(row: dict) -> dict:
    """A summary row with its intervals as text, for a table."""
    out = dict(row)
    if row.get("accuracy_ci"):
        low, high = row["accuracy_ci"]
        out["accuracy_text"] = f"{100 * row['accuracy']:.0f}% [{100 * low:.0f}, {100 * high:.0f}]"
    versus = row.get("vs_text")
    if versus:
        low, high = versus["diff_ci"]
        out["diff_text"] = f"{100 * versus['diff']:+.1f} [{100 * low:+.1f}, {100 * high:+.1f}]"
        out |= {k: versus[k] for k in ("regressions", "rescues", "regression_rate")}
    return out


def parity(rows: list[dict], among: set[str] | None = None) -> dict[str, tuple[int, int]]:
    """Per method: (tasks where its paired interval's low end is at or above PARITY, tasks compared), counting
    only the tasks in `among` when given."""
    counts: dict[str, list[int]] = {}
    for r in rows:
        if r["task"] != "all" and r.get("vs_text") and (among is None or r["task"] in among):
            held, seen = counts.setdefault(r["method"], [0, 0])
            counts[r["method"]] = [held + (r["vs_text"]["diff_ci"][0] >= PARITY), seen + 1]
    return {m: (held, seen) for m, (held, seen) in counts.items()}


def at_chance(rows: list[dict], chance: dict[str, float] | None) -> dict[str, float]:
    """Tasks (with their chance level) where text synthesis's 95% interval reaches down to a uniform guess:
    there every method's accuracy is mostly luck, and a comparison says whether a method passes the branches'
    answers on, not whether it answers well."""
    chance = chance or {}
    return {r["task"]: chance[r["task"]] for r in rows
            if r["method"] == "text" and r["task"] != "all" and r["task"] in chance
            and r["accuracy_ci"][0] <= chance[r["task"]]}


def levels(named: dict[str, float]) -> str:
    """"task (25%), ..." for tasks with their chance levels, as `at_chance` gives them."""
    return ", ".join(f"{task} ({100 * level:.0f}%)" for task, level in named.items())


def unfinished(summary: dict) -> str | None:
    """"N of M items" when the summary holds only part of its evaluation's items, or "METHOD: N of M items"
    for methods a rerun is still adding to finished items (a run still going or stopped; the same command
    continues it), else None."""
    items = summary.get("items")
    if not isinstance(items, dict):
        return None
    if items.get("finished") != items.get("total"):
        return f"{items.get('finished')} of {items.get('total')} items"
    counts: dict[str, int] = {}
    for r in summary.get("rows", []):
        if r["task"] != "all":
            counts[r["method"]] = counts.get(r["method"], 0) + r["n"]
    short = [f"{m}: {n} of {items['total']} items" for m, n in counts.items() if n < items["total"]]
    return "; ".join(short) or None


def partial(summary: dict) -> str:
    """HTML: a warning when the summary is `unfinished`."""
    part = unfinished(summary)
    if part is None:
        return ""
    return f'<p class="warn"><b>Partial</b>: {html.escape(part)} finished; rerun the same command to continue.</p>'


def lead(rows: list[dict], chance: dict[str, float] | None = None) -> str:
    """HTML: a smoke-test warning when any task has fewer than SMOKE items, a warning naming the tasks where
    text synthesis is not above chance, and the parity count (also over the other tasks alone)."""
    parts = []
    small = sorted({r["task"] for r in rows if r["task"] != "all" and r["n"] < SMOKE})
    if small:
        parts.append(f'<p class="warn"><b>Smoke test</b>: fewer than {SMOKE} items on '
                     f"{html.escape(', '.join(small))}; these figures show the harness, not a result.</p>")
    luck = at_chance(rows, chance)
    if luck:
        parts.append(f'<p class="warn"><b>At chance</b>: text synthesis is not above a uniform guess on '
                     f"{html.escape(levels(luck))}. There a method's accuracy is mostly luck; its comparison with text "
                     "says whether it passes the branches' answers on, not whether it answers well.</p>")
    counts = parity(rows)
    if counts:
        above = parity(rows, {r["task"] for r in rows if r["task"] != "all"} - set(luck)) if luck else {}
        items = "".join(f"<li>{html.escape(m)}: {held} of {seen}"
                        + (f" ({above[m][0]} of {above[m][1]} where text is above chance)" if m in above else "")
                        + "</li>" for m, (held, seen) in counts.items())
        parts.append(f"<p>Tasks where a method is at least as accurate as text synthesis (paired 95% interval "
                     f"of the difference not below {100 * PARITY:+.0f} points):</p><ul>{items}</ul>")
    return "\n".join(parts)


def diff_plot(rows: list[dict]) -> Figure | None:
    """The paired difference from text per method (points with 95% intervals), one panel row per task."""
    shown = [r for r in rows if r.get("vs_text")]
    if not shown:
        return None
    tasks = list(dict.fromkeys(r["task"] for r in shown))
    methods = list(dict.fromkeys(r["method"] for r in shown))
    fig = Figure(figsize=(7.5, 0.9 + 0.32 * len(tasks) * len(methods)), layout="constrained")
    ax = fig.add_subplot()
    y, ticks = 0, []
    for task in tasks:
        for method in methods:
            r = next((r for r in shown if r["task"] == task and r["method"] == method), None)
            if r is None:
                continue
            d, (low, high) = r["vs_text"]["diff"], r["vs_text"]["diff_ci"]
            ax.errorbar(100 * d, y, xerr=[[100 * (d - low)], [100 * (high - d)]], fmt="o", capsize=3,
                        color=f"C{methods.index(method) % 10}")
            ticks.append((y, f"{task} · {method}"))
            y -= 1
        y -= 0.6
    ax.axvline(0, color="k", lw=0.8)
    ax.axvline(100 * PARITY, color="C3", lw=0.8, ls="--")
    ax.set_yticks([t for t, _ in ticks], [label.replace("$", r"\$") for _, label in ticks], fontsize=7)
    ax.set(xlabel="accuracy minus text synthesis (points, paired 95% interval)",
           title="Paired difference from text synthesis")
    ax.grid(axis="x", alpha=0.3)
    return fig
