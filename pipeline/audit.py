"""Audit trail: an append-only, hash-chained JSON Lines record of every command.

Each entry holds when, who, where, what was run, the recipe's hash, the hashes of the input data and of the
outputs, the egress decisions, and the outcome. Each entry also stores the hash of the previous entry and its
own hash over everything else, so editing, removing or reordering any entry breaks the chain, which
``python -m pipeline audit verify`` reports with the line number.

What the chain cannot show on its own is the newest entries being cut off the end. ``audit.head`` beside the
log keeps the latest hash and count (and each training run records its entry hash in MLflow), so a
truncated log is caught as long as the head file or the MLflow store is not rewritten too.

Leaf module: standard library only.
"""

from __future__ import annotations

import fcntl
import getpass
import hashlib
import json
import os
import socket
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from pipeline.errors import JobFailed
from pipeline.rundir import sha256_file

DEFAULT_LOG = Path("runs") / "audit.jsonl"
GENESIS = "0" * 64
SKIP_DIRS = {"checkpoints"}  # large and transient; the adapter they lead to is hashed


def hash_outputs(run_dir: Path | None) -> dict[str, str]:
    """Relative path -> SHA-256 for every file a command left in its run directory."""
    if run_dir is None or not run_dir.is_dir():
        return {}
    hashes = {}
    for path in sorted(run_dir.rglob("*")):
        relative = path.relative_to(run_dir)
        if path.is_file() and not SKIP_DIRS.intersection(relative.parts):
            try:
                hashes[str(relative)] = sha256_file(path)
            except OSError as exc:  # the entry is still written, saying which output could not be read
                hashes[str(relative)] = f"unreadable: {exc.strerror or type(exc).__name__}"
    return hashes


class AuditLogCorrupt(JobFailed):
    """The log's last entry cannot be read, so no new entry can be chained to it (``audit verify`` says more)."""


def current_user() -> str:
    """The user name; the numeric uid where there is none (a container user without a passwd entry)."""
    try:
        return getpass.getuser()
    except (KeyError, OSError, ImportError):
        return f"uid:{os.getuid()}"


def _entry_hash(entry: dict[str, Any]) -> str:
    body = {k: v for k, v in entry.items() if k != "hash"}
    return hashlib.sha256(json.dumps(body, sort_keys=True, ensure_ascii=False).encode("utf-8")).hexdigest()


def append(log: Path, record: dict[str, Any]) -> dict[str, Any]:
    """Append one entry to the chain (under an exclusive lock, so concurrent commands cannot interleave).

    Args:
        log: The audit log file.
        record: What happened (command, recipe hash, inputs, outputs, egress, status...).

    Returns:
        The entry as written, with ``seq``, ``prev`` and ``hash``.

    Raises:
        AuditLogCorrupt: The last line is not an entry (edited, or half-written by a crash); nothing is written,
            because chaining to it would hide the damage.
    """
    log.parent.mkdir(parents=True, exist_ok=True)
    with log.open("a+", encoding="utf-8") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        handle.seek(0)
        lines = [line for line in handle.read().splitlines() if line.strip()]
        prev, seq = GENESIS, 0
        if lines:
            last = _parse(lines[-1])
            if last is None:
                raise AuditLogCorrupt(
                    f"{log}:{len(lines)}: the last line is not an audit entry, so no entry can be chained to it; "
                    f"run `python -m pipeline audit verify --log {log}`, then restore the log from a copy or start "
                    "a new one (move this one aside and keep it as evidence)"
                )
            prev, seq = last["hash"], last["seq"] + 1
        entry = {
            "seq": seq,
            "time": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "user": current_user(),
            "host": socket.gethostname(),
            "pid": os.getpid(),
            **record,
            "prev": prev,
        }
        entry["hash"] = _entry_hash(entry)
        handle.seek(0, os.SEEK_END)
        handle.write(json.dumps(entry, ensure_ascii=False, sort_keys=True) + "\n")
        handle.flush()
        os.fsync(handle.fileno())
        _write_head(log, entry)
    return entry


def _parse(line: str) -> dict[str, Any] | None:
    """An entry read back from a line, or None when the line is not one (not JSON, no hash, no integer seq)."""
    try:
        entry = json.loads(line)
    except ValueError:
        return None
    ok = isinstance(entry, dict) and isinstance(entry.get("hash"), str)
    return entry if ok and isinstance(entry.get("seq"), int) and not isinstance(entry["seq"], bool) else None


def _head_path(log: Path) -> Path:
    return log.with_name(log.stem + ".head")


def _write_head(log: Path, entry: dict[str, Any]) -> None:
    head = _head_path(log)
    tmp = head.with_suffix(".tmp")
    tmp.write_text(json.dumps({"seq": entry["seq"], "hash": entry["hash"]}) + "\n", encoding="utf-8")
    os.replace(tmp, head)


def verify(log: Path) -> list[str]:
    """Check the whole chain; an empty list means it is intact.

    Returns:
        One message per problem, each naming the line.
    """
    if not log.is_file():
        return [f"{log}: no audit log here"]
    problems = []
    prev, expected_seq = GENESIS, 0
    last: dict[str, Any] | None = None
    for number, line in enumerate(log.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            problems.append(f"{log}:{number}: blank line inside the log")
            continue
        entry = _parse(line)
        if entry is None:
            # Not an entry: the chain cannot be followed through it. The next entry is checked against the one
            # before, so a removed or replaced line is also reported there.
            problems.append(f"{log}:{number}: not an audit entry (not JSON, or no hash or integer seq): edited")
            expected_seq += 1
            continue
        if entry.get("hash") != _entry_hash(entry):
            problems.append(f"{log}:{number}: entry {entry.get('seq')} was edited (its hash does not match)")
        if entry.get("prev") != prev:
            problems.append(
                f"{log}:{number}: entry {entry.get('seq')} does not follow the previous entry "
                "(an entry before it was removed, inserted or reordered)"
            )
        if entry.get("seq") != expected_seq:
            problems.append(f"{log}:{number}: sequence number {entry.get('seq')}, expected {expected_seq}")
        prev, expected_seq, last = entry["hash"], entry["seq"] + 1, entry
    if not problems and last is None:
        problems.append(f"{log}: the log is empty (no entries): it was emptied, or no command has run yet")
    head = _head_path(log)
    if head.is_file():
        try:
            anchor = json.loads(head.read_text(encoding="utf-8"))
        except ValueError:
            anchor = None
        if not isinstance(anchor, dict):
            problems.append(f"{head}: not a head record (corrupt or edited): the end of the log cannot be checked")
        elif last is None or anchor.get("hash") != last.get("hash"):
            problems.append(
                f"{head}: the log ends at entry {last.get('seq') if last else None} but the head records entry "
                f"{anchor.get('seq')}: entries were removed from the end or the head was replaced"
            )
    return problems
