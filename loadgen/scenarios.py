"""MLPerf-style scenarios: how requests are issued in time, and what one run returns.

- **offline**: every request is issued at t0 (bounded by ``max_connections`` when set; latency still counts
  from t0, so waiting for a connection slot is visible).
- **server** / **interactive**: Poisson arrivals at ``qps``. The whole schedule is drawn up front from a
  seeded generator as absolute offsets from t0, and the issue loop sleeps until each one. Latency is
  measured from the scheduled time, so a late issue loop or a full connection pool is charged to the
  result, never hidden (no coordinated omission); ``schedule_lag_*`` shows how late sends were.
  Interactive is the same code path with tighter limits, as in LoadGen.
- **single_stream**: one request outstanding; the next is issued when the previous completes.

Run length follows LoadGen: keep issuing until both ``num_requests`` and ``duration_s`` are met (by the
scheduled time of the last query for server/interactive, by its issue time for single_stream). Offline
issues ``num_requests`` (default: one pass over the dataset). Samples are taken in equal-issue order:
whole seeded permutations of the dataset, one after another; ``equal_issue=True`` also rounds the count
up to whole passes, as MLPerf's LLM rules require.

``warmup_requests`` are sent before t0 (their times are relative to the warmup's own start), drained,
and marked ``warmup`` so no metric sees them. Their prompts are altered in the first token (or word) so
they cannot pre-fill the prefix cache for the measured requests that reuse the same samples.

Everything is bounded by ``timeout_s``: when it expires, outstanding requests are cancelled and recorded
as ``timeout``. Nothing hangs on a server that never answers.
"""
from __future__ import annotations

import asyncio
import gc
import json
import math
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any, Awaitable, Callable, Coroutine, Iterator, Sequence

import numpy as np
import pandas as pd

from servetune.loadgen.client import Clock, open_session, send
from servetune.loadgen.datasets import SAFE_ID_LOW
from servetune.loadgen.endpoint import Endpoint
from servetune.loadgen.metrics import e2e_ms, schedule_lag_ms, summarize, tpot_ms, ttft_ms
from servetune.loadgen.records import Request, RequestRecord, ScenarioResult
from servetune.loadgen.validity import DEFAULT_MAX_ERROR_RATE, verdict

SCENARIOS = ("offline", "server", "interactive", "single_stream")
UNFINISHED = ("pending", "cancelled")  # statuses a scenario timeout turns into "timeout"


@dataclass
class ScenarioSettings:
    kind: str  # offline | server | interactive | single_stream
    qps: float | None = None  # Poisson arrival rate (server, interactive)
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

    def __post_init__(self) -> None:
        if self.kind not in SCENARIOS:
            raise ValueError(f"kind must be one of {SCENARIOS}, got {self.kind!r}")
        if self.kind in ("server", "interactive") and not (self.qps and self.qps > 0):
            raise ValueError(f"the {self.kind} scenario needs qps > 0")
        for name in ("duration_s", "num_requests", "max_connections"):
            value = getattr(self, name)
            if value is not None and value <= 0:
                raise ValueError(f"{name} must be > 0 or None, got {value}")
        if self.timeout_s <= 0 or self.warmup_requests < 0 or self.num_gpus < 1:
            raise ValueError("timeout_s must be > 0, warmup_requests >= 0 and num_gpus >= 1")
        if not 0.0 <= self.max_error_rate <= 1.0:
            raise ValueError(f"max_error_rate must be in [0, 1], got {self.max_error_rate}")


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


def scenario_seeds(seed: int) -> tuple[int, int, int]:
    """Independent seeds for the arrival schedule, the sample order and the warmup choice.

    Separate streams (as LoadGen's schedule/sample RNGs) so changing one never shifts the others.
    """
    schedule, sample, warmup = (int(s.generate_state(1)[0]) for s in np.random.SeedSequence(seed).spawn(3))
    return schedule, sample, warmup


def issue_order(dataset_size: int, seed: int) -> Iterator[int]:
    """Sample indices in equal-issue order: whole seeded permutations of the dataset, back to back."""
    rng = np.random.default_rng(seed)
    while True:
        yield from (int(i) for i in rng.permutation(dataset_size))


def _warmup_variant(req: Request) -> Request:
    """The same work with a different first token, so it shares no prefix-cache block with ``req``."""
    if isinstance(req.prompt, str):
        return replace(req, prompt="warmup " + req.prompt)
    first = SAFE_ID_LOW - 1 if req.prompt[0] != SAFE_ID_LOW - 1 else SAFE_ID_LOW - 2
    return replace(req, prompt=[first, *req.prompt[1:]])


class _Issuer:
    """Sends requests through the shared session, respecting ``max_connections`` when set."""

    def __init__(self, session: Any, endpoint: Endpoint, max_connections: int | None) -> None:
        self.session = session
        self.endpoint = endpoint
        self.slots = asyncio.Semaphore(max_connections) if max_connections else None

    async def __call__(self, req: Request, rec: RequestRecord, clock: Clock) -> None:
        if self.slots is None:
            await send(self.session, self.endpoint, req, rec, clock)
            return
        async with self.slots:
            await send(self.session, self.endpoint, req, rec, clock)


async def _bounded(issue: Callable[[set[asyncio.Task]], Awaitable[None]], deadline: float) -> bool:
    """Run an issue loop and the requests it spawns until all finish or ``deadline``; True if it expired.

    Whatever is still running at the deadline (or when the caller is cancelled) is cancelled and awaited,
    so no request outlives its scenario.
    """
    tasks: set[asyncio.Task] = set()
    issuer = asyncio.create_task(issue(tasks))
    try:
        done, _ = await asyncio.wait({issuer}, timeout=max(0.0, deadline - time.perf_counter()))
        if issuer not in done:
            return True
        issuer.result()  # a bug in an issue loop surfaces here, not as a silent short run
        if tasks:
            _, pending = await asyncio.wait(set(tasks), timeout=max(0.0, deadline - time.perf_counter()))
            return bool(pending)
        return False
    finally:
        leftovers = [t for t in (issuer, *tasks) if not t.done()]
        for t in leftovers:
            t.cancel()
        if leftovers:
            await asyncio.gather(*leftovers, return_exceptions=True)


def _spawn(tasks: set[asyncio.Task], coro: Coroutine[Any, Any, None]) -> None:
    task = asyncio.create_task(coro)
    tasks.add(task)  # the loop keeps only weak references to tasks
    task.add_done_callback(tasks.discard)


def _count(settings: ScenarioSettings, dataset_size: int) -> int:
    """Minimum request count. With only a duration, the duration decides (offline: one dataset pass)."""
    by_duration = settings.duration_s is not None and settings.kind != "offline"
    n = settings.num_requests or (1 if by_duration else dataset_size)
    return math.ceil(n / dataset_size) * dataset_size if settings.equal_issue else n


async def _warmup(issuer: _Issuer, requests: Sequence[Request], settings: ScenarioSettings, seed: int,
                  deadline: float) -> list[RequestRecord]:
    order = issue_order(len(requests), seed)
    clock = Clock()
    records = [RequestRecord(index=i, sample=next(order), scheduled=0.0, warmup=True)
               for i in range(settings.warmup_requests)]

    async def issue(tasks: set[asyncio.Task]) -> None:
        for rec in records:
            _spawn(tasks, issuer(_warmup_variant(requests[rec.sample]), rec, clock))

    if await _bounded(issue, deadline):
        _mark_timeouts(records, clock(), settings.timeout_s)
    return records


def _mark_timeouts(records: Sequence[RequestRecord], now: float, timeout_s: float) -> int:
    hit = 0
    for r in records:
        if r.status in UNFINISHED:
            r.status, r.error = "timeout", f"scenario timeout ({timeout_s:g} s) with the request outstanding"
            r.done = now if r.done is None else r.done
            hit += 1
    return hit


def _issue_loop(kind: str, issuer: _Issuer, requests: Sequence[Request], settings: ScenarioSettings,
                seeds: Sequence[int], clock: Clock, records: list[RequestRecord]
                ) -> Callable[[set[asyncio.Task]], Awaitable[None]]:
    order = issue_order(len(requests), seeds[1])

    def record(index: int, scheduled: float) -> tuple[Request, RequestRecord]:
        rec = RequestRecord(index=index, sample=next(order), scheduled=scheduled)
        records.append(rec)
        return requests[rec.sample], rec

    async def offline(tasks: set[asyncio.Task]) -> None:
        for i in range(_count(settings, len(requests))):
            _spawn(tasks, issuer(*record(i, 0.0), clock))

    async def server(tasks: set[asyncio.Task]) -> None:
        schedule = poisson_schedule(settings.qps, seeds[0], _count(settings, len(requests)),
                                    settings.duration_s, len(requests) if settings.equal_issue else 1)
        for i, at in enumerate(schedule.tolist()):
            while (delay := at - clock()) > 0:  # sleep can wake a hair early; never send before schedule
                await asyncio.sleep(delay)
            _spawn(tasks, issuer(*record(i, at), clock))

    async def single_stream(tasks: set[asyncio.Task]) -> None:
        need = _count(settings, len(requests))
        i = 0
        while i < need or (settings.duration_s is not None and records[-1].sent < settings.duration_s) \
                or (settings.equal_issue and i % len(requests)):
            await issuer(*record(i, clock()), clock)
            i += 1

    return {"offline": offline, "server": server, "interactive": server, "single_stream": single_stream}[kind]


def _check_inputs(endpoint: Endpoint, requests: Sequence[Request]) -> None:
    if not requests:
        raise ValueError("the dataset is empty")
    if endpoint.api == "chat" and any(not isinstance(r.prompt, str) for r in requests):
        raise ValueError("the chat API needs text prompts; use api='completions' for token-id datasets")


def _raise_fd_limit() -> None:
    """Thousands of concurrent connections need thousands of descriptors; the soft limit is often 1024."""
    try:
        import resource

        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        if hard == resource.RLIM_INFINITY or soft < hard:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard if hard != resource.RLIM_INFINITY else 1 << 20, hard))
    except (ImportError, ValueError, OSError):
        pass


async def run_scenario(endpoint: Endpoint, requests: Sequence[Request], settings: ScenarioSettings
                       ) -> ScenarioResult:
    """Run one scenario at one load level and return its records, summary and verdict."""
    _check_inputs(endpoint, requests)
    _raise_fd_limit()
    seeds = scenario_seeds(settings.seed)
    deadline = time.perf_counter() + settings.timeout_s
    records: list[RequestRecord] = []
    # Objects alive now live for the whole run: freezing them keeps GC pauses out of the timings.
    gc.collect()
    gc.freeze()
    try:
        async with open_session() as session:
            issuer = _Issuer(session, endpoint, settings.max_connections)
            warm = await _warmup(issuer, requests, settings, seeds[2], deadline) if settings.warmup_requests else []
            clock = Clock()  # t0: the measured phase starts here
            loop = _issue_loop(settings.kind, issuer, requests, settings, seeds, clock, records)
            timed_out = await _bounded(loop, deadline)
            duration = clock()
            cut = _mark_timeouts(records, duration, settings.timeout_s) if timed_out else 0
    finally:
        gc.unfreeze()

    all_records = warm + records
    summary = summarize(all_records, duration, settings.ttft_limit_ms, settings.tpot_limit_ms, settings.num_gpus)
    judged = verdict(all_records, settings, summary=summary)
    summary.update(judged.numbers)
    summary["scenario_timed_out"] = float(timed_out)
    notes = list(judged.notes)
    if timed_out:
        notes.insert(0, f"scenario stopped at its {settings.timeout_s:g} s timeout; {cut} outstanding "
                        f"requests were recorded as timeout")
    recorded = asdict(settings)
    recorded.update(endpoint=endpoint.describe(), dataset_size=len(requests))
    return ScenarioResult(scenario=settings.kind, settings=recorded, records=all_records, duration_s=duration,
                          summary=summary, valid=judged.valid, invalid_reasons=judged.reasons, notes=notes)


def run(endpoint: Endpoint, requests: Sequence[Request], settings: ScenarioSettings) -> ScenarioResult:
    """Synchronous :func:`run_scenario` on a fresh event loop (not from inside a running loop)."""
    return asyncio.run(run_scenario(endpoint, requests, settings))


def records_frame(records: Sequence[RequestRecord]) -> pd.DataFrame:
    """One row per request: raw times (s since t0), derived latencies (ms), tokens, status, chunk trace."""
    rows = []
    for r in records:
        rows.append({
            "index": r.index, "sample": r.sample, "warmup": r.warmup, "status": r.status, "error": r.error,
            "scheduled_s": r.scheduled, "sent_s": r.sent, "first_byte_s": r.first_byte, "done_s": r.done,
            "ttft_ms": ttft_ms(r), "tpot_ms": tpot_ms(r), "e2e_ms": e2e_ms(r),
            "schedule_lag_ms": schedule_lag_ms(r),
            "input_tokens": r.input_tokens, "output_tokens": r.output_tokens,
            "expected_output_tokens": r.expected_output_tokens, "token_count_source": r.token_count_source,
            "num_chunks": len(r.chunks),
            "chunk_t": [c.t for c in r.chunks], "chunk_tokens": [c.tokens for c in r.chunks],
        })
    columns = ["index", "sample", "warmup", "status", "error", "scheduled_s", "sent_s", "first_byte_s", "done_s",
               "ttft_ms", "tpot_ms", "e2e_ms", "schedule_lag_ms", "input_tokens", "output_tokens",
               "expected_output_tokens", "token_count_source", "num_chunks", "chunk_t", "chunk_tokens"]
    frame = pd.DataFrame(rows, columns=columns)
    for col in ("sent_s", "first_byte_s", "done_s", "ttft_ms", "tpot_ms", "e2e_ms", "schedule_lag_ms"):
        frame[col] = frame[col].astype("float64")  # None → NaN, one dtype whatever the statuses
    return frame


def write_records(records: Sequence[RequestRecord], path: str | Path) -> Path:
    """Per-request records as Parquet (``.parquet``) or CSV (anything else; chunk traces as JSON text)."""
    path = Path(path)
    frame = records_frame(records)
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.suffix == ".parquet":
        frame.to_parquet(path, index=False)
    else:
        for col in ("chunk_t", "chunk_tokens"):
            frame[col] = frame[col].map(json.dumps)
        frame.to_csv(path, index=False)
    return path
