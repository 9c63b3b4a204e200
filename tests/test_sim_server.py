"""The sim engine as a real process: OpenAI streaming format, usage, metrics, pacing, failures, signals."""
from __future__ import annotations

import asyncio
import json
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import aiohttp
import pytest

from servetune.optimizer.engines.prometheus import parse_prometheus
from servetune.optimizer.engines.sim.config import SimConfig, build_roofline
from servetune.optimizer.perfmodel.hardware import get_gpu
from servetune.optimizer.perfmodel.model_shapes import ModelShape
from servetune.optimizer.perfmodel.roofline import StepBatch

MODULE = "servetune.optimizer.engines.sim"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    def __init__(self, tmp: Path, *args: str, delay: float = 0.3):
        self.port = _free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = tmp / f"sim-{self.port}.log"
        self._log_f = open(self.log, "wb")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", MODULE, "--host", "127.0.0.1", "--port", str(self.port),
             "--startup-delay-s", str(delay), *args],
            stdout=subprocess.DEVNULL, stderr=self._log_f)
        self.statuses: list[int] = []

    def wait_healthy(self, timeout: float = 20.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise AssertionError(f"server exited {self.proc.returncode}: {self.stderr()}")
            try:
                with urllib.request.urlopen(self.url + "/health", timeout=1) as r:
                    self.statuses.append(r.status)
                    return
            except urllib.error.HTTPError as e:
                self.statuses.append(e.code)
            except OSError:
                pass
            time.sleep(0.02)
        raise AssertionError("server never became healthy")

    def stderr(self) -> str:
        self._log_f.flush()
        return self.log.read_text(errors="replace")

    def get(self, path: str) -> str:
        with urllib.request.urlopen(self.url + path, timeout=5) as r:
            return r.read().decode()

    def metrics(self) -> dict[str, float]:
        return parse_prometheus(self.get("/metrics"))

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._log_f.close()


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    srv = Server(tmp_path_factory.mktemp("sim"), "--model", "llama-3.1-8b", "--served-model-name", "m8", delay=0.5)
    try:
        srv.wait_healthy()
        yield srv
    finally:
        srv.stop()


def _post(url: str, body: dict) -> tuple[int, dict]:
    req = urllib.request.Request(url, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=30) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


async def _stream(session: aiohttp.ClientSession, url: str, body: dict) -> list[tuple[float, str]]:
    """(arrival time, payload) of every SSE event, payload without the 'data: ' prefix."""
    events = []
    async with session.post(url, json=body) as r:
        assert r.status == 200, await r.text()
        assert r.headers["Content-Type"].startswith("text/event-stream")
        buf = b""
        async for chunk in r.content.iter_any():
            now = time.perf_counter()
            buf += chunk
            while b"\n\n" in buf:
                ev, buf = buf.split(b"\n\n", 1)
                line = ev.decode()
                assert line.startswith("data: "), line
                events.append((now, line[len("data: "):]))
        assert buf == b""
    return events


def stream(url: str, body: dict) -> list[tuple[float, str]]:
    async def go():
        async with aiohttp.ClientSession() as s:
            return await _stream(s, url, body)
    return asyncio.run(go())


USAGE = {"include_usage": True, "continuous_usage_stats": True}


# -- endpoints and format -----------------------------------------------------------------------------------

def test_health_503_until_started_then_models(server):
    assert 503 in server.statuses and server.statuses[-1] == 200
    models = json.loads(server.get("/v1/models"))
    assert models["data"][0]["id"] == "m8" and models["data"][0]["max_model_len"] == 131072
    assert "KV cache size: " in server.stderr() and "Maximum concurrency" in server.stderr()


def test_streaming_completion_sse_and_usage(server):
    events = stream(server.url + "/v1/completions", {
        "model": "m8", "prompt": "one two  three\nfour five", "max_tokens": 20, "stream": True,
        "ignore_eos": True, "stream_options": USAGE})
    payloads = [p for _, p in events]
    assert payloads[-1] == "[DONE]"
    chunks = [json.loads(p) for p in payloads[:-1]]
    content, final = chunks[:-1], chunks[-1]
    assert final["choices"] == [] and final["usage"] == {"prompt_tokens": 5, "total_tokens": 25,
                                                         "completion_tokens": 20}
    seen = 0
    for c in content:
        assert c["object"] == "text_completion" and c["model"] == "m8" and c["id"] == content[0]["id"]
        choice = c["choices"][0]
        seen += len(choice["text"].split())
        assert c["usage"]["completion_tokens"] == seen and c["usage"]["prompt_tokens"] == 5
    assert seen == 20
    assert [c["choices"][0]["finish_reason"] for c in content] == [None] * (len(content) - 1) + ["length"]


def test_streaming_without_usage_options(server):
    payloads = [p for _, p in stream(server.url + "/v1/completions",
                                     {"prompt": "a b c", "max_tokens": 3, "stream": True, "ignore_eos": True})]
    assert payloads[-1] == "[DONE]"
    chunks = [json.loads(p) for p in payloads[:-1]]
    assert len(chunks) == 3 and all("usage" not in c for c in chunks)


def test_chat_stream_and_token_id_prompt(server):
    payloads = [p for _, p in stream(server.url + "/v1/chat/completions", {
        "model": "m8", "messages": [{"role": "system", "content": "be brief"},
                                    {"role": "user", "content": [{"type": "text", "text": "hello there you"}]}],
        "max_tokens": 4, "stream": True, "ignore_eos": True, "stream_options": {"include_usage": True}})]
    assert payloads[-1] == "[DONE]"
    chunks = [json.loads(p) for p in payloads[:-1]]
    assert chunks[0]["object"] == "chat.completion.chunk"
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    text = "".join(c["choices"][0]["delta"].get("content", "") for c in chunks if c["choices"])
    assert len(text.split()) == 4
    assert chunks[-1]["usage"] == {"prompt_tokens": 5, "total_tokens": 9, "completion_tokens": 4}

    status, body = _post(server.url + "/v1/completions", {"prompt": list(range(7)), "max_tokens": 3,
                                                           "ignore_eos": True})
    assert status == 200 and body["usage"] == {"prompt_tokens": 7, "total_tokens": 10, "completion_tokens": 3}
    assert body["choices"][0]["finish_reason"] == "length" and len(body["choices"][0]["text"].split()) == 3
    status, body = _post(server.url + "/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}],
                                                                "max_tokens": 2, "ignore_eos": True})
    assert status == 200 and body["choices"][0]["message"]["role"] == "assistant"
    assert body["usage"]["completion_tokens"] == 2


def test_bad_requests(server):
    status, body = _post(server.url + "/v1/completions", {"prompt": "a b", "max_tokens": 131071})
    assert status == 400 and "maximum context length is 131072" in body["error"]["message"]
    status, body = _post(server.url + "/v1/completions", {"model": "other", "prompt": "a", "max_tokens": 1})
    assert status == 404
    status, body = _post(server.url + "/v1/completions", {"prompt": "", "max_tokens": 1})
    assert status == 400
    req = urllib.request.Request(server.url + "/v1/completions", data=b"{not json")
    with pytest.raises(urllib.error.HTTPError) as e:
        urllib.request.urlopen(req, timeout=5)
    assert e.value.code == 400


def test_natural_stop_without_ignore_eos(server):
    async def go():
        async with aiohttp.ClientSession() as s:
            async def one():
                async with s.post(server.url + "/v1/completions",
                                  json={"prompt": "x y", "max_tokens": 150, "ignore_eos": False}) as r:
                    return await r.json()
            return await asyncio.gather(*[one() for _ in range(8)])
    bodies = asyncio.run(go())
    reasons = [b["choices"][0]["finish_reason"] for b in bodies]
    assert "stop" in reasons
    for b in bodies:
        n = b["usage"]["completion_tokens"]
        assert (n < 150) if b["choices"][0]["finish_reason"] == "stop" else (n == 150)


# -- pacing and metrics ---------------------------------------------------------------------------------------

def test_token_pacing_follows_the_roofline(server):
    """One request alone: inter-token gaps are the batch-1 decode step time (~7 ms for 8B on an H100)."""
    rl = build_roofline(ModelShape.load("llama-3.1-8b"), get_gpu("h100"), SimConfig())
    step = rl.step_time(StepBatch(decode_seqs=1, decode_tokens=1, decode_context=130, decode_pairs=131,
                                  sampled=1)).total_s
    events = stream(server.url + "/v1/completions", {"prompt": " ".join(["w"] * 100), "max_tokens": 61,
                                                     "stream": True, "ignore_eos": True})
    times = [t for t, p in events if p != "[DONE]"]
    assert len(times) == 61
    tpot = (times[-1] - times[0]) / 60
    assert 0.9 * step < tpot < 1.25 * step, (tpot, step)


def test_concurrent_streams_and_metrics_move(server):
    before = server.metrics()
    n, out = 48, 24

    async def go():
        async with aiohttp.ClientSession() as s:
            body = {"prompt": " ".join(["tok"] * 300), "max_tokens": out, "stream": True, "ignore_eos": True,
                    "stream_options": USAGE}
            return await asyncio.gather(*[_stream(s, server.url + "/v1/completions", body) for _ in range(n)])
    results = asyncio.run(go())
    for events in results:
        assert events[-1][1] == "[DONE]"
        assert json.loads(events[-2][1])["usage"]["completion_tokens"] == out
    after = server.metrics()

    def delta(name):
        return after.get(name, 0) - before.get(name, 0)
    assert delta("vllm:generation_tokens_total") == n * out
    assert delta("vllm:prompt_tokens_total") == n * 300
    assert delta("vllm:request_success_total") == n
    assert delta("vllm:prefix_cache_queries_total") == n * 300
    # Same prompt everywhere, but requests scheduled in the first step find nothing computed yet (as in vLLM):
    # only the later ones hit, 288 tokens each (18 full blocks; the last token is always recomputed).
    hits = delta("vllm:prefix_cache_hits_total")
    assert 0 < hits <= (n - 1) * 288 and hits % 288 == 0
    assert delta("sim:steps_total") < n * out  # batched, not one step per token
    assert after["vllm:num_requests_running"] == 0 and after["vllm:num_requests_waiting"] == 0
    assert after["vllm:kv_cache_usage_perc"] == 0
    assert after["sim:startup_seconds"] > 0.5  # includes the emulated load delay


# -- other configurations, failures and signals ---------------------------------------------------------------

def test_spec_decode_and_data_parallel_then_sigterm_in_flight(tmp_path):
    srv = Server(tmp_path, "--model", "llama-3.2-1b", "--data-parallel-size", "2", "--speculative-method", "eagle",
                 "--num-speculative-tokens", "3", "--speculative-acceptance", "0.8", "--seed", "3")
    try:
        srv.wait_healthy()
        events = stream(srv.url + "/v1/completions", {"prompt": "a b c", "max_tokens": 60, "stream": True,
                                                      "ignore_eos": True, "stream_options": USAGE})
        chunks = [json.loads(p) for _, p in events[:-1] if json.loads(p)["choices"]]
        counts = [c["usage"]["completion_tokens"] for c in chunks]
        assert counts[-1] == 60 and len(chunks) < 45  # several accepted tokens share one chunk
        assert sum(len(c["choices"][0]["text"].split()) for c in chunks) == 60
        m = srv.metrics()
        assert m["vllm:spec_decode_num_draft_tokens_total"] > 0
        drafted = m["vllm:spec_decode_num_draft_tokens_total"]
        assert 0.4 < m["vllm:spec_decode_num_accepted_tokens_total"] / drafted < 0.8

        # a long stream in flight, then SIGTERM: the process must exit promptly and cleanly
        async def long_stream():
            async with aiohttp.ClientSession() as s:
                async with s.post(srv.url + "/v1/completions", json={"prompt": "a", "max_tokens": 100000,
                                                                      "stream": True, "ignore_eos": True}) as r:
                    await r.content.readline()
                    t = time.monotonic()
                    srv.proc.send_signal(signal.SIGTERM)
                    try:
                        async for _ in r.content:
                            pass
                    except aiohttp.ClientError:
                        pass
                    return t
        t = asyncio.run(long_stream())
        assert srv.proc.wait(5) == 0
        assert time.monotonic() - t < 3.0
    finally:
        srv.stop()


def test_sigint_exits_cleanly(tmp_path):
    srv = Server(tmp_path, "--model", "llama-3.2-1b", delay=0)
    try:
        srv.wait_healthy()
        srv.proc.send_signal(signal.SIGINT)
        assert srv.proc.wait(5) == 0
    finally:
        srv.stop()


def _run(*args: str, timeout: float = 20) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", MODULE, "--port", str(_free_port()), "--startup-delay-s", "0",
                           *args], capture_output=True, text=True, timeout=timeout)


def test_startup_oom_exits_nonzero_with_message():
    r = _run("--model", "llama-3.1-70b", "--gpu", "h100")
    assert r.returncode == 1 and "CUDA out of memory" in r.stderr
    r = _run("--model", "llama-3.1-8b", "--gpu-memory-utilization", "0.2")
    assert r.returncode == 1 and "No available memory for the cache blocks" in r.stderr


def test_invalid_flags_fail_fast():
    r = _run("--model", "llama-3.1-8b", "--tensor-parallel-size", "3")
    assert r.returncode == 1 and "divisible by tensor parallel size" in r.stderr
    r = _run("--model", "llama-3.1-8b", "--max-num-seq", "8")  # no prefix abbreviations (allow_abbrev=False)
    assert r.returncode == 2 and "unrecognized arguments" in r.stderr
    r = _run("--model", "llama-3.1-8bb")
    assert r.returncode == 1 and "did you mean 'llama-3.1-8b'" in r.stderr


def test_model_directory(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({
        "hidden_size": 512, "intermediate_size": 1024, "num_hidden_layers": 4, "num_attention_heads": 8,
        "num_key_value_heads": 8, "vocab_size": 1000, "max_position_embeddings": 2048}))
    srv = Server(tmp_path, "--model", str(tmp_path), "--gpu", "l40s", delay=0)
    try:
        srv.wait_healthy()
        status, body = _post(srv.url + "/v1/completions", {"prompt": "a b", "max_tokens": 2})
        assert status == 200 and body["model"] == str(tmp_path)
    finally:
        srv.stop()
