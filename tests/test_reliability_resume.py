"""Stale-trial recovery when the storage is shared (no driver lock): Optuna heartbeats decide who is dead."""
from __future__ import annotations

import json
import sqlite3
import sys
import time

import optuna

from servetune.optimizer import process
from servetune.optimizer.driver import STALE, StudyDriver
from servetune.optimizer.spec import load_study
from study_fixtures import write_study


def test_shared_storage_requeues_only_trials_whose_heartbeat_stopped_and_reaps_their_engines(tmp_path):
    db = tmp_path / "shared.db"
    study_path = write_study(tmp_path, trials=4, parallel=2, extra=f"storage: sqlite:///{db}\n")
    spec = load_study(str(study_path))
    assert spec.storage  # not exclusive: another driver may be alive on the same storage
    driver = StudyDriver(spec)
    study = driver.open_study()
    dead, alive = study.ask(), study.ask()
    dead.suggest_categorical("max_concurrency", [8, 32, 128])
    for t in (dead, alive):
        study._storage.record_heartbeat(t._trial_id)
    # the dead driver's trial: its heartbeat is an hour old and its engine group is still running
    with sqlite3.connect(db) as c:
        c.execute("UPDATE trial_heartbeats SET heartbeat = datetime('now', '-1 hour') WHERE trial_id = ?",
                  (dead._trial_id,))
    engine = process.start([sys.executable, "-c", "import subprocess,sys,time; subprocess.Popen([sys.executable,"
                            "'-c','import time; time.sleep(60)']); time.sleep(60)"], {},
                           driver.trial_dir(dead.number) / "engine.log", "x")
    time.sleep(0.3)
    requeued = driver.recover(study, exclusive=False)
    assert requeued == 1
    assert not process._group_alive(engine.pgid), "the dead driver's engine was not reaped"
    engine.proc.wait(timeout=5)
    trials = {t.number: t for t in study.get_trials(deepcopy=False)}
    assert trials[dead.number].state == optuna.trial.TrialState.FAIL
    assert trials[dead.number].user_attrs.get(STALE) is True  # not counted against the budget
    assert trials[alive.number].state == optuna.trial.TrialState.RUNNING, "a live driver's trial was touched"
    queued = [t for t in trials.values() if t.state == optuna.trial.TrialState.WAITING]
    assert len(queued) == 1 and queued[0].params == {} and \
        queued[0].system_attrs.get("fixed_params") == {"max_concurrency": dead.params["max_concurrency"]}
    on_disk = json.loads((driver.trial_dir(dead.number) / "trial.json").read_text())
    assert on_disk["stale"] is True and on_disk["failure"]["kind"] == "internal"
    # running recovery again changes nothing: the stale trial is finished, the live one still beats
    assert driver.recover(study, exclusive=False) == 0
