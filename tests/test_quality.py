"""The quality guardrail: its figures, the shipped evaluation set, the sim's logprobs, and a whole study.

The study runs for real in this process (StudyDriver, Optuna SQLite, sim servers, the load generator and the
evaluation client over HTTP); only Ray is replaced, by an executor that runs the baseline last, so the verdicts
that must wait for the baseline's evaluation are exercised every time.
"""
from __future__ import annotations

import importlib.util
import json
import lzma
import math
import textwrap
from pathlib import Path

import optuna
import pytest

from servetune.optimizer import evalset, run_dir
from servetune.optimizer.driver import StudyDriver
from servetune.optimizer.engines.sim import logits
from servetune.optimizer.engines.sim.cli import build_parser, config_from_args
from servetune.optimizer.engines.sim.server import SimServer, _BadRequest, eval_drift
from servetune.optimizer.export import QUALITY_WARNING, choose_trial, quality_warnings
from servetune.optimizer.lifecycle import run_trial
from servetune.optimizer.quality import (
    NUMERICS,
    QualityGate,
    compare,
    describe,
    divergence_regret,
    numerics_changes,
    reference_trial,
    topk_kl,
    wilson,
)
from servetune.optimizer.records import TrialResult
from servetune.optimizer.spec import SpecError, load_study, parse_study
from servetune.optimizer.summary import StudyOutcome
from servetune.optimizer.teller import Teller
from servetune.optimizer.trial_executor import TrialExecutor
from servetune.reports.details import trial_detail
from servetune.reports.html import objective_front, render_report, trial_table
from servetune.reports.model import load_run

ROOT = Path(__file__).resolve().parent.parent


# -- the figures ------------------------------------------------------------------------------------------------

def _lp(**probs: float) -> dict[str, float]:
    return {t: math.log(p) for t, p in probs.items()}


def test_topk_kl_is_exact_when_the_top_k_hold_all_mass_and_fills_the_tail_as_documented():
    p, q = _lp(a=0.5, b=0.3, c=0.2), _lp(a=0.4, b=0.4, c=0.2)
    exact = 0.5 * math.log(0.5 / 0.4) + 0.3 * math.log(0.3 / 0.4)
    assert topk_kl(p, q) == pytest.approx(exact)
    assert topk_kl(p, p) == pytest.approx(0.0, abs=1e-12)
    # top-2 each, 'c' missing from q's list: q's tail (0.3) is shared by 'c' and the rest bucket, capped at q's
    # 2nd probability (0.3): 0.15 each. p reported everything but its rest bucket holds 0.1 of its own.
    p2, q2 = _lp(a=0.6, c=0.3), _lp(a=0.5, b=0.2)
    # p: a .6, c .3, b missing -> min(.3, .1/2) = .05, rest .05;  q: a .5, b .2, c -> min(.2, .3/2) = .15, rest .15
    want = 0.6 * math.log(0.6 / 0.5) + 0.3 * math.log(0.3 / 0.15) + 0.05 * math.log(0.05 / 0.2) \
        + 0.05 * math.log(0.05 / 0.15)
    assert topk_kl(p2, q2) == pytest.approx(want)


def test_compare_counts_exact_matches_first_divergences_and_kl_up_to_the_first_divergence():
    top = {"x": -0.1, "y": -2.5}
    shifted = {"x": -0.3, "y": -1.4}

    def item(i, tokens, tops=None, **kw):
        return {"id": i, "kind": "compare", "tokens": tokens, "top_logprobs": tops or [top] * len(tokens), **kw}

    ref = [item("same", list("abcd")), item("late", list("abcd")), item("early", list("abcd")),
           item("short", list("abcd")), item("gone", list("abcd")),
           {"id": "ref-failed", "kind": "compare", "error": "HTTP 500"}, {"id": "t", "kind": "task", "tokens": ["z"]}]
    trial = [item("same", list("abcd")), item("late", list("abcX"), [top, top, top, shifted]),
             item("early", list("Xbcd"), [shifted] * 4), item("short", list("ab")),
             {"id": "gone", "kind": "compare", "error": "timeout"}, item("ref-failed", list("abcd"))]
    f = compare(ref, trial)
    assert f["compared"] == 5 and f["unanswered"] == 1  # the item the baseline failed is left out
    assert f["exact_match"] == pytest.approx(1 / 5)
    assert f["first_divergence_mean"] == pytest.approx((4 + 3 + 0 + 2 + 0) / 5)
    # positions: same 0-3 (4), late 0-3 (4), early 0 (1), short 0-1 (2): the KL of 'shifted' at late[3], early[0]
    assert f["kl_positions"] == 11
    assert f["kl_mean"] == pytest.approx(2 * topk_kl(top, shifted) / 11, rel=1e-4)
    assert f["kl_max"] == pytest.approx(topk_kl(top, shifted), rel=1e-4)


def test_a_first_difference_is_a_near_tie_only_when_the_reference_ranked_the_trials_token_close_to_its_own():
    def item(i, tokens, tops):
        return {"id": i, "kind": "compare", "tokens": tokens, "top_logprobs": tops}

    ref = [item("tie", ["a", "b"], [{}, {"b": -0.70, "c": -0.70}]),
           item("close", ["a", "b"], [{}, {"b": -0.5, "c": -0.9}]),
           item("far", ["a", "b"], [{}, {"b": -0.1, "c": -2.6}]),
           item("outside", ["a", "b"], [{}, {"b": -0.1, "c": -2.6}]),   # the trial's token is not in the top K
           item("stops", ["a", "b"], [{}, {"b": -0.1}]),                  # the trial stopped where this went on
           item("gone", ["a", "b"], [{}, {}]), item("same", ["a", "b"], [{}, {}])]
    trial = [item("tie", ["a", "c"], [{}, {}]), item("close", ["a", "c"], [{}, {}]),
             item("far", ["a", "c"], [{}, {}]), item("outside", ["a", "z"], [{}, {}]),
             item("stops", ["a"], [{}]), {"id": "gone", "kind": "compare", "error": "timeout"},
             item("same", ["a", "b"], [{}, {}])]
    f = compare(ref, trial)
    assert (f["divergences"], f["near_tie_divergences"], f["regret_max"]) == (5, 2, 2.5)
    # decisive: far, outside, stops, and the unanswered one, of 7 compared
    assert f["decisive_divergence"] == pytest.approx(4 / 7, abs=1e-4) and f["tie_margin"] == 0.5
    assert compare(ref, trial, tie_margin=3.0)["near_tie_divergences"] == 3
    assert divergence_regret({"b": -0.1, "c": -2.6}, "c") == pytest.approx(2.5)
    assert divergence_regret({"b": -0.1}, "c") is None and divergence_regret(None, "c") is None


def _real_eval():
    """SGLang 0.5.17's greedy answers on the real SmolLM2: bf16, NGRAM speculation, fp8 weights (see source)."""
    with lzma.open(ROOT / "tests" / "fixtures" / "quality" / "sglang-0.5.17-smollm2-ngram-fp8.json.xz") as f:
        return json.loads(f.read())


def test_sglang_ngram_speculation_diverges_only_at_near_ties_and_fp8_beyond_them(tmp_path):
    fx = _real_eval()
    ngram, fp8 = compare(fx["reference"], fx["ngram"]), compare(fx["reference"], fx["fp8"])
    # NGRAM: 26 of 64 answers differ, every one where the baseline's top two were within 3 bf16 steps
    assert ngram["exact_match"] == pytest.approx(38 / 64, abs=1e-4)
    assert (ngram["divergences"], ngram["near_tie_divergences"], ngram["regret_max"]) == (26, 26, 0.375)
    assert ngram["decisive_divergence"] == 0
    # fp8 weights: 61 differ, 7 of them by more than the margin (up to 1.75 nats)
    assert (fp8["divergences"], fp8["near_tie_divergences"], fp8["regret_max"]) == (61, 54, 1.75)
    assert fp8["decisive_divergence"] == pytest.approx(7 / 64, abs=1e-4)
    gate = _gate(tmp_path, max_decisive_divergence=0.0)
    rec = {"file": "eval.json", "fingerprint": "f", "items": 64}
    ref = {"fingerprint": "f", "items": fx["reference"]}
    ok = gate.judge(rec, {"fingerprint": "f", "items": fx["ngram"]}, (0, ref), ["speculative_method=ngram"])
    bad = gate.judge(rec, {"fingerprint": "f", "items": fx["fp8"]}, (0, ref), ["quantization=fp8"])
    assert ok["passed"] is True and bad["passed"] is False
    assert bad["reasons"] == ["11% of answers diverge beyond a near-tie (regret > 0.5 nats) > 0%"]
    assert "every divergence a near-tie (regret ≤ 0.375 nats)" in describe(ok)
    assert "54 of 61 divergences near-ties" in describe(bad)
    # the same answers under the exact-match limit the specdec studies set: NGRAM fails it
    strict = _gate(tmp_path, min_exact_match=0.9).judge(rec, {"fingerprint": "f", "items": fx["ngram"]}, (0, ref), [])
    assert strict["passed"] is False


def test_wilson_interval():
    lo, hi = wilson(8, 10)
    assert (round(lo, 3), round(hi, 3)) == (0.49, 0.943)
    assert wilson(0, 0) == (0.0, 1.0) and wilson(0, 32)[0] == 0.0


def test_the_numerics_list_lives_in_parameters_yaml():
    assert {"quantization", "kv_cache_dtype", "attention_backend", "speculative_method"} <= set(NUMERICS)
    assert "max_concurrency" not in NUMERICS
    assert numerics_changes({"quantization": "fp8", "max_concurrency": 8, "kv_cache_dtype": "auto"},
                            {"quantization": "none", "max_concurrency": 256, "kv_cache_dtype": "auto"}) == \
        ["quantization=fp8"]


# -- the evaluation set and tasks -------------------------------------------------------------------------------

def test_the_shipped_evaluation_set_has_64_varied_prompts_and_the_task_set_answers():
    items = evalset.load("builtin", "compare", 32)
    assert len(items) == 64 and len({i.id for i in items}) == 64
    assert {i.category for i in items} == {"fact", "arith", "instr", "prose", "code"}
    tasks = evalset.load("builtin:facts", "task", 16)
    assert len(tasks) >= 30 and all(t.answers for t in tasks)


def test_bad_evaluation_lines_name_file_and_line(tmp_path):
    bad = tmp_path / "tasks.jsonl"
    bad.write_text('{"prompt": "Q: 2+2?\\nA:", "answer": "4"}\n\n{"prompt": "Q: sky?"}\n')
    with pytest.raises(evalset.EvalSetError, match=r"tasks.jsonl:3: answer"):
        evalset.load(str(bad), "task", 16)
    bad.write_text('{"prompt": "a", "id": "x"}\n{"prompt": "b", "id": "x"}\n')
    with pytest.raises(evalset.EvalSetError, match=r":2: id 'x' is used twice \(first at line 1\)"):
        evalset.load(str(bad), "compare", 16)
    bad.write_text("not json\n")
    with pytest.raises(evalset.EvalSetError, match=r":1: not a JSON object"):
        evalset.load(str(bad), "compare", 16)


def test_task_answers_match_after_normalization():
    assert evalset.correct(" The capital is Paris.\nQ: next", ["paris"])
    assert not evalset.correct(" Parisian food", ["Paris"])  # whole words only
    assert evalset.correct(" 4\nQ: what", ["four", "4"], match="exact")
    assert not evalset.correct(" it is 4", ["4"], match="exact")


def test_the_study_file_checks_the_quality_section():
    base = (ROOT / "search_spaces" / "examples" / "quickstart.yaml").read_text()
    spec = parse_study(base + "\nquality: {min_exact_match: 0.9, max_mean_kl: 0.05}\n", str(ROOT / "q.yaml"))
    assert spec.quality.logprobs == 10 and spec.quality.concurrency == 1
    for extra, where, msg in [
        ("baseline: false\nquality: {}\n", "quality", "set baseline: true"),
        ("quality: {max_accuracy_drop: 0.1}\n", "quality.max_accuracy_drop", "needs tasks"),
        ("quality: {eval_set: missing.jsonl}\n", "quality.eval_set", "missing.jsonl:1: no such file"),
        ("quality: {min_exact_match: 1.5}\n", "quality.min_exact_match", "must be from 0 to 1 (got 1.5)"),
    ]:
        with pytest.raises(SpecError) as e:
            parse_study(base + "\n" + extra, str(ROOT / "q.yaml"))
        assert any(f": {where}:" in line and msg in line for line in e.value.lines), e.value.lines


def _gate(tmp_path, drift=False, **limits):
    spec = parse_study((ROOT / "search_spaces" / "examples" / "quickstart.yaml").read_text()
                       + "\nquality: " + json.dumps(limits) + "\n", str(tmp_path / "q.yaml")).quality
    return QualityGate(spec, drift=drift)


def test_the_verdict_names_each_missed_limit_and_an_unchecked_trial_is_infeasible(tmp_path):
    gate = _gate(tmp_path, min_exact_match=0.9, max_mean_kl=0.01)
    ans = [{"id": "a", "kind": "compare", "tokens": ["x", "y"], "top_logprobs": [{"x": -0.01}, {"y": -0.01}]},
           {"id": "b", "kind": "compare", "tokens": ["x", "y"], "top_logprobs": [{"x": -0.01}, {"y": -0.01}]}]
    other = [dict(ans[0]), {**ans[1], "tokens": ["x", "z"], "top_logprobs": [{"x": -0.01}, {"z": -0.01, "y": -5}]}]
    ref = {"fingerprint": "f", "items": ans}
    rec = {"file": "eval.json", "fingerprint": "f", "items": 2}
    v = gate.judge(rec, {"fingerprint": "f", "items": other}, (0, ref), ["quantization=fp8"])
    assert v["passed"] is False and v["constraint"] > 0 and v["reference"] == 0
    assert v["exact_match"] == 0.5 and any("exact match 50% < 90%" in r for r in v["reasons"])
    assert any(r.startswith("mean KL") for r in v["reasons"])
    same = gate.judge(rec, ref, (0, ref), [], is_reference=True)
    assert same["passed"] is True and same["constraint"] <= 0 and same["is_reference"]
    for missing in [(None, "no baseline evaluation"), ((0, {"fingerprint": "g", "items": ans}), "other prompts")]:
        v = gate.judge(rec, ref, missing[0], [])
        assert v["passed"] is False and v["constraint"] == 1.0 and missing[1] in v["unchecked"]
    assert gate.judge({"error": "the engine died"}, None, (0, ref), [])["unchecked"] == "the engine died"
    # without limits the figures are measured, nothing is judged, and random weights say "drift"
    free = _gate(tmp_path, drift=True).judge(rec, {"fingerprint": "f", "items": other}, (0, ref), [])
    assert free["passed"] is None and free["constraint"] == 0.0 and free["kind"] == "drift"


def test_the_reference_is_the_baseline_else_the_first_trial_with_the_baselines_numerics():
    ev = {"file": "eval.json"}
    recs = {0: {"engine": "vllm", "is_baseline": True, "state": "rejected"},
            1: {"engine": "vllm", "state": "complete", "quality": ev, "params": {"quantization": "fp8"}},
            2: {"engine": "vllm", "state": "complete", "quality": ev, "params": {"tensor_parallel": 2}},
            3: {"engine": "vllm", "state": "complete", "quality": ev, "params": {}, "duplicate_of": 2}}
    same = lambda r: "quantization" not in r["params"]  # noqa: E731
    assert reference_trial(recs, "vllm") is None
    assert reference_trial(recs, "vllm", same) == (2, 2)
    recs[5] = {"engine": "vllm", "is_baseline": True, "state": "complete", "quality": ev, "duplicate_of": 2}
    assert reference_trial(recs, "vllm", same) == (5, 2) and reference_trial(recs, "sglang", same) is None


# -- the sim answers evaluations ------------------------------------------------------------------------------

def test_the_sim_drifts_for_each_lossy_setting_and_never_for_speculation_unless_faulted():
    def drift(*flags):
        args = build_parser().parse_args(["--model", "llama-3.2-1b", *flags])
        return {k: v for k, v in eval_drift(args, config_from_args(args)).items() if v}

    assert drift() == {} and drift("--speculative-method", "ngram") == {}
    assert drift("--quantization", "fp8") == {"weights": 0.3}
    assert drift("--kv-cache-dtype", "fp8", "--drift-kv-cache", "0.2") == {"kv_cache": 0.2}
    assert drift("--speculative-method", "ngram", "--fault-lossy-speculation", "0.5") == {"speculation": 0.5}
    prompts = [i.prompt for i in evalset.load("builtin", "compare", 8)[:16]]
    base = [logits.greedy(p, 16, 5) for p in prompts]
    assert [c.tokens for c in base] == [logits.greedy(p, 16, 5).tokens for p in prompts]
    for noise in ({"weights": 0.3}, {"kv_cache": 0.3}, {"speculation": 0.5}):
        other = [logits.greedy(p, 16, 5, noise) for p in prompts]
        assert 0 < sum(a.tokens == b.tokens for a, b in zip(base, other)) < len(prompts), noise


def test_the_sim_answers_logprobs_on_plain_completions_only():
    assert SimServer._logprobs_asked({"logprobs": 5}, chat=False) == 5
    assert SimServer._logprobs_asked({}, chat=False) is None and SimServer._logprobs_asked({}, chat=True) is None
    for body, chat in (({"logprobs": 5, "stream": True}, False), ({"logprobs": 5, "echo": True}, False),
                       ({"logprobs": 21}, False), ({"logprobs": True, "top_logprobs": 3}, True)):
        with pytest.raises(_BadRequest):
            SimServer._logprobs_asked(body, chat)


# -- a whole study -----------------------------------------------------------------------------------------------

class _InlineExecutor(TrialExecutor):
    """Runs each trial here (real sim server, loadgen, evaluation); the baseline runs, and is handed back, last."""

    def __init__(self):
        self.plans = {}

    def submit(self, plan):
        self.plans[id(plan)] = plan
        return id(plan)

    def wait(self, refs, timeout_s):
        others = [r for r in refs if not self.plans[r].is_baseline]
        return others[:1] or list(refs)[:1]

    def result(self, ref):
        plan = self.plans.pop(ref)
        return run_trial(plan, list(range(plan.gpus)))

    def cancel(self, ref, force=False):
        pass

    def shutdown(self):
        pass


STUDY = """\
name: quality-itest
model: {{preset: llama-3.2-1b}}
engines:
  - name: sim
    extra_args: [--startup-delay-s, "0.05", --drift-weights, "0.6"]
hardware: {{gpu: h100, gpus: 2}}
search:
  quantization: [none, fp8]
  speculative_method: [ngram]
workload:
  dataset: {{kind: random, input_tokens: 64, output_tokens: 16, num_requests: 16}}
  scenarios:
    - {{kind: offline}}
objectives:
  - {{metric: output_tokens_per_s_per_gpu}}
sampler: {{kind: grid}}
budget: {{trials: 3, parallel: 2}}
quality: {{eval_set: evalset.jsonl, tasks: tasks.jsonl, max_tokens: 12, concurrency: 16, min_exact_match: 0.75,
          max_accuracy_drop: 0.2}}
output_dir: {run}
"""


def test_a_study_judges_every_trial_against_the_baseline_and_lossy_ones_are_infeasible(tmp_path, monkeypatch):
    items = evalset.load("builtin", "compare", 12)[:16]
    (tmp_path / "evalset.jsonl").write_text("".join(json.dumps({"id": i.id, "prompt": i.prompt}) + "\n"
                                                    for i in items))
    (tmp_path / "tasks.jsonl").write_text(textwrap.dedent("""\
        {"prompt": "Q: What is the capital of France?\\nA:", "answer": "Paris"}
        {"prompt": "Q: the filler word?\\nA:", "answer": ["of", "and", "to", "in", "is", "was"]}
        """))
    (tmp_path / "study.yaml").write_text(STUDY.format(run=tmp_path / "run"))
    monkeypatch.setattr(StudyDriver, "_executor", lambda self: _InlineExecutor())
    events = []
    driver = StudyDriver(load_study(tmp_path / "study.yaml"), on_event=lambda k, d: events.append((k, d)))
    outcome = driver.run()

    waited = [d["text"] for k, d in events if k == "note" and "waits for its engine's baseline" in d["text"]]
    assert waited, "a trial measured before the baseline must wait for its verdict"
    run = tmp_path / "run"
    trials = {int(p.parent.name): json.loads(p.read_text()) for p in (run / "trials").glob("*/trial.json")}
    assert len(trials) == 3 and all(t["state"] == "complete" for t in trials.values())
    assert trials[0]["is_baseline"] and trials[0]["quality"]["is_reference"] and trials[0]["quality"]["passed"]
    by_config = {(t["params"]["quantization"], t["params"]["speculative_method"]): t for t in trials.values()
                 if not t["is_baseline"]}
    answers = json.loads((run / "trials" / "0000" / "eval.json").read_text())["items"]
    first = answers[0]  # the sim's answer, as an OpenAI server's logprobs land in eval.json
    assert len(first["tokens"]) == 12 and len(first["top_logprobs"][0]) == 10 and first["finish_reason"] == "length"
    assert first["text"] == "".join(first["tokens"])
    assert list(first["top_logprobs"][0].values()) == sorted(first["top_logprobs"][0].values(), reverse=True)
    assert [a["id"] for a in answers if a["kind"] == "task"] == ["tasks-1", "tasks-2"]
    spec_only = by_config[("none", "ngram")]["quality"]
    assert spec_only["passed"] and spec_only["exact_match"] == 1.0 and spec_only["kl_max"] == 0.0
    assert spec_only["changes_numerics"] == ["speculative_method=ngram"] and spec_only["reference"] == 0
    q = by_config[("fp8", "ngram")]["quality"]
    assert q["passed"] is False and q["exact_match"] < 0.75 and q["kl_mean"] > 0
    assert q["divergences"] >= 1 and q["tie_margin"] == 0.5 and 0 <= q["decisive_divergence"] <= 1
    assert q["changes_numerics"] == ["quantization=fp8", "speculative_method=ngram"] and q["accuracy"]["n"] == 2
    # Optuna holds the verdict as a constraint: the lossy trials are infeasible and off the front
    st = optuna.load_study(study_name="quality-itest", storage=f"sqlite:///{run / 'study.db'}")
    lossy = {t["number"] for t in trials.values() if t["quality"]["passed"] is False}
    for t in st.trials:
        assert set(t.constraints) == {"quality", "failed"}
        assert (t.constraints["quality"] > 0) == (t.number in lossy)
    summary = json.loads((run / "summary.json").read_text())
    assert not set(summary["pareto"]) & lossy and summary["pareto"] == outcome.pareto
    assert summary["quality"]["kind"] == "quality" and summary["quality"]["limits"]["min_exact_match"] == 0.75
    assert {int(n) for n, q in summary["quality"]["trials"].items() if q["passed"] is False} == lossy

    # the report: a quality column group, the failed verdicts, the continuations that differ
    r = load_run(run)
    front, _ = objective_front(r)
    assert front and not front & lossy
    cols, rows = trial_table(r, front)
    assert [c.title for c in cols if c.group == "quality vs baseline"] == \
        ["exact match", "1st divergence", "mean KL", "beyond near-ties", "task accuracy", "verdict"]
    verdicts = {row.number: row.cells[[c.key for c in cols].index("quality.status")]["text"] for row in rows}
    assert verdicts[0] == "reference" and {verdicts[n] for n in lossy} == {"failed"}
    d = trial_detail(r, min(lossy))["quality"]
    assert d["status"] == "failed" and d["examples"] and d["examples"][0]["baseline"] != d["examples"][0]["trial"]
    page = render_report(r)
    assert "quality limits missed" in page and "quality vs baseline" in page

    # the GPU runs' Markdown summary lists every verdict
    loader = importlib.util.spec_from_file_location("summarize", ROOT / "benchmarks" / "gpu" / "summarize.py")
    summarize = importlib.util.module_from_spec(loader)
    loader.loader.exec_module(summarize)
    text = summarize.summarize(run)
    assert "Quality against the baseline (limits: min_exact_match 0.75, max_accuracy_drop 0.2):" in text
    assert "| 0 | – | 100.0% | 12.0 | 0 | 0 |" in text and text.count("| reference |") == 1
    assert sum("**failed**: exact match" in ln for ln in text.splitlines()) == len(lossy)

    # the export never picks a lossy trial for "best", and says so loudly when asked for one
    best = choose_trial(run)
    assert best.trial["number"] not in lossy and best.trial["quality"]["passed"]
    forced = choose_trial(run, trial=min(lossy))
    assert any(w.startswith(QUALITY_WARNING) and "FAILED its quality check" in w for w in forced.warnings)


def test_export_warns_when_the_chosen_trial_was_never_checked():
    study = {"engines": ["vllm"]}
    never = quality_warnings({"number": 3, "engine": "vllm", "params": {"kv_cache_dtype": "fp8"}}, study)
    assert never[0].startswith(QUALITY_WARNING) and "kv_cache_dtype=fp8" in never[0] and "NEVER" in never[0]
    plain = quality_warnings({"number": 4, "engine": "vllm", "params": {"max_concurrency": 64}}, study)
    assert "no quality check" in plain[0]
    drift = quality_warnings({"number": 5, "engine": "vllm", "params": {}, "quality": {
        "kind": "drift", "passed": True, "exact_match": 0.4, "changes_numerics": ["quantization=fp8"]}}, study)
    assert "random weights" in drift[0] and "drift" in drift[0]
    ok = quality_warnings({"number": 6, "engine": "vllm", "params": {}, "quality": {
        "kind": "quality", "passed": True, "exact_match": 0.97, "changes_numerics": ["quantization=fp8"]}}, study)
    assert ok == []


def test_a_contaminated_trial_still_gets_its_quality_verdict(tmp_path):
    # SGLang on the real SmolLM2 (2026-12-06): the audit called every level of the bf16 baseline and of the fp8
    # trial contaminated, and neither got a quality verdict although both had answered the evaluation set
    # (fp8: exact match 5 %). A contaminated measurement says nothing about the answers; the verdict stands.
    (tmp_path / "evalset.jsonl").write_text('{"id": "e1", "prompt": "The capital of France is"}\n')
    (tmp_path / "tasks.jsonl").write_text('{"prompt": "Q: capital of France?\\nA:", "answer": "Paris"}\n')
    (tmp_path / "study.yaml").write_text(STUDY.format(run=tmp_path / "run"))
    driver = StudyDriver(load_study(tmp_path / "study.yaml"))
    (tmp_path / "run").mkdir()
    driver.open_study()
    events: list = []
    teller = Teller(driver.spec, driver.store, driver.scorer, driver.planner, driver.quality,
                    lambda k, d: events.append((k, d)))
    contaminated = {"offline": {"summary": {"audit_contaminated": 1.0}, "contaminated": True}}

    def told(params, is_baseline, tokens, answer):
        trial = driver.store.study.ask()
        tdir = driver.trial_dir(trial.number)
        tdir.mkdir(parents=True)
        items = [{"id": "e1", "kind": "compare", "tokens": tokens,
                  "top_logprobs": [{t: -0.1, "x": -3.0} for t in tokens]},
                 {"id": "tasks-1", "kind": "task", "text": answer, "answers": ["Paris"]}]
        (tdir / "eval.json").write_text(json.dumps({"fingerprint": driver.quality.fingerprint, "items": items}))
        result = TrialResult(number=trial.number, engine="sim", params=params, state="complete",
                             is_baseline=is_baseline, scenarios=contaminated,
                             quality={"file": "eval.json", "fingerprint": driver.quality.fingerprint, "items": 2,
                                      "errors": 0})
        run_dir.write_record(tdir, result)  # as the trial's worker leaves it before the driver tells it
        assert not teller.tell(trial, result, StudyOutcome(run_dir=tmp_path / "run"))  # nothing Optuna can learn
        return json.loads((tdir / "trial.json").read_text())

    base = told({"quantization": "none", "speculative_method": "none"}, True, [" Paris", "."], " Paris")
    assert base["state"] == "complete" and base["quality"]["is_reference"] and base["quality"]["exact_match"] == 1.0
    fp8 = told({"quantization": "fp8", "speculative_method": "ngram"}, False, [" the", " city"], " Lyon")
    q = fp8["quality"]
    assert q["reference"] == 0 and q["exact_match"] == 0.0 and q["first_divergence_mean"] == 0.0
    assert q["passed"] is False and q["accuracy"]["rate"] == 0.0 and q["accuracy_drop"] == 1.0
    assert [t.state for t in driver.store.study.trials] == [optuna.trial.TrialState.FAIL] * 2
