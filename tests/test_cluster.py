"""One study over a Ray cluster of several nodes, on this one CPU machine: ``ray.cluster_utils.Cluster`` starts a
head (no GPUs, where the driver runs) and three nodes that declare 2, 4 and 2 GPUs, each with its own Ray temp dir
and TMPDIR. The sim engine runs real HTTP servers on them; results, engine logs and per-request files come home
through Ray's object store. One cluster serves every test of this module (it takes seconds to start).

Studies: three nodes against one node (the same configurations, states and report); a node removed mid-study
(its trials re-queued and measured elsewhere); a heterogeneous cluster (the GPU type searched, each trial on a
node of its type); a node without the model (left out by name, a config only it could hold rejected there);
two drivers on one PostgreSQL study (no configuration measured twice) and a third on an empty run directory.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import textwrap
import threading
import time
from pathlib import Path
from typing import TYPE_CHECKING

import optuna
import pytest
import ray
from ray._private.utils import get_ray_address_file
from ray.cluster_utils import Cluster
from ray.util.placement_group import placement_group_table

from pg_server import postgres_server
from servetune.optimizer.cluster_execution import scratch_root
from servetune.optimizer.driver import StudyDriver
from servetune.optimizer.perfmodel.model_shapes import load_shape
from servetune.optimizer.process import reap_orphan
from servetune.optimizer.spec import load_study
from servetune.optimizer.storage_url import expand
from servetune.reports.html import write_report
from servetune.reports.model import load_run
from study_fixtures import write_study

if TYPE_CHECKING:
    from ray._private.node import Node

pytestmark = pytest.mark.slow

NODES = (("gpu0", 2, "A100"), ("gpu1", 4, "H100"), ("gpu2", 2, "H100"))
ENV = {"SERVETUNE_STOP_GRACE_S": "3", "SERVETUNE_GPU_FREE_TIMEOUT_S": "5"}


class SimCluster:
    def __init__(self, root: Path):
        self.root = root
        # Cluster() records the head's address in Ray's default temp dir (/tmp/ray) without creating that dir:
        # on a fresh machine where Ray never started with its defaults (the CI box) the head fails to start.
        os.makedirs(os.path.dirname(get_ray_address_file(None)), exist_ok=True)
        for k, v in ENV.items():
            os.environ.setdefault(k, v)
        self.cluster = Cluster(initialize_head=True, head_node_args=dict(
            num_cpus=2, num_gpus=0, node_name="head", temp_dir=str(root / "head-ray")))
        self.nodes: dict[str, Node] = {}
        self.extra: list[subprocess.Popen] = []  # nodes started by `ray start` (their process groups)
        for name, gpus, acc in NODES:
            self.add(name, gpus, acc)
        self.cluster.wait_for_nodes()

    def add(self, name: str, gpus: int, acc: str):
        tmp = self.root / f"{name}-tmp"
        tmp.mkdir(parents=True, exist_ok=True)
        self.nodes[name] = self.cluster.add_node(
            num_cpus=1, num_gpus=gpus, node_name=name, resources={f"accelerator_type:{acc}": 1},
            temp_dir=str(self.root / f"{name}-ray"), env_vars={"TMPDIR": str(tmp), **ENV})
        return self.nodes[name]

    @property
    def address(self) -> str:
        return self.cluster.address

    def node_tmp(self, name: str) -> Path:
        return self.root / f"{name}-tmp"

    def shutdown(self) -> None:
        for p in self.extra:
            _stop_group(p)
        if ray.is_initialized():
            ray.shutdown()
        self.cluster.shutdown()


def _stop_group(p: subprocess.Popen) -> None:
    try:
        os.killpg(p.pid, signal.SIGTERM)
        p.wait(timeout=40)
    except (ProcessLookupError, subprocess.TimeoutExpired):
        try:
            os.killpg(p.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


@pytest.fixture(scope="module")
def sim_cluster():
    root = Path(tempfile.mkdtemp(prefix="st-ray-"))  # short: Ray's socket paths live under it (108 bytes max)
    c = SimCluster(root)
    try:
        yield c
    finally:
        c.shutdown()
        shutil.rmtree(root, ignore_errors=True)


def _records(run: Path) -> dict[int, dict]:
    return {int(p.parent.name): json.loads(p.read_text()) for p in sorted((run / "trials").glob("*/trial.json"))}


def _config(r: dict) -> tuple:
    return (r["engine"], tuple(sorted((k, str(v)) for k, v in r["params"].items())))


def _run(study: Path, address: str | None, output_dir: str | None = None, trials: int | None = None):
    spec = load_study(study)
    if output_dir:
        spec.output_dir = output_dir
    if trials:
        spec.budget.trials = trials
    events: list[tuple[str, dict]] = []
    d = StudyDriver(spec, on_event=lambda k, data: events.append((k, data)), ray_address=address)
    return d, d.run(), events


def _notes(events) -> list[str]:
    return [d["text"] for k, d in events if k == "note"]


def _cli_run(study: Path, *args: str, env: dict | None = None) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "servetune.optimizer.cli", "run", str(study), "--no-report", *args],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env={**os.environ, **ENV, **(env or {})})


GRID = """
  tensor_parallel: [1, 2, 4]
  max_concurrency: [16]
"""


def test_a_study_over_three_nodes_reports_what_one_node_does(sim_cluster, tmp_path):
    study = write_study(tmp_path, trials=3, parallel=3, duration_s=1.5, qps=4, gpus=8, search=GRID,
                        sampler="{kind: grid, seed: 1}", extra="baseline: false\n")
    # the one-node reference runs at the same time, in its own process with a local Ray instance
    # (RAY_ADDRESS=local: a new instance, not the cluster this machine already runs)
    local = _cli_run(study, "--output-dir", str(tmp_path / "one-node"), env={"RAY_ADDRESS": "local"})
    _, outcome, events = _run(study, sim_cluster.address)
    out, _ = local.communicate(timeout=300)
    assert local.returncode == 0, out

    run, one = tmp_path / "run", tmp_path / "one-node"
    recs, ref = _records(run), _records(one)
    # the same study: every configuration of the grid, each in the same state, once
    assert sorted(map(_config, recs.values())) == sorted(map(_config, ref.values()))
    assert len(recs) == 3 and {r["state"] for r in recs.values()} == {r["state"] for r in ref.values()} == {"complete"}
    # over the three nodes (best fit: the 1- and 2-GPU trials on the 2-GPU nodes, the 4-GPU trial on the one
    # node that has 4), GPUs never shared on a node
    names = {r["node"].split()[0] for r in recs.values()}
    assert names == {"gpu0", "gpu1", "gpu2"}, [(r["gpus"], r["node"]) for r in recs.values()]
    assert all(r["node"].startswith("gpu1") for r in recs.values() if r["gpus"] == 4)
    assert all(len(r["gpu_ids"]) == r["gpus"] for r in recs.values())
    assert all(r["node"] == "" for r in ref.values())
    summary = json.loads((run / "summary.json").read_text())
    assert summary["gpu_use"]["shared"] == [] and summary["stopped_because"] == "trial budget reached"
    # every file came home from the node that ran it; nothing stayed in the nodes' scratch
    for n, r in recs.items():
        d = run / "trials" / f"{n:04d}"
        assert {"trial.json", "engine.log", "requests_server.csv"} <= {p.name for p in d.iterdir()}, n
        assert (d / "engine.log").stat().st_size > 0 and len((d / "requests_server.csv").read_text().splitlines()) > 2
    for name, _, _ in NODES:
        left = list((sim_cluster.node_tmp(name) / "servetune-trials").rglob("*.*"))
        assert left == [], left
    # the same report: the same columns, scenarios, objectives and per-config outcome; the same sections
    a, b = load_run(run), load_run(one)
    assert list(a.trials.columns) == list(b.trials.columns)
    assert [s.name for s in a.scenarios] == [s.name for s in b.scenarios]
    assert [o.column for o in a.objectives] == [o.column for o in b.objectives]
    assert a.state_counts() == b.state_counts()
    ha, hb = write_report(run).read_text(), write_report(one).read_text()
    sections = lambda h: re.findall(r'<section[^>]*id="([^"]+)"', h)  # noqa: E731
    assert sections(ha) == sections(hb) and sections(ha)
    assert a.trials["node"].notna().all() and b.trials["node"].isna().all()
    assert not any("left out" in t for t in _notes(events))


def test_a_heterogeneous_cluster_searches_the_gpu_type_and_places_each_trial_on_its_type(sim_cluster, tmp_path):
    study = write_study(tmp_path, trials=4, parallel=4, duration_s=1, qps=4, gpus=8, search="""
      tensor_parallel: [1, 4]
    """, sampler="{kind: grid, seed: 2}", extra=textwrap.dedent("""
    baseline: false
    cluster:
      node_types:
        - {gpu: h100, gpus_per_node: 4}
        - {gpu: a100, gpus_per_node: 2}
    """))
    _, _, events = _run(study, sim_cluster.address)
    recs = _records(tmp_path / "run")
    by = {(r["params"]["gpu"], r["params"]["tensor_parallel"]): r for r in recs.values()}
    assert set(by) == {("h100", 1), ("h100", 4), ("a100", 1), ("a100", 4)}
    # an A100 node has 2 GPUs: the rules of that node type reject tensor_parallel 4 before any launch
    assert by[("a100", 4)]["state"] == "rejected" and "a trial may use 2" in by[("a100", 4)]["failure"]["reason"]
    for (gpu, tp), r in by.items():
        if r["state"] == "rejected":
            continue
        assert r["state"] == "complete", r
        assert r["node"].split()[0] in ({"gpu0"} if gpu == "a100" else {"gpu1", "gpu2"}), (gpu, r["node"])
        assert r["argv"][r["argv"].index("--gpu") + 1] == gpu  # the sim imitates the node's GPU


def _tiny_model(root: Path) -> Path:
    d = root / "models" / "tiny"
    d.mkdir(parents=True)
    (d / "config.json").write_text(json.dumps(load_shape("llama-3.2-1b", None)))
    return d


def _start_node_without(sim_cluster, hidden: Path, name: str, gpus: int) -> str:
    """A Ray node whose file system lacks ``hidden`` (a tmpfs mounted over it in its own mount namespace)."""
    if not shutil.which("unshare"):
        pytest.skip("unshare is not available to give a Ray node its own view of the file system")
    probe = subprocess.run(["unshare", "-m", "--propagation", "private", "sh", "-c",
                            f"mount -t tmpfs tmpfs {hidden} && test ! -e {hidden}/config.json"], capture_output=True)
    if probe.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs in a private mount namespace here: {probe.stderr.decode()[:200]}")
    ray_bin = str(Path(sys.executable).parent / "ray")
    p = subprocess.Popen(["unshare", "-m", "--propagation", "private", "sh", "-c",
                          f'mount -t tmpfs tmpfs {hidden} && exec "$0" start --address {sim_cluster.address} '
                          f"--num-cpus 1 --num-gpus {gpus} --node-name {name} --block", ray_bin],
                         start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                         env={**os.environ, **ENV})
    sim_cluster.extra.append(p)
    if not ray.is_initialized():
        ray.init(address=sim_cluster.address)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        found = [n["NodeID"] for n in ray.nodes() if n["NodeName"] == name and n["Alive"]]
        if found:
            return found[0]
        time.sleep(0.5)
    raise AssertionError(f"node {name} did not join")


def test_a_node_without_the_model_is_left_out_by_name(sim_cluster, tmp_path):
    model = _tiny_model(tmp_path)
    _start_node_without(sim_cluster, model.parent, "nomodel", 8)
    try:
        study = write_study(tmp_path, trials=2, parallel=2, duration_s=1, qps=4, gpus=8, search="""
          tensor_parallel: [1, 8]
        """, sampler="{kind: grid, seed: 3}", extra="baseline: false\n")
        study.write_text(study.read_text().replace("model: {preset: llama-3.2-1b}", f"model: {{path: {model}}}"))
        _, _, events = _run(study, sim_cluster.address)
    finally:
        _stop_group(sim_cluster.extra.pop())
    recs = {r["params"]["tensor_parallel"]: r for r in _records(tmp_path / "run").values()}
    assert any(t.startswith("node nomodel") and f"model path {model} does not exist" in t and "left out" in t
               for t in _notes(events)), _notes(events)
    # only the node without the model had 8 GPUs: the config is rejected, naming that node and why
    reason = recs[8]["failure"]["reason"]
    assert recs[8]["state"] == "rejected" and "nomodel" in reason and "does not exist" in reason, reason
    assert recs[1]["state"] == "complete" and not recs[1]["node"].startswith("nomodel")


def test_two_drivers_share_one_postgresql_study_and_a_third_resumes_on_an_empty_run_dir(sim_cluster, tmp_path):
    with postgres_server() as pg:
        os.environ["ST_TEST_PGPASSWORD"] = pg.password
        url = f"postgresql+psycopg://{pg.user}:${{ST_TEST_PGPASSWORD}}@{pg.host}:{pg.port}/{pg.database}"
        # 2 configurations, 5 trials over both drivers, the same sampler seed: both draw the same config first
        study = write_study(tmp_path, trials=5, parallel=2, duration_s=1.5, qps=4, gpus=8, search="""
          tensor_parallel: [1, 2]
        """, sampler="{kind: random, seed: 7}", extra=f"baseline: false\nstorage: {url}\n")
        other = _cli_run(study, "--ray-address", sim_cluster.address, "--output-dir", str(tmp_path / "d1"))
        time.sleep(1.0)
        _run(study, sim_cluster.address, output_dir=str(tmp_path / "d2"))
        out, _ = other.communicate(timeout=300)
        assert other.returncode == 0, out
        assert pg.password not in out

        st = optuna.load_study(study_name="itest", storage=expand(url))
        trials = st.get_trials(deepcopy=False)
        measured: dict[tuple, list[int]] = {}
        for d in ("d1", "d2"):
            for n, r in _records(tmp_path / d).items():
                if (tmp_path / d / "trials" / f"{n:04d}" / "engine.log").exists():
                    measured.setdefault(_config(r), []).append(n)
        # each configuration launched once, by one of the two drivers; the others took its result
        assert measured and all(len(v) == 1 for v in measured.values()), measured
        done = [t for t in trials if t.state.is_finished() and not t.user_attrs.get("servetune.stale")]
        assert len(done) >= 5 and len(measured) == 2
        # the driver that finished last holds every trial's record (the other's restored from the storage),
        # including trials the other measured (a record without an engine log that is no duplicate)
        held = [set(_records(tmp_path / d)) for d in ("d1", "d2")]
        assert any({t.number for t in done} <= h for h in held), held
        restored = [r for d in ("d1", "d2") for n, r in _records(tmp_path / d).items()
                    if r["duplicate_of"] is None and not (tmp_path / d / "trials" / f"{n:04d}" / "engine.log").exists()]
        assert restored
        # a driver restarted elsewhere, with an empty run directory: nothing measured again, budget continued
        _, outcome, events = _run(study, sim_cluster.address, output_dir=str(tmp_path / "d3"), trials=7)
        recs = _records(tmp_path / "d3")
        assert {t.number for t in done} <= set(recs) and len(recs) > len(done)
        assert not list((tmp_path / "d3" / "trials").glob("*/engine.log"))  # known configs: results reused
        assert any("restored from the study's storage" in t for t in _notes(events))
        assert (tmp_path / "d3" / "study.yaml").read_text().count(pg.password) == 0


def test_a_node_removed_mid_study_loses_nothing(sim_cluster, tmp_path):
    """Last in the module: it takes a node away (and gives the cluster a fresh one back)."""
    study = write_study(tmp_path, trials=3, parallel=3, duration_s=3, qps=4, gpus=8, search="""
      tensor_parallel: [1, 2]
      max_concurrency: [8, 16, 32]
    """, sampler="{kind: grid, seed: 4}", extra="baseline: false\n")
    by_id = {n.node_id: name for name, n in sim_cluster.nodes.items()}
    removed: dict[str, str] = {}

    def remove_a_busy_node():
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and not removed:
            try:
                table = placement_group_table()
            except Exception:
                table = {}
            busy = [nid for pg in table.values() if pg.get("state") == "CREATED"
                    for nid in pg.get("bundles_to_node_id", {}).values() if nid in by_id]
            if busy:
                time.sleep(2.0)  # the trial is under load by now
                removed[busy[0]] = by_id[busy[0]]
                sim_cluster.cluster.remove_node(sim_cluster.nodes.pop(by_id[busy[0]]))
                return
            time.sleep(0.2)

    if not ray.is_initialized():
        ray.init(address=sim_cluster.address)
    t = threading.Thread(target=remove_a_busy_node, daemon=True)
    t.start()
    try:
        _, outcome, events = _run(study, sim_cluster.address)
    finally:
        t.join(timeout=5)
        for nid, name in removed.items():  # its engines outlived it (own sessions): what a dead machine takes
            for pid in (sim_cluster.node_tmp(name) / "servetune-trials").rglob("engine.pid"):
                reap_orphan(pid)
    assert removed, "no node was removed"
    (nid, name), = removed.items()
    recs = _records(tmp_path / "run")
    lost = {n: r for n, r in recs.items() if r.get("stale")}
    assert lost and all(f"node {name}" in r["failure"]["reason"] and "left the cluster" in r["failure"]["reason"]
                        for r in lost.values()), lost
    # each lost configuration was queued again and measured on a node still there
    done = {_config(r): r for r in recs.values() if r["state"] == "complete"}
    for r in lost.values():
        assert _config(r) in done and not done[_config(r)]["node"].startswith(name)
    assert len(done) == 3 and outcome.stopped_because == "trial budget reached"
    for n, r in recs.items():
        if r["state"] == "complete":
            files = {p.name for p in (tmp_path / "run" / "trials" / f"{n:04d}").iterdir()}
            assert {"trial.json", "engine.log", "requests_server.csv"} <= files
    assert scratch_root(nid)  # (the removed node's scratch is gone with it)
    sim_cluster.add(name, dict((n, g) for n, g, _ in NODES)[name], dict((n, a) for n, _, a in NODES)[name])
