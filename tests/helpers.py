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


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_mlflow_server(root: Path):
    """A real ``mlflow server`` on a free loopback port with proxied artifacts; a context manager yielding its URL.

    For tests that need a remote store: the lineage checks through its REST API, export of a run id from it.
    """
    import contextlib
    import os
    import signal
    import time
    import urllib.request

    @contextlib.contextmanager
    def server():
        port = free_port()
        log_path = root / "server.log"
        command = [sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(port)]
        command += ["--backend-store-uri", f"sqlite:///{root / 'server.db'}", "--workers", "1"]
        command += ["--artifacts-destination", str(root / "artifacts")]
        # MLflow 3's job runner starts 5+ huey consumer processes that poll for the server's life: ~10% of a
        # 2-core machine for the rest of the session, for jobs no test uses.
        env = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
        with log_path.open("w") as log:
            proc = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, start_new_session=True, env=env)
            url = f"http://127.0.0.1:{port}"
            try:
                deadline = time.time() + 120
                while True:
                    try:
                        with urllib.request.urlopen(f"{url}/health", timeout=2) as response:
                            if response.read().decode().strip() == "OK":
                                break
                    except OSError:
                        if proc.poll() is not None or time.time() > deadline:
                            raise RuntimeError("mlflow server did not start: " + log_path.read_text()[-2000:]) from None
                        time.sleep(1)
                yield url
            finally:
                os.killpg(proc.pid, signal.SIGTERM)
                try:
                    proc.wait(timeout=20)
                except subprocess.TimeoutExpired:
                    os.killpg(proc.pid, signal.SIGKILL)

    return server()


def shipped_contract_without_dataset_checks(name: str, out_dir: Path) -> tuple[dict, Path]:
    """A shipped contract (as a dict, and written to ``out_dir``) with its dataset checks off.

    For tests that evaluate on the rows they train on (train/eval leakage by design) and care about something else.
    """
    import yaml

    contract = yaml.safe_load((ROOT / "data_contracts" / f"{name}.yaml").read_text(encoding="utf-8"))
    contract.pop("dataset", None)
    path = out_dir / f"{name}.yaml"
    path.write_text(yaml.safe_dump(contract), encoding="utf-8")
    return contract, path
