"""The streaming HTTP client: one request in, one filled :class:`RequestRecord` out.

It speaks the OpenAI-compatible ``/v1/completions`` and ``/v1/chat/completions`` streams that vLLM and
SGLang serve, and it never raises for a failed request: every outcome lands in ``record.status``
(``ok``, ``http_<code>``, ``timeout``, ``dropped``, ``malformed``, ``connect``, ``stream_error``,
``client_error``; ``cancelled`` when the caller cancels it).

Measurement choices, each against a known pitfall of peer tools:

- One :func:`open_session` per event loop, shared by all requests: a session per request churns ports and
  adds TCP setup to TTFT. The connector has ``limit=0`` because aiohttp's default of 100 connections is a
  silent concurrency cap; the scenario bounds concurrency itself, where it is reported.
- ``read_bufsize`` is large because the 64 KiB default collapses throughput on long responses (vllm#39963).
- Each network read is stamped once on arrival and events are cut out of an accumulating buffer, so an
  SSE event split across reads is timed by the read that completed it.
- TTFT ends at the first event that carries tokens, not the first byte or a role-only chunk (vllm#15106).
- Tokens per chunk come from ``usage`` deltas (``stream_options.continuous_usage_stats``, honoured by vLLM
  and by SGLang's OpenAI-compatible server alike) when the server sends them, so speculative decoding's
  multi-token chunks are counted right. With only the final usage (``include_usage``), its total is spread
  evenly over the content chunks; with no usage at all, one token per non-empty content chunk (recorded as
  ``token_count_source``). The final ``usage.completion_tokens`` always sets the total; chunks are never
  counted when usage exists.
"""
from __future__ import annotations

import asyncio
import json
import os
import time
from typing import Any, Callable

import aiohttp

from servetune.loadgen.endpoint import Endpoint
from servetune.loadgen.records import Chunk, Request, RequestRecord

try:  # 3-5x faster than json on SSE chunks; optional, same results
    from orjson import loads as _loads
except ImportError:  # pragma: no cover
    _loads = json.loads

READ_BUFSIZE = 16 * 1024 * 1024  # SGLang uses 10 MB for the same reason
MAX_EVENT_BYTES = 64 * 1024 * 1024  # a "stream" that never ends an event is not SSE
ERROR_BODY_BYTES = 1024  # enough of an error body to say why, without holding megabytes
DRAIN_TIMEOUT_S = 1.0


class Clock:
    """Seconds since ``t0`` on ``time.perf_counter()``: monotonic, and comparable across one run."""

    __slots__ = ("t0",)

    def __init__(self, t0: float | None = None) -> None:
        self.t0 = time.perf_counter() if t0 is None else t0

    def __call__(self) -> float:
        return time.perf_counter() - self.t0


def loop_factory() -> tuple[Callable[[], asyncio.AbstractEventLoop] | None, str]:
    """The event loop every load-generator process runs: uvloop when installed (about twice asyncio's
    I/O rate), else asyncio's. ``SERVETUNE_EVENT_LOOP=asyncio`` forces the standard one."""
    if os.environ.get("SERVETUNE_EVENT_LOOP", "").lower() != "asyncio" and hasattr(asyncio, "Runner"):
        try:
            import uvloop  # noqa: PLC0415 — optional (the fast extra)

            return uvloop.new_event_loop, "uvloop"
        except ImportError:
            pass
    return None, "asyncio"


def run_loop(coro: Any) -> Any:
    """``asyncio.run`` on the loop :func:`loop_factory` picks.

    The result is handed out of band: on exit Python 3.11's ``Runner`` formats its SIGINT handler, whose
    repr includes the main task's result, i.e. every record of a run (seconds for 10^5 records)."""
    factory, _ = loop_factory()
    box: list[Any] = []

    async def main() -> None:
        box.append(await coro)

    if not hasattr(asyncio, "Runner"):  # Python 3.10: the standard loop
        asyncio.run(main())
        return box[0]
    with asyncio.Runner(loop_factory=factory) as runner:
        runner.run(main())
    return box[0]


def open_session() -> aiohttp.ClientSession:
    """The session every request of one event loop shares. Close it (``async with``) when the run ends."""
    connector = aiohttp.TCPConnector(limit=0, limit_per_host=0, keepalive_timeout=300, ttl_dns_cache=300)
    # No session-wide timeout: each request carries its own (Endpoint.request_timeout_s).
    return aiohttp.ClientSession(connector=connector, read_bufsize=READ_BUFSIZE,
                                 timeout=aiohttp.ClientTimeout(total=None))


def request_body(endpoint: Endpoint, req: Request) -> dict[str, Any]:
    body: dict[str, Any] = {
        "model": endpoint.model,
        "max_tokens": req.max_tokens,
        "ignore_eos": req.ignore_eos,
        "stream": True,
        "stream_options": {"include_usage": True, "continuous_usage_stats": True},
    }
    if req.temperature is not None:
        body["temperature"] = req.temperature
    if endpoint.api == "chat":
        if not isinstance(req.prompt, str):
            raise ValueError("the chat API needs text prompts; token-id prompts work with api='completions'")
        body["messages"] = [{"role": "user", "content": req.prompt}]
    else:
        body["prompt"] = req.prompt
    body.update(endpoint.extra_body)
    return body


class _StreamError(Exception):
    def __init__(self, kind: str, message: str) -> None:
        super().__init__(message)
        self.kind = kind


class _SSEBuffer:
    """Cuts complete SSE events out of a byte stream that arrives in arbitrary pieces."""

    __slots__ = ("buf",)

    def __init__(self) -> None:
        self.buf = b""

    def feed(self, data: bytes) -> list[bytes]:
        buf = self.buf + data
        if b"\r" in buf:  # CRLF framing; normalised on the whole remainder so a split "\r|\n" still joins
            buf = buf.replace(b"\r\n", b"\n")
        *events, self.buf = buf.split(b"\n\n")
        if len(self.buf) > MAX_EVENT_BYTES:
            raise _StreamError("malformed", f"no SSE event boundary in {len(self.buf)} bytes")
        return events

    def rest(self) -> bytes:
        rest, self.buf = self.buf, b""
        return rest


SSE_FIELDS = (b"event", b"id", b"retry")


def _event_payload(event: bytes) -> bytes | None:
    """The joined ``data:`` lines of one event as bytes; None for comments/keep-alives."""
    if event.startswith(b"data: ") and b"\n" not in event:  # the common one-line event
        return event[6:]
    lines = []
    for line in event.split(b"\n"):
        if line.startswith(b"data:"):
            value = line[5:]
            lines.append(value[1:] if value.startswith(b" ") else value)
        elif line and not line.startswith(b":") and line.split(b":", 1)[0] not in SSE_FIELDS:
            raise _StreamError("malformed", f"not an SSE line: {line[:80]!r}")
    return b"\n".join(lines) if lines else None


def _event_data(event: bytes) -> str | None:
    """The joined ``data:`` lines of one event as text; None for comments/keep-alives."""
    payload = _event_payload(event)
    if payload is None:
        return None
    try:
        return payload.decode("utf-8")
    except UnicodeDecodeError as e:
        raise _StreamError("malformed", f"SSE data is not UTF-8: {e}") from None


class _TokenStream:
    """Turns decoded SSE payloads into chunks, token counts and the end-of-stream state of one record."""

    __slots__ = ("record", "chat", "finished", "done", "end_t", "usage_total", "prompt_tokens",
                 "last_cumulative", "continuous")

    def __init__(self, record: RequestRecord, chat: bool) -> None:
        self.record = record
        self.chat = chat
        self.finished = False  # a choice carried finish_reason
        self.done = False  # [DONE] arrived
        self.end_t: float | None = None  # when the stream ended: the [DONE] read, or end of file
        self.usage_total: int | None = None  # completion_tokens of the final usage report
        self.prompt_tokens: int | None = None
        self.last_cumulative = 0  # completion_tokens of the last continuous usage report
        self.continuous = False

    def on_data(self, data: bytes | str, t: float) -> None:
        if isinstance(data, str):
            data = data.encode("utf-8")
        if data == b"[DONE]" or data.strip() == b"[DONE]":
            self.done = True
            self.end_t = t
            return
        try:
            obj = _loads(data)
        except ValueError:  # invalid JSON or invalid UTF-8 (both ValueError subclasses)
            raise _StreamError("malformed", f"unparseable SSE data: {data[:120]!r}") from None
        if not isinstance(obj, dict):
            raise _StreamError("malformed", f"SSE data is not a JSON object: {data[:120]!r}")
        if obj.get("error") is not None:
            err = obj["error"]
            code = err.get("code") if isinstance(err, dict) else None
            message = err.get("message", err) if isinstance(err, dict) else err
            kind = f"http_{code}" if isinstance(code, int) else "stream_error"
            raise _StreamError(kind, f"error event in stream: {str(message)[:300]}")

        choices = obj.get("choices") or []
        usage = obj.get("usage") or None
        cumulative = usage.get("completion_tokens") if isinstance(usage, dict) else None
        if isinstance(usage, dict) and isinstance(usage.get("prompt_tokens"), int):
            self.prompt_tokens = usage["prompt_tokens"]
        if not choices:
            if isinstance(cumulative, int):  # the usage-only chunk after the last choice
                self.usage_total = cumulative
            return

        choice = choices[0] if isinstance(choices[0], dict) else {}
        if choice.get("finish_reason") is not None:
            self.finished = True
        if isinstance(cumulative, int):
            tokens = cumulative - self.last_cumulative
            self.last_cumulative = cumulative
            self.continuous = True
        else:
            tokens = 1 if self._text(choice) else 0
        if tokens > 0:
            if self.record.first_byte is None:
                self.record.first_byte = t
            self.record.chunks.append(Chunk(t=t, tokens=tokens))

    def _text(self, choice: dict[str, Any]) -> str:
        if not self.chat:
            return choice.get("text") or ""
        delta = choice.get("delta") or {}
        # Reasoning output is output: a reasoning model's first token ends TTFT (MLPerf Endpoints rule).
        return (delta.get("content") or "") + (delta.get("reasoning_content") or delta.get("reasoning") or "")

    def finish(self, req: Request) -> None:
        rec = self.record
        if self.usage_total is not None:
            rec.output_tokens = self.usage_total
            rec.token_count_source = "usage_continuous" if self.continuous else "usage_final"
            if not self.continuous:
                _spread(rec.chunks, self.usage_total)
        elif self.continuous:
            rec.output_tokens = self.last_cumulative
            rec.token_count_source = "usage_continuous"
        else:
            rec.output_tokens = sum(c.tokens for c in rec.chunks)
            rec.token_count_source = "chunks"
        rec.input_tokens = self.prompt_tokens if self.prompt_tokens is not None else req.input_tokens


def _spread(chunks: list[Chunk], total: int) -> None:
    """Spread a final usage total evenly over content events counted one each (SGLang/vLLM without
    ``continuous_usage_stats``): a speculative server's multi-token chunks then give per-token ITL gaps of
    the right size on average instead of one slow token per chunk. Earlier chunks take the remainder."""
    n = len(chunks)
    if n == 0 or total < n or total == n:
        return
    q, r = divmod(total, n)
    for i, c in enumerate(chunks):
        c.tokens = q + (1 if i < r else 0)


def encode_body(endpoint: Endpoint, req: Request) -> bytes:
    """The request body as sent; scenarios encode each sample once, before the run."""
    return json.dumps(request_body(endpoint, req)).encode()


def request_headers(endpoint: Endpoint) -> dict[str, str]:
    return {"Content-Type": "application/json", "Accept": "text/event-stream", **endpoint.headers}


async def send(session: aiohttp.ClientSession, endpoint: Endpoint, req: Request, record: RequestRecord,
               clock: Callable[[], float], payload: bytes | None = None,
               headers: dict[str, str] | None = None) -> None:
    """Send ``req``, stream the answer, and fill ``record`` (sent, first_byte, chunks, done, tokens, status).

    ``payload``/``headers`` are :func:`encode_body`/:func:`request_headers` computed ahead of time (scenarios
    do, so no JSON encoding sits between the schedule and the send); computed here when not given.
    Never raises for a failed request. On cancellation it marks the record ``cancelled`` and re-raises,
    so the caller can say why (a scenario timeout relabels them ``timeout``).
    """
    if payload is None:
        payload = encode_body(endpoint, req)  # serialised before the send stamp
    if headers is None:
        headers = request_headers(endpoint)
    timeout = _timeout(endpoint.request_timeout_s)
    stream = _TokenStream(record, chat=endpoint.api == "chat")
    sse = _SSEBuffer()
    record.expected_output_tokens = req.max_tokens
    record.input_tokens = req.input_tokens
    record.ignore_eos = req.ignore_eos
    failure: tuple[str, str] | None = None
    record.sent = clock()
    try:
        async with session.post(endpoint.url, data=payload, headers=headers, timeout=timeout) as resp:
            if resp.status != 200:
                body = await resp.content.read(ERROR_BODY_BYTES)
                failure = (f"http_{resp.status}", body.decode("utf-8", "replace").strip())
            else:
                await _read_stream(resp, sse, stream, clock)
    except _StreamError as e:
        failure = (e.kind, str(e))
    except (asyncio.TimeoutError, TimeoutError):  # asyncio's, aiohttp's Server/ConnectionTimeoutError alike
        failure = ("timeout", f"no complete answer within {endpoint.request_timeout_s:g} s")
    except (aiohttp.ClientConnectorError, aiohttp.InvalidURL) as e:
        failure = ("connect", f"{type(e).__name__}: {e}")
    except (aiohttp.ServerDisconnectedError, aiohttp.ClientPayloadError, aiohttp.ClientOSError) as e:
        failure = ("dropped", f"{type(e).__name__}: {e}")
    except asyncio.CancelledError:
        _end(record, stream, req, ("cancelled", "cancelled by the caller"), clock())
        raise
    except Exception as e:  # noqa: BLE001 - a bug here must not lose the run, nor pass for success
        failure = ("client_error", f"{type(e).__name__}: {e}")
    if failure is None and not (stream.done or stream.finished):
        failure = ("dropped", "stream ended without [DONE] or finish_reason")
    end = stream.end_t if failure is None and stream.end_t is not None else clock()
    _end(record, stream, req, failure, end)


_TIMEOUTS: dict[float, aiohttp.ClientTimeout] = {}


def _timeout(seconds: float) -> aiohttp.ClientTimeout:
    t = _TIMEOUTS.get(seconds)
    if t is None:
        t = _TIMEOUTS[seconds] = aiohttp.ClientTimeout(total=seconds)
    return t


async def _read_stream(resp: aiohttp.ClientResponse, sse: _SSEBuffer, stream: _TokenStream,
                       clock: Callable[[], float]) -> None:
    async for data in resp.content.iter_any():
        t = clock()  # one stamp per network read, before any parsing
        for event in sse.feed(data):
            payload = _event_payload(event)
            if payload is not None:
                stream.on_data(payload, t)
                if stream.done:
                    await _drain(resp)
                    return
    end = clock()
    text = _event_payload(sse.rest())  # a last event without its blank line still counts
    if text is not None:
        stream.on_data(text, end)
    stream.end_t = end


async def _drain(resp: aiohttp.ClientResponse) -> None:
    """Read what follows [DONE] (the chunked-body terminator) so the connection goes back to the pool.

    Leaving it unread makes aiohttp close the connection, and the next request pays a TCP handshake
    inside its TTFT. The wait is bounded: a server that never ends its body only costs its connection.
    """
    try:
        await asyncio.wait_for(resp.content.read(), DRAIN_TIMEOUT_S)
    except (asyncio.TimeoutError, aiohttp.ClientError):
        pass


def _end(record: RequestRecord, stream: _TokenStream, req: Request, failure: tuple[str, str] | None,
         t: float) -> None:
    stream.finish(req)  # token counts are kept for failed requests too: they help explain the failure
    record.done = t
    if failure is None:
        record.status = "ok"
    else:
        record.status, record.error = failure
