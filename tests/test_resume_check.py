"""Resuming refuses a study file that changed what is measured or searched (issue 17, point 1)."""
from __future__ import annotations

import shutil

import optuna

from servetune.optimizer import cli, resume_check
from servetune.optimizer.driver import StudyDriver
from servetune.optimizer.records import TrialResult, write_json_atomic
from servetune.optimizer.spec import load_study
from study_fixtures import write_study


def _measured_run(tmp_path, **study):
    """A run directory as a first `servetune run` leaves it: the study file's copy, an Optuna trial sampled from
    the study's domains in the real SQLite storage, and its trial record."""
    path = write_study(tmp_path, **{"trials": 2, **study})
    spec = load_study(path)
    driver = StudyDriver(spec)
    spec.run_dir.mkdir(parents=True)
    shutil.copyfile(path, spec.run_dir / "study.yaml")
    study = driver.open_study()
    trial = study.ask()
    engine, params = driver.space.suggest(trial)
    study.tell(trial, [100.0, 20.0])
    write_json_atomic(driver.trial_dir(trial.number) / "trial.json",
                      TrialResult(number=trial.number, engine=engine, params=params, state="complete").to_dict())
    return path, spec


def _trials(spec) -> int:
    return len(optuna.load_study(study_name=spec.name, storage=spec.storage_url).trials)


def test_a_changed_workload_is_refused_with_the_difference_and_nothing_is_touched(tmp_path, capsys):
    path, spec = _measured_run(tmp_path)
    stored = (spec.run_dir / "study.yaml").read_text()
    path.write_text(path.read_text().replace("input_tokens: 128", "input_tokens: 256")
                    .replace("tpot_p99_ms: 100", "tpot_p99_ms: 80"))
    assert cli.main(["run", str(path)]) == 2
    err = capsys.readouterr().err
    assert "refusing to resume" in err and "workload" in err
    assert "workload.dataset.input_tokens: 128 → 256" in err
    assert "workload.scenarios[0].sla.tpot_p99_ms: 100.0 → 80.0" in err
    assert "--new" in err
    assert (spec.run_dir / "study.yaml").read_text() == stored
    assert _trials(spec) == 1


def test_a_changed_search_domain_gets_the_same_refusal_never_optunas_message(tmp_path, capsys):
    path, spec = _measured_run(tmp_path)
    path.write_text(path.read_text().replace("max_concurrency: [8, 32, 128]", "max_concurrency: [8, 64]"))
    assert cli.main(["run", str(path)]) == 2
    err = capsys.readouterr().err
    assert "search.max_concurrency: [8, 32, 128] → [8, 64]" in err
    assert "dynamic value space" not in err
    # the stored copy replaced by the new file (by hand, or storage shared elsewhere): the storage's own
    # distributions refuse it, before any trial is asked for
    shutil.copyfile(path, spec.run_dir / "study.yaml")
    assert cli.main(["run", str(path)]) == 2
    err = capsys.readouterr().err
    assert "sampled from other search domains" in err and "search.max_concurrency: [8, 32, 128] → [8, 64]" in err
    assert "dynamic value space" not in err
    assert _trials(spec) == 1, "an empty failed trial was left behind"


def test_budget_and_sampler_changes_resume_and_new_picks_a_fresh_name(tmp_path):
    path, spec = _measured_run(tmp_path)
    path.write_text(path.read_text().replace("trials: 2", "trials: 9").replace("seed: 3", "seed: 4"))
    changed = resume_check.compare(load_study(path))
    assert changed.refused == []
    assert changed.allowed == ["sampler.seed: 3 → 4", "budget.trials: 2 → 9"]
    name, out = resume_check.fresh_name(spec)
    assert name == "itest-2" and out == str(tmp_path / "run") + "-2"
