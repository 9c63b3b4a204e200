"""Is a run a valid result? MLPerf LoadGen's rules, plus an error-rate gate for real HTTP servers.

LoadGen (``results.cc``) calls a run VALID when the minimum duration and query count are met, the
latency constraints hold at the scenario percentile, and early stopping passes. Here that means:

- **min duration**: Server/Interactive by the *scheduled* time of the last query (a slow server cannot
  shorten the run), SingleStream and Concurrency by the last issue time, Offline by the last completion.
- **min queries**: ``num_requests`` issued.
- **latency constraints** (Server/Interactive/Concurrency at p99, SingleStream at p90 when limits are given):
  nearest-rank TTFT and TPOT percentiles ≤ their limits.
- **early stopping**, separately for TTFT and TPOT: with t queries over the limit, n issued queries must
  reach :func:`early_stopping_min_queries` (t). A failed request counts as over the limit.
- **error rate** ≤ ``max_error_rate`` (MLPerf has no failed queries; an HTTP server does).
- **keeping up** (Server/Interactive, unless ``min_keep_up`` is None; not a LoadGen rule): LoadGen's
  10-minute minimum is what stops a rate the server cannot sustain from passing; a run of seconds can meet
  its p99 limits while the backlog grows, because arrivals stop before it shows. So a short run must (a)
  last at least twice the median request lifetime (e2e p50), else nothing can be said about its steady
  state, and (b) show departures keeping pace with arrivals over the second half of the schedule:
  ``keep_up_ratio`` (:func:`~servetune.loadgen.metrics.keep_up`) ≥ ``min_keep_up``, unless the growth is
  within Poisson noise (3·√ of the sum of the two counts). Measured on H200s, rates that passed p99 in 10 s had
  keep-up 0.07–0.45 (docs/results/2026-11-22-h200x4-sglang-tp2-fp8).

Short runs (a 15 s quickstart, an optimizer trial) cannot meet early stopping at useful rates. With
``require_early_stopping=False`` its shortfall becomes a note instead of a fatal reason; the numbers are
kept in :attr:`Verdict.numbers` either way.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from functools import lru_cache
from types import SimpleNamespace
from typing import Any, Iterator, Mapping, Sequence

from scipy.special import betainc

from servetune.loadgen.metrics import e2e_ms, summarize
from servetune.loadgen.records import RequestRecord
from servetune.loadgen.scenario_kinds import OPEN_LOOP, ScenarioKind

CONFIDENCE = 0.99  # LoadGen's c; tolerance d = 0
SCENARIO_PERCENTILE = {k.name: k.percentile for k in ScenarioKind.all() if k.percentile is not None}
DEFAULT_MAX_ERROR_RATE = 0.01
DEFAULT_MIN_KEEP_UP = 0.7


def _early_stopping_odds(h: int, t: int, p: float) -> float:
    """P(at most t over-latency queries in h + t) when a query is within latency with probability p.

    The binomial CDF as a regularized incomplete beta, I_p(h, t + 1) (LoadGen ``early_stopping.cc``).
    """
    return float(betainc(h, t + 1, p))


@lru_cache(maxsize=4096)
def early_stopping_min_queries(t: int, percentile: float, confidence: float = CONFIDENCE) -> int:
    """Fewest queries n = h + t that pass early stopping with ``t`` of them over the latency target.

    h is the smallest count with I_p(h, t + 1) < 1 − confidence (LoadGen's ``find_min_passing``, d = 0):
    enough under-latency queries that, at this confidence, the true ``percentile`` latency is within
    target. p99: t=0 → 459, t=1 → 662; p90: t=0 → 44.
    """
    if t < 0:
        raise ValueError(f"t must be >= 0, got {t}")
    if not 0.0 < percentile < 1.0:
        raise ValueError(f"percentile must be in (0, 1), got {percentile}")
    threshold = 1.0 - confidence
    low, high = 1, 1
    while _early_stopping_odds(high, t, percentile) >= threshold:  # odds fall as h grows
        low, high = high + 1, high * 2
    while low < high:
        mid = (low + high) // 2
        if _early_stopping_odds(mid, t, percentile) < threshold:
            high = mid
        else:
            low = mid + 1
    return low + t


def early_stopping_estimate(latencies: Sequence[float], percentile: float,
                            confidence: float = CONFIDENCE) -> float | None:
    """LoadGen's SingleStream early-stopping percentile estimate, or None when n is too small.

    The largest t whose requirement n ≥ h(t) + t still holds fixes how many of the highest latencies may
    be discarded (t − 1); the estimate is the sorted value at index n − t.
    """
    n = len(latencies)
    if n < early_stopping_min_queries(1, percentile, confidence):
        return None
    t = 1
    while t + 1 <= n and early_stopping_min_queries(t + 1, percentile, confidence) <= n:
        t += 1
    return sorted(latencies)[n - t]


@dataclass
class Verdict:
    """The outcome. Unpacks as ``valid, reasons = verdict(...)``; notes and numbers ride along."""

    valid: bool
    reasons: list[str]  # fatal: why the run is not a valid result
    notes: list[str] = field(default_factory=list)  # non-fatal findings
    numbers: dict[str, float] = field(default_factory=dict)  # early-stopping counts and estimates

    def __iter__(self) -> Iterator[Any]:
        return iter((self.valid, self.reasons))


NOT_KEEPING_UP = "not keeping up"  # how the keep-up reason begins (loadgen.search re-runs such levels)


def steady_state_shortfall(summary: Mapping[str, float]) -> tuple[float, float] | None:
    """(median request lifetime, arrival window) in seconds when the run is shorter than twice the former,
    too short to show a steady state; None when it is long enough or there is nothing to judge."""
    first, last = summary.get("first_scheduled_s", 0.0), summary.get("last_scheduled_s", float("nan"))
    window = last - first
    lifetime = summary.get("e2e_p50_ms", float("nan")) / 1000.0
    if not window > 0 or lifetime != lifetime:
        return None  # nothing completed or nothing scheduled: other reasons already say so
    return (lifetime, window) if lifetime > window / 2 else None


def _keep_up_reasons(summary: Mapping[str, float], min_keep_up: float) -> list[str]:
    short = steady_state_shortfall(summary)
    if short:
        lifetime, window = short
        return [f"too short to show the server keeps up: the median request took {lifetime:.1f} s, more than "
                f"half of the {window:.1f} s of arrivals (lengthen duration_s to at least {2 * lifetime:.0f} s)"]
    ratio = summary.get("keep_up_ratio", float("nan"))
    half, end = summary.get("in_system_at_half", 0.0), summary.get("in_system_at_end", 0.0)
    # Where the server keeps up, the count in the system at a time is about Poisson: the difference of two
    # such counts has variance ≈ their sum. 3σ of that, not of the first count alone: with 3·√(half + 1),
    # 20 s levels at 2-3 req/s whose arrivals bunched late were called backlogs on a 70B that was far from
    # its capacity (docs/results/2026-11-22-h200x4-llama70b-sharding).
    if ratio < min_keep_up and end - half > 3.0 * math.sqrt(half + end + 1.0):
        return [f"{NOT_KEEPING_UP}: requests in the system grew from {half:.0f} to {end:.0f} over the second half "
                f"of the arrivals (keep-up {ratio:.2f} < {min_keep_up:g}); the backlog grows with the run's length"]
    return []


def _settings_view(settings: Any) -> Any:
    return SimpleNamespace(**settings) if isinstance(settings, Mapping) else settings


def verdict(source: Mapping[str, float] | Sequence[RequestRecord], settings: Any, *,
            require_early_stopping: bool | None = None, max_error_rate: float | None = None,
            summary: Mapping[str, float] | None = None) -> Verdict:
    """Judge a run from its records (preferred) or its summary, against its scenario settings.

    ``settings`` is a :class:`~servetune.loadgen.scenarios.ScenarioSettings` or its dict. The keyword
    arguments override the settings' ``require_early_stopping`` (default True) and ``max_error_rate``
    (default 1 %). Given records, ``summary`` may pass their already computed summary (same limits).
    From a summary alone, the SingleStream early-stopping estimate cannot be computed.
    """
    s = _settings_view(settings)
    kind = s.kind
    traits = ScenarioKind.find(kind)
    e2e_estimate = bool(traits and traits.e2e_estimate)
    ttft_limit, tpot_limit = getattr(s, "ttft_limit_ms", None), getattr(s, "tpot_limit_ms", None)
    if require_early_stopping is None:
        require_early_stopping = getattr(s, "require_early_stopping", True)
    if max_error_rate is None:
        max_error_rate = getattr(s, "max_error_rate", DEFAULT_MAX_ERROR_RATE)

    records: Sequence[RequestRecord] | None = None
    if isinstance(source, Mapping):
        summary = source
    else:
        records = source
        if summary is None:
            summary = summarize(records, duration_s=0.0, ttft_limit_ms=ttft_limit, tpot_limit_ms=tpot_limit)

    reasons: list[str] = []
    notes: list[str] = []
    numbers: dict[str, float] = {}
    n = int(summary.get("requests_issued", 0))
    if n == 0 or summary.get("requests_ok", 0) == 0:
        reasons.append(f"no successful requests (issued {n})")

    error_rate = summary.get("error_rate", 0.0)
    if error_rate > max_error_rate:
        kinds = ", ".join(f"{k[7:]}={int(v)}" for k, v in sorted(summary.items())
                          if k.startswith("errors_") and v)
        reasons.append(f"error rate {error_rate:.1%} exceeds {max_error_rate:.1%} ({kinds})")

    min_queries = getattr(s, "num_requests", None)
    if min_queries and n < min_queries:
        reasons.append(f"min query count not met: {n} issued < {min_queries}")

    min_duration = getattr(s, "duration_s", None)
    if min_duration:
        clock_key, what = (traits or ScenarioKind.get("server")).run_clock
        reached = summary.get(clock_key, float("nan"))
        if not reached >= min_duration:  # NaN (nothing issued) fails too
            reasons.append(f"min duration not met: {what} at {reached:.3f} s < {min_duration:g} s")

    min_keep_up = getattr(s, "min_keep_up", DEFAULT_MIN_KEEP_UP)
    if kind in OPEN_LOOP and min_keep_up is not None:
        steady = _keep_up_reasons(summary, min_keep_up)
        reasons += steady
        numbers["steady_state_met"] = float(not steady)

    percentile = SCENARIO_PERCENTILE.get(kind)
    es_checked, es_met = False, True

    def early_stopping_short(msg: str) -> None:
        nonlocal es_met
        es_met = False
        (reasons if require_early_stopping else notes).append(msg)

    if percentile is None:
        if ttft_limit is not None or tpot_limit is not None:
            notes.append(f"latency limits are not checked in the {kind} scenario")
    elif ttft_limit is None and tpot_limit is None:
        if not e2e_estimate:
            notes.append("no TTFT/TPOT limits given: latency constraints and early stopping not checked")
    else:
        pname = f"p{round(percentile * 100)}"
        for metric, limit in (("ttft", ttft_limit), ("tpot", tpot_limit)):
            if limit is None:
                continue
            value = summary.get(f"{metric}_{pname}_ms", float("nan"))
            if not value <= limit:
                reasons.append(f"{metric.upper()} {pname} {value:.1f} ms exceeds the {limit:g} ms limit")
            over = summary.get(f"{metric}_over_limit_count")
            if over is None:
                notes.append(f"{metric.upper()} early stopping not computed: summary lacks over-limit counts")
                continue
            es_checked = True
            need = early_stopping_min_queries(int(over), percentile)
            numbers[f"early_stopping_{metric}_over_limit"] = int(over)
            numbers[f"early_stopping_{metric}_min_queries"] = need
            if n < need:
                early_stopping_short(f"{metric.upper()} early stopping not met (n={n}, need {need} with "
                                     f"{int(over)} over the {limit:g} ms limit at {pname})")

    if e2e_estimate:
        # LoadGen's SingleStream figure: the p90 early-stopping estimate of per-query latency.
        need = early_stopping_min_queries(1, 0.90)
        numbers["early_stopping_e2e_min_queries"] = need
        if records is None:
            notes.append("SingleStream early-stopping estimate needs the records")
        else:
            es_checked = True
            # A failed query has no latency to report; as +inf it can only push the estimate up.
            lat = [(e2e_ms(r) if r.ok else None) for r in records if not r.warmup]
            estimate = early_stopping_estimate([math.inf if v is None else v for v in lat], 0.90)
            if estimate is None:
                early_stopping_short(f"SingleStream early stopping not met (n={n}, need {need})")
            else:
                numbers["early_stopping_e2e_p90_ms"] = estimate

    if es_checked:
        numbers["early_stopping_met"] = float(es_met)
    return Verdict(valid=not reasons, reasons=reasons, notes=notes, numbers=numbers)
