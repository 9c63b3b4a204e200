"""The study loop: ask Optuna, reject or plan, run on Ray, tell Optuna. Resumable at any point.

Data flows one way: StudySpec → SearchSpace → (ask) → TrialPlan → Ray task → TrialResult → (tell) → storage
and ``trials/NNNN/trial.json``. Optuna's storage is the source of truth for what has run; rerunning the same
command continues the study, re-queues trials a dead driver left RUNNING and reaps their engine processes.
"""
from __future__ import annotations

import fcntl
import json
import math
import os
import shutil
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import optuna

from servetune.loadgen.sla import limit_excess
from servetune.optimizer import rules
from servetune.optimizer.engines import get_engine, simulated
from servetune.optimizer.engines.base import ModelRef
from servetune.optimizer.records import (ScenarioPlan, TrialPlan, TrialResult, close_session, gpu_use, open_session,
                                         read_sessions, trial_records, write_json_atomic)
from servetune.optimizer.space import SearchSpace
from servetune.optimizer.spec import StudySpec
from servetune.optimizer.vs_baseline import compare

BASELINE = "servetune.baseline"
PARAMS = "servetune.params"
ENGINE = "servetune.engine"
STATE = "servetune.state"
# Rejected configurations cost no GPU time and do not count against budget.trials; a search space the rules
# mostly reject still ends after this many rejections per trial of the budget.
REJECTIONS_PER_TRIAL = 10
FAILURE = "servetune.failure"
KEY = "servetune.key"
STALE = "servetune.stale"
CONSTRAINTS = "servetune.constraints"
PESSIMISTIC = "servetune.pessimistic"  # a failure told as an infeasible result (values are not measurements)
ESTIMATE = "servetune.estimate"


class StudyLocked(RuntimeError):
    pass


@dataclass
class StudyOutcome:
    run_dir: Path
    results: list[TrialResult] = field(default_factory=list)
    pareto: list[int] = field(default_factory=list)
    stopped_because: str = ""
    gpu_use: dict[str, float] = field(default_factory=dict)


# -- building blocks ----------------------------------------------------------------------------------------

def resolve_model(spec: StudySpec) -> ModelRef:
    from servetune.optimizer.perfmodel.model_shapes import load_shape

    m = spec.model
    path = spec.resolve_path(m.path) if m.path else None
    shape = load_shape(m.preset, path)
    name = m.name or m.preset or Path(path or "model").name
    return ModelRef(name=name, path=path or m.preset, shape=shape, load_format=m.load_format)


def gpu_memory_gib(spec: StudySpec) -> float:
    if spec.hardware.gpu_memory_gib:
        return spec.hardware.gpu_memory_gib
    from servetune.optimizer.perfmodel.hardware import get_gpu

    return get_gpu(spec.hardware.gpu).memory_gib


def objective_keys(spec: StudySpec) -> list[tuple[str, str]]:
    return spec.objective_keys()


def _judges_steady_state(sc: ScenarioPlan) -> bool:
    """Whether the scenario's verdict applies the keep-up rule, and the SLA has limits it could be part of."""
    from servetune.loadgen.validity import OPEN_LOOP

    s = sc.settings
    return s["kind"] in OPEN_LOOP and s.get("min_keep_up") is not None and bool(
        s.get("ttft_limit_ms") or s.get("tpot_limit_ms"))


def scenario_plans(spec: StudySpec) -> list[ScenarioPlan]:
    out = []
    for s in spec.workload.scenarios:
        ttft, tpot = s.sla.limits(s.kind) if s.sla else (None, None)
        search = s.max_qps.model_dump() if s.max_qps else None
        settings = dict(kind=s.kind, qps=s.max_qps.lo if s.max_qps else s.qps, concurrency=s.concurrency, duration_s=s.duration_s, num_requests=s.num_requests,
                        max_connections=s.max_connections, warmup_requests=s.warmup_requests,
                        timeout_s=s.timeout_s, ttft_limit_ms=ttft, tpot_limit_ms=tpot, seed=spec.seed,
                        min_keep_up=s.min_keep_up, replay=spec.workload.dataset.replay,
                        shared_prefix_tokens=spec.workload.dataset.shared_prefix_tokens,
                        # a search trial is exploratory: a short run notes the early-stopping shortfall
                        # instead of failing; `servetune bench` keeps the MLPerf-strict default
                        require_early_stopping=False)
        out.append(ScenarioPlan(label=s.label, settings=settings, max_qps=search,
                                dataset=_dataset_args(spec, s.dataset) if s.dataset else None))
    return out


def dataset_args(spec: StudySpec) -> dict[str, Any]:
    return _dataset_args(spec, spec.workload.dataset)


def _dataset_args(spec: StudySpec, d) -> dict[str, Any]:
    extra = {"temperature": d.temperature} if d.temperature is not None else {}
    if d.kind == "random":
        from servetune.loadgen.tokenizer import find_tokenizer

        source = spec.resolve_path(d.tokenizer) if d.tokenizer else (
            spec.resolve_path(spec.model.path) if spec.model.path else None)
        tokenizer = find_tokenizer(source)
        fmt = d.prompt_format if d.prompt_format != "auto" else ("text" if tokenizer else "token_ids")
        return dict(kind="random", n=d.num_requests, input_tokens=d.input_tokens, output_tokens=d.output_tokens,
                    input_range=d.input_range, output_range=d.output_range, seed=d.seed, ignore_eos=d.ignore_eos,
                    prompt_format=fmt, tokenizer=str(tokenizer) if tokenizer else None,
                    shared_prefix_tokens=d.shared_prefix_tokens, **extra)
    if d.kind == "text_tasks":
        from servetune.loadgen.datasets import COPY_TASKS

        return dict(kind="text_tasks", n=d.num_requests, tasks=list(d.tasks or COPY_TASKS),
                    output_tokens=d.output_tokens, seed=d.seed, ignore_eos=d.ignore_eos, **extra)
    return dict(kind=d.kind, path=spec.resolve_path(d.path or ""), n=d.num_requests, seed=d.seed, **extra)


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
            kw = {"n_startup_trials": s.startup_trials} if s.startup_trials is not None else {}
            # group=True: conditional parameters (speculative_tokens under speculative_method) are modelled
            # jointly with the trials that have them instead of falling back to independent sampling
            return optuna.samplers.TPESampler(seed=seed, multivariate=True, group=True, **kw)
        if s.kind == "nsga2":
            return optuna.samplers.NSGAIISampler(seed=seed)
        if s.kind == "gp":
            import importlib.util

            if importlib.util.find_spec("torch") is None:
                raise ValueError("sampler kind gp needs PyTorch (Optuna's GPSampler is built on it): "
                                 "pip install torch, or use sampler kind tpe")
            return optuna.samplers.GPSampler(seed=seed, warn_independent_sampling=False)
        if s.kind == "grid":
            grid = {n: list(d.grid()) for n, d in space.dimensions.items()}
            if len(space.engines) > 1:
                grid["engine"] = list(space.engines)
            if space.gpu_types:
                grid["gpu"] = list(space.gpu_types)
            return _AskTellGrid(grid, seed=seed)
        return optuna.samplers.RandomSampler(seed=seed)


class _AskTellGrid(optuna.samplers.GridSampler):
    """Optuna's GridSampler calls ``study.stop()`` once its grid is visited, which raises outside
    ``optimize()``; the driver asks ``is_exhausted`` itself and stops launching."""

    def after_trial(self, study, trial, state, values) -> None:
        return None


def config_key(engine: str, params: dict[str, Any]) -> str:
    return json.dumps([engine, sorted(params.items())], default=str)


def _lock(run_dir: Path):
    f = open(run_dir / ".lock", "a+")  # not "w": a second driver must not erase the holder's pid
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


# -- the driver -------------------------------------------------------------------------------------------------

class StudyDriver:
    def __init__(self, spec: StudySpec, on_event: Callable[[str, dict[str, Any]], None] | None = None,
                 ray_address: str | None = None):
        self.spec = spec
        self.run_dir = spec.run_dir
        self.on_event = on_event or (lambda kind, data: None)
        self.ray_address = ray_address
        self.space = SearchSpace([e.name for e in spec.engines], spec.search,
                                 {e.name: e.version for e in spec.engines},
                                 gpu_types=[t.gpu for t in spec.cluster.node_types])
        self.engine_specs = {e.name: e for e in spec.engines}
        self.objectives = objective_keys(spec)
        self.model = resolve_model(spec)
        self.gpu_mem = gpu_memory_gib(spec)
        self._estimator_off: str | None = None
        self._raw_estimates: dict[int, dict[str, Any]] = {}
        self.quality = None
        if spec.quality is not None:
            from servetune.optimizer.quality import QualityGate

            base = str(Path(spec.source).resolve().parent) if spec.source else None
            self.quality = QualityGate(spec.quality, drift=spec.model.load_format == "dummy", base_dir=base)
        # measured trials whose quality verdict waits for their engine's baseline evaluation (told after it)
        self._deferred: list[tuple[optuna.Trial, TrialResult, StudyOutcome]] = []
        self._ending = False  # no trial is launched any more: deferred verdicts are given with what there is
        self._stale_dirs: list[str] = []  # trials a dead driver left running (their engines are reaped)
        self._claims = None  # shared storage: configurations claimed in the database (shared_study)

    # storage ---------------------------------------------------------------------------------------------
    def open_study(self) -> optuna.Study:
        optuna.logging.set_verbosity(optuna.logging.WARNING)
        # We record heartbeats ourselves for in-flight trials (ask/tell has no optimize() loop to do it).
        warnings.filterwarnings("ignore", message="Heartbeat of storage is supposed to be used")
        from servetune.optimizer.storage_url import expand

        with warnings.catch_warnings():
            # Optuna marks heartbeat_interval experimental (since 2.9); the heartbeat is how a driver on shared
            # storage finds a dead driver's trials, so the warning would only repeat on every run
            warnings.filterwarnings("ignore", message=r"Argument ``heartbeat_interval`` is an experimental feature",
                                    category=optuna.exceptions.ExperimentalWarning)
            storage = optuna.storages.RDBStorage(expand(self.spec.storage_url), heartbeat_interval=30, grace_period=120)
        self._rdb = storage
        directions = [o.direction for o in self.spec.objectives]
        sampler = make_sampler(self.spec, self.space, len(directions))
        return optuna.create_study(study_name=self.spec.name, storage=storage, sampler=sampler,
                                   directions=directions, load_if_exists=True)

    def recover(self, study: optuna.Study, exclusive: bool) -> int:
        """Trials left RUNNING by a dead driver: reap their engines, mark them failed, queue them again."""
        requeued = 0
        stale_ids = set()
        if not exclusive:  # fail_stale_trials returns None: find the stale trials and fail them ourselves
            storage = study._storage
            for tid in storage._get_stale_trial_ids(study._study_id):
                try:
                    storage.set_trial_user_attr(tid, STALE, True)
                    if storage.set_trial_state_values(tid, optuna.trial.TrialState.FAIL):
                        stale_ids.add(tid)
                except optuna.exceptions.UpdateFinishedTrialError:
                    pass  # another driver got there first
        requeued_keys: set[str] = set()
        seen: dict[str, TrialResult] | None = None
        for ft in study.get_trials(deepcopy=False):
            running = ft.state == optuna.trial.TrialState.RUNNING and exclusive
            if not (running or ft._trial_id in stale_ids):
                continue
            from servetune.optimizer.process import reap_orphan

            reap_orphan(self.trial_dir(ft.number) / "engine.pid")
            self._mask_secrets(self.trial_dir(ft.number))  # the dead driver's trial never masked its files
            self._stale_dirs.append(str(self.trial_dir(ft.number).resolve()))
            finished = self._finished_on_disk(ft.number) if running else None
            if finished is not None:  # measured, but the driver died before telling Optuna: keep it
                self._tell(study, optuna.Trial(study, ft._trial_id), finished, StudyOutcome(self.run_dir))
                continue
            # one requeue per config: a trial parked on the config another was measuring (or a config measured
            # since) would come back as a duplicate and spend a trial of the budget on nothing
            key = ft.user_attrs.get(KEY)
            seen = self._seen_configs(study) if seen is None else seen
            if key and (key in requeued_keys or key in seen):
                why = "driver stopped while this trial waited for the same config's result; not queued again"
                if running:
                    self._drop(study, ft._trial_id, ft.number, why)
                else:
                    self._mark_stale_file(ft.number, why)
                continue
            if key:
                requeued_keys.add(key)
            self._requeue(study, ft._trial_id, ft.number, ft.params, bool(ft.user_attrs.get(BASELINE)),
                          "driver stopped while this trial ran; it was queued again", fail=running,
                          engine=ft.user_attrs.get(ENGINE))
            requeued += 1
        return requeued

    def _requeue(self, study: optuna.Study, trial_id: int, number: int, params: dict[str, Any], baseline: bool,
                 reason: str, fail: bool = True, engine: str | None = None) -> None:
        """A trial that will not be measured here: failed as stale (not counted), its config queued again
        (a baseline with its engine: its params are empty)."""
        if fail:
            self._drop(study, trial_id, number, reason)
        else:
            self._mark_stale_file(number, reason)
        attrs = {BASELINE: True, **({ENGINE: engine} if engine else {})} if baseline else {}
        study.enqueue_trial(params, user_attrs=attrs, skip_if_exists=False)

    def _drop(self, study: optuna.Study, trial_id: int, number: int, reason: str) -> None:
        """Fail a trial as stale: it is not counted against the budget and its record says why."""
        study._storage.set_trial_user_attr(trial_id, STALE, True)
        study._storage.set_trial_state_values(trial_id, optuna.trial.TrialState.FAIL)
        self._mark_stale_file(number, reason)

    def _mask_secrets(self, trial_dir: Path) -> None:
        """Mask referenced secret values in a trial whose worker died before the lifecycle could."""
        from servetune.optimizer import secret_refs
        from servetune.optimizer.lifecycle import redact_files

        texts = [x for e in self.spec.engines for x in (*e.env.values(), *e.extra_args)]
        redact_files(Path(trial_dir), secret_refs.referenced(texts))

    def _finished_on_disk(self, number: int) -> TrialResult | None:
        try:
            r = TrialResult.from_dict(json.loads((self.trial_dir(number) / "trial.json").read_text()))
        except (OSError, ValueError, TypeError):
            return None
        if r.state == "complete" or (r.state == "failed" and (r.failure or {}).get("kind") != "internal"):
            return r
        return None

    def _mark_stale_file(self, number: int, reason: str) -> None:
        path = self.trial_dir(number) / "trial.json"
        try:
            d = json.loads(path.read_text())
        except (OSError, ValueError):
            d = {"number": number, "engine": "", "params": {}}
        d["state"] = "failed"
        d["failure"] = {"kind": "internal", "reason": reason}
        d["stale"] = True
        write_json_atomic(path, d)

    @staticmethod
    def _launched(plan: TrialPlan) -> bool:
        """Whether the trial's Ray task has begun (run_trial writes started_at before it starts an engine)."""
        try:
            return bool(json.loads((Path(plan.trial_dir) / "trial.json").read_text()).get("started_at"))
        except (OSError, ValueError):
            return False

    def _withdraw(self, study: optuna.Study, trial: optuna.Trial, plan: TrialPlan,
                  parked: list[tuple[optuna.Trial, TrialPlan]]) -> None:
        """A trial still waiting for GPUs at the wall time: not run, queued again for a resumed study (trials
        parked on its config are dropped: the requeued one measures it)."""
        why = "the wall time came before GPUs for this trial were free; it was queued again for a resumed study"
        self._requeue(study, trial._trial_id, plan.number, trial.params, plan.is_baseline, why, engine=plan.engine)
        for waiting, waiting_plan in parked:
            self._drop(study, waiting._trial_id, waiting_plan.number, why)
        self.on_event("note", {"text": f"trial {plan.number} had not started by the wall time: withdrawn, "
                                       "queued again for a resumed study"})

    def trial_dir(self, number: int) -> Path:
        return self.run_dir / "trials" / f"{number:04d}"

    # planning ----------------------------------------------------------------------------------------------
    def plan_trial(self, trial: optuna.Trial) -> tuple[TrialPlan | None, list[str]]:
        is_baseline = bool(trial.user_attrs.get(BASELINE))
        if is_baseline:
            engine = str(trial.user_attrs.get(ENGINE) or self.space.engines[0])
            params = self.space.baseline(engine)
            params.pop("engine", None)
        else:
            engine, params = self.space.suggest(trial)
        trial.set_user_attr(PARAMS, params)
        trial.set_user_attr(ENGINE, engine)
        plan = self.build_plan(trial.number, engine, params, is_baseline, self.trial_dir(trial.number))
        return plan, self.check(engine, params)

    def full_params(self, engine: str, params: dict[str, Any]) -> dict[str, Any]:
        """What the server will actually run with: the engine's defaults under the trial's parameters."""
        es = self.engine_specs[engine]
        return {**get_engine(engine, es.command, es.version).defaults(), **params}

    def check(self, engine: str, params: dict[str, Any]) -> list[str]:
        """Why this configuration must not be launched (pre-launch rules), or []."""
        es = self.engine_specs[engine]
        eng = get_engine(engine, es.command, es.version)
        full = {**eng.defaults(), **params}
        gpu, gpu_mem, _, gpus = self.gpu_for(params)
        reasons = [f"{engine} has no flag for {p}" for p in self.space.unsupported(engine) if p in params]
        cat = self.space.catalogs[engine]
        reasons += [f"{engine} {cat.version} does not accept {p}={v} (search_spaces/{engine}.yaml lists its choices)"
                    for p, v in params.items() if p in cat.params and not cat.params[p].accepts(v)]
        reasons += rules.check(eng, full, self.model, gpu=gpu, gpu_memory_gib=gpu_mem, gpus_available=gpus,
                               max_gpus_per_trial=self.spec.hardware.max_gpus_per_trial)
        return list(dict.fromkeys(reasons))

    def gpu_for(self, params: dict[str, Any]) -> tuple[str, float, float | None, int]:
        """The GPU a configuration runs on: kind, memory GiB (table or override), the override, and how many
        one trial can have. On a heterogeneous cluster that is the node type its ``gpu`` parameter names
        (one node's GPUs, unless trials may span nodes)."""
        from servetune.optimizer.placement import type_named

        t = type_named(list(self.spec.cluster.node_types), params.get("gpu"))
        if t is None:
            return self.spec.hardware.gpu, self.gpu_mem, self.spec.hardware.gpu_memory_gib, self.spec.hardware.gpus
        from servetune.optimizer.perfmodel.hardware import get_gpu

        gpus = self.spec.hardware.gpus if self.spec.cluster.span_nodes else min(t.gpus_per_node, self.spec.hardware.gpus)
        return t.gpu, t.gpu_memory_gib or get_gpu(t.gpu).memory_gib, t.gpu_memory_gib, gpus

    def build_plan(self, number: int, engine: str, params: dict[str, Any], is_baseline: bool,
                   trial_dir: Path) -> TrialPlan:
        es = self.engine_specs[engine]
        gpu, _, gpu_mem_override, _ = self.gpu_for(params)
        return TrialPlan(
            number=number, engine=engine, params=params, model=self.model,
            gpus=rules.gpus_needed(self.full_params(engine, params)), trial_dir=str(Path(trial_dir).resolve()),
            dataset=dataset_args(self.spec), scenarios=scenario_plans(self.spec), host=self.spec.host,
            gpu=gpu, gpu_memory_gib=gpu_mem_override,
            engine_command=es.command, engine_version=es.version, extra_args=list(es.extra_args),
            extra_env=dict(es.env), ready_timeout_s=es.ready_timeout_s, is_baseline=is_baseline,
            fake_gpus=simulated(engine), warmup=self.spec.workload.warmup.model_dump(),
            audit=self.spec.workload.audit_settings(),
            quality=self.quality.trial_settings() if self.quality else None,
        )

    # results -> optuna ----------------------------------------------------------------------------------------
    def values_and_constraints(self, result: TrialResult) -> tuple[list[float] | None, list[float], str]:
        values, named, why = self.score(result.scenarios, result.gpus)
        if values is not None:
            for (label, metric), v in zip(self.objectives, values):
                result.objectives[f"{label}.{metric}"] = float(v)
        return values, list(named.values()), why

    def constraint_names(self) -> list[str]:
        """Every trial carries the same constraints, in this order (GP needs as many for each trial)."""
        names = []
        for sc in scenario_plans(self.spec):
            for limit_key, short in (("ttft_limit_ms", "ttft_p99"), ("tpot_limit_ms", "tpot_p99")):
                if sc.settings.get(limit_key):
                    names.append(f"{sc.label}.{short}")
            if _judges_steady_state(sc):
                names.append(f"{sc.label}.steady")
        if self.quality is not None and self.quality.constrains:
            names.append("quality")
        return names + ["failed"]

    def score(self, scenarios: dict[str, dict[str, Any]], gpus: int
              ) -> tuple[list[float] | None, dict[str, float], str]:
        """Objective values and named constraints (<= 0: met) from scenario summaries, measured or estimated.
        Adds the derived metrics and each scenario's ``sla_met`` in place."""
        for label, sr in scenarios.items():
            self._derived_metrics(sr, gpus)
        values = []
        for label, metric in self.objectives:
            v = scenarios.get(label, {}).get("summary", {}).get(metric)
            if v is None or (isinstance(v, float) and not math.isfinite(v)):
                return None, {}, f"objective {label}.{metric} was not measured"
            values.append(float(v))
        constraints: dict[str, float] = {}
        for sc in scenario_plans(self.spec):
            summ = scenarios.get(sc.label, {}).get("summary", {})
            excess = limit_excess(summ, sc.settings)
            constraints.update({f"{sc.label}.{short}": c for short, c in excess.items()})
            mine = list(excess.values())
            if _judges_steady_state(sc):
                # the keep-up rule (loadgen.validity): p99 within limits at a rate the server cannot sustain is
                # no SLA met; estimates carry no verdict and count as met
                c = 0.0 if summ.get("steady_state_met", 1.0) else 1.0
                constraints[f"{sc.label}.steady"] = c
                mine.append(c)
            if mine and sc.label in scenarios:
                scenarios[sc.label]["sla_met"] = all(c <= 0 for c in mine)
        dirty = [label for label, sr in scenarios.items() if sr.get("contaminated")]
        for label in dirty:
            # its reported level failed the engine-side audit twice (loadgen.audit): neither met nor missed
            scenarios[label]["sla_met"] = None
        if dirty:
            return None, {}, f"contaminated measurement in {', '.join(dirty)}: the audit failed after a re-run"
        if self.quality is not None and self.quality.constrains:
            constraints["quality"] = 0.0  # an estimate cannot judge outputs; _tell puts the measured verdict here
        constraints["failed"] = 0.0
        return values, constraints, ""

    def _derived_metrics(self, sr: dict[str, Any], gpus: int) -> None:
        summ = sr.setdefault("summary", {})
        tps = summ.get("output_tokens_per_s")
        if tps and "output_tokens_per_s_per_gpu" not in summ:
            summ["output_tokens_per_s_per_gpu"] = tps / max(gpus, 1)
        if tps and self.spec.cost_per_gpu_hour is not None:
            summ["usd_per_million_tokens"] = self.spec.cost_per_gpu_hour * gpus / (tps * 3600) * 1e6

    # the loop ------------------------------------------------------------------------------------------------
    def run(self) -> StudyOutcome:
        self.run_dir.mkdir(parents=True, exist_ok=True)
        lock = _lock(self.run_dir)
        executor = None
        session = None
        try:
            from servetune.optimizer import resume_check

            changed = resume_check.compare(self.spec)
            if changed.refused:  # before the stored file is replaced and before Optuna is asked anything
                raise resume_check.StudyChanged(changed.refusal(self.spec.source))
            if self.spec.source and Path(self.spec.source).exists():
                shutil.copyfile(self.spec.source, self.run_dir / "study.yaml")
            exclusive = self.spec.storage is None  # our own SQLite file under our lock: RUNNING means stale
            study = self.open_study()
            resume_check.check_distributions(study, self.space)
            session = open_session(self.run_dir)  # GPU use counts the time drivers ran, not the gaps between
            if not exclusive:
                from servetune.optimizer.shared_study import ConfigClaims

                self._claims = ConfigClaims(self._rdb.engine, study._study_id)
            requeued = self.recover(study, exclusive)
            if requeued:
                self.on_event("resumed", {"requeued": requeued})
            self._restore_records(study)
            counted = [t for t in study.get_trials(deepcopy=False) if not t.user_attrs.get(STALE)
                       and t.user_attrs.get(STATE) != "rejected"]  # the budget counts what was measured
            if self.spec.baseline and not any(t.user_attrs.get(BASELINE) for t in study.get_trials(deepcopy=False)):
                for e in self.space.engines:
                    study.enqueue_trial({}, user_attrs={BASELINE: True, ENGINE: e})
            done_before = sum(1 for t in counted if t.state.is_finished())
            self.on_event("start", {"done": done_before, "budget": self.spec.budget.trials,
                                    "run_dir": str(self.run_dir)})
            self._note_unchecked_numerics()
            executor = self._executor()
            if self._stale_dirs and hasattr(executor, "reap_everywhere"):
                executor.reap_everywhere(self._stale_dirs)  # a dead driver's engines, on whichever node
            outcome = self._loop(study, executor, done_before)
            repeats = self._repeat(study, executor) if self.spec.budget.repeats else None
            self._restore_records(study)  # what other drivers of a shared study measured meanwhile
            self._write_summary(study, outcome, repeats)
            return outcome
        except KeyboardInterrupt:  # say so now: stopping a 70B engine takes a while
            self.on_event("interrupted", {})
            raise
        finally:
            if executor is not None:
                executor.shutdown()
            if session is not None:
                close_session(self.run_dir, session)
            lock.close()

    def _note_unchecked_numerics(self) -> None:
        from servetune.optimizer.quality import NUMERICS

        lossy = [n for n in self.space.dimensions if n in NUMERICS]
        if self.quality is None and lossy:
            self.on_event("note", {"text": f"the search changes numerics ({', '.join(lossy)}) and the study has no "
                                           "quality: section, so no trial's outputs are checked (docs/quality.md)"})

    def _restore_records(self, study: optuna.Study) -> None:
        from servetune.optimizer.shared_study import restore_records

        n = restore_records(study, self.trial_dir)
        if n:
            self.on_event("note", {"text": f"{n} trial record(s) this run directory lacked were restored from the "
                                           "study's storage (their per-request files stay where they ran)"})

    def _executor(self):
        from servetune.optimizer.execution import RayExecutor

        address = self.ray_address or self.spec.cluster.address
        if address:
            from servetune.optimizer.cluster_execution import ClusterExecutor

            return ClusterExecutor(self.spec, address, model_path=self.model.path if self.spec.model.path else None,
                                   on_note=lambda text: self.on_event("note", {"text": text}))
        all_sim = all(simulated(e) for e in self.space.engines)
        return RayExecutor(self.spec.hardware.gpus, address=self.ray_address,
                           declare_gpus=all_sim or self.ray_address is None, run_dir=self.run_dir)

    def _loop(self, study: optuna.Study, executor, done_before: int) -> StudyOutcome:
        b = self.spec.budget
        deadline = time.monotonic() + b.wall_time_s if b.wall_time_s else math.inf
        outcome = StudyOutcome(run_dir=self.run_dir)
        in_flight: dict[Any, tuple[optuna.Trial, TrialPlan]] = {}
        started = done_before
        trials = study.get_trials(deepcopy=False)
        rejected = sum(1 for t in trials if t.user_attrs.get(STATE) == "rejected")
        failures = sum(1 for t in trials
                       if t.state.is_finished() and not t.user_attrs.get(STALE) and t.user_attrs.get(STATE) != "rejected"
                       and (t.state == optuna.trial.TrialState.FAIL or t.user_attrs.get(PESSIMISTIC)))
        seen = self._seen_configs(study)
        # a config sampled while the same one is being measured waits for that result instead of a second GPU
        parked: dict[str, list[tuple[optuna.Trial, TrialPlan]]] = {}
        # shared storage: a config another driver claimed waits for that driver's result (trial, plan, key)
        foreign: list[tuple[optuna.Trial, TrialPlan, str]] = []
        withdrawn: set[Any] | None = None  # at the wall time: the trials still queued in Ray, never launched
        last_beat = last_foreign = 0.0
        placement_reasons = getattr(executor, "reject_reasons", None)  # a cluster: what no node can take
        launched = getattr(executor, "launched", None)
        while True:
            if self._claims is not None and time.monotonic() - last_foreign > 2.0:
                last_foreign = time.monotonic()
                self._settle_foreign(study, executor, foreign, seen, outcome)
                started = self._counted(study)  # the budget is the study's, over every driver
            while (len(in_flight) < b.parallel and started < b.trials and time.monotonic() < deadline
                   and rejected < REJECTIONS_PER_TRIAL * b.trials
                   and (b.max_failures is None or failures < b.max_failures) and not self._grid_done(study)):
                picked = self._prescreen(study, seen, [p for _, p in in_flight.values()])
                trial = study.ask()
                started += 1
                plan, reasons = self.plan_trial(trial)
                if not reasons and placement_reasons is not None:
                    reasons = placement_reasons(plan)
                # (with shared storage another driver may have taken the enqueued candidate: then this trial
                # is whatever the sampler gave, and carries no estimate)
                if picked is not None and picked["chosen"]["params"] == plan.params:
                    study._storage.set_trial_user_attr(trial._trial_id, ESTIMATE, picked["chosen"])
                    self._write_estimate(plan, picked)
                key = config_key(plan.engine, plan.params)
                trial.set_user_attr(KEY, key)
                if reasons:  # costs no GPU time, so no trial of the budget: the sampler learns and draws again
                    self._finish_without_launch(study, trial, plan, "rejected",
                                                {"kind": "rejected", "reason": "; ".join(reasons)}, outcome)
                    started -= 1
                    rejected += 1
                    continue
                if key not in seen and self._claims is not None:
                    seen.update(self._seen_configs(study))  # what other drivers measured meanwhile
                if key in seen:
                    prev = seen[key]
                    self._tell_duplicate(study, trial, plan, prev, outcome)
                    continue
                running = next((p.number for _, p in in_flight.values() if config_key(p.engine, p.params) == key),
                               None)
                if running is not None:
                    parked.setdefault(key, []).append((trial, plan))
                    self.on_event("note", {"text": f"trial {plan.number} has the config trial {running} is "
                                                   "measuring: it will take that result"})
                    continue
                if self._claims is not None:
                    holder = self._claims.claim(key, trial._trial_id, lambda tid: self._void(study, tid))
                    if holder is not None:
                        foreign.append((trial, plan, key))
                        other = study._storage.get_trial_number_from_id(holder)
                        self.on_event("note", {"text": f"trial {plan.number} has the config trial {other} "
                                                       "(another driver) is measuring: it will take that result"})
                        continue
                write_json_atomic(Path(plan.trial_dir) / "trial.json", TrialResult(
                    number=plan.number, engine=plan.engine, params=plan.params, state="running",
                    is_baseline=plan.is_baseline, gpus=plan.gpus).to_dict())
                held = sum(p.gpus for _, p in in_flight.values())
                in_flight[executor.submit(plan)] = (trial, plan)
                self.on_event("launch", {"number": trial.number, "engine": plan.engine, "params": plan.params,
                                         "gpus": plan.gpus, "baseline": plan.is_baseline,
                                         "queued": held + plan.gpus > self.spec.hardware.gpus})
            if not in_flight and not foreign and self._deferred:
                self._flush_deferred(study)  # their baseline will not run in this session
            if not in_flight and not foreign:
                outcome.stopped_because = ("trial budget reached" if started >= b.trials else
                                           f"the sampler drew {rejected} configurations the rules reject"
                                           if rejected >= REJECTIONS_PER_TRIAL * b.trials else
                                           "every grid point was visited" if self._grid_done(study) else
                                           "wall time reached" if time.monotonic() >= deadline else
                                           "too many failures")
                break
            ready = executor.wait(list(in_flight), timeout_s=1.0)
            self.on_event("tick", {"in_flight": [p for _, p in in_flight.values()]})
            if withdrawn is None and time.monotonic() >= deadline:
                # no engine starts after the wall time: unqueue what has not (nothing is submitted after it,
                # so one look at the in-flight trials is enough)
                withdrawn = {ref for ref, (_, plan) in in_flight.items()
                             if not (launched(ref) if launched else self._launched(plan))}
                for ref in withdrawn:
                    executor.cancel(ref, force=False)
            if time.monotonic() - last_beat > 10:
                for trial in ([t for t, _ in in_flight.values()] + [t for t, _, _ in self._deferred]
                              + [t for t, _, _ in foreign]):
                    study._storage.record_heartbeat(trial._trial_id)
                last_beat = time.monotonic()
            for ref in ready:
                trial, plan = in_flight.pop(ref)
                try:
                    result = executor.result(ref)
                except Exception as e:  # the Ray worker died (or was cancelled): its engine may be orphaned
                    from servetune.optimizer.cluster_execution import TrialLost
                    from servetune.optimizer.process import reap_orphan

                    reap_orphan(Path(plan.trial_dir) / "engine.pid")
                    self._mask_secrets(Path(plan.trial_dir))
                    if withdrawn and ref in withdrawn:
                        self._withdraw(study, trial, plan, parked.pop(config_key(plan.engine, plan.params), []))
                        started -= 1  # not run: a resumed study runs it within the same budget
                        continue
                    if isinstance(e, TrialLost):  # its node went away: measure the config on another one
                        self._requeue(study, trial._trial_id, plan.number, trial.params, plan.is_baseline, str(e))
                        started -= 1
                        for waiting, waiting_plan in parked.pop(config_key(plan.engine, plan.params), []):
                            self._drop(study, waiting._trial_id, waiting_plan.number, str(e))
                            started -= 1  # the requeued trial measures it
                        self.on_event("note", {"text": f"trial {plan.number}: {e}"})
                        continue
                    result = TrialResult(number=plan.number, engine=plan.engine, params=plan.params, state="failed",
                                         is_baseline=plan.is_baseline, gpus=plan.gpus,
                                         failure={"kind": "internal", "reason": f"Ray worker died: {type(e).__name__}"})
                    write_json_atomic(Path(plan.trial_dir) / "trial.json", result.to_dict())
                ok = self._tell(study, trial, result, outcome)
                key = config_key(plan.engine, plan.params)
                if ok:
                    seen[key] = result
                else:
                    failures += 1
                    if result.failure and result.failure.get("kind") != "internal":
                        seen[key] = result
                for waiting, waiting_plan in parked.pop(key, []):
                    self._tell_duplicate(study, waiting, waiting_plan, result, outcome)
        return outcome

    # multi-fidelity: pre-screen candidates with the estimator ------------------------------------------------
    def _prescreen(self, study: optuna.Study, seen: dict[str, TrialResult], in_flight: list[TrialPlan]
                   ) -> dict[str, Any] | None:
        """Ask the sampler for ``fidelity.prescreen`` candidates in a shadow in-memory study that holds the real
        study's finished trials, score them with the estimator, and enqueue the most promising one in the real
        study (the next ``ask`` returns it). The real study never sees the unlaunched candidates."""
        from servetune.optimizer import fidelity

        n = self.spec.fidelity.prescreen
        if n < 2 or self._estimator_off or self.spec.sampler.kind == "grid":
            return None
        if study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.WAITING,)):
            return None  # a queued trial (baseline, re-queued) goes next, as queued
        t0 = time.monotonic()
        cal = self.calibration()
        finished = study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,))
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            shadow = optuna.create_study(directions=[o.direction for o in self.spec.objectives],
                                         sampler=make_sampler(self.spec, self.space, len(self.objectives),
                                                              seed_offset=len(study.trials) + 1))
            shadow.add_trials(finished)
        busy = {config_key(p.engine, p.params) for p in in_flight}
        pessimistic = self._pessimistic_values(study)
        cands: list[dict[str, Any]] = []
        for _ in range(n):
            t = shadow.ask()
            engine, params = self.space.suggest(t)
            key = config_key(engine, params)
            c: dict[str, Any] = {"engine": engine, "params": params}
            reasons = self.check(engine, params)
            if reasons:
                c.update(kind="rejected", reason="; ".join(reasons))
            elif key in seen or key in busy or any(key == x.get("key") for x in cands):
                c.update(kind="known")
                shadow.tell(t, state=optuna.trial.TrialState.FAIL)
                cands.append(c)
                continue
            else:
                try:
                    raw = fidelity.estimate(self.model.shape, self.gpu_for(params)[0],
                                            {k: v for k, v in self.full_params(engine, params).items() if v is not None},
                                            scenario_plans(self.spec), dataset_args(self.spec),
                                            max_requests=self.spec.fidelity.max_requests)
                except fidelity.EstimateUnavailable as e:
                    self._estimator_off = str(e)
                    self.on_event("note", {"text": f"prescreen off: {e}"})
                    return None
                if "error" in raw:
                    c.update(kind="predicted_failure", reason=raw["error"])
                else:
                    est = cal.apply_all(raw)
                    values, named, why = self.score(est, rules.gpus_needed(self.full_params(engine, params)))
                    if values is None:
                        c.update(kind="unscored", reason=why)
                        shadow.tell(t, state=optuna.trial.TrialState.FAIL)
                        cands.append(c)
                        continue
                    c.update(kind="scored", key=key, values=values, constraints=named, raw=raw, calibrated=est)
                    self._set_constraints(t, named)
                    shadow.tell(t, values)
                    cands.append(c)
                    continue
            self._set_constraints(t, {nm: 1.0 for nm in self.constraint_names()})
            shadow.tell(t, pessimistic)
            cands.append(c)
        chosen = self._choose(study, cands)
        if chosen is None:
            return None
        fixed = dict(chosen["params"])
        if len(self.space.engines) > 1:
            fixed["engine"] = chosen["engine"]
        study.enqueue_trial(fixed, skip_if_exists=False)
        summary = {"params": chosen["params"], "candidates": len(cands), "kinds": {k: sum(1 for c in cands if c["kind"] == k)
                                                      for k in {c["kind"] for c in cands}},
                   "values": chosen.get("values"), "constraints": chosen.get("constraints"),
                   "gain": chosen.get("gain"), "scale": cal.scale, "seconds": round(time.monotonic() - t0, 3)}
        return {"chosen": summary, "raw": chosen.get("raw"), "calibrated": chosen.get("calibrated"),
                "candidates": [{k: v for k, v in c.items() if k not in ("raw", "calibrated", "key")}
                               for c in cands]}

    def _choose(self, study: optuna.Study, cands: list[dict[str, Any]]) -> dict[str, Any] | None:
        """Predicted-feasible candidates by hypervolume gain over the measured SLA-feasible front; else the
        least-violating scored one; else an unscored one. None: nothing worth a launch (the real sampler picks)."""
        from servetune.optimizer import fidelity

        scored = [c for c in cands if c["kind"] == "scored"]
        feasible = [c for c in scored if all(v <= 0 for v in c["constraints"].values())]
        if feasible:
            sign = [1.0 if o.direction == "minimize" else -1.0 for o in self.spec.objectives]
            try:
                best = study.best_trials
            except Exception:  # nothing measured yet
                best = []
            front = [[v * s for v, s in zip(t.values, sign)] for t in best
                     if not t.user_attrs.get(PESSIMISTIC) and t.user_attrs.get(STATE, "complete") == "complete"]
            pts = [[v * s for v, s in zip(c["values"], sign)] for c in feasible]
            allp = np.asarray(front + pts, dtype=float)
            lo, hi = allp.min(axis=0), allp.max(axis=0)
            span = np.where(hi - lo > 0, hi - lo, np.maximum(np.abs(hi), 1.0))
            norm = lambda p: list((np.asarray(p) - lo) / span)  # noqa: E731
            ref = [1.1] * len(sign)
            nfront = [norm(f) for f in front]
            for c, p in zip(feasible, pts):
                c["gain"] = fidelity.hypervolume_gain(nfront, norm(p), ref)
            return max(feasible, key=lambda c: (c["gain"], -sum(norm([v * s for v, s in zip(c["values"], sign)]))))
        if scored:
            return min(scored, key=lambda c: sum(max(0.0, v) for v in c["constraints"].values()))
        unscored = [c for c in cands if c["kind"] == "unscored"]
        return unscored[0] if unscored else None

    def _write_estimate(self, plan: TrialPlan, picked: dict[str, Any]) -> None:
        write_json_atomic(Path(plan.trial_dir) / "estimate.json", {
            "number": plan.number, "params": plan.params, **picked})

    def _record_estimate_error(self, result: TrialResult) -> None:
        """Beside a measured trial that was pre-screened: the estimator's error, raw and as calibrated then."""
        from servetune.optimizer.fidelity import HEADLINE, _rel

        path = self.trial_dir(result.number) / "estimate.json"
        if result.state != "complete" or result.duplicate_of is not None or not path.exists():
            return
        try:
            d = json.loads(path.read_text())
        except (OSError, ValueError):
            return
        errs: dict[str, dict[str, float]] = {"raw": {}, "calibrated": {}}
        for which in ("raw", "calibrated"):
            for label, sc in (d.get(which) or {}).items():
                meas = result.scenarios.get(label, {}).get("summary", {})
                for metric in HEADLINE.values():
                    e, m = sc.get("summary", {}).get(metric), meas.get(metric)
                    if isinstance(e, (int, float)) and isinstance(m, (int, float)) and e > 0 and m > 0:
                        errs[which][f"{label}.{metric}"] = _rel(abs(math.log(m / e)))
        d["error_raw"], d["error_calibrated"] = errs["raw"], errs["calibrated"]
        write_json_atomic(path, d)

    def calibration_pairs(self) -> list[tuple[dict, dict]]:
        """(estimated, measured) scenario summaries of the completed, measured trials of this run."""
        from servetune.optimizer import fidelity

        pairs = []
        for number, r in trial_records(self.run_dir).items():
            if r.get("state") != "complete" or r.get("duplicate_of") is not None:
                continue
            raw = self._raw_estimates.get(number)
            if raw is None:
                est_path = self.trial_dir(number) / "estimate.json"
                try:
                    raw = json.loads(est_path.read_text()).get("raw")
                except (OSError, ValueError):
                    raw = None
                if raw is None:  # launched without a pre-screen (baseline, first trials): estimate it now
                    engine = r.get("engine") or self.space.engines[0]
                    if engine not in self.engine_specs:
                        continue
                    try:
                        raw = fidelity.estimate(self.model.shape, self.gpu_for(r.get("params") or {})[0],
                                                {k: v for k, v in self.full_params(engine, r.get("params") or {}).items()
                                                 if v is not None},
                                                scenario_plans(self.spec), dataset_args(self.spec),
                                                max_requests=self.spec.fidelity.max_requests)
                    except fidelity.EstimateUnavailable:
                        return []
                self._raw_estimates[number] = raw
            if not raw or "error" in raw:
                continue
            for label, sc in raw.items():
                meas = (r.get("scenarios") or {}).get(label, {}).get("summary")
                if meas:
                    pairs.append((sc.get("summary", {}), meas))
        return pairs

    def calibration(self):
        from servetune.optimizer.fidelity import Calibration

        if not self.spec.fidelity.calibrate:
            return Calibration()
        return Calibration.fit(self.calibration_pairs())

    @staticmethod
    def _grid_done(study: optuna.Study) -> bool:
        if not isinstance(study.sampler, optuna.samplers.GridSampler):
            return False
        if study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.WAITING,)):
            return False  # queued trials (baseline, re-queued) still run
        return study.sampler.is_exhausted(study)

    def _seen_configs(self, study: optuna.Study) -> dict[str, TrialResult]:
        from servetune.optimizer.shared_study import stored_record

        seen: dict[str, TrialResult] = {}
        for ft in study.get_trials(deepcopy=False):
            key = ft.user_attrs.get(KEY)
            if not key or ft.user_attrs.get(STALE) or not ft.state.is_finished():
                continue
            path = self.trial_dir(ft.number) / "trial.json"
            try:
                r = TrialResult.from_dict(json.loads(path.read_text()))
            except (OSError, ValueError, TypeError):
                rec = stored_record(ft)  # measured by another driver, or before a move to another node
                if rec is None:
                    continue
                r = TrialResult.from_dict({**rec, "number": ft.number})
            if r.state == "complete" or (r.failure and r.failure.get("kind") not in ("internal",)):
                seen[key] = r
        return seen

    def _tell(self, study: optuna.Study, trial: optuna.Trial, result: TrialResult, outcome: StudyOutcome) -> bool:
        values, named, why = (None, {}, "")
        if result.state == "complete":
            values, named, why = self.score(result.scenarios, result.gpus)
            contaminated = values is None and any(sr.get("contaminated") for sr in result.scenarios.values())
            # a contaminated measurement stays complete, as measured and flagged; Optuna is told it failed and
            # learns nothing from it (it measured the engine warming up or replayed prompts, not the config)
            if values is None and not contaminated:
                result.state = "failed"
                result.failure = {"kind": "load_errors", "reason": why}
            elif values is not None:
                for (label, metric), v in zip(self.objectives, values):
                    result.objectives[f"{label}.{metric}"] = float(v)
                if self.quality is not None:
                    if self._awaits_reference(study, result):
                        self._deferred.append((trial, result, outcome))
                        self.on_event("note", {"text": f"trial {result.number} is measured; its quality verdict "
                                                       "waits for its engine's baseline evaluation"})
                        return True
                    result.quality = self._judge_quality(result)
                    if "quality" in named:
                        named["quality"] = float(result.quality["constraint"])
        study._storage.set_trial_user_attr(trial._trial_id, STATE, result.state)
        write_json_atomic(self.trial_dir(result.number) / "trial.json", result.to_dict())
        from servetune.optimizer.shared_study import RECORD

        study._storage.set_trial_user_attr(trial._trial_id, RECORD, result.to_dict())
        self._record_estimate_error(result)
        if values is not None:
            study._storage.set_trial_user_attr(trial._trial_id, CONSTRAINTS, list(named.values()))
            study._storage.set_trial_user_attr(trial._trial_id, "servetune.objectives", result.objectives)
            self._set_constraints(trial, named)
            study.tell(trial, values)
        else:
            study._storage.set_trial_user_attr(trial._trial_id, FAILURE, result.failure)
            if self._learns_from(result):
                # An infeasible COMPLETE with pessimistic values: the samplers model the failed region (TPE puts
                # it in the "bad" group, GP fits the constraint, NSGA-II ranks it last) and best_trials, hence
                # the Pareto front, never contains it.
                study._storage.set_trial_user_attr(trial._trial_id, PESSIMISTIC, True)
                self._set_constraints(trial, {n: 1.0 for n in self.constraint_names()})
                study.tell(trial, self._pessimistic_values(study))
            else:
                study.tell(trial, state=optuna.trial.TrialState.FAIL)
        outcome.results.append(result)
        self.on_event("result", {"result": result, "constraints": list(named.values())})
        if result.is_baseline and self._deferred:
            self._flush_deferred(study, result.engine)
        return values is not None

    # quality: the verdict needs the engine's baseline evaluation ----------------------------------------------
    def _awaits_reference(self, study: optuna.Study, result: TrialResult) -> bool:
        """A measured trial whose engine's baseline is still to be measured (queued or running): its verdict,
        hence its tell, waits for that baseline (a baseline is its own reference)."""
        from servetune.optimizer.quality import reference_trial

        if result.is_baseline or self._ending:
            return False
        if reference_trial(trial_records(self.run_dir), result.engine) is not None:
            return False
        return any(t.user_attrs.get(BASELINE) and (t.user_attrs.get(ENGINE) or self.space.engines[0]) == result.engine
                   for t in study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.WAITING,
                                                                     optuna.trial.TrialState.RUNNING)))

    def _judge_quality(self, result: TrialResult) -> dict[str, Any]:
        from servetune.optimizer import quality as q

        engine = result.engine
        measured = result.duplicate_of if result.duplicate_of is not None else result.number
        own = q.load_eval(self.trial_dir(measured))
        base = self.full_params(engine, {k: v for k, v in self.space.baseline(engine).items() if k != "engine"})
        ref = q.reference_trial(trial_records(self.run_dir), engine, lambda r: not q.numerics_changes(
            self.full_params(engine, r.get("params") or {}), base))
        reference = None if ref is None else (ref[0], own if ref[1] == measured else q.load_eval(self.trial_dir(ref[1])))
        changes = q.numerics_changes(self.full_params(engine, result.params), base)
        return self.quality.judge(result.quality, own, reference, changes,
                                  is_reference=result.is_baseline or (ref is not None and ref[0] == result.number))

    def _flush_deferred(self, study: optuna.Study, engine: str | None = None) -> None:
        """Tell the deferred trials of ``engine`` (None: all, judged with what there is: the study is ending)."""
        waiting, self._deferred = self._deferred, []
        self._ending = self._ending or engine is None
        for trial, result, outcome in waiting:
            if engine is None or result.engine == engine:
                self._tell(study, trial, result, outcome)
            else:
                self._deferred.append((trial, result, outcome))

    # several drivers on one study (shared storage) -------------------------------------------------------
    def _counted(self, study: optuna.Study) -> int:
        """Trials of the budget started so far by every driver (not stale, not rejected, not just queued)."""
        return sum(1 for t in study.get_trials(deepcopy=False)
                   if t.state != optuna.trial.TrialState.WAITING and not t.user_attrs.get(STALE)
                   and t.user_attrs.get(STATE) != "rejected")

    def _void(self, study: optuna.Study, trial_id: int) -> bool:
        """Whether a trial ended without a result for its configuration (stale, lost, an internal failure)."""
        ft = study._storage.get_trial(trial_id)
        if not ft.state.is_finished():
            return False
        if ft.user_attrs.get(STALE):
            return True
        return ft.state == optuna.trial.TrialState.FAIL and (ft.user_attrs.get(FAILURE) or {}).get("kind") in (
            None, "internal")

    def _settle_foreign(self, study: optuna.Study, executor, foreign: list, seen: dict[str, TrialResult],
                        outcome: StudyOutcome) -> None:
        """Trials waiting on another driver's measurement: take its result once there is one; when it ended
        without one, drop the waiting trial (stale: out of the budget) and queue the configuration again.
        Trials of a driver that stopped beating are failed as stale and queued again first (as a restarted
        driver would)."""
        before = len(self._stale_dirs)
        if self.recover(study, exclusive=False) and hasattr(executor, "reap_everywhere"):
            executor.reap_everywhere(self._stale_dirs[before:])
        if not foreign:
            return
        seen.update(self._seen_configs(study))
        for entry in list(foreign):
            trial, plan, key = entry
            if key in seen:
                foreign.remove(entry)
                self._tell_duplicate(study, trial, plan, seen[key], outcome)
                continue
            holder = self._claims.holder(key)
            if holder is None or self._void(study, holder):
                foreign.remove(entry)
                why = "the trial measuring this config (another driver) ended without a result"
                if holder is not None and study._storage.get_trial(holder).user_attrs.get(STALE):
                    self._drop(study, trial._trial_id, plan.number, why + "; it was queued again")
                else:  # an internal failure: nobody queued it again
                    self._requeue(study, trial._trial_id, plan.number, trial.params, plan.is_baseline,
                                  why + "; queued again")

    def _learns_from(self, result: TrialResult) -> bool:
        """Failures that say something about the configuration (not the driver, Ray or a busy GPU)."""
        kind = (result.failure or {}).get("kind")
        return self.spec.sampler.learn_from_failures and result.state in ("failed", "rejected") \
            and kind not in (None, "internal")

    @staticmethod
    def _set_constraints(trial: optuna.Trial, named: dict[str, float]) -> None:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # "already set": a trial re-told after a driver restart
            for name, v in named.items():
                trial.set_constraint(name, float(v) if math.isfinite(v) else 1e6)

    def _pessimistic_values(self, study: optuna.Study) -> list[float]:
        """Each objective's worst measured value (or a neutral floor before anything was measured)."""
        measured = [t.values for t in study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,))
                    if t.values and not t.user_attrs.get(PESSIMISTIC)]
        out = []
        for i, o in enumerate(self.spec.objectives):
            col = [v[i] for v in measured if math.isfinite(v[i])]
            if o.direction == "maximize":
                out.append(min(col) if col else 0.0)
            else:
                out.append(max(col) if col else 1e6)
        return out

    def _finish_without_launch(self, study, trial, plan: TrialPlan, state: str, failure: dict[str, str],
                               outcome: StudyOutcome) -> None:
        result = TrialResult(number=plan.number, engine=plan.engine, params=plan.params, state=state,
                             is_baseline=plan.is_baseline, gpus=plan.gpus, failure=failure)
        self._tell(study, trial, result, outcome)

    def _tell_duplicate(self, study, trial, plan: TrialPlan, prev: TrialResult, outcome: StudyOutcome) -> None:
        """Same config as an earlier trial: reuse its measurement instead of paying for a relaunch."""
        result = TrialResult.from_dict({**prev.to_dict(), "number": plan.number, "is_baseline": plan.is_baseline,
                                        "duplicate_of": prev.number, "objectives": {}})
        if result.state != "complete" and result.failure:
            result.failure = {**result.failure, "reason": f"same config as trial {prev.number}: " + result.failure["reason"]}
        self._tell(study, trial, result, outcome)

    # noise: repeats of the Pareto candidates -------------------------------------------------------------------
    def _repeat(self, study: optuna.Study, executor) -> dict[str, Any]:
        """Re-measure the top Pareto candidates ``budget.repeats`` more times (fresh launches, in
        ``trials/NNNN/repeat_K/``; a finished repeat is kept on resume), then mean ± 95 % CI per objective and
        the noise-aware front."""
        from servetune.optimizer import noise

        b = self.spec.budget
        front = self._pareto(study)
        by_number = {t.number: t for t in study.get_trials(deepcopy=False)}
        # the measured trial behind each front point (a duplicate points at the trial that ran)
        measured: dict[int, int] = {}
        for n in front:
            try:
                d = json.loads((self.trial_dir(n) / "trial.json").read_text())
            except (OSError, ValueError):
                continue
            src = d.get("duplicate_of") if d.get("duplicate_of") is not None else n
            measured.setdefault(src, n)
        first = self.spec.objectives[0]
        order = sorted(measured, key=lambda n: by_number[measured[n]].values[0] * (-1 if first.direction == "maximize" else 1))
        chosen = order[:b.repeat_top]
        runs: dict[int, list[TrialResult]] = {n: [] for n in chosen}
        todo: list[TrialPlan] = []
        for n in chosen:
            orig = TrialResult.from_dict(json.loads((self.trial_dir(n) / "trial.json").read_text()))
            for k in range(1, b.repeats + 1):
                rdir = self.trial_dir(n) / f"repeat_{k}"
                try:
                    prev = TrialResult.from_dict(json.loads((rdir / "trial.json").read_text()))
                    if prev.state == "complete":
                        runs[n].append(prev)
                        continue
                except (OSError, ValueError, TypeError):
                    pass
                plan = self.build_plan(n, orig.engine, orig.params, orig.is_baseline, rdir)
                plan.quality = None  # a repeat re-measures speed; the outputs were judged on the first launch
                todo.append(plan)
        in_flight: dict[Any, TrialPlan] = {}
        while todo or in_flight:
            while todo and len(in_flight) < b.parallel:
                plan = todo.pop(0)
                in_flight[executor.submit(plan)] = plan
                self.on_event("repeat", {"number": plan.number, "trial_dir": plan.trial_dir})
            ready = executor.wait(list(in_flight), timeout_s=1.0)
            self.on_event("tick", {"in_flight": list(in_flight.values())})
            for ref in ready:
                plan = in_flight.pop(ref)
                try:
                    r = executor.result(ref)
                except Exception as e:
                    self._mask_secrets(Path(plan.trial_dir))
                    r = TrialResult(number=plan.number, engine=plan.engine, params=plan.params, state="failed",
                                    failure={"kind": "internal", "reason": f"Ray worker died: {type(e).__name__}"})
                if r.state == "complete":
                    self.score(r.scenarios, r.gpus)
                    write_json_atomic(Path(plan.trial_dir) / "trial.json", r.to_dict())
                    runs[plan.number].append(r)
        names = [f"{s}.{m}" for s, m in self.objectives]
        stats: dict[int, dict[str, dict[str, Any]]] = {}
        for n in chosen:
            orig = TrialResult.from_dict(json.loads((self.trial_dir(n) / "trial.json").read_text()))
            samples = [orig] + runs[n]
            stats[n] = {}
            for (label, metric), name in zip(self.objectives, names):
                vals = [r.scenarios.get(label, {}).get("summary", {}).get(metric) for r in samples]
                stats[n][name] = noise.mean_ci([v for v in vals if isinstance(v, (int, float))])
        # noise-aware front over every SLA-feasible measured trial: repeated ones by their own CI, the rest by the
        # pooled relative CI of the repeated ones
        points: dict[int, list[float]] = {}
        nz: dict[int, list[float]] = {}
        pooled = [noise.pooled_relative_ci(stats, name) for name in names]
        for t in study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,)):
            if t.user_attrs.get(PESSIMISTIC) or any(v > 0 for v in t.constraints.values()):
                continue
            if t.user_attrs.get(STATE, "complete") != "complete":
                continue
            src = t.number
            try:
                d = json.loads((self.trial_dir(t.number) / "trial.json").read_text())
                src = d.get("duplicate_of") if d.get("duplicate_of") is not None else t.number
            except (OSError, ValueError):
                pass
            if src in points:
                continue
            if src in stats:
                points[src] = [stats[src][nm]["mean"] for nm in names]
                nz[src] = [stats[src][nm]["ci"] or 0.0 for nm in names]
            else:
                points[src] = list(t.values)
                nz[src] = [abs(v) * (p or 0.0) for v, p in zip(t.values, pooled)]
        directions = [o.direction for o in self.spec.objectives]
        return {"repeats": b.repeats, "trials": {str(n): st for n, st in stats.items()},
                "pareto_noise_aware": noise.noise_aware_front(points, nz, directions)}

    def _pareto(self, study: optuna.Study) -> list[int]:
        """Measured, SLA-feasible Pareto trials (failures told as pessimistic results are infeasible anyway)."""
        try:
            best = study.best_trials
        except Exception:
            return []
        return sorted(t.number for t in best if not t.user_attrs.get(PESSIMISTIC)
                      and t.user_attrs.get(STATE, "complete") == "complete")

    def _write_summary(self, study: optuna.Study, outcome: StudyOutcome,
                       repeats: dict[str, Any] | None = None) -> None:
        outcome.pareto = self._pareto(study)
        summary: dict[str, Any] = {
            "study": self.spec.name, "stopped_because": outcome.stopped_because, "pareto": outcome.pareto,
            "objectives": [f"{s}.{m}" for s, m in self.objectives],
        }
        if self.spec.fidelity.prescreen > 1:
            from servetune.optimizer.fidelity import Calibration

            summary["fidelity"] = {"prescreen": self.spec.fidelity.prescreen,
                                   "estimator_off": self._estimator_off,
                                   "calibration": Calibration.report(self.calibration_pairs())}
        if repeats is not None:
            summary["noise"] = repeats
        records = trial_records(self.run_dir)
        outcome.gpu_use = summary["gpu_use"] = gpu_use(records.values(), self.spec.hardware.gpus, read_sessions(self.run_dir))
        summary["vs_baseline"] = compare(list(records.values()), [(s, m, o.direction) for (s, m), o
                                                                in zip(self.objectives, self.spec.objectives)])
        if self.quality is not None:
            keep = ("passed", "reference", "exact_match", "first_divergence_mean", "kl_mean", "kl_max",
                    "accuracy_drop", "changes_numerics", "unchecked", "reasons")
            summary["quality"] = {
                "kind": self.quality.kind, "limits": self.quality.limits(),
                "trials": {str(n): {k: r["quality"][k] for k in keep if k in r["quality"]}
                           for n, r in records.items() if r.get("state") == "complete" and r.get("quality")}}
        write_json_atomic(self.run_dir / "summary.json", summary)
