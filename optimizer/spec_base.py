"""What every part of the study schema shares: the strict base model and the sane ranges of its numbers."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated

from pydantic import BaseModel, ConfigDict, Field, ValidationInfo

# Sane ranges for the numbers a study gives: a value outside one would fail a launch, never end or exhaust
# memory (`qps: .inf`, `num_requests: 1000000000000`). Every number is also finite and of its own type
# (`trials: true` is not 1).
MAX_QPS = 100_000  # requests per second, far beyond one server
MAX_CONCURRENCY = 100_000
MAX_TOKENS = 1_048_576  # tokens per prompt or output (a 1M-token context)
MAX_REQUESTS = 1_000_000
MAX_SECONDS = 86_400  # one day for a scenario, a level, a server start
MAX_WALL_S = 30 * 86_400
MAX_GPUS = 1024
MAX_SEED = 2**32 - 1  # Optuna's and numpy's seeds are 32-bit
MAX_PARAM_INT = 2**31 - 1  # engines read integer flags as 32-bit
MAX_NAME = 100  # the study name names a directory and the Optuna study
MAX_TRIALS = 100_000
Rate = Annotated[float, Field(gt=0, le=MAX_QPS)]
Level = Annotated[int, Field(ge=1, le=MAX_CONCURRENCY)]


def resolve_from(base_dir: str, p: str) -> Path:
    q = Path(os.path.expanduser(p))
    return q if q.is_absolute() else Path(base_dir) / q


def base_dir_of(info: ValidationInfo) -> str | None:
    ctx = info.context if info is not None else None
    return ctx.get("base_dir") if isinstance(ctx, dict) else None


class StrictModel(BaseModel):
    # strict: a number is a number (not true, not the text '5'); allow_inf_nan: .nan and .inf are no numbers
    model_config = ConfigDict(extra="forbid", validate_default=True, strict=True, allow_inf_nan=False)
