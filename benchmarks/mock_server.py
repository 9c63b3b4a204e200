"""A lean loopback OpenAI-compatible streaming server with exact, known timing: the benchmark's truth.

Not aiohttp: a bare ``asyncio.Protocol`` HTTP/1.1 server (keep-alive, Content-Length or chunked request
bodies, chunked SSE responses), so the server costs ~50-100 µs of CPU per streamed request and is not the
bottleneck of a load-generator comparison. Chunk frames are pre-encoded per (length, API, usage mode).

Timing: every chunk is due at ``arrival + ttft + j·tpot`` where ``arrival`` is the ``perf_counter`` time
the request's last byte was read. Deadlines go on one heap served by a Linux ``timerfd`` armed to the
earliest one (``asyncio``'s own timers round up to whole milliseconds), so the server writes each chunk
within tens of µs of its due time. It logs, per request, its arrival and how late its first chunk was
(``server_late_ms``), so a client's error can be told from the server's.

Knobs (command line; a request may override ttft_s/tpot_s/tokens_per_chunk in a ``"mock"`` body object):
``--ttft-ms``, ``--tpot-ms``, ``--procs`` (SO_REUSEPORT processes). Endpoints: ``POST /v1/completions``,
``POST /v1/chat/completions``, ``GET /v1/models``, ``GET /health``, ``GET /mock/log`` (arrivals since the
last reset, JSON), ``POST /mock/reset``.

Run: ``python benchmarks/mock_server.py --port 0`` prints ``PORT <n>`` when listening.
"""
from __future__ import annotations

import argparse
import asyncio
import ctypes
import gc
import heapq
import json
import os
import socket
import sys
import time
from typing import Any, Callable

_libc = ctypes.CDLL(None, use_errno=True)


class _Timespec(ctypes.Structure):
    _fields_ = [("tv_sec", ctypes.c_long), ("tv_nsec", ctypes.c_long)]


class _Itimerspec(ctypes.Structure):
    _fields_ = [("it_interval", _Timespec), ("it_value", _Timespec)]


class Timers:
    """A heap of (due perf_counter time, callback) served by one timerfd (µs precision on Linux)."""

    EARLY_S = 20e-6  # run callbacks due within this much: waking again would cost more

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.heap: list[tuple[float, int, Callable[[], None]]] = []
        self.seq = 0
        self.armed = float("inf")
        self.fd = _libc.timerfd_create(1, 0o4000 | 0o2000000)  # CLOCK_MONOTONIC, NONBLOCK|CLOEXEC
        if self.fd < 0:
            raise OSError(ctypes.get_errno(), "timerfd_create")
        loop.add_reader(self.fd, self._fire)

    def at(self, t: float, cb: Callable[[], None]) -> None:
        self.seq += 1
        heapq.heappush(self.heap, (t, self.seq, cb))
        if t < self.armed:
            self._arm(t)

    def _arm(self, t: float) -> None:
        self.armed = t
        t = max(t, 1e-9)
        sec = int(t)
        spec = _Itimerspec(_Timespec(0, 0), _Timespec(sec, int((t - sec) * 1e9)))
        _libc.timerfd_settime(self.fd, 1, ctypes.byref(spec), None)  # TFD_TIMER_ABSTIME

    def _fire(self) -> None:
        try:
            os.read(self.fd, 8)
        except BlockingIOError:
            return
        self.armed = float("inf")
        heap = self.heap
        while heap:
            now = time.perf_counter()
            if heap[0][0] > now + self.EARLY_S:
                self._arm(heap[0][0])
                return
            _, _, cb = heapq.heappop(heap)
            cb()


class State:
    def __init__(self, ttft_s: float, tpot_s: float) -> None:
        self.ttft_s, self.tpot_s = ttft_s, tpot_s
        self.log: list[tuple[float, float]] = []  # (arrival perf_counter, first chunk lateness s)
        self.frames: dict[tuple, list[bytes]] = {}
        self.timers: Timers | None = None


def _chunked(data: bytes) -> bytes:
    return b"%x\r\n%s\r\n" % (len(data), data)


def _frames(state: State, n: int, k: int, chat: bool, continuous: bool, final: bool, prompt_tokens: int
            ) -> list[bytes]:
    key = (n, k, chat, continuous, final, prompt_tokens)
    frames = state.frames.get(key)
    if frames is not None:
        return frames
    frames, sent = [], 0
    sizes = [min(k, n - i) for i in range(0, n, k)]
    for j, size in enumerate(sizes):
        sent += size
        last = j == len(sizes) - 1
        text = " tok" * size
        choice = ({"index": 0, "delta": {"content": text}, "finish_reason": "length" if last else None} if chat
                  else {"index": 0, "text": text, "finish_reason": "length" if last else None})
        obj: dict[str, Any] = {"id": "mock", "object": "chat.completion.chunk" if chat else "text_completion",
                               "created": 0, "model": "mock", "choices": [choice]}
        if continuous:
            obj["usage"] = {"prompt_tokens": prompt_tokens, "completion_tokens": sent,
                            "total_tokens": prompt_tokens + sent}
        frames.append(_chunked(b"data: " + json.dumps(obj, separators=(",", ":")).encode() + b"\n\n"))
    tail = b""
    if final:
        usage = {"prompt_tokens": prompt_tokens, "completion_tokens": n, "total_tokens": prompt_tokens + n}
        tail += _chunked(b"data: " + json.dumps({"id": "mock", "object": "text_completion", "created": 0,
                                                  "model": "mock", "choices": [], "usage": usage}).encode() + b"\n\n")
    tail += _chunked(b"data: [DONE]\n\n") + b"0\r\n\r\n"
    frames[-1] += tail
    if len(state.frames) < 4096:
        state.frames[key] = frames
    return frames


HEAD_SSE = (b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nCache-Control: no-cache\r\n"
            b"Transfer-Encoding: chunked\r\n\r\n")


def _json_response(obj: Any, status: str = "200 OK") -> bytes:
    body = json.dumps(obj).encode()
    return (b"HTTP/1.1 " + status.encode() + b"\r\nContent-Type: application/json\r\nContent-Length: "
            + str(len(body)).encode() + b"\r\n\r\n" + body)


class Http(asyncio.Protocol):
    def __init__(self, state: State) -> None:
        self.state = state
        self.buf = b""
        self.transport: asyncio.Transport | None = None
        self.closed = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        sock = transport.get_extra_info("socket")
        if sock is not None:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True

    def data_received(self, data: bytes) -> None:
        now = time.perf_counter()
        self.buf += data
        while True:
            end = self.buf.find(b"\r\n\r\n")
            if end < 0:
                return
            head = self.buf[:end].decode("latin-1")
            lines = head.split("\r\n")
            method, path, _ = lines[0].split(" ", 2)
            headers = {}
            for line in lines[1:]:
                name, _, value = line.partition(":")
                headers[name.strip().lower()] = value.strip()
            rest = self.buf[end + 4:]
            if headers.get("transfer-encoding", "").lower() == "chunked":
                body, used = self._dechunk(rest)
                if body is None:
                    return
            else:
                length = int(headers.get("content-length", "0") or 0)
                if len(rest) < length:
                    return
                body, used = rest[:length], length
            self.buf = rest[used:]
            self.handle(method, path.split("?", 1)[0], body, now)

    @staticmethod
    def _dechunk(data: bytes) -> tuple[bytes | None, int]:
        out: list[bytes] = []
        pos = 0
        while True:
            eol = data.find(b"\r\n", pos)
            if eol < 0:
                return None, 0
            size = int(data[pos:eol].split(b";")[0], 16)
            if size == 0:
                if len(data) < eol + 4:
                    return None, 0
                return b"".join(out), eol + 4
            if len(data) < eol + 2 + size + 2:
                return None, 0
            out.append(data[eol + 2:eol + 2 + size])
            pos = eol + 2 + size + 2

    def handle(self, method: str, path: str, body: bytes, arrival: float) -> None:
        st = self.state
        tr = self.transport
        assert tr is not None  # a request arrives on a made connection
        if method == "POST" and path in ("/v1/completions", "/v1/chat/completions"):
            req = json.loads(body)
            mock = req.get("mock") or {}
            ttft, tpot = float(mock.get("ttft_s", st.ttft_s)), float(mock.get("tpot_s", st.tpot_s))
            k = int(mock.get("tokens_per_chunk", 1))
            n = int(req.get("max_tokens") or req.get("max_completion_tokens") or 16)
            opts = req.get("stream_options") or {}
            chat = path.endswith("chat/completions")
            prompt = req.get("prompt", "") if not chat else " ".join(str(m.get("content", ""))
                                                                     for m in req.get("messages", []))
            ptoks = len(prompt) if isinstance(prompt, list) else len(str(prompt).split())
            frames = _frames(st, n, k, chat, bool(opts.get("continuous_usage_stats")),
                             bool(opts.get("include_usage")), ptoks)
            entry = [arrival, 0.0]
            st.log.append(entry)  # type: ignore[arg-type]
            tr.write(HEAD_SSE)
            timers = st.timers
            assert timers is not None  # the server's loop made them before accepting

            def emit(j: int) -> None:
                if self.closed:
                    return
                due = arrival + ttft + j * k * tpot
                if j == 0:
                    entry[1] = time.perf_counter() - due
                tr.write(frames[j])
                if j + 1 < len(frames):
                    timers.at(arrival + ttft + (j + 1) * k * tpot, lambda: emit(j + 1))

            timers.at(arrival + ttft, lambda: emit(0))
        elif method == "GET" and path == "/v1/models":
            tr.write(_json_response({"object": "list", "data": [{"id": "mock", "object": "model",
                                                                  "owned_by": "mock", "created": 0}]}))
        elif method == "GET" and path in ("/health", "/v1/health"):
            tr.write(_json_response({"ok": True}))
        elif method == "GET" and path == "/mock/log":
            tr.write(_json_response({"pid": os.getpid(), "log": st.log}))
        elif method == "POST" and path == "/mock/reset":
            st.log = []
            tr.write(_json_response({"ok": True}))
        else:
            tr.write(_json_response({"error": f"no route {method} {path}"}, "404 Not Found"))


def serve(port: int, ttft_s: float, tpot_s: float, sock: socket.socket | None = None) -> None:
    async def main() -> None:
        loop = asyncio.get_running_loop()
        state = State(ttft_s, tpot_s)
        state.timers = Timers(loop)
        if sock is not None:
            server = await loop.create_server(lambda: Http(state), sock=sock, backlog=4096)
        else:
            server = await loop.create_server(lambda: Http(state), "127.0.0.1", port, backlog=4096,
                                              reuse_port=True)
        print(f"PORT {server.sockets[0].getsockname()[1]}", flush=True)
        await asyncio.Event().wait()

    gc.freeze()
    asyncio.run(main())


if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("--port", type=int, default=0)
    ap.add_argument("--ttft-ms", type=float, default=20.0)
    ap.add_argument("--tpot-ms", type=float, default=2.0)
    ap.add_argument("--procs", type=int, default=1)
    a = ap.parse_args()
    if a.procs > 1:
        s = socket.socket()
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        s.bind(("127.0.0.1", a.port))
        port = s.getsockname()[1]
        s.close()
        for _ in range(a.procs - 1):
            if os.fork() == 0:
                serve(port, a.ttft_ms / 1000, a.tpot_ms / 1000)
                sys.exit(0)
        serve(port, a.ttft_ms / 1000, a.tpot_ms / 1000)
    else:
        serve(a.port, a.ttft_ms / 1000, a.tpot_ms / 1000)
