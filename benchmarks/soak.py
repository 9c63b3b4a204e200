"""Soak: a long sim study with parallel workers must finish with nothing leaked and flat driver memory.

    python benchmarks/soak.py --trials 200 --parallel 4 [--out /tmp/soak] [--sample-every 10]

Runs ``servetune run`` as a child process on a generated study (llama-3.2-1b, 10 requests per trial, a short
server scenario, ``hardware.gpus: 4``), samples the driver's RSS and open fds every N finished trials, and
after the study checks that no engine process (marked by an env variable unique to this run), no listening
socket of one, and no Ray process of this run is left. Prints wall time, driver peak RSS and the RSS series.
Exit code 0 when nothing leaked and memory stayed flat (last-quarter median within 25 % + 40 MiB of the
second-quarter median), 1 otherwise. Needs only /proc (Linux).
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import textwrap
import time
import uuid
from pathlib import Path


def study_text(out: Path, trials: int, parallel: int, gpus: int, marker: str) -> str:
    return textwrap.dedent(f"""
    name: soak
    model: {{preset: llama-3.2-1b}}
    engines:
      - name: sim
        env: {{SERVETUNE_SOAK_MARK: "{marker}"}}
    hardware: {{gpu: h100, gpus: {gpus}, max_gpus_per_trial: 1}}
    search:
      max_concurrency: {{low: 8, high: 512, log: true}}
      memory_fraction: {{low: 0.7, high: 0.95}}
      quantization: [none, fp8]
      kv_cache_dtype: [auto, fp8]
    workload:
      dataset: {{kind: random, input_tokens: 64, output_tokens: 8, num_requests: 10}}
      scenarios:
        - {{kind: server, qps: 20, duration_s: 0.5, sla: {{ttft_p99_ms: 2000, tpot_p99_ms: 100}}}}
    objectives:
      - {{metric: output_tokens_per_s_per_gpu, scenario: server}}
    sampler: {{kind: tpe, seed: 1}}
    baseline: false
    budget: {{trials: {trials}, parallel: {parallel}}}
    output_dir: {out / 'run'}
    """)


def _procs() -> dict[int, dict]:
    out = {}
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        try:
            env = (d / "environ").read_bytes()
            cmd = (d / "cmdline").read_bytes().replace(b"\0", b" ").decode("utf-8", "replace")
        except OSError:
            continue
        out[int(d.name)] = {"env": env, "cmd": cmd}
    return out


def marked(marker: str) -> list[int]:
    needle = f"SERVETUNE_SOAK_MARK={marker}".encode()
    return [pid for pid, p in _procs().items() if needle in p["env"]]


def rss_mib(pid: int) -> float | None:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except OSError:
        return None
    return None


def n_fds(pid: int) -> int | None:
    try:
        return len(os.listdir(f"/proc/{pid}/fd"))
    except OSError:
        return None


def listening_sockets() -> dict[int, set[str]]:
    """port -> socket inodes of every listening TCP socket on the box."""
    out: dict[int, set[str]] = {}
    for f in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            lines = Path(f).read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            parts = line.split()
            if parts[3] == "0A":  # LISTEN
                out.setdefault(int(parts[1].rsplit(":", 1)[1], 16), set()).add(parts[9])
    return out


def listening_ports() -> set[int]:
    return set(listening_sockets())


def socket_owners(inodes: set[str]) -> dict[str, list[str]]:
    """inode -> command lines of the processes holding it (another program may reuse a freed port)."""
    want = {f"socket:[{i}]" for i in inodes}
    owners: dict[str, list[str]] = {}
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        try:
            links = {os.readlink(fd) for fd in (d / "fd").iterdir()}
            cmd = (d / "cmdline").read_bytes().replace(b"\0", b" ").decode("utf-8", "replace")[:120]
        except OSError:
            continue
        for link in links & want:
            owners.setdefault(link[8:-1], []).append(f"{d.name} {cmd}")
    return owners


def finished(run: Path) -> int:
    n = 0
    for p in (run / "trials").glob("*/trial.json"):
        try:
            if json.loads(p.read_text()).get("state") not in ("running", None):
                n += 1
        except (OSError, ValueError):
            pass
    return n


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--trials", type=int, default=200)
    ap.add_argument("--parallel", type=int, default=4)
    ap.add_argument("--gpus", type=int, default=4)
    ap.add_argument("--out", default=None)
    ap.add_argument("--sample-every", type=int, default=10)
    ap.add_argument("--json", default=None, help="also write the numbers to this file")
    a = ap.parse_args()
    out = Path(a.out or f"/tmp/servetune-soak-{os.getpid()}")
    out.mkdir(parents=True, exist_ok=True)
    marker = uuid.uuid4().hex
    study = out / "study.yaml"
    study.write_text(study_text(out, a.trials, a.parallel, a.gpus, marker))
    ports_before = listening_ports()
    t0 = time.monotonic()
    log = open(out / "driver.log", "wb")
    driver = subprocess.Popen([sys.executable, "-m", "servetune.optimizer.cli", "run", str(study), "--no-report"],
                              stdout=log, stderr=subprocess.STDOUT)
    samples: list[dict] = []
    peak = 0.0
    next_sample = 0
    max_engines = 0
    while driver.poll() is None:
        r = rss_mib(driver.pid)
        if r:
            peak = max(peak, r)
        done = finished(out / "run")
        if done >= next_sample:
            samples.append({"trials": done, "t_s": round(time.monotonic() - t0, 1), "rss_mib": round(r or 0, 1),
                            "fds": n_fds(driver.pid)})
            print(f"  {done:4d} trials  {samples[-1]['t_s']:7.1f} s  driver RSS {r or 0:6.1f} MiB  "
                  f"fds {samples[-1]['fds']}", flush=True)
            next_sample = done + a.sample_every
        max_engines = max(max_engines, len(marked(marker)))
        time.sleep(1.0)
    wall = time.monotonic() - t0
    log.close()
    time.sleep(2.0)  # ray shutdown finishes reaping its workers
    leftover = marked(marker)
    trials = {}
    for p in (out / "run" / "trials").glob("*/trial.json"):
        t = json.loads(p.read_text())
        trials[t["number"]] = t
    states: dict[str, int] = {}
    for t in trials.values():
        states[t["state"]] = states.get(t["state"], 0) + 1
    pid_files = list((out / "run" / "trials").glob("*/engine.pid"))
    # ports the engines were given (other programs on the box may open ports of their own meanwhile)
    engine_ports = set()
    for t in trials.values():
        argv = t.get("argv") or []
        if "--port" in argv:
            engine_ports.add(int(argv[argv.index("--port") + 1]))
    socks = listening_sockets()
    candidates = sorted(engine_ports & (set(socks) - ports_before))
    owners = socket_owners({i for port in candidates for i in socks[port]})
    still_listening: list[str] = []
    reused_by_others: list[str] = []
    for port in candidates:
        held = [o for i in socks[port] for o in owners.get(i, ["(owner unknown)"])]
        mine = [o for o in held if o == "(owner unknown)" or int(o.split()[0]) in leftover]
        (still_listening if mine else reused_by_others).append(f"{port}: {'; '.join(held)}")
    launched = sum(1 for t in trials.values() if t.get("duplicate_of") is None and t.get("argv"))
    rss = [s["rss_mib"] for s in samples if s["rss_mib"]]
    q = max(1, len(rss) // 4)
    early, late = (statistics.median(rss[q:2 * q]), statistics.median(rss[-q:])) if len(rss) >= 4 else (0, 0)
    flat = late <= early * 1.25 + 40 if rss else False
    fds = [s["fds"] for s in samples if s["fds"] and s["trials"] > 0]
    report = {
        "trials_finished": len(trials), "engines_launched": launched, "states": states, "wall_s": round(wall, 1),
        "driver_exit": driver.returncode, "driver_peak_rss_mib": round(peak, 1),
        "rss_second_quarter_median_mib": early, "rss_last_quarter_median_mib": late, "memory_flat": flat,
        "fds_first_last": [fds[0], fds[-1]] if fds else None, "max_concurrent_engines": max_engines,
        "leftover_engine_pids": leftover, "leftover_pid_files": [str(p) for p in pid_files],
        "engine_ports_still_listening": still_listening, "engine_ports_reused_by_other_programs": reused_by_others,
        "samples": samples,
    }
    print(json.dumps({k: v for k, v in report.items() if k != "samples"}, indent=1))
    if a.json:
        Path(a.json).write_text(json.dumps(report, indent=1))
    ok = (driver.returncode == 0 and not leftover and not pid_files and not still_listening and flat
          and len(trials) >= a.trials)
    print("soak: " + ("PASS" if ok else "FAIL"))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
