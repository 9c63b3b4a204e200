"""The study file: malformed studies fail with clean FILE:LINE: path: message lines; good ones load."""
from __future__ import annotations

import itertools
import re
from pathlib import Path

import pytest
import yaml

from servetune.loadgen.scenarios import ScenarioSettings
from servetune.optimizer.driver import StudyDriver, dataset_args, scenario_plans
from servetune.optimizer.spec import SLA_PRESETS, SpecError, StudySpec, load_study, parse_study

ROOT = Path(__file__).resolve().parent.parent
BAD = Path(__file__).resolve().parent / "bad_studies"
EXPECTED: dict[str, list[dict]] = yaml.safe_load((BAD / "expected.yaml").read_text())
CORPUS = sorted(p.name for p in BAD.glob("*.yaml") if p.name != "expected.yaml")
QUICKSTART = ROOT / "search_spaces" / "examples" / "quickstart.yaml"

_LINE = re.compile(r"^(?P<file>.+?):(?P<line>\d+): (?P<path>[^:]+): (?P<msg>\S.*)$")


def _errors(path: Path | str, text: str | None = None) -> list[str]:
    with pytest.raises(SpecError) as ei:
        if text is None:
            load_study(path)
        else:
            parse_study(text, str(path))
    return ei.value.lines


def _assert_clean(lines: list[str], fname: str) -> None:
    assert lines, "a SpecError needs at least one line"
    for line in lines:
        assert "\n" not in line and "\r" not in line and "\t" not in line, repr(line)
        m = _LINE.match(line)
        assert m, f"not FILE:LINE: path: message: {line!r}"
        assert m["file"] == fname, line
        assert int(m["line"]) >= 1, line
        for junk in ("Traceback", "pydantic", "errors.pydantic.dev", "Value error,", "Input should",
                     "StudySpec", "Spec", "function-after", "literal["):
            assert junk not in line, f"{junk!r} leaks into {line!r}"


# -- the corpus of malformed studies ----------------------------------------------------------------------------

def test_corpus_is_complete():
    assert len(CORPUS) >= 32
    assert sorted(EXPECTED) == CORPUS, "every bad study needs an entry in expected.yaml, and vice versa"


@pytest.mark.parametrize("name", CORPUS)
def test_bad_study(name: str):
    path = BAD / name
    lines = _errors(path)
    _assert_clean(lines, str(path))
    assert len(lines) == 1, f"{name} holds one problem but reports {len(lines)}:\n" + "\n".join(lines)
    parsed = [m for m in map(_LINE.match, lines) if m is not None]  # all of them: _assert_clean matched each
    for exp in EXPECTED[name]:
        hits = [m for m in parsed if int(m["line"]) == exp["line"] and exp["path"] in m["path"]
                and exp["message"] in m["msg"]]
        assert hits, f"{name}: no line {exp['line']} / {exp['path']!r} / {exp['message']!r} in:\n" + "\n".join(lines)


def test_bad_studies_also_fail_as_text():
    # parse_study takes the same text (the CLI may read stdin); a path-free check is enough here
    text = (BAD / "unknown_nested_key_qsp.yaml").read_text()
    assert _errors("study.yaml", text) == [
        "study.yaml:15: workload.scenarios[0].qsp: unknown key 'qsp' (did you mean 'qps'?)"]


# -- more malformed input, inline ---------------------------------------------------------------------------------


def test_missing_file_and_directory(tmp_path: Path):
    assert _errors(tmp_path / "nope.yaml") == [f"{tmp_path / 'nope.yaml'}:1: (file): no such file"]
    (lines,) = [_errors(tmp_path)]
    assert "is a directory" in lines[0]
    bad = tmp_path / "latin1.yaml"
    bad.write_bytes("name: caf\xe9\n".encode("latin-1"))
    (line,) = _errors(bad)
    assert "not UTF-8" in line
    _assert_clean([line], str(bad))


@pytest.mark.parametrize("text,expect", [
    ("", "1: (top level): the file is empty"),
    ("   \n# just a comment\n", "1: (top level): the file is empty"),
    ("just words\n", "a study is a mapping"),
    ("name: x\ngpus: !!int abc\n", "s.yaml:2: gpus: cannot read the value 'abc'"),
    ("name: 'unterminated\n", "(syntax): YAML syntax error"),
    ("? [a, b]\n: 1\n", "a key must be a plain name"),
    ("name: x\nmodel: &m {preset: a, preset: b}\n", "duplicate key 'preset'"),
    ("name: &x [*x]\n", "(aliases): the alias *x refers to a node that contains it"),  # no crash, no loop
])
def test_odd_yaml(text: str, expect: str):
    lines = _errors("s.yaml", text)
    _assert_clean(lines, "s.yaml")
    assert any(expect in line for line in lines), lines


def test_several_problems_are_all_reported_in_file_order():
    text = QUICKSTART.read_text().replace("gpus: 2 ", "gpus: -1").replace("qps: 6", "qps: 0")
    text += "sampeler: {kind: tpe}\n"
    lines = _errors("q.yaml", text)
    _assert_clean(lines, "q.yaml")
    nums = [int(_LINE.match(x)["line"]) for x in lines]
    assert nums == sorted(nums)
    assert any("hardware.gpus" in x for x in lines)
    assert any("workload.scenarios[1].qps" in x for x in lines)
    assert any("did you mean 'sampler'" in x for x in lines)


def test_source_cannot_be_set_from_the_file():
    text = QUICKSTART.read_text() + "source: /etc/passwd\n"
    (line,) = _errors("q.yaml", text)
    assert "unknown key 'source'" in line


def test_spec_error_lines_are_single_lines():
    e = SpecError(["a.yaml:1: x: two\nlines\tand\r\nmore"])
    assert e.lines == ["a.yaml:1: x: two lines and more"]
    assert str(e) == e.lines[0]


@pytest.mark.parametrize("env", [
    {"HF_TOKEN": "hf_secretsecretsecret"},
    {"OPENAI_API_KEY": "sk-abcdef123456"},
    {"AWS_SECRET_ACCESS_KEY": "abc/def+ghi"},
    {"DB_PASSWORD": "hunter2"},
])
def test_secret_literals_rejected(env: dict):
    text = QUICKSTART.read_text().replace(
        "engines: [sim]", "engines:\n  - name: sim\n    env: " + yaml.safe_dump(env, default_flow_style=True).strip())
    (line,) = _errors("q.yaml", text)
    (key,) = env
    assert f'{key}: "${{{key}}}"' in line and "export" in line


# -- good studies ---------------------------------------------------------------------------------------------------

def test_quickstart_loads_with_defaults(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.chdir(tmp_path)
    spec = load_study(QUICKSTART)
    assert spec.name == "quickstart"
    assert spec.source == str(QUICKSTART)
    assert [e.name for e in spec.engines] == ["sim"]
    assert spec.engines[0].env == {} and spec.engines[0].ready_timeout_s == 900.0
    assert spec.hardware.gpus == 2 and spec.hardware.max_gpus_per_trial == 2
    assert spec.search["tensor_parallel"] == [1, 2]
    offline, scen = spec.workload.scenarios
    assert offline.label == "offline" and offline.sla is None
    assert scen.label == "server" and scen.sla is not None and scen.sla.limits() == SLA_PRESETS["llama3.1-8b"]
    assert scen.timeout_s == 600.0 and scen.warmup_requests == 0
    assert spec.workload.dataset.seed == 0 and spec.workload.dataset.ignore_eos is True
    assert [(o.metric, o.direction) for o in spec.objectives] == [
        ("output_tokens_per_s_per_gpu", "maximize"), ("tpot_p99_ms", "minimize")]
    assert spec.sampler.kind == "tpe" and spec.budget.trials == 8 and spec.budget.parallel == 2
    assert spec.baseline is True and spec.host == "127.0.0.1"
    assert spec.run_dir == Path("runs/quickstart")
    assert spec.storage_url == f"sqlite:///{tmp_path / 'runs' / 'quickstart' / 'study.db'}"
    # the loaded spec round-trips through plain data (how workers receive it); source stays out
    again = StudySpec.model_validate(spec.model_dump())
    assert again == spec.model_copy(update={"source": None})


MINIMAL = """\
name: minimal
model: {preset: llama-3.2-1b}
engines: [sim]
workload:
  scenarios: [{kind: offline}]
objectives:
  - metric: output_tokens_per_s
"""


def test_minimal_study_gets_defaults():
    spec = parse_study(MINIMAL, "m.yaml")
    assert spec.hardware.gpus == 1 and spec.hardware.gpu == "h100" and spec.hardware.max_gpus_per_trial is None
    assert spec.search == {}
    assert spec.workload.dataset.kind == "random" and spec.workload.dataset.num_requests == 200
    assert spec.objectives[0].direction == "maximize" and spec.objectives[0].scenario is None
    assert spec.sampler.kind == "tpe" and spec.budget.trials == 20 and spec.budget.parallel == 1
    assert spec.run_dir == Path("runs/minimal")
    assert spec.storage_url.startswith("sqlite:///") and spec.storage_url.endswith("runs/minimal/study.db")


def test_keep_up_check_reaches_the_scenario_settings():
    server = MINIMAL.replace("[{kind: offline}]", "[{kind: server, qps: 4}, {kind: server, name: lenient, qps: 4, "
                                                  "min_keep_up: null}]")
    plans = scenario_plans(parse_study(server, "m.yaml"))
    assert [p.settings["min_keep_up"] for p in plans] == [0.7, None]
    assert ScenarioSettings(**plans[1].settings).min_keep_up is None


def test_empty_sections_mean_defaults():
    spec = parse_study(MINIMAL + "search:\n  # tensor_parallel: [1, 2]\nbudget:\n", "m.yaml")
    assert spec.search == {} and spec.budget.trials == 20


FULL = """\
# everything a real-engine study uses, all valid
name: llama8b.fp8_v2
model:
  path: ckpt/llama                # relative to this file
  name: llama
engines:
  - name: sim
    version: 1
    env:
      HF_TOKEN: ${HF_TOKEN}
      TOKENIZERS_PARALLELISM: "false"
      CUDA_LAUNCH_BLOCKING: 0
      SSL_KEY_FILE: /etc/ssl/key.pem
hardware: {gpu: h200, gpus: 4, max_gpus_per_trial: 2}
search:
  tensor_parallel: [1, 2]
  pipeline_parallel: 1
  max_concurrency: {low: 8, high: 512, log: true}
  memory_fraction: {low: 0.7, high: 0.95, step: 0.05}
  chunked_prefill: [true, false]
  quantization: [none, fp8]
  speculative_method: [none, ngram]
  speculative_tokens: {low: 1, high: 6}
workload:
  dataset: {kind: sharegpt, path: data/sharegpt.json, input_range: 0.5}
  scenarios:
    - &srv {kind: server, qps: 6, duration_s: 30, sla: {preset: llama3.1-8b, ttft_p99_ms: 1500}}
    - <<: *srv
      kind: interactive
      name: chat
      sla: {preset: llama3.1-8b-interactive}
    - {kind: offline, num_requests: 100}
objectives:
  - {metric: goodput_request_per_s, scenario: chat}
  - {metric: e2e_mean_ms, scenario: server}
  - {metric: usd_per_million_tokens, scenario: offline, direction: minimize}
sampler: {kind: grid}
budget: {trials: 30, parallel: 2, wall_time_s: 3600, max_failures: 5}
storage: sqlite:///tmp/x.db
output_dir: out/here
cost_per_gpu_hour: 2.5
"""


def _full_study(tmp_path: Path) -> Path:
    (tmp_path / "ckpt" / "llama").mkdir(parents=True)
    (tmp_path / "ckpt" / "llama" / "config.json").write_text("{}")
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "sharegpt.json").write_text("[]")
    study = tmp_path / "study.yaml"
    study.write_text(FULL)
    return study


def test_full_study_loads(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    study = _full_study(tmp_path)
    monkeypatch.chdir(ROOT)  # relative paths resolve from the study file, not from here
    spec = load_study(study)
    assert spec.model.path is not None and spec.workload.dataset.path is not None
    assert spec.resolve_path(spec.model.path) == str(tmp_path / "ckpt" / "llama")
    assert spec.resolve_path(spec.workload.dataset.path) == str(tmp_path / "data" / "sharegpt.json")
    assert spec.resolve_path("/abs/x") == "/abs/x"
    env = spec.engines[0].env
    assert env == {"HF_TOKEN": "${HF_TOKEN}", "TOKENIZERS_PARALLELISM": "false", "CUDA_LAUNCH_BLOCKING": "0",
                   "SSL_KEY_FILE": "/etc/ssl/key.pem"}
    assert spec.engines[0].version == "1"
    server, chat, offline = spec.workload.scenarios
    assert server.sla is not None and chat.sla is not None
    assert server.sla.limits() == (1500.0, 100.0)  # explicit limit over the preset's
    assert chat.label == "chat" and chat.qps == 6 and chat.duration_s == 30  # merged from the anchor
    assert chat.sla.limits() == SLA_PRESETS["llama3.1-8b-interactive"]
    assert offline.label == "offline"
    assert [o.direction for o in spec.objectives] == ["maximize", "minimize", "minimize"]
    assert spec.run_dir == Path("out/here") and spec.storage_url == "sqlite:///tmp/x.db"


def test_file_checks_only_when_loading_a_file(tmp_path: Path):
    study = _full_study(tmp_path)
    spec = load_study(study)
    # a worker validating plain data (elsewhere, paths not there) does not touch the file system
    data = spec.model_dump()
    data["model"]["path"] = "/nowhere/at/all"
    assert StudySpec.model_validate(data).model.path == "/nowhere/at/all"
    # text parsed without a file name resolves relative paths from the working directory
    lines = _errors("<stdin>", FULL)
    assert lines[0].startswith("<stdin>:4: model.path: no such directory 'ckpt/llama'")


def test_model_path_that_is_a_file(tmp_path: Path):
    (tmp_path / "weights.bin").write_text("x")
    text = MINIMAL.replace("{preset: llama-3.2-1b}", "{path: weights.bin}")
    (line,) = _errors(tmp_path / "s.yaml", text)
    assert "s.yaml:2: model.path: 'weights.bin' is a file" in line


def test_empty_dataset_file(tmp_path: Path):
    (tmp_path / "d.json").write_text("")
    text = MINIMAL.replace("workload:\n", "workload:\n  dataset: {kind: sharegpt, path: d.json}\n")
    (line,) = _errors(tmp_path / "s.yaml", text)
    assert "workload.dataset.path: 'd.json' is empty" in line


def test_partial_gpu_overshoot_is_allowed():
    # some tensor_parallel values too large for the hardware: the space prunes them, not an error
    text = MINIMAL + "hardware: {gpus: 2}\nsearch: {tensor_parallel: [1, 2, 4]}\n"
    assert parse_study(text, "m.yaml").search["tensor_parallel"] == [1, 2, 4]


def test_requires_parent_all_off():
    text = MINIMAL + "search:\n  speculative_method: [none]\n  speculative_tokens: [2, 4]\n"
    (line,) = _errors("m.yaml", text)
    assert "m.yaml:10: search.speculative_tokens:" in line and "every value of search.speculative_method is off" in line


@pytest.mark.parametrize("path", sorted((ROOT / "search_spaces" / "examples").glob("gpu-*.yaml")),
                         ids=lambda p: p.stem)
def test_gpu_example_studies_are_valid_but_for_the_checkpoint_the_host_makes(path):
    """The GPU studies name /tmp/models/<preset> with random weights, which host_setup.sh makes (here the preset
    stands in), or a real checkpoint a converter (benchmarks/gpu/gguf_to_hf.py for the real SmolLM2) makes there
    (here its config.json in tests/fixtures/models)."""
    text = re.sub(r"path: /tmp/models/([\w.-]+), name: (\w+), load_format: dummy", r"preset: \1, name: \2",
                  path.read_text())
    fixtures = ROOT / "tests" / "fixtures" / "models"
    text = re.sub(r"path: /tmp/models/([\w.-]+)(?=[,}])", lambda m: f"path: {fixtures / m.group(1)}", text)
    assert "preset:" in text or str(fixtures) in text, "the GPU study should load a checkpoint made on the host"
    spec = parse_study(text, str(path))
    assert (spec.model.preset or spec.model.path) and spec.budget.trials >= 1


def test_the_sharding_sim_study_is_the_x8_search_on_the_sim():
    """sharding-sim.yaml runs the 8-GPU study's search on the sim: the same space and the same 22 of 32
    sharding × quantization combinations pass the pre-launch rules (the rest never reach a GPU)."""
    sim = load_study(str(ROOT / "search_spaces" / "examples" / "sharding-sim.yaml"))
    x8 = (ROOT / "search_spaces" / "examples" / "gpu-vllm-llama70b-x8.yaml").read_text()
    gpu = parse_study(re.sub(r"path: /tmp/models/([\w.-]+), name: (\w+), load_format: dummy",
                             r"preset: \1, name: \2", x8), "x8.yaml")
    assert sim.search == gpu.search and sim.hardware.gpus == gpu.hardware.gpus == 8
    assert sim.workload.scenarios[0].max_qps.per_gpu and gpu.workload.scenarios[0].max_qps.per_gpu
    passed = {}
    for spec, engine in ((sim, "sim"), (gpu, "vllm")):
        check = StudyDriver(spec).check
        combos = itertools.product([1, 2, 4, 8], [1, 2], [1, 2], ["none", "fp8"])
        passed[engine] = {(tp, pp, dp, q) for tp, pp, dp, q in combos
                          if not check(engine, {"tensor_parallel": tp, "pipeline_parallel": pp, "data_parallel": dp,
                                                "quantization": q, "max_concurrency": 256, "max_model_len": 4096})}
    assert passed["sim"] == passed["vllm"] and len(passed["vllm"]) == 22
    assert (1, 1, 1, "none") not in passed["vllm"] and (1, 1, 1, "fp8") in passed["vllm"]


def test_interactive_preset_means_the_same_limits_in_run_and_bench():
    """One resolution of an SLA preset: `servetune run` (scenario_plans) and `servetune bench`
    (ScenarioSettings) judge an interactive scenario with `preset: llama3.1-8b` at the Interactive limits."""
    study = MINIMAL.replace("[{kind: offline}]", "[{kind: interactive, qps: 2, sla: {preset: llama3.1-8b}}]")
    plan = scenario_plans(parse_study(study, "m.yaml"))[0]
    bench = ScenarioSettings(kind="interactive", qps=2, sla="llama3.1-8b")
    expected = SLA_PRESETS["llama3.1-8b-interactive"]
    assert (plan.settings["ttft_limit_ms"], plan.settings["tpot_limit_ms"]) == expected
    assert (bench.ttft_limit_ms, bench.tpot_limit_ms) == expected


def test_a_declared_prefix_reuse_turns_the_audits_hit_rule_off():
    plain = parse_study(MINIMAL, "m.yaml").workload
    assert plain.audit_settings()["max_prefix_cache_hit_fraction"] == 0.01
    for declared in ("shared_prefix_tokens: 64", "replay: true"):
        study = MINIMAL.replace("workload:\n", f"workload:\n  dataset: {{kind: random, {declared}}}\n", 1)
        assert parse_study(study, "m.yaml").workload.audit_settings()["max_prefix_cache_hit_fraction"] is None


def test_each_scenario_may_bring_its_own_dataset():
    text = MINIMAL.replace("  scenarios: [{kind: offline}]", """\
  scenarios:
    - {kind: concurrency, name: copy, concurrency: [1, 8], duration_s: 2,
       dataset: {kind: text_tasks, tasks: [rewrite, code_edit], output_tokens: 64, temperature: 0}}
    - {kind: concurrency, name: free, concurrency: 4, duration_s: 2}""")
    spec = parse_study(text, "m.yaml")
    copy, free = scenario_plans(spec)
    assert copy.dataset == {"kind": "text_tasks", "n": 200, "tasks": ["rewrite", "code_edit"], "output_tokens": 64,
                            "seed": 0, "ignore_eos": True, "temperature": 0.0}
    assert free.dataset is None and dataset_args(spec)["kind"] == "random"


@pytest.mark.parametrize("dataset, message", [
    ("{kind: random, tasks: [rewrite]}", "tasks apply to kind: text_tasks, not random"),
    ("{kind: text_tasks, path: x.jsonl}", "a text_tasks dataset uses the text servetune ships"),
    ("{kind: text_tasks, tasks: [poems]}", "workload.dataset.tasks[0]: 'poems' is not one of: rewrite, summarize"),
    ("{kind: text_tasks, temperature: -1}", "workload.dataset.temperature"),
])
def test_text_task_datasets_are_checked(dataset, message):
    text = MINIMAL.replace("workload:\n", f"workload:\n  dataset: {dataset}\n")
    lines = _errors("m.yaml", text)
    assert any(message in line for line in lines), lines
