"""MLPerf validity: the early-stopping table, the SingleStream estimate, and the verdict's rules."""
import math
from dataclasses import asdict, replace
from pathlib import Path

import numpy as np
import pytest

from servetune.loadgen.metrics import summarize
from servetune.loadgen.records import Chunk, RequestRecord
from servetune.loadgen.scenarios import ScenarioSettings, read_records
from servetune.loadgen.validity import early_stopping_estimate, early_stopping_min_queries, verdict

# loadgen-and-mlperf.md §1.4 (matches mlcommons/endpoints docs/early_stopping.md)
P99 = {0: 459, 1: 662, 2: 838, 5: 1307, 10: 2010, 50: 6898, 100: 12571, 1000: 107569}
P90 = {0: 44, 1: 64, 2: 81, 5: 127, 10: 197, 50: 681, 100: 1246, 1000: 10722}


@pytest.mark.parametrize("table, p", [(P99, 0.99), (P90, 0.90)])
def test_early_stopping_table(table, p):
    assert {t: early_stopping_min_queries(t, p) for t in table} == table


def test_early_stopping_bad_arguments():
    with pytest.raises(ValueError):
        early_stopping_min_queries(-1, 0.99)
    with pytest.raises(ValueError):
        early_stopping_min_queries(0, 1.0)


def test_single_stream_estimate():
    assert early_stopping_estimate(list(range(63)), 0.90) is None  # needs h(1) + 1 = 64
    lat = [float(i) for i in range(1, 201)]
    # n = 200: largest t with h(t) + t ≤ 200 is t = 10 (197); the estimate is sorted[200 - 10]
    assert early_stopping_estimate(lat, 0.90) == 191.0
    assert early_stopping_estimate(lat[:64], 0.90) == 64.0  # t = 1: sorted[n - 1], nothing discarded


def _records(n, ttft_ms=50.0, tpot_ms=10.0, tokens=11, gap_s=0.1, slow=(), failed=()):
    """n requests scheduled every gap_s; indexes in ``slow`` have 10× TTFT and TPOT, in ``failed`` fail."""
    out = []
    for i in range(n):
        scale = 10.0 if i in slow else 1.0
        t0 = i * gap_s
        first = t0 + ttft_ms * scale / 1000
        done = first + (tokens - 1) * tpot_ms * scale / 1000
        r = RequestRecord(index=i, sample=i, scheduled=t0, sent=t0, first_byte=first, done=done,
                          chunks=[Chunk(first, tokens)], output_tokens=tokens, status="ok")
        if i in failed:
            r.status, r.first_byte, r.chunks, r.output_tokens = "dropped", None, [], 0
        out.append(r)
    return out


def server(**kw):
    base = dict(kind="server", qps=10, duration_s=40, num_requests=400, ttft_limit_ms=100, tpot_limit_ms=20)
    return ScenarioSettings(**{**base, **kw})


def test_valid_server_run():
    v = verdict(_records(459), server())
    valid, reasons = v  # unpacks as the (valid, reasons) pair
    assert valid and reasons == [] and v.notes == []
    assert v.numbers["early_stopping_ttft_min_queries"] == 459 and v.numbers["early_stopping_met"] == 1.0


def test_early_stopping_fatal_or_note():
    recs = _records(459, slow={7})  # one query over both limits: now 662 are needed
    strict = verdict(recs, server())
    assert not strict.valid
    assert any("TTFT early stopping not met (n=459, need 662" in r for r in strict.reasons)
    assert any("TPOT early stopping not met" in r for r in strict.reasons)
    lenient = verdict(recs, server(), require_early_stopping=False)
    assert lenient.valid and lenient.reasons == []
    assert any("need 662" in n for n in lenient.notes)
    assert lenient.numbers["early_stopping_ttft_over_limit"] == 1
    assert lenient.numbers["early_stopping_tpot_min_queries"] == 662
    assert lenient.numbers["early_stopping_met"] == 0.0
    # the settings carry the switch too
    assert verdict(recs, server(require_early_stopping=False)).valid


def test_p99_limits():
    recs = _records(459, slow=set(range(0, 459, 45)))  # 11 slow: the nearest-rank p99 (index 454) is slow
    v = verdict(recs, server(), require_early_stopping=False)
    assert not v.valid
    assert any(r.startswith("TTFT p99 500.0 ms exceeds the 100 ms limit") for r in v.reasons)
    assert any(r.startswith("TPOT p99 100.0 ms exceeds the 20 ms limit") for r in v.reasons)


def test_error_rate_min_queries_and_min_duration():
    recs = _records(300, failed={1, 2, 3, 4})  # 1.3 % failed, 29.9 s scheduled
    v = verdict(recs, server(), require_early_stopping=False)
    text = " | ".join(v.reasons)
    assert "error rate 1.3% exceeds 1.0% (dropped=4)" in text
    assert "min query count not met: 300 issued < 400" in text
    assert "min duration not met: scheduled time of the last query at 29.900 s < 40 s" in text
    assert verdict(recs, server(num_requests=300, duration_s=29), max_error_rate=0.02,
                   require_early_stopping=False).valid


def test_failures_count_against_early_stopping():
    v = verdict(_records(459, failed={3}), server(), max_error_rate=0.5)
    assert v.numbers["early_stopping_ttft_over_limit"] == 1 and not v.valid


def test_verdict_from_summary_and_settings_dict():
    recs = _records(459)
    summary = summarize(recs, 50.0, ttft_limit_ms=100, tpot_limit_ms=20)
    v = verdict(summary, asdict(server()))
    assert v.valid and v.numbers["early_stopping_tpot_min_queries"] == 459
    no_counts = summarize(recs, 50.0)  # summarized without limits: early stopping cannot be judged
    assert any("lacks over-limit counts" in n for n in verdict(no_counts, server()).notes)


def test_offline_and_single_stream():
    recs = _records(50)
    off = verdict(recs, ScenarioSettings(kind="offline", num_requests=50, ttft_limit_ms=1))
    assert off.valid and any("not checked in the offline" in n for n in off.notes)
    off_short = verdict(recs, ScenarioSettings(kind="offline", duration_s=10))
    assert any("last completion" in r for r in off_short.reasons)
    ss = verdict(recs, ScenarioSettings(kind="single_stream", num_requests=50))
    assert not ss.valid and "SingleStream early stopping not met (n=50, need 64)" in ss.reasons
    ss_ok = verdict(_records(200), ScenarioSettings(kind="single_stream", num_requests=50))
    assert ss_ok.valid and ss_ok.numbers["early_stopping_e2e_p90_ms"] == pytest.approx(150.0)


def test_no_successful_requests():
    v = verdict(_records(5, failed=set(range(5))), ScenarioSettings(kind="offline"))
    assert not v.valid and "no successful requests (issued 5)" in v.reasons


# -- keeping up ---------------------------------------------------------------------------------------------
GPU_LEVELS = Path(__file__).parent / "fixtures" / "gpu_levels"


def _queue(n, rate, service_s, servers, tokens=11):
    """n arrivals every 1/rate s into a FIFO of ``servers`` parallel slots, each request busy service_s."""
    free = [0.0] * servers
    out = []
    for i in range(n):
        t0 = i / rate
        slot = min(range(servers), key=free.__getitem__)
        start = max(t0, free[slot])
        free[slot] = start + service_s
        first = start + service_s / tokens
        out.append(RequestRecord(index=i, sample=i, scheduled=t0, sent=t0, first_byte=first, done=start + service_s,
                                 chunks=[Chunk(first, tokens)], output_tokens=tokens, status="ok"))
    return out


def _gpu_level(name):
    """A level measured on an H200 (docs/results/2026-11-22-h200x4-sglang-tp2-fp8), trimmed of token chunks."""
    return read_records(GPU_LEVELS / f"{name}.csv.gz")


def test_keep_up_ratio_tells_a_steady_queue_from_a_growing_one():
    steady = summarize(_queue(401, rate=20, service_s=0.5, servers=16), duration_s=20)
    assert steady["keep_up_ratio"] == pytest.approx(1.0, abs=0.05)
    assert steady["in_system_at_half"] == steady["in_system_at_end"] == 10  # Little: 20/s × 0.5 s
    # 8 slots of 0.8 s serve 10/s: at 20/s half the arrivals stay behind, 100 over the last 10 s
    growing = summarize(_queue(401, rate=20, service_s=0.8, servers=8), duration_s=20)
    assert growing["keep_up_ratio"] == pytest.approx(0.5, abs=0.05)
    assert growing["in_system_at_end"] - growing["in_system_at_half"] == pytest.approx(100, abs=5)
    # nothing scheduled over time (offline-like): no ratio
    assert math.isnan(summarize(_queue(1, rate=1, service_s=0.1, servers=1), duration_s=1)["keep_up_ratio"])


def test_a_growing_backlog_invalidates_a_server_run_within_its_latency_limits():
    limits = dict(qps=20, duration_s=20, num_requests=400, ttft_limit_ms=60_000, tpot_limit_ms=1_000,
                  require_early_stopping=False)
    ok = verdict(_queue(401, rate=20, service_s=0.5, servers=16), server(**limits))
    assert ok.valid, ok.reasons
    # capacity 10/s offered 16/s: the median request (~7 s) still fits twice in the 20 s of arrivals
    limits.update(qps=16, num_requests=321)
    bad = verdict(_queue(321, rate=16, service_s=0.8, servers=8), server(**limits))
    assert not bad.valid and len(bad.reasons) == 1 and bad.reasons[0].startswith("not keeping up: requests in the "
                                                                                 "system grew from")
    # off: the same run passes; closed loops and offline are never judged on it
    assert verdict(_queue(321, rate=16, service_s=0.8, servers=8), server(**limits, min_keep_up=None)).valid
    assert verdict(_queue(321, rate=16, service_s=0.8, servers=8),
                   ScenarioSettings(kind="concurrency", concurrency=8, duration_s=20)).valid


def test_a_run_shorter_than_twice_its_median_request_is_too_short_to_judge():
    limits = dict(qps=20, duration_s=4, num_requests=80, ttft_limit_ms=60_000, tpot_limit_ms=1_000,
                  require_early_stopping=False)
    v = verdict(_queue(81, rate=20, service_s=3.0, servers=100), server(**limits))
    assert not v.valid and v.reasons == ["too short to show the server keeps up: the median request took 3.0 s, "
                                         "more than half of the 4.0 s of arrivals (lengthen duration_s to at "
                                         "least 6 s)"]


def test_growth_within_poisson_noise_is_not_a_backlog():
    # 2 req/s, 5 s lifetimes: ~10 in the system, so a rise of a few is noise, not overload
    rng = np.random.default_rng(0)
    arrivals = np.cumsum(rng.exponential(0.5, 60))
    records = [RequestRecord(index=i, sample=i, scheduled=t, sent=t, first_byte=t + 0.1, done=t + 5.0,
                             chunks=[Chunk(t + 0.1, 11)], output_tokens=11, status="ok")
               for i, t in enumerate(arrivals - arrivals[0])]
    s = summarize(records, duration_s=float(arrivals[-1]))
    in_half, in_end = s["in_system_at_half"], s["in_system_at_end"]
    assert in_end - in_half <= 3 * math.sqrt(in_half + in_end + 1)
    limits = dict(qps=2, duration_s=20, num_requests=40, ttft_limit_ms=1000, tpot_limit_ms=1000,
                  require_early_stopping=False)
    assert verdict(records, server(**limits)).valid


@pytest.mark.parametrize("name, sla, valid, reason", [
    # passed p99 TTFT 693 ms and TPOT 90.8 ms (limits 2000/100) in 20 s, as the backlog doubled
    ("vllm-fp8-h200-qps53.44", "llama3.1-8b", False, "not keeping up: requests in the system grew from 300 to 621"),
    ("vllm-fp8-h200-qps47.25", "llama3.1-8b", True, None),
    # passed p99 TTFT 827 ms and TPOT 89.0 ms in 10 s; the median request took 9.2 s
    ("sglang-baseline-h200-qps36", "llama3.1-8b", False, "too short to show the server keeps up: the median request "
                                                         "took 9.2 s"),
    # a 70B far from its capacity (the same engines served 2.7-3.9 and 9.6 req/s): arrivals bunched late
    # (24 of 36, 41 of 59 in the second half), 4 → 17 and 6 → 18 in the system, which a gate of 3·√(first
    # count + 1) called a backlog; 3·√ of both counts (the variance of their difference) does not
    ("vllm-70b-fp8-tp1-h200-qps2.087", "llama2-70b", True, None),
    ("vllm-70b-tp2-h200-qps3", "llama2-70b", True, None),
])
def test_gpu_levels_that_passed_p99_in_seconds(name, sla, valid, reason):
    qps = float(name.rsplit("qps", 1)[1])
    settings = ScenarioSettings(kind="server", qps=qps, duration_s=10, sla=sla, require_early_stopping=False)
    records = _gpu_level(name)
    v = verdict(records, settings)
    assert v.valid is valid, v.reasons
    if reason:
        assert len(v.reasons) == 1 and v.reasons[0].startswith(reason)
    # without the check these levels pass: the p99 limits alone do not catch them
    assert verdict(records, replace(settings, min_keep_up=None)).valid
