"""Load sweeps against one running server (no restart between levels): the optimizer's per-launch sweeps.

- :func:`find_max_qps`: the highest Server/Interactive arrival rate whose run is VALID (latency limits,
  min duration/queries, early stopping as the settings ask, error rate), as MLPerf LoadGen's
  ``FindPeakPerformance`` mode and vLLM's ``sweep serve_sla`` look for it. It measures ``lo`` and ``hi``
  first, then narrows the bracket [highest valid, lowest invalid] until it is within ``tolerance``
  (relative). Each next rate is interpolated where the worst latency margin (p99 / limit − 1) crosses
  zero, when both ends have one, clamped to the middle half of the bracket so it shrinks by at least a
  quarter per step; otherwise (an end failed on errors or run length) it bisects. When ``lo`` itself is not
  valid, the rate is halved down to ``floor`` (default ``lo``/16) until one is, and that bracket is narrowed
  the same way: a configuration that serves at all gets a capacity, and "no valid rate" means none down to
  the floor.
- :func:`concurrency_sweep`: the fixed-concurrency load pattern (MLPerf Endpoints) at each level, giving
  output tokens/s/GPU against tokens/s/user points and their Pareto front.

Both are pure functions of (endpoint, requests, settings): every level runs the same seeded schedule shape
and sample order (a Poisson schedule at another rate is the same draws rescaled, which keeps the search
monotone), and by default each level's prompts get a level-specific first token so a prefix cache warmed
by one level cannot flatter the next (vllm#52884). They return every level measured.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from typing import Any, Iterator, Sequence

from servetune.loadgen.datasets import SAFE_ID_LOW
from servetune.loadgen.endpoint import Endpoint
from servetune.loadgen.records import Request, ScenarioResult
from servetune.loadgen.scenario_kinds import OPEN_LOOP, ScenarioKind
from servetune.loadgen.scenarios import ScenarioSettings, run
from servetune.loadgen.validity import NOT_KEEPING_UP, steady_state_shortfall

LEVEL_TOKEN_BASE = SAFE_ID_LOW - 3  # warmup variants use SAFE_ID_LOW - 1 and - 2


def level_variant(requests: Sequence[Request], level: int) -> list[Request]:
    """``requests`` with a level-specific first token (or word) prepended: no prefix-cache sharing with
    other levels, while the samples of one level stay distinct from each other."""
    out = []
    for r in requests:
        if isinstance(r.prompt, str):
            out.append(replace(r, prompt=f"L{level} {r.prompt}", input_tokens=r.input_tokens + 1))
        else:
            token = LEVEL_TOKEN_BASE - (level % (LEVEL_TOKEN_BASE - 1))
            out.append(replace(r, prompt=[token, *r.prompt], input_tokens=r.input_tokens + 1))
    return out


def latency_margin(result: ScenarioResult) -> float:
    """Worst (percentile / limit − 1) over the TTFT and TPOT limits; < 0 means within. NaN without limits."""
    s = result.settings
    kind = ScenarioKind.find(result.scenario)
    pname = f"p{round((kind.percentile if kind and kind.percentile else 0.99) * 100)}"
    margins = []
    for metric, key in (("ttft", "ttft_limit_ms"), ("tpot", "tpot_limit_ms")):
        limit = s.get(key)
        value = result.summary.get(f"{metric}_{pname}_ms", math.nan)
        if limit and value == value:
            margins.append(value / limit - 1.0)
    return max(margins) if margins else math.nan


@dataclass
class MaxQPSResult:
    """Every level measured (in the order run) and the best valid rate. Unpacks as ``levels, best_qps``."""

    levels: list[ScenarioResult]
    best_qps: float | None
    stopped_because: str
    lo: float
    hi: float
    tolerance: float
    bracket: tuple[float | None, float | None] = (None, None)  # (highest valid, lowest invalid)
    runs: int = 0  # scenario runs made: the levels plus the too-short runs that longer ones replaced
    floor: float | None = None  # the lowest rate the search would try when lo is not valid

    def __iter__(self) -> Iterator[Any]:
        return iter((self.levels, self.best_qps))

    @property
    def best(self) -> ScenarioResult | None:
        return next((r for r in self.levels if r.settings.get("qps") == self.best_qps and r.valid), None)

    def to_dict(self, with_records: bool = False) -> dict[str, Any]:
        return {"best_qps": self.best_qps, "stopped_because": self.stopped_because, "lo": self.lo, "hi": self.hi,
                "tolerance": self.tolerance, "bracket": list(self.bracket), "runs": self.runs, "floor": self.floor,
                "levels": [r.to_dict(with_records) for r in self.levels]}


# A keep-up verdict on fewer measured arrivals than this is judged again on a longer run: at 2-3 req/s a
# 20 s level's arrivals can bunch (41 of 59 in its second half on an H200 70B run) and look like a backlog.
KEEP_UP_ARRIVALS = 120


def longer_run(reasons: Sequence[str], summary: dict[str, float], level: ScenarioSettings,
               limit: float | None) -> tuple[int, str] | None:
    """(seconds, why) to run a level once more when the keep-up rule could not judge it, its only reason
    for being invalid: a run shorter than twice its median request runs for 2.2× that median (when that
    fits in ``limit``); a backlog seen in fewer than KEEP_UP_ARRIVALS arrivals runs for that many arrivals
    (at most ``limit``). None: the verdict stands."""
    if level.min_keep_up is None or not limit or len(reasons) != 1:
        return None
    short = steady_state_shortfall(summary)
    if short:
        seconds = math.ceil(2.2 * short[0])
        why = f"a {short[1]:.1f} s run was too short to judge (its median request took {short[0]:.1f} s)"
        return (seconds, why) if (level.duration_s or 0) < seconds <= limit else None
    arrivals = int(summary.get("requests_issued", 0))
    if reasons[0].startswith(NOT_KEEPING_UP) and arrivals < KEEP_UP_ARRIVALS and level.qps:
        seconds = min(math.ceil(KEEP_UP_ARRIVALS / level.qps), math.floor(limit))
        why = f"{arrivals} arrivals were too few to tell a backlog from arrivals that bunched"
        return (seconds, why) if (level.duration_s or 0) < seconds else None
    return None


def longest_level_s(settings: ScenarioSettings, given: float | None = None) -> float | None:
    """How long a too-short level may run again (``max_level_duration_s``): as given, else 3× the level's
    ``duration_s``; None (no re-run) for a level with no duration."""
    return given or (3 * settings.duration_s if settings.duration_s else None)


# How far below lo the search looks by default: four halvings. A configuration that cannot sustain a
# sixteenth of the rate the study expects it to is no contender, and each halving costs a level (and at
# such rates a level of the same length holds too few arrivals to judge a backlog).
FLOOR_DIVISOR = 16


def find_max_qps(endpoint: Endpoint, requests: Sequence[Request], settings: ScenarioSettings, lo: float,
                 hi: float, tolerance: float = 0.05, max_levels: int = 10, vary_prompts: bool = True,
                 level_offset: int = 0, max_level_duration_s: float | None = None,
                 floor: float | None = None, auditor: Any = None) -> MaxQPSResult:
    """The highest valid ``qps`` in [floor, hi] to within ``tolerance`` (relative), for a server/interactive
    ``settings`` (its ``qps`` is replaced per level). At most ``max_levels`` levels, plus the halvings
    below ``lo`` (at most log2(lo / floor), ``floor`` defaulting to lo / :data:`FLOOR_DIVISOR`) when ``lo``
    is not valid. ``level_offset`` numbers the prompt variants after levels an earlier scenario already ran
    on the same server. A level the audit still finds contaminated after its re-run ends the search with
    that verdict: contamination says nothing about capacity, so it is never halved below or bracketed on.

    With ``max_level_duration_s``, a level too short to show a steady state (shorter than twice its median
    request, see :func:`~servetune.loadgen.validity.steady_state_shortfall`) runs once more, for 2.2× that
    median when it fits in ``max_level_duration_s``, and the longer run is the level: near capacity a
    request lives longer, and a fixed level length would call every such rate invalid without judging it.
    An overloaded server gains nothing from it: its requests live longer still, and the rerun fails too.

    With an ``auditor`` (:class:`~servetune.loadgen.audit.Auditor`), every run is audited against the
    engine's counters and log; one whose audit fails runs once more, with fresh prompts, after more warm-up.
    A level still contaminated after that counts as not valid here (no capacity is claimed from it) and is
    marked so in its summary."""
    if settings.kind not in OPEN_LOOP:
        raise ValueError(f"find_max_qps needs a {' or '.join(OPEN_LOOP)} scenario, got {settings.kind!r}")
    if not 0 < lo < hi:
        raise ValueError(f"need 0 < lo < hi, got lo={lo}, hi={hi}")
    if not 0 < tolerance < 1:
        raise ValueError(f"tolerance is relative and must be in (0, 1), got {tolerance}")
    if max_levels < 2:
        raise ValueError("max_levels must be >= 2 (lo and hi)")
    floor = lo / FLOOR_DIVISOR if floor is None else floor
    if not 0 < floor <= lo:
        raise ValueError(f"need 0 < floor <= lo, got floor={floor}, lo={lo}")
    levels: list[ScenarioResult] = []
    runs = 0

    def sent_once(level: ScenarioSettings) -> ScenarioResult:
        nonlocal runs
        reqs = level_variant(requests, level_offset + runs) if vary_prompts else requests  # never replayed
        runs += 1
        return run(endpoint, reqs, level)

    def run_once(level: ScenarioSettings) -> ScenarioResult:
        if auditor is None:
            return sent_once(level)
        return auditor.measure(lambda: sent_once(level), level)  # the audit's one re-run, fresh prompts

    def measure(qps: float) -> ScenarioResult:
        level = replace(settings, qps=qps)
        result = run_once(level)
        again = longer_run(result.invalid_reasons, result.summary, level, max_level_duration_s)
        if again:
            seconds, why = again
            result = run_once(replace(level, duration_s=float(seconds)))
            result.notes.append(f"ran for {seconds} s: {why}")
        result.settings["search_level"] = len(levels)
        levels.append(result)
        return result

    def done(best: float | None, why: str, bracket: tuple[float | None, float | None]) -> MaxQPSResult:
        return MaxQPSResult(levels, best, why, lo, hi, tolerance, bracket, runs, floor)

    def contaminated(r: ScenarioResult) -> MaxQPSResult | None:
        """A level the audit still finds contaminated after its re-run ends the search: contamination says
        nothing about capacity, so a lower rate would not cure it."""
        if not r.summary.get("audit_contaminated"):
            return None
        q = r.settings["qps"]
        which = "the lowest rate" if q == lo else "the rate"
        return done(None, f"{which} {q:g}/s is contaminated: {'; '.join(r.invalid_reasons)}", (None, None))

    low = measure(lo)
    if (stop := contaminated(low)) is not None:
        return stop
    if low.valid:
        high = measure(hi)
        if high.valid:
            return done(hi, f"the highest rate {hi:g}/s is valid: the server sustains at least that (raise hi)",
                        (hi, None))
        good_q, bad_q = lo, hi
    else:  # a failing low end is no verdict yet: halve down to the floor until a rate is valid
        high, bad_q = low, lo
        while not low.valid:
            if bad_q <= floor:
                return done(None, f"not valid at any rate down to the floor {floor:g}/s (lo {lo:g}/s); at "
                                  f"{bad_q:g}/s: {'; '.join(low.invalid_reasons)}", (None, bad_q))
            good_q = max(bad_q / 2, floor)
            low = measure(good_q)
            if (stop := contaminated(low)) is not None:
                return stop
            if not low.valid:
                high, bad_q = low, good_q
        max_levels += len(levels) - 2  # the halvings come on top of max_levels
    good_m, bad_m = latency_margin(low), latency_margin(high)
    while bad_q - good_q > tolerance * good_q:
        if len(levels) >= max_levels:
            return done(good_q, f"stopped after {max_levels} levels with the bracket at "
                                f"[{good_q:g}, {bad_q:g}]/s", (good_q, bad_q))
        width = bad_q - good_q
        if good_m == good_m and bad_m == bad_m and bad_m > 0 > good_m:
            q = good_q + width * (-good_m) / (bad_m - good_m)
            q = min(max(q, good_q + 0.25 * width), bad_q - 0.25 * width)
        else:
            q = good_q + 0.5 * width
        res = measure(q)
        if res.valid:
            good_q, good_m = q, latency_margin(res)
        else:
            bad_q, bad_m = q, latency_margin(res)
    return done(good_q, f"bracket [{good_q:g}, {bad_q:g}]/s is within {tolerance:.0%}", (good_q, bad_q))


def concurrency_levels(max_concurrency: int, min_concurrency: int = 1) -> list[int]:
    """Powers of two from ``min_concurrency`` up to, and including, ``max_concurrency`` (log-spaced)."""
    if not 1 <= min_concurrency <= max_concurrency:
        raise ValueError(f"need 1 <= min <= max, got {min_concurrency}, {max_concurrency}")
    out, c = [], min_concurrency
    while c < max_concurrency:
        out.append(c)
        c *= 2
    return out + [max_concurrency]


PARETO_X = "tokens_per_s_per_user_at_tpot_p90"  # MLPerf Endpoints: 1000 / TPOT p90
PARETO_Y = "output_tokens_per_s_per_gpu"


@dataclass
class SweepResult:
    levels: list[ScenarioResult] = field(default_factory=list)

    def points(self) -> list[dict[str, Any]]:
        """One point per level: throughput per GPU against per-user speed, with latency context."""
        pts = []
        for r in self.levels:
            s = r.summary
            pts.append({
                "concurrency": r.settings.get("concurrency"),
                "output_tokens_per_s": s.get("output_tokens_per_s"),
                "output_tokens_per_s_per_gpu": s.get("output_tokens_per_s_per_gpu"),
                "tokens_per_s_per_user": s.get("tokens_per_s_per_user"),
                "tokens_per_s_per_user_at_tpot_p90": s.get("tokens_per_s_per_user_at_tpot_p90"),
                "request_per_s": s.get("request_per_s"),
                "ttft_p90_ms": s.get("ttft_p90_ms"), "tpot_p90_ms": s.get("tpot_p90_ms"),
                "error_rate": s.get("error_rate"), "valid": r.valid,
            })
        front = pareto_front(pts)
        for i, p in enumerate(pts):
            p["pareto"] = i in front
        return pts

    def pareto(self) -> list[dict[str, Any]]:
        return [p for p in self.points() if p["pareto"]]

    def to_dict(self, with_records: bool = False) -> dict[str, Any]:
        return {"points": self.points(), "levels": [r.to_dict(with_records) for r in self.levels]}


def pareto_front(points: Sequence[dict[str, Any]], x: str = PARETO_X, y: str = PARETO_Y) -> set[int]:
    """Indices of the points no other point beats on both ``x`` and ``y`` (higher is better); points with a
    missing value or an error rate above 0 are never on the front."""
    usable = [i for i, p in enumerate(points)
              if all(isinstance(p.get(k), (int, float)) and p[k] == p[k] for k in (x, y))
              and not (p.get("error_rate") or 0) > 0]
    front = set()
    for i in usable:
        xi, yi = points[i][x], points[i][y]
        if not any(points[j][x] >= xi and points[j][y] >= yi and (points[j][x] > xi or points[j][y] > yi)
                   for j in usable):
            front.add(i)
    return front


def concurrency_sweep(endpoint: Endpoint, requests: Sequence[Request], settings: ScenarioSettings,
                      levels: Sequence[int], vary_prompts: bool = True, auditor: Any = None) -> SweepResult:
    """Run the fixed-concurrency scenario at each level of ``levels`` (``settings`` gives run length,
    warmup, limits, workers...; its kind and rate are replaced). With an ``auditor``, each level is audited
    and re-run once, with fresh prompts, when its audit fails (as in :func:`find_max_qps`)."""
    if not levels or any(int(c) < 1 for c in levels):
        raise ValueError(f"levels must be concurrencies >= 1, got {list(levels)}")
    out = SweepResult()
    runs = 0
    for i, c in enumerate(levels):
        level = replace(settings, kind=ScenarioKind.where(drive="closed_loop")[0], qps=None, concurrency=int(c),
                        max_connections=None)

        def once() -> ScenarioResult:
            nonlocal runs
            reqs = level_variant(requests, runs) if vary_prompts else requests
            runs += 1
            return run(endpoint, reqs, level)

        result = auditor.measure(once, level) if auditor is not None else once()
        result.settings["search_level"] = i
        out.levels.append(result)
    return out
