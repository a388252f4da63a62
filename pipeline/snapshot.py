"""The baseline snapshot: every answer of the commercial model, kept so the comparison outlives the model.

An OpenAI fine-tune stops answering when its base model is retired. The snapshot is a JSONL file, one record
per prompt: the prompt's SHA-256 (over the exact messages sent), the model asked for and the model id the
provider reported, the answer and whether it stopped on its own, the token usage, the latency and the time it
was answered, plus ``record_sha256`` over the record itself, so an edited record is refused on reading.
``baseline.snapshot: PATH`` scores from such a file alone (``pipeline.baseline``): no key, no network, the
same numbers as the live run. It is appended to (never rewritten) and fsynced, so an interruption loses at
most the record being written.

Leaf module: standard library and ``rundir``'s file hash only.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

from pipeline.rundir import sha256_file

SNAPSHOT_FILE = "baseline_snapshot.jsonl"
# The answer fields scoring reads: with these equal, every metric, latency and cost is equal.
ANSWER_FIELDS = ("text", "stopped", "tokens_in", "tokens_out", "usage_reported", "latency_s")


def prompt_sha256(messages: list[dict[str, Any]]) -> str:
    """SHA-256 of the messages sent, as canonical JSON (key order and spacing do not matter)."""
    body = json.dumps(messages, sort_keys=True, ensure_ascii=False, separators=(",", ":"))
    return hashlib.sha256(body.encode("utf-8")).hexdigest()


def _record_hash(record: dict[str, Any]) -> str:
    body = {k: v for k, v in record.items() if k != "record_sha256"}
    return hashlib.sha256(json.dumps(body, sort_keys=True, ensure_ascii=False).encode("utf-8")).hexdigest()


def make_record(provider: str, model: str, messages: list[dict[str, Any]], answer: dict[str, Any]) -> dict[str, Any]:
    """The snapshot record of one answer (an answer dict of ``baseline``: text, stopped, usage, latency...)."""
    record = {
        "prompt_sha256": prompt_sha256(messages),
        "provider": provider,
        "model": model,
        "model_reported": answer.get("model_reported"),
        "answered_at": answer.get("answered_at"),
        "answer": answer["text"],
        "stopped": bool(answer["stopped"]),
        "usage": {
            "tokens_in": int(answer["tokens_in"]),
            "tokens_out": int(answer["tokens_out"]),
            "reported": bool(answer.get("usage_reported", True)),
        },
        "latency_s": answer.get("latency_s"),
    }
    return {**record, "record_sha256": _record_hash(record)}


def read_snapshot(path: str | Path) -> tuple[dict[tuple[str, str], dict[str, Any]], int]:
    """(records by (model, prompt SHA-256), number of lines refused: not JSON or not matching their hash).

    Raises:
        OSError: The file cannot be read.
    """
    records: dict[tuple[str, str], dict[str, Any]] = {}
    refused = 0
    for line in Path(path).read_text(encoding="utf-8").splitlines():
        if not line.strip():
            continue
        try:
            record = json.loads(line)
            valid = isinstance(record, dict) and record.get("record_sha256") == _record_hash(record)
        except ValueError:
            valid = False
        if not valid:
            refused += 1
            continue
        records.setdefault((record["model"], record["prompt_sha256"]), record)
    return records, refused


def answer_of(record: dict[str, Any]) -> dict[str, Any]:
    """A snapshot record as the answer dict a live baseline call returns (``ANSWER_FIELDS`` and the model ids)."""
    usage = record["usage"]
    return {
        "text": record["answer"],
        "stopped": record["stopped"],
        "tokens_in": usage["tokens_in"],
        "tokens_out": usage["tokens_out"],
        "usage_reported": usage["reported"],
        "latency_s": record["latency_s"],
        "model_reported": record.get("model_reported"),
        "answered_at": record.get("answered_at"),
    }


def append_records(path: str | Path, records: list[dict[str, Any]]) -> int:
    """Append the records whose (model, prompt) the file does not hold yet; returns how many were added.

    Raises:
        OSError: The file cannot be read or written.
    """
    path = Path(path)
    have = read_snapshot(path)[0] if path.is_file() else {}
    unique: dict[tuple[str, str], dict[str, Any]] = {}
    for record in records:
        key = (record["model"], record["prompt_sha256"])
        if key not in have:
            unique.setdefault(key, record)
    if unique:
        path.parent.mkdir(parents=True, exist_ok=True)
        with path.open("a", encoding="utf-8") as handle:
            handle.writelines(json.dumps(r, ensure_ascii=False) + "\n" for r in unique.values())
            handle.flush()
            os.fsync(handle.fileno())
    return len(unique)


def dataset_input(path: str | Path, *, model: str, context: str = "baseline_snapshot") -> dict[str, Any]:
    """The snapshot file as an MLflow dataset input (``tracking.Tracker.log_inputs``): path, digest, counts.

    No answer text is logged: the source is the path, the digest the file's SHA-256, the profile its counts.
    """
    path = Path(path)
    sha = sha256_file(path)
    records, refused = read_snapshot(path)
    columns = ["prompt_sha256", "provider", "model", "model_reported", "answered_at", "answer", "stopped", "usage"]
    return {
        "name": f"{context}:{path.name}",
        "digest": sha[:32],  # MLflow keeps 36 characters of a digest; tracking.DIGEST_CHARS
        "source_type": "local",
        "source": json.dumps({"uri": str(path.resolve()), "sha256": sha}),
        "schema": json.dumps({"mlflow_colspec": [{"name": c, "type": "string", "required": True} for c in columns]}),
        "profile": json.dumps({"records": len(records), "refused_lines": refused, "sha256": sha}),
        "tags": {"mlflow.data.context": context, "baseline.model": model},
    }
