"""The level audit's rules and the engine side that feeds them, on fixtures shaped after real engine output."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from servetune.loadgen.audit import AUDIT, FLATTERS, HURTS, Auditor, client_counts, contaminated, counter_deltas, judge
from servetune.loadgen.records import RequestRecord, ScenarioResult
from servetune.optimizer.engines import disturbances as D
from servetune.optimizer.engines import get_engine
from servetune.optimizer.engines.base import ModelRef
from servetune.optimizer.engines.probe import EngineProbe
from servetune.optimizer.engines.prometheus import gauge_max
from servetune.optimizer.engines.vllm import JIT_MONITOR_VERBOSE, _version_at_least

FIX = Path(__file__).parent / "fixtures"
BEFORE = (FIX / "engine_metrics" / "vllm-0.26-bench-replay-before.prom").read_text()
AFTER = (FIX / "engine_metrics" / "vllm-0.26-bench-replay-after.prom").read_text()


def _records(n: int, prompt: int, out: int, *, failed: int = 0, source: str = "usage_continuous"):
    recs = [RequestRecord(index=i, sample=i, scheduled=0.0, input_tokens=prompt, output_tokens=out,
                          expected_output_tokens=out, status="ok", token_count_source=source) for i in range(n)]
    recs += [RequestRecord(index=n + i, sample=i, scheduled=0.0, input_tokens=prompt, output_tokens=3,
                           expected_output_tokens=out, status="timeout") for i in range(failed)]
    return recs


def _server(before: str, after: str, engine: str = "vllm") -> dict[str, float]:
    e = get_engine(engine)
    return counter_deltas(e.audit_counters(e.parse_metrics(before)), e.audit_counters(e.parse_metrics(after)))


def test_vllm_counters_of_the_issue_15_bench_run_flag_the_replayed_prompts():
    server = _server(BEFORE, AFTER)
    assert server == {"prompt_tokens": 1228800.0, "generation_tokens": 153600.0, "prefix_cache_queries": 1228800.0,
                      "prefix_cache_hits": 156240.0, "preemptions": 0.0, "requests_finished": 1200.0}
    client = client_counts(_records(1200, 1024, 128))
    reasons, notes, effects = judge(client, server, [])
    assert len(reasons) == 1 and effects == [FLATTERS]  # the tokens agree exactly; the hits do not pass
    assert ("prefix-cache hits were 12.7% of the prompt tokens (156,240 of 1,228,800; 11.2% beyond the first 16 of "
            "each prompt)") in reasons[0]
    # a workload that shares prefixes on purpose measures its hits instead
    reasons, notes, _ = judge(client, server, [], max_prefix_hit_fraction=None)
    assert reasons == [] and "prefix-cache hits 12.71% of the prompt tokens (156,240)" in notes


def test_sglang_radix_hits_on_the_first_tokens_of_distinct_prompts_are_not_a_replay():
    # SGLang 0.5.17 on the real SmolLM2 (2026-12-06): every level of two trials scored 4.5-6.7 hit tokens per
    # request on its radix cache (page size 1), 2-27 % of the prompt tokens, with no prompt sent twice. The
    # prompts begin "L<level> Request <n>.\n" and SmolLM2 splits digits, so each shares its first few tokens
    # with an earlier one. Under the bare 1 % rule all 32 windows were "replayed"; they are not.
    fixture = json.loads((FIX / "engine_metrics" / "sglang-0.5.17-smollm2-text-tasks-levels.json").read_text())
    assert len(fixture["levels"]) == 32
    for level in fixture["levels"]:
        c = level["client"]
        n = int(c["requests"])
        per = c["prompt_tokens"] / n  # the per-request lengths were not kept; every prompt is >= 16 tokens
        records = _records(n, round(per), round(c["generation_tokens"] / n))
        client = {**client_counts(records), "prompt_tokens": c["prompt_tokens"],
                  "generation_tokens": c["generation_tokens"]}
        server = level["server"]
        assert server["prefix_cache_hits"] / server["prompt_tokens"] > 0.02  # the bare rule's false positive
        reasons, notes, _ = judge(client, server, [])
        assert reasons == [], (level["scenario"], level["concurrency"], reasons)
        assert any("within the first 16 tokens distinct prompts may share" in x for x in notes)
        # the copy windows (~220-token prompts) with one prompt in ten sent again whole are flagged; in the free
        # windows (~24-token prompts) a replay hides inside the 16 tokens allowed each prompt (docs/loadgen.md)
        replayed = {**server, "prefix_cache_hits": server["prefix_cache_hits"] + 0.1 * server["prompt_tokens"]}
        assert judge(client, replayed, [])[2] == ([FLATTERS] if level["scenario"] == "copy" else [])


def test_token_counts_must_agree_within_the_tolerance():
    server = {"prompt_tokens": 10_000.0, "generation_tokens": 1_000.0, "prefix_cache_hits": 0.0}
    ok = client_counts(_records(10, 1000, 100))
    assert judge(ok, server, [])[0] == []
    more = {**server, "prompt_tokens": 11_000.0}  # one request more than the client sent: other traffic
    reasons = judge(ok, more, [])[0]
    assert len(reasons) == 1 and "1,000 more, from other traffic" in reasons[0]
    fewer = {**server, "generation_tokens": 900.0}
    assert "100 never reached the server's counters" in judge(ok, fewer, [])[0][0]
    assert judge(ok, {**server, "generation_tokens": 995.0}, [])[0] == []  # within 1 %
    # failed requests may or may not have been counted: anything up to their tokens is fine
    with_failed = client_counts(_records(10, 1000, 100, failed=2))
    assert judge(with_failed, {**server, "prompt_tokens": 11_500.0, "generation_tokens": 1_150.0}, [])[0] == []
    # without usage the client's counts are estimates: compared with nothing, and said so
    estimated = client_counts(_records(10, 1000, 100, source="chunks"))
    reasons, notes, _ = judge(estimated, more, [])
    assert reasons == [] and any("estimates" in n for n in notes)


def test_the_vllm_jit_warning_inside_the_window_invalidates_the_level(tmp_path):
    text = (FIX / "level_logs" / "vllm_jit_during_inference.log").read_bytes()
    log = tmp_path / "engine.log"
    log.write_bytes(text)
    probe = EngineProbe(get_engine("vllm"), "http://127.0.0.1:9/metrics", log)
    jit_at = text.index(b"(EngineCore_DP0")
    events = probe.log_events(0, len(text))
    assert [(e["kind"], e["invalidates"]) for e in events] == [("jit", True)]
    assert "fused_moe_kernel" in events[0]["line"]
    assert probe.log_events(0, jit_at) == [] and probe.log_events(jit_at + 200, len(text)) == []  # windows
    reasons, _, effects = judge({"exact": 0.0}, {}, events)
    assert effects == [HURTS] and reasons[0].startswith("1 jit line in the engine log during the level")
    assert probe.counters() is None  # nothing listens there: the audit says it could not read /metrics


def test_sglang_names_and_a_retraction_is_a_note_not_a_reason():
    e = get_engine("sglang")
    before = ('sglang:prompt_tokens_total{model_name="m"} 100.0\nsglang:generation_tokens_total{model_name="m"} 10.0\n'
              'sglang:cached_tokens_total{model_name="m",cache_source="device"} 0.0\n'
              'sglang:num_requests_total{model_name="m"} 1.0\n'
              'sglang:num_retracted_requests_total{model_name="m"} 0.0\n')
    after = before.replace("100.0", "4100.0").replace(" 10.0", " 410.0").replace(" 1.0", " 5.0").replace(
        'retracted_requests_total{model_name="m"} 0.0', 'retracted_requests_total{model_name="m"} 1.0')
    server = counter_deltas(e.audit_counters(e.parse_metrics(before)), e.audit_counters(e.parse_metrics(after)))
    assert server == {"prompt_tokens": 4000.0, "generation_tokens": 400.0, "prefix_cache_queries": 4000.0,
                      "prefix_cache_hits": 0.0, "preemptions": 1.0, "requests_finished": 4.0}
    events = D.scan((FIX / "level_logs" / "sglang_retract.log").read_text(), e.disturbances)
    assert [ev["kind"] for ev in events] == ["preemption"]
    reasons, notes, _ = judge(client_counts(_records(4, 1000, 100)), server, events)
    assert reasons == [] and any("1 preemption line" in n for n in notes) and "1 preemptions during the level" in notes


def test_kv_usage_peak_is_the_fullest_engine_not_the_sum():
    text = ('# HELP vllm:kv_cache_usage_perc KV-cache usage.\n'
            'vllm:kv_cache_usage_perc{engine="0",model_name="m"} 0.61\n'
            'vllm:kv_cache_usage_perc{engine="1",model_name="m"} 0.72\n'
            'vllm:kv_cache_usage_perc_other{engine="0"} 9\n')
    assert gauge_max(text, "vllm:kv_cache_usage_perc") == 0.72
    assert gauge_max(text, "sglang:token_usage") is None


class _FakeProbe:
    """Counters that move by what the test says each run did (the real probes are tested above and on the sim)."""
    has_log = False

    def __init__(self, hits_per_run):
        self.hits = list(hits_per_run)
        self.total = {"prompt_tokens": 0.0, "generation_tokens": 0.0, "prefix_cache_hits": 0.0}

    def counters(self):
        return dict(self.total)

    def kv_usage(self):
        return 0.5

    def log_offset(self):
        return None

    def run(self, valid=True):
        self.total["prompt_tokens"] += 1000
        self.total["generation_tokens"] += 100
        self.total["prefix_cache_hits"] += self.hits.pop(0)
        return ScenarioResult("server", {}, _records(10, 100, 10), 1.0, {}, valid=valid,
                              invalid_reasons=[] if valid else ["TTFT p99 900 ms exceeds the 500 ms limit"])


def test_a_failed_audit_reruns_once_and_a_second_failure_is_contamination():
    probe = _FakeProbe([500, 0])
    warmed = []
    auditor = Auditor(probe, rewarm=lambda s: warmed.append(s) or {"rounds": 1}, poll_s=0.01, settle_s=0)
    res = auditor.measure(probe.run, settings="the level")
    assert warmed == ["the level"] and res.valid and not contaminated(res)
    assert res.audit["passed"] and res.audit["rerun_of"]["audit"]["reasons"][0].startswith("prefix-cache hits")
    assert res.summary["audit_reruns"] == 1.0 and res.audit["rewarm"] == {"rounds": 1}
    probe = _FakeProbe([500, 500])
    res = Auditor(probe, poll_s=0.01, settle_s=0).measure(probe.run)
    assert contaminated(res) and not res.valid and res.audit["contaminated"]
    assert any(r.startswith(AUDIT + "prefix-cache hits") for r in res.invalid_reasons)
    # a level that fails on its own despite replayed prompts in its favour is not re-run: a clean run fails too
    probe = _FakeProbe([500])
    res = Auditor(probe, poll_s=0.01, settle_s=0).measure(lambda: probe.run(valid=False))
    assert res.audit["verdict_stands"] and not contaminated(res) and "audit_reruns" not in res.summary


@pytest.mark.parametrize("engine", ["vllm", "sglang", "sim"])
def test_every_engine_maps_the_same_neutral_counters(engine):
    e = get_engine(engine)
    assert e.kv_usage_metric and e.disturbances
    text = BEFORE if engine != "sglang" else 'sglang:prompt_tokens_total{model_name="m"} 1.0\n'
    assert set(e.audit_counters(e.parse_metrics(text))) <= {
        "prompt_tokens", "generation_tokens", "prefix_cache_queries", "prefix_cache_hits", "preemptions",
        "requests_finished", "kv_cache_usage", "in_flight"}


def test_a_window_opens_once_the_engine_holds_no_earlier_request():
    probe = _FakeProbe([0])
    left = iter([2.0, 1.0, 0.0])
    counters = probe.counters
    probe.counters = lambda: {**counters(), "in_flight": next(left, 0.0)}
    res = Auditor(probe, poll_s=0.01, settle_s=0).run_level(probe.run)
    assert res.audit["passed"] and "in_flight_at_start" not in res.audit  # it waited for the two stragglers
    probe = _FakeProbe([0])
    stuck = probe.counters
    probe.counters = lambda: {**stuck(), "in_flight": 4.0}
    res = Auditor(probe, poll_s=0.01, settle_s=0, quiet_s=0.2).run_level(probe.run)
    assert res.audit["in_flight_at_start"] == 4.0
    assert any("still held 4 requests of an earlier run" in n for n in res.notes)


# vLLM 0.26.0's jit_monitor (vllm/utils/jit_monitor.py): the message "%s %s during inference: %s%s. This causes
# a latency spike; consider extending warmup to cover this shape/config." with (backend, event, kernel, detail),
# where detail is " (constexprs=...; signature=...; extra_compile_info=...; key=...)" under
# --jit-monitor-verbose; and Triton's autotuner print that the monitor switches on.
VERBOSE_JIT = ("(EngineCore pid=5068) WARNING 12-04 20:47:31 [jit_monitor.py:133] Triton kernel JIT compilation "
               "during inference: fused_moe_kernel (constexprs={BLOCK_SIZE_K=128, BLOCK_SIZE_M=64, "
               "BLOCK_SIZE_N=128, GROUP_SIZE_M=1}; signature={a_ptr='*bf16', b_ptr='*bf16'}; "
               "extra_compile_info={num_stages=3, num_warps=4}; key='c1f0'). This causes a latency spike; "
               "consider extending warmup to cover this shape/config.")
AUTOTUNE = ("(EngineCore pid=5068) Triton autotuning for function _w8a8_block_fp8_matmul, with key as (2048, 4096), "
            "finished after 2.31s, best config selected: BLOCK_SIZE_M: 64, num_warps: 4;")


def test_every_compile_is_a_jit_event_with_vllms_verbose_monitor_and_autotuning_too(tmp_path):
    log = tmp_path / "engine.log"
    log.write_text("INFO warm\n" + VERBOSE_JIT + "\n" + VERBOSE_JIT.replace("BLOCK_SIZE_M=64", "BLOCK_SIZE_M=16")
                   + "\n" + AUTOTUNE + "\n")
    probe = EngineProbe(get_engine("vllm"), "http://127.0.0.1:9/metrics", log)
    events = probe.log_events(0, log.stat().st_size)
    assert [(e["kind"], e["invalidates"]) for e in events] == [("jit", True)] * 3
    reasons, _, _ = judge({"exact": 0.0}, {}, events)
    assert reasons[0].startswith("3 jit lines in the engine log during the level")


def test_vllm_is_launched_with_the_verbose_jit_monitor_and_exports_leave_it_out():
    e = get_engine("vllm")
    argv = e.plan({}, ModelRef(path="/m", name="m", shape=None), host="127.0.0.1", port=1, gpu_ids=[0]).argv
    assert JIT_MONITOR_VERBOSE in argv and JIT_MONITOR_VERBOSE in e.measurement_flags
    for version in ("0.26.0", "0.33.0"):  # the flag is in both releases' own --help
        assert JIT_MONITOR_VERBOSE in (FIX / "engine_help" / f"vllm-{version}.txt").read_text()
    assert _version_at_least("0.26.0", (0, 26)) and _version_at_least("0.33.1rc1", (0, 26))
    assert not _version_at_least("0.25.2", (0, 26)) and not _version_at_least("dev", (0, 26))


def test_every_verbose_jit_line_of_a_real_vllm_counts_and_is_recorded_short(tmp_path):
    """vLLM 0.26 on an H100 with --jit-monitor-verbose (docs/results/2026-12-07-h100-jit-verbose): the first
    warm-up requests of a mixtral-shaped server compiled fused_moe_kernel 8 times, a ~3 KB line each."""
    text = (FIX / "level_logs" / "vllm_jit_verbose_h100.log").read_bytes()
    log = tmp_path / "engine.log"
    log.write_bytes(text)
    probe = EngineProbe(get_engine("vllm"), "http://127.0.0.1:9/metrics", log)
    events = probe.log_events(0, len(text))
    assert [(e["kind"], e["invalidates"]) for e in events] == [("jit", True)] * 8
    assert all(len(e["line"]) <= D.MAX_LINE_CHARS and "fused_moe_kernel (constexprs={" in e["line"] for e in events)
    shapes = {e["line"].split("GROUP_SIZE_M=")[1].split(", SPLIT_K")[0] for e in events}
    assert shapes == {"1, HAS_BIAS=False, MUL_ROUTED_WEIGHT=False", "1, HAS_BIAS=False, MUL_ROUTED_WEIGHT=True",
                      "16, HAS_BIAS=False, MUL_ROUTED_WEIGHT=False", "16, HAS_BIAS=False, MUL_ROUTED_WEIGHT=True"}
    reasons, _, effects = judge({"exact": 0.0}, {}, events)
    assert effects == [HURTS] and reasons[0].startswith("8 jit lines in the engine log during the level")
