"""Shared fixtures: tiny local assets (no downloads) and one trained tiny run for the whole session.

The trained run is the expensive part (about half a minute): it is built once and serves the training,
evaluation and tracking tests.
"""

from __future__ import annotations

import os
import sys
import tempfile
from pathlib import Path
from typing import Any

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

# Same as every command: no library may reach the network during tests.
from pipeline.egress import offline_environment  # noqa: E402

offline_environment()
os.environ.pop("MLFLOW_TRACKING_URI", None)
# Commands run by the tests append to a throw-away audit log, not the project's runs/audit.jsonl.
os.environ["PIPELINE_AUDIT_LOG"] = str(Path(tempfile.mkdtemp(prefix="pipeline-audit-")) / "audit.jsonl")


def write_recipe(path: Path, data: dict) -> Path:
    path.write_text(yaml.safe_dump(data, sort_keys=False), encoding="utf-8")
    return path


@pytest.fixture(scope="session")
def tiny_assets(tmp_path_factory) -> dict[str, Path]:
    """Small demo notes and a random-weight tiny Llama (widths multiples of 64 for 4-bit on CPU)."""
    from pipeline.demo import TinyModelSpec, build_demo_dataset, build_tiny_base

    root = tmp_path_factory.mktemp("assets")
    data = build_demo_dataset(root / "data", num_train=160, num_eval=24, seed=1)
    spec = TinyModelSpec(
        vocab_size=512,
        hidden_size=64,
        intermediate_size=128,
        num_layers=2,
        num_heads=2,
        max_position_embeddings=256,
        pretrain_steps=0,
    )
    model = build_tiny_base(root / "model", spec=spec)
    return {"data": data, "model": model, "root": root}


@pytest.fixture(scope="session")
def tiny_recipe_data(tiny_assets) -> dict:
    """A recipe (as a dict) that extends the shipped quickstart with the tiny assets and a few steps."""
    root = tiny_assets["root"]
    return {
        "extends": str(ROOT / "recipes" / "quickstart.yaml"),
        "name": "tiny",
        "model": {"path": str(tiny_assets["model"])},
        "data": {
            "contract": str(ROOT / "data_contracts" / "medical_coding.yaml"),
            "train": str(tiny_assets["data"] / "train.jsonl"),
            "eval": str(tiny_assets["data"] / "eval.jsonl"),
        },
        "training": {
            "micro_batch_size": 8,
            "max_steps": 12,
            "logging_steps": 4,
            "save_steps": 100,
            "max_length": 384,
        },
        "eval": {"batch_size": 12, "max_new_tokens": 8},
        "tracking": {"uri": f"sqlite:///{root / 'mlruns.db'}", "experiment": "tiny-tests"},
    }


@pytest.fixture
def recipe_with(tiny_recipe_data, tmp_path):
    """``recipe_with("name.yaml", training={"max_steps": 2}, task="chat")``: the tiny recipe with changes, written.

    A mapping merges into the tiny recipe's section of that name (keys not given keep the tiny values, and the
    shipped quickstart's below them through ``extends``); any other value replaces the key. Returns the path of
    ``tmp_path / name``.
    """

    def make(name: str = "recipe.yaml", /, **changes: Any) -> Path:
        data = dict(tiny_recipe_data)
        for key, value in changes.items():
            base = data.get(key)
            data[key] = {**base, **value} if isinstance(value, dict) and isinstance(base, dict) else value
        return write_recipe(tmp_path / name, data)

    return make


@pytest.fixture(scope="session")
def tiny_recipe_path(tiny_assets, tiny_recipe_data) -> Path:
    return write_recipe(tiny_assets["root"] / "tiny.yaml", tiny_recipe_data)


@pytest.fixture(scope="session")
def trained_run(tiny_assets, tiny_recipe_path):
    """One real QLoRA run of the tiny model (4-bit NF4 on CPU), evaluated and tracked."""
    from pipeline.recipe import load_recipe
    from pipeline.train import train

    recipe = load_recipe(tiny_recipe_path)
    return train(recipe, recipe_source=tiny_recipe_path, run_dir=tiny_assets["root"] / "run")


# --------------------------------------------------------------------------------------------------
# Network sandbox: no test in this process resolves or connects to anything beyond loopback.
#
# The egress guard protects the commands; this protects the tests themselves (a decision-function test once
# made a real DNS query for a name on its allow-list). Names and addresses other than loopback and this
# machine's own name fail the way they fail on an offline machine, before any packet is sent.

_LOOPBACK_NAMES = {"localhost", "localhost.localdomain", "ip6-localhost", "ip6-loopback"}


def _local_only(host) -> bool:  # noqa: ANN001 - str, bytes or None, as socket accepts
    import ipaddress
    import socket

    if host in (None, "", b""):
        return True  # the local machine
    if isinstance(host, bytes):
        host = host.decode("ascii", "replace")
    host = str(host).strip("[]").lower()
    if host in _LOOPBACK_NAMES or host == socket.gethostname().lower():
        return True
    try:
        return ipaddress.ip_address(host.split("%", 1)[0]).is_loopback
    except ValueError:
        return False


@pytest.fixture(autouse=True)
def no_network_beyond_loopback(monkeypatch):
    """Name lookups and connections to anything but loopback fail in every test (as offline, no packet sent)."""
    import errno
    import socket

    real_getaddrinfo, real_connect = socket.getaddrinfo, socket.socket.connect
    real_connect_ex = socket.socket.connect_ex

    def getaddrinfo(host, *args, **kwargs):  # noqa: ANN001, ANN202
        if not _local_only(host):
            raise socket.gaierror(socket.EAI_NONAME, f"tests: name resolution of {host!r} is stubbed (offline)")
        return real_getaddrinfo(host, *args, **kwargs)

    def refuse_far(address) -> None:  # noqa: ANN001
        if isinstance(address, tuple) and address and isinstance(address[0], str) and not _local_only(address[0]):
            raise OSError(errno.ENETUNREACH, f"tests: connection to {address[0]} refused (loopback only)")

    def connect(self, address):  # noqa: ANN001, ANN202
        refuse_far(address)
        return real_connect(self, address)

    def connect_ex(self, address):  # noqa: ANN001, ANN202
        refuse_far(address)
        return real_connect_ex(self, address)

    monkeypatch.setattr(socket, "getaddrinfo", getaddrinfo)
    monkeypatch.setattr(socket.socket, "connect", connect)
    monkeypatch.setattr(socket.socket, "connect_ex", connect_ex)
    yield


@pytest.fixture(scope="session")
def mlflow_server(tmp_path_factory):
    """One real ``mlflow server`` on a free loopback port for the session (it takes ~30 s to start on 2 cores)."""
    from helpers import start_mlflow_server

    with start_mlflow_server(tmp_path_factory.mktemp("server")) as url:
        yield url
