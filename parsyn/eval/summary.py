"""The summary of an evaluation's records: one row per (task, method) with accuracy and its interval, the
paired comparison with text synthesis, agreement and timings; and each task's chance level, the accuracy of
a uniform guess, which a task's text synthesis must clear before its accuracies say anything about quality."""

from __future__ import annotations

import math
import statistics
import time
from collections.abc import Iterable, Sequence
from dataclasses import asdict

from . import stats as S
from . import tasks as T


def chance(items: Iterable[T.Item]) -> dict[str, float]:
    """Per task and over all `items` ("all"): the mean accuracy of a uniform guess, 1/options on a choice,
    1/2 on yes/no, 0 where the answer is written (a number, a span, a program)."""
    levels: dict[str, list[float]] = {}
    for item in items:
        kind = T.task(item.task).kind
        guess = 1 / len(item.choices) if kind == "choice" and item.choices else 0.5 if kind == "yesno" else 0.0
        levels.setdefault(item.task, []).append(guess)
        levels.setdefault("all", []).append(guess)
    return {task: statistics.fmean(values) for task, values in levels.items()}


def summarize(rows: Sequence[dict], config, methods: Sequence[str], environment: dict, command: str) -> dict:
    """One row per (task, method) of `config` (an EvalConfig): accuracy with its interval, then the paired
    comparison with text synthesis on the same items (difference, regressions, rescues), agreement, TTFT and
    prefill. Rows of task "all" pool every item once, whatever its task."""
    table = []
    groups = [(task, [r for r in rows if r["task"] == task]) for task in config.tasks]
    if len(config.tasks) > 1:
        groups.append(("all", list(rows)))
    for task, mine in groups:
        for method in methods:
            got = [r["methods"][method] for r in mine if method in r["methods"]]
            if got:
                table.append({"task": task, "method": method, **row(mine, method, got)})
    return {"command": command, "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "environment": environment, "config": asdict(config), "rows": table}


def row(items: Sequence[dict], method: str, got: Sequence[dict]) -> dict:
    """The figures of one method over `items` (records), `got` being its results on them."""
    out = {**S.accuracy([bool(g["score"]) for g in got]), "smoke": len(got) < S.SMOKE}
    both = [r["methods"] for r in items if method in r["methods"] and "text" in r["methods"]]
    if method != "text" and both:
        out["vs_text"] = S.paired([bool(m[method]["score"]) for m in both], [bool(m["text"]["score"]) for m in both])
    agree = [g["agrees"] for g in got if g.get("agrees") is not None]
    same = [g["identical"] for g in got if g.get("identical") is not None]
    ttft = sorted(g["ttft_s"] for g in got)
    return {**out,
            "agreement": sum(agree) / len(agree) if agree else None,
            "identical": sum(same) / len(same) if same else None,
            "ttft_median_s": statistics.median(ttft),
            "ttft_mean_s": statistics.mean(ttft),
            "ttft_p90_s": ttft[min(len(ttft) - 1, math.ceil(0.9 * len(ttft)) - 1)],
            "prefill_tokens_mean": statistics.mean(g["prefill_tokens"] for g in got),
            "latency_median_s": statistics.median(g["latency_s"] for g in got)}
