"""One registry of scenario kinds, and one resolution of SLA limits that every reader shares."""
from __future__ import annotations

import math
import typing

import pytest

from servetune.loadgen.scenario_kinds import OPEN_LOOP, SCENARIOS, ScenarioKind, level_key
from servetune.loadgen.scenarios import ScenarioSettings
from servetune.loadgen.sla import SLA_PRESETS, limit_excess, resolve_limits, within_limits
from servetune.optimizer import fidelity, lifecycle
from servetune.optimizer.cli import bench as bench_cli
from servetune.optimizer.driver import scenario_plans
from servetune.optimizer.spec import ScenarioSpec, parse_study
from servetune.reports.model import _preset_limits

STUDY = """\
name: kinds
model: {preset: llama-3.2-1b}
engines: [sim]
workload:
  scenarios:
    - {kind: offline, sla: {preset: llama3.1-8b}}
    - {kind: server, qps: 2, sla: {preset: llama3.1-8b}}
    - {kind: interactive, qps: 2, sla: {preset: llama3.1-8b}}
    - {kind: single_stream, sla: {preset: llama3.1-8b, tpot_p99_ms: 20}}
    - {kind: concurrency, concurrency: 4, sla: {preset: llama3.1-8b}}
objectives:
  - metric: output_tokens_per_s
"""


def test_every_reader_of_kinds_asks_the_registry():
    assert SCENARIOS == ScenarioKind.names() == ("offline", "server", "interactive", "single_stream", "concurrency")
    assert OPEN_LOOP == ("server", "interactive")
    assert set(typing.get_args(ScenarioSpec.model_fields["kind"].annotation)) == set(SCENARIOS)
    assert bench_cli.SCENARIOS == SCENARIOS
    assert {ScenarioKind.get(n).rate_key for n in SCENARIOS} == {None, "qps", "concurrency"}
    with pytest.raises(ValueError, match="unknown scenario kind 'burst'; known: offline"):
        ScenarioKind.get("burst")
    with pytest.raises(ValueError, match="registered twice"):
        ScenarioKind.register(ScenarioKind("server", "arrivals", 0.99))


def test_one_sla_resolution_for_spec_run_bench_and_reports():
    """preset x scenario -> limits: the study spec, `servetune run` (scenario_plans), `servetune bench`
    (ScenarioSettings) and the reports agree for every kind; interactive takes the Interactive limits."""
    spec = parse_study(STUDY, "kinds.yaml")
    plans = {p.label: p.settings for p in scenario_plans(spec)}
    for sc in spec.workload.scenarios:
        sla = sc.sla.model_dump()
        expected = resolve_limits(sla["preset"], sc.kind, sla["ttft_p99_ms"], sla["tpot_p99_ms"])
        kw = {"qps": 2} if sc.kind in OPEN_LOOP else {"concurrency": 4} if sc.kind == "concurrency" else {}
        bench = ScenarioSettings(kind=sc.kind, sla="llama3.1-8b", tpot_limit_ms=sla["tpot_p99_ms"], **kw)
        assert sc.sla.limits(sc.kind) == expected, sc.kind
        assert (plans[sc.label]["ttft_limit_ms"], plans[sc.label]["tpot_limit_ms"]) == expected, sc.kind
        assert (bench.ttft_limit_ms, bench.tpot_limit_ms) == expected, sc.kind
        assert _preset_limits(sla["preset"], sc.kind, sla["ttft_p99_ms"], sla["tpot_p99_ms"]) == expected
    assert plans["interactive"]["ttft_limit_ms"] == SLA_PRESETS["llama3.1-8b-interactive"][0] == 500.0
    assert plans["interactive"]["tpot_limit_ms"] == 30.0
    assert (plans["server"]["ttft_limit_ms"], plans["server"]["tpot_limit_ms"]) == (2000.0, 100.0)
    assert plans["single_stream"]["tpot_limit_ms"] == 20  # an explicit limit wins over the preset's


@pytest.mark.parametrize("summary, met", [
    ({"ttft_p99_ms": 400.0, "tpot_p99_ms": 30.0}, True),  # on the limit is within it
    ({"ttft_p99_ms": 501.0, "tpot_p99_ms": 10.0}, False),
    ({"ttft_p99_ms": 100.0}, False),  # not measured is not met
    ({"ttft_p99_ms": 100.0, "tpot_p99_ms": math.nan}, False),
])
def test_one_sla_check_for_run_estimate_and_the_optimizer(summary, met):
    settings = {"ttft_limit_ms": 500.0, "tpot_limit_ms": 30.0}
    assert within_limits(summary, settings) is met
    assert lifecycle.sla_met(summary, settings) is met
    assert all(c <= 0 for c in limit_excess(summary, settings).values()) is met
    assert fidelity.within_limits is within_limits
    assert within_limits(summary, {}) and limit_excess(summary, {}) == {}  # no limits: nothing to miss


def test_level_key_names_the_setting_a_level_is_read_from():
    assert [level_key(k) for k in ("offline", "server", "interactive", "single_stream", "concurrency")] == \
        ["qps", "qps", "qps", "qps", "concurrency"]
    assert level_key("a-kind-from-another-version") == "qps" and level_key(None) == "qps"
