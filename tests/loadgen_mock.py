"""A loopback OpenAI-compatible streaming server with known timing and chosen faults, for loadgen tests.

It runs in its own process (``MockServer``), so its event loop never competes with the client's for the
GIL and the timings it promises are the timings the client should measure. Behaviour is chosen per
request through a ``"mock"`` object in the request body (the client sends it via ``Endpoint.extra_body``):

    ttft_s            delay from request arrival to the first chunk (default 0.02)
    tpot_s            time per output token after the first (default 0.005)
    tokens_per_chunk  tokens per SSE event, like speculative decoding (default 1); chunk j is sent at
                      ttft_s + j·tokens_per_chunk·tpot_s
    mode              normal | http500 | drop (connection reset mid-stream) | eof (clean end, no [DONE])
                      | hang (never answers) | malformed (bad JSON mid-stream)
    usage             honour (stream_options as asked) | final (only the final usage chunk) | none
    fault_every       0: every request gets ``mode``; k: only every k-th request does, the rest are normal
    split             send each event in three pieces, cut inside the JSON and between the two newlines
    crlf              frame events with CRLF instead of LF
    capacity          0: unlimited; c: at most c requests are served at once, the rest wait in a queue
                      (their TTFT counts from arrival), so latency grows with load like a real server

GET /mock/stats reports request counts, in-flight peak and the last request body; POST /mock/reset
clears them.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import subprocess
import sys
import urllib.request
from typing import Any, Literal

from aiohttp import web

from servetune.loadgen.endpoint import Endpoint

DEFAULTS = {"ttft_s": 0.02, "tpot_s": 0.005, "tokens_per_chunk": 1, "mode": "normal", "usage": "honour",
            "fault_every": 0, "split": False, "crlf": False, "capacity": 0}


def _prompt_tokens(body: dict[str, Any]) -> int:
    if "messages" in body:
        return sum(len(str(m.get("content", "")).split()) for m in body["messages"])
    prompt = body.get("prompt", "")
    return len(prompt) if isinstance(prompt, list) else len(str(prompt).split())


def build_app():
    state: dict[str, Any] = {"requests": 0, "in_flight": 0, "peak_in_flight": 0, "last_body": None,
                             "last_auth": None}
    queues: dict[int, asyncio.Semaphore] = {}

    async def stats(request: web.Request) -> web.Response:
        return web.json_response(state)

    async def reset(request: web.Request) -> web.Response:
        state.update(requests=0, in_flight=0, peak_in_flight=0, last_body=None, last_auth=None)
        return web.json_response({"ok": True})

    async def generate(request: web.Request) -> web.StreamResponse:
        loop = asyncio.get_running_loop()
        arrival = loop.time()
        body = await request.json()
        state["requests"] += 1
        number = state["requests"]
        state["last_body"] = body
        state["last_auth"] = request.headers.get("Authorization")
        cfg = {**DEFAULTS, **body.get("mock", {})}
        faulty = cfg["fault_every"] == 0 or number % cfg["fault_every"] == 0
        mode = cfg["mode"] if faulty else "normal"
        state["in_flight"] += 1
        state["peak_in_flight"] = max(state["peak_in_flight"], state["in_flight"])
        try:
            capacity = int(cfg["capacity"])
            if not capacity:
                return await _stream(request, body, cfg, mode, arrival)
            async with queues.setdefault(capacity, asyncio.Semaphore(capacity)):
                # service starts when a slot frees: queueing shows up in TTFT
                return await _stream(request, body, cfg, mode, asyncio.get_running_loop().time())
        finally:
            state["in_flight"] -= 1

    async def _stream(request: web.Request, body: dict[str, Any], cfg: dict[str, Any], mode: str,
                      arrival: float) -> web.StreamResponse:
        loop = asyncio.get_running_loop()
        if mode == "http500":
            return web.Response(status=500, text="mock failure")
        if mode == "hang":
            await asyncio.sleep(3600)
        chat = request.path.endswith("/chat/completions")
        n = int(body["max_tokens"])
        k = int(cfg["tokens_per_chunk"])
        options = body.get("stream_options") or {}
        usage_mode = cfg["usage"]
        continuous = usage_mode == "honour" and options.get("continuous_usage_stats")
        final_usage = usage_mode in ("honour", "final") and options.get("include_usage")
        prompt_tokens = _prompt_tokens(body)
        sep = b"\r\n\r\n" if cfg["crlf"] else b"\n\n"

        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"})
        await resp.prepare(request)

        async def event(payload: Any) -> None:
            data = b"data: " + (payload if isinstance(payload, bytes) else json.dumps(payload).encode()) + sep
            if not cfg["split"]:
                await resp.write(data)
                return
            cut1, cut2 = len(data) // 2, len(data) - 1  # inside the JSON; between the two newline bytes
            for piece in (data[:cut1], data[cut1:cut2], data[cut2:]):
                await resp.write(piece)
                await asyncio.sleep(0.001)

        def usage(done: int) -> dict[str, int]:
            return {"prompt_tokens": prompt_tokens, "completion_tokens": done, "total_tokens": prompt_tokens + done}

        chunks = [min(k, n - i) for i in range(0, n, k)]
        sent = 0
        for j, size in enumerate(chunks):
            delay = arrival + cfg["ttft_s"] + j * k * cfg["tpot_s"] - loop.time()
            if delay > 0:
                await asyncio.sleep(delay)
            if j > 0 and j == len(chunks) // 2 and mode in ("drop", "eof", "malformed"):
                if mode == "drop":
                    assert request.transport is not None  # the request is being answered on it
                    request.transport.abort()  # a crashed server: reset, incomplete chunked body
                    return resp
                if mode == "malformed":
                    await event(b'{"choices": [{"text": "oops"')
                await resp.write_eof()
                return resp
            sent += size
            last = j == len(chunks) - 1
            text = " tok" * size
            choice = ({"index": 0, "delta": {"content": text}, "finish_reason": "length" if last else None}
                      if chat else {"index": 0, "text": text, "finish_reason": "length" if last else None})
            chunk: dict[str, Any] = {"id": "mock", "object": "chat.completion.chunk" if chat else "text_completion",
                                     "model": body.get("model"), "choices": [choice]}
            if continuous:
                chunk["usage"] = usage(sent)
            await event(chunk)
        if final_usage:
            await event({"id": "mock", "choices": [], "usage": usage(sent)})
        await event(b"[DONE]")
        await resp.write_eof()
        return resp

    app = web.Application()
    app.router.add_post("/v1/completions", generate)
    app.router.add_post("/v1/chat/completions", generate)
    app.router.add_get("/mock/stats", stats)
    app.router.add_post("/mock/reset", reset)
    return app


def _serve(port: int) -> None:
    async def main() -> None:
        runner = web.AppRunner(build_app(), access_log=None)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", port)
        await site.start()
        bound = runner.addresses[0][1]
        print(f"PORT {bound}", flush=True)
        await asyncio.Event().wait()

    asyncio.run(main())


def timing_slack_ms() -> float:
    """Latency the timing assertions forgive beyond their idle-box bounds.

    On a box with spare cores the client measures the mock's truth within ~2 ms. On an oversubscribed
    one (other jobs on a shared CI runner) both processes wait for CPU, and that wait is real delay no
    client can see past, so the bounds widen with the load instead of failing at random.
    """
    load, cpus = os.getloadavg()[0], os.cpu_count() or 1
    return 0.0 if load <= 1.5 * cpus else 10.0 * load / cpus


class MockServer:
    """Starts the mock in a subprocess on a free loopback port; use as a context manager."""

    def __init__(self) -> None:
        self.proc: subprocess.Popen | None = None
        self.port = 0

    def __enter__(self) -> "MockServer":
        self.proc = subprocess.Popen([sys.executable, __file__, "--port", "0"], stdout=subprocess.PIPE, text=True)
        assert self.proc.stdout is not None  # stdout=PIPE
        line = self.proc.stdout.readline()
        if not line.startswith("PORT "):
            self.proc.kill()
            self.proc.wait()
            self.proc.stdout.close()
            raise RuntimeError(f"mock server did not start: {line!r}")
        self.port = int(line.split()[1])
        return self

    def __exit__(self, *exc: Any) -> None:
        if self.proc is not None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
            if self.proc.stdout is not None:
                self.proc.stdout.close()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def endpoint(self, api: Literal["completions", "chat"] = "completions", request_timeout_s: float = 10,
                 headers: dict | None = None, **mock: Any):
        return Endpoint(base_url=self.url, model="mock", api=api, headers=headers or {},
                        request_timeout_s=request_timeout_s, extra_body={"mock": mock})

    def stats(self) -> dict[str, Any]:
        with urllib.request.urlopen(self.url + "/mock/stats", timeout=5) as r:
            return json.loads(r.read())

    def reset(self) -> None:
        req = urllib.request.Request(self.url + "/mock/reset", data=b"{}", method="POST")
        with urllib.request.urlopen(req, timeout=5):
            pass


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--port", type=int, default=0)
    _serve(parser.parse_args().port)
