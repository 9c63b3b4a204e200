"""A fault-injecting OpenAI-compatible engine, started by real studies in place of the sim.

Use it as the sim's command in a study (``engines: [{name: sim, command: ["{python}", ".../fake_engine.py",
"--fault", "oom"]}]``): it accepts the sim's argv (``--model --served-model-name --host --port`` and the
sim flags) and ignores what it does not know. The fault is ``--fault MODE``, or, with ``--fault-by-seqs``, the
mode whose 1-based index in ``MODES`` equals ``--max-num-seqs`` (a study's ``max_concurrency: [1, 2, ...]``
dimension picks the fault), or, with ``--fault-by-trial``, ``MODES[N]`` for trial N (read from the path of
``trials/NNNN/engine.log``, its stdout), so one study of ``len(MODES)`` trials meets every fault once:

    ok              a healthy streaming server
    crash_start     prints a traceback-like error and exits 1 before ever being healthy
    crash_mid_load  healthy, then exits 1 after serving --crash-after requests (a worker child is left
                    running in the group unless the group is killed)
    hang            never opens its port and never exits
    no_tokens       healthy, but every completion stream ends without a single token
    oom             prints a CUDA OOM message like vLLM's and exits 1
    bad_flag        argparse refuses an unknown flag (exit 2)
    port_taken      the port it was given is already bound by another socket: exits 1 with EADDRINUSE
    sigterm_ignored a healthy server that ignores SIGTERM (only SIGKILL stops it)
    http500         healthy, but every completion answers HTTP 500
    fatal_log       healthy-looking process that prints a worker's fatal line and never turns healthy

``--print-env`` prints the whole environment to the log at start (the secret-redaction test), and
``--spawn-child`` starts a child process in the same process group, like an engine's worker.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import socket
import subprocess
import sys
import time

MODES = ["ok", "crash_start", "crash_mid_load", "hang", "no_tokens", "oom", "bad_flag", "port_taken",
         "sigterm_ignored", "http500", "fatal_log"]


def parse(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="fake_engine.py", allow_abbrev=False)
    p.add_argument("--model", default="fake")
    p.add_argument("--served-model-name", default=None)
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--max-num-seqs", type=int, default=0)
    p.add_argument("--fault", default="ok", choices=MODES)
    p.add_argument("--fault-by-seqs", action="store_true")
    p.add_argument("--fault-by-trial", action="store_true")
    p.add_argument("--crash-after", type=int, default=3)
    p.add_argument("--startup-delay-s", type=float, default=0.2)
    p.add_argument("--tpot-s", type=float, default=0.002)
    p.add_argument("--print-env", action="store_true")
    p.add_argument("--spawn-child", action="store_true")
    p.add_argument("--secret-in-error", action="store_true", help="crash_start: the error line quotes $HF_TOKEN")
    p.add_argument("--secret-var", default="HF_TOKEN", help="the variable --secret-in-error quotes")
    args, unknown = p.parse_known_args(argv)
    if args.fault_by_trial:  # stdout is trials/NNNN/engine.log: trial N gets MODES[N]
        n = int(os.path.basename(os.path.dirname(os.readlink("/proc/self/fd/1"))))
        args.fault = MODES[n % len(MODES)]
    if args.fault_by_seqs and 1 <= args.max_num_seqs <= len(MODES):
        args.fault = MODES[args.max_num_seqs - 1]
    if args.fault == "bad_flag":
        p.parse_args(argv + ["--no-such-flag"])  # argparse prints "error: unrecognized arguments" and exits 2
    args.unknown = unknown
    return args


def log(msg: str) -> None:
    print(f"INFO {time.strftime('%H:%M:%S')} {msg}", flush=True)


def main(argv: list[str] | None = None) -> int:
    args = parse(sys.argv[1:] if argv is None else argv)
    log(f"fake engine pid {os.getpid()} fault={args.fault} port={args.port} ignored={args.unknown}")
    if args.print_env:
        for k, v in sorted(os.environ.items()):
            print(f"ENV {k}={v}", flush=True)
    if args.spawn_child or args.fault == "crash_mid_load":
        # a "worker": same process group, outlives its parent unless the group is killed
        subprocess.Popen([sys.executable, "-c", "import time\nwhile True: time.sleep(1)"],
                         stdin=subprocess.DEVNULL)
    time.sleep(args.startup_delay_s)
    if args.fault == "crash_start":
        if args.secret_in_error:
            print(f"ERROR 401 Unauthorized: token {os.environ.get(args.secret_var, '')} may not read this repo",
                  flush=True)
            return 1
        print("Traceback (most recent call last):\n  File \"fake.py\", line 1, in <module>\n"
              "RuntimeError: fake engine failed while loading weights", flush=True)
        return 1
    if args.fault == "oom":
        print("torch.OutOfMemoryError: CUDA out of memory. Tried to allocate 2.00 GiB. GPU 0 has a total "
              "capacity of 79.19 GiB of which 1.06 GiB is free.", flush=True)
        return 1
    if args.fault == "hang":
        log("loading weights ...")
        while True:
            time.sleep(1)
    if args.fault == "fatal_log":
        print("ERROR RuntimeError: CUDA error: an illegal memory access was encountered", flush=True)
        while True:
            time.sleep(1)
    if args.fault == "sigterm_ignored":
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
    squatter = None
    if args.fault == "port_taken":
        squatter = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        squatter.bind((args.host, args.port))  # "another process" already holds the port
        squatter.listen(1)
    try:
        asyncio.run(serve(args))
    except OSError as e:
        print(f"ERROR [Errno {e.errno}] error while attempting to bind on address "
              f"('{args.host}', {args.port}): {e.strerror}", flush=True)
        return 1
    return 0


async def serve(args: argparse.Namespace) -> None:
    # only the faults that serve need aiohttp (~0.2 s to import); the crash/oom/hang faults, which the reliability
    # tests time, exit or hang before this
    from aiohttp import web  # noqa: PLC0415 — start-up: only the faults that serve pay for aiohttp

    name = args.served_model_name or args.model
    state = {"requests": 0, "tokens": 0}

    async def health(request):
        return web.Response(text="ok")

    async def models(request):
        return web.json_response({"object": "list", "data": [{"id": name, "object": "model"}]})

    async def metrics(request):
        return web.Response(text=f"# TYPE fake_requests_total counter\nfake_requests_total {state['requests']}\n"
                                 f"# TYPE fake_tokens_total counter\nfake_tokens_total {state['tokens']}\n")

    async def generate(request):
        body = await request.json()
        state["requests"] += 1
        if args.fault == "crash_mid_load" and state["requests"] > args.crash_after:
            print("ERROR fake engine core died under load: RuntimeError: worker died", flush=True)
            os._exit(1)
        if args.fault == "http500":
            return web.json_response({"error": {"message": "fake internal error", "code": 500}}, status=500)
        chat = "messages" in body
        n = 0 if args.fault == "no_tokens" else int(body.get("max_tokens") or 16)
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await resp.prepare(request)
        obj = "chat.completion.chunk" if chat else "text_completion"
        for i in range(n):
            choice = {"index": 0, "delta": {"content": " tok"}} if chat else {"index": 0, "text": " tok"}
            choice["finish_reason"] = "length" if i == n - 1 else None
            await resp.write(f"data: {json.dumps({'id': 'x', 'object': obj, 'model': name, 'choices': [choice]})}\n\n"
                             .encode())
            state["tokens"] += 1
            await asyncio.sleep(args.tpot_s)
        if (body.get("stream_options") or {}).get("include_usage"):
            usage = {"prompt_tokens": 1, "completion_tokens": n, "total_tokens": n + 1}
            last = {'id': 'x', 'object': obj, 'model': name, 'choices': [], 'usage': usage}
            await resp.write(f"data: {json.dumps(last)}\n\n".encode())
        await resp.write(b"data: [DONE]\n\n")
        await resp.write_eof()
        return resp

    app = web.Application()
    app.router.add_get("/health", health)
    app.router.add_get("/v1/models", models)
    app.router.add_get("/metrics", metrics)
    app.router.add_post("/v1/completions", generate)
    app.router.add_post("/v1/chat/completions", generate)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, args.host, args.port, reuse_address=False)
    await site.start()
    log(f"serving on http://{args.host}:{args.port}")
    while True:
        await asyncio.sleep(3600)


if __name__ == "__main__":
    sys.exit(main())
