"""Real-engine adapters: every catalog parameter becomes the right argv, in every catalog version.

The help fixtures (tests/fixtures/engine_help/) are the option lines of the releases' own argparse parsers
(vLLM 0.26.0 / 0.33.0 `vllm serve --help=all`, SGLang 0.5.17 / 0.5.20 `launch_server --help`), so "the flag
exists" is checked against the engines themselves, not against our own catalog.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import pytest

from servetune.optimizer.catalog import load_catalog, parameters, render_flags
from servetune.optimizer.engines import get_engine
from servetune.optimizer.engines.base import ModelRef
from servetune.optimizer.engines.version_check import flags_in_help, missing_flags, used_flags
from servetune.optimizer.engines.version_check import main as version_check_main
from servetune.optimizer.perfmodel.model_shapes import load_shape

HELP = Path(__file__).parent / "fixtures" / "engine_help"
VERSIONS = [("vllm", "0.26.0"), ("vllm", "0.33.0"), ("sglang", "0.5.17"), ("sglang", "0.5.20")]
ENGINE_ONLY = {"speculative_topk", "speculative_draft_tokens"}  # SGLang-only knobs its adapter fills in


def _model(load_format: str | None = "dummy") -> ModelRef:
    return ModelRef(name="llama-3.1-8b", path="/models/llama8b", shape=load_shape("llama-3.1-8b"),
                    load_format=load_format)


def _plan(engine, params, **kw):
    return engine.plan(params, _model(), host="127.0.0.1", port=8123, gpu_ids=[0, 1], **kw)


def _help(engine: str, version: str) -> str:
    return (HELP / f"{engine}-{version}.txt").read_text()


def _all_flags(cat) -> list[str]:
    flags = {m.flag for m in cat.params.values() if m.flag}
    for m in cat.params.values():
        flags |= {t for t in (*m.when_true, *m.when_false) if t.startswith("--")}
    flags |= {f for f in (cat.model_flag, cat.served_name_flag, cat.host_flag, cat.port_flag) if f}
    return sorted(flags)


# -- the catalogs themselves ----------------------------------------------------------------------------------
@pytest.mark.parametrize("engine,version", VERSIONS)
def test_catalog_loads_with_version_and_neutral_names(engine, version):
    cat = load_catalog(engine, version)
    assert cat.engine == engine and cat.version == version
    neutral = set(parameters())
    assert set(cat.params) - neutral <= ENGINE_ONLY
    # every engine-neutral parameter is mapped (or explicitly has no flag)
    assert neutral <= set(cat.params)


@pytest.mark.parametrize("engine,version", VERSIONS)
def test_full_flag_names_only_and_no_flag_is_a_prefix_of_another(engine, version):
    cat = load_catalog(engine, version)
    e = get_engine(engine, None, version)
    flags = set(_all_flags(cat)) | set(used_flags(e))
    for f in flags:
        assert f.startswith("--") and "=" not in f and " " not in f, f
    bare = {f.split(".", 1)[0] if f.startswith("--speculative-config.") else f for f in flags}
    for a in bare:
        for b in bare:
            assert a == b or not b.startswith(a), f"{a} is a prefix of {b}: argparse would treat it as ambiguous"


@pytest.mark.parametrize("engine,version", VERSIONS)
def test_every_flag_exists_in_that_release(engine, version):
    assert missing_flags(_help(engine, version), engine, version) == []


def test_version_check_catches_flags_a_release_dropped():
    # vLLM 0.33 hides --no-enable-x (it pairs --enable-x with --disable-x): the 0.26 catalog is wrong there
    missing = dict(missing_flags(_help("vllm", "0.33.0"), "vllm", "0.26.0"))
    assert set(missing) == {"--no-enable-chunked-prefill", "--no-enable-prefix-caching", "--no-enable-expert-parallel"}
    assert missing["--no-enable-prefix-caching"] == ["prefix_caching"]
    # SGLang 0.5.17 still has the deprecated alias --cuda-graph-max-bs; from 0.5.20 it is an ambiguous prefix
    assert "--cuda-graph-max-bs" in flags_in_help(_help("sglang", "0.5.17"))
    assert "--cuda-graph-max-bs" not in flags_in_help(_help("sglang", "0.5.20"))
    assert "--cuda-graph-max-bs-decode" in flags_in_help(_help("sglang", "0.5.20"))


def test_version_check_cli(tmp_path, capsys):
    assert version_check_main(["vllm", "--help-file", str(HELP / "vllm-0.26.0.txt")]) == 0
    assert version_check_main(["vllm", "--version", "0.26.0", "--help-file", str(HELP / "vllm-0.33.0.txt")]) == 1
    out = capsys.readouterr().out
    assert "--no-enable-prefix-caching: not accepted (used by prefix_caching)" in out
    empty = tmp_path / "empty.txt"
    empty.write_text("command not found\n")
    assert version_check_main(["sglang", "--help-file", str(empty)]) == 2


def test_help_parser_reads_usage_and_option_lines_not_prose():
    text = ("usage: x [-h] [--alpha A] [--beta | --no-beta]\n\noptions:\n  -h, --help  show this help\n"
            "  --alpha A, --alpha-alias A\n                        Use --gamma instead of this.\n"
            "  --delta               ends with --epsilon in prose\n")
    assert flags_in_help(text) == {"--help", "--alpha", "--beta", "--no-beta", "--alpha-alias", "--delta"}


@pytest.mark.parametrize("engine,version", VERSIONS)
def test_default_domains_are_valid_and_defaults_inside_them(engine, version):
    cat = load_catalog(engine, version)
    types = {n: p["type"] for n, p in parameters().items()}
    for name, m in cat.params.items():
        if m.domain is None:
            continue
        assert m.flag is not None, f"{name} has a domain but no flag"
        if isinstance(m.domain, list):
            assert len(set(map(str, m.domain))) == len(m.domain)
            if m.default is not None:
                assert m.default in m.domain, f"{engine} {name}: default {m.default} not in {m.domain}"
            if types[name] == "bool":
                assert all(isinstance(v, bool) for v in m.domain)
            if types[name] == "int":
                assert all(isinstance(v, int) for v in m.domain)
        else:
            assert m.domain["low"] < m.domain["high"]


def test_engine_defaults_follow_the_reference():
    v = load_catalog("vllm").defaults()
    assert v["max_concurrency"] == 1024 and v["max_batched_tokens"] == 8192  # >= 70 GiB, not A100
    assert v["memory_fraction"] == 0.92 and v["chunked_prefill"] is True and v["prefix_caching"] is True
    assert "async_scheduling" not in v and "kv_block_size" not in v  # auto: let the engine decide
    s = load_catalog("sglang").defaults()
    assert "memory_fraction" not in s and "max_concurrency" not in s and "cuda_graph_max_batch" not in s  # auto
    assert s["max_batched_tokens"] == 8192 and s["scheduler_policy"] == "fcfs" and s["prefix_caching"] is True


# -- each parameter's argv -----------------------------------------------------------------------------------
VLLM_ARGV = {
    "tensor_parallel": (4, ["--tensor-parallel-size", "4"]),
    "pipeline_parallel": (2, ["--pipeline-parallel-size", "2"]),
    "data_parallel": (2, ["--data-parallel-size", "2"]),
    "expert_parallel": (True, ["--enable-expert-parallel"]),
    "quantization": ("fp8", ["--quantization", "fp8"]),
    "kv_cache_dtype": ("fp8", ["--kv-cache-dtype", "fp8"]),
    "max_concurrency": (128, ["--max-num-seqs", "128"]),
    "max_batched_tokens": (4096, ["--max-num-batched-tokens", "4096"]),
    "chunked_prefill": (False, ["--no-enable-chunked-prefill"]),
    "prefix_caching": (False, ["--no-enable-prefix-caching"]),
    "memory_fraction": (0.85, ["--gpu-memory-utilization", "0.85"]),
    "kv_block_size": (32, ["--block-size", "32"]),
    "max_model_len": (8192, ["--max-model-len", "8192"]),
    "speculative_method": ("ngram", ["--speculative-config.method", "ngram"]),
    "speculative_tokens": (4, ["--speculative-config.num_speculative_tokens", "4"]),
    "speculative_lookup_max": (5, ["--speculative-config.prompt_lookup_max", "5"]),
    "speculative_lookup_min": (2, ["--speculative-config.prompt_lookup_min", "2"]),
    "speculative_draft_path": ("/d/eagle", ["--speculative-config.model", "/d/eagle"]),
    "attention_backend": ("flashinfer", ["--attention-backend", "FLASHINFER"]),
    "cuda_graph_max_batch": (256, ["--max-cudagraph-capture-size", "256"]),
    "enforce_eager": (True, ["--enforce-eager"]),
    "scheduler_policy": ("priority", ["--scheduling-policy", "priority"]),
    "async_scheduling": (False, ["--no-async-scheduling"]),
    "stream_interval": (4, ["--stream-interval", "4"]),
}
VLLM_033 = {**VLLM_ARGV, "chunked_prefill": (False, ["--disable-chunked-prefill"]),
            "prefix_caching": (False, ["--disable-prefix-caching"]),
            "expert_parallel": (True, ["--enable-expert-parallel"])}
SGLANG_ARGV = {
    "tensor_parallel": (4, ["--tp-size", "4"]),
    "pipeline_parallel": (2, ["--pp-size", "2"]),
    "data_parallel": (2, ["--dp-size", "2"]),
    "expert_parallel": (4, ["--ep-size", "4"]),  # the adapter turns true into tensor_parallel (see below)
    "quantization": ("fp8", ["--quantization", "fp8"]),
    "kv_cache_dtype": ("fp8", ["--kv-cache-dtype", "fp8_e4m3"]),
    "max_concurrency": (128, ["--max-running-requests", "128"]),
    "max_batched_tokens": (4096, ["--chunked-prefill-size", "4096"]),
    "chunked_prefill": (False, ["--chunked-prefill-size", "-1"]),
    "prefix_caching": (False, ["--disable-radix-cache"]),
    "memory_fraction": (0.8, ["--mem-fraction-static", "0.8"]),
    "kv_block_size": (16, ["--page-size", "16"]),
    "max_model_len": (8192, ["--context-length", "8192"]),
    "speculative_method": ("eagle3", ["--speculative-algorithm", "EAGLE3"]),
    "speculative_tokens": (3, ["--speculative-num-steps", "3"]),
    "speculative_topk": (1, ["--speculative-eagle-topk", "1"]),
    "speculative_draft_tokens": (4, ["--speculative-num-draft-tokens", "4"]),
    "speculative_draft_path": ("/d/eagle", ["--speculative-draft-model-path", "/d/eagle"]),
    "attention_backend": ("flash_attn", ["--attention-backend", "fa3"]),
    "cuda_graph_max_batch": (128, ["--cuda-graph-max-bs-decode", "128"]),
    "enforce_eager": (True, ["--cuda-graph-backend-decode", "disabled", "--cuda-graph-backend-prefill", "disabled"]),
    "scheduler_policy": ("lpm", ["--schedule-policy", "lpm"]),
    "async_scheduling": (False, ["--disable-overlap-schedule"]),
    "stream_interval": (2, ["--stream-interval", "2"]),
}
EXPECTED = {("vllm", "0.26.0"): VLLM_ARGV, ("vllm", "0.33.0"): VLLM_033,
            ("sglang", "0.5.17"): SGLANG_ARGV, ("sglang", "0.5.20"): SGLANG_ARGV}


@pytest.mark.parametrize("engine,version", VERSIONS)
def test_every_catalog_parameter_renders(engine, version):
    cat = load_catalog(engine, version)
    table = EXPECTED[(engine, version)]
    flagged = {n for n, m in cat.params.items() if m.flag is not None}
    assert flagged == set(table), f"untested parameters: {flagged ^ set(table)}"
    for name, (value, argv) in table.items():
        assert render_flags(cat, {name: value}) == argv, name


@pytest.mark.parametrize("engine,version", VERSIONS)
def test_bool_styles_both_ways_and_omitted_values(engine, version):
    cat = load_catalog(engine, version)
    r = lambda **p: render_flags(cat, p)  # noqa: E731
    if engine == "vllm":
        assert r(enforce_eager=False) == ["--no-enforce-eager"]
        assert r(async_scheduling=True) == ["--async-scheduling"]
        assert r(chunked_prefill=True) == ["--enable-chunked-prefill"]
        assert r(prefix_caching=True) == ["--enable-prefix-caching"]
        off = "--disable-expert-parallel" if version.startswith("0.33") else "--no-enable-expert-parallel"
        assert r(expert_parallel=False) == [off]
    else:
        assert r(prefix_caching=True) == [] and r(async_scheduling=True) == []
        assert r(chunked_prefill=True) == [] and r(enforce_eager=False) == []
    # "none"/"auto" mean: do not pass the flag (the engine's own choice)
    assert r(quantization="none", speculative_method="none", attention_backend="auto") == []
    # engine spellings pass through unchanged
    native = "TRITON_ATTN" if engine == "vllm" else "triton"
    assert r(attention_backend=native) == ["--attention-backend", native]


def test_vllm_plan_command_env_and_endpoints(monkeypatch):
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setenv("NCCL_NVLS_ENABLE", "1")  # the host's choice wins over the adapter's default
    e = get_engine("vllm")
    plan = _plan(e, {"tensor_parallel": 2}, extra_args=["--max-log-len", "100"], extra_env={"X": "1"})
    assert plan.argv[:3] == ["vllm", "serve", "/models/llama8b"]  # model is positional
    assert plan.argv[3:9] == ["--served-model-name", "llama-3.1-8b", "--host", "127.0.0.1", "--port", "8123"]
    assert plan.argv[9:12] == ["--load-format", "dummy", "--disable-uvicorn-access-log"]
    assert plan.argv[-4:] == ["--tensor-parallel-size", "2", "--max-log-len", "100"]
    assert plan.env["CUDA_VISIBLE_DEVICES"] == "0,1" and plan.env["X"] == "1"
    assert plan.env["HF_HUB_OFFLINE"] == "1" and plan.env["VLLM_NO_USAGE_STATS"] == "1"
    assert "NCCL_NVLS_ENABLE" not in plan.env
    assert (plan.health_path, plan.metrics_path) == ("/health", "/metrics")
    assert "--load-format" not in e.plan({}, _model(None), host="h", port=1, gpu_ids=[0]).argv
    custom = get_engine("vllm", ["/opt/venv/bin/vllm", "serve"])
    assert _plan(custom, {}).argv[:3] == ["/opt/venv/bin/vllm", "serve", "/models/llama8b"]


def test_sglang_plan_command_metrics_and_kit_extra_args(monkeypatch):
    monkeypatch.delenv("NCCL_NVLS_ENABLE", raising=False)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    e = get_engine("sglang")
    kit = ["--attention-backend", "triton", "--sampling-backend", "pytorch"]  # the gpu-kit's extra_args
    plan = _plan(e, {"tensor_parallel": 2}, extra_args=kit)
    assert plan.argv[:5] == ["python3", "-m", "sglang.launch_server", "--model-path", "/models/llama8b"]
    assert plan.argv[5:11] == ["--served-model-name", "llama-3.1-8b", "--host", "127.0.0.1", "--port", "8123"]
    assert plan.argv[11:] == ["--load-format", "dummy", "--tp-size", "2", "--enable-metrics", *kit]
    assert _plan(e, {}).argv.count("--enable-metrics") == 1  # always, extra_args or not
    assert plan.env["NCCL_NVLS_ENABLE"] == "0" and plan.env["HF_HUB_OFFLINE"] == "1"
    assert (plan.health_path, plan.metrics_path) == ("/health", "/metrics")


def test_vllm_speculative_children_follow_the_method():
    e = get_engine("vllm")
    spec = {"speculative_tokens": 4, "speculative_lookup_max": 5, "speculative_lookup_min": 2,
            "speculative_draft_path": "/d/eagle"}
    argv = _plan(e, {"speculative_method": "none", **spec}).argv
    assert not any(a.startswith("--speculative-config") for a in argv)
    argv = _plan(e, {"speculative_method": "ngram", **spec}).argv
    i = argv.index("--speculative-config.method")
    assert argv[i:] == ["--speculative-config.method", "ngram", "--speculative-config.num_speculative_tokens", "4",
                        "--speculative-config.prompt_lookup_max", "5", "--speculative-config.prompt_lookup_min", "2"]
    argv = _plan(e, {"speculative_method": "eagle3", **spec}).argv
    i = argv.index("--speculative-config.method")
    assert argv[i:] == ["--speculative-config.method", "eagle3", "--speculative-config.num_speculative_tokens", "4",
                        "--speculative-config.model", "/d/eagle"]


def _vllm_dotted_to_json(argv: list[str]) -> dict:
    """What vLLM's FlexibleArgumentParser does with --speculative-config.KEY VALUE pairs."""
    out = {}
    for k, v in zip(argv[::2], argv[1::2]):
        key = k.split(".", 1)[1]
        try:
            out[key] = json.loads(v)
        except json.JSONDecodeError:
            out[key] = v
    return out


def test_vllm_dotted_speculative_keys_form_one_json_object():
    e = get_engine("vllm")
    argv = _plan(e, {"speculative_method": "ngram", "speculative_tokens": 4, "speculative_lookup_max": 5}).argv
    spec = [a for a in argv[argv.index("--speculative-config.method"):]]
    assert _vllm_dotted_to_json(spec) == {"method": "ngram", "num_speculative_tokens": 4, "prompt_lookup_max": 5}


def test_sglang_speculative_chain_equals_vllm_k():
    e = get_engine("sglang")
    argv = _plan(e, {"speculative_method": "eagle", "speculative_tokens": 3, "speculative_draft_path": "/d",
                     "speculative_lookup_max": 5}).argv
    i = argv.index("--speculative-algorithm")
    assert argv[i:i + 10] == ["--speculative-algorithm", "EAGLE", "--speculative-num-steps", "3",
                              "--speculative-eagle-topk", "1", "--speculative-num-draft-tokens", "4",
                              "--speculative-draft-model-path", "/d"]
    assert "--speculative-ngram-max-trie-depth" not in argv  # lookup params have no SGLang knob
    argv = _plan(e, {"speculative_method": "ngram", "speculative_tokens": 8, "speculative_draft_path": "/d"}).argv
    i = argv.index("--speculative-algorithm")
    assert argv[i:i + 4] == ["--speculative-algorithm", "NGRAM", "--speculative-num-draft-tokens", "8"]
    assert "--speculative-num-steps" not in argv and "--speculative-draft-model-path" not in argv
    argv = _plan(e, {"speculative_method": "none", "speculative_tokens": 3}).argv
    assert not any(a.startswith("--speculative") for a in argv)


def test_sglang_neutral_booleans_that_are_not_one_flag():
    e = get_engine("sglang")
    argv = _plan(e, {"tensor_parallel": 4, "expert_parallel": True}).argv
    assert argv[argv.index("--ep-size") + 1] == "4"
    assert "--ep-size" not in _plan(e, {"tensor_parallel": 4, "expert_parallel": False}).argv
    argv = _plan(e, {"chunked_prefill": False, "max_batched_tokens": 4096}).argv
    assert argv.count("--chunked-prefill-size") == 1 and argv[argv.index("--chunked-prefill-size") + 1] == "-1"
    argv = _plan(e, {"chunked_prefill": True, "max_batched_tokens": 4096}).argv
    assert argv[argv.index("--chunked-prefill-size") + 1] == "4096"


# -- round trip: parse argv back with a parser built from the catalog ------------------------------------------
def _catalog_parser(cat) -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(allow_abbrev=False, add_help=False)
    seen: set[str] = set()

    def opt(flag: str, **kw):
        if flag not in seen:
            seen.add(flag)
            ap.add_argument(flag, dest=flag, default=None, **kw)

    for m in cat.params.values():
        if m.flag is None:
            continue
        if m.style == "value":
            opt(m.flag)
        elif m.style == "bool_optional":
            opt(m.flag, action="store_true")
            opt("--no-" + m.flag.removeprefix("--"), action="store_true")
        elif m.style == "bool_flag_inverted" or m.style == "bool_flag":
            opt(m.flag, action="store_true")
        for seq in (m.when_true, m.when_false):
            for i, tok in enumerate(seq):
                if tok.startswith("--"):
                    takes_value = i + 1 < len(seq) and not seq[i + 1].startswith("--")
                    opt(tok, **({} if takes_value else {"action": "store_true"}))
    return ap


def _contains(argv: list[str], seq: tuple) -> bool:
    n = len(seq)
    return n > 0 and any(tuple(argv[i:i + n]) == seq for i in range(len(argv) - n + 1))


def _decode(cat, argv: list[str], asked: dict) -> dict:
    ns = vars(_catalog_parser(cat).parse_args(argv))  # raises on anything the catalog cannot have produced
    inverse = {}
    out: dict[str, Any] = {}
    for name in asked:
        m = cat.params[name]
        inverse = {str(v): k for k, v in m.values.items()}
        if m.style == "value":
            raw = ns[m.flag]
            if raw is None:
                out[name] = None
                continue
            val = inverse.get(raw, raw)
            out[name] = type(asked[name])(val) if not isinstance(asked[name], bool) else val
        elif m.style == "bool_optional":
            out[name] = True if ns[m.flag] else (False if ns["--no-" + m.flag.removeprefix("--")] else None)
        elif m.style == "bool_flag_inverted":
            out[name] = not ns[m.flag]
        elif m.style == "bool_flag":
            out[name] = bool(ns[m.flag])
        elif m.style == "bool_argv":
            out[name] = True if _contains(argv, m.when_true) or (
                not m.when_true and not _contains(argv, m.when_false)) else False
    return out


ROUND_TRIP = [
    {"tensor_parallel": 2, "pipeline_parallel": 1, "data_parallel": 2, "quantization": "fp8", "kv_cache_dtype": "fp8",
     "max_concurrency": 64, "max_batched_tokens": 4096, "prefix_caching": False, "memory_fraction": 0.85,
     "kv_block_size": 32, "max_model_len": 8192, "attention_backend": "flashinfer", "cuda_graph_max_batch": 128,
     "enforce_eager": True, "scheduler_policy": "fcfs", "async_scheduling": False, "stream_interval": 4,
     "speculative_method": "eagle3", "speculative_tokens": 3, "speculative_draft_path": "/d/eagle3"},
    {"chunked_prefill": False, "prefix_caching": True, "enforce_eager": False, "async_scheduling": True,
     "attention_backend": "triton", "speculative_method": "ngram", "speculative_tokens": 4},
    {"chunked_prefill": True, "max_batched_tokens": 16384, "memory_fraction": 0.9},
]


@pytest.mark.parametrize("engine,version", VERSIONS)
@pytest.mark.parametrize("case", range(len(ROUND_TRIP)))
def test_round_trip_argv_back_to_params(engine, version, case):
    cat = load_catalog(engine, version)
    params = dict(ROUND_TRIP[case])
    if engine == "sglang" and params.get("speculative_method") == "ngram":
        params.pop("speculative_tokens")  # becomes --speculative-num-draft-tokens: checked in its own test
    argv = render_flags(cat, params)
    assert _decode(cat, argv, params) == params


@pytest.mark.parametrize("engine,version", VERSIONS)
def test_plan_argv_round_trips_through_the_engine_transform(engine, version, monkeypatch):
    """The whole plan, not just the catalog: decode the tail after the fixed command part."""
    monkeypatch.delenv("TORCH_SYMM_MEM_DISABLE_MULTICAST", raising=False)  # would add a flag at TP=2
    e = get_engine(engine, None, version)
    params = {"tensor_parallel": 2, "max_concurrency": 32, "prefix_caching": False, "memory_fraction": 0.8,
              "speculative_method": "eagle", "speculative_tokens": 2, "speculative_draft_path": "/d"}
    argv = _plan(e, params).argv
    start = argv.index("--tensor-parallel-size" if engine == "vllm" else "--tp-size")
    tail = [a for a in argv[start:] if a != "--enable-metrics"]
    decoded = _decode(e.catalog, tail, params)
    assert decoded == params


def test_vllm_avoids_multicast_all_reduce_only_where_multicast_is_off(monkeypatch):
    vllm = get_engine("vllm")
    monkeypatch.delenv("TORCH_SYMM_MEM_DISABLE_MULTICAST", raising=False)
    monkeypatch.delenv("VLLM_FLASHINFER_ALLREDUCE_BACKEND", raising=False)
    env = vllm.base_env()
    assert env["NCCL_NVLS_ENABLE"] == "0"
    assert "VLLM_FLASHINFER_ALLREDUCE_BACKEND" not in env and "VLLM_ALLREDUCE_USE_SYMM_MEM" not in env
    monkeypatch.setenv("TORCH_SYMM_MEM_DISABLE_MULTICAST", "1")
    env = vllm.base_env()
    assert env["VLLM_FLASHINFER_ALLREDUCE_BACKEND"] == "trtllm" and env["VLLM_ALLREDUCE_USE_SYMM_MEM"] == "0"
    monkeypatch.setenv("VLLM_FLASHINFER_ALLREDUCE_BACKEND", "nccl")  # what the host sets wins
    assert "VLLM_FLASHINFER_ALLREDUCE_BACKEND" not in _plan(vllm, {"tensor_parallel": 2}).env


def test_vllm_turns_the_all_reduce_fusion_off_at_tp_above_1_where_multicast_is_off(monkeypatch):
    vllm = get_engine("vllm")
    fusion_off = {"pass_config": {"fuse_allreduce_rms": False}}

    def compilation_config(params, extra_args=None):
        argv = _plan(vllm, params, extra_args=extra_args).argv
        values = [json.loads(argv[i + 1]) for i, a in enumerate(argv) if a == "--compilation-config"]
        return values, argv

    monkeypatch.delenv("TORCH_SYMM_MEM_DISABLE_MULTICAST", raising=False)
    assert compilation_config({"tensor_parallel": 2})[0] == []
    monkeypatch.setenv("TORCH_SYMM_MEM_DISABLE_MULTICAST", "1")
    assert compilation_config({"tensor_parallel": 2})[0] == [fusion_off]
    assert compilation_config({"tensor_parallel": 1})[0] == []  # no all-reduce at TP=1
    # the study's own compilation config wins, in any spelling, and its other extra args stay
    for own in (["--compilation-config", '{"level": 0}'], ["--compilation-config={\"level\": 0}"], ["-cc", "{}"],
                ["-cc.pass_config.fuse_allreduce_rms=true"]):
        values, argv = compilation_config({"tensor_parallel": 2}, extra_args=["--seed", "1", *own])
        assert fusion_off not in values and argv[-len(own) - 2:] == ["--seed", "1", *own]
    argv = get_engine("vllm", None, "0.33").plan({"tensor_parallel": 2}, _model(), host="127.0.0.1", port=1,
                                                  gpu_ids=[0, 1]).argv
    assert "--compilation-config" not in argv  # other releases: left as they are
