"""docs/recipe.md, generated from the recipe schema: every key, its type, default and description.

The schema (``pipeline.recipe.Recipe`` and ``pipeline.taskspec.TaskSection``) is the one source: a field's
``description`` is its documentation, a section's docstring its introduction. The presets' values, each answer
type's parsers and metrics, and the path rules come from the same modules the loader uses, so the page cannot
drift from the code; ``tests/test_recipe_reference.py`` fails when the committed page is out of date.

    python -m pipeline.recipe_reference --output docs/recipe.md     # or: make docs

Light module: pydantic, yaml and the standard library (no torch).
"""

from __future__ import annotations

import argparse
import inspect
import re
import sys
import types
import typing
from pathlib import Path
from typing import Any, Literal

import yaml
from annotated_types import Ge, Gt, Le, Lt
from pydantic import BaseModel
from pydantic.fields import FieldInfo
from pydantic_core import PydanticUndefined

from pipeline import tasks
from pipeline.recipe import RECIPE_KEYS_ALLOWED_OUTSIDE_SCHEMA, Recipe
from pipeline.taskspec import TaskSection

REGENERATE = "python -m pipeline.recipe_reference --output docs/recipe.md"

# What each metric an answer type can report means (answer type -> metric -> meaning). Every metric of
# tasks.ANSWER_METRICS has one (a test holds them together); the wording follows the scorers' docstrings in
# pipeline/scoring.py and pipeline/freeform.py.
_SET_MICRO = "over every (example, label) pair: TP = labels in both gold and answer, FP = answer only, FN = gold only"
_SET_MACRO = "averaged over every label that is gold or predicted somewhere (a label never right scores 0)"
_FREEFORM = {
    "exact_match": "answers equal to the reference after normalization (whitespace ignored; both JSON: compared as "
    "parsed values, key order ignored)",
    "token_f1": "SQuAD-style F1 of word tokens (case folded), averaged over examples; both empty counts 1",
    "rougeL_f": "ROUGE-L F1 (rouge-score, Porter stemmer), averaged over examples",
}
METRIC_MEANINGS: dict[str, dict[str, str]] = {
    "label": {
        "accuracy": "answers equal to the gold label",
        "macro_f1": "per-label F1 averaged over every label that is gold or validly predicted somewhere",
        "macro_precision": "per-label precision, averaged as macro_f1",
        "macro_recall": "per-label recall, averaged as macro_f1",
        "invalid_label_rate": "answers that name no label of the set (a miss, not a label of its own)",
    },
    "labels": {
        "micro_f1": f"F1 {_SET_MICRO}",
        "micro_precision": f"precision {_SET_MICRO}",
        "micro_recall": f"recall {_SET_MICRO}",
        "macro_f1": f"per-label F1 {_SET_MACRO}",
        "macro_precision": f"per-label precision {_SET_MACRO}",
        "macro_recall": f"per-label recall {_SET_MACRO}",
        "exact_match": "examples whose predicted set equals the gold set",
        "invalid_label_rate": "predicted labels outside the label set, over all predicted labels",
        "invalid_code_rate": "predicted labels that are not codes of the vocabulary (ICD-10-CM), over all predicted "
        "labels",
    },
    "json": {
        "field_f1": "micro F1 over (example, field) pairs with a non-null value: TP = the answer's value equals the "
        "gold one (case and spacing ignored), FP = a value that is not the gold one, FN = a gold value not given",
        "field_precision": "micro precision over fields, counted as field_f1",
        "field_recall": "micro recall over fields, counted as field_f1",
        "parse_rate": "answers that hold a JSON object",
        "exact_match": "examples whose every field matches (nulls included)",
    },
    "text": {
        **_FREEFORM,
        "rougeL_precision": "ROUGE-L precision, averaged over examples",
        "rougeL_recall": "ROUGE-L recall, averaged over examples",
        "empty_rate": "answers that are empty or whitespace",
    },
    "number": {
        "accuracy": "answers whose first number is within task.tolerance of the gold number (no number: wrong)",
        "parse_rate": "answers that hold a number",
        "mae": "mean absolute error over the answers that hold a number",
    },
    "chat": {
        **_FREEFORM,
        "json_valid_rate": "over examples whose reference is a JSON object: the whole answer (outside an optional "
        "Markdown code fence) parses as JSON",
        "json_field_precision": "over examples whose reference is a JSON object: micro precision over leaf fields "
        "(nested objects flattened to dotted paths; equal as JSON)",
        "json_field_recall": "micro recall over leaf fields, counted as json_field_precision",
        "json_field_f1": "micro F1 over leaf fields, counted as json_field_precision",
        "tool_call_accuracy": "over examples whose reference is a tool call: the same calls (names and arguments "
        "equal as JSON, order ignored); arguments that are not JSON are wrong",
        "tool_name_accuracy": "over examples whose reference is a tool call: the same function names",
    },
}

_PARSER_MEANINGS = {
    "label": "the exact label, else the first label the answer names",
    "exact": "the whole answer must be a label",
    "list": "labels separated by commas, semicolons or lines",
    "regex": "every match of parse_pattern, each once",
    "json": "the (outermost) JSON object",
    "text": "the stripped answer",
    "number": "the first number (1,250.5 reads as 1250.5)",
    "chat": "the final assistant message: its text, or its tool calls",
}

_PATH_RULES = """\
## Paths: what is relative to what

Stated once, for every key:

- **`extends:` is relative to the recipe file that says it** (`extends: quickstart.yaml` in
  `recipes/clauses.yaml` reads `recipes/quickstart.yaml`). An absolute path is used as it is; a chain may be
  any depth; a cycle is refused.
- **Every other path is relative to the working directory** you run `python -m pipeline` from, whichever
  recipe file sets it: `model.path`, `data.contract`, `data.train`, `data.eval`, `baseline.cache_dir`,
  `baseline.snapshot`, `judge.cache_dir`, and the SQLite file of the default `tracking.uri`
  (`sqlite:///mlruns.db`, artifacts in `./mlartifacts`). Runs are written to `runs/<name>/<run-id>/` there too.
  Paths inside a data contract are the contract's own business (docs/data_contracts.md).

How a recipe is put together:

- `extends:` first: the parent is read, then the child's keys are merged over it. Mappings merge key by key;
  any other value, lists included, replaces the parent's.
- Then each `--set section.key=value`, in order; the value is parsed as YAML (`8`, `true`, `[a, b]`,
  `null`), and a key that does not exist is refused like one in a file.
- The result is validated once: every problem is reported together, each with the file (or `--set`) that set
  the value and a "did you mean" for near-miss keys, exit 2.
- `MLFLOW_TRACKING_URI` in the environment wins over `tracking.uri`.
- Every run directory keeps the fully resolved recipe (defaults filled in) as `recipe.resolved.yaml`; `evaluate`
  and `export` read it from there.
"""


def _code(text: str) -> str:
    """Inline Markdown code that survives a table cell."""
    return "`" + text.replace("|", "\\|") + "`"


def _cell(text: str) -> str:
    text = re.sub(r"``([^`]+)``", r"`\1`", text)  # reST literals in docstrings -> Markdown
    return " ".join(text.replace("|", "\\|").split())


def _value(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, BaseModel):
        return "(section)"
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_value(v) for v in value) + "]"
    if isinstance(value, str):
        return repr(value) if value == "" or value.strip() != value else value
    return repr(value)


def type_text(annotation: Any) -> str:
    """``Literal['a', 'b'] | None`` -> ``'a' | 'b' | null``; sections by their key name."""
    origin = typing.get_origin(annotation)
    if origin is Literal:
        return " | ".join(repr(v) for v in typing.get_args(annotation))
    if origin in (typing.Union, types.UnionType):
        return " | ".join(type_text(arg) for arg in typing.get_args(annotation))
    if origin is list:
        (item,) = typing.get_args(annotation)
        inner = type_text(item)
        return f"list of ({inner})" if " | " in inner else f"list of {inner}"
    if annotation is type(None):
        return "null"
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return "section"
    return getattr(annotation, "__name__", str(annotation))


def _constraints(field: FieldInfo) -> str:
    marks = []
    for meta in field.metadata:
        for kind, symbol, attr in ((Gt, ">", "gt"), (Ge, ">=", "ge"), (Lt, "<", "lt"), (Le, "<=", "le")):
            if isinstance(meta, kind):
                marks.append(f"{symbol} {_value(getattr(meta, attr))}")
        pattern = getattr(meta, "pattern", None)
        if pattern:
            marks.append(f"matching {pattern}")
    return ", ".join(marks)


def _default(field: FieldInfo) -> str:
    if field.default_factory is not None:
        return _value(field.default_factory())  # type: ignore[call-arg]
    if field.default is PydanticUndefined:
        return "**required**"
    return _value(field.default)


def _section_model(field: FieldInfo) -> type[BaseModel] | None:
    for candidate in (field.annotation, *typing.get_args(field.annotation)):
        if isinstance(candidate, type) and issubclass(candidate, BaseModel):
            return candidate
    return None


def _doc(model: type[BaseModel]) -> str:
    return re.sub(r"``([^`]+)``", r"`\1`", inspect.cleandoc(model.__doc__ or ""))


def field_rows(model: type[BaseModel]) -> list[tuple[str, str, str, str]]:
    """(key, type, default, description) for each field of a section, in the schema's order."""
    rows = []
    for name, field in model.model_fields.items():
        kind = type_text(field.annotation)
        limits = _constraints(field)
        description = field.description or ""
        sub = _section_model(field)
        if sub is not None and model is Recipe:
            first = _doc(sub).split("\n\n")[0]
            description = description or first
            description += f" [Keys](#{name})."
            kind = "preset name | section" if sub is TaskSection else kind
        rows.append((name, kind + (f" ({limits})" if limits else ""), _default(field), description))
    return rows


def _table(rows: list[tuple[str, str, str, str]]) -> list[str]:
    out = ["| key | type | default | description |", "| --- | --- | --- | --- |"]
    for key, kind, default, description in rows:
        out.append(f"| {_code(key)} | {_cell(kind)} | {_cell(default)} | {_cell(description)} |")
    return out


def _sections() -> list[tuple[str, type[BaseModel]]]:
    return [(name, model) for name, field in Recipe.model_fields.items() if (model := _section_model(field))]


def _task_part() -> list[str]:
    lines = ["## Answer types", ""]
    lines += [
        "Each answer type accepts its parsers (the first is the default) and reports its metrics. `task.metrics` "
        "picks from them; the first one listed is the main metric (the margin over the base, the paired-bootstrap "
        "interval, the model card's headline) and must be one marked *main*. Unset, a declared task reports every "
        "metric of its type but the invalid-answer rates.",
        "",
    ]
    for answer in tasks.ANSWER_TYPES:
        lines.append(f"### answer: {answer}")
        lines.append("")
        parsers = tasks.ANSWER_PARSERS[answer]
        lines.append("Parsers: " + "; ".join(f"{_code(p)} ({_PARSER_MEANINGS[p]})" for p in parsers) + ".")
        lines.append("")
        system = tasks.ANSWER_DEFAULTS[answer].get("system_prompt")
        if system:
            lines.append(f"Default system prompt (no preset): {_code(system)}")
            lines.append("")
        specials = [name for name, applies in tasks.SPECIAL_PLACEHOLDERS.items() if answer in applies]
        if specials:
            named = ", ".join(_code("{" + s + "}") for s in specials)
            lines.append(f"Placeholders besides the row's fields: {named}.")
            lines.append("")
        lines += ["| metric | main | meaning |", "| --- | --- | --- |"]
        for metric in tasks.ANSWER_METRICS[answer]:
            main = "main" if metric in tasks.MAIN_METRIC_NAMES[answer] else ""
            lines.append(f"| {_code(metric)} | {main} | {_cell(METRIC_MEANINGS[answer][metric])} |")
        lines.append("")
    lines += ["## Presets", ""]
    lines.append(
        "`task: NAME` is the preset as it is; `task: {preset: NAME, system_prompt: ...}` overrides it key by key "
        "(a new `user_prompt` drops the preset's `plain_prompt`, which belongs with the preset's own user prompt). "
        "Their values:"
    )
    lines.append("")
    for name, values in tasks.PRESETS.items():
        lines += [f"### preset: {name}", "", "```yaml"]
        lines += yaml.safe_dump({"task": {"preset": name, **values}}, sort_keys=False, width=100).rstrip().splitlines()
        lines += ["```", ""]
    return lines


def render() -> str:
    """The whole of docs/recipe.md."""
    lines = [
        "# Recipe reference",
        "",
        f"<!-- Generated from the schema by `{REGENERATE}` (or `make docs`); do not edit by hand. -->",
        "",
        "A recipe is one YAML file that drives the whole job (`python -m pipeline train RECIPE`). Unknown keys are "
        "refused with a \"did you mean\"; every value is checked before anything is loaded. This page lists every "
        "key with its type, its default and what it does, then the task section's answer types, metrics and "
        "presets. docs/tasks.md walks one declared task end to end.",
        "",
        "Contents: [top level](#top-level) · "
        + " · ".join(f"[{name}](#{name})" for name, _ in _sections())
        + " · [answer types](#answer-types) · [presets](#presets) · [paths](#paths-what-is-relative-to-what)",
        "",
        "## Top level",
        "",
        _cell(_doc(Recipe)),
        "",
    ]
    rows = field_rows(Recipe)
    for key in RECIPE_KEYS_ALLOWED_OUTSIDE_SCHEMA:
        assert key == "extends", key  # the only one today; a new one needs its own line here
        rows.insert(
            0,
            (
                "extends",
                "path",
                "null",
                "Another recipe this one starts from; its keys are merged under this file's (see Paths below). "
                "Relative to this recipe file.",
            ),
        )
    lines += _table(rows) + [""]
    for name, model in _sections():
        lines += [f"## {name}", "", _cell(_doc(model)), ""]
        if model is TaskSection:
            lines += ["`task: NAME` (a preset) or a mapping of these keys:", ""]
        lines += _table(field_rows(model)) + [""]
    lines += _task_part()
    lines += _PATH_RULES.splitlines()
    return "\n".join(lines).rstrip() + "\n"


def main(argv: list[str] | None = None) -> int:
    """Print docs/recipe.md, or write it to --output."""
    parser = argparse.ArgumentParser(prog="python -m pipeline.recipe_reference", description=__doc__.split("\n")[0])
    parser.add_argument("--output", type=Path, help="write here (default: standard output)")
    args = parser.parse_args(argv)
    text = render()
    if args.output is None:
        sys.stdout.write(text)
    else:
        args.output.write_text(text, encoding="utf-8")
        print(f"wrote {args.output}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
