"""The driver's start-up notes say only what is true of the study at hand."""
from __future__ import annotations

from servetune.optimizer.driver import StudyDriver, unchecked_numerics
from servetune.optimizer.spec import load_study
from study_fixtures import write_study

_VARIED = """
  max_concurrency: [8, 32]
  quantization: [none, fp8]
"""


def _spec(tmp_path, **kw):
    return load_study(write_study(tmp_path, duration_s=1, qps=2, parallel=1, gpus=1, **kw))


def _lossy(tmp_path, **kw) -> list[str]:
    spec = _spec(tmp_path, **kw)
    return unchecked_numerics(spec, StudyDriver(spec).space)


def test_a_one_trial_study_has_no_numerics_note(tmp_path):
    # one trial (the baseline) compares nothing: no output is changed by a search that never moves
    assert _lossy(tmp_path, trials=1, search=_VARIED) == []


def test_a_numerics_parameter_fixed_to_one_value_has_no_numerics_note(tmp_path):
    assert _lossy(tmp_path, trials=2, search="""
      max_concurrency: [8, 32]
      quantization: [fp8]
    """, extra="baseline: false\n") == []


def test_a_search_that_varies_numerics_over_several_trials_has_the_note(tmp_path) -> None:
    checked = tmp_path / "checked"
    checked.mkdir()  # a study that checks outputs needs no warning
    assert _lossy(checked, trials=2, search=_VARIED, extra="quality:\n  tasks: builtin:facts\n") == []
    notes: list[str] = []
    spec = _spec(tmp_path, trials=2, search=_VARIED, extra="baseline: false\n")
    StudyDriver(spec, on_event=lambda kind, data: notes.append(data["text"]) if kind == "note" else None).run()
    notes = [n for n in notes if "numerics" in n]  # what a real run prints
    assert len(notes) == 1 and "quantization" in notes[0] and "max_concurrency" not in notes[0]
