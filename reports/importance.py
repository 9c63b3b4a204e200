"""Which parameters moved each objective, from the Optuna storage beside the trials."""
from __future__ import annotations

import logging
import warnings
from dataclasses import dataclass, field
from typing import Callable

import optuna
from optuna.importance import PedAnovaImportanceEvaluator, get_param_importances
from optuna.study import StudyDirection
from optuna.trial import FrozenTrial

from servetune.reports.model import Run
from servetune.reports.units import metric_label

log = logging.getLogger(__name__)

MIN_COMPLETE = 4
MIN_VARIED_PARAMS = 2


@dataclass
class Importances:
    # {objective label: {param: importance}}, normalised to sum to 1, most important first
    by_objective: dict[str, dict[str, float]] = field(default_factory=dict)
    note: str = ""  # why there are none, or what they rest on


def param_importances(run: Run) -> Importances:
    complete = run.trials[run.complete]
    varied = [c for c in run.param_columns if complete[c].astype(str).nunique() >= 2] if len(complete) else []
    if len(complete) < MIN_COMPLETE or len(varied) < MIN_VARIED_PARAMS:
        return Importances(note=f"not enough trials: importance needs at least {MIN_COMPLETE} complete trials "
                                f"and {MIN_VARIED_PARAMS} parameters that took different values "
                                f"(have {len(complete)} and {len(varied)})")
    if run.study_db is None:
        return Importances(note="no study.db beside the trials (remote or missing storage): importance not computed")

    verbosity = optuna.logging.get_verbosity()  # the report may be drawn inside a running optimizer
    storage = None
    try:
        optuna.logging.set_verbosity(optuna.logging.WARNING)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # optuna's "PED-ANOVA assumes lower is better" notes add nothing
            storage = optuna.storages.RDBStorage(f"sqlite:///{run.study_db.resolve()}")
            names = optuna.get_all_study_names(storage)
            # A run directory without its study.yaml is named after the folder; one study in the db is it.
            name = run.name if run.name in names or len(names) != 1 else names[0]
            stored = optuna.load_study(study_name=name, storage=storage)
            # Failed configs are told to the sampler as infeasible with pessimistic values (so it avoids
            # their region); they were never measured, so they must not move the importances.
            measured = [t for t in stored.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,))
                        if not t.user_attrs.get("servetune.pessimistic")]
            study = optuna.create_study(directions=stored.directions)
            study.add_trials(measured)
            n_done = len(measured)
            # PED-ANOVA compares the best quantile with the rest; its default 10% is a single trial in a
            # small study, so keep at least ~3 trials in the top set.
            quantile = max(0.1, min(0.5, 3 / max(n_done, 1)))
            out: dict[str, dict[str, float]] = {}
            for i, (label, d) in enumerate(zip(_labels(run, len(study.directions)), study.directions, strict=True)):
                sign = -1.0 if d == StudyDirection.MAXIMIZE else 1.0  # PED-ANOVA treats low targets as good
                imp = get_param_importances(study, evaluator=PedAnovaImportanceEvaluator(target_quantile=quantile),
                                            target=_signed(i, sign))
                out[label] = {k: float(v) for k, v in imp.items()}
    except Exception as e:  # a storage of another version, a study still empty, a search space that changed
        log.warning("parameter importance failed: %s", e)
        return Importances(note=f"importance could not be computed: {e.__class__.__name__}: {e}")
    finally:
        optuna.logging.set_verbosity(verbosity)
        if storage is not None:
            storage.engine.dispose()  # a long-lived report server must not pile up open SQLite handles
    return Importances(by_objective=out, note=f"PED-ANOVA over {n_done} complete trials in study.db "
                                              f"(top {quantile:.0%} of each objective against all)")


def _signed(i: int, sign: float) -> Callable[[FrozenTrial], float]:
    """Objective ``i`` of a trial, times ``sign``."""
    return lambda t: sign * t.values[i]


def _labels(run: Run, n_obj: int) -> list[str]:
    if len(run.objectives) == n_obj:
        return [f"{o.scenario} · {metric_label(o.metric)}" for o in run.objectives]
    return [f"objective {i}" for i in range(n_obj)]
