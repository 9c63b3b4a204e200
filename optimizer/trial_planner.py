"""From a study and a sampled configuration to a launchable TrialPlan, or the reasons it must not launch.

The model, the scenarios and the dataset are resolved once from the study; a configuration is checked against
the pre-launch rules (optimizer.rules and the engine's own) and planned for the GPU type it names.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import optuna

from servetune.loadgen.datasets import COPY_TASKS
from servetune.loadgen.tokenizer import find_tokenizer
from servetune.loadgen.validity import OPEN_LOOP
from servetune.optimizer import rules
from servetune.optimizer.engines import get_engine, simulated
from servetune.optimizer.engines.base import ModelRef
from servetune.optimizer.perfmodel.hardware import get_gpu
from servetune.optimizer.perfmodel.model_shapes import load_shape
from servetune.optimizer.placement import type_named
from servetune.optimizer.records import ScenarioPlan, TrialPlan
from servetune.optimizer.space import SearchSpace
from servetune.optimizer.spec import StudySpec
from servetune.optimizer.study_store import BASELINE, ENGINE, PARAMS


def resolve_model(spec: StudySpec) -> ModelRef:
    m = spec.model
    path = spec.resolve_path(m.path) if m.path else None
    shape = load_shape(m.preset, path)
    name = m.name or m.preset or Path(path or "model").name
    return ModelRef(name=name, path=path or m.preset or "", shape=shape, load_format=m.load_format)


def gpu_memory_gib(spec: StudySpec) -> float:
    if spec.hardware.gpu_memory_gib:
        return spec.hardware.gpu_memory_gib
    return get_gpu(spec.hardware.gpu).memory_gib


def config_key(engine: str, params: dict[str, Any]) -> str:
    """One configuration, whatever order its parameters came in (duplicates and claims compare these)."""
    return json.dumps([engine, sorted(params.items())], default=str)


def judges_steady_state(sc: ScenarioPlan) -> bool:
    """Whether the scenario's verdict applies the keep-up rule, and the SLA has limits it could be part of."""
    s = sc.settings
    return s["kind"] in OPEN_LOOP and s.get("min_keep_up") is not None and bool(
        s.get("ttft_limit_ms") or s.get("tpot_limit_ms"))


def scenario_plans(spec: StudySpec) -> list[ScenarioPlan]:
    out = []
    for s in spec.workload.scenarios:
        ttft, tpot = s.sla.limits(s.kind) if s.sla else (None, None)
        search = s.max_qps.model_dump() if s.max_qps else None
        settings = dict(kind=s.kind, qps=s.max_qps.lo if s.max_qps else s.qps, concurrency=s.concurrency,
                        duration_s=s.duration_s, num_requests=s.num_requests,
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


def _dataset_args(spec: StudySpec, d: Any) -> dict[str, Any]:
    extra = {"temperature": d.temperature} if d.temperature is not None else {}
    if d.kind == "random":
        source = spec.resolve_path(d.tokenizer) if d.tokenizer else (
            spec.resolve_path(spec.model.path) if spec.model.path else None)
        tokenizer = find_tokenizer(source)
        fmt = d.prompt_format if d.prompt_format != "auto" else ("text" if tokenizer else "token_ids")
        return dict(kind="random", n=d.num_requests, input_tokens=d.input_tokens, output_tokens=d.output_tokens,
                    input_range=d.input_range, output_range=d.output_range, seed=d.seed, ignore_eos=d.ignore_eos,
                    prompt_format=fmt, tokenizer=str(tokenizer) if tokenizer else None,
                    shared_prefix_tokens=d.shared_prefix_tokens, **extra)
    if d.kind == "text_tasks":
        return dict(kind="text_tasks", n=d.num_requests, tasks=list(d.tasks or COPY_TASKS),
                    output_tokens=d.output_tokens, seed=d.seed, ignore_eos=d.ignore_eos, **extra)
    return dict(kind=d.kind, path=spec.resolve_path(d.path or ""), n=d.num_requests, seed=d.seed, **extra)


class TrialPlanner:
    """Checks and plans configurations of one study (the search space, the model, the GPUs it offers)."""

    def __init__(self, spec: StudySpec, space: SearchSpace, model: ModelRef, quality_settings: dict[str, Any] | None):
        self.spec = spec
        self.space = space
        self.model = model
        self.gpu_mem = gpu_memory_gib(spec)
        self.engine_specs: dict[str, Any] = {e.name: e for e in spec.engines}
        self.quality_settings = quality_settings

    def sampled(self, trial: optuna.Trial) -> tuple[str, dict[str, Any]]:
        """The configuration a trial stands for (the engine's baseline for a baseline trial), noted on it."""
        if trial.user_attrs.get(BASELINE):
            engine = str(trial.user_attrs.get(ENGINE) or self.space.engines[0])
            params = self.space.baseline(engine)
            params.pop("engine", None)
        else:
            engine, params = self.space.suggest(trial)
        trial.set_user_attr(PARAMS, params)
        trial.set_user_attr(ENGINE, engine)
        return engine, params

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
        t = type_named(list(self.spec.cluster.node_types), params.get("gpu"))
        if t is None:
            return self.spec.hardware.gpu, self.gpu_mem, self.spec.hardware.gpu_memory_gib, self.spec.hardware.gpus
        gpus = (self.spec.hardware.gpus if self.spec.cluster.span_nodes
                else min(t.gpus_per_node, self.spec.hardware.gpus))
        return t.gpu, t.gpu_memory_gib or get_gpu(t.gpu).memory_gib, t.gpu_memory_gib, gpus

    def gpus_needed(self, engine: str, params: dict[str, Any]) -> int:
        return rules.gpus_needed(self.full_params(engine, params))

    def build_plan(self, number: int, engine: str, params: dict[str, Any], is_baseline: bool,
                   trial_dir: Path) -> TrialPlan:
        es = self.engine_specs[engine]
        gpu, _, gpu_mem_override, _ = self.gpu_for(params)
        return TrialPlan(
            number=number, engine=engine, params=params, model=self.model,
            gpus=self.gpus_needed(engine, params), trial_dir=str(Path(trial_dir).resolve()),
            dataset=dataset_args(self.spec), scenarios=scenario_plans(self.spec), host=self.spec.host,
            gpu=gpu, gpu_memory_gib=gpu_mem_override,
            engine_command=es.command, engine_version=es.version, extra_args=list(es.extra_args),
            extra_env=dict(es.env), ready_timeout_s=es.ready_timeout_s, is_baseline=is_baseline,
            fake_gpus=simulated(engine), warmup=self.spec.workload.warmup.model_dump(),
            audit=self.spec.workload.audit_settings(), quality=self.quality_settings,
        )
