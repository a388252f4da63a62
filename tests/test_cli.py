import subprocess
import sys
import time

import pytest
from conftest import ROOT
from test_recipe import run_cli

HEAVY = ("torch", "transformers", "peft", "trl", "bitsandbytes", "mlflow", "datasets")


def test_help_is_fast_and_imports_no_heavy_library():
    code = (
        "import sys, time; t = time.time(); from pipeline.cli import main\n"
        "try:\n    main(['--help'])\nexcept SystemExit:\n    pass\n"
        f"heavy = [m for m in {HEAVY!r} if m in sys.modules]\n"
        "print('HEAVY', heavy, 'SECONDS', round(time.time() - t, 3))"
    )
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert "validate" in result.stdout and "train" in result.stdout and "ui" in result.stdout
    assert "HEAVY []" in result.stdout, result.stdout
    seconds = float(result.stdout.rsplit("SECONDS", 1)[1])
    assert seconds < 1.0


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
