"""Live progress: the trial writes progress.json, the driver polls it; plain lines when not a terminal (17.4)."""
from __future__ import annotations

import re

import optuna

from servetune.optimizer import cli
from test_resume_check import _measured_run


def test_a_run_prints_each_trials_phases_and_the_best_so_far_when_not_a_terminal(tmp_path, capsys):
    # a study measured before in this directory: --new starts itest-2 beside it, leaving it as it was
    path, old = _measured_run(tmp_path, trials=1, parallel=1, qps="[4, 8]", duration_s=2,
                              search="max_concurrency: [32]", extra="baseline: false\n")
    assert cli.main(["run", str(path), "--new", "--no-report"]) == 0
    out = capsys.readouterr().out
    assert f"a new study itest-2 in {tmp_path / 'run'}-2 ({tmp_path / 'run'} is kept as it is)" in out
    assert len(optuna.load_study(study_name="itest", storage=old.storage_url).trials) == 1
    lines = [ln.strip() for ln in out.splitlines()]
    # the driver polls about once a second: the engine's start (seconds) is always seen, a 2 s level nearly
    started = [ln for ln in lines if ln.startswith("#0   started;")]
    assert len(started) == 1 and ("launching the engine" in started[0] or "server: level" in started[0]), out
    levels = [ln for ln in lines if re.fullmatch(r"#0\s+(started; )?server: level [12] of ≤2 at [48] req/s "
                                                 r"\(trial at \d+:\d\d, at most \d+:\d\d left\)", ln)]
    assert levels, out
    (summary,) = [ln for ln in lines if ln.startswith("trials: ")]
    assert re.fullmatch(r"trials: 0 running, 0 queued for GPUs, 1 of 1 done; best so far: #0 "
                        r"server\.output_tokens_per_s_per_gpu = [\d,.]+", summary), summary
    # the progress file the trial wrote, and only the trial
    assert (tmp_path / "run-2" / "trials" / "0000" / "progress.json").is_file()
