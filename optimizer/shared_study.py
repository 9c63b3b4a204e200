"""One study, several drivers: the storage is the source of truth, not any driver's run directory.

- Each told trial carries its whole record (``servetune.record``), so a driver that never saw a trial's
  files (another driver ran it, or this driver restarted on another node with an empty output_dir) knows
  its result: it takes the result instead of measuring the configuration again, and writes the record
  into its own run directory for the report.
- A configuration is *claimed* before its launch, in a table of the study's own database whose primary key
  is (study name, configuration) and that names the claiming trial by number: two drivers that sample the
  same configuration at the same moment cannot both insert the row, so only one launches it; the other waits
  for that trial's result. A claim whose trial
  ended without a measurement (stale, lost, an internal failure) is taken over with a compare-and-set.
"""
from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any, Callable

import optuna
import sqlalchemy as sa

from servetune.optimizer import run_dir
from servetune.optimizer.study_store import RECORD

_META = sa.MetaData()
# Keyed by the study's name and the trial's number, what Optuna's public API names them by (the table before it,
# servetune_config_claims, held storage ids; a study resumed across the change claims its configurations anew).
CLAIMS = sa.Table(
    "servetune_claims", _META,
    sa.Column("study", sa.String(512), primary_key=True),
    sa.Column("key_hash", sa.String(64), primary_key=True),
    sa.Column("trial", sa.Integer, nullable=False),
)


def _hash(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


class ConfigClaims:
    def __init__(self, engine: sa.Engine, study: str):
        self.engine = engine
        self.study = study
        try:
            _META.create_all(engine, checkfirst=True)
        except sa.exc.SQLAlchemyError:  # another driver created it between the check and the create
            if not sa.inspect(engine).has_table(CLAIMS.name):
                raise

    def holder(self, key: str) -> int | None:
        with self.engine.connect() as c:
            return c.execute(sa.select(CLAIMS.c.trial).where(
                CLAIMS.c.study == self.study, CLAIMS.c.key_hash == _hash(key))).scalar()

    def claim(self, key: str, trial: int, void: Callable[[int], bool]) -> int | None:
        """Claim ``key`` for trial number ``trial``: None when this trial holds it now, else the trial that does.
        ``void(holder)``: whether the holder ended without a result, so its claim may be taken over."""
        h = _hash(key)
        try:
            with self.engine.begin() as c:
                c.execute(CLAIMS.insert().values(study=self.study, key_hash=h, trial=trial))
            return None
        except sa.exc.IntegrityError:
            pass
        held = self.holder(key)
        if held is None:  # released between our insert and the read: try once more
            return self.claim(key, trial, void)
        if held == trial:
            return None
        if not void(held):
            return held
        with self.engine.begin() as c:  # compare-and-set: only one of several drivers takes it over
            won = c.execute(CLAIMS.update().where(
                CLAIMS.c.study == self.study, CLAIMS.c.key_hash == h, CLAIMS.c.trial == held
            ).values(trial=trial)).rowcount == 1
        return None if won else (self.holder(key) or held)


def restore_records(study: optuna.Study, trial_dir: Callable[[int], Path]) -> int:
    """Write the stored record of every finished trial whose ``trial.json`` this run directory lacks."""
    n = 0
    for t in study.get_trials(deepcopy=False):
        rec = t.user_attrs.get(RECORD)
        if not t.state.is_finished() or not isinstance(rec, dict):
            continue
        tdir = trial_dir(t.number)
        if run_dir.has_record(tdir):
            continue
        run_dir.write_record(tdir, {**rec, "number": t.number})
        n += 1
    return n


def stored_record(ft: optuna.trial.FrozenTrial) -> dict[str, Any] | None:
    rec = ft.user_attrs.get(RECORD)
    return rec if isinstance(rec, dict) else None
