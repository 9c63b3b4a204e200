"""Live progress of a study and of ``servetune bench``.

One way only: a trial (a Ray task, maybe on another host's file system view of the run directory) writes
``trials/NNNN/progress.json`` as it moves through its phases (launching, warm-up, level k of n at rate r); the
driver polls those files of its in-flight trials about once a second and never writes them. The display is a
rich live table on a terminal and plain lines otherwise (CI, ``tee``): a line when a trial starts and each time
its phase changes.
"""
from __future__ import annotations

import json
import os
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any, Callable

from rich.console import Group
from rich.live import Live
from rich.status import Status
from rich.table import Table
from rich.text import Text

from servetune.loadgen import progress as loadgen_progress
from servetune.loadgen.scenario_kinds import ScenarioKind, level_key
from servetune.optimizer import quality

PROGRESS_FILE = "progress.json"


# -- the trial's side ---------------------------------------------------------------------------------------------


def _drive(name: object) -> str | None:
    kind = ScenarioKind.find(name)
    return kind.drive if kind is not None else None

def _levels(sc) -> tuple[int, bool]:
    """(levels a scenario plans, whether that is only an upper bound: a sweep stops at the first SLA miss)."""
    if sc.max_qps:
        return int(sc.max_qps["max_levels"]), True
    key = level_key(sc.settings.get("kind"))
    v = sc.settings.get(key)
    return (len(v), True) if isinstance(v, list) and len(v) > 1 else (1, False)


def _planned_seconds(sc, levels: int) -> float:
    """Scheduled seconds of ``levels`` levels of a scenario plan (0 where the server's speed decides)."""
    s = dict(sc.settings)
    key = level_key(s.get("kind"))
    rates = s.get(key)
    rates = rates if isinstance(rates, list) else [rates] * max(levels, 1)
    total = 0.0
    for r in (rates[-levels:] if levels else []):
        total += loadgen_progress.level_seconds(SimpleNamespace(**{**s, key: r})) or 0.0
    return total


class TrialProgress:
    """Writes a trial's phase to ``progress.json`` in its directory (lifecycle.run_trial owns one)."""

    def __init__(self, trial_dir: str | Path, scenarios: list[Any]):
        self.path = Path(trial_dir) / PROGRESS_FILE
        self.scenarios = list(scenarios)
        self.index = -1
        self.level = 0
        self.state: dict[str, Any] = {"started": time.time(), "phase": "launching"}
        self._write()
        loadgen_progress.add(self._on_event)

    def scenario(self, sc) -> None:
        """A scenario of the plan begins."""
        self.index = next((i for i, s in enumerate(self.scenarios) if s.label == sc.label), self.index + 1)
        self.level = 0

    def close(self) -> None:
        loadgen_progress.remove(self._on_event)

    def _write(self, **update: Any) -> None:
        self.state.update(update, updated=time.time())
        tmp = self.path.with_name(f".{PROGRESS_FILE}.{os.getpid()}")
        try:  # by rename, so the driver never reads half a file; no fsync: a lost update costs nothing
            self.path.parent.mkdir(parents=True, exist_ok=True)
            tmp.write_text(json.dumps(self.state), encoding="utf-8")
            os.replace(tmp, self.path)
        except OSError:
            pass  # progress is for people: a full disk fails the trial elsewhere, not here

    def _on_event(self, event: str, data: dict[str, Any]) -> None:
        if event == "launch_warmup":
            self._write(phase="engine warm-up", round=data["round"], top=data["top"], compiles=data["compiles"],
                        why=data["why"], ends_by=data["ends_by"])
            return
        if event == "launch_warmup_done":
            self._write(phase="engine warm-up done", round=data["rounds"], seconds=data["seconds"],
                        stopped_because=data["stopped_because"])
            return
        if not 0 <= self.index < len(self.scenarios):
            return
        sc = self.scenarios[self.index]
        if event == "level_start":
            self.level += 1
            st = data["settings"]
            n, bounded = _levels(sc)
            n = max(n, self.level)
            closed = level_key(st.kind) == "concurrency"
            rate = st.concurrency if closed else st.qps
            later = _planned_seconds(sc, n - self.level) + sum(
                _planned_seconds(s, _levels(s)[0]) for s in self.scenarios[self.index + 1:])
            self._write(phase="warm-up" if st.warmup_requests else "level", scenario=sc.label, kind=st.kind,
                        level=self.level, levels=n, bounded=bounded, rate=rate,
                        unit="concurrent" if closed else "req/s", warmup=st.warmup_requests,
                        level_started=time.time(), level_s=loadgen_progress.level_seconds(st), later_s=later)
        elif event == "measuring" and self.state.get("phase") == "warm-up":
            self._write(phase="level", level_started=time.time())


def read(trial_dir: str | Path) -> dict[str, Any] | None:
    try:
        return json.loads((Path(trial_dir) / PROGRESS_FILE).read_text())
    except (OSError, ValueError):
        return None


def _clock(s: float) -> str:
    s = max(0, int(round(s)))
    return f"{s // 3600}:{s // 60 % 60:02d}:{s % 60:02d}" if s >= 3600 else f"{s // 60}:{s % 60:02d}"


def _rate(v: Any, unit: str) -> str:
    if isinstance(v, (int, float)):
        v = f"{v:.3g}"
    return f"{v} {unit}" if unit == "req/s" else f"concurrency {v}"


def describe(p: dict[str, Any], now: float | None = None) -> tuple[str, str, str]:
    """(phase, elapsed, time left) of a trial's progress record, as text."""
    now = time.time() if now is None else now
    elapsed = _clock(now - p.get("started", now))
    phase = p.get("phase", "")
    if phase == "launching":
        return "launching the engine", elapsed, ""
    if phase == "engine warm-up":
        earlier = "; ".join(f"round {i}: {n} compile lines" for i, n in enumerate(p.get("compiles") or [], 1))
        what = (f"engine warm-up round {p.get('round')} {p.get('why')} (a ramp to {p.get('top')} in flight"
                + (f"; {earlier}" if earlier else "") + ")")
        left = "≤" + _clock(max(0.0, p["ends_by"] - now)) if p.get("ends_by") else ""
        return what, elapsed, left
    if phase == "engine warm-up done":
        return (f"engine warm-up done in {_clock(p.get('seconds') or 0)}, {p.get('round')} round(s): "
                f"{p.get('stopped_because')}"), elapsed, ""
    if phase in ("warm-up", "level"):
        levels = f"{'≤' if p.get('bounded') else ''}{p.get('levels')}"
        what = (f"{p.get('scenario')}: level {p.get('level')} of {levels} at "
                f"{_rate(p.get('rate'), p.get('unit', 'req/s'))}")
        if p.get("rate") is None:  # offline, single stream: one level, paced by the server
            what = f"{p.get('scenario')}: " + ("all requests at once" if _drive(p.get("kind")) == "all_at_once" else
                                               "one request at a time")
        if phase == "warm-up":
            what = f"{p.get('scenario')}: warm-up ({p.get('warmup')} requests), then level {p.get('level')} of {levels}"
        left = ""
        if p.get("level_s"):
            rest = max(0.0, p["level_started"] + p["level_s"] - now) + (p.get("later_s") or 0.0)
            left = ("≤" if p.get("bounded") else "~") + _clock(rest)
        return what, elapsed, left
    return phase, elapsed, ""


# -- the driver's side: `servetune run` ---------------------------------------------------------------------------

class RunProgress:
    """Follows the driver's events; shows running, queued and done trials, each running trial's phase, elapsed
    time and time left, and the best result so far."""

    def __init__(self, console, spec, fmt_params: Callable[[dict], str]):
        self.console = console
        self.live_mode = console.is_terminal
        self.fmt_params = fmt_params
        self.budget = spec.budget.trials
        first = spec.objectives[0]
        self.objective = (first.scenario or spec.workload.scenarios[0].label, first.metric, first.direction)
        self.done = 0
        self.in_flight: list[Any] = []
        self.shown: dict[int, tuple[str, ...]] = {}  # trial -> last (phase, round, level, scenario) printed plain
        self.best: tuple[float, int] | None = None
        self.live: Live | None = None

    # events from StudyDriver (the CLI forwards each one here after printing its own line)
    def event(self, kind: str, data: dict[str, Any]) -> None:
        if kind == "start":
            self.done = data["done"]
            self.budget = data["budget"]
            if self.live_mode:
                # the live region re-renders this object (``__rich__``) on its own refresh thread
                self.live = Live(self, console=self.console, refresh_per_second=2, transient=True)
                self.live.start()
        elif kind == "result":
            self.done += 1
            self._best(data["result"])
            self.shown.pop(data["result"].number, None)
            if self.live is None:
                others = [plan for plan in self.in_flight if plan.number != data["result"].number]
                running = sum(1 for plan in others if read(plan.trial_dir))
                self.console.print("  " + self._header(running, len(others) - running), markup=False, highlight=False)
        elif kind == "tick":
            self.in_flight = list(data.get("in_flight", []))
            if self.live is None:
                self._plain()

    def __rich__(self):
        return self._table()

    def stop(self) -> None:
        if self.live is not None:
            self.live.stop()
            self.live = None

    def _best(self, r) -> None:
        label, metric, direction = self.objective
        if r.state != "complete":
            return
        sr = r.scenarios.get(label, {})
        if any(s.get("sla_met") is False for s in r.scenarios.values()):
            return
        if quality.failed(r.quality):  # outside the quality limits: not a config to act on
            return
        v = sr.get("summary", {}).get(metric)
        if not isinstance(v, (int, float)):
            return
        key = v if direction == "maximize" else -v
        if self.best is None or key > self.best[0]:
            self.best = (key, r.duplicate_of if r.duplicate_of is not None else r.number)

    def best_text(self) -> str:
        if self.best is None:
            return "best so far: none yet (no trial has met the SLA and the quality limits)"
        label, metric, direction = self.objective
        v = self.best[0] if direction == "maximize" else -self.best[0]
        return f"best so far: #{self.best[1]} {label}.{metric} = {v:,.4g}"

    def _rows(self):
        now = time.time()
        running, queued = [], []
        for plan in self.in_flight:
            p = read(plan.trial_dir)
            (running if p else queued).append((plan, p))
        return now, running, queued

    def _header(self, running: int, queued: int) -> str:
        return (f"trials: {running} running, {queued} queued for GPUs, {self.done} of {self.budget} done; "
                + self.best_text())

    def _table(self):
        now, running, queued = self._rows()
        t = Table(box=None, padding=(0, 1), show_header=bool(running))
        for col in ("#", "config", "phase", "elapsed", "left"):
            t.add_column(col, justify="right" if col in ("#", "elapsed", "left") else "left", no_wrap=col != "config")
        for plan, p in running:
            phase, elapsed, left = describe(p, now)
            t.add_row(str(plan.number), self.fmt_params(plan.params), phase, elapsed, left)
        return Group(Text(self._header(len(running), len(queued)), style="bold"), t)

    def _plain(self) -> None:
        now, running, queued = self._rows()
        for plan, p in running:
            phase, elapsed, left = describe(p, now)
            key = tuple(str(p.get(k)) for k in ("phase", "round", "level", "scenario"))
            if self.shown.get(plan.number) == key:
                continue
            first = plan.number not in self.shown
            self.shown[plan.number] = key
            started = " started;" if first else ""
            self.console.print(f"  #{plan.number:<3}{started} {phase}"
                               + (f" (trial at {elapsed}, ~{left.lstrip('~')} left)" if left.startswith("~") else
                                  f" (trial at {elapsed}, at most {left.lstrip('≤')} left)" if left else
                                  f" (trial at {elapsed})"), markup=False, highlight=False)


# -- `servetune bench` --------------------------------------------------------------------------------------------

class BenchProgress:
    """A line per load level (plain) or a live status line (terminal) while ``servetune bench`` measures."""

    def __init__(self, console, levels: int | None = None, bounded: bool = False):
        self.console = console
        self.levels, self.bounded = levels, bounded
        self.level = 0
        self.started = time.time()
        self.state: dict[str, Any] = {}
        self.status: Status | None = None

    def __enter__(self) -> "BenchProgress":
        loadgen_progress.add(self._on_event)
        if self.console.is_terminal:
            self.status = self.console.status(self)  # re-rendered by the spinner's thread: a live clock
            self.status.start()
        return self

    def __exit__(self, *exc) -> None:
        loadgen_progress.remove(self._on_event)
        if self.status is not None:
            self.status.stop()

    def text(self, now: float | None = None) -> str:
        now = time.time() if now is None else now
        s = self.state
        of = f" of {'≤' if self.bounded else ''}{self.levels}" if self.levels else ""
        what = (f"level {self.level}{of} at {_rate(s.get('rate'), s.get('unit', 'req/s'))}" if s.get("rate") is not None
                else f"level {self.level}{of}")
        if s.get("warm"):
            what += f", warm-up ({s['warm']} requests)"
        left = ""
        if s.get("level_s"):
            left = f", ~{_clock(max(0.0, s['t'] + s['level_s'] - now))} left in the level"
        return f"{what}: {_clock(now - s.get('t', now))} in{left}; {_clock(now - self.started)} in all"

    def _on_event(self, event: str, data: dict[str, Any]) -> None:
        if event == "level_start":
            st = data["settings"]
            self.level += 1
            closed = level_key(st.kind) == "concurrency"
            self.state = {"rate": st.concurrency if closed else st.qps,
                          "unit": "concurrent" if closed else "req/s", "t": time.time(),
                          "warm": st.warmup_requests, "level_s": loadgen_progress.level_seconds(st)}
            if self.status is None:
                planned = f" (~{self.state['level_s']:.0f} s)" if self.state["level_s"] else ""
                self.console.print("  " + self.text().split(":")[0] + f": started{planned}", markup=False,
                                   highlight=False)
        elif event == "measuring":
            self.state["warm"] = 0
            self.state["t"] = time.time()
        elif event == "level_done":
            s = data["summary"]
            line = (f"level {self.level}: {s.get('output_tokens_per_s', 0):,.0f} out tok/s, p99 TTFT "
                    f"{s.get('ttft_p99_ms', float('nan')):.0f} ms — {'valid' if data['valid'] else 'invalid'}")
            if self.status is not None:
                self.console.print("  " + line, markup=False, highlight=False)
            else:
                self.console.print("  " + line + f" ({_clock(time.time() - self.state.get('t', time.time()))})",
                                   markup=False, highlight=False)

    def __rich__(self):
        return Text(self.text() if self.state else "connecting")
