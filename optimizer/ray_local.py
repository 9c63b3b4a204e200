"""The local Ray instance of a study: on loopback only, in a private temp dir, and never left behind.

Ray 2.x binds every one of its servers (GCS, raylet, workers, the runtime-env and dashboard agents) to the
node address, and turns a node address of 127.0.0.1 into the host's routable one unless multi-node clustering
is switched off (``RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0``, the switch it has for single-machine use). A local
study switches it off while it starts Ray, so all of Ray listens on 127.0.0.1 only. Joining a cluster
(``servetune run --ray-address``) is the user's explicit choice of network and does not come here.

Ray's temp dir (sessions, logs, the object store's socket) lies in a private directory (mode 0700) made for the
run in the user's temp dir, not in the shared, world-writable ``/tmp/ray``; it is removed when the study stops.
(Ray makes its own temp dir world-writable, hence the private directory around it.) Its sockets must fit an
AF_UNIX path (107 bytes on Linux), so a temp dir too deep for them falls back to ``/tmp``.

A driver killed with ``kill -9`` cannot stop Ray: its agents stay up, ports open, for a minute or more. So the
run directory holds ``ray.json`` while Ray runs: the session directory, the pids (with start times) of Ray's
processes, and a random token every process Ray starts carries in its environment. The next start in that run
directory ends the processes it names (never by process name) and removes the temp dir.
"""
from __future__ import annotations

import contextlib
import json
import os
import secrets as _secrets
import shutil
import signal
import sys
import tempfile
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import ray

from servetune.optimizer.records import write_json_atomic

LOOPBACK = "127.0.0.1"
RECORD = "ray.json"
TOKEN_VAR = "SERVETUNE_RAY_TOKEN"  # in the environment of every process of the Ray instance a study started
_CLUSTER_VAR = "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"
_TEMP_PREFIX = "servetune-ray-"
_RAY_SUBDIR = "ray"  # Ray's temp dir, inside the private one
# Ray's longest socket path under the private dir: ray/session_<date>_<time>_<usec>_<pid>/sockets/plasma_store
_SOCKET_TAIL = "/ray/session_2000-01-01_00-00-00_000000_4194304/sockets/plasma_store"
_AF_UNIX_MAX = (104 if sys.platform == "darwin" else 108) - 1


def local_init_kwargs(temp_dir: str | os.PathLike, **overrides: Any) -> dict[str, Any]:
    """``ray.init`` keyword arguments for a local instance: loopback, no dashboard, Ray's files in ``temp_dir``.
    ``overrides`` (CPUs, GPUs, object store, logging, runtime_env) are added; they cannot change the address."""
    kwargs: dict[str, Any] = dict(include_dashboard=False, logging_level="ERROR")
    kwargs.update(overrides)
    kwargs.update(_node_ip_address=LOOPBACK, _temp_dir=str(temp_dir))
    return kwargs


def pick_temp_dir() -> Path:
    """A new private directory (mode 0700) to hold Ray's temp dir, short enough for its sockets: in the user's
    temp dir, else in /tmp."""
    for parent in (tempfile.gettempdir(), "/tmp"):
        probe = os.path.join(parent, _TEMP_PREFIX + "xxxxxxxx") + _SOCKET_TAIL
        if len(probe.encode()) <= _AF_UNIX_MAX and os.path.isdir(parent):
            return Path(tempfile.mkdtemp(prefix=_TEMP_PREFIX, dir=parent))  # mode 0700
    raise RuntimeError(f"no temp dir short enough for Ray's sockets ({_AF_UNIX_MAX} bytes); set TMPDIR to a "
                       "short path such as /tmp")


@dataclass
class LocalRay:
    """A started local instance: stop() shuts it down and removes what it left."""

    temp_dir: Path
    token: str
    record: Path | None = None
    session_dir: str = ""
    pids: list[list[int]] = field(default_factory=list)  # [pid, start time in clock ticks]

    def stop(self) -> None:
        if ray.is_initialized():
            ray.shutdown()
        # agents notice their raylet's end on their own, up to a minute later: end them now
        _end(self._leftovers(), grace_s=5.0)
        shutil.rmtree(self.temp_dir, ignore_errors=True)
        if self.record is not None:
            self.record.unlink(missing_ok=True)

    def _leftovers(self) -> list[int]:
        return _processes_of({"token": self.token, "session_dir": self.session_dir, "pids": self.pids})

    def _write(self) -> None:
        if self.record is not None:
            write_json_atomic(self.record, {"driver_pid": os.getpid(), "token": self.token,
                                            "temp_dir": str(self.temp_dir), "session_dir": self.session_dir,
                                            "pids": self.pids})


def start(run_dir: str | os.PathLike | None = None, **ray_kwargs: Any) -> LocalRay:
    """Start a local Ray instance for the study in ``run_dir`` (None: no record, nothing to clean up after a
    crash), after ending what a killed driver left there."""
    if run_dir is not None:
        reap_leftovers(run_dir)
    temp_dir = pick_temp_dir()
    local = LocalRay(temp_dir=temp_dir, token=_secrets.token_hex(16),
                     record=Path(run_dir) / RECORD if run_dir is not None else None)
    local._write()  # before Ray starts: a driver killed during ray.init still leaves its token behind
    with _loopback_only(), _env(TOKEN_VAR, local.token):
        ray.init(**local_init_kwargs(temp_dir / _RAY_SUBDIR, **ray_kwargs))
    latest = temp_dir / _RAY_SUBDIR / "session_latest"  # Ray's link to the session it just made
    local.session_dir = os.path.realpath(latest) if latest.exists() else ""
    local.pids = [[pid, _start_ticks(pid) or 0] for pid in _processes_of({"token": local.token})]
    local._write()
    ip = ray.util.get_node_ip_address()
    if ip != LOOPBACK:
        warnings.warn(f"Ray's node address is {ip}, not {LOOPBACK}: this Ray version may listen on more than "
                      "loopback", RuntimeWarning, stacklevel=2)
    return local


def reap_leftovers(run_dir: str | os.PathLike) -> int:
    """End the Ray processes a killed driver left for ``run_dir`` (those its ``ray.json`` names) and remove
    its temp dir. Returns how many processes were ended."""
    path = Path(run_dir) / RECORD
    try:
        rec = json.loads(path.read_text())
    except FileNotFoundError:
        return 0
    except (OSError, ValueError):
        path.unlink(missing_ok=True)
        return 0
    pids = _processes_of(rec)
    _end(pids, grace_s=5.0)
    temp = Path(str(rec.get("temp_dir") or ""))
    if temp.name.startswith(_TEMP_PREFIX) and temp.is_dir() and temp.stat().st_uid == os.getuid():
        shutil.rmtree(temp, ignore_errors=True)
    path.unlink(missing_ok=True)
    return len(pids)


# -- internals ------------------------------------------------------------------------------------------------

@contextlib.contextmanager
def _loopback_only():
    """Clustering off while Ray starts (its processes keep the setting from their environment); the driver's
    own setting is restored after, so that a later ``ray.init(address=...)`` in this process may still join a
    cluster. Ray is imported by then: its constant was read from the environment at import."""
    try:
        from ray._private import ray_constants  # noqa: PLC0415 — private; another Ray layout lacks it (below)
        before = ray_constants.ENABLE_RAY_CLUSTER
    except (ImportError, AttributeError):  # another Ray layout: the environment alone; start() warns if not loopback
        ray_constants, before = None, None
    if ray_constants is not None:
        ray_constants.ENABLE_RAY_CLUSTER = False
    try:
        with _env(_CLUSTER_VAR, "0"):
            yield
    finally:
        if ray_constants is not None:
            ray_constants.ENABLE_RAY_CLUSTER = before


@contextlib.contextmanager
def _env(name: str, value: str):
    old = os.environ.get(name)
    os.environ[name] = value
    try:
        yield
    finally:
        if old is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = old


def _start_ticks(pid: int) -> int | None:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
        return int(stat[stat.rfind(")") + 2:].split()[19])
    except (OSError, ValueError, IndexError):
        return None


def _processes_of(rec: dict[str, Any]) -> list[int]:
    """Live processes of this user that belong to the recorded Ray instance: a recorded pid with its recorded
    start time, the session directory on the command line, or the token in the environment. Never this process
    or one of its ancestors."""
    token = str(rec.get("token") or "")
    needle = f"{TOKEN_VAR}={token}".encode() if token else None
    session = str(rec.get("session_dir") or "").encode()
    recorded = {int(p): int(t) for p, t in rec.get("pids") or [] if t}
    spare = _ancestors(os.getpid())
    out = []
    for d in Path("/proc").iterdir():
        if not d.name.isdigit() or int(d.name) in spare:
            continue
        pid = int(d.name)
        try:
            if d.stat().st_uid != os.getuid():
                continue
            stat = (d / "stat").read_text()
            if stat[stat.rfind(")") + 2:].split()[0] == "Z":
                continue
            ours = recorded.get(pid) is not None and recorded[pid] == _start_ticks(pid)
            if not ours and session:
                ours = session in (d / "cmdline").read_bytes()
            if not ours and needle:
                ours = needle in (d / "environ").read_bytes()
        except OSError:
            continue
        if ours:
            out.append(pid)
    return out


def _ancestors(pid: int) -> set[int]:
    out = set()
    while pid > 1 and pid not in out:
        out.add(pid)
        try:
            stat = Path(f"/proc/{pid}/stat").read_text()
            pid = int(stat[stat.rfind(")") + 2:].split()[1])
        except (OSError, ValueError, IndexError):
            break
    return out


def _end(pids: list[int], grace_s: float) -> None:
    """SIGTERM, then SIGKILL whatever is still alive after ``grace_s``."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        alive = []
        for pid in pids:
            try:
                os.kill(pid, sig)
                alive.append(pid)
            except (ProcessLookupError, PermissionError):
                pass
        deadline = time.monotonic() + (grace_s if sig == signal.SIGTERM else 5.0)
        while alive and time.monotonic() < deadline:
            alive = [p for p in alive if _running(p)]
            if alive:
                time.sleep(0.1)
        pids = alive
        if not pids:
            return


def _running(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat[stat.rfind(")") + 2:].split()[0] != "Z"
