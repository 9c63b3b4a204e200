"""servetune plan: the space, the rules' rejections, the baseline argv, the estimate, the wall time (issue 17.3)."""
from __future__ import annotations

import re
import shlex
from pathlib import Path

from servetune.optimizer import cli
from servetune.optimizer.engines.sim.cli import build_parser, config_from_args

EXAMPLES = Path(__file__).resolve().parent.parent / "search_spaces" / "examples"


def _plan(capsys, study: Path, estimates: int = 3) -> list[str]:
    assert cli.main(["plan", str(study), "--estimates", str(estimates)]) == 0
    return capsys.readouterr().out.splitlines()


def test_plan_of_the_quickstart(capsys):
    out = _plan(capsys, EXAMPLES / "quickstart.yaml")
    text = "\n".join(out)
    assert ("space: 40 configurations (tensor_parallel 2 × max_concurrency 5 × quantization 2 × kv_cache_dtype 2)"
            in text)
    assert "rules: 0 of 40 rejected before launch" in text
    # the baseline's argv is what a run launches: the sim's own parser takes it, with the engine's defaults
    (base,) = [ln for ln in out if ln.startswith("baseline (sim, 1 GPU(s)): ")]
    argv = shlex.split(base.split(": ", 1)[1])
    assert argv[1:3] == ["-m", "servetune.optimizer.engines.sim"]
    cfg = config_from_args(build_parser().parse_args(argv[3:]))
    assert (cfg.tensor_parallel, cfg.max_concurrency, cfg.quantization) == (1, 256, "none")
    # the estimator's range for each objective, the baseline inside the text
    for name in ("offline.output_tokens_per_s_per_gpu (maximize)", "server.tpot_p99_ms (minimize)"):
        (line,) = [ln for ln in out if ln.strip().startswith(name)]
        lo, hi = (float(x.replace(",", "")) for x in re.findall(r": ([\d,.]+) – ([\d,.]+)", line)[0])
        assert 0 < lo <= hi and "baseline" in line, line
    assert re.search(r"SLA met \(estimated\): \d of 3", text)
    (wall,) = [ln for ln in out if ln.startswith("wall time: about ")]
    assert "engine start" in wall and "server 15 s" in wall and "stops new trials after 4 min" in wall


def test_plan_groups_the_rules_rejections(capsys):
    out = _plan(capsys, EXAMPLES / "sharding-sim.yaml", estimates=0)
    (head,) = [ln for ln in out if ln.startswith("rules: ")]
    assert head.startswith("rules: 30 of 96 rejected before launch")
    counts = [int(m[1]) for ln in out if (m := re.match(r"\s+(\d+) × ", ln))]
    assert sum(counts) >= 30 and len(counts) >= 2  # a configuration may break several rules
    assert any("needs 16 GPUs" in ln for ln in out)
