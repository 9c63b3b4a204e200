"""A sim trial exports like any engine's: command, compose, k8s, json; the other formats say which exist (17.5)."""
from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
import sys
import time
import urllib.request
from importlib.metadata import version
from pathlib import Path

import jsonschema
import pytest
import yaml

from servetune.optimizer import cli
from servetune.optimizer.engines import get_engine
from servetune.optimizer.engines.base import ModelRef
from servetune.optimizer.engines.sim.cli import build_parser, config_from_args
from servetune.optimizer.export import FORMATS, SIM_FORMATS, ExportError, Options, export
from servetune.optimizer.process import free_port
from test_export import REPO, _exec_argv, _study, _trial, _validate_k8s, make_run

PARAMS = {"tensor_parallel": 1, "max_concurrency": 64, "quantization": "fp8", "kv_cache_dtype": "auto"}


def _sim_run(tmp_path: Path) -> Path:
    """A sim run as the driver records it: the preset is the model (resolve_model), the sim's own argv."""
    study = {**_study("sim"), "engines": ["sim"], "model": {"preset": "llama-3.1-8b"}}
    trial = _trial("sim", 0, PARAMS, tok_gpu=100, tpot=10)
    model = ModelRef(name="llama-3.1-8b", path="llama-3.1-8b", shape={})
    trial["argv"] = get_engine("sim").plan(PARAMS, model, host="127.0.0.1", port=41093, gpu_ids=[0],
                                           gpu="h200").argv
    return make_run(tmp_path / "sim", "sim", [trial], study)


def _sim_config(argv: list[str]):
    i = argv.index("servetune.optimizer.engines.sim")
    return config_from_args(build_parser().parse_args(argv[i + 1:]))


def test_every_format_of_a_sim_trial_exports_or_names_the_ones_that_do(tmp_path):
    run = _sim_run(tmp_path)
    for fmt in FORMATS:
        out = tmp_path / fmt
        if fmt not in SIM_FORMATS:
            with pytest.raises(ExportError) as e:
                export(run, fmt=fmt, out_dir=out)
            suggested = re.findall(r"--format (\S+?)[)\s]", str(e.value)) + re.findall(r"exports as ([a-z0-9, -]+) \(",
                                                                                       str(e.value))
            named = {f.strip() for s in suggested for f in s.split(",")} - {fmt}
            assert named and named <= set(SIM_FORMATS), f"{fmt}: suggests {named}: {e.value}"
            continue
        res = export(run, fmt=fmt, out_dir=out)
        assert any("roofline" in w for w in res.warnings), res.warnings
        for p in res.files:
            if p.suffix in (".yaml", ".json"):
                list(yaml.safe_load_all(p.read_text()))
    # k8s: a valid manifest with no GPU request and no model volume, running the sim with the trial's flags
    docs = _validate_k8s(tmp_path / "k8s" / "kubernetes.yaml")
    assert {d["kind"] for d in docs} == {"Deployment", "Service"}
    c = [d for d in docs if d["kind"] == "Deployment"][0]["spec"]["template"]["spec"]["containers"][0]
    assert "nvidia.com/gpu" not in json.dumps(c["resources"]) and c["image"] == "servetune-sim:" + _version()
    cfg = _sim_config(c["command"] + c["args"])
    assert (cfg.tensor_parallel, cfg.max_concurrency, cfg.quantization) == (1, 64, "fp8")
    dockerfile = (tmp_path / "k8s" / "Dockerfile").read_text()
    assert "pip install --no-cache-dir /src" in dockerfile and "USER 1000" in dockerfile
    # compose: no GPU reservation, the same argv
    compose = yaml.safe_load((tmp_path / "compose" / "docker-compose.yaml").read_text())
    jsonschema.Draft201909Validator(json.loads((REPO / "tests/fixtures/compose_spec_export.json").read_text())
                                    ).validate(compose)
    svc = compose["services"]["sim"]
    assert "deploy" not in svc and "volumes" not in svc
    assert _sim_config(svc["entrypoint"] + svc["command"]) == cfg
    doc = json.loads((tmp_path / "json" / "deployment.json").read_text())
    assert doc["provenance"]["simulated"] is True and doc["launch"]["pip"] is None


def _version() -> str:
    return version("servetune")


def test_the_exported_command_starts_a_real_sim_server(tmp_path):
    port = free_port("127.0.0.1")
    res = export(_sim_run(tmp_path), fmt="sim", out_dir=tmp_path / "cmd", options=Options(port=port))
    serve = res.files[0]
    argv = _exec_argv(serve)
    assert argv[argv.index("--port") + 1] == str(port)
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"}
    proc = subprocess.Popen(["bash", str(serve)], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/v1/models", timeout=2) as r:
                    assert json.load(r)["data"][0]["id"] == "llama-3.1-8b"
                break
            except OSError:
                assert proc.poll() is None and time.monotonic() < deadline, "the exported serve.sh did not start"
                time.sleep(0.2)
    finally:
        os.killpg(proc.pid, 15)
        proc.wait(timeout=20)


def test_the_readme_export_example_works_on_a_sim_run(tmp_path, capsys):
    readme = (REPO / "README.md").read_text()
    (cmd,) = [ln for ln in readme.splitlines() if ln.startswith("servetune export runs/")]
    args = shlex.split(cmd.split("#")[0])[1:]
    args[1] = str(_sim_run(tmp_path))
    args[args.index("-o") + 1] = str(tmp_path / "deploy")
    assert cli.main(args) == 0, capsys.readouterr().err
    assert (tmp_path / "deploy" / "kubernetes.yaml").is_file()
