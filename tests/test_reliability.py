"""Faults of real machines: a full disk, a read-only or foreign-owned output directory, a path that is a file.

Each gives one line naming the file and what to do (never a traceback), the right exit code, and leaves what
was already written intact. The tests run as root here, so file modes cannot make a write fail; the
disk-full, read-only and permission cases inject the operating system's own error at the write.
"""

from __future__ import annotations

import errno
import json
import os
import time

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


# --------------------------------------------------------------------------------------------------
# A full disk while a checkpoint or the adapter is saved: the libraries do not raise OSError


def _safetensors_full():
    from safetensors import SafetensorError

    # What safetensors.torch.save_file raises on a full disk (its Rust writer's io::Error, errno 28).
    return SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")


def _torch_save_full():
    # What torch.save raises when its C++ stream writer cannot finish a file (no errno is given).
    return RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 576 vs 534")


@pytest.mark.parametrize(
    "failure",
    [_safetensors_full, _torch_save_full, lambda: OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))],
    ids=["safetensors", "torch.save", "oserror"],
)
def test_disk_full_while_saving_a_checkpoint_is_one_line(tmp_path, validate_recipe, capsys, monkeypatch, failure):
    import pipeline.train
    from pipeline.rundir import write_json

    run_dir = tmp_path / "run"

    def train_until_the_save(recipe, *, on_start, run_dir, **kwargs):  # stands in for a long run: no training
        on_start(run_dir=run_dir)
        write_json(run_dir / "checkpoints" / "checkpoint-2" / "seal.json", {"complete": True})
        time.sleep(0.01)  # a later modification time than anything before it
        partial = run_dir / "checkpoints" / "checkpoint-4" / "optimizer.pt"
        partial.parent.mkdir(parents=True)
        partial.write_bytes(b"cut short")  # the write the disk filled up on
        raise failure()

    monkeypatch.setattr(pipeline.train, "train", train_until_the_save)
    code, err = _run(capsys, "train", str(validate_recipe), "--run-dir", str(run_dir))
    assert code == 1 and "Traceback" not in err
    lines = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and "no space left" in lines[0] and "--resume" in lines[0]
    if not isinstance(failure(), OSError):  # the library's error names no file: the one written last is named
        assert f"{run_dir / 'checkpoints' / 'checkpoint-4' / 'optimizer.pt'} (the file written last" in lines[0]
    assert json.loads((run_dir / "checkpoints" / "checkpoint-2" / "seal.json").read_text()) == {"complete": True}


def test_a_bug_is_still_a_traceback(validate_recipe, monkeypatch):
    import pipeline.train

    def broken(*args, **kwargs):
        raise RuntimeError("a programming error, not a full disk")

    monkeypatch.setattr(pipeline.train, "train", broken)
    with pytest.raises(RuntimeError, match="a programming error"):
        main(["train", str(validate_recipe), "--run-dir", "/nonexistent-never-written"])


def test_permission_denied_on_an_input_file_says_to_fix_the_file_not_the_run_dir(
    tmp_path, validate_recipe, tiny_recipe_data, capsys, monkeypatch
):
    from pathlib import Path

    train_file = Path(tiny_recipe_data["data"]["train"])
    real_open = Path.open

    def refuse(self, *args, **kwargs):  # running as root, a file mode cannot refuse a read: inject EACCES
        if self == train_file:
            raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), str(self))
        return real_open(self, *args, **kwargs)

    monkeypatch.setattr(Path, "open", refuse)
    code, err = _run(capsys, "validate", str(validate_recipe), "--run-dir", str(tmp_path / "run"))
    assert code == 2 and "Traceback" not in err
    assert f"{train_file}: permission denied" in err and "cannot read it" in err and "chmod" in err
    assert "--run-dir" not in err


def test_a_corrupt_adapter_at_evaluate_names_the_file(trained_run, tiny_recipe_path, tmp_path):
    import shutil

    from pipeline.evaluate import RunNotFound, load_local_model
    from pipeline.recipe import load_recipe

    recipe = load_recipe(tiny_recipe_path)
    run = tmp_path / "run"
    shutil.copytree(trained_run.run_dir / "adapter", run / "adapter")
    weights = run / "adapter" / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-100])  # a copy that stopped early
    with pytest.raises(RunNotFound, match=r"adapter_model.safetensors: adapter weights is corrupt or truncated"):
        load_local_model(recipe, run)
    config = run / "adapter" / "adapter_config.json"
    config.write_text(config.read_text()[:20])
    with pytest.raises(RunNotFound, match=r"adapter_config.json: adapter config is corrupt.*re-run training"):
        load_local_model(recipe, run)
