import json
import shutil
import subprocess
import sys

import pytest
from conftest import ROOT

from pipeline.model import ModelNotFound, resolve_model_path

# A minimal chat template in the style of Instruct models: every turn ends with the EOS token.
CHAT_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}{{ eos_token }}{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)


def test_model_id_resolves_from_the_local_hf_cache_only(tmp_path, tiny_assets):
    snapshot = tmp_path / "hub" / "models--acme--tiny-coder" / "snapshots" / "0123abcd"
    shutil.copytree(tiny_assets["model"], snapshot)
    (tmp_path / "hub" / "models--acme--tiny-coder" / "refs").mkdir()
    (tmp_path / "hub" / "models--acme--tiny-coder" / "refs" / "main").write_text("0123abcd")
    code = (
        "from pipeline.model import resolve_model_path, ModelNotFound\n"
        "print(resolve_model_path('acme/tiny-coder'))\n"
        "try:\n    resolve_model_path('acme/absent')\nexcept ModelNotFound as e:\n    print('ERR', e)\n"
    )
    env = {**__import__("os").environ, "HF_HOME": str(tmp_path), "HF_HUB_OFFLINE": "1"}
    result = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120
    )
    lines = result.stdout.splitlines()
    assert lines[0] == str(snapshot), result.stderr
    assert lines[1].startswith("ERR model.path: acme/absent is not a local directory and is not in the local")
    assert "never downloads" in lines[1]


def test_directory_without_config_is_refused(tmp_path):
    with pytest.raises(ModelNotFound, match="has no config.json"):
        resolve_model_path(str(tmp_path))


def test_chat_template_path_trains_with_eos_closed_completions(tiny_assets, recipe_with, tmp_path):
    """The 70B Instruct path: prompts go through the chat template and every completion ends with EOS."""
    model_dir = tmp_path / "chat-model"
    shutil.copytree(tiny_assets["model"], model_dir)
    config_path = model_dir / "tokenizer_config.json"
    config = json.loads(config_path.read_text())
    config["chat_template"] = CHAT_TEMPLATE
    config_path.write_text(json.dumps(config))
    path = recipe_with(
        "chat.yaml",
        model={"path": str(model_dir)},
        data={"prompt_format": "chat"},
        training={"max_steps": 2},
        eval={"max_examples": 4},
        tracking={"enabled": False},
    )
    from pipeline.recipe import load_recipe
    from pipeline.train import train

    result = train(load_recipe(path), recipe_source=path, run_dir=tmp_path / "run")
    plan = json.loads((result.run_dir / "plan.json").read_text())
    assert plan["prompt_format"] == "chat"
    assert result.summary["data"]["examples"] == 160
    predictions = [
        json.loads(line) for line in (result.run_dir / "eval" / "predictions.jsonl").read_text().splitlines()
    ]
    assert len(predictions) == 8


def test_chat_format_without_template_is_a_recipe_error(tiny_assets, recipe_with, tmp_path):
    from helpers import run_main

    path = recipe_with("chat.yaml", data={"prompt_format": "chat"}, tracking={"enabled": False})
    result = run_main("train", str(path), "--run-dir", str(tmp_path / "run"))
    assert result.returncode == 2
    assert "data.prompt_format: 'chat' needs a chat template" in result.stderr


def test_tiny_base_build_is_deterministic(tmp_path):
    from pipeline.demo import TinyModelSpec, build_tiny_base

    spec = TinyModelSpec(
        vocab_size=300,
        hidden_size=64,
        intermediate_size=128,
        num_heads=2,
        pretrain_steps=2,
        pretrain_batch_size=2,
        pretrain_block_size=32,
    )
    a = build_tiny_base(tmp_path / "a", spec=spec)
    b = build_tiny_base(tmp_path / "b", spec=spec)
    assert (a / "model.safetensors").read_bytes() == (b / "model.safetensors").read_bytes()
    assert (a / "tokenizer.json").read_bytes() == (b / "tokenizer.json").read_bytes()


COMMIT = "9f1c2e0d4b7a6c5e8d3f2a1b0c9d8e7f6a5b4c3d"


def _local_download(root, files: dict[str, bytes], commit: str = COMMIT):
    """A model directory as `hf download --local-dir` leaves it: files plus one metadata record each."""
    import time

    meta_dir = root / ".cache" / "huggingface" / "download"
    meta_dir.mkdir(parents=True)
    for name, content in files.items():
        (root / name).write_bytes(content)
        (meta_dir / f"{name}.metadata").write_text(f"{commit}\netag-{name}\n{time.time() + 2}\n")
    return root


def test_local_directory_must_prove_the_recipe_revision(tmp_path):
    from pipeline.model import RevisionMismatch

    model = _local_download(tmp_path / "m", {"config.json": b"{}", "model.safetensors": b"weights"})
    assert resolve_model_path(str(model), COMMIT[:10]) == model  # a short commit prefix is enough
    assert resolve_model_path(str(model)) == model  # no revision pinned: nothing to check

    with pytest.raises(RevisionMismatch, match=rf"config.json was downloaded at commit {COMMIT}, not 1234567"):
        resolve_model_path(str(model), "1234567")

    # A file edited after it was downloaded no longer belongs to the revision.
    import os

    later = os.stat(model / "model.safetensors").st_mtime + 3600
    os.utime(model / "model.safetensors", (later, later))
    with pytest.raises(RevisionMismatch, match="model.safetensors was modified after it was downloaded"):
        resolve_model_path(str(model), COMMIT)


def test_unrecorded_files_and_bare_directories_cannot_claim_a_revision(tmp_path, tiny_assets):
    from pipeline.model import RevisionMismatch

    model = _local_download(tmp_path / "m", {"config.json": b"{}"})
    (model / "model.safetensors").write_bytes(b"copied in from elsewhere")
    with pytest.raises(RevisionMismatch, match=r"model.safetensors has no download record"):
        resolve_model_path(str(model), COMMIT)
    with pytest.raises(RevisionMismatch, match="cannot be verified .* remove model.revision"):
        resolve_model_path(str(tiny_assets["model"]), COMMIT)


def test_cache_snapshot_directory_is_checked_by_its_commit(tmp_path):
    from pipeline.model import RevisionMismatch

    snapshot = tmp_path / "models--acme--x" / "snapshots" / COMMIT
    snapshot.mkdir(parents=True)
    (snapshot / "config.json").write_text("{}")
    assert resolve_model_path(str(snapshot), COMMIT[:8]) == snapshot
    with pytest.raises(RevisionMismatch, match=f"cached snapshot of commit {COMMIT}, not abcdef1"):
        resolve_model_path(str(snapshot), "abcdef1")


def test_train_with_a_mismatched_revision_stops_before_loading_weights(tmp_path, recipe_with):
    from helpers import run_cli

    recipe = recipe_with("r.yaml", model={"revision": "deadbeef"})
    result = run_cli("train", str(recipe), "--run-dir", str(tmp_path / "run"))
    assert result.returncode == 2, result.stderr
    assert "model.revision: deadbeef cannot be verified" in result.stderr and "Traceback" not in result.stderr
    assert not (tmp_path / "run" / "adapter").exists()


def test_4bit_layers_keep_a_float32_compute_dtype_on_avx512_bf16_cpus():
    """bitsandbytes' CPU fast path (AVX512-BF16) repacks weights and computes in bf16; a float32 recipe turns it off."""
    import bitsandbytes as bnb
    import torch

    from pipeline.model import keep_compute_dtype_on_cpu

    model = torch.nn.Sequential(bnb.nn.Linear4bit(64, 64, compute_dtype=torch.float32, quant_type="nf4")).to("cpu")
    layer = model[0]
    assert hasattr(layer, "support_avx512bf16_for_cpu"), (
        f"bitsandbytes {bnb.__version__} no longer has Linear4bit.support_avx512bf16_for_cpu: find its new switch "
        "for the CPU bf16 fast path and update pipeline.model.keep_compute_dtype_on_cpu"
    )
    assert keep_compute_dtype_on_cpu(model, "bfloat16") == 0
    assert keep_compute_dtype_on_cpu(model, "float32") == 1 and layer.support_avx512bf16_for_cpu is False
    codes = layer.weight.data.clone()
    with torch.no_grad():
        model.eval()(torch.randn(3, 64))
    # Not repacked (the fast path would change the codes' layout in place), and the fp32 path gave the answer.
    assert torch.equal(layer.weight.data, codes)
    assert not getattr(layer.weight.quant_state, "packing_format_for_cpu", False)
