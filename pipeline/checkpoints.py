"""Trainer checkpoints that are known to be complete: sealed after writing, verified before resuming.

The trainer (transformers' ``Trainer._save_checkpoint``) writes ``checkpoints/checkpoint-<step>/`` file by file:
adapter, optimizer, scheduler, RNG states, trainer state. A crash (``kill -9``, a lost node, a full disk) in the
middle leaves a directory that looks like a checkpoint but is not one, and resuming from it fails late or,
worse, silently continues from a mix of two steps. So:

- ``seal(dir)`` runs once the trainer has written a checkpoint: every file is flushed to disk (``fsync``) and its
  size and SHA-256 are recorded in ``pipeline_checkpoint.json``, written last and atomically (temp file +
  rename). A checkpoint without that file is by definition incomplete.
- ``latest_valid(checkpoints_dir)`` walks the checkpoints newest first and returns the first whose files all
  match their seal. Each one skipped is named with the reason and, in the process that owns the run (rank 0),
  renamed to ``invalid-checkpoint-<step>`` so the trainer's rotation never counts it as a checkpoint again.
- ``resume_checkpoint(run_dir, recipe)`` is ``train --resume``'s prologue: the run may be resumed, and from
  which checkpoint; ``check_train_split`` then refuses a train split that changed since the run started.

Light module (standard library only): the launcher process uses it before any worker starts.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pipeline import rundir
from pipeline.errors import UsageError
from pipeline.recipe import flatten

if TYPE_CHECKING:
    from pipeline.recipe import Recipe

SEAL = "pipeline_checkpoint.json"
_CHECKPOINT = re.compile(r"^checkpoint-(\d+)$")


class ResumeError(UsageError):
    """A run cannot be resumed (nothing valid to resume from, a finished run, a changed recipe or data)."""


def seal(checkpoint: str | Path, step: int) -> dict:
    """Flush a checkpoint's files to disk and record their sizes and hashes, atomically, as the last write.

    Args:
        checkpoint: The ``checkpoint-<step>`` directory the trainer just finished writing.
        step: Its optimizer step.

    Returns:
        The seal that was written.
    """
    checkpoint = Path(checkpoint)
    files = {}
    for path in sorted(p for p in checkpoint.rglob("*") if p.is_file() and p.name != SEAL):
        with path.open("rb") as handle:
            os.fsync(handle.fileno())  # the data is on disk before the seal that vouches for it
        sealed = {"bytes": path.stat().st_size, "sha256": rundir.sha256_file(path)}
        files[path.relative_to(checkpoint).as_posix()] = sealed
    record = {"step": step, "files": files}
    rundir.write_json(checkpoint / SEAL, record)
    return record


def verify(checkpoint: str | Path) -> str | None:
    """Why a checkpoint cannot be trusted, or None when every sealed file is present and unchanged."""
    import json

    checkpoint = Path(checkpoint)
    marker = checkpoint / SEAL
    if not marker.is_file():
        return f"no {SEAL}: it was never completed (the process stopped while writing it)"
    try:
        record = json.loads(marker.read_text(encoding="utf-8"))
        files = record["files"]
    except (ValueError, KeyError, TypeError) as exc:
        return f"{SEAL} is unreadable ({type(exc).__name__})"
    if not files:
        return f"{SEAL} lists no files"
    for name, expected in files.items():
        path = checkpoint / name
        if not path.is_file():
            return f"{name} is missing"
        size = path.stat().st_size
        if size != expected["bytes"]:
            return f"{name} has {size:,} bytes, {expected['bytes']:,} when it was written"
        if rundir.sha256_file(path) != expected["sha256"]:
            return f"{name} does not match its SHA-256 from when it was written (the file changed or is corrupt)"
    return None


def rotate(checkpoints_dir: str | Path, keep: int) -> list[Path]:
    """Delete checkpoints older than the newest ``keep`` sealed ones; returns what was deleted.

    Called right after a checkpoint is sealed, never before: the trainer's own rotation deleted old checkpoints
    before the new one was sealed, so with one kept a crash in between left nothing to resume from. Only a
    sealed checkpoint counts towards ``keep``; one newer than every sealed checkpoint is never deleted here.
    """
    import shutil

    checkpoints_dir = Path(checkpoints_dir)
    if not checkpoints_dir.is_dir():
        return []
    found = sorted(
        (p for p in checkpoints_dir.iterdir() if p.is_dir() and checkpoint_step(p) is not None),
        key=checkpoint_step,
        reverse=True,
    )
    sealed = [p for p in found if (p / SEAL).is_file()]
    if len(sealed) <= keep:
        return []
    oldest_kept = checkpoint_step(sealed[keep - 1])
    deleted = []
    for path in found:
        if checkpoint_step(path) < oldest_kept:  # type: ignore[operator]
            shutil.rmtree(path)
            deleted.append(path)
    return deleted


@dataclass
class Found:
    """The checkpoint to resume from (None when there is none) and the ones skipped on the way, with reasons."""

    checkpoint: Path | None
    skipped: list[str] = field(default_factory=list)


def checkpoint_step(path: Path) -> int | None:
    """The step of a ``checkpoint-<step>`` directory, or None for any other name."""
    match = _CHECKPOINT.match(path.name)
    return int(match.group(1)) if match else None


def latest_valid(checkpoints_dir: str | Path, set_aside: bool = True) -> Found:
    """The newest complete checkpoint, skipping (and setting aside) incomplete or corrupt ones.

    Args:
        checkpoints_dir: The run's ``checkpoints/`` directory.
        set_aside: Rename each invalid checkpoint to ``invalid-checkpoint-<step>`` (only the process that owns
            the run does this; other ranks just skip it).

    Returns:
        The checkpoint and one message per skipped directory, naming it and the reason.
    """
    checkpoints_dir = Path(checkpoints_dir)
    candidates = []
    if checkpoints_dir.is_dir():
        candidates = [p for p in checkpoints_dir.iterdir() if p.is_dir() and checkpoint_step(p) is not None]
    found = Found(None)
    for path in sorted(candidates, key=checkpoint_step, reverse=True):
        problem = verify(path)
        if problem is None:
            found.checkpoint = path
            return found
        message = f"checkpoint {path} is incomplete or corrupt: {problem}; skipped"
        if set_aside:
            target = _free_name(path.with_name(f"invalid-{path.name}"))
            try:
                path.rename(target)
                message += f" (moved to {target}; delete it when you no longer need it)"
            except OSError:
                pass  # another process moved it first, or the directory is read-only: skipping is enough
        found.skipped.append(message)
    return found


def _free_name(path: Path) -> Path:
    if not path.exists():
        return path
    n = 2
    while path.with_name(f"{path.name}.{n}").exists():
        n += 1
    return path.with_name(f"{path.name}.{n}")


def resolve_run(runs_root: str | Path, recipe_name: str, run: str | None) -> Path:
    """The run directory ``train --resume [RUN]`` continues: RUN, or the newest run of the recipe.

    Raises:
        ResumeError: When there is no such run.
    """
    if run is not None:
        path = Path(run)
        if not path.is_dir():
            raise ResumeError(f"--resume {run}: no such run directory")
        return path
    root = Path(runs_root) / recipe_name
    runs = sorted(p for p in root.iterdir() if p.is_dir()) if root.is_dir() else []
    if not runs:
        raise ResumeError(f"--resume: no run of recipe {recipe_name!r} under {root}; pass the run directory")
    return runs[-1]  # run ids start with the UTC time, so the last name is the newest run


def check_resumable(run_dir: str | Path, recipe_yaml: str) -> None:
    """Refuse to resume a finished run, or one whose recipe differs from the one given now.

    The optimizer, scheduler and data position in a checkpoint only make sense with the same recipe: a changed
    batch size or learning rate would silently continue a different job.

    Raises:
        ResumeError: Naming the run and, for a changed recipe, the keys that differ.
    """
    import yaml

    run_dir = Path(run_dir)
    if (run_dir / "summary.json").is_file():
        raise ResumeError(f"--resume {run_dir}: this run finished (summary.json exists); start a new run instead")
    saved_path = run_dir / "recipe.resolved.yaml"
    if not saved_path.is_file():
        raise ResumeError(f"--resume {run_dir}: no recipe.resolved.yaml, so this is not a run directory")
    saved = flatten(yaml.safe_load(saved_path.read_text(encoding="utf-8")) or {})
    now = flatten(yaml.safe_load(recipe_yaml) or {})
    changed = sorted(k for k in saved.keys() | now.keys() if saved.get(k) != now.get(k))
    if changed:
        shown = ", ".join(f"{k} ({saved.get(k)!r} -> {now.get(k)!r})" for k in changed[:8])
        raise ResumeError(
            f"--resume {run_dir}: the recipe differs from the one the run started with ({saved_path}): {shown}"
            f"{' ...' if len(changed) > 8 else ''}. A checkpoint continues the same job; resume with the same "
            "recipe and --set options, or start a new run."
        )


def resume_checkpoint(run_dir: str | Path | None, recipe: Recipe, *, set_aside: bool = True) -> Path:
    """The checkpoint ``train --resume`` continues ``run_dir`` from, said out loud, after every check.

    The run must be unfinished and started with this recipe (``check_resumable``); the newest checkpoint whose
    files match their seal is taken (``latest_valid``), each one skipped printed as a warning.

    Args:
        run_dir: The run directory to continue.
        recipe: The recipe given now.
        set_aside: Rename invalid checkpoints aside (the process that owns the run, rank 0, only).

    Raises:
        ResumeError: No run directory, a finished run, a changed recipe, or no complete checkpoint.
    """
    if run_dir is None:
        raise ResumeError("resume needs the run directory to continue")
    out = Path(run_dir)
    check_resumable(out, recipe.to_yaml())
    found = latest_valid(out / "checkpoints", set_aside=set_aside)
    for message in found.skipped:
        print(f"warning: {message}", flush=True)
    if found.checkpoint is None:
        raise ResumeError(
            f"--resume {out}: no complete checkpoint in {out / 'checkpoints'} (the run stopped before its first "
            f"checkpoint at step {recipe.training.save_steps}); start it again with `train` instead"
        )
    print(f"Resuming {out} from {found.checkpoint} (step {checkpoint_step(found.checkpoint)})", flush=True)
    return found.checkpoint


def check_train_split(run_dir: str | Path, report: dict[str, Any], train_path: str | Path) -> None:
    """Refuse to resume when the train split differs from the one the run was first validated on.

    The checkpoint's data position counts rows of the original split; on other data it means nothing.

    Args:
        run_dir: The resumed run, whose ``validation/report.json`` is the record of the data it started on.
        report: The validation report of the data given now.
        train_path: The train split's file, named in the error.

    Raises:
        ResumeError: The SHA-256 of the train split changed.
    """
    import json

    out = Path(run_dir)
    earlier = out / "validation" / "report.json"
    if not earlier.is_file():
        return
    splits = json.loads(earlier.read_text(encoding="utf-8"))["splits"]
    started_on = {name: split["sha256"] for name, split in splits.items()}
    if started_on and started_on.get("train") != report["splits"]["train"]["sha256"]:
        raise ResumeError(
            f"--resume {out}: the train split {train_path} changed since the run started (SHA-256 "
            "differs from validation/report.json), so the checkpoint's data position means nothing; "
            "start a new run"
        )
