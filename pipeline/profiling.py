"""Profiles of a data file's rows, and what they say: the target, the answer type, the id and text fields.

``profile`` streams the rows of JSON Lines, CSV or Parquet files through ``records``' readers (the first
``SAMPLE_ROWS``) and keeps, per field, bounded statistics: JSON types, presence, string lengths, list sizes, and up
to ``LABELS_MAX + 1`` distinct short values. ``choose`` turns a profile into the choices ``init`` writes
(``scaffold``): which field is the answer and of which kind (label, labels, json, text, number), or an OpenAI chat
file; which field identifies a row; which fields are free text. It imports no torch, transformers or mlflow.
"""

from __future__ import annotations

import json
import re
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pipeline import icd10cm, tasks
from pipeline.errors import UsageError
from pipeline.records import DataFileError, file_format, iter_records, json_type

ANSWERS = ("label", "labels", "json", "text", "number")
# A field named like one of these (any case) is the target when --target is not given; the first in this order wins.
TARGET_NAMES = ("label", "labels", "category", "class", "codes", "answer", "output", "summary", "fields", "target")
SAMPLE_ROWS = 100_000  # rows profiled; a larger file is inferred from its first SAMPLE_ROWS rows (and says so)
ENUM_MAX = 50  # without --answer: a string target with at most this many values, each seen twice on average, is a label
LABELS_MAX = 500  # the most values a label set may have (--answer label/labels)
SHORT = 200  # characters: a longer value is never a label
MAX_ROW_BYTES = 1_000_000  # a contract's default max_row_bytes: a longer row is quarantined by validate, not profiled
CONTRACT_TYPES = ("string", "integer", "number", "boolean", "list", "object")
_CODE = re.compile(r"[A-Z][0-9][0-9A-Z](\.[0-9A-Z]{1,4})?")  # the ICD-10-CM shape data_contracts/medical_coding uses


@dataclass
class FieldStats:
    """What one field (or the items of a list field) held over the profiled rows."""

    present: int = 0  # rows with a non-null value
    kinds: Counter = field(default_factory=Counter)  # JSON type -> values
    shortest: int | None = None  # strings: characters
    longest: int = 0
    chars: int = 0
    with_space: int = 0
    values: Counter = field(default_factory=Counter)  # (type, value) -> count, short scalars, at most LABELS_MAX + 1
    overflow: bool = False  # more distinct values, or a long one, than `values` keeps: not a label set
    fewest: int | None = None  # lists: items
    most: int = 0
    repeats: int = 0  # lists that repeat an item
    roles: int = 0  # lists of message objects with a role (OpenAI chat)
    text: bool = False  # CSV cells: every value is text, typed only when all of them parse
    json_objects: int = 0  # strings that hold a JSON object (a json answer may be one)
    items: FieldStats | None = None

    def add(self, value: Any, kind: str | None = None) -> None:
        """Count one non-null value; ``kind``: the type a CSV cell (``value``, its text) is read as."""
        self.present += 1
        kind = kind or json_type(value)
        self.kinds[kind] += 1
        self.text |= isinstance(value, str) and kind != "string"
        if isinstance(value, str):
            n = len(value)
            self.shortest = n if self.shortest is None else min(self.shortest, n)
            self.longest, self.chars = max(self.longest, n), self.chars + n
            self.with_space += " " in value.strip()
            self.json_objects += value.lstrip().startswith("{") and isinstance(_json_or_none(value), dict)
        if kind in ("string", "integer", "number", "boolean"):
            key = (kind, value)  # a CSV cell keeps its text: the column may yet turn out to be text
            if key in self.values or (
                not self.overflow and len(self.values) <= LABELS_MAX and len(str(value)) <= SHORT
            ):
                self.values[key] += 1
            else:
                self.overflow = True
        elif kind == "list":
            n = len(value)
            self.fewest = n if self.fewest is None else min(self.fewest, n)
            self.most = max(self.most, n)
            self.roles += bool(value) and all(isinstance(m, dict) and "role" in m for m in value)
            shown = [json.dumps(v, sort_keys=True) if isinstance(v, (list, dict)) else (type(v), v) for v in value]
            self.repeats += len(set(shown)) < n
            self.items = self.items or FieldStats()
            for item in value:
                if item is not None:
                    self.items.add(item)

    @property
    def kind(self) -> str:
        """The contract type: the most common one; integer and number values together are numbers."""
        if not self.kinds or (self.text and "string" in self.kinds):
            return "string"  # a CSV column with one cell that is not a number is text (its numbers stay text)
        if set(self.kinds) <= {"integer", "number"}:
            return "number" if "number" in self.kinds else "integer"
        return self.kinds.most_common(1)[0][0]

    @property
    def distinct(self) -> int:
        """Distinct values (a lower bound when ``overflow``)."""
        return len(self.values)

    def is_category(self) -> bool:
        """Few short values, each seen about twice or more: a label, not free text."""
        return not self.overflow and self.distinct <= ENUM_MAX and 2 * self.distinct <= self.present

    def is_free_text(self) -> bool:
        """A string field of words: most values hold a space, or they average 40 characters or more."""
        if self.kind != "string" or self.is_category() or not self.present:
            return False
        return 2 * self.with_space >= self.present or self.chars >= 40 * self.present


@dataclass
class Profile:
    """Every field of the profiled rows, in order of first appearance."""

    files: list[Path]
    fmt: str
    rows: int = 0
    unreadable: Counter = field(default_factory=Counter)  # reason -> rows (validate quarantines them)
    sampled: bool = False  # stopped at SAMPLE_ROWS
    fields: dict[str, FieldStats] = field(default_factory=dict)

    @property
    def source(self) -> str:
        """The files and how many rows, for comments: ``300 rows of data.csv``."""
        names = " + ".join(str(f) for f in self.files)
        first = f"the first {self.rows:,}" if self.sampled else f"{self.rows:,}"
        return f"{first} rows of {names}"

    def is_chat(self) -> bool:
        """Most rows hold a ``messages`` list of role/content objects: an OpenAI fine-tuning file."""
        messages = self.fields.get("messages")
        return messages is not None and 2 * messages.roles > self.rows


def profile(files: list[Path], list_fields: frozenset[str] = frozenset()) -> Profile:
    """Profile the rows of ``files`` (each in the format its extension names, as ``format: auto`` reads it).

    ``list_fields``: CSV columns read as ';'-separated lists, as the reader does for a list field.
    """
    formats = {file_format(f) for f in files}
    result = Profile(files, formats.pop() if len(formats) == 1 else "auto")
    for path in files:
        csv = file_format(path) == "csv"
        try:
            # CSV cells are all text here; `_cell` types them as the reader would for the inferred contract.
            records = iter_records(path, "auto", MAX_ROW_BYTES, {})
            for record in records:
                if result.rows >= SAMPLE_ROWS:
                    result.sampled = True
                    break
                value = record.value
                if record.reasons or not isinstance(value, dict):
                    result.unreadable[record.reasons[0].check if record.reasons else "row_type"] += 1
                    continue
                result.rows += 1
                for name, cell in value.items():
                    stats = result.fields.setdefault(name, FieldStats())
                    typed = _cell(cell, name in list_fields) if csv else cell
                    if typed is not None:
                        stats.add(cell if csv and not isinstance(typed, list) else typed, json_type(typed))
        except DataFileError as exc:
            raise UsageError(str(exc)) from None
    if not result.rows:
        raise UsageError(f"{result.source}: no readable row to infer a contract from ({counts(result.unreadable)})")
    return result


def _cell(text: str, as_list: bool) -> Any:
    """A CSV cell typed as ``records`` reads it once the contract types the column: missing, list, number, text."""
    if text == "":
        return None
    if as_list or text.lstrip().startswith("["):
        try:
            value = json.loads(text)
            if isinstance(value, list):
                return value
        except ValueError:
            pass
        return [part.strip() for part in text.split(";") if part.strip()] if as_list else text
    if text.strip()[:1] in tuple("-0123456789tf"):
        try:
            value = json.loads(text)
        except ValueError:
            return text
        if isinstance(value, (bool, int, float)):
            return value
    return text


# --------------------------------------------------------------------------------------------------
# Choices: target, answer type, id, text fields


@dataclass
class Choices:
    """What init decided from the profile, and why (the comments say it)."""

    target: str | None  # None for a chat file
    answer: str | None
    target_why: str
    answer_why: str
    id_field: str | None
    text_fields: list[str]
    prompt_fields: list[str]


def choose(prof: Profile, target: str | None, answer: str | None) -> Choices:
    """Target, answer type, id field, text fields and prompt fields for the profiled rows.

    Raises:
        UsageError: No target can be named, or ``answer`` contradicts what the target holds.
    """
    where = prof.files[0]
    if prof.is_chat():
        if target or answer:
            raise UsageError(
                f"{where}: an OpenAI chat file (rows with a messages list) trains as task: chat, on every assistant "
                "message; --target and --answer do not apply: drop them"
            )
        why = f"{prof.fields['messages'].roles:,} of {prof.rows:,} rows hold a messages list (OpenAI chat)"
        return Choices(None, None, why, why, _id_field(prof, None), ["messages"], [])
    target, target_why = choose_target(prof, target)
    stats = prof.fields[target]
    answer, answer_why = _answer(where, target, stats, answer, prof.rows)
    id_field = _id_field(prof, target)
    others = {n: s for n, s in prof.fields.items() if n not in (target, id_field) and s.kind in CONTRACT_TYPES}
    text = [n for n, s in others.items() if s.is_free_text()]
    candidates = text or [n for n, s in others.items() if s.kind == "string"] or list(others)
    prompt = [n for n in candidates if _placeholder(n)]
    if not prompt:
        if candidates:
            raise UsageError(
                f"{where}: {', '.join(map(repr, candidates))}: a prompt template names a field as {{name}}, with "
                "letters, digits and '_' only; rename the column(s)"
            )
        raise UsageError(f"{where}: no field besides {target!r} (the answer) to build the prompt from")
    return Choices(target, answer, target_why, answer_why, id_field, text, prompt)


def _json_or_none(text: str) -> Any:
    try:
        return json.loads(text)
    except ValueError:
        return None


def _placeholder(name: str) -> bool:
    """``{name}`` is a placeholder of a task template (``tasks.compile_template``'s rule)."""
    try:
        return tasks.template_fields("{" + name + "}") == [name]
    except tasks.TemplateError:
        return False


def choose_target(prof: Profile, target: str | None) -> tuple[str, str]:
    """``target`` if the rows have it, else the first field named like a target; and why."""
    seen = ", ".join(f"{n} ({s.kind})" for n, s in prof.fields.items())
    if target is not None:
        if target not in prof.fields:
            raise UsageError(f"{prof.files[0]}: --target {target}: no such field; the rows have: {seen}")
        return target, "--target"
    found = [n for wanted in TARGET_NAMES for n in prof.fields if n.lower() == wanted]
    if not found:
        raise UsageError(
            f"{prof.files[0]}: which field is the answer? None is named {', '.join(TARGET_NAMES)}; the rows have: "
            f"{seen}. Pass --target FIELD"
        )
    also = f"; also named like one: {', '.join(found[1:])} (--target to choose)" if len(found) > 1 else ""
    return found[0], f"named like a target{also}"


def _answer(where: Path, target: str, stats: FieldStats, answer: str | None, rows: int) -> tuple[str, str]:
    """The answer type: ``answer`` checked against the data, or inferred (list, object, number, label, text)."""
    kind, seen = stats.kind, _seen(stats, rows)
    if answer is None:
        by_kind = {"list": "labels", "object": "json", "integer": "number", "number": "number"}
        if kind == "string" and stats.json_objects == stats.present:
            by_kind["string"] = "json"  # every value is a JSON object written as text (a CSV cell, say)
        answer = by_kind.get(kind) or ("label" if kind == "boolean" or stats.is_category() else "text")
        why = f"inferred: {target} holds {seen}"
    else:
        why = f"--answer; {target} holds {seen}"
    objects = kind == "object" or stats.json_objects == stats.present  # a json answer: objects, or their JSON text
    wanted = {"label": ("string", "integer", "boolean"), "labels": ("list",), "json": (kind,) if objects else ()}
    wanted |= {"number": ("integer", "number"), "text": ("string",)}
    if kind not in wanted[answer]:
        fix = {"list": "labels", "object": "json", "integer": "number", "number": "number", "string": "label or text"}
        hint = f"; use --answer {fix[kind]}" if kind in fix else ""
        if answer == "json" and kind == "string":
            hint = f", of which {stats.json_objects:,} hold a JSON object (json needs every one to){hint}"
        raise UsageError(f"{where}: --answer {answer}: field {target!r} holds {kind} values ({seen}){hint}")
    labels = stats.items if answer == "labels" else stats
    if answer == "labels" and (labels is None or labels.kind not in ("string", "integer")):
        raise UsageError(
            f"{where}: --answer labels: {target!r} holds lists of {labels.kind if labels else 'nothing'} ({seen}); a "
            "label set is made of strings (or integers)"
        )
    if answer in ("label", "labels") and labels is not None and not is_icd(labels):
        if labels.overflow or labels.distinct > LABELS_MAX:
            raise UsageError(
                f"{where}: --answer {answer}: {target!r} holds more than {LABELS_MAX} distinct values, or values "
                f"longer than {SHORT} characters ({seen}): that is free text, not a label set; use --answer text"
            )
        if answer == "label" and labels.distinct == labels.present > 1:
            raise UsageError(
                f"{where}: --answer label: every value of {target!r} is distinct ({seen}): nothing to learn a label "
                "from; use --answer text, or --target the field that holds the label"
            )
    return answer, why


def _seen(stats: FieldStats, rows: int) -> str:
    if stats.kind == "list" and stats.items is not None:
        return f"lists of {stats.fewest}-{stats.most} items, {_distinct(stats.items)} distinct, in {rows:,} rows"
    if stats.kind == "string":
        return f"{_distinct(stats)} distinct values in {rows:,} rows, up to {stats.longest:,} characters"
    return f"{_distinct(stats)} distinct {stats.kind} values in {rows:,} rows"


def _distinct(stats: FieldStats) -> str:
    return f"over {LABELS_MAX}" if stats.overflow else f"{stats.distinct:,}"


def _id_field(prof: Profile, target: str | None) -> str | None:
    names = [n for n, s in prof.fields.items() if n != target and s.kind in ("string", "integer")]
    for name in names:
        if name.lower() == "id":
            return name
    for name in names:
        if name.lower() in ("uuid", "key") or re.search(r"(_|-|\s)id$", name.lower()) or name.endswith("Id"):
            return name
    return None


def is_icd(stats: FieldStats) -> bool:
    """Every value is an ICD-10-CM code (dotted), as the medical-coding contract checks them."""
    codes = [v for (kind, v) in stats.values if kind == "string"]
    if stats.overflow or not codes or len(codes) < stats.distinct or not all(_CODE.fullmatch(c) for c in codes):
        return False
    return all(icd10cm.status(c) != "invalid" for c in codes)


def counts(counter: Counter) -> str:
    """``json 2, encoding 1``: a counter, most common first."""
    return ", ".join(f"{k} {n:,}" for k, n in counter.most_common())
