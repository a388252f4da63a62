"""Data contracts: what a row must look like, checked before a GPU-hour is spent.

A contract is YAML in ``data_contracts/``. It lists the fields of a row and the checks each must pass.
``validate_split`` reads a JSON Lines file line by line: every line ends either accepted or in quarantine
with its line number and reasons, never dropped, so ``rows_in == rows_accepted + rows_quarantined``.

This module imports no torch, transformers or mlflow. The ICD-10-CM table (``simple-icd-10-cm``) is
imported only when a contract names that vocabulary.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from pipeline import icd10cm
from pipeline.recipe import RecipeError, format_validation_errors

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
        if self.type == "list" and self.items is None:
            raise ValueError("a list field needs an 'items' rule")
        if self.type != "list" and (self.items or self.min_items is not None or self.max_items is not None):
            raise ValueError("items/min_items/max_items apply to list fields only")
        return self


class DataContract(BaseModel):
    """A whole contract: the format of the files and the rules for their rows."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str = Field(description="Contract name, recorded in reports and MLflow.")
    version: int = Field(default=1, ge=1, description="Bump when the rules change; recorded with each run.")
    description: str | None = Field(default=None, description="What the data is, for people.")
    format: Literal["jsonl"] = Field(default="jsonl", description="File format of the splits: JSON Lines.")
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

    @model_validator(mode="after")
    def _non_empty(self) -> DataContract:
        if not self.fields:
            raise ValueError("a contract must list at least one field")
        return self


class ContractFailed(Exception):
    """The data broke the contract badly enough to stop the job (exit code 1)."""


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
        return DataContract.model_validate(raw)
    except ValidationError as exc:
        raise RecipeError(format_validation_errors(exc, DataContract, {}, default_file=str(path))) from None


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


def _type_ok(value: Any, kind: str) -> bool:
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
        if rule.pattern is not None and not re.fullmatch(rule.pattern, value):
            reasons.append(Reason("pattern", name, f"{_clip(value)!r} does not match {rule.pattern}"))
    if rule.enum is not None and value not in rule.enum:
        reasons.append(Reason("enum", name, f"{_clip(value)!r} is not one of {rule.enum}"))
    if rule.vocabulary == "icd10cm" and isinstance(value, str) and not reasons:
        status = icd10cm.status(value)
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
        if rule.unique_items:
            repeated = sorted({str(v) for v, n in Counter(map(_hashable, value)).items() if n > 1})
            if repeated:
                reasons.append(Reason("unique_items", name, f"repeated items: {', '.join(repeated)}"))
        assert rule.items is not None  # guaranteed by FieldRule._consistent
        for index, item in enumerate(value):
            reasons.extend(_check_value(f"{name}[{index}]", item, rule.items))
    return reasons


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


# --------------------------------------------------------------------------------------------------
# Splits


@dataclass
class SplitResult:
    """What one split turned into: accepted rows, quarantined rows, and counts that reconcile."""

    name: str
    path: str
    sha256: str
    rows: list[dict[str, Any]] = field(default_factory=list)
    quarantined: list[dict[str, Any]] = field(default_factory=list)
    check_counts: Counter = field(default_factory=Counter)
    rows_in: int = 0

    @property
    def rows_accepted(self) -> int:
        """Rows that passed every check."""
        return len(self.rows)

    @property
    def rows_quarantined(self) -> int:
        """Rows set aside with reasons."""
        return len(self.quarantined)

    def summary(self) -> dict[str, Any]:
        """The per-split part of report.json."""
        return {
            "path": self.path,
            "sha256": self.sha256,
            "rows_in": self.rows_in,
            "rows_accepted": self.rows_accepted,
            "rows_quarantined": self.rows_quarantined,
            "quarantined_fraction": round(self.rows_quarantined / self.rows_in, 6) if self.rows_in else 0.0,
            "failed_checks": dict(sorted(self.check_counts.items())),
        }


def validate_split(name: str, path: str | Path, contract: DataContract) -> SplitResult:
    """Read a JSON Lines split and check every line against the contract.

    Each physical line is one row, numbered from 1. A line that is blank, not UTF-8 or not JSON is
    quarantined with the reason, like a row that fails a check. Accepted rows carry their line number
    under ``_row``.

    Args:
        name: Split name ("train", "eval").
        path: The file.
        contract: The contract to enforce.

    Returns:
        The split's accepted rows, quarantined rows and counts.
    """
    path = Path(path)
    digest = hashlib.sha256()
    result = SplitResult(name=name, path=str(path), sha256="")
    with path.open("rb") as handle:
        for number, raw in enumerate(handle, start=1):
            digest.update(raw)
            result.rows_in += 1
            row, reasons = _parse_line(raw)
            if not reasons:
                reasons = check_row(row, contract)
            if reasons:
                row_id = row.get(contract.id_field) if isinstance(row, dict) and contract.id_field else None
                result.quarantined.append(
                    {
                        "split": name,
                        "row": number,
                        "id": row_id if isinstance(row_id, (str, int)) else None,
                        "reasons": [r.to_dict() for r in reasons],
                    }
                )
                result.check_counts.update({r.check for r in reasons})
            else:
                result.rows.append({**row, "_row": number})
    result.sha256 = digest.hexdigest()
    return result


def _parse_line(raw: bytes) -> tuple[Any, list[Reason]]:
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        return None, [Reason("encoding", None, f"not UTF-8 ({exc.reason} at byte {exc.start})")]
    text = text.lstrip("\ufeff").rstrip("\r\n")
    if not text.strip():
        return None, [Reason("blank_line", None, "blank line")]
    try:
        return json.loads(text, parse_constant=_reject_constant), []
    except ValueError as exc:
        return None, [Reason("json", None, f"not valid JSON: {exc}")]


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not valid JSON")


def build_report(contract_path: str | Path, contract: DataContract, splits: list[SplitResult]) -> dict[str, Any]:
    """report.json: per split counts that reconcile, the contract's identity, and failed-check counts."""
    contract_bytes = Path(contract_path).read_bytes()
    return {
        "contract": {
            "name": contract.name,
            "version": contract.version,
            "path": str(contract_path),
            "sha256": hashlib.sha256(contract_bytes).hexdigest(),
        },
        "splits": {s.name: s.summary() for s in splits},
        "reconciled": all(s.rows_in == s.rows_accepted + s.rows_quarantined for s in splits),
    }


def over_threshold(contract: DataContract, splits: list[SplitResult]) -> list[str]:
    """Messages for splits whose quarantined fraction (or emptiness) should stop the job."""
    problems = []
    for split in splits:
        if split.rows_accepted == 0:
            problems.append(f"{split.path}: no row of the {split.name} split passed the contract")
            continue
        fraction = split.rows_quarantined / split.rows_in
        if fraction > contract.max_quarantine_fraction:
            problems.append(
                f"{split.path}: {split.rows_quarantined} of {split.rows_in} {split.name} rows quarantined "
                f"({fraction:.1%}), above the contract's max_quarantine_fraction "
                f"{contract.max_quarantine_fraction:.1%}; see validation/quarantine.jsonl"
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
        return "number"
    if isinstance(value, str):
        return "string"
    if isinstance(value, list):
        return "list"
    if isinstance(value, dict):
        return "object"
    return type(value).__name__


def _hashable(value: Any) -> Any:
    return json.dumps(value, sort_keys=True) if isinstance(value, (list, dict)) else value


def _clip(value: Any, limit: int = 60) -> str:
    text = str(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."
