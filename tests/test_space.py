"""Search space and catalog: domains become Optuna distributions, conditionals stay conditional."""
import optuna
import pytest

from servetune.optimizer import catalog
from servetune.optimizer import space as space_module
from servetune.optimizer.catalog import load_catalog, render_flags
from servetune.optimizer.engines import common
from servetune.optimizer.parameters import OFF_VALUES, PARAMETERS, bound_problem, is_off
from servetune.optimizer.space import SearchSpace
from servetune.optimizer.spec import parse_study


def test_conditional_parameter_only_sampled_when_parent_on():
    space = SearchSpace(["sim"], {"speculative_method": ["none", "ngram"],
                                  "speculative_tokens": {"low": 1, "high": 5}})
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=1))
    seen = {"none": 0, "ngram": 0}
    for _ in range(30):
        t = study.ask()
        _, params = space.suggest(t)
        seen[params["speculative_method"]] += 1
        assert ("speculative_tokens" in params) == (params["speculative_method"] != "none")
        study.tell(t, 0.0)
    assert seen["none"] and seen["ngram"]


def test_grid_collapses_conditional_children():
    space = SearchSpace(["sim"], {"speculative_method": ["none", "ngram"], "speculative_tokens": [2, 4],
                                  "tensor_parallel": [1, 2]})
    grid = space.grid()
    # none × (no k) + ngram × {2,4}, times tp {1,2}
    assert len(grid) == 6
    assert {"speculative_method": "none", "tensor_parallel": 1} in grid


def test_log_int_domain_and_baseline_is_engine_default():
    space = SearchSpace(["sim"], {"max_concurrency": {"low": 8, "high": 512, "log": True},
                                  "quantization": ["none", "fp8"]})
    dist = space.distributions()["max_concurrency"]
    assert isinstance(dist, optuna.distributions.IntDistribution) and dist.log
    assert space.baseline("sim") == {"max_concurrency": 256, "quantization": "none"}


def test_multi_engine_makes_engine_a_dimension():
    space = SearchSpace(["sim", "sim"][:1], {"tensor_parallel": [1]})
    assert "engine" not in space.distributions()


def test_render_flags_styles_and_omission():
    cat = load_catalog("sim")
    argv = render_flags(cat, {"tensor_parallel": 2, "chunked_prefill": False, "prefix_caching": True,
                              "memory_fraction": 0.85, "quantization": "fp8"})
    assert argv == ["--tensor-parallel-size", "2", "--quantization", "fp8", "--no-enable-chunked-prefill",
                    "--enable-prefix-caching", "--gpu-memory-utilization", "0.85"]


def test_empty_search_uses_catalog_domains():
    space = SearchSpace(["sim"], {})
    assert set(space.dimensions) == set(load_catalog("sim").default_domains())


def test_parameter_facts_live_once_in_parameters_yaml():
    """Bounds and "off" values come from search_spaces/parameters.yaml alone: the spec, the search space
    and the engines read the same table."""
    assert catalog.parameters() is PARAMETERS is space_module.PARAMETERS and common.is_off is is_off
    assert "off_values" not in PARAMETERS and None in OFF_VALUES
    for v in (None, False, 0, 0.0, "", "none", "None", "OFF", "false", "0"):
        assert is_off(v), v
    for v in (True, 1, "ngram", "auto", "fp8"):
        assert not is_off(v), v
    assert bound_problem("tensor_parallel", 0) == "must be at least 1"
    assert (bound_problem("memory_fraction", 0) == bound_problem("memory_fraction", 1.5)
            == "must be above 0 and at most 1")
    assert bound_problem("memory_fraction", 1) is None and bound_problem("attention_backend", -5) is None
    study = ("name: p\nmodel: {preset: llama-3.2-1b}\nengines: [sim]\nworkload: {scenarios: [{kind: offline}]}\n"
             "objectives: [{metric: output_tokens_per_s}]\nsearch:\n  speculative_method: [None, \"off\"]\n"
             "  speculative_tokens: [2, 4]\n")
    with pytest.raises(Exception, match="every value of search.speculative_method is off"):
        parse_study(study, "p.yaml")
