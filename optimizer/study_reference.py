"""The study file's reference, generated from its pydantic schema (``optimizer/spec.py``).

    # rewrite docs/study-file.md and search_spaces/study.schema.json:
    python -m servetune.optimizer.study_reference
    # exit 1 if either is out of date (tests/test_study_reference.py):
    python -m servetune.optimizer.study_reference --check

``docs/study-file.md`` lists every key with its type, default, meaning and an example (taken from the example
studies where one uses the key); ``search_spaces/study.schema.json`` is a JSON Schema editors use to complete and
check study files (the examples name it in a ``# yaml-language-server: $schema=`` line). Both come from the same
models the loader validates with, so neither can drift from what ``servetune run`` accepts.
"""
from __future__ import annotations

import argparse
import copy
import json
import sys
import types
import typing
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel
from pydantic_core import PydanticUndefined

from servetune.optimizer.catalog import parameters
from servetune.optimizer.perfmodel.model_shapes import PRESETS
from servetune.optimizer.spec import ENGINES, METRICS, SLA_PRESETS, StudySpec
from servetune.optimizer.spec_errors import model_in

ROOT = Path(__file__).resolve().parent.parent
DOC = ROOT / "docs" / "study-file.md"
SCHEMA = ROOT / "search_spaces" / "study.schema.json"
EXAMPLES = ROOT / "search_spaces" / "examples"
SCHEMA_URL = "https://servetune.dev/study.schema.json"  # the schema's $id; editors use the relative path

# Examples for keys no example study uses (each a YAML value, as one would write it).
EXTRA_EXAMPLES = {
    "storage": "postgresql://optuna@db.internal/studies",
    "output_dir": "runs/llama8b-h100",
    "cost_per_gpu_hour": "2.5",
    "host": "0.0.0.0",
    "seed": "1",
    "baseline": "false",
    "model.name": "llama8b",
    "model.load_format": "dummy",
    "engines[].command": "[/opt/vllm/bin/vllm, serve]",
    "engines[].version": "\"0.33.0\"",
    "engines[].extra_args": "[--api-key, \"${API_KEY}\"]",
    "engines[].env": "{HF_TOKEN: \"${HF_TOKEN}\"}",
    "hardware.gpu_memory_gib": "40",
    "workload.dataset.path": "data/sharegpt.json",
    "workload.dataset.input_range": "0.2",
    "workload.dataset.output_range": "0.2",
    "workload.dataset.ignore_eos": "false",
    "workload.dataset.seed": "1",
    "workload.scenarios[].name": "server-strict",
    "workload.scenarios[].concurrency": "[1, 4, 16, 64]",
    "workload.scenarios[].num_requests": "500",
    "workload.scenarios[].max_connections": "256",
    "workload.scenarios[].timeout_s": "900",
    "workload.scenarios[].min_keep_up": "null",
    "workload.scenarios[].sla.ttft_p99_ms": "500",
    "workload.scenarios[].sla.tpot_p99_ms": "30",
    "workload.scenarios[].max_qps.tolerance": "0.1",
    "workload.scenarios[].max_qps.max_level_duration_s": "120",
    "sampler.learn_from_failures": "false",
    "budget.max_failures": "5",
    "budget.repeats": "2",
    "budget.repeat_top": "2",
    "fidelity.prescreen": "8",
    "fidelity.calibrate": "false",
    "fidelity.max_requests": "100",
}

_SECTIONS = [  # (heading, dotted prefix of the keys it holds)
    ("Top level", ""), ("model", "model"), ("engines[]", "engines[]"), ("hardware", "hardware"),
    ("workload", "workload"), ("workload.dataset", "workload.dataset"),
    ("workload.scenarios[]", "workload.scenarios[]"),
    ("workload.scenarios[].sla", "workload.scenarios[].sla"),
    ("workload.scenarios[].max_qps", "workload.scenarios[].max_qps"), ("workload.warmup", "workload.warmup"),
    ("workload.audit", "workload.audit"), ("quality", "quality"), ("objectives[]", "objectives[]"),
    ("sampler", "sampler"), ("budget", "budget"), ("fidelity", "fidelity"),
    ("cluster", "cluster"), ("cluster.node_types[]", "cluster.node_types[]"),
]


# -- the models, walked ------------------------------------------------------------------------------------------

def _type(ann: Any) -> str:
    origin = typing.get_origin(ann)
    args = typing.get_args(ann)
    if ann is type(None):
        return "null"
    if origin is typing.Literal:
        return " \\| ".join(f"`{a}`" for a in args)
    if origin in (typing.Union, types.UnionType):
        parts = [_type(a) for a in args if a is not type(None)]
        return " or ".join(parts) + (" or null" if type(None) in args else "")
    if origin is list:
        inner = _type(args[0]) if args else "any"
        return f"list of {inner}"
    if origin is dict:
        return "mapping"
    if isinstance(ann, type) and issubclass(ann, BaseModel):
        return "mapping"
    names = {str: "text", int: "whole number", float: "number", bool: "true/false"}
    return names.get(ann, getattr(ann, "__name__", str(ann)))


def _default(field) -> str:
    if field.is_required():
        return "**required**"
    if field.default_factory is not None:
        v = field.default_factory()
        if isinstance(v, BaseModel):
            return "(each key's default)"
        return f"`{json.dumps(v)}`"
    v = field.default
    if v is None or v is PydanticUndefined:
        return "—"
    return f"`{json.dumps(v)}`"


def fields(model: type[BaseModel], prefix: str = "") -> list[tuple[str, Any, type[BaseModel]]]:
    """Every (dotted key, field, owning model) under ``model``, parents before children."""
    out = []
    for name, f in model.model_fields.items():
        if f.exclude:  # internal (StudySpec.source): never read from a file
            continue
        key = f"{prefix}.{name}" if prefix else name
        out.append((key, f, model))
        sub = model_in(f.annotation)
        if sub is not None:
            is_list = typing.get_origin(f.annotation) is list or any(
                typing.get_origin(a) is list for a in typing.get_args(f.annotation))
            out += fields(sub, key + ("[]" if is_list else ""))
    return out


# -- examples from the example studies ---------------------------------------------------------------------------

def _walk(x: Any, path: str, out: dict[str, tuple[Any, str]], source: str) -> None:
    if isinstance(x, dict):
        for k, v in x.items():
            key = f"{path}.{k}" if path else str(k)
            out.setdefault(key, (v, source))
            if key != "search":
                _walk(v, key, out, source)
    elif isinstance(x, list) and x and all(isinstance(v, dict) for v in x):
        for v in x:
            _walk(v, path + "[]", out, source)


def examples() -> dict[str, tuple[Any, str]]:
    out: dict[str, tuple[Any, str]] = {}
    for p in sorted(EXAMPLES.glob("*.yaml"), key=lambda p: (p.name != "quickstart.yaml", p.name)):
        _walk(yaml.safe_load(p.read_text()), "", out, p.name)
    # engines: [sim] is a list of names; the mapping form's keys come from the extra examples
    return out


def _inline(v: Any) -> str:
    text = yaml.safe_dump(v, default_flow_style=True, sort_keys=False, width=10_000).strip()
    return text.removesuffix("\n...").removesuffix("...").strip()


# -- the Markdown reference --------------------------------------------------------------------------------------

def markdown() -> str:
    ex = examples()
    rows = fields(StudySpec)
    lines = [
        "# The study file",
        "",
        "<!-- Generated by `python -m servetune.optimizer.study_reference` from the pydantic models in",
        "     optimizer/spec.py; edit those, not this file (tests/test_study_reference.py checks it is current). -->",
        "",
        "A study file is YAML: one mapping whose keys are listed below. `servetune validate STUDY` checks one "
        "(every error reads `FILE:LINE: path.to.key: message`), `servetune plan STUDY` says what a run would do. "
        "Editors that speak the yaml-language-server protocol complete and check study files against "
        "[`search_spaces/study.schema.json`](../search_spaces/study.schema.json): start the file with",
        "",
        "```yaml",
        "# yaml-language-server: $schema=PATH/TO/servetune/search_spaces/study.schema.json",
        "```",
        "",
        "Relative paths (`model.path`, `workload.dataset.path`) are read from the study file's directory. Values "
        "written `${NAME}` in `engines[].env` are read from the environment at launch and never stored. The "
        "example column quotes the example studies in `search_spaces/examples/` where one uses the key.",
        "",
        "A minimal study (the quickstart, `search_spaces/examples/quickstart.yaml`, is a complete one):",
        "",
        "```yaml",
        "name: my-study",
        "model: {preset: llama-3.1-8b}",
        "engines: [sim]",
        "workload:",
        "  scenarios: [{kind: offline}]",
        "objectives: [{metric: output_tokens_per_s_per_gpu}]",
        "```",
    ]
    by_key = {k: (f, m) for k, f, m in rows}
    for heading, prefix in _SECTIONS:
        keys = [k for k, _, _ in rows if (k.rsplit(".", 1)[0] if "." in k else "") == prefix]
        if not keys:
            continue
        lines += ["", f"## {heading}" if prefix else "## Top level", ""]
        if prefix:
            f, m = by_key.get(prefix.removesuffix("[]"), (None, None))
            if f is not None and f.description:
                lines += [f.description[0].upper() + f.description[1:] + ".", ""]
        lines += ["| key | type | default | meaning | example |", "|---|---|---|---|---|"]
        for k in keys:
            f, _ = by_key[k]
            desc = (f.description or _MEANING.get(k, "")).replace("|", "\\|").replace("\n", " ")
            if k == "workload.scenarios[].sla.preset":
                desc = "MLPerf latency limits by name: " + ", ".join(f"`{p}`" for p in SLA_PRESETS)
            if k == "objectives[].metric":
                desc = "what to optimize; one of " + ", ".join(f"`{m}`" for m in METRICS)
            if model_in(f.annotation) is not None:
                eg = "see below"  # its keys have a section of their own
            elif k in ex and len(_inline(ex[k][0])) <= 90:
                value, src = ex[k]
                eg = f"`{_inline(value)}` ({src})"
            elif k in EXTRA_EXAMPLES:
                eg = f"`{EXTRA_EXAMPLES[k]}`"
            else:
                eg = ""
            typ = "list of names or mappings" if k == "engines" else _type(f.annotation)
            lines.append(f"| `{k.rsplit('.', 1)[-1] if prefix else k}` | {typ} | {_default(f)} | "
                         f"{desc} | {eg} |")
    lines += ["", "## search", "",
              "`search:` maps engine-neutral parameters (`search_spaces/parameters.yaml`) to the values to try: a "
              "list (`[1, 2, 4]`), a range (`{low: 16, high: 1024, log: true}`, optionally `step:`), or one value "
              "(fixed for every trial). Each engine's catalog (`search_spaces/<engine>.yaml`) maps them to flags; "
              "a value the engine's catalog does not accept is refused before launch. An empty `search:` searches "
              "the first engine's catalog domains. A parameter with `requires:` is searched only when its parent "
              "is on.", "",
              "| parameter | type | requires | meaning |", "|---|---|---|---|"]
    for name, p in parameters().items():
        requires = f"`{p['requires']}`" if p.get("requires") else ""
        meaning = str(p.get("help", "")).replace("|", "\\|")
        lines.append(f"| `{name}` | {p.get('type', '')} | {requires} | {meaning} |")
    return "\n".join(lines) + "\n"


_MEANING = {  # keys whose Field has no description
    "name": "the study's name: its run directory (runs/NAME) and Optuna study name; letters, digits, '.', '_', '-'",
    "model": "the model: a built-in preset or a checkpoint directory",
    "engines": "the engines to search over; a name (`sim`, `vllm`, `sglang`) or a mapping with the keys below",
    "hardware": "the GPUs the study may use",
    "search": "engine-neutral parameters and the values to try (see [search](#search))",
    "workload": "what is measured: the dataset and the scenarios",
    "objectives": "what to optimize; several make a Pareto front",
    "sampler": "how Optuna picks the next configuration",
    "budget": "how much to spend",
    "fidelity": "the estimator's pre-screen of candidates before launch",
    "seed": "seed of the arrival schedules and samples",
    "engines[].name": "`sim` (the built-in simulated server), `vllm` or `sglang`",
    "workload.dataset": "the prompts: random tokens of given lengths, or a file",
    "workload.scenarios": "MLPerf-style scenarios, measured in order in each trial's one launch",
    "workload.scenarios[].kind": "offline (all at once), server / interactive (Poisson arrivals at qps), "
                                 "single_stream (one at a time), concurrency (closed loop)",
    "workload.scenarios[].sla": "p99 latency limits: a preset and/or explicit limits",
    "workload.dataset.kind": "`random` (token lengths below), `sharegpt` (a ShareGPT JSON file) or `token_ids`",
    "workload.dataset.input_tokens": "prompt length in tokens (random)",
    "workload.dataset.output_tokens": "output length in tokens (random; ignore_eos keeps it exact)",
    "workload.dataset.num_requests": "prompts in the dataset",
    "workload.dataset.path": "the dataset file (sharegpt, token_ids)",
    "workload.dataset.output_range": "±fraction around output_tokens (0 = fixed)",
    "workload.scenarios[].sla.ttft_p99_ms": "p99 time-to-first-token limit in ms (overrides the preset's)",
    "workload.scenarios[].sla.tpot_p99_ms": "p99 time-per-output-token limit in ms (overrides the preset's)",
    "workload.dataset.seed": "seed of the random prompts",
    "workload.dataset.ignore_eos": "ask the server to keep generating to output_tokens",
    "workload.scenarios[].warmup_requests": "requests sent before the measured ones, drained and left out",
    "objectives[].metric": "what to optimize",
    "sampler.kind": "tpe (default), nsga2, random, gp (needs PyTorch) or grid",
    "sampler.seed": "the sampler's seed (default: the study's seed)",
    "sampler.startup_trials": "random trials before TPE models the space",
    "budget.trials": "trials to measure (rejected configurations do not count)",
    "hardware.max_gpus_per_trial": "the most GPUs one trial may take (default: hardware.gpus)",
    "engines[].ready_timeout_s": "seconds an engine may take to answer /health",
    "cost_per_gpu_hour": "price of a GPU-hour, for the usd_per_million_tokens metric",
    "workload.scenarios[].max_qps.lo": "a rate the configuration should sustain (measured first)",
}


# -- the JSON Schema ---------------------------------------------------------------------------------------------

def _domain_schema(ptype: str) -> dict[str, Any]:
    scalar = {"int": {"type": ["integer", "null"]}, "float": {"type": ["number", "null"]},
              "bool": {"type": ["boolean", "string", "null"]}, "str": {"type": ["string", "boolean", "null"]}}
    one = scalar.get(ptype, {})
    out: dict[str, Any] = {"anyOf": [{"type": "array", "minItems": 1, "items": one}, one]}
    if ptype in ("int", "float"):
        num = "integer" if ptype == "int" else "number"
        out["anyOf"].insert(1, {"type": "object", "additionalProperties": False, "required": ["low", "high"],
                                "properties": {"low": {"type": num}, "high": {"type": num},
                                               "step": {"type": num, "exclusiveMinimum": 0},
                                               "log": {"type": "boolean"}}})
    return out


def schema() -> dict[str, Any]:
    s = copy.deepcopy(StudySpec.model_json_schema())
    props, defs = s["properties"], s["$defs"]
    props.pop("source", None)
    s.update({"$schema": "https://json-schema.org/draft/2020-12/schema", "$id": SCHEMA_URL,
              "title": "servetune study file", "description": "docs/study-file.md"})
    # what the loader's `before` validators accept beyond the models' own shapes
    props["engines"]["items"] = {"anyOf": [{"$ref": "#/$defs/EngineSpec"}, {"enum": list(ENGINES)}]}
    for k in ("hardware", "search", "sampler", "budget", "fidelity"):
        props[k] = {"anyOf": [props[k], {"type": "null"}]}
    version = defs["EngineSpec"]["properties"]["version"]
    defs["EngineSpec"]["properties"]["version"] = {"anyOf": [{"type": "string"}, {"type": "number"}, {"type": "null"}],
                                                   "default": None, "title": "Version",
                                                   "description": version.get("description", "")}
    defs["EngineSpec"]["properties"]["env"]["additionalProperties"] = {"type": ["string", "number"]}
    defs["WorkloadSpec"]["properties"]["dataset"] = {"anyOf": [{"$ref": "#/$defs/DatasetSpec"}, {"type": "null"}]}
    defs["ObjectiveSpec"]["properties"]["metric"] = {"enum": list(METRICS), "title": "Metric"}
    defs["SLASpec"]["properties"]["preset"] = {"anyOf": [{"enum": list(SLA_PRESETS)}, {"type": "null"}],
                                               "default": None, "title": "Preset"}
    defs["ModelSpec"]["properties"]["preset"] = {"anyOf": [{"enum": list(PRESETS)}, {"type": "null"}],
                                                 "default": None, "title": "Preset",
                                                 "description": "built-in shape"}
    params = parameters()
    search = {"type": "object", "additionalProperties": False,
              "properties": {n: {**_domain_schema(p.get("type", "")), "description": str(p.get("help", ""))}
                             for n, p in params.items()}}
    props["search"] = {"anyOf": [search, {"type": "null"}], "description": "engine-neutral parameters and the "
                       "values to try: a list, a {low, high} range, or one value"}
    for key, prop in props.items():
        if isinstance(prop, dict) and "description" not in prop and key in _MEANING:
            prop["description"] = _MEANING[key]
    return s


def schema_text() -> str:
    return json.dumps(schema(), indent=1, ensure_ascii=False) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m servetune.optimizer.study_reference",
                                 description=__doc__.split("\n\n")[0])
    ap.add_argument("--check", action="store_true", help="exit 1 if docs/study-file.md or the schema is out of date")
    args = ap.parse_args(argv)
    stale = []
    for path, text in ((DOC, markdown()), (SCHEMA, schema_text())):
        current = path.read_text(encoding="utf-8") if path.exists() else None
        if current != text:
            stale.append(path)
            if not args.check:
                path.write_text(text, encoding="utf-8")
    if args.check and stale:
        print("out of date (run python -m servetune.optimizer.study_reference): "
              + ", ".join(str(p.relative_to(ROOT)) for p in stale), file=sys.stderr)
        return 1
    for p in stale:
        print(f"wrote {p.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
