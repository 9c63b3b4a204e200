"""benchmarks/gpu's scripts against records of a real GPU run (the levels kept as fixtures)."""
from __future__ import annotations

import gzip
import importlib.util
import json
import shutil
from pathlib import Path

import pytest
import yaml

from servetune.optimizer.driver import StudyDriver
from servetune.optimizer.perfmodel.model_shapes import PRESETS
from servetune.optimizer.spec import load_study
from study_fixtures import write_study

ROOT = Path(__file__).resolve().parent.parent
LEVELS = Path(__file__).parent / "fixtures" / "gpu_levels"
MIXTRAL = ROOT / "search_spaces" / "examples" / "gpu-vllm-mixtral-1xh200.yaml"


def _script(name: str):
    spec = importlib.util.spec_from_file_location(name, ROOT / "benchmarks" / "gpu" / f"{name}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _trial(trials: Path, number: int, levels: dict[str, bool], baseline: bool = False) -> None:
    """A trial record as the lifecycle writes it, with the named fixture levels and their verdicts then."""
    d = trials / f"{number:04d}"
    d.mkdir(parents=True)
    recorded = []
    for name, valid in levels.items():
        qps = float(name.rsplit("qps", 1)[1])
        with gzip.open(LEVELS / f"{name}.csv.gz") as src, open(d / f"requests_server_qps{qps:.4g}.csv", "wb") as dst:
            shutil.copyfileobj(src, dst)
        settings = {"kind": "server", "qps": qps, "duration_s": 20.0, "ttft_limit_ms": 2000.0, "tpot_limit_ms": 100.0,
                    "require_early_stopping": False, "min_keep_up": 0.7, "endpoint": {"base_url": "http://127.0.0.1:1"}}
        recorded.append({"qps": qps, "settings": settings, "duration_s": 25.0, "valid": valid})
    (d / "trial.json").write_text(json.dumps({"number": number, "is_baseline": baseline,
                                              "scenarios": {"server": {"levels": recorded}}}))


def test_rejudge_applies_this_checkout_s_rules_to_a_finished_study(tmp_path, capsys):
    rejudge = _script("rejudge")
    trials = tmp_path / "trials"
    _trial(trials, 0, {"vllm-fp8-h200-qps47.25": True}, baseline=True)
    _trial(trials, 1, {"vllm-fp8-h200-qps47.25": True, "vllm-fp8-h200-qps53.44": True})
    judged = rejudge.rejudge_trial(trials / "0001", "server", 0.7)
    assert [(x["qps"], x["was"], x["now"]) for x in judged["levels"]] == [(47.25, True, True), (53.44, True, False)]
    assert judged["levels"][1]["reasons"][0].startswith("not keeping up")
    assert rejudge.best_level(judged["levels"], "now")["qps"] == 47.25
    rejudge.main([str(trials)])
    out = capsys.readouterr().out
    assert "- as measured: best valid" in out and "at 53.44 req/s" in out
    assert "- judged again: best valid" in out and "1.00×" in out  # the same level as the baseline's now


def test_summarize_states_packing_and_the_pareto_front_of_a_sharding_study(tmp_path):
    study = write_study(tmp_path, trials=4, parallel=3, duration_s=1, qps=3, gpus=4, sampler="{kind: random, seed: 1}",
                        search="""
      tensor_parallel: [1, 2]
      max_concurrency: [8, 64]
    """, extra="baseline: false\n")
    StudyDriver(load_study(study)).run()
    text = _script("summarize").summarize(tmp_path / "run")
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert f"Packing: at most {summary['gpu_use']['peak_gpus']} GPUs held at once" in text
    assert "no two trials held a GPU at the same time" in text
    rows = [ln for ln in text.splitlines() if ln.startswith("| ") and ln[2:3].isdigit()]
    trials = {int(p.parent.name): json.loads(p.read_text()) for p in (tmp_path / "run" / "trials").glob("*/trial.json")}
    front = [n for n in summary["pareto"] if trials[n].get("duplicate_of") is None]
    assert front and len(rows) == 4 + len(front)  # the trial table, then one row per Pareto config
    assert "Pareto front (server.output_tokens_per_s_per_gpu vs server.tpot_p99_ms)" in text


def test_spec_crossover_finds_the_level_from_which_speculation_is_slower(tmp_path):
    def trial(n: int, params: dict, copy_rates: list[float]) -> None:
        d = tmp_path / "trials" / f"{n:04d}"
        d.mkdir(parents=True)
        levels = [{"concurrency": c, "summary": {"output_tokens_per_s": r, "tpot_p50_ms": 1000 / r * c},
                   "metrics_delta": {"spec_acceptance_rate": 0.4, "spec_mean_acceptance_length": 2.6}
                   if params.get("speculative_method") == "ngram" else {}}
                  for c, r in zip((1, 16, 64, 256), copy_rates)]
        (d / "trial.json").write_text(json.dumps({"number": n, "state": "complete", "params": params,
                                                  "scenarios": {"copy": {"levels": levels}}}))

    trial(0, {"speculative_method": "none"}, [200, 2000, 3300, 3000])
    trial(1, {"speculative_method": "ngram", "speculative_tokens": 4, "speculative_lookup_min": 2,
              "speculative_lookup_max": 4}, [260, 2600, 3100, 2700])
    trial(2, {"speculative_method": "ngram", "speculative_tokens": 2}, [250, 1900, 3400, 3100])
    text = _script("spec_crossover").render(tmp_path)
    assert "| 1 | 200 · 5.00 | 250 · 4.00 · 40% (2.60) | 260 · 3.85 · 40% (2.60) |" in text
    assert "- ngram k=4 n=2..4: faster at 1, 16; slower at 64, 256; slower from level 64 up (the crossover)" in text
    assert "- ngram k=2: faster at 1, 64, 256; slower at 16; not slower at the highest level both measured" in text


# study_variant.py: the GPU study cut to the host at hand, on the mixtral example itself
@pytest.fixture
def mixtral(tmp_path):
    """The example study with its model where this test made it (config and a tokenizer file, as mkmodel.py)."""
    model = tmp_path / "models" / "mixtral-8x7b"
    model.mkdir(parents=True)
    (model / "config.json").write_text(json.dumps(PRESETS["mixtral-8x7b"]))
    (model / "tokenizer.json").write_text("{}")
    study = yaml.safe_load(MIXTRAL.read_text())
    study["model"]["path"] = str(model)
    path = tmp_path / MIXTRAL.name
    path.write_text(yaml.safe_dump(study, sort_keys=False))
    return path, model


def test_h100_half_depth_baseline_alone(mixtral, tmp_path, capsys):
    study, model = mixtral
    out = tmp_path / "out"
    args = [str(study), str(out), "--gpu", "h100", "--layers", "16", "--trials", "1"]
    assert _script("study_variant").main(args) == 0
    line = capsys.readouterr().out
    cut = load_study(out / study.name)  # what `servetune run` reads
    assert cut.hardware.gpu == "h100" and cut.budget.trials == 1
    assert cut.name == "gpu-vllm-mixtral-1xh100-16l"
    assert Path(cut.model.path) == model.with_name("mixtral-8x7b-16l")
    config = json.loads((model.with_name("mixtral-8x7b-16l") / "config.json").read_text())
    assert config["num_hidden_layers"] == 16 and config["num_local_experts"] == 8
    assert (model.with_name("mixtral-8x7b-16l") / "tokenizer.json").exists()
    assert json.loads((model / "config.json").read_text())["num_hidden_layers"] == 32  # the original untouched
    # 28 req/s on the full model on an H200: x2 for half the layers, x0.7 for the H100's bandwidth
    assert cut.workload.scenarios[0].max_qps.hi == 40
    assert cut.workload.scenarios[0].max_qps.lo == 8  # only the top moves: a low end that fails is halved anyway
    assert "16 of the model's 32 layers" in line and "bracket top 40 req/s" in line and "1 trial" in line


def test_as_written_when_nothing_is_asked(mixtral, tmp_path):
    study, _ = mixtral
    assert _script("study_variant").main([str(study), str(tmp_path / "out")]) == 0
    assert yaml.safe_load((tmp_path / "out" / study.name).read_text()) == yaml.safe_load(study.read_text())


def test_a_study_without_the_key_is_an_error_not_a_silent_copy(tmp_path):
    with pytest.raises(KeyError, match="budget.trials"):
        _script("study_variant").variant({"name": "x", "hardware": {"gpu": "h200"}}, trials=1)
    with pytest.raises(ValueError, match="32 layers; 40 asked"):
        model = tmp_path / "m"
        model.mkdir()
        (model / "config.json").write_text(json.dumps(PRESETS["mixtral-8x7b"]))
        _script("study_variant").shallower_model(model, 40)
