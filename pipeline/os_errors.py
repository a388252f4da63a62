"""One line for a file-system error: which file, what happened, what to do, and the exit code.

``cli.main`` uses it for any ``OSError`` a command raises, and for the write failures that libraries wrap in
their own exceptions (``wrapped_os_error``). Outputs are written to a temporary file and renamed
(``rundir.write_text``), so what was already written is intact; the messages say so.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

from pipeline.errors import JobFailed, UsageError

EXIT_FAILED, EXIT_USAGE = JobFailed.exit_code, UsageError.exit_code  # the job failed; the request is wrong

_OS_ERROR_CODE = re.compile(r"\(os error (\d+)\)|code: (\d+), kind:")
# torch.save's C++ writer reports a failed write (a full disk, mostly) without an errno.
_TORCH_WRITE_FAILED = ("PytorchStreamWriter failed writing", "unexpected pos", "file write failed")


def wrapped_os_error(exc: BaseException) -> OSError | None:
    """The file-system error behind a library's exception, or None when there is none.

    Saving a checkpoint or the adapter on a full disk does not raise ``OSError``: safetensors raises
    ``SafetensorError('Error while serializing: I/O error: No space left on device (os error 28)')`` and
    ``torch.save`` a ``RuntimeError('[enforce fail at inline_container.cc:672] . unexpected pos ...')``. The
    error is rebuilt here so it gets the same one-line explanation as any other (neither message names the file:
    ``describe_os_error`` names the file written last in the run directory).
    """
    import errno

    seen: set[int] = set()
    cause: BaseException | None = exc
    while cause is not None and id(cause) not in seen:
        if isinstance(cause, OSError):
            return cause
        seen.add(id(cause))
        cause = cause.__cause__ or cause.__context__
    text = str(exc)
    found = _OS_ERROR_CODE.search(text)
    if found:
        number = int(found.group(1) or found.group(2))
        return OSError(number, os.strerror(number))
    if any(marker in text for marker in _TORCH_WRITE_FAILED):
        return OSError(errno.ENOSPC, f"a file could not be written completely ({text[:120]})")
    return None


def describe_os_error(
    exc: OSError, *, run_dir: str | os.PathLike | None = None, output_roots: list[str] | tuple[str, ...] = ()
) -> tuple[str, int]:
    """A one-line explanation of a file-system error with what to do, and its exit code.

    Disk full is a failure of the job (1); a path the user pointed at that cannot be written is a bad
    request (2). ``run_dir`` (the command's run directory, if it has one yet) is named when the error names no
    file; it and ``output_roots`` (--run-dir, --out) are what the command writes, as opposed to its inputs.
    """
    import errno

    from pipeline.audit import current_user

    # No file named (a library's error rebuilt by wrapped_os_error, or a bare OSError): the file written last in
    # the run directory is the one the write failed on (a checkpoint's optimizer.pt, the adapter's weights).
    where = exc.filename or _last_written(run_dir) or (f"{run_dir}/..." if run_dir else "(unknown file)")
    if exc.filename2:
        where = f"{where} -> {exc.filename2}"
    kept = "files written before it are intact (outputs are written to a temporary file, then renamed)"
    if exc.errno in (errno.ENOSPC, errno.EDQUOT):
        return (
            f"{where}: no space left on the device (or quota exceeded); {kept}. Free space or point "
            "--run-dir at a larger disk, then rerun (train --resume continues from the last complete checkpoint).",
            EXIT_FAILED,
        )
    if exc.errno == errno.EROFS:
        return f"{where}: the file system is read-only; {kept}. Pass --run-dir on a writable disk.", EXIT_USAGE
    denied = exc.errno in (errno.EACCES, errno.EPERM)
    if denied and exc.filename and not _is_output(exc.filename, (*output_roots, run_dir)):
        # An input (recipe, contract, data, base model): --run-dir cannot help; the file's mode or owner can.
        return (
            f"{where}: permission denied for user {current_user()}: this user cannot read it. Fix the file's owner or "
            "mode (chown, chmod), or point the recipe at a copy this user can read; nothing was written.",
            EXIT_USAGE,
        )
    if denied:
        return (
            f"{where}: permission denied for user {current_user()}; {kept}. Fix the directory's owner or mode, "
            "or pass --run-dir somewhere this user can write.",
            EXIT_USAGE,
        )
    if exc.errno == errno.ENOENT:
        return f"{where}: no such file or directory; check the path in the recipe or command line.", EXIT_USAGE
    if exc.errno in (errno.ENOTDIR, errno.EISDIR, errno.EEXIST):
        return f"{where}: {exc.strerror}: a file and a directory share the name; pick another --run-dir.", EXIT_USAGE
    return f"{where}: {exc.strerror or type(exc).__name__}; {kept}.", EXIT_FAILED


def _last_written(run_dir: str | os.PathLike | None) -> str | None:
    """The most recently modified file under ``run_dir``, named as such (None without one)."""
    if not run_dir or not os.path.isdir(run_dir):
        return None
    newest: tuple[int, str] | None = None
    for folder, _, names in os.walk(run_dir):
        for name in names:
            path = os.path.join(folder, name)
            try:
                stamp = os.stat(path).st_mtime_ns
            except OSError:
                continue
            if newest is None or stamp > newest[0]:
                newest = (stamp, path)
    return f"{newest[1]} (the file written last in {run_dir}; the error names none)" if newest else None


def _is_output(filename: str | os.PathLike, roots: tuple) -> bool:
    """True for a path inside what this command writes: runs/ or one of ``roots`` (run directory, --run-dir, --out)."""
    from pipeline.rundir import RUNS_ROOT

    path = Path(os.path.abspath(filename))
    return any(path.is_relative_to(os.path.abspath(root)) for root in [RUNS_ROOT, *roots] if root)
