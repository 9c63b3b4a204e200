"""Metric definitions against hand-computed records: exact numbers, MLPerf nearest-rank percentiles."""
import math

import numpy as np
import pytest

from servetune.loadgen.client import _spread
from servetune.loadgen.metrics import (
    chunk_gaps_ms,
    itl_ms,
    nearest_rank,
    summarize,
    tpot_ms,
    ttft_from_send_ms,
    ttft_ms,
)
from servetune.loadgen.records import Chunk, RequestRecord


def test_nearest_rank_is_mlperf_not_numpy():
    values = list(range(1, 101))
    assert nearest_rank(values, 0.99) == 100  # sorted[int(100 * 0.99)] = sorted[99]
    assert np.percentile(values, 99) == pytest.approx(99.01)  # what linear interpolation would say
    ten = [10, 2, 8, 4, 6, 1, 3, 5, 7, 9]  # unsorted on purpose
    assert nearest_rank(ten, 0.50) == 6  # sorted[5]; numpy says 5.5
    assert nearest_rank(ten, 0.90) == 10  # sorted[9]
    assert nearest_rank(ten, 0.0) == 1
    assert nearest_rank(ten, 1.0) == 10  # index n clipped to n - 1
    assert nearest_rank([7.0], 0.99) == 7.0
    assert math.isnan(nearest_rank([], 0.5))
    assert nearest_rank(values, 0.29) == 29  # int(28.999999999999996) = 28, exactly as LoadGen's C++ cast
    with pytest.raises(ValueError):
        nearest_rank(values, 1.5)


def _rec(index, scheduled, sent, first_byte, done, chunks, out, inp=10, expected=4, status="ok", warmup=False):
    return RequestRecord(index=index, sample=index, scheduled=scheduled, sent=sent, first_byte=first_byte,
                         done=done, chunks=[Chunk(t, k) for t, k in chunks], input_tokens=inp, output_tokens=out,
                         expected_output_tokens=expected, status=status, warmup=warmup)


@pytest.fixture
def records():
    return [
        # TTFT 100, TPOT 70/3, ITL [20, 20, 20] (the 40 ms gap spread over its 2 tokens), E2E 170
        _rec(0, 0.0, 0.001, 0.100, 0.170, [(0.100, 1), (0.120, 1), (0.160, 2)], out=4, inp=10),
        # TTFT 50, TPOT 15, ITL [10], E2E 65
        _rec(1, 0.5, 0.502, 0.550, 0.565, [(0.550, 1), (0.560, 1)], out=2, inp=20),
        # one token: TTFT 200, no TPOT, no ITL, E2E 200
        _rec(2, 1.0, 1.0, 1.2, 1.2, [(1.2, 1)], out=1, inp=2),
        _rec(3, 1.5, 1.5, None, 1.51, [], out=0, status="http_500"),
        _rec(4, 2.0, 2.0, 2.5, 3.0, [(2.5, 1)], out=1, status="timeout"),
        # warmup: absurd values that must not show anywhere
        _rec(5, -9.0, -9.0, 50.0, 90.0, [(50.0, 1), (60.0, 1)], out=500, status="ok", warmup=True),
    ]


def test_per_request_definitions(records):
    r0 = records[0]
    assert ttft_ms(r0) == pytest.approx(100.0)
    assert tpot_ms(r0) == pytest.approx(70.0 / 3)
    assert itl_ms(r0) == pytest.approx([20.0, 20.0, 20.0])
    assert tpot_ms(records[2]) is None  # ≤ 1 token: no TPOT (LoadGen rejects it too)


def test_summary_exact(records):
    s = summarize(records, duration_s=3.2, ttft_limit_ms=150, tpot_limit_ms=20, num_gpus=2)
    expected = {
        "requests_issued": 5, "requests_ok": 3, "requests_failed": 2, "error_rate": 0.4,
        "errors_http_500": 1, "errors_timeout": 1, "errors_dropped": 0, "errors_connect": 0,
        "errors_malformed": 0,
        "duration_s": 3.2, "throughput_window_s": 3.0,  # t0 → last completion of a measured request
        "output_tokens_total": 7, "input_tokens_total": 32,
        "request_per_s": 1.0, "output_tokens_per_s": 7 / 3, "input_tokens_per_s": 32 / 3,
        "output_tokens_per_s_per_gpu": 7 / 6,
        "scheduled_request_per_s": 2.0, "last_scheduled_s": 2.0, "last_sent_s": 2.0, "last_done_s": 3.0,
        "tokens_per_s_per_user": (1000 / (70 / 3) + 1000 / 15) / 2,
        "ttft_mean_ms": 350 / 3, "ttft_p50_ms": 100.0, "ttft_p90_ms": 200.0, "ttft_p99_ms": 200.0,
        "ttft_max_ms": 200.0,
        "tpot_mean_ms": (70 / 3 + 15) / 2, "tpot_p50_ms": 70 / 3, "tpot_p90_ms": 70 / 3, "tpot_p99_ms": 70 / 3,
        "itl_mean_ms": 17.5, "itl_p50_ms": 20.0, "itl_p90_ms": 20.0, "itl_p99_ms": 20.0, "itl_max_ms": 20.0,
        "e2e_mean_ms": 145.0, "e2e_p50_ms": 170.0, "e2e_p90_ms": 200.0, "e2e_p99_ms": 200.0,
        "schedule_lag_mean_ms": 0.6, "schedule_lag_p99_ms": 2.0, "schedule_lag_max_ms": 2.0,
        "concurrency_peak": 1, "concurrency_mean": (0.169 + 0.063 + 0.2 + 0.01 + 1.0) / 3.0,
        "output_short_fraction": 2 / 3,
        # good: met TTFT ≤ 150 and TPOT ≤ 20 → only record 1 (record 0's TPOT is 23.3, record 2's TTFT 200)
        "good_requests": 1, "goodput_request_per_s": 1 / 3,
        # failed requests count as over the limit (2) + record 2 (TTFT) / record 0 (TPOT)
        "ttft_over_limit_count": 3, "tpot_over_limit_count": 3,
    }
    for key, value in expected.items():
        assert s[key] == pytest.approx(value, rel=1e-9, abs=1e-12), key


def test_summary_without_limits_and_empty():
    s = summarize([], duration_s=5.0)
    assert s["requests_issued"] == 0 and s["error_rate"] == 0.0
    assert math.isnan(s["ttft_p99_ms"]) and math.isnan(s["tokens_per_s_per_user"])
    assert s["throughput_window_s"] == 5.0 and s["output_tokens_per_s"] == 0.0
    assert "goodput_request_per_s" not in s and "ttft_over_limit_count" not in s
    # a one-token output with a TPOT limit counts as TPOT 0 for goodput (vLLM's convention)
    one = [_rec(0, 0.0, 0.0, 0.01, 0.01, [(0.01, 1)], out=1)]
    assert summarize(one, 1.0, tpot_limit_ms=1.0)["good_requests"] == 1


def test_itl_with_zero_token_chunks_and_multi_token_first_chunk():
    r = _rec(0, 0.0, 0.0, 0.1, 0.3, [(0.1, 3), (0.2, 0), (0.3, 4)], out=7)
    assert itl_ms(r) == pytest.approx([50.0] * 4)  # gaps run between token-bearing chunks: 0.1 → 0.3 over 4


def test_send_origin_chunk_gaps_goodput_and_output_length(records):
    r0 = records[0]
    assert ttft_from_send_ms(r0) == pytest.approx(99.0)  # sent 1 ms after its scheduled time
    assert chunk_gaps_ms(r0) == pytest.approx([20.0, 40.0])  # raw, before spreading over the 2 tokens
    for r in records:
        r.ignore_eos = True
    s = summarize(records, duration_s=3.2, ttft_limit_ms=150, tpot_limit_ms=20)
    assert s["ttft_from_send_p50_ms"] == pytest.approx(99.0)  # ok records 48, 99, 200: nearest rank [1]
    assert s["chunk_gap_max_ms"] == pytest.approx(40.0) and s["chunk_gap_p50_ms"] == pytest.approx(20.0)
    assert s["tokens_per_s_per_user_at_tpot_p90"] == pytest.approx(1000 / (70 / 3))
    assert s["goodput_output_tokens_per_s"] == pytest.approx(2 / 3.0)  # only record 1 (2 tokens) is good
    assert s["good_request_fraction"] == pytest.approx(1 / 5)  # failures stay in the denominator
    # requested 4 each; delivered 4, 2, 1: with ignore_eos the two short ones are mismatches
    assert s["output_tokens_requested_total"] == 12 and s["output_tokens_delivered_ratio"] == pytest.approx(7 / 12)
    assert s["output_length_mismatch_ignore_eos"] == 2 and s["ignore_eos_fraction"] == 1.0
    assert s["tokens_from_usage_fraction"] == 0.0  # the fixture records name no usage source


def test_final_usage_total_is_spread_over_chunks():
    chunks = [Chunk(0.1, 1), Chunk(0.2, 1), Chunk(0.3, 1)]
    _spread(chunks, 8)
    assert [c.tokens for c in chunks] == [3, 3, 2]
    same = [Chunk(0.1, 1), Chunk(0.2, 1)]
    _spread(same, 1)  # fewer tokens than chunks: left as counted
    assert [c.tokens for c in same] == [1, 1]
