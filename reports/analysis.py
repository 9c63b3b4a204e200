"""What the SLA costs: the best throughput with and without each latency limit of a scenario."""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
import pandas as pd

from servetune.reports.model import Run, Scenario
from servetune.reports.units import fmt_metric

COST_METRICS = ["output_tokens_per_s_per_gpu", "output_tokens_per_s"]


@dataclass
class CostRow:
    constraint: str  # "no latency limit", "p99 TTFT ≤ 2,000 ms only", ...
    best: float | None
    trial: int | None
    n: int  # complete trials that satisfy the constraint
    share: float | None  # best / unconstrained best

    @property
    def best_text(self) -> str:
        return fmt_metric(self.best, self.metric) if self.best is not None else "—"

    metric: str = ""

    @property
    def cost_text(self) -> str:
        if self.share is None:
            return "—" if self.best is None else ""
        lost = 1.0 - self.share
        return "free" if abs(lost) < 5e-4 else f"−{lost:.1%}"


@dataclass
class SlaCost:
    scenario: str
    metric: str
    rows: list[CostRow] = field(default_factory=list)
    note: str = ""


def _finite(s: pd.Series) -> pd.Series:
    v = pd.to_numeric(s, errors="coerce")
    return v[np.isfinite(v)]


def sla_costs(run: Run) -> list[SlaCost]:
    """Per scenario with a latency SLA and per throughput metric: the best complete trial under no limit, each
    limit alone, and both. The gap between the first and last row is what the SLA costs in throughput."""
    out = []
    for sc in run.scenarios:
        if not (sc.ttft_limit_ms or sc.tpot_limit_ms):
            continue
        for m in COST_METRICS:
            col = f"{sc.name}.{m}"
            if col not in run.trials:
                continue
            out.append(_cost(run, sc, m, col))
    return out


def _cost(run: Run, sc: Scenario, metric: str, col: str) -> SlaCost:
    df = run.trials[run.complete]
    ttft = pd.to_numeric(df.get(f"{sc.name}.ttft_p99_ms"), errors="coerce") if f"{sc.name}.ttft_p99_ms" in df \
        else pd.Series(math.nan, index=df.index)
    tpot = pd.to_numeric(df.get(f"{sc.name}.tpot_p99_ms"), errors="coerce") if f"{sc.name}.tpot_p99_ms" in df \
        else pd.Series(math.nan, index=df.index)
    ok_ttft = ttft.le(sc.ttft_limit_ms) if sc.ttft_limit_ms else pd.Series(True, index=df.index)
    ok_tpot = tpot.le(sc.tpot_limit_ms) if sc.tpot_limit_ms else pd.Series(True, index=df.index)
    cases = [("no latency limit", pd.Series(True, index=df.index))]
    if sc.ttft_limit_ms and sc.tpot_limit_ms:
        cases += [(f"p99 TTFT ≤ {fmt_metric(sc.ttft_limit_ms, 'ttft_p99_ms')} only", ok_ttft),
                  (f"p99 TPOT ≤ {fmt_metric(sc.tpot_limit_ms, 'tpot_p99_ms')} only", ok_tpot)]
    limits = [f"p99 TTFT ≤ {fmt_metric(sc.ttft_limit_ms, 'ttft_p99_ms')}" if sc.ttft_limit_ms else "",
              f"p99 TPOT ≤ {fmt_metric(sc.tpot_limit_ms, 'tpot_p99_ms')}" if sc.tpot_limit_ms else ""]
    cases.append(("the SLA: " + " and ".join(x for x in limits if x), ok_ttft & ok_tpot))
    res = SlaCost(scenario=sc.name, metric=metric)
    free = None
    for label, mask in cases:
        vals = _finite(df.loc[mask.reindex(df.index, fill_value=False).astype(bool), col])
        if vals.empty:
            res.rows.append(CostRow(label, None, None, 0, None, metric=metric))
            continue
        idx = vals.idxmax()
        best = float(vals[idx])
        if free is None:
            free = best
        res.rows.append(CostRow(label, best, int(df.at[idx, "number"]), int(vals.size),
                                best / free if free else None, metric=metric))
    if free is None:
        res.note = "no complete trial has measured it yet"
    elif res.rows[-1].best is None:
        res.note = "no trial met the SLA: its cost is unknown, only that it is at least everything measured"
    return res


__all__ = ["sla_costs", "SlaCost", "CostRow", "COST_METRICS"]
