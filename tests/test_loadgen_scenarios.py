"""Scenarios end to end against the loopback mock: schedules, measured truth, faults, timeouts, output."""
import asyncio
import json
import statistics
import time
from collections import Counter
from dataclasses import asdict
from dataclasses import replace as dc_replace

import numpy as np
import pandas as pd
import pytest
from scipy import stats

from loadgen_mock import MockServer, timing_slack_ms
from servetune.loadgen.datasets import SAFE_ID_LOW, random_dataset
from servetune.loadgen.endpoint import Endpoint
from servetune.loadgen.metrics import ttft_ms
from servetune.loadgen.pacer import Pacer
from servetune.loadgen.records import Request
from servetune.loadgen.runner import Positions
from servetune.loadgen.scenarios import (
    ScenarioSettings,
    _warmup_variant,
    constant_schedule,
    issue_order,
    poisson_schedule,
    read_records,
    records_frame,
    run,
    scenario_seeds,
    schedule_for,
    write_records,
)
from servetune.loadgen.search import level_variant
from servetune.loadgen.sla import SLA_PRESETS, sla_limits
from servetune.optimizer.spec import SLA_PRESETS as SPEC_PRESETS

DATA = random_dataset(10, input_tokens=16, output_tokens=8)


@pytest.fixture(scope="module")
def mock():
    with MockServer() as m:
        yield m


# --- schedules and order (no server) --------------------------------------------------------------------

def test_poisson_schedule_seeded_with_the_right_rate():
    a = poisson_schedule(50.0, seed=7, num_requests=20000)
    assert len(a) == 20000 and a[0] == 0.0 and np.all(np.diff(a) > 0)
    assert np.array_equal(a, poisson_schedule(50.0, seed=7, num_requests=20000))
    assert not np.array_equal(a[:100], poisson_schedule(50.0, seed=8, num_requests=100))
    gaps = np.diff(a)
    assert gaps.mean() * 50.0 == pytest.approx(1.0, abs=0.03)  # σ of the mean ≈ 0.7 %
    assert stats.kstest(gaps, "expon", args=(0, 1 / 50.0)).pvalue > 1e-3
    assert np.array_equal(poisson_schedule(50.0, seed=7, num_requests=100), a[:100])  # same prefix


def test_poisson_schedule_runs_until_duration_and_count():
    a = poisson_schedule(10.0, seed=1, duration_s=30.0)
    assert a[-1] >= 30.0 > a[-2]  # stops at the first arrival at or past the duration
    b = poisson_schedule(10.0, seed=1, duration_s=1.0, num_requests=50)
    assert len(b) == 50 and b[-1] >= 1.0
    c = poisson_schedule(10.0, seed=1, duration_s=30.0, multiple_of=7)
    assert len(c) % 7 == 0 and len(c) >= len(a) and np.array_equal(c[:len(a)], a)


def test_issue_order_whole_permutations():
    order = issue_order(5, seed=3)
    passes = [[next(order) for _ in range(5)] for _ in range(4)]
    assert all(sorted(p) == list(range(5)) for p in passes)
    assert len({tuple(p) for p in passes}) > 1  # shuffled anew each pass


def test_settings_validation():
    with pytest.raises(ValueError):
        ScenarioSettings(kind="multistream")
    with pytest.raises(ValueError):
        ScenarioSettings(kind="server")  # needs qps
    with pytest.raises(ValueError):
        ScenarioSettings(kind="offline", num_requests=0)


def test_warmup_variant_breaks_the_prefix():
    ids = Request(prompt=[SAFE_ID_LOW + 5, 2000, 3000], max_tokens=4, input_tokens=3)
    assert _warmup_variant(ids).prompt[0] != ids.prompt[0] and _warmup_variant(ids).prompt[1:] == ids.prompt
    # the warm-ups of two load levels differ as the levels' prompts do (behind the one warm-up token)
    one, two = (_warmup_variant(level_variant([ids], n)[0]).prompt for n in (1, 2))
    assert one[0] == two[0] and one[1:] != two[1:]
    text = Request(prompt="the cat", max_tokens=4, input_tokens=2)
    assert _warmup_variant(text).prompt == "warmup the cat"


def test_chat_rejects_token_ids():
    with pytest.raises(ValueError, match="text prompts"):
        run(Endpoint("http://127.0.0.1:9", "m", api="chat"), DATA, ScenarioSettings(kind="offline"))


# --- against the mock -----------------------------------------------------------------------------------

def test_offline_with_warmup_and_connection_cap(mock):
    mock.reset()
    res = run(mock.endpoint(ttft_s=0.02, tpot_s=0.002),
              DATA, ScenarioSettings(kind="offline", num_requests=12, max_connections=3, warmup_requests=2))
    s = res.summary
    assert res.valid, res.invalid_reasons
    warm = [r for r in res.records if r.warmup]
    assert len(warm) == 2 and all(r.ok for r in warm)
    assert s["requests_issued"] == 12 and s["requests_ok"] == 12
    assert mock.stats()["requests"] == 14  # the warmup went to the server too
    assert mock.stats()["peak_in_flight"] <= 3 and s["concurrency_peak"] <= 3
    measured = [r for r in res.records if not r.warmup]
    assert all(r.scheduled == 0.0 for r in measured)
    assert s["output_tokens_total"] == 12 * 8
    assert Counter(r.sample for r in measured[:10]) == Counter(range(10))  # one whole pass first
    # latency counts from t0: requests that waited for one of the 3 slots show it in TTFT
    assert s["ttft_max_ms"] > 3 * 20.0
    assert res.settings["max_connections"] == 3 and res.settings["endpoint"]["model"] == "mock"


def test_server_poisson_against_mock(mock):
    settings = ScenarioSettings(kind="server", qps=20, duration_s=1.5, num_requests=10, ttft_limit_ms=200,
                                tpot_limit_ms=50, seed=5, warmup_requests=1, require_early_stopping=False)
    res = run(mock.endpoint(ttft_s=0.02, tpot_s=0.004), DATA, settings)
    measured = [r for r in res.records if not r.warmup]
    expected = poisson_schedule(20, scenario_seeds(5)[0], num_requests=10, duration_s=1.5)
    assert [r.scheduled for r in measured] == pytest.approx(expected.tolist())
    assert all(r.ok for r in measured)
    s = res.summary
    slack = timing_slack_ms()
    assert s["schedule_lag_p99_ms"] < 25.0 + 10 * slack  # the issue loop keeps to the schedule at low rate
    over = [ttft_ms(r) - 20.0 for r in measured]  # bounds as in test_loadgen_client: best case, then median
    assert min(over) >= 0.0 and min(over) < 3.0 + slack and statistics.median(over) < 8.0 + slack, (over, slack)
    assert s["tpot_p50_ms"] == pytest.approx(4.0, abs=1.0 + slack / 10)
    assert res.valid and any("early stopping not met (n=" in n for n in res.notes)
    assert s["early_stopping_ttft_min_queries"] == 459 and s["early_stopping_met"] == 0.0
    assert s["goodput_request_per_s"] == pytest.approx(s["request_per_s"])


def test_server_charges_queueing_to_latency(mock):
    # Arrivals (60/s) outpace one connection (~35 ms per request): the queue must show in TTFT, since
    # latency counts from the scheduled time, while time from send to first token stays at the truth.
    res = run(mock.endpoint(ttft_s=0.015, tpot_s=0.003), DATA,
              ScenarioSettings(kind="server", qps=60, num_requests=15, max_connections=1, seed=2))
    s = res.summary
    assert s["requests_ok"] == 15
    from_send = [(r.first_byte - r.sent) * 1000 for r in res.records]
    assert statistics.median(from_send) < 25.0 + timing_slack_ms()
    assert s["ttft_p99_ms"] > 100.0 and s["schedule_lag_p99_ms"] > 80.0


def test_single_stream_against_mock(mock):
    mock.reset()
    res = run(mock.endpoint(ttft_s=0.015, tpot_s=0.003), DATA,
              ScenarioSettings(kind="single_stream", num_requests=8, warmup_requests=1,
                               require_early_stopping=False))
    measured = [r for r in res.records if not r.warmup]
    assert len(measured) == 8 and all(r.ok for r in measured)
    assert all(b.sent >= a.done for a, b in zip(measured, measured[1:]))  # one outstanding at a time
    assert mock.stats()["peak_in_flight"] == 1 and res.summary["concurrency_peak"] == 1
    over, slack = [ttft_ms(r) - 15.0 for r in measured], timing_slack_ms()
    assert min(over) >= 0.0 and min(over) < 3.0 + slack and statistics.median(over) < 8.0 + slack, (over, slack)
    assert res.valid and any("SingleStream early stopping not met (n=8, need 64)" in n for n in res.notes)


@pytest.mark.parametrize("kind, extra", [("server", dict(qps=50)), ("offline", dict(max_connections=2))])
def test_scenario_timeout_never_hangs(mock, kind, extra):
    start = time.perf_counter()
    res = run(mock.endpoint(mode="hang", request_timeout_s=60), DATA,
              ScenarioSettings(kind=kind, num_requests=6, timeout_s=0.6, **extra))
    assert time.perf_counter() - start < 1.5
    assert [r.status for r in res.records] == ["timeout"] * 6  # sent, or still queued for a slot
    assert all(r.done is not None for r in res.records)
    assert res.summary["scenario_timed_out"] == 1.0 and res.summary["errors_timeout"] == 6
    assert not res.valid and "6 outstanding requests were recorded as timeout" in res.notes[0]


@pytest.mark.parametrize("mode, kind", [("http500", "http_500"), ("drop", "dropped"), ("malformed", "malformed")])
def test_faults_counted_by_kind_metrics_from_good_only(mock, mode, kind):
    res = run(mock.endpoint(mode=mode, fault_every=4, ttft_s=0.01, tpot_s=0.002), DATA,
              ScenarioSettings(kind="offline", num_requests=20))
    s = res.summary
    assert s[f"errors_{kind}"] == 5 and s["requests_ok"] == 15 and s["error_rate"] == 0.25
    assert s["output_tokens_total"] == 15 * 8  # partial outputs of failed requests are not throughput
    good = [r for r in res.records if r.ok]
    assert s["ttft_mean_ms"] == pytest.approx(statistics.fmean(ttft_ms(r) for r in good))
    assert not res.valid and any(r.startswith("error rate 25.0% exceeds 1.0%") for r in res.invalid_reasons)


def test_equal_issue_rounds_to_whole_passes(mock):
    data = DATA[:7]
    res = run(mock.endpoint(ttft_s=0.005, tpot_s=0.001), data,
              ScenarioSettings(kind="offline", num_requests=10, equal_issue=True))
    assert len(res.records) == 14 and Counter(r.sample for r in res.records) == Counter({i: 2 for i in range(7)})


def test_records_frame_and_files(mock, tmp_path):
    res = run(mock.endpoint(mode="http500", fault_every=3, ttft_s=0.005, tpot_s=0.001), DATA,
              ScenarioSettings(kind="offline", num_requests=6, warmup_requests=1))
    frame = records_frame(res.records)
    assert len(frame) == 7 and frame["warmup"].sum() == 1
    assert set(frame["status"]) == {"ok", "http_500"}
    assert frame.loc[frame.status == "http_500", "ttft_ms"].isna().all()
    assert frame.loc[frame.status == "ok", "num_chunks"].eq(8).all()
    csv = pd.read_csv(write_records(res.records, tmp_path / "r.csv"))
    pq = pd.read_parquet(write_records(res.records, tmp_path / "sub" / "r.parquet"))
    for back in (csv, pq):
        assert list(back.columns) == list(frame.columns)
        assert np.allclose(back["ttft_ms"], frame["ttft_ms"], equal_nan=True)
    ok_row = frame.index[frame.status == "ok"][0]
    assert list(pq["chunk_tokens"].iloc[ok_row]) == [1] * 8
    assert json.loads(csv["chunk_t"].iloc[ok_row]) == pytest.approx(list(frame["chunk_t"].iloc[ok_row]))
    assert res.to_dict()["notes"] == res.notes
    # read back, the records are the ones written: a finished run can be judged again
    for path in (tmp_path / "r.csv", tmp_path / "sub" / "r.parquet"):
        again = read_records(path)
        assert [asdict(r) for r in again] == [asdict(r) for r in res.records]


# --- MLPerf presets, arrivals, closed loops, pacing -----------------------------------------------------

def test_sla_presets_fill_limits_and_interactive_resolves():
    assert SPEC_PRESETS is SLA_PRESETS  # one table, owned by the load generator
    assert sla_limits("llama3.1-8b") == (2000.0, 100.0)
    assert sla_limits("llama3.1-8b", "interactive") == (500.0, 30.0)
    assert sla_limits("llama2-70b", "interactive") == (450.0, 40.0)
    assert sla_limits("mixtral-8x7b", "interactive") == (2000.0, 200.0)  # no interactive category
    s = ScenarioSettings(kind="interactive", qps=1, sla="llama2-70b")
    assert (s.ttft_limit_ms, s.tpot_limit_ms) == (450.0, 40.0)
    s = ScenarioSettings(kind="server", qps=1, sla="llama3.1-8b", ttft_limit_ms=1500)
    assert (s.ttft_limit_ms, s.tpot_limit_ms) == (1500, 100.0)  # an explicit limit wins
    with pytest.raises(ValueError, match="unknown SLA preset"):
        ScenarioSettings(kind="server", qps=1, sla="gpt-5")


def test_constant_schedule():
    assert constant_schedule(4.0, num_requests=3).tolist() == [0.0, 0.25, 0.5]
    a = constant_schedule(10.0, duration_s=1.0)
    assert len(a) == 11 and a[-1] == pytest.approx(1.0)
    assert len(constant_schedule(10.0, num_requests=5, multiple_of=4)) == 8


def test_more_settings_validation():
    with pytest.raises(ValueError, match="needs concurrency"):
        ScenarioSettings(kind="concurrency")
    with pytest.raises(ValueError, match="applies to the concurrency scenario"):
        ScenarioSettings(kind="offline", concurrency=4)
    with pytest.raises(ValueError, match="workers"):
        ScenarioSettings(kind="offline", workers=0)
    with pytest.raises(ValueError, match="arrival"):
        ScenarioSettings(kind="server", qps=1, arrival="bursty")


def test_positions_stop_rule():
    pos = Positions(need=3, duration_s=None)
    assert [pos.take(0.0) for _ in range(5)] == [0, 1, 2, None, None]
    pos = Positions(need=2, duration_s=1.0)  # count met early: go on until an issue at/after 1 s
    assert [pos.take(t) for t in (0.0, 0.5, 0.9, 1.2, 1.3)] == [0, 1, 2, 3, None]
    pos = Positions(need=1, duration_s=None, multiple=4)  # equal issue: whole passes
    assert [pos.take(0.0) for _ in range(6)] == [0, 1, 2, 3, None, None]


def test_pacer_wakes_on_time():
    async def main():
        pacer, lags = Pacer(), []
        try:
            start = time.perf_counter()
            for i in range(1, 41):
                target = start + i * 0.002
                await pacer.until(target)
                now = time.perf_counter()
                assert now >= target
                lags.append(now - target)
            await pacer.until(time.perf_counter() - 1)  # the past: returns at once
        finally:
            pacer.close()
        return pacer.kind, statistics.median(lags)

    kind, median = asyncio.run(main())
    assert kind in ("timerfd", "asyncio.sleep")
    if kind == "timerfd":  # asyncio.sleep rounds up to whole milliseconds; the timerfd does not
        assert median < 0.0008 + timing_slack_ms() / 1000, median


def test_ignore_eos_override_and_constant_arrivals(mock):
    res = run(mock.endpoint(ttft_s=0.005, tpot_s=0.001), random_dataset(5, 8, 4, ignore_eos=True),
              ScenarioSettings(kind="server", qps=40, num_requests=8, arrival="constant", ignore_eos=False))
    assert [r.scheduled for r in res.records] == pytest.approx([i / 40 for i in range(8)])
    assert mock.stats()["last_body"]["ignore_eos"] is False
    assert all(r.ignore_eos is False for r in res.records) and res.summary["ignore_eos_fraction"] == 0.0
    assert res.settings["ignore_eos"] is False and res.settings["arrival"] == "constant"
    assert res.settings["pacer"] in ("timerfd", "asyncio.sleep") and res.settings["event_loop"]


def test_concurrency_scenario_keeps_n_outstanding(mock):
    mock.reset()
    res = run(mock.endpoint(ttft_s=0.01, tpot_s=0.002), DATA,
              ScenarioSettings(kind="concurrency", concurrency=3, num_requests=14, equal_issue=True,
                               ttft_limit_ms=500, tpot_limit_ms=50, require_early_stopping=False))
    s = res.summary
    assert s["requests_issued"] == 20 and s["requests_ok"] == 20  # 14 rounded up to two whole passes
    assert Counter(r.sample for r in res.records) == Counter({i: 2 for i in range(10)})
    assert s["concurrency_peak"] == 3 and mock.stats()["peak_in_flight"] == 3
    assert sorted(r.index for r in res.records) == list(range(20))
    assert all(r.scheduled == pytest.approx(r.sent, abs=0.005) for r in res.records)  # latency from issue
    assert res.valid, res.invalid_reasons


# --- worker processes -----------------------------------------------------------------------------------

def test_server_in_two_worker_processes(mock):
    settings = ScenarioSettings(kind="server", qps=60, num_requests=30, seed=4, workers=2, warmup_requests=2,
                                ttft_limit_ms=500, tpot_limit_ms=50, require_early_stopping=False)
    res = run(mock.endpoint(ttft_s=0.01, tpot_s=0.002), DATA, settings)
    measured = [r for r in res.records if not r.warmup]
    expected = poisson_schedule(60, scenario_seeds(4)[0], num_requests=30)
    assert [r.scheduled for r in measured] == pytest.approx(expected.tolist())  # one schedule, partitioned
    assert [r.index for r in measured] == list(range(30)) and all(r.ok for r in measured)
    assert {r.worker for r in measured} == {0, 1} and sum(r.warmup for r in res.records) == 2
    assert all(measured[i].worker == i % 2 for i in range(30))
    # both processes measured on the same origin: every send is at or after its scheduled time
    assert all(r.sent >= r.scheduled for r in measured)
    assert res.summary["schedule_lag_p99_ms"] < 50.0 + 10 * timing_slack_ms()
    assert res.summary["workers_used"] == 2 and res.valid, res.invalid_reasons
    t0 = res.settings["t0_perf_counter"]  # the shared absolute origin: records line up with other clocks
    assert isinstance(t0, float) and t0 + measured[-1].done <= time.perf_counter()


def test_workers_share_connection_cap_and_concurrency(mock):
    mock.reset()
    res = run(mock.endpoint(ttft_s=0.01, tpot_s=0.002), DATA,
              ScenarioSettings(kind="offline", num_requests=12, max_connections=3, workers=2))
    assert res.summary["requests_ok"] == 12 and mock.stats()["peak_in_flight"] <= 3
    mock.reset()
    res = run(mock.endpoint(ttft_s=0.01, tpot_s=0.002), DATA,
              ScenarioSettings(kind="concurrency", concurrency=4, num_requests=20, workers=2, equal_issue=True))
    assert res.summary["requests_ok"] == 20 and mock.stats()["peak_in_flight"] <= 4
    assert sorted(r.index for r in res.records) == list(range(20))  # one shared issue counter
    assert Counter(r.sample for r in res.records) == Counter({i: 2 for i in range(10)})
    ss = run(mock.endpoint(ttft_s=0.005, tpot_s=0.001), DATA,
             ScenarioSettings(kind="single_stream", num_requests=3, workers=4, require_early_stopping=False))
    assert ss.summary["workers_used"] == 1 and any("one process" in n for n in ss.notes)


def test_workers_faults_and_timeout(mock):
    res = run(mock.endpoint(mode="http500", fault_every=4, ttft_s=0.01, tpot_s=0.002), DATA,
              ScenarioSettings(kind="offline", num_requests=20, workers=2))
    assert res.summary["errors_http_500"] == 5 and res.summary["requests_ok"] == 15
    assert not res.valid and any("error rate 25.0%" in r for r in res.invalid_reasons)
    start = time.perf_counter()
    res = run(mock.endpoint(mode="hang", request_timeout_s=60), DATA,
              ScenarioSettings(kind="server", qps=50, num_requests=6, timeout_s=3, workers=2))
    assert time.perf_counter() - start < 3 + 3
    assert [r.status for r in res.records] == ["timeout"] * 6 and res.summary["scenario_timed_out"] == 1.0
    assert not res.valid


def test_a_failing_worker_is_reported_not_lost(mock):
    ep = dc_replace(mock.endpoint(), extra_body={"bad": {1, 2}})  # pickles fine, cannot be sent as JSON
    res = run(ep, DATA, ScenarioSettings(kind="offline", num_requests=6, workers=2))
    assert len(res.records) == 6 and {r.status for r in res.records} == {"client_error"}
    assert not res.valid
    assert any("worker 0 failed before the run" in r and "JSON serializable" in r for r in res.invalid_reasons)


def test_a_trace_schedule_is_the_trace_from_zero():
    s = ScenarioSettings(kind="server", arrival="trace", arrival_times=[5.0, 5.5, 5.25, 7.0], num_requests=3)
    assert s.arrival_times == [0.0, 0.25, 0.5, 2.0] and s.qps == pytest.approx(3 / 2.0)
    assert [t for _, _, t in schedule_for(s, dataset_size=10)] == [0.0, 0.25, 0.5]
    with pytest.raises(ValueError, match="server or interactive"):
        ScenarioSettings(kind="offline", arrival="trace", arrival_times=[0.0, 1.0])
    with pytest.raises(ValueError, match="finite issue times"):
        ScenarioSettings(kind="server", arrival="trace", arrival_times=[0.0, float("nan")])
    with pytest.raises(ValueError, match="2 arrivals"):
        ScenarioSettings(kind="server", arrival="trace", arrival_times=[0.0, 1.0], num_requests=3)
