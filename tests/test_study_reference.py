"""docs/study-file.md and search_spaces/study.schema.json come from the schema and stay current (issue 17.7)."""
from __future__ import annotations

import json
from pathlib import Path

import jsonschema
import pytest
import yaml

from servetune.optimizer import study_reference
from servetune.optimizer.spec import StudySpec

ROOT = Path(__file__).resolve().parent.parent
EXAMPLES = sorted((ROOT / "search_spaces" / "examples").glob("*.yaml"))


def test_the_committed_reference_and_schema_are_what_the_generator_writes(capsys):
    assert study_reference.main(["--check"]) == 0, capsys.readouterr().err


def test_every_key_of_the_study_file_is_documented_with_type_default_and_meaning():
    doc = (ROOT / "docs" / "study-file.md").read_text()
    for key, field, _ in study_reference.fields(StudySpec):
        name = key.rsplit(".", 1)[-1]
        # key tables have six columns; the search-parameter table's rows (a name may be a key too) four
        rows = [ln for ln in doc.splitlines() if ln.startswith(f"| `{name}` |") and ln.count("|") >= 6]
        assert rows, f"{key} is not in docs/study-file.md"
        assert all(ln.split("|")[4].strip() for ln in rows), rows  # a meaning
    for key in ("baseline", "output_dir", "storage", "fidelity", "host", "seed"):
        assert f"| `{key}` |" in doc


@pytest.fixture(scope="module")
def validator():
    schema = json.loads((ROOT / "search_spaces" / "study.schema.json").read_text())
    jsonschema.Draft202012Validator.check_schema(schema)
    return jsonschema.Draft202012Validator(schema)


def test_every_example_names_the_schema_and_validates_against_it(validator):
    for p in EXAMPLES:
        first = p.read_text().splitlines()[0]
        assert first.startswith("# yaml-language-server: $schema="), p.name
        assert (p.parent / first.split("=", 1)[1]).resolve() == ROOT / "search_spaces" / "study.schema.json"
        errors = [e.message for e in validator.iter_errors(yaml.safe_load(p.read_text()))]
        assert not errors, f"{p.name}: {errors}"


@pytest.mark.parametrize("bad, fragment", [
    ("unknown_top_key.yaml", "'budjet' was unexpected"),
    ("unknown_search_param.yaml", "was unexpected"),
    ("unknown_metric.yaml", "is not one of"),
    ("wrong_type_gpus.yaml", "is not of type 'integer'"),
    ("unknown_engine.yaml", ""),
])
def test_the_schema_refuses_what_the_loader_refuses(validator, bad, fragment):
    doc = yaml.safe_load((ROOT / "tests" / "bad_studies" / bad).read_text())
    errors = [e.message for e in validator.iter_errors(doc)] + [
        c.message for e in validator.iter_errors(doc) for c in (e.context or [])]
    assert errors and any(fragment in m for m in errors), errors
