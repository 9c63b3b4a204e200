"""servetune's load generator against AIPerf and GuideLLM, on one loopback mock server with known timing.

Every tool drives the same lean mock (``benchmarks/mock_server.py``: TTFT 20 ms, TPOT 2 ms, 16 output
tokens, chat API, streamed with per-chunk usage) at constant arrival rates, in the same run. The server
is the referee: it logs the arrival time of every request (``perf_counter``, the clock all processes on
the box share) and how late it wrote each first chunk.

Per tool and rate:

- **achieved req/s**: (n − 1) / (last − first arrival) at the server, over the tool's last n = rate ×
  duration requests (probes a tool sends first are left out);
- **schedule lag p50/p99**: each arrival against the ideal constant schedule i / rate, anchored at the
  earliest arrival's offset (so a tool that starts late is not penalised, one that drifts is);
- **TTFT / TPOT error**: the tool's own per-request TTFT (from its send) minus the truth (20 ms), and
  |TPOT − 2 ms| (AIPerf and GuideLLM call TPOT "ITL"); for servetune also TTFT from the *scheduled*
  time, which adds its schedule lag (the MLPerf definition servetune reports as ``ttft_*``);
- **server late p99**: how late the mock itself wrote first chunks (the part of any error that is not
  the client's);
- **sustained**: every request arrived and succeeded, and the achieved rate is within 1 % of target.

**Max sustained rate**: rates ascend through ``--max-rates`` until a tool fails the sustained test; the
last one passed is its maximum. Each measurement repeats ``--repeats`` times; tables show medians.

Peers are installed from PyPI into their own venvs (``--setup`` does it: /tmp/venv-aiperf,
/tmp/venv-guidellm). Both tokenize their synthetic prompts client-side and would download a tokenizer;
this box reaches only package registries, so they get a word-level tokenizer written locally
(``loadgen_tokenizer.py``). A peer that cannot be installed or run is reported with the reason.

Run: ``python benchmarks/loadgen_vs_peers.py [--setup] [--repeats 3] [--json out.json]``.
"""
from __future__ import annotations

import argparse
import bisect
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any

import pandas as pd

HERE = Path(__file__).resolve().parent
# Peers stamp sends with the wall clock; the server logs perf_counter (CLOCK_MONOTONIC). Their difference is
# stable over a benchmark (NTP slews by µs), so one reading maps one onto the other.
WALL_MINUS_PERF = time.time() - time.perf_counter()
TTFT_MS, TPOT_MS, OUT_TOKENS, IN_TOKENS = 20.0, 2.0, 16, 32
VENVS = {"aiperf": Path("/tmp/venv-aiperf"), "guidellm": Path("/tmp/venv-guidellm")}
PINS = {"aiperf": "aiperf==0.13.0", "guidellm": "guidellm==0.8.1"}


# --- the mock server ------------------------------------------------------------------------------------

class Mock:
    def __init__(self) -> None:
        self.proc = subprocess.Popen([sys.executable, str(HERE / "mock_server.py"), "--port", "0",
                                      "--ttft-ms", str(TTFT_MS), "--tpot-ms", str(TPOT_MS)],
                                     stdout=subprocess.PIPE, text=True)
        assert self.proc.stdout is not None  # stdout=PIPE
        self.port = int(self.proc.stdout.readline().split()[1])
        self.url = f"http://127.0.0.1:{self.port}"

    def reset(self) -> None:
        urllib.request.urlopen(urllib.request.Request(self.url + "/mock/reset", data=b"{}", method="POST"),
                               timeout=10).read()

    def log(self) -> list[tuple[float, float]]:
        return json.loads(urllib.request.urlopen(self.url + "/mock/log", timeout=30).read())["log"]

    def cpu_s(self) -> float:
        fields = Path(f"/proc/{self.proc.pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    def close(self) -> None:
        self.proc.terminate()
        self.proc.wait(timeout=10)


# --- tools ----------------------------------------------------------------------------------------------

def _run(cmd: list[str], timeout: float, cwd: Path | None = None) -> subprocess.CompletedProcess:
    """Run a tool in its own process group; on timeout the whole group goes (peers fork workers)."""
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=cwd,
                            start_new_session=True)
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, err = proc.communicate()
        err = (err or "") + f"\n[timed out after {timeout:g} s]"
        return subprocess.CompletedProcess(cmd, 124, out, err)
    finally:
        try:
            os.killpg(proc.pid, signal.SIGKILL)  # stragglers the tool left behind
        except ProcessLookupError:
            pass
    return subprocess.CompletedProcess(cmd, proc.returncode, out, err)


def run_servetune(url: str, rate: float, n: int, out: Path, workers: int) -> tuple[list[dict], int, str]:
    cmd = [sys.executable, "-m", "servetune.optimizer.cli", "bench", "--url", url, "--model", "mock", "--api", "chat",
           "--scenario", "server", "--arrival", "constant", "--qps", str(rate), "--num-requests", str(n),
           "--input-tokens", str(IN_TOKENS), "--output-tokens", str(OUT_TOKENS), "--dataset-size", "1000",
           "--no-early-stopping", "--workers", str(workers), "--request-timeout", "60", "--timeout", "300",
           "-o", str(out), "--quiet"]
    p = _run(cmd, 400)
    if p.returncode != 0 or not (out / "requests.parquet").exists():
        return [], p.returncode, (p.stderr or p.stdout)[-2000:]
    f = pd.read_parquet(out / "requests.parquet")
    f = f[~f["warmup"]]
    t0 = json.loads((out / "result.json").read_text())["results"][0]["settings"].get("t0_perf_counter") or 0.0
    rows = [{"ok": st == "ok", "ttft_ms": a, "tpot_ms": b, "ttft_sched_ms": c, "sent_abs": t0 + d}
            for st, a, b, c, d in zip(f["status"], f["ttft_from_send_ms"], f["tpot_ms"], f["ttft_ms"], f["sent_s"])]
    return rows, 0, ""


def run_aiperf(url: str, rate: float, n: int, out: Path, tok: Path) -> tuple[list[dict], int, str]:
    cmd = [str(VENVS["aiperf"] / "bin" / "aiperf"), "profile", "--model", "mock", "--url", url,
           "--endpoint-type", "chat", "--streaming", "--tokenizer", str(tok), "--request-rate", str(rate),
           "--arrival-pattern", "constant", "--request-count", str(n),
           "--prompt-input-tokens-mean", str(IN_TOKENS), "--prompt-input-tokens-stddev", "0",
           "--prompt-output-tokens-mean", str(OUT_TOKENS), "--prompt-output-tokens-stddev", "0",
           "--extra-inputs", "ignore_eos:true", "--use-server-token-count", "--per-chunk-usage",
           "--ui", "none", "--artifact-dir", str(out)]
    p = _run(cmd, 600, out.parent)
    path = out / "profile_export.jsonl"
    if p.returncode != 0 or not path.exists():
        return [], p.returncode, (p.stdout + p.stderr)[-2000:]
    rows = []
    for line in path.read_text().splitlines():
        rec = json.loads(line)
        m = rec.get("metrics") or {}
        ok = not rec.get("error") and "time_to_first_token" in m
        start_ns = (rec.get("metadata") or {}).get("request_start_ns")
        rows.append({"ok": ok, "ttft_ms": (m.get("time_to_first_token") or {}).get("value"),
                     "tpot_ms": (m.get("inter_token_latency") or {}).get("value"),
                     "sent_abs": start_ns / 1e9 - WALL_MINUS_PERF if start_ns else None})
    return rows, 0, ""


def run_guidellm(url: str, rate: float, n: int, out: Path, tok: Path) -> tuple[list[dict], int, str]:
    out.mkdir(parents=True, exist_ok=True)
    cmd = [str(VENVS["guidellm"] / "bin" / "guidellm"), "run",
           "--backend", f"kind=openai_http,target={url},model=mock",
           "--profile", f"kind=constant,rate={rate}", "--constraint", f"kind=max_requests,count={n}",
           "--data", f"kind=synthetic_text,prompt_tokens={IN_TOKENS},output_tokens={OUT_TOKENS}",
           "--tokenizer", f"kind=hf_auto,model={tok}", "--output", f"kind=json,path={out / 'g.json'}",
           "--disable-console-interactive"]
    p = _run(cmd, 600, out)
    path = out / "g.json"
    if p.returncode != 0 or not path.exists():
        return [], p.returncode, (p.stdout + p.stderr)[-2000:]
    bench = json.loads(path.read_text())["benchmarks"][0]["requests"]
    rows = [{"ok": True, "ttft_ms": r.get("time_to_first_token_ms"), "tpot_ms": r.get("inter_token_latency_ms"),
             "sent_abs": r["request_start_time"] - WALL_MINUS_PERF if r.get("request_start_time") else None}
            for r in bench.get("successful", [])]
    rows += [{"ok": False, "ttft_ms": None, "tpot_ms": None}
             for key in ("errored", "incomplete") for _ in bench.get(key, [])]
    return rows, 0, ""


# --- one measurement ------------------------------------------------------------------------------------

def pct(values: list[float], p: float) -> float:
    v = sorted(x for x in values if x is not None and x == x)
    return v[min(int(len(v) * p), len(v) - 1)] if v else float("nan")


def runnable_now(seconds: float = 2.0) -> float:
    """Mean count of runnable tasks on the box over ``seconds`` (the sampler itself excluded)."""
    samples = []
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        samples.append(int(Path("/proc/loadavg").read_text().split()[3].split("/")[0]) - 1)
        time.sleep(0.1)
    return statistics.mean(samples)


def wait_for_quiet_box(limit: float, max_wait_s: float) -> float:
    """Other jobs share this box: wait (bounded) until fewer than ``limit`` tasks are runnable."""
    deadline = time.monotonic() + max_wait_s
    while True:
        busy = runnable_now()
        if busy <= limit or time.monotonic() > deadline:
            return busy


def measure(tool: str, mock: Mock, rate: float, duration: float, tok: Path, work: Path,
            quiet: float | None = None) -> dict[str, Any]:
    n = max(int(round(rate * duration)), 20)
    busy = wait_for_quiet_box(quiet, 90.0) if quiet is not None else float("nan")
    out = Path(tempfile.mkdtemp(prefix=f"{tool}-{rate:g}-", dir=work))
    mock.reset()
    cpu0, t0 = mock.cpu_s(), time.perf_counter()
    if tool.startswith("servetune"):
        rows, rc, err = run_servetune(mock.url, rate, n, out, workers=int(tool.split("-w")[1]) if "-w" in tool else 1)
    elif tool == "aiperf":
        rows, rc, err = run_aiperf(mock.url, rate, n, out, tok)
    else:
        rows, rc, err = run_guidellm(mock.url, rate, n, out, tok)
    wall = time.perf_counter() - t0
    server_cpu = mock.cpu_s() - cpu0
    log = sorted(mock.log())[-n:]
    arrivals = [a for a, _ in log]
    res: dict[str, Any] = {"tool": tool, "rate": rate, "n": n, "rc": rc, "error": err, "wall_s": round(wall, 1),
                           "arrived": len(arrivals), "server_cpu_s": round(server_cpu, 2),
                           "box_runnable_before": round(busy, 2), "loadavg_1m": os.getloadavg()[0]}
    ok = [r for r in rows if r["ok"]]
    res["ok"] = len(ok)
    res["failed"] = len(rows) - len(ok)
    if len(arrivals) >= 2:
        span = arrivals[-1] - arrivals[0]
        res["achieved"] = (len(arrivals) - 1) / span if span > 0 else float("nan")
        offs = [a - i / rate for i, a in enumerate(arrivals)]
        anchor = min(offs)
        lags = [(o - anchor) * 1000 for o in offs]
        res["lag_p50_ms"], res["lag_p99_ms"] = pct(lags, 0.5), pct(lags, 0.99)
        res["server_cpu_frac"] = round(server_cpu / span, 3) if span > 0 else float("nan")
    else:
        res["achieved"] = res["lag_p50_ms"] = res["lag_p99_ms"] = float("nan")
    res["server_late_p99_ms"] = pct([late * 1000 for _, late in log], 0.99)
    ttft_err = [r["ttft_ms"] - TTFT_MS for r in ok if r["ttft_ms"] is not None]
    tpot_err = [abs(r["tpot_ms"] - TPOT_MS) for r in ok if r["tpot_ms"] is not None]
    res["ttft_err_p50_ms"], res["ttft_err_p99_ms"] = pct(ttft_err, 0.5), pct(ttft_err, 0.99)
    res["tpot_err_p99_ms"] = pct(tpot_err, 0.99)
    # The client's own share of the TTFT error: match each request to its arrival at the server (the first
    # arrival at or just after its send) and take out how late the server wrote that request's first chunk.
    arr = [a for a, _ in log]
    client_err = []
    for r in ok:
        if r.get("sent_abs") is None or r["ttft_ms"] is None:
            continue
        i = bisect.bisect_left(arr, r["sent_abs"] - 0.0005)
        if i < len(arr) and arr[i] - r["sent_abs"] < 0.02:
            client_err.append(r["ttft_ms"] - TTFT_MS - log[i][1] * 1000)
    res["matched"] = len(client_err)
    res["client_ttft_err_p50_ms"], res["client_ttft_err_p99_ms"] = pct(client_err, 0.5), pct(client_err, 0.99)
    if tool.startswith("servetune"):
        res["ttft_sched_err_p99_ms"] = pct([r["ttft_sched_ms"] - TTFT_MS for r in ok], 0.99)
    res["sustained"] = (rc == 0 and res["ok"] == n and res["arrived"] == n
                        and abs(res["achieved"] / rate - 1) <= 0.01)
    shutil.rmtree(out, ignore_errors=True)
    return res


# --- driver ---------------------------------------------------------------------------------------------

def setup(tok: Path) -> dict[str, str]:
    """Install the peers into their venvs (skipped when present); returns tool -> problem for failures."""
    problems = {}
    for tool, venv in VENVS.items():
        exe = venv / "bin" / tool
        if not exe.exists():
            subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
            p = subprocess.run([str(venv / "bin" / "pip"), "install", "-q", PINS[tool]], capture_output=True, text=True)
            if p.returncode != 0:
                problems[tool] = f"pip install {PINS[tool]} failed: {p.stderr[-500:]}"
    if not (tok / "tokenizer.json").exists():
        py = next((v / "bin" / "python" for v in VENVS.values() if (v / "bin" / "python").exists()), None)
        if py is None:
            problems["tokenizer"] = "no venv with the tokenizers package to write the local tokenizer"
        else:
            subprocess.run([str(py), str(HERE / "loadgen_tokenizer.py"), str(tok)], check=True, capture_output=True)
    return problems


def available(tool: str) -> str | None:
    if tool.startswith("servetune"):
        return None
    exe = VENVS[tool] / "bin" / tool
    return None if exe.exists() else f"{exe} not found (run with --setup to install {PINS[tool]})"


def fmt(v: Any, d: int = 2) -> str:
    if isinstance(v, float):
        return "nan" if v != v else f"{v:.{d}f}"
    return str(v)


def median_of(runs: list[dict], key: str) -> float:
    vals = [r[key] for r in runs if isinstance(r.get(key), (int, float)) and r[key] == r[key]]
    return statistics.median(vals) if vals else float("nan")


def render(runs: list[dict], maxima: dict[str, list[float]], tools: list[str], acc_rates: list[float]) -> str:
    """Markdown tables of the medians over repeats (what docs/loadgen.md shows)."""
    out = ["Max sustained rate (every request arrived and succeeded, server-side achieved rate within 1 % of "
           "target); per repeat, median, and ratio to the best peer:", "",
           "| tool | per repeat (req/s) | median (req/s) | × best peer | box load during its max runs |",
           "|---|---|---|---|---|"]
    peers = [t for t in tools if not t.startswith("servetune")]
    best_peer = max((statistics.median(maxima[t]) for t in peers if maxima.get(t)), default=float("nan"))
    for tool in tools:
        vals = maxima.get(tool) or []
        med = statistics.median(vals) if vals else float("nan")
        ratio = med / best_peer if best_peer == best_peer and best_peer > 0 else float("nan")
        load = median_of([r for r in runs if r["tool"] == tool and r["kind"] == "max"], "loadavg_1m")
        out.append(f"| {tool} | {', '.join(fmt(v, 0) for v in vals)} | {fmt(med, 0)} | {fmt(ratio)} | {fmt(load, 1)} |")
    # A stricter reading of the same runs: the ladder up to the first rate whose server-side lag p99 also
    # exceeded 50 ms (a tool can keep its average rate while running seconds behind its schedule).
    out += ["", "Stricter: the highest rung passed before one that missed the rate or had a schedule lag p99 "
            "over 50 ms (same runs):", "", "| tool | per repeat (req/s) | median (req/s) |", "|---|---|---|"]
    for tool in tools:
        vals = []
        for rep in sorted({r["repeat"] for r in runs if r["tool"] == tool and r["kind"] == "max"}):
            ladder = sorted((r for r in runs if r["tool"] == tool and r["kind"] == "max" and r["repeat"] == rep),
                            key=lambda r: r["rate"])
            best = 0.0
            for r in ladder:
                if not (r["sustained"] and r.get("lag_p99_ms", float("inf")) <= 50.0):
                    break
                best = r["rate"]
            vals.append(best)
        med = statistics.median(vals) if vals else float("nan")
        out.append(f"| {tool} | {', '.join(fmt(v, 0) for v in vals)} | {fmt(med, 0)} |")
    out += ["", "Accuracy at fixed rates (medians over repeats; ms; errors against the mock's truth TTFT 20 ms, "
            "TPOT 2 ms; lag against the ideal constant schedule, measured at the server; box load = 1-min load "
            "average of the 2-CPU box when the run ended, the tool's own processes included):", "",
            "| tool | target req/s | achieved | lag p50 | lag p99 | TTFT err p50 | TTFT err p99 | TPOT err p99 "
            "| server late p99 | client-only TTFT err p99 | servetune TTFT-from-schedule err p99 | box load |",
            "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for rate in acc_rates:
        for tool in tools:
            rs = [r for r in runs if r["tool"] == tool and r["rate"] == rate and r["kind"] == "accuracy"]
            if not rs:
                continue
            cells = [fmt(median_of(rs, k)) for k in ("achieved", "lag_p50_ms", "lag_p99_ms", "ttft_err_p50_ms",
                                                      "ttft_err_p99_ms", "tpot_err_p99_ms", "server_late_p99_ms",
                                                      "client_ttft_err_p99_ms", "ttft_sched_err_p99_ms",
                                                      "loadavg_1m")]
            out.append(f"| {tool} | {fmt(rate, 0)} | " + " | ".join(c if c != "nan" else "–" for c in cells) + " |")
    return "\n".join(out)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--tools", default="servetune,servetune-w2,aiperf,guidellm")
    ap.add_argument("--accuracy-rates", default="10,100,500")
    ap.add_argument("--max-rates", default="100,150,200,250,350,500,750,1000,1250,1500,2000,2500,3000")
    ap.add_argument("--duration", type=float, default=10.0, help="seconds of load per measurement")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--setup", action="store_true", help="install the peers into /tmp venvs first")
    ap.add_argument("--tokenizer-dir", default="/tmp/wordtok")
    ap.add_argument("--json", help="write every measurement here")
    ap.add_argument("--quiet-box", type=float, default=None, metavar="N",
                    help="before each measurement wait (up to 90 s) until at most N other tasks are runnable")
    ap.add_argument("--from-json", help="only print the tables of a saved --json run")
    a = ap.parse_args()
    if a.from_json:
        d = json.loads(Path(a.from_json).read_text())
        tools = d.get("tools") or list(dict.fromkeys(r["tool"] for r in d["runs"]))
        rates = d.get("accuracy_rates") or sorted({r["rate"] for r in d["runs"] if r["kind"] == "accuracy"})
        print(render(d["runs"], d["maxima"], tools, rates))
        return 0
    tok = Path(a.tokenizer_dir)
    problems = setup(tok) if a.setup else {}
    tools = [t for t in a.tools.split(",") if t]
    for t in tools:
        why = problems.get(t) or available(t)
        if why:
            print(f"[skip] {t}: {why}", flush=True)
    tools = [t for t in tools if not (problems.get(t) or available(t))]
    work = Path(tempfile.mkdtemp(prefix="loadgen-bench-"))
    mock = Mock()
    print(f"mock server on {mock.url}; load average {os.getloadavg()[0]:.2f} on {os.cpu_count()} CPUs", flush=True)
    acc_rates = [float(x) for x in a.accuracy_rates.split(",") if x]
    max_rates = [float(x) for x in a.max_rates.split(",") if x]
    runs: list[dict] = []
    maxima: dict[str, list[float]] = {t: [] for t in tools}
    try:
        for rep in range(a.repeats):
            for tool in tools:
                for rate in acc_rates:
                    r = measure(tool, mock, rate, max(a.duration, 200 / rate), tok, work, a.quiet_box)
                    r.update(repeat=rep, kind="accuracy")
                    runs.append(r)
                    print(json.dumps({k: r[k] for k in r if k != "error"}), flush=True)
                    if r["error"]:
                        print(f"  {tool} failed: {r['error'][-400:]}", flush=True)
                best = 0.0
                for rate in max_rates:
                    r = measure(tool, mock, rate, a.duration, tok, work, a.quiet_box)
                    r.update(repeat=rep, kind="max")
                    runs.append(r)
                    print(json.dumps({k: r[k] for k in r if k != "error"}), flush=True)
                    if not r["sustained"]:
                        break
                    best = rate
                maxima[tool].append(best)
    finally:
        mock.close()
        shutil.rmtree(work, ignore_errors=True)
    if a.json:
        Path(a.json).write_text(json.dumps({"runs": runs, "maxima": maxima, "tools": tools,
                                            "accuracy_rates": acc_rates, "max_rates": max_rates,
                                            "duration_s": a.duration, "repeats": a.repeats}, indent=1))
    print("\n" + render(runs, maxima, tools, acc_rates))
    return 0


if __name__ == "__main__":
    sys.exit(main())
