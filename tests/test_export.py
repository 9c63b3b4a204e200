"""servetune export: choosing the trial, rendering every format for vLLM and SGLang trials, validating the
output (kubernetes-validate, the compose-spec schema), round-tripping the launch command through the catalog,
and never writing a secret."""
from __future__ import annotations

import argparse
import json
import lzma
import shlex
import shutil
import subprocess
from pathlib import Path

import jsonschema
import kubernetes_validate
import pytest
import yaml

from servetune.optimizer.catalog import load_catalog, render_flags
from servetune.optimizer.cli.bench import BenchCommand
from servetune.optimizer.cli.command import register
from servetune.optimizer.cli.export import main
from servetune.optimizer.engines import get_engine
from servetune.optimizer.engines.base import CatalogEngine, ModelRef
from servetune.optimizer.export import ExportError, Options, _dns_name, choose_trial, export, split_argv

REPO = Path(__file__).resolve().parents[1]
SECRET = "hf_secret123"
K8S_VERSION = "1.37.0"  # newest schema kubernetes-validate 1.37 ships

VLLM_PARAMS = {
    "tensor_parallel": 2, "max_concurrency": 256, "max_batched_tokens": 16384, "chunked_prefill": False,
    "prefix_caching": True, "quantization": "fp8", "kv_cache_dtype": "fp8", "memory_fraction": 0.9,
    "max_model_len": 4096, "attention_backend": "flashinfer", "speculative_method": "ngram",
    "speculative_tokens": 4, "speculative_lookup_max": 4, "speculative_lookup_min": 2,
}
SGLANG_PARAMS = {
    "tensor_parallel": 2, "max_concurrency": 128, "chunked_prefill": False, "prefix_caching": False,
    "kv_cache_dtype": "fp8", "memory_fraction": 0.85, "max_model_len": 4096, "attention_backend": "flash_attn",
    "enforce_eager": True, "cuda_graph_max_batch": 256,
}


def _summary(tok_gpu: float, tpot: float, ttft: float, gpus: int) -> dict:
    return {"output_tokens_per_s_per_gpu": tok_gpu, "output_tokens_per_s": tok_gpu * gpus,
            "ttft_p99_ms": ttft, "tpot_p99_ms": tpot, "request_per_s": tok_gpu / 128}


def _trial(engine: str, number: int, params: dict, *, tok_gpu: float, tpot: float, ttft: float = 400.0,
           sla_met: bool = True, state: str = "complete", extra_args: list[str] | None = None,
           ready_s: float = 94.0, baseline: bool = False) -> dict:
    eng = get_engine(engine, None, None)
    model = ModelRef(name="llama8b", path="/tmp/models/llama-3.1-8b", shape={}, load_format="dummy")
    gpus = int(params.get("tensor_parallel", 1))
    plan = eng.plan(params, model, host="127.0.0.1", port=41093, gpu_ids=list(range(gpus)),
                    extra_args=extra_args or [])
    settings = {"kind": "server", "qps": 48.0, "duration_s": 15.0, "num_requests": None, "concurrency": None,
                "ttft_limit_ms": 2000.0, "tpot_limit_ms": 100.0, "num_gpus": gpus}
    return {"number": number, "engine": engine, "engine_version": eng.version, "state": state,
            "is_baseline": baseline, "params": params, "argv": plan.argv, "gpus": gpus,
            "gpu_ids": list(range(gpus)), "ready_s": ready_s, "started_at": "2026-11-22T03:17:13+00:00",
            "scenarios": {"server": {"summary": _summary(tok_gpu, tpot, ttft, gpus), "sla_met": sla_met,
                                     "valid": sla_met, "settings": settings}},
            "objectives": {"server.output_tokens_per_s_per_gpu": tok_gpu, "server.tpot_p99_ms": tpot}}


def _study(engine: str) -> dict:
    return {
        "name": f"export-{engine}",
        "model": {"path": "/tmp/models/llama-3.1-8b", "name": "llama8b", "load_format": "dummy"},
        "engines": [{"name": engine, "extra_args": ["--api-key", "${API_KEY}"],
                     "env": {"HF_TOKEN": "${HF_TOKEN}", "VLLM_LOGGING_LEVEL": "INFO"}}],
        "hardware": {"gpu": "h200", "gpus": 2},
        "workload": {"dataset": {"kind": "random", "input_tokens": 1024, "output_tokens": 128},
                     "scenarios": [{"kind": "server", "qps": [12, 24, 48], "duration_s": 15,
                                    "sla": {"preset": "llama3.1-8b"}}]},
        "objectives": [{"metric": "output_tokens_per_s_per_gpu", "scenario": "server"},
                       {"metric": "tpot_p99_ms", "scenario": "server"}],
    }


def make_run(root: Path, engine: str, trials: list[dict], study: dict | None = None) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    (root / "study.yaml").write_text(yaml.safe_dump(study or _study(engine), sort_keys=False))
    for t in trials:
        d = root / "trials" / f"{t['number']:04d}"
        d.mkdir(parents=True, exist_ok=True)
        (d / "trial.json").write_text(json.dumps(t, indent=1))
    return root


def engine_run(tmp_path: Path, engine: str) -> Path:
    params = VLLM_PARAMS if engine == "vllm" else SGLANG_PARAMS
    extra = ["--api-key", "${API_KEY}"]
    base = get_engine(engine).defaults()
    return make_run(tmp_path / f"run-{engine}", engine, [
        _trial(engine, 0, base, tok_gpu=6006, tpot=44.3, ttft=1569, extra_args=extra, baseline=True),
        _trial(engine, 1, params, tok_gpu=6547, tpot=30.2, ttft=365, extra_args=extra),
        _trial(engine, 2, {**params, "max_concurrency": 64}, tok_gpu=9000, tpot=20, sla_met=False, extra_args=extra),
        _trial(engine, 3, {**params, "memory_fraction": 0.8}, tok_gpu=6110, tpot=41.9, extra_args=extra),
        {"number": 4, "engine": engine, "state": "rejected", "params": params, "argv": [], "scenarios": {}},
    ])


@pytest.fixture
def secret_env(monkeypatch):
    monkeypatch.setenv("HF_TOKEN", SECRET)
    monkeypatch.setenv("API_KEY", SECRET)


# ----------------------------------------------------------------------------------------------------------
# choosing
# ----------------------------------------------------------------------------------------------------------
def test_best_is_explicit_sla_filtered_and_compared(tmp_path):
    run = engine_run(tmp_path, "vllm")
    c = choose_trial(run)
    assert c.trial["number"] == 1  # trial 2 is faster but missed the SLA; 4 was rejected
    assert (c.metric, c.scenario, c.direction, c.eligible) == ("output_tokens_per_s_per_gpu", "server", "maximize", 3)
    line = c.describe()
    assert "trial 1 (vllm): 6,547 tok/s/GPU" in line and "p99 TPOT 30.2 ms" in line
    assert "runner-up trial 3: −7% tok/s/GPU" in line and "+39% p99 TPOT" in line


def test_objective_override_and_explicit_trial(tmp_path):
    run = engine_run(tmp_path, "vllm")
    c = choose_trial(run, objective="tpot_p99_ms")
    assert c.trial["number"] == 1 and c.direction == "minimize" and c.runner_up["number"] == 3
    c = choose_trial(run, objective="ttft_p99_ms")
    assert c.trial["number"] == 1
    c = choose_trial(run, trial=2)
    assert c.explicit and c.warnings and "did not meet the SLA" in c.warnings[0]
    with pytest.raises(ExportError, match="rejected"):
        choose_trial(run, trial=4)
    with pytest.raises(ExportError, match="no trial 9"):
        choose_trial(run, trial=9)
    with pytest.raises(ExportError, match="did you mean 'tpot_p99_ms'"):
        choose_trial(run, objective="tpot_p99")
    with pytest.raises(ExportError, match="no scenario 'offline'"):
        choose_trial(run, scenario="offline")


def test_real_gpu_records_choose_the_fp8_trial(tmp_path):
    """docs/results/2026-11-22-vllm-h200: trial 2 (fp8 weights) is best; trial 3 the runner-up."""
    src = REPO / "docs/results/2026-11-22-vllm-h200/trials"
    run = tmp_path / "gpu"
    for f in sorted(src.glob("tp1_*.json.xz")):  # compressed: the tracked tree must leave room for a kit part
        t = json.loads(lzma.decompress(f.read_bytes()))
        (run / "trials" / f"{t['number']:04d}").mkdir(parents=True)
        (run / "trials" / f"{t['number']:04d}" / "trial.json").write_text(json.dumps(t))
    shutil.copy(REPO / "search_spaces/examples/gpu-vllm-llama8b-tp1.yaml", run / "study.yaml")
    res = export(run, fmt="k8s", out_dir=tmp_path / "out")
    assert res.choice.trial["number"] == 2 and res.choice.runner_up is not None
    assert "trial 2 (vllm): 6,547 tok/s/GPU" in res.choice.describe()
    docs = yaml.safe_load_all((tmp_path / "out/kubernetes.yaml").read_text())
    doc = [d for d in docs if d["kind"] == "Deployment"][0]
    probe = doc["spec"]["template"]["spec"]["containers"][0]["startupProbe"]
    ready = res.choice.trial["ready_s"]
    assert probe["periodSeconds"] * probe["failureThreshold"] >= 2 * ready + 120
    _validate_k8s(tmp_path / "out/kubernetes.yaml")


# ----------------------------------------------------------------------------------------------------------
# every format, both engines
# ----------------------------------------------------------------------------------------------------------
ALL = ["command", "compose", "k8s", "helm", "kserve", "ray-serve", "json"]


@pytest.fixture(scope="module")
def rendered(tmp_path_factory):
    """Every format for a vLLM and an SGLang run, with HF_TOKEN / API_KEY set to a planted secret."""
    mp = pytest.MonkeyPatch()
    mp.setenv("HF_TOKEN", SECRET)
    mp.setenv("API_KEY", SECRET)
    tmp = tmp_path_factory.mktemp("export")
    out = {}
    try:
        for engine in ("vllm", "sglang"):
            run = engine_run(tmp, engine)
            for fmt in ALL + [engine]:
                d = tmp / f"{engine}-{fmt}"
                if fmt == "ray-serve" and engine == "sglang":
                    with pytest.raises(ExportError, match="vLLM only"):
                        export(run, fmt=fmt, out_dir=d)
                    continue
                out[(engine, fmt)] = export(run, fmt=fmt, out_dir=d)
    finally:
        mp.undo()
    return out


@pytest.mark.parametrize("engine", ["vllm", "sglang"])
def test_every_format_renders(rendered, engine):
    expect = {"command": {"serve.sh", "bench.sh"}, "compose": {"docker-compose.yaml", "bench.sh"},
              "k8s": {"kubernetes.yaml"}, "helm": {"values.yaml"}, "kserve": {"inferenceservice.yaml"},
              "ray-serve": {"ray-serve.yaml"}, "json": {"deployment.json"}, engine: {"serve.sh", "bench.sh"}}
    for fmt, names in expect.items():
        if fmt == "ray-serve" and engine == "sglang":
            assert (engine, fmt) not in rendered
            continue
        res = rendered[(engine, fmt)]
        assert {p.name for p in res.files} == names
        for p in res.files:
            text = p.read_text()
            assert text.strip()
            if p.suffix in (".yaml", ".json"):
                list(yaml.safe_load_all(text))  # parses
        assert res.choice.trial["number"] == 1


def test_no_secret_in_any_output(rendered):
    files = [p for res in rendered.values() for p in res.files]
    assert len(files) >= 20
    for p in files:
        assert SECRET not in p.read_text(), p
    # the references are there instead
    k8s = rendered[("vllm", "k8s")].files[0].read_text()
    assert "secretKeyRef" in k8s and "$(API_KEY)" in k8s
    compose = rendered[("vllm", "compose")].files[0].read_text()
    assert "${HF_TOKEN:?" in compose and "${API_KEY}" in compose
    assert "${HF_TOKEN:?" in rendered[("sglang", "command")].files[0].read_text()
    helm = yaml.safe_load(rendered[("vllm", "helm")].files[0].read_text())
    assert helm["servingEngineSpec"]["modelSpec"][0]["hf_token"] == {"secretName": "export-vllm-vllm-secrets",
                                                                   "secretKey": "HF_TOKEN"}


@pytest.mark.parametrize("spelling", ["two words", "with ="])
def test_literal_secrets_are_replaced(tmp_path, secret_env, spelling):
    """`--api-key sk-...` and `--api-key=sk-...` alike: every format gets a reference to a secret, never the value
    (the = spelling is split in two words so each format can wire the reference)."""
    extra = ["--api-key", SECRET] if spelling == "two words" else [f"--api-key={SECRET}"]
    t = _trial("vllm", 0, VLLM_PARAMS, tok_gpu=1, tpot=1, extra_args=extra)
    study = _study("vllm")
    study["engines"][0]["env"] = {"MY_API_TOKEN": SECRET, "OTHER": "${HF_TOKEN}"}
    study["engines"][0]["extra_args"] = list(extra)
    run = make_run(tmp_path / "r", "vllm", [t], study)
    texts = {}
    for fmt in ALL:
        res = export(run, fmt=fmt, out_dir=tmp_path / fmt)
        for p in res.files:
            texts[(fmt, p.name)] = p.read_text()
            assert SECRET not in texts[(fmt, p.name)], (fmt, p.name)
        assert any("--api-key carried a literal value" in w for w in res.warnings)
        assert any("MY_API_TOKEN has a literal value" in w for w in res.warnings)
    assert '--api-key "${API_KEY}"' in texts[("command", "serve.sh")]
    assert "--api-key=" not in "".join(texts.values())
    k8s = texts[("k8s", "kubernetes.yaml")]
    assert "$(API_KEY)" in k8s and "secretKeyRef" in k8s
    assert "${API_KEY}" in texts[("compose", "docker-compose.yaml")]
    assert "${API_KEY}" in texts[("json", "deployment.json")]


# ----------------------------------------------------------------------------------------------------------
# validation
# ----------------------------------------------------------------------------------------------------------
def _validate_k8s(path: Path) -> list[dict]:
    docs = [d for d in yaml.safe_load_all(path.read_text()) if d]
    for d in docs:
        kubernetes_validate.validate(d, K8S_VERSION, strict=True)
    return docs


@pytest.mark.parametrize("engine", ["vllm", "sglang"])
def test_kubernetes_validates(rendered, engine):
    docs = _validate_k8s(rendered[(engine, "k8s")].files[0])
    kinds = {d["kind"]: d for d in docs}
    assert set(kinds) == {"PersistentVolumeClaim", "Deployment", "Service"}
    pod = kinds["Deployment"]["spec"]["template"]["spec"]
    c = pod["containers"][0]
    assert c["resources"]["limits"]["nvidia.com/gpu"] == "2" and c["resources"]["requests"]["cpu"]
    assert c["readinessProbe"]["httpGet"]["path"] == "/health" and c["livenessProbe"]["httpGet"]["path"] == "/health"
    assert c["startupProbe"]["failureThreshold"] * c["startupProbe"]["periodSeconds"] >= 94 * 2 + 120
    assert pod["securityContext"]["runAsNonRoot"] is True and c["securityContext"]["allowPrivilegeEscalation"] is False
    env = {e["name"]: e for e in c["env"]}
    assert env["HF_TOKEN"]["valueFrom"]["secretKeyRef"]["key"] == "HF_TOKEN"
    assert env["VLLM_LOGGING_LEVEL"]["value"] == "INFO"
    assert _roundtrip(engine, c["command"] + c["args"]) == _expected(engine)
    assert "0.0.0.0" in c["args"]


@pytest.mark.parametrize("engine", ["vllm", "sglang"])
def test_kserve_inferenceservice(rendered, engine):
    """KServe's CRD is not in kubernetes-validate: check apiVersion/kind, and validate the predictor's pod
    fields as a core Pod (the predictor embeds a PodSpec)."""
    (doc,) = [d for d in yaml.safe_load_all(rendered[(engine, "kserve")].files[0].read_text()) if d]
    assert (doc["apiVersion"], doc["kind"]) == ("serving.kserve.io/v1beta1", "InferenceService")
    pred = dict(doc["spec"]["predictor"])
    pod_spec = {k: pred.pop(k) for k in ("containers", "volumes", "securityContext")}
    assert set(pred) == {"minReplicas", "maxReplicas"}
    kubernetes_validate.validate({"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "x"}, "spec": pod_spec},
                                 K8S_VERSION, strict=True)
    c = pod_spec["containers"][0]
    assert c["name"] == "kserve-container"
    assert _roundtrip(engine, c["command"] + c["args"]) == _expected(engine)


@pytest.mark.parametrize("engine", ["vllm", "sglang"])
def test_compose_validates(rendered, engine):
    path = rendered[(engine, "compose")].files[0]
    doc = yaml.safe_load(path.read_text())
    schema = json.loads((REPO / "tests/fixtures/compose_spec_export.json").read_text())
    jsonschema.Draft201909Validator(schema).validate(doc)
    svc = doc["services"][engine]
    assert svc["image"] == ("vllm/vllm-openai:v0.26.0" if engine == "vllm" else "lmsysorg/sglang:v0.5.17-cu129")
    assert svc["deploy"]["resources"]["reservations"]["devices"][0]["count"] == 2
    assert "/health" in " ".join(svc["healthcheck"]["test"]) and svc["shm_size"] == "16Gi"
    assert svc["ports"] == ["127.0.0.1:8000:8000"]
    assert svc["volumes"][0]["target"] == "/models/llama-3.1-8b"
    assert _roundtrip(engine, svc["entrypoint"] + svc["command"]) == _expected(engine)
    cli = _compose_cli()
    if cli:  # the real parser, where one is installed (no engine needed for `config`)
        env = {"PATH": "/usr/local/bin:/usr/bin:/bin", "HF_TOKEN": "x", "API_KEY": "x"}
        r = subprocess.run(cli + ["-f", str(path), "config", "-q"], capture_output=True, text=True, env=env)
        assert r.returncode == 0, r.stderr
        del env["HF_TOKEN"]  # a missing secret stops `up` with the message, instead of starting without it
        r = subprocess.run(cli + ["-f", str(path), "config", "-q"], capture_output=True, text=True, env=env)
        assert r.returncode != 0 and "set HF_TOKEN" in r.stderr


def _compose_cli() -> list[str] | None:
    docker = shutil.which("docker")
    if docker and subprocess.run([docker, "compose", "version"], capture_output=True).returncode == 0:
        return [docker, "compose"]
    v1 = shutil.which("docker-compose")
    if v1 and subprocess.run([v1, "version"], capture_output=True).returncode == 0:
        return [v1]
    return None


@pytest.mark.parametrize("engine", ["vllm", "sglang"])
def test_helm_values(rendered, engine):
    v = yaml.safe_load(rendered[(engine, "helm")].files[0].read_text())
    if engine == "vllm":  # vllm-project/production-stack chart
        spec = v["servingEngineSpec"]["modelSpec"][0]
        assert (spec["repository"], spec["tag"], spec["requestGPU"]) == ("vllm/vllm-openai", "v0.26.0", 2)
        extra = spec["vllmConfig"]["extraArgs"]
        argv = ["vllm", "serve", spec["modelURL"], "--host", "0.0.0.0", "--port", "8000"] + extra
        assert "--host" not in extra and extra[-2:] == ["--api-key", "$(API_KEY)"]  # k8s expands $(VAR) in args
    else:  # generic helm-create shape
        assert v["image"] == {"repository": "lmsysorg/sglang", "tag": "v0.5.17-cu129", "pullPolicy": "IfNotPresent"}
        assert v["resources"]["limits"]["nvidia.com/gpu"] == 2
        argv = v["command"] + v["args"]
    assert _roundtrip(engine, argv) == _expected(engine)


def test_ray_serve_engine_kwargs(rendered):
    doc = yaml.safe_load(rendered[("vllm", "ray-serve")].files[0].read_text())
    cfg = doc["applications"][0]["args"]["llm_configs"][0]
    assert doc["applications"][0]["import_path"] == "ray.serve.llm:build_openai_app"
    assert cfg["model_loading_config"]["model_id"] == "llama8b"
    kw = cfg["engine_kwargs"]
    assert kw["tensor_parallel_size"] == 2 and kw["max_num_seqs"] == 256 and kw["enable_chunked_prefill"] is False
    assert kw["kv_cache_dtype"] == "fp8" and kw["gpu_memory_utilization"] == 0.9
    assert kw["speculative_config"] == {"method": "ngram", "num_speculative_tokens": 4, "prompt_lookup_max": 4,
                                        "prompt_lookup_min": 2}
    assert "host" not in kw and "load_format" not in kw and "api_key" not in kw
    assert cfg["accelerator_type"] == "H200"


def test_json_is_machine_readable(rendered):
    d = json.loads(rendered[("sglang", "json")].files[0].read_text())
    assert d["provenance"]["engine_version"] == "0.5.17" and d["provenance"]["trial"] == 1
    assert d["provenance"]["gpu"] == "h200" and d["provenance"]["servetune_version"]
    assert d["selection"]["runner_up"] == 3 and d["selection"]["metric"] == "output_tokens_per_s_per_gpu"
    assert d["measured"]["scenarios"]["server"]["summary"]["output_tokens_per_s_per_gpu"] == 6547
    assert d["launch"]["secret_env"] == ["HF_TOKEN", "API_KEY"] and d["measured"]["ready_s"] == 94.0
    assert d["params"] == SGLANG_PARAMS


# ----------------------------------------------------------------------------------------------------------
# the launch command round-trips
# ----------------------------------------------------------------------------------------------------------
def _catalog_engine(engine: str) -> CatalogEngine:
    eng = get_engine(engine)
    assert isinstance(eng, CatalogEngine)  # vllm and sglang render and parse their flags through a catalog
    return eng


def _expected(engine: str) -> dict:
    """The trial's parameters as the engine receives them (SGLang spells some out, e.g. chunked off drops mbt)."""
    cat = load_catalog(engine)
    eng = _catalog_engine(engine)
    params = VLLM_PARAMS if engine == "vllm" else SGLANG_PARAMS
    return {k: v for k, v in eng.launch_params(params).items() if render_flags(cat, {k: v})}


def _roundtrip(engine: str, argv: list[str]) -> dict:
    cat = load_catalog(engine)
    sp = split_argv(argv, cat)
    params, rest = _catalog_engine(engine).parse_flags(sp.args)
    assert render_flags(cat, params) == render_flags(cat, _catalog_engine(engine).launch_params(
        VLLM_PARAMS if engine == "vllm" else SGLANG_PARAMS))
    return params


def _exec_argv(serve_sh: Path) -> list[str]:
    text = serve_sh.read_text()
    cmd = text[text.index("\nexec ") + 6:]
    return shlex.split(cmd.replace("\\\n", " "))


@pytest.mark.parametrize("engine", ["vllm", "sglang"])
def test_command_round_trips(rendered, engine):
    res = rendered[(engine, engine)]
    serve = res.files[0]
    text = serve.read_text()
    assert f"pip install '{engine}=={get_engine(engine).version}'" in text
    argv = _exec_argv(serve)
    assert _roundtrip(engine, argv) == _expected(engine)
    assert argv[argv.index("--host") + 1] == "127.0.0.1" and argv[argv.index("--port") + 1] == "8000"
    assert "--load-format" not in argv and any("load-format dummy" in w for w in res.warnings)
    assert argv[:2] == (["vllm", "serve"] if engine == "vllm" else ["python3", "-m"])
    assert argv[-2:] == ["--api-key", "${API_KEY}"]  # the study's extra_args, last, as a reference
    # the whole recorded argv survives except host/port/load-format and the flags added only to measure
    rec = res.choice.trial["argv"]
    measuring = set(get_engine(engine).measurement_flags)
    assert engine != "vllm" or "--jit-monitor-verbose" in rec and "--jit-monitor-verbose" not in argv
    kept = [a for a in rec if a not in ("127.0.0.1", "41093", "--load-format", "dummy") and a not in measuring]
    assert [a for a in argv if a not in ("127.0.0.1", "8000")] == kept
    if shutil.which("bash"):
        assert subprocess.run(["bash", "-n", str(serve)]).returncode == 0


def test_host_option_and_bench_script(tmp_path, secret_env):
    run = engine_run(tmp_path, "vllm")
    res = export(run, fmt="vllm", out_dir=tmp_path / "o", options=Options(host="0.0.0.0", port=9000))
    argv = _exec_argv(res.files[0])
    assert argv[argv.index("--host") + 1] == "0.0.0.0" and argv[argv.index("--port") + 1] == "9000"
    bench = (tmp_path / "o/bench.sh").read_text()
    cmd = shlex.split(bench[bench.index("\nexec ") + 6:].replace("\\\n", " "))
    assert cmd[:2] == ["servetune", "bench"]
    p = argparse.ArgumentParser()
    sub = p.add_subparsers(dest="command")
    register(sub, BenchCommand)
    ns = p.parse_args(["bench", *[a.replace("$URL", "http://h:9000").replace("$OUT", "o") for a in cmd[2:]]])
    assert (ns.scenario, ns.qps, ns.duration, ns.input_tokens, ns.output_tokens, ns.sla, ns.num_gpus) == \
        ("server", [48.0] if isinstance(ns.qps, list) else 48.0, 15.0, 1024, 128, "llama3.1-8b", 2)


def test_wrong_engine_format_and_sim(tmp_path):
    run = engine_run(tmp_path, "vllm")
    with pytest.raises(ExportError, match="ran on vllm"):
        export(run, fmt="sglang", out_dir=tmp_path / "x")
    sim = make_run(tmp_path / "sim", "sim", [_trial("sim", 0, {"tensor_parallel": 1, "max_concurrency": 64},
                                                    tok_gpu=100, tpot=10)],
                   {**_study("sim"), "engines": ["sim"], "model": {"preset": "llama-3.1-8b"}})
    with pytest.raises(ExportError, match="simulated engine"):
        export(sim, fmt="helm", out_dir=tmp_path / "y")
    res = export(sim, fmt="json", out_dir=tmp_path / "z")
    d = json.loads(res.files[0].read_text())
    assert d["provenance"]["simulated"] is True and d["launch"]["command"][0] == "python3"


def test_cli(tmp_path, capsys, secret_env):
    run = engine_run(tmp_path, "sglang")
    assert main([str(run), "--format", "compose", "-o", str(tmp_path / "c"), "--gpu-ids", "0,1",
                 "--image", "my/sglang:{version}"]) == 0
    out = capsys.readouterr()
    assert "trial 1 (sglang)" in out.out and "runner-up trial 3" in out.out and "wrote" in out.out
    assert "load-format dummy" in out.err
    doc = yaml.safe_load((tmp_path / "c/docker-compose.yaml").read_text())
    assert doc["services"]["sglang"]["image"] == "my/sglang:0.5.17"
    assert doc["services"]["sglang"]["deploy"]["resources"]["reservations"]["devices"][0]["device_ids"] == ["0", "1"]
    assert main([str(run), "--trial", "4", "--format", "json", "-o", str(tmp_path / "j")]) == 2
    assert "rejected" in capsys.readouterr().err


@pytest.mark.parametrize("engine", ["vllm", "sglang"])
def test_parse_flags_inverts_every_catalog_value(engine):
    """Each searchable value of each parameter, rendered the way the engine adapter renders it, parses back."""
    cat = load_catalog(engine)
    eng = get_engine(engine)
    checked = 0
    for name, m in cat.params.items():
        if m.flag is None or not isinstance(m.domain, list):
            continue
        for value in m.domain:
            params = {"tensor_parallel": 2, name: value}
            if name.startswith("speculative_") and name != "speculative_method":
                params["speculative_method"] = "ngram"
            eff = eng.launch_params(params)
            argv = render_flags(cat, eff)
            parsed, rest = eng.parse_flags(argv)
            assert rest == [], (name, value, argv)
            want = {k: v for k, v in eff.items() if render_flags(cat, {k: v})}
            if engine == "sglang" and name == "expert_parallel":
                want = {k: (v > 1 if k == "expert_parallel" else v) for k, v in want.items()}
            assert parsed == want, (name, value, argv)
            checked += 1
    assert checked > 20


def test_hf_id_existing_claim_and_namespace(tmp_path, secret_env):
    """A Hugging Face id instead of a mounted path: no offline flag, the claim is the download cache."""
    run = engine_run(tmp_path, "vllm")
    opts = Options(model_path="meta-llama/Llama-3.1-8B-Instruct", pvc="shared-models", namespace="llm",
                   name="Llama_8B.Prod", startup_margin=3.0)
    res = export(run, fmt="k8s", out_dir=tmp_path / "k", options=opts)
    docs = _validate_k8s(res.files[0])
    assert [d["kind"] for d in docs] == ["Deployment", "Service"]  # existing claim: none created
    dep = docs[0]
    assert dep["metadata"] == {**dep["metadata"], "name": "llama-8b-prod", "namespace": "llm"}
    c = dep["spec"]["template"]["spec"]["containers"][0]
    assert c["args"][0] == "meta-llama/Llama-3.1-8B-Instruct"
    env = {e["name"]: e.get("value") for e in c["env"]}
    assert "HF_HUB_OFFLINE" not in env and env["HF_HOME"] == "/models/huggingface"
    assert c["startupProbe"]["failureThreshold"] * 10 >= 94 * 3 + 120
    assert dep["spec"]["template"]["spec"]["volumes"][0]["persistentVolumeClaim"] == {"claimName": "shared-models"}
    res = export(run, fmt="compose", out_dir=tmp_path / "c", options=opts)
    doc = yaml.safe_load(res.files[0].read_text())
    jsonschema.Draft201909Validator(json.loads((REPO / "tests/fixtures/compose_spec_export.json").read_text())
                                    ).validate(doc)
    assert "volumes" not in doc["services"]["vllm"]


def test_gpu_record_round_trips(tmp_path):
    src = REPO / "docs/results/2026-11-22-vllm-h200/trials/tp1_0002.json.xz"
    t = json.loads(lzma.decompress(src.read_bytes()))
    run = make_run(tmp_path / "r", "vllm", [t], _study("vllm"))
    res = export(run, fmt="kserve", out_dir=tmp_path / "o")
    (doc,) = [d for d in yaml.safe_load_all(res.files[0].read_text()) if d]
    c = doc["spec"]["predictor"]["containers"][0]
    cat = load_catalog("vllm")
    params, rest = get_engine("vllm").parse_flags(split_argv(c["command"] + c["args"], cat).args)
    assert params == t["params"]
    assert rest == ["--served-model-name", "llama8b", "--host", "0.0.0.0", "--port", "8000",
                    "--disable-uvicorn-access-log"]


def test_names_are_valid_for_services():
    assert _dns_name("Llama_8B.Prod") == "llama-8b-prod"
    assert _dns_name("8b-study-vllm") == "st-8b-study-vllm"
    assert len(_dns_name("x" * 100)) == 53


def test_bench_uses_effective_limits_when_the_sla_is_custom(tmp_path):
    study = _study("vllm")
    study["workload"]["scenarios"][0]["sla"] = {"preset": "llama3.1-8b", "tpot_p99_ms": 100}
    run = make_run(tmp_path / "r", "vllm", [_trial("vllm", 0, VLLM_PARAMS, tok_gpu=1, tpot=1)], study)
    res = export(run, fmt="compose", out_dir=tmp_path / "o")
    bench = (tmp_path / "o/bench.sh").read_text()
    assert "--sla" not in bench and "--ttft-ms 2000.0" in bench and "--tpot-ms 100.0" in bench
    assert res.choice.trial["number"] == 0 and res.choice.runner_up is None
    assert "no runner-up" in res.choice.describe()
