"""A cheap first fidelity: the sim's in-process estimator scores candidates before any GPU time is spent.

Design (``fidelity:`` in the study file):

- ``prescreen: N`` (N >= 2): before each launch the driver asks the study's own sampler for N candidates in
  a *shadow* in-memory study that holds a copy of the real study's finished trials (so the sampler models
  everything measured so far), scores each with :func:`estimate` (milliseconds to a few tenths of a second),
  tells the shadow study the estimated values (so the next candidate of the batch moves on), and launches
  the best one: predicted-feasible first, then the largest hypervolume gain over the measured SLA-feasible
  front. The real study only ever holds measurements: unlaunched candidates are never told to it, so the
  Pareto front and the report are free of estimates. The launched one enters the real study through
  ``enqueue_trial``.
- ``calibrate: true``: the estimator is calibrated from completed real trials of the same study: one scale
  factor per metric group (throughput, TTFT, TPOT, E2E), the least-squares fit of log(measured/estimated),
  i.e. the geometric mean ratio. :meth:`Calibration.report` gives the estimator's error before and after
  calibration (median relative error; "after" is leave-one-out, so it is not flattered by its own fit).

The estimator models the sim engine exactly (the sim server drives the same scheduler) and vLLM-like
engines approximately; calibration absorbs the systematic part of that gap.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from optuna._hypervolume import compute_hypervolume  # no public equivalent in Optuna 5

from servetune.loadgen.scenario_kinds import ScenarioKind
from servetune.loadgen.search import FLOOR_DIVISOR
from servetune.loadgen.sla import within_limits
from servetune.optimizer.engines.sim.config import SimConfig, SimConfigError
from servetune.optimizer.engines.sim.estimate import simulate_offline, simulate_server
from servetune.optimizer.perfmodel.hardware import get_gpu
from servetune.optimizer.rules import gpus_needed
from servetune.optimizer.spec import rate_bracket, rate_floor

# Metric groups that share one calibration factor (a throughput error is the same factor on all of them).
GROUPS: dict[str, tuple[str, ...]] = {
    "throughput": ("output_tokens_per_s", "output_tokens_per_s_per_gpu", "total_tokens_per_s", "requests_per_s",
                   "request_per_s"),
    "ttft": ("ttft_mean_ms", "ttft_p50_ms", "ttft_p90_ms", "ttft_p99_ms"),
    "tpot": ("tpot_mean_ms", "tpot_p50_ms", "tpot_p90_ms", "tpot_p99_ms", "itl_mean_ms", "itl_p50_ms",
             "itl_p90_ms", "itl_p99_ms"),
    "e2e": ("e2e_mean_ms", "e2e_p50_ms", "e2e_p90_ms", "e2e_p99_ms"),
}
# The metric of each group whose error is reported (and fitted on).
HEADLINE = {"throughput": "output_tokens_per_s", "ttft": "ttft_p99_ms", "tpot": "tpot_p99_ms", "e2e": "e2e_p99_ms"}
_GROUP_OF = {m: g for g, ms in GROUPS.items() for m in ms}


class EstimateUnavailable(Exception):
    """The estimator cannot model this study (unknown GPU, a dataset it cannot size, ...)."""


def estimate(shape: Any, gpu: str, params: dict[str, Any], scenarios: list[Any], dataset: dict[str, Any],
             max_requests: int = 200) -> dict[str, Any]:
    """Estimated scenario summaries ``{label: {"summary": {...}}}`` for a configuration, or
    ``{"error": reason}`` when the engine would refuse it or fail to start (a predicted failure).

    ``scenarios`` are :class:`~servetune.optimizer.records.ScenarioPlan`; a qps list is swept in order and
    stops at the first SLA miss, as the real trial does. Raises :class:`EstimateUnavailable` when the
    study cannot be estimated at all."""
    try:
        gpu_spec = get_gpu(gpu)
    except Exception as e:
        raise EstimateUnavailable(f"no GPU spec for {gpu!r}: {e}") from None
    cfg_params = {k: v for k, v in params.items() if k != "engine"}
    try:
        cfg = SimConfig.from_params(cfg_params, strict=False)
    except (SimConfigError, TypeError, ValueError) as e:
        return {"error": f"{type(e).__name__}: {e}"}
    out: dict[str, Any] = {}
    for sc in scenarios:
        s = sc.settings
        kind = ScenarioKind.find(s.get("kind"))
        drive = kind.drive if kind else None
        ins, outs, n_data = _lengths(getattr(sc, "dataset", None) or dataset)
        try:
            if drive == "all_at_once":
                n = min(int(s.get("num_requests") or n_data), max_requests)
                summ = simulate_offline(shape, gpu_spec, cfg, n_requests=n, input_tokens=ins, output_tokens=outs)
                out[sc.label] = {"summary": summ}
            elif drive in ("arrivals", "one_at_a_time"):  # one at a time: modelled as arrivals at a low rate
                rates = s.get("qps")
                rates = rates if isinstance(rates, list) else [rates if rates else 0.5]
                m = getattr(sc, "max_qps", None)
                if m:  # the estimate costs milliseconds: a fine geometric ladder stands in for the search
                    lo, hi = rate_bracket(m, gpus_needed(cfg_params))
                    floor = rate_floor(m, gpus_needed(cfg_params)) or lo / FLOOR_DIVISOR
                    below = [lo / 2 ** k for k in range(1, 5) if lo / 2 ** k > floor] + ([floor] if floor < lo else [])
                    rates = sorted(below) + [lo * (hi / lo) ** (i / 15) for i in range(16)]
                levels = []
                for rate in rates:
                    dur = min(float(s.get("duration_s") or 30.0), max_requests / rate)
                    summ = simulate_server(shape, gpu_spec, cfg, qps=float(rate), duration_s=dur, input_tokens=ins,
                                           output_tokens=outs, seed=int(s.get("seed") or 0))
                    levels.append((rate, summ))
                    if len(rates) > 1 and not within_limits(summ, s):
                        break
                met = [(r, x) for r, x in levels if within_limits(x, s)]
                rate, summ = met[-1] if met else levels[0]
                if len(rates) > 1:
                    summ = {**summ, "max_valid_qps": met[-1][0] if met else 0.0}
                out[sc.label] = {"summary": summ}
            else:
                continue
        except Exception as e:  # SimConfigError / SimStartupError: the engine would refuse or die
            return {"error": f"{type(e).__name__}: {e}"[:300]}
        summ = out[sc.label]["summary"]
        if summ.get("tpot_mean_ms") and "tokens_per_s_per_user" not in summ:
            summ["tokens_per_s_per_user"] = 1000.0 / summ["tpot_mean_ms"]
    return out


def _lengths(dataset: dict[str, Any]) -> tuple[int, int, int]:
    """(input tokens, output tokens, requests) the estimate assumes for a dataset."""
    n = int(dataset.get("n") or 200)
    if dataset.get("kind", "random") != "random":
        return 512, 128, n  # a file or text dataset: typical lengths (calibration absorbs the difference)
    return int(dataset.get("input_tokens", 512)), int(dataset.get("output_tokens", 128)), n


@dataclass
class Calibration:
    """Per-group multiplicative factors: calibrated = estimated x scale[group]."""

    scale: dict[str, float] = field(default_factory=dict)
    n: int = 0

    @staticmethod
    def _log_ratios(pairs: list[tuple[dict, dict]], metric: str) -> list[float]:
        out = []
        for est, meas in pairs:
            e, m = est.get(metric), meas.get(metric)
            if isinstance(e, (int, float)) and isinstance(m, (int, float)) and e > 0 and m > 0 \
                    and math.isfinite(e) and math.isfinite(m):
                out.append(math.log(m / e))
        return out

    @classmethod
    def fit(cls, pairs: list[tuple[dict, dict]]) -> "Calibration":
        """``pairs``: (estimated summary, measured summary) of completed real trials. The factor of each
        group minimises the squared log error of its headline metric: exp(mean(log(measured/estimated)))."""
        scale = {}
        for g, metric in HEADLINE.items():
            r = cls._log_ratios(pairs, metric)
            if r:
                scale[g] = float(math.exp(np.mean(r)))
        return cls(scale=scale, n=len(pairs))

    def apply(self, summary: dict[str, Any]) -> dict[str, Any]:
        out = dict(summary)
        for k, v in summary.items():
            g = _GROUP_OF.get(k)
            if g in self.scale and isinstance(v, (int, float)):
                out[k] = v * self.scale[g]
        return out

    def apply_all(self, estimated: dict[str, Any]) -> dict[str, Any]:
        if "error" in estimated:
            return estimated
        return {lbl: {**sc, "summary": self.apply(sc["summary"])} for lbl, sc in estimated.items()}

    @classmethod
    def report(cls, pairs: list[tuple[dict, dict]]) -> dict[str, Any]:
        """Median relative error of each headline metric before calibration and after (leave-one-out)."""
        out: dict[str, Any] = {"pairs": len(pairs), "scale": cls.fit(pairs).scale, "error_before": {},
                               "error_after": {}}
        for g, metric in HEADLINE.items():
            r = cls._log_ratios(pairs, metric)
            if not r:
                continue
            out["error_before"][metric] = _rel(np.median(np.abs(r)))
            if len(r) >= 2:
                loo = [abs(x - (sum(r) - x) / (len(r) - 1)) for x in r]
                out["error_after"][metric] = _rel(np.median(loo))
        return out


def _rel(abs_log: float) -> float:
    """A |log ratio| as a relative error (0.1 = off by 10 %)."""
    return round(float(math.exp(abs_log) - 1.0), 4)


def hypervolume_gain(front: list[list[float]], point: list[float], ref: list[float]) -> float:
    """How much ``point`` adds to the hypervolume of ``front`` (all in minimisation form, below ``ref``)."""
    if any(p >= r for p, r in zip(point, ref)):
        return 0.0
    if len(point) == 1:
        best = min([f[0] for f in front], default=ref[0])
        return max(0.0, best - point[0])
    base = [f for f in front if all(a < b for a, b in zip(f, ref))]
    r = np.asarray(ref, dtype=float)
    hv0 = compute_hypervolume(np.asarray(base, dtype=float), r) if base else 0.0
    hv1 = compute_hypervolume(np.asarray(base + [point], dtype=float), r)
    return float(hv1 - hv0)
