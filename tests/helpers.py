"""Helpers shared by test modules (fixtures live in conftest.py): run a command, load a script, build an Env."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

from conftest import ROOT

from pipeline.env import Env


def run_cli(*args: str, cwd: Path = ROOT) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "pipeline", *args], cwd=cwd, capture_output=True, text=True, timeout=300
    )


def run_main(*args: str) -> subprocess.CompletedProcess:
    """``pipeline.cli.main`` in this process, returned like ``run_cli``.

    For commands whose test needs the exit code and the output but not a separate process: a subprocess pays
    the torch/transformers/trl import again (~15 s on 2 cores). An exception main does not handle propagates
    and fails the test, as a traceback would.
    """
    import contextlib
    import io
    import os

    from pipeline.cli import main

    out, err, cwd = io.StringIO(), io.StringIO(), os.getcwd()
    os.chdir(ROOT)
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            code = main(list(args))
    finally:
        os.chdir(cwd)
    return subprocess.CompletedProcess(list(args), code, out.getvalue(), err.getvalue())


def load_probe():
    spec = importlib.util.spec_from_file_location("gpu_probe", ROOT / "scripts" / "gpu_probe.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def make_env(world_size: int, cuda: bool = False) -> Env:
    return Env(
        cuda=cuda,
        gpu_name=None,
        gpu_memory_gb=None,
        num_gpus=world_size if cuda else 0,
        bf16=cuda,
        bitsandbytes=None,
        torch=None,
        cpu_count=2,
        world_size=world_size,
        platform="test",
    )
