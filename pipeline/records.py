"""Records: every record of a JSON Lines, CSV or Parquet split file, each with its 1-based row number.

``iter_records`` streams a file and never skips a record: one that cannot be read (bad JSON, not UTF-8, a line
over the size limit, a CSV record with the wrong number of columns, a number beyond a double) comes back with its
``Reason`` list, for the contract to quarantine. A file that cannot be read at all is one ``DataFileError``.

This module knows file formats, not contracts: ``contracts`` and ``splits`` pass it the format, the row size
limit and the field types. pyarrow is imported only inside the Parquet reader.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from pipeline.errors import JobFailed

FileFormat = Literal["jsonl", "csv", "parquet"]


class ContractFailed(JobFailed):
    """The data broke the contract badly enough to stop the job (exit code 1).

    Defined here, below ``contracts``, because a file that cannot be read at all (``DataFileError``) is one.
    """

    def lines(self) -> list[str]:
        """The contract's findings under one heading."""
        return [f"data contract failed:\n{self}"]


@dataclass(frozen=True)
class Reason:
    """Why a row was quarantined: the check that failed, on which field, in words."""

    check: str
    field: str | None
    message: str

    def to_dict(self) -> dict[str, Any]:
        """JSON form used in quarantine.jsonl."""
        return {"check": self.check, "field": self.field, "message": self.message}


# Checks made while reading a file, per format (the row and dataset checks come from the contract).
READ_CHECKS: dict[str, tuple[str, ...]] = {
    "jsonl": ("json", "encoding", "blank_line", "row_type", "row_size", "non_finite"),
    "csv": ("csv", "csv_columns", "encoding", "blank_line", "non_finite"),
    "parquet": ("non_finite",),
}


class DataFileError(ContractFailed):
    """A data file that cannot be read at all (not Parquet, a CSV without a header): one error naming it."""


@dataclass
class Record:
    """One input record: its row number (JSONL/CSV: the line it starts on; Parquet: its position)."""

    row: int
    value: Any
    reasons: list[Reason]


def file_format(path: str | Path, fmt: Literal["auto", "jsonl", "csv", "parquet"] = "auto") -> FileFormat:
    """``fmt`` (a contract's ``format``), or for ``auto`` the one the file extension names."""
    if fmt != "auto":
        return fmt
    suffix = Path(path).suffix.lower()
    return "csv" if suffix == ".csv" else "parquet" if suffix in (".parquet", ".pq") else "jsonl"


def iter_records(
    path: str | Path,
    fmt: Literal["auto", "jsonl", "csv", "parquet"],
    max_row_bytes: int,
    field_types: Mapping[str, str],
) -> Iterator[Record]:
    """Stream the records of a split file; nothing is skipped, so every record gets a row number.

    Args:
        path: The split file.
        fmt: Its format, or ``auto`` (by the file extension, see ``file_format``).
        max_row_bytes: A longer line (or CSV record) is a record with a ``row_size`` (CSV: ``csv``) reason,
            never held in memory whole.
        field_types: Field name -> contract type (``string``, ``list``, ...): how CSV cells, which are all text,
            are typed. Fields not named stay text.

    Raises:
        DataFileError: The file cannot be read as its format at all (the message names the file).
    """
    fmt = file_format(path, fmt)
    if fmt == "csv":
        return _csv_records(Path(path), max_row_bytes, field_types)
    if fmt == "parquet":
        return _parquet_records(Path(path))
    return _jsonl_records(Path(path), max_row_bytes)


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


def _csv_records(path: Path, max_row_bytes: int, field_types: Mapping[str, str]) -> Iterator[Record]:
    import csv
    import io

    csv.field_size_limit(max_row_bytes)
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
                row = _typed_cells(dict(zip(header, cells, strict=True)), field_types)
                yield Record(number, row, value_reasons(row))  # a cell 1e400 or a JSON list cell with "\ud800"


def _has_surrogate(text: str) -> bool:
    return any("\udc80" <= ch <= "\udcff" for ch in text) if not text.isascii() else False


def _typed_cells(row: dict[str, Any], field_types: Mapping[str, str]) -> dict[str, Any]:
    """Types for CSV cells, which are all text.

    An empty cell is missing; a list field is a JSON array or ';'-separated values; numbers and booleans are
    parsed as JSON (a cell that does not parse stays text and fails the type check).
    """
    for name, kind in field_types.items():
        cell = row.get(name)
        if cell is None:
            continue
        if cell == "":
            row[name] = None
        elif kind == "list":
            if cell.lstrip().startswith("["):
                try:
                    row[name] = json.loads(cell, parse_constant=_reject_constant)
                except ValueError:
                    pass
            else:
                row[name] = [part.strip() for part in cell.split(";") if part.strip()]
        elif kind in ("integer", "number", "boolean"):
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
        # orjson (C) parses a line faster than the json module. It is only a fast path: whatever it refuses
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
                    Reason("non_finite", where or None, f"{json_type(value)}: only finite numbers are accepted")
                )
        elif kind is str:
            if not utf8_ok(value):
                reasons.append(
                    Reason("encoding", where or None, "a lone surrogate (e.g. \\ud800): not encodable as UTF-8")
                )
        elif kind is dict:
            for key, item in value.items():
                name = f"{where}.{key}" if where else str(key)
                if type(key) is str and not utf8_ok(key):
                    reasons.append(
                        Reason("encoding", None, "a field name holds a lone surrogate: not encodable as UTF-8")
                    )
                    name = where or "?"
                stack.append((name, item))
        elif kind is list:
            stack.extend((f"{where}[{i}]", item) for i, item in enumerate(value))
    return reasons


def utf8_ok(text: str) -> bool:
    """True when ``text`` can be encoded as UTF-8 (no lone surrogate)."""
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
# search, cheaper than re.search(rb"[0-9]{19}") (benchmarks/contracts.md).
_DIGITS = bytes(48 if 48 <= c <= 57 else 32 for c in range(256))
_LONG_INTEGER = b"0" * 19

try:
    import orjson as _orjson
except ImportError:  # optional speed-up: the json module alone gives the same results, slower
    _orjson = None


def json_type(value: Any) -> str:
    """The JSON name of a parsed value's type, as messages say it (``integer``, ``object``, ``NaN (not a ...)``)."""
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
