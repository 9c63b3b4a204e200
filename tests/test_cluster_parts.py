"""The parts of cluster mode that need no cluster: placement decisions, files on their way home, the storage
URL's password rule, config claims in a real database (SQLite here; PostgreSQL in test_cluster.py), the GPU
type as a searched parameter, pid files of other hosts."""
from __future__ import annotations

import json
import shlex
import shutil
import socket
import subprocess
import textwrap
import threading
import time
from pathlib import Path

import jsonschema
import kubernetes_validate
import pytest
import sqlalchemy as sa
import yaml

from servetune.optimizer import placement, trial_files
from servetune.optimizer import spec as spec_module
from servetune.optimizer.cli import main
from servetune.optimizer.driver import StudyDriver
from servetune.optimizer.engines import get_engine
from servetune.optimizer.node_checks import check_here, gpu_type_matches
from servetune.optimizer.process import reap_orphan
from servetune.optimizer.records import gpu_use
from servetune.optimizer.shared_study import ConfigClaims
from servetune.optimizer.spec import ClusterSpec, SpecError, load_study, parse_study
from servetune.optimizer.storage_url import StorageUrlError, expand, shown
from study_fixtures import write_study


@pytest.fixture(autouse=True)
def _postgres_driver_not_needed(monkeypatch):
    """These studies name a PostgreSQL storage without opening it: whether its driver (psycopg) is installed on
    this machine is not what they test (spec._storage_problem would refuse the URL without it)."""
    real = spec_module._storage_problem
    monkeypatch.setattr(spec_module, "_storage_problem",
                        lambda url: None if (real(url) or "").find("driver is not installed") >= 0 else real(url))


def _nodes(*spec) -> list[placement.Node]:
    return [placement.Node(f"{name}-id-0123456789", name, gpus,
                           {"GPU": gpus, **({f"accelerator_type:{acc}": 1} if acc else {})})
            for name, gpus, acc in spec]


def test_a_trial_that_fits_one_node_gets_one_strict_pack_bundle():
    nodes = _nodes(("a", 2, "A100"), ("b", 4, "H100"))
    p, why = placement.place(4, {"tensor_parallel": 4}, nodes, {}, ClusterSpec(), engine_spans=False)
    assert why == [] and p.kind == "pack" and p.bundle == {"GPU": 4.0} and p.label_selector == {}
    assert [n.name for n in p.fits] == ["b"]
    p, _ = placement.place(1, {}, nodes, {}, ClusterSpec(), engine_spans=False)
    assert [n.name for n in p.fits] == ["a", "b"]  # smallest first: best fit keeps the 4-GPU node for big trials
    # a node left out is kept out by a label selector on its Ray node id
    p, _ = placement.place(2, {}, nodes, {"a-id-0123456789": "model path /m does not exist"}, ClusterSpec(), False)
    assert p.label_selector == {"ray.io/node-id": "!in(a-id-0123456789)"}


def test_too_big_for_any_node_is_rejected_naming_the_largest_and_the_left_out_node():
    nodes = _nodes(("a", 2, None), ("b", 4, None), ("big", 8, None))
    excluded = {"big-id-0123456789": "model path /m does not exist"}
    _, why = placement.place(8, {"tensor_parallel": 8}, nodes, excluded, ClusterSpec(), False)
    assert "needs 8 GPUs on one node and the largest usable node (b (b-id-012)) has 4" in why[0]
    assert "big (big-id-0) has 8 but is left out: model path /m does not exist" in why[0]
    assert "cluster.span_nodes: true" in why[0]


def test_spanning_nodes_needs_the_setting_an_engine_that_can_and_pipeline_stages():
    nodes = _nodes(("a", 4, None), ("b", 4, None))
    span = ClusterSpec(span_nodes=True)
    p, why = placement.place(8, {"tensor_parallel": 4, "pipeline_parallel": 2}, nodes, {}, span, engine_spans=True)
    assert why == [] and p.kind == "span" and p.node_id in {"a-id-0123456789", "b-id-0123456789"}
    _, why = placement.place(8, {"tensor_parallel": 4, "pipeline_parallel": 2}, nodes, {}, span, engine_spans=False)
    assert "cannot spread one server over nodes" in why[0]
    _, why = placement.place(8, {"tensor_parallel": 8}, nodes, {}, span, engine_spans=True)
    assert "tensor_parallel=8 exceeds the 4 GPUs" in why[0]
    _, why = placement.place(12, {"tensor_parallel": 4, "pipeline_parallel": 3}, nodes, {}, span, engine_spans=True)
    assert "have 8 together" in why[0]


def test_engines_that_span_nodes_say_how():
    assert get_engine("vllm").span_nodes_args() == ["--distributed-executor-backend", "ray"]
    assert get_engine("sglang").span_nodes_args() is None and get_engine("sim").span_nodes_args() is None


def test_node_types_bind_a_trial_to_its_type_and_its_rules(tmp_path):
    study = write_study(tmp_path, gpus=8, search="tensor_parallel: [1, 4]", extra=textwrap.dedent("""
    cluster:
      node_types:
        - {gpu: h100, gpus_per_node: 8}
        - {gpu: a100, gpus_per_node: 2, gpu_memory_gib: 40, accelerator_type: A100-40G}
    """))
    d = StudyDriver(load_study(study))
    assert d.space.gpu_types == ["h100", "a100"] and "gpu" in d.space.distributions()
    assert d.check("sim", {"gpu": "a100", "tensor_parallel": 4}) == [
        "needs 4 GPUs (tensor_parallel·pipeline_parallel·data_parallel) but a trial may use 2"]
    assert d.check("sim", {"gpu": "h100", "tensor_parallel": 4}) == []
    plan = d.build_plan(3, "sim", {"gpu": "a100", "tensor_parallel": 1}, False, tmp_path / "t")
    assert (plan.gpu, plan.gpu_memory_gib) == ("a100", 40)
    a100 = d.spec.cluster.node_types[1]
    nodes = _nodes(("h", 8, "H100"), ("a", 2, "A100-40G"))
    p, _ = placement.place(1, {"gpu": "a100"}, nodes, {}, d.spec.cluster, False)
    assert p.bundle == {"GPU": 1.0, a100.ray_resource: 0.001} and a100.ray_resource == "accelerator_type:A100-40G"
    _, why = placement.place(1, {"gpu": "a100"}, _nodes(("h", 8, "H100")), {}, d.spec.cluster, False)
    assert why == ["no usable a100 GPU node is in the cluster now"]


def test_trial_files_travel_whole_with_the_log_tail(tmp_path):
    src = tmp_path / "scratch" / "0007"
    (src / "repeat_1").mkdir(parents=True)
    (src / "trial.json").write_text('{"number": 7}')
    (src / "requests_server.csv").write_text("a,b\n1,2\n")
    (src / "repeat_1" / "trial.json").write_text("{}")
    (src / "engine.pid").write_text("{}")  # means nothing on the driver's host
    (src / ".trial.json.123.tmp").write_text("half")
    (src / "engine.log").write_text("".join(f"line {i}\n" for i in range(1000)))
    files = trial_files.pack(src, log_tail_bytes=100)
    assert set(files) == {"trial.json", "requests_server.csv", "repeat_1/trial.json", "engine.log"}
    log = files["engine.log"].decode()
    assert log.startswith("servetune: the first ") and log.rstrip().endswith("line 999") and len(log) < 200
    dest = tmp_path / "run" / "trials" / "0007"
    trial_files.unpack(files, dest)
    assert (dest / "requests_server.csv").read_text() == "a,b\n1,2\n" and (dest / "repeat_1" / "trial.json").exists()
    with pytest.raises(ValueError, match="may not leave"):
        trial_files.unpack({"../escape.txt": b"x"}, dest)
    assert (trial_files.scratch_dir("/s", "st", "/runs/st/trials/0007/repeat_2")
            == Path("/s/servetune-trials/st/0007/repeat_2"))


def test_a_storage_password_only_by_reference(monkeypatch):
    text = textwrap.dedent("""
    name: s
    model: {preset: llama-3.2-1b}
    engines: [sim]
    workload:
      scenarios: [{kind: offline}]
    objectives: [{metric: output_tokens_per_s}]
    storage: %s
    """)
    with pytest.raises(SpecError) as e:
        parse_study(text % "postgresql://st:s3cretpw@db:5432/st", "s.yaml")
    assert e.value.lines[0].startswith("s.yaml:8: storage: the postgresql URL holds a literal password")
    assert "s3cretpw" not in e.value.lines[0]
    spec = parse_study(text % "postgresql+psycopg://st:${ST_PW}@db:5432/st", "s.yaml")
    monkeypatch.delenv("ST_PW", raising=False)
    with pytest.raises(StorageUrlError, match=r"\$\{ST_PW\}, which is not set"):
        expand(spec.storage)
    monkeypatch.setenv("ST_PW", "p@ss/word")
    assert expand(spec.storage) == "postgresql+psycopg://st:p%40ss%2Fword@db:5432/st"
    assert shown("postgresql://u:x@h/d") == "postgresql://u:***@h/d" and shown(spec.storage) == spec.storage
    parse_study(text % "postgresql://st@db/st", "s.yaml")  # no password (peer or .pgpass): fine


def test_one_claim_per_configuration_across_drivers(tmp_path):
    """Two drivers (two engines on one database) claim the same configuration at once: one wins. A claim whose
    trial ended without a result is taken over by exactly one of the next claimants."""
    url = f"sqlite:///{tmp_path / 'study.db'}"
    a, b = ConfigClaims(sa.create_engine(url), "s"), ConfigClaims(sa.create_engine(url), "s")
    results: dict[int, int | None] = {}
    barrier = threading.Barrier(2)

    def claim(c: ConfigClaims, tid: int) -> None:
        barrier.wait()
        results[tid] = c.claim("cfg", tid, void=lambda held: False)

    ts = [threading.Thread(target=claim, args=(c, tid)) for c, tid in ((a, 10), (b, 20))]
    for t in ts:
        t.start()
    for t in ts:
        t.join()
    winner = next(t for t, held in results.items() if held is None)
    loser = 30 - winner
    assert results[loser] == winner and a.holder("cfg") == winner
    assert ConfigClaims(sa.create_engine(url), "other").claim("cfg", 99, void=lambda h: False) is None  # another study
    # the winner's trial was lost: the next two claimants race for it, one takes it over
    takers = [a.claim("cfg", 31, void=lambda held: held == winner),
              b.claim("cfg", 32, void=lambda held: held == winner)]
    assert takers == [None, 31] and b.holder("cfg") == 31


def test_a_pid_file_of_another_host_is_left_alone(tmp_path):
    p = subprocess.Popen(["sleep", "30"], start_new_session=True)
    try:
        pid = tmp_path / "engine.pid"
        pid.write_text(json.dumps({"pgid": p.pid, "argv0": "sleep", "started": 0, "host": socket.gethostname() + "-x"}))
        assert reap_orphan(pid) is False and p.poll() is None  # shared_dir: that group lives elsewhere
        pid.write_text(json.dumps({"pgid": p.pid, "argv0": "sleep", "started": time.time(),
                                   "host": socket.gethostname()}))
        assert reap_orphan(pid) is True and p.wait(timeout=10) is not None
    finally:
        if p.poll() is None:
            p.kill()


def test_gpu_zero_of_two_nodes_is_two_gpus():
    recs = [{"number": 0, "gpu_ids": [0], "node": "a (1)", "started_at": "2026-11-22T10:00:00+00:00", "wall_s": 10},
            {"number": 1, "gpu_ids": [0], "node": "b (2)", "started_at": "2026-11-22T10:00:00+00:00", "wall_s": 10}]
    use = gpu_use(recs, 2)
    assert use["shared"] == [] and use["peak_gpus"] == 2


def test_the_rayjob_recipe_validates_and_runs_the_study_on_the_cluster(tmp_path, capsys):
    """The KubeRay manifest: the ConfigMap and each pod template validate as core Kubernetes objects
    (kubernetes-validate); the RayJob's own structure against a schema written from KubeRay's Go types."""
    model = tmp_path / "models" / "llama-3.1-8b"
    model.mkdir(parents=True)
    (model / "config.json").write_text("{}")
    study = tmp_path / "fleet.yaml"
    study.write_text(textwrap.dedent(f"""
    name: Fleet_8b
    model: {{path: {model}}}
    engines:
      - name: vllm
        env: {{HF_TOKEN: "${{HF_TOKEN}}"}}
    hardware: {{gpu: h100, gpus: 16}}
    storage: postgresql+psycopg://st:${{PGPASSWORD}}@pg.db:5432/st
    cluster:
      node_types:
        - {{gpu: h100, gpus_per_node: 8}}
        - {{gpu: a100, gpus_per_node: 4, accelerator_type: A100-80G}}
    search: {{tensor_parallel: [1, 2, 4]}}
    workload: {{scenarios: [{{kind: offline}}]}}
    objectives: [{{metric: output_tokens_per_s}}]
    """))
    assert main(["rayjob", str(study), "--image", "registry.example/servetune-vllm:0.26", "--model-claim", "models",
                 "--results-claim", "runs", "--workers", "2", "--namespace", "tuning",
                 "-o", str(tmp_path / "out")]) == 0
    docs = [d for d in yaml.safe_load_all((tmp_path / "out" / "rayjob.yaml").read_text()) if d]
    cm, job = docs
    kubernetes_validate.validate(cm, "1.37.0", strict=True)
    schema = json.loads((Path(__file__).parent / "fixtures" / "kuberay_rayjob_v1.schema.json").read_text())
    jsonschema.Draft201909Validator(schema).validate(job)
    cluster = job["spec"]["rayClusterSpec"]
    templates = [cluster["headGroupSpec"]["template"]] + [g["template"] for g in cluster["workerGroupSpecs"]]
    for t in templates:
        kubernetes_validate.validate({"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "x", **t["metadata"]},
                                      "spec": t["spec"]}, "1.37.0", strict=True)
    # the head runs the study from the ConfigMap, joining the cluster; the study file travels unchanged
    assert shlex.split(job["spec"]["entrypoint"]) == ["servetune", "run", "/study/study.yaml", "--ray-address", "auto",
                                                      "--output-dir", "/results/Fleet_8b"]
    assert parse_study(cm["data"]["study.yaml"], "cm.yaml").name == "Fleet_8b"
    assert job["metadata"]["name"] == "fleet-8b"
    assert job["metadata"]["namespace"] == cm["metadata"]["namespace"] == "tuning"
    head, *workers = [t["spec"]["containers"][0] for t in templates]
    assert cluster["headGroupSpec"]["rayStartParams"] == {"num-gpus": "0"}
    assert "nvidia.com/gpu" not in head["resources"]["limits"]
    # a worker group per node type, marked with the Ray resource the study's placement asks for
    groups = {g["groupName"]: g for g in cluster["workerGroupSpecs"]}
    assert set(groups) == {"h100", "a100"} and all(g["replicas"] == 2 for g in groups.values())
    assert json.loads(groups["a100"]["rayStartParams"]["resources"]) == {"accelerator_type:A100-80G": 1}
    assert [w["resources"]["limits"]["nvidia.com/gpu"] for w in workers] == ["8", "4"]
    # the model at the same path on every pod, read-only; the secrets by reference, each only where it is used
    for t, c in zip(templates, [head, *workers]):
        mount = next(m for m in c["volumeMounts"] if m["name"] == "model")
        assert mount["mountPath"] == str(model.parent) and mount["readOnly"] is True
    env = lambda c: {e["name"]: e.get("valueFrom", {}).get("secretKeyRef", {}).get("key") for e in c["env"]}  # noqa: E731
    assert env(head)["PGPASSWORD"] == "PGPASSWORD" and "HF_TOKEN" not in env(head)
    assert all(env(w)["HF_TOKEN"] == "HF_TOKEN" and "PGPASSWORD" not in env(w) for w in workers)
    # a relative model path cannot be mounted at one place on every pod: a located error
    study.write_text(study.read_text().replace(str(model), "models/llama-3.1-8b"))
    assert main(["rayjob", str(study), "--image", "i", "--model-claim", "m", "-o", str(tmp_path / "o2")]) == 2
    assert "model.path 'models/llama-3.1-8b' is relative" in capsys.readouterr().err


def test_a_node_check_names_what_the_node_lacks(tmp_path):
    """What the pinned task reports, run here (the pinning itself is exercised in test_cluster.py)."""
    model = tmp_path / "m"
    answer = check_here({"model_path": str(model),
                         "engines": [{"name": "sim"}, {"name": "vllm", "command": ["no-such-vllm", "serve"]}],
                         "shared_token": str(tmp_path / ".node-check-x")})
    assert answer["reasons"][0] == f"model path {model} does not exist"
    assert "vllm: 'no-such-vllm' is not installed here (not on PATH)" in answer["reasons"]
    assert any("output_dir is not shared with this node" in r for r in answer["reasons"])
    assert not any(r.startswith("sim:") for r in answer["reasons"])  # the sim runs on the node's own python
    model.mkdir()
    (model / "config.json").write_text("{}")
    (tmp_path / ".node-check-x").write_text("")
    assert check_here({"model_path": str(model), "shared_token": str(tmp_path / ".node-check-x")})["reasons"] == []
    if shutil.which("nvidia-smi") is None:
        assert check_here({"gpu_type": "h100"})["reasons"] == [
            "nvidia-smi is not available: no NVIDIA driver on this node"]
    for name, kind in (("NVIDIA H100 80GB HBM3", "h100"), ("NVIDIA H200", "h200"), ("NVIDIA H100 PCIe", "h100"),
                       ("NVIDIA A100-SXM4-40GB", "a100"), ("NVIDIA L40S", "l40s")):
        assert gpu_type_matches(kind, name), name
    assert not gpu_type_matches("h100", "NVIDIA A100-SXM4-80GB") and not gpu_type_matches("h100", "NVIDIA H200")
