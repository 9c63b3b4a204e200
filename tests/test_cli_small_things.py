"""The small things a new user notices (issue 17.8): --version, list, no Optuna ExperimentalWarning, the
README's study file (where compare writes: tests/test_report_features.py::test_write_compare_file)."""
from __future__ import annotations

import json
import re
import shutil
import warnings
from importlib.metadata import version
from pathlib import Path

import optuna
import yaml

from report_fixtures import write_run
from servetune.optimizer import cli
from servetune.optimizer.driver import StudyDriver
from servetune.optimizer.spec import load_study
from study_fixtures import write_study

ROOT = Path(__file__).resolve().parent.parent


def test_version(capsys):
    assert cli.main(["--version"]) == 0
    assert capsys.readouterr().out.strip() == f"servetune {version('servetune')}"


def test_list_shows_each_study_with_status_trials_and_best(tmp_path, capsys):
    live = write_run(tmp_path / "runs" / "fixture", with_db=False)  # its driver session: this process
    done = tmp_path / "runs" / "finished"
    shutil.copytree(live, done)
    (done / "sessions.json").write_text(json.dumps([{"started": "2026-11-22T03:00:00+00:00",
                                                     "ended": "2026-11-22T04:00:00+00:00", "pid": 1}]))
    (done / "summary.json").write_text(json.dumps({"stopped_because": "trial budget reached"}))
    assert cli.main(["list", str(tmp_path / "runs")]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split()[:3] == ["STUDY", "STATUS", "TRIALS"]
    rows = {ln.split()[-1]: ln for ln in lines[1:]}
    assert re.search(r"fixture-study\s+running\s+12/16, 1 failed, 1 rejected, 1 running", rows[str(live)]), rows
    assert "done (trial budget reached)" in rows[str(done)]
    assert re.search(r"offline\.output_tokens_per_s_per_gpu [\d,.]+ \(#\d+\)", rows[str(done)])
    assert cli.main(["list", str(tmp_path / "nothing-here")]) == 2


def test_opening_a_study_warns_nothing_experimental(tmp_path):
    driver = StudyDriver(load_study(write_study(tmp_path)))
    driver.run_dir.mkdir(parents=True)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        driver.open_study()
    assert not [w for w in caught if issubclass(w.category, optuna.exceptions.ExperimentalWarning)]


def test_the_readme_study_file_validates_and_searches_the_max_qps(tmp_path, capsys):
    text = (ROOT / "README.md").read_text()
    block = text.split("## A study file", 1)[1].split("```yaml\n", 1)[1].split("```", 1)[0]
    study = yaml.safe_load(block)
    assert study["workload"]["scenarios"][0].get("max_qps"), "the README's example should search the max QPS"
    path = tmp_path / "study.yaml"
    path.write_text(block)
    assert cli.main(["validate", str(path), "--no-path-check"]) == 0, capsys.readouterr().err
