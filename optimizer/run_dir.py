"""The run directory: every path in it, and every read and write of its files, in one place.

    runs/<study>/
      study.yaml              the study file of the last run (resume_check compares against it)
      summary.json            the study's outcome: why it stopped, the Pareto trials, GPU use, noise, quality
      sessions.json           each driver run of the study: started, ended, pid, host
      .lock                   held by the driver running the study (its pid)
      trials/NNNN/            one trial: trial.json (its record), estimate.json (the pre-screen's), engine.log,
                              engine.pid, per-request files; repeat_K/ (re-measurements of a Pareto candidate)

A record that cannot be read (missing, or half written by a killed process) reads as None: every caller treats
that as "not measured here".
"""
from __future__ import annotations

import fcntl
import json
import os
import socket
from datetime import datetime
from pathlib import Path
from typing import IO, Any

from servetune.optimizer.records import TrialResult, write_json_atomic

TRIALS = "trials"
RECORD = "trial.json"
ESTIMATE = "estimate.json"
SUMMARY = "summary.json"
SESSIONS = "sessions.json"
STUDY_FILE = "study.yaml"
LOCK = ".lock"
ENGINE_PID = "engine.pid"

PathLike = str | os.PathLike


class StudyLocked(RuntimeError):
    pass


# -- where ------------------------------------------------------------------------------------------------------

def trials_root(run_dir: PathLike) -> Path:
    return Path(run_dir, TRIALS)


def trial_dir(run_dir: PathLike, number: int) -> Path:
    return Path(run_dir, TRIALS, f"{number:04d}")


def record_path(tdir: PathLike) -> Path:
    return Path(tdir, RECORD)


def repeat_dir(run_dir: PathLike, number: int, k: int) -> Path:
    return trial_dir(run_dir, number) / f"repeat_{k}"


def engine_pid_file(tdir: PathLike) -> Path:
    return Path(tdir, ENGINE_PID)


def is_run_dir(path: PathLike) -> bool:
    """A run directory holds trials/ (a study that ran) or study.yaml (one that started)."""
    return Path(path, TRIALS).is_dir() or Path(path, STUDY_FILE).is_file()


def record_paths(run_dir: PathLike) -> list[Path]:
    return sorted(Path(run_dir, TRIALS).glob(f"*/{RECORD}"))


def has_records(run_dir: PathLike) -> bool:
    return any(Path(run_dir, TRIALS).glob(f"*/{RECORD}"))


# -- trial records ------------------------------------------------------------------------------------------------

def has_record(tdir: PathLike) -> bool:
    return Path(tdir, RECORD).exists()


def read_record(tdir: PathLike) -> dict[str, Any] | None:
    """A trial's ``trial.json`` as written, or None while it is missing or half written."""
    try:
        data = json.loads(Path(tdir, RECORD).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def read_result(tdir: PathLike) -> TrialResult | None:
    d = read_record(tdir)
    try:
        return None if d is None else TrialResult.from_dict(d)
    except TypeError:
        return None


def write_record(tdir: PathLike, record: TrialResult | dict[str, Any]) -> None:
    write_json_atomic(Path(tdir, RECORD), record.to_dict() if isinstance(record, TrialResult) else record)


def mark_stale(tdir: PathLike, number: int, reason: str) -> None:
    """The record of a trial that will not be measured here: failed as stale, with why."""
    d = read_record(tdir) or {"number": number, "engine": "", "params": {}}
    d.update(state="failed", failure={"kind": "internal", "reason": reason}, stale=True)
    write_record(tdir, d)


def launched(tdir: PathLike) -> bool:
    """Whether the trial's Ray task has begun (run_trial writes started_at before it starts an engine)."""
    return bool((read_record(tdir) or {}).get("started_at"))


def trial_records(run_dir: PathLike) -> dict[int, dict[str, Any]]:
    """Every readable ``trials/NNNN/trial.json`` of a run, by trial number (a file being written is skipped)."""
    out: dict[int, dict[str, Any]] = {}
    for path in record_paths(run_dir):
        d = read_record(path.parent)
        if d is not None and path.parent.name.isdigit():
            out[int(path.parent.name)] = d
    return out


def newest_record_mtime(run_dir: PathLike) -> float:
    return max((p.stat().st_mtime for p in record_paths(run_dir)), default=0.0)


# -- the pre-screen's estimate beside a trial -----------------------------------------------------------------

def read_estimate(tdir: PathLike) -> dict[str, Any] | None:
    try:
        data = json.loads(Path(tdir, ESTIMATE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def write_estimate(tdir: PathLike, data: dict[str, Any]) -> None:
    write_json_atomic(Path(tdir, ESTIMATE), data)


# -- the study's summary ------------------------------------------------------------------------------------------

def summary_path(run_dir: PathLike) -> Path:
    return Path(run_dir, SUMMARY)


def read_summary(run_dir: PathLike) -> dict[str, Any] | None:
    try:
        data = json.loads(summary_path(run_dir).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def write_summary(run_dir: PathLike, summary: dict[str, Any]) -> None:
    write_json_atomic(summary_path(run_dir), summary)


def study_file(run_dir: PathLike) -> Path:
    return Path(run_dir, STUDY_FILE)


# -- who runs the study -------------------------------------------------------------------------------------------

def lock(run_dir: PathLike) -> IO[str]:
    """Hold the study's lock (close the returned file to release it); StudyLocked when another driver has it."""
    path = Path(run_dir, LOCK)
    f = open(path, "a+")  # not "w": a second driver must not erase the holder's pid
    try:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        f.close()
        raise StudyLocked(f"another servetune process is running the study in {run_dir}") from None
    f.seek(0)
    f.truncate()
    f.write(str(os.getpid()))
    f.flush()
    return f


def lock_path(run_dir: PathLike) -> Path:
    return Path(run_dir, LOCK)


def _now() -> str:
    return datetime.now().astimezone().isoformat(timespec="milliseconds")


def open_session(run_dir: PathLike) -> int:
    """Record that a driver starts running the study now; returns the session's index (for close_session)."""
    sessions = read_sessions(run_dir)
    sessions.append({"started": _now(), "ended": None, "pid": os.getpid(), "host": socket.gethostname()})
    write_json_atomic(Path(run_dir, SESSIONS), sessions)
    return len(sessions) - 1


def close_session(run_dir: PathLike, index: int) -> None:
    sessions = read_sessions(run_dir)
    if 0 <= index < len(sessions):
        sessions[index]["ended"] = _now()
        write_json_atomic(Path(run_dir, SESSIONS), sessions)


def read_sessions(run_dir: PathLike) -> list[dict[str, Any]]:
    """The driver's runs of a study: [{"started": iso, "ended": iso | null, "pid": n, "host": name}]."""
    try:
        data = json.loads(Path(run_dir, SESSIONS).read_text())
    except (OSError, ValueError):
        return []
    return [s for s in data if isinstance(s, dict)] if isinstance(data, list) else []


def study_running(run_dir: PathLike) -> bool:
    """Whether a driver runs the study now: its last session has not ended and its process is alive (a driver
    on another host is taken to be alive: it cannot be checked from here)."""
    sessions = read_sessions(run_dir)
    if not sessions or sessions[-1].get("ended"):
        return False
    last = sessions[-1]
    if last.get("host") not in (None, socket.gethostname()):
        return True
    try:
        os.kill(int(last.get("pid")), 0)  # type: ignore[arg-type]
    except ProcessLookupError:
        return False
    except (PermissionError, TypeError, ValueError):
        return True
    return True
