"""The study's serving side: the model, the hardware and cluster, the engines, the sampler, the budget,
the fidelity and the quality guardrail."""
from __future__ import annotations

import os
import re
from typing import Any, Literal

from pydantic import Field, ValidationInfo, field_validator, model_validator

from servetune.optimizer.engines.registry import names as engine_names
from servetune.optimizer.evalset import EvalSetError, load
from servetune.optimizer.perfmodel.hardware import get_gpu
from servetune.optimizer.perfmodel.model_shapes import config_problem, load_shape
from servetune.optimizer.quality import TIE_MARGIN
from servetune.optimizer.secret_refs import is_literal_secret, literal_flag_secrets, ref_name
from servetune.optimizer.spec_base import (
    MAX_GPUS,
    MAX_REQUESTS,
    MAX_SECONDS,
    MAX_SEED,
    MAX_TRIALS,
    MAX_WALL_S,
    StrictModel,
    base_dir_of,
    resolve_from,
)
from servetune.optimizer.spec_errors import describe, fail, fail_repeats

ENGINES = engine_names()  # every registered engine (optimizer/engines/registry.py)

class ModelSpec(StrictModel):
    preset: str | None = Field(None, description="built-in shape: llama-3.2-1b, llama-3.1-8b, llama-3.1-70b, "
                                                 "mixtral-8x7b")
    path: str | None = Field(None, description="checkpoint directory with config.json (what a real engine loads)")
    name: str | None = Field(None, description="served model name; defaults to the preset or directory name")
    load_format: str | None = Field(None, description="e.g. 'dummy' for random weights of the real shape")

    @model_validator(mode="after")
    def _one_source(self, info: ValidationInfo) -> "ModelSpec":
        if not self.preset and not self.path:
            raise ValueError("give model.preset (a built-in shape) or model.path (a checkpoint directory)")
        base = base_dir_of(info)
        if self.path and base is not None:
            p = resolve_from(base, self.path)
            where = "" if os.path.isabs(os.path.expanduser(self.path)) else f" (looked in {p})"
            if not p.exists():
                hint = ""
                if re.fullmatch(r"[\w.-]+/[\w.-]+", self.path):
                    hint = ("; if it is a Hugging Face id, download it first (huggingface-cli download "
                            f"{self.path} --local-dir DIR) and give path: DIR")
                fail("model", [(("path",), f"no such directory {self.path!r}{where}{hint}")])
            if not p.is_dir():
                fail("model", [(("path",), f"{self.path!r} is a file; model.path is the checkpoint directory "
                                            "(the one holding config.json)")])
            if not (p / "config.json").is_file():
                fail("model", [(("path",), f"{self.path!r} has no config.json{where}; point model.path at the "
                                            "checkpoint directory (the one holding config.json)")])
            try:  # the shape the pre-launch rules and the sim compute with: a hostile config.json fails here
                why = config_problem(load_shape(path=str(p)))
            except ValueError as e:
                why = str(e).replace(str(p / "config.json"), "config.json")
            if why:
                fail("model", [(("path",), f"{self.path!r}: {why}")])
        return self


class HardwareSpec(StrictModel):
    gpu: str = Field("h100", description="GPU kind: h100, h200, a100, l40s, ... (sim timing and memory rules)")
    gpus: int = Field(1, ge=1, le=MAX_GPUS, description="GPUs the study may use on this host or cluster")
    max_gpus_per_trial: int | None = Field(None, ge=1, le=MAX_GPUS)
    gpu_memory_gib: float | None = Field(None, gt=0, le=1024, description="override the GPU table's memory")

    @model_validator(mode="after")
    def _per_trial(self) -> "HardwareSpec":
        if self.max_gpus_per_trial is not None and self.max_gpus_per_trial > self.gpus:
            fail("hardware", [(("max_gpus_per_trial",),
                                f"max_gpus_per_trial ({self.max_gpus_per_trial}) exceeds gpus ({self.gpus})")])
        return self

    @property
    def per_trial(self) -> int:
        return self.max_gpus_per_trial or self.gpus


class NodeTypeSpec(StrictModel):
    gpu: str = Field(description="GPU kind of these nodes: h100, a100, ... (sim timing and memory rules)")
    gpus_per_node: int = Field(ge=1, le=64, description="GPUs one such node has")
    gpu_memory_gib: float | None = Field(None, gt=0, description="override the GPU table's memory")
    accelerator_type: str | None = Field(None, description="the Ray resource that marks these nodes, "
                                         "accelerator_type:<this>; default the GPU kind in capitals (H100)")

    @field_validator("gpu")
    @classmethod
    def _known_gpu(cls, v: str) -> str:
        return get_gpu(v).name

    @property
    def ray_resource(self) -> str:
        return f"accelerator_type:{self.accelerator_type or self.gpu.upper()}"


class ClusterSpec(StrictModel):
    """A study spread over a Ray cluster (docs/cluster.md)."""

    address: str | None = Field(None, description="Ray address to join (auto, host:port, ray://...); "
                                "--ray-address overrides it")
    files: Literal["object_store", "shared_dir"] = Field(
        "object_store", description="how a trial's files reach output_dir: object_store (returned through "
        "Ray with the result) or shared_dir (output_dir is one file system every node mounts at the same path)")
    span_nodes: bool = Field(False, description="a trial may need more GPUs than one node has: pipeline "
                             "parallel across nodes through the engine's own Ray executor")
    node_types: list[NodeTypeSpec] = Field(default_factory=list, description="GPU types of a heterogeneous "
                                           "cluster; with several, the GPU type is searched like a parameter")

    @field_validator("node_types")
    @classmethod
    def _types_once(cls, v: list[NodeTypeSpec]) -> list[NodeTypeSpec]:
        fail_repeats("node_types", [t.ray_resource for t in v],
                     lambda k, i: f"{k} is named twice (first at node_types[{i}]); give each type its own "
                                  "accelerator_type")
        return v


class EngineSpec(StrictModel):
    name: Literal[ENGINES]  # type: ignore[valid-type]
    command: list[str] | None = Field(None, description="how to start it, e.g. ['vllm', 'serve'] or a python path")
    version: str | None = Field(None, description="engine version whose flag mapping to use")
    extra_args: list[str] = Field(default_factory=list, description="flags passed after the mapped ones; a secret "
                                  "as ${NAME} (read from the environment at launch, never recorded)")
    env: dict[str, str] = Field(default_factory=dict,
                                description="extra environment; use ${NAME} to pass a secret by name")
    ready_timeout_s: float = Field(900.0, gt=0, le=MAX_SECONDS)

    @field_validator("version", mode="before")
    @classmethod
    def _version_text(cls, v: Any) -> Any:
        # `version: 0.26` is read by YAML as a float; a version is text
        return str(v) if isinstance(v, (int, float)) and not isinstance(v, bool) else v

    @field_validator("env", mode="before")
    @classmethod
    def _env(cls, v: Any) -> Any:
        if not isinstance(v, dict):
            return v
        out: dict[Any, Any] = {}
        errs: list[tuple[tuple, str]] = []
        for k, val in v.items():
            if isinstance(val, bool):
                errs.append(((k,), f"{describe(val)} is not text; quote the value: {k}: \"{'1' if val else '0'}\" "
                                   f"(or \"{'true' if val else 'false'}\")"))
                continue
            if isinstance(val, (int, float)):
                val = str(val)  # VAR: 1 means "1"
            out[k] = val
            if isinstance(k, str) and isinstance(val, str) and is_literal_secret(k, val):
                errs.append(((k,), f"{k} looks like a secret written into the study file; write "
                                   f"{k}: \"${{{k}}}\" and export {k} in the shell that runs servetune "
                                   "(the value is read from there at launch and never stored)"))
        if errs:
            fail("env", errs)
        return out

    @field_validator("extra_args")
    @classmethod
    def _no_literal_secret_flags(cls, v: list[str]) -> list[str]:
        # both spellings: `--api-key sk-...` and `--api-key=sk-...`
        errs = []
        for k, flag in literal_flag_secrets(v):
            name = ref_name(flag)
            errs.append(((k,), f"{flag} is given a secret written into the study file; write {flag} "
                               f"\"${{{name}}}\" and export {name} in the shell that runs servetune (the value "
                               "is read from there at launch and never stored)"))
        if errs:
            fail("extra_args", errs)
        return v


class SamplerSpec(StrictModel):
    kind: Literal["tpe", "nsga2", "random", "gp", "grid"] = "tpe"
    seed: int | None = Field(None, ge=0, le=MAX_SEED)
    startup_trials: int | None = Field(None, ge=0, le=MAX_TRIALS)
    learn_from_failures: bool = Field(
        True, description="tell failed and rejected trials to the sampler as infeasible (constraint-violating) "
                          "results with pessimistic values, so it samples fewer of their neighbours; they "
                          "never appear on the Pareto front")


class FidelitySpec(StrictModel):
    prescreen: int = Field(0, ge=0, le=1000, description="candidates the sampler proposes per launch; each is "
                                                         "scored by the sim estimator and only the most promising "
                                                         "is launched (0 or 1: off)")
    calibrate: bool = Field(True, description="scale the estimator by factors fitted on this study's measured "
                                              "trials (least squares of log(measured/estimated))")
    max_requests: int = Field(200, ge=10, le=MAX_REQUESTS,
                              description="requests per estimated scenario (cost vs fidelity)")


class QualitySpec(StrictModel):
    """The quality guardrail (docs/quality.md): after its load, every trial answers an evaluation set greedily
    with logprobs, compared with its engine's baseline; limits make a trial that drifts too far infeasible."""

    eval_set: str = Field("builtin", description="'builtin' (64 prompts shipped with servetune) or a JSONL "
                                                 "file of {prompt, id?, max_tokens?} lines")
    tasks: str | None = Field(None, description="JSONL of {prompt, answer} (lm-evaluation-harness style) scored "
                                                "after normalization; 'builtin:facts' is a small shipped set")
    task_match: Literal["contains", "exact"] = Field(
        "contains", description="a task is right when its output contains an answer (whole words), or when "
                                "its first line is one (exact)")
    max_tokens: int = Field(32, ge=1, le=4096, description="greedy tokens per prompt (an item may set its own)")
    logprobs: int = Field(10, ge=1, le=20, description="top-K logprobs per token (vLLM's default cap is 20)")
    concurrency: int = Field(1, ge=1, description="evaluation requests in flight; 1 keeps batches alike across "
                                                  "trials, so batch-dependent kernels do not pose as drift")
    timeout_s: float = Field(600.0, gt=0, description="the whole evaluation")
    request_timeout_s: float = Field(120.0, gt=0, description="one evaluation request")
    min_exact_match: float | None = Field(None, ge=0, le=1, description="share of greedy continuations equal "
                                                                        "to the baseline's")
    min_first_divergence: float | None = Field(None, ge=0, description="mean tokens before the first "
                                                                       "difference from the baseline")
    max_mean_kl: float | None = Field(None, ge=0, description="mean per-token KL(baseline ‖ trial), nats, top-K")
    max_decisive_divergence: float | None = Field(
        None, ge=0, le=1, description="share of answers whose first difference from the baseline is not a "
                                      "near-tie (see tie_margin): 0 accepts only rounding flips")
    tie_margin: float = Field(TIE_MARGIN, ge=0, description="nats: a first difference whose token the baseline ranked "
                                                     "within this of its own pick is a near-tie flip")
    max_accuracy_drop: float | None = Field(None, ge=0, le=1, description="task accuracy below the baseline's, "
                                                                          "as a fraction (0.05 = 5 points)")

    @model_validator(mode="after")
    def _files(self, info: ValidationInfo) -> "QualitySpec":
        if self.max_accuracy_drop is not None and not self.tasks:
            fail("quality", [(("max_accuracy_drop",), "max_accuracy_drop needs tasks (a JSONL of prompts with "
                                                       "expected answers, e.g. tasks: builtin:facts)")])
        base = base_dir_of(info)
        if base is None:
            return self
        for key, kind in (("eval_set", "compare"), ("tasks", "task")):
            src = getattr(self, key)
            if src is None:
                continue
            try:
                load(src, kind, self.max_tokens, base)
            except EvalSetError as e:
                fail("quality", [((key,), str(e))])
        return self


class BudgetSpec(StrictModel):
    trials: int = Field(20, ge=1, le=MAX_TRIALS)
    wall_time_s: float | None = Field(None, gt=0, le=MAX_WALL_S, description="no trial starts after this; one still "
                                      "waiting for GPUs then is queued again for a resumed run")
    parallel: int = Field(1, ge=1, le=MAX_GPUS, description="trials running at once")
    max_failures: int | None = Field(None, ge=1, le=MAX_TRIALS, description="stop after this many failed trials")
    repeats: int = Field(0, ge=0, le=20, description="re-measure the Pareto candidates this many more times "
                                                     "(fresh launches) once the search budget is spent")
    repeat_top: int = Field(3, ge=1, le=1000, description="at most this many Pareto candidates are repeated")
