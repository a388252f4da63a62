"""docs/recipe.md is generated from the schema and must be current: every key, its type and default, every answer
type's metrics with a meaning, the presets' values and the path rules (issue 13 item 6)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml

from pipeline import recipe_reference, tasks
from pipeline.recipe import Recipe

DOC = Path(__file__).resolve().parents[1] / "docs" / "recipe.md"


@pytest.fixture(scope="module")
def rendered() -> str:
    return recipe_reference.render()


def _section(text: str, heading: str) -> str:
    """The body of one `## heading` of the document, up to the next `## `."""
    match = re.search(rf"^## {re.escape(heading)}\n(.*?)(?=^## |\Z)", text, flags=re.M | re.S)
    assert match, f"no '## {heading}' in docs/recipe.md"
    return match.group(1)


def test_committed_reference_is_current(rendered: str) -> None:
    committed = DOC.read_text(encoding="utf-8")
    stale = f"docs/recipe.md is out of date with the recipe schema: run `{recipe_reference.REGENERATE}`"
    assert committed == rendered, stale


def test_every_key_of_every_section_has_a_described_row(rendered: str) -> None:
    sections = dict(recipe_reference._sections())
    assert set(sections) >= {"task", "model", "lora", "training", "eval", "baseline", "judge", "export"}
    for heading, model in [("Top level", Recipe), *sections.items()]:
        body = _section(rendered, heading)
        for name, field in model.model_fields.items():
            cell = r"((?:[^|]|\\\|)+)"  # a table cell; a literal | inside one is written \|
            row = re.search(rf"^\| `{name}` \| {cell} \| {cell} \| (.+) \|$", body, flags=re.M)
            assert row, f"{heading}: key {name!r} has no row"
            kind, default, description = (part.strip() for part in row.groups())
            assert kind and default, (heading, name)
            assert len(description) > 10, f"{heading}.{name}: the schema gives it no description"
            assert field.description or heading == "Top level", f"{heading}.{name}: no description in the schema"
    top = _section(rendered, "Top level")
    assert re.search(r"^\| `extends` \| path \|.*[Rr]elative to this recipe file", top, flags=re.M)


def test_defaults_and_limits_come_from_the_schema(rendered: str) -> None:
    lora_model = recipe_reference._section_model(Recipe.model_fields["lora"])
    assert lora_model is not None
    rank = lora_model.model_fields["r"]
    row = re.search(r"^\| `r` \| int \(([^)]*)\) \| (\S+) \|", _section(rendered, "lora"), flags=re.M)
    assert row, "lora.r has no row with its limits"
    assert row.group(2) == str(rank.default)
    assert row.group(1) == recipe_reference._constraints(rank) and "> 0" in row.group(1)
    assert "| `name` | str | **required** |" in _section(rendered, "Top level")


def test_every_metric_of_every_answer_type_is_explained(rendered: str) -> None:
    answers = _section(rendered, "Answer types")
    for answer, metrics in tasks.ANSWER_METRICS.items():
        assert f"### answer: {answer}" in answers
        for metric in metrics:
            meaning = recipe_reference.METRIC_MEANINGS[answer][metric]
            assert meaning and f"| `{metric}` |" in answers, (answer, metric)
        assert set(recipe_reference.METRIC_MEANINGS[answer]) == set(metrics), f"stale meanings for {answer}"
        for parser in tasks.ANSWER_PARSERS[answer]:
            assert f"`{parser}` (" in answers, (answer, parser)


def test_presets_are_listed_with_their_values(rendered: str) -> None:
    presets = _section(rendered, "Presets")
    blocks = re.findall(r"### preset: (\w+)\n\n```yaml\n(.*?)```", presets, flags=re.S)
    assert [name for name, _ in blocks] == list(tasks.PRESETS)
    for name, block in blocks:
        listed = yaml.safe_load(block)["task"]
        assert listed == {"preset": name, **tasks.PRESETS[name]}, name


def test_path_rules_are_stated_once(rendered: str) -> None:
    paths = _section(rendered, "Paths: what is relative to what")
    assert "relative to the recipe file" in paths and "working directory" in paths
    for key in ("model.path", "data.contract", "data.train", "data.eval"):
        assert f"`{key}`" in paths, key
    assert rendered.count("## Paths") == 1


def test_cli_writes_the_file(tmp_path: Path, rendered: str) -> None:
    out = tmp_path / "recipe.md"
    assert recipe_reference.main(["--output", str(out)]) == 0
    assert out.read_text(encoding="utf-8") == rendered
