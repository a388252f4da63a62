"""The run directory: where every output of a command goes, written so a crash never leaves half a file.

Layout (see docs/architecture.md)::

    runs/<recipe-name>/<run-id>/
      recipe.resolved.yaml  plan.json
      validation/report.json  validation/quarantine.jsonl
      checkpoints/  adapter/
      eval/predictions.jsonl  eval/metrics.json  eval/report.md
"""

from __future__ import annotations

import hashlib
import json
import os
import secrets
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, BinaryIO

RUNS_ROOT = Path("runs")


def new_run_dir(recipe_name: str, run_dir: str | Path | None = None) -> Path:
    """Create the run directory: the one given, or ``runs/<recipe-name>/<UTC time>-<random>``."""
    if run_dir is None:
        stamp = datetime.now(timezone.utc).strftime("%Y%m%d-%H%M%S")
        run_dir = RUNS_ROOT / recipe_name / f"{stamp}-{secrets.token_hex(2)}"
    path = Path(run_dir)
    path.mkdir(parents=True, exist_ok=True)
    return path


def read_json(path: str | Path) -> dict[str, Any]:
    """A run-directory JSON file, or ``{}`` when the file is not there (a stage that did not run)."""
    path = Path(path)
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}


def write_text(path: str | Path, text: str) -> Path:
    """Write a file atomically: a temporary file in the same directory, then a rename over the target."""
    with atomic_open(path) as handle:
        handle.write(text.encode("utf-8"))
    return Path(path)


@contextmanager
def atomic_open(path: str | Path) -> Iterator[BinaryIO]:
    """A binary file written in a temporary file beside ``path`` and renamed over it only when the block ends.

    Streams of any size (a split of a million rows) are never visible half-written; on an error the temporary
    file is removed and ``path`` is untouched.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600; give the file the usual permissions
        with os.fdopen(fd, "wb") as handle:
            yield handle
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except OSError as exc:
        Path(tmp).unlink(missing_ok=True)
        if exc.filename is None:  # a failed write or fsync knows only a descriptor: name the file it was for
            raise OSError(exc.errno, exc.strerror, str(path)) from exc
        raise
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def sha256_file(path: str | Path) -> str:
    """Hex SHA-256 of a file, read in 1 MiB blocks (splits, outputs, adapters, checkpoints, weights)."""
    digest = hashlib.sha256()
    with Path(path).open("rb") as handle:
        while block := handle.read(1 << 20):
            digest.update(block)
    return digest.hexdigest()


def _umask() -> int:
    current = os.umask(0)
    os.umask(current)
    return current


def write_json(path: str | Path, data: Any) -> Path:
    """Atomic, indented JSON."""
    return write_text(path, json.dumps(data, indent=2, sort_keys=False, default=str) + "\n")


def write_jsonl(path: str | Path, rows: list[dict[str, Any]]) -> Path:
    """Atomic JSON Lines, one row per line."""
    return write_text(path, "".join(json.dumps(row, ensure_ascii=False, default=str) + "\n" for row in rows))


def replace_dir(partial: str | Path, target: str | Path) -> Path:
    """Move a directory that was written completely into place, replacing ``target`` if it exists.

    Every file is flushed to disk first, so the rename (atomic within a file system) never publishes a
    directory whose contents are still in the page cache. An older ``target`` (from an attempt that crashed
    after its rename) is moved aside and deleted only once the new one is in place.
    """
    import shutil

    partial, target = Path(partial), Path(target)
    for path in partial.rglob("*"):
        if path.is_file():
            with path.open("rb") as handle:
                os.fsync(handle.fileno())
    old = None
    if target.exists():
        old = target.with_name(f".{target.name}.old-{secrets.token_hex(2)}")
        os.replace(target, old)
    os.replace(partial, target)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
    return target
