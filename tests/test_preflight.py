"""validate runs every check run makes before its first launch (issue 17, point 2)."""
from __future__ import annotations

import json
import re
import sys
from pathlib import Path

import pytest
import yaml

from servetune.optimizer import cli, preflight
from servetune.optimizer.driver import StudyDriver, make_sampler
from servetune.optimizer.perfmodel.model_shapes import PRESETS
from servetune.optimizer.spec import load_study
from study_fixtures import write_study

ROOT = Path(__file__).resolve().parent.parent
BAD = Path(__file__).resolve().parent / "bad_studies_prelaunch"
EXPECTED = yaml.safe_load((BAD / "expected.yaml").read_text())
EXAMPLES = sorted((ROOT / "search_spaces" / "examples").glob("*.yaml"))
_LINE = re.compile(r"^(?P<file>.+?):(?P<line>\d+): (?P<path>[^:]+): (?P<msg>\S.*)$")


def _cli(capsys, *argv: str) -> tuple[int, str, str]:
    code = cli.main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def test_validate_and_run_refuse_the_same_bad_studies_at_their_own_line(capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # a run that wrongly started would write runs/ here
    monkeypatch.setitem(sys.modules, "torch", None)  # importlib finds no PyTorch, as on a laptop without it
    assert sorted(EXPECTED) == sorted(p.name for p in BAD.glob("*.yaml") if p.name != "expected.yaml")
    for name, exp in EXPECTED.items():
        path = str(BAD / name)
        v_code, _, v_err = _cli(capsys, "validate", path)
        r_code, _, r_err = _cli(capsys, "run", path, "--no-report")
        assert (v_code, r_code) == (2, 2), f"{name}: validate {v_code}, run {r_code}\n{v_err}{r_err}"
        assert v_err == r_err, f"{name}: validate and run disagree:\n{v_err}\n{r_err}"
        (line,) = v_err.strip().splitlines()
        m = _LINE.match(line)
        assert m and m["file"] == path, line
        assert (int(m["line"]), m["path"]) == (exp["line"], exp["path"]) and exp["message"] in m["msg"], line
    assert not (tmp_path / "runs").exists(), "a bad study started a run"


def _materialize(example: Path, tmp: Path) -> Path:
    """The example with its checkpoint directory made here (config.json of the same shape, no weights)."""
    text = example.read_text()
    for m in re.finditer(r"path: (/tmp/models/([\w.-]+))", text):
        d = tmp / "models" / m[2]
        d.mkdir(parents=True, exist_ok=True)
        fixture = Path(__file__).parent / "fixtures" / "models" / m[2] / "config.json"  # a real checkpoint's
        (d / "config.json").write_text(fixture.read_text() if fixture.exists() else json.dumps(PRESETS[m[2]]))
        text = text.replace(m[1], str(d))
    out = tmp / example.name
    out.write_text(text)
    return out


@pytest.mark.parametrize("example", EXAMPLES, ids=[p.stem for p in EXAMPLES])
def test_every_example_passes_validate_and_what_run_does_before_launching(example, capsys, tmp_path):
    path = _materialize(example, tmp_path)
    code, out, err = _cli(capsys, "validate", str(path))
    assert code == 0 and ": ok — " in out, err
    # what run does before its first launch, step by step: build the driver, open the sampler, judge configs
    spec = load_study(path)
    driver = StudyDriver(spec)
    make_sampler(spec, driver.space, len(spec.objectives))
    pf = preflight.check(spec, str(path))
    assert pf.ok and pf.driver is not None
    if pf.configs:
        assert any(not driver.check(e, p) for e, p in pf.configs), "validate passed a space run rejects whole"
        assert pf.n_rejected == sum(1 for e, p in pf.configs if driver.check(e, p))


def test_validate_no_path_check_checks_a_gpu_study_on_a_laptop(capsys, tmp_path):
    gpu_study = str(ROOT / "search_spaces" / "examples" / "gpu-vllm-llama8b.yaml")
    code, _, err = _cli(capsys, "validate", gpu_study)
    assert code == 2 and re.search(r"gpu-vllm-llama8b.yaml:5: model.path: no such directory", err), err
    code, out, err = _cli(capsys, "validate", gpu_study, "--no-path-check")
    assert code == 0 and "model.path '/tmp/models/llama-3.1-8b' not checked here" in out, out + err
    # with a preset beside the path, the rules run over the space on the preset's shape
    with_preset = tmp_path / "gpu.yaml"
    with_preset.write_text(Path(gpu_study).read_text().replace("model: {path:", "model: {preset: llama-3.1-8b, path:"))
    code, out, err = _cli(capsys, "validate", str(with_preset), "--no-path-check")
    assert code == 0 and "the rules use the shape of preset llama-3.1-8b" in out and "(480 configurations" in out, out
    # what --no-path-check does not waive: the other checks
    bad = tmp_path / "bad.yaml"
    bad.write_text(with_preset.read_text().replace("gpu: h200", "gpu: H100x"))
    code, _, err = _cli(capsys, "validate", str(bad), "--no-path-check")
    assert code == 2 and "hardware.gpu: unknown GPU 'H100x'" in err, err


def test_a_value_one_engine_refuses_is_rejected_for_that_engine_only(tmp_path, capsys):
    path = write_study(tmp_path, search="""
      kv_cache_dtype: [auto, float16]
    """)
    path.write_text(path.read_text().replace("engines: [sim]", "engines: [vllm, sglang]"))
    code, out, err = _cli(capsys, "validate", str(path))
    assert code == 0, err  # vLLM takes float16, so the value is searched
    driver = StudyDriver(load_study(path))
    assert driver.check("vllm", {"kv_cache_dtype": "float16"}) == []
    assert any("sglang 0.5.17 does not accept kv_cache_dtype=float16" in r
               for r in driver.check("sglang", {"kv_cache_dtype": "float16"}))
