"""The study's workload side: datasets, scenarios and their SLAs, warm-up, the audit, and objectives."""
from __future__ import annotations

import os
from typing import Any, Literal

from pydantic import Field, ValidationInfo, field_validator, model_validator

from servetune.loadgen.scenario_kinds import OPEN_LOOP, SCENARIOS, ScenarioKind
from servetune.loadgen.sla import SLA_PRESETS, resolve_limits
from servetune.optimizer import safe_read
from servetune.optimizer.spec_base import (
    MAX_CONCURRENCY,
    MAX_QPS,
    MAX_REQUESTS,
    MAX_SECONDS,
    MAX_SEED,
    MAX_TOKENS,
    Level,
    Rate,
    StrictModel,
    base_dir_of,
    resolve_from,
)
from servetune.optimizer.spec_errors import a_word, did_you_mean, did_you_mean_or_list, fail, num

# Objective metrics a scenario summary carries, with the direction that makes a config better.
_LATENCIES = ("ttft", "tpot", "itl", "e2e")
_STATS = ("p50", "p90", "p99", "mean")
METRICS: dict[str, str] = {
    "output_tokens_per_s": "maximize",
    "output_tokens_per_s_per_gpu": "maximize",
    "request_per_s": "maximize",
    "tokens_per_s_per_user": "maximize",
    "goodput_request_per_s": "maximize",
    **{f"{lat}_{st}_ms": "minimize" for lat in _LATENCIES for st in _STATS},
    "error_rate": "minimize",
    "usd_per_million_tokens": "minimize",
}


class DatasetSpec(StrictModel):
    kind: Literal["random", "sharegpt", "token_ids", "text_tasks"] = "random"
    input_tokens: int = Field(512, ge=1, le=MAX_TOKENS)
    output_tokens: int = Field(128, ge=1, le=MAX_TOKENS, description="random: tokens asked per request; text_tasks: "
                               "the most a request asks for (copy tasks ask for about their source's length)")
    input_range: float = Field(0.0, ge=0, lt=1, description="±fraction around input_tokens (0 = fixed)")
    output_range: float = Field(0.0, ge=0, lt=1)
    num_requests: int = Field(200, ge=1, le=MAX_REQUESTS)
    path: str | None = None
    seed: int = Field(0, ge=0, le=MAX_SEED)
    ignore_eos: bool = True
    prompt_format: Literal["auto", "text", "token_ids"] = Field(
        "auto", description="random prompts as text (the server tokenizes them inside TTFT, as for real clients) "
        "or as token ids (MLPerf's harness); auto: text when a tokenizer is found (tokenizer, else model.path), "
        "else token ids")
    tokenizer: str | None = Field(
        None, description="model directory or tokenizer.json for exact-length prompts; default model.path")
    shared_prefix_tokens: int = Field(
        0, ge=0, description="random: every prompt starts with the same this many tokens, a declared prefix-cache "
        "workload (its cache hits are expected, not a flaw of the measurement)")
    replay: bool = Field(
        False, description="a sample issued again (more requests than num_requests) resends its prompt, a "
        "declared prefix-cache workload; default false: every request is unique")
    tasks: list[Literal["rewrite", "summarize", "code_edit", "freeform"]] | None = Field(
        None, description="text_tasks: which tasks (default rewrite, summarize, code_edit: answers that reuse "
                          "their input; freeform: new writing on a topic)")
    temperature: float | None = Field(None, ge=0, le=100, description="sampling temperature sent with every request "
                                                              "(0 = greedy); default: the server's")

    @model_validator(mode="after")
    def _path(self, info: ValidationInfo) -> "DatasetSpec":
        if self.tasks is not None and self.kind != "text_tasks":
            fail("dataset", [(("tasks",), f"tasks apply to kind: text_tasks, not {self.kind}")])
        if self.tasks is not None and not self.tasks:
            fail("dataset", [(("tasks",), "an empty list of tasks")])
        if self.kind != "random" and (self.shared_prefix_tokens or self.prompt_format != "auto"):
            key = "shared_prefix_tokens" if self.shared_prefix_tokens else "prompt_format"
            fail("dataset", [((key,), f"{key} shapes random prompts; {a_word(self.kind)} dataset sends "
                                       + ("the text servetune ships" if self.kind == "text_tasks" else
                                          "the file's prompts") + " as they are")])
        if self.shared_prefix_tokens >= self.input_tokens * (1 - self.input_range):
            fail("dataset", [(("shared_prefix_tokens",), f"shared_prefix_tokens ({self.shared_prefix_tokens}) "
                                                          "must be below the shortest prompt's input_tokens")])
        if self.kind == "text_tasks":
            if self.path:
                fail("dataset", [(("path",), "a text_tasks dataset uses the text servetune ships; it has no path")])
            return self
        if self.kind != "random" and not self.path:
            fail("dataset", [(("path",), f"{a_word(self.kind)} dataset needs path (the file to read prompts from)")])
        if self.kind == "random" and self.path:
            fail("dataset", [(("path",), "a random dataset ignores path; set kind: sharegpt or token_ids "
                                          "to read prompts from the file")])
        base = base_dir_of(info)
        if self.path and base is not None:
            p = resolve_from(base, self.path)
            where = "" if os.path.isabs(os.path.expanduser(self.path)) else f" (looked in {p})"
            problem = None
            if not p.exists():
                problem = f"no such file {self.path!r}{where}"
            elif p.is_dir():
                problem = f"{self.path!r} is a directory; give the dataset file"
            elif safe_read.regular_file_problem(p):  # a FIFO would block the read below; a device never ends
                problem = f"{self.path!r} {safe_read.regular_file_problem(p)}; give the dataset file"
            else:
                try:
                    with open(p, "rb") as f:
                        if not f.read(1):
                            problem = f"{self.path!r} is empty"
                except OSError as e:
                    problem = f"cannot read {self.path!r}: {e.strerror or e}"
            if problem:
                fail("dataset", [(("path",), problem)])
        if self.tokenizer and base is not None:
            # CLI start-up time: the tokenizers library costs 8-50 ms to import (measured); most studies never need it
            from servetune.loadgen.tokenizer import find_tokenizer  # noqa: PLC0415 — CLI start-up time (above)

            if find_tokenizer(resolve_from(base, self.tokenizer)) is None:
                fail("dataset", [(("tokenizer",), f"no tokenizer.json at {self.tokenizer!r}; give the model "
                                                   "directory that holds it, or the file")])
        return self


class SLASpec(StrictModel):
    preset: str | None = Field(None, description="MLPerf limits: " + ", ".join(SLA_PRESETS))
    ttft_p99_ms: float | None = Field(None, gt=0, le=MAX_SECONDS * 1000)
    tpot_p99_ms: float | None = Field(None, gt=0, le=MAX_SECONDS * 1000)

    @field_validator("preset")
    @classmethod
    def _known(cls, v: str | None) -> str | None:
        if v is not None and v not in SLA_PRESETS:
            raise ValueError(f"unknown SLA preset {v!r}{did_you_mean_or_list(v, SLA_PRESETS)}")
        return v

    @model_validator(mode="after")
    def _some(self) -> "SLASpec":
        if self.preset is None and self.ttft_p99_ms is None and self.tpot_p99_ms is None:
            raise ValueError("an empty sla; give preset (e.g. llama3.1-8b) and/or ttft_p99_ms, tpot_p99_ms")
        return self

    def limits(self, scenario: str | None = None) -> tuple[float | None, float | None]:
        """(p99 TTFT ms, p99 TPOT ms) for a scenario of kind ``scenario``: the preset as it applies there
        (loadgen.sla's one resolution, so run and bench agree), overridden by explicit limits."""
        return resolve_limits(self.preset, scenario, self.ttft_p99_ms, self.tpot_p99_ms)


class MaxQPSSpec(StrictModel):
    """The highest arrival rate that meets the SLA, searched within one launch (loadgen.search.find_max_qps)."""

    lo: float = Field(gt=0, le=MAX_QPS, description="a rate the configuration should sustain (measured first)")
    hi: float = Field(gt=0, le=MAX_QPS, description="a rate above its capacity (measured second)")
    tolerance: float = Field(0.05, gt=0, lt=1, description="stop once the bracket is this narrow (relative)")
    max_levels: int = Field(8, ge=2, le=100, description="at most this many rates measured, lo and hi included")
    max_level_duration_s: float | None = Field(
        None, gt=0, le=MAX_SECONDS, description="a level too short to judge (its median request longer than half "
        "the level) runs once more, for 2.2× that median, when that fits in this; default 3× the scenario's duration_s")
    per_gpu: bool = Field(
        False, description="lo and hi are rates per GPU: a trial on G GPUs searches lo·G..hi·G (a sharding search "
        "then starts each trial near its own capacity instead of overloading one GPU with an 8-GPU bracket)")
    floor: float | None = Field(
        None, gt=0, description="when lo is not valid, the rate is halved down to this before the trial is called "
        "'SLA missed' (so every configuration that serves at all gets a capacity); default lo/16, four halvings "
        "at most, each one more level; floor: lo turns the halving off")

    @model_validator(mode="after")
    def _order(self) -> "MaxQPSSpec":
        if self.hi <= self.lo:
            fail("max_qps", [(("hi",), f"hi ({num(self.hi)}) must be above lo ({num(self.lo)})")])
        if self.floor is not None and self.floor > self.lo:
            fail("max_qps", [(("floor",), f"floor ({num(self.floor)}) must be at most lo ({num(self.lo)}): it is "
                                           "the lowest rate tried when lo is not valid")])
        return self


def rate_bracket(max_qps: dict[str, Any], gpus: int) -> tuple[float, float]:
    """The (lo, hi) a trial on ``gpus`` GPUs searches, from a dumped :class:`MaxQPSSpec`."""
    scale = gpus if max_qps.get("per_gpu") else 1
    return max_qps["lo"] * scale, max_qps["hi"] * scale


def rate_floor(max_qps: dict[str, Any], gpus: int) -> float | None:
    """The lowest rate a trial on ``gpus`` GPUs tries when lo is not valid (None: the search's default)."""
    floor = max_qps.get("floor")
    return None if floor is None else floor * (gpus if max_qps.get("per_gpu") else 1)


class ScenarioSpec(StrictModel):
    kind: Literal[SCENARIOS]  # type: ignore[valid-type]  # the registered kinds (loadgen.scenario_kinds)
    name: str | None = Field(None, pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]*$", max_length=64,
                             description="defaults to kind; objectives refer to it")
    qps: Rate | list[Rate] | None = Field(
        None, description="server/interactive: Poisson arrival rate; a list is a load sweep within one launch "
                          "(ascending; it stops at the first rate that misses the SLA)")
    concurrency: Level | list[Level] | None = Field(
        None, description="concurrency scenario: requests kept outstanding (closed loop); a list is a sweep within "
                          "one launch (ascending; output tokens/s/GPU against tokens/s/user at each level; it "
                          "stops at the first level that misses the SLA)")
    max_qps: MaxQPSSpec | None = Field(
        None, description="server/interactive, instead of qps: search the highest rate that meets the SLA "
                          "within one launch (bracket lo..hi, then narrow it to tolerance)")
    duration_s: float | None = Field(None, gt=0, le=MAX_SECONDS, description="minimum scheduled duration")
    num_requests: int | None = Field(None, ge=1, le=MAX_REQUESTS, description="defaults to the dataset size")
    max_connections: int | None = Field(None, ge=1, le=MAX_CONCURRENCY,
                                        description="client-side cap on outstanding requests (reported)")
    warmup_requests: int = Field(0, ge=0, le=MAX_REQUESTS)
    timeout_s: float = Field(600.0, gt=0, le=MAX_SECONDS, description="the whole scenario never runs past this")
    sla: SLASpec | None = None
    dataset: DatasetSpec | None = Field(
        None, description="this scenario's prompts, instead of workload.dataset (e.g. a copy-heavy and a "
                          "free-writing workload measured on the same launch)")
    min_keep_up: float | None = Field(
        0.7, ge=0, le=1, description="server/interactive: departures ÷ arrivals over the second half of the "
        "schedule below this (beyond Poisson noise) make a run invalid, and so does a run shorter than twice "
        "its median request lifetime; null turns both checks off (see loadgen/validity.py)")

    @model_validator(mode="after")
    def _rate(self) -> "ScenarioSpec":
        drive = ScenarioKind.get(self.kind).drive
        if self.max_qps is not None:
            if drive != "arrivals":
                fail("scenario", [(("max_qps",), f"max_qps searches an arrival rate: it applies to "
                                                  f"{' and '.join(OPEN_LOOP)} scenarios, not {a_word(self.kind)} one")])
            if self.qps is not None:
                fail("scenario", [(("qps",), "give qps (fixed rates) or max_qps (a search for the highest "
                                              "valid rate), not both")])
            if self.sla is None:
                fail("scenario", [(("max_qps",), "max_qps needs an sla: the search is for the highest rate "
                                                  "that meets it")])
        elif drive == "arrivals" and self.qps is None:
            fail("scenario", [(("qps",), f"{a_word(self.kind)} scenario needs qps (requests per second), or "
                                          f"max_qps to search the highest rate that meets the SLA")])
        rates = self.qps if isinstance(self.qps, list) else ([] if self.qps is None else [self.qps])
        if isinstance(self.qps, list) and not self.qps:
            fail("scenario", [(("qps",), "an empty list of rates")])
        for i, r in enumerate(rates):
            if r <= 0:
                fail("scenario", [(("qps",), f"rates must be above 0 (got {r:g})")])
        if rates != sorted(rates) or len(set(rates)) != len(rates):
            fail("scenario", [(("qps",), "list the sweep's rates in ascending order, each once")])
        if drive == "closed_loop":
            levels = self.concurrency if isinstance(self.concurrency, list) else (
                [] if self.concurrency is None else [self.concurrency])
            if not levels:
                fail("scenario", [(("concurrency",), "a concurrency scenario needs concurrency (requests kept "
                                                      "outstanding), one number or an ascending list")])
            if any(c < 1 for c in levels):
                fail("scenario", [(("concurrency",), "concurrency levels must be at least 1")])
            if levels != sorted(levels) or len(set(levels)) != len(levels):
                fail("scenario", [(("concurrency",), "list the sweep's levels in ascending order, each once")])
            if self.qps is not None:
                fail("scenario", [(("qps",), "a concurrency scenario sends the next request when one finishes; "
                                              "qps has no meaning there")])
        elif self.concurrency is not None:
            closed = ", ".join(ScenarioKind.where(drive="closed_loop"))
            fail("scenario", [(("concurrency",), f"concurrency applies to kind: {closed}, not {self.kind} "
                                                  "(max_connections caps the others)")])
        if drive in ("all_at_once", "one_at_a_time") and self.qps is not None:
            fail("scenario", [(("qps",), f"qps has no meaning for {a_word(self.kind)} scenario "
                                          "(it sends as fast as it can); use kind: server for a fixed rate")])
        return self

    @property
    def label(self) -> str:
        return self.name or self.kind


class WarmupSpec(StrictModel):
    """Warm-up before a launch's first measured level (optimizer/warmup.py)."""

    enabled: bool = Field(True, description="warm the engine across the batch sizes the levels will reach "
                          "before measuring, in rounds until one shows no new kernel compilation")
    max_s: float = Field(300.0, gt=0, description="no warm-up round starts once this many seconds are spent "
                         "(also the bound of the warm-up before an audit re-run)")
    max_concurrency: int | None = Field(
        None, ge=1, description="top of the concurrency ramp; default: the engine's batch limit "
        "(max_concurrency) or the most requests a level keeps in flight, whichever is smaller")


class AuditSpec(StrictModel):
    """The engine-side audit of every measured level (loadgen/audit.py)."""

    enabled: bool = Field(True, description="compare each level with the engine's /metrics and log: token "
                          "counts, prefix-cache hits, compilation during the level")
    max_prefix_cache_hit_fraction: float | None = Field(
        0.01, ge=0, le=1, description="prefix-cache hits above this fraction of the prompt tokens make a level "
        "invalid; null for a workload that shares prefixes on purpose (hits are then what it measures)")
    rerun: bool = Field(True, description="run a level whose audit fails once more after more warm-up (the "
                        "re-run replaces it; one that fails again is reported as contaminated)")


class WorkloadSpec(StrictModel):
    dataset: DatasetSpec = Field(default_factory=DatasetSpec)
    scenarios: list[ScenarioSpec] = Field(min_length=1)
    warmup: WarmupSpec = Field(default_factory=WarmupSpec, description="warm-up before a launch's first measured "
                               "level: rounds of a concurrency ramp until one compiles nothing (issue 15)")
    audit: AuditSpec = Field(default_factory=AuditSpec, description="every measured level checked against the "
                             "engine's own /metrics and log: token counts, prefix-cache hits, compilation")

    def audit_settings(self) -> dict[str, Any]:
        """The audit as trials apply it: a dataset that declares prompt reuse (a shared prefix, or replay)
        expects prefix-cache hits, so the hit rule is off there; everywhere else a hit is a flaw."""
        audit = self.audit.model_dump()
        if self.dataset.shared_prefix_tokens or self.dataset.replay:
            audit["max_prefix_cache_hit_fraction"] = None
        return audit

    @model_validator(mode="before")
    @classmethod
    def _none_dataset(cls, v: Any) -> Any:
        if isinstance(v, dict) and "dataset" in v and v["dataset"] is None:
            v = {k: x for k, x in v.items() if k != "dataset"}
        return v

    @model_validator(mode="after")
    def _unique(self) -> "WorkloadSpec":
        errs: list[tuple[tuple, str]] = []
        first: dict[str, int] = {}
        for j, s in enumerate(self.scenarios):
            if s.label in first:
                where = "name" if s.name else "kind"
                errs.append((("scenarios", j, where), f"two scenarios are named {s.label!r} (the first is "
                                                      f"scenarios[{first[s.label]}]); give one a different name:"))
            else:
                first[s.label] = j
        # An interactive scenario is the server scenario with tighter latency limits (MLPerf); looser ones
        # almost always mean the presets were swapped.
        def category(s: ScenarioSpec) -> str | None:
            kind = ScenarioKind.get(s.kind)
            return kind.sla_category if kind.open_loop and s.sla else None

        servers = [(s, s.sla.limits(s.kind)) for s in self.scenarios if s.sla and category(s) == "server"]
        for j, s in enumerate(self.scenarios):
            if not s.sla or category(s) != "interactive":
                continue
            ttft, tpot = s.sla.limits(s.kind)
            for srv, (sttft, stpot) in servers:
                looser = [f"{n} {num(a)} ms > {num(b)} ms" for n, a, b in
                          (("ttft_p99", ttft, sttft), ("tpot_p99", tpot, stpot))
                          if a is not None and b is not None and a > b]
                if looser:
                    errs.append((("scenarios", j, "sla"),
                                 f"interactive limits are looser than those of server scenario {srv.label!r} "
                                 f"({', '.join(looser)}); an interactive scenario is the stricter one "
                                 "(e.g. preset llama3.1-8b-interactive) - were the SLAs swapped?"))
                    break
        if errs:
            fail("workload", errs)
        return self


class ObjectiveSpec(StrictModel):
    metric: str
    scenario: str | None = Field(None, description="scenario name; defaults to the first scenario")
    direction: Literal["maximize", "minimize"] | None = Field(
        None, description="defaults to the metric's natural direction (throughput up, latency/errors/cost down)")

    @field_validator("metric")
    @classmethod
    def _known(cls, v: str) -> str:
        if v not in METRICS:
            raise ValueError(f"unknown metric {v!r}{did_you_mean(v, METRICS)}; metrics are "
                             "output_tokens_per_s, output_tokens_per_s_per_gpu, request_per_s, "
                             "tokens_per_s_per_user, goodput_request_per_s, {ttft,tpot,itl,e2e}_{p50,p90,p99,mean}_ms, "
                             "error_rate, usd_per_million_tokens")
        return v

    @field_validator("direction")
    @classmethod
    def _dir(cls, v: str | None, info: ValidationInfo) -> str:
        metric = info.data.get("metric")
        natural = METRICS.get(metric) if metric else None
        if v is None:
            return natural or "maximize"
        if natural and v != natural:
            better = "higher" if natural == "maximize" else "lower"
            raise ValueError(f"to {v} {metric} would prefer the worst configs ({better} is better); "
                             f"use direction: {natural} or leave direction out")
        return v
