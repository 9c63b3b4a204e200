"""The study's Optuna sampler, from the study's ``sampler:`` section."""
from __future__ import annotations

import importlib.util
import warnings
from typing import Any

import optuna

from servetune.optimizer.space import SearchSpace
from servetune.optimizer.spec import StudySpec


def make_sampler(spec: StudySpec, space: SearchSpace, n_objectives: int,
                 seed_offset: int = 0) -> optuna.samplers.BaseSampler:
    """The study's sampler. Constraints reach it through ``Trial.set_constraint`` (stored with each trial),
    which TPE, NSGA-II and GP read on their own: no ``constraints_func`` (deprecated in Optuna 5)."""
    s = spec.sampler
    seed = s.seed if s.seed is not None else spec.seed
    seed = None if seed is None else seed + seed_offset
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        if s.kind == "tpe":
            # group=True: conditional parameters (speculative_tokens under speculative_method) are modelled
            # jointly with the trials that have them instead of falling back to independent sampling
            if s.startup_trials is not None:
                return optuna.samplers.TPESampler(seed=seed, multivariate=True, group=True,
                                                  n_startup_trials=s.startup_trials)
            return optuna.samplers.TPESampler(seed=seed, multivariate=True, group=True)
        if s.kind == "nsga2":
            return optuna.samplers.NSGAIISampler(seed=seed)
        if s.kind == "gp":
            if importlib.util.find_spec("torch") is None:
                raise ValueError("sampler kind gp needs PyTorch (Optuna's GPSampler is built on it): "
                                 "pip install torch, or use sampler kind tpe")
            return optuna.samplers.GPSampler(seed=seed, warn_independent_sampling=False)
        if s.kind == "grid":
            grid: dict[str, list[Any]] = {n: list(d.grid()) for n, d in space.dimensions.items()}
            if len(space.engines) > 1:
                grid["engine"] = list(space.engines)
            if space.gpu_types:
                grid["gpu"] = list(space.gpu_types)
            return AskTellGrid(grid, seed=seed)
        return optuna.samplers.RandomSampler(seed=seed)


class AskTellGrid(optuna.samplers.GridSampler):
    """Optuna's GridSampler calls ``study.stop()`` once its grid is visited, which raises outside
    ``optimize()``; the driver asks :func:`grid_done` itself and stops launching."""

    def after_trial(self, study: optuna.Study, trial: optuna.trial.FrozenTrial, state: optuna.trial.TrialState,
                    values: Any) -> None:
        return None


def grid_done(study: optuna.Study, grid: optuna.samplers.BaseSampler) -> bool:
    if not isinstance(grid, optuna.samplers.GridSampler):
        return False
    if study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.WAITING,)):
        return False  # queued trials (baseline, re-queued) still run
    return grid.is_exhausted(study)
