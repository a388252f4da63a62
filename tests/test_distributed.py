"""Several processes through torchrun: DDP on the CPU (gloo) for real, FSDP-QLoRA settings as objects."""

import json
import os
import sqlite3
import subprocess
import sys

import pytest
import torch
from conftest import ROOT
from helpers import make_env

from pipeline.recipe import load_recipe

DDP_SECTIONS = {
    "training": {"max_steps": None, "num_epochs": 1, "save_steps": 4},
    "eval": {"batch_size": 4, "max_new_tokens": 4, "max_examples": 4, "systems": ["finetuned"]},
}


def _ddp_recipe(tiny_recipe_data, root, db):
    from conftest import write_recipe

    data = {**tiny_recipe_data, "tracking": {"uri": f"sqlite:///{db}", "experiment": "ddp"}}
    for key, value in DDP_SECTIONS.items():
        data[key] = {**tiny_recipe_data.get(key, {}), **value}
    return write_recipe(root / "ddp.yaml", data)


def _train(*args, cwd):
    return subprocess.Popen(
        [sys.executable, "-m", "pipeline", "train", *args],
        cwd=cwd,  # a stray run directory from another rank would appear under cwd/runs
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


@pytest.fixture(scope="module")
def ddp_run(tiny_recipe_data, tmp_path_factory):
    """One 2-process DDP run on this machine (torchrun --standalone, gloo)."""
    root = tmp_path_factory.mktemp("ddp")
    db = root / "mlruns.db"
    path = _ddp_recipe(tiny_recipe_data, root, db)
    run = root / "run"
    proc = _train(str(path), "--num-processes", "2", "--run-dir", str(run), cwd=root)
    stdout, stderr = proc.communicate(timeout=400)
    return subprocess.CompletedProcess(proc.args, proc.returncode, stdout, stderr), path, run, db


def test_ddp_two_processes_on_cpu(ddp_run):
    result, path, run, db = ddp_run
    tmp_path = run.parent
    assert result.returncode == 0, result.stderr[-4000:]
    assert "Launching 2 x 1 training processes (DDP) with torchrun" in result.stdout

    plan = json.loads((run / "plan.json").read_text())
    summary = json.loads((run / "summary.json").read_text())
    rows = plan["train_rows"]
    # Effective batch = micro-batch 8 x accumulation 1 x 2 processes = 16: one epoch is ceil(rows / 16) steps,
    # half of what one process takes.
    assert plan["processes"] == 2 and plan["effective_batch_size"] == 16
    assert summary["processes"] == 2 and summary["optimizer_steps"] == -(-rows // 16) == plan["optimizer_steps"]
    # Rank 0 wrote one adapter, one evaluation and one MLflow run; the other rank wrote nothing anywhere.
    assert (run / "adapter" / "adapter_model.safetensors").is_file() and (run / "eval" / "metrics.json").is_file()
    assert not (tmp_path / "runs").exists()
    steps = summary["optimizer_steps"]
    kept = sorted(p.name for p in (run / "checkpoints").glob("checkpoint-*"))
    assert len(kept) == 2 and f"checkpoint-{steps}" in kept  # save_total_limit 2; the trainer also saves the end
    seal = json.loads((run / "checkpoints" / f"checkpoint-{steps}" / "pipeline_checkpoint.json").read_text())
    # Sealed by rank 0 after a barrier: the other rank's RNG state is written, and covered, by then.
    assert {"rng_state_0.pth", "rng_state_1.pth"} <= set(seal["files"]) and seal["step"] == steps
    with sqlite3.connect(db) as con:
        assert con.execute("select status from runs").fetchall() == [("FINISHED",)]
    # Printing is rank 0's job too: one plan, not two.
    assert result.stdout.count("effective batch = micro-batch") == 1


def test_two_nodes_on_loopback_train_like_two_processes_on_one(ddp_run, tmp_path):
    """torchrun --nnodes 2, one CPU process per node, rendezvous on 127.0.0.1: the same adapter as the
    single-node 2-process run, and one run directory, evaluation and MLflow run written by node 0's rank 0."""
    from helpers import free_port

    _, path, single, _ = ddp_run
    run, port = tmp_path / "run", str(free_port())
    common = ["--nnodes", "2", "--num-processes", "1", "--master-addr", "127.0.0.1", "--master-port", port]
    for rank in (0, 1):
        (tmp_path / f"node{rank}").mkdir()
    nodes = [
        _train(str(path), *common, "--node-rank", str(rank), "--run-dir", str(run), cwd=tmp_path / f"node{rank}")
        for rank in (0, 1)
    ]
    outputs = [node.communicate(timeout=400) for node in nodes]
    for node, (_, stderr) in zip(nodes, outputs, strict=True):
        assert node.returncode == 0, stderr[-4000:]
    assert "Launching 1 x 2 training processes (DDP) with torchrun" in outputs[0][0]
    from safetensors.torch import load_file

    two_nodes = load_file(run / "adapter" / "adapter_model.safetensors")
    one_node = load_file(single / "adapter" / "adapter_model.safetensors")
    assert set(two_nodes) == set(one_node)
    for name, tensor in one_node.items():
        torch.testing.assert_close(two_nodes[name], tensor, rtol=1e-4, atol=1e-5, msg=name)
    assert (run / "eval" / "metrics.json").is_file()
    assert not any((tmp_path / f"node{rank}" / "runs").exists() for rank in (0, 1))


def test_fsdp_qlora_settings(tiny_recipe_path, monkeypatch):
    """What can be checked without GPUs: the trainer's FSDP settings and the 4-bit storage dtype."""
    import transformers.training_args

    from pipeline.model import bnb_config, uses_fsdp
    from pipeline.train import fsdp_settings, sft_config

    monkeypatch.setattr(transformers.training_args, "is_torch_bf16_gpu_available", lambda: True)
    recipe = load_recipe(ROOT / "recipes" / "medical_coding.yaml", ["hardware.distributed=fsdp", "hardware.num_gpus=2"])
    assert fsdp_settings(recipe, make_env(1, cuda=True)) == (False, None)  # one process: nothing to shard
    assert fsdp_settings(load_recipe(ROOT / "recipes" / "medical_coding.yaml"), make_env(2, cuda=True)) == (False, None)

    enabled, config = fsdp_settings(recipe, make_env(2, cuda=True))
    assert enabled and config["version"] == 1
    assert config["auto_wrap_policy"] == "TRANSFORMER_BASED_WRAP"
    assert config["use_orig_params"] and config["cpu_ram_efficient_loading"] and config["sync_module_states"]
    assert config["activation_checkpointing"] is True

    # Build the real SFTConfig without starting a process group (there is no second process or GPU here):
    # only the device setup is replaced; transformers still turns fsdp_config into accelerate's plugin args.
    cuda = property(lambda self: torch.device("cuda"))
    monkeypatch.setattr(transformers.training_args.TrainingArguments, "device", cuda)
    monkeypatch.setenv("FSDP_CPU_RAM_EFFICIENT_LOADING", "unset")  # transformers sets it; restored after the test
    args = sft_config(recipe, ROOT / "runs" / "x", "cuda", make_env(2, cuda=True))
    assert args.fsdp and args.ddp_backend == "nccl"
    assert args.activation_checkpointing is False  # FSDP's own checkpointing instead of the trainer's
    plugin = args.fsdp_plugin_args
    assert plugin["fsdp_version"] == 1 and plugin["auto_wrap_policy"] == "TRANSFORMER_BASED_WRAP"
    assert plugin["use_orig_params"] and plugin["cpu_ram_efficient_loading"] and plugin["sync_module_states"]
    assert plugin["activation_checkpointing"] and plugin["state_dict_type"] == "SHARDED_STATE_DICT"

    assert bnb_config(recipe.quantization, fsdp=True).bnb_4bit_quant_storage == torch.bfloat16
    assert bnb_config(recipe.quantization).bnb_4bit_quant_storage == torch.uint8
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert uses_fsdp(recipe)
    monkeypatch.setenv("WORLD_SIZE", "1")
    assert not uses_fsdp(recipe)


def test_launch_refusals_are_exit_2(tiny_recipe_path, tmp_path):
    from helpers import run_cli

    far = run_cli(
        "train", str(tiny_recipe_path), "--nnodes", "2", "--master-addr", "10.1.2.3", "--run-dir", str(tmp_path)
    )
    assert far.returncode == 2
    assert "--master-addr 10.1.2.3 is not loopback and not in privacy.allowed_hosts" in far.stderr
    shared = run_cli("train", str(tiny_recipe_path), "--nnodes", "2")
    assert shared.returncode == 2 and "needs --run-dir on storage every node shares" in shared.stderr
