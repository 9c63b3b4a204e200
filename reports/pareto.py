"""Non-dominated sets: which trials no other trial beats on every objective at once."""
from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pandas as pd

_SIGN = {"maximize": -1.0, "max": -1.0, "minimize": 1.0, "min": 1.0}

# Rows compared at once against all others: bounds the n×chunk×k boolean temporaries for large studies.
_CHUNK = 512


def pareto_mask(values: np.ndarray, directions: Sequence[str]) -> np.ndarray:
    """True for the rows of ``values`` (n × k) that no other row dominates.

    Row a dominates row b when a is at least as good on every column and strictly better on one. Identical
    rows therefore do not dominate each other: equal best points are all on the front. A row with any NaN
    is never on the front and never dominates another (it was not measured, so it proves nothing).
    """
    v = np.asarray(values, dtype=float)
    if v.ndim == 1:
        v = v.reshape(-1, 1)
    if v.ndim != 2:
        raise ValueError(f"values must be 2-D (trials × objectives), got shape {v.shape}")
    if len(directions) != v.shape[1]:
        raise ValueError(f"{len(directions)} directions for {v.shape[1]} objective columns")
    try:
        sign = np.array([_SIGN[d.lower()] for d in directions])
    except KeyError as e:
        raise ValueError(f"direction {e.args[0]!r} is neither 'maximize' nor 'minimize'") from None

    mask = np.zeros(len(v), dtype=bool)
    measured = ~np.isnan(v).any(axis=1)
    cand = v[measured] * sign  # now everything is minimised
    if len(cand) == 0:
        return mask
    dominated = np.zeros(len(cand), dtype=bool)
    for start in range(0, len(cand), _CHUNK):
        block = cand[start:start + _CHUNK]  # rows being judged
        # [i, j]: does candidate j dominate block row i?
        no_worse = (cand[None, :, :] <= block[:, None, :]).all(axis=2)
        better = (cand[None, :, :] < block[:, None, :]).any(axis=2)
        dominated[start:start + len(block)] = (no_worse & better).any(axis=1)
    mask[np.flatnonzero(measured)] = ~dominated
    return mask


def front(df: pd.DataFrame, x_col: str, y_col: str, x_dir: str, y_dir: str,
          only_valid_col: str | None = None) -> pd.DataFrame:
    """The rows of ``df`` on the 2-D Pareto front of (x_col, y_col), sorted along x (then y) for drawing.

    With ``only_valid_col``, only rows where that column is exactly True compete: an SLA-invalid
    measurement is not a configuration anyone can ship, so it must not push valid ones off the front.
    """
    pool = df
    if only_valid_col is not None:
        pool = df[df[only_valid_col].eq(True)]
    if pool.empty:
        return pool.copy()
    values = pool[[x_col, y_col]].apply(pd.to_numeric, errors="coerce").to_numpy(dtype=float)
    on = pool[pareto_mask(values, [x_dir, y_dir])]
    return on.sort_values([x_col, y_col], kind="stable").copy()



def feasible(trials: pd.DataFrame, quality_ok: pd.Series) -> pd.DataFrame:
    """The completed trials that met the SLA in every scenario that has one and the quality limits; a
    contaminated measurement (its audit failed twice) is neither met nor missed, so it is left out."""
    ok = trials[trials["state"] == "complete"].copy()
    for c in [c for c in ok.columns if c.endswith(".sla_met")]:
        ok = ok[ok[c].fillna(True).astype(bool)]
    for c in [c for c in ok.columns if c.endswith(".contaminated")]:
        ok = ok[~ok[c].eq(True)]
    return ok[quality_ok.loc[ok.index]]


def sla_front(ok: pd.DataFrame, cols: Sequence[str], directions: Sequence[str]
              ) -> tuple[pd.DataFrame, dict[int, list[int]]]:
    """The Pareto front of the :func:`feasible` trials ``ok`` over the objective columns, sorted by the first;
    and, per trial on it, the trials that took its result (same configuration), which are not points of their
    own."""
    ok = ok.copy()
    for c in cols:
        if c not in ok:
            ok[c] = float("nan")
    also: dict[int, list[int]] = {}
    if "duplicate_of" in ok:
        dups = ok[ok["duplicate_of"].notna()]
        for n, dup in zip(dups["number"], dups["duplicate_of"]):
            also.setdefault(int(dup), []).append(int(n))
        ok = ok[ok["duplicate_of"].isna()]
    mask = pareto_mask(ok[list(cols)].to_numpy(dtype=float), directions)
    return ok[mask].sort_values(cols[0], ascending=directions[0] == "minimize"), also
