"""``servetune export``: the chosen trial of a run directory as a ready deployment.

    servetune export RUN_DIR --trial best|N [--scenario S] [--objective METRIC] --format FORMAT -o DIR

The source of truth is the trial's recorded launch argv (what was measured), not a re-render: the export
keeps every flag, in order, and changes only what a deployment must change — the listen address and port,
the model path (a container sees the model where it is mounted), and ``--load-format dummy`` (random
weights are a measurement device, never a deployment; dropped with a warning). The flags are checked
against the catalog's reverse mapping (``Engine.parse_flags``): parsing the exported command back yields the
trial's engine-neutral parameters. What differs by engine (image, pip package, Helm chart, Ray Serve's
engine_kwargs) is a trait of the engine's adapter (``optimizer/engines/``).

Which trial is chosen, and the warnings about its outputs, is :mod:`~servetune.optimizer.export_choice`; the
argv taken apart and rewritten is :mod:`~servetune.optimizer.export_argv`; this module builds the deployment
context and renders the formats from ``deploy_templates/``.

Secrets: study ``engines[].env`` values written as ``${NAME}`` become references in every format (k8s
``secretKeyRef``, compose ``${NAME}`` interpolation, helm existing-secret values, a ``: ${NAME:?}`` guard in
shell scripts). Values are never resolved, so no token reaches an output file. A literal value under a
secret-looking name, or after a secret-looking flag in argv, is replaced by a reference with a warning.

A ``sim`` trial exports as what it is, the simulated engine (a real OpenAI-compatible server timed by a
roofline model): ``command``/``sim``, ``compose``, ``k8s`` and ``json``, to rehearse a deployment without a GPU.
It requests no GPU, loads its model preset (no volume), runs from an image built from a servetune checkout
(a ``Dockerfile`` is written beside the container formats), and every output says its numbers were modelled.
It never becomes a vLLM/SGLang deployment: that would carry measurements nobody took.
"""
from __future__ import annotations

import datetime
import json
import math
import re
import shlex
from dataclasses import dataclass
from importlib import resources
from importlib.metadata import version as _dist_version
from pathlib import Path
from typing import Any

import jinja2
import yaml

from servetune.optimizer import secret_refs
from servetune.optimizer.catalog import load_catalog
from servetune.optimizer.engines import engine_class, get_engine, names, simulated
from servetune.optimizer.export_argv import (
    drop_flag,
    flag_value,
    redact_args,
    set_flag,
    split_argv,
    without_measurement_flags,
)
from servetune.optimizer.export_choice import (
    QUALITY_WARNING,
    Choice,
    ExportError,
    choose_trial,
    engine_spec,
    quality_warnings,
    read_study,
)
from servetune.optimizer.quality import SUMMARY_KEYS

# the names `servetune export`'s callers and tests import from here
__all__ = ["FORMATS", "QUALITY_WARNING", "SIM_FORMATS", "Choice", "ExportError", "ExportResult", "Options",
           "choose_trial", "export", "quality_warnings", "redact_args", "render", "split_argv"]


# An engine's name as a format is its launch command (a shell script), checked to be the engine measured.
FORMATS = (*names(), "command", "compose", "k8s", "helm", "kserve", "ray-serve", "json")
REHEARSAL_FORMATS = ("command", "compose", "k8s", "json")  # the formats a simulated engine rehearses
SIM_FORMATS = (*(n for n in names() if simulated(n)), *REHEARSAL_FORMATS)  # what a simulated trial exports as
# ---------------------------------------------------------------------------------------------------------
# the deployment context
# ---------------------------------------------------------------------------------------------------------
@dataclass
class Options:
    host: str | None = None  # plain shell command's listen address (default 127.0.0.1); containers: 0.0.0.0
    port: int = 8000
    image: str | None = None
    model_path: str | None = None  # what the deployment loads (path in the container, or an HF id)
    model_host_path: str | None = None  # host directory mounted into the container (compose)
    name: str | None = None  # app / release name (DNS-1123)
    namespace: str | None = None
    secret_name: str | None = None  # k8s Secret holding ${NAME} references (key = NAME)
    pvc: str | None = None  # existing PVC with the model; default: create <name>-models
    pvc_size: str = "200Gi"
    storage_class: str | None = None
    cpu: str | None = None
    memory: str | None = None
    shm_size: str = "16Gi"
    gpu_ids: list[str] | None = None  # compose device_ids; default: count
    startup_margin: float = 2.0  # startup probe budget = ready_s * margin + 120 s
    keep_load_format: bool = False
    replicas: int = 1


def _dns_name(s: str) -> str:
    """A name valid for every object it labels: DNS-1035 (a Service must start with a letter), ≤ 53 characters
    so that suffixes such as ``-models`` / ``-secrets`` still fit in 63."""
    s = re.sub(r"[^a-z0-9-]+", "-", s.lower()).strip("-")
    if not s or not s[0].isalpha():
        s = "st-" + s
    return s[:53].rstrip("-")


def _size_gib(s: str) -> float:
    m = re.fullmatch(r"(\d+(?:\.\d+)?)\s*([KMGT]i?)?[bB]?", s.strip())
    if not m:
        return 16.0
    mult = {"K": 1 / 2**20, "Ki": 1 / 2**20, "M": 1 / 1024, "Mi": 1 / 1024, "G": 1, "Gi": 1, "T": 1024, "Ti": 1024}
    return float(m.group(1)) * mult.get(m.group(2) or "G", 1)


def build_context(run_dir: Path, choice: Choice, opts: Options) -> dict[str, Any]:
    """Everything every template needs, as plain data. No secret value is ever read."""
    study = read_study(run_dir)
    t = choice.trial
    engine = t.get("engine") or "sim"
    version = str(t.get("engine_version") or "")
    warnings = list(choice.warnings)
    try:
        eng = get_engine(engine, None, version or None)
    except ValueError as e:
        raise ExportError(f"trial {t.get('number')}: {e}") from None
    catalog = load_catalog(engine, version or None)
    version = version or catalog.version
    argv = [str(a) for a in t.get("argv") or []]
    if not argv:
        raise ExportError(f"trial {t.get('number')} has no recorded argv")
    sp = split_argv(argv, catalog)
    args = list(sp.args)
    args, argv_secrets, w = redact_args(args)
    warnings += w
    args = without_measurement_flags(args, engine)
    load_format = flag_value(args, "--load-format")
    if load_format == "dummy" and not opts.keep_load_format:
        args = drop_flag(args, "--load-format")
        warnings.append("the trial ran with --load-format dummy (random weights of the real shape); the export "
                        "loads the real checkpoint instead (--keep-load-format keeps dummy)")
    served_name = flag_value(args, catalog.served_name_flag) if catalog.served_name_flag else None
    model_rec = sp.model
    served_name = served_name or (study.get("model") or {}).get("name") or Path(model_rec).name
    name = _dns_name(opts.name or f"{study.get('name', 'servetune')}-{engine}")
    is_sim = eng.simulated
    # the sim loads a preset by name (or a directory with config.json, given as --model-path): no model volume
    container_model = opts.model_path or (model_rec if is_sim else f"/models/{Path(model_rec).name or served_name}")
    shell_model = opts.model_path or model_rec
    host_model_dir = opts.model_host_path or model_rec

    def engine_args(host: str, model: str) -> list[str]:
        a = set_flag(args, catalog.host_flag, host)
        a = set_flag(a, catalog.port_flag, str(opts.port))
        if catalog.model_flag:
            return [catalog.model_flag, model] + a
        return [model] + a

    # the command as the engine's image and pip package provide it
    base = ["python3" if c == "{python}" else c for c in catalog.command]
    if sp.base and sp.base[1:] != base[1:] and not is_sim:
        warnings.append(f"the study launched the engine as {' '.join(sp.base)!r}; the export uses "
                        f"{' '.join(base)!r} (what the engine's image and pip package provide)")

    # environment: study engines[].env; ${NAME} -> secret reference, literal secret-looking -> reference
    espec = engine_spec(study, engine)
    plain_env: dict[str, str] = {}
    secret_env: list[str] = []
    for k, v in (espec.get("env") or {}).items():
        v = "" if v is None else str(v)
        m = secret_refs.WHOLE_REF.match(v.strip())
        if m:
            secret_env.append(k)
            if m.group(1) != k:
                warnings.append(f"env {k} references ${{{m.group(1)}}}; exported as a secret reference named {k}")
        elif secret_refs.is_literal_secret(k, v):
            secret_env.append(k)
            warnings.append(f"env {k} has a literal value in the study; exported as a secret reference, not the value")
        elif "${" in v:
            secret_env.append(k)
            warnings.append(f"env {k} embeds a reference in text; exported as a secret reference named {k}")
        else:
            plain_env[k] = v
    for n in argv_secrets:
        if n not in secret_env:
            secret_env.append(n)

    gpus = int(t.get("gpus") or 1)
    hw = study.get("hardware") or {}
    ready_s = t.get("ready_s")
    ready_s = float(ready_s) if isinstance(ready_s, (int, float)) and ready_s > 0 else None
    startup_budget = int(math.ceil((ready_s or 900.0) * opts.startup_margin + 120))
    probe_period = 10
    scen = (t.get("scenarios") or {}).get(choice.scenario) or {}
    settings = scen.get("settings") or {}
    ds = (study.get("workload") or {}).get("dataset") or {}
    sla_preset = None
    for s in (study.get("workload") or {}).get("scenarios") or []:
        if (s.get("name") or s.get("kind")) == choice.scenario:
            sla = s.get("sla") if isinstance(s.get("sla"), dict) else {}
            # a preset with overrides is passed as the effective limits (settings), not as the preset
            sla_preset = sla.get("preset") if set(sla) == {"preset"} else None
    try:
        st_version = _dist_version("servetune")
    except Exception:  # noqa: BLE001 - an uninstalled checkout
        st_version = "unknown"
    if is_sim:  # the sim is servetune's own server: its version is servetune's
        version = st_version
        warnings.append("the simulated engine: this deployment rehearses the rollout with a server timed by a "
                        f"roofline model of {model_rec}; it serves no real model, and the trial's numbers were "
                        "modelled, not measured on a GPU")
    image_tmpl = opts.image or eng.image
    image = image_tmpl.format(version=version) if image_tmpl else ""
    cpu = opts.cpu or (str(max(4, 8 * gpus)) if not is_sim else "1")
    memory = opts.memory or (f"{max(32, 64 * gpus)}Gi" if not is_sim else "2Gi")

    metrics = {label: {k: v for k, v in (r.get("summary") or {}).items() if isinstance(v, (int, float))}
               for label, r in (t.get("scenarios") or {}).items()}
    ctx: dict[str, Any] = dict(
        name=name, namespace=opts.namespace, engine=engine, version=version, image=image, simulated=is_sim,
        pip_spec=eng.pip_spec(version), base_command=base,
        gpu_request=0 if is_sim else gpus, model_volume=not is_sim or container_model.startswith("/"),
        shell_argv=base + engine_args(opts.host or "127.0.0.1", shell_model),
        container_args=engine_args("0.0.0.0", container_model),
        host=opts.host or "127.0.0.1", port=opts.port, health_path="/health", metrics_path="/metrics",
        model_recorded=model_rec, container_model=container_model, model_mount_dir=str(Path(container_model).parent)
        if container_model.startswith("/") else "/models", host_model_dir=host_model_dir,
        model_is_path=container_model.startswith("/"), served_name=served_name,
        plain_env=plain_env, secret_env=secret_env,
        secret_name=opts.secret_name or f"{name}-secrets",
        gpus=gpus, gpu_kind=str(hw.get("gpu") or "h100"), gpu_ids=opts.gpu_ids,
        ready_s=ready_s, startup_budget_s=startup_budget, probe_period_s=probe_period,
        startup_failure_threshold=int(math.ceil(startup_budget / probe_period)),
        shm_size=opts.shm_size, shm_gib=_size_gib(opts.shm_size), cpu=cpu, memory=memory,
        pvc=opts.pvc, pvc_size=opts.pvc_size, storage_class=opts.storage_class, replicas=opts.replicas,
        trial=t, trial_number=t.get("number"), params=t.get("params") or {}, study_name=study.get("name"),
        scenario=choice.scenario, metric=choice.metric, direction=choice.direction, value=choice.value,
        choice_line=choice.describe(), runner_up=(choice.runner_up or {}).get("number"),
        bench=dict(kind=settings.get("kind") or choice.scenario, qps=settings.get("qps"),
                   duration_s=settings.get("duration_s"), num_requests=settings.get("num_requests"),
                   concurrency=settings.get("concurrency"),
                   input_tokens=ds.get("input_tokens"), output_tokens=ds.get("output_tokens"),
                   sla_preset=sla_preset, ttft_ms=settings.get("ttft_limit_ms"),
                   tpot_ms=settings.get("tpot_limit_ms"), num_gpus=gpus),
        metrics=metrics, servetune_version=st_version,
        exported_at=datetime.datetime.now(datetime.timezone.utc).replace(microsecond=0).isoformat(),
        run_dir=str(Path(run_dir).resolve()), warnings=warnings, catalog=catalog,
    )
    ctx["engine_kwargs"] = {}  # filled for ray-serve only (render)
    ctx["shell_argv_model"] = shell_model
    ctx["shell_lines"] = [" ".join(_shq(x) for x in g) for g in _group(ctx["shell_argv"], len(base))]
    helm_args = drop_flag(drop_flag(list(ctx["container_args"]), catalog.host_flag), catalog.port_flag)
    ctx["helm_extra_args"] = helm_args[1:] if catalog.model_flag is None else drop_flag(helm_args, catalog.model_flag)
    ctx["json_doc"] = _json_doc(ctx, choice, study)
    return ctx


def _shq(x: str) -> str:
    """Shell quoting that leaves a whole ``${NAME}`` reference expandable."""
    return f'"{x}"' if secret_refs.WHOLE_REF.match(x) else shlex.quote(x)


def _group(argv: list[str], nbase: int) -> list[list[str]]:
    """Command, then one line per flag with its values: what a reader scans in a launch script."""
    groups = [argv[:nbase]]
    for a in argv[nbase:]:
        if a.startswith("--") or len(groups) == 1:
            groups.append([a])
        else:
            groups[-1].append(a)
    return groups


def _json_doc(ctx: dict[str, Any], choice: Choice, study: dict[str, Any]) -> dict[str, Any]:
    t = choice.trial
    real = not ctx["simulated"]
    return {
        "schema": "servetune.export/1",
        "provenance": {
            "servetune_version": ctx["servetune_version"], "exported_at": ctx["exported_at"],
            "run_dir": ctx["run_dir"], "study": ctx["study_name"], "trial": ctx["trial_number"],
            "is_baseline": bool(t.get("is_baseline")), "trial_started_at": t.get("started_at"),
            "engine": ctx["engine"], "engine_version": ctx["version"],
            "gpu": ctx["gpu_kind"], "gpus": ctx["gpus"], "gpu_ids_in_study": t.get("gpu_ids"),
            "simulated": not real,
        },
        "selection": {
            "rule": ("explicit trial number" if choice.explicit else
                     f"{choice.direction} {choice.metric} in scenario {choice.scenario!r} among trials meeting "
                     "the SLA in every scenario that has one"),
            "scenario": choice.scenario, "metric": choice.metric, "direction": choice.direction,
            "value": choice.value, "eligible_trials": choice.eligible,
            "runner_up": ctx["runner_up"], "summary": ctx["choice_line"],
        },
        "params": ctx["params"],
        "launch": {
            "command": ctx["shell_argv"], "container_command": ctx["base_command"],
            "container_args": ctx["container_args"], "image": ctx["image"] or None,
            "pip": ctx["pip_spec"] if real else None, "host": ctx["host"], "port": ctx["port"],
            "health_path": ctx["health_path"], "metrics_path": ctx["metrics_path"],
            "served_model_name": ctx["served_name"], "model": ctx["shell_argv_model"],
            "env": ctx["plain_env"], "secret_env": ctx["secret_env"],
            "extra_args": redact_args([str(a) for a in engine_spec(study, ctx["engine"]).get("extra_args") or []])[0],
        },
        "measured": {
            "ready_s": ctx["ready_s"], "startup_probe_budget_s": ctx["startup_budget_s"],
            "scenarios": {label: {"summary": ctx["metrics"][label],
                                  "sla_met": r.get("sla_met"), "valid": r.get("valid"),
                                  "settings": {k: v for k, v in (r.get("settings") or {}).items()
                                               if k in ("kind", "qps", "duration_s", "num_requests", "concurrency",
                                                        "ttft_limit_ms", "tpot_limit_ms", "num_gpus")}}
                          for label, r in (t.get("scenarios") or {}).items()},
            "objectives": t.get("objectives"),
            "quality": {k: v for k, v in (t.get("quality") or {}).items()
                        if k in (*SUMMARY_KEYS, "kind", "tie_margin", "limits", "accuracy", "accuracy_reference")}
                       or None,
        },
        "warnings": ctx["warnings"],
    }


# ---------------------------------------------------------------------------------------------------------
# rendering
# ---------------------------------------------------------------------------------------------------------
_FILES = {
    "command": [("serve.sh.j2", "serve.sh"), ("bench.sh.j2", "bench.sh")],
    "compose": [("docker-compose.yaml.j2", "docker-compose.yaml"), ("bench.sh.j2", "bench.sh")],
    "k8s": [("kubernetes.yaml.j2", "kubernetes.yaml")],
    "helm": [],  # per engine below
    "kserve": [("kserve.yaml.j2", "inferenceservice.yaml")],
    "ray-serve": [("ray-serve.yaml.j2", "ray-serve.yaml")],
    "json": [("deployment.json.j2", "deployment.json")],
}


def _env():
    root = str(resources.files("servetune.deploy_templates"))
    env = jinja2.Environment(loader=jinja2.FileSystemLoader(root),
                             undefined=jinja2.StrictUndefined, keep_trailing_newline=True,
                             trim_blocks=True, lstrip_blocks=True, autoescape=False)
    env.filters["shq"] = lambda s: shlex.quote(str(s))
    env.filters["shjoin"] = lambda xs: " ".join(shlex.quote(str(x)) for x in xs)
    env.filters["yq"] = _yaml_scalar  # a YAML scalar, always quoted where it could be misread
    env.filters["tojson_"] = lambda x: json.dumps(x, indent=2, default=str, ensure_ascii=False)
    env.filters["compose_escape"] = lambda s: str(s).replace("$", "$$")
    env.filters["secret_name"] = lambda s: secret_refs.WHOLE_REF.match(str(s)).group(1)
    env.filters["toyaml"] = lambda x: yaml.safe_dump(x, sort_keys=False, default_flow_style=False).rstrip()
    env.tests["secret_ref"] = lambda s: bool(secret_refs.WHOLE_REF.match(str(s)))
    return env


def _yaml_scalar(v: Any) -> str:
    if isinstance(v, bool) or v is None or isinstance(v, (int, float)):
        return json.dumps(v)
    return json.dumps(str(v), ensure_ascii=False)  # JSON strings are valid YAML double-quoted scalars


def render(fmt: str, ctx: dict[str, Any], out_dir: Path) -> list[Path]:
    engine = ctx["engine"]
    eng = engine_class(engine)
    if fmt in names():
        if fmt != engine:
            raise ExportError(f"trial {ctx['trial_number']} ran on {engine}; --format {fmt} would launch a "
                              f"different engine than the one measured (use --format {engine} or command)")
        fmt = "command"
    real = [n for n in names() if not simulated(n)]
    if ctx["simulated"] and fmt not in SIM_FORMATS:
        raise ExportError(f"trial {ctx['trial_number']} ran on the simulated engine: it exports as "
                          f"{', '.join(SIM_FORMATS)} (a rehearsal of the deployment without a GPU); --format {fmt} "
                          f"is for {' and '.join(real)} trials. Measure the configuration on {' or '.join(real)} "
                          f"(engines: [{real[-1]}]) to deploy it with a real model.")
    if fmt == "ray-serve":
        serve = get_engine(engine, None, ctx["version"]).ray_serve_engine_kwargs(list(ctx["container_args"]))
        if serve is None:
            raise ExportError(f"Ray Serve LLM (ray.serve.llm) runs vLLM only; a trial on {eng.label()} exports as "
                              "command, compose, k8s, helm, kserve or json")
        ctx["engine_kwargs"], warned = serve
        ctx["warnings"] += warned
    files = list(_FILES[fmt])
    if ctx["simulated"] and fmt in ("compose", "k8s"):
        files.append(("Dockerfile.sim.j2", "Dockerfile"))
        ctx["checkout"] = _checkout()
        build = (f"docker build -f {Path(out_dir).resolve() / 'Dockerfile'} -t {ctx['image']} "
                 f"{ctx['checkout'] or 'SERVETUNE_CHECKOUT'}")
        ctx["build_command"] = build
        ctx["warnings"].append(f"the image {ctx['image']} is not published: build it from a servetune checkout "
                               f"first ({build})")
    if fmt == "helm":
        files = [(eng.helm_template, "values.yaml")]
    env = _env()
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    for tmpl, name in files:
        text = env.get_template(tmpl).render(**ctx)
        p = out_dir / name
        p.write_text(text, encoding="utf-8")
        if name.endswith(".sh"):
            p.chmod(0o755)
        written.append(p)
    return written


def _checkout() -> str | None:
    """The servetune source checkout this install runs from (an editable install), if there is one."""
    root = Path(str(resources.files("servetune.optimizer"))).resolve().parent
    return str(root) if (root / "pyproject.toml").is_file() else None


@dataclass
class ExportResult:
    choice: Choice
    files: list[Path]
    warnings: list[str]
    context: dict[str, Any]


def export(run_dir: str | Path, *, trial: str | int = "best", scenario: str | None = None,
           objective: str | None = None, fmt: str = "json", out_dir: str | Path = "deploy",
           options: Options | None = None) -> ExportResult:
    if fmt not in FORMATS:
        raise ExportError(f"unknown format {fmt!r} (have: {', '.join(FORMATS)})")
    run_dir = Path(run_dir)
    choice = choose_trial(run_dir, trial, scenario, objective)
    ctx = build_context(run_dir, choice, options or Options())
    files = render(fmt, ctx, Path(out_dir))
    return ExportResult(choice=choice, files=files, warnings=ctx["warnings"], context=ctx)
