"""Engine /metrics between two scrapes -> engine-neutral numbers (TrialResult.metrics_delta)."""
from __future__ import annotations

import pytest

from servetune.optimizer.engines import get_engine
from servetune.optimizer.engines.prometheus import labelled_key, parse_prometheus
from servetune.optimizer.engines.vllm_metrics import summarize_vllm_metrics

VLLM_BEFORE = """\
# HELP vllm:num_requests_running Number of requests in model execution batches.
# TYPE vllm:num_requests_running gauge
vllm:num_requests_running{engine="0",model_name="llama"} 0.0
vllm:num_requests_waiting{engine="0",model_name="llama"} 0.0
vllm:kv_cache_usage_perc{engine="0",model_name="llama"} 0.0
# TYPE vllm:num_preemptions_total counter
vllm:num_preemptions_total{engine="0",model_name="llama"} 3.0
vllm:num_preemptions_created{engine="0",model_name="llama"} 1.7635e+09
vllm:prompt_tokens_total{engine="0",model_name="llama"} 1000.0
vllm:generation_tokens_total{engine="0",model_name="llama"} 500.0
vllm:prefix_cache_queries_total{engine="0",model_name="llama"} 1000.0
vllm:prefix_cache_hits_total{engine="0",model_name="llama"} 0.0
vllm:request_success_total{engine="0",finished_reason="length",model_name="llama"} 10.0
vllm:request_success_total{engine="0",finished_reason="stop",model_name="llama"} 2.0
vllm:time_to_first_token_seconds_bucket{engine="0",le="0.01",model_name="llama"} 4.0
vllm:time_to_first_token_seconds_sum{engine="0",model_name="llama"} 1.5
vllm:time_to_first_token_seconds_count{engine="0",model_name="llama"} 12.0
"""
VLLM_AFTER = """\
vllm:num_requests_running{engine="0",model_name="llama"} 7.0
vllm:num_requests_waiting{engine="0",model_name="llama"} 2.0
vllm:kv_cache_usage_perc{engine="0",model_name="llama"} 0.42
vllm:num_preemptions_total{engine="0",model_name="llama"} 8.0
vllm:prompt_tokens_total{engine="0",model_name="llama"} 51000.0
vllm:generation_tokens_total{engine="0",model_name="llama"} 12500.0
vllm:prefix_cache_queries_total{engine="0",model_name="llama"} 51000.0
vllm:prefix_cache_hits_total{engine="0",model_name="llama"} 12500.0
vllm:request_success_total{engine="0",finished_reason="length",model_name="llama"} 100.0
vllm:request_success_total{engine="0",finished_reason="stop",model_name="llama"} 12.0
vllm:spec_decode_num_drafts_total{engine="0",model_name="llama"} 1000.0
vllm:spec_decode_num_draft_tokens_total{engine="0",model_name="llama"} 4000.0
vllm:spec_decode_num_accepted_tokens_total{engine="0",model_name="llama"} 2400.0
vllm:spec_decode_num_accepted_tokens_per_pos_total{engine="0",model_name="llama",position="0"} 900.0
vllm:spec_decode_num_accepted_tokens_per_pos_total{engine="0",model_name="llama",position="1"} 700.0
vllm:spec_decode_num_accepted_tokens_per_pos_total{engine="0",model_name="llama",position="2"} 500.0
vllm:spec_decode_num_accepted_tokens_per_pos_total{engine="0",model_name="llama",position="3"} 300.0
"""


def test_vllm_metrics_delta():
    e = get_engine("vllm")
    d = e.metrics_delta(e.parse_metrics(VLLM_BEFORE), e.parse_metrics(VLLM_AFTER))
    assert d == {
        "kv_cache_usage": 0.42, "running": 7.0, "waiting": 2.0, "preemptions": 5.0,
        "prefix_cache_hit_rate": 0.25,  # 12500 hits / 50000 queried tokens in the window
        "spec_acceptance_rate": 0.6,  # 2400 accepted / 4000 drafted
        "spec_mean_acceptance_length": 3.4,  # 1 + 2400 / 1000 drafts
        "spec_drafts": 1000.0, "spec_draft_tokens": 4000.0, "spec_accepted_tokens": 2400.0,
        # accepted at position i / drafts: vLLM's per-position acceptance rate
        "spec_acceptance_pos0": 0.9, "spec_acceptance_pos1": 0.7, "spec_acceptance_pos2": 0.5,
        "spec_acceptance_pos3": 0.3,
        "prompt_tokens": 50000.0, "generation_tokens": 12000.0, "requests_succeeded": 100.0,
    }


def test_vllm_metrics_delta_leaves_out_what_was_not_measured():
    e = get_engine("vllm")
    before = e.parse_metrics(VLLM_BEFORE)
    d = e.metrics_delta(before, before)
    assert "spec_acceptance_rate" not in d and "prefix_cache_hit_rate" not in d  # no drafts, no queries
    assert d["preemptions"] == 0.0


def test_the_sim_can_share_the_vllm_summary():
    # the sim exposes vLLM's metric names, so the same helper reads it
    assert summarize_vllm_metrics({}, {"vllm:num_preemptions_total": 2.0}) == {"preemptions": 2.0}


SGLANG_BEFORE = """\
# HELP sglang:num_running_reqs The number of running requests.
# TYPE sglang:num_running_reqs gauge
sglang:num_running_reqs{engine_type="unified",model_name="llama",tp_rank="0",pp_rank="0"} 0.0
sglang:num_queue_reqs{engine_type="unified",model_name="llama",tp_rank="0",pp_rank="0"} 0.0
sglang:token_usage{engine_type="unified",model_name="llama",tp_rank="0",pp_rank="0"} 0.0
sglang:cache_hit_rate{engine_type="unified",model_name="llama",tp_rank="0",pp_rank="0"} 0.0
sglang:prompt_tokens_total{model_name="llama"} 2000.0
sglang:generation_tokens_total{model_name="llama"} 1000.0
sglang:cached_tokens_total{model_name="llama"} 0.0
sglang:num_requests_total{model_name="llama"} 20.0
sglang:num_retracted_requests_total{model_name="llama"} 1.0
"""
SGLANG_AFTER = """\
sglang:num_running_reqs{engine_type="unified",model_name="llama",tp_rank="0",pp_rank="0"} 12.0
sglang:num_queue_reqs{engine_type="unified",model_name="llama",tp_rank="0",pp_rank="0"} 4.0
sglang:token_usage{engine_type="unified",model_name="llama",tp_rank="0",pp_rank="0"} 0.35
sglang:cache_hit_rate{engine_type="unified",model_name="llama",tp_rank="0",pp_rank="0"} 0.1
sglang:prompt_tokens_total{model_name="llama"} 42000.0
sglang:generation_tokens_total{model_name="llama"} 11000.0
sglang:cached_tokens_total{model_name="llama"} 8000.0
sglang:num_requests_total{model_name="llama"} 120.0
sglang:num_retracted_requests_total{model_name="llama"} 4.0
sglang:spec_accept_rate{engine_type="unified",model_name="llama",tp_rank="0",pp_rank="0"} 0.55
sglang:spec_accept_length{engine_type="unified",model_name="llama",tp_rank="0",pp_rank="0"} 2.65
"""
# SGLang's one cumulative speculative counter (TokenizerMetricsCollector): verification calls per request
SGLANG_VERIFY = ('sglang:spec_verify_calls_total{model_name="llama"} 100.0\n',
                 'sglang:spec_verify_calls_total{model_name="llama"} 4100.0\n')


def test_sglang_metrics_delta():
    e = get_engine("sglang")
    d = e.metrics_delta(e.parse_metrics(SGLANG_BEFORE), e.parse_metrics(SGLANG_AFTER))
    assert d == {
        "kv_cache_usage": 0.35, "running": 12.0, "waiting": 4.0, "preemptions": 3.0,
        "prefix_cache_hit_rate": 0.2,  # 8000 cached / 40000 prompt tokens
        "spec_acceptance_rate": 0.55, "spec_mean_acceptance_length": 2.65,
        "prompt_tokens": 40000.0, "generation_tokens": 10000.0, "requests_succeeded": 100.0,
    }


def test_sglang_mean_acceptance_length_over_the_window_comes_from_its_counters():
    # 10,000 tokens generated by 100 requests: 100 came from prefills, 9,900 from 4,000 verifications
    e = get_engine("sglang")
    d = e.metrics_delta(e.parse_metrics(SGLANG_BEFORE + SGLANG_VERIFY[0]),
                        e.parse_metrics(SGLANG_AFTER + SGLANG_VERIFY[1]))
    assert d["spec_mean_acceptance_length"] == 2.475 and d["spec_drafts"] == 4000.0
    assert d["spec_acceptance_rate"] == 0.55  # the gauge: SGLang counts no draft tokens


def test_per_position_series_are_kept_per_label_value_and_summed_over_engines():
    text = ('vllm:spec_decode_num_accepted_tokens_per_pos_total{engine="0",position="0"} 5\n'
            'vllm:spec_decode_num_accepted_tokens_per_pos_total{engine="1",position="0"} 7\n'
            'vllm:spec_decode_num_accepted_tokens_per_pos_total{engine="1",position="1"} 2\n')
    name = "vllm:spec_decode_num_accepted_tokens_per_pos_total"
    m = parse_prometheus(text, split={name: "position"})
    assert m[name] == 14
    assert m[labelled_key(name, "position", "0")] == 12 and m[labelled_key(name, "position", "1")] == 2
    assert parse_prometheus(text) == {name: 14}


@pytest.mark.parametrize("engine", ["vllm", "sglang"])
def test_same_neutral_keys_for_both_engines(engine):
    e = get_engine(engine)
    text_b, text_a = (VLLM_BEFORE, VLLM_AFTER) if engine == "vllm" else (SGLANG_BEFORE, SGLANG_AFTER)
    keys = set(e.metrics_delta(e.parse_metrics(text_b), e.parse_metrics(text_a)))
    assert {"kv_cache_usage", "running", "waiting", "preemptions", "prefix_cache_hit_rate",
            "spec_acceptance_rate"} <= keys
