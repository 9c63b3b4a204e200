"""Plain data of one trial: what to launch (TrialPlan) and what happened (TrialResult).

Both travel through Ray as dicts and land on disk as ``trials/NNNN/trial.json`` (optimizer.run_dir); the report
reads that file, so it carries everything a person needs to judge the trial without the Optuna storage.
"""
from __future__ import annotations

import json
import os
import tempfile
from dataclasses import asdict, dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any, Iterable, Mapping

from servetune.optimizer.engines.base import ModelRef


@dataclass
class ScenarioPlan:
    label: str  # the scenario's name in the study (objectives refer to it)
    settings: dict[str, Any]  # loadgen.scenarios.ScenarioSettings fields
    max_qps: dict[str, Any] | None = None  # lo, hi, tolerance, max_levels: search the rate (settings' qps unused)
    dataset: dict[str, Any] | None = None  # this scenario's own loadgen dataset arguments (None: the trial's)


@dataclass
class TrialPlan:
    number: int
    engine: str
    params: dict[str, Any]  # engine-neutral, everything this trial sets explicitly
    model: ModelRef
    gpus: int
    trial_dir: str
    dataset: dict[str, Any]  # loadgen dataset arguments
    scenarios: list[ScenarioPlan]
    host: str = "127.0.0.1"
    gpu: str = "h100"
    gpu_memory_gib: float | None = None
    engine_command: list[str] | None = None
    engine_version: str | None = None
    extra_args: list[str] = field(default_factory=list)
    extra_env: dict[str, str] = field(default_factory=dict)  # values may be ${NAME} references
    ready_timeout_s: float = 900.0
    is_baseline: bool = False
    fake_gpus: bool = False  # the sim: GPU ids come from Ray's bookkeeping, no NVML checks
    warmup: dict[str, Any] = field(default_factory=lambda: {"enabled": False})  # spec.WarmupSpec fields
    audit: dict[str, Any] = field(default_factory=lambda: {"enabled": False})  # spec.AuditSpec fields
    quality: dict[str, Any] | None = None  # the evaluation to run after the load (QualityGate.trial_settings)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "TrialPlan":
        d = dict(d)
        d["model"] = ModelRef(**d["model"])
        d["scenarios"] = [ScenarioPlan(**s) for s in d["scenarios"]]
        return cls(**d)


@dataclass
class TrialResult:
    number: int
    engine: str
    params: dict[str, Any]
    state: str  # complete | failed | rejected | running
    is_baseline: bool = False
    engine_version: str = ""
    failure: dict[str, str] | None = None  # {"kind": ..., "reason": ...}
    gpus: int = 0
    gpu_ids: list[int] = field(default_factory=list)
    node: str = ""  # the Ray node that ran it, on a cluster ("name (node id)"); "" on a local instance
    argv: list[str] = field(default_factory=list)
    started_at: str = ""
    ready_s: float | None = None
    wall_s: float = 0.0
    loaded_s: float = 0.0  # time under measured load (GPU duty-cycle numerator)
    scenarios: dict[str, dict[str, Any]] = field(default_factory=dict)
    metrics_delta: dict[str, float] = field(default_factory=dict)
    objectives: dict[str, float] = field(default_factory=dict)
    duplicate_of: int | None = None
    warmup: dict[str, Any] | None = None  # what the launch's warm-up did (optimizer.warmup)
    # the evaluation (eval.json, counts) and, once the driver compared it with the baseline's, the verdict
    quality: dict[str, Any] | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "TrialResult":
        known = set(cls.__dataclass_fields__)
        return cls(**{k: v for k, v in d.items() if k in known})


def write_json_atomic(path: str | os.PathLike, data: Any, indent: int | None = 1) -> None:
    """Write-then-rename, so a killed process never leaves a half-written file behind."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump(data, f, indent=indent, default=str, separators=None if indent else (",", ":"))
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise


def _session_windows(sessions: Iterable[Mapping[str, Any]], spans: list[tuple]) -> list[tuple[float, float]]:
    """(start, end) of each driver session, in epoch seconds; a session that never recorded its end (a killed
    driver) ends with the last trial it released."""
    starts = []
    for s in sessions:
        try:
            starts.append(datetime.fromisoformat(str(s["started"])).timestamp())
        except (KeyError, ValueError, TypeError):
            continue
    out = []
    for i, s in enumerate(sessions):
        try:
            a = datetime.fromisoformat(str(s["started"])).timestamp()
        except (KeyError, ValueError, TypeError):
            continue
        try:
            b = datetime.fromisoformat(str(s.get("ended"))).timestamp()
        except (ValueError, TypeError):
            nxt = min((x for x in starts if x > a), default=float("inf"))
            b = max([a] + [end for start, end, _, _ in spans if a <= start < nxt])
        out.append((a, b))
    return out


def gpu_use(trials: Iterable[Mapping[str, Any]], gpus: int,
            sessions: Iterable[Mapping[str, Any]] | None = None) -> dict[str, Any]:
    """How busy the study kept its GPUs: GPU-seconds held by launched trials (launch to GPUs released) over
    the GPUs × the span from the first launch to the last release; the most GPUs held at once; and any two
    trials that held the same GPU at the same time (``shared``: [a, b, [ids]], empty unless packing broke).
    Duplicates and rejected configs hold none. Empty when nothing was launched. Takes trial records
    (``gpu_ids`` a list) or report rows ("0,1"). ``sessions`` (:func:`read_sessions`): the span counts only
    while a driver ran, not the hours between two runs of a resumed study."""
    spans = []
    for t in trials:
        ids, started, dup = t.get("gpu_ids"), t.get("started_at"), t.get("duplicate_of")
        if isinstance(ids, str):
            ids = [i.strip() for i in ids.split(",") if i.strip()]
        if (dup is not None and dup == dup) or not ids or not isinstance(started, str) or not started:
            continue  # (a report row holds NaN where a record holds None)
        try:
            start = datetime.fromisoformat(started).timestamp()
        except ValueError:
            continue
        wall = t.get("wall_s")
        end = start + (float(wall) if wall == wall and wall else 0.0)
        node = t.get("node") if isinstance(t.get("node"), str) else ""  # GPU 0 of two nodes is two GPUs
        spans.append((start, end, {f"{node}:{i}" if node else str(i) for i in ids}, t.get("number")))
    if not spans:
        return {}
    first, last = min(s[0] for s in spans), max(s[1] for s in spans)
    window = last - first
    windows = _session_windows(sessions or [], spans)
    if windows:  # the union of the sessions, clipped to [first launch, last release]
        merged: list[list[float]] = []
        for a, b in sorted((max(a, first), min(b, last)) for a, b in windows):
            if b <= a:
                continue
            if merged and a <= merged[-1][1]:
                merged[-1][1] = max(merged[-1][1], b)
            else:
                merged.append([a, b])
        window = sum(b - a for a, b in merged) or window
    busy = sum((end - start) * len(ids) for start, end, ids, _ in spans)
    available = window * max(gpus, 1)
    peak = max(sum(len(ids) for s, e, ids, _ in spans if s <= at < e) for at, _, _, _ in spans)
    shared = [[a[3], b[3], sorted(a[2] & b[2], key=str)] for i, a in enumerate(spans) for b in spans[i + 1:]
              if a[0] < b[1] and b[0] < a[1] and a[2] & b[2]]
    return {"busy_gpu_s": round(busy, 1), "available_gpu_s": round(available, 1),
            "utilization": round(busy / available, 4) if available > 0 else 0.0,
            "peak_gpus": peak, "shared": shared}
