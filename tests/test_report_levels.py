"""The report's per-level chart on the vLLM speculative-decoding study of 2026-12-06 (real SmolLM2, one H100):
one line per trial through its concurrency levels, so the crossover the issue asks for is visible."""
from __future__ import annotations

import gzip
import json
import lzma
import shutil
from pathlib import Path

from servetune.reports.charts import level_chart
from servetune.reports.html import render_report
from servetune.reports.model import load_run

RESULTS = Path(__file__).resolve().parents[1] / "docs" / "results" / "2026-12-06-h100-smollm2-specdec" / "vllm"


def _run(tmp_path: Path, edit=None) -> Path:
    run = tmp_path / "run"
    (run / "trials").mkdir(parents=True)
    shutil.copy(RESULTS / "study.yaml", run / "study.yaml")
    (run / "study.db").write_bytes(gzip.decompress((RESULTS / "study.db.gz").read_bytes()))
    for f in sorted(RESULTS.glob("trials/*/trial.json.xz")):
        rec = json.loads(lzma.decompress(f.read_bytes()))
        if edit:
            edit(rec)
        (run / "trials" / f.parent.name).mkdir()
        (run / "trials" / f.parent.name / "trial.json").write_text(json.dumps(rec))
    return run


def test_each_trial_is_a_line_through_its_levels_and_the_crossover_shows(tmp_path):
    run = load_run(_run(tmp_path))
    copy = next(sc for sc in run.scenarios if sc.name == "copy")
    chart = level_chart(run, copy, "c")
    lines = {t["name"]: t for t in chart.figure["data"]}
    assert list(lines) == ["#0 baseline", "#1 speculative_tokens=2", "#2 speculative_tokens=5"]
    assert all(t["x"] == [1.0, 8.0, 32.0, 128.0] for t in lines.values())
    off, k5 = lines["#0 baseline"]["y"], lines["#2 speculative_tokens=5"]["y"]
    assert k5[2] > off[2] and k5[3] < off[3]  # k=5 ahead at 32, behind at 128: the lines cross
    assert [round(v) for v in off] == [599, 3380, 8209, 19094]
    hover = lines["#2 speculative_tokens=5"]["customdata"][2]
    assert hover[1] == 2 and "concurrency 32: 9,024 tok/s" in hover[0] and "speculative_method=ngram" in hover[0]
    assert chart.figure["layout"]["xaxis"]["tickvals"] == [1.0, 8.0, 32.0, 128.0]
    assert 'id="sc0-levels"' in render_report(run)


def test_contaminated_and_invalid_levels_are_marked_and_one_level_draws_nothing(tmp_path):
    def edit(rec):
        if rec["number"] == 1:
            levels = rec["scenarios"]["copy"]["levels"]
            levels[0]["summary"]["audit_contaminated"] = 1.0
            levels[1]["valid"] = False
        if rec["number"] == 2:  # a trial that measured one level only has no curve
            rec["scenarios"]["copy"]["levels"] = rec["scenarios"]["copy"]["levels"][:1]
    run = load_run(_run(tmp_path, edit))
    copy = next(sc for sc in run.scenarios if sc.name == "copy")
    lines = {t["name"]: t for t in level_chart(run, copy, "c").figure["data"]}
    assert list(lines) == ["#0 baseline", "#1 speculative_method=ngram, speculative_tokens=2, "
                                           "speculative_lookup_max=4, speculative_lookup_min=2"]
    one = next(iter(t for n, t in lines.items() if n.startswith("#1")))
    assert one["marker"]["symbol"] == ["circle-open", "x-thin-open", "circle", "circle"]
    assert one["customdata"][0][0].endswith("— contaminated") and one["customdata"][1][0].endswith("— invalid")
