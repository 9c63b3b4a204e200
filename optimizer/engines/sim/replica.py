"""One data-parallel replica of the sim engine: its scheduler, and the loop that plays the scheduler's steps
out in real time on an absolute clock; :class:`JitEmulator` stalls steps the way a kernel JIT does."""
from __future__ import annotations

import asyncio
import logging

from servetune.optimizer.engines.sim.scheduler import Scheduler, SimRequest

log = logging.getLogger("servetune.sim")

# A step that starts this late after the previous one ended is not caught up on: the loop was starved,
# and bursting through the backlog would fake a faster GPU.
MAX_LAG_S = 0.05


class JitEmulator:
    """--emulate-jit: a kernel compiles the first time a step's token count falls in a new power-of-two
    bucket (as MoE GEMM configs are picked per token-count bucket), costing ``compile_s`` once and logging
    vLLM's jit_monitor warning, so warm-up coverage and the level audit can be exercised without a GPU.

    As vLLM 0.26 does, the warning is logged once per kernel name (``warning_once``): later buckets compile
    silently, unless ``verbose`` (vLLM's --jit-monitor-verbose), which logs every compile with its key."""

    def __init__(self, compile_s: float, kernel: str, verbose: bool = False):
        self.compile_s, self.kernel, self.verbose = compile_s, kernel, verbose
        self.seen: set[int] = set()

    def step(self, tokens: int) -> float:
        bucket = 1 << max(tokens - 1, 0).bit_length()
        if tokens <= 0 or bucket in self.seen:
            return 0.0
        if self.verbose:
            log.warning("Triton kernel JIT compilation during inference: %s (constexprs={BLOCK_SIZE_M=%d}; "
                        "key=%d). This causes a latency spike; consider extending warmup to cover this "
                        "shape/config.", self.kernel, min(bucket, 64), bucket)
        elif not self.seen:
            log.warning("Triton kernel JIT compilation during inference: %s. This causes a latency spike; "
                        "consider extending warmup to cover this shape/config.", self.kernel)
        self.seen.add(bucket)
        return self.compile_s


class Replica:
    """One data-parallel engine: a scheduler and the loop that plays its steps out in real time."""

    def __init__(self, index: int, sched: Scheduler, jit: JitEmulator | None = None):
        self.index = index
        self.sched = sched
        self.jit = jit
        self.wake = asyncio.Event()
        self.task: asyncio.Task | None = None

    def submit(self, req: SimRequest) -> None:
        self.sched.add(req)
        self.wake.set()

    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        sched = self.sched
        t_end = loop.time()
        idle = True
        while True:
            if not sched.has_work():
                self.wake.clear()
                await self.wake.wait()
                idle = True
                continue
            now = loop.time()
            start = now if idle or now - t_end > MAX_LAG_S else t_end
            res = sched.step()
            if res is None:  # queued work that cannot be scheduled: wait for a change rather than spin
                self.wake.clear()
                await self.wake.wait()
                idle = True
                continue
            idle = False
            t_end = start + res.duration_s
            if self.jit is not None:
                t_end += self.jit.step(int(res.batch.tokens))  # a scheduled step's counts are whole
            delay = t_end - loop.time()
            await asyncio.sleep(delay if delay > 0 else 0)
            for req, n in res.emitted:
                if not req.user.deliver(req, n):
                    sched.abort(req)
