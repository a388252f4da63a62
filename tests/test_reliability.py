"""Faults of real machines: a full disk, a read-only or foreign-owned output directory, a path that is a file.

Each gives one line naming the file and what to do (never a traceback), the right exit code, and leaves what
was already written intact. The tests run as root here, so file modes cannot make a write fail; the
disk-full, read-only and permission cases inject the operating system's own error at the write.
"""

from __future__ import annotations

import errno
import json
import os

import pytest
from conftest import write_recipe

from pipeline.cli import main


@pytest.fixture
def validate_recipe(tmp_path, tiny_recipe_data):
    return write_recipe(tmp_path / "recipe.yaml", tiny_recipe_data)


def _run(capsys, *argv: str) -> tuple[int, str]:
    code = main(list(argv))
    return code, capsys.readouterr().err


def test_disk_full_names_the_file_and_keeps_what_was_written(tmp_path, validate_recipe, capsys, monkeypatch):
    run_dir = tmp_path / "run"
    assert _run(capsys, "validate", str(validate_recipe), "--run-dir", str(run_dir))[0] == 0
    report = run_dir / "validation" / "report.json"
    # Mark the complete report, so a writer that truncated it in place (not atomic) would be caught even
    # though the rerun would write the same content.
    before = report.read_bytes().replace(b'"splits"', b'"earlier_complete_report": true, "splits"', 1)
    report.write_bytes(before)

    real_fsync = os.fsync

    def full(fd):  # the kernel's answer when the disk fills up while the report is written
        if "report.json" in os.readlink(f"/proc/self/fd/{fd}"):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", full)
    code, err = _run(capsys, "validate", str(validate_recipe), "--run-dir", str(run_dir))
    monkeypatch.undo()

    assert code == 1
    assert "Traceback" not in err
    assert f"{report}: no space left" in err and "--run-dir" in err and "intact" in err
    assert report.read_bytes() == before  # the complete report from the first run survives
    assert json.loads(before)["splits"]["train"]["rows_in"] > 0
    leftovers = [p.name for p in run_dir.rglob("*.tmp")]
    assert leftovers == []  # no half-written temporary file is left behind


@pytest.mark.parametrize(
    ("err_no", "words"),
    [(errno.EROFS, "read-only"), (errno.EACCES, "permission denied")],
)
def test_unwritable_output_directory_is_a_usage_error(tmp_path, validate_recipe, capsys, monkeypatch, err_no, words):
    import tempfile

    real_mkstemp = tempfile.mkstemp

    def refuse(*args, **kwargs):
        raise OSError(err_no, os.strerror(err_no), kwargs.get("dir") or (args[2] if len(args) > 2 else None))

    monkeypatch.setattr(tempfile, "mkstemp", refuse)
    code, err = _run(capsys, "validate", str(validate_recipe), "--run-dir", str(tmp_path / "out"))
    monkeypatch.setattr(tempfile, "mkstemp", real_mkstemp)

    assert code == 2
    assert "Traceback" not in err
    assert words in err and str(tmp_path / "out") in err and "--run-dir" in err


def test_run_dir_that_is_a_file(tmp_path, validate_recipe, capsys):
    blocker = tmp_path / "taken"
    blocker.write_text("not a directory", encoding="utf-8")
    code, err = _run(capsys, "validate", str(validate_recipe), "--run-dir", str(blocker / "run"))
    assert code == 2
    assert str(blocker) in err and "another --run-dir" in err
    assert blocker.read_text(encoding="utf-8") == "not a directory"
