"""Data contracts: what a row must look like, checked before a GPU-hour is spent.

A contract is YAML in ``data_contracts/``. It lists the fields of a row and the checks each must pass.
``validate_split`` reads a JSON Lines file line by line: every line ends either accepted or in quarantine
with its line number and reasons, never dropped, so ``rows_in == rows_accepted + rows_quarantined``.

This module imports no torch, transformers or mlflow. The ICD-10-CM table (``simple-icd-10-cm``) is
imported only when a contract names that vocabulary.
"""

from __future__ import annotations

import gc
import hashlib
import json
import math
import re
from array import array
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from functools import cache, lru_cache
from pathlib import Path
from typing import Any, Literal

import numpy as np
import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from pipeline import icd10cm
from pipeline.dedup import LshIndex, MinHasher, normalize, pairs_within, text_hash
from pipeline.errors import JobFailed
from pipeline.privacy import PII_ENTITIES, redact
from pipeline.recipe import RecipeError, format_validation_errors
from pipeline.rundir import sha256_file

FieldType = Literal["string", "integer", "number", "boolean", "list", "object"]


class FieldRule(BaseModel):
    """The checks for one field of a row (or for each item of a list field)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    type: FieldType = Field(
        description="JSON type: string, integer, number, boolean, list or object (a JSON object, e.g. the "
        "gold fields of an extraction row)."
    )
    required: bool = Field(default=True, description="Rows without the field (or with null) are quarantined.")
    description: str | None = Field(default=None, description="What the field holds, for people.")
    pattern: str | None = Field(default=None, description="Regular expression a string must match in full.")
    enum: list[str | int | float | bool] | None = Field(default=None, description="The only allowed values.")
    vocabulary: Literal["icd10cm"] | None = Field(
        default=None,
        description="A code system the value must belong to: 'icd10cm' (the official ICD-10-CM table).",
    )
    billable_only: bool = Field(
        default=False, description="With vocabulary icd10cm: only billable codes (leaves of the table) pass."
    )
    vocabulary_file: str | None = Field(
        default=None,
        description="A text file of allowed values, one per line ('#' starts a comment); a relative path is "
        "relative to the contract file. Checked like enum, for lists too long to write inline.",
    )
    pii: Literal["block", "redact", "warn"] | None = Field(
        default=None,
        description="PII/PHI policy of a string field, scanned for the contract's pii.entities: 'block' "
        "quarantines the row, 'redact' replaces each finding with a typed placeholder such as <US_SSN> before "
        "anything else sees the row, 'warn' keeps the text and reports the row. Messages and reports never "
        "quote the value of a field with a policy.",
    )
    min_length: int | None = Field(default=None, ge=0, description="Fewest characters in a string.")
    max_length: int | None = Field(default=None, gt=0, description="Most characters in a string.")
    items: FieldRule | None = Field(default=None, description="Rule for every item of a list.")
    min_items: int | None = Field(default=None, ge=0, description="Fewest items in a list.")
    max_items: int | None = Field(default=None, gt=0, description="Most items in a list.")
    unique_items: bool = Field(default=False, description="A list may not repeat an item.")

    @model_validator(mode="after")
    def _consistent(self) -> FieldRule:
        if self.pattern is not None:
            try:
                re.compile(self.pattern)
            except re.error as exc:
                raise ValueError(f"pattern is not a valid regular expression: {exc}") from None
        if self.billable_only and self.vocabulary != "icd10cm":
            raise ValueError("billable_only needs vocabulary: icd10cm")
        if self.pii is not None and self.type != "string":
            raise ValueError("pii applies to string fields only")
        if self.type == "list" and self.items is None:
            raise ValueError("a list field needs an 'items' rule")
        if self.type != "list" and (self.items or self.min_items is not None or self.max_items is not None):
            raise ValueError("items/min_items/max_items apply to list fields only")
        return self


Action = Literal["quarantine", "report", "off"]


class TokenRules(BaseModel):
    """Token counts of each row rendered as a training example, with the recipe's tokenizer and prompt format."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    min_tokens: int = Field(default=1, ge=1, description="Fewest tokens in an example (prompt + completion).")
    max_tokens: int | None = Field(
        default=None,
        gt=0,
        description="Most tokens in an example; default training.max_length. A longer example would have its "
        "completion (the labels) cut by truncation, so the row is quarantined: an error, not a warning.",
    )


class PiiRules(BaseModel):
    """What the PII/PHI scan looks for in fields that have a ``pii`` policy."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    entities: list[str] = Field(
        default_factory=lambda: list(PII_ENTITIES),
        description="Entity types to detect: US_SSN, PHONE_NUMBER, EMAIL_ADDRESS, CREDIT_CARD, DATE_OF_BIRTH, "
        "MEDICAL_RECORD_NUMBER, PERSON (PERSON needs an installed spaCy model; reported unavailable otherwise).",
    )
    min_score: float = Field(
        default=0.4,
        ge=0,
        le=1,
        description="Lowest Presidio score that counts as a finding (SSN and phone patterns score 0.4-0.5, "
        "Luhn-valid cards and valid e-mail domains 1.0).",
    )

    @model_validator(mode="after")
    def _known(self) -> PiiRules:
        unknown = sorted(set(self.entities) - set(PII_ENTITIES))
        if unknown:
            raise ValueError(f"unknown entities {unknown}; known: {list(PII_ENTITIES)}")
        return self


class DatasetRules(BaseModel):
    """Checks across rows and across splits. Each says whether it quarantines rows or only reports them."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    text_fields: list[str] = Field(
        default_factory=list,
        description="String fields compared for duplicates and leakage, joined with a space (empty: off).",
    )
    label_field: str | None = Field(
        default=None, description="Field holding the label(s) (a string or a list): coverage and distribution."
    )
    exact_duplicates: Action = Field(
        default="quarantine",
        description="Rows of a split whose normalized text (case, whitespace and punctuation ignored) repeats an "
        "earlier row: 'quarantine' keeps the first and quarantines the copies, 'report' only lists them.",
    )
    near_duplicates: Action = Field(
        default="report",
        description="Rows of a split at least near_duplicate_threshold similar to an earlier row (MinHash/LSH). "
        "Default 'report': templated notes are often legitimately alike; the pairs are listed.",
    )
    leakage: Action = Field(
        default="quarantine",
        description="Eval rows that are exact or near duplicates of a train row: 'quarantine' takes them out of "
        "the eval split (the train row stays), because a score on seen text is inflated.",
    )
    near_duplicate_threshold: float = Field(
        default=0.8, ge=0.5, le=1, description="Estimated Jaccard similarity of word shingles that counts as near."
    )
    shingle_words: int = Field(default=3, ge=1, le=10, description="Words per shingle for near-duplicates.")
    label_coverage: Action = Field(
        default="report",
        description="Eval rows with a label seen fewer than min_train_count times in train. Default 'report': "
        "the model cannot learn those labels, and hiding the rows would inflate the eval score.",
    )
    min_train_count: int = Field(
        default=1, ge=1, description="Times every eval label must appear in train (k) for label_coverage."
    )
    rare_label_count: int = Field(
        default=5, ge=1, description="Train labels seen fewer times than this are listed as rare (report only)."
    )
    max_imbalance_ratio: float | None = Field(
        default=None,
        gt=1,
        description="Report a warning when the most frequent train label is this many times more frequent "
        "than the least frequent one (report only).",
    )
    min_rows: dict[Literal["train", "eval"], int] = Field(
        default_factory=dict,
        description="Fewest accepted rows per split; fewer stops the job (exit 1), e.g. {train: 500, eval: 50}.",
    )


class DataContract(BaseModel):
    """A whole contract: the format of the files and the rules for their rows."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str = Field(description="Contract name, recorded in reports and MLflow.")
    version: int = Field(default=1, ge=1, description="Bump when the rules change; recorded with each run.")
    description: str | None = Field(default=None, description="What the data is, for people.")
    format: Literal["auto", "jsonl", "csv", "parquet"] = Field(
        default="auto",
        description="File format of the splits: JSON Lines, CSV (header row) or Parquet; 'auto' goes by the "
        "file extension (.csv, .parquet/.pq, anything else JSON Lines).",
    )
    id_field: str | None = Field(default="id", description="Field that identifies a row in reports, if present.")
    fields: dict[str, FieldRule] = Field(description="Rules per field name.")
    extra_fields: Literal["ignore", "reject"] = Field(
        default="ignore", description="What to do with fields the contract does not list."
    )
    max_quarantine_fraction: float = Field(
        default=0.05,
        ge=0,
        le=1,
        description="Stop (exit 1) before any model loads when a larger fraction of a split is quarantined.",
    )
    max_row_bytes: int = Field(
        default=1_000_000,
        gt=0,
        description="A longer line (or CSV record) is quarantined without being held in memory.",
    )
    tokens: TokenRules | None = Field(
        default=None,
        description="Token-length checks with the recipe's tokenizer (loaded only when this section is present).",
    )
    pii: PiiRules = Field(default_factory=PiiRules, description="What the scan of fields with a pii policy finds.")
    dataset: DatasetRules = Field(default_factory=DatasetRules, description="Checks across rows and splits.")

    @model_validator(mode="after")
    def _non_empty(self) -> DataContract:
        if not self.fields:
            raise ValueError("a contract must list at least one field")
        for name in [*self.dataset.text_fields, *([self.dataset.label_field] if self.dataset.label_field else [])]:
            if name not in self.fields:
                raise ValueError(f"dataset names field {name!r}, which is not in fields")
        return self


class ContractFailed(JobFailed):
    """The data broke the contract badly enough to stop the job (exit code 1)."""

    def lines(self) -> list[str]:
        """The contract's findings under one heading."""
        return [f"data contract failed:\n{self}"]


def load_contract(path: str | Path) -> DataContract:
    """Load and validate a contract file.

    Raises:
        RecipeError: If the file is missing, not YAML, or not a valid contract (exit code 2).
    """
    path = Path(path)
    if not path.is_file():
        raise RecipeError([f"{path}: contract file not found"])
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (yaml.YAMLError, UnicodeDecodeError) as exc:
        raise RecipeError([f"{path}: not a readable YAML contract: {exc}"]) from None
    if not isinstance(raw, dict):
        raise RecipeError([f"{path}: expected a mapping at the top level, got {type(raw).__name__}"])
    try:
        contract = DataContract.model_validate(raw)
    except ValidationError as exc:
        raise RecipeError(format_validation_errors(exc, DataContract, {}, default_file=str(path))) from None
    errors: list[str] = []
    fields = {
        name: _resolve_files(name, rule, path.parent, errors, str(path)) for name, rule in contract.fields.items()
    }
    if errors:
        raise RecipeError(errors)
    return contract.model_copy(update={"fields": fields})


def _resolve_files(name: str, rule: FieldRule, base: Path, errors: list[str], source: str) -> FieldRule:
    """Make ``vocabulary_file`` absolute (relative to the contract) and check that it can be read."""
    update: dict[str, Any] = {}
    if rule.vocabulary_file is not None:
        file = Path(rule.vocabulary_file)
        file = file if file.is_absolute() else base / file
        try:
            if not _vocabulary(str(file)):
                errors.append(f"{source}: fields.{name}.vocabulary_file: {file} lists no value")
        except (OSError, UnicodeDecodeError) as exc:
            errors.append(f"{source}: fields.{name}.vocabulary_file: cannot read {file}: {exc}")
        update["vocabulary_file"] = str(file)
    if rule.items is not None:
        update["items"] = _resolve_files(f"{name}.items", rule.items, base, errors, source)
    return rule.model_copy(update=update) if update else rule


@cache
def _vocabulary(path: str) -> frozenset[str]:
    """Values of a vocabulary file: one per line, blank lines and '#' comments ignored."""
    lines = Path(path).read_text(encoding="utf-8-sig").splitlines()
    return frozenset(v for v in (line.split("#", 1)[0].strip() for line in lines) if v)


# --------------------------------------------------------------------------------------------------
# Row checks


@dataclass(frozen=True)
class Reason:
    """Why a row was quarantined: the check that failed, on which field, in words."""

    check: str
    field: str | None
    message: str

    def to_dict(self) -> dict[str, Any]:
        """JSON form used in quarantine.jsonl."""
        return {"check": self.check, "field": self.field, "message": self.message}


_JSON_TYPES: dict[str, tuple[type, ...]] = {
    "string": (str,),
    "integer": (int,),
    "number": (int, float),
    "boolean": (bool,),
    "list": (list,),
    "object": (dict,),
}


_EXACT_TYPES = {"string": str, "list": list, "boolean": bool, "integer": int}


def _type_ok(value: Any, kind: str) -> bool:
    if type(value) is _EXACT_TYPES.get(kind):  # the common case, without the isinstance chain
        return True
    if kind in ("integer", "number") and isinstance(value, bool):
        return False  # JSON true is not a number
    if kind == "number" and isinstance(value, float) and not math.isfinite(value):
        return False
    return isinstance(value, _JSON_TYPES[kind])


def _check_value(name: str, value: Any, rule: FieldRule) -> list[Reason]:
    if not _type_ok(value, rule.type):
        return [Reason("type", name, f"expected {rule.type}, got {_json_type(value)}")]
    reasons: list[Reason] = []
    if rule.type == "string":
        if rule.min_length is not None and len(value) < rule.min_length:
            reasons.append(Reason("min_length", name, f"{len(value)} characters, at least {rule.min_length} required"))
        if rule.max_length is not None and len(value) > rule.max_length:
            reasons.append(Reason("max_length", name, f"{len(value)} characters, at most {rule.max_length} allowed"))
        if rule.pattern is not None and not _regex(rule.pattern).fullmatch(value):
            reasons.append(Reason("pattern", name, f"{_shown(value, rule)} does not match {rule.pattern}"))
    if rule.enum is not None and value not in rule.enum:
        reasons.append(Reason("enum", name, f"{_shown(value, rule)} is not one of {rule.enum}"))
    if (
        rule.vocabulary_file is not None
        and not isinstance(value, list)
        and str(value) not in _vocabulary(rule.vocabulary_file)
    ):
        message = f"{_shown(value, rule)} is not in {Path(rule.vocabulary_file).name}"
        reasons.append(Reason("vocabulary", name, message))
    if rule.vocabulary == "icd10cm" and isinstance(value, str) and not reasons:
        status = _icd10cm_status(value)
        if status == "invalid":
            reasons.append(Reason("vocabulary", name, f"{_clip(value)!r} is not an ICD-10-CM code"))
        elif status == "not_billable" and rule.billable_only:
            reasons.append(
                Reason(
                    "billable",
                    name,
                    f"{value!r} is an ICD-10-CM category, not a billable code; use a subcode",
                )
            )
    if rule.type == "list":
        if rule.min_items is not None and len(value) < rule.min_items:
            reasons.append(Reason("min_items", name, f"{len(value)} items, at least {rule.min_items} required"))
        if rule.max_items is not None and len(value) > rule.max_items:
            reasons.append(Reason("max_items", name, f"{len(value)} items, at most {rule.max_items} allowed"))
        if rule.unique_items and not _all_distinct(value):
            repeated = sorted({str(v) for v, n in Counter(map(_hashable, value)).items() if n > 1})
            if repeated:
                reasons.append(Reason("unique_items", name, f"repeated items: {', '.join(repeated)}"))
        assert rule.items is not None  # guaranteed by FieldRule._consistent
        for index, item in enumerate(value):
            # Items are checked under an empty name and renamed only when they fail: most items pass, and
            # formatting "codes[0]" for each one was a tenth of the row-check time.
            for r in _check_value("", item, rule.items):
                reasons.append(Reason(r.check, f"{name}[{index}]{r.field}", r.message))
    return reasons


def _shown(value: Any, rule: FieldRule) -> str:
    # A field with a PII policy may hold an SSN: its value is never quoted in a message.
    return "the value (withheld: the field has a pii policy)" if rule.pii else repr(_clip(value))


def _all_distinct(items: list[Any]) -> bool:
    try:
        return len(set(items)) == len(items)
    except TypeError:  # unhashable items (lists, objects): the slow path below compares their JSON
        return False


@cache
def _regex(pattern: str) -> re.Pattern[str]:
    return re.compile(pattern)


@lru_cache(maxsize=200_000)
def _icd10cm_status(code: str) -> str:
    # simple-icd-10-cm walks its tables on every call; a medical-coding split repeats a few thousand codes.
    return icd10cm.status(code)


def check_row(row: Any, contract: DataContract) -> list[Reason]:
    """All the reasons a parsed JSON value fails the contract (empty when it passes)."""
    if not isinstance(row, dict):
        return [Reason("row_type", None, f"expected a JSON object, got {_json_type(row)}")]
    reasons: list[Reason] = []
    for name, rule in contract.fields.items():
        value = row.get(name)
        if value is None:
            if rule.required:
                reasons.append(Reason("required", name, "missing or null"))
            continue
        reasons.extend(_check_value(name, value, rule))
    if contract.extra_fields == "reject":
        extra = sorted(set(row) - set(contract.fields))
        if extra:
            reasons.append(Reason("extra_fields", None, f"fields not in the contract: {', '.join(extra)}"))
    return reasons


def row_passes(contract: DataContract) -> Callable[[Any], bool]:
    """A predicate compiled once per contract: True only when ``check_row`` would find nothing.

    Most rows pass, and ``check_row`` walks the pydantic rules field by field for each one (a third of the
    validation time at 1M rows). This closure does the same checks with the rules bound once: exact type tests,
    precompiled ``fullmatch``, and a memo of string items already checked (a medical-coding split repeats a few
    thousand codes a million times). It only ever answers "passes"; a row it does not pass goes through
    ``check_row``, which builds the reasons, so the reasons are the same by construction.
    """
    checks = [(name, rule.required, _value_passes(rule)) for name, rule in contract.fields.items()]
    known = frozenset(contract.fields)
    reject_extra = contract.extra_fields == "reject"

    def passes(row: Any) -> bool:
        if type(row) is not dict:
            return False
        get = row.get
        for name, required, ok in checks:
            value = get(name)
            if value is None:
                if required:
                    return False
            elif not ok(value):
                return False
        return not (reject_extra and not known.issuperset(row))

    return passes


def _value_passes(rule: FieldRule, memo: bool = False) -> Callable[[Any], bool]:
    """A predicate for one value that is True only when ``_check_value`` returns no reason.

    ``memo``: remember the answer per string (list items such as codes repeat; row ids do not).
    """
    if rule.type == "string" and rule.enum is None:
        low, high = rule.min_length, rule.max_length
        match = _regex(rule.pattern).fullmatch if rule.pattern is not None else None
        vocabulary = _vocabulary(rule.vocabulary_file) if rule.vocabulary_file is not None else None
        icd = rule.vocabulary == "icd10cm"
        billable_only = rule.billable_only

        def string_passes(value: Any) -> bool:
            if type(value) is not str:
                return not _check_value("", value, rule)  # a str subclass or a wrong type: the full check decides
            if (low is not None and len(value) < low) or (high is not None and len(value) > high):
                return False
            if match is not None and match(value) is None:
                return False
            if vocabulary is not None and value not in vocabulary:
                return False
            if icd:
                status = _icd10cm_status(value)
                return status == "billable" or (status == "not_billable" and not billable_only)
            return True

        if memo and low is None and high is None:
            # Short values from a small set (codes, labels): remember each answer. Bounded: cleared when full.
            answers: dict[str, bool] = {}

            def memo_passes(value: Any) -> bool:
                if type(value) is str:
                    answer = answers.get(value)
                    if answer is None:
                        if len(answers) >= 100_000:
                            answers.clear()
                        answer = answers[value] = string_passes(value)
                    return answer
                return string_passes(value)

            return memo_passes
        return string_passes
    if rule.type == "list" and rule.enum is None and rule.vocabulary_file is None and rule.vocabulary is None:
        assert rule.items is not None  # guaranteed by FieldRule._consistent
        item_passes = _value_passes(rule.items, memo=True)
        fewest, most, unique = rule.min_items, rule.max_items, rule.unique_items
        # Plain strings already seen to pass the item rule: a list made only of them passes with one C-level
        # set operation. Only exact str go in, and no other JSON value equals a str, so membership is exact.
        good: set[str] = set()

        def list_passes(value: Any) -> bool:
            if type(value) is not list:
                return not _check_value("", value, rule)
            n = len(value)
            if (fewest is not None and n < fewest) or (most is not None and n > most):
                return False
            if unique and not _all_distinct(value):
                return not _check_value("", value, rule)  # unhashable items: the full check compares their JSON
            try:
                if good.issuperset(value):
                    return True
            except TypeError:  # unhashable items
                return all(map(item_passes, value))
            if not all(map(item_passes, value)):
                return False
            if len(good) < 100_000:
                good.update(v for v in value if type(v) is str)
            return True

        return list_passes
    return lambda value: not _check_value("", value, rule)


# --------------------------------------------------------------------------------------------------
# Reading: every record of a JSON Lines, CSV or Parquet file, each with its 1-based row number


class DataFileError(ContractFailed):
    """A data file that cannot be read at all (not Parquet, a CSV without a header): one error naming it."""


@dataclass
class Record:
    """One input record: its row number (JSONL/CSV: the line it starts on; Parquet: its position)."""

    row: int
    value: Any
    reasons: list[Reason]


def file_format(path: str | Path, contract: DataContract) -> Literal["jsonl", "csv", "parquet"]:
    """The contract's format, or (``auto``) the one the file extension names."""
    if contract.format != "auto":
        return contract.format
    suffix = Path(path).suffix.lower()
    return "csv" if suffix == ".csv" else "parquet" if suffix in (".parquet", ".pq") else "jsonl"


def iter_records(path: str | Path, contract: DataContract) -> Iterator[Record]:
    """Stream the records of a split file; nothing is skipped, so every record gets a row number.

    Raises:
        DataFileError: The file cannot be read as its format at all (the message names the file).
    """
    fmt = file_format(path, contract)
    if fmt == "csv":
        return _csv_records(Path(path), contract)
    if fmt == "parquet":
        return _parquet_records(Path(path))
    return _jsonl_records(Path(path), contract.max_row_bytes)


def _jsonl_records(path: Path, limit: int) -> Iterator[Record]:
    with path.open("rb") as handle:
        number = 0
        while True:
            raw = handle.readline(limit + 1)  # bounded: a 2 GB line is never held in memory
            if not raw:
                return
            number += 1
            if len(raw) > limit and not raw.endswith(b"\n"):
                size = len(raw)
                while raw and not raw.endswith(b"\n"):
                    raw = handle.readline(1 << 20)
                    size += len(raw)
                yield Record(number, None, [Reason("row_size", None, f"{size:,} bytes, above max_row_bytes {limit:,}")])
                continue
            value, reasons = _parse_line(raw)
            if reasons and number == 1 and raw.lstrip(b"\xef\xbb\xbf \t").startswith((b"[", b"{")):
                reasons = [
                    Reason(
                        r.check,
                        r.field,
                        r.message + " (is the file one JSON document? pipeline reads JSON Lines: one object per line)",
                    )
                    for r in reasons
                ]
            yield Record(number, value, reasons)


def _csv_records(path: Path, contract: DataContract) -> Iterator[Record]:
    import csv
    import io

    csv.field_size_limit(contract.max_row_bytes)
    with path.open("rb") as raw:
        # surrogateescape keeps undecodable bytes as lone surrogates, so one bad record does not stop the file.
        text = io.TextIOWrapper(raw, encoding="utf-8-sig", errors="surrogateescape", newline="")
        reader = csv.reader(text)
        try:
            header = next(reader)
        except StopIteration:
            return
        except csv.Error as exc:
            raise DataFileError(f"{path}: line 1: not a CSV header: {exc}") from None
        if not header or any(_has_surrogate(h) for h in header):
            raise DataFileError(
                f"{path}: line 1: the CSV header is empty or not UTF-8; the first line must name columns"
            )
        start = reader.line_num + 1
        while True:
            try:
                cells = next(reader)
            except StopIteration:
                return
            except csv.Error as exc:
                yield Record(start, None, [Reason("csv", None, f"not a valid CSV record: {exc}")])
                start = reader.line_num + 1
                continue
            number, start = start, reader.line_num + 1
            if not cells:
                yield Record(number, None, [Reason("blank_line", None, "blank line")])
            elif any(_has_surrogate(c) for c in cells):
                yield Record(number, None, [Reason("encoding", None, "not UTF-8")])
            elif len(cells) != len(header):
                message = f"{len(cells)} columns, the header has {len(header)}"
                yield Record(number, None, [Reason("csv_columns", None, message)])
            else:
                row = _typed_cells(dict(zip(header, cells, strict=True)), contract)
                yield Record(number, row, value_reasons(row))  # a cell 1e400 or a JSON list cell with "\ud800"


def _has_surrogate(text: str) -> bool:
    return any("\udc80" <= ch <= "\udcff" for ch in text) if not text.isascii() else False


def _typed_cells(row: dict[str, Any], contract: DataContract) -> dict[str, Any]:
    """Types for CSV cells, which are all text.

    An empty cell is missing; a list field is a JSON array or ';'-separated values; numbers and booleans are
    parsed as JSON (a cell that does not parse stays text and fails the type check).
    """
    for name, rule in contract.fields.items():
        cell = row.get(name)
        if cell is None:
            continue
        if cell == "":
            row[name] = None
        elif rule.type == "list":
            if cell.lstrip().startswith("["):
                try:
                    row[name] = json.loads(cell, parse_constant=_reject_constant)
                except ValueError:
                    pass
            else:
                row[name] = [part.strip() for part in cell.split(";") if part.strip()]
        elif rule.type in ("integer", "number", "boolean"):
            try:
                row[name] = json.loads(cell, parse_constant=_reject_constant)
            except ValueError:
                pass
    return row


def _parquet_records(path: Path) -> Iterator[Record]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        parquet = pq.ParquetFile(path)
    except (pa.ArrowException, OSError) as exc:
        raise DataFileError(f"{path}: not a readable Parquet file: {exc}") from None
    # Only a float column can hold NaN or infinity (Arrow strings are UTF-8): walk rows only when one exists.
    walk = _has_float(parquet.schema_arrow.types)
    number = 0
    for group in range(parquet.num_row_groups):  # one row group in memory at a time
        try:
            table = parquet.read_row_group(group)
        except (pa.ArrowException, OSError) as exc:
            raise DataFileError(f"{path}: row group {group} (rows after {number}) cannot be read: {exc}") from None
        for batch in table.to_batches(max_chunksize=4096):
            for value in batch.to_pylist():
                number += 1
                yield Record(number, value, value_reasons(value) if walk else [])


def _has_float(types: Any) -> bool:
    import pyarrow as pa

    for kind in types:
        if pa.types.is_floating(kind):
            return True
        if pa.types.is_struct(kind) and _has_float(kind.field(i).type for i in range(kind.num_fields)):
            return True
        if (pa.types.is_list(kind) or pa.types.is_large_list(kind)) and _has_float([kind.value_type]):
            return True
        if pa.types.is_map(kind) and _has_float([kind.key_type, kind.item_type]):
            return True
    return False


def _parse_line(raw: bytes) -> tuple[Any, list[Reason]]:
    if _orjson is not None and _LONG_INTEGER not in raw.translate(_DIGITS):
        # orjson (C) parses a line ~3x faster than the json module. It is only a fast path: whatever it refuses
        # (a BOM, invalid UTF-8, lone surrogates, 1e400, blank lines) goes through the json module below, which
        # gives the reason, so accepted values and reasons are the json module's. It reads integers beyond 64 bits
        # as floats where json keeps them exact, so lines with a run of 19+ digits skip it.
        try:
            return _orjson.loads(raw), []
        except _orjson.JSONDecodeError:
            pass
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        return None, [Reason("encoding", None, f"not UTF-8 ({exc.reason} at byte {exc.start})")]
    text = text.lstrip("\ufeff").rstrip("\r\n")
    if not text.strip():
        return None, [Reason("blank_line", None, "blank line")]
    try:
        value = _DECODER.decode(text)
    except RecursionError:
        return None, [Reason("json", None, "not valid JSON: nested too deeply")]
    except ValueError as exc:
        return None, [Reason("json", None, f"not valid JSON: {exc}")]
    # Only this path needs the walk: orjson refuses lone surrogates and numbers beyond a double (1e400).
    return value, value_reasons(value)


def value_reasons(row: Any) -> list[Reason]:
    r"""What no field rule can accept anywhere in a parsed row, contract field or not.

    A number beyond a double (JSON ``1e400`` reads as infinity, a Parquet float may be NaN or infinite) is not
    a number any check, metric or tokenizer can use. A lone surrogate (JSON ``"\ud800"``) is a string no UTF-8
    encoder accepts: the tokenizer would fail on it mid-training. Walks keys and values without recursion (a
    parsed row may be nested close to the interpreter's limit) and names the first few places found.
    """
    reasons: list[Reason] = []
    stack: list[tuple[str, Any]] = [("", row)]
    while stack and len(reasons) < 5:
        where, value = stack.pop()
        kind = type(value)
        if kind is float:
            if not math.isfinite(value):
                reasons.append(
                    Reason("non_finite", where or None, f"{_json_type(value)}: only finite numbers are accepted")
                )
        elif kind is str:
            if not _utf8_ok(value):
                reasons.append(
                    Reason("encoding", where or None, "a lone surrogate (e.g. \\ud800): not encodable as UTF-8")
                )
        elif kind is dict:
            for key, item in value.items():
                name = f"{where}.{key}" if where else str(key)
                if type(key) is str and not _utf8_ok(key):
                    reasons.append(
                        Reason("encoding", None, "a field name holds a lone surrogate: not encodable as UTF-8")
                    )
                    name = where or "?"
                stack.append((name, item))
        elif kind is list:
            stack.extend((f"{where}[{i}]", item) for i, item in enumerate(value))
    return reasons


def _printable(row_id: str | int | None) -> str | int | None:
    """An id as quarantine.jsonl can hold it: a lone surrogate in it is written as its escape."""
    if type(row_id) is str and not _utf8_ok(row_id):
        return row_id.encode("utf-8", "backslashreplace").decode("utf-8")
    return row_id


def _utf8_ok(text: str) -> bool:
    if text.isascii():
        return True
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not valid JSON")


_DECODER = json.JSONDecoder(parse_constant=_reject_constant)  # one decoder: json.loads(**kw) builds one per call
# A run of 19 digits may be an integer beyond int64 (18 never is): digits -> "0", the rest -> " ", then a substring
# search. 1 us a line, a sixth of the cost of re.search(rb"[0-9]{19}").
_DIGITS = bytes(48 if 48 <= c <= 57 else 32 for c in range(256))
_LONG_INTEGER = b"0" * 19

try:
    import orjson as _orjson
except ImportError:  # optional speed-up: the json module alone gives the same results, slower
    _orjson = None


# --------------------------------------------------------------------------------------------------
# Splits

# Checks made while reading a file, per format (the row and dataset checks come from the contract).
_READ_CHECKS = {
    "jsonl": ("json", "encoding", "blank_line", "row_type", "row_size", "non_finite"),
    "csv": ("csv", "csv_columns", "encoding", "blank_line", "non_finite"),
    "parquet": ("non_finite",),
}
# Dataset checks that note the rows they find themselves (with a pair or a breakdown) before quarantining them.
_NOTED_BY_CHECK = frozenset({"leakage", "exact_duplicate", "near_duplicate", "label_coverage"})
EXAMPLES = 10  # row numbers kept per check as examples in report.json
PAIRS = 100  # duplicate/leakage pairs kept per check in report.json
BATCH = 2048  # rows per batch for the PII scan, token counts and MinHash signatures


@dataclass
class CheckStat:
    """What one check found in a split: the action it took, how many rows, example rows and pairs."""

    action: str
    count: int = 0
    examples: list[int] = field(default_factory=list)
    pairs: list[dict[str, Any]] = field(default_factory=list)
    by: Counter = field(default_factory=Counter)
    # Every pair, not only the first PAIRS, for validation/pairs.jsonl: two row numbers and a similarity per pair
    # in flat arrays (24 bytes a pair; a dict a pair would be ~20x that for 100,000s of templated near-duplicates).
    pair_keys: tuple[str, ...] = ()
    _firsts: array = field(default_factory=lambda: array("q"))
    _seconds: array = field(default_factory=lambda: array("q"))
    _similarities: array = field(default_factory=lambda: array("d"))

    def add_pair(self, pair: dict[str, Any]) -> None:
        """Keep one pair ``{row, <other row>[, similarity]}``: in full, and in ``pairs`` while under PAIRS."""
        if len(self.pairs) < PAIRS:
            self.pairs.append(pair)
        if not self.pair_keys:
            self.pair_keys = tuple(pair)
        values = list(pair.values())
        self._firsts.append(values[0])
        self._seconds.append(values[1])
        self._similarities.append(values[2] if len(values) > 2 else math.nan)

    def all_pairs(self) -> Iterator[dict[str, Any]]:
        """Every pair this check found, in the order found, with the keys of the report's pairs."""
        keys = self.pair_keys
        for first, second, similarity in zip(self._firsts, self._seconds, self._similarities, strict=True):
            values = (first, second, similarity) if len(keys) > 2 else (first, second)
            yield dict(zip(keys, values, strict=True))

    def to_dict(self) -> dict[str, Any]:
        """JSON form for report.json (row numbers only, never row content)."""
        out: dict[str, Any] = {"action": self.action, "count": self.count, "examples": self.examples}
        if self.pair_keys:
            out["pairs"] = self.pairs
            out["pairs_total"] = len(self._firsts)
            out["pairs_file"] = "pairs.jsonl"  # every pair, when more than the PAIRS kept here
        if self.by:
            out["by"] = dict(self.by.most_common())
        return out


@dataclass
class SplitResult:
    """What one split turned into: accepted rows, quarantined rows, and counts that reconcile.

    Accepted rows carry their row number under ``_row`` and are already redacted where a field's PII policy
    says so. ``checks`` holds every check run on the split (count 0 when it found nothing), quarantining or not.
    """

    name: str
    path: str
    sha256: str
    format: str = "jsonl"
    rows: list[dict[str, Any]] = field(default_factory=list)
    quarantined: list[dict[str, Any]] = field(default_factory=list)
    check_counts: Counter = field(default_factory=Counter)
    checks: dict[str, CheckStat] = field(default_factory=dict)
    rows_in: int = 0
    accepted_count: int = 0
    label_counts: Counter = field(default_factory=Counter)
    token_lengths: list[int] = field(default_factory=list)

    @property
    def rows_accepted(self) -> int:
        """Rows that passed every check (counted even when the rows themselves are not kept)."""
        return self.accepted_count

    @property
    def rows_quarantined(self) -> int:
        """Rows set aside with reasons."""
        return len(self.quarantined)

    def note(
        self, check: str, action: str, row: int, pair: dict[str, Any] | None = None, by: Counter | None = None
    ) -> None:
        """Record one row found by a check (``by``: a breakdown such as PII entity counts)."""
        stat = self.checks.setdefault(check, CheckStat(action))
        stat.count += 1
        if len(stat.examples) < EXAMPLES:
            stat.examples.append(row)
        if pair is not None:
            stat.add_pair(pair)
        if by:
            stat.by.update(by)

    def all_pairs(self) -> Iterator[dict[str, Any]]:
        """validation/pairs.jsonl lines: every duplicate/leakage pair of this split, with its split and check."""
        for check, stat in sorted(self.checks.items()):
            for pair in stat.all_pairs():
                yield {"split": self.name, "check": check, **pair}

    def summary(self) -> dict[str, Any]:
        """The per-split part of report.json."""
        out = {
            "path": self.path,
            "format": self.format,
            "sha256": self.sha256,
            "rows_in": self.rows_in,
            "rows_accepted": self.rows_accepted,
            "rows_quarantined": self.rows_quarantined,
            "quarantined_fraction": round(self.rows_quarantined / self.rows_in, 6) if self.rows_in else 0.0,
            "failed_checks": dict(sorted(self.check_counts.items())),
            "checks": {name: stat.to_dict() for name, stat in sorted(self.checks.items())},
        }
        if self.label_counts:
            counts = self.label_counts.most_common()
            out["labels"] = {
                "distinct": len(counts),
                "total": sum(self.label_counts.values()),
                "most_common": dict(counts[:20]),
                "least_common": dict(counts[-10:]),
                "imbalance_ratio": round(counts[0][1] / counts[-1][1], 3),
            }
        if self.token_lengths:
            ordered = sorted(self.token_lengths)
            n = len(ordered)
            out["tokens"] = {
                "min": ordered[0],
                "p50": ordered[n // 2],
                "p95": ordered[min(n - 1, (n * 95) // 100)],
                "max": ordered[-1],
                "mean": round(sum(ordered) / n, 1),
            }
        return out


# measure_tokens(rows) -> [(prompt_tokens, example_tokens)] for rows rendered as training examples.
TokenCounter = Callable[[list[dict[str, Any]]], list[tuple[int, int]]]


@dataclass
class _Accepted:
    """Per accepted row, what the dataset checks need (not the row: flat memory when rows are not kept)."""

    rows: array = field(default_factory=lambda: array("q"))
    ids: list[Any] = field(default_factory=list)
    labels: list[tuple[str, ...]] = field(default_factory=list)
    tokens: array = field(default_factory=lambda: array("l"))
    signatures: list[Any] = field(default_factory=list)  # per batch: (rows, num_perm) uint16
    keys: list[Any] = field(default_factory=list)  # per batch: (rows, bands) uint64 LSH band keys


class ContractRun:
    """Checks splits against a contract, streaming: train first, then eval (which is checked against train).

    Per record: parse -> row checks -> PII scan (block / redact / warn) -> token counts -> exact duplicates
    (within the split; for eval also against train) -> accepted. After a split's last record: near-duplicates
    within it and, for eval, leakage from train; after both: label coverage and minimum row counts.

    Args:
        contract: The contract.
        measure_tokens: Token counter for the contract's ``tokens`` rules (None: token checks skipped).
        max_length: ``training.max_length``, the default ``tokens.max_tokens``.
        keep_rows: Keep the accepted rows (training needs them; the benchmark measures without).
    """

    def __init__(
        self,
        contract: DataContract,
        measure_tokens: TokenCounter | None = None,
        max_length: int | None = None,
        keep_rows: bool = True,
    ):
        self.contract = contract
        self.rules = contract.dataset
        self.measure_tokens = measure_tokens if contract.tokens else None
        self.max_tokens = (contract.tokens.max_tokens if contract.tokens else None) or max_length
        self.keep_rows = keep_rows
        self.pii_fields = {name: rule.pii for name, rule in contract.fields.items() if rule.pii}
        self.scanner: Any = None
        if self.pii_fields:
            from pipeline.privacy import pii_scanner

            self.scanner = pii_scanner(tuple(contract.pii.entities), contract.pii.min_score)
        self.hasher = MinHasher(shingle=self.rules.shingle_words) if self.rules.text_fields else None
        self.near = self.hasher is not None and (self.rules.near_duplicates != "off" or self.rules.leakage != "off")
        self.splits: dict[str, SplitResult] = {}
        self._hashes: dict[str, dict[int, int]] = {}
        self._accepted: dict[str, _Accepted] = {}
        self._train_index: LshIndex | None = None
        self._label_sets: dict[tuple[str, ...], tuple[str, ...]] = {}
        # Eval rows found to be exact copies of a train row, so near-duplicate leakage does not count them again
        # (every one of them, not only those among the report's first PAIRS pairs).
        self._exact_leaks: set[int] = set()
        self._passes = row_passes(contract)
        self._batches = 0

    # -- one split -------------------------------------------------------------------------------
    def split(self, name: str, path: str | Path) -> SplitResult:
        """Check one split file (call with train before eval; the eval result is final after ``finish``)."""
        path = Path(path)
        result = SplitResult(
            name=name, path=str(path), sha256=sha256_file(path), format=file_format(path, self.contract)
        )
        self.splits[name] = result
        for check, action in self._checks_run(name, result.format).items():  # listed in the report even at 0
            result.checks[check] = CheckStat(action)
        self._hashes[name] = {}
        self._accepted[name] = _Accepted()
        batch: list[Record] = []
        passes = self._passes
        # The cyclic garbage collector is paused while streaming: each batch of 2,048 parsed rows survives a few
        # young collections, which then trigger full ones that walk every object in the process, the ICD-10-CM
        # table's included (measured: 30-40% of the row-check time). Parsed rows hold no cycles and are freed by
        # reference counting; every 64 batches a young-generation collection reclaims any cycles the PII scanner
        # leaves, without walking the old generation.
        collecting = gc.isenabled()
        gc.disable()
        try:
            for record in iter_records(path, self.contract):
                result.rows_in += 1
                reasons = record.reasons or (None if passes(record.value) else check_row(record.value, self.contract))
                if reasons:
                    self._quarantine(result, record.row, record.value, reasons)
                    continue
                batch.append(record)
                if len(batch) >= BATCH:
                    self._batch(result, batch)
                    batch = []
                    self._batches += 1
                    if self._batches % 64 == 0:
                        gc.collect(1)
            self._batch(result, batch)
            self._near_duplicates(result)
        finally:
            if collecting:
                gc.enable()
        if name == "train":
            self._finalize(result)
        return result

    def _checks_run(self, name: str, fmt: str) -> dict[str, str]:
        """Every check this contract runs on a split of this name and format, with its action."""
        checks = dict.fromkeys(_READ_CHECKS[fmt], "quarantine")
        rules = list(self.contract.fields.values())
        while rules:
            rule = rules.pop()
            checks["type"] = "quarantine"
            if rule.required:
                checks["required"] = "quarantine"
            named = {
                "pattern": rule.pattern is not None,
                "enum": rule.enum is not None,
                "vocabulary": rule.vocabulary is not None or rule.vocabulary_file is not None,
                "billable": rule.billable_only,
                "min_length": rule.min_length is not None,
                "max_length": rule.max_length is not None,
                "min_items": rule.min_items is not None,
                "max_items": rule.max_items is not None,
                "unique_items": rule.unique_items,
                "pii": rule.pii == "block",
            }
            checks.update((check, "quarantine") for check, on in named.items() if on)
            if rule.items is not None:
                rules.append(rule.items)
        if self.contract.extra_fields == "reject":
            checks["extra_fields"] = "quarantine"
        checks.update((f"pii_{policy}", policy) for policy in self.pii_fields.values())
        if self.measure_tokens is not None:
            checks.update(min_tokens="quarantine", max_tokens="quarantine")
        rules_ = self.rules
        if rules_.text_fields and rules_.exact_duplicates != "off":
            checks["exact_duplicate"] = rules_.exact_duplicates
        if self.near and rules_.near_duplicates != "off":
            checks["near_duplicate"] = rules_.near_duplicates
        if name == "eval" and rules_.text_fields and rules_.leakage != "off":
            checks["leakage"] = rules_.leakage
        if name == "eval" and rules_.label_field and rules_.label_coverage != "off":
            checks["label_coverage"] = rules_.label_coverage
        return checks

    def _batch(self, result: SplitResult, records: list[Record]) -> None:
        if not records:
            return
        # The PII scan (redact) and token counts write into the row; without them the parsed dict is used as is.
        mutates = self.scanner is not None or self.measure_tokens is not None
        rows = [dict(r.value) for r in records] if mutates else [r.value for r in records]
        reasons: list[list[Reason]] = [[] for _ in records]
        if self.scanner is not None:
            for i, (record, row) in enumerate(zip(records, rows, strict=True)):
                reasons[i] = self._scan(result, record.row, row)
        if self.measure_tokens is not None:
            live = [i for i, r in enumerate(reasons) if not r]
            for i, (prompt, total) in zip(live, self.measure_tokens([rows[i] for i in live]), strict=True):
                reasons[i] += self._token_reasons(prompt, total)
                rows[i]["_tokens"] = total
        seen, train_seen = self._hashes[result.name], self._hashes.get("train") if result.name == "eval" else None
        texts: list[str] = []
        accepted = self._accepted[result.name]
        # Bound once per batch, not looked up per row (attribute lookups were a tenth of this loop).
        leakage, exact = self.rules.leakage, self.rules.exact_duplicates
        text_of, row_id, labels_of, keep_rows = self._text, self._row_id, self._labels, self.keep_rows
        near, id_field = self.near, self.contract.id_field
        add_row, add_id, add_labels = accepted.rows.append, accepted.ids.append, accepted.labels.append
        for record, row, why in zip(records, rows, reasons, strict=True):
            normalized = text_of(row)
            number = record.row
            if not why and normalized is not None:
                digest = text_hash(normalized)
                if train_seen is not None and digest in train_seen and leakage != "off":
                    pair = {"row": number, "train_row": train_seen[digest], "similarity": 1.0}
                    result.note("leakage", leakage, number, pair)
                    self._exact_leaks.add(number)
                    if leakage == "quarantine":
                        message = f"same text as train row {train_seen[digest]} after normalization"
                        why.append(Reason("leakage", self._text_field, message))
                first = seen.setdefault(digest, number)  # kept even when off: eval leakage looks train up
                if first != number and exact != "off":
                    pair = {"row": number, "duplicate_of": first}
                    result.note("exact_duplicate", exact, number, pair)
                    if exact == "quarantine":
                        message = f"same text as row {first} after normalization (case, whitespace, punctuation)"
                        why.append(Reason("exact_duplicate", self._text_field, message))
            if why:
                self._quarantine(result, number, row, why)
                continue
            tokens = row.pop("_tokens", None)
            add_row(number)
            value = row.get(id_field) if id_field else None
            add_id(value if type(value) is str or type(value) is int else row_id(row))  # exact types: the common case
            add_labels(labels_of(row))
            if tokens is not None:
                accepted.tokens.append(tokens)
            if near and normalized is not None:
                texts.append(normalized)
            if keep_rows:
                result.rows.append({**row, "_row": number})
        if texts:
            signatures = self.hasher.signatures(texts)
            accepted.keys.append(self.hasher.band_keys(signatures))
            # b-bit MinHash (Li and Koenig): the top 16 bits of each value estimate the similarity with a bias of
            # (1 - J) / 65536, and halve the memory that dominates at 1M rows (128 bytes a row instead of 256).
            accepted.signatures.append((signatures >> 16).astype(np.uint16))

    def _scan(self, result: SplitResult, row_number: int, row: dict[str, Any]) -> list[Reason]:
        reasons = []
        for name, policy in self.pii_fields.items():
            value = row.get(name)
            if not isinstance(value, str):
                continue
            findings = self.scanner.scan(value)
            if not findings:
                continue
            entities = Counter(f.entity for f in findings)
            result.note(
                f"pii_{policy}", policy, row_number, by=Counter({f"{name}:{e}": n for e, n in entities.items()})
            )
            found = ", ".join(f"{entity} x{count}" for entity, count in sorted(entities.items()))
            if policy == "block":
                reasons.append(Reason("pii", name, f"{found} found; the field's pii policy is block"))
            elif policy == "redact":
                row[name] = redact(value, findings)
        return reasons

    def _token_reasons(self, prompt: int, total: int) -> list[Reason]:
        rules = self.contract.tokens
        assert rules is not None
        if self.max_tokens is not None and total > self.max_tokens:
            cut = "all of the completion" if prompt >= self.max_tokens else f"{total - self.max_tokens} tokens of it"
            return [
                Reason(
                    "max_tokens",
                    None,
                    f"example is {total} tokens (prompt {prompt} + completion {total - prompt}), above max_tokens "
                    f"{self.max_tokens}: truncation would cut {cut}, so the labels would be lost",
                )
            ]
        if total < rules.min_tokens:
            return [Reason("min_tokens", None, f"example is {total} tokens, at least {rules.min_tokens} required")]
        return []

    @property
    def _text_field(self) -> str | None:
        return "+".join(self.rules.text_fields) or None

    def _text(self, row: dict[str, Any]) -> str | None:
        fields = self.rules.text_fields
        if not fields:
            return None
        if len(fields) == 1:
            return normalize(str(row.get(fields[0]) or ""))
        return normalize(" ".join(str(row.get(f) or "") for f in fields))

    def _row_id(self, row: Any) -> str | int | None:
        value = row.get(self.contract.id_field) if isinstance(row, dict) and self.contract.id_field else None
        return value if isinstance(value, (str, int)) and not isinstance(value, bool) else None

    def _labels(self, row: dict[str, Any]) -> tuple[str, ...]:
        field_name = self.rules.label_field
        if field_name is None:
            return ()
        value = row.get(field_name)
        raw = tuple(value) if isinstance(value, list) else (value,)
        # Keys are all-str tuples and no other JSON value equals a str: a hit is exactly the converted tuple.
        shared = self._label_sets.get(raw)
        if shared is not None:
            return shared
        labels = tuple(v if type(v) is str else json.dumps(v, sort_keys=True) for v in raw)
        # One shared tuple per distinct label set: a million rows carry a few thousand combinations.
        return self._label_sets.setdefault(labels, labels)

    def _quarantine(self, result: SplitResult, row_number: int, row: Any, reasons: list[Reason]) -> None:
        result.quarantined.append(
            {
                "split": result.name,
                "row": row_number,
                "id": _printable(self._row_id(row)),
                "reasons": [r.to_dict() for r in reasons],
            }
        )
        checks = {r.check for r in reasons}
        result.check_counts.update(checks)
        for check in checks:
            if check not in _NOTED_BY_CHECK:  # those were noted where found: once per row, not twice
                result.note(check, "quarantine", row_number)

    # -- after a split ---------------------------------------------------------------------------
    def _near_duplicates(self, result: SplitResult) -> None:
        accepted = self._accepted[result.name]
        if not self.near or not accepted.signatures:
            return
        signatures = np.concatenate(accepted.signatures)
        accepted.signatures = [signatures]
        keys = np.concatenate(accepted.keys)
        accepted.keys = []
        threshold = self.rules.near_duplicate_threshold
        late: dict[int, list[Reason]] = {}
        if result.name == "eval" and self._train_index is not None and self.rules.leakage != "off":
            train_rows = self._accepted["train"].rows
            for q, m, s in self._train_index.query(keys, signatures, threshold):
                row, train_row = accepted.rows[q], train_rows[m]
                if row in self._exact_leaks:
                    continue
                result.note("leakage", self.rules.leakage, row, {"row": row, "train_row": train_row, "similarity": s})
                if self.rules.leakage == "quarantine":
                    message = f"near-duplicate of train row {train_row} (estimated similarity {s:.2f} >= {threshold})"
                    late.setdefault(q, []).append(Reason("leakage", self._text_field, message))
        if self.rules.near_duplicates != "off":
            for later, earlier, s in pairs_within(keys, signatures, threshold):
                row, first = accepted.rows[later], accepted.rows[earlier]
                pair = {"row": row, "similar_to": first, "similarity": round(s, 3)}
                result.note("near_duplicate", self.rules.near_duplicates, row, pair)
                if self.rules.near_duplicates == "quarantine":
                    message = f"near-duplicate of row {first} (estimated similarity {s:.2f} >= {threshold})"
                    late.setdefault(later, []).append(Reason("near_duplicate", self._text_field, message))
        if result.name == "train" and self.rules.leakage != "off":
            self._train_index = LshIndex.build(keys, signatures)
        self._late_quarantine(result, late)

    def _late_quarantine(self, result: SplitResult, late: dict[int, list[Reason]]) -> None:
        """Move accepted rows (by position) to quarantine after a dataset-level check."""
        if not late:
            return
        accepted = self._accepted[result.name]
        for position, reasons in late.items():
            self._quarantine(result, accepted.rows[position], {}, reasons)
            result.quarantined[-1]["id"] = accepted.ids[position]
        drop = {accepted.rows[p] for p in late}
        keep = [i for i, row in enumerate(accepted.rows) if row not in drop]
        accepted.rows = array("q", (accepted.rows[i] for i in keep))
        accepted.ids = [accepted.ids[i] for i in keep]
        accepted.labels = [accepted.labels[i] for i in keep]
        if len(accepted.tokens) == len(keep) + len(drop):
            accepted.tokens = array("l", (accepted.tokens[i] for i in keep))
        if accepted.signatures:
            accepted.signatures = [accepted.signatures[0][keep]]
        if self.keep_rows:
            result.rows = [r for r in result.rows if r["_row"] not in drop]

    def _finalize(self, result: SplitResult) -> None:
        accepted = self._accepted[result.name]
        result.accepted_count = len(accepted.rows)
        result.label_counts = Counter(label for labels in accepted.labels for label in labels)
        result.token_lengths = list(accepted.tokens)
        result.quarantined.sort(key=lambda q: q["row"])

    # -- after both splits -----------------------------------------------------------------------
    def finish(self) -> dict[str, Any]:
        """Label coverage (eval vs train), then the dataset part of report.json."""
        train, evaluation = self.splits.get("train"), self.splits.get("eval")
        out: dict[str, Any] = {}
        if evaluation is not None:
            if train is not None and self.rules.label_field and self.rules.label_coverage != "off":
                out["label_coverage"] = self._coverage(train, evaluation)
            self._finalize(evaluation)
        if train is not None and train.label_counts:
            counts = train.label_counts
            rare = sorted((label for label, n in counts.items() if n < self.rules.rare_label_count), key=counts.get)
            out["rare_labels"] = {
                "below": self.rules.rare_label_count,
                "count": len(rare),
                "labels": {label: counts[label] for label in rare[:50]},
            }
            ratio = max(counts.values()) / min(counts.values())
            out["imbalance"] = {
                "ratio": round(ratio, 3),
                "max_ratio": self.rules.max_imbalance_ratio,
                "warning": self.rules.max_imbalance_ratio is not None and ratio > self.rules.max_imbalance_ratio,
            }
        if self.scanner is not None:
            out["pii"] = {
                "fields": self.pii_fields,
                "entities": self.scanner.entities,
                "unavailable": self.scanner.unavailable,
                "detector": "presidio-analyzer, pattern recognizers"
                + (f" + spaCy {self.scanner.model}" if self.scanner.model else " (no NLP model)"),
            }
        return out

    def _coverage(self, train: SplitResult, evaluation: SplitResult) -> dict[str, Any]:
        k = self.rules.min_train_count
        accepted = self._accepted["eval"]
        train_counts = Counter(label for labels in self._accepted["train"].labels for label in labels)
        uncovered: dict[str, dict[str, int]] = {}
        late: dict[int, list[Reason]] = {}
        for position, labels in enumerate(accepted.labels):
            missing = [label for label in labels if train_counts[label] < k]
            for label in missing:
                entry = uncovered.setdefault(label, {"train_count": train_counts[label], "eval_rows": 0})
                entry["eval_rows"] += 1
            if missing:
                row = accepted.rows[position]
                evaluation.note("label_coverage", self.rules.label_coverage, row, by=Counter(missing))
                if self.rules.label_coverage == "quarantine":
                    seen = ", ".join(f"{label} ({train_counts[label]}x)" for label in missing)
                    message = f"label(s) seen fewer than {k} times in train: {seen}; the model cannot learn them"
                    late[position] = [Reason("label_coverage", self.rules.label_field, message)]
        self._late_quarantine(evaluation, late)
        return {
            "action": self.rules.label_coverage,
            "min_train_count": k,
            "uncovered_labels": len(uncovered),
            "labels": dict(sorted(uncovered.items())[:100]),
        }


def validate_split(name: str, path: str | Path, contract: DataContract) -> SplitResult:
    """Check one split on its own (no cross-split checks); see ``ContractRun`` for the whole contract."""
    run = ContractRun(contract)
    result = run.split(name, path)
    if name != "train":
        run.finish()
    return result


def build_report(
    contract_path: str | Path, contract: DataContract, splits: list[SplitResult], dataset: dict[str, Any] | None = None
) -> dict[str, Any]:
    """report.json: per split counts that reconcile, content hashes, every check with its count and examples."""
    contract_bytes = Path(contract_path).read_bytes()
    return {
        "contract": {
            "name": contract.name,
            "version": contract.version,
            "path": str(contract_path),
            "sha256": hashlib.sha256(contract_bytes).hexdigest(),
        },
        "splits": {s.name: s.summary() for s in splits},
        "dataset": dataset or {},
        "reconciled": all(s.rows_in == s.rows_accepted + s.rows_quarantined for s in splits),
    }


def over_threshold(contract: DataContract, splits: list[SplitResult]) -> list[str]:
    """Messages for splits whose quarantined fraction, emptiness or size should stop the job."""
    problems = []
    for split in splits:
        if split.rows_in == 0:
            problems.append(f"{split.path}: the {split.name} file is empty (no rows)")
            continue
        if split.rows_accepted == 0:
            failed = ", ".join(f"{check} x{n}" for check, n in split.check_counts.most_common(3))
            problems.append(
                f"{split.path}: no row of the {split.name} split passed the contract ({failed}); "
                "see validation/quarantine.jsonl"
            )
            continue
        fraction = split.rows_quarantined / split.rows_in
        if fraction > contract.max_quarantine_fraction:
            problems.append(
                f"{split.path}: {split.rows_quarantined} of {split.rows_in} {split.name} rows quarantined "
                f"({fraction:.1%}), above the contract's max_quarantine_fraction "
                f"{contract.max_quarantine_fraction:.1%}; see validation/quarantine.jsonl"
            )
        least = contract.dataset.min_rows.get(split.name)  # type: ignore[call-overload]
        if least is not None and split.rows_accepted < least:
            problems.append(
                f"{split.path}: {split.rows_accepted} accepted {split.name} rows, fewer than the contract's "
                f"dataset.min_rows.{split.name} {least}"
            )
    return problems


def _json_type(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, int):
        return "integer"
    if isinstance(value, float):
        # "expected number, got number" for NaN would explain nothing: say which value it is.
        return "number" if math.isfinite(value) else f"{_NON_FINITE[repr(value)]} (not a finite number)"
    if isinstance(value, str):
        return "string"
    if isinstance(value, list):
        return "list"
    if isinstance(value, dict):
        return "object"
    return type(value).__name__


_NON_FINITE = {"nan": "NaN", "inf": "Infinity", "-inf": "-Infinity"}


def _hashable(value: Any) -> Any:
    return json.dumps(value, sort_keys=True) if isinstance(value, (list, dict)) else value


def _clip(value: Any, limit: int = 60) -> str:
    text = str(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."
