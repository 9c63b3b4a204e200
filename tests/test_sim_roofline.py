"""Roofline arithmetic, model-shape and memory math, and the scheduler's KV accounting."""
from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from servetune.optimizer.engines.sim.config import SimConfig, SimConfigError, SimStartupError, memory_plan
from servetune.optimizer.engines.sim.scheduler import Scheduler, SimRequest
from servetune.optimizer.perfmodel.hardware import GPUS, GpuSpec, get_gpu
from servetune.optimizer.perfmodel.model_shapes import PRESETS, ModelShape, load_shape
from servetune.optimizer.perfmodel.roofline import PER_SEQ_S, STEP_OVERHEAD_S, Roofline, StepBatch

# A GPU with round numbers and no derating, so step times can be worked out by hand.
UNIT_GPU = GpuSpec("unit", memory_gib=16, bf16_tflops=100, fp8_tflops=200, hbm_tb_s=1.0, link_gb_s=100,
                   link_latency_us=10, compute_efficiency=1.0, bandwidth_efficiency=1.0, link_efficiency=1.0)
# 2 layers, hidden 1024, 8 heads (= 8 KV heads) of 128, SwiGLU 4096, vocab 1000, untied.
TINY = ModelShape(name="tiny", hidden_size=1024, intermediate_size=4096, num_layers=2, num_heads=8, num_kv_heads=8,
                  head_dim=128, vocab_size=1000, max_position_embeddings=4096)


# -- hardware and shapes ------------------------------------------------------------------------------------

def test_gpu_table_and_lookup():
    h100 = get_gpu("NVIDIA H100")
    assert (h100.memory_gib, h100.bf16_tflops, h100.fp8_tflops, h100.hbm_tb_s, h100.link_gb_s) == (
        80, 989, 1979, 3.35, 450)
    assert get_gpu("h200").hbm_tb_s == 4.8 and get_gpu("h200").memory_gib == 141
    assert get_gpu("a100").fp8_tflops is None and get_gpu("a100").peak_flops(fp8=True) == 312e12
    assert get_gpu("l40s").link_gb_s == 32 and not get_gpu("l40s").nvlink
    assert 0 < h100.compute_efficiency < 1 and 0 < h100.bandwidth_efficiency < 1
    assert h100.with_memory(40).memory_gib == 40 and GPUS["h100"].memory_gib == 80
    with pytest.raises(ValueError, match="did you mean 'h100'"):
        get_gpu("h10")


def test_presets_are_real_configs():
    cfg = load_shape("llama-3.1-8b")
    assert (cfg["hidden_size"], cfg["intermediate_size"], cfg["num_hidden_layers"], cfg["num_attention_heads"],
            cfg["num_key_value_heads"], cfg["vocab_size"]) == (4096, 14336, 32, 32, 8, 128256)
    assert load_shape("meta-llama/Llama-3.1-8B-Instruct") == cfg
    cfg["hidden_size"] = 1  # callers get a copy
    assert PRESETS["llama-3.1-8b"]["hidden_size"] == 4096
    with pytest.raises(ValueError, match="did you mean 'llama-3.1-8b'"):
        load_shape("llama-3.1-8")
    with pytest.raises(ValueError):
        load_shape(None, None)


def test_load_shape_from_path(tmp_path):
    (tmp_path / "config.json").write_text('{"hidden_size": 64, "num_attention_heads": 4, "num_hidden_layers": 2, '
                                          '"intermediate_size": 128, "vocab_size": 100}')
    assert load_shape(path=str(tmp_path))["hidden_size"] == 64
    assert load_shape(path=str(tmp_path / "config.json"))["vocab_size"] == 100
    shape = ModelShape.load(path=str(tmp_path))
    assert shape.num_kv_heads == 4 and shape.head_dim == 16 and shape.name == tmp_path.name
    with pytest.raises(FileNotFoundError):
        load_shape(path=str(tmp_path / "missing"))


def test_parameter_counts_match_published_sizes():
    s8 = ModelShape.load("llama-3.1-8b")
    assert s8.total_params == 8_030_261_248  # the checkpoint's exact count
    assert s8.weight_bytes() == 2 * s8.total_params
    assert s8.weight_bytes() / 1e9 == pytest.approx(16.06, abs=0.01)  # "8B bf16 ≈ 16 GB"
    # fp8 quantizes the decoder projections only; embeddings and lm_head stay bf16 (vLLM online fp8)
    assert s8.weight_bytes("fp8") / 1e9 == pytest.approx(9.08, abs=0.01)
    assert s8.kv_bytes_per_token() == 2 * 32 * 8 * 128 * 2 == 131072
    assert s8.kv_bytes_per_token("fp8") == 65536
    assert ModelShape.load("llama-3.1-70b").total_params / 1e9 == pytest.approx(70.55, abs=0.01)
    assert ModelShape.load("llama-3.2-1b").total_params / 1e9 == pytest.approx(1.236, abs=0.001)  # tied embeddings
    mix = ModelShape.load("mixtral-8x7b")
    assert mix.total_params / 1e9 == pytest.approx(46.70, abs=0.01)
    assert mix.active_params / 1e9 == pytest.approx(12.88, abs=0.01)


def test_flops_per_token():
    s = TINY
    matmul = 4 * 1024 * 1024 + 3 * 1024 * 4096  # params per layer: q,k,v,o + gate,up,down
    assert s.flops_per_token(0) == 2 * (2 * matmul + 1000 * 1024) == 69_156_864
    assert s.flops_per_token(100) - s.flops_per_token(0) == 4 * 2 * 8 * 128 * 100  # QKᵀ + AV per key
    assert s.flops_per_token(0, include_lm_head=False) == 2 * 2 * matmul


# -- roofline -----------------------------------------------------------------------------------------------

def test_decode_step_by_hand():
    """One sequence decoding at context 1000 on the unit GPU: memory-bound, weights dominate."""
    r = Roofline(TINY, UNIT_GPU)
    b = StepBatch.of(decode_contexts=[1000])
    assert b == StepBatch(decode_seqs=1, decode_tokens=1, decode_context=1000, decode_pairs=1000 + 1, sampled=1)
    t = r.step_time(b)
    weights = 2 * (4 * 1024 * 1024 * 2 + 2 * 1024 * 2) + 2 * (3 * 1024 * 4096 * 2) + 1000 * 1024 * 2
    activations = 2 * 2 * (4 * 1024 + 3 * 4096)  # layers · bf16 · (4·hidden + 3·intermediate)
    assert t.linear_s == pytest.approx((weights + activations) / 1e12)  # 69.23 µs, flops are only 0.69 µs
    kv_per_token = 2 * 2 * 8 * 128 * 2
    assert t.attention_s == pytest.approx((1000 + 1) * kv_per_token / 1e12)  # 8.2 µs
    assert t.comm_s == 0 and t.draft_s == 0
    assert t.overhead_s == pytest.approx(STEP_OVERHEAD_S + PER_SEQ_S)
    assert t.total_s == pytest.approx(69.230592e-6 + 8.200192e-6 + 1.003e-3)


def test_prefill_step_is_compute_bound():
    r = Roofline(TINY, UNIT_GPU)
    n = 4096
    b = StepBatch.of(prefills=[(n, 0)])
    t = r.step_time(b)
    flops = 2 * (n * 2 * (4 * 1024 * 1024 + 3 * 1024 * 4096) + 1 * 1000 * 1024)
    assert t.linear_s == pytest.approx(flops / 100e12)  # 2.749 ms of math vs 0.34 ms of bytes
    assert t.attention_s == pytest.approx(max(n * (n + 1) / 2 * 4 * 2 * 8 * 128 / 100e12, (n * 8192) / 1e12))
    # fp8 weights on an fp8 GPU double the GEMM rate
    t8 = Roofline(TINY, UNIT_GPU, quantization="fp8").step_time(b)
    assert t8.linear_s == pytest.approx(flops / 200e12)


def test_tensor_parallel_split_and_allreduce():
    b = StepBatch.of(decode_contexts=[1000])
    t1 = Roofline(TINY, UNIT_GPU).step_time(b)
    t2 = Roofline(TINY, UNIT_GPU, tp=2).step_time(b)
    # two all-reduces per layer, ring: latency + 2(tp-1)/tp · hidden·2 bytes / link
    assert t2.comm_s == pytest.approx(2 * 2 * (10e-6 + 1 * 1024 * 2 * 1.0 / 100e9))
    assert t2.linear_s < 0.51 * t1.linear_s and t2.attention_s == pytest.approx(t1.attention_s / 2)


def test_weight_only_fp8_without_fp8_tensor_cores():
    a100 = get_gpu("a100")
    s8 = ModelShape.load("llama-3.1-8b")
    prefill = StepBatch(prefill_seqs=1, prefill_tokens=8192, prefill_pairs=8192 * 8193 / 2, sampled=1)
    decode = StepBatch(decode_seqs=8, decode_tokens=8, decode_context=8000, decode_pairs=8008, sampled=8)
    bf, f8 = Roofline(s8, a100), Roofline(s8, a100, quantization="fp8")
    assert f8.step_time(prefill).linear_s == pytest.approx(bf.step_time(prefill).linear_s)  # math unchanged
    assert f8.step_time(decode).linear_s < 0.65 * bf.step_time(decode).linear_s  # bytes shrink


def test_moe_reads_only_routed_experts():
    mix = ModelShape.load("mixtral-8x7b")
    r = Roofline(mix, get_gpu("h100"), tp=2)
    one = r.step_time(StepBatch(decode_seqs=1, decode_tokens=1, decode_context=100, decode_pairs=101, sampled=1))
    many = r.step_time(StepBatch(decode_seqs=256, decode_tokens=256, decode_context=25600, decode_pairs=25856,
                                 sampled=256))
    # one token touches 2 of 8 experts: ~ (attention + 2 experts) of weights, far from all 46.7B
    assert one.linear_s < 0.4 * many.linear_s


# -- memory ---------------------------------------------------------------------------------------------------

def test_llama8b_h100_kv_capacity():
    plan = memory_plan(ModelShape.load("llama-3.1-8b"), get_gpu("h100"), SimConfig())
    assert plan.weight_bytes_per_gpu / 2**30 == pytest.approx(14.96, abs=0.01)
    # vLLM on an H100 at 0.9 reports ~54-55 GiB of KV cache, ~440-450k tokens for llama-3.1-8b
    assert 420_000 < plan.kv_tokens < 470_000
    assert plan.kv_tokens % 16 == 0 and plan.max_model_len == 131072
    fp8kv = memory_plan(ModelShape.load("llama-3.1-8b"), get_gpu("h100"), SimConfig(kv_cache_dtype="fp8"))
    assert fp8kv.kv_tokens == pytest.approx(2 * plan.kv_tokens, rel=0.001)


def test_70b_needs_more_than_one_h100():
    s70, h100 = ModelShape.load("llama-3.1-70b"), get_gpu("h100")
    with pytest.raises(SimStartupError, match="CUDA out of memory"):
        memory_plan(s70, h100, SimConfig())
    fits = memory_plan(s70, h100, SimConfig(tensor_parallel=2, quantization="fp8"))
    assert fits.weight_bytes_per_gpu / 1e9 == pytest.approx(72.66 / 2, abs=0.05)
    assert fits.kv_tokens > 131072
    # bf16 over two GPUs loads but leaves too little KV for one 128k-token sequence, like vLLM says
    with pytest.raises(SimStartupError, match="max seq len"):
        memory_plan(s70, h100, SimConfig(tensor_parallel=2))
    assert memory_plan(s70, h100, SimConfig(tensor_parallel=2, max_model_len=8192)).kv_tokens > 8192
    with pytest.raises(SimStartupError, match="No available memory"):  # 131 GiB of weights > 0.9 × 141 GiB
        memory_plan(s70, get_gpu("h200"), SimConfig())
    assert memory_plan(s70, get_gpu("h200"), SimConfig(quantization="fp8")).kv_tokens > 131072


def test_no_room_for_cache_blocks():
    with pytest.raises(SimStartupError, match="No available memory for the cache blocks"):
        memory_plan(ModelShape.load("llama-3.1-8b"), get_gpu("h100"), SimConfig(memory_fraction=0.2))


def test_every_engine_neutral_parameter_is_understood():
    names = yaml.safe_load((Path(__file__).parents[1] / "search_spaces" / "parameters.yaml").read_text())["parameters"]
    cfg = SimConfig.from_params({k: None for k in names if k not in
                                 ("tensor_parallel", "pipeline_parallel", "data_parallel", "max_concurrency",
                                  "max_batched_tokens", "memory_fraction", "kv_block_size", "speculative_tokens",
                                  "chunked_prefill", "prefix_caching", "enforce_eager", "seed")})
    assert cfg.quantization == "none" and cfg.max_model_len is None
    sim_yaml = yaml.safe_load((Path(__file__).parents[1] / "search_spaces" / "sim.yaml").read_text())
    defaults = {k: v["default"] for k, v in sim_yaml["params"].items() if "default" in v}
    assert SimConfig.from_params(defaults) == SimConfig()  # the catalog's defaults are the sim's defaults


def test_speculative_step_costs_more_but_yields_more():
    s8, h100 = ModelShape.load("llama-3.1-8b"), get_gpu("h100")
    plain = Roofline(s8, h100).step_time(StepBatch.of([2000] * 8)).total_s
    eagle = Roofline(s8, h100, speculative_method="eagle", speculative_tokens=3)
    t = eagle.step_time(StepBatch.of([2000] * 8, drafts=3))
    assert plain < t.total_s < 1.6 * plain and t.draft_s > 0
    assert t.total_s / (1 + 0.6 + 0.36 + 0.216) < 0.7 * plain  # per emitted token at acceptance 0.6


def test_config_validation():
    s8 = ModelShape.load("llama-3.1-8b")
    with pytest.raises(SimConfigError, match="divisible by tensor parallel size"):
        SimConfig(tensor_parallel=3).validate(s8)
    with pytest.raises(SimConfigError, match="max_num_batched_tokens"):
        SimConfig(max_concurrency=512, max_batched_tokens=256).validate(s8)
    with pytest.raises(SimConfigError, match="pipeline"):
        SimConfig(pipeline_parallel=2, speculative_method="eagle").validate(s8)
    with pytest.raises(SimConfigError, match="does not know"):
        SimConfig.from_params({"tensor_paralel": 2})
    cfg = SimConfig.from_params({"tensor_parallel": 2, "attention_backend": "FLASH_ATTN", "quantization": None})
    assert cfg.tensor_parallel == 2 and cfg.quantization == "none"
    assert SimConfig(speculative_method="eagle").acceptance == 0.6
    assert SimConfig(speculative_method="ngram").acceptance == 0.3


# -- scheduler accounting -------------------------------------------------------------------------------------

def _drain(sched: Scheduler, reqs: list[SimRequest], check=None) -> list:
    for r in reqs:
        sched.add(r)
    steps = []
    while sched.has_work():
        res = sched.step()
        assert res is not None
        assert 0 <= sched.used_blocks <= sched.num_blocks
        steps.append(res)
        if check:
            check(res)
    return steps


def test_kv_never_over_allocated_and_preemption_recovers():
    s8 = ModelShape.load("llama-3.1-8b")
    gpu = get_gpu("h100").with_memory(19.5)  # ~2 GiB of KV: ~17k tokens for 32 sequences of ~1.3k
    cfg = SimConfig(max_concurrency=32, prefix_caching=False, max_model_len=2048)
    sched = Scheduler(s8, gpu, cfg)
    assert sched.plan.kv_tokens < 32 * 1300
    reqs = [SimRequest(i, 1000, 300) for i in range(48)]
    _drain(sched, reqs)
    assert sched.stats.preemptions > 0
    assert all(r.output == 300 and r.finish_reason == "length" for r in reqs)
    assert sched.used_blocks == 0 and sched.free_plain == sched.num_blocks


def test_token_budget_and_chunked_prefill():
    s8 = ModelShape.load("llama-3.1-8b")
    cfg = SimConfig(max_batched_tokens=2048, max_concurrency=16, prefix_caching=False)
    sched = Scheduler(s8, get_gpu("h100"), cfg)
    steps = _drain(sched, [SimRequest(i, 3000, 20) for i in range(6)],
                   check=lambda res: None)
    assert all(s.batch.tokens <= 2048 for s in steps)
    assert any(s.batch.prefill_tokens and s.batch.decode_tokens for s in steps)  # chunks ride with decodes
    assert max(s.batch.prefill_tokens for s in steps) == 2048


def test_prefill_without_chunking_runs_alone():
    s8 = ModelShape.load("llama-3.1-8b")
    cfg = SimConfig(max_batched_tokens=4096, max_concurrency=16, chunked_prefill=False, prefix_caching=False)
    sched = Scheduler(s8, get_gpu("h100"), cfg)
    assert sched.max_model_len == 4096 and sched.plan.notes  # clamped to the budget, with a warning
    reqs = [SimRequest(i, 1500, 10, 0.0) for i in range(5)]
    steps = _drain(sched, reqs)
    for s in steps:
        assert not (s.batch.prefill_tokens and s.batch.decode_tokens)  # never mixed
        assert s.batch.prefill_tokens % 1500 == 0  # whole prompts only
    assert steps[0].batch.prefill_seqs == 2  # 2 × 1500 fit the 4096 budget, a third does not


def test_prefix_cache_hits_skip_compute():
    s8 = ModelShape.load("llama-3.1-8b")
    sched = Scheduler(s8, get_gpu("h100"), SimConfig())
    shared = [f"w{i}" for i in range(1000)]
    first = SimRequest(0, 1003, 4, tokens=shared + ["a", "b", "c"])
    _drain(sched, [first])
    second = SimRequest(1, 1002, 4, tokens=shared + ["x", "y"])
    steps = _drain(sched, [second])
    assert second.hit_tokens == 992  # 62 full blocks of 16 shared
    assert steps[0].batch.prefill_tokens == 1002 - 992
    assert sched.stats.prefix_hits == 992 and sched.stats.prefix_queries == 1003 + 1002
    # identical prompt: everything but the last token is served from cache
    third = SimRequest(2, 1002, 4, tokens=shared + ["x", "y"])
    _drain(sched, [third])
    assert third.hit_tokens == 1001 // 16 * 16


def test_speculative_decoding_emits_several_tokens_per_step():
    s8 = ModelShape.load("llama-3.1-8b")
    sched = Scheduler(s8, get_gpu("h100"), SimConfig(speculative_method="eagle", speculative_tokens=3,
                                                     speculative_acceptance=0.6))
    req = SimRequest(0, 100, 2000)
    steps = _drain(sched, [req])
    assert req.output == 2000
    decode_steps = len(steps) - 1
    expected = 1 + 0.6 + 0.36 + 0.216  # tokens per verify step
    assert 2000 / decode_steps == pytest.approx(expected, rel=0.06)
    st = sched.stats
    assert st.spec_accepted / st.spec_drafts == pytest.approx((expected - 1) / 3, rel=0.08)
