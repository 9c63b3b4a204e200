"""The sim engine's command line: flags (vLLM's spellings) → :class:`SimConfig`, and the process that serves
until SIGTERM / SIGINT (``python -m servetune.optimizer.engines.sim``)."""
from __future__ import annotations

import argparse
import asyncio
import logging
import os
import signal
import sys

from aiohttp import web

from servetune.optimizer.engines.sim.answer import DEFAULT_EDIT_RATE
from servetune.optimizer.engines.sim.config import (
    KV_DTYPES,
    QUANTIZATIONS,
    SPEC_METHODS,
    SimConfig,
    SimConfigError,
    SimStartupError,
)
from servetune.optimizer.engines.sim.server import SimServer
from servetune.optimizer.perfmodel.hardware import get_gpu
from servetune.optimizer.perfmodel.model_shapes import ModelShape
from servetune.optimizer.perfmodel.roofline import NGRAM_STEP_S

log = logging.getLogger("servetune.sim")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m servetune.optimizer.engines.sim", allow_abbrev=False,
                                description="servetune's simulated inference engine: an OpenAI-compatible "
                                            "server timed by a roofline model (no GPU needed).")
    p.add_argument("--model", required=True, help="preset name (llama-3.1-8b, ...) or a directory with config.json")
    p.add_argument("--served-model-name", default=None, help="name clients use (default: --model)")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--gpu", default="h100", help="GPU kind from servetune's table: h100, h200, a100, l40s, ...")
    p.add_argument("--gpu-memory-gib", type=float, default=None, help="override the GPU's memory")
    p.add_argument("--tensor-parallel-size", "-tp", type=int, default=1)
    p.add_argument("--pipeline-parallel-size", "-pp", type=int, default=1)
    p.add_argument("--data-parallel-size", "-dp", type=int, default=1)
    p.add_argument("--quantization", "-q", default="none", type=str.lower, choices=QUANTIZATIONS)
    p.add_argument("--kv-cache-dtype", default="auto", choices=KV_DTYPES)
    p.add_argument("--max-num-seqs", type=int, default=256)
    p.add_argument("--max-num-batched-tokens", type=int, default=8192)
    p.add_argument("--max-model-len", type=int, default=None, help="default: the model's max_position_embeddings")
    p.add_argument("--enable-chunked-prefill", action=argparse.BooleanOptionalAction, default=True)
    p.add_argument("--enable-prefix-caching", action=argparse.BooleanOptionalAction, default=True)
    p.add_argument("--gpu-memory-utilization", type=float, default=0.9)
    p.add_argument("--block-size", type=int, default=16)
    p.add_argument("--speculative-method", default="none", type=str.lower, choices=SPEC_METHODS)
    p.add_argument("--num-speculative-tokens", type=int, default=3)
    p.add_argument("--speculative-acceptance", type=float, default=None,
                   help="per-draft-token acceptance probability (default: eagle 0.6, eagle3 0.7; ngram and "
                        "suffix drafts are judged against the sim's answer)")
    p.add_argument("--prompt-lookup-min", type=int, default=None, help="ngram: shortest n-gram matched (vLLM's)")
    p.add_argument("--prompt-lookup-max", type=int, default=None, help="ngram: longest n-gram matched (vLLM's)")
    p.add_argument("--copy-edit-rate", type=float, default=DEFAULT_EDIT_RATE,
                   help="share of a quoted source's words the sim's answer changes while copying it")
    p.add_argument("--enforce-eager", action=argparse.BooleanOptionalAction, default=False,
                   help="no CUDA graphs: higher per-step overhead")
    p.add_argument("--drift-weights", type=float, default=0.3,
                   help="evaluation (logprobs) requests: logit noise of a quantized model (--quantization not none)")
    p.add_argument("--drift-kv-cache", type=float, default=0.1,
                   help="evaluation requests: logit noise of an fp8 KV cache")
    p.add_argument("--fault-lossy-speculation", type=float, default=0.0,
                   help="evaluation requests: logit noise while speculating (a fault: speculative decoding is "
                        "lossless, so the default is 0)")
    p.add_argument("--lookup-step-ms", type=float, default=NGRAM_STEP_S * 1e3,
                   help="host time one ngram / suffix proposal adds to a step (default: the lookup alone; 1.5 "
                        "reproduces vLLM 0.26 on an H100 with SmolLM2 at one sequence: docs/speculative.md)")
    p.add_argument("--startup-delay-s", type=float, default=0.5, help="emulated weight loading before ready")
    p.add_argument("--emulate-jit", action="store_true",
                   help="compile a kernel (and log vLLM's JIT warning) the first time a step's token count falls "
                        "in a new power-of-two bucket, as a real engine does after a warm-up that missed a shape")
    p.add_argument("--jit-compile-s", type=float, default=0.3, help="seconds one emulated JIT compile stalls a step")
    p.add_argument("--jit-monitor-verbose", action="store_true",
                   help="log every emulated JIT compile (vLLM's flag), not only a kernel's first")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--log-level", default="info", choices=("debug", "info", "warning", "error"))
    return p


def config_from_args(args: argparse.Namespace) -> SimConfig:
    return SimConfig(
        tensor_parallel=args.tensor_parallel_size, pipeline_parallel=args.pipeline_parallel_size,
        data_parallel=args.data_parallel_size, quantization=args.quantization, kv_cache_dtype=args.kv_cache_dtype,
        max_concurrency=args.max_num_seqs, max_batched_tokens=args.max_num_batched_tokens,
        chunked_prefill=args.enable_chunked_prefill, prefix_caching=args.enable_prefix_caching,
        memory_fraction=args.gpu_memory_utilization, kv_block_size=args.block_size, max_model_len=args.max_model_len,
        speculative_method=args.speculative_method, speculative_tokens=args.num_speculative_tokens,
        speculative_acceptance=args.speculative_acceptance, speculative_lookup_min=args.prompt_lookup_min,
        speculative_lookup_max=args.prompt_lookup_max, enforce_eager=args.enforce_eager, seed=args.seed,
        lookup_step_s=args.lookup_step_ms / 1e3)


def load_model(model: str) -> ModelShape:
    """--model is a checkpoint directory (or config.json) when such a path exists, else a preset name."""
    if os.path.exists(model):
        return ModelShape.load(path=model)
    return ModelShape.load(preset=model)


async def serve(args: argparse.Namespace) -> int:
    """Run until SIGTERM/SIGINT (exit 0) or a startup failure (exit 1)."""
    try:
        shape = load_model(args.model)
        get_gpu(args.gpu).with_memory(args.gpu_memory_gib)
        cfg = config_from_args(args)
        cfg.validate(shape)
        if not 0.0 <= args.copy_edit_rate <= 1.0:
            raise SimConfigError(f"copy_edit_rate must be in [0, 1], got {args.copy_edit_rate}.")
    except (ValueError, OSError) as e:
        log.error("%s: %s", type(e).__name__ if not isinstance(e, SimConfigError) else "ValueError", e)
        return 1
    log.info("Initializing sim engine with config: model=%r, served_model_name=%r, gpu=%s, tensor_parallel_size=%d, "
             "pipeline_parallel_size=%d, data_parallel_size=%d, quantization=%s, kv_cache_dtype=%s, max_num_seqs=%d, "
             "max_num_batched_tokens=%d, enable_chunked_prefill=%s, enable_prefix_caching=%s, "
             "gpu_memory_utilization=%s, block_size=%d, speculative=%s", args.model,
             args.served_model_name or args.model, args.gpu, cfg.tensor_parallel, cfg.pipeline_parallel,
             cfg.data_parallel, cfg.quantization, cfg.kv_cache_dtype, cfg.max_concurrency, cfg.max_batched_tokens,
             cfg.chunked_prefill, cfg.prefix_caching, cfg.memory_fraction, cfg.kv_block_size,
             f"{cfg.speculative_method}(k={cfg.speculative_tokens}, acceptance={cfg.acceptance})"
             if cfg.spec_enabled else "none")
    server = SimServer(args, shape, cfg)
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)

    runner = web.AppRunner(server.app, access_log=None, handle_signals=False, shutdown_timeout=1.0)
    await runner.setup()
    try:
        site = web.TCPSite(runner, args.host, args.port, shutdown_timeout=1.0)
        await site.start()
    except OSError as e:
        log.error("could not bind %s:%s: %s", args.host, args.port, e)
        await runner.cleanup()
        return 1
    log.info("Starting sim server on http://%s:%d (health 503 until the engine is loaded)", args.host, args.port)
    code = 0
    try:
        if args.startup_delay_s > 0:
            try:
                await asyncio.wait_for(stop.wait(), timeout=args.startup_delay_s)
            except asyncio.TimeoutError:
                pass
        if not stop.is_set():
            try:
                server.start_engine()
            except SimStartupError as e:
                log.error("EngineCore failed to start.\n%s", e)
                code = 1
                stop.set()
            else:
                log.info("Application startup complete. Ready in %.2f s.", server.startup_s)
        await stop.wait()
        if code == 0:
            log.info("Shutting down")
    finally:
        await server.stop_engine()
        await runner.cleanup()
    return code


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(stream=sys.stderr, level=getattr(logging, args.log_level.upper()),
                        format="%(levelname)s %(asctime)s [sim] %(message)s", datefmt="%m-%d %H:%M:%S")
    logging.getLogger("aiohttp").setLevel(logging.WARNING)
    try:
        return asyncio.run(serve(args))
    except KeyboardInterrupt:
        return 0
