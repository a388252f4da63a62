"""Crash safety: sealed checkpoints, corrupt ones skipped, and kill -9 + `train --resume` == an uninterrupted run."""

import json
import os
import signal
import sqlite3
import subprocess
import sys
import time

import pytest
import torch
from conftest import ROOT
from helpers import run_cli
from safetensors.torch import load_file

from pipeline import checkpoints


def _fake_checkpoint(path, step, payload=b"x" * 1000):
    path.mkdir(parents=True)
    (path / "optimizer.pt").write_bytes(payload)
    (path / "trainer_state.json").write_text(json.dumps({"global_step": step}))
    return path


def test_seal_then_verify_detects_truncation_missing_files_and_no_seal(tmp_path):
    ckpt = _fake_checkpoint(tmp_path / "checkpoint-4", 4)
    record = checkpoints.seal(ckpt, 4)
    assert set(record["files"]) == {"optimizer.pt", "trainer_state.json"}
    assert checkpoints.verify(ckpt) is None

    (ckpt / "optimizer.pt").write_bytes(b"x" * 500)  # truncated
    assert "optimizer.pt has 500 bytes, 1,000 when it was written" in checkpoints.verify(ckpt)
    (ckpt / "optimizer.pt").write_bytes(b"y" * 1000)  # same size, other bytes
    assert "optimizer.pt does not match its SHA-256" in checkpoints.verify(ckpt)
    (ckpt / "optimizer.pt").unlink()
    assert checkpoints.verify(ckpt) == "optimizer.pt is missing"

    unsealed = _fake_checkpoint(tmp_path / "checkpoint-8", 8)
    assert "never completed" in checkpoints.verify(unsealed)


def test_latest_valid_falls_back_and_sets_invalid_ones_aside(tmp_path):
    root = tmp_path / "checkpoints"
    checkpoints.seal(_fake_checkpoint(root / "checkpoint-2", 2), 2)
    checkpoints.seal(_fake_checkpoint(root / "checkpoint-4", 4), 4)
    _fake_checkpoint(root / "checkpoint-6", 6)  # cut short: no seal
    (root / "checkpoint-4" / "optimizer.pt").write_bytes(b"")  # corrupt after sealing

    peek = checkpoints.latest_valid(root, set_aside=False)  # another rank: skips, moves nothing
    assert peek.checkpoint == root / "checkpoint-2" and (root / "checkpoint-6").is_dir()

    found = checkpoints.latest_valid(root)
    assert found.checkpoint == root / "checkpoint-2"
    assert len(found.skipped) == 2
    assert f"checkpoint {root / 'checkpoint-6'} is incomplete or corrupt" in found.skipped[0]
    assert f"checkpoint {root / 'checkpoint-4'} is incomplete or corrupt: optimizer.pt has 0 bytes" in found.skipped[1]
    assert sorted(p.name for p in root.iterdir()) == ["checkpoint-2", "invalid-checkpoint-4", "invalid-checkpoint-6"]
    assert checkpoints.latest_valid(tmp_path / "absent").checkpoint is None


def test_check_resumable_refuses_finished_runs_and_changed_recipes(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    (run / "recipe.resolved.yaml").write_text("name: a\ntraining:\n  learning_rate: 0.001\n  seed: 1\n")
    checkpoints.check_resumable(run, "name: a\ntraining:\n  learning_rate: 0.001\n  seed: 1\n")
    with pytest.raises(checkpoints.ResumeError, match=r"training.learning_rate \(0.001 -> 0.002\)"):
        checkpoints.check_resumable(run, "name: a\ntraining:\n  learning_rate: 0.002\n  seed: 1\n")
    (run / "summary.json").write_text("{}")
    with pytest.raises(checkpoints.ResumeError, match="this run finished"):
        checkpoints.check_resumable(run, "name: a\n")


def test_resume_errors_are_exit_2_before_any_model_loads(recipe_with, tmp_path):
    path = recipe_with("r.yaml", tracking={"enabled": False})
    missing = run_cli("train", str(path), "--resume", str(tmp_path / "nope"))
    assert missing.returncode == 2 and f"--resume {tmp_path / 'nope'}: no such run directory" in missing.stderr

    run = tmp_path / "run"
    run.mkdir()
    (run / "recipe.resolved.yaml").write_text("name: tiny\n")
    changed = run_cli("train", str(path), "--resume", str(run))
    assert changed.returncode == 2 and "the recipe differs from the one the run started with" in changed.stderr
    assert "Traceback" not in changed.stderr


def _adapter(run_dir):
    return load_file(run_dir / "adapter" / "adapter_model.safetensors")


def test_kill_9_then_resume_ends_with_the_uninterrupted_adapter(recipe_with, tmp_path):
    """SIGKILL a real `python -m pipeline train` after two checkpoints, corrupt the newest, resume, compare.

    With LoRA dropout on, so the RNG state restored from the checkpoint decides the result: the reference is the
    same recipe trained without a break (checkpoint frequency and the tracking store do not change the
    arithmetic).
    """
    from pipeline.recipe import load_recipe
    from pipeline.train import train

    quick_eval = {"batch_size": 4, "max_new_tokens": 4, "max_examples": 4, "systems": ["finetuned"]}
    reference_recipe = recipe_with(
        "reference.yaml", lora={"dropout": 0.1}, eval=quick_eval, tracking={"enabled": False}
    )
    uninterrupted = train(load_recipe(reference_recipe), recipe_source=reference_recipe, run_dir=tmp_path / "reference")
    db = tmp_path / "mlruns.db"
    path = recipe_with(
        "resume.yaml",
        lora={"dropout": 0.1},
        training={"save_steps": 3},
        eval=quick_eval,
        tracking={"uri": f"sqlite:///{db}", "experiment": "resume"},
    )
    run = tmp_path / "run"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen(
        [sys.executable, "-m", "pipeline", "train", str(path), "--run-dir", str(run)],
        cwd=ROOT,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    seal6 = run / "checkpoints" / "checkpoint-6" / checkpoints.SEAL
    deadline = time.time() + 240
    while not seal6.is_file() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert seal6.is_file(), proc.stderr.read().decode()[-2000:]
    assert proc.returncode == -signal.SIGKILL
    assert not (run / "adapter").exists() and not (run / "summary.json").exists(), "killed too late"
    killed_run_id = json.loads((run / "tracking" / "run.json").read_text())["mlflow_run_id"]

    # A checkpoint that went bad on disk after it was sealed is skipped; resume falls back to checkpoint-3.
    optimizer = run / "checkpoints" / "checkpoint-6" / "optimizer.pt"
    optimizer.write_bytes(optimizer.read_bytes()[:100])
    resumed = run_cli("train", str(path), "--resume", str(run))
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    skipped = f"checkpoint {run / 'checkpoints' / 'checkpoint-6'} is incomplete or corrupt: optimizer.pt has 100 bytes"
    assert skipped in resumed.stdout
    assert f"Resuming {run} from {run / 'checkpoints' / 'checkpoint-3'} (step 3)" in resumed.stdout

    reference, got = _adapter(uninterrupted.run_dir), _adapter(run)
    assert set(reference) == set(got)
    for name, tensor in reference.items():
        torch.testing.assert_close(got[name], tensor, rtol=1e-4, atol=1e-5, msg=name)

    summary = json.loads((run / "summary.json").read_text())
    assert summary["optimizer_steps"] == 12 and summary["resumed_from"].endswith("checkpoint-3")
    assert summary["steps_this_run"] == 9  # really continued from step 3, not retrained from scratch
    assert summary["mlflow_run_id"] == killed_run_id  # the same MLflow run, reopened and closed
    assert (run / "eval" / "metrics.json").is_file()
    log = json.loads((run / "train_log.json").read_text())
    assert [e["step"] for e in log if "loss" in e] == [4, 8, 12]  # history from before the kill is kept
    with sqlite3.connect(db) as con:
        statuses = con.execute("select run_uuid, status from runs").fetchall()
        # Step 4 was logged before the kill and trained again after the resume from step 3: one point, not two.
        steps = con.execute("select step from metrics where key = 'train.loss' order by step").fetchall()
    assert statuses == [(killed_run_id, "FINISHED")]
    assert [s for (s,) in steps] == [4, 8, 12]
    # The loss over all 12 steps, as the uninterrupted run reports it (the trainer's own figure covers only 4-12).
    assert summary["train_loss_steps"] == "1-12"
    assert summary["train_loss_mean"] == pytest.approx(uninterrupted.summary["train_loss_mean"], abs=1e-4)


def test_resume_defaults_to_the_newest_run_of_the_recipe(tmp_path):
    for name in ("20260101-100000-aaaa", "20260102-090000-bbbb", "20260101-230000-cccc"):
        (tmp_path / "tiny" / name).mkdir(parents=True)
    assert checkpoints.resolve_run(tmp_path, "tiny", None).name == "20260102-090000-bbbb"
    assert checkpoints.resolve_run(tmp_path, "tiny", str(tmp_path / "tiny" / "20260101-100000-aaaa")).name.endswith(
        "aaaa"
    )
    with pytest.raises(checkpoints.ResumeError, match="no run of recipe 'other'"):
        checkpoints.resolve_run(tmp_path, "other", None)


def test_replace_dir_publishes_only_complete_directories(tmp_path):
    from pipeline.rundir import replace_dir

    old = tmp_path / "adapter"
    old.mkdir()
    (old / "adapter_model.safetensors").write_text("old")
    partial = tmp_path / ".adapter.partial"
    partial.mkdir()
    (partial / "adapter_model.safetensors").write_text("new")
    replace_dir(partial, old)
    assert (old / "adapter_model.safetensors").read_text() == "new"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter"]


def test_resume_refuses_a_changed_train_split_and_keeps_the_original_report(recipe_with, tmp_path):
    from pipeline.recipe import load_recipe
    from pipeline.train import train

    path = recipe_with("r.yaml", tracking={"enabled": False})
    recipe = load_recipe(path)
    run = tmp_path / "run"
    run.mkdir()
    (run / "recipe.resolved.yaml").write_text(recipe.to_yaml())
    checkpoints.seal(_fake_checkpoint(run / "checkpoints" / "checkpoint-3", 3), 3)
    report = {"splits": {"train": {"sha256": "0" * 64}, "eval": {"sha256": "1" * 64}}}
    (run / "validation").mkdir()
    (run / "validation" / "report.json").write_text(json.dumps(report))
    with pytest.raises(checkpoints.ResumeError, match="the train split .* changed since the run started"):
        train(recipe, recipe_source=path, run_dir=run, resume=True)
    assert json.loads((run / "validation" / "report.json").read_text()) == report


def test_resume_checkpoint_says_what_it_skips_and_where_it_resumes(recipe_with, tmp_path, capsys):
    from pipeline.recipe import load_recipe

    path = recipe_with("r.yaml", tracking={"enabled": False})
    recipe = load_recipe(path)
    run = tmp_path / "run"
    run.mkdir()
    (run / "recipe.resolved.yaml").write_text(recipe.to_yaml())
    with pytest.raises(checkpoints.ResumeError, match="needs the run directory"):
        checkpoints.resume_checkpoint(None, recipe)
    with pytest.raises(checkpoints.ResumeError, match=r"no complete checkpoint in .* start it again with `train`"):
        checkpoints.resume_checkpoint(run, recipe)
    checkpoints.seal(_fake_checkpoint(run / "checkpoints" / "checkpoint-3", 3), 3)
    _fake_checkpoint(run / "checkpoints" / "checkpoint-6", 6)  # never sealed
    assert checkpoints.resume_checkpoint(run, recipe) == run / "checkpoints" / "checkpoint-3"
    out = capsys.readouterr().out
    assert f"warning: checkpoint {run / 'checkpoints' / 'checkpoint-6'} is incomplete or corrupt" in out
    assert f"Resuming {run} from {run / 'checkpoints' / 'checkpoint-3'} (step 3)" in out
