"""``servetune rayjob``: a study as a KubeRay RayJob (docs/cluster.md).

    servetune rayjob study.yaml --image registry/servetune-vllm:0.26 --model-claim models --workers 2 -o deploy/

Writes one manifest: a ConfigMap holding the study file and a RayJob whose Ray cluster has a GPU-less head (the
driver runs there) and one worker group per GPU type (``cluster.node_types``, else ``hardware.gpu``); the model
claim is mounted read-only at the same path on every pod, and ``${NAME}`` references of the study (the storage
password, engine tokens) come from a Secret, never from the manifest.
"""
from __future__ import annotations

import argparse
import json
import re
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path, PurePosixPath
from typing import Any

from servetune.optimizer.export import _env
from servetune.optimizer.secret_refs import ENV_REF as _REF
from servetune.optimizer.secret_refs import is_literal_secret


class RayJobError(ValueError):
    pass


def _dns(s: str) -> str:
    out = re.sub(r"[^a-z0-9-]+", "-", s.lower()).strip("-")
    return (out or "servetune")[:50].rstrip("-")


def build_context(study_path: Path, opts: argparse.Namespace) -> dict[str, Any]:
    # spec's pydantic models would add ~0.15 s to every CLI command, which all build this command's parser
    from servetune.optimizer.spec import load_study  # noqa: PLC0415 — start-up, measured

    spec = load_study(study_path)
    text = study_path.read_text(encoding="utf-8")
    warnings: list[str] = []
    if spec.model.path:
        model = PurePosixPath(spec.model.path)
        if not model.is_absolute():
            raise RayJobError(f"model.path {spec.model.path!r} is relative; on a cluster every pod mounts the "
                              "model at one absolute path: give that path in the study")
        mount = opts.model_mount or str(model.parent)
        if not (model == PurePosixPath(mount) or PurePosixPath(mount) in model.parents):
            raise RayJobError(f"model.path {model} is not under --model-mount {mount}")
    else:
        mount = opts.model_mount or "/models"
        warnings.append(f"model.preset {spec.model.preset}: the engine downloads nothing (HF_HUB_OFFLINE=1); "
                        "a real engine needs model.path on the claim")
    if spec.workload.dataset.path and not PurePosixPath(spec.workload.dataset.path).is_absolute():
        warnings.append(f"workload.dataset.path {spec.workload.dataset.path} is relative: it is read next to "
                        "/study/study.yaml on the head")
    if spec.cluster.files == "shared_dir":
        warnings.append("cluster.files is shared_dir: output_dir must be a ReadWriteMany volume mounted on "
                        "every pod; this manifest mounts the results claim on the head only")
    # the driver (head) opens the storage; the engines (workers) get their own references
    head_env = sorted({m.group(1) for m in _REF.finditer(spec.storage or "")})
    worker_env = sorted({m.group(1) for e in spec.engines for v in e.env.values() for m in _REF.finditer(v)})
    literal = [f"{e.name}.env.{k}" for e in spec.engines for k, v in e.env.items()
               if is_literal_secret(k, v)]
    if literal:
        raise RayJobError(f"{', '.join(literal)} hold(s) a literal secret; write ${{NAME}} and put NAME in the "
                          "Secret")
    name = _dns(opts.name or spec.name)
    results_mount = "/results"
    entry = ["servetune", "run", "/study/study.yaml", "--ray-address", "auto", "--output-dir",
             f"{results_mount}/{spec.name}"]
    types: list[Any] = list(spec.cluster.node_types)  # NodeTypeSpec; None below: the study's one GPU type
    per_gpu_cpu, per_gpu_mem = opts.cpu_per_gpu, opts.memory_per_gpu_gib
    groups = []
    for t in types or [None]:
        gpus = t.gpus_per_node if t else opts.gpus_per_worker
        groups.append({"name": _dns(t.gpu if t else "gpu"), "gpus": gpus, "replicas": opts.workers,
                       "cpu": str(per_gpu_cpu * gpus), "memory": f"{per_gpu_mem * gpus}Gi",
                       # the type's Ray resource, as the study's placement asks for it
                       "resources": json.dumps({t.ray_resource: 1}) if t else ""})
    try:
        st_version = version("servetune")
    except PackageNotFoundError:
        st_version = "dev"
    return dict(name=name, namespace=opts.namespace, study_name=spec.name, study_text=text, image=opts.image,
                ray_version=opts.ray_version or version("ray"), groups=groups, entrypoint=entry,
                model_claim=opts.model_claim, model_mount=mount, results_claim=opts.results_claim,
                results_mount=results_mount, secret_name=opts.secret_name or f"{name}-secrets",
                head_env=head_env, worker_env=worker_env, shm_size=opts.shm_size, head_cpu=opts.head_cpu,
                head_memory=opts.head_memory,
                ttl_s=opts.ttl_s, deadline_s=opts.deadline_s, warnings=warnings, servetune_version=st_version)


def render(ctx: dict[str, Any], out_dir: Path) -> Path:
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / "rayjob.yaml"
    path.write_text(_env().get_template("rayjob.yaml.j2").render(**ctx), encoding="utf-8")
    return path
