"""The sim engine's OpenAI-compatible HTTP server (aiohttp).

One asyncio task per data-parallel replica (:mod:`.replica`) runs the engine loop: take a scheduler step,
sleep until the step's end on an absolute ``loop.time()`` clock (so sleep overshoot never accumulates), then
hand each request its tokens. The loop writes a streaming request's SSE chunk straight to its connection, one
write per request per step, formatted from pre-built string pieces: no task wake-up, no JSON library and
no aiohttp writer round trip per token, because the load generator shares the CPU with this process. A
step that emits several tokens for one request (speculative decoding) sends them as one chunk whose
``usage`` (when asked for) keeps the count exact; handlers only wait for the end.

Token accounting: a list of ints counts one token per id. A string prompt is tokenized with the model's
``tokenizer.json`` when ``--model`` is a directory holding one, special tokens added as vLLM does (so text and
token-id prompts of the same tokens are the same to the sim, prefix cache included); otherwise it counts one
token per whitespace-separated word (chat: the words of all message contents, no template overhead).
Generated text is the sim's answer (answer.py), one word per token: a prompt quoting a source between ```
fences is answered by rewriting that source, any other with filler words; one prompt always gets the same
answer.

A completion that asks for ``logprobs`` (a quality evaluation, not load) is answered greedily by
:mod:`.logits`: tokens and top-K logprobs that are a seeded function of the prompt, with a drift per lossy
setting (``--drift-weights`` for weight quantization, ``--drift-kv-cache`` for an fp8 KV cache).
Speculative decoding is lossless and adds none, unless ``--fault-lossy-speculation`` emulates a broken one.
"""
from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import logging
import os
import random
import time
from typing import Any

from aiohttp import HttpVersion11, web
from tokenizers import Tokenizer

from servetune.optimizer.engines.sim import logits as sim_logits
from servetune.optimizer.engines.sim.answer import Answer, prompt_seed
from servetune.optimizer.engines.sim.config import SimConfig, memory_plan
from servetune.optimizer.engines.sim.replica import JitEmulator, Replica
from servetune.optimizer.engines.sim.scheduler import FINISHED, Scheduler, SimRequest
from servetune.optimizer.perfmodel.hardware import GIB, get_gpu
from servetune.optimizer.perfmodel.model_shapes import ModelShape

log = logging.getLogger("servetune.sim")

_PROCESS_START = time.monotonic()
# Mean length of an answer when the client lets the model stop at EOS (ignore_eos false).
NATURAL_LENGTH_MEAN = 200
FILLER = tuple(" " + w for w in (
    "the model answers with plain filler words so that every token is one word and the output can be "
    "counted by splitting on whitespace while the timing follows a roofline of the configured GPU and "
    "the scheduler admits requests as a continuous batching engine would").split())


def _text(pos: int, n: int) -> str:
    nf = len(FILLER)
    if n == 1:
        return FILLER[pos % nf]
    return "".join(FILLER[(pos + j) % nf] for j in range(n))


def _error(status: int, message: str, kind: str = "BadRequestError") -> web.Response:
    body = {"error": {"message": message, "type": kind, "param": None, "code": status}}
    return web.json_response(body, status=status)


class _BadRequest(Exception):
    pass


class _Output:
    """Where a request's tokens go: the engine loop calls :meth:`deliver` at the end of each step.

    The base class only collects (non-streaming requests); ``finished`` resolves when the request ends."""

    __slots__ = ("finished",)

    def __init__(self) -> None:
        self.finished: asyncio.Future = asyncio.get_running_loop().create_future()

    def deliver(self, req: SimRequest, n: int) -> bool:
        """Returns False when the client is gone (the caller then aborts the request)."""
        if req.state == FINISHED:
            self.finish()
        return True

    def finish(self) -> None:
        if not self.finished.done():
            self.finished.set_result(None)


class _SseOutput(_Output):
    """Writes OpenAI SSE chunks straight to the connection's transport from the engine loop: no task
    wake-up and no aiohttp writer round trip per token. Headers went out in ``prepare()``; chunked
    transfer-encoding framing is added here, and the handler's ``write_eof()`` sends the terminator."""

    __slots__ = ("transport", "chunked", "envelope", "head", "tail", "chat", "continuous", "include_usage",
                 "prompt_len", "sent")

    def __init__(self, rid: int, model_json: str, prompt_len: int, chat: bool, include_usage: bool,
                 continuous: bool) -> None:
        super().__init__()
        self.transport: asyncio.Transport | None = None
        self.chunked = True
        created = int(time.time())
        if chat:
            self.envelope = (f'{{"id":"chatcmpl-{rid}","object":"chat.completion.chunk","created":{created},'
                             f'"model":{model_json},"choices":[')
            self.head = "data: " + self.envelope + '{"index":0,"delta":{"content":"'
            self.tail = '"},"logprobs":null,"finish_reason":'
        else:
            self.envelope = (f'{{"id":"cmpl-{rid}","object":"text_completion","created":{created},'
                             f'"model":{model_json},"choices":[')
            self.head = "data: " + self.envelope + '{"index":0,"text":"'
            self.tail = '","logprobs":null,"finish_reason":'
        self.chat, self.include_usage, self.continuous = chat, include_usage, continuous
        self.prompt_len = prompt_len
        self.sent = 0

    def _usage(self) -> str:
        p, c = self.prompt_len, self.sent
        return f'"usage":{{"prompt_tokens":{p},"total_tokens":{p + c},"completion_tokens":{c}}}'

    def deliver(self, req: SimRequest, n: int) -> bool:
        tr = self.transport
        if tr is None or tr.is_closing():
            self.finish()
            return False
        done = req.state == FINISHED
        parts = []
        if self.chat and self.sent == 0:
            role = '{"index":0,"delta":{"role":"assistant","content":""},"logprobs":null,"finish_reason":null}]'
            parts.append(f"data: {self.envelope}{role}{',' + self._usage() if self.continuous else ''}}}\n\n")
        reason = f'"{req.finish_reason}"' if done else "null"
        text = req.answer.text(self.sent, n) if req.answer is not None else _text(self.sent, n)
        self.sent += n
        usage = "," + self._usage() if self.continuous else ""
        parts.append(f'{self.head}{text}{self.tail}{reason},"stop_reason":null}}]{usage}}}\n\n')
        if done:
            if self.include_usage:
                parts.append(f"data: {self.envelope}],{self._usage()}}}\n\n")
            parts.append("data: [DONE]\n\n")
        data = "".join(parts).encode()
        tr.write(b"%x\r\n%s\r\n" % (len(data), data) if self.chunked else data)
        if done:
            self.finish()
        return True


class SimServer:
    def __init__(self, args: argparse.Namespace, shape: ModelShape, cfg: SimConfig):
        self.args = args
        self.shape = shape
        self.cfg = cfg
        self.gpu = get_gpu(args.gpu).with_memory(args.gpu_memory_gib)
        self.served_name = args.served_model_name or args.model
        self.model_json = json.dumps(self.served_name)
        self.ready = False
        self.startup_s = 0.0
        self.replicas: list[Replica] = []
        self.max_model_len = shape.max_position_embeddings
        self._rr = itertools.count()
        self._ids = itertools.count()
        self._tokenizer = _load_tokenizer(args.model)
        self._rng = random.Random(cfg.seed)
        self._outputs: set[_Output] = set()
        self.drift = eval_drift(args, cfg)
        self.app = web.Application(client_max_size=64 * 1024 * 1024)
        self.app.add_routes([
            web.get("/health", self.health),
            web.get("/v1/models", self.models),
            web.get("/metrics", self.metrics),
            web.post("/v1/completions", self.completions),
            web.post("/v1/chat/completions", self.chat_completions),
        ])

    # -- startup ---------------------------------------------------------------------------------------
    def start_engine(self) -> None:
        """Plan memory and build the replicas; raises SimStartupError when the model does not fit."""
        plan = memory_plan(self.shape, self.gpu, self.cfg)
        for note in plan.notes:
            log.warning(note)
        cfg = self.cfg
        log.info("Model weights take %.2f GiB per GPU (quantization=%s)", plan.weight_bytes_per_gpu / GIB,
                 cfg.quantization)
        log.info("Available KV cache memory: %.2f GiB per GPU (budget %.2f GiB, activations and reserve %.2f GiB)",
                 plan.kv_cache_bytes_per_gpu / GIB, plan.budget_bytes / GIB, plan.reserve_bytes_per_gpu / GIB)
        log.info("GPU KV cache size: %d tokens", plan.kv_tokens)
        log.info("Maximum concurrency for %d tokens per request: %.2fx", plan.max_model_len,
                 plan.max_concurrency_at_max_len)
        self.max_model_len = plan.max_model_len
        kernel = "fused_moe_kernel" if self.shape.is_moe else "sim_gemm_kernel"
        self.replicas = [Replica(k, Scheduler(self.shape, self.gpu, cfg, plan=plan, seed=cfg.seed * 1000 + k),
                                 JitEmulator(self.args.jit_compile_s, kernel, self.args.jit_monitor_verbose)
                                 if self.args.emulate_jit else None)
                         for k in range(cfg.data_parallel)]
        for r in self.replicas:
            r.task = asyncio.get_running_loop().create_task(r.run(), name=f"sim-engine-{r.index}")
        self.startup_s = time.monotonic() - _PROCESS_START
        self.ready = True

    async def stop_engine(self) -> None:
        self.ready = False
        for r in self.replicas:
            if r.task is not None:
                r.task.cancel()
        for r in self.replicas:
            if r.task is not None:
                try:
                    await r.task
                except asyncio.CancelledError:
                    pass
        for out in list(self._outputs):  # let waiting handlers return instead of hanging the shutdown
            out.finish()

    # -- simple endpoints ------------------------------------------------------------------------------
    async def health(self, request: web.Request) -> web.Response:
        return web.Response(status=200) if self.ready else web.Response(status=503, text="starting")

    async def models(self, request: web.Request) -> web.Response:
        return web.json_response({"object": "list", "data": [{
            "id": self.served_name, "object": "model", "created": int(time.time()), "owned_by": "servetune-sim",
            "root": self.args.model, "parent": None, "max_model_len": self.max_model_len}]})

    async def metrics(self, request: web.Request) -> web.Response:
        return web.Response(text=self.metrics_text(), content_type="text/plain", charset="utf-8")

    def metrics_text(self) -> str:
        scheds = [r.sched for r in self.replicas]
        label = f'model_name={self.model_json}'

        def total(attr: str) -> float:
            return sum(getattr(s.stats, attr) for s in scheds)

        blocks = sum(s.num_blocks for s in scheds)
        usage = sum(s.used_blocks for s in scheds) / blocks if blocks else 0.0
        out: list[str] = []

        def metric(name: str, kind: str, help_: str, value: float, extra: str = "") -> None:
            out.append(f"# HELP {name} {help_}\n# TYPE {name} {kind}\n{name}{{{label}{extra}}} {value}\n")

        metric("vllm:num_requests_running", "gauge", "Number of requests in model execution batches.",
               sum(s.num_running for s in scheds))
        metric("vllm:num_requests_waiting", "gauge", "Number of requests waiting to be processed.",
               sum(s.num_waiting for s in scheds))
        metric("vllm:kv_cache_usage_perc", "gauge", "KV-cache usage. 1 means 100 percent usage.", usage)
        metric("vllm:num_preemptions_total", "counter", "Cumulative number of preemptions.", total("preemptions"))
        metric("vllm:prompt_tokens_total", "counter", "Number of prefill tokens processed.", total("prompt_tokens"))
        metric("vllm:generation_tokens_total", "counter", "Number of generation tokens processed.",
               total("generation_tokens"))
        metric("vllm:prefix_cache_queries_total", "counter", "Prefix cache queries, in terms of tokens.",
               total("prefix_queries"))
        metric("vllm:prefix_cache_hits_total", "counter", "Prefix cache hits, in terms of tokens.",
               total("prefix_hits"))
        if self.cfg.spec_enabled:  # as vLLM: the spec-decode counters exist only with a speculative method
            metric("vllm:spec_decode_num_drafts_total", "counter", "Number of spec decoding drafts.",
                   total("spec_num_drafts"))
            metric("vllm:spec_decode_num_draft_tokens_total", "counter", "Number of draft tokens.",
                   total("spec_drafts"))
            metric("vllm:spec_decode_num_accepted_tokens_total", "counter", "Number of accepted tokens.",
                   total("spec_accepted"))
            name = "vllm:spec_decode_num_accepted_tokens_per_pos_total"
            out.append(f"# HELP {name} Accepted tokens per draft position.\n# TYPE {name} counter\n")
            for pos in range(self.cfg.num_drafts):
                n = sum(s.stats.spec_accepted_per_pos[pos] for s in scheds)
                out.append(f'{name}{{{label},position="{pos}"}} {n}\n')
        out.append("# HELP vllm:request_success_total Count of successfully processed requests.\n"
                   "# TYPE vllm:request_success_total counter\n")
        for reason in ("stop", "length", "abort"):  # vLLM labels every FinishReason, abort included
            n = sum(s.stats.finished[reason] for s in scheds)
            out.append(f'vllm:request_success_total{{{label},finished_reason="{reason}"}} {n}\n')
        metric("sim:startup_seconds", "gauge", "Seconds from engine start (module import) to ready.", self.startup_s)
        metric("sim:kv_cache_tokens", "gauge", "KV cache capacity per replica, tokens.",
               scheds[0].plan.kv_tokens if scheds else 0)
        metric("sim:steps_total", "counter", "Engine iterations.", total("steps"))
        metric("sim:busy_seconds_total", "counter", "Simulated GPU time spent in steps.", total("busy_s"))
        return "".join(out)

    # -- generation ------------------------------------------------------------------------------------
    def _check_model(self, body: dict) -> None:
        name = body.get("model")
        if name is not None and name not in (self.served_name, self.args.model):
            raise _BadRequest(f"The model `{name}` does not exist.")

    def _text_tokens(self, text: str, specials: bool = True) -> list:
        if self._tokenizer is not None:
            return self._tokenizer.encode(text, add_special_tokens=specials).ids
        return text.split()

    def _prompt_tokens(self, prompt: Any) -> tuple[int, list]:
        if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], (str, list)):
            prompt = prompt[0]  # a batch of one
        if isinstance(prompt, str):
            tokens = self._text_tokens(prompt)
            return len(tokens), tokens
        if isinstance(prompt, list) and all(isinstance(t, int) for t in prompt):
            return len(prompt), prompt
        raise _BadRequest("prompt must be a string or a list of token ids (batched prompts are not supported)")

    def _chat_tokens(self, messages: Any) -> tuple[int, list]:
        if not isinstance(messages, list) or not messages:
            raise _BadRequest("messages must be a non-empty list")
        words: list = []
        for m in messages:
            if not isinstance(m, dict):
                raise _BadRequest("each message must be an object with role and content")
            content = m.get("content")
            if isinstance(content, str):
                words.extend(self._text_tokens(content, specials=False))
            elif isinstance(content, list):
                for part in content:
                    if isinstance(part, dict) and isinstance(part.get("text"), str):
                        words.extend(self._text_tokens(part["text"], specials=False))
            elif content is not None:
                raise _BadRequest("message content must be a string or a list of parts")
        return len(words), words

    async def completions(self, request: web.Request) -> web.StreamResponse:
        return await self._generate(request, chat=False)

    async def chat_completions(self, request: web.Request) -> web.StreamResponse:
        return await self._generate(request, chat=True)

    async def _generate(self, request: web.Request, chat: bool) -> web.StreamResponse:
        if not self.ready:
            return _error(503, "the engine is starting", "ServiceUnavailableError")
        try:
            body = await request.json()
        except (json.JSONDecodeError, UnicodeDecodeError):
            return _error(400, "request body is not valid JSON")
        if not isinstance(body, dict):
            return _error(400, "request body must be a JSON object")
        try:
            self._check_model(body)
        except _BadRequest as e:
            return _error(404, str(e), "NotFoundError")
        try:
            if chat:
                prompt_len, tokens = self._chat_tokens(body.get("messages"))
                max_tokens = body.get("max_completion_tokens", body.get("max_tokens"))
            else:
                prompt_len, tokens = self._prompt_tokens(body.get("prompt"))
                max_tokens = body.get("max_tokens", 16)
            if body.get("n", 1) != 1:
                raise _BadRequest("the sim engine supports n=1 only")
            top_k = self._logprobs_asked(body, chat)
            if prompt_len < 1:
                raise _BadRequest("The decoder prompt cannot be empty")
            if max_tokens is None:
                max_tokens = self.max_model_len - prompt_len
            if not isinstance(max_tokens, int) or isinstance(max_tokens, bool) or max_tokens < 1:
                raise _BadRequest(f"max_tokens must be a positive integer, got {max_tokens!r}")
            if prompt_len + max_tokens > self.max_model_len:
                raise _BadRequest(
                    f"This model's maximum context length is {self.max_model_len} tokens. However, you requested "
                    f"{prompt_len + max_tokens} tokens ({prompt_len} in the messages, {max_tokens} in the "
                    "completion). Please reduce the length of the messages or completion.")
        except _BadRequest as e:
            return _error(400, str(e))

        rid = next(self._ids)
        stop_at = None
        scored = None
        if top_k is not None:  # an evaluation: greedy tokens and logprobs, all max_tokens of them
            scored = sim_logits.greedy(" ".join(map(str, tokens)), max_tokens, top_k, self.drift)
        elif not body.get("ignore_eos", False):
            natural = int(self._rng.expovariate(1.0 / NATURAL_LENGTH_MEAN)) + 1
            stop_at = natural if natural < max_tokens else None
        sse: _SseOutput | None = None  # the streaming output, when the request streams
        if body.get("stream", False):
            opts = body.get("stream_options") or {}
            sse = _SseOutput(rid, self.model_json, prompt_len, chat, bool(opts.get("include_usage")),
                             bool(opts.get("continuous_usage_stats")))
        out: _Output = sse if sse is not None else _Output()
        cfg = self.cfg
        answer = Answer(tokens, prompt_seed(tokens, cfg.seed), self.args.copy_edit_rate,
                        cfg.lookup_window if cfg.measures_acceptance else None)
        req = SimRequest(rid, prompt_len, max_tokens, time.monotonic(),
                         tokens if cfg.prefix_caching else None, stop_at, user=out, answer=answer)
        replica = self.replicas[next(self._rr) % len(self.replicas)]
        self._outputs.add(out)
        try:
            if sse is not None:
                resp = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"})
                if request.version >= HttpVersion11:
                    resp.enable_chunked_encoding()
                else:
                    sse.chunked = False  # HTTP/1.0: unframed body, the connection closes at the end
                await resp.prepare(request)  # StreamResponse sends its headers right away
                sse.transport = request.transport
                replica.submit(req)
                await out.finished
                try:
                    await resp.write_eof()
                except ConnectionResetError:
                    pass
                return resp
            replica.submit(req)
            await out.finished
            return self._json_response(req, chat, scored)
        finally:
            self._outputs.discard(out)
            if req.state != FINISHED:
                replica.sched.abort(req)  # the client left or the server is stopping: free its KV

    @staticmethod
    def _logprobs_asked(body: dict, chat: bool) -> int | None:
        """The top-K a completion asks for (OpenAI ``logprobs``), or None; what the sim cannot answer is a 400."""
        if chat:
            if body.get("logprobs"):
                raise _BadRequest("the sim engine answers logprobs on /v1/completions only")
            return None
        k = body.get("logprobs")
        if k is None:
            return None
        if not isinstance(k, int) or isinstance(k, bool) or not 0 <= k <= 20:
            raise _BadRequest(f"logprobs must be an integer from 0 to 20, got {k!r}")
        if body.get("stream") or body.get("echo"):
            raise _BadRequest("the sim engine answers logprobs without stream and echo only")
        return k

    def _json_response(self, req: SimRequest, chat: bool, scored: sim_logits.Completion | None = None) -> web.Response:
        created = int(time.time())
        text = req.answer.text(0, req.output) if req.answer is not None else _text(0, req.output)
        text = json.loads(f'"{text}"')  # the answer's text comes escaped for the streaming path
        logprobs = None
        if scored is not None and req.output == len(scored.tokens):
            text = scored.text
            offsets = [0]
            for t in scored.tokens[:-1]:
                offsets.append(offsets[-1] + len(t))
            logprobs = {"text_offset": offsets[:len(scored.tokens)], "token_logprobs": scored.token_logprobs,
                        "tokens": scored.tokens, "top_logprobs": scored.top_logprobs}
        usage = {"prompt_tokens": req.prompt_len, "total_tokens": req.prompt_len + req.output,
                 "completion_tokens": req.output}
        reason = req.finish_reason if req.finish_reason in ("stop", "length") else "abort"
        if chat:
            choice = {"index": 0, "message": {"role": "assistant", "content": text, "tool_calls": []},
                      "logprobs": None, "finish_reason": reason, "stop_reason": None}
            body = {"id": f"chatcmpl-{req.rid}", "object": "chat.completion", "created": created,
                    "model": self.served_name, "choices": [choice], "usage": usage}
        else:
            choice = {"index": 0, "text": text, "logprobs": logprobs, "finish_reason": reason, "stop_reason": None}
            body = {"id": f"cmpl-{req.rid}", "object": "text_completion", "created": created,
                    "model": self.served_name, "choices": [choice], "usage": usage}
        return web.json_response(body)


def eval_drift(args: argparse.Namespace, cfg: SimConfig) -> dict[str, float]:
    """The logit noise of each lossy setting this launch has (see :mod:`.logits`); lossless ones add none."""
    return {"weights": args.drift_weights if cfg.quantization != "none" else 0.0,
            "kv_cache": args.drift_kv_cache if cfg.kv_cache_dtype.startswith("fp8") else 0.0,
            "speculation": args.fault_lossy_speculation if cfg.spec_enabled else 0.0}


def _load_tokenizer(model: str) -> Any:
    """The model directory's tokenizer.json (the ``tokenizers`` library), or None: count words instead."""
    path = os.path.join(model, "tokenizer.json")
    if not os.path.isfile(path):
        return None
    return Tokenizer.from_file(path)
