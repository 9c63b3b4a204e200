"""Load sweeps against one running server: max valid QPS search, concurrency sweep, Pareto points."""
import math
from dataclasses import replace
from pathlib import Path

import pytest

from loadgen_mock import MockServer
from servetune.loadgen.datasets import random_dataset
from servetune.loadgen.metrics import summarize
from servetune.loadgen.records import Request, ScenarioResult
from servetune.loadgen.scenarios import ScenarioSettings, read_records
from servetune.loadgen.search import (
    KEEP_UP_ARRIVALS,
    LEVEL_TOKEN_BASE,
    concurrency_levels,
    concurrency_sweep,
    find_max_qps,
    latency_margin,
    level_variant,
    longer_run,
    pareto_front,
)
from servetune.loadgen.validity import verdict

DATA = random_dataset(10, input_tokens=16, output_tokens=8)


@pytest.fixture(scope="module")
def mock():
    with MockServer() as m:
        yield m


# --- pure helpers ---------------------------------------------------------------------------------------

def test_level_variant_prepends_a_level_token():
    a, b = level_variant(DATA, 0), level_variant(DATA, 1)
    assert a[0].prompt[1:] == DATA[0].prompt and a[0].prompt[0] == LEVEL_TOKEN_BASE
    assert b[0].prompt[0] != a[0].prompt[0] and a[0].input_tokens == DATA[0].input_tokens + 1
    assert len({tuple(r.prompt) for r in a}) == len(DATA)  # samples stay distinct within a level
    text = level_variant([Request(prompt="the cat", max_tokens=2, input_tokens=2)], 3)[0]
    assert text.prompt == "L3 the cat" and text.input_tokens == 3


def test_concurrency_levels():
    assert concurrency_levels(1) == [1]
    assert concurrency_levels(12) == [1, 2, 4, 8, 12]
    assert concurrency_levels(16, 2) == [2, 4, 8, 16]
    with pytest.raises(ValueError):
        concurrency_levels(4, 8)


def test_pareto_front():
    pts = [{"x": 10, "y": 1}, {"x": 5, "y": 5}, {"x": 1, "y": 10}, {"x": 4, "y": 4}, {"x": 9, "y": 0.5},
           {"x": 20, "y": 20, "error_rate": 0.5}, {"x": float("nan"), "y": 30}]
    assert pareto_front(pts, "x", "y") == {0, 1, 2}


def test_latency_margin():
    res = ScenarioResult("server", {"ttft_limit_ms": 100.0, "tpot_limit_ms": 10.0}, [], 1.0,
                         {"ttft_p99_ms": 50.0, "tpot_p99_ms": 12.0})
    assert latency_margin(res) == pytest.approx(0.2)  # the worse of -0.5 (TTFT) and +0.2 (TPOT)
    assert math.isnan(latency_margin(ScenarioResult("server", {}, [], 1.0, {"ttft_p99_ms": 5.0})))


def test_search_argument_checks():
    with pytest.raises(ValueError, match="server or interactive"):
        find_max_qps(None, DATA, ScenarioSettings(kind="offline"), 1, 2)
    with pytest.raises(ValueError, match="lo < hi"):
        find_max_qps(None, DATA, ScenarioSettings(kind="server", qps=1), 5, 2)
    with pytest.raises(ValueError, match="tolerance"):
        find_max_qps(None, DATA, ScenarioSettings(kind="server", qps=1), 1, 2, tolerance=2)
    with pytest.raises(ValueError):
        concurrency_sweep(None, DATA, ScenarioSettings(kind="offline"), [0])


# --- against the mock -----------------------------------------------------------------------------------

def _search_settings(**kw):
    # Constant arrivals against a server of capacity 2 with ~25 ms of service: valid up to ~80 req/s.
    base = dict(kind="server", qps=1, duration_s=0.4, ttft_limit_ms=60, require_early_stopping=False,
                arrival="constant", timeout_s=20)
    return ScenarioSettings(**{**base, **kw})


def test_find_max_qps_brackets_the_capacity(mock):
    ep = mock.endpoint(ttft_s=0.01, tpot_s=0.002, capacity=2)
    result = find_max_qps(ep, DATA, _search_settings(), lo=10, hi=240, tolerance=0.2)
    levels, best = result  # unpacks as (levels, best_qps)
    qps = [r.settings["qps"] for r in levels]
    assert qps[:2] == [10, 240] and len(levels) <= 10
    assert levels[0].valid and not levels[1].valid
    assert best is not None and 30 <= best <= 120, [(r.settings["qps"], r.valid, r.summary["ttft_p99_ms"])
                                                     for r in levels]
    good, bad = result.bracket
    assert good == best and (bad - good) <= 0.2 * good
    # the bracket is consistent with every level measured: valid at or below it, invalid above it
    assert all(r.valid for r in levels if r.settings["qps"] <= good)
    assert not any(r.valid for r in levels if r.settings["qps"] >= bad)
    assert result.best is not None and result.best.settings["qps"] == best
    assert [r.settings["search_level"] for r in levels] == list(range(len(levels)))
    d = result.to_dict()
    assert d["best_qps"] == best and len(d["levels"]) == len(levels) and "records" not in d["levels"][0]


def test_find_max_qps_ends_early(mock):
    fast = mock.endpoint(ttft_s=0.005, tpot_s=0.001)
    r = find_max_qps(fast, DATA, _search_settings(duration_s=0.2), lo=5, hi=40)
    assert r.best_qps == 40 and len(r.levels) == 2 and "raise hi" in r.stopped_because
    broken = mock.endpoint(mode="http500")
    r = find_max_qps(broken, DATA, _search_settings(duration_s=0.2), lo=5, hi=40, floor=1.5)
    assert [x.settings["qps"] for x in r.levels] == [5, 2.5, 1.5]  # halved down to the floor, never below
    assert r.best_qps is None and r.bracket == (None, 1.5) and r.floor == 1.5
    assert "down to the floor 1.5/s" in r.stopped_because and "error rate" in r.stopped_because
    assert r.to_dict()["floor"] == 1.5
    assert find_max_qps(fast, DATA, _search_settings(duration_s=0.2), lo=5, hi=40).floor == 5 / 16  # the default
    with pytest.raises(ValueError, match="floor"):
        find_max_qps(fast, DATA, _search_settings(), lo=5, hi=40, floor=6)


def test_find_max_qps_probes_below_a_failing_lo(mock):
    # capacity ~80 req/s (see _search_settings): lo=320 fails, so do its halvings down to one that is valid
    # (40 req/s, or 80 on a quiet machine); that bracket is then narrowed, and hi is never measured
    ep = mock.endpoint(ttft_s=0.01, tpot_s=0.002, capacity=2)
    r = find_max_qps(ep, DATA, _search_settings(), lo=320, hi=640, tolerance=0.2, max_levels=4, floor=10)
    qps, valid = [x.settings["qps"] for x in r.levels], [x.valid for x in r.levels]
    first = valid.index(True)
    assert qps[:first + 1] == [320 / 2 ** k for k in range(first + 1)] and 640 not in qps, (qps, valid)
    assert first >= 1 and not any(valid[:first])  # which halving is valid depends on the box's load
    good, bad = r.bracket
    assert r.best_qps == good and qps[first] <= good < bad <= 2 * qps[first]
    assert (bad - good) <= 0.2 * good or "stopped after" in r.stopped_because
    assert len(r.levels) <= 4 + first - 1  # halvings past the first come on top of max_levels


def test_concurrency_sweep_points(mock):
    mock.reset()
    ep = mock.endpoint(ttft_s=0.01, tpot_s=0.002)
    sweep = concurrency_sweep(ep, DATA, ScenarioSettings(kind="concurrency", concurrency=1, num_requests=12,
                                                         num_gpus=2, timeout_s=20), [1, 4])
    pts = sweep.points()
    assert [p["concurrency"] for p in pts] == [1, 4]
    assert all(r.summary["requests_ok"] == 12 and r.summary["concurrency_peak"] <= c
               for r, c in zip(sweep.levels, (1, 4)))
    assert sweep.levels[1].summary["concurrency_peak"] == 4 and mock.stats()["peak_in_flight"] == 4
    assert pts[1]["output_tokens_per_s_per_gpu"] > 1.5 * pts[0]["output_tokens_per_s_per_gpu"]
    assert pts[1]["output_tokens_per_s_per_gpu"] == pytest.approx(pts[1]["output_tokens_per_s"] / 2)
    assert all(p["tokens_per_s_per_user_at_tpot_p90"] > 0 for p in pts)
    assert any(p["pareto"] for p in pts) and sweep.pareto()
    assert len(sweep.to_dict()["levels"]) == 2


def test_concurrency_sweep_with_faults_counts_them_and_keeps_them_off_the_front(mock):
    ep = mock.endpoint(mode="drop", fault_every=3, ttft_s=0.005, tpot_s=0.001)
    sweep = concurrency_sweep(ep, DATA, ScenarioSettings(kind="concurrency", concurrency=1, num_requests=9,
                                                         timeout_s=20), [1, 3])
    for r in sweep.levels:
        s = r.summary
        assert s["requests_issued"] == 9 and s["errors_dropped"] >= 2 and not r.valid
        assert s["output_tokens_total"] == 8 * s["requests_ok"]  # metrics from the good requests only
    assert not any(p["pareto"] for p in sweep.points())  # failing levels are never on the front


def test_a_level_too_short_to_judge_runs_once_more_for_longer(mock):
    # ~0.3 s requests in 0.4 s levels: too short to show a steady state (median > half the level)
    slow = mock.endpoint(ttft_s=0.01, tpot_s=0.04)
    settings = _search_settings(duration_s=0.4, ttft_limit_ms=1000)
    judged_short = find_max_qps(slow, DATA, settings, lo=5, hi=40, floor=5)  # floor=lo: no halving below lo
    assert judged_short.best_qps is None and judged_short.runs == 1
    assert "too short to show the server keeps up" in judged_short.stopped_because
    longer = find_max_qps(slow, DATA, settings, lo=5, hi=40, max_level_duration_s=2)
    assert longer.best_qps == 40 and [r.valid for r in longer.levels] == [True, True]
    assert longer.runs == 4  # each level ran twice: the short run, then a 1 s one (2.2 × ~0.3 s, rounded up)
    for r in longer.levels:
        assert r.settings["duration_s"] == 1.0 and r.summary["last_scheduled_s"] >= 0.95
        assert any(n.startswith("ran for 1 s: a 0.") for n in r.notes), r.notes
    # a longer run that would not fit is not made; and the rule off judges nothing of the kind
    capped = find_max_qps(slow, DATA, settings, lo=5, hi=40, max_level_duration_s=0.5, floor=5)
    assert capped.best_qps is None and capped.runs == 1
    off = find_max_qps(slow, DATA, replace(settings, min_keep_up=None), lo=5, hi=40, max_level_duration_s=2)
    assert off.best_qps == 40 and off.runs == 2


@pytest.mark.parametrize("name, seconds", [
    # an H200 70B level at 3 req/s: 59 arrivals, 41 of them in the second half, judged a backlog (3.4σ)
    ("vllm-70b-fp8-tp1pp2-h200-qps3", 40),
    # a real backlog (300 → 621 in the system) seen in 1,035 arrivals: the verdict stands
    ("vllm-fp8-h200-qps53.44", None),
    # valid: nothing to run again
    ("vllm-70b-tp2-h200-qps3", None),
])
def test_a_backlog_seen_in_few_arrivals_is_judged_again_on_a_longer_run(name, seconds):
    qps = float(name.rsplit("qps", 1)[1])
    level = ScenarioSettings(kind="server", qps=qps, duration_s=20, sla="llama2-70b", require_early_stopping=False)
    records = read_records(Path(__file__).parent / "fixtures" / "gpu_levels" / f"{name}.csv.gz")
    summary = summarize(records, 25.0, level.ttft_limit_ms, level.tpot_limit_ms)
    reasons = verdict(records, level, summary=summary).reasons
    again = longer_run(reasons, summary, level, 60)
    assert (again and again[0]) == seconds, (reasons, again)
    if seconds:
        assert seconds == math.ceil(KEEP_UP_ARRIVALS / qps) and again[1].startswith("59 arrivals were too few")
        assert longer_run(reasons, summary, level, 30)[0] == 30  # as long as the limit allows
        assert longer_run(reasons, summary, replace(level, duration_s=40), 60) is None  # already that long
