"""Hostile study files, generated class by class: each must end in a located `FILE:LINE: key: message` error
(what `servetune validate` prints before it exits 2): no traceback, no hang, no memory blow-up.

The bulk goes through the loader in-process (`load_study`, what every command calls first); a representative
subset runs the real CLI in subprocesses under a memory and a time limit. The counts per class are printed
(`pytest -s`) and quoted in docs/reliability.md ("Hostile input").
"""
from __future__ import annotations

import os
import re
import resource
import socket
import subprocess
import sys
import textwrap
import time
from collections import Counter
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Callable

import pytest
import yaml

from servetune.optimizer.spec import SpecError, load_study, parse_study

_LINE = re.compile(r"^(?P<file>.+?):(?P<line>\d+): (?P<path>[^:]+): (?P<msg>\S.*)$")

# A study that uses every number a study can give (and validates): the numeric classes below replace each.
BASE = textwrap.dedent("""\
    name: hostile
    model: {preset: llama-3.2-1b}
    engines:
      - name: sim
        ready_timeout_s: 60
        extra_args: [--max-log-len, "100"]
        env: {SIM_NOTE: "plain"}
    hardware: {gpu: h100, gpus: 2, max_gpus_per_trial: 2, gpu_memory_gib: 80}
    search:
      max_concurrency: [8, 16]
      memory_fraction: {low: 0.5, high: 0.9, step: 0.1}
    workload:
      dataset: {kind: random, input_tokens: 128, output_tokens: 16, input_range: 0.1, output_range: 0.1,
                num_requests: 40, seed: 1}
      scenarios:
        - {kind: server, qps: 4, duration_s: 3, num_requests: 20, max_connections: 8, warmup_requests: 1,
           timeout_s: 60, min_keep_up: 0.7, sla: {ttft_p99_ms: 2000, tpot_p99_ms: 100}}
        - {kind: server, name: sweep, qps: [1, 2]}
        - {kind: interactive, name: search, sla: {preset: llama3.1-8b-interactive},
           max_qps: {lo: 1, hi: 8, tolerance: 0.1, max_levels: 4, max_level_duration_s: 30}}
        - {kind: concurrency, concurrency: [1, 4]}
    objectives:
      - {metric: output_tokens_per_s_per_gpu, scenario: server}
    sampler: {kind: tpe, seed: 3, startup_trials: 2}
    budget: {trials: 4, wall_time_s: 600, parallel: 1, max_failures: 2, repeats: 1, repeat_top: 1}
    fidelity: {prescreen: 0, max_requests: 50}
    seed: 0
    cost_per_gpu_hour: 2.5
    output_dir: runs/hostile
    """)

# Where a number goes, what to put there instead: each must be refused at that key. Every number gets one value
# of each class, the values taken in turn (every value meets several keys; a parse costs ~30 ms).
NOT_A_NUMBER = {"nan_inf": [".nan", ".inf", "-.inf", ".NaN", "+.inf", "1.0e+400", "-1.0e+400"],
                "huge_number": ["1000000000000", "1.0e+12", "1e12", "1e400", "-1000000000000",
                                "1" + "0" * 30, "9" * 5000],
                "bool_for_number": ["true", "false", "yes", "on"]}


@dataclass
class Case:
    kind: str  # the class of hostile input
    label: str
    write: Callable[[Path], Path]  # writes the case under a directory of its own; returns the study path
    line: int | None = None  # the line the error must name (None: any)
    key: str | None = None  # text the error's key path must contain (None: any)


def _text_case(kind: str, label: str, text: str | bytes, line: int | None = None, key: str | None = None) -> Case:
    def write(d: Path) -> Path:
        p = d / "study.yaml"
        if isinstance(text, bytes):
            p.write_bytes(text)
        else:
            p.write_text(text)
        return p
    return Case(kind, label, write, line, key)


def _numeric_leaves() -> list[tuple[tuple, int, int, int]]:
    """(key path, line, start, end) of every number in BASE (mapping values and list items)."""
    out = []

    def walk(node, path):
        if isinstance(node, yaml.MappingNode):
            for k, v in node.value:
                walk(v, path + (k.value,))
        elif isinstance(node, yaml.SequenceNode):
            for i, v in enumerate(node.value):
                walk(v, path + (i,))
        elif node.tag.endswith((":int", ":float")):
            out.append((path, node.start_mark.line + 1, node.start_mark.index, node.end_mark.index))

    walk(yaml.compose(BASE), ())
    return out


def _fmt(path: tuple) -> str:
    s = ""
    for part in path:
        s += f"[{part}]" if isinstance(part, int) else (f".{part}" if s else str(part))
    return s


def _alias_bomb(levels: int, refs: int = 9) -> str:
    body = "x0: &x0 [" + ", ".join(["lol"] * refs) + "]\n"
    body += "".join(f"x{i}: &x{i} [" + ", ".join([f"*x{i - 1}"] * refs) + "]\n" for i in range(1, levels + 1))
    return BASE + body


def cases() -> list[Case]:
    out: list[Case] = []
    n_lines = BASE.count("\n")
    # -- alias bombs: nested references at several depths, wide, deep through aliases, merges, self-references
    # (4 levels expand to 66,430 values: within the bound, so the error is the keys that are no study keys)
    out.append(_text_case("alias_bomb", "4 levels x 9", _alias_bomb(4), BASE.count("\n") + 1, "x0"))
    for levels in (5, 6, 9, 12):
        out.append(_text_case("alias_bomb", f"{levels} levels x 9", _alias_bomb(levels), key="(aliases)"))
    out.append(_text_case("alias_bomb", "3 levels x 60", _alias_bomb(3, 60), key="(aliases)"))
    out.append(_text_case("alias_bomb", "one anchor, 120,000 references",
                          BASE + "x: &x [a, b, c]\ny: [" + ", ".join(["*x"] * 120_000) + "]\n", key="(aliases)"))
    chain = "c0: &c0 [z]\n" + "".join(f"c{i}: &c{i} [*c{i - 1}]\n" for i in range(1, 80))
    out.append(_text_case("alias_bomb", "80 aliases nested through each other", BASE + chain, key="(aliases)"))
    merges = "m0: &m0 {" + ", ".join(f"k{j}: {j}" for j in range(9)) + "}\n"
    merges += "".join(f"m{i}: &m{i} {{" + ", ".join(f"k{j}: *m{i - 1}" for j in range(9)) + "}\n"
                      for i in range(1, 9))
    out.append(_text_case("alias_bomb", "nested mappings", BASE + merges, key="(aliases)"))
    out.append(_text_case("alias_bomb", "a list that contains itself", BASE + "loop: &l [*l]\n", key="(aliases)"))
    out.append(_text_case("alias_bomb", "a mapping that contains itself", BASE + "loop: &l {a: *l}\n",
                          key="(aliases)"))
    out.append(_text_case("alias_bomb", "a merge of itself", BASE + "loop: &l {<<: *l}\n", key="(aliases)"))
    # -- control bytes: raw in the file (the reader refuses them) and escaped in a quoted value
    for ch in ("\x00", "\x01", "\x07", "\x08", "\x0b", "\x0c", "\x1b", "\x7f", "\x80", "\x9f"):
        for where, line in (("name: hostile", 1), ("preset: llama-3.2-1b", 2), ("seed: 0", n_lines - 2)):
            text = BASE.replace(where, where[:3] + ch + where[3:], 1)
            out.append(_text_case("control_bytes", f"raw U+{ord(ch):04X} in line {line}", text.encode(), line,
                                  "(file)"))
    for esc in ("\\0", "\\x01", "\\e", "\\x7f", "\\u0000", "\\x1b[31m"):
        for where, repl, line, key in (("name: hostile", f'name: "host{esc}ile"', 1, "name"),
                                       ('SIM_NOTE: "plain"', f'SIM_NOTE: "pl{esc}ain"', 7, "engines[0].env"),
                                       ('"100"', f'"1{esc}00"', 6, "engines[0].extra_args[1]"),
                                       ("output_dir: runs/hostile", f'output_dir: "runs/{esc}"', n_lines,
                                        "output_dir")):
            out.append(_text_case("control_bytes", f"escaped {esc} in {key}", BASE.replace(where, repl, 1), line, key))
    # -- deep nesting, in flow and block style, under a key and at the top
    for depth in (65, 100, 600, 5000):
        out.append(_text_case("deep_nesting", f"{depth} brackets", BASE + "fidelity: " + "[" * depth + "]" * depth
                              + "\n", key="(nesting)"))
        out.append(_text_case("deep_nesting", f"{depth} flow mappings", BASE + "budget2: " + "{a: " * depth
                              + "1" + "}" * depth + "\n", key="(nesting)"))
    for depth in (65, 300):
        block = "".join("  " * i + f"k{i}:\n" for i in range(depth)) + "  " * depth + "v\n"
        out.append(_text_case("deep_nesting", f"{depth} block mappings", BASE + block, key="(nesting)"))
    out.append(_text_case("deep_nesting", "700 dashes", BASE + "deep:\n" + "".join(
        "  " * i + "- " + ("\n" if i < 699 else "x\n") for i in range(700)), key="(nesting)"))
    # -- numbers: each number of BASE replaced by NaN/inf, by huge values and by booleans
    for i, (path, line, start, end) in enumerate(_numeric_leaves()):
        for kind, values in NOT_A_NUMBER.items():
            v = values[i % len(values)]
            out.append(_text_case(kind, f"{_fmt(path)} = {v[:12]}", BASE[:start] + v + BASE[end:], line,
                                  _fmt(path)))
    # -- overlong names and values
    for n in (101, 300, 5000):
        out.append(_text_case("overlong", f"study name of {n}", BASE.replace("name: hostile", "name: " + "a" * n),
                              1, "name"))
    out.append(_text_case("overlong", "scenario name of 300", BASE.replace("name: sweep", "name: " + "s" * 300),
                          None, "workload.scenarios[1].name"))
    out.append(_text_case("overlong", "scenario name with a slash", BASE.replace("name: sweep", "name: a/b"),
                          None, "workload.scenarios[1].name"))
    out.append(_text_case("overlong", "output_dir part of 300", BASE.replace("runs/hostile", "runs/" + "d" * 300),
                          n_lines, "output_dir"))
    out.append(_text_case("overlong", "an extra_args word of 200,000", BASE.replace('"100"', "x" * 200_000),
                          6, "engines[0].extra_args[1]"))
    out.append(_text_case("overlong", "a 2 MB study", BASE + "# " + "x" * 2_000_000 + "\n", 1, "(file)"))
    # -- storage Optuna cannot open
    for url in ("redis://localhost:6379/0", "mongodb://u:pw@h/db", "http://example.com/db", "sqlite:", "://x",
                "sqlite+nosuchdriver:///x.db"):
        out.append(_text_case("storage", url, BASE + f"storage: '{url}'\n", n_lines + 1, "storage"))
    # -- files that are no study: devices, FIFOs, sockets, directories (the study path itself)
    for dev in ("/dev/zero", "/dev/urandom", "/dev/null", "/dev/full"):
        if os.path.exists(dev):
            out.append(Case("device_or_fifo", f"study {dev}", partial(_device, dev), 1, "(file)"))
    out.append(Case("device_or_fifo", "study is a FIFO", _fifo, 1, "(file)"))
    out.append(Case("device_or_fifo", "study is a socket", _socket_file, 1, "(file)"))
    out.append(Case("device_or_fifo", "study is a directory", lambda d: d, 1, "(file)"))
    out.append(Case("device_or_fifo", "study links to /dev/zero", _link_to_zero, 1, "(file)"))
    # -- a dataset that is no file: a FIFO (validate used to hang on it) or a device
    for target in ("fifo", "/dev/zero", "/dev/urandom"):
        out.append(Case("device_or_fifo", f"dataset {target}", partial(_dataset_at, target=target), 13,
                        "workload.dataset.path"))
    # -- a checkpoint whose config.json is hostile
    for label, cfg in (("num_hidden_layers 1e400", '"num_hidden_layers": 1e400'),
                       ("0 heads", '"num_attention_heads": 0'), ("-1 hidden", '"hidden_size": -1'),
                       ("layers true", '"num_hidden_layers": true'), ("vocab text", '"vocab_size": "many"'),
                       ("hidden 1e30", '"hidden_size": 1000000000000000000000000000000'),
                       ("kv heads NaN", '"num_key_value_heads": NaN')):
        out.append(Case("model_config", label, partial(_checkpoint, override=cfg), 2, "model.path"))
    for label, raw in (("nested 100,000 deep", "[" * 100_000 + "]" * 100_000), ("a list", "[1, 2]"),
                       ("not JSON", "{hidden_size: 1"), ("not UTF-8", b"{\"a\": \"\xff\"}"),
                       ("FIFO", None), ("20 MB", "")):
        out.append(Case("model_config", label, partial(_checkpoint_file, raw=raw, label=label), 2, "model.path"))
    return out


def _device(dev: str, d: Path) -> Path:
    return Path(dev)


def _fifo(d: Path) -> Path:
    p = d / "study.yaml"
    os.mkfifo(p)
    return p


def _socket_file(d: Path) -> Path:
    p = d / "s.yaml"
    s = socket.socket(socket.AF_UNIX)
    s.bind(str(p))
    s.close()
    return p


def _link_to_zero(d: Path) -> Path:
    p = d / "study.yaml"
    p.symlink_to("/dev/zero")
    return p


def _dataset_at(d: Path, target: str) -> Path:
    if target == "fifo":
        os.mkfifo(d / "prompts.jsonl")
        target = str(d / "prompts.jsonl")
    text = BASE.replace("dataset: {kind: random,", f"dataset: {{kind: sharegpt, path: {target},")
    text = text.replace(" input_range: 0.1, output_range: 0.1,\n", "\n")
    p = d / "study.yaml"
    p.write_text(text)
    return p


_GOOD_CONFIG = ('"hidden_size": 64, "num_attention_heads": 4, "num_hidden_layers": 2, "intermediate_size": 128, '
                '"vocab_size": 100')


def _checkpoint(d: Path, override: str) -> Path:
    key = override.split(":")[0]
    fields = [f for f in _GOOD_CONFIG.split(", ") if not f.startswith(key)] + [override]
    (d / "ckpt").mkdir()
    (d / "ckpt" / "config.json").write_text("{" + ", ".join(fields) + "}")
    return _study_on_checkpoint(d)


def _checkpoint_file(d: Path, raw: str | bytes | None, label: str) -> Path:
    (d / "ckpt").mkdir()
    cfg = d / "ckpt" / "config.json"
    if raw is None:
        os.mkfifo(cfg)
    elif label == "20 MB":
        with open(cfg, "wb") as f:
            f.write(b"{")
            f.truncate(20 * 1024 * 1024)  # sparse: its size is what is refused
    elif isinstance(raw, bytes):
        cfg.write_bytes(raw)
    else:
        cfg.write_text(raw)
    return _study_on_checkpoint(d)


def _study_on_checkpoint(d: Path) -> Path:
    p = d / "study.yaml"
    p.write_text(BASE.replace("model: {preset: llama-3.2-1b}", "model: {path: ckpt}"))
    return p


CASES = cases()


def _check(case: Case, path: Path, lines: list[str]) -> str | None:
    """Why these error lines are not a located error for this case (None: they are)."""
    if not lines:
        return "no error"
    parsed = [m for m in map(_LINE.match, lines) if m is not None]
    if len(parsed) != len(lines):
        return f"not FILE:LINE: key: message: {lines[:3]}"
    if any(m["file"] != str(path) for m in parsed):
        return f"names another file: {lines[:3]}"
    if any(w in ln for ln in lines for w in ("Traceback", "Error:", "pydantic", "Input should")):
        return f"a traceback or raw library text: {lines[:3]}"
    # the error names the key, or the mapping it belongs to (`low above high` is the range's error)
    hits = [m for m in parsed if (case.line is None or int(m["line"]) == case.line)
            and (case.key is None or case.key.startswith(m["path"]) or m["path"].startswith(case.key))]
    return None if hits else f"no error at line {case.line} / {case.key!r}: {lines[:3]}"


def test_base_study_is_valid(tmp_path):
    (tmp_path / "study.yaml").write_text(BASE)
    spec = load_study(tmp_path / "study.yaml")
    assert len(_numeric_leaves()) >= 40 and spec.budget.trials == 4


def test_every_hostile_study_ends_in_a_located_error(tmp_path, capsys):
    counts: Counter = Counter()
    located: Counter = Counter()
    problems = []
    t0 = time.monotonic()
    for i, case in enumerate(CASES):
        d = tmp_path / f"c{i}"
        d.mkdir()
        path = case.write(d)
        counts[case.kind] += 1
        try:
            load_study(path)
            why = "accepted"
        except SpecError as e:
            why = _check(case, path, e.lines)
        except Exception as e:  # noqa: BLE001 - what we count: anything but a located error
            why = f"{type(e).__name__}: {e}"[:300]
        if why:
            problems.append(f"{case.kind} / {case.label}: {why}")
        else:
            located[case.kind] += 1
    took = time.monotonic() - t0
    with capsys.disabled():
        print(f"\nhostile input: {len(CASES)} cases, {sum(located.values())} end in a located error "
              f"({took:.1f} s)")
        for kind in counts:
            print(f"  {kind:<16} {counts[kind]:>4} tried, {located[kind]:>4} located")
    assert not problems, f"{len(problems)} of {len(CASES)}:\n" + "\n".join(problems[:40])
    assert len(CASES) >= 200 and set(counts) >= {"alias_bomb", "control_bytes", "deep_nesting", "nan_inf",
                                                "huge_number", "device_or_fifo", "overlong"}


# -- the real CLI, in subprocesses under a memory and a time limit ---------------------------------------------

# (each costs ~2 s of CPU: the CLI imports pandas for its report commands; the rest of the corpus goes through the
# CLI's own main in-process, in test_reliability_files)
CLI_SUBSET = ["alias_bomb/9 levels x 9", "control_bytes/raw U+0000 in line 1", "device_or_fifo/study /dev/zero",
              "device_or_fifo/study is a FIFO", "device_or_fifo/dataset fifo"]
MEMORY_LIMIT = 1024 * 1024 * 1024  # address space: the CLI's imports take about half of it
TIME_LIMIT_S = 120  # a loaded 2-core CI machine; each takes a few seconds alone


def _limits() -> None:
    resource.setrlimit(resource.RLIMIT_AS, (MEMORY_LIMIT, MEMORY_LIMIT))


def test_servetune_validate_exits_2_within_memory_and_time_limits(tmp_path):
    """`servetune validate` on an alias bomb, a NUL byte, /dev/zero, a FIFO as the study and as its dataset:
    exit 2, located lines on stderr, no traceback, under a 1 GiB address-space limit and a time limit."""
    by_name = {f"{c.kind}/{c.label}": c for c in CASES}
    procs = []
    for i, name in enumerate(CLI_SUBSET):
        d = tmp_path / f"cli{i}"
        d.mkdir()
        path = by_name[name].write(d)
        procs.append((name, path, subprocess.Popen(
            [sys.executable, "-m", "servetune.optimizer.cli", "validate", str(path)], stdout=subprocess.PIPE,
            stderr=subprocess.PIPE, text=True, preexec_fn=_limits, cwd=d)))
    problems = []
    for name, path, proc in procs:
        try:
            out, err = proc.communicate(timeout=TIME_LIMIT_S)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.communicate()
            problems.append(f"{name}: still running after {TIME_LIMIT_S} s")
            continue
        lines = [ln for ln in err.splitlines() if ln.strip()]
        why = _check(by_name[name], path, lines)
        if proc.returncode != 2 or why or "Traceback" in out + err:
            problems.append(f"{name}: exit {proc.returncode}, {why or ''} {(out + err)[-300:]!r}")
    assert not problems, "\n".join(problems)


def test_the_alias_bomb_of_the_issue_once_grew_past_8_gb_now_it_is_refused_at_its_alias():
    """The 400-byte study of issue 19 (nested anchors, 9 references per level): refused at the alias that
    crosses the bound, in milliseconds."""
    text = _alias_bomb(9)[len(BASE):]
    assert len(text) < 700
    t0 = time.monotonic()
    with pytest.raises(SpecError) as e:
        parse_study(BASE + text, "bomb.yaml")
    assert time.monotonic() - t0 < 5
    (line,) = e.value.lines
    assert line.startswith(f"bomb.yaml:{BASE.count(chr(10)) + 6}: (aliases): the alias *x4 expands the document")
