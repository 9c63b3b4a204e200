"""Noise-aware results: repeated measurements as mean ± CI, and dominance that needs more than noise.

``budget.repeats: N`` re-measures the study's Pareto candidates N more times (fresh launches) once the
search budget is spent; the summary then carries each objective's mean and 95 % confidence half-width, and
``pareto_noise_aware``: the trials no other trial beats, on every objective, by more than the two
half-widths together. A config that only wins by noise therefore stays beside the one it "beat".
"""
from __future__ import annotations

import math
import statistics
from typing import Any, Sequence

from scipy.stats import t


def mean_ci(values: Sequence[float], confidence: float = 0.95) -> dict[str, Any]:
    vals = [float(v) for v in values if v is not None and math.isfinite(float(v))]
    n = len(vals)
    if n == 0:
        return {"n": 0, "mean": None, "ci": None, "values": []}
    mean = statistics.fmean(vals)
    if n == 1:
        return {"n": 1, "mean": mean, "ci": None, "values": vals}
    sd = statistics.stdev(vals)
    half = float(t.ppf(0.5 + confidence / 2, n - 1) * sd / math.sqrt(n))
    return {"n": n, "mean": mean, "ci": half, "values": vals}


def pooled_relative_ci(stats: dict[Any, dict[str, dict[str, Any]]], objective: str) -> float | None:
    """Median relative half-width of ``objective`` over the repeated trials (a noise level for the rest)."""
    rel = [s[objective]["ci"] / abs(s[objective]["mean"]) for s in stats.values()
           if s.get(objective, {}).get("ci") is not None and s[objective]["mean"]]
    return statistics.median(rel) if rel else None


def dominates(a: Sequence[float], b: Sequence[float], noise_a: Sequence[float], noise_b: Sequence[float],
              directions: Sequence[str]) -> bool:
    """``a`` dominates ``b`` beyond the noise: better by more than the combined half-widths on some
    objective, and nowhere worse by more than them (a difference within the noise is a tie)."""
    strictly = False
    for x, y, nx, ny, d in zip(a, b, noise_a, noise_b, directions):
        gain = (x - y) if d == "maximize" else (y - x)
        tol = (nx or 0.0) + (ny or 0.0)
        if gain < -tol:
            return False
        if gain > tol:
            strictly = True
    return strictly


def noise_aware_front(points: dict[int, list[float]], noise: dict[int, list[float]],
                      directions: Sequence[str]) -> list[int]:
    """Trial numbers that no other point dominates beyond the noise."""
    out = []
    for i, p in points.items():
        if not any(dominates(q, p, noise[j], noise[i], directions) for j, q in points.items() if j != i):
            out.append(i)
    return sorted(out)
