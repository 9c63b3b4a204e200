"""One study, several drivers: the storage is the source of truth, not any driver's run directory.

- Each told trial carries its whole record (``servetune.record``), so a driver that never saw a trial's
  files (another driver ran it, or this driver restarted on another node with an empty output_dir) knows
  its result: it takes the result instead of measuring the configuration again, and writes the record
  into its own run directory for the report.
- A configuration is *claimed* before its launch, in a table of the study's own database whose primary key
  is (study, configuration): two drivers that sample the same configuration at the same moment cannot both
  insert the row, so only one launches it; the other waits for that trial's result. A claim whose trial
  ended without a measurement (stale, lost, an internal failure) is taken over with a compare-and-set.
"""
from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any, Callable

import optuna
import sqlalchemy as sa

from servetune.optimizer.records import write_json_atomic

RECORD = "servetune.record"

_META = sa.MetaData()
CLAIMS = sa.Table(
    "servetune_config_claims", _META,
    sa.Column("study_id", sa.Integer, primary_key=True, autoincrement=False),
    sa.Column("key_hash", sa.String(64), primary_key=True),
    sa.Column("trial_id", sa.Integer, nullable=False),
)


def _hash(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


class ConfigClaims:
    def __init__(self, engine: sa.Engine, study_id: int):
        self.engine = engine
        self.study_id = study_id
        try:
            _META.create_all(engine, checkfirst=True)
        except sa.exc.SQLAlchemyError:  # another driver created it between the check and the create
            if not sa.inspect(engine).has_table(CLAIMS.name):
                raise

    def holder(self, key: str) -> int | None:
        with self.engine.connect() as c:
            return c.execute(sa.select(CLAIMS.c.trial_id).where(
                CLAIMS.c.study_id == self.study_id, CLAIMS.c.key_hash == _hash(key))).scalar()

    def claim(self, key: str, trial_id: int, void: Callable[[int], bool]) -> int | None:
        """Claim ``key`` for ``trial_id``: None when this trial holds it now, else the trial that does.
        ``void(holder)``: whether the holder ended without a result, so its claim may be taken over."""
        h = _hash(key)
        try:
            with self.engine.begin() as c:
                c.execute(CLAIMS.insert().values(study_id=self.study_id, key_hash=h, trial_id=trial_id))
            return None
        except sa.exc.IntegrityError:
            pass
        held = self.holder(key)
        if held is None:  # released between our insert and the read: try once more
            return self.claim(key, trial_id, void)
        if held == trial_id:
            return None
        if not void(held):
            return held
        with self.engine.begin() as c:  # compare-and-set: only one of several drivers takes it over
            won = c.execute(CLAIMS.update().where(
                CLAIMS.c.study_id == self.study_id, CLAIMS.c.key_hash == h, CLAIMS.c.trial_id == held
            ).values(trial_id=trial_id)).rowcount == 1
        return None if won else (self.holder(key) or held)


def restore_records(study: optuna.Study, trial_dir: Callable[[int], Path]) -> int:
    """Write the stored record of every finished trial whose ``trial.json`` this run directory lacks."""
    n = 0
    for t in study.get_trials(deepcopy=False):
        rec = t.user_attrs.get(RECORD)
        if not t.state.is_finished() or not isinstance(rec, dict):
            continue
        path = trial_dir(t.number) / "trial.json"
        if path.exists():
            continue
        write_json_atomic(path, {**rec, "number": t.number})
        n += 1
    return n


def stored_record(ft: optuna.trial.FrozenTrial) -> dict[str, Any] | None:
    rec = ft.user_attrs.get(RECORD)
    return rec if isinstance(rec, dict) else None
