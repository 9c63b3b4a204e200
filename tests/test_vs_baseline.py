"""Best vs baseline: a ratio only when both sides met the SLA; otherwise the reason, with the search's floor."""
from __future__ import annotations

import json

import pytest

from report_fixtures import write_run
from servetune.optimizer.vs_baseline import compare
from servetune.reports.html import headlines
from servetune.reports.model import load_run

OBJ = [("server", "output_tokens_per_s", "maximize")]


def _rec(n, tps, sla_met, baseline=False, floor=None, bracket=(None, None), state="complete"):
    summary = {"output_tokens_per_s": tps, "max_qps_stopped_because": "…", "max_qps_bracket_low": bracket[0],
               "max_qps_bracket_high": bracket[1]}
    if floor is not None:
        summary["max_qps_floor"] = floor
    return {"number": n, "state": state, "is_baseline": baseline,
            "scenarios": {"server": {"summary": summary, "sla_met": sla_met}}}


def test_ratio_with_both_brackets():
    (e,) = compare([_rec(0, 1000.0, True, True, 0.75, (12.0, 12.8)), _rec(1, 1500.0, True, bracket=(19.75, 20.5)),
                    _rec(2, 3000.0, False)], OBJ)
    assert e["ratio"] == pytest.approx(1.5) and e["best_trial"] == 1 and e["baseline_trial"] == 0
    assert e["text"] == ("server.output_tokens_per_s: best 1,500 (trial #1, valid up to 19.75 req/s, invalid at 20.5) "
                         "vs baseline 1,000 (trial #0, valid up to 12 req/s, invalid at 12.8) → 1.50× baseline")


def test_no_ratio_when_the_baseline_missed_even_at_the_floor():
    (e,) = compare([_rec(0, 40.0, False, True, 0.25, (None, 0.25)), _rec(1, 1500.0, True, bracket=(19.75, 20.5))], OBJ)
    assert e["ratio"] is None and e["why_not"] == "the baseline missed the SLA even at the floor 0.25 req/s"
    assert e["text"].endswith("→ no ratio: the baseline missed the SLA even at the floor 0.25 req/s")
    assert "no valid rate" in e["text"]
    failed = dict(_rec(0, None, None, True), state="failed", failure={"kind": "oom", "reason": "CUDA out of memory"})
    (e,) = compare([failed, _rec(1, 1500.0, True)], OBJ)
    assert e["ratio"] is None and "did not complete: oom (CUDA out of memory)" in e["why_not"]
    (e,) = compare([_rec(1, 1500.0, True)], OBJ)
    assert e["why_not"] == "no baseline trial"
    (e,) = compare([_rec(0, 40.0, True, True), _rec(1, 1500.0, False)], OBJ)
    assert e["best_trial"] == 0 and e["ratio"] == 1.0  # the baseline itself is the best valid trial


def test_report_headline_and_summary_say_why(tmp_path):
    run_dir = write_run(tmp_path, with_db=False)
    path = run_dir / "trials" / "0000" / "trial.json"
    rec = json.loads(path.read_text())
    rec["scenarios"]["offline"]["sla_met"] = False
    rec["scenarios"]["offline"]["summary"].update(max_qps_floor=0.5, max_valid_qps=0.0)
    path.write_text(json.dumps(rec))
    run = load_run(run_dir)
    h = headlines(run)[0]
    assert h.ratio == "" and h.note == "no ratio: the baseline missed the SLA even at the floor 0.5 req/s"
    reason = run.trials.loc[run.trials["number"] == 0, "offline.sla_reason"].iloc[0]
    assert reason.startswith("no valid rate down to the floor 0.5 req/s")


def _offline(n, tps, baseline=False, quality=None):
    return {"number": n, "state": "complete", "is_baseline": baseline, "quality": quality,
            "scenarios": {"offline": {"summary": {"output_tokens_per_s": tps}, "sla_met": True}}}


# the verdicts of docs/results/2026-12-05-h100-smollm2-quality (real SmolLM2-135M, vLLM 0.26, one H100)
REFERENCE = {"kind": "quality", "reference": 0, "exact_match": 1.0, "passed": True, "reasons": []}
FP8 = {"kind": "quality", "reference": 0, "changes_numerics": ["quantization=fp8"], "exact_match": 0.1094,
       "first_divergence_mean": 8.641, "kl_mean": 0.021737, "passed": False, "reasons": ["exact match 11% < 60%"]}
OFFLINE = [("offline", "output_tokens_per_s", "maximize")]


def test_a_faster_trial_that_failed_quality_is_named_but_never_best():
    (e,) = compare([_offline(0, 8622.8, True, REFERENCE), _offline(1, 8983.0, quality=FP8)], OFFLINE)
    assert e["best_trial"] == 0 and e["ratio"] == 1.0
    assert e["quality_failed_trial"] == 1 and e["quality_failed"] == 8983.0
    assert e["text"] == ("offline.output_tokens_per_s: best 8,623 (trial #0) vs baseline 8,623 (trial #0) → 1.00× "
                         "baseline; trial #1 measured 8,983 but failed the quality limits (exact match 11% < 60%)")
    # a quality-failed trial slower than the best is not worth a mention; one that passed counts as usual
    passed = dict(FP8, passed=True, reasons=[])
    (e,) = compare([_offline(0, 8622.8, True, REFERENCE), _offline(1, 8983.0, quality=passed),
                    _offline(2, 8700.0, quality=FP8)], OFFLINE)
    assert e["best_trial"] == 1 and "quality_failed_trial" not in e and "failed the quality" not in e["text"]


def test_no_best_when_only_quality_failures_met_the_sla():
    base = dict(_offline(0, 10.0, True, REFERENCE))
    base["scenarios"]["offline"]["sla_met"] = False
    (e,) = compare([base, _offline(1, 8983.0, quality=FP8)], OFFLINE)
    assert "best_trial" not in e and e["why_not"] == "no trial met both the SLA and the quality limits"
    assert e["text"].endswith("but failed the quality limits (exact match 11% < 60%)")


def test_a_contaminated_measurement_is_no_side_of_a_ratio():
    # SGLang on SmolLM2 (2026-12-06): every level of the baseline and of the fp8 trial was contaminated, and the
    # GPU summary still printed "best 657.5 (trial #1) vs baseline 563.8 (trial #0) → 1.17× baseline" from them
    def dirty(rec):
        sc = rec["scenarios"]["server"]
        sc["contaminated"] = True
        sc["summary"]["audit_contaminated"] = 1.0
        return rec

    (e,) = compare([dirty(_rec(0, 563.8, None, True)), dirty(_rec(1, 657.5, None)), _rec(2, 600.0, True)], OBJ)
    assert e["best_trial"] == 2 and e["ratio"] is None
    assert e["why_not"] == ("the baseline's server (trial #0) is contaminated: its audit failed twice, so it "
                            "measured no capacity")
    (e,) = compare([_rec(0, 500.0, True, True), dirty(_rec(1, 657.5, None))], OBJ)
    assert e["best_trial"] == 0 and e["ratio"] == pytest.approx(1.0)
    (e,) = compare([dirty(_rec(0, 563.8, None, True)), dirty(_rec(1, 657.5, None))], OBJ)
    assert e["why_not"] == "no trial met the SLA; 2 measured only contaminated levels (audit failed twice)"
