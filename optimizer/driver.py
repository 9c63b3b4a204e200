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

import optuna

from servetune.optimizer import rules
from servetune.optimizer.engines import get_engine
from servetune.optimizer.engines.base import ModelRef
from servetune.optimizer.records import ScenarioPlan, TrialPlan, TrialResult, write_json_atomic
from servetune.optimizer.space import SearchSpace
from servetune.optimizer.spec import StudySpec

BASELINE = "servetune.baseline"
PARAMS = "servetune.params"
ENGINE = "servetune.engine"
STATE = "servetune.state"
FAILURE = "servetune.failure"
KEY = "servetune.key"
STALE = "servetune.stale"
CONSTRAINTS = "servetune.constraints"


class StudyLocked(RuntimeError):
    pass


@dataclass
class StudyOutcome:
    run_dir: Path
    results: list[TrialResult] = field(default_factory=list)
    pareto: list[int] = field(default_factory=list)
    stopped_because: str = ""


# -- building blocks ----------------------------------------------------------------------------------------

def resolve_model(spec: StudySpec) -> ModelRef:
    from servetune.optimizer.model_shapes import load_shape

    m = spec.model
    path = spec.resolve_path(m.path) if m.path else None
    shape = load_shape(m.preset, path)
    name = m.name or m.preset or Path(path or "model").name
    return ModelRef(name=name, path=path or m.preset, shape=shape, load_format=m.load_format)


def gpu_memory_gib(spec: StudySpec) -> float:
    if spec.hardware.gpu_memory_gib:
        return spec.hardware.gpu_memory_gib
    from servetune.optimizer.hardware import get_gpu

    return get_gpu(spec.hardware.gpu).memory_gib


def objective_keys(spec: StudySpec) -> list[tuple[str, str]]:
    first = spec.workload.scenarios[0].label
    return [(o.scenario or first, o.metric) for o in spec.objectives]


def scenario_plans(spec: StudySpec) -> list[ScenarioPlan]:
    out = []
    for s in spec.workload.scenarios:
        ttft, tpot = s.sla.limits() if s.sla else (None, None)
        settings = dict(kind=s.kind, qps=s.qps, duration_s=s.duration_s, num_requests=s.num_requests,
                        max_connections=s.max_connections, warmup_requests=s.warmup_requests,
                        timeout_s=s.timeout_s, ttft_limit_ms=ttft, tpot_limit_ms=tpot, seed=spec.seed,
                        # a search trial is exploratory: a short run notes the early-stopping shortfall
                        # instead of failing; `servetune bench` keeps the MLPerf-strict default
                        require_early_stopping=False)
        out.append(ScenarioPlan(label=s.label, settings=settings))
    return out


def dataset_args(spec: StudySpec) -> dict[str, Any]:
    d = spec.workload.dataset
    if d.kind == "random":
        return dict(kind="random", n=d.num_requests, input_tokens=d.input_tokens, output_tokens=d.output_tokens,
                    input_range=d.input_range, output_range=d.output_range, seed=d.seed, ignore_eos=d.ignore_eos)
    return dict(kind=d.kind, path=spec.resolve_path(d.path or ""), n=d.num_requests, seed=d.seed)


def make_sampler(spec: StudySpec, space: SearchSpace, n_objectives: int) -> optuna.samplers.BaseSampler:
    s = spec.sampler
    seed = s.seed if s.seed is not None else spec.seed

    def constraints(ft: optuna.trial.FrozenTrial) -> list[float]:
        return ft.user_attrs.get(CONSTRAINTS, [0.0])

    if s.kind == "tpe":
        kw = {"n_startup_trials": s.startup_trials} if s.startup_trials is not None else {}
        return optuna.samplers.TPESampler(seed=seed, constraints_func=constraints, multivariate=True, **kw)
    if s.kind == "nsga2":
        return optuna.samplers.NSGAIISampler(seed=seed, constraints_func=constraints)
    if s.kind == "gp":
        return optuna.samplers.GPSampler(seed=seed, constraints_func=constraints)
    if s.kind == "grid":
        grid = {n: list(d.grid()) for n, d in space.dimensions.items()}
        return optuna.samplers.GridSampler(grid, seed=seed)
    return optuna.samplers.RandomSampler(seed=seed)


def config_key(engine: str, params: dict[str, Any]) -> str:
    return json.dumps([engine, sorted(params.items())], default=str)


def _lock(run_dir: Path):
    f = open(run_dir / ".lock", "w")
    try:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        f.close()
        raise StudyLocked(f"another servetune process is running the study in {run_dir}") from None
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
                                 {e.name: e.version for e in spec.engines})
        self.engine_specs = {e.name: e for e in spec.engines}
        self.objectives = objective_keys(spec)
        self.model = resolve_model(spec)
        self.gpu_mem = gpu_memory_gib(spec)

    # storage ---------------------------------------------------------------------------------------------
    def open_study(self) -> optuna.Study:
        optuna.logging.set_verbosity(optuna.logging.WARNING)
        # We record heartbeats ourselves for in-flight trials (ask/tell has no optimize() loop to do it).
        warnings.filterwarnings("ignore", message="Heartbeat of storage is supposed to be used")
        storage = optuna.storages.RDBStorage(self.spec.storage_url, heartbeat_interval=30, grace_period=120)
        directions = [o.direction for o in self.spec.objectives]
        sampler = make_sampler(self.spec, self.space, len(directions))
        return optuna.create_study(study_name=self.spec.name, storage=storage, sampler=sampler,
                                   directions=directions, load_if_exists=True)

    def recover(self, study: optuna.Study, exclusive: bool) -> int:
        """Trials left RUNNING by a dead driver: reap their engines, mark them failed, queue them again."""
        requeued = 0
        stale_ids = set()
        if not exclusive:
            stale_ids = set(optuna.storages.fail_stale_trials(study) or [])
        for ft in study.get_trials(deepcopy=False):
            running = ft.state == optuna.trial.TrialState.RUNNING and exclusive
            if not (running or ft._trial_id in stale_ids):
                continue
            from servetune.optimizer.process import reap_orphan

            reap_orphan(self.trial_dir(ft.number) / "engine.pid")
            finished = self._finished_on_disk(ft.number) if running else None
            if finished is not None:  # measured, but the driver died before telling Optuna: keep it
                self._tell(study, optuna.Trial(study, ft._trial_id), finished, StudyOutcome(self.run_dir))
                continue
            if running:
                study._storage.set_trial_user_attr(ft._trial_id, STALE, True)
                study._storage.set_trial_state_values(ft._trial_id, optuna.trial.TrialState.FAIL)
            user_attrs = {BASELINE: True} if ft.user_attrs.get(BASELINE) else {}
            study.enqueue_trial(ft.params, user_attrs=user_attrs, skip_if_exists=False)
            self._mark_stale_file(ft.number)
            requeued += 1
        return requeued

    def _finished_on_disk(self, number: int) -> TrialResult | None:
        try:
            r = TrialResult.from_dict(json.loads((self.trial_dir(number) / "trial.json").read_text()))
        except (OSError, ValueError, TypeError):
            return None
        if r.state == "complete" or (r.state == "failed" and (r.failure or {}).get("kind") != "internal"):
            return r
        return None

    def _mark_stale_file(self, number: int) -> None:
        path = self.trial_dir(number) / "trial.json"
        try:
            d = json.loads(path.read_text())
        except (OSError, ValueError):
            d = {"number": number, "engine": "", "params": {}}
        d["state"] = "failed"
        d["failure"] = {"kind": "internal", "reason": "driver stopped while this trial ran; it was queued again"}
        d["stale"] = True
        write_json_atomic(path, d)

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
        es = self.engine_specs[engine]
        eng = get_engine(engine, es.command, es.version)
        full = {**eng.defaults(), **params}  # what the server will actually run with, for the rules
        reasons = [f"{engine} has no flag for {p}" for p in self.space.unsupported(engine) if p in params]
        reasons += rules.check(full, self.model.shape, gpus_available=self.spec.hardware.gpus,
                               max_gpus_per_trial=self.spec.hardware.max_gpus_per_trial,
                               gpu_memory_gib=self.gpu_mem,
                               default_memory_fraction=float(eng.defaults().get("memory_fraction") or 0.9))
        reasons += eng.check(full, self.model, gpu=self.spec.hardware.gpu, gpu_memory_gib=self.gpu_mem,
                             gpus_available=self.spec.hardware.gpus)
        plan = TrialPlan(
            number=trial.number, engine=engine, params=params, model=self.model,
            gpus=rules.gpus_needed(full), trial_dir=str(self.trial_dir(trial.number).resolve()),
            dataset=dataset_args(self.spec), scenarios=scenario_plans(self.spec), host=self.spec.host,
            gpu=self.spec.hardware.gpu, gpu_memory_gib=self.spec.hardware.gpu_memory_gib,
            engine_command=es.command, engine_version=es.version, extra_args=list(es.extra_args),
            extra_env=dict(es.env), ready_timeout_s=es.ready_timeout_s, is_baseline=is_baseline,
            fake_gpus=(engine == "sim"),
        )
        return plan, list(dict.fromkeys(reasons))

    # results -> optuna ----------------------------------------------------------------------------------------
    def values_and_constraints(self, result: TrialResult) -> tuple[list[float] | None, list[float], str]:
        for label, sr in result.scenarios.items():
            self._derived_metrics(sr, result.gpus)
        values = []
        for label, metric in self.objectives:
            v = result.scenarios.get(label, {}).get("summary", {}).get(metric)
            if v is None or (isinstance(v, float) and not math.isfinite(v)):
                return None, [], f"objective {label}.{metric} was not measured"
            values.append(float(v))
            result.objectives[f"{label}.{metric}"] = float(v)
        constraints = []
        for sc in scenario_plans(self.spec):
            summ = result.scenarios.get(sc.label, {}).get("summary", {})
            for limit_key, metric in (("ttft_limit_ms", "ttft_p99_ms"), ("tpot_limit_ms", "tpot_p99_ms")):
                limit = sc.settings.get(limit_key)
                if limit:
                    measured = summ.get(metric, math.inf)
                    constraints.append(float(measured) / float(limit) - 1.0 if math.isfinite(measured) else 1e6)
            if sc.settings.get("ttft_limit_ms") or sc.settings.get("tpot_limit_ms"):
                sla_ok = all(c <= 0 for c in constraints[-2:])
                result.scenarios[sc.label]["sla_met"] = sla_ok
        return values, constraints or [0.0], ""

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
        try:
            if self.spec.source and Path(self.spec.source).exists():
                shutil.copyfile(self.spec.source, self.run_dir / "study.yaml")
            exclusive = self.spec.storage is None  # our own SQLite file under our lock: RUNNING means stale
            study = self.open_study()
            requeued = self.recover(study, exclusive)
            if requeued:
                self.on_event("resumed", {"requeued": requeued})
            counted = [t for t in study.get_trials(deepcopy=False) if not t.user_attrs.get(STALE)]
            if self.spec.baseline and not any(t.user_attrs.get(BASELINE) for t in study.get_trials(deepcopy=False)):
                for e in self.space.engines:
                    study.enqueue_trial({}, user_attrs={BASELINE: True, ENGINE: e})
            done_before = sum(1 for t in counted if t.state.is_finished())
            self.on_event("start", {"done": done_before, "budget": self.spec.budget.trials,
                                    "run_dir": str(self.run_dir)})
            executor = self._executor()
            outcome = self._loop(study, executor, done_before)
            self._write_summary(study, outcome)
            return outcome
        finally:
            if executor is not None:
                executor.shutdown()
            lock.close()

    def _executor(self):
        from servetune.optimizer.execution import RayExecutor

        all_sim = all(e == "sim" for e in self.space.engines)
        return RayExecutor(self.spec.hardware.gpus, address=self.ray_address,
                           declare_gpus=all_sim or self.ray_address is None)

    def _loop(self, study: optuna.Study, executor, done_before: int) -> StudyOutcome:
        b = self.spec.budget
        deadline = time.monotonic() + b.wall_time_s if b.wall_time_s else math.inf
        outcome = StudyOutcome(run_dir=self.run_dir)
        in_flight: dict[Any, tuple[optuna.Trial, TrialPlan]] = {}
        started = done_before
        failures = sum(1 for t in study.get_trials(deepcopy=False)
                       if t.state == optuna.trial.TrialState.FAIL and not t.user_attrs.get(STALE))
        seen = self._seen_configs(study)
        last_beat = 0.0
        while True:
            while (len(in_flight) < b.parallel and started < b.trials and time.monotonic() < deadline
                   and (b.max_failures is None or failures < b.max_failures)):
                trial = study.ask()
                started += 1
                plan, reasons = self.plan_trial(trial)
                key = config_key(plan.engine, plan.params)
                trial.set_user_attr(KEY, key)
                if reasons:
                    self._finish_without_launch(study, trial, plan, "rejected",
                                                {"kind": "rejected", "reason": "; ".join(reasons)}, outcome)
                    failures += 1
                    continue
                if key in seen:
                    prev = seen[key]
                    self._tell_duplicate(study, trial, plan, prev, outcome)
                    continue
                write_json_atomic(Path(plan.trial_dir) / "trial.json", TrialResult(
                    number=plan.number, engine=plan.engine, params=plan.params, state="running",
                    is_baseline=plan.is_baseline, gpus=plan.gpus).to_dict())
                in_flight[executor.submit(plan)] = (trial, plan)
                self.on_event("launch", {"number": trial.number, "engine": plan.engine, "params": plan.params,
                                         "gpus": plan.gpus, "baseline": plan.is_baseline})
            if not in_flight:
                outcome.stopped_because = ("trial budget reached" if started >= b.trials else
                                           "wall time reached" if time.monotonic() >= deadline else
                                           "too many failures")
                break
            ready = executor.wait(list(in_flight), timeout_s=1.0)
            if time.monotonic() - last_beat > 10:
                for trial, _ in in_flight.values():
                    study._storage.record_heartbeat(trial._trial_id)
                last_beat = time.monotonic()
            for ref in ready:
                trial, plan = in_flight.pop(ref)
                try:
                    result = executor.result(ref)
                except Exception as e:  # the Ray worker died: its engine may be orphaned
                    from servetune.optimizer.process import reap_orphan

                    reap_orphan(Path(plan.trial_dir) / "engine.pid")
                    result = TrialResult(number=plan.number, engine=plan.engine, params=plan.params, state="failed",
                                         is_baseline=plan.is_baseline, gpus=plan.gpus,
                                         failure={"kind": "internal", "reason": f"Ray worker died: {type(e).__name__}"})
                    write_json_atomic(Path(plan.trial_dir) / "trial.json", result.to_dict())
                ok = self._tell(study, trial, result, outcome)
                if ok:
                    seen[config_key(plan.engine, plan.params)] = result
                else:
                    failures += 1
                    if result.failure and result.failure.get("kind") != "internal":
                        seen[config_key(plan.engine, plan.params)] = result
        return outcome

    def _seen_configs(self, study: optuna.Study) -> dict[str, TrialResult]:
        seen: dict[str, TrialResult] = {}
        for ft in study.get_trials(deepcopy=False):
            key = ft.user_attrs.get(KEY)
            if not key or ft.user_attrs.get(STALE) or not ft.state.is_finished():
                continue
            path = self.trial_dir(ft.number) / "trial.json"
            try:
                r = TrialResult.from_dict(json.loads(path.read_text()))
            except (OSError, ValueError, TypeError):
                continue
            if r.state == "complete" or (r.failure and r.failure.get("kind") not in ("internal",)):
                seen[key] = r
        return seen

    def _tell(self, study: optuna.Study, trial: optuna.Trial, result: TrialResult, outcome: StudyOutcome) -> bool:
        values, constraints, why = (None, [], "")
        if result.state == "complete":
            values, constraints, why = self.values_and_constraints(result)
            if values is None:
                result.state = "failed"
                result.failure = {"kind": "load_errors", "reason": why}
        study._storage.set_trial_user_attr(trial._trial_id, STATE, result.state)
        write_json_atomic(self.trial_dir(result.number) / "trial.json", result.to_dict())
        if values is not None:
            study._storage.set_trial_user_attr(trial._trial_id, CONSTRAINTS, constraints)
            study._storage.set_trial_user_attr(trial._trial_id, "servetune.objectives", result.objectives)
            study.tell(trial, values)
        else:
            study._storage.set_trial_user_attr(trial._trial_id, FAILURE, result.failure)
            study.tell(trial, state=optuna.trial.TrialState.FAIL)
        outcome.results.append(result)
        self.on_event("result", {"result": result, "constraints": constraints})
        return values is not None

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

    def _write_summary(self, study: optuna.Study, outcome: StudyOutcome) -> None:
        try:
            outcome.pareto = sorted(t.number for t in study.best_trials)
        except Exception:
            outcome.pareto = []
        write_json_atomic(self.run_dir / "summary.json", {
            "study": self.spec.name, "stopped_because": outcome.stopped_because, "pareto": outcome.pareto,
            "objectives": [f"{s}.{m}" for s, m in self.objectives],
        })
