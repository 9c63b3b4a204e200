"""The served report in a real browser (Playwright driving Debian's chromium), used as a person would use it.

``servetune report serve`` runs as a subprocess over a folder of fixture studies on a free loopback port;
chromium loads its pages and clicks through them. Every page must load without a console error. Screenshots
land in pytest's temporary folder (printed at the end of the run with ``-rA``), or in
``$SERVETUNE_TEST_ARTIFACTS`` when set.

Skipped when the ``playwright`` package or a chromium binary is missing (CI installs both: ``.ci/run``
apt-installs chromium, the ``test`` extra has playwright; never ``playwright install``).
"""
from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

import pytest

from report_fixtures import EXPECTED, HOSTILE, OOM_REASON, write_run
from servetune.reports import write_report

pytestmark = pytest.mark.browser

sync_api = pytest.importorskip("playwright.sync_api", reason="playwright is not installed (pip install playwright)")
CHROMIUM = next((p for p in (os.environ.get("SERVETUNE_CHROMIUM", "/usr/bin/chromium"), shutil.which("chromium"),
                              shutil.which("chromium-browser")) if p and os.path.isfile(p)), "")
if not CHROMIUM:
    pytest.skip("no chromium binary (apt-get install -y chromium)", allow_module_level=True)

CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]
SERVER_CHART = "sc1-1"  # scenario "server": output tokens/s/GPU vs p99 TPOT
# The second study's name tries to run script wherever it is shown (index, page title, compare labels).
HOSTILE_NAME = "<img src=x onerror=alert(2)>"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def artifacts(tmp_path_factory) -> Path:
    d = Path(os.environ["SERVETUNE_TEST_ARTIFACTS"]) if os.environ.get("SERVETUNE_TEST_ARTIFACTS") \
        else tmp_path_factory.mktemp("browser-artifacts")
    d.mkdir(parents=True, exist_ok=True)
    return d


@pytest.fixture(scope="module")
def studies(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("served")
    write_run(root / "fixture")
    write_run(root / "live", with_db=False)  # the live-refresh test writes into this one
    h200 = write_run(root / "h200", with_db=False)
    y = (h200 / "study.yaml").read_text().replace("name: fixture-study", f"name: '{HOSTILE_NAME}'")
    (h200 / "study.yaml").write_text(y)
    return root


@pytest.fixture(scope="module")
def server(studies):
    port = _free_port()
    proc = subprocess.Popen([sys.executable, "-m", "servetune.optimizer.cli", "report", "serve", str(studies),
                             "--port", str(port)], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 60
    while True:
        try:
            with urllib.request.urlopen(url + "/api/studies", timeout=5) as r:
                if r.status == 200:
                    break
        except OSError:
            pass
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            pytest.fail(f"report server did not start:\n{proc.stdout.read()}")
        time.sleep(0.2)
    # Warm the page cache so the browser's first visit does not wait for a render; the pages later tests
    # open render in the background meanwhile (the server renders in worker threads).
    urllib.request.urlopen(url + "/study/fixture", timeout=60).read()

    def warm():
        for path in ("/study/h200", "/compare?a=fixture&b=h200", "/study/live"):
            try:
                urllib.request.urlopen(url + path, timeout=60).read()
            except OSError:
                pass
    threading.Thread(target=warm, daemon=True).start()
    yield url
    proc.terminate()
    try:
        proc.wait(10)
    except subprocess.TimeoutExpired:
        proc.kill()


@pytest.fixture(scope="module")
def browser():
    with sync_api.sync_playwright() as p:
        try:
            b = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        except Exception as e:  # a chromium that cannot start here (missing libraries): not this code's fault
            pytest.skip(f"chromium at {CHROMIUM} does not start: {e}")
        yield b
        b.close()


class Page:
    """A browser tab that records console errors, uncaught exceptions and dialogs (an injected alert)."""

    def __init__(self, ctx, own_context: bool = False):
        self.ctx = ctx if own_context else None
        self.page = ctx.new_page()
        self.problems: list[str] = []
        self.page.on("console", lambda m: self.problems.append(f"console {m.type}: {m.text}")
                     if m.type == "error" else None)
        self.page.on("pageerror", lambda e: self.problems.append(f"page error: {e}"))
        self.page.on("dialog", self._dialog)

    def _dialog(self, dialog) -> None:
        self.problems.append(f"dialog: {dialog.message}")
        dialog.dismiss()

    def close(self):
        self.page.close()
        if self.ctx is not None:
            self.ctx.close()


@pytest.fixture(scope="module")
def context(browser):
    """One browser profile for the served pages: its HTTP cache keeps Plotly's bundle between tests."""
    ctx = browser.new_context(viewport={"width": 1400, "height": 1000}, accept_downloads=True)
    yield ctx
    ctx.close()


@pytest.fixture
def tab(context):
    t = Page(context)
    yield t
    t.close()
    assert t.problems == [], "\n".join(t.problems)


def _chart(page, chart_id: str) -> dict:
    """Scroll a chart into view (they are drawn lazily), wait for Plotly, return its traces."""
    page.locator(f"#{chart_id}").scroll_into_view_if_needed()
    page.wait_for_selector(f"#{chart_id} .main-svg", timeout=20_000)
    return page.evaluate(f"""() => document.getElementById({json.dumps(chart_id)}).data.map(t =>
        ({{name: t.name, numbers: (t.customdata || []).map(c => c[1])}}))""")


def test_study_page_pareto_chart_and_point_click(server, tab, artifacts):
    page = tab.page
    page.goto(f"{server}/study/fixture")
    traces = {t["name"]: t["numbers"] for t in _chart(page, SERVER_CHART)}
    assert traces["Pareto front"] == EXPECTED["server_tpot_per_gpu_front"]
    assert traces["SLA missed"] == [11] and sorted(traces["dominated"]) == [0, 5, 6]
    assert traces["baseline"] == [EXPECTED["baseline"]]
    drawn = {n for ns in traces.values() for n in ns}
    assert drawn == {0, 1, 2, 3, 4, 5, 6, 7, 8, 11}  # complete, measured, not a duplicate
    # what the eye sees: one marker per trial plus the baseline's star on top of its own point
    assert page.locator(f"#{SERVER_CHART} .scatterlayer path.point").count() == len(drawn) + 1
    page.screenshot(path=str(artifacts / "study-top.png"))

    # Click the front's third point: the drawer opens on that trial.
    names = list(traces)
    k = names.index("Pareto front")
    pt = page.locator(f"#{SERVER_CHART} .scatterlayer .trace").nth(k).locator("path.point").nth(2)
    box = pt.bounding_box()
    x, y = box["x"] + box["width"] / 2, box["y"] + box["height"] / 2
    page.mouse.move(x, y)
    page.wait_for_selector(".hoverlayer .hovertext", timeout=5_000)
    page.mouse.click(x, y)
    want = EXPECTED["server_tpot_per_gpu_front"][2]
    page.wait_for_selector("#drill:not([hidden])")
    page.wait_for_function(f"document.getElementById('drill-title').textContent.startsWith('Trial #{want} ')")
    assert page.url.endswith(f"#trial={want}")
    page.wait_for_selector("#drill-cdf .main-svg")
    page.wait_for_selector("#drill-load .main-svg")  # two server load levels
    body = page.inner_text("#drill-body")
    assert "Configuration" in body and "Launch command" in body and "roofline" in body and "estimate" in body
    page.screenshot(path=str(artifacts / "drilldown-from-chart.png"))


def test_trial_table_row_click_sort_filter_and_csv(server, tab, artifacts):
    page = tab.page
    page.goto(f"{server}/study/fixture")
    page.locator("#trials").scroll_into_view_if_needed()

    # a row opens its trial: the OOM failure with its reason and log tail
    page.click("#trial-9 td:nth-child(4)")
    page.wait_for_selector("#drill .failure")
    assert OOM_REASON in page.inner_text("#drill .failure")
    assert "torch.OutOfMemoryError" in page.inner_text("#drill-log")
    page.keyboard.press("Escape")
    page.wait_for_selector("#drill", state="hidden")

    def column(key: str) -> list[str]:
        return page.evaluate(f"""() => {{
            const t = document.getElementById('trial-table');
            const i = [...t.tHead.rows[1].cells].findIndex(th => th.dataset.key === {json.dumps(key)});
            return [...t.tBodies[0].rows].filter(r => r.dataset.trial && !r.hidden).map(r => r.cells[i].dataset.v);
        }}""")

    # sorting: ascending, then descending, absent values last both ways
    th = "#trial-table th[data-key='server.tpot_p99_ms']"
    page.click(th)
    vals = column("server.tpot_p99_ms")
    nums = [float(v) for v in vals if v != ""]
    assert nums == sorted(nums) and vals[len(nums):] == [""] * (len(vals) - len(nums)) and len(nums) == 11
    assert page.get_attribute(th, "aria-sort") == "ascending"
    page.click(th)
    vals = column("server.tpot_p99_ms")
    nums = [float(v) for v in vals if v != ""]
    assert nums == sorted(nums, reverse=True) and vals[-1] == ""
    assert column("number")[0] == "0" and nums[0] == 38.0  # the baseline's 38 ms is the slowest
    page.click("#trial-table th[data-key='number']")
    assert column("number") == [str(n) for n in range(EXPECTED["trials"])]

    # filtering: key=value, comparisons, free text, state, checkboxes
    f = page.locator("#trial-filter")
    f.fill("tensor_parallel=2")
    assert page.inner_text("#trial-count") == "showing 4 of 14 trials"
    assert set(column("param.tensor_parallel")) == {"2"}
    f.fill("server.ttft_p99_ms>1000")
    assert sorted(column("number"), key=int) == ["1", "11"]
    f.fill("flashinfer fp8 max_concurrency<=64")
    assert sorted(column("number"), key=int) == ["2", "3", "8", "10", "13"]
    f.fill("")
    page.select_option("#state-filter", "failed")
    assert column("number") == ["9"]
    page.select_option("#state-filter", "")
    page.check("#only-sla")
    # complete trials that met the SLA of every scenario: not 9, 10, 12 (not complete), nor server-16's misses
    assert set(map(int, column("number"))) == set(range(EXPECTED["trials"])) - {9, 10, 12} \
        - EXPECTED["server16_sla_missed"]
    page.uncheck("#only-sla")
    page.check("#only-front")
    assert set(map(int, column("number"))) == EXPECTED["objective_front"]
    page.uncheck("#only-front")
    f.fill("nosuchcolumn=3")
    assert "no column named nosuchcolumn" in page.inner_text("#filter-error")
    f.fill("fp8")
    shown = column("number")

    # CSV of the rows shown, downloaded in the browser
    with page.expect_download() as dl:
        page.click("button[data-csv='trial-table']")
    text = Path(dl.value.path()).read_text(encoding="utf-8")
    lines = text.strip().splitlines()
    assert lines[0].startswith("number,state,gpus,param.tensor_parallel")
    assert [ln.split(",")[0] for ln in lines[1:]] == shown
    page.screenshot(path=str(artifacts / "trial-table.png"))

    # the hostile parameter shows as text (a dialog would be recorded as a problem by the tab fixture)
    f.fill("")
    assert HOSTILE in page.inner_text("#trial-5")


def test_live_refresh_while_a_study_runs(server, studies, tab):
    page = tab.page
    page.goto(f"{server}/study/live")
    page.wait_for_selector("#trial-table")
    assert page.locator("#trial-14").count() == 0
    page.fill("#trial-filter", "complete")  # UI state survives the refresh
    # the optimizer finishes the half-written trial 14 (the file appears whole: written beside and renamed)
    t = json.loads((studies / "live" / "trials" / "0003" / "trial.json").read_text())
    t["number"] = 14
    tmp = studies / "live" / "trials" / "0014" / ".trial.json.tmp"
    tmp.write_text(json.dumps(t))
    os.replace(tmp, studies / "live" / "trials" / "0014" / "trial.json")
    page.wait_for_selector("#trial-14", state="attached", timeout=15_000)
    assert page.input_value("#trial-filter") == "complete"
    assert "live · updated" in page.inner_text("#live")
    assert "could not be read" not in page.inner_text("header")


def test_index_and_compare_view(server, tab, artifacts):
    page = tab.page
    page.goto(f"{server}/")
    rows = page.locator("#study-table tbody tr")
    assert rows.count() == 3
    assert HOSTILE_NAME in page.inner_text("#study-table")  # shown as text; an alert would fail the test
    page.screenshot(path=str(artifacts / "index.png"))
    page.select_option("#compare-a", "fixture")
    page.select_option("#compare-b", "h200")
    page.click("#compare-form button[type=submit]")
    page.wait_for_url("**/compare?a=fixture&b=h200")
    page.locator("#cmp1-1").scroll_into_view_if_needed()
    page.wait_for_selector("#cmp1-1 .main-svg", timeout=20_000)
    names = page.evaluate("document.getElementById('cmp1-1').data.map(t => t.name)")
    hostile = HOSTILE_NAME.replace("<", "&lt;").replace(">", "&gt;")  # Plotly renders pseudo-HTML: escaped
    assert "fixture-study: Pareto front" in names and f"{hostile}: Pareto front" in names
    assert HOSTILE_NAME in page.inner_text("h1")
    assert page.locator("#best-table tbody tr").count() > 0
    page.screenshot(path=str(artifacts / "compare.png"), full_page=True)
    # a click on a point opens that trial in its own study
    k = names.index(f"{hostile}: Pareto front")
    box = page.locator("#cmp1-1 .scatterlayer .trace").nth(k).locator("path.point").first.bounding_box()
    x, y = box["x"] + box["width"] / 2, box["y"] + box["height"] / 2
    page.mouse.move(x, y)
    page.wait_for_selector("#cmp1-1 .hoverlayer .hovertext", timeout=5_000)
    page.mouse.click(x, y)
    page.wait_for_url("**/study/h200#trial=*")
    page.wait_for_selector("#drill:not([hidden])")


def test_static_report_file_works_offline(studies, browser, artifacts):
    out = write_report(studies / "fixture", artifacts / "report.html")
    t = Page(browser.new_context(viewport={"width": 1400, "height": 1000}, offline=True), own_context=True)
    try:
        page = t.page
        page.goto(out.as_uri())
        traces = {tr["name"]: tr["numbers"] for tr in _chart(page, SERVER_CHART)}
        assert traces["Pareto front"] == EXPECTED["server_tpot_per_gpu_front"]
        page.locator("#trials").scroll_into_view_if_needed()
        page.click("#trial-3 td:nth-child(4)")  # the drill-down comes from the file itself
        page.wait_for_selector("#drill-cdf .main-svg")
        page.screenshot(path=str(artifacts / "static-drilldown.png"))
    finally:
        t.close()
    assert t.problems == [], "\n".join(t.problems)
