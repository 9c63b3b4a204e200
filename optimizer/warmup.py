"""Warm-up that covers the shapes a launch's levels will produce, before the first of them is measured.

An engine compiles kernels for the shapes it meets: a Triton MoE kernel per token-count bucket, FlashInfer
ops per batch layout. A level that meets a shape first pays the compile in its latencies (a fused_moe JIT
gave a 4 req/s level p99 TTFT 2.8 s on an H200 that serves 12 req/s once warm: issue 15). So every launch,
the baseline's as every candidate's, is warmed in *rounds*: a concurrency ramp 1, 2, 4, ... up to the most
requests a level keeps in flight (:func:`level_peak`, capped by the engine's batch limit), each step
sending that many requests at once, with the dataset's prompt lengths (the prefill shapes) and a short output
(:data:`OUTPUT_TOKENS`: decode shapes depend on the batch, not on how long it runs). Rounds repeat until
one writes no compilation line to the engine log, or ``max_s`` is spent; every round is an audit window
(the engine's counters and log lines are recorded with it).

Warm-up prompts are never replayed by a measured level: each carries a first token no level and no
in-level warm-up sends (:func:`prewarm_variant`), and no warm-up prompt is sent twice.
"""
from __future__ import annotations

import asyncio
import math
import time
from dataclasses import dataclass, field, replace
from typing import Any, Sequence

from servetune.loadgen import progress
from servetune.loadgen.client import Clock, open_session, run_loop, send
from servetune.loadgen.datasets import SAFE_ID_LOW
from servetune.loadgen.endpoint import Endpoint
from servetune.loadgen.records import Request, RequestRecord
from servetune.loadgen.scenario_kinds import ScenarioKind
from servetune.loadgen.search import LEVEL_TOKEN_BASE, concurrency_levels

OUTPUT_TOKENS = 32  # output budget of a warm-up request (its decode steps run at the step's batch size)
MAX_ROUNDS = 20  # a guard: rounds stop at the first clean one or at max_s long before this
PREWARM_TOKEN = SAFE_ID_LOW - 2  # first token of every launch warm-up prompt; see prewarm_variant
KEPT_LINES = 5  # compile lines kept per round in the record (all are counted)


def prewarm_variant(req: Request, pass_no: int) -> Request:
    """``req`` behind two tokens no measured prompt starts with: PREWARM_TOKEN (a level's prompts start
    with a level token below it, an in-level warm-up's with SAFE_ID_LOW - 1) and one per pass over the
    dataset, so a warm-up that cycles the dataset never sends a prompt twice. Text prompts get a word."""
    if isinstance(req.prompt, str):
        prompt: str | list[int] = f"prewarm{pass_no} {req.prompt}"
        extra = 1
    else:
        prompt = [PREWARM_TOKEN, LEVEL_TOKEN_BASE - (pass_no % (LEVEL_TOKEN_BASE - 1)), *req.prompt]
        extra = 2
    return replace(req, prompt=prompt, input_tokens=req.input_tokens + extra,
                   max_tokens=min(req.max_tokens, OUTPUT_TOKENS))


def level_peak(settings: dict[str, Any], dataset_size: int, max_qps: dict[str, Any] | None, gpus: int,
               max_tokens: int = 0) -> int:
    """The most requests one level of this scenario keeps in flight while it can still meet its SLA: its
    batch grows no larger. At most the level's request count; for an arrival rate with latency limits, at
    most rate × the longest request that meets them (Little's law: TTFT limit + output tokens × TPOT
    limit), since a rate that holds more has missed the SLA anyway."""
    found = ScenarioKind.find(settings.get("kind"))
    drive = found.drive if found else None
    cap = settings.get("max_connections") or None
    if drive == "one_at_a_time":
        return 1
    if drive == "closed_loop":
        c = settings.get("concurrency")
        return int(max(c) if isinstance(c, list) else c or 1)
    n = settings.get("num_requests") or 0
    if drive == "all_at_once":
        n = n or dataset_size
    else:
        qps = settings.get("qps")
        if max_qps:
            qps = max_qps["hi"] * (gpus if max_qps.get("per_gpu") else 1)
        qps = max(qps) if isinstance(qps, list) else qps
        n = max(n, int(qps * (settings.get("duration_s") or 0)) + 1) if qps else n or dataset_size
        ttft, tpot = settings.get("ttft_limit_ms"), settings.get("tpot_limit_ms")
        if qps and ttft and tpot and max_tokens:
            n = min(n, math.ceil(qps * (ttft + max_tokens * tpot) / 1000.0))
    return max(1, int(min(n, cap) if cap else n))


def ramp_top(scenarios: Sequence[Any], requests: Sequence[Request], gpus: int, engine_cap: int | None,
             given: int | None = None) -> int:
    """Top of the warm-up ramp: as given, else the largest level peak over the scenarios, capped by the
    engine's batch limit."""
    if given:
        return int(given)
    longest = max((r.max_tokens for r in requests), default=0)
    top = max((level_peak(sc.settings, len(requests), sc.max_qps, gpus, longest) for sc in scenarios), default=1)
    return max(1, min(top, int(engine_cap)) if engine_cap else top)


@dataclass
class Warmer:
    """Warms one launch; :meth:`warm` before its first level, :meth:`rewarm` before an audit re-run."""

    endpoint: Endpoint
    requests: Sequence[Request]
    auditor: Any  # loadgen.audit.Auditor: each round is one of its windows
    top: int
    max_s: float = 300.0
    _cursor: int = 0
    history: list[dict[str, Any]] = field(default_factory=list)

    def _next(self, n: int) -> list[Request]:
        out = []
        for _ in range(n):
            pass_no, i = divmod(self._cursor, len(self.requests))
            out.append(prewarm_variant(self.requests[i], pass_no))
            self._cursor += 1
        return out

    def _round(self, deadline: float) -> tuple[list[list[RequestRecord]], dict[str, Any]]:
        steps: list[list[RequestRecord]] = []

        async def ramp() -> None:
            # one event loop and session for the whole round: a scenario run per step would pay its setup
            # (a full garbage collection among it) at every step
            async with open_session() as session:
                clock = Clock()
                for c in concurrency_levels(self.top):
                    left = deadline - time.monotonic()
                    if left <= 0:
                        break
                    reqs = self._next(c)
                    recs = [RequestRecord(index=self._cursor - c + i, sample=i, scheduled=clock(), warmup=True)
                            for i in range(c)]
                    steps.append(recs)
                    sends = [asyncio.ensure_future(send(session, self.endpoint, q, r, clock))
                             for q, r in zip(reqs, recs)]
                    _, late = await asyncio.wait(sends, timeout=max(left, 1.0))
                    for t in late:  # past the warm-up bound: cancelled, recorded as such
                        t.cancel()
                    if late:
                        await asyncio.gather(*late, return_exceptions=True)
                        break

        _, audit = self.auditor.window(lambda: run_loop(ramp()), lambda _: [r for st in steps for r in st],
                                       kind="warmup")
        audit.pop("_events", None)
        return steps, audit

    def warm(self, why: str = "before the first measured level") -> dict[str, Any]:
        """Rounds of the ramp until one compiles nothing (or ``max_s``); what they did, for the trial record."""
        t0 = time.monotonic()
        deadline = t0 + self.max_s
        rounds: list[dict[str, Any]] = []
        stopped = ""
        checks = self.auditor.probe.has_log
        while True:
            r0 = time.monotonic()
            # a round can take minutes (a cold MoE engine compiles through the first ones): say which it is
            progress.emit("launch_warmup", why=why, round=len(rounds) + 1, top=self.top,
                          ends_by=time.time() + deadline - r0, compiles=[r["compile_lines"] for r in rounds])
            results, audit = self._round(deadline)
            log = audit.get("log") or {}
            compiles = [e for e in log.get("events", []) if e.get("invalidates")]
            n_compiles = int(log.get("invalidating", 0))
            records = [r for step in results for r in step]
            rounds.append({"round": len(rounds) + 1, "seconds": round(time.monotonic() - r0, 3),
                           "requests": len(records), "requests_ok": sum(1 for r in records if r.ok),
                           "steps": len(results), "compile_lines": n_compiles,
                           "lines": [e["line"] for e in compiles[:KEPT_LINES]], "server": audit.get("server")})
            if not checks:
                stopped = "one round: no engine log to tell whether it compiled anything"
                break
            if n_compiles == 0:
                stopped = f"round {len(rounds)} compiled nothing"
                break
            spent, last = time.monotonic() - t0, rounds[-1]["seconds"]
            if spent + last > self.max_s or len(rounds) >= MAX_ROUNDS:
                stopped = (f"the {self.max_s:g} s warm-up bound: round {len(rounds)} still compiled "
                           f"{n_compiles} kernel(s)")
                break
        out = {"why": why, "max_concurrency": self.top, "rounds": rounds, "clean": n_compiles == 0 and checks,
               "seconds": round(time.monotonic() - t0, 3), "requests": sum(r["requests"] for r in rounds),
               "compile_lines": sum(r["compile_lines"] for r in rounds), "stopped_because": stopped}
        self.history.append(out)
        progress.emit("launch_warmup_done", why=why, rounds=len(rounds), seconds=out["seconds"],
                      stopped_because=stopped)
        return out

    def rewarm(self, settings: Any = None) -> dict[str, Any]:
        return self.warm("before re-running a level whose audit failed")
