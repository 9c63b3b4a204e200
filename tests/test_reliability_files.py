"""Bad study files at the command line, and results on disk that are never half-written."""
from __future__ import annotations

import ast
import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from servetune.optimizer import cli, process
from servetune.optimizer.records import write_json_atomic

BAD = Path(__file__).resolve().parent / "bad_studies"
CORPUS = sorted(p.name for p in BAD.glob("*.yaml") if p.name != "expected.yaml")
_LINE = re.compile(r"^(?P<file>.+?):(?P<line>\d+): (?P<path>[^:]+): (?P<msg>\S.*)$")
ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.parametrize("command", ["validate", "run"])
def test_every_bad_study_exits_2_with_file_line_key_message_and_no_traceback(command, capsys, tmp_path,
                                                                             monkeypatch):
    """``servetune validate`` and ``servetune run`` on each of the corpus (in-process: the CLI's own main)."""
    monkeypatch.chdir(tmp_path)  # a run that wrongly started would write its runs/ here, not in the repo
    assert len(CORPUS) >= 60
    problems = []
    for name in CORPUS:
        path = str(BAD / name)
        code = cli.main([command, path, *(["--no-report"] if command == "run" else [])])
        out, err = capsys.readouterr()
        lines = [ln for ln in err.splitlines() if ln.strip()]
        if code != 2:
            problems.append(f"{name}: exit {code}")
        if "Traceback" in out + err:
            problems.append(f"{name}: traceback")
        if not lines or not all(_LINE.match(ln) and _LINE.match(ln)["file"] == path for ln in lines):
            problems.append(f"{name}: not FILE:LINE: key: message: {err!r}")
    assert not problems, "\n".join(problems)
    assert not (tmp_path / "runs").exists(), "a bad study started a run"


def _calls(tree: ast.AST):
    for node in ast.walk(tree):
        if isinstance(node, ast.Call):
            f = node.func
            name = f.attr if isinstance(f, ast.Attribute) else f.id if isinstance(f, ast.Name) else ""
            yield name, node


def test_results_are_written_atomically():
    """Every writer of a result file goes through write-then-rename (a killed process leaves the old file)."""
    lifecycle = (ROOT / "optimizer" / "lifecycle.py").read_text()
    # the per-request CSVs: loadgen writes in place, so the lifecycle writes beside and renames
    calls = list(_calls(ast.parse(lifecycle)))
    in_place = [n.lineno for name, n in calls if name == "write_records"
                and not (len(n.args) > 1 and isinstance(n.args[1], ast.Name) and n.args[1].id == "tmp")]
    assert not in_place, f"write_records called in place at lifecycle.py lines {in_place}"
    atomic = [n for name, n in calls if name == "_write_records_atomic"]
    assert len(atomic) >= 2 and all(isinstance(n.args[0], ast.Name) and n.args[0].id == "write_records"
                                    for n in atomic)
    # trial.json and summary.json: only via write_json_atomic
    for rel in ("optimizer/driver.py", "optimizer/lifecycle.py"):
        tree = ast.parse((ROOT / rel).read_text())
        for name, node in _calls(tree):
            receiver = getattr(node.func, "value", None)
            if isinstance(receiver, ast.Name) and receiver.id == "tmp":
                continue  # written beside, then os.replace'd
            assert name not in ("write_text", "write_bytes", "dump"), f"{rel}:{node.lineno}: in-place write ({name})"
    # report.html: rendered beside and renamed
    html = (ROOT / "reports" / "html.py").read_text()
    assert "os.replace(tmp, out)" in html


def test_write_json_atomic_never_leaves_half_a_file(tmp_path, monkeypatch):
    target = tmp_path / "trial.json"
    write_json_atomic(target, {"state": "complete", "n": 1})
    real_replace = os.replace

    def crash(*a, **k):
        raise KeyboardInterrupt  # killed between the write and the rename

    monkeypatch.setattr(os, "replace", crash)
    with pytest.raises(KeyboardInterrupt):
        write_json_atomic(target, {"state": "running", "n": 2, "big": "x" * 100000})
    monkeypatch.setattr(os, "replace", real_replace)
    assert json.loads(target.read_text()) == {"state": "complete", "n": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["trial.json"], "the temporary file was left behind"


def test_pid_file_is_complete_whenever_it_exists(tmp_path):
    """process.start writes engine.pid by rename: a reaper never reads half of it."""
    ep = process.start([sys.executable, "-c", "import time; time.sleep(30)"], {}, tmp_path / "engine.log",
                       "http://127.0.0.1:1")
    try:
        info = json.loads((tmp_path / "engine.pid").read_text())
        assert info["pgid"] == ep.pgid and info["started"] > 0
        assert not [p for p in tmp_path.iterdir() if p.name.startswith(".engine.pid")]
    finally:
        process.stop(ep, grace_s=2)
    assert not (tmp_path / "engine.pid").exists() and not ep.alive()


def test_reap_orphan_kills_the_group_and_never_a_reused_pid(tmp_path):
    # an orphan whose group has a child: both die
    ep = process.start([sys.executable, "-c", "import subprocess,sys,time; subprocess.Popen([sys.executable,'-c',"
                        "'import time; time.sleep(60)']); time.sleep(60)"], {}, tmp_path / "a" / "engine.log", "x")
    time.sleep(0.5)
    assert process._group_alive(ep.pgid)
    assert process.reap_orphan(ep.pid_path) is True
    ep.proc.wait(timeout=5)
    assert not process._group_alive(ep.pgid) and not ep.pid_path.exists()
    # a pid file older than the process now holding that pid: left alone
    other = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"], start_new_session=True)
    try:
        stale = tmp_path / "engine.pid"
        stale.write_text(json.dumps({"pgid": other.pid, "argv0": "vllm", "started": time.time() - 3600}))
        assert process.reap_orphan(stale) is False
        assert other.poll() is None, "reap_orphan killed a process that merely reused the pid"
    finally:
        other.kill()
        other.wait()


def test_the_tracked_tree_leaves_room_for_a_gpu_kit_part():
    """A device call carries the working tree plus one gpu-kit part (62,919,159 bytes) within 64 MiB: a
    tracked tree past ~4 MB makes every engine install on a GPU host fail (it happened once, at 7.4 MB).
    Keep big evidence compressed and lean (reports load plotly.js from its CDN in docs/results)."""
    if not shutil.which("git") or not (ROOT / ".git").exists():
        pytest.skip("not a git checkout")
    files = subprocess.run(["git", "ls-files", "-z"], cwd=ROOT, capture_output=True, check=True).stdout
    total = sum((ROOT / f).stat().st_size for f in files.decode().split("\0") if f and (ROOT / f).is_file())
    assert total < 64 * 2**20 - 62_919_159 - 100_000, f"tracked files hold {total:,} bytes"
