"""Shared by the reliability and security tests: studies on the fault-injecting fake engine, leak checks."""
from __future__ import annotations

import json
import os
import textwrap
import time
import uuid
from pathlib import Path

import pytest
import ray

from servetune.optimizer import ray_local as local_ray
from servetune.optimizer.driver import StudyDriver
from servetune.optimizer.spec import load_study

FAKE = str(Path(__file__).resolve().parent / "fake_engine.py")

# Read by lifecycle inside Ray workers: a short SIGTERM grace keeps the SIGTERM-ignored case fast.
WORKER_ENV = {"SERVETUNE_STOP_GRACE_S": "3", "SERVETUNE_GPU_FREE_TIMEOUT_S": "5",
              "HF_TOKEN": "hf_planted_secret_123", "RAY_USAGE_STATS_ENABLED": "0"}


def fake_study(tmp: Path, *, fake_args: list[str], search: str, trials: int, parallel: int = 2,
               name: str = "faults", sampler: str = "grid", ready_timeout_s: float = 8, env: str = "",
               duration_s: float = 1.0, qps: float = 10, gpus: int = 2, extra: str = "") -> tuple[Path, str]:
    """A sim study whose engine is tests/fake_engine.py; returns (study path, the marker in the engine env)."""
    marker = uuid.uuid4().hex
    cmd = json.dumps(["{python}", FAKE, *fake_args])
    text = textwrap.dedent(f"""
    name: {name}
    model: {{preset: llama-3.2-1b}}
    engines:
      - name: sim
        command: {cmd}
        ready_timeout_s: {ready_timeout_s}
        env: {{FAKE_MARK: "{marker}"{env}}}
    hardware: {{gpu: h100, gpus: {gpus}, max_gpus_per_trial: 1}}
    workload:
      dataset: {{kind: random, input_tokens: 32, output_tokens: 8, num_requests: 10}}
      scenarios:
        - {{kind: server, qps: {qps}, duration_s: {duration_s}, timeout_s: 30}}
    objectives:
      - {{metric: output_tokens_per_s_per_gpu, scenario: server}}
    sampler: {{kind: {sampler}, seed: 0}}
    baseline: false
    budget: {{trials: {trials}, parallel: {parallel}}}
    output_dir: {tmp / 'run'}
    """)
    text += "search:\n" + textwrap.indent(textwrap.dedent(search).strip(), "  ") + "\n" + extra
    path = tmp / "study.yaml"
    path.write_text(text)
    return path, marker


def marked_pids(marker: str) -> list[int]:
    """Live (non-zombie) processes whose environment carries the marker: engines and their children."""
    needle = f"FAKE_MARK={marker}".encode()
    out = []
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        try:
            if needle not in (d / "environ").read_bytes():
                continue
            stat = (d / "stat").read_text()
        except OSError:
            continue
        if stat[stat.rfind(")") + 2:].split()[0] != "Z":
            out.append(int(d.name))
    return out


def listening(port: int) -> list[str]:
    """Local addresses (hex, as in /proc/net/tcp*) listening on this port."""
    hits = []
    for f in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            lines = Path(f).read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            parts = line.split()
            addr, hexport = parts[1].rsplit(":", 1)
            if parts[3] == "0A" and int(hexport, 16) == port:
                hits.append(addr)
    return hits


LOOPBACK_HEX = {"0100007F", "0000000000000000FFFF00000100007F", "00000000000000000000000001000000"}  # 127.0.0.1,
# ::ffff:127.0.0.1 and ::1 as /proc/net/tcp* writes them


def listening_sockets(pids: list[int]) -> list[tuple[int, str, int]]:
    """(pid, local address in hex, port) of every TCP socket these processes listen on: the sockets of
    /proc/net/tcp and tcp6 in state LISTEN, matched to the processes by inode through /proc/PID/fd."""
    by_inode = {}
    for f in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in Path(f).read_text().splitlines()[1:]:
            parts = line.split()
            if parts[3] == "0A":
                addr, port = parts[1].rsplit(":", 1)
                by_inode[parts[9]] = (addr, int(port, 16))
    out = []
    for pid in pids:
        try:
            fds = os.listdir(f"/proc/{pid}/fd")
        except OSError:
            continue
        for fd in fds:
            try:
                target = os.readlink(f"/proc/{pid}/fd/{fd}")
            except OSError:
                continue
            if target.startswith("socket:[") and target[8:-1] in by_inode:
                out.append((pid, *by_inode[target[8:-1]]))
    return out


def argv_port(argv: list[str]) -> int | None:
    return int(argv[argv.index("--port") + 1]) if "--port" in argv else None


def trials(run: Path) -> dict[int, dict]:
    return {int(p.parent.name): json.loads(p.read_text()) for p in sorted((run / "trials").glob("*/trial.json"))}


def assert_nothing_leaked(run: Path, marker: str, timeout_s: float = 15) -> None:
    deadline = time.monotonic() + timeout_s
    while marked_pids(marker) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not marked_pids(marker), f"engine processes outlived the study: {marked_pids(marker)}"
    assert not list((run / "trials").glob("*/engine.pid")), "a pid file was left: its engine was never stopped"
    for n, t in trials(run).items():
        port = argv_port(t.get("argv") or [])
        if port:
            assert not listening(port), f"trial {n}: port {port} still listening"


def ray_gpus_back(expected: float, timeout_s: float = 20) -> float:
    deadline = time.monotonic() + timeout_s
    avail = 0.0
    while time.monotonic() < deadline:
        avail = ray.available_resources().get("GPU", 0.0)
        if avail >= expected:
            break
        time.sleep(0.2)
    return avail


def run_study_inprocess(path: Path, events: list | None = None):
    spec = load_study(str(path))
    return StudyDriver(spec, on_event=(lambda k, d: events.append((k, d))) if events is not None else None).run()


def env_for_ray():
    """ray.init kwargs shared by the in-process reliability tests (one local instance per module)."""
    return dict(num_cpus=2, num_gpus=4, include_dashboard=False, object_store_memory=128 * 1024 * 1024,
                logging_level="ERROR", runtime_env={"env_vars": dict(WORKER_ENV)})


@pytest.fixture(scope="session")
def ray_local():
    """One local Ray instance (4 GPUs declared) for every in-process study of the reliability/security tests,
    started as a study starts its own: on loopback, in a private temp dir."""
    started = None if ray.is_initialized() else local_ray.start(None, **env_for_ray())
    yield ray
    if started is not None:
        started.stop()


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True
