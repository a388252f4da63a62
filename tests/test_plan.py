import json
import math

import pytest
from conftest import ROOT

from pipeline.memory import CUDA_CONTEXT_GIB, NF4_DQ_BITS, estimate_host, estimate_memory
from pipeline.model import count_parameters_meta
from pipeline.plan import (
    count_parameters,
    find_model_config,
    make_plan,
    render_plan,
    shipped_model_ids,
)
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
    "overrides,loss,allocated,needed",
    [
        # shared/reference/memory-speed-cost.md section 2.5 (lora_dropout 0, fp32 adapters), stock path
        # (transformers' full-logits loss) and chunked cross-entropy: r=16/s=2048 and r=64/s=4096.
        ([], "full_logits", 47.9, 51.7),
        (["lora.r=64", "training.max_length=4096"], "full_logits", 61.5, 66.5),
        ([], "fused", 43.9, 47.4),
        (["lora.r=64", "training.max_length=4096"], "fused", 53.6, 57.9),
    ],
)
def test_memory_estimate_reproduces_the_reference_70b_cells(overrides, loss, allocated, needed):
    recipe = load_recipe(ROOT / "recipes" / "medical_coding.yaml", [*overrides, "lora.dropout=0"])
    config, _ = find_model_config(recipe.model.path)
    counts = count_parameters(config, recipe)
    # The note's layer is all bf16 (fp32_norms=False): 44.5 h saved per token, a 2h checkpointed input.
    # Its layer backward is 2x the layer's saved activations (ours is the measured 1.4, LAYER_BACKWARD_FACTOR).
    memory = estimate_memory(config, recipe, counts, loss=loss, param_bytes=4, fp32_norms=False, backward_factor=2)
    # The reference counts the CUDA context and the (paged) optimizer states inside "allocated"; we keep them
    # apart because PyTorch's allocator never sees them, and apply fragmentation to the allocator's part only.
    # The note assumed a 0.75 GiB CUDA context; ours is the H200 measurement (CUDA_CONTEXT_GIB).
    context_delta = CUDA_CONTEXT_GIB - 0.75
    assert memory["allocated_gib"] + memory["outside_allocator_gib"] - context_delta == pytest.approx(
        allocated, abs=0.1
    )
    assert memory["needed_gib"] - context_delta == pytest.approx(needed, abs=0.3)


def test_memory_arithmetic_by_hand_for_the_70b_recipe():
    recipe = load_recipe(ROOT / "recipes" / "medical_coding.yaml")  # r=16, dropout 0.05, 2,048 tokens, bf16
    config, _ = find_model_config(recipe.model.path)
    plan = make_plan(recipe, 10_000, config)
    c, gib = plan["memory"]["components_gib"], 2**30
    quantized, kept, vectors, trainable = 68_451_041_280, 2_102_665_216, 1_318_912, 207_093_760
    h, layers, tokens = 8192, 80, 2048
    expected = {
        "NF4 weights (4 bits)": quantized * 0.5,  # 31.875 GiB
        "quantization constants": quantized * (8 / 64 + 32 / (64 * 256)) / 8,  # 1.01 GiB
        "16-bit embeddings and head": (kept - vectors) * 2,  # 3.91 GiB
        "trainable weights": trainable * 2,  # TRL casts the adapter of a 4-bit model to bf16: 0.39 GiB
        "gradients": trainable * 2,
        "optimizer states (paged, unified memory)": trainable * (2 + 8 / 256),  # 8-bit states + absmax: 0.39
        "dequantized weight in flight": 28_672 * 8_192 * 2 * 1.1,  # gate/up/down in bf16 + 10%: 0.48 GiB
        # fp32 norms (k-bit preparation) make the residual stream fp32: 4 bytes x h per layer: 5.0 GiB
        "activations kept for backward": 4 * h * layers * tokens,
        # one layer recomputed: 1.4 (measured on an H200) x (8h fp32 norm inputs + 4 q_dim + 4 kv_dim + 12 I
        # fp32 SwiGLU + bf16 lora_A input copies 2 x (77,824 - 8,192 for o_proj) + lora_B inputs 2 x 16 x 7
        # + rsqrt 8 + logsumexp 4 x 64) + dropout (bool mask per adapted input 77,824 + o_proj's dropped-out
        # bf16 copy 2 x 8,192): 1.75 GiB
        "peak of loss or layer recompute": (
            1.4 * (8 * h + 4 * h + 4 * 1024 + 12 * 28_672 + 2 * (77_824 - 8_192) + 2 * 16 * 7 + 8 + 4 * 64)
            + (77_824 + 2 * 8_192)
        )
        * tokens,
        "CUDA context": 0.86 * gib,  # measured on an H200 during training steps
    }
    for name, value in expected.items():
        assert c[name] == pytest.approx(value / gib, abs=0.006), name
    inside = sum(v for k, v in expected.items() if "paged" not in k and k != "CUDA context") + vectors * 4
    needed = inside * 1.08 + expected["optimizer states (paged, unified memory)"] + 0.86 * gib
    assert plan["memory"]["allocated_gib"] == pytest.approx(inside / gib, abs=0.01)
    assert plan["memory"]["needed_gib"] == pytest.approx(needed / gib, abs=0.01) == pytest.approx(49.64, abs=0.01)
    # Loading: 4-bit weights and constants + every 16-bit parameter in fp32 + the bf16 original of the
    # matrix being cast (the embedding, 128,256 x 8,192 x 2 B): 42.68 GiB allocated (the probe measured 42.75).
    load_allocated = quantized * 0.5 + expected["quantization constants"] + kept * 4 + 128_256 * h * 2
    assert plan["memory"]["load_peak_gib"] == pytest.approx((load_allocated * 1.08 + 0.86 * gib) / gib, abs=0.01)
    # TRL's fused LM head: 3 fp32 copies of the final hidden state per token + 7 fp32 stats + one bf16
    # tile of 2,048 tokens x 32,768 vocab entries = 0.31 GiB, below the 1.75 GiB layer recompute.
    fused = tokens * (3 * 4 * h + 28) + 2048 * 32_768 * 2
    assert fused / gib < c["peak of loss or layer recompute"]


def test_memory_arithmetic_by_hand_without_checkpointing_eager_and_micro_batch():
    recipe = load_recipe(
        ROOT / "recipes" / "medical_coding.yaml",
        [
            "model.path=meta-llama/Llama-3.1-8B-Instruct",
            "model.attn_implementation=eager",
            "training.gradient_checkpointing=false",
            "training.micro_batch_size=2",
            "training.max_length=1024",
            "training.optim=adamw_torch",
            "lora.dropout=0",
        ],
    )
    config, _ = find_model_config(recipe.model.path)
    counts = count_parameters(config, recipe)
    memory = estimate_memory(config, recipe, counts, loss="full_logits")
    c, gib = memory["components_gib"], 2**30
    h, inter, kv, layers, heads, tokens = 4096, 14_336, 1024, 32, 32, 2 * 1024
    # Every layer keeps its activations (fp32 norms, see the 70B case; r=16 on all 7 projections, o_proj's
    # input h wide) + eager attention 8 bytes x heads x keys.
    lora_copies = 2 * (5 * h + inter) + 2 * 16 * 7
    layer = 8 * h + 4 * h + 4 * kv + 12 * inter + lora_copies + 8 + 4 * heads + 8 * heads * 1024
    assert c["activations kept for backward"] == pytest.approx(layer * layers * tokens / gib, abs=0.006)
    # The loss peak (22 bytes x 128,256 vocab per token = 5.4 GiB) beats one layer's backward (~1.1 GiB).
    assert c["peak of loss or layer recompute"] == pytest.approx(22 * 128_256 * tokens / gib, abs=0.006)
    # torch's AdamW keeps two states in the adapter's dtype (bf16): 4 bytes, inside the allocator.
    assert c["optimizer states"] == pytest.approx(counts["trainable"] * 4 / gib, abs=0.006)
    assert "optimizer states (paged, unified memory)" not in c


def test_fsdp_shards_weights_and_adapter_state_but_not_activations():
    recipe = load_recipe(ROOT / "recipes" / "medical_coding.yaml")
    config, _ = find_model_config(recipe.model.path)
    counts = count_parameters(config, recipe)
    one = estimate_memory(config, recipe, counts)["components_gib"]
    four = estimate_memory(config, recipe, counts, processes=4, sharded=True)
    c = four["components_gib"]
    for name in ("NF4 weights (4 bits)", "quantization constants", "trainable weights", "gradients"):
        assert c[name] == pytest.approx(one[name] / 4, abs=0.006), name
    paged = "optimizer states (paged, unified memory)"
    assert c[paged] == pytest.approx(one[paged] / 4, abs=0.006)
    assert c["16-bit embeddings and head"] == one["16-bit embeddings and head"]  # the root unit is gathered whole
    # attach_lora skips k-bit preparation under FSDP: no fp32 norms, so each GPU's own micro-batch runs the
    # all-bf16 layer: a 2h checkpointed input (2 B x 8,192 x 80 layers x 2,048 tokens = 2.5 GiB, not 5.0).
    bf16 = estimate_memory(config, recipe, counts, fp32_norms=False)["components_gib"]
    for name in ("activations kept for backward", "peak of loss or layer recompute"):
        assert c[name] == bf16[name] < one[name], name
    assert c["activations kept for backward"] == pytest.approx(2 * 8192 * 80 * 2048 / 2**30, abs=0.006)
    assert "norms and biases (16-bit)" in c and "norms and biases (fp32)" in one
    # Loading has no fp32 moment: the sharded 4-bit weights and the whole 16-bit root unit, all below training.
    load = (c["NF4 weights (4 bits)"] + c["quantization constants"] + c["16-bit embeddings and head"]) * 1.08
    assert four["load_peak_gib"] == pytest.approx(load + CUDA_CONTEXT_GIB, abs=0.02)
    assert four["needed_gib"] > four["load_peak_gib"]
    # docs/planner.md section 3: 28.8 / 19.6 / 15.0 GiB per GPU over 2 / 4 / 8 GPUs.
    per_gpu = [estimate_memory(config, recipe, counts, processes=g, sharded=True)["needed_gib"] for g in (2, 4, 8)]
    assert per_gpu == pytest.approx([28.81, 19.63, 15.03], abs=0.006)
    # One decoder layer gathered + the next prefetched: 2 x 855,638,016 weights x 4.127 bits.
    assert c["gathered layers (FSDP)"] == pytest.approx(2 * 855_638_016 * NF4_DQ_BITS / 8 / 2**30, abs=0.006)
    assert four["per_process"] == {"processes": 4, "sharded": True, "loss": "fused"}
    assert four["needed_gib"] < 0.5 * estimate_memory(config, recipe, counts)["needed_gib"]
    ddp = estimate_memory(config, recipe, counts, processes=4)["components_gib"]
    assert ddp["gradient buckets (DDP)"] == one["gradients"]
    assert ddp["NF4 weights (4 bits)"] == one["NF4 weights (4 bits)"]


def test_a_recipe_too_big_for_one_gpu_is_told_how_many_gpus_fsdp_needs():
    recipe = load_recipe(ROOT / "recipes" / "medical_coding.yaml", ["hardware.gpu_memory_gb=30"])
    config, _ = find_model_config(recipe.model.path)
    plan = make_plan(recipe, 100, config)
    assert plan["fit"]["fits"] is False
    needed = plan["memory"]["needed_gib"]
    per_gpu = estimate_memory(config, recipe, count_parameters(config, recipe), processes=2, sharded=True)
    fsdp = f"FSDP-QLoRA over 2 GPUs (hardware.num_gpus: 2, hardware.distributed: fsdp): {per_gpu['needed_gib']:.1f} GiB"
    # The 4-bit weights and constants alone (32.9 GiB) exceed 30 GiB: no single-GPU knob can make it fit, so
    # only sharding and a bigger GPU are offered.
    assert plan["fit"]["suggestions"] == [fsdp + " per GPU", f"a GPU with at least {math.ceil(needed)} GiB"]
    text = render_plan(plan)
    assert f"does not fit: {needed:.1f} GiB needed on the GPU, 30 GiB available" in text


def test_host_ram_and_disk_for_load_checkpoints_and_merge(tiny_assets):
    recipe = load_recipe(ROOT / "recipes" / "medical_coding.yaml")
    config, _ = find_model_config(recipe.model.path)
    counts = count_parameters(config, recipe)
    host, gib = estimate_host(config, recipe, counts), 2**30
    total, trainable = 70_553_706_496, 207_093_760
    # The streaming merge holds the adapter and one tensor at work, not the base: the largest linear (down_proj,
    # 8,192 x 28,672) as original + fp32 dequant(NF4(W)) + output (8 B a weight) + a 4,096-row slice of its
    # 28,672 inputs at 10 B: 1.75 + 1.09 GiB, more than the 1.96 GiB embedding read and written as it is.
    working = 8 * 8192 * 28672 + 10 * 4096 * 28672
    assert working > 128_256 * 8192 * 2
    assert host["ram_gib"]["merge"] == pytest.approx(3 + (trainable * 2 + working) / gib, abs=0.01)  # 6.2
    # Verifying loads the merged bf16 model with device_map="auto": what the 80 GiB GPU (less the CUDA context)
    # cannot hold stays in host RAM; on a CPU all of it does.
    assert host["ram_gib"]["verify merge"] == pytest.approx(3 + total * 2 / gib - (80 - CUDA_CONTEXT_GIB), abs=0.01)
    on_cpu = estimate_host(
        config, load_recipe(ROOT / "recipes" / "medical_coding.yaml", ["hardware.device=cpu"]), counts
    )
    assert on_cpu["ram_gib"]["verify merge"] == pytest.approx(3 + total * 2 / gib, abs=0.01)  # 134.4
    original = load_recipe(ROOT / "recipes" / "medical_coding.yaml", ["export.merge_base=original"])
    merge_original = estimate_host(config, original, counts)["ram_gib"]["merge"]
    # Into the original weights: original + output (4 B) + the slice upcast too (14 B): 0.88 + 1.53 GiB.
    working = 4 * 8192 * 28672 + 14 * 4096 * 28672
    assert merge_original == pytest.approx(3 + (trainable * 2 + working) / gib, abs=0.01)
    assert host["ram_gib"]["load"] == pytest.approx(3 + 5e9 / gib, abs=0.01)  # one 5 GB shard mapped at a time
    checkpoint = trainable * 2 + trainable * (2 + 8 / 256)  # bf16 adapter + 8-bit AdamW states
    disk = host["disk_gib"]
    assert disk[f"checkpoints (3 x {checkpoint / gib:.2f} GiB)"] == pytest.approx(3 * checkpoint / gib, abs=0.01)
    assert disk["base weights"] == disk["merged export (bf16)"] == pytest.approx(total * 2 / gib, abs=0.01)
    # With the model on disk, its safetensors are measured instead.
    model_dir = tiny_assets["model"]
    measured = estimate_host(config, recipe, counts, model_dir)
    size = sum(f.stat().st_size for f in model_dir.glob("*.safetensors"))
    assert measured["base_measured"] and measured["disk_gib"]["base weights"] == round(size / gib, 2)


def test_checkpointing_and_optimizer_choices_move_the_estimate():
    base = ROOT / "recipes" / "medical_coding.yaml"
    config, _ = find_model_config(load_recipe(base).model.path)

    def needed(*overrides):
        return make_plan(load_recipe(base, list(overrides)), 1, config)["memory"]["needed_gib"]

    assert needed("training.gradient_checkpointing=false") > needed() + 20  # 80 layers of activations
    # Paged 32-bit states: 8 - 2.03 more bytes per trainable parameter (207.1M) = 1.15 GiB, in unified
    # memory outside PyTorch's allocator (no fragmentation on top).
    assert needed("training.optim=paged_adamw_32bit") - needed() == pytest.approx(1.15, abs=0.02)
    assert needed("lora.dropout=0") < needed()  # no dropout copies in the recomputed layer


def test_a_recipe_that_does_not_fit_is_refused_with_suggestions(tmp_path, recipe_with):
    from helpers import run_main

    out = tmp_path / "plan"
    result = run_main(
        "plan", "recipes/medical_coding.yaml", "--set", "training.max_length=32768", "--run-dir", str(out)
    )
    assert result.returncode == 1
    assert "does not fit: " in result.stdout and "training.max_length 32768 -> 8192: " in result.stdout
    assert json.loads((out / "plan.json").read_text())["fit"]["fits"] is False

    path = recipe_with("big.yaml", hardware={"device": "auto", "gpu_memory_gb": 0.001}, tracking={"enabled": False})
    refused = run_main("train", str(path), "--run-dir", str(tmp_path / "run"))
    assert refused.returncode == 1
    assert "does not fit" in refused.stderr and "Refused before loading any weights" in refused.stderr
    assert "Base loaded" not in refused.stdout and not (tmp_path / "run" / "adapter").exists()


# Tiny architectures for the exact-count cross-check: widths differ per layer type so a swapped shape would
# show, GQA everywhere, biases where the family has them.
TINY = {
    "llama": {
        "model_type": "llama",
        "hidden_size": 64,
        "intermediate_size": 192,
        "num_hidden_layers": 3,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "vocab_size": 320,
        "tie_word_embeddings": False,
    },
    "llama-biases-head-dim": {
        "model_type": "llama",
        "hidden_size": 64,
        "intermediate_size": 128,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 1,
        "head_dim": 32,
        "vocab_size": 256,
        "attention_bias": True,
        "mlp_bias": True,
    },
    "mistral": {
        "model_type": "mistral",
        "hidden_size": 128,
        "intermediate_size": 256,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "head_dim": 32,
        "vocab_size": 384,
        "sliding_window": None,
    },
    "qwen2": {
        "model_type": "qwen2",
        "hidden_size": 64,
        "intermediate_size": 320,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "vocab_size": 448,
        "tie_word_embeddings": True,
    },
}


@pytest.mark.parametrize("arch", sorted(TINY))
@pytest.mark.parametrize(
    "lora",
    [
        ["lora.r=4"],
        ["lora.r=32", "lora.target_modules=[q_proj, v_proj, down_proj]"],
        ["lora.r=8", "lora.modules_to_save=[embed_tokens]"],
        ["lora.r=8", "quantization.load_in_4bit=false"],
    ],
    ids=["r4-all-linear", "r32-qv-down", "r8-embeddings", "r8-16bit-base"],
)
def test_analytic_counts_equal_the_meta_device_model_with_peft(arch, lora):
    recipe = load_recipe(QUICK, lora)
    assert count_parameters(TINY[arch], recipe) == count_parameters_meta(TINY[arch], recipe)


@pytest.mark.parametrize(
    "model_id", ["meta-llama/Llama-3.3-70B-Instruct", "mistralai/Mistral-7B-Instruct-v0.3", "Qwen/Qwen2.5-7B-Instruct"]
)
def test_shipped_configs_count_the_same_on_the_meta_device(model_id):
    recipe = load_recipe(ROOT / "recipes" / "medical_coding.yaml", [f"model.path={model_id}", "lora.r=64"])
    config, _ = find_model_config(model_id)
    assert count_parameters(config, recipe) == count_parameters_meta(config, recipe)


# Published parameter totals (model cards; Llama-3.1-8B: 8,030,261,248 in its safetensors index).
PUBLISHED_TOTALS = {
    "meta-llama/Llama-3.3-70B-Instruct": 70_553_706_496,
    "meta-llama/Llama-3.1-70B": 70_553_706_496,
    "meta-llama/Llama-3.1-70B-Instruct": 70_553_706_496,
    "meta-llama/Llama-3.1-8B": 8_030_261_248,
    "meta-llama/Llama-3.1-8B-Instruct": 8_030_261_248,
    "mistralai/Mistral-7B-v0.3": 7_248_023_552,
    "mistralai/Mistral-7B-Instruct-v0.3": 7_248_023_552,
    "Qwen/Qwen2.5-72B-Instruct": 72_706_203_648,  # "72.7B" on the model card
    "Qwen/Qwen2.5-7B-Instruct": 7_615_616_512,  # "7.61B"
}


def test_every_shipped_config_matches_its_published_size():
    assert shipped_model_ids() == sorted(PUBLISHED_TOTALS)
    recipe = load_recipe(ROOT / "recipes" / "medical_coding.yaml")
    for model_id, total in PUBLISHED_TOTALS.items():
        config, source = find_model_config(model_id)
        assert "shipped" in source
        assert count_parameters(config, recipe)["total"] == total, model_id
        assert config["torch_dtype"] == "bfloat16" and config["tie_word_embeddings"] is False


def test_a_recipe_that_does_not_fit_never_calls_load_base(tmp_path, recipe_with, monkeypatch):

    import pipeline.train
    from pipeline.plan import DoesNotFit
    from pipeline.recipe import load_recipe as load

    def load_base(*args, **kwargs):
        raise AssertionError("load_base was called for a recipe that does not fit")

    monkeypatch.setattr(pipeline.train, "load_base", load_base)
    path = recipe_with("big.yaml", hardware={"device": "auto", "gpu_memory_gb": 0.001}, tracking={"enabled": False})
    with pytest.raises(DoesNotFit, match="Refused before loading any weights"):
        pipeline.train.train(load(path), recipe_source=path, run_dir=tmp_path / "run")
    saved = json.loads((tmp_path / "run" / "plan.json").read_text())
    assert saved["fit"]["fits"] is False and saved["memory"]["needed_gib"] > 0.001


def test_train_force_goes_past_the_refusal(tmp_path, recipe_with, monkeypatch):
    """`train --force` with a recipe that does not fit reaches load_base (a sentinel stops it there)."""

    import pipeline.train
    from pipeline.cli import main

    class PastTheRefusal(Exception):
        pass

    def load_base(*args, **kwargs):
        raise PastTheRefusal

    monkeypatch.setattr(pipeline.train, "load_base", load_base)
    path = recipe_with("big.yaml", hardware={"device": "auto", "gpu_memory_gb": 0.001}, tracking={"enabled": False})
    with pytest.raises(PastTheRefusal):
        main(["train", str(path), "--force", "--run-dir", str(tmp_path / "run")])
    # The plan said it does not fit (without --force the same recipe is refused: the tests above).
    assert json.loads((tmp_path / "run" / "plan.json").read_text())["fit"]["fits"] is False


def test_plan_exact_counts_on_the_meta_device_and_writes_plan_json(tmp_path):
    from helpers import run_cli

    result = run_cli("plan", "recipes/medical_coding.yaml", "--exact", "--run-dir", str(tmp_path))
    assert result.returncode == 0, result.stderr
    assert "counted meta-device" in result.stdout and "host RAM: load" in result.stdout
    saved = json.loads((tmp_path / "plan.json").read_text())
    assert saved["parameters"]["method"] == "meta-device" and saved["parameters"]["total"] == 70_553_706_496
    assert saved["host"]["disk_gib"]["total"] > 260 and saved["model_config_source"].startswith("shipped")


def test_train_refuses_random_weights(tiny_recipe_path):
    from helpers import run_cli

    result = run_cli("train", str(tiny_recipe_path), "--set", "model.init=random")
    assert result.returncode == 2 and "model.init: random" in result.stderr and "gpu_probe" in result.stderr


def saved_activation_bytes(config, recipe):
    """Bytes of the distinct tensors autograd saves in one forward (parameters excluded), per token."""
    import torch
    from helpers import load_probe

    model = load_probe().training_model(config, recipe, "cpu")
    model.train()
    params = {p.data_ptr() for p in model.parameters()}
    saved = {}

    def pack(tensor):
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in params:
            saved[storage.data_ptr()] = storage.nbytes()
        return tensor

    tokens = recipe.training.max_length
    ids = torch.randint(0, config["vocab_size"], (1, tokens), generator=torch.Generator().manual_seed(0))
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), torch.autocast("cpu", dtype=torch.bfloat16):
        model(input_ids=ids, attention_mask=torch.ones_like(ids), labels=ids, fused_lm_head=True)
    return sum(saved.values()) / tokens


@pytest.mark.parametrize("case", ["layer", "checkpointed", "dropout"])
def test_activation_terms_match_the_tensors_autograd_saves(case):
    """The planner's per-layer activation bytes against a real forward (4-bit, bf16 autocast, fused head).

    One more decoder layer adds exactly the planner's bytes per token. On the CPU the dropout mask is kept in
    the input's dtype (2 bytes) instead of CUDA's bool (1 byte), which the comparison adds back.
    """
    from pipeline.memory import architecture, layer_activation_bytes

    config = {
        "model_type": "llama",
        "hidden_size": 256,
        "intermediate_size": 896,  # 3.5 h, as Llama-3-70B
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "vocab_size": 1024,
        "tie_word_embeddings": False,
    }
    overrides = [
        "quantization.compute_dtype=bfloat16",
        f"lora.dropout={0.05 if case == 'dropout' else 0}",
        f"training.gradient_checkpointing={case == 'checkpointed'}",
        "lora.modules_to_save=[]",
        "training.max_length=128",
    ]
    recipe = load_recipe(QUICK, overrides)
    measured = {}
    for layers in (2, 3):
        measured[layers] = saved_activation_bytes({**config, "num_hidden_layers": layers}, recipe)
    per_layer = measured[3] - measured[2]
    arch = architecture({**config, "num_hidden_layers": 3})
    layer, layer_input, dropout = layer_activation_bytes(
        arch, count_parameters({**config, "num_hidden_layers": 3}, recipe), recipe
    )
    if case == "checkpointed":
        assert per_layer == layer_input == 4 * 256  # the fp32 residual stream
    elif case == "layer":
        assert per_layer == layer  # 18,936 bytes = 74 h for this shape
    else:
        cpu_mask_extra = 1 * (5 * 256 + 256 + 896)  # one more byte per adapted input feature
        assert per_layer == layer + dropout + cpu_mask_extra


def test_meta_device_counts_an_architecture_the_analytic_count_does_not_know():
    """Qwen3 (per-head q/k norms) is outside the analytic family: the meta count must equal a real model's."""
    from peft import get_peft_model
    from torch import nn
    from transformers import AutoModelForCausalLM

    from pipeline.model import lora_config, transformers_config

    config = {
        "model_type": "qwen3",
        "hidden_size": 128,
        "intermediate_size": 384,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "head_dim": 32,
        "vocab_size": 512,
        "tie_word_embeddings": False,
    }
    recipe = load_recipe(QUICK, ["lora.r=8", "lora.modules_to_save=[]"])
    automatic = make_plan(recipe, 1, config)["parameters"]  # outside the analytic family: meta count, unasked
    assert automatic["method"] == "meta-device (automatic)"
    counts = make_plan(recipe, 1, config, exact=True)["parameters"]
    assert counts["method"] == "meta-device" and counts == {**automatic, "method": "meta-device"}
    real = AutoModelForCausalLM.from_config(transformers_config(config))  # real (CPU) weights, no quantization
    assert counts["total"] == sum(p.numel() for p in real.parameters())
    linear = sum(m.weight.numel() for n, m in real.named_modules() if type(m) is nn.Linear and n != "lm_head")
    assert counts["quantized"] == linear
    peft_model = get_peft_model(real, lora_config(recipe.lora))
    assert counts["trainable"] == counts["lora"] == sum(p.numel() for p in peft_model.parameters() if p.requires_grad)


def test_suggestions_name_a_value_and_its_estimate_and_only_those_that_fit():
    base = ROOT / "recipes" / "medical_coding.yaml"
    config, _ = find_model_config(load_recipe(base).model.path)

    def plan(*overrides):
        return make_plan(load_recipe(base, list(overrides)), 1, config)

    def needed(*overrides):
        return plan(*overrides)["memory"]["needed_gib"]

    # 32,768 tokens on 80 GiB: halving to 16,384 is not enough, 8,192 is; the suggestion carries its estimate.
    long = plan("training.max_length=32768", "hardware.gpu_memory_gb=80")["fit"]
    assert needed("training.max_length=16384") > 80 >= needed("training.max_length=8192")
    assert long["suggestions"][0] == f"training.max_length 32768 -> 8192: {needed('training.max_length=8192'):.1f} GiB"
    # A smaller rank or micro-batch 1 cannot save ~80 GiB of activations: not offered.
    assert not any(tip.startswith(("lora.r", "training.micro_batch_size")) for tip in long["suggestions"])
    assert all(option["needed_gib"] <= 80 for option in long["alternatives"][:-1])  # the last: a bigger GPU

    # A large rank just over the GPU: the largest halving that fits, re-estimated with the rank's own counts
    # (the rescaled LoRA count equals a recount at r=64).
    gpu = needed("lora.r=128") - 0.5
    fit = plan("lora.r=128", f"hardware.gpu_memory_gb={gpu}")["fit"]
    rank = [o for o in fit["alternatives"] if o["setting"] == "lora.r"]
    assert rank == [
        {"setting": "lora.r", "from": 128, "to": 64, "needed_gib": needed("lora.r=64"), "text": rank[0]["text"]}
    ]
    assert rank[0]["text"] == f"lora.r 128 -> 64: {needed('lora.r=64'):.1f} GiB"

    # Micro-batch 4 -> 1 keeps the effective batch through accumulation.
    gpu = needed("training.micro_batch_size=4") - 1
    tips = plan("training.micro_batch_size=4", f"hardware.gpu_memory_gb={gpu}")["fit"]["suggestions"]
    assert (
        "training.micro_batch_size 4 -> 1 (gradient_accumulation_steps 16 -> 64, same batch): "
        f"{needed('training.micro_batch_size=1', 'training.gradient_accumulation_steps=64'):.1f} GiB"
    ) in tips


# A Gemma2 base (outside the analytic Llama family: tied embeddings, four norms per layer, no sdpa in transformers
# 5.x), tiny so that its meta-device build takes milliseconds once torch is imported.
GEMMA2 = {
    "model_type": "gemma2",
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 2,
    "num_key_value_heads": 1,
    "head_dim": 32,
    "vocab_size": 512,
}


def test_an_architecture_outside_the_llama_family_gets_a_verdict_and_is_refused(
    tmp_path, tiny_assets, monkeypatch, capsys
):
    """plan exits 1 and train refuses before loading weights for a Gemma2 base that does not fit."""
    import shutil

    from conftest import write_recipe

    import pipeline.train
    from pipeline.plan import DoesNotFit

    model = tmp_path / "gemma2"
    shutil.copytree(tiny_assets["model"], model)  # the tokenizer and files train reads before the plan
    (model / "config.json").write_text(json.dumps(GEMMA2), encoding="utf-8")
    data = {
        "extends": str(QUICK),
        "name": "gemma2-too-big",
        "model": {"path": str(model)},
        "data": {
            "contract": str(ROOT / "data_contracts" / "medical_coding.yaml"),
            "train": str(tiny_assets["data"] / "train.jsonl"),
            "eval": str(tiny_assets["data"] / "eval.jsonl"),
        },
        "hardware": {"device": "auto", "gpu_memory_gb": 0.5},  # the CUDA context alone is 0.86 GiB
        "tracking": {"enabled": False},
    }
    path = write_recipe(tmp_path / "gemma2.yaml", data)

    # In-process: a subprocess would pay torch's and transformers' import again (~15 s on 2 cores).
    from pipeline.cli import main

    assert main(["plan", str(path), "--run-dir", str(tmp_path / "plan")]) == 1
    out = capsys.readouterr().out
    assert "counted meta-device (automatic)" in out
    assert "does not fit: " in out and "gemma2 differs" in out
    saved = json.loads((tmp_path / "plan" / "plan.json").read_text())
    assert saved["fit"]["fits"] is False and saved["parameters"]["total"] > 0

    def load_base(*args, **kwargs):
        raise AssertionError("load_base was called for a recipe that does not fit")

    monkeypatch.setattr(pipeline.train, "load_base", load_base)
    with pytest.raises(DoesNotFit, match="Refused before loading any weights"):
        pipeline.train.train(load_recipe(path), recipe_source=path, run_dir=tmp_path / "run")
    assert json.loads((tmp_path / "run" / "plan.json").read_text())["parameters"]["method"] == "meta-device (automatic)"
