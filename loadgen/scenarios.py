"""MLPerf-style scenarios: how requests are issued in time, and what one run returns.

- **offline**: every request is issued at t0 (bounded by ``max_connections`` when set; latency still counts
  from t0, so waiting for a connection slot is visible).
- **server** / **interactive**: arrivals at ``qps``, Poisson by default (``arrival="poisson_exact"``: the same
  draws rescaled so that the last lands at (n − 1)/qps, as vLLM's client does; ``arrival="constant"`` for evenly
  spaced ones). The whole schedule is drawn up front from a seeded generator as absolute offsets from t0,
  and the issue loop wakes for each one (a timerfd pacer on Linux, see :mod:`~servetune.loadgen.pacer`).
  Latency is measured from the scheduled time, so a late issue loop or a full connection pool is charged
  to the result, never hidden (no coordinated omission); ``schedule_lag_*`` shows how late sends were and
  ``ttft_from_send_*`` what the latency was from the actual send. Interactive is the same code path with
  tighter limits, as in LoadGen (``sla="llama3.1-8b"`` resolves to the ``-interactive`` preset there).
- **single_stream**: one request outstanding; the next is issued when the previous completes. Its
  figure is the p90 early-stopping estimate of latency (see :mod:`~servetune.loadgen.validity`).
- **concurrency**: ``concurrency`` requests outstanding at all times (closed loop, the MLPerf Endpoints
  "fixed concurrency" load pattern): each completion issues the next. Latency counts from the issue.

Run length follows LoadGen: keep issuing until both ``num_requests`` and ``duration_s`` are met (by the
scheduled time of the last query for server/interactive, by its issue time for single_stream and
concurrency). Offline issues ``num_requests`` (default: one pass over the dataset). Samples are taken in
equal-issue order: whole seeded permutations of the dataset, one after another; ``equal_issue=True`` also
rounds the count up to whole passes, as MLPerf's LLM rules require. A sample's second and later passes send
a marked variant of its prompt (:func:`~servetune.loadgen.runner.repeat_variant`), so no prompt is sent twice
at any request count; ``replay=True`` sends it again instead, for a workload that measures the prefix cache.

``warmup_requests`` are sent before t0 (their times are relative to the warmup's own start), drained,
and marked ``warmup`` so no metric sees them. Their prompts are altered in the first token (or word) so
they cannot pre-fill the prefix cache for the measured requests that reuse the same samples.

``workers=N`` sends from N processes, each with its own event loop and aiohttp session, sharing one
absolute t0 and a partition of one precomputed schedule (closed loops share one issue counter); see
:mod:`~servetune.loadgen.runner`. Use it when one event loop cannot keep up (``schedule_lag_*`` grows).

Everything is bounded by ``timeout_s``: when it expires, outstanding requests are cancelled and recorded
as ``timeout``. Nothing hangs on a server that never answers.
"""
from __future__ import annotations

import asyncio
import gc
import json
import math
import multiprocessing
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np
import pandas as pd

from servetune.loadgen import progress
from servetune.loadgen.client import loop_factory, run_loop
from servetune.loadgen.datasets import prompt_format_of
from servetune.loadgen.endpoint import Endpoint
from servetune.loadgen.metrics import e2e_ms, schedule_lag_ms, summarize, tpot_ms, ttft_from_send_ms, ttft_ms
from servetune.loadgen.records import Chunk, Request, RequestRecord, ScenarioResult
from servetune.loadgen.runner import Job, JobResult, Positions, execute, issue_order, run_in_workers, warmup_variant
from servetune.loadgen.scenario_kinds import SCENARIOS, ScenarioKind
from servetune.loadgen.sla import resolve_limits
from servetune.loadgen.validity import DEFAULT_MAX_ERROR_RATE, DEFAULT_MIN_KEEP_UP, verdict

ARRIVALS = ("poisson", "constant", "poisson_exact", "trace")
_warmup_variant = warmup_variant  # the name the tests and older callers use


@dataclass
class ScenarioSettings:
    kind: str  # offline | server | interactive | single_stream | concurrency
    qps: float | None = None  # arrival rate (server, interactive)
    duration_s: float | None = None  # minimum run length (see module docstring for which clock)
    num_requests: int | None = None  # minimum number of measured requests
    max_connections: int | None = None  # at most this many requests in flight; None = unbounded
    warmup_requests: int = 0
    timeout_s: float = 600  # bound on the whole scenario, warmup included
    ttft_limit_ms: float | None = None
    tpot_limit_ms: float | None = None
    seed: int = 0  # arrival schedule, sample order and warmup choice all derive from it
    num_gpus: int = 1
    equal_issue: bool = False  # round the request count up to whole passes over the dataset
    require_early_stopping: bool = True  # False: an early-stopping shortfall is a note, not invalidity
    max_error_rate: float = DEFAULT_MAX_ERROR_RATE
    min_keep_up: float | None = DEFAULT_MIN_KEEP_UP  # server/interactive: see loadgen.validity; None: off
    concurrency: int | None = None  # the concurrency scenario: requests kept outstanding
    workers: int = 1  # load-generator processes (each its own event loop and session)
    sla: str | None = None  # MLPerf preset (loadgen.sla); fills the limits not given explicitly
    ignore_eos: bool | None = None  # force ignore_eos on every request (None: as the dataset says)
    arrival: str = "poisson"  # server/interactive arrivals: poisson | constant | poisson_exact | trace (schedule_for)
    # arrival="trace": the issue times (s) to replay, e.g. another client's start times, so that two clients
    # compared on one server meet the same bursts; qps defaults to their mean rate
    arrival_times: list[float] | None = None
    # Prompt reuse the workload declares (the engine audit reads these: prefix-cache hits are expected only
    # then). replay: a sample issued again sends the same prompt (default: a distinct one, runner.repeat_variant).
    replay: bool = False
    shared_prefix_tokens: int = 0  # leading tokens every prompt of the dataset shares

    def __post_init__(self) -> None:
        if self.kind not in SCENARIOS:
            raise ValueError(f"kind must be one of {SCENARIOS}, got {self.kind!r}")
        drive = ScenarioKind.get(self.kind).drive
        if self.arrival == "trace":
            self._check_trace(drive)
        if drive == "arrivals" and not (self.qps and self.qps > 0):
            raise ValueError(f"the {self.kind} scenario needs qps > 0")
        if drive == "closed_loop" and not (self.concurrency and self.concurrency >= 1):
            raise ValueError(f"the {self.kind} scenario needs concurrency >= 1")
        if self.concurrency is not None and drive != "closed_loop":
            raise ValueError(f"concurrency applies to the concurrency scenario, not {self.kind!r} "
                             "(max_connections caps the others)")
        for name in ("duration_s", "num_requests", "max_connections"):
            value = getattr(self, name)
            if value is not None and value <= 0:
                raise ValueError(f"{name} must be > 0 or None, got {value}")
        if self.timeout_s <= 0 or self.warmup_requests < 0 or self.num_gpus < 1:
            raise ValueError("timeout_s must be > 0, warmup_requests >= 0 and num_gpus >= 1")
        if not 0.0 <= self.max_error_rate <= 1.0:
            raise ValueError(f"max_error_rate must be in [0, 1], got {self.max_error_rate}")
        if self.min_keep_up is not None and not 0.0 <= self.min_keep_up <= 1.0:
            raise ValueError(f"min_keep_up must be in [0, 1] or None, got {self.min_keep_up}")
        if not isinstance(self.workers, int) or self.workers < 1:
            raise ValueError(f"workers must be an int >= 1, got {self.workers!r}")
        if self.shared_prefix_tokens < 0:
            raise ValueError(f"shared_prefix_tokens must be >= 0, got {self.shared_prefix_tokens}")
        if self.arrival not in ARRIVALS:
            raise ValueError(f"arrival must be one of {ARRIVALS}, got {self.arrival!r}")
        if self.sla is not None:
            self.ttft_limit_ms, self.tpot_limit_ms = resolve_limits(self.sla, self.kind, self.ttft_limit_ms,
                                                                    self.tpot_limit_ms)


    def _check_trace(self, drive: str) -> None:
        times = self.arrival_times
        if drive != "arrivals":
            raise ValueError(f"arrival=trace replays arrivals: a server or interactive scenario, not {self.kind!r}")
        if not times or len(times) < 2 or not all(
                isinstance(t, (int, float)) and not isinstance(t, bool) and math.isfinite(t) for t in times):
            raise ValueError("arrival=trace needs arrival_times: a list of at least two finite issue times in seconds")
        ordered = sorted(float(t) for t in times)
        self.arrival_times = [t - ordered[0] for t in ordered]  # the first request at 0, as every schedule
        if self.num_requests is None:
            self.num_requests = len(ordered)
        elif self.num_requests > len(ordered):
            raise ValueError(f"the arrival trace has {len(ordered)} arrivals; {self.num_requests} requests asked")
        span = self.arrival_times[-1]
        if not self.qps:
            self.qps = (len(ordered) - 1) / span if span > 0 else float(len(ordered))

def poisson_schedule(qps: float, seed: int, num_requests: int | None = None, duration_s: float | None = None,
                     multiple_of: int = 1) -> np.ndarray:
    """Absolute arrival offsets (s) of a Poisson process at ``qps``; the first arrival is at 0.

    Long enough for both ``num_requests`` arrivals and an arrival at or after ``duration_s``, then rounded
    up to a multiple of ``multiple_of``. The same seed always gives the same prefix.
    """
    if qps <= 0:
        raise ValueError(f"qps must be > 0, got {qps}")
    rng = np.random.default_rng(seed)
    need = max(num_requests or 0, 1)
    block = max(need, int(qps * (duration_s or 0.0) * 1.1) + 16)
    arrivals = np.concatenate(([0.0], np.cumsum(rng.exponential(1.0 / qps, size=block - 1))))
    while True:
        count = need
        if duration_s is not None:
            reached = np.flatnonzero(arrivals >= duration_s)
            count = max(count, int(reached[0]) + 1) if reached.size else len(arrivals) + 1
        count = math.ceil(count / multiple_of) * multiple_of
        if count <= len(arrivals):
            return arrivals[:count]
        more = arrivals[-1] + np.cumsum(rng.exponential(1.0 / qps, size=block))
        arrivals = np.concatenate((arrivals, more))


def constant_schedule(qps: float, num_requests: int | None = None, duration_s: float | None = None,
                      multiple_of: int = 1) -> np.ndarray:
    """Evenly spaced arrivals ``i/qps``, as many as :func:`poisson_schedule` would need."""
    if qps <= 0:
        raise ValueError(f"qps must be > 0, got {qps}")
    count = max(num_requests or 0, 1)
    if duration_s is not None:
        count = max(count, math.ceil(duration_s * qps - 1e-9) + 1)
    count = math.ceil(count / multiple_of) * multiple_of
    return np.arange(count, dtype=float) / qps


def scenario_seeds(seed: int) -> tuple[int, int, int]:
    """Independent seeds for the arrival schedule, the sample order and the warmup choice.

    Separate streams (as LoadGen's schedule/sample RNGs) so changing one never shifts the others.
    """
    schedule, sample, warmup = (int(s.generate_state(1)[0]) for s in np.random.SeedSequence(seed).spawn(3))
    return schedule, sample, warmup


def _count(settings: ScenarioSettings, dataset_size: int) -> int:
    """Minimum request count. With only a duration, the duration decides (offline: one dataset pass)."""
    by_duration = settings.duration_s is not None and ScenarioKind.get(settings.kind).drive != "all_at_once"
    n = settings.num_requests or (1 if by_duration else dataset_size)
    return math.ceil(n / dataset_size) * dataset_size if settings.equal_issue else n


def schedule_for(settings: ScenarioSettings, dataset_size: int) -> list[tuple[int, int, float]] | None:
    """(index, sample, scheduled s) of every measured request, or None for the closed-loop scenarios."""
    drive = ScenarioKind.get(settings.kind).drive
    if drive in ("one_at_a_time", "closed_loop"):
        return None
    seeds = scenario_seeds(settings.seed)
    count = _count(settings, dataset_size)
    if drive == "all_at_once":
        times: list[float] = [0.0] * count
    else:
        qps = settings.qps
        assert qps is not None  # ScenarioSettings refuses an arrivals scenario without qps > 0
        multiple = dataset_size if settings.equal_issue else 1
        if settings.arrival == "trace":
            return _traced(settings, count, issue_order(dataset_size, seeds[1]))
        arr = (constant_schedule(qps, count, settings.duration_s, multiple) if settings.arrival == "constant"
               else poisson_schedule(qps, seeds[0], count, settings.duration_s, multiple))
        if settings.arrival == "poisson_exact" and len(arr) > 1:
            # the same draws rescaled so the run's mean rate is exactly qps, as vllm bench serve rescales its
            # own: 1,200 Poisson arrivals span their nominal time ±2.9 % (1/√n), which moves throughput as much
            arr = arr * ((len(arr) - 1) / qps / arr[-1])
        times = arr.tolist()
    order = issue_order(dataset_size, seeds[1])
    return [(i, next(order), t) for i, t in enumerate(times)]


def _traced(settings: ScenarioSettings, count: int, order: Iterator[int]) -> list[tuple[int, int, float]]:
    times = settings.arrival_times or []
    if count > len(times):
        raise ValueError(f"the arrival trace has {len(times)} arrivals; the run needs {count} "
                         "(ask for fewer requests, or give a longer trace)")
    if settings.duration_s is not None and times[count - 1] < settings.duration_s:
        raise ValueError(f"the arrival trace's first {count} arrivals span {times[count - 1]:.1f} s, less than "
                         f"duration_s {settings.duration_s:g}")
    return [(i, next(order), t) for i, t in enumerate(times[:count])]

def _shares(total: int, parts: int) -> list[int]:
    return [total // parts + (1 if w < total % parts else 0) for w in range(parts)]


def plan_jobs(settings: ScenarioSettings, dataset_size: int) -> tuple[list[Job], list[str]]:
    """Split the scenario over ``settings.workers`` processes; notes say where fewer were used."""
    notes: list[str] = []
    items = schedule_for(settings, dataset_size)
    workers = settings.workers
    drive = ScenarioKind.get(settings.kind).drive
    if drive == "one_at_a_time":
        if workers > 1:
            notes.append(f"{settings.kind} keeps one request outstanding: it runs in one process (workers=1)")
        workers, loops = 1, [1]
    elif drive == "closed_loop":
        concurrency = settings.concurrency
        assert concurrency is not None  # ScenarioSettings refuses a closed loop without concurrency >= 1
        workers = min(workers, concurrency)
        loops = _shares(concurrency, workers)
    else:
        assert items is not None  # schedule_for draws a schedule for every open-loop drive
        workers = max(1, min(workers, len(items), settings.max_connections or workers))
        loops = [0] * workers
    caps = (_shares(settings.max_connections, workers) if settings.max_connections and items is not None
            else [None] * workers)
    warm_order = issue_order(dataset_size, scenario_seeds(settings.seed)[2])
    warm = [(i, next(warm_order)) for i in range(settings.warmup_requests)]
    jobs = [Job(worker=w, items=items[w::workers] if items is not None else None, loops=loops[w],
                max_connections=caps[w], warmup=warm[w::workers], dataset_size=dataset_size,
                replay=settings.replay) for w in range(workers)]
    return jobs, notes


def _check_inputs(endpoint: Endpoint, requests: Sequence[Request]) -> None:
    if not requests:
        raise ValueError("the dataset is empty")
    if endpoint.api == "chat" and any(not isinstance(r.prompt, str) for r in requests):
        raise ValueError("the chat API needs text prompts; use api='completions' for token-id datasets")


def _raise_fd_limit() -> None:
    """Thousands of concurrent connections need thousands of descriptors; the soft limit is often 1024."""
    try:
        import resource  # noqa: PLC0415 — POSIX only: absent on Windows (the ImportError below)

        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        if hard == resource.RLIM_INFINITY or soft < hard:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard if hard != resource.RLIM_INFINITY else 1 << 20, hard))
    except (ImportError, ValueError, OSError):
        pass


async def _execute_all(endpoint: Endpoint, requests: Sequence[Request], settings: ScenarioSettings,
                       jobs: list[Job], deadline: float) -> tuple[list[JobResult], list[str]]:
    seeds = scenario_seeds(settings.seed)
    multiple = len(requests) if settings.equal_issue else 1
    closed = jobs[0].items is None
    if len(jobs) == 1:
        positions = Positions(_count(settings, len(requests)), settings.duration_s, multiple) if closed else None

        async def start() -> float:
            progress.emit("measuring")  # the warm-up is done
            return time.perf_counter()

        result = await execute(endpoint, requests, jobs[0], positions, seeds[1], deadline, settings.timeout_s, start)
        return [result], []
    positions = (Positions(_count(settings, len(requests)), settings.duration_s, multiple,
                           ctx=multiprocessing.get_context("spawn")) if closed else None)
    outcome = await asyncio.get_running_loop().run_in_executor(
        None, run_in_workers, endpoint, requests, jobs, positions, seeds[1], deadline, settings.timeout_s)
    return outcome.results, outcome.problems


async def run_scenario(endpoint: Endpoint, requests: Sequence[Request], settings: ScenarioSettings
                       ) -> ScenarioResult:
    """Run one scenario at one load level and return its records, summary and verdict."""
    _check_inputs(endpoint, requests)
    _raise_fd_limit()
    if settings.ignore_eos is not None:
        requests = [r if r.ignore_eos == settings.ignore_eos else replace(r, ignore_eos=settings.ignore_eos)
                    for r in requests]
    progress.emit("level_start", settings=settings, dataset_size=len(requests))  # before the clock starts
    deadline = time.perf_counter() + settings.timeout_s
    jobs, notes = plan_jobs(settings, len(requests))
    # Objects alive now live for the whole run: freezing them keeps GC pauses out of the timings.
    gc.collect()
    gc.freeze()
    try:
        results, problems = await _execute_all(endpoint, requests, settings, jobs, deadline)
    finally:
        gc.unfreeze()

    warm = sorted((r for res in results for r in res.warmup), key=lambda r: r.index)
    records = sorted((r for res in results for r in res.records), key=lambda r: r.index)
    timed_out = any(res.timed_out for res in results)
    duration = max((res.end for res in results), default=0.0)
    cut = sum(1 for r in records if r.status == "timeout" and r.error.startswith("scenario timeout"))
    all_records = warm + records
    summary = summarize(all_records, duration, settings.ttft_limit_ms, settings.tpot_limit_ms, settings.num_gpus)
    judged = verdict(all_records, settings, summary=summary)
    summary.update(judged.numbers)
    summary["scenario_timed_out"] = float(timed_out)
    summary["workers_used"] = len(jobs)
    notes = notes + list(judged.notes)
    reasons = list(judged.reasons) + problems
    if timed_out:
        notes.insert(0, f"scenario stopped at its {settings.timeout_s:g} s timeout; {cut} outstanding "
                        f"requests were recorded as timeout")
    recorded = asdict(settings)
    recorded.update(endpoint=endpoint.describe(), dataset_size=len(requests), workers_used=len(jobs),
                    prompt_format=prompt_format_of(requests),
                    pacer=next((res.pacer for res in results if res.pacer), ""), event_loop=loop_factory()[1],
                    # records' times are seconds since this time.perf_counter() value (CLOCK_MONOTONIC on
                    # Linux): it lines them up with other logs of the same machine (server traces, ...)
                    t0_perf_counter=next((res.t0 for res in results if res.t0 is not None), None))
    progress.emit("level_done", settings=settings, summary=summary, valid=not reasons)
    return ScenarioResult(scenario=settings.kind, settings=recorded, records=all_records, duration_s=duration,
                          summary=summary, valid=not reasons, invalid_reasons=reasons, notes=notes)


def run(endpoint: Endpoint, requests: Sequence[Request], settings: ScenarioSettings) -> ScenarioResult:
    """Synchronous :func:`run_scenario` on a fresh event loop (uvloop when installed; not from inside a
    running loop)."""
    return run_loop(run_scenario(endpoint, requests, settings))


def records_frame(records: Sequence[RequestRecord]) -> pd.DataFrame:
    """One row per request: raw times (s since t0), derived latencies (ms), tokens, status, chunk trace."""
    rows = []
    for r in records:
        rows.append({
            "index": r.index, "sample": r.sample, "warmup": r.warmup, "status": r.status, "error": r.error,
            "scheduled_s": r.scheduled, "sent_s": r.sent, "first_byte_s": r.first_byte, "done_s": r.done,
            "ttft_ms": ttft_ms(r), "tpot_ms": tpot_ms(r), "e2e_ms": e2e_ms(r),
            "ttft_from_send_ms": ttft_from_send_ms(r), "schedule_lag_ms": schedule_lag_ms(r),
            "input_tokens": r.input_tokens, "output_tokens": r.output_tokens,
            "expected_output_tokens": r.expected_output_tokens, "token_count_source": r.token_count_source,
            "ignore_eos": r.ignore_eos, "worker": r.worker,
            "num_chunks": len(r.chunks),
            "chunk_t": [c.t for c in r.chunks], "chunk_tokens": [c.tokens for c in r.chunks],
        })
    columns = ["index", "sample", "warmup", "status", "error", "scheduled_s", "sent_s", "first_byte_s", "done_s",
               "ttft_ms", "tpot_ms", "e2e_ms", "ttft_from_send_ms", "schedule_lag_ms", "input_tokens",
               "output_tokens", "expected_output_tokens", "token_count_source", "ignore_eos", "worker",
               "num_chunks", "chunk_t", "chunk_tokens"]
    frame = pd.DataFrame(rows, columns=columns)
    for col in ("sent_s", "first_byte_s", "done_s", "ttft_ms", "tpot_ms", "e2e_ms", "ttft_from_send_ms",
                "schedule_lag_ms"):
        frame[col] = frame[col].astype("float64")  # None → NaN, one dtype whatever the statuses
    return frame


def write_records(records: Sequence[RequestRecord], path: str | Path) -> Path:
    """Per-request records as Parquet (``.parquet``) or CSV (anything else; chunk traces as JSON text)."""
    return write_frame(records_frame(records), path)


def write_frame(frame: pd.DataFrame, path: str | Path) -> Path:
    """A records frame as Parquet (``.parquet``) or CSV (anything else; chunk traces as JSON text)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.suffix == ".parquet":
        frame.to_parquet(path, index=False)
    else:
        frame = frame.assign(**{col: frame[col].map(json.dumps) for col in ("chunk_t", "chunk_tokens")})
        frame.to_csv(path, index=False)
    return path


def read_records(path: str | Path) -> list[RequestRecord]:
    """The records :func:`write_records` wrote (CSV, gzipped CSV or Parquet), so a finished run can be judged
    again; columns it lacks (an older or trimmed file) take the record's defaults."""
    path = Path(path)
    frame = pd.read_parquet(path) if path.suffix == ".parquet" else pd.read_csv(path, keep_default_na=False,
                                                                                 na_values=[""])
    names = set(frame.columns)

    def opt(v: float | None) -> float | None:
        return None if v is None or v != v else float(v)  # NaN → None

    def trace(row: dict) -> list[Chunk]:
        if "chunk_t" not in names:
            return []
        ts, tokens = row["chunk_t"], row["chunk_tokens"]
        ts, tokens = (json.loads(ts), json.loads(tokens)) if isinstance(ts, str) else (ts, tokens)
        return [Chunk(float(t), int(k)) for t, k in zip(ts, tokens)]

    fields = {"input_tokens": int, "output_tokens": int, "expected_output_tokens": int, "worker": int,
              "error": str, "token_count_source": str}
    out = []
    for row in frame.to_dict("records"):
        extra = {k: cast(row[k]) for k, cast in fields.items() if k in names and row[k] == row[k]}
        if "ignore_eos" in names and row["ignore_eos"] in (True, False, "True", "False"):
            extra["ignore_eos"] = row["ignore_eos"] in (True, "True")
        out.append(RequestRecord(
            index=int(row["index"]), sample=int(row["sample"]), scheduled=float(row["scheduled_s"]),
            sent=opt(row.get("sent_s")), first_byte=opt(row.get("first_byte_s")), done=opt(row.get("done_s")),
            chunks=trace(row), status=str(row["status"]), warmup=row.get("warmup") in (True, "True"), **extra))
    return out
