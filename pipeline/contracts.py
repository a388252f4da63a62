"""Data contracts: what a row must look like, checked before a GPU-hour is spent.

A contract is YAML in ``data_contracts/``. It lists the fields of a row and the checks each must pass, and the
checks across rows and splits. This module holds the contract's schema (``DataContract``), ``load_contract``,
and the row checks (``check_row``, and ``row_passes``, its fast yes/no twin). Reading the files is ``records``;
running a whole split through the contract (PII, tokens, duplicates, leakage, coverage) is ``splits``.

This module imports no torch, transformers or mlflow. The ICD-10-CM table (``simple-icd-10-cm``) is
imported only when a contract names that vocabulary.
"""

from __future__ import annotations

import json
import math
import re
from collections import Counter
from collections.abc import Callable
from functools import cache, lru_cache
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from pipeline import chat, icd10cm
from pipeline.pii import PII_ENTITIES
from pipeline.recipe import RecipeError
from pipeline.records import ContractFailed as ContractFailed  # re-exported: callers catch contracts.ContractFailed
from pipeline.records import Reason, json_type
from pipeline.schema_errors import format_validation_errors

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


class ConversationRules(BaseModel):
    """Rows are OpenAI chat-format examples: OpenAI's documented file checks run on each (``pipeline.chat``)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    legacy_functions: Literal["convert", "refuse"] = Field(
        default="convert",
        description="Rows in the legacy functions/function_call form: 'convert' them to tools/tool_calls, or "
        "'refuse' (quarantine) them. Never dropped silently.",
    )
    pii: Literal["block", "redact", "warn"] | None = Field(
        default=None,
        description="PII/PHI policy over every message's text and every tool call's arguments (as a field's pii).",
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
    conversation: ConversationRules | None = Field(
        default=None,
        description="Rows are OpenAI chat-format conversations (task: chat): each is checked as OpenAI checks a "
        "fine-tuning file (roles, content types, tool calls and their ids, weights, last message from the "
        "assistant, something to train on); duplicates and leakage compare the conversation before its final "
        "assistant message.",
    )
    dataset: DatasetRules = Field(default_factory=DatasetRules, description="Checks across rows and splits.")

    @model_validator(mode="after")
    def _non_empty(self) -> DataContract:
        if not self.fields:
            raise ValueError("a contract must list at least one field")
        for name in [*self.dataset.text_fields, *([self.dataset.label_field] if self.dataset.label_field else [])]:
            if name not in self.fields:
                raise ValueError(f"dataset names field {name!r}, which is not in fields")
        if self.conversation is not None and "messages" not in self.fields:
            raise ValueError("a conversation contract lists the `messages` field (type: list, items: object)")
        return self


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
            if not vocabulary_values(str(file)):
                errors.append(f"{source}: fields.{name}.vocabulary_file: {file} lists no value")
        except (OSError, UnicodeDecodeError) as exc:
            errors.append(f"{source}: fields.{name}.vocabulary_file: cannot read {file}: {exc}")
        update["vocabulary_file"] = str(file)
    if rule.items is not None:
        update["items"] = _resolve_files(f"{name}.items", rule.items, base, errors, source)
    return rule.model_copy(update=update) if update else rule


@cache
def vocabulary_values(path: str) -> frozenset[str]:
    """Values of a vocabulary file: one per line, blank lines and '#' comments ignored."""
    lines = Path(path).read_text(encoding="utf-8-sig").splitlines()
    return frozenset(v for v in (line.split("#", 1)[0].strip() for line in lines) if v)


# --------------------------------------------------------------------------------------------------
# Row checks


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
        return [Reason("type", name, f"expected {rule.type}, got {json_type(value)}")]
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
        and str(value) not in vocabulary_values(rule.vocabulary_file)
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
            # formatting "codes[0]" for every one was a measurable cost (benchmarks/contracts.md).
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


def conversation_row(row: Any, contract: DataContract) -> tuple[Any, list[Reason]]:
    """A chat row in its current form (legacy functions converted, or refused), and why it cannot be."""
    rules = contract.conversation
    if rules is None or type(row) is not dict:
        return row, []
    converted, problems = chat.normalize(row)
    if converted is not row and rules.legacy_functions == "refuse":
        message = "the legacy functions/function_call form; the contract refuses it (legacy_functions: refuse)"
        return row, [Reason("legacy_functions", "functions", message)]
    return converted, [Reason(*p) for p in problems]


def check_row(row: Any, contract: DataContract) -> list[Reason]:
    """All the reasons a parsed JSON value fails the contract (empty when it passes)."""
    if not isinstance(row, dict):
        return [Reason("row_type", None, f"expected a JSON object, got {json_type(row)}")]
    reasons: list[Reason] = []
    if contract.conversation is not None and isinstance(row.get("messages"), list):
        # A missing or non-list conversation is the field rule's reason (required / type), not reported twice.
        reasons += [Reason(*p) for p in chat.check(row)]
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

    Most rows pass, and ``check_row`` walks the pydantic rules field by field for each one (its cost is in
    benchmarks/contracts.md). This closure does the same checks with the rules bound once: exact type tests,
    precompiled ``fullmatch``, and a memo of string items already checked (a medical-coding split repeats a few
    thousand codes a million times). It only ever answers "passes"; a row it does not pass goes through
    ``check_row``, which builds the reasons, so the reasons are the same by construction.
    """
    checks = [(name, rule.required, _value_passes(rule)) for name, rule in contract.fields.items()]
    known = frozenset(contract.fields)
    reject_extra = contract.extra_fields == "reject"
    if contract.conversation is not None:
        return lambda row: not check_row(row, contract)

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
        vocabulary = vocabulary_values(rule.vocabulary_file) if rule.vocabulary_file is not None else None
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


def _hashable(value: Any) -> Any:
    return json.dumps(value, sort_keys=True) if isinstance(value, (list, dict)) else value


def _clip(value: Any, limit: int = 60) -> str:
    text = str(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."
