import math

import pytest
from conftest import ROOT

from pipeline.plan import count_parameters, find_model_config, make_plan, render_plan
from pipeline.recipe import load_recipe

QUICK = ROOT / "recipes" / "quickstart.yaml"


def test_step_arithmetic_follows_the_trainer():
    recipe = load_recipe(
        QUICK,
        [
            "training.micro_batch_size=4",
            "training.gradient_accumulation_steps=3",
            "training.num_epochs=2.5",
            "training.warmup_ratio=0.1",
        ],
    )
    plan = make_plan(recipe, num_train_rows=101, model_config=None, world_size=2)
    # 101 rows / (4 x 2 processes) = 13 batches; ceil(13 / 3) = 5 steps/epoch; ceil(2.5 x 5) = 13 steps.
    assert plan["effective_batch_size"] == 24
    assert plan["steps_per_epoch"] == 5 and plan["optimizer_steps"] == 13
    assert plan["warmup_steps"] == math.ceil(0.1 * 13)
    assert plan["max_tokens_per_step"] == 24 * recipe.training.max_length
    capped = make_plan(load_recipe(QUICK, ["training.max_steps=7"]), 1000, None)
    assert capped["optimizer_steps"] == 7


def test_70b_counts_from_the_shipped_config():
    recipe = load_recipe(ROOT / "recipes" / "medical_coding.yaml")
    config, source = find_model_config(recipe.model.path)
    assert "shipped" in source
    counts = count_parameters(config, recipe)
    # Hand arithmetic (docstring of pipeline.plan): 80 x 855,638,016 linear weights; 2 x 128,256 x 8,192
    # embeddings + head; 161 RMSNorm vectors of 8,192.
    assert counts["quantized"] == 80 * 855_638_016
    assert counts["total"] == 80 * 855_638_016 + 2 * 128_256 * 8_192 + 161 * 8_192
    assert counts["lora"] == 16 * 161_792 * 80 == counts["trainable"]
    plan = make_plan(recipe, 10_000, config)
    assert plan["weights_memory_gib"] == pytest.approx(36.8, abs=0.05)
    assert "207.09M trainable" in render_plan(plan, source)


@pytest.mark.parametrize(
    "overrides",
    [
        [],
        ["lora.r=8", "lora.target_modules=[q_proj, v_proj, down_proj]", "lora.modules_to_save=[]"],
    ],
)
def test_counts_are_exact_against_peft_on_a_real_4bit_model(tiny_assets, overrides):
    from pipeline.model import attach_lora, load_base

    recipe = load_recipe(QUICK, [f"model.path={tiny_assets['model']}", *overrides])
    config, _ = find_model_config(str(tiny_assets["model"]))
    counts = count_parameters(config, recipe)
    model = attach_lora(load_base(recipe, tiny_assets["model"], "cpu"), recipe)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    lora = sum(p.numel() for n, p in model.named_parameters() if "lora_" in n)
    assert trainable == counts["trainable"] and lora == counts["lora"]
    # Total base parameters: count on an unquantized copy (4-bit storage packs two weights per byte).
    from transformers import AutoModelForCausalLM

    plain = AutoModelForCausalLM.from_pretrained(tiny_assets["model"])
    assert sum(p.numel() for p in plain.parameters()) == counts["total"]


def test_unknown_architecture_is_refused_clearly():
    recipe = load_recipe(QUICK)
    with pytest.raises(ValueError, match="llama, mistral, qwen2 models, not 'gpt2'"):
        count_parameters({"model_type": "gpt2"}, recipe)


@pytest.mark.parametrize(
    "overrides,allocated,needed",
    [
        # shared/reference/memory-speed-cost.md section 2.5, stock path: r=16/s=2048 and r=64/s=4096.
        ([], 47.9, 51.7),
        (["lora.r=64", "lora.alpha=128", "training.max_length=4096"], 61.5, 66.5),
    ],
)
def test_memory_estimate_reproduces_the_worked_70b_example(overrides, allocated, needed):
    recipe = load_recipe(ROOT / "recipes" / "medical_coding.yaml", overrides)
    config, _ = find_model_config(recipe.model.path)
    plan = make_plan(recipe, 10_000, config)
    assert plan["memory"]["allocated_gib"] == pytest.approx(allocated, abs=0.15)
    assert plan["memory"]["needed_gib"] == pytest.approx(needed, abs=0.15)
    assert plan["fit"]["fits"] is True and "GB to spare" in plan["fit"]["message"]
    components = plan["memory"]["components_gib"]
    assert components["base weights (quantized)"] == pytest.approx(32.89, abs=0.01)
    assert sum(components.values()) == pytest.approx(plan["memory"]["needed_gib"], abs=0.05)


def test_checkpointing_and_optimizer_choices_move_the_estimate():
    base = ROOT / "recipes" / "medical_coding.yaml"
    config, _ = find_model_config(load_recipe(base).model.path)

    def needed(*overrides):
        return make_plan(load_recipe(base, list(overrides)), 1, config)["memory"]["needed_gib"]

    assert needed("training.gradient_checkpointing=false") > needed() + 20  # 80 layers of activations
    # 32-bit states: 6 more bytes per trainable parameter (207.1M) = 1.16 GiB, x 1.08 fragmentation.
    assert needed("training.optim=paged_adamw_32bit") - needed() == pytest.approx(1.16 * 1.08, abs=0.02)


def test_a_recipe_that_does_not_fit_is_refused_with_suggestions(tmp_path, tiny_recipe_data):
    from conftest import write_recipe
    from test_recipe import run_cli

    result = run_cli("plan", "recipes/medical_coding.yaml", "--set", "training.max_length=16384")
    assert result.returncode == 1
    assert "does not fit: " in result.stdout and "a shorter training.max_length (now 16384; try 8192)" in result.stdout

    path = write_recipe(
        tmp_path / "big.yaml",
        {**tiny_recipe_data, "hardware": {"device": "auto", "gpu_memory_gb": 0.001}, "tracking": {"enabled": False}},
    )
    refused = run_cli("train", str(path), "--run-dir", str(tmp_path / "run"))
    assert refused.returncode == 1
    assert "does not fit" in refused.stderr and "Refused before loading any weights" in refused.stderr
    assert "Base loaded" not in refused.stdout and not (tmp_path / "run" / "adapter").exists()
