"""Nobody let in: no shell anywhere, loopback by default, user strings escaped, secrets never on disk."""
from __future__ import annotations

import asyncio
import json
import re
from pathlib import Path

import pytest
from aiohttp.test_utils import TestClient, TestServer

from reliability_helpers import (
    WORKER_ENV,
    argv_port,
    fake_study,
    listening,
    ray_local,  # noqa: F401  (the session's Ray instance)
    run_study_inprocess,
    trials,
)
from report_fixtures import write_run
from servetune.optimizer import cli, process
from servetune.optimizer.cli import build_parser
from servetune.optimizer.driver import StudyDriver, resolve_model
from servetune.optimizer.engines import get_engine
from servetune.optimizer.export import export
from servetune.optimizer.lifecycle import run_trial
from servetune.optimizer.spec import StudySpec, load_study
from servetune.reports import serve as serve_mod
from servetune.reports.serve import make_app
from study_fixtures import write_study

ROOT = Path(__file__).resolve().parent.parent
SECRET = WORKER_ENV["HF_TOKEN"]  # hf_planted_secret_123
SHELL = re.compile(r"shell\s*=\s*True|\bos\.system\s*\(|\bos\.popen\s*\(|create_subprocess_shell|"
                   r"\bcommands\.getoutput|\bpty\.spawn")


def test_no_shell_anywhere_in_the_code():
    hits = []
    for top in ("optimizer", "loadgen", "reports", "benchmarks", "tests", "search_spaces", "deploy_templates"):
        for p in sorted((ROOT / top).rglob("*.py")):
            if p.name == "test_security.py":
                continue
            for i, line in enumerate(p.read_text(encoding="utf-8", errors="replace").splitlines(), 1):
                if SHELL.search(line):
                    hits.append(f"{p.relative_to(ROOT)}:{i}: {line.strip()}")
    assert not hits, "commands are argv lists, never a shell:\n" + "\n".join(hits)


def test_servers_bind_loopback_unless_the_study_says_otherwise(tmp_path):
    spec = load_study(str(write_study(tmp_path)))
    assert StudySpec.model_fields["host"].default == "127.0.0.1" and spec.host == "127.0.0.1"
    eng = get_engine("sim")
    port = process.free_port(spec.host)
    launch = eng.plan({}, resolve_model(spec), host=spec.host, port=port, gpu_ids=[0])
    assert launch.argv[launch.argv.index("--host") + 1] == "127.0.0.1"
    # the real socket: started as the lifecycle starts it, it listens on 127.0.0.1 only
    ep = process.start(launch.argv, launch.env, tmp_path / "engine.log", f"http://127.0.0.1:{port}")
    try:
        assert process.wait_healthy(ep, launch.health_path, 60) is None, ep.log_tail()
        assert listening(port) == ["0100007F"], listening(port)  # 127.0.0.1, little-endian hex
    finally:
        process.stop(ep, grace_s=5)
    assert not listening(port)
    # a study that asks for another address gets it, explicitly
    other = eng.plan({}, resolve_model(spec), host="0.0.0.0", port=port, gpu_ids=[0])
    assert other.argv[other.argv.index("--host") + 1] == "0.0.0.0"
    # the report server's default is loopback too
    args = build_parser().parse_args(["report", "serve", str(tmp_path)])
    assert args.host == "127.0.0.1"


def test_report_escaping_is_covered_by_the_report_tests():
    """User strings (study names, params, failure reasons) are escaped: see these tests."""
    text = (ROOT / "tests" / "test_reports.py").read_text()
    assert "def test_report_escapes_user_strings" in text
    features = (ROOT / "tests" / "test_report_features.py").read_text()
    assert "def test_static_report_inlines_drilldowns_and_escapes" in features


@pytest.mark.slow
@pytest.mark.usefixtures("ray_local")
def test_planted_hf_token_never_reaches_disk(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("HF_TOKEN", SECRET)
    # the engine prints its whole environment into engine.log; trial 1 crashes at start with an error line
    # that quotes the token, and the failure reason quotes that line
    study, marker = fake_study(tmp_path, name="secret", fake_args=["--print-env", "--fault-by-trial",
                                                                   "--secret-in-error"], sampler="random",
                               search="memory_fraction: {low: 0.5, high: 0.95}", trials=2, parallel=2,
                               env=', HF_TOKEN: "${HF_TOKEN}"')
    run_study_inprocess(study)
    run = tmp_path / "run"
    got = trials(run)
    assert [t["state"] for t in got.values()] == ["complete", "failed"], got
    assert "token ${HF_TOKEN} may not read" in got[1]["failure"]["reason"], got[1]["failure"]
    assert cli.main(["report", str(run)]) == 0
    assert (run / "report.html").exists()
    exported = export(run, trial="best", fmt="json", out_dir=run / "export")
    assert exported.files
    out, err = capsys.readouterr()
    assert SECRET not in out + err
    # the engine really had it (its log shows the redacted reference where the value was)
    log = (run / "trials" / "0000" / "engine.log").read_text()
    assert "ENV HF_TOKEN=${HF_TOKEN}" in log, log[:2000]
    # ... and the literal is nowhere in the run directory: logs, trial.json (argv/env), summary, report,
    # the Optuna database, the study copy, exports
    leaks = [str(p.relative_to(run)) for p in run.rglob("*") if p.is_file() and SECRET.encode() in p.read_bytes()]
    assert not leaks, f"the planted secret was written to {leaks}"
    for t in got.values():
        assert SECRET not in repr(t)
        assert argv_port(t["argv"]) and not listening(argv_port(t["argv"]))



def test_ray_on_loopback_and_its_cleanup_after_a_killed_driver_are_covered_by_the_e2e_test():
    """A local study's Ray listens on loopback only and a killed driver's Ray processes are ended by the next
    start: asserted during the real CLI run of test_killed_driver_resumes_without_losing_completed_trials (one
    Ray start serves both; a Ray start is the slowest thing a test can do here)."""
    text = (ROOT / "tests" / "test_study_e2e.py").read_text()
    assert "def test_killed_driver_resumes_without_losing_completed_trials" in text
    assert "listening_sockets(" in text and "LOOPBACK_HEX" in text and "ray.json" in text


def test_values_from_references_are_masked_whatever_the_key_or_flag_is_named(tmp_path, monkeypatch):
    """Redaction by value: `env: {HF_AUTH: "${SVC_CONF}"}` (no secret-looking name anywhere) and
    `extra_args: [--auth-token, "${SVC_FLAG}"]`: the engine gets both values, echoes them into its log and its
    failure line, and neither value is in engine.log, the failure reason or trial.json afterwards (one trial,
    in-process, on the fault-injecting engine: no Ray needed)."""
    env_value, flag_value = "by-value-0f3e9a7c55", "flag-value-7d1b2e4a90"
    monkeypatch.setenv("SVC_CONF", env_value)
    monkeypatch.setenv("SVC_FLAG", flag_value)
    study, _ = fake_study(tmp_path, name="byvalue", fake_args=["--print-env", "--fault", "crash_start",
                                                              "--secret-in-error", "--secret-var", "HF_AUTH"],
                          search="max_concurrency: [8]", trials=1, env=', HF_AUTH: "${SVC_CONF}"')
    text = study.read_text()
    assert text.count("\n    env:") == 1
    study.write_text(text.replace("\n    env:", '\n    extra_args: [--auth-token, "${SVC_FLAG}"]\n    env:'))
    driver = StudyDriver(load_study(str(study)))
    plan = driver.build_plan(0, "sim", {}, False, tmp_path / "run" / "trials" / "0000")
    result = run_trial(plan, [0])
    log = (tmp_path / "run" / "trials" / "0000" / "engine.log").read_text()
    record = (tmp_path / "run" / "trials" / "0000" / "trial.json").read_text()
    assert result.state == "failed" and "token ${SVC_CONF} may not read" in result.failure["reason"]
    assert "ENV HF_AUTH=${SVC_CONF}" in log and "'--auth-token', '${SVC_FLAG}'" in log, log[-2000:]
    for value in (env_value, flag_value):
        assert value not in log and value not in record and value not in json.dumps(result.to_dict())
    assert "${SVC_FLAG}" in json.loads(record)["argv"]  # the recorded argv keeps the reference


@pytest.fixture(scope="module")
def served(tmp_path_factory) -> Path:
    """A folder of studies to serve: the report fixture run, with a scenario named like a spreadsheet formula."""
    root = tmp_path_factory.mktemp("served-root")
    run = write_run(root / "team" / "study", with_db=False)
    for p in [run / "study.yaml", *run.glob("trials/*/trial.json")]:
        p.write_text(p.read_text().replace("server-16", FORMULA))
    for p in run.glob("trials/*/requests_server-16.csv"):
        p.rename(p.with_name(f"requests_{FORMULA}.csv"))
    return root


FORMULA = "=HYPERLINK(0)"


def _serve(root: Path, fn):
    async def go():
        async with TestClient(TestServer(make_app(root))) as client:
            return await fn(client)
    return asyncio.run(go())


def test_report_server_hides_its_root_refuses_forged_hosts_bounds_its_cache_and_guards_csv_headers(served,
                                                                                                   monkeypatch):
    monkeypatch.setattr(serve_mod, "DETAILS_CACHED", 2)
    secret_dir = str(served.resolve())

    async def fn(c):
        r = await c.get("/api/studies")
        body = await r.text()
        assert r.status == 200 and secret_dir not in body
        data = json.loads(body)
        assert data["root"] == served.name and [s["path"] for s in data["studies"]] == ["team/study"]
        html = await (await c.get("/")).text()
        assert secret_dir not in html and "team/study" in html
        for url in ("/study/nope", "/api/studies/nope", "/api/studies/nope/trials/1", "/no/such/page"):
            r = await c.get(url)
            assert r.status == 404 and secret_dir not in await r.text(), url
        # the Host guard: a loopback name, with an optional port, and nothing else
        for host, status in (("localhost:8050", 200), ("127.0.0.1", 200), ("[::1]:8050", 200),
                             ("localhost:1@evil.com", 403), ("localhost@evil.com", 403), ("evil.com:8050", 403),
                             ("localhost:8050:1", 403), ("localhost.evil.com", 403), ("[::1]x", 403), ("", 403)):
            r = await c.get("/api/studies/team~study", headers={"Host": host})
            assert r.status == status, (host, r.status)
        # the trial-detail cache: numbers of no trial are never kept, the rest at most DETAILS_CACHED
        for n in range(1000, 1040):
            assert (await c.get(f"/api/studies/team~study/trials/{n}")).status == 404
        for n in (1, 2, 3, 1):
            assert (await c.get(f"/api/studies/team~study/trials/{n}")).status == 200
        assert list(c.server.app[serve_mod.STUDIES].entry("team~study").details) == [3, 1]  # LRU order
        # trials.csv: the header row gets the formula guard too (a scenario named =HYPERLINK(0))
        header = (await (await c.get("/api/studies/team~study/trials.csv")).text()).splitlines()[0]
        assert f"'{FORMULA}." in header and not [h for h in header.split(",") if h.startswith(("=", "+", "-", "@"))]
    _serve(served, fn)
