"""A GPU study cut to the host a session got: the GPU it names, fewer trials, a shallower model.

trust_session.sh writes its study copies with this, not with text edits: an edit whose pattern no longer
matches the study file would silently leave it as it was, and the session would measure something else than it
says. Every change here checks that its key is there, and the copy is validated as ``servetune run`` would.

Depth: a model's layers cut to N of its L (a copy of its directory with ``num_hidden_layers = N``; random weights,
so nothing else changes). A shallower MoE stack runs the same fused-MoE kernels at the same shapes (a kernel's
shape comes from hidden and intermediate size, experts and batch, not from depth), so it JIT-compiles the same
way in less memory; a cold start is hardly shorter (252 s for 2 layers on an H100:
docs/results/2026-12-07-h100-jit-verbose). Its capacity grows about as L/N, and on an H100 it shrinks by the
memory bandwidth (0.7x an H200's), so every Server scenario's bracket top is scaled by that.

    python3 study_variant.py STUDY OUT_DIR [--gpu h100] [--layers 16] [--trials 1]

prints one line saying what the copy is, and writes OUT_DIR/<the study's file name>.
"""
from __future__ import annotations

import argparse
import copy
import json
import math
import shutil
import sys
from pathlib import Path
from typing import Any

import yaml

from servetune.optimizer.spec import SpecError, load_study

# memory bandwidth against the GPU the example studies were sized for (H200: 4.8 TB/s, H100 SXM: 3.35 TB/s)
BANDWIDTH = {"h200": 1.0, "h100": 0.7}


def _get(d: dict[str, Any], *path: str) -> Any:
    for key in path:
        if not isinstance(d, dict) or key not in d:
            raise KeyError(f"the study has no {'.'.join(path)}")
        d = d[key]
    return d


def shallower_model(model_dir: Path, layers: int) -> tuple[Path, int]:
    """A copy of ``model_dir`` with its first ``layers`` layers (``<model_dir>-<layers>l``); (its path, the
    original depth)."""
    config = json.loads((model_dir / "config.json").read_text())
    depth = int(config["num_hidden_layers"])
    if not 0 < layers <= depth:
        raise ValueError(f"{model_dir} has {depth} layers; {layers} asked")
    out = model_dir.with_name(f"{model_dir.name}-{layers}l")
    out.mkdir(parents=True, exist_ok=True)
    for f in model_dir.iterdir():
        if f.is_file():
            shutil.copy2(f, out / f.name)
    config["num_hidden_layers"] = layers
    (out / "config.json").write_text(json.dumps(config, indent=1))
    return out, depth


def variant(study: dict[str, Any], *, gpu: str | None = None, layers: int | None = None,
            trials: int | None = None) -> tuple[dict[str, Any], str]:
    """The study cut so, and a line saying what it is. ``layers`` makes the shallower model directory."""
    study = copy.deepcopy(study)
    said = []
    scale = 1.0
    if gpu is not None:
        from_gpu = _get(study, "hardware", "gpu")
        if from_gpu not in BANDWIDTH or gpu not in BANDWIDTH:
            raise ValueError(f"no bandwidth known for {from_gpu} -> {gpu} (known: {', '.join(BANDWIDTH)})")
        study["hardware"]["gpu"] = gpu
        scale *= BANDWIDTH[gpu] / BANDWIDTH[from_gpu]
        said.append(f"on an {gpu}")
    if layers:
        model_dir, depth = shallower_model(Path(_get(study, "model", "path")), layers)
        study["model"]["path"] = str(model_dir)
        scale *= depth / layers
        said.append(f"{layers} of the model's {depth} layers")
    if scale != 1.0:
        for i, scenario in enumerate(_get(study, "workload", "scenarios")):
            bracket = scenario.get("max_qps") if isinstance(scenario, dict) else None
            if isinstance(bracket, dict) and "hi" in bracket:
                bracket["hi"] = math.ceil(bracket["hi"] * scale)
                said.append(f"scenarios[{i}] bracket top {bracket['hi']} req/s")
    if trials:
        _get(study, "budget", "trials")
        study["budget"]["trials"] = trials
        said.append(f"{trials} trial{'s' if trials > 1 else ''}")
    if gpu is not None:
        study["name"] = str(study["name"]).replace(from_gpu, gpu)
    if layers:
        study["name"] = f"{study['name']}-{layers}l"
    return study, f"{study['name']}: " + (", ".join(said) or "as written")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("study", type=Path)
    ap.add_argument("out_dir", type=Path)
    ap.add_argument("--gpu", choices=sorted(BANDWIDTH))
    ap.add_argument("--layers", type=int, default=0, help="the model's first N layers (0: all)")
    ap.add_argument("--trials", type=int, default=0, help="the study's trial budget (0: as written)")
    args = ap.parse_args(argv)
    study, line = variant(yaml.safe_load(args.study.read_text()), gpu=args.gpu, layers=args.layers,
                          trials=args.trials)
    args.out_dir.mkdir(parents=True, exist_ok=True)
    out = args.out_dir / args.study.name
    out.write_text(yaml.safe_dump(study, sort_keys=False))
    try:  # as `servetune run` will read it: a bad cut fails here, before a launch costs device time
        load_study(str(out))
    except SpecError as e:
        print(f"{out}: {e}", file=sys.stderr)
        return 2
    print(line)
    return 0


if __name__ == "__main__":
    sys.exit(main())
