"""Pre-launch rules of the real-engine adapters: each rejects what the engine would refuse (or surely OOM on)
with one sentence naming the parameters, and accepts the valid neighbour.

The driver calls ``rules.check(engine, {**engine.defaults(), **params}, ...)`` (the engine-neutral rules, the
engine's own, then its memory rule); these tests do the same.
"""
from __future__ import annotations

import copy

import pytest

from servetune.optimizer import rules
from servetune.optimizer.driver import StudyDriver
from servetune.optimizer.engines import get_engine
from servetune.optimizer.engines.base import ModelRef
from servetune.optimizer.perfmodel.model_shapes import load_shape
from servetune.optimizer.spec import parse_study


def model(preset: str = "llama-3.1-8b", name: str = "llm", **shape_overrides) -> ModelRef:
    shape = load_shape(preset)
    shape.update(shape_overrides)
    return ModelRef(name=name, path=f"/models/{preset}", shape=shape, load_format="dummy")


def check(engine: str, params: dict, m: ModelRef | None = None, *, gpu: str = "h100", gib: float = 80,
          gpus: int = 8, version: str | None = None) -> list[str]:
    e = get_engine(engine, None, version)
    return rules.check(e, {**e.defaults(), **params}, m or model(), gpu=gpu, gpu_memory_gib=gib, gpus_available=gpus)


def rejects(engine: str, params: dict, *words: str, **kw) -> str:
    reasons = check(engine, params, **kw)
    assert reasons, f"{engine} accepted {params}"
    text = " | ".join(reasons)
    for w in words:
        assert w in text, f"{w!r} not in {text!r}"
    for r in reasons:
        assert "\n" not in r and len(r) < 400
    return text


def accepts(engine: str, params: dict, **kw) -> None:
    assert check(engine, params, **kw) == [], f"{engine} rejected {params}"


BOTH = ["vllm", "sglang"]


def awq_model() -> ModelRef:
    return model(quantization_config={"quant_method": "awq", "bits": 4, "group_size": 128})


# -- topology ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("engine", BOTH)
def test_tensor_parallel_must_divide_heads_and_kv_heads(engine):
    rejects(engine, {"tensor_parallel": 3}, "tensor_parallel=3", "32 attention heads")
    m = model("llama-3.1-70b", num_attention_heads=48, num_key_value_heads=12)
    rejects(engine, {"tensor_parallel": 8}, "tensor_parallel=8", "12 KV heads", m=m)  # 48 % 8 == 0; 12 vs 8
    accepts(engine, {"tensor_parallel": 4, "max_model_len": 8192}, m=m)  # 12 % 4 == 0
    accepts(engine, {"tensor_parallel": 2})
    # more ranks than KV heads replicate them: 8 KV heads, tp 16 -> accepted by the heads rule
    reasons = check(engine, {"tensor_parallel": 16}, model("llama-3.1-70b", num_attention_heads=64), gpus=16)
    assert not any("KV heads" in r for r in reasons)


@pytest.mark.parametrize("engine", BOTH)
def test_gpu_count(engine):
    rejects(engine, {"tensor_parallel": 2, "pipeline_parallel": 2, "data_parallel": 2}, "8 GPUs",
            "a trial may use 4", gpus=4)
    accepts(engine, {"tensor_parallel": 2, "data_parallel": 2}, gpus=4)


@pytest.mark.parametrize("engine", BOTH)
def test_pipeline_parallel_with_speculative_decoding(engine):
    spec = {"speculative_method": "ngram", "speculative_tokens": 4}
    rejects(engine, {"pipeline_parallel": 2, **spec}, "pipeline_parallel=2", "speculative_method=ngram")
    accepts(engine, {"pipeline_parallel": 1, **spec})
    accepts(engine, {"pipeline_parallel": 2})


@pytest.mark.parametrize("engine", BOTH)
def test_expert_parallel_needs_experts(engine):
    rejects(engine, {"expert_parallel": True}, "expert_parallel=true")
    accepts(engine, {"expert_parallel": True, "tensor_parallel": 2}, m=model("mixtral-8x7b"))


# -- quantization ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("engine", BOTH)
def test_checkpoint_quantization_rules(engine):
    rejects(engine, {"quantization": "awq"}, "quantization=awq", "AWQ")
    rejects(engine, {"quantization": "gptq"}, "quantization=gptq")
    accepts(engine, {"quantization": "fp8"})  # online fp8 on a bf16 checkpoint
    accepts(engine, {"quantization": "awq"}, m=awq_model())
    accepts(engine, {"quantization": "none"}, m=awq_model())  # none = read the checkpoint's own
    rejects(engine, {"quantization": "fp8"}, "does not match", "awq", m=awq_model())


def test_fp8_block_checkpoint_tp_divisibility():
    m = model("llama-3.1-8b", quantization_config={"quant_method": "fp8", "weight_block_size": [128, 128]})
    accepts("vllm", {"tensor_parallel": 2}, m=m)  # 14336 / 2 = 7168 = 56 blocks
    m = model("llama-3.1-8b", intermediate_size=14400,
              quantization_config={"quant_method": "fp8", "weight_block_size": [128, 128]})
    rejects("vllm", {"tensor_parallel": 2}, "tensor_parallel=2", "FP8 block", m=m)


# -- vLLM scheduler rules ------------------------------------------------------------------------------------------
def test_vllm_batched_tokens_at_least_max_seqs():
    rejects("vllm", {"max_concurrency": 512, "max_batched_tokens": 256},
            "max_batched_tokens=256", "max_concurrency=512")
    accepts("vllm", {"max_concurrency": 256, "max_batched_tokens": 256})
    # max_num_seqs above the *default* token budget is also an error (the default is not raised for it)
    rejects("vllm", {"max_concurrency": 16384}, "max_concurrency=16384")


def test_vllm_chunked_prefill_off_needs_batched_tokens_over_max_model_len():
    rejects("vllm", {"chunked_prefill": False, "max_batched_tokens": 4096, "max_model_len": 8192},
            "chunked_prefill=false", "max_batched_tokens=4096", "max_model_len=8192")
    accepts("vllm", {"chunked_prefill": False, "max_batched_tokens": 8192, "max_model_len": 8192})
    # with the engine's default budget vLLM raises it to max_model_len itself
    accepts("vllm", {"chunked_prefill": False, "max_model_len": 32768})


def test_vllm_value_rules():
    rejects("vllm", {"memory_fraction": 1.2}, "memory_fraction=1.2")
    rejects("vllm", {"max_model_len": 262144}, "max_model_len=262144", "131072")
    rejects("vllm", {"kv_cache_dtype": "fp8_e4m3fn"}, "kv_cache_dtype=fp8_e4m3fn")
    rejects("vllm", {"scheduler_policy": "lpm"}, "scheduler_policy=lpm")
    rejects("vllm", {"kv_block_size": 0}, "kv_block_size=0")
    accepts("vllm", {"max_model_len": 32768, "kv_cache_dtype": "fp8", "scheduler_policy": "priority"})


# -- speculative decoding ---------------------------------------------------------------------------------------------
def test_vllm_speculative_all_or_none():
    rejects("vllm", {"speculative_method": "ngram"}, "speculative_method=ngram", "speculative_tokens")
    for method in ("eagle", "eagle3", "draft_model"):
        rejects("vllm", {"speculative_method": method, "speculative_tokens": 3}, f"speculative_method={method}",
                "speculative_draft_path")
        accepts("vllm", {"speculative_method": method, "speculative_tokens": 3, "speculative_draft_path": "/d"})
    rejects("vllm", {"speculative_method": "ngram", "speculative_tokens": 0}, "speculative_tokens=0")
    rejects("vllm", {"speculative_method": "ngram", "speculative_tokens": 4, "speculative_lookup_min": 5,
                     "speculative_lookup_max": 3}, "speculative_lookup_min=5", "speculative_lookup_max=3")
    accepts("vllm", {"speculative_method": "ngram", "speculative_tokens": 4, "speculative_lookup_min": 2,
                     "speculative_lookup_max": 5})
    # children of an unused method are dropped, not rejected: a study searching both must still run ngram
    accepts("vllm", {"speculative_method": "ngram", "speculative_tokens": 4, "speculative_draft_path": "/d"})
    accepts("vllm", {"speculative_method": "none", "speculative_tokens": 4})
    rejects("vllm", {"speculative_method": "mtp", "speculative_tokens": 1}, "mtp", "MTP layers")
    rejects("vllm", {"speculative_method": "lookahead", "speculative_tokens": 1}, "speculative_method=lookahead")


def test_vllm_suffix_decoding():
    # suffix drafts up to its tree depth when speculative_tokens is unset; it reads no lookup window
    accepts("vllm", {"speculative_method": "suffix"})
    accepts("vllm", {"speculative_method": "suffix", "speculative_tokens": 8, "speculative_lookup_max": 5})
    rejects("vllm", {"speculative_method": "suffix", "async_scheduling": True}, "async_scheduling=true", "suffix")
    argv = get_engine("vllm").plan({"speculative_method": "suffix", "speculative_tokens": 8,
                                    "speculative_lookup_max": 5},
                                   ModelRef(name="m", path="/m", shape={}), host="127.0.0.1", port=8000,
                                   gpu_ids=[0]).argv
    assert "--speculative-config.prompt_lookup_max" not in argv and "suffix" in argv


def test_vllm_suffix_without_arctic_inference_is_unsupported():
    # vLLM 0.26, SpeculativeConfig._validate_suffix_decoding, inside config validation
    tail = ("pydantic_core._pydantic_core.ValidationError: 1 validation error for SpeculativeConfig\n"
            "  Value error, Arctic Inference is required for suffix decoding. Install via "
            "`pip install arctic-inference==0.1.1`. [type=value_error]")
    f = get_engine("vllm").classify(tail, 1)
    assert f.kind.value == "unsupported" and "arctic-inference" in f.reason


def test_vllm_medusa_removed_in_033():
    p = {"speculative_method": "medusa", "speculative_tokens": 3, "speculative_draft_path": "/d"}
    accepts("vllm", p)
    rejects("vllm", p, "medusa", "0.33", version="0.33.0")


def test_vllm_explicit_async_scheduling_with_ngram():
    spec = {"speculative_method": "ngram", "speculative_tokens": 4}
    rejects("vllm", {**spec, "async_scheduling": True}, "async_scheduling=true", "speculative_method=ngram")
    accepts("vllm", spec)  # unset: vLLM turns async off by itself
    accepts("vllm", {**spec, "async_scheduling": False})
    accepts("vllm", {"speculative_method": "eagle3", "speculative_tokens": 3, "speculative_draft_path": "/d",
                     "async_scheduling": True})


def test_vllm_draft_model_needs_slots():
    p = {"speculative_method": "draft_model", "speculative_tokens": 3, "speculative_draft_path": "/d"}
    rejects("vllm", {**p, "max_concurrency": 256, "max_batched_tokens": 256}, "draft_model", "max_batched_tokens=256")
    accepts("vllm", {**p, "max_concurrency": 256, "max_batched_tokens": 2048})


def test_sglang_speculative_rules():
    rejects("sglang", {"speculative_method": "eagle", "speculative_tokens": 3}, "speculative_method=eagle",
            "speculative_draft_path")
    accepts("sglang", {"speculative_method": "eagle", "speculative_tokens": 3, "speculative_draft_path": "/d"})
    accepts("sglang", {"speculative_method": "eagle"}, m=model(architectures=["DeepseekV3ForCausalLM"]))  # MTP inside
    accepts("sglang", {"speculative_method": "ngram", "speculative_tokens": 8})
    # NGRAM drafts a tree (topk = BFS breadth 10): page size > 1 only on flashinfer
    rejects("sglang", {"speculative_method": "ngram", "kv_block_size": 16, "attention_backend": "triton"},
            "kv_block_size=16", "flashinfer")
    accepts("sglang", {"speculative_method": "ngram", "kv_block_size": 16, "attention_backend": "flashinfer"})
    accepts("sglang", {"speculative_method": "ngram", "kv_block_size": 1, "attention_backend": "triton"})
    # an EAGLE tree (topk > 1) with pages > 1 is fine on fa3/flashinfer/triton, not on other backends
    tree = {"speculative_method": "eagle", "speculative_tokens": 3, "speculative_topk": 4,
            "speculative_draft_path": "/d", "kv_block_size": 64}
    rejects("sglang", {**tree, "attention_backend": "flashmla"}, "topk 4", "kv_block_size=64")
    accepts("sglang", {**tree, "attention_backend": "triton"})
    rejects("sglang", {**tree, "kv_block_size": 1, "attention_backend": "trtllm_mha"}, "trtllm_mha")
    rejects("sglang", {"speculative_method": "eagle", "speculative_draft_path": "/d",
                       "attention_backend": "flex_attention"}, "flex_attention")
    # without speculative_tokens SGLang auto-picks a topk-4 tree for Llama: pages > 1 then need fa3/flashinfer/triton
    auto = {"speculative_method": "eagle", "speculative_draft_path": "/d", "kv_block_size": 64}
    rejects("sglang", {**auto, "attention_backend": "trtllm_mha"}, "topk 4")
    accepts("sglang", {**auto, "speculative_tokens": 3, "attention_backend": "trtllm_mha"})  # our chain: topk 1


# -- kernels ----------------------------------------------------------------------------------------------------------
def test_vllm_fp8_kv_needs_a_backend_that_stores_it():
    rejects("vllm", {"kv_cache_dtype": "fp8", "attention_backend": "flash_attn"}, "kv_cache_dtype=fp8",
            "FLASH_ATTN", gpu="a100")
    accepts("vllm", {"kv_cache_dtype": "fp8", "attention_backend": "flash_attn"}, gpu="h100")  # FA3 on SM90
    rejects("vllm", {"kv_cache_dtype": "fp8_e5m2", "attention_backend": "flash_attn"}, "e5m2")
    rejects("vllm", {"kv_cache_dtype": "fp8", "attention_backend": "flex_attention"}, "FLEX_ATTENTION")
    accepts("vllm", {"kv_cache_dtype": "fp8", "attention_backend": "flashinfer"}, gpu="a100")
    accepts("vllm", {"kv_cache_dtype": "fp8", "attention_backend": "triton"}, gpu="a100")
    accepts("vllm", {"kv_cache_dtype": "fp8"}, gpu="a100")  # auto picks a backend that can


def test_vllm_block_size_per_backend():
    rejects("vllm", {"kv_block_size": 24, "attention_backend": "triton"}, "kv_block_size=24", "multiple of 16")
    rejects("vllm", {"kv_block_size": 128, "attention_backend": "flashinfer"}, "kv_block_size=128", "FLASHINFER")
    accepts("vllm", {"kv_block_size": 32, "attention_backend": "flashinfer"})
    accepts("vllm", {"kv_block_size": 128, "attention_backend": "flash_attn"})


# -- SGLang-specific ---------------------------------------------------------------------------------------------------
def test_sglang_chunk_divisible_by_page():
    rejects("sglang", {"max_batched_tokens": 8100, "kv_block_size": 64}, "max_batched_tokens=8100", "kv_block_size=64")
    accepts("sglang", {"max_batched_tokens": 8192, "kv_block_size": 64})
    accepts("sglang", {"chunked_prefill": False, "max_batched_tokens": 8100, "kv_block_size": 64})  # -1: no chunks
    rejects("sglang", {"kv_block_size": 48}, "kv_block_size=48")  # the GPU default chunk 8192 % 48 != 0


def test_sglang_value_rules():
    rejects("sglang", {"memory_fraction": 1.0}, "memory_fraction=1.0")
    rejects("sglang", {"kv_cache_dtype": "fp8_e4m3fn"}, "kv_cache_dtype=fp8_e4m3fn")
    accepts("sglang", {"kv_cache_dtype": "fp8"})
    rejects("sglang", {"scheduler_policy": "hrrn"}, "scheduler_policy=hrrn")  # 0.5.17 has no hrrn
    accepts("sglang", {"scheduler_policy": "hrrn"}, version="0.5.20")
    rejects("sglang", {"max_model_len": 262144}, "max_model_len=262144")
    assert any("':'" in r for r in check("sglang", {}, model(name="llama:8b")))


def test_sglang_mem_fraction_band():
    rejects("sglang", {"memory_fraction": 0.995}, "memory_fraction=0.995", "leaves")
    accepts("sglang", {"memory_fraction": 0.9})
    accepts("sglang", {"memory_fraction": 0.7})
    rejects("sglang", {"memory_fraction": 0.15}, "memory_fraction=0.15", "Not enough memory")


# -- memory estimate ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("engine", BOTH)
def test_memory_70b_bf16_needs_sharding_on_h100(engine):
    m70 = model("llama-3.1-70b")
    rejects(engine, {"tensor_parallel": 1}, "131.4 GiB", "tensor_parallel=1", "quantization=none", m=m70)
    accepts(engine, {"tensor_parallel": 4}, m=m70)
    accepts(engine, {"tensor_parallel": 8}, m=m70)
    accepts(engine, {"tensor_parallel": 1}, m=model("llama-3.1-8b"))
    accepts(engine, {"tensor_parallel": 1, "max_model_len": 32768}, m=m70, gpu="b200", gib=180)  # 131 GiB fits in 180


def test_vllm_one_max_length_sequence_must_fit():
    m70 = model("llama-3.1-70b")
    # tp=2: 65.7 GiB of weights leave < 7 GiB, but 131072 tokens of KV need 20 GiB per GPU
    rejects("vllm", {"tensor_parallel": 2}, "max_model_len=131072", "20.0 GiB", m=m70)
    accepts("vllm", {"tensor_parallel": 2, "max_model_len": 8192}, m=m70)
    accepts("vllm", {"tensor_parallel": 2, "max_model_len": 32768, "kv_cache_dtype": "fp8"}, m=m70)
    # fp8 weights make the 70B fit on two GPUs with a long context
    accepts("vllm", {"tensor_parallel": 2, "quantization": "fp8", "max_model_len": 65536}, m=m70)


def test_memory_fraction_matters():
    m70 = model("llama-3.1-70b")
    rejects("vllm", {"tensor_parallel": 2, "max_model_len": 8192, "memory_fraction": 0.8}, "memory_fraction=0.8",
            m=m70)
    accepts("vllm", {"tensor_parallel": 2, "max_model_len": 8192, "memory_fraction": 0.95}, m=m70)


def test_awq_weights_are_small():
    m = model("llama-3.1-70b", quantization_config={"quant_method": "awq", "bits": 4, "group_size": 128})
    accepts("vllm", {"tensor_parallel": 1, "max_model_len": 16384}, m=m)  # ~37 GiB of 4-bit weights
    accepts("sglang", {"tensor_parallel": 1}, m=m)


def test_reasons_are_one_sentence_naming_parameters():
    reasons = check("vllm", {"tensor_parallel": 3, "max_concurrency": 512, "max_batched_tokens": 256,
                             "speculative_method": "eagle", "speculative_tokens": 2, "pipeline_parallel": 2})
    assert len(reasons) >= 4
    for r in reasons:
        assert "=" in r and "\n" not in r  # names a parameter and its value


def test_check_does_not_mutate_params():
    e = get_engine("sglang")
    p = {**e.defaults(), "expert_parallel": True, "chunked_prefill": False, "speculative_method": "eagle",
         "speculative_tokens": 3, "speculative_draft_path": "/d"}
    before = copy.deepcopy(p)
    e.check(p, model("mixtral-8x7b"), gpu="h100", gpu_memory_gib=80, gpus_available=8)
    e.check_memory(p, model("mixtral-8x7b"), gpu="h100", gpu_memory_gib=80)
    assert p == before


@pytest.mark.parametrize("engine, gpus", [("vllm", 4), ("sglang", 4), ("sim", 4)])
def test_a_study_states_each_reason_once(engine, gpus):
    # the engine's own rules (GPU count, heads, weights + activations + KV) and the engine-neutral ones said
    # the same things twice in one rejection on the 70B sharding study; the sim has no such rules of its own
    spec = parse_study(f"""
name: once
model: {{preset: llama-3.1-70b}}
engines: [{engine}]
hardware: {{gpu: h200, gpus: {gpus}, max_gpus_per_trial: 2}}
search: {{tensor_parallel: [1, 2, 4, 8], max_model_len: [4096]}}
workload:
  dataset: {{kind: random, input_tokens: 128, output_tokens: 16, num_requests: 10}}
  scenarios: [{{kind: offline}}]
objectives: [{{metric: output_tokens_per_s, scenario: offline}}]
""", "once.yaml")
    check = StudyDriver(spec).check
    reasons = check(engine, {"tensor_parallel": 1, "max_model_len": 4096})
    assert len(reasons) == 1 and "weights need" in reasons[0], reasons
    assert check(engine, {"tensor_parallel": 2, "max_model_len": 4096}) == []
    assert check(engine, {"tensor_parallel": 4, "max_model_len": 4096}) == ["needs 4 GPUs (tensor_parallel·"
                                                                            "pipeline_parallel·data_parallel) but "
                                                                            "a trial may use 2"]
    assert len(check(engine, {"tensor_parallel": 8, "max_model_len": 4096})) == 1
    assert sum("attention heads" in r for r in check(engine, {"tensor_parallel": 3, "max_model_len": 4096})) == 1
