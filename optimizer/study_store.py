"""The study in Optuna's storage, through Optuna's public API only: one small class, :class:`StudyStore`.

Optuna's storage is the source of truth for what has run. A driver left trials RUNNING when it died; they are
found by Optuna's heartbeat (``RDBStorage(heartbeat_interval, grace_period)`` and
``optuna.storages.fail_stale_trials``) when the storage is shared, and are simply every RUNNING trial when the
driver holds the study's own SQLite file under its lock. Either way they are failed as *stale*: failed without a
result, not counted against the budget (``STALE``).

Optuna's ``Trial`` and ``FrozenTrial`` name a trial by its number; its storage id stays inside the storage. The
store's storage subclass, through the storage's public methods, remembers the id of each trial this driver
starts (for heartbeats) and records it on the trial (``STORAGE_ID``), so a restarted driver can tell the result
a dead driver measured to the very trial that measured it (a trial started by a servetune older than this
record is measured again instead).
"""
from __future__ import annotations

import warnings
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any, Literal

import optuna
from optuna.trial import FrozenTrial, TrialState

from servetune.optimizer.storage_url import expand

# user attributes of a trial: what servetune keeps in the storage beside Optuna's own
BASELINE = "servetune.baseline"
PARAMS = "servetune.params"
ENGINE = "servetune.engine"
STATE = "servetune.state"
FAILURE = "servetune.failure"
KEY = "servetune.key"
STALE = "servetune.stale"
CONSTRAINTS = "servetune.constraints"
OBJECTIVES = "servetune.objectives"
PESSIMISTIC = "servetune.pessimistic"  # a failure told as an infeasible result (values are not measurements)
ESTIMATE = "servetune.estimate"
RECORD = "servetune.record"  # the whole trial record (optimizer.shared_study)
STORAGE_ID = "servetune.storage_id"

HEARTBEAT_S = 30
GRACE_S = 120


class _Storage(optuna.storages.RDBStorage):
    """Optuna's RDB storage that notes the trials this process starts and, while
    :meth:`StudyStore.failing_stale` is on, marks each trial stale before it is failed.

    A trial is noted at the first user attribute written to it while it runs (the driver names each asked trial's
    engine and parameters at once), or when ``ask`` pops it from the queue: the public calls Optuna's own caching
    storage passes on to this one."""

    def __init__(self, url: str):
        with warnings.catch_warnings():
            # Optuna marks heartbeat_interval experimental (since 2.9); the heartbeat is how a driver on shared
            # storage finds a dead driver's trials, so the warning would only repeat on every run
            warnings.filterwarnings("ignore", message=r"Argument ``heartbeat_interval`` is an experimental feature",
                                    category=optuna.exceptions.ExperimentalWarning)
            super().__init__(url, heartbeat_interval=HEARTBEAT_S, grace_period=GRACE_S)
        self.started: dict[int, int] = {}  # trial number -> storage id
        self._seen: set[int] = set()
        self.marking_stale = False
        self.staled: list[int] = []  # trials this process failed as stale, by number

    def set_trial_user_attr(self, trial_id: int, key: str, value: Any) -> None:
        super().set_trial_user_attr(trial_id, key, value)
        if trial_id not in self._seen:
            self._note_started(trial_id)

    def set_trial_state_values(self, trial_id: int, state: TrialState, values: Sequence[float] | None = None) -> bool:
        if state == TrialState.FAIL and self.marking_stale:
            try:
                super().set_trial_user_attr(trial_id, STALE, True)
            except optuna.exceptions.UpdateFinishedTrialError:
                return False  # another driver got there first
        ok = super().set_trial_state_values(trial_id, state, values)
        if ok and state == TrialState.RUNNING:
            self._note_started(trial_id)
        elif ok and state == TrialState.FAIL and self.marking_stale:
            self.staled.append(self.get_trial(trial_id).number)
        return ok

    def _note_started(self, tid: int) -> None:
        self._seen.add(tid)
        ft = self.get_trial(tid)
        if ft.state != TrialState.RUNNING:
            return
        self.started[ft.number] = tid
        if ft.user_attrs.get(STORAGE_ID) != tid:
            super().set_trial_user_attr(tid, STORAGE_ID, tid)


class StudyStore:
    """One study: open or create it, beat for the trials in flight, find and fail stale trials."""

    def __init__(self, url: str, name: str, directions: Sequence[Literal["maximize", "minimize"]],
                 sampler: optuna.samplers.BaseSampler):
        optuna.logging.set_verbosity(optuna.logging.WARNING)
        # ask/tell has no optimize() loop to record heartbeats: beat() does it for the trials in flight
        warnings.filterwarnings("ignore", message="Heartbeat of storage is supposed to be used")
        self.storage = _Storage(expand(url))
        self.study = optuna.create_study(study_name=name, storage=self.storage, sampler=sampler,
                                         directions=directions, load_if_exists=True)

    @property
    def engine(self) -> Any:
        """The storage's SQLAlchemy engine (servetune's own tables live in the same database)."""
        return self.storage.engine

    def trials(self, *states: TrialState) -> list[FrozenTrial]:
        return self.study.get_trials(deepcopy=False, states=states or None)

    def frozen(self, number: int) -> FrozenTrial | None:
        return next((t for t in self.trials() if t.number == number), None)

    def handle(self, ft: FrozenTrial) -> optuna.Trial | None:
        """A live trial for a stored RUNNING one (a dead driver's): None when it predates STORAGE_ID."""
        tid = ft.user_attrs.get(STORAGE_ID)
        return optuna.Trial(self.study, int(tid)) if isinstance(tid, int) else None

    def beat(self, trials: Iterable[optuna.Trial]) -> None:
        for t in trials:
            tid = self.storage.started.get(t.number)
            if tid is not None:
                self.storage.record_heartbeat(tid)

    @contextmanager
    def failing_stale(self) -> Iterator[None]:
        self.storage.marking_stale = True
        try:
            yield
        finally:
            self.storage.marking_stale = False

    def fail_stale(self) -> list[int]:
        """Trials whose driver stopped beating, failed as stale by this call (not those another driver got)."""
        self.storage.staled.clear()
        with self.failing_stale(), warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            optuna.storages.fail_stale_trials(self.study)
        return sorted(self.storage.staled)

    def drop(self, trial: optuna.Trial | int) -> None:
        """Fail a trial as stale: it is not counted against the budget."""
        with self.failing_stale():
            self.study.tell(trial, state=TrialState.FAIL, skip_if_finished=True)

    def void(self, number: int) -> bool:
        """Whether a trial ended without a result for its configuration (stale, lost, an internal failure)."""
        ft = self.frozen(number)
        if ft is None:  # a claim left by a study of the same name that is gone
            return True
        if not ft.state.is_finished():
            return False
        if ft.user_attrs.get(STALE):
            return True
        return ft.state == TrialState.FAIL and (ft.user_attrs.get(FAILURE) or {}).get("kind") in (None, "internal")

    def counted(self) -> int:
        """Trials of the budget started so far by every driver (not stale, not rejected, not just queued)."""
        return sum(1 for t in self.trials() if t.state != TrialState.WAITING and not t.user_attrs.get(STALE)
                   and t.user_attrs.get(STATE) != "rejected")

    def has_waiting(self) -> bool:
        return bool(self.trials(TrialState.WAITING))
