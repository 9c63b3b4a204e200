"""crosscheck.sh's helper: scrape a server's /metrics, and print the side-by-side table of the runs.

    crosscheck.py scrape URL FILE        the server's /metrics text into FILE
    crosscheck.py table OUT [--peer E]   OUT/runs.tsv's runs → table on stdout, OUT/crosscheck.md, .json
    crosscheck.py peer-prompts MODEL FILE --num N --input-tokens I --output-tokens O --seed S
                                         the prompts `vllm bench serve --dataset-name random --seed S` sends, as
                                         a JSON list that `servetune bench --dataset prompts` sends as listed

Each run is read three ways, so a difference between clients can be traced to its cause:

1. **own**: the numbers each client prints (its own definitions: servetune's TTFT counts from the scheduled
   send and its percentiles are nearest-rank; vLLM's and SGLang's count from the send, numpy percentiles).
2. **same definition**, recomputed here from each client's per-request data: TTFT from the actual send, TPOT
   = (last token − first token) / (output tokens − 1), throughput over first send → last token, numpy
   percentiles. A difference that vanishes here was one of definition.
3. **arrivals** and **server**: the rate the client really sent at and how bursty (CV of the gaps: 1 for
   Poisson), and the server's own counters and latency histograms between the scrapes: requests, prompt and
   generation tokens per request, prefix-cache hits, preemptions, the server's mean TTFT / queue / prefill /
   inter-token / end-to-end time. Client TTFT − server TTFT is the time outside the engine (HTTP, the
   server's tokenization of a text prompt, streaming, the client's own timing); server TTFT apart is load
   (queueing), not the client.

Field names of the peers' result files, read from their sources: ``vllm bench serve --save-result
--save-detailed`` (vllm/benchmarks/serve.py: ``request_throughput``, ``output_throughput``,
``mean_ttft_ms``, ``median_ttft_ms``, ``p99_ttft_ms``, ``mean_tpot_ms`` ..., per request ``ttfts``,
``latencies``, ``start_times``, ``output_lens``, ``input_lens``, ``errors``, in seconds); SGLang's
``bench_serving --output-file F --output-details`` (one JSON line per run, the same summary names, per
request ``ttfts``, ``itls``, ``output_lens``, ``errors``).
"""
from __future__ import annotations

import argparse
import csv
import gzip
import importlib.util
import json
import math
import sys
import urllib.request
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from servetune.loadgen.audit import MAX_PREFIX_HIT_FRACTION
from servetune.optimizer.engines.prometheus import parse_prometheus as _parse_prometheus


def scrape(url: str, path: str | Path) -> None:
    base = url.rstrip("/").removesuffix("/v1")
    with urllib.request.urlopen(base + "/metrics", timeout=15) as r:
        Path(path).write_bytes(r.read())


# --- per-request data of each client -------------------------------------------------------------------------

def _stats(values: list[float]) -> dict[str, float]:
    if not values:
        return {"mean": math.nan, "p50": math.nan, "p99": math.nan}
    a = np.asarray(values, dtype=float)
    return {"mean": float(a.mean()), "p50": float(np.percentile(a, 50)), "p99": float(np.percentile(a, 99))}


def _same(starts: list[float] | None, ttfts: list[float], lasts: list[float], outs: list[int]) -> dict[str, Any]:
    """Latencies in ms with one definition; ``lasts`` are last-token times from the send (s)."""
    tpots = [(last - t) / (o - 1) * 1000 for t, last, o in zip(ttfts, lasts, outs) if o > 1]
    out: dict[str, Any] = {"ttft": _stats([t * 1000 for t in ttfts]), "tpot": _stats(tpots)}
    if starts:
        span = max(s + last for s, last in zip(starts, lasts)) - min(starts)
        out["output_tokens_per_s"] = sum(outs) / span if span > 0 else math.nan
        gaps = np.diff(np.sort(np.asarray(starts, dtype=float)))
        out["arrival_rate"] = len(gaps) / float(np.sum(gaps)) if gaps.size and np.sum(gaps) > 0 else math.nan
        out["arrival_cv"] = float(np.std(gaps) / np.mean(gaps)) if gaps.size and np.mean(gaps) > 0 else math.nan
    else:
        out["output_tokens_per_s"] = out["arrival_rate"] = out["arrival_cv"] = math.nan
    return out


def load_servetune(path: Path) -> dict[str, Any]:
    doc = json.loads(path.read_text())
    res = doc["results"][0]
    s = res["summary"]
    own = {"requests_ok": s["requests_ok"], "request_per_s": s["request_per_s"],
           "output_tokens_per_s": s["output_tokens_per_s"],
           "ttft": {"mean": s["ttft_mean_ms"], "p50": s["ttft_p50_ms"], "p99": s["ttft_p99_ms"]},
           "tpot": {"mean": s["tpot_mean_ms"], "p50": s["tpot_p50_ms"], "p99": s["tpot_p99_ms"]},
           "ttft_from_send_mean": s.get("ttft_from_send_mean_ms"), "schedule_lag_mean": s.get("schedule_lag_mean_ms")}
    starts, ttfts, lasts, outs, ins = [], [], [], [], []
    records = path.parent / doc.get("records_file", "requests.csv")
    if not records.exists() and records.with_name(records.name + ".gz").exists():  # packed to travel
        records = records.with_name(records.name + ".gz")
    with (gzip.open(records, "rt", newline="") if records.suffix == ".gz" else open(records, newline="")) as f:
        for row in csv.DictReader(f):
            if row["status"] != "ok" or row["warmup"] == "True" or not row["first_byte_s"]:
                continue
            sent, first = float(row["sent_s"]), float(row["first_byte_s"])
            chunk_t = json.loads(row["chunk_t"]) if row.get("chunk_t") else []
            last = chunk_t[-1] if chunk_t else float(row["done_s"])
            starts.append(sent)
            ttfts.append(first - sent)
            lasts.append(last - sent)
            outs.append(int(row["output_tokens"]))
            ins.append(int(row["input_tokens"]))
    ds = doc.get("dataset", {})
    return {"own": own, "same": _same(starts, ttfts, lasts, outs), "client_input_tokens": _mean(ins),
            "prompt_format": ds.get("prompt_format") or res["settings"].get("prompt_format")}


def load_vllm(path: Path) -> dict[str, Any]:
    d = json.loads(path.read_text())
    own = {"requests_ok": d["completed"], "request_per_s": d["request_throughput"],
           "output_tokens_per_s": d["output_throughput"],
           "ttft": {"mean": d["mean_ttft_ms"], "p50": d.get("p50_ttft_ms", d["median_ttft_ms"]),
                    "p99": d["p99_ttft_ms"]},
           "tpot": {"mean": d["mean_tpot_ms"], "p50": d.get("p50_tpot_ms", d["median_tpot_ms"]),
                    "p99": d["p99_tpot_ms"]}}
    ok = [i for i, e in enumerate(d.get("errors") or [""] * len(d.get("ttfts") or [])) if not e] \
        if d.get("ttfts") else []
    t0 = d.get("start_times")
    # vLLM 0.26 saves no per-request end-to-end latency: last token = TTFT + the inter-token gaps, as for SGLang
    if "latencies" in d:
        lasts = [d["latencies"][i] for i in ok]
    elif "itls" in d:
        lasts = [d["ttfts"][i] + sum(d["itls"][i]) for i in ok]
    else:
        lasts = []
    same = _same([t0[i] for i in ok] if t0 else None, [d["ttfts"][i] for i in ok], lasts,
                 [d["output_lens"][i] for i in ok]) if ok and lasts else _same(None, [], [], [])
    return {"own": own, "same": same, "client_input_tokens": _mean([d["input_lens"][i] for i in ok]) if ok else None,
            "prompt_format": "text", "detail_keys": sorted(k for k, v in d.items() if isinstance(v, list))}


def load_sglang(path: Path) -> dict[str, Any]:
    lines = [ln for ln in path.read_text().splitlines() if ln.strip()]
    d = json.loads(lines[-1])  # bench_serving appends one line per run
    own = {"requests_ok": d["completed"], "request_per_s": d["request_throughput"],
           "output_tokens_per_s": d["output_throughput"],
           "ttft": {"mean": d["mean_ttft_ms"], "p50": d["median_ttft_ms"], "p99": d["p99_ttft_ms"]},
           "tpot": {"mean": d["mean_tpot_ms"], "p50": d["median_tpot_ms"], "p99": d["p99_tpot_ms"]}}
    ok = [i for i, e in enumerate(d.get("errors") or []) if not e]
    same = _same(None, [d["ttfts"][i] for i in ok], [d["ttfts"][i] + sum(d["itls"][i]) for i in ok],
                 [d["output_lens"][i] for i in ok]) if ok and "itls" in d else _same(None, [], [], [])
    return {"own": own, "same": same, "client_input_tokens": _mean([d["input_lens"][i] for i in ok]) if ok else None,
            "prompt_format": "text"}


LOADERS = {"servetune": load_servetune, "vllm": load_vllm, "sglang": load_sglang}


def _mean(values: Sequence[float]) -> float | None:
    return float(np.mean(values)) if values else None


# --- the server's side -------------------------------------------------------------------------------------------

HISTOGRAMS = {  # what the table calls it: the engines' histogram names, newest first
    "ttft": ("time_to_first_token_seconds",),
    "queue": ("request_queue_time_seconds", "queue_time_seconds"),
    "prefill": ("request_prefill_time_seconds",),
    "itl": ("inter_token_latency_seconds", "time_per_output_token_seconds"),
    "e2e": ("e2e_request_latency_seconds",),
}


def server_delta(before: dict[str, float], after: dict[str, float]) -> dict[str, Any]:
    prefix = "sglang:" if any(k.startswith("sglang:") for k in after) else "vllm:"

    def d(name: str) -> float | None:
        key = prefix + name
        return after[key] - before.get(key, 0.0) if key in after else None

    requests = d("request_success_total") if prefix == "vllm:" else d("num_requests_total")
    prompt, gen = d("prompt_tokens_total"), d("generation_tokens_total")
    if prefix == "vllm:":
        queries, hits = d("prefix_cache_queries_total"), d("prefix_cache_hits_total")
    else:
        queries, hits = prompt, d("cached_tokens_total")
    out: dict[str, Any] = {
        "requests": requests, "prompt_tokens": prompt, "generation_tokens": gen,
        "prompt_tokens_per_request": prompt / requests if prompt is not None and requests else None,
        "generation_tokens_per_request": gen / requests if gen is not None and requests else None,
        "prefix_cache_hits": hits, "prefix_cache_hit_rate": hits / queries if hits is not None and queries else None,
        "preemptions": d("num_preemptions_total") if prefix == "vllm:" else d("num_retracted_requests_total"),
    }
    for label, names in HISTOGRAMS.items():
        for name in names:
            total, count = d(name + "_sum"), d(name + "_count")
            if total is not None and count:
                out[f"{label}_mean_ms"] = total / count * 1000
                break
    return out


# --- the table ----------------------------------------------------------------------------------------------

def _result_path(out: Path, name: str, result: str) -> Path:
    """runs.tsv holds the paths the host wrote (/tmp/res/crosscheck/...): a folder copied elsewhere (docs/results)
    finds its files beside runs.tsv. A relative path is relative to OUT."""
    path = out / result
    if path.exists():
        return path
    p = Path(result)
    moved = out / name / p.name if p.parent.name == name else out / p.name
    return moved if moved.exists() else path


def load_runs(out: Path) -> list[dict[str, Any]]:
    runs = []
    for line in (out / "runs.tsv").read_text().splitlines():
        if not line.strip():
            continue
        name, tool, result, *_ = line.split("\t")
        run: dict[str, Any] = {"name": name, "tool": tool}
        try:
            run.update(LOADERS[tool](_result_path(out, name, result)))
        except (OSError, KeyError, ValueError, IndexError) as e:
            run["error"] = f"{type(e).__name__}: {e}"
        try:
            before = _parse_prometheus((out / f"{name}.before.prom").read_text())
            after = _parse_prometheus((out / f"{name}.after.prom").read_text())
            run["server"] = server_delta(before, after)
        except OSError as e:
            run["server"] = {"error": str(e)}
        ttft_c = run.get("same", {}).get("ttft", {}).get("mean")
        ttft_s = run["server"].get("ttft_mean_ms")
        run["outside_engine_ttft_ms"] = ttft_c - ttft_s if ttft_c is not None and ttft_s is not None else None
        runs.append(run)
    return runs


def _f(v: Any, nd: int = 1) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "–"
    if isinstance(v, str):
        return v
    return f"{v:,.{nd}f}"


ROWS = [  # (section, label, getter, decimals)
    ("own", "requests ok", lambda r: r["own"]["requests_ok"], 0),
    ("own", "req/s", lambda r: r["own"]["request_per_s"], 2),
    ("own", "output tok/s", lambda r: r["own"]["output_tokens_per_s"], 0),
    ("own", "TTFT mean ms", lambda r: r["own"]["ttft"]["mean"], 1),
    ("own", "TTFT p50 ms", lambda r: r["own"]["ttft"]["p50"], 1),
    ("own", "TTFT p99 ms", lambda r: r["own"]["ttft"]["p99"], 1),
    ("own", "TPOT mean ms", lambda r: r["own"]["tpot"]["mean"], 2),
    ("own", "TPOT p50 ms", lambda r: r["own"]["tpot"]["p50"], 2),
    ("own", "TPOT p99 ms", lambda r: r["own"]["tpot"]["p99"], 2),
    ("own", "servetune: schedule lag mean ms", lambda r: r["own"].get("schedule_lag_mean"), 2),
    ("same", "TTFT from send mean ms", lambda r: r["same"]["ttft"]["mean"], 1),
    ("same", "TTFT from send p50 ms", lambda r: r["same"]["ttft"]["p50"], 1),
    ("same", "TTFT from send p99 ms", lambda r: r["same"]["ttft"]["p99"], 1),
    ("same", "TPOT to last token mean ms", lambda r: r["same"]["tpot"]["mean"], 2),
    ("same", "TPOT to last token p99 ms", lambda r: r["same"]["tpot"]["p99"], 2),
    ("same", "output tok/s, first send → last token", lambda r: r["same"]["output_tokens_per_s"], 0),
    ("arrivals", "arrival rate req/s (sends)", lambda r: r["same"]["arrival_rate"], 2),
    ("arrivals", "CV of gaps between sends (Poisson: 1)", lambda r: r["same"]["arrival_cv"], 2),
    ("arrivals", "prompt format", lambda r: r.get("prompt_format"), 0),
    ("arrivals", "client-side input tokens / request", lambda r: r.get("client_input_tokens"), 1),
    ("server", "requests", lambda r: r["server"].get("requests"), 0),
    ("server", "prompt tokens / request", lambda r: r["server"].get("prompt_tokens_per_request"), 1),
    ("server", "generation tokens / request", lambda r: r["server"].get("generation_tokens_per_request"), 1),
    ("server", "prompt tokens", lambda r: r["server"].get("prompt_tokens"), 0),
    ("server", "generation tokens", lambda r: r["server"].get("generation_tokens"), 0),
    ("server", "prefix-cache hit tokens", lambda r: r["server"].get("prefix_cache_hits"), 0),
    ("server", "prefix-cache hit %", lambda r: None if r["server"].get("prefix_cache_hit_rate") is None
     else 100 * r["server"]["prefix_cache_hit_rate"], 2),
    ("server", "preemptions", lambda r: r["server"].get("preemptions"), 0),
    ("server", "server TTFT mean ms", lambda r: r["server"].get("ttft_mean_ms"), 1),
    ("server", "server queue mean ms", lambda r: r["server"].get("queue_mean_ms"), 1),
    ("server", "server prefill mean ms", lambda r: r["server"].get("prefill_mean_ms"), 1),
    ("server", "server inter-token mean ms", lambda r: r["server"].get("itl_mean_ms"), 2),
    ("server", "server e2e mean ms", lambda r: r["server"].get("e2e_mean_ms"), 1),
    ("server", "server TTFT − queue − prefill ms (its frontend)", lambda r: r["server"]["ttft_mean_ms"]
     - r["server"]["queue_mean_ms"] - r["server"]["prefill_mean_ms"], 1),
    ("server", "client − server TTFT ms (outside the engine)", lambda r: r.get("outside_engine_ttft_ms"), 1),
]


def _pct(v: float) -> str:
    return "–" if v is None or math.isnan(v) else f"{v:.1%}"


def _get(r: dict[str, Any], fn) -> Any:
    try:
        return fn(r)
    except (KeyError, TypeError):
        return None


# servetune's runs compared with the peer's: their name prefix, a short name for the notes, and what they are
GOALS = (("servetune-text-", "servetune text", "servetune (its own text prompts, its own Poisson draw)"),
         ("servetune-same-", "servetune same prompts",
          "servetune sending each peer run's prompts at that run's arrivals"))


def goal(runs: list[dict[str, Any]], peer: str, mine_prefix: str = "servetune-text-") -> list[dict[str, Any]]:
    """servetune's runs named MINE_PREFIX* against the peer's: means within 3 %, p99 within the peer's run-to-run
    spread. The same-prompt runs (servetune-same-N) answer it with nothing but the clients differing."""
    mine = [r for r in runs if r["name"].startswith(mine_prefix) and "final-usage" not in r["name"]
            and "own" in r]
    theirs = [r for r in runs if r["tool"] == peer and "own" in r]
    if not mine or not theirs:
        return []
    # a run that found its prompts in the prefix cache skipped part of its prefill: no comparison (the audit's limit)
    cached = [r["name"] for r in mine + theirs
              if ((r.get("server") or {}).get("prefix_cache_hit_rate") or 0) > MAX_PREFIX_HIT_FRACTION]
    checks = []
    for label, fn, kind in (("output tok/s", lambda r: r["own"]["output_tokens_per_s"], "mean"),
                            ("mean TTFT", lambda r: r["own"]["ttft"]["mean"], "mean"),
                            ("mean TPOT", lambda r: r["own"]["tpot"]["mean"], "mean"),
                            ("p99 TTFT", lambda r: r["own"]["ttft"]["p99"], "p99"),
                            ("p99 TPOT", lambda r: r["own"]["tpot"]["p99"], "p99")):
        a = [fn(r) for r in mine]
        b = [fn(r) for r in theirs]
        ma, mb = float(np.mean(a)), float(np.mean(b))
        diff = (ma - mb) / mb if mb else math.nan
        if kind == "mean":
            ok, rule = abs(diff) <= 0.03, "within 3 %"
        else:
            spread = max(b) - min(b)
            ok, rule = abs(ma - mb) <= spread, f"within the peer's spread ({spread:,.1f})"
        # how far apart the peer's own runs are: a difference smaller than that is not resolved by these runs
        peer_spread = (max(b) - min(b)) / mb if mb and len(b) > 1 else math.nan
        mine_spread = (max(a) - min(a)) / ma if ma and len(a) > 1 else math.nan
        checks.append({"metric": label, "servetune": ma, "peer": mb, "diff": diff, "rule": rule,
                       "ok": bool(ok) and not cached, "prefix_cached_runs": cached,
                       "servetune_runs": a, "peer_runs": b, "peer_spread": peer_spread,
                       "servetune_spread": mine_spread})
    return checks


def _pair_delta(runs: list[dict[str, Any]], a: str, b: str, fn) -> float | None:
    va = [v for r in runs if r["name"].startswith(a) and (v := _get(r, fn)) is not None]
    vb = [v for r in runs if r["name"].startswith(b) and (v := _get(r, fn)) is not None]
    return float(np.mean(va) - np.mean(vb)) if va and vb else None


def paired_notes(runs: list[dict[str, Any]], peer: str) -> list[str]:
    """servetune-paired-N replayed the start times of {peer}-bench-N (``--arrival-trace``): both met the same
    bursts, so a p99 difference between them is the clients', not the Poisson draw's. servetune-same-N also
    sent {peer}-bench-N's prompts (``peer-prompts``): what is left between them is the clients alone."""
    by_name = {r["name"]: r for r in runs}
    out = []
    for r in runs:
        if r["name"].startswith("servetune-paired-"):
            same = "same arrivals"
        elif r["name"].startswith("servetune-same-"):
            same = "same prompts and arrivals"
        else:
            continue
        other = by_name.get(f"{peer}-bench-{r['name'].rsplit('-', 1)[1]}")
        if other is None:
            continue
        for label, fn in (("mean TTFT", lambda x: x["own"]["ttft"]["mean"]),
                          ("p99 TTFT", lambda x: x["own"]["ttft"]["p99"]),
                          ("p99 TPOT", lambda x: x["own"]["tpot"]["p99"])):
            a, b = _get(r, fn), _get(other, fn)
            if a is not None and b is not None:
                out.append(f"- {r['name']} − {other['name']} ({same}), {label}: {a - b:+.1f} ms "
                           f"({(a - b) / b:+.1%})" if b else f"- {r['name']}: {label} {a:.1f} ms")
    return out


def peer_prompts(model: str, n: int, input_tokens: int, output_tokens: int, seed: int) -> tuple[list[str], str]:
    """The prompts of ``vllm bench serve --dataset-name random --random-range-ratio 0 --seed SEED``, and where they
    came from: vLLM's own RandomDataset where vLLM is installed (the GPU hosts), else the copy of its recipe in
    benchmarks/prompt_tokenization.py (prompts of the same kind, not the same text)."""
    try:  # only on a host with vLLM: the tokenizer vllm bench serve loads, and its dataset
        from vllm.benchmarks.datasets import RandomDataset  # noqa: PLC0415
        from vllm.tokenizers import get_tokenizer  # noqa: PLC0415
    except ImportError:
        from tokenizers import Tokenizer  # noqa: PLC0415

        from servetune.loadgen.tokenizer import find_tokenizer  # noqa: PLC0415
        spec = importlib.util.spec_from_file_location("prompt_tokenization",
                                                      Path(__file__).resolve().parent.parent / "prompt_tokenization.py")
        assert spec is not None and spec.loader is not None
        recipe = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(recipe)
        path = find_tokenizer(model)
        if path is None:
            raise SystemExit(f"no tokenizer.json at {model}")
        tok = Tokenizer.from_file(str(path))
        specials = len(tok.encode("", add_special_tokens=True).ids)
        return (recipe.vllm_random(tok, n, input_tokens - specials, np.random.default_rng(seed)),
                "a copy of vLLM's RandomDataset recipe (vLLM is not installed here)")
    # what vllm bench serve's get_samples does for --dataset-name random (vllm/benchmarks/datasets.py)
    rows = RandomDataset(random_seed=seed).sample(tokenizer=get_tokenizer(model), num_requests=n,
                                                  input_len=input_tokens, output_len=output_tokens, range_ratio=0.0)
    return [str(r.prompt) for r in rows], "vLLM's RandomDataset"


def render(runs: list[dict[str, Any]], peer: str) -> str:
    shown = [r for r in runs if r["name"] != "warmup"]
    lines = ["| section | metric | " + " | ".join(r["name"] for r in shown) + " |",
             "|---|---|" + "---|" * len(shown)]
    for section, label, fn, nd in ROWS:
        vals = [_get(r, fn) for r in shown]
        if all(v is None for v in vals):
            continue
        lines.append(f"| {section} | {label} | " + " | ".join(_f(v, nd) for v in vals) + " |")
    for r in shown:
        if r.get("error"):
            lines.append(f"\n{r['name']}: could not read its result: {r['error']}")
    for prefix, _, who in GOALS:
        checks = goal(runs, peer, prefix)
        if not checks:
            continue
        lines += ["", f"Goal: {who}, against {peer}'s own client, mean of the runs.", "",
                  "| metric | servetune | peer | difference | servetune's runs apart | peer's runs apart | rule "
                  "| met |",
                  "|---|---|---|---|---|---|---|---|"]
        for c in checks:
            lines.append(f"| {c['metric']} | {_f(c['servetune'], 2)} | {_f(c['peer'], 2)} | {c['diff']:+.1%} "
                         f"| {_pct(c['servetune_spread'])} | {_pct(c['peer_spread'])} "
                         f"| {c['rule']} | {'yes' if c['ok'] else '**no**'} |")
        if checks[0]["prefix_cached_runs"]:
            lines += ["", "Not a comparison: " + ", ".join(checks[0]["prefix_cached_runs"]) + " found over 1 % of "
                      "their prompt tokens in the prefix cache (the table's prefix-cache rows, the server's counters)."]
    notes = []
    for label, fn in (("client TTFT mean (from send)", lambda r: r["same"]["ttft"]["mean"]),
                      ("server TTFT mean", lambda r: r["server"]["ttft_mean_ms"]),
                      ("outside the engine", lambda r: r["outside_engine_ttft_ms"])):
        d = _pair_delta(shown, "servetune-text-", "servetune-ids-", fn)
        if d is not None:
            notes.append(f"- text − token ids, {label}: {d:+.1f} ms")
        for mine, who, _ in GOALS:
            d = _pair_delta(shown, f"{peer}-bench-", mine, fn)
            if d is not None:
                notes.append(f"- {peer} bench − {who}, {label}: {d:+.1f} ms")
    notes += paired_notes(shown, peer)
    if notes:
        lines += ["", "Where a TTFT difference comes from (a server TTFT that differs is load, queueing; an equal "
                      "server TTFT with a different client − server gap is outside the engine: tokenization, "
                      "HTTP, streaming, the client's own timing):", "", *notes]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="crosscheck.py")
    sub = p.add_subparsers(dest="cmd", required=True)
    s = sub.add_parser("scrape")
    s.add_argument("url")
    s.add_argument("file")
    t = sub.add_parser("table")
    t.add_argument("out")
    t.add_argument("--peer", default="vllm", choices=("vllm", "sglang"))
    g = sub.add_parser("peer-prompts")
    g.add_argument("model")
    g.add_argument("file")
    for flag in ("--num", "--input-tokens", "--output-tokens", "--seed"):
        g.add_argument(flag, type=int, required=True)
    args = p.parse_args(argv)
    if args.cmd == "scrape":
        scrape(args.url, args.file)
        return 0
    if args.cmd == "peer-prompts":
        prompts, source = peer_prompts(args.model, args.num, args.input_tokens, args.output_tokens, args.seed)
        Path(args.file).write_text(json.dumps(prompts))
        print(f"{len(prompts)} prompts ({len(set(prompts))} distinct) from {source} → {args.file}", file=sys.stderr)
        return 0
    out = Path(args.out)
    runs = load_runs(out)
    text = render(runs, args.peer)
    (out / "crosscheck.md").write_text(text)
    (out / "crosscheck.json").write_text(json.dumps({"runs": runs, "goal": goal(runs, args.peer),
                                                    "goal_same": goal(runs, args.peer, "servetune-same-")}, indent=1,
                                                    default=float))
    print(text, end="")
    return 0


if __name__ == "__main__":
    sys.exit(main())
