"""Training knobs reach TRL/transformers under their upstream names, and impossible ones fail clearly."""

import json

import pytest
from helpers import make_env

from pipeline.recipe import load_recipe


@pytest.fixture
def cpu_bf16(monkeypatch):
    import transformers.training_args

    monkeypatch.setattr(transformers.training_args, "is_torch_bf16_gpu_available", lambda: True)


def test_knobs_in_sft_config(tiny_recipe_path, tmp_path):
    from pipeline.train import sft_config

    recipe = load_recipe(
        tiny_recipe_path,
        ["training.packing=true", "training.completion_only_loss=false", "training.gradient_checkpointing=true"],
    )
    args = sft_config(recipe, tmp_path, "cpu", make_env(1))
    assert args.packing is True and args.packing_strategy == "bfd"
    assert args.completion_only_loss is False
    assert args.activation_checkpointing is True and args.activation_checkpointing_kwargs == {"use_reentrant": False}
    assert args.optim == "adamw_torch" and args.max_length == 384
    assert args.fsdp in (False, None, "", []) and args.ddp_backend is None

    default = sft_config(load_recipe(tiny_recipe_path), tmp_path, "cpu", make_env(1))
    assert default.packing is False and default.completion_only_loss is True
    assert default.activation_checkpointing is False  # the quickstart turns it off; TRL's own default is on


def test_precision_auto_follows_the_machine(tiny_recipe_path):
    from pipeline.train import resolve_precision

    recipe = load_recipe(tiny_recipe_path, ["training.precision=auto"])
    assert resolve_precision(recipe, "cpu", make_env(1)) == "fp32"
    assert resolve_precision(recipe, "cuda", make_env(1, cuda=True)) == "bf16"
    old_gpu = make_env(1, cuda=True).__class__(**{**make_env(1, cuda=True).to_dict(), "bf16": False})
    assert resolve_precision(recipe, "cuda", old_gpu) == "fp16"
    assert resolve_precision(load_recipe(tiny_recipe_path, ["training.precision=bf16"]), "cuda", old_gpu) == "bf16"


def test_flash_attention_is_refused_clearly_where_it_cannot_run(recipe_with, tmp_path):
    from helpers import run_main

    path = recipe_with("fa.yaml", model={"attn_implementation": "flash_attention_2"})
    result = run_main("train", str(path), "--run-dir", str(tmp_path / "run"))
    assert result.returncode == 2
    assert "model.attn_implementation is 'flash_attention_2' but" in result.stderr
    assert "it needs a CUDA GPU and this run is on cpu" in result.stderr
    assert "float16/bfloat16 only and quantization.compute_dtype is float32" in result.stderr
    assert "Traceback" not in result.stderr


def test_save_total_limit_1_always_leaves_a_sealed_checkpoint(tiny_recipe_path, tmp_path, monkeypatch):
    """The oldest checkpoint goes only after the newest is sealed: a kill between the two (injected here in the
    deletion) leaves the new one sealed and the old one whole, and resume takes the new one."""
    import shutil
    from types import SimpleNamespace

    from pipeline import checkpoints
    from pipeline.train import SealCheckpoints, sft_config

    recipe = load_recipe(tiny_recipe_path, ["training.save_total_limit=1"])
    assert sft_config(recipe, tmp_path, "cpu", make_env(1)).save_total_limit is None  # the trainer rotates nothing

    def checkpoint(step):
        path = tmp_path / f"checkpoint-{step}"
        path.mkdir()
        (path / "optimizer.pt").write_bytes(b"x" * 100)
        return path

    seal = SealCheckpoints(recipe.training.save_total_limit)
    state = SimpleNamespace(is_world_process_zero=True, global_step=3)
    args = SimpleNamespace(output_dir=str(tmp_path))
    checkpoint(3)
    seal.on_save(args, state, None)
    checkpoint(6)  # written, not yet sealed: the old checkpoint must still be there
    assert checkpoints.latest_valid(tmp_path, set_aside=False).checkpoint.name == "checkpoint-3"

    def killed(path, *a, **k):
        raise KeyboardInterrupt("killed while deleting the old checkpoint")

    monkeypatch.setattr(shutil, "rmtree", killed)
    state.global_step = 6
    with pytest.raises(KeyboardInterrupt):
        seal.on_save(args, state, None)
    assert checkpoints.latest_valid(tmp_path, set_aside=False).checkpoint.name == "checkpoint-6"
    assert checkpoints.verify(tmp_path / "checkpoint-3") is None  # untouched, a second fallback
    monkeypatch.undo()
    checkpoint(9)
    state.global_step = 9
    seal.on_save(args, state, None)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint-9"]


def test_packed_training_run(recipe_with, tmp_path):
    """Packing on a real 4-bit run: fewer, fuller rows, the loss-mask check still sees every example."""
    from pipeline.train import train

    path = recipe_with(
        "packed.yaml",
        training={"packing": True, "max_steps": 2},
        eval={"batch_size": 4, "max_new_tokens": 4, "max_examples": 4, "systems": ["finetuned"]},
        tracking={"enabled": False},
    )
    result = train(load_recipe(path), recipe_source=path, run_dir=tmp_path / "run")
    masks = result.summary["data"]
    assert masks["examples"] == result.plan["train_rows"]  # every accepted row checked before packing
    log = json.loads((tmp_path / "run" / "train_log.json").read_text())
    assert result.summary["optimizer_steps"] == 2 and log


def test_paged_optimizer_needs_a_gpu(tiny_recipe_path):
    from pipeline.model import DeviceUnavailable, check_optimizer

    with pytest.raises(DeviceUnavailable, match=r"training.optim is 'paged_adamw_8bit', a paged optimizer"):
        check_optimizer(load_recipe(tiny_recipe_path, ["training.optim=paged_adamw_8bit"]), "cpu")
    check_optimizer(load_recipe(tiny_recipe_path, ["training.optim=paged_adamw_8bit"]), "cuda")
    check_optimizer(load_recipe(tiny_recipe_path), "cpu")
