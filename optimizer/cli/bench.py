"""``servetune bench``: one load-generator run (or a load sweep) against any OpenAI-compatible server.

    servetune bench --url http://127.0.0.1:8000 --model NAME --scenario server --qps 20 --duration 60 \\
        --input-tokens 1024 --output-tokens 256 --sla llama3.1-8b -o out/

writes ``out/result.json`` (settings, summary, verdict per level; sweeps add the best rate or the Pareto
points) and ``out/requests.parquet`` (or ``.csv``) with one row per request, a ``level`` column telling
sweep levels apart.

Modes: one scenario run (default); ``--find-max-qps --qps-lo L --qps-hi H`` (the highest valid
server/interactive rate, :func:`servetune.loadgen.search.find_max_qps`); ``--concurrency N`` (the
fixed-concurrency scenario) or ``--concurrency 1,2,4,8`` (a sweep, tokens/s/GPU vs tokens/s/user).

Secrets: a header value may name environment variables as ``${NAME}`` (``--header 'Authorization: Bearer
${TOKEN}'``); they are resolved here, sent on the wire, and never written to result.json or printed:
results keep header names only, and the recorded command line masks header values and URL credentials.

Exit status: 0 when the run completed (valid or not; the verdict is in result.json and printed), 2 for
bad arguments or inputs, 1 when no request succeeded at all.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import pandas as pd
from rich.console import Console

from servetune.loadgen import datasets
from servetune.loadgen.audit import MAX_PREFIX_HIT_FRACTION, Auditor
from servetune.loadgen.endpoint import Endpoint, _redact_url
from servetune.loadgen.scenario_kinds import (  # the registry, not loadgen.scenarios: no aiohttp
    SCENARIOS,
    ScenarioKind,
    level_key,
)
from servetune.loadgen.sla import SLA_PRESETS
from servetune.optimizer import secret_refs
from servetune.optimizer.cli.command import Command, run_alone
from servetune.optimizer.cli.common import EXIT_USAGE
from servetune.optimizer.engines.probe import probe_for_server
from servetune.optimizer.progress import BenchProgress


class UsageError(Exception):
    pass


def resolve_header(text: str, environ: dict[str, str] | None = None) -> tuple[str, str]:
    """``'Name: value'`` with ``${VAR}`` references resolved from the environment."""
    env = os.environ if environ is None else environ
    name, sep, value = text.partition(":")
    name, value = name.strip(), value.strip()
    if not sep or not name or any(c.isspace() for c in name):
        raise UsageError(f"--header must look like 'Name: value', got a header named {name!r}")
    missing = [m for m in secret_refs.ENV_REF.findall(value) if m not in env]
    if missing:
        raise UsageError(f"--header {name}: environment variable(s) not set: {', '.join(missing)}")
    return name, secret_refs.ENV_REF.sub(lambda m: env[m.group(1)], value)


def redacted_argv(argv: Sequence[str]) -> list[str]:
    """The command line as recorded: header values masked, credentials and query stripped from URLs."""
    out, mask_next, url_next = [], False, False
    for a in argv:
        if mask_next or url_next:
            out.append(_mask_header(a) if mask_next else _redact_url(a))
            mask_next = url_next = False
            continue
        if a == "--header":
            mask_next = True
        elif a.startswith("--header="):
            a = "--header=" + _mask_header(a[len("--header="):])
        elif a == "--url":
            url_next = True
        elif a.startswith("--url="):
            a = "--url=" + _redact_url(a[len("--url="):])
        out.append(a)
    return out


def _mask_header(text: str) -> str:
    return text.partition(":")[0].strip() + ": ***"


def _csv_ints(text: str) -> list[int]:
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected integers separated by commas, got {text!r}") from None
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"concurrency levels must be >= 1, got {text!r}")
    return values


def _keep_up_arg(text: str) -> float | None:
    if text.strip().lower() in ("off", "none"):
        return None
    value = float(text)
    if not 0.0 <= value <= 1.0:
        raise argparse.ArgumentTypeError(f"a ratio in [0, 1] or 'off', got {text!r}")
    return value


def add_cli_args(b: argparse.ArgumentParser) -> None:
    """``bench``'s arguments (building them imports no aiohttp: ``servetune --help`` stays quick)."""
    t = b.add_argument_group("target")
    t.add_argument("--url", required=True, help="server base URL, e.g. http://127.0.0.1:8000 (a trailing /v1 is fine)")
    t.add_argument("--model", required=True, help="served model name (sent as 'model')")
    t.add_argument("--api", choices=("completions", "chat"), default="completions")
    t.add_argument("--header", action="append", default=[], metavar="'NAME: VALUE'",
                   help="extra request header; ${VAR} in the value is read from the environment (repeatable)")
    t.add_argument("--request-timeout", type=float, default=600.0, help="seconds per request (default 600)")
    t.add_argument("--extra-body", default=None, metavar="JSON",
                   help="JSON object merged into every request body (sampling parameters, ...)")
    s = b.add_argument_group("scenario")
    s.add_argument("--scenario", choices=SCENARIOS, default=None,
                   help="default: server with --qps, concurrency with --concurrency, else offline")
    s.add_argument("--qps", type=float, help="arrival rate for server/interactive")
    s.add_argument("--arrival", choices=("poisson", "constant", "poisson_exact"), default="poisson",
                   help="poisson_exact: Poisson gaps rescaled so the run's mean rate is exactly --qps (as vllm bench "
                        "serve does)")
    s.add_argument("--arrival-trace", metavar="FILE",
                   help="replay these issue times instead of drawing arrivals: a JSON list of seconds, or a "
                        "result with 'start_times' (vllm bench serve --save-result); two clients compared on one "
                        "server then meet the same bursts. --qps and --num-requests default to the trace's")
    s.add_argument("--duration", type=float, help="minimum run length in seconds")
    s.add_argument("--num-requests", type=int, help="minimum number of measured requests")
    s.add_argument("--concurrency", type=_csv_ints, metavar="N[,N...]",
                   help="fixed-concurrency scenario; several values run a concurrency sweep")
    s.add_argument("--max-connections", type=int, help="cap on outstanding requests (offline/server)")
    s.add_argument("--warmup", type=int, default=0, help="warmup requests, excluded from metrics")
    s.add_argument("--workers", type=int, default=1, help="load-generator processes (default 1)")
    s.add_argument("--timeout", type=float, default=None, help="bound on one scenario run in seconds "
                   "(default: 3 x duration + request timeout)")
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--equal-issue", action="store_true", help="round the request count up to whole dataset passes")
    s.add_argument("--num-gpus", type=int, default=1, help="GPUs serving (for tokens/s/GPU)")
    v = b.add_argument_group("limits and validity")
    v.add_argument("--sla", choices=sorted(SLA_PRESETS), metavar="PRESET",
                   help="MLPerf latency preset: " + ", ".join(SLA_PRESETS) + " (the interactive scenario picks "
                        "the -interactive limits)")
    v.add_argument("--ttft-ms", type=float, help="p99 TTFT limit (overrides the preset's)")
    v.add_argument("--tpot-ms", type=float, help="p99 TPOT limit (overrides the preset's)")
    v.add_argument("--no-early-stopping", action="store_true",
                   help="report an early-stopping shortfall as a note instead of invalidating the run")
    v.add_argument("--max-error-rate", type=float, default=0.01)
    v.add_argument("--min-keep-up", type=_keep_up_arg, default=argparse.SUPPRESS, metavar="RATIO|off",
                   help="server/interactive: invalidate a run whose backlog grows (departures ÷ arrivals over the "
                        "second half below RATIO) or that is shorter than twice its median request (default 0.7)")
    q = b.add_argument_group("max-QPS search")
    q.add_argument("--find-max-qps", action="store_true", help="search the highest valid server/interactive rate")
    q.add_argument("--qps-lo", type=float, help="search bracket low end (default: --qps or 1)")
    q.add_argument("--qps-hi", type=float, help="search bracket high end")
    q.add_argument("--qps-tolerance", type=float, default=0.05, help="relative (default 0.05)")
    q.add_argument("--max-levels", type=int, default=10)
    q.add_argument("--max-level-duration", type=float, metavar="S",
                   help="a level too short to judge runs once more for 2.2× its median request, up to S seconds "
                        "(default: 3× --duration)")
    q.add_argument("--qps-floor", type=float, metavar="R",
                   help="when --qps-lo is not valid, halve the rate down to R before calling the SLA missed "
                        "(default: --qps-lo / 16)")
    d = b.add_argument_group("dataset")
    d.add_argument("--dataset", choices=("random", "sharegpt", "token_ids", "prompts"), default="random",
                   help="prompts: a file's text prompts sent as listed, repeats included (another client's, to "
                        "compare on the same requests); their output budget is --output-tokens unless a record "
                        "sets max_tokens")
    d.add_argument("--dataset-path", help="file for sharegpt / token_ids / prompts")
    d.add_argument("--dataset-size", type=int, default=None,
                   help="samples (random: default the larger of 1000 and --num-requests; sharegpt: all usable)")
    d.add_argument("--prompt-format", choices=("auto", "text", "token_ids"), default="auto",
                   help="random prompts as text (the server tokenizes them inside TTFT, as for real clients) or as "
                        "token ids (MLPerf's harness); auto: text when a tokenizer is found, else token ids")
    d.add_argument("--tokenizer", metavar="PATH",
                   help="model directory or tokenizer.json for exact-length prompts (default: --model, when it is "
                        "a directory holding tokenizer.json)")
    d.add_argument("--shared-prefix-tokens", type=int, default=0, metavar="N",
                   help="random: every prompt starts with the same N tokens (a declared prefix-cache workload)")
    d.add_argument("--replay", action="store_true",
                   help="send a sample's prompt again when it is issued again (default: every request is unique)")
    d.add_argument("--input-tokens", type=int, default=1024)
    d.add_argument("--output-tokens", type=int, default=256)
    d.add_argument("--input-range", type=float, default=0.0)
    d.add_argument("--output-range", type=float, default=0.0)
    d.add_argument("--max-output-tokens", type=int, help="sharegpt: cap each sample's output budget")
    eos = d.add_mutually_exclusive_group()
    eos.add_argument("--ignore-eos", dest="ignore_eos", action="store_true", default=None,
                     help="ask for exactly max_tokens (default for random data)")
    eos.add_argument("--no-ignore-eos", dest="ignore_eos", action="store_false",
                     help="let the model stop at EOS (default for sharegpt / token_ids)")
    a = b.add_argument_group("audit (the server's own /metrics, when it exposes vLLM's or SGLang's)")
    a.add_argument("--no-audit", action="store_true", help="do not compare the run with the server's /metrics")
    a.add_argument("--metrics-url", help="where the server's Prometheus metrics are (default: URL/metrics)")
    a.add_argument("--allow-prefix-hits", action="store_true",
                   help="the workload shares prefixes on purpose: prefix-cache hits are measured, not a reason")
    o = b.add_argument_group("output")
    o.add_argument("-o", "--output-dir", required=True)
    o.add_argument("--records-format", choices=("parquet", "csv"), default="parquet")
    o.add_argument("--quiet", action="store_true")


@dataclass
class BenchCommand(Command):
    name = "bench"
    help = "run a load scenario against any OpenAI-compatible server"
    description = ("Run an MLPerf-style scenario (or a max-QPS search / concurrency sweep) against a "
                   "running OpenAI-compatible server and write result.json + per-request records.")

    # ~40 load-generator options travel as parsed: loadgen's ScenarioSettings and datasets are their typed homes
    args: argparse.Namespace

    @classmethod
    def add_cli_args(cls, parser: argparse.ArgumentParser) -> None:
        add_cli_args(parser)

    @classmethod
    def from_cli_args(cls, args: argparse.Namespace) -> BenchCommand:
        return cls(args)

    def run(self) -> int:
        return cmd_bench(self.args)


def _tokenizer(args: argparse.Namespace):
    """The tokenizer random prompts are built with: --tokenizer, else --model when it is a model directory."""
    # CLI start-up time: the tokenizers library (8-50 ms, measured)
    from servetune.loadgen.tokenizer import PromptTokenizer, find_tokenizer  # noqa: PLC0415 — CLI start-up time
    if args.tokenizer:
        return PromptTokenizer(args.tokenizer)
    return PromptTokenizer(args.model) if find_tokenizer(args.model) else None


def _prompt_format(args: argparse.Namespace, tokenizer) -> str:
    if args.api == "chat":
        if args.prompt_format == "token_ids":
            raise UsageError("the chat API sends text: use --prompt-format text (or auto) with --api chat")
        return "text"
    if args.prompt_format != "auto":
        return args.prompt_format
    return "text" if tokenizer is not None else "token_ids"


def _dataset(args: argparse.Namespace):
    if args.dataset != "random" and (args.shared_prefix_tokens or args.prompt_format != "auto"):
        raise UsageError("--shared-prefix-tokens and --prompt-format shape random prompts; "
                         f"--dataset {args.dataset} sends the file's prompts as they are")
    if args.dataset == "random":
        tokenizer = _tokenizer(args)
        fmt = _prompt_format(args, tokenizer)
        # one sample per request by default: reissued samples would be marked variants anyway (runner),
        # but unmarked prompts keep every length exactly what was asked
        size = args.dataset_size or max(1000, args.num_requests or 0)
        reqs = datasets.random_dataset(size, args.input_tokens, args.output_tokens, input_range=args.input_range,
                                       output_range=args.output_range, seed=args.seed, prompt_format=fmt,
                                       tokenizer=tokenizer, shared_prefix_tokens=args.shared_prefix_tokens)
        return reqs, tokenizer
    if not args.dataset_path:
        raise UsageError(f"--dataset {args.dataset} needs --dataset-path")
    if args.dataset == "prompts":
        tokenizer = _tokenizer(args)
        reqs = datasets.prompt_file_dataset(args.dataset_path, args.output_tokens, tokenizer=tokenizer)
        return (reqs[:args.dataset_size] if args.dataset_size else reqs), tokenizer
    if args.dataset == "sharegpt":
        return datasets.sharegpt_dataset(args.dataset_path, args.dataset_size, seed=args.seed,
                                         max_output_tokens=args.max_output_tokens), None
    reqs = datasets.token_id_dataset(args.dataset_path)
    if args.api == "chat":
        raise UsageError("--dataset token_ids sends token ids: use --api completions")
    return (reqs[:args.dataset_size] if args.dataset_size else reqs), None


def _settings(args: argparse.Namespace):
    from servetune.loadgen.scenarios import ScenarioSettings  # noqa: PLC0415 — CLI start-up time (aiohttp)

    kind = args.scenario or ("concurrency" if args.concurrency else "server" if (args.qps or args.find_max_qps)
                             else "offline")
    open_loop = ScenarioKind.get(kind).open_loop
    if args.find_max_qps and not open_loop:
        raise UsageError("--find-max-qps searches a server or interactive scenario")
    closed = level_key(kind) == "concurrency"
    if args.concurrency and not closed:
        raise UsageError(f"--concurrency runs the concurrency scenario, not {kind}")
    if closed and not args.concurrency:
        raise UsageError("the concurrency scenario needs --concurrency N")
    qps = args.qps
    if args.find_max_qps:
        qps = qps or args.qps_lo or 1.0
    trace = _arrival_trace(args.arrival_trace) if args.arrival_trace else None
    if trace is not None and (args.find_max_qps or not open_loop):
        raise UsageError("--arrival-trace replays one server or interactive run (no --find-max-qps)")
    timeout = args.timeout or (3 * (args.duration or 60.0) + args.request_timeout)
    return ScenarioSettings(
        kind=kind, qps=qps if open_loop else None, duration_s=args.duration,
        num_requests=args.num_requests, max_connections=args.max_connections, warmup_requests=args.warmup,
        timeout_s=timeout, ttft_limit_ms=args.ttft_ms, tpot_limit_ms=args.tpot_ms, seed=args.seed,
        num_gpus=args.num_gpus, equal_issue=args.equal_issue, require_early_stopping=not args.no_early_stopping,
        max_error_rate=args.max_error_rate, concurrency=args.concurrency[0] if args.concurrency else None,
        workers=args.workers, sla=args.sla, ignore_eos=args.ignore_eos, arrival="trace" if trace else args.arrival,
        arrival_times=trace, replay=args.replay,
        shared_prefix_tokens=args.shared_prefix_tokens,
        **({"min_keep_up": args.min_keep_up} if "min_keep_up" in args else {}))  # else loadgen's default


def _arrival_trace(path: str) -> list[Any]:
    """Issue times from a JSON file: a list of seconds, or an object whose ``start_times`` are (vLLM's result
    file holds each request's start as a perf-counter reading: only the differences mean anything)."""
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise UsageError(f"--arrival-trace {path}: {e}") from None
    times = data.get("start_times") if isinstance(data, dict) else data
    if not isinstance(times, list):
        raise UsageError(f"--arrival-trace {path}: want a list of seconds, or an object with one under 'start_times'")
    return times  # the numbers are ScenarioSettings' to check

def _fmt(v: Any, digits: int = 1) -> str:
    if isinstance(v, float):
        return "-" if math.isnan(v) else f"{v:.{digits}f}"
    return str(v)


def _line(res) -> str:
    s = res.summary
    qps = f"qps={_fmt(res.settings.get('qps'), 2)}"
    label = {"server": qps, "interactive": qps,
             "concurrency": f"concurrency={res.settings.get('concurrency')}"}.get(res.scenario, res.scenario)
    verdict = "VALID" if res.valid else "INVALID: " + "; ".join(res.invalid_reasons)
    return (f"{label}: {int(s['requests_ok'])}/{int(s['requests_issued'])} ok, "
            f"{_fmt(s['request_per_s'], 2)} req/s, {_fmt(s['output_tokens_per_s'])} out tok/s, "
            f"TTFT p99 {_fmt(s['ttft_p99_ms'])} ms, TPOT p99 {_fmt(s['tpot_p99_ms'], 2)} ms, "
            f"lag p99 {_fmt(s['schedule_lag_p99_ms'], 2)} ms — {verdict}")


def _auditor(args: argparse.Namespace):
    """(the level auditor or None, what result.json says about the audit)."""
    if args.no_audit:
        return None, {"how": "off (--no-audit)"}
    url = args.metrics_url or args.url.rstrip("/").removesuffix("/v1") + "/metrics"
    probe, how = probe_for_server(url)
    how = how.replace(url, _redact_url(url))
    if probe is None:
        return None, {"how": how}
    # A server started elsewhere: no engine log to read (JIT and compile lines cannot be checked), and no
    # warm-up before a re-run but the failed run itself.
    declared = args.allow_prefix_hits or args.replay or args.shared_prefix_tokens  # reuse asked for: no limit
    return (Auditor(probe, max_prefix_hit_fraction=None if declared else MAX_PREFIX_HIT_FRACTION),
            {"how": how + "; no engine log here, so JIT and compile lines are not checked", "engine_log": False})


def _audit_line(a: dict[str, Any]) -> str:
    s, c = a.get("server") or {}, a.get("client") or {}
    if not s:
        return "audit: " + "; ".join(a.get("notes") or ["nothing read"])
    hits = s.get("prefix_cache_hits")
    bits = [f"server counted {s.get('prompt_tokens', float('nan')):,.0f} prompt / "
            f"{s.get('generation_tokens', float('nan')):,.0f} output tokens (client {c.get('prompt_tokens', 0):,.0f} / "
            f"{c.get('generation_tokens', 0):,.0f})"]
    if hits is not None and s.get("prompt_tokens"):
        bits.append(f"prefix-cache hits {hits / s['prompt_tokens']:.1%}")
    if s.get("kv_cache_usage_peak") is not None:
        bits.append(f"KV cache peak {s['kv_cache_usage_peak']:.0%}")
    if s.get("preemptions"):
        bits.append(f"{s['preemptions']:,.0f} preemptions")
    verdict = "passed" if a.get("passed") else "FAILED: " + "; ".join(a.get("reasons") or [])
    if a.get("rerun_of"):
        verdict += " (after one re-run)"
    return f"audit {verdict} — {', '.join(bits)}"


def _single(endpoint, requests, settings, auditor: Auditor | None, *, fresh: bool):
    """One run of the dataset as given. When its audit fails (e.g. an earlier run with the same --seed left
    these prompts in the server's prefix cache), a generated dataset is run once more with fresh prompts, a
    marked variant as the levels of a search send; a file's prompts have nothing fresh to re-run with, so
    their audit is recorded only."""
    from servetune.loadgen.scenarios import run  # noqa: PLC0415 — CLI start-up time (aiohttp)
    from servetune.loadgen.search import level_variant  # noqa: PLC0415 — CLI start-up time (aiohttp)

    sent = 0

    def once():
        nonlocal sent
        reqs = requests if sent == 0 else level_variant(requests, sent)
        sent += 1
        return run(endpoint, reqs, settings)

    if auditor is None:
        return once()
    if not fresh:
        return auditor.run_level(once)
    auditor.recheck_first = False  # a bench run is judged as measured: only a failed audit is run again
    return auditor.measure(once, settings)


def cmd_bench(args: argparse.Namespace) -> int:
    try:
        return _bench(args)
    except UsageError as e:
        print(f"servetune bench: error: {e}", file=sys.stderr)
        return EXIT_USAGE


def _bench(args: argparse.Namespace) -> int:
    from servetune.loadgen.scenarios import records_frame, write_frame  # noqa: PLC0415 — CLI start-up time (aiohttp)
    from servetune.loadgen.search import (  # noqa: PLC0415 — CLI start-up time (aiohttp)
        concurrency_sweep,
        find_max_qps,
        longest_level_s,
    )

    headers = dict(resolve_header(h) for h in args.header)
    extra: dict[str, Any] = {}
    if args.extra_body:
        try:
            extra = json.loads(args.extra_body)
        except json.JSONDecodeError as e:
            raise UsageError(f"--extra-body is not JSON: {e}") from None
        if not isinstance(extra, dict):
            raise UsageError("--extra-body must be a JSON object")
    try:
        endpoint = Endpoint(base_url=args.url, model=args.model, api=args.api, headers=headers,
                            request_timeout_s=args.request_timeout, extra_body=extra)
        settings = _settings(args)
        requests, tokenizer = _dataset(args)
    except ValueError as e:
        raise UsageError(str(e)) from None
    if args.find_max_qps and not args.qps_hi:
        raise UsageError("--find-max-qps needs --qps-hi")

    out = Path(args.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    say = (lambda *_: None) if args.quiet else (lambda text: print(text, flush=True))
    doc: dict[str, Any] = {
        "command": ["servetune", *redacted_argv(sys.argv[1:])],
        "endpoint": endpoint.describe(),
        "dataset": {"kind": args.dataset, "size": len(requests), "path": args.dataset_path,
                    "input_tokens": args.input_tokens if args.dataset == "random" else None,
                    "output_tokens": args.output_tokens if args.dataset == "random" else None,
                    "ignore_eos": settings.ignore_eos if settings.ignore_eos is not None
                    else sorted({r.ignore_eos for r in requests}),
                    "prompt_format": datasets.prompt_format_of(requests),
                    "tokenizer": tokenizer.path if tokenizer is not None else None,
                    "replay": settings.replay, "shared_prefix_tokens": settings.shared_prefix_tokens},
    }
    reuse = ("a reissued sample sends its prompt again (--replay)" if settings.replay
             else "every request unique")
    if settings.shared_prefix_tokens:
        reuse += f", {settings.shared_prefix_tokens} shared prefix tokens"
    say(f"servetune bench: {settings.kind} against {endpoint.describe()['base_url']} ({args.model}), "
        f"{len(requests)} samples, {doc['dataset']['prompt_format']} prompts"
        + (f" (tokenizer {tokenizer.path})" if tokenizer is not None else "") + f", {reuse}")
    auditor, doc["audit"] = _auditor(args)
    say(f"audit: {doc['audit']['how']}")
    sweep = bool(args.concurrency and len(args.concurrency) > 1)
    levels = args.max_levels if args.find_max_qps else len(args.concurrency) if sweep else 1
    with BenchProgress(_console(args.quiet), levels=levels, bounded=bool(args.find_max_qps)):
        if args.find_max_qps:
            lo = args.qps_lo or settings.qps
            if args.qps_floor is not None and not 0 < args.qps_floor <= lo:
                raise UsageError(f"--qps-floor must be in (0, {lo:g}] (the lowest rate tried below --qps-lo)")
            sr = find_max_qps(endpoint, requests, settings, lo, args.qps_hi, args.qps_tolerance, args.max_levels,
                              max_level_duration_s=longest_level_s(settings, args.max_level_duration),
                              floor=args.qps_floor, auditor=auditor)
            results = sr.levels
            doc.update(mode="find_max_qps", best_qps=sr.best_qps, stopped_because=sr.stopped_because,
                       bracket=list(sr.bracket), runs=sr.runs, floor=sr.floor)
        elif sweep:
            sw = concurrency_sweep(endpoint, requests, settings, args.concurrency, auditor=auditor)
            results = sw.levels
            doc.update(mode="concurrency_sweep", points=sw.points())
        else:
            results = [_single(endpoint, requests, settings, auditor,
                               fresh=args.dataset == "random" and not settings.replay)]
            doc.update(mode="single")
    doc["results"] = [r.to_dict() for r in results]
    for r in results:
        say("  " + _line(r))
        if r.audit is not None:
            say("    " + _audit_line(r.audit))
    if args.find_max_qps:
        say(f"best valid rate: {_fmt(doc['best_qps'], 2)} req/s ({doc['stopped_because']})")
    if doc.get("points"):
        front = [p["concurrency"] for p in doc["points"] if p["pareto"]]
        say(f"pareto front (tokens/s/GPU vs tokens/s/user): concurrency {front}")

    frames = []
    for i, r in enumerate(results):
        f = records_frame(r.records)
        f.insert(0, "level", i)
        f.insert(1, "level_qps", r.settings.get("qps"))
        f.insert(2, "level_concurrency", r.settings.get("concurrency"))
        frames.append(f)
    frame = pd.concat(frames, ignore_index=True)
    rec_path = write_frame(frame, out / f"requests.{args.records_format}")
    doc["records_file"] = rec_path.name
    tmp = out / "result.json.tmp"
    tmp.write_text(json.dumps(doc, indent=1, default=_json_default, allow_nan=True))
    tmp.replace(out / "result.json")
    say(f"wrote {out / 'result.json'} and {rec_path}")
    any_ok = any(r.summary.get("requests_ok", 0) > 0 for r in results)
    return 0 if any_ok else 1


def _console(quiet: bool):
    """Progress goes to stderr (stdout keeps the results); --quiet silences it."""
    return Console(stderr=True, highlight=False, soft_wrap=True, quiet=quiet)


def _json_default(o: Any) -> Any:
    if hasattr(o, "item"):
        return o.item()
    return str(o)


def main(argv: list[str] | None = None) -> int:
    """``bench`` alone (tests, scripts): the same as ``servetune bench ...``."""
    return run_alone(BenchCommand, list(sys.argv[1:] if argv is None else argv))


if __name__ == "__main__":
    sys.exit(main())
