"""Executing a scenario's load: one event loop per process, in this process or in N worker processes.

:mod:`~servetune.loadgen.scenarios` decides *what* to send (a precomputed schedule for offline/server/
interactive, a closed loop for single_stream/concurrency); this module sends it and returns the records.

- A :class:`Job` is one process's share: its slice of the schedule (``items``), or how many closed-loop
  senders it runs (``loops``), its share of ``max_connections`` and of the warmup.
- :func:`execute` runs a job on the current event loop with one shared aiohttp session, a
  :class:`~servetune.loadgen.pacer.Pacer` for sub-millisecond send times, request bodies encoded before the
  run, and everything bounded by the scenario deadline.
- :func:`run_in_workers` starts one ``spawn``-ed process per job. Each opens its own loop and session,
  sends its warmup share, reports ready, and waits for the parent's ``t0``: an absolute
  ``time.perf_counter()`` value. On Linux that clock is the system-wide CLOCK_MONOTONIC, so every worker
  measures on the same origin and the merged records compare as if one process had sent them. Closed-loop
  workers draw issue positions from one shared counter (:class:`Positions`), so equal issue and the stop
  rule hold across processes. Records come back to the parent through a pipe.

This module imports neither pandas nor the optimizer, so a worker starts in a fraction of a second.
"""
from __future__ import annotations

import asyncio
import gc
import math
import multiprocessing
import time
import traceback
from dataclasses import dataclass, field, replace
from typing import Any, Awaitable, Callable, Coroutine, Iterator, Mapping, Sequence

import numpy as np

from servetune.loadgen.client import Clock, encode_body, open_session, request_headers, run_loop, send
from servetune.loadgen.datasets import SAFE_ID_LOW
from servetune.loadgen.endpoint import Endpoint
from servetune.loadgen.pacer import Pacer
from servetune.loadgen.records import Request, RequestRecord

UNFINISHED = ("pending", "cancelled")  # statuses a scenario timeout turns into "timeout"
START_MARGIN_S = 0.1  # workers: t0 lies this far ahead of the go message, so every worker waits for it
RESULT_GRACE_S = 15.0  # workers: how long past the deadline the parent waits for their records


def issue_order(dataset_size: int, seed: int) -> Iterator[int]:
    """Sample indices in equal-issue order: whole seeded permutations of the dataset, back to back."""
    rng = np.random.default_rng(seed)
    while True:
        yield from (int(i) for i in rng.permutation(dataset_size))


class Order:
    """Position → sample of the equal-issue order, materialised as far as asked (closed-loop scenarios)."""

    def __init__(self, dataset_size: int, seed: int) -> None:
        self._it = issue_order(dataset_size, seed)
        self._seq: list[int] = []

    def __getitem__(self, position: int) -> int:
        while len(self._seq) <= position:
            self._seq.append(next(self._it))
        return self._seq[position]


def warmup_variant(req: Request) -> Request:
    """The same work behind one more first token, so it shares no prefix-cache block with ``req``.

    Prepended, not substituted: the token that makes each load level's prompts distinct
    (:func:`~servetune.loadgen.search.level_variant`) is the first one, and substituting it made every
    level's warm-up the same prompts (cache hits from the second level on, measured on H200s).
    """
    if isinstance(req.prompt, str):
        return replace(req, prompt="warmup " + req.prompt, input_tokens=req.input_tokens + 1)
    first = SAFE_ID_LOW - 1 if req.prompt[0] != SAFE_ID_LOW - 1 else SAFE_ID_LOW - 2
    return replace(req, prompt=[first, *req.prompt], input_tokens=req.input_tokens + 1)


# Reissue markers: the digits of the reissue count in base REPEAT_BASE, as ids from REPEAT_TOKEN_LOW up (below
# SAFE_ID_LOW, where the random datasets draw no ids without a tokenizer; a prompt with a marker is longer than
# the sample, so it never equals another sample's prompt either way).
REPEAT_TOKEN_LOW = 100
REPEAT_BASE = SAFE_ID_LOW - 3 - REPEAT_TOKEN_LOW


def _repeat_marker(repeat: int) -> list[int]:
    digits = []
    while repeat:
        repeat, d = divmod(repeat, REPEAT_BASE)
        digits.append(REPEAT_TOKEN_LOW + d)
    return digits[::-1]


def repeat_variant(req: Request, repeat: int) -> Request:
    """A sample's ``repeat``-th reissue (0: the sample itself): the same work behind a marker no other issue
    carries, so a scenario that sends more requests than its dataset holds sends no prompt twice (a resent
    prompt is a prefix-cache hit, whose prefill the server skips). A text prompt gets a word, a token-id
    prompt one or two tokens."""
    if repeat <= 0:
        return req
    if isinstance(req.prompt, str):
        return replace(req, prompt=f"R{repeat} {req.prompt}", input_tokens=req.input_tokens + 1)
    marker = _repeat_marker(repeat)
    return replace(req, prompt=[*marker, *req.prompt], input_tokens=req.input_tokens + len(marker))


class Positions:
    """Issue positions for closed-loop senders, in one process or shared by many.

    ``take(now)`` returns the next position, or None once the stop rule holds: at least ``need`` issued,
    the last issue at or after ``duration_s`` (LoadGen's SingleStream clock), and, with ``multiple`` > 1,
    a whole number of dataset passes (equal issue). Once it says stop, it says so to every sender.
    """

    def __init__(self, need: int, duration_s: float | None, multiple: int = 1, ctx: Any = None) -> None:
        self.need, self.duration_s, self.multiple = need, duration_s, max(multiple, 1)
        if ctx is None:
            self._state: Any = [0.0, 0.0, -math.inf]  # next position, stopped, last issue time
            self._lock = None
        else:
            self._state = ctx.RawArray("d", [0.0, 0.0, -math.inf])
            self._lock = ctx.Lock()

    def take(self, now: float) -> int | None:
        if self._lock is None:
            return self._take(now)
        with self._lock:
            return self._take(now)

    def _take(self, now: float) -> int | None:
        st = self._state
        if st[1]:
            return None
        p = int(st[0])
        if p >= self.need and (self.duration_s is None or st[2] >= self.duration_s) and p % self.multiple == 0:
            st[1] = 1.0
            return None
        st[0] = float(p + 1)
        st[2] = max(st[2], now)
        return p


@dataclass
class Job:
    """One process's share of a scenario."""

    worker: int
    items: list[tuple[int, int, float]] | None  # (index, sample, scheduled s) — offline/server/interactive
    loops: int = 0  # closed-loop senders (single_stream, concurrency); used when items is None
    max_connections: int | None = None
    warmup: list[tuple[int, int]] = field(default_factory=list)  # (index, sample)
    dataset_size: int = 0  # samples in the whole dataset: issue index // dataset_size is a sample's reissue count
    replay: bool = False  # a reissued sample sends its prompt again (a workload that measures the prefix cache)

    def repeat(self, index: int) -> int:
        """How many times the sample at issue position ``index`` was issued before (0 when replaying)."""
        return 0 if self.replay or self.dataset_size < 1 else index // self.dataset_size


@dataclass
class JobResult:
    warmup: list[RequestRecord]
    records: list[RequestRecord]
    timed_out: bool
    end: float  # seconds since t0 when the job ended
    pacer: str = ""
    t0: float | None = None  # the absolute perf_counter origin of the records' times


class _Issuer:
    """Sends requests through the shared session, respecting ``max_connections`` when set."""

    def __init__(self, session: Any, endpoint: Endpoint, max_connections: int | None) -> None:
        self.session = session
        self.endpoint = endpoint
        self.headers = request_headers(endpoint)
        self.slots = asyncio.Semaphore(max_connections) if max_connections else None

    async def __call__(self, req: Request, rec: RequestRecord, clock: Clock, payload: bytes | None) -> None:
        if self.slots is None:
            await send(self.session, self.endpoint, req, rec, clock, payload, self.headers)
            return
        async with self.slots:
            await send(self.session, self.endpoint, req, rec, clock, payload, self.headers)


async def _bounded(issue: Callable[[set[asyncio.Task]], Coroutine[Any, Any, None]], deadline: float) -> bool:
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
        while tasks:  # closed-loop senders finish on their own; scheduled requests too
            _, pending = await asyncio.wait(set(tasks), timeout=max(0.0, deadline - time.perf_counter()))
            if pending:
                return True
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


def mark_timeouts(records: Sequence[RequestRecord], now: float, timeout_s: float) -> int:
    hit = 0
    for r in records:
        if r.status in UNFINISHED:
            r.status, r.error = "timeout", f"scenario timeout ({timeout_s:g} s) with the request outstanding"
            r.done = now if r.done is None else r.done
            hit += 1
    return hit


async def _warmup(issuer: _Issuer, requests: Mapping[int, Request] | Sequence[Request], job: Job,
                  deadline: float, timeout_s: float) -> list[RequestRecord]:
    clock = Clock()
    records = [RequestRecord(index=i, sample=s, scheduled=0.0, warmup=True) for i, s in job.warmup]

    async def issue(tasks: set[asyncio.Task]) -> None:
        for rec in records:
            req = warmup_variant(repeat_variant(requests[rec.sample], job.repeat(rec.index)))
            _spawn(tasks, issuer(req, rec, clock, None))

    if await _bounded(issue, deadline):
        mark_timeouts(records, clock(), timeout_s)
    return records


def _payloads(endpoint: Endpoint, requests: Mapping[int, Request] | Sequence[Request],
              job: Job) -> dict[int, bytes]:
    """Bodies of the samples' first issues, encoded before the run, so no JSON encoding sits between a
    schedule time and its send. A reissue's body (one per run: it is unique) is encoded when the issue loop
    reaches it, before it waits for that request's time."""
    samples = ({s for i, s, _ in job.items if job.repeat(i) == 0} if job.items is not None
               else (requests.keys() if isinstance(requests, Mapping) else range(len(requests))))
    return {s: encode_body(endpoint, requests[s]) for s in samples}


async def execute(endpoint: Endpoint, requests: Mapping[int, Request] | Sequence[Request], job: Job,
                  positions: Positions | None, order_seed: int, deadline: float, timeout_s: float,
                  start: Callable[[], Awaitable[float | None]]) -> JobResult:
    """Run ``job`` on the running loop. ``start`` is awaited after the warmup and returns t0 (an absolute
    ``perf_counter`` time, possibly in the future), or None to abandon the run."""
    payloads = _payloads(endpoint, requests, job)
    order = Order(len(requests), order_seed) if job.items is None else None

    def body(index: int, sample: int) -> tuple[Request, bytes]:
        repeat = job.repeat(index)
        if repeat == 0:
            return requests[sample], payloads[sample]
        req = repeat_variant(requests[sample], repeat)
        return req, encode_body(endpoint, req)

    records: list[RequestRecord] = []
    async with open_session() as session:
        issuer = _Issuer(session, endpoint, job.max_connections)
        warm = await _warmup(issuer, requests, job, deadline, timeout_s) if job.warmup else []
        t0 = await start()
        if t0 is None:
            return JobResult(warm, records, False, 0.0)
        clock = Clock(t0)
        pacer = Pacer()

        async def scheduled(tasks: set[asyncio.Task]) -> None:
            assert job.items is not None  # run only for a job with a schedule
            for index, sample, at in job.items:
                req, payload = body(index, sample)
                if clock() < at:
                    await pacer.until(t0 + at)
                rec = RequestRecord(index=index, sample=sample, scheduled=at)
                records.append(rec)
                _spawn(tasks, issuer(req, rec, clock, payload))

        async def sender() -> None:
            assert positions is not None and order is not None  # a closed loop: positions and order were made
            while True:
                p = positions.take(clock())
                if p is None:
                    return
                sample = order[p]
                req, payload = body(p, sample)
                rec = RequestRecord(index=p, sample=sample, scheduled=clock())
                records.append(rec)
                await issuer(req, rec, clock, payload)

        async def closed(tasks: set[asyncio.Task]) -> None:
            await pacer.until(t0)
            for _ in range(job.loops):
                _spawn(tasks, sender())

        thresholds = gc.get_threshold()
        # No full collections while measuring: their pause grows with the records kept (tens of ms at
        # 10^5 objects) and lands in whatever request is in flight. Young generations still collect.
        gc.set_threshold(thresholds[0], thresholds[1], 1 << 30)
        try:
            timed_out = await _bounded(scheduled if job.items is not None else closed, deadline)
        finally:
            gc.set_threshold(*thresholds)
            pacer.close()
        end = clock()
        if timed_out:
            mark_timeouts(records, end, timeout_s)
    for r in (*warm, *records):
        r.worker = job.worker
    return JobResult(warm, records, timed_out, end, pacer.kind, t0)


# --- worker processes -----------------------------------------------------------------------------------

def _worker_main(conn: Any, endpoint: Endpoint, requests: Any, job: Job, positions: Positions | None,
                 order_seed: int, deadline: float, timeout_s: float) -> None:
    async def start() -> float | None:
        conn.send(("ready", None))
        return await asyncio.get_running_loop().run_in_executor(None, conn.recv)

    try:
        gc.collect()
        gc.freeze()
        result = run_loop(execute(endpoint, requests, job, positions, order_seed, deadline, timeout_s, start))
        conn.send(("done", result))
    except BaseException:  # noqa: BLE001 - report, never die silently
        try:
            conn.send(("error", traceback.format_exc()))
        except (OSError, ValueError):
            pass
    finally:
        conn.close()


def _receive(conn: Any, proc: Any, until: float) -> tuple[str, Any]:
    while True:
        if conn.poll(0.05):
            try:
                kind, detail = conn.recv()
                if kind == "error":  # a traceback: its last line says what went wrong
                    detail = detail.strip().splitlines()[-1]
                return kind, detail
            except (EOFError, OSError):
                return "died", f"exit code {proc.exitcode}"
        if not proc.is_alive() and not conn.poll(0):
            return "died", f"exit code {proc.exitcode}"
        if time.perf_counter() > until:
            return "late", "no answer in time"


@dataclass
class WorkersOutcome:
    results: list[JobResult]
    problems: list[str]  # workers that failed: their share of the run is missing or marked client_error


def run_in_workers(endpoint: Endpoint, requests: Sequence[Request], jobs: Sequence[Job],
                   positions: Positions | None, order_seed: int, deadline: float,
                   timeout_s: float) -> WorkersOutcome:
    """Run each job in its own spawned process on one shared t0; return their results (see module doc)."""
    ctx = multiprocessing.get_context("spawn")
    started = []
    for job in jobs:
        here, there = ctx.Pipe()
        if job.items is not None:  # ship only the samples this worker sends
            needed = {s for _, s, _ in job.items} | {s for _, s in job.warmup}
            share: Any = {s: requests[s] for s in needed}
        else:
            share = list(requests)
        proc = ctx.Process(target=_worker_main, name=f"servetune-loadgen-{job.worker}", daemon=True,
                           args=(there, endpoint, share, job, positions, order_seed, deadline, timeout_s))
        proc.start()
        there.close()
        started.append((job, proc, here))

    problems: list[str] = []
    failed: set[int] = set()
    live = []
    for job, proc, conn in started:
        kind, detail = _receive(conn, proc, deadline)
        if kind == "ready":
            live.append((job, proc, conn))
        else:
            failed.add(job.worker)
            problems.append(f"load-generator worker {job.worker} failed before the run ({kind}): {detail}")
    t0 = time.perf_counter() + START_MARGIN_S
    for _, _, conn in live:
        try:
            conn.send(t0)
        except OSError:
            pass
    results: list[JobResult] = []
    for job, proc, conn in live:
        kind, detail = _receive(conn, proc, deadline + RESULT_GRACE_S)
        if kind == "done":
            results.append(detail)
        else:
            failed.add(job.worker)
            problems.append(f"load-generator worker {job.worker} failed during the run ({kind}): {detail}")
    for job, proc, conn in started:
        conn.close()
        proc.join(timeout=2)
        if proc.is_alive():
            proc.terminate()
            proc.join(timeout=2)
    for job, _, _ in started:  # a failed worker's scheduled requests are accounted for, not lost
        if job.worker in failed and job.items:
            recs = [RequestRecord(index=i, sample=s, scheduled=at, status="client_error", worker=job.worker,
                                  error="the load-generator worker process sending it failed")
                    for i, s, at in job.items]
            results.append(JobResult([], recs, False, 0.0))
    return WorkersOutcome(results, problems)
