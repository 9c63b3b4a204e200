"""Engines register themselves (optimizer/engines/registry.py); the rest of servetune asks their traits
instead of comparing names (docs/third-engine.md)."""
from __future__ import annotations

import re
from pathlib import Path

import pytest

from servetune.optimizer import export, spec
from servetune.optimizer.catalog import load_catalog
from servetune.optimizer.engines import engine_class, get_engine, names, registry, simulated
from servetune.optimizer.engines.base import CatalogEngine, Failure, FailureKind, ModelRef

REPO = Path(__file__).resolve().parents[1]


def test_every_engine_module_registers_and_has_its_catalog():
    assert {"sim", "vllm", "sglang"} <= set(names())
    for n in names():
        e = get_engine(n)
        assert e.name == n and type(e) is engine_class(n)
        assert load_catalog(n).engine == n  # search_spaces/<name>.yaml
    assert [n for n in names() if simulated(n)] == ["sim"] and names()[0] == "sim"


def test_the_engine_lists_come_from_the_registry():
    assert spec.ENGINES == names()
    assert set(names()) <= set(export.FORMATS)
    assert [f for f in export.SIM_FORMATS if f in names()] == ["sim"]


def test_an_unknown_name():
    with pytest.raises(ValueError, match=r"unknown engine 'nope' \(have: sim, "):
        get_engine("nope")
    assert simulated("nope") is False  # an old record's engine is no simulated one


def test_a_name_registers_once():
    class Other(CatalogEngine):
        def classify(self, log_tail: str, exit_code: int | None) -> Failure:
            return Failure(FailureKind.CRASH, "")

    with pytest.raises(ValueError, match="registered twice"):
        registry.register("vllm")(Other)
    assert engine_class("vllm").__name__ == "VllmEngine"


def test_traits_replace_the_name_checks():
    vllm, sglang, sim = engine_class("vllm"), engine_class("sglang"), engine_class("sim")
    assert vllm.image == "vllm/vllm-openai:v{version}" and sglang.image == "lmsysorg/sglang:v{version}-cu129"
    assert get_engine("vllm").pip_spec("0.26.0") == "vllm==0.26.0" and get_engine("sim").pip_spec("1") == "servetune"
    assert vllm.help_args == ("--help=all",) and sglang.help_args == ("--help",)
    assert vllm.helm_template == "helm-production-stack.yaml.j2" and sglang.helm_template == "helm-generic.yaml.j2"
    assert get_engine("sglang").ray_serve_engine_kwargs(["/m", "--tp-size", "2"]) is None
    kwargs, warned = get_engine("vllm").ray_serve_engine_kwargs(
        ["/m", "--host", "0.0.0.0", "--tensor-parallel-size", "2", "--speculative-config.method", "ngram",
         "--disable-uvicorn-access-log", "--api-key", "${API_KEY}", "--enable-prefix-caching"])
    assert kwargs == {"tensor_parallel_size": 2, "speculative_config": {"method": "ngram"},
                      "enable_prefix_caching": True}
    assert warned == []  # --api-key is a front-end flag, dropped before the secret check
    assert sim.start_s[1] < sglang.start_s[0] and sim.stop_s < vllm.stop_s


def test_sglang_reads_its_ep_size_back_as_the_neutral_boolean():
    e = get_engine("sglang")
    argv = e.plan({"tensor_parallel": 4, "expert_parallel": True}, ModelRef("m", "/m", {}), host="h", port=1,
                  gpu_ids=[0, 1, 2, 3]).argv
    assert argv[argv.index("--ep-size") + 1] == "4"
    params, rest = e.parse_flags(argv[argv.index("--tp-size"):])
    assert params["expert_parallel"] is True and params["tensor_parallel"] == 4


def test_no_engine_name_is_compared_outside_the_engines():
    """What an engine is, is asked of its class (registry.simulated, engine_class(name).trait)."""
    compare = re.compile(r"""[=!]=\s*["'](%s)["']|["'](%s)["']\s*[=!]=""" % ("|".join(names()), "|".join(names())))
    found = []
    for py in sorted((REPO / "optimizer").rglob("*.py")):
        if "engines" in py.relative_to(REPO / "optimizer").parts:
            continue
        for i, line in enumerate(py.read_text().splitlines(), 1):
            if compare.search(line):
                found.append(f"{py.relative_to(REPO)}:{i}: {line.strip()}")
    assert not found, found
