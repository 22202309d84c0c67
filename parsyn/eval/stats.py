"""Accuracy with intervals and paired comparisons against text synthesis.

Every interval is a 95% percentile bootstrap over items (seeded, so a summary is reproducible); paired
figures resample the same items for both methods. A regression is an item text synthesis gets right and
the method gets wrong; a rescue is the reverse.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

RESAMPLES = 2000
SMOKE = 30  # below this many items a table shows the harness, not a result


def interval(values: Sequence[float], *, seed: int = 0, resamples: int = RESAMPLES) -> tuple[float, float]:
    """95% percentile-bootstrap interval of the mean of `values` (one value per item)."""
    x = np.asarray(values, dtype=float)
    if x.size == 0:
        raise ValueError("an interval needs at least one item")
    rows = np.random.default_rng(seed).integers(0, x.size, size=(resamples, x.size))
    means = x[rows].mean(axis=1)
    low, high = np.quantile(means, [0.025, 0.975])
    return float(low), float(high)


def accuracy(scores: Sequence[bool], *, seed: int = 0) -> dict:
    """Accuracy of one method over its items, with its interval."""
    low, high = interval([float(s) for s in scores], seed=seed)
    return {"n": len(scores), "accuracy": sum(map(bool, scores)) / len(scores), "accuracy_ci": [low, high]}


def paired(method: Sequence[bool], text: Sequence[bool], *, seed: int = 0) -> dict:
    """Method minus text on the same items: the difference in accuracy with its interval, regressions
    (text right, method wrong) and rescues (text wrong, method right), as counts and rates."""
    if len(method) != len(text) or not method:
        raise ValueError(f"paired scores need the same items, got {len(method)} and {len(text)}")
    m, t = np.asarray(method, dtype=bool), np.asarray(text, dtype=bool)
    diff = m.astype(float) - t.astype(float)
    low, high = interval(diff, seed=seed)
    regressions, rescues = int((t & ~m).sum()), int((m & ~t).sum())
    return {"diff": float(diff.mean()), "diff_ci": [low, high], "regressions": regressions,
            "rescues": rescues, "regression_rate": regressions / len(m), "rescue_rate": rescues / len(m)}
