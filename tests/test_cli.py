import subprocess
import sys
import time

import pytest
from conftest import ROOT
from helpers import run_cli

HEAVY = ("torch", "transformers", "peft", "trl", "bitsandbytes", "mlflow", "datasets")


def test_help_imports_no_heavy_library():
    # The start-up time itself is machine-dependent: benchmarks/cli_startup.py measures it (benchmarks/cli.md).
    code = (
        "import sys; from pipeline.cli import main\n"
        "try:\n    main(['--help'])\nexcept SystemExit:\n    pass\n"
        f"heavy = [m for m in {HEAVY!r} if m in sys.modules]\n"
        "print('HEAVY', heavy)"
    )
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert "validate" in result.stdout and "train" in result.stdout and "ui" in result.stdout
    assert "HEAVY []" in result.stdout, result.stdout


@pytest.mark.parametrize(
    "module",
    [
        "pipeline.recipe",
        "pipeline.contracts",
        "pipeline.env",
        "pipeline.plan",
        "pipeline.cli",
        "pipeline.tasks",
        "pipeline.data",
        "pipeline.egress",
        "pipeline.licenses",
        "pipeline.checkpoints",
        "pipeline.errors",
        "pipeline.records",
        "pipeline.splits",
        "pipeline.pii",
        "pipeline.memory",
        "pipeline.weights",
        "pipeline.os_errors",
        "pipeline.freeform",
        "pipeline.snapshot",
        "pipeline.judge",
        "pipeline.scaffold",
        "pipeline.profiling",
        "pipeline.cli_args",
        "pipeline.taskspec",
        "pipeline.scoring",
    ],
)
def test_light_modules_import_no_heavy_library(module):
    code = f"import sys, {module}; print([m for m in {HEAVY!r} if m in sys.modules])"
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert result.stdout.strip() == "[]", result.stdout + result.stderr


def test_plan_command_prints_derived_numbers_without_weights(tmp_path):
    start = time.time()
    result = run_cli("plan", "recipes/medical_coding.yaml", "--set", "hardware.num_gpus=1", "--run-dir", str(tmp_path))
    assert result.returncode == 0, result.stderr
    assert "effective batch = micro-batch x accumulation x 1 process(es) = 16" in result.stdout
    assert "70.55B in the base" in result.stdout
    assert (tmp_path / "plan.json").is_file()
    assert time.time() - start < 30


def test_version_and_usage_errors():
    assert run_cli("--version").stdout.startswith("pipeline ")
    result = run_cli("train")
    assert result.returncode == 2 and "recipe" in result.stderr


def test_a_missing_base_names_the_recipe_at_train_evaluate_and_export(trained_run, tiny_recipe_path, tmp_path, capsys):
    import shutil

    import yaml

    from pipeline.cli import main

    missing = tmp_path / "no-such-base"
    run = tmp_path / "run"
    shutil.copytree(trained_run.run_dir, run)
    (run / "summary.json").unlink()  # no MLflow run to reopen: this copy is scored on its own
    resolved = run / "recipe.resolved.yaml"
    ran = yaml.safe_load(resolved.read_text(encoding="utf-8"))
    ran["model"]["path"] = str(missing)  # the run's base has been removed since it trained
    resolved.write_text(yaml.safe_dump(ran, sort_keys=False), encoding="utf-8")
    gone = f"model.path: {missing}: no such directory"

    def errors(*argv: str) -> tuple[int, list[str]]:
        code = main(list(argv))
        return code, [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]

    new_base = ("--set", f"model.path={missing}")
    code, lines = errors("train", str(tiny_recipe_path), *new_base, "--run-dir", str(tmp_path / "train"))
    assert code == 2 and len(lines) == 1 and lines[0].startswith(f"error: {tiny_recipe_path}: {gone}"), lines
    rescore = ("--set", "tracking.enabled=false", "--run", str(run), "--systems", "base")
    code, lines = errors("evaluate", str(tiny_recipe_path), *new_base, *rescore)
    assert code == 2 and len(lines) == 1 and lines[0].startswith(f"error: {tiny_recipe_path}: {gone}"), lines
    code, lines = errors("export", str(run), "--out", str(tmp_path / "export"))
    assert code == 2 and len(lines) == 1 and lines[0].startswith(f"error: {resolved}: {gone}"), lines
