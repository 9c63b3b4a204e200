"""Failure classification of real engines from exit code + log tail.

Fixtures in tests/fixtures/engine_logs/: the argparse ones are verbatim output of the releases' own parsers
(vLLM 0.26.0, SGLang 0.5.20); the others are excerpts built around the exact messages of the engines'
source (vllm/v1/core/kv_cache_utils.py, vllm/v1/worker/utils.py, vllm/config/scheduler.py,
sglang/srt/model_executor/pool_configurator.py, runner_backend_utils, entrypoints/engine.py, server_args.py),
with the process prefixes and log formats the engines print.
"""
from __future__ import annotations

from pathlib import Path

import pytest

from servetune.optimizer.engines import get_engine
from servetune.optimizer.engines.base import FailureKind

LOGS = Path(__file__).parent / "fixtures" / "engine_logs"

CASES = [
    # engine, fixture, exit code, kind, words the one-line reason must contain
    ("vllm", "vllm_argparse_unrecognized.log", 2, FailureKind.BAD_ARGS,
     ["does not know a flag", "--disable-log-requests"]),
    ("vllm", "vllm_argparse_invalid_choice.log", 2, FailureKind.BAD_ARGS, ["value", "fp8_e4m3fn"]),
    ("vllm", "vllm_validation_error.log", 1, FailureKind.BAD_ARGS, ["chunked_prefill off", "max_model_len (131072)"]),
    ("vllm", "vllm_validation_max_num_seqs.log", 1, FailureKind.BAD_ARGS, ["max_concurrency", "(512)"]),
    ("vllm", "vllm_cuda_oom.log", 1, FailureKind.OOM, ["CUDA out of memory", "Tried to allocate"]),
    ("vllm", "vllm_no_cache_blocks.log", 1, FailureKind.OOM, ["no memory for the KV cache"]),
    ("vllm", "vllm_max_seq_len_kv.log", 1, FailureKind.OOM, ["max_model_len", "131072"]),
    ("vllm", "vllm_free_memory.log", 1, FailureKind.OOM, ["another process", "41.07/79.19 GiB"]),
    ("vllm", "vllm_world_size.log", 1, FailureKind.BAD_ARGS, ["GPUs", "World size (4)"]),
    ("vllm", "vllm_handshake_timeout.log", 1, FailureKind.TIMEOUT, ["VLLM_ENGINE_READY_TIMEOUT_S"]),
    ("vllm", "vllm_killed.log", -9, FailureKind.CRASH, ["signal 9"]),
    # real: a TP=2 start on 2×H200 with NVLink multicast off (docs/results/2026-11-22-vllm-h200)
    ("vllm", "vllm_tp2_illegal_memory_access.log", None, FailureKind.CRASH, ["illegal memory access", "TP>1"]),
    # real, the second time (2×H200 of a 4-GPU host): the log names FlashInfer's mnnvl all-reduce backend
    ("vllm", "vllm_tp2_mnnvl_allreduce.log", None, FailureKind.CRASH, ["illegal memory access", "mnnvl"]),
    ("sglang", "sglang_not_enough_memory.log", -9, FailureKind.OOM,
     ["no room for the KV pool", "mem_fraction_static=0.5"]),
    ("sglang", "sglang_capture_cuda_graph_failed.log", -9, FailureKind.OOM,
     ["capturing CUDA graphs", "cuda_graph_max_batch"]),
    ("sglang", "sglang_ambiguous_option.log", 2, FailureKind.BAD_ARGS,
     ["ambiguous", "--cuda-graph-max-bs could match"]),
    ("sglang", "sglang_scheduler_died.log", 1, FailureKind.CRASH, ["OOM killer", "exit code: -9"]),
    ("sglang", "sglang_pp_spec_assert.log", 1, FailureKind.BAD_ARGS, ["pipeline_parallel", "speculative"]),
    ("sglang", "sglang_chunk_page_assert.log", 1, FailureKind.BAD_ARGS, ["kv_block_size", "page_size"]),
    ("sglang", "sglang_crash_under_load.log", -9, FailureKind.CRASH, ["scheduler crashed", "illegal memory access"]),
]


@pytest.mark.parametrize("engine,fixture,code,kind,words", CASES, ids=[c[1] for c in CASES])
def test_fixture_classifies(engine, fixture, code, kind, words):
    failure = get_engine(engine).classify((LOGS / fixture).read_text(), code)
    assert failure.kind == kind, failure.reason
    assert "\n" not in failure.reason and len(failure.reason) < 400
    for w in words:
        assert w in failure.reason, f"{w!r} not in {failure.reason!r}"


def test_every_fixture_is_covered():
    assert {p.name for p in LOGS.glob("*.log")} == {c[1] for c in CASES}


def test_argparse_exit_2_without_a_known_message_is_still_bad_args():
    f = get_engine("vllm").classify("usage: vllm serve [model_tag]\nvllm serve: error: the following arguments are "
                                    "required: model_tag\n", 2)
    assert f.kind == FailureKind.BAD_ARGS


def test_root_cause_wins_over_the_generic_startup_failure():
    # vLLM prints the root cause in the engine core, then the API server's generic RuntimeError
    log = (LOGS / "vllm_cuda_oom.log").read_text()
    assert "Engine core initialization failed" in log.splitlines()[-1]
    assert get_engine("vllm").classify(log, 1).kind == FailureKind.OOM
    # ... and without a root cause the generic line is what is left
    tail = "\n".join(log.splitlines()[-4:])
    f = get_engine("vllm").classify(tail, 1)
    assert f.kind == FailureKind.CRASH and "died during startup" in f.reason


def test_warnings_do_not_masquerade_as_failures():
    log = ("(APIServer pid=1) WARNING 11-22 10:00:00 [vllm.py:1081] Async scheduling not supported with "
           "ngram-based speculative decoding and will be disabled.\n"
           "(APIServer pid=1) WARNING 11-22 10:00:00 [scheduler.py:247] You have set enable_chunked_prefill=False; "
           "vLLM does not officially support disabling chunked prefill and may crash or behave unexpectedly.\n")
    f = get_engine("vllm").classify(log, -9)
    assert f.kind == FailureKind.CRASH and "signal 9" in f.reason


def test_sglang_unbalanced_memory_is_not_the_configs_fault():
    log = ("[2026-11-22 10:00:00 TP0] The memory capacity is unbalanced. Some GPUs may be occupied by other "
           "processes. pre_model_load_memory=40.1, local_gpu_memory=79.1\n"
           "[2026-11-22 10:00:00] Received sigquit from a child process. It usually means the child failed.\n")
    assert get_engine("sglang").classify(log, -9).kind == FailureKind.INTERNAL
