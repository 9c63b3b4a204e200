"""The audit of a measured level from the engine's side: did the server do what the client measured?

Before and after every measured level (and every warm-up round) the engine's ``/metrics`` is read, and its
KV-cache gauge is sampled during the level for its peak. The window's counter deltas are set against what
the client's records say it sent and received, and the engine log written in the window is scanned for
lines that signal a disturbance (kernel JIT, recompiles, preemption, OOM retries). Three rules make a
level invalid, their reasons landing in ``invalid_reasons`` beside MLPerf's (prefixed ``audit:``):

- **tokens agree**: the server's prompt and generation token counters moved by what the client's records
  count (:data:`TOKEN_TOLERANCE`, see there). A gap means other traffic on the server, requests counted
  twice, or a client that measured something else.
- **no prefix-cache hits**: hits above :data:`MAX_PREFIX_HIT_FRACTION` of the prompt tokens, on a workload
  that declares no shared prefix, mean prompts were replayed and their prefill skipped: the level measured
  a cache, not the configuration (a 1000-prompt dataset sent 1200 times gave 12.5 % hits on vLLM). Only hits
  beyond the first :data:`INCIDENTAL_PREFIX_TOKENS` of each prompt count: distinct prompts share their first
  few tokens with some earlier prompt ("Request 12…" and "Request 123…"), which a cache of 16-token blocks
  (vLLM) never hits and a token-granular radix cache (SGLang, page size 1) does.
- **no compilation in the window**: a kernel JIT or recompile inside the measured window is a latency spike
  of the engine warming up, not of the configuration (a fused_moe JIT made a 4 req/s level show p99 TTFT
  2.8 s on a server that sustains 12 req/s once warm).

A level that breaks a rule runs once more after more warm-up (:meth:`Auditor.measure`); the re-run
replaces it and records the first run. A level still failing after that is *contaminated*
(``summary["audit_contaminated"]``): what it measured is not the configuration's, and it must never be
read as an SLA miss.

This module knows no engine: the engine's side is an :class:`EngineProbe` (the optimizer builds one from
its engine adapters, ``servetune bench`` from the metric names the server exposes). It imports nothing
from the optimizer.
"""
from __future__ import annotations

import math
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Protocol, Sequence

from servetune.loadgen.records import RequestRecord, ScenarioResult

AUDIT = "audit: "  # how the audit's reasons and notes begin among a result's own
# Engine-neutral names of the counters a probe returns (cumulative since the engine started) ...
COUNTERS = ("prompt_tokens", "generation_tokens", "prefix_cache_queries", "prefix_cache_hits", "preemptions",
            "requests_finished")
KV_USAGE = "kv_cache_usage"  # ... and of the KV-cache gauge (0..1)
IN_FLIGHT = "in_flight"  # ... and of the requests the engine holds now (running + waiting)
# Relative slack on the token comparison. The counters and the usage the client records count the same
# tokens, so for requests that succeeded they agree exactly (they did on vLLM 0.26: issue 15); the slack
# only absorbs a counter the engine updates a step after the response went out (at most a token per
# request still being recorded at the second scrape, which one re-scrape after SETTLE_S also waits out).
# Anything real moves the counts by whole requests: another client on the server, a request counted twice.
TOKEN_TOLERANCE = 0.01
MAX_PREFIX_HIT_FRACTION = 0.01  # rule (b): hits above 1 % of the prompt tokens on a workload without sharing
# Hits a distinct prompt may score on its first tokens alone, allowed per request before rule (b) counts: one
# vLLM KV block. On SGLang 0.5.17 (radix cache, page size 1) the text-task prompts "Request N.\n…" of a
# SmolLM2 study (its tokenizer splits digits one by one) scored 4.6-6.7 hit tokens per request at every
# level, 2-27 % of the prompt tokens, with no prompt sent twice (docs/results/2026-12-06-h100-smollm2-specdec).
INCIDENTAL_PREFIX_TOKENS = 16
SETTLE_S = 0.5  # one more scrape after this long when the server's counts still trail the client's
POLL_S = 1.0  # KV-cache gauge sampling period during a level
# A window opens once the engine holds no request of an earlier run (at most this long): the stragglers of a
# level cut at its timeout would otherwise land their tokens, and their load, in the next level's window.
QUIET_S = 5.0
MAX_LOG_LINES = 20  # disturbance lines kept per window (all are counted)


class EngineProbe(Protocol):
    """The engine's side of the audit, supplied by whoever knows the engine."""

    has_log: bool  # False: no engine log to read (servetune bench against someone else's server)

    def counters(self) -> dict[str, float] | None:
        """Cumulative :data:`COUNTERS` and the :data:`KV_USAGE` and :data:`IN_FLIGHT` gauges now; None when
        /metrics is unreachable."""

    def kv_usage(self) -> float | None:
        """The KV-cache gauge alone (polled about once a second during a level, so it must be cheap)."""

    def log_offset(self) -> int | None:
        """The engine log's current size in bytes (None without a log)."""

    def log_events(self, start: int, end: int) -> list[dict[str, Any]]:
        """Disturbance lines written between two offsets: ``{"kind", "line", "invalidates"}`` each."""


def client_counts(records: Sequence[RequestRecord]) -> dict[str, float]:
    """What the client's records say the server was asked for in a window (warm-up requests included: they
    ran inside it). Failed requests may or may not have reached the server's counters: their prompt and
    requested output tokens bound how far above the successful ones the server may count."""
    ok = [r for r in records if r.ok]
    failed = [r for r in records if not r.ok]
    return {
        "requests": float(len(records)), "requests_ok": float(len(ok)), "requests_failed": float(len(failed)),
        "prompt_tokens": float(sum(r.input_tokens for r in ok)),
        "generation_tokens": float(sum(r.output_tokens for r in ok)),
        "failed_prompt_tokens": float(sum(r.input_tokens for r in failed)),
        "failed_generation_tokens": float(sum(max(r.expected_output_tokens, r.output_tokens) for r in failed)),
        "incidental_prefix_tokens": float(sum(min(INCIDENTAL_PREFIX_TOKENS, r.input_tokens) for r in records)),
        # the counts are the server's own usage numbers only when every successful record carried usage
        "exact": float(bool(ok) and all(r.token_count_source.startswith("usage") for r in ok)),
    }


def counter_deltas(before: dict[str, float], after: dict[str, float]) -> dict[str, float]:
    """Counter changes over the window (a counter that went backwards, an engine restart, is left out)."""
    out = {}
    for k in COUNTERS:
        if k in before and k in after and after[k] >= before[k]:
            out[k] = round(after[k] - before[k], 6)
    return out


FLATTERS, HURTS, UNKNOWN = "flatters", "hurts", "unknown"  # which way a finding moved the level's numbers


def judge(client: dict[str, float], server: dict[str, float], events: Sequence[dict[str, Any]], *,
          max_prefix_hit_fraction: float | None = MAX_PREFIX_HIT_FRACTION,
          token_tolerance: float = TOKEN_TOLERANCE) -> tuple[list[str], list[str], list[str]]:
    """(reasons, notes, effects) of one measured window: reasons make the level invalid, notes are findings,
    and each reason's effect says which way it moved the numbers: replayed prompts skip prefill (FLATTERS),
    a compile stalls steps (HURTS), a token mismatch could be either (UNKNOWN).

    ``max_prefix_hit_fraction`` None: the workload shares prefixes on purpose, hits are what it measures."""
    reasons: list[str] = []
    notes: list[str] = []
    effects: list[str] = []
    for what, key, failed_key in (("prompt", "prompt_tokens", "failed_prompt_tokens"),
                                  ("generation", "generation_tokens", "failed_generation_tokens")):
        got = server.get(key)
        if got is None:
            notes.append(f"the server exposes no {what}-token counter: {what} tokens not compared")
            continue
        if not client.get("exact"):
            notes.append(f"the client's {what} token counts are estimates (the server sent no usage): "
                         f"not compared")
            continue
        low, high = client[key], client[key] + client[failed_key]
        slack = token_tolerance * max(low, 1.0)
        if got < low - slack:
            reasons.append(f"the server counted {got:,.0f} {what} tokens, the client {low:,.0f} in successful "
                           f"requests: {low - got:,.0f} never reached the server's counters")
            effects.append(UNKNOWN)
        elif got > high + slack:
            extra = f" (+ up to {client[failed_key]:,.0f} in failed requests)" if client[failed_key] else ""
            reasons.append(f"the server counted {got:,.0f} {what} tokens, the client sent {low:,.0f}{extra}: "
                           f"{got - high:,.0f} more, from other traffic on the server or work counted twice")
            effects.append(UNKNOWN)
    hits = server.get("prefix_cache_hits")
    prompt = server.get("prompt_tokens", client.get("prompt_tokens"))
    if hits is not None and prompt:
        frac = hits / prompt
        incidental = min(hits, client.get("incidental_prefix_tokens", 0.0))
        beyond = (hits - incidental) / prompt
        if max_prefix_hit_fraction is not None and beyond > max_prefix_hit_fraction:
            allowed = f"; {beyond:.1%} beyond the first {INCIDENTAL_PREFIX_TOKENS} of each prompt" if incidental else ""
            reasons.append(f"prefix-cache hits were {frac:.1%} of the prompt tokens ({hits:,.0f} of {prompt:,.0f}"
                           f"{allowed}) on a workload that declares no shared prefix (limit "
                           f"{max_prefix_hit_fraction:.0%}): prompts were replayed and their prefill skipped")
            effects.append(FLATTERS)
        elif hits and incidental and max_prefix_hit_fraction is not None:
            notes.append(f"prefix-cache hits {frac:.2%} of the prompt tokens ({hits:,.0f}, "
                         f"{hits / max(client.get('requests', 1.0), 1.0):.1f} per request): within the first "
                         f"{INCIDENTAL_PREFIX_TOKENS} tokens distinct prompts may share")
        elif hits:
            notes.append(f"prefix-cache hits {frac:.2%} of the prompt tokens ({hits:,.0f})")
    elif hits is None:
        notes.append("the server exposes no prefix-cache counter: replayed prompts not checked")
    kinds: dict[str, list[str]] = {}
    for e in events:
        kinds.setdefault(str(e.get("kind")), []).append(str(e.get("line", "")))
    for kind, lines in kinds.items():
        invalidates = any(e.get("invalidates") for e in events if e.get("kind") == kind)
        text = f"{len(lines)} {kind} line{'s' if len(lines) != 1 else ''} in the engine log during the level " \
               f"(first: {clip(lines[0])})"
        (reasons if invalidates else notes).append(text)
        if invalidates:
            effects.append(HURTS)
    if server.get("preemptions"):
        notes.append(f"{server['preemptions']:,.0f} preemptions during the level")
    return reasons, notes, effects


def clip(line: str, limit: int = 240) -> str:
    """A log line cut to ``limit`` characters for a record or a message."""
    line = line.strip()
    return line if len(line) <= limit else line[:limit - 1] + "…"


class _Peak:
    """Samples the KV-cache gauge in a thread while a level runs. The probe's read is one HTTP GET and a
    regex over the text, a millisecond of this process's time a second, so the load generator's own
    event loop hardly notices it."""

    def __init__(self, probe: EngineProbe, period_s: float) -> None:
        self.probe, self.period_s = probe, period_s
        self.values: list[float] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="servetune-kv-poll", daemon=True)

    def _run(self) -> None:
        while not self._stop.wait(self.period_s):
            v = self.probe.kv_usage()
            if v is not None and math.isfinite(v):
                self.values.append(v)

    def __enter__(self) -> "_Peak":
        self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        self._thread.join(timeout=10)


@dataclass
class Auditor:
    """Runs levels inside an audit window and re-runs a failed one once, after ``rewarm``.

    ``rewarm(settings)`` warms the engine again before the re-run and returns what it did (None: no re-run
    warm-up, e.g. ``servetune bench``, where the failed run is the only warm-up there is)."""

    probe: EngineProbe
    max_prefix_hit_fraction: float | None = MAX_PREFIX_HIT_FRACTION
    token_tolerance: float = TOKEN_TOLERANCE
    rerun: bool = True
    rewarm: Callable[[Any], dict[str, Any] | None] | None = None
    poll_s: float = POLL_S
    settle_s: float = SETTLE_S
    quiet_s: float = QUIET_S
    windows: list[dict[str, Any]] = field(default_factory=list)  # every window audited, in order
    recheck_first: bool = True
    levels_measured: int = 0

    def window(self, run: Callable[[], Any], records_of: Callable[[Any], Sequence[RequestRecord]],
               kind: str = "level") -> tuple[Any, dict[str, Any]]:
        """Run ``run()`` between two scrapes and return (its result, the window's audit, unjudged)."""
        before = self._quiet()
        start_off = self.probe.log_offset()
        t0 = time.monotonic()
        with _Peak(self.probe, self.poll_s) as peak:
            result = run()
        client = client_counts(records_of(result))
        after = self.probe.counters()
        if before is not None and after is not None and self.settle_s > 0:
            d = counter_deltas(before, after)
            if any(d.get(k, math.inf) < client[k] for k in ("prompt_tokens", "generation_tokens")):
                time.sleep(self.settle_s)  # the engine may record a step's tokens after its response
                after = self.probe.counters() or after
        end_off = self.probe.log_offset()
        audit: dict[str, Any] = {"window": kind, "seconds": round(time.monotonic() - t0, 3), "client": client}
        if before is not None and before.get(IN_FLIGHT):
            audit["in_flight_at_start"] = before[IN_FLIGHT]
        if before is None or after is None:
            audit["server"] = None
        else:
            server = counter_deltas(before, after)
            gauges = [v for v in (before.get(KV_USAGE), *peak.values, after.get(KV_USAGE)) if v is not None]
            if gauges:
                server["kv_cache_usage_peak"] = round(max(gauges), 6)
                server["kv_cache_samples"] = float(len(gauges))
            audit["server"] = server
        events: list[dict[str, Any]] = []
        if self.probe.has_log and start_off is not None and end_off is not None:
            events = self.probe.log_events(start_off, end_off)
            audit["log"] = {"bytes": end_off - start_off, "events": events[:MAX_LOG_LINES],
                            "counts": _counts(events), "invalidating": sum(1 for e in events if e.get("invalidates"))}
        else:
            audit["log"] = None
        audit["_events"] = events
        self.windows.append(audit)
        return result, audit

    def _quiet(self) -> dict[str, float] | None:
        deadline = time.monotonic() + self.quiet_s
        while True:
            now = self.probe.counters()
            if now is None or not now.get(IN_FLIGHT) or time.monotonic() >= deadline:
                return now
            time.sleep(0.1)

    def judged(self, audit: dict[str, Any]) -> dict[str, Any]:
        events = audit.pop("_events", [])
        if audit["server"] is None:
            reasons: list[str] = []
            effects: list[str] = []
            notes = ["the server's /metrics could not be read: nothing audited"]
        else:
            reasons, notes, effects = judge(audit["client"], audit["server"], events,
                                            max_prefix_hit_fraction=self.max_prefix_hit_fraction,
                                            token_tolerance=self.token_tolerance)
        if audit.get("log") is None:
            notes.append("no engine log to read: JIT and compile lines not checked")
        if audit.get("in_flight_at_start"):
            notes.append(f"the engine still held {audit['in_flight_at_start']:,.0f} requests of an earlier run "
                         f"when the level began (waited {self.quiet_s:g} s)")
        audit.update(passed=not reasons, reasons=reasons, notes=notes, effects=effects)
        return audit

    def run_level(self, run: Callable[[], ScenarioResult]) -> ScenarioResult:
        """One audited run: the audit lands in ``result.audit``, its reasons among ``invalid_reasons``."""
        result, audit = self.window(run, lambda r: r.records)
        attach(result, self.judged(audit))
        return result

    def measure(self, run: Callable[[], ScenarioResult], settings: Any = None) -> ScenarioResult:
        """An audited level, run once more after ``rewarm`` when its audit fails. ``run`` must send fresh
        prompts on each call (the re-run must not replay the failed run's prompts)."""
        first_of_launch = self.levels_measured == 0
        self.levels_measured += 1
        first = self.run_level(run)
        first_audit = _audit_of(first)
        if first_audit["passed"]:
            if first_of_launch and self.recheck_first and self.rerun and not first.valid:
                return self._recheck_first(run, settings, first)
            return first
        if first_audit["effects"] and set(first_audit["effects"]) == {FLATTERS} and _own_reasons(first):
            # it failed on its own even with replayed prompts flattering it: a clean run can only fail too
            first_audit["verdict_stands"] = True
            first.notes.append(f"{AUDIT}not re-run: the level is invalid on its own even with the replayed "
                               "prompts in its favour")
            return first
        if not self.rerun:
            return contaminate(first)
        warm = self.rewarm(settings) if self.rewarm is not None else None
        second = self.run_level(run)
        second_audit = _audit_of(second)
        second_audit["rerun_of"] = {"valid": first.valid, "invalid_reasons": list(first.invalid_reasons),
                                    "summary": {k: first.summary.get(k) for k in _KEPT if k in first.summary},
                                    "audit": first_audit}
        second_audit["rewarm"] = warm
        second.summary["audit_reruns"] = 1.0
        second.notes.append(f"{AUDIT}re-ran once with fresh prompts{' after more warm-up' if warm else ''}; the "
                            f"first run was contaminated ({'; '.join(first_audit['reasons'])})")
        return second if second_audit["passed"] else contaminate(second)


    def _recheck_first(self, run: Callable[[], ScenarioResult], settings: Any,
                       first: ScenarioResult) -> ScenarioResult:
        """The first measured level of a launch, invalid with a clean audit, measured once more.

        On an H200 (issue 15, mixtral-8x7b, vLLM 0.26) a launch's first level failed p99 TTFT with a handful
        of 2 s outliers after a warm-up whose last round compiled nothing and with no line in the engine log,
        for bf16 and fp8 alike, while the same rate's neighbours measured later held p99 TTFT under 300 ms.
        A failing first level is therefore no verdict until a second run agrees; the second run decides."""
        warm = self.rewarm(settings) if self.rewarm is not None else None
        second = self.run_level(run)
        second_audit = _audit_of(second)
        second_audit["rerun_of"] = {"valid": first.valid, "invalid_reasons": list(first.invalid_reasons),
                                    "summary": {k: first.summary.get(k) for k in _KEPT if k in first.summary},
                                    "audit": first.audit, "why": "first level of the launch"}
        second_audit["rewarm"] = warm
        second.summary["first_level_rechecked"] = 1.0
        agreed = "it failed again" if not second.valid else "it passed this time"
        second.notes.append(f"{AUDIT}the launch's first level failed with a clean audit "
                            f"({'; '.join(first.invalid_reasons)}) and was measured once more: {agreed}")
        return second if second_audit["passed"] else contaminate(second)


_KEPT = ("requests_ok", "requests_issued", "output_tokens_per_s", "ttft_p99_ms", "tpot_p99_ms", "error_rate")


def _own_reasons(result: ScenarioResult) -> list[str]:
    return [r for r in result.invalid_reasons if not r.startswith(AUDIT)]


def _counts(events: Sequence[dict[str, Any]]) -> dict[str, int]:
    out: dict[str, int] = {}
    for e in events:
        out[str(e.get("kind"))] = out.get(str(e.get("kind")), 0) + 1
    return out


def attach(result: ScenarioResult, audit: dict[str, Any]) -> ScenarioResult:
    result.audit = audit
    result.summary["audit_passed"] = float(audit["passed"])
    result.summary["audit_contaminated"] = 0.0
    if audit["reasons"]:
        result.invalid_reasons.extend(AUDIT + r for r in audit["reasons"])
        result.valid = False
    result.notes.extend(AUDIT + n for n in audit["notes"])
    return result


def _audit_of(result: ScenarioResult) -> dict[str, Any]:
    """The audit ``run_level`` attached to ``result``."""
    assert result.audit is not None, "an audited run always carries its audit"
    return result.audit


def contaminate(result: ScenarioResult) -> ScenarioResult:
    """Mark a level whose audit still fails as contaminated: what it measured is not the configuration's."""
    _audit_of(result)["contaminated"] = True
    result.summary["audit_contaminated"] = 1.0
    return result


def contaminated(result: ScenarioResult | dict[str, Any]) -> bool:
    summary = result.get("summary", {}) if isinstance(result, dict) else result.summary
    return bool(summary.get("audit_contaminated"))
