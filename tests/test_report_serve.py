"""``servetune report serve``: the local report app's pages and endpoints, through aiohttp's test client."""
from __future__ import annotations

import asyncio
import csv
import fcntl
import io
import json
import os
import shutil
import time
from pathlib import Path

import pytest
from aiohttp.test_utils import TestClient, TestServer

from report_fixtures import EXPECTED, HOSTILE, OOM_REASON, write_run
from servetune.reports.serve import STUDIES, csv_safe, discover, driver_running, fingerprint, make_app


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Path:
    r = tmp_path_factory.mktemp("studies")
    write_run(r / "fixture")
    write_run(r / "team" / "h200", with_db=False)  # nested one level down, same study name
    (r / "notes").mkdir()  # not a study
    (r / "notes" / "readme.txt").write_text("hi")
    return r


def _call(app, fn):
    async def go():
        async with TestClient(TestServer(app)) as client:
            return await fn(client)
    return asyncio.run(go())


def test_discover_finds_nested_run_dirs(root):
    found = discover(root)
    assert found == {"fixture": root / "fixture", "team~h200": root / "team" / "h200"}
    assert discover(root / "fixture") == {"fixture": root / "fixture"}  # DIR may be a run dir itself


def test_index_and_study_list(root):
    async def fn(c):
        r = await c.get("/")
        assert r.status == 200 and r.headers["Content-Type"].startswith("text/html")
        html = await r.text()
        assert 'href="/study/fixture"' in html and 'href="/study/team~h200"' in html
        assert "Content-Security-Policy" in r.headers and r.headers["X-Content-Type-Options"] == "nosniff"
        r = await c.get("/api/studies")
        data = await r.json()
        by_id = {s["id"]: s for s in data["studies"]}
        assert set(by_id) == {"fixture", "team~h200"}
        s = by_id["fixture"]
        assert (s["name"], s["trials"], s["skipped"]) == ("fixture-study", EXPECTED["trials"], EXPECTED["skipped"])
        assert s["states"] == {"complete": 11, "failed": 1, "rejected": 1, "running": 1}
        assert s["headline"]["best"] == "4,300 tok/s/GPU" and s["headline"]["trial"] == 6
        assert s["driver_running"] is False
    _call(make_app(root), fn)


def test_study_page_and_trial_api(root):
    async def fn(c):
        r = await c.get("/study/fixture")
        html = await r.text()
        assert r.status == 200 and 'id="trial-table"' in html and 'src="/static/plotly.min.js"' in html
        assert HOSTILE not in html and "&lt;script&gt;alert(1)&lt;/script&gt;" in html
        page = json.loads(html.split('id="st-page">', 1)[1].split("</script>", 1)[0])
        assert page["mode"] == "serve" and page["study"] == "fixture" and len(page["version"]) == 16
        r = await c.get("/api/studies/fixture/trials/9")
        d = await r.json()
        assert r.status == 200 and d["failure"]["reason"] == OOM_REASON and "OutOfMemoryError" in d["log_tail"]
        r = await c.get("/api/studies/fixture/trials/5")
        assert HOSTILE in json.dumps((await r.json())["config"])  # raw data; the page inserts it as text
        assert (await c.get("/api/studies/fixture/trials/99")).status == 404
        assert (await c.get("/api/studies/fixture/trials/x")).status == 400
        assert (await c.get("/study/nope")).status == 404
        assert (await c.get("/study/..~..~etc")).status == 404
        r = await c.get("/static/plotly.min.js")
        assert r.status == 200 and len(await r.read()) > 3_000_000
    _call(make_app(root), fn)


def test_trials_csv_endpoint(root):
    async def fn(c):
        r = await c.get("/api/studies/fixture/trials.csv")
        assert r.status == 200 and r.headers["Content-Type"].startswith("text/csv")
        assert 'filename="fixture-trials.csv"' in r.headers["Content-Disposition"]
        rows = list(csv.DictReader(io.StringIO(await r.text())))
        assert len(rows) == EXPECTED["trials"]
        assert rows[9]["failure_reason"] == OOM_REASON and rows[3]["param.tensor_parallel"] == "2"
        assert rows[3]["trial_dir"] == os.path.join("trials", "0003")  # relative: no server paths leak
        assert rows[5]["param.attention_backend"] == HOSTILE  # CSV is data, not HTML
    _call(make_app(root), fn)
    assert csv_safe("=HYPERLINK(1)") == "'=HYPERLINK(1)" and csv_safe("-1.5") == "-1.5" and csv_safe(3) == 3


def test_live_version_changes_when_a_trial_is_written(tmp_path):
    run = write_run(tmp_path / "live", with_db=False)
    app = make_app(tmp_path)

    async def fn(c):
        v1 = (await (await c.get("/api/studies/live")).json())["version"]
        assert (await (await c.get("/api/studies/live")).json())["version"] == v1  # stable while nothing moves
        # the half-written trial 14 is finished by the optimizer
        t = json.loads((run / "trials" / "0003" / "trial.json").read_text())
        t["number"] = 14
        (run / "trials" / "0014" / "trial.json").write_text(json.dumps(t))
        s = await (await c.get("/api/studies/live")).json()
        assert s["version"] != v1 and s["active"] is True  # no driver lock: recent files mean running
        html = await (await c.get("/study/live")).text()
        assert 'id="trial-14"' in html
        studies = await (await c.get("/api/studies")).json()
        assert studies["studies"][0]["trials"] == EXPECTED["trials"] + 1
    _call(app, fn)


def test_driver_lock_means_running(tmp_path):
    run = write_run(tmp_path / "r", with_db=False)
    assert driver_running(run) is False
    with open(run / ".lock", "w") as f:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        assert driver_running(run) is True
    assert driver_running(run) is False  # released: the file stays, the study is idle


def test_fingerprint_ignores_what_does_not_change_the_report(tmp_path):
    run = write_run(tmp_path / "r", with_db=False)
    v, newest, n = fingerprint(run)
    (run / "trials" / "0003" / "engine.log").write_text("more log\n")
    assert fingerprint(run)[0] == v and n == 15 and newest <= time.time()
    (run / "trials" / "0015").mkdir()  # a trial starting: its folder before its file
    assert fingerprint(run)[0] != v


def test_host_header_guard(root):
    async def fn(c):
        assert (await c.get("/", headers={"Host": "evil.example:8050"})).status == 403
        assert (await c.get("/api/studies", headers={"Host": "attacker.test"})).status == 403
        assert (await c.get("/", headers={"Host": "localhost:8050"})).status == 200
        assert (await c.get("/", headers={"Host": "[::1]:8050"})).status == 200
    _call(make_app(root), fn)

    async def open_host(c):  # bound to every interface on purpose: names are not checked
        assert (await c.get("/", headers={"Host": "box.lan:8050"})).status == 200
    _call(make_app(root, host="0.0.0.0"), open_host)


def test_compare_page_and_poll(root):
    async def fn(c):
        r = await c.get("/compare", params={"a": "fixture", "b": "team~h200"})
        html = await r.text()
        assert r.status == 200 and "fixture (A)" not in html  # distinct folders name them
        assert 'href="/study/fixture"' in html and 'href="/study/team~h200"' in html
        page = json.loads(html.split('id="st-page">', 1)[1].split("</script>", 1)[0])
        assert page["links"] == {"A": "/study/fixture", "B": "/study/team~h200"}
        v = await (await c.get(page["poll"].replace("&amp;", "&"))).json()
        assert v["version"] == page["version"]
        assert (await c.get("/compare", params={"a": "fixture"})).status == 400
        assert (await c.get("/compare", params={"a": "fixture", "b": "gone"})).status == 404
    _call(make_app(root), fn)


def test_removed_study_disappears(tmp_path):
    write_run(tmp_path / "a", with_db=False)
    b = write_run(tmp_path / "b", with_db=False)
    app = make_app(tmp_path)

    async def fn(c):
        assert len((await (await c.get("/api/studies")).json())["studies"]) == 2
        shutil.rmtree(b)
        app[STUDIES]._scanned = 0.0  # skip the scan cache's few seconds
        assert [s["id"] for s in (await (await c.get("/api/studies")).json())["studies"]] == ["a"]
    _call(app, fn)
