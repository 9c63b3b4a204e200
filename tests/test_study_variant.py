"""benchmarks/gpu/study_variant.py: the GPU study cut to the host at hand, on the mixtral example itself."""
from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import yaml

from servetune.optimizer.perfmodel.model_shapes import PRESETS
from servetune.optimizer.spec import load_study

ROOT = Path(__file__).resolve().parent.parent
MIXTRAL = ROOT / "search_spaces" / "examples" / "gpu-vllm-mixtral-1xh200.yaml"


def _module():
    spec = importlib.util.spec_from_file_location("study_variant", ROOT / "benchmarks" / "gpu" / "study_variant.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


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
    assert _module().main([str(study), str(out), "--gpu", "h100", "--layers", "16", "--trials", "1"]) == 0
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
    assert _module().main([str(study), str(tmp_path / "out")]) == 0
    assert yaml.safe_load((tmp_path / "out" / study.name).read_text()) == yaml.safe_load(study.read_text())


def test_a_study_without_the_key_is_an_error_not_a_silent_copy(tmp_path):
    with pytest.raises(KeyError, match="budget.trials"):
        _module().variant({"name": "x", "hardware": {"gpu": "h200"}}, trials=1)
    with pytest.raises(ValueError, match="32 layers; 40 asked"):
        model = tmp_path / "m"
        model.mkdir()
        (model / "config.json").write_text(json.dumps(PRESETS["mixtral-8x7b"]))
        _module().shallower_model(model, 40)
