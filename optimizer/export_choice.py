"""Which trial of a run directory ``servetune export`` deploys, and what a deployer must hear about it.

"best" is explicit (:func:`choose_trial`): an objective (default: the study's first), a scenario (default: that
objective's scenario), and an SLA filter (trials whose ``sla_met`` is true in every scenario that has an SLA; a
scenario without an SLA must be ``valid``). The choice is printed with the runner-up, and with
:func:`quality_warnings` when the trial's outputs were not checked, or failed their check.
"""
from __future__ import annotations

import difflib
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from servetune.optimizer import run_dir as rd
from servetune.optimizer import study_yaml
from servetune.optimizer.catalog import load_catalog
from servetune.optimizer.quality import describe, numerics_changes
from servetune.optimizer.quality import failed as failed_quality
from servetune.optimizer.spec import METRICS

# Headline metrics shown in the choice line, with how to print them.
_SHOWN = [("output_tokens_per_s_per_gpu", "tok/s/GPU"), ("ttft_p99_ms", "p99 TTFT"), ("tpot_p99_ms", "p99 TPOT")]



class ExportError(Exception):
    """A user-facing reason the export cannot be made (exit status 2, no traceback)."""


# ---------------------------------------------------------------------------------------------------------
# run directory
# ---------------------------------------------------------------------------------------------------------
def load_trials(run_dir: Path) -> list[dict[str, Any]]:
    trials = []
    for f in rd.record_paths(run_dir):
        try:
            trials.append(json.loads(f.read_text(encoding="utf-8")))
        except (OSError, json.JSONDecodeError) as e:
            raise ExportError(f"{f}: unreadable trial record ({e})") from None
    if not trials:
        raise ExportError(f"{run_dir}: no trials/NNNN/trial.json (is this a servetune run directory?)")
    return sorted(trials, key=lambda t: t.get("number", 0))


def read_study(run_dir: Path) -> dict[str, Any]:
    """The run's study.yaml as plain data. Read leniently (not through load_study): the model path it names
    lives on the GPU host the study ran on, not necessarily where the export is made."""
    p = rd.study_file(run_dir)
    if not p.is_file():
        raise ExportError(f"{run_dir}: no study.yaml (is this a servetune run directory?)")
    try:  # within the study file's bounds: a run directory may come from anyone
        data = study_yaml.load(study_yaml.read_text(p)) or {}
    except yaml.YAMLError as e:
        raise ExportError(f"{p}: {e}") from None
    if not isinstance(data, dict):
        raise ExportError(f"{p}: not a study file")
    return data


def _scenario_labels(study: dict[str, Any]) -> list[str]:
    out = []
    for s in (study.get("workload") or {}).get("scenarios") or []:
        out.append(s.get("name") or s.get("kind"))
    return out


def engine_spec(study: dict[str, Any], engine: str) -> dict[str, Any]:
    for e in study.get("engines") or []:
        if isinstance(e, str):
            e = {"name": e}
        if e.get("name") == engine:
            return e
    return {"name": engine}


def _natural_direction(metric: str) -> str:
    if metric in METRICS:
        return METRICS[metric]
    return "minimize" if metric.endswith("_ms") or "error" in metric else "maximize"


# ---------------------------------------------------------------------------------------------------------
# choosing the trial
# ---------------------------------------------------------------------------------------------------------
@dataclass
class Choice:
    trial: dict[str, Any]
    scenario: str
    metric: str
    direction: str
    value: float | None
    runner_up: dict[str, Any] | None = None
    eligible: int = 0
    explicit: bool = False
    warnings: list[str] = field(default_factory=list)

    def summary(self, t: dict[str, Any] | None = None) -> dict[str, Any]:
        t = t or self.trial
        return ((t.get("scenarios") or {}).get(self.scenario) or {}).get("summary") or {}

    def describe(self) -> str:
        """"trial 2 (vllm): 6,547 tok/s/GPU, p99 TPOT 30 ms; runner-up trial 3: −7% tok/s/GPU, +39% p99 TPOT"."""
        s = self.summary()
        head = f"trial {self.trial['number']} ({self.trial.get('engine')}"
        head += ", baseline)" if self.trial.get("is_baseline") else ")"
        parts = []
        keys = [(self.metric, _label(self.metric))] + [(k, lbl) for k, lbl in _SHOWN if k != self.metric]
        for k, lbl in keys:
            if isinstance(s.get(k), (int, float)):
                parts.append(f"{_num(s[k])}{' ms' if k.endswith('_ms') else ''} {lbl}" if not k.endswith("_ms")
                             else f"{lbl} {_num(s[k])} ms")
        passing = "SLA- and quality-passing" if (self.trial.get("quality") or {}).get("limits") else "SLA-passing"
        rule = (f"{'max' if self.direction == 'maximize' else 'min'} {self.metric} in scenario {self.scenario!r}"
                f" among {self.eligible} {passing} trial(s)") if not self.explicit else "chosen by number"
        line = f"{head}: {', '.join(parts)} [{rule}]"
        if self.runner_up is not None:
            r = self.summary(self.runner_up)
            deltas = []
            for k, lbl in keys:
                a, b = s.get(k), r.get(k)
                if isinstance(a, (int, float)) and isinstance(b, (int, float)) and a:
                    pct = (b - a) / abs(a) * 100
                    mag = f"{abs(pct):.0f}" if abs(pct) >= 1 else f"{abs(pct):.1f}"
                    deltas.append(f"{'+' if pct >= 0 else '−'}{mag}% {lbl}")
            line += f"; runner-up trial {self.runner_up['number']}: {', '.join(deltas) or 'no comparable metrics'}"
        elif not self.explicit:
            line += "; no runner-up (only one trial passed the SLA)"
        return line


def _label(metric: str) -> str:
    for k, lbl in _SHOWN:
        if k == metric:
            return lbl
    return metric


def _num(x: float) -> str:
    return f"{x:,.0f}" if abs(x) >= 100 else f"{x:,.1f}" if abs(x) >= 10 else f"{x:.3g}"


def _passes_sla(t: dict[str, Any], scenario: str) -> bool:
    scen = t.get("scenarios") or {}
    if scenario not in scen:
        return False
    for label, r in scen.items():
        met = r.get("sla_met")
        if r.get("contaminated"):  # the engine-side audit failed twice: nothing known about this config
            return False
        if met is None:  # no SLA on this scenario: the run itself must be valid where it is the chosen one
            if label == scenario and r.get("valid") is False:
                return False
        elif not met:
            return False
    return True


def choose_trial(run_dir: Path, trial: str | int = "best", scenario: str | None = None,
                 objective: str | None = None) -> Choice:
    study = read_study(run_dir)
    trials = load_trials(run_dir)
    labels = _scenario_labels(study)
    objectives = study.get("objectives") or []
    first = objectives[0] if objectives else {}
    metric = objective or first.get("metric") or "output_tokens_per_s_per_gpu"
    direction = None
    first_label = labels[0] if labels else None  # an objective without a scenario names the first
    for o in objectives:
        if o.get("metric") == metric and (scenario is None or (o.get("scenario") or first_label) == scenario):
            direction = o.get("direction")
            if scenario is None:
                scenario = o.get("scenario")
            break
    direction = direction or _natural_direction(metric)
    scenario = scenario or first.get("scenario") or (labels[0] if labels else "server")
    if labels and scenario not in labels:
        raise ExportError(f"no scenario {scenario!r} in this study (have: {', '.join(labels)})")

    if str(trial) != "best":
        try:
            n = int(trial)
        except ValueError:
            raise ExportError(f"--trial must be 'best' or a trial number, got {trial!r}") from None
        found = [t for t in trials if t.get("number") == n]
        if not found:
            raise ExportError(f"no trial {n} in {run_dir} (have {', '.join(str(t.get('number')) for t in trials)})")
        t = found[0]
        if t.get("state") != "complete":
            why = (t.get("failure") or {}).get("reason") if isinstance(t.get("failure"), dict) else t.get("failure")
            raise ExportError(f"trial {n} is {t.get('state')}" + (f" ({why})" if why else "")
                              + ": only a completed, measured trial can be exported")
        c = Choice(trial=t, scenario=scenario, metric=metric, direction=direction, explicit=True,
                   value=((t.get("scenarios") or {}).get(scenario) or {}).get("summary", {}).get(metric))
        if not _passes_sla(t, scenario):
            c.warnings.append(f"trial {n} did not meet the SLA (or has no {scenario!r} result); exported as asked")
        c.warnings += quality_warnings(t, study)
        return c

    def value(t: dict[str, Any]) -> float | None:
        v = (((t.get("scenarios") or {}).get(scenario) or {}).get("summary") or {}).get(metric)
        return float(v) if isinstance(v, (int, float)) and math.isfinite(v) else None

    known = {k for t in trials for k in (((t.get("scenarios") or {}).get(scenario) or {}).get("summary") or {})}
    if known and metric not in known:
        close = difflib.get_close_matches(metric, sorted(known), n=1)
        raise ExportError(f"no metric {metric!r} in scenario {scenario!r} results"
                          + (f"; did you mean {close[0]!r}?" if close else ""))
    ok = [t for t in trials if t.get("state") == "complete" and _passes_sla(t, scenario) and value(t) is not None
          and not failed_quality(t.get("quality"))]
    if not ok:
        raise ExportError(f"no completed trial met the SLA (and the quality limits) with a {metric} result in "
                          f"scenario {scenario!r} ({len(trials)} trial(s) in {run_dir}); pick one with --trial N")
    sign = -1.0 if direction == "maximize" else 1.0

    def rank(t: dict[str, Any]) -> tuple[float, int]:
        v = value(t)
        assert v is not None  # ok holds only trials with a value
        return sign * v, t.get("number", 0)

    ok.sort(key=rank)
    return Choice(trial=ok[0], scenario=scenario, metric=metric, direction=direction, value=value(ok[0]),
                  runner_up=ok[1] if len(ok) > 1 else None, eligible=len(ok),
                  warnings=quality_warnings(ok[0], study))


QUALITY_WARNING = "QUALITY: "  # the prefix of the warnings `servetune export` prints in a banner


def quality_warnings(t: dict[str, Any], study: dict[str, Any]) -> list[str]:
    """What a deployer must hear about the chosen trial's outputs: a failed or missing quality check, or a
    check that measured drift on random weights (docs/quality.md)."""
    n, q = t.get("number"), t.get("quality") or {}
    if q.get("kind"):
        if q.get("passed") is False:
            why = "; ".join(q.get("reasons") or []) or q.get("unchecked") or "no reason recorded"
            return [f"{QUALITY_WARNING}trial {n} FAILED its {q['kind']} check against the baseline: {why}"]
        if q.get("unchecked"):
            return [f"{QUALITY_WARNING}trial {n}'s outputs were NOT checked: {q['unchecked']}"]
        if q["kind"] == "drift" and not q.get("is_reference"):
            return [f"{QUALITY_WARNING}trial {n} ran on random weights, so its check measured numerical drift "
                    f"({describe(q)}), not answer quality; check the configuration on the real checkpoint "
                    "before deploying it"]
        if q.get("passed") is None and q.get("changes_numerics") and not q.get("is_reference"):
            return [f"{QUALITY_WARNING}trial {n} changes numerics ({', '.join(q['changes_numerics'])}) and the study "
                    f"set no quality limits: {describe(q)}; judge these figures before deploying it"]
        return []
    engine = t.get("engine") or ""
    try:
        defaults = load_catalog(engine, engine_spec(study, engine).get("version")).defaults()
    except Exception:  # an engine without a catalog here: judge against the recorded parameters alone
        defaults = {}
    changes = numerics_changes({**defaults, **(t.get("params") or {})}, defaults)
    if changes:
        return [f"{QUALITY_WARNING}trial {n} changes numerics ({', '.join(changes)}) and its outputs were NEVER "
                "checked against the baseline's: run the study with a quality: section (docs/quality.md) "
                "before deploying it"]
    return [f"{QUALITY_WARNING}trial {n} had no quality check (the study has no quality: section); it keeps the "
            "engine's default numerics, so its outputs should match the checkpoint's"]


