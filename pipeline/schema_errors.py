"""Pydantic validation errors as ``file: dotted.path: what`` lines, with near-miss key hints.

Shared by the recipe and the data contract: both are strict schemas (unknown keys rejected) whose errors must
say where, what and how to fix. A value quoted back is masked when it holds a secret (a URL with a password).
"""

from __future__ import annotations

import difflib
from collections.abc import Iterable
from types import UnionType
from typing import Any, Union, get_args, get_origin

from pydantic import BaseModel, ValidationError

from pipeline.egress import redact_secrets


class KeyProblems(ValueError):
    """Raised by a section's validator: several problems, each with the key (inside the section) that causes it.

    Reported one line per key (``recipe.yaml: task.user_prompt: ...``), not as one line for the section.
    """

    def __init__(self, problems: list[tuple[str, str]]):
        self.problems = problems
        super().__init__("; ".join(f"{key}: {message}" for key, message in problems))


def format_validation_errors(
    exc: ValidationError,
    schema: type[BaseModel],
    origin: dict[str, str],
    default_file: str,
    top_level_extras: tuple[str, ...] = (),
) -> list[str]:
    """Turn pydantic errors into ``file: dotted.path: what (expected ...)`` lines with key hints.

    Args:
        exc: The validation error.
        schema: The model that was validated, to suggest near-miss keys.
        origin: Which file set each dotted key (for recipes merged through ``extends``).
        default_file: The file named when a key has no recorded origin.
        top_level_extras: Top-level keys read before validation (a recipe's ``extends``), listed as allowed.
    """
    lines = []
    for err in exc.errors():
        loc = [str(part) for part in err["loc"] if not _is_union_tag(part)]
        dotted = ".".join(loc) or "(top level)"
        source = _source_of(dotted, origin, default_file)
        kind = err["type"]
        keyed = (err.get("ctx") or {}).get("error")
        if isinstance(keyed, KeyProblems):
            for key, message in keyed.problems:
                where = f"{dotted}.{key}" if key else dotted
                lines.append(f"{_source_of(where, origin, default_file)}: {where}: {message}")
            continue
        if kind == "extra_forbidden":
            allowed = _fields_at(schema, loc[:-1])
            if not loc[:-1]:
                allowed = allowed + list(top_level_extras)
            message = "unknown key" + did_you_mean(str(loc[-1]), allowed)
            if allowed:
                message += f"; allowed here: {', '.join(sorted(allowed))}"
        elif kind == "missing":
            message = "required key is missing"
        else:
            # The value is shown to help, except a secret in it (a URL with a password): that is masked.
            message = redact_secrets(f"{err['msg']}, got {err.get('input')!r}")
        lines.append(f"{source}: {dotted}: {message}")
    # Several union members can report the same location; keep the first line per location.
    seen, unique = set(), []
    for line in lines:
        key = line.split(": ", 2)[1] if line.count(": ") >= 2 else line
        if key not in seen:
            seen.add(key)
            unique.append(line)
    return unique


def _is_union_tag(part: Any) -> bool:
    """Pydantic inserts the union member ('literal[...]', 'list[str]') into error locations; drop it."""
    return isinstance(part, str) and ("[" in part or part in {"str", "int", "float", "bool"})


def _source_of(dotted: str, origin: dict[str, str], default_file: str) -> str:
    parts = dotted.split(".")
    for cut in range(len(parts), 0, -1):
        key = ".".join(parts[:cut])
        if key in origin:
            return origin[key]
    # An unknown section only --set created (``--set foo.bar=1``): the command line is to blame, not the file.
    below = {source for key, source in origin.items() if key.startswith(f"{dotted}.")}
    return below.pop() if len(below) == 1 else default_file


def _fields_at(model: type[BaseModel], loc: list[str]) -> list[str]:
    """The keys a section accepts, found by walking the schema along ``loc``."""
    current: Any = model
    parts = list(loc)
    while True:
        current = _model_in(current)
        origin = get_origin(current)
        if origin in (dict, list) and parts:
            parts.pop(0)  # a mapping key or list index: step into the value type
            current = get_args(current)[-1]
            continue
        if not parts:
            break
        if not (isinstance(current, type) and issubclass(current, BaseModel)):
            return []
        field = current.model_fields.get(parts.pop(0))
        if field is None:
            return []
        current = field.annotation
    if isinstance(current, type) and issubclass(current, BaseModel):
        return list(current.model_fields)
    return []


def _model_in(annotation: Any) -> Any:
    """``Section | None`` -> ``Section``: the schema a union refers to, if any."""
    if get_origin(annotation) in (Union, UnionType):
        for member in get_args(annotation):
            if (isinstance(member, type) and issubclass(member, BaseModel)) or get_origin(member) in (
                dict,
                list,
            ):
                return member
    return annotation


def did_you_mean(word: str, choices: Iterable[str]) -> str:
    """`` (did you mean 'x'?)`` for the closest choice, or "" when none is close."""
    close = difflib.get_close_matches(word, list(choices), n=1, cutoff=0.6)
    return f" (did you mean '{close[0]}'?)" if close else ""
