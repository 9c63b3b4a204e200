"""Continuous batching, emulated: the part of an inference engine that decides what each step computes.

Pure Python with no clock and no asyncio, so the HTTP server drives it in real time and ``estimate.py``
drives it in virtual time with the same code. It imitates vLLM V1's scheduler:

* a step has a token budget (``max_batched_tokens``) shared by decodes (1 token each, 1 + drafts with
  speculation) and prompt chunks; running sequences are served first, in admission order, then waiting
  ones are admitted FCFS while there is budget, a ``max_concurrency`` slot and KV blocks;
* with chunked prefill off, a prompt must fit the budget whole and prefills get steps of their own,
  ahead of decodes (the older behaviour that makes inter-token latency spike when prompts arrive);
* KV is paged in blocks allocated as sequences grow. When a running sequence needs a block and none is
  free, the most recently admitted sequence is preempted (freed, re-queued first, recomputed later), so
  the cache is never over-allocated;
* prefix caching hashes full prompt blocks (chained, like vLLM) once they are computed; a new request
  reuses the longest cached prefix and skips its compute. Freed cached blocks stay reusable until a new
  allocation evicts them, least recently freed first.
"""
from __future__ import annotations

import random
from collections import OrderedDict, deque
from dataclasses import dataclass, field
from typing import Any, Sequence

from servetune.optimizer.engines.sim.config import MemoryPlan, SimConfig, build_roofline, memory_plan
from servetune.optimizer.perfmodel.hardware import GpuSpec
from servetune.optimizer.perfmodel.model_shapes import ModelShape
from servetune.optimizer.perfmodel.roofline import StepBatch, StepTime

WAITING, RUNNING, FINISHED = 0, 1, 2


@dataclass(eq=False, slots=True)
class SimRequest:
    """One sequence. ``tokens`` are its prompt token identities (ids or words) for prefix caching; None
    means "unique prompt" and skips hashing."""

    rid: int
    prompt_len: int
    max_tokens: int
    arrival: float = 0.0
    tokens: Sequence[Any] | None = None
    stop_at: int | None = None  # natural end (EOS) before max_tokens, when the client does not ignore EOS
    # progress (the scheduler owns these)
    state: int = WAITING
    computed: int = 0  # tokens whose KV is in the cache
    output: int = 0  # tokens emitted
    num_blocks: int = 0  # KV blocks held; the first len(cached) are shared prefix-cache blocks
    cached: list = field(default_factory=list)
    hashes: list | None = None  # chained hashes of full prompt blocks, computed on first admission
    hit_tokens: int = 0
    preemptions: int = 0
    finish_reason: str | None = None
    # timestamps, set by whoever drives the clock
    first_token_time: float | None = None
    finish_time: float | None = None
    user: Any = None  # the server's stream state
    answer: Any = None  # answer.Answer: the tokens this request will emit (drafts are judged against them)


@dataclass
class SchedulerStats:
    steps: int = 0
    busy_s: float = 0.0
    prompt_tokens: int = 0
    generation_tokens: int = 0
    preemptions: int = 0
    prefix_queries: int = 0
    prefix_hits: int = 0
    spec_drafts: int = 0  # draft tokens proposed (vLLM's num_draft_tokens)
    spec_accepted: int = 0
    spec_num_drafts: int = 0  # verifications that carried at least one draft token (vLLM's num_drafts)
    spec_accepted_per_pos: list = field(default_factory=list)  # [i]: drafts whose token i was accepted
    finished: dict[str, int] = field(default_factory=lambda: {"stop": 0, "length": 0, "abort": 0})
    running_sum: int = 0  # Σ running sequences over steps (mean batch = running_sum / steps)


@dataclass(slots=True)
class StepResult:
    duration_s: float
    emitted: list  # [(SimRequest, tokens emitted this step)]
    finished: list  # [SimRequest] that finished this step
    batch: StepBatch
    time: StepTime


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


class Scheduler:
    """One engine replica's continuous-batching scheduler and KV block pool."""

    def __init__(self, shape: ModelShape, gpu: GpuSpec, cfg: SimConfig, *, plan: MemoryPlan | None = None,
                 seed: int | None = None):
        cfg.validate(shape)
        self.shape, self.gpu, self.cfg = shape, gpu, cfg
        self.plan = plan or memory_plan(shape, gpu, cfg)
        self.roofline = build_roofline(shape, gpu, cfg)
        self.block_size = cfg.kv_block_size
        self.num_blocks = self.plan.num_blocks
        self.max_model_len = self.plan.max_model_len
        self.waiting: deque[SimRequest] = deque()
        self.running: list[SimRequest] = []
        self.free_plain = self.num_blocks  # free blocks holding no cached prefix
        self.cache_ref: dict[Any, int] = {}  # block hash -> sequences using it (0 = cached but free)
        self.evictable: OrderedDict[Any, None] = OrderedDict()  # cached, free blocks in eviction order
        self.rng = random.Random(cfg.seed if seed is None else seed)
        self.stats = SchedulerStats()
        self._drafts = cfg.num_drafts
        self._accept = cfg.acceptance
        self._lookup = cfg.measures_acceptance
        self._adaptive = cfg.speculative_method == "suffix"
        self.stats.spec_accepted_per_pos = [0] * self._drafts

    # -- queue -----------------------------------------------------------------------------------------
    def add(self, req: SimRequest) -> None:
        if req.prompt_len < 1:
            raise ValueError("prompt must have at least one token")
        if req.prompt_len + req.max_tokens > self.max_model_len:
            raise ValueError(f"prompt ({req.prompt_len}) + max_tokens ({req.max_tokens}) exceeds max_model_len "
                             f"({self.max_model_len})")
        req.state = WAITING
        self.waiting.append(req)

    def abort(self, req: SimRequest) -> None:
        """Drop a request (client went away) and give its blocks back."""
        if req.state == RUNNING:
            self.running.remove(req)
            self._free(req)
        elif req.state == WAITING:
            try:
                self.waiting.remove(req)
            except ValueError:
                pass
        else:
            return
        req.state = FINISHED
        req.finish_reason = "abort"
        self.stats.finished["abort"] += 1

    def has_work(self) -> bool:
        return bool(self.running or self.waiting)

    @property
    def num_running(self) -> int:
        return len(self.running)

    @property
    def num_waiting(self) -> int:
        return len(self.waiting)

    @property
    def used_blocks(self) -> int:
        return self.num_blocks - self.free_plain - len(self.evictable)

    @property
    def kv_usage(self) -> float:
        return self.used_blocks / self.num_blocks

    # -- blocks ----------------------------------------------------------------------------------------
    def _available(self) -> int:
        return self.free_plain + len(self.evictable)

    def _take(self, n: int) -> None:
        if n <= self.free_plain:
            self.free_plain -= n
            return
        n -= self.free_plain
        self.free_plain = 0
        for _ in range(n):  # reuse the least recently freed cached blocks, forgetting their prefixes
            h, _ = self.evictable.popitem(last=False)
            del self.cache_ref[h]

    def _free(self, req: SimRequest) -> None:
        self.free_plain += req.num_blocks - len(req.cached)
        # Tail blocks first, so a prefix's deepest blocks are evicted before its root (vLLM order).
        for h in reversed(req.cached):
            r = self.cache_ref[h] - 1
            self.cache_ref[h] = r
            if r == 0:
                self.evictable[h] = None
        req.cached = []
        req.num_blocks = 0

    def _block_hashes(self, req: SimRequest) -> list:
        if req.hashes is None:
            toks, bs, h, out = req.tokens, self.block_size, None, []
            assert toks is not None  # the callers hash only requests that carry their prompt's tokens
            for i in range(0, (req.prompt_len // bs) * bs, bs):
                h = hash((h, tuple(toks[i:i + bs])))
                out.append(h)
            req.hashes = out
        return req.hashes

    def _register(self, req: SimRequest) -> None:
        """Publish the request's newly computed full prompt blocks to the prefix cache."""
        full = min(req.computed, req.prompt_len) // self.block_size
        have = len(req.cached)
        if full <= have:
            return
        hashes = self._block_hashes(req)
        for i in range(have, full):
            h = hashes[i]
            r = self.cache_ref.get(h)
            if r is None:
                self.cache_ref[h] = 1
            else:  # someone computed it too: share theirs, free ours
                if r == 0:
                    del self.evictable[h]
                self.cache_ref[h] = r + 1
                self.free_plain += 1
            req.cached.append(h)

    def _preempt_last(self) -> SimRequest:
        victim = self.running.pop()
        self._free(victim)
        victim.computed = 0
        victim.state = WAITING
        victim.preemptions += 1
        self.waiting.appendleft(victim)
        self.stats.preemptions += 1
        return victim

    # -- scheduling ------------------------------------------------------------------------------------
    def _schedule_running(self, sched: list, budget: int) -> tuple[int, bool]:
        bs, running = self.block_size, self.running
        preempted = False
        i = 0
        while i < len(running) and budget > 0:
            req = running[i]
            n = req.prompt_len + req.output - req.computed
            drafts = 0
            proposal = None
            decode = n == 1 and req.output > 0
            if decode and self._drafts:
                room = max(0, min(self._drafts, req.max_tokens - req.output - 1, budget - 1))
                if self._lookup and req.answer is not None:
                    proposal = req.answer.propose(room, self._adaptive) if room else []
                    drafts = len(proposal)
                else:
                    drafts = room
                n += drafts
            elif n > budget:
                n = budget  # a prompt chunk (only running prompts exist with chunked prefill)
            need = _cdiv(req.computed + n, bs) - req.num_blocks
            if need > 0:  # most decode steps stay inside their last block
                while need > self.free_plain + len(self.evictable):
                    victim = self._preempt_last()
                    preempted = True
                    if victim is req:
                        break
                if req.state != RUNNING:
                    continue  # it preempted itself; nothing after it is left either
                self._take(need)
                req.num_blocks += need
            sched.append((req, n, drafts, decode, proposal))
            budget -= n
            i += 1
        return budget, preempted

    def _admit(self, sched: list, budget: int, chunked: bool) -> int:
        bs, cfg = self.block_size, self.cfg
        cache_on = cfg.prefix_caching
        while self.waiting and budget > 0 and len(self.running) < cfg.max_concurrency:
            req = self.waiting[0]
            hits: list = []
            if cache_on and req.tokens is not None and req.computed == 0:
                hashes = self._block_hashes(req)
                limit = (req.prompt_len - 1) // bs  # at least one prompt token must be computed
                cache_ref = self.cache_ref
                for h in hashes[:limit]:
                    if h not in cache_ref:
                        break
                    hits.append(h)
            hit_tokens = len(hits) * bs
            n = req.prompt_len + req.output - hit_tokens
            if n > budget:
                if not chunked:
                    break  # whole prompts only: wait for a step with room
                n = budget
            need = _cdiv(hit_tokens + n, bs) - len(hits)
            pinned = sum(1 for h in hits if self.cache_ref[h] == 0)  # hits now sitting in the free pool
            if need > self._available() - pinned:
                break
            for h in hits:
                r = self.cache_ref[h]
                if r == 0:
                    del self.evictable[h]
                self.cache_ref[h] = r + 1
            self._take(need)
            req.cached = hits
            req.num_blocks = len(hits) + need
            req.computed = hit_tokens
            if cache_on and req.preemptions == 0:
                self.stats.prefix_queries += req.prompt_len
                self.stats.prefix_hits += hit_tokens
                req.hit_tokens = hit_tokens
            self.waiting.popleft()
            req.state = RUNNING
            self.running.append(req)
            sched.append((req, n, 0, False, None))
            budget -= n
        return budget

    def step(self) -> StepResult | None:
        """Schedule and account one iteration. Returns None when there is nothing to run.

        State advances immediately (tokens are 'computed'); callers stamp emissions at now + duration_s.
        """
        if not self.running and not self.waiting:
            return None
        cfg = self.cfg
        budget = cfg.max_batched_tokens
        sched: list = []
        if cfg.chunked_prefill:
            budget, preempted = self._schedule_running(sched, budget)
            if not (preempted and sched):
                self._admit(sched, budget, chunked=True)
        else:
            if self.waiting and len(self.running) < cfg.max_concurrency:
                self._admit(sched, budget, chunked=False)  # a prefill-only step
            if not sched:
                self._schedule_running(sched, budget)
                if not sched and self.waiting:
                    self._admit(sched, budget, chunked=False)
        if not sched:
            return None

        b = StepBatch()
        for req, n, drafts, decode, proposal in sched:
            pairs = n * req.computed + n * (n + 1) / 2
            if decode:
                b.decode_seqs += 1
                b.decode_tokens += n
                b.decode_context += req.computed
                b.decode_pairs += pairs
                b.sampled += n
                if drafts or proposal is not None:  # a lookup proposer runs for every decode, match or not
                    b.draft_seqs += 1
                    b.draft_tokens += drafts
            else:
                b.prefill_seqs += 1
                b.prefill_tokens += n
                b.prefill_context += req.computed
                b.prefill_pairs += pairs
                if req.computed + n >= req.prompt_len + req.output:
                    b.sampled += 1
        t = self.roofline.step_time(b)

        st = self.stats
        emitted: list = []
        finished: list = []
        rng, p = self.rng, self._accept
        cache_on = cfg.prefix_caching
        for req, n, drafts, decode, proposal in sched:
            if req.state != RUNNING:
                continue
            if decode:
                accepted = 0
                if proposal is not None:  # the draft is right up to its first token the answer does not have
                    answer = req.answer
                    while accepted < drafts and proposal[accepted] == answer.token(req.output + accepted):
                        accepted += 1
                else:
                    while accepted < drafts and rng.random() < p:
                        accepted += 1
                if drafts:
                    st.spec_drafts += drafts
                    st.spec_accepted += accepted
                    st.spec_num_drafts += 1
                    per_pos = st.spec_accepted_per_pos
                    for j in range(accepted):
                        per_pos[j] += 1
                req.computed += 1 + accepted  # rejected drafts' KV is discarded
                emit = 1 + accepted
            else:
                req.computed += n
                emit = 1 if req.computed >= req.prompt_len + req.output else 0
                if cache_on and req.tokens is not None:
                    self._register(req)
            if not emit:
                continue
            end = req.max_tokens if req.stop_at is None else min(req.max_tokens, req.stop_at)
            emit = min(emit, end - req.output)
            if req.output == 0:
                st.prompt_tokens += req.prompt_len
            req.output += emit
            if req.answer is not None:
                req.answer.advance(emit)
            st.generation_tokens += emit
            emitted.append((req, emit))
            if req.output >= end:
                req.finish_reason = "length" if req.output >= req.max_tokens else "stop"
                req.state = FINISHED
                st.finished[req.finish_reason] += 1
                self._free(req)
                finished.append(req)
        if finished:
            self.running = [r for r in self.running if r.state == RUNNING]
        st.steps += 1
        st.busy_s += t.total_s
        st.running_sum += len(sched)
        return StepResult(t.total_s, emitted, finished, b, t)
