"""Plain data that flows through the load generator: what to send, what happened, what it means.

All times are seconds on ``time.perf_counter()``'s clock, relative to the scenario's t0, so records from
one run are comparable and never depend on wall-clock jumps.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any


@dataclass(frozen=True)
class Request:
    """One sample of a dataset: a prompt and how many tokens to ask for."""

    prompt: str | list[int]  # text, or token ids for a token-id dataset
    max_tokens: int
    input_tokens: int  # intended prompt length (the server's usage is the truth)
    ignore_eos: bool = True
    temperature: float | None = None  # sampling temperature; None leaves the server's default


@dataclass(slots=True)
class Chunk:
    t: float  # arrival time of the SSE event
    tokens: int  # tokens this event carried (from usage deltas when the server reports them; see client.py)


@dataclass(slots=True)
class RequestRecord:
    """Everything measured about one request. Latencies are derived, never stored twice."""

    index: int  # position in the issue order
    sample: int  # index of the dataset sample
    scheduled: float  # when the schedule said to send it (latency origin, MLPerf style)
    sent: float | None = None
    first_byte: float | None = None  # first content token (TTFT end)
    done: float | None = None
    chunks: list[Chunk] = field(default_factory=list)
    input_tokens: int = 0  # from server usage, else the dataset's intended length
    output_tokens: int = 0  # from server usage, else the sum of chunk tokens
    expected_output_tokens: int = 0
    status: str = "pending"  # "ok" or an error kind: http_<code>, timeout, dropped, malformed, connect,
    # stream_error (an error event inside a 200 stream), client_error, cancelled
    error: str = ""
    warmup: bool = False  # excluded from metrics
    # Where the token counts came from: "usage_continuous" (per-chunk usage deltas: exact), "usage_final"
    # (total from the final usage, spread evenly over the content events: per-chunk counts estimated),
    # "chunks" (no usage at all: one token per content event, an estimate).
    token_count_source: str = ""
    ignore_eos: bool | None = None  # what the request asked for (None: not recorded)
    worker: int = 0  # the load-generator process that sent it (0 when single-process)

    @property
    def ok(self) -> bool:
        return self.status == "ok"

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class ScenarioResult:
    """One scenario at one load level against one server."""

    scenario: str  # offline | server | interactive | single_stream
    settings: dict[str, Any]  # what was asked (qps, duration, sla, ...)
    records: list[RequestRecord]
    duration_s: float  # t0 to the last completion (or to the end of the run)
    summary: dict[str, float]  # unit-carrying metric names: ttft_p99_ms, output_tokens_per_s, ...
    valid: bool = True
    invalid_reasons: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)  # non-fatal findings (e.g. early stopping not required)
    audit: dict[str, Any] | None = None  # the engine-side audit of this run (loadgen.audit), when one was made

    def to_dict(self, with_records: bool = False) -> dict[str, Any]:
        d = {
            "scenario": self.scenario,
            "settings": self.settings,
            "duration_s": self.duration_s,
            "summary": self.summary,
            "valid": self.valid,
            "invalid_reasons": self.invalid_reasons,
            "notes": self.notes,
        }
        if self.audit is not None:
            d["audit"] = self.audit
        if with_records:
            d["records"] = [r.to_dict() for r in self.records]
        return d
