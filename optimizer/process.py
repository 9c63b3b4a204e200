"""Engine processes: start from an argv list in their own process group, wait for health, stop for good.

Engines spawn workers, schedulers and engine cores; killing only the parent leaks GPUs. So every engine
gets its own session (process group), we signal the group, and we leave a pid file behind that a later
run can use to reap a group orphaned by a killed driver.
"""
from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from servetune.optimizer import secret_refs


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def resolve_env(env: dict[str, str]) -> dict[str, str]:
    """Expand ``${NAME}`` from our own environment at launch time; secrets never sit in plans or files."""
    return {k: secret_refs.expand(v) for k, v in env.items()}


@dataclass
class EngineProcess:
    proc: subprocess.Popen
    log_path: Path
    pid_path: Path
    url: str
    killed_after_grace: bool = False  # it ignored SIGTERM and had to be SIGKILLed

    @property
    def pgid(self) -> int:
        return self.proc.pid  # start_new_session=True makes the child its own group leader

    def alive(self) -> bool:
        return self.proc.poll() is None

    def log_tail(self, max_bytes: int = 16384) -> str:
        try:
            with open(self.log_path, "rb") as f:
                f.seek(0, os.SEEK_END)
                size = f.tell()
                f.seek(max(0, size - max_bytes))
                return f.read().decode("utf-8", "replace")
        except OSError:
            return ""


def start(argv: list[str], env: dict[str, str], log_path: Path, url: str, cwd: str | None = None) -> EngineProcess:
    log_path.parent.mkdir(parents=True, exist_ok=True)
    full_env = dict(os.environ)
    full_env.update(resolve_env(env))
    # `--api-key ${API_KEY}` in extra_args: the value is read now; the recorded argv keeps the reference
    real_argv = [secret_refs.expand(a) for a in argv]
    log = open(log_path, "ab", buffering=0)
    try:
        proc = subprocess.Popen(real_argv, env=full_env, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                start_new_session=True, cwd=cwd)
    finally:
        log.close()
    pid_path = log_path.parent / "engine.pid"
    # write-then-rename: a reaper (or a driver killed mid-write) never reads half a pid file
    tmp = pid_path.with_name(f".{pid_path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps({"pgid": proc.pid, "argv0": argv[0], "started": time.time(),
                               "host": socket.gethostname()}))
    os.replace(tmp, pid_path)
    return EngineProcess(proc, log_path, pid_path, url)


def append_log(log_path: Path, line: str) -> None:
    """A servetune note in the engine's log (kept with the engine's own words for the report)."""
    try:
        with open(log_path, "a", encoding="utf-8") as f:
            f.write(line.rstrip("\n") + "\n")
    except OSError:
        pass


# A worker can die while the API process lives on and never turns healthy (seen with vLLM TP=2: an
# illegal memory access in a worker); these lines mean the start has failed, whatever /health says later.
FATAL_LOG = re.compile(r"CUDA error: |illegal memory access|Engine core initialization failed|"
                       r"scheduler died|Initialization failed\. Please see|NCCL error|Segmentation fault")


def wait_healthy(ep: EngineProcess, path: str, timeout_s: float, interval_s: float = 0.25) -> str | None:
    """None when healthy; else 'exited', 'fatal' (a fatal line in the log) or 'timeout'."""
    deadline = time.monotonic() + timeout_s
    next_scan = 0.0
    while time.monotonic() < deadline:
        if not ep.alive():
            return "exited"
        if time.monotonic() >= next_scan:
            next_scan = time.monotonic() + 5.0
            if FATAL_LOG.search(ep.log_tail(65536)):
                time.sleep(2.0)  # let the process finish printing its reason
                return "exited" if not ep.alive() else "fatal"
        try:
            with urllib.request.urlopen(ep.url + path, timeout=2.0) as r:
                if r.status == 200:
                    return None
        except (urllib.error.URLError, ConnectionError, TimeoutError, OSError):
            pass
        time.sleep(interval_s)
    return "timeout"


def http_get(url: str, timeout_s: float = 5.0) -> str | None:
    try:
        with urllib.request.urlopen(url, timeout=timeout_s) as r:
            return r.read().decode("utf-8", "replace")
    except (urllib.error.URLError, ConnectionError, TimeoutError, OSError):
        return None


def stop(ep: EngineProcess, grace_s: float = 20.0) -> int | None:
    """SIGTERM the group, wait, SIGKILL what is left. Returns the exit code."""
    ep.killed_after_grace = kill_group(ep.pgid, grace_s, ep.proc)
    try:
        ep.pid_path.unlink()
    except OSError:
        pass
    return ep.proc.returncode


def kill_group(pgid: int, grace_s: float = 20.0, proc: subprocess.Popen | None = None) -> bool:
    """SIGTERM the group, SIGKILL it after ``grace_s``; True when SIGKILL was needed."""
    killed = False
    try:
        os.killpg(pgid, signal.SIGTERM)
    except (ProcessLookupError, PermissionError):
        pass
    deadline = time.monotonic() + grace_s
    while time.monotonic() < deadline:
        if proc is not None:
            proc.poll()
        if not _group_alive(pgid):
            break
        time.sleep(0.1)
    else:
        killed = True
        try:
            os.killpg(pgid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
    if proc is not None:
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            pass
    # children re-parented to init are reaped by it; wait until the group is really gone
    end = time.monotonic() + 10
    while _group_alive(pgid) and time.monotonic() < end:
        time.sleep(0.1)
    return killed


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # a zombie group leader still "exists"; look for any live member
    for pid_dir in Path("/proc").iterdir():
        if not pid_dir.name.isdigit():
            continue
        try:
            stat = (pid_dir / "stat").read_text()
        except OSError:
            continue
        fields = stat[stat.rfind(")") + 2:].split()
        if len(fields) > 3 and int(fields[2]) == pgid and fields[0] != "Z":
            return True
    return False


def _start_time(pid: int) -> float | None:
    """Wall-clock start of a live process (None if gone or unreadable)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
        ticks = int(stat[stat.rfind(")") + 2:].split()[19])
        btime = next(int(ln.split()[1]) for ln in Path("/proc/stat").read_text().splitlines()
                     if ln.startswith("btime"))
        return btime + ticks / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError, StopIteration):
        return None


def reap_orphan(pid_path: Path) -> bool:
    """Kill the group a dead driver left running (pid file still present). True if one was killed."""
    try:
        info = json.loads(pid_path.read_text())
        pgid = int(info["pgid"])
    except (OSError, ValueError, KeyError):
        return False
    if info.get("host", socket.gethostname()) != socket.gethostname():
        return False  # a trial directory on a shared file system: that group lives on another machine
    alive = _group_alive(pgid)
    started = info.get("started")
    leader_start = _start_time(pgid)
    if alive and started is not None and leader_start is not None and leader_start > float(started) + 30:
        alive = False  # the pid was reused by a newer process: not ours to kill
    if alive:
        kill_group(pgid, grace_s=10.0)
    try:
        pid_path.unlink()
    except OSError:
        pass
    return alive


def gpus_memory_used_mib(gpu_ids: list[int]) -> dict[int, float] | None:
    """Used memory per GPU from nvidia-smi; None where there is no NVIDIA driver."""
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=index,memory.used", "--format=csv,noheader,nounits"],
                             capture_output=True, text=True, timeout=20, check=True).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    used = {}
    for line in out.strip().splitlines():
        idx, mem = (x.strip() for x in line.split(","))
        if int(idx) in gpu_ids:
            used[int(idx)] = float(mem)
    return used


def wait_gpus_free(gpu_ids: list[int], threshold_mib: float = 2048.0, timeout_s: float = 120.0) -> bool:
    """True once every GPU's used memory is below the threshold (or there is no NVML to ask)."""
    deadline = time.monotonic() + timeout_s
    while True:
        used = gpus_memory_used_mib(gpu_ids)
        if used is None or all(v < threshold_mib for v in used.values()):
            return True
        if time.monotonic() > deadline:
            return False
        time.sleep(1.0)
