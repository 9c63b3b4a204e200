"""What a study came to: its outcome in memory, and ``summary.json`` in the run directory."""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import optuna

from servetune.optimizer import run_dir
from servetune.optimizer.fidelity import Calibration
from servetune.optimizer.quality import SUMMARY_KEYS, QualityGate
from servetune.optimizer.records import TrialResult, gpu_use
from servetune.optimizer.spec import StudySpec
from servetune.optimizer.study_store import PESSIMISTIC, STATE
from servetune.optimizer.vs_baseline import compare


@dataclass
class StudyOutcome:
    run_dir: Path
    results: list[TrialResult] = field(default_factory=list)
    pareto: list[int] = field(default_factory=list)
    stopped_because: str = ""
    gpu_use: dict[str, float] = field(default_factory=dict)


def pareto_numbers(study: optuna.Study) -> list[int]:
    """Measured, SLA-feasible Pareto trials (failures told as pessimistic results are infeasible anyway)."""
    try:
        best = study.best_trials
    except Exception:
        return []
    return sorted(t.number for t in best if not t.user_attrs.get(PESSIMISTIC)
                  and t.user_attrs.get(STATE, "complete") == "complete")


def write_summary(spec: StudySpec, study: optuna.Study, outcome: StudyOutcome, *,
                  objectives: list[tuple[str, str]], quality: QualityGate | None,
                  fidelity: dict[str, Any] | None = None, repeats: dict[str, Any] | None = None) -> None:
    """``fidelity``: the pre-screen's estimator_off and calibration pairs, when the study pre-screens."""
    outcome.pareto = pareto_numbers(study)
    summary: dict[str, Any] = {
        "study": spec.name, "stopped_because": outcome.stopped_because, "pareto": outcome.pareto,
        "objectives": [f"{s}.{m}" for s, m in objectives],
    }
    if fidelity is not None:
        summary["fidelity"] = {"prescreen": spec.fidelity.prescreen, "estimator_off": fidelity["estimator_off"],
                               "calibration": Calibration.report(fidelity["pairs"])}
    if repeats is not None:
        summary["noise"] = repeats
    records = run_dir.trial_records(outcome.run_dir)
    outcome.gpu_use = summary["gpu_use"] = gpu_use(records.values(), spec.hardware.gpus,
                                                   run_dir.read_sessions(outcome.run_dir))
    summary["vs_baseline"] = compare(list(records.values()), [(s, m, str(o.direction)) for (s, m), o
                                                            in zip(objectives, spec.objectives)])
    if quality is not None:
        summary["quality"] = {
            "kind": quality.kind, "limits": quality.limits(),
            "trials": {str(n): {k: r["quality"][k] for k in SUMMARY_KEYS if k in r["quality"]}
                       for n, r in records.items() if r.get("state") == "complete" and r.get("quality")}}
    run_dir.write_summary(outcome.run_dir, summary)
