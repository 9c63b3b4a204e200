"""A run directory as one table: a row per trial, flat columns, read without ever trusting it to be complete.

A study may still be running while its report is drawn, so a trial file can be half written, missing or of
an older shape. Such files are skipped and counted, never fatal: a report of 11 trials beats a traceback.

Columns of :attr:`Run.trials` (one row per trial, sorted by ``number``):

- ``number``, ``engine``, ``engine_version``, ``state`` (complete | failed | rejected | running),
  ``is_baseline``, ``failure_kind``, ``failure_reason``, ``gpus``, ``gpu_ids``, ``node`` (the Ray node, on a
  cluster), ``started_at``, ``ready_s``,
  ``wall_s``, ``trial_dir``
- ``param.<name>``: the sampled parameters; nested ones flattened as ``param.<name>.<key>``
- ``<scenario>.<metric>``: each scenario's summary (``server.tpot_p99_ms``); objective values the summary
  lacks are added under their own ``<scenario>.<metric>`` key
- ``<scenario>.sla_met``: the p99 TTFT/TPOT limits were met (True / False / None when not measured). The
  optimizer writes it; for trials without it the report judges the summary against the scenario's limits.
  ``<scenario>.sla_reason`` says which limit was missed. This decides who competes for the Pareto front,
  as it decides feasibility for Optuna.
- ``<scenario>.valid`` / ``<scenario>.invalid_reasons`` / ``<scenario>.notes``: loadgen's MLPerf-style
  verdict on the run itself (duration, query count, early stopping, latency). A short exploratory run can be
  "not valid" with its SLA met; the report shows that, but does not drop the point for it.
- ``<scenario>.contaminated``: its reported level failed the engine-side audit twice (loadgen.audit), so
  ``sla_met`` is None (neither met nor missed); ``<scenario>.contaminated_levels`` lists every level that did
- ``<scenario>.duration_s``, ``duplicate_of`` (a trial that reused an identical config's measurement)
- ``delta.<prometheus name>``: the engine's /metrics change over the trial
- ``quality.<figure>`` (studies with ``quality:``): ``kind`` (quality | drift), ``passed`` (True / False / None
  when no limits or not judged), ``exact_match``, ``first_divergence_mean``, ``kl_mean``, ``kl_max``,
  ``accuracy``, ``accuracy_drop``, ``reference`` (the baseline trial compared with), ``is_reference``,
  ``changes`` (numerics-changing settings), ``reason`` (limits missed, or why it was not checked), ``status``
  (reference | passed | failed | not checked | no limits). A trial whose
  ``passed`` is False is infeasible: :meth:`Run.feasible` is the SLA and this, as the optimizer tells Optuna.
"""
from __future__ import annotations

import json
import logging
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import yaml

from servetune.loadgen.sla import SLA_PRESETS, resolve_limits
from servetune.optimizer import run_dir as rd
from servetune.optimizer import study_yaml
from servetune.optimizer.engines import simulated

log = logging.getLogger(__name__)

PARAM = "param."
DELTA = "delta."
QUALITY = "quality."
QUALITY_FIGURES = ("exact_match", "first_divergence_mean", "kl_mean", "kl_max", "decisive_divergence", "regret_max",
                   "accuracy_drop")
# "interrupted": a trial that was running when its driver stopped (Ctrl-C, a crash); a resumed run queued its
# configuration again as a new trial. Shown as such, not as failed or as running while nothing runs.
STATES = ("complete", "failed", "rejected", "running", "interrupted")
_VERDICT: dict[Any, str] = {True: "passed", False: "failed"}


def dict_at(data: dict[str, Any], key: str) -> dict[str, Any]:
    """``data[key]`` when it is a mapping, else {}: trial.json and study.yaml are read as found."""
    value = data.get(key)
    return value if isinstance(value, dict) else {}


def list_at(data: dict[str, Any], key: str) -> list[Any]:
    """``data[key]`` when it is a list, else []."""
    value = data.get(key)
    return value if isinstance(value, list) else []


@dataclass(frozen=True)
class Scenario:
    name: str  # what columns and objectives call it (the spec's name, else its kind)
    kind: str
    qps: float | None = None
    ttft_limit_ms: float | None = None  # p99 SLA limits; None where the scenario has none
    tpot_limit_ms: float | None = None


@dataclass(frozen=True)
class LevelPoint:
    """One load level of a sweep or rate search, as the per-level chart draws it."""
    level: float
    unit: str  # "concurrency" or "qps"
    output_tokens_per_s: float
    tpot_p50_ms: float | None
    state: str  # valid | invalid | contaminated


@dataclass(frozen=True)
class Objective:
    metric: str
    scenario: str
    direction: str  # maximize | minimize

    @property
    def column(self) -> str:
        return f"{self.scenario}.{self.metric}"


@dataclass
class Run:
    run_dir: Path
    spec: dict[str, Any]
    trials: pd.DataFrame
    scenarios: list[Scenario]
    objectives: list[Objective]
    skipped: int = 0  # trial directories whose trial.json could not be read
    warnings: list[str] = field(default_factory=list)
    # trial number -> scenario -> its load levels as (level, output tok/s, p50 TPOT ms or None, state), by level;
    # state is "valid", "invalid" or "contaminated"; only scenarios that measured a concurrency or rate per level
    levels: dict[int, dict[str, list[LevelPoint]]] = field(default_factory=dict)

    # -- what the study is --------------------------------------------------------------------------------
    @property
    def name(self) -> str:
        return str(self.spec.get("name") or self.run_dir.name)

    @property
    def model(self) -> str:
        m = self.spec.get("model")
        if isinstance(m, dict):
            for key in ("name", "preset", "path"):
                if m.get(key):
                    return str(m[key])
        return str(m) if m else "unknown model"

    @property
    def engines(self) -> list[str]:
        """Engines as measured ("vllm 0.26.0"), else as the study file names them."""
        seen: dict[str, None] = {}
        if not self.trials.empty:
            for eng, ver in self.trials[["engine", "engine_version"]].itertuples(index=False):
                if isinstance(eng, str) and eng:
                    # the sim is servetune's own engine: its catalog revision ("1") is no release to name
                    seen[f"{eng} {ver}" if isinstance(ver, str) and ver and not simulated(eng) else eng] = None
        if not seen:
            for e in self.spec.get("engines") or []:
                name = e.get("name") if isinstance(e, dict) else e
                if name:
                    seen[str(name)] = None
        return list(seen)

    @property
    def gpu(self) -> str:
        hw = dict_at(self.spec, "hardware")
        kind = str(hw.get("gpu") or "GPU").upper()
        return f"{hw['gpus']} × {kind}" if hw.get("gpus") else kind

    @property
    def gpu_count(self) -> int | None:
        hw = dict_at(self.spec, "hardware")
        return int(hw["gpus"]) if isinstance(hw.get("gpus"), (int, float)) else None

    @property
    def study_db(self) -> Path | None:
        """The SQLite storage beside the trials; remote storage is never opened by a report."""
        p = self.run_dir / "study.db"
        return p if p.is_file() else None

    @property
    def param_columns(self) -> list[str]:
        return [c for c in self.trials.columns if c.startswith(PARAM)]

    # -- row selections -----------------------------------------------------------------------------------
    @property
    def complete(self) -> pd.Series:
        return self.trials["state"].eq("complete")

    def sla_met(self, scenario: str) -> pd.Series:
        """Complete trials whose measurement of ``scenario`` met its latency SLA (or that has none)."""
        col = f"{scenario}.sla_met"
        if col not in self.trials:
            return pd.Series(False, index=self.trials.index)
        return self.complete & self.trials[col].eq(True)

    def contaminated(self, scenario: str) -> pd.Series:
        """Complete trials whose reported ``scenario`` level failed the engine-side audit twice: no verdict."""
        col = f"{scenario}.contaminated"
        if col not in self.trials:
            return pd.Series(False, index=self.trials.index)
        return self.complete & self.trials[col].eq(True)

    def sla_met_all(self, scenarios: list[str]) -> pd.Series:
        ok = self.complete.copy()
        for s in scenarios:
            ok &= self.sla_met(s)
        return ok

    def quality_ok(self) -> pd.Series:
        """Trials whose outputs did not fail the study's quality limits (passed, no limits, or not checked)."""
        col = f"{QUALITY}passed"
        if col not in self.trials:
            return pd.Series(True, index=self.trials.index)
        return ~self.trials[col].apply(lambda v: v is False)

    def feasible(self, scenario: str) -> pd.Series:
        """What competes for a front: complete, the SLA of ``scenario`` met, the quality limits met."""
        return self.sla_met(scenario) & self.quality_ok()

    def feasible_all(self, scenarios: list[str]) -> pd.Series:
        return self.sla_met_all(scenarios) & self.quality_ok()

    @property
    def quality_kind(self) -> str | None:
        """"quality", "drift" (random weights) or None when the study checked no outputs."""
        col = f"{QUALITY}kind"
        if col not in self.trials:
            return None
        kinds = [k for k in self.trials[col].tolist() if isinstance(k, str)]
        return kinds[0] if kinds else None

    def baseline(self) -> pd.Series | None:
        """The baseline trial that counts: a complete one, else the latest that was not interrupted (a
        baseline interrupted and run again is the second one)."""
        rows = self.trials[self.trials["is_baseline"].eq(True)]
        if rows.empty:
            return None
        done = rows[rows["state"].eq("complete")]
        if not done.empty:
            return done.iloc[0]
        kept = rows[~rows["state"].eq("interrupted")]
        return (kept if not kept.empty else rows).iloc[-1]

    def state_counts(self) -> dict[str, int]:
        counts = self.trials["state"].value_counts().to_dict() if not self.trials.empty else {}
        ordered = {s: int(counts.pop(s, 0)) for s in STATES if s != "interrupted" or s in counts}
        ordered.update({str(k): int(v) for k, v in counts.items()})
        return ordered


_BASE_COLUMNS = ["number", "engine", "engine_version", "state", "is_baseline", "failure_kind",
                 "failure_reason", "gpus", "gpu_ids", "node", "started_at", "ready_s", "wall_s", "duplicate_of",
                 "trial_dir"]


def load_run(run_dir: str | Path) -> Run:
    run_dir = Path(run_dir)
    warnings: list[str] = []
    spec = _read_spec(rd.study_file(run_dir), warnings)

    rows: list[dict[str, Any]] = []
    raw: list[dict[str, Any]] = []
    skipped = 0
    running_now = rd.study_running(run_dir)
    tdir = rd.trials_root(run_dir)
    for d in sorted(tdir.iterdir()) if tdir.is_dir() else []:
        if not d.is_dir():
            continue
        f = rd.record_path(d)
        try:
            data = json.loads(f.read_text(encoding="utf-8"))
            if not isinstance(data, dict):
                raise ValueError(f"a JSON {type(data).__name__}, not an object")
            row = _flatten(data, d)
            if data.get("stale") or (row["state"] == "running" and not running_now):
                row["state"] = "interrupted"
            rows.append(row)
            raw.append(data)
        except FileNotFoundError:
            skipped += 1
            warnings.append(f"{f.relative_to(run_dir)}: not written yet")
        except (OSError, UnicodeDecodeError, ValueError, TypeError, AttributeError) as e:
            skipped += 1
            warnings.append(f"{f.relative_to(run_dir)}: unreadable ({e})")
    for w in warnings:
        log.warning("%s: %s", run_dir, w)

    scenarios = _scenarios(spec, raw)
    for row in rows:
        _judge_sla(row, scenarios)
    trials = pd.DataFrame(rows)
    for col in _BASE_COLUMNS:
        if col not in trials:
            trials[col] = pd.Series(dtype=object)
    if not trials.empty:
        trials = (trials.drop_duplicates("number", keep="last")
                  .sort_values("number", kind="stable").reset_index(drop=True))
        trials["number"] = trials["number"].astype(int)
        trials["is_baseline"] = trials["is_baseline"].eq(True)
        for c in trials.columns:
            if c.endswith((".valid", ".sla_met", ".passed")):
                # Tri-state (met / missed / not measured) as Python objects: a column of only True/False
                # would otherwise turn into numpy bools, and `v is False` checks downstream would lie.
                trials[c] = pd.Series([bool(v) if isinstance(v, (bool, np.bool_)) else None for v in trials[c]],
                                      index=trials.index, dtype=object)
            elif not (pd.api.types.is_numeric_dtype(trials[c]) or pd.api.types.is_bool_dtype(trials[c])):
                # Text and mixed columns as objects with None for "absent": pandas' own string dtype would
                # hold NaN there, which is truthy and prints as "nan".
                trials[c] = trials[c].astype(object).where(trials[c].notna(), None)
    levels = {int(row["number"]): pts for row, data in zip(rows, raw) if (pts := _level_points(data))}
    return Run(run_dir=run_dir, spec=spec, trials=trials, scenarios=scenarios,
               objectives=_objectives(spec, scenarios), skipped=skipped, warnings=warnings, levels=levels)


def _level_points(data: dict[str, Any]) -> dict[str, list[LevelPoint]]:
    """Per scenario, each load level's (level, output tok/s, p50 TPOT, state), sorted by level. A rate search
    may measure one rate twice: the last one stands."""
    out: dict[str, list[LevelPoint]] = {}
    scenarios = data.get("scenarios") or {}
    for name, sc in scenarios.items() if isinstance(scenarios, dict) else ():
        by_level: dict[float, LevelPoint] = {}
        for lv in (sc.get("levels") or []) if isinstance(sc, dict) else ():
            key = next((k for k in ("concurrency", "qps") if isinstance(lv.get(k), (int, float))), None) \
                if isinstance(lv, dict) else None
            summ = (lv.get("summary") or {}) if key else {}
            tok, tpot = summ.get("output_tokens_per_s"), summ.get("tpot_p50_ms")
            if key is None or not isinstance(tok, (int, float)) or not math.isfinite(tok):
                continue
            state = ("contaminated" if summ.get("audit_contaminated") else
                     "valid" if lv.get("valid", True) else "invalid")
            by_level[float(lv[key])] = LevelPoint(float(lv[key]), key, float(tok),
                                                  float(tpot) if isinstance(tpot, (int, float)) else None, state)
        if by_level:
            out[str(name)] = sorted(by_level.values(), key=lambda p: p.level)
    return out


def _read_spec(path: Path, warnings: list[str]) -> dict[str, Any]:
    if not path.exists():
        warnings.append("study.yaml: missing; names and SLA limits come from the trials alone")
        return {}
    try:  # within the study file's bounds: a run directory may come from anyone
        spec = study_yaml.load(study_yaml.read_text(path))
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as e:
        warnings.append(f"study.yaml: unreadable ({e.__class__.__name__})")
        return {}
    if not isinstance(spec, dict):
        warnings.append("study.yaml: not a mapping")
        return {}
    return spec


def _number(data: dict[str, Any], d: Path) -> int:
    n = data.get("number")
    if isinstance(n, int) and not isinstance(n, bool):
        return n
    return int(d.name)  # ValueError for a foreign folder name: skipped like any unreadable trial


def _flatten(data: dict[str, Any], d: Path) -> dict[str, Any]:
    failure = data.get("failure")
    if isinstance(failure, str):
        failure = {"kind": None, "reason": failure}
    failure = failure if isinstance(failure, dict) else {}
    gpu_ids = data.get("gpu_ids")
    row: dict[str, Any] = {
        "number": _number(data, d),
        "engine": data.get("engine"),
        "engine_version": None if data.get("engine_version") is None else str(data["engine_version"]),
        "state": str(data.get("state") or "running").lower(),
        "is_baseline": bool(data.get("is_baseline", False)),
        "failure_kind": failure.get("kind"),
        "failure_reason": failure.get("reason"),
        "gpus": _num(data.get("gpus")),
        "gpu_ids": ",".join(map(str, gpu_ids)) if isinstance(gpu_ids, list) else None,
        "node": data.get("node") or None,  # the Ray node, on a cluster
        "started_at": data.get("started_at"),
        "ready_s": _num(data.get("ready_s")),
        "wall_s": _num(data.get("wall_s")),
        "duplicate_of": data.get("duplicate_of") if isinstance(data.get("duplicate_of"), int) else None,
        "trial_dir": str(d),
    }
    _flat_into(row, PARAM, data.get("params") or {})

    scenarios = data.get("scenarios") or {}
    for name, sc in scenarios.items() if isinstance(scenarios, dict) else ():
        if not isinstance(sc, dict):
            continue
        for key in ("valid", "sla_met"):
            row[f"{name}.{key}"] = sc.get(key) if isinstance(sc.get(key), bool) else None
        for key in ("invalid_reasons", "notes"):
            v = sc.get(key) or []
            row[f"{name}.{key}"] = "; ".join(map(str, v)) if isinstance(v, list) else str(v)
        row[f"{name}.duration_s"] = _num(sc.get("duration_s"))
        # the engine-side audit (loadgen.audit): the reported level failed it twice, or some levels did
        row[f"{name}.contaminated"] = bool(sc.get("contaminated"))
        dirty = sc.get("contaminated_levels")
        row[f"{name}.contaminated_levels"] = ", ".join(f"{v:g}" for v in dirty if isinstance(v, (int, float))) \
            if isinstance(dirty, list) and dirty else None
        summary = sc.get("summary") or {}
        for metric, value in summary.items() if isinstance(summary, dict) else ():
            row[f"{name}.{metric}"] = _num(value)

    objectives = data.get("objectives") or {}
    for key, value in objectives.items() if isinstance(objectives, dict) else ():
        row.setdefault(str(key), _num(value))
    delta = data.get("metrics_delta") or {}
    for key, value in delta.items() if isinstance(delta, dict) else ():
        row[f"{DELTA}{key}"] = _num(value)
    q = data.get("quality")
    if isinstance(q, dict) and q.get("kind"):
        row[f"{QUALITY}kind"] = str(q["kind"])
        row[f"{QUALITY}passed"] = q.get("passed") if isinstance(q.get("passed"), bool) else None
        for key in QUALITY_FIGURES:
            row[f"{QUALITY}{key}"] = _num(q.get(key))
        acc = q.get("accuracy")
        row[f"{QUALITY}accuracy"] = _num(acc.get("rate")) if isinstance(acc, dict) else float("nan")
        row[f"{QUALITY}reference"] = q.get("reference") if isinstance(q.get("reference"), int) else None
        row[f"{QUALITY}is_reference"] = bool(q.get("is_reference"))
        row[f"{QUALITY}changes"] = ", ".join(map(str, q.get("changes_numerics") or []))
        reasons = list_at(q, "reasons")
        row[f"{QUALITY}reason"] = "; ".join(map(str, reasons)) or (str(q["unchecked"]) if q.get("unchecked") else None)
        row[f"{QUALITY}status"] = ("reference" if q.get("is_reference") else "not checked" if q.get("unchecked")
                                   else _VERDICT.get(q.get("passed"), "no limits"))
    return row


def _judge_sla(row: dict[str, Any], scenarios: list[Scenario]) -> None:
    """Fill ``<scenario>.sla_met`` / ``.sla_reason`` for each measured scenario of a complete trial."""
    if row.get("state") != "complete":
        return
    for sc in scenarios:
        measured = any(k.startswith(f"{sc.name}.") for k in row)
        if not measured:
            continue
        missed = []
        for metric, label, limit in (("ttft_p99_ms", "p99 TTFT", sc.ttft_limit_ms),
                                     ("tpot_p99_ms", "p99 TPOT", sc.tpot_limit_ms)):
            if limit is None:
                continue
            v = row.get(f"{sc.name}.{metric}")
            if not (isinstance(v, (int, float)) and v <= limit):  # NaN or absent cannot show it was met
                shown = f"{v:,.0f} ms" if isinstance(v, (int, float)) and v == v else "not measured"
                missed.append(f"{label} {shown} > {limit:,.0f} ms limit")
        if row.get(f"{sc.name}.contaminated") is True:
            row[f"{sc.name}.sla_met"] = None  # the audit failed twice: no verdict on the configuration
            row[f"{sc.name}.sla_reason"] = "contaminated: " + (row.get(f"{sc.name}.invalid_reasons") or "")
            continue
        if row.get(f"{sc.name}.sla_met") is None:
            row[f"{sc.name}.sla_met"] = not missed
        if row[f"{sc.name}.sla_met"] is False:
            reason = "; ".join(missed) or "the optimizer judged the SLA missed"
            floor = row.get(f"{sc.name}.max_qps_floor")
            if isinstance(floor, (int, float)) and floor == floor and not row.get(f"{sc.name}.max_valid_qps"):
                reason = f"no valid rate down to the floor {floor:g} req/s (at it: {reason})"
            row[f"{sc.name}.sla_reason"] = reason


def _flat_into(row: dict[str, Any], prefix: str, params: Any) -> None:
    if not isinstance(params, dict):
        return
    for k, v in params.items():
        if isinstance(v, dict):
            _flat_into(row, f"{prefix}{k}.", v)
        elif isinstance(v, list):
            row[f"{prefix}{k}"] = json.dumps(v)  # hashable, so the column can be grouped and compared
        else:
            row[f"{prefix}{k}"] = v


def _num(v: Any) -> Any:
    """Numbers as floats (NaN when absent) so columns stay numeric; anything else kept as written."""
    if v is None:
        return float("nan")
    if isinstance(v, bool):
        return v
    if isinstance(v, (int, float)):
        return float(v)
    return v


def _preset_limits(preset: Any, kind: str, ttft: Any, tpot: Any) -> tuple[float | None, float | None]:
    return resolve_limits(preset if preset in SLA_PRESETS else None, kind, ttft or None, tpot or None)


def _scenarios(spec: dict[str, Any], raw: list[dict[str, Any]]) -> list[Scenario]:
    """Scenarios in the study file's order, SLA limits as the trials applied them (else as the file says)."""
    applied: dict[str, dict[str, Any]] = {}
    kinds: dict[str, str] = {}
    for data in raw:
        scs = data.get("scenarios")
        for name, sc in scs.items() if isinstance(scs, dict) else ():
            if not isinstance(sc, dict):
                continue
            kinds.setdefault(name, str(sc.get("scenario") or name))
            settings = sc.get("settings")
            if isinstance(settings, dict):
                for key in ("ttft_limit_ms", "tpot_limit_ms", "qps"):
                    if isinstance(settings.get(key), (int, float)) and not isinstance(settings.get(key), bool):
                        applied.setdefault(name, {}).setdefault(key, float(settings[key]))

    out: dict[str, Scenario] = {}
    workload = dict_at(spec, "workload")
    for sc in workload.get("scenarios") or []:
        if not isinstance(sc, dict) or not sc.get("kind"):
            continue
        name = str(sc.get("name") or sc["kind"])
        sla = dict_at(sc, "sla")
        ttft, tpot = _preset_limits(sla.get("preset"), str(sc["kind"]), sla.get("ttft_p99_ms"), sla.get("tpot_p99_ms"))
        got = applied.get(name, {})
        out[name] = Scenario(name=name, kind=str(sc["kind"]), qps=got.get("qps", sc.get("qps")),
                             ttft_limit_ms=got.get("ttft_limit_ms", ttft),
                             tpot_limit_ms=got.get("tpot_limit_ms", tpot))
    for name, kind in kinds.items():
        if name not in out:
            got = applied.get(name, {})
            out[name] = Scenario(name=name, kind=kind, qps=got.get("qps"),
                                 ttft_limit_ms=got.get("ttft_limit_ms"), tpot_limit_ms=got.get("tpot_limit_ms"))
    return list(out.values())


def _objectives(spec: dict[str, Any], scenarios: list[Scenario]) -> list[Objective]:
    first = scenarios[0].name if scenarios else "default"
    out = []
    for o in spec.get("objectives") or []:
        if isinstance(o, dict) and o.get("metric"):
            direction = str(o.get("direction") or "maximize").lower()
            out.append(Objective(metric=str(o["metric"]), scenario=str(o.get("scenario") or first),
                                 direction="minimize" if direction.startswith("min") else "maximize"))
    return out
