"""Derived numbers, said out loud before training: batch, steps, tokens, parameters.

Pure functions of the recipe, the base's ``config.json`` and a row count: no torch, no weights. The
parameter counts are exact for Llama-family decoders (llama, mistral, qwen2): they are checked in the tests
against peft on a real model.

The arithmetic, for a Llama with hidden size h, MLP size I, L layers, n_q query heads, n_kv key/value
heads of size d and vocabulary V:

* linear weights per layer: q (h x n_q d) + k, v (h x n_kv d each) + o (n_q d x h) + gate, up (h x I each)
  + down (I x h). Llama-3-70B: 67.1M + 2 x 8.4M + 67.1M + 3 x 234.9M = 855.6M, x 80 layers = 68.45B.
* everything else stays 16-bit: embeddings V x h, output head V x h (unless tied), RMSNorm weights
  (2 per layer + 1) x h. Llama-3-70B: 2 x 128,256 x 8,192 = 2.10B -> 70.55B parameters in all.
* LoRA adds r x (in + out) per adapted linear: Llama-3-70B, all 7 projections, r=16:
  16 x 161,792 per layer x 80 = 207.1M trainable (0.29%).
* NF4 with double quantization stores 4 bits + 8/64 + 32/(64 x 256) = 4.127 bits per quantized weight
  (QLoRA paper, section 3): 68.45B x 4.127 / 8 bytes = 32.9 GiB.
"""

from __future__ import annotations

import json
import math
from importlib import resources
from pathlib import Path
from typing import Any

from pipeline.recipe import Recipe

NF4_DQ_BITS = 4 + 8 / 64 + 32 / (64 * 256)  # 4.127 bits per weight (QLoRA section 3)
LLAMA_FAMILY = ("llama", "mistral", "qwen2")
LINEAR_NAMES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def shipped_config_name(model_id: str) -> str:
    """File name of a shipped architecture config for a model id (``org/name`` -> ``org--name.json``)."""
    return model_id.replace("/", "--") + ".json"


def find_model_config(path: str) -> tuple[dict[str, Any] | None, str]:
    """The base's config.json, from the model directory or from the configs shipped with pipeline.

    Returns:
        The config (or None) and where it came from (or why it was not found).
    """
    local = Path(path) / "config.json"
    if local.is_file():
        try:
            config = json.loads(local.read_text(encoding="utf-8"))
        except (ValueError, UnicodeDecodeError) as exc:
            return None, f"{local} is not valid JSON: {exc}"
        if not isinstance(config, dict):
            return None, f"{local} does not hold a JSON object"
        return config, str(local)
    shipped = resources.files("pipeline") / "model_configs" / shipped_config_name(path)
    if shipped.is_file():
        return json.loads(shipped.read_text(encoding="utf-8")), f"shipped config for {path}"
    return None, f"no config.json at {path} and no shipped config for it"


def linear_shapes(config: dict[str, Any]) -> dict[str, tuple[int, int]]:
    """(in_features, out_features) of each linear layer in one decoder layer of a Llama-family model."""
    h = config["hidden_size"]
    n_q = config["num_attention_heads"]
    n_kv = config.get("num_key_value_heads") or n_q
    d = config.get("head_dim") or h // n_q
    inter = config["intermediate_size"]
    return {
        "q_proj": (h, n_q * d),
        "k_proj": (h, n_kv * d),
        "v_proj": (h, n_kv * d),
        "o_proj": (n_q * d, h),
        "gate_proj": (h, inter),
        "up_proj": (h, inter),
        "down_proj": (inter, h),
    }


def count_parameters(config: dict[str, Any], recipe: Recipe) -> dict[str, int]:
    """Exact parameter counts of a Llama-family base with the recipe's adapter.

    Returns:
        ``total`` (base), ``quantized`` (decoder linear weights stored in 4 bits, 0 for a 16-bit base),
        ``kept_16bit`` (everything else in the base), ``trainable`` (LoRA + modules_to_save) and ``lora``.

    Raises:
        ValueError: For an architecture outside the Llama family.
    """
    model_type = config.get("model_type")
    if model_type not in LLAMA_FAMILY:
        raise ValueError(f"parameter counts support {', '.join(LLAMA_FAMILY)} models, not {model_type!r}")
    for key in ("hidden_size", "intermediate_size", "vocab_size", "num_hidden_layers", "num_attention_heads"):
        value = config.get(key)
        if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
            raise ValueError(f"config.json: {key} must be a positive integer, got {value!r}")
    h, vocab, layers = config["hidden_size"], config["vocab_size"], config["num_hidden_layers"]
    shapes = linear_shapes(config)
    linear_weights = sum(i * o for i, o in shapes.values())
    # Qwen2 has biases on q, k and v; Llama/Mistral configs say so with attention_bias / mlp_bias.
    qkv_bias = model_type == "qwen2" or config.get("attention_bias", False)
    biases = sum(shapes[n][1] for n in ("q_proj", "k_proj", "v_proj")) if qkv_bias else 0
    if config.get("attention_bias", False):
        biases += shapes["o_proj"][1]
    if config.get("mlp_bias", False):
        biases += sum(shapes[n][1] for n in ("gate_proj", "up_proj", "down_proj"))
    norms = 2 * h
    per_layer = linear_weights + biases + norms
    embed = vocab * h
    tied = config.get("tie_word_embeddings", False)
    head = 0 if tied else vocab * h
    total = embed + head + layers * per_layer + h
    quantized = layers * linear_weights if recipe.quantization.load_in_4bit else 0

    targets = recipe.lora.target_modules
    adapted = LINEAR_NAMES if targets == "all-linear" else [n for n in LINEAR_NAMES if n in targets]
    lora = layers * sum(recipe.lora.r * (shapes[n][0] + shapes[n][1]) for n in adapted)
    full = 0
    for module in recipe.lora.modules_to_save:
        if module == "embed_tokens":
            full += embed
        elif module == "lm_head":
            full += vocab * h
    return {
        "total": total,
        "quantized": quantized,
        "kept_16bit": total - quantized,
        "lora": lora,
        "trainable": lora + full,
    }


class DoesNotFit(Exception):
    """The memory estimate exceeds the GPU: refused before any weights load (exit 1; --force overrides)."""


# Memory estimate (shared/reference memory-speed-cost.md, section 2; all terms in bytes).
OPTIMIZER_STATE_BYTES = {"paged_adamw_8bit": 2, "adamw_8bit": 2, "paged_adamw_32bit": 8, "adamw_torch": 8}
CUDA_CONTEXT_GIB = 0.75  # context + cuBLAS workspaces, outside the allocator (0.3-2 GiB reported)
FRAGMENTATION = 1.08  # reserved / allocated under the caching allocator
LOGIT_BYTES = 22  # per vocabulary entry per token at the loss: bf16 logits, fp32 upcast, log-softmax, grad
LAYER_BYTES_PER_HIDDEN = 89  # one decoder layer's saved tensors (~44.5 h) plus its backward buffers, per token


def estimate_memory(config: dict[str, Any], recipe: Recipe, counts: dict[str, int]) -> dict[str, Any]:
    """Peak GPU memory of one training process, by component (GiB).

    Fixed: NF4 weights at 4.127 bits (4.5 without double quantization); the rest of the base in 16 bits
    (32 when computing in fp32); trainable weights and their gradients in fp32 (4 + 4 bytes); optimizer
    states (2 bytes for 8-bit AdamW, 8 for 32-bit); the largest linear dequantized to 16 bits for its matmul;
    CUDA context. Per token (micro-batch x max_length): with gradient checkpointing each layer keeps its
    bf16 input (2 h bytes per layer), and backward recomputes one layer (~89 h bytes); without it every
    layer keeps its activations. The loss peaks at ~22 bytes per vocabulary entry per token (transformers
    upcasts the logits to fp32); it happens at another moment than the layer recompute, so the larger of
    the two counts. Allocator fragmentation adds 8%.
    Llama-3-70B, r=16, 2,048 tokens: 40.0 GiB fixed + 2.5 stash + 5.4 logits = 47.9 -> 51.7 GiB.
    """
    gib = 2**30
    h, vocab, layers = config["hidden_size"], config["vocab_size"], config["num_hidden_layers"]
    q = recipe.quantization
    bits = (NF4_DQ_BITS if q.double_quant else 4.5) if q.load_in_4bit else 16
    rest = 4 if q.compute_dtype == "float32" else 2
    t = recipe.training
    shapes = linear_shapes(config)
    largest = max(i * o for i, o in shapes.values())
    fixed = {
        "base weights (quantized)": counts["quantized"] * bits / 8,
        "base weights (16-bit: embeddings, norms, head)": counts["kept_16bit"] * rest,
        "trainable weights (fp32)": counts["trainable"] * 4,
        "gradients (fp32)": counts["trainable"] * 4,
        "optimizer states": counts["trainable"] * OPTIMIZER_STATE_BYTES[t.optim],
        "dequantized weight in flight": largest * 2 * 1.1 if q.load_in_4bit else 0,
        "CUDA context": CUDA_CONTEXT_GIB * gib,
    }
    tokens = t.micro_batch_size * t.max_length
    if t.gradient_checkpointing:
        stash = 2 * h * layers * tokens
        layer = LAYER_BYTES_PER_HIDDEN * h * tokens
    else:
        stash = LAYER_BYTES_PER_HIDDEN / 2 * h * layers * tokens
        layer = LAYER_BYTES_PER_HIDDEN / 2 * h * tokens
    logits = LOGIT_BYTES * vocab * tokens
    variable = {"activations kept for backward": stash, "peak of loss or layer recompute": max(logits, layer)}
    allocated = sum(fixed.values()) + sum(variable.values())
    needed = allocated * FRAGMENTATION
    components = {k: round(v / gib, 2) for k, v in {**fixed, **variable}.items()}
    components["allocator fragmentation (8%)"] = round((needed - allocated) / gib, 2)
    return {
        "components_gib": components,
        "allocated_gib": round(allocated / gib, 2),
        "needed_gib": round(needed / gib, 2),
    }


def fit_verdict(recipe: Recipe, memory: dict[str, Any]) -> dict[str, Any]:
    """Compare the estimate with ``hardware.gpu_memory_gb`` and say what would make it fit."""
    gpu = recipe.hardware.gpu_memory_gb
    if gpu is None or recipe.hardware.device == "cpu":
        return {"fits": None, "message": "no GPU memory given (hardware.gpu_memory_gb): fit not checked"}
    needed = memory["needed_gib"]
    if needed <= gpu:
        return {"fits": True, "message": f"fits with {gpu - needed:.1f} GB to spare ({needed:.1f} of {gpu:g} GB)"}
    t = recipe.training
    tips = []
    if t.max_length > 512:
        tips.append(f"a shorter training.max_length (now {t.max_length}; try {t.max_length // 2})")
    if t.micro_batch_size > 1:
        tips.append(f"training.micro_batch_size: 1 with more gradient_accumulation_steps (now {t.micro_batch_size})")
    if not t.gradient_checkpointing:
        tips.append("training.gradient_checkpointing: true")
    if recipe.lora.r > 8:
        tips.append(f"a smaller lora.r (now {recipe.lora.r})")
    if OPTIMIZER_STATE_BYTES[t.optim] > 2:
        tips.append("training.optim: paged_adamw_8bit")
    tips.append(f"a GPU with at least {math.ceil(needed)} GB (sharding over several GPUs is not supported yet)")
    return {
        "fits": False,
        "message": f"does not fit: {needed:.1f} GB needed, {gpu:g} GB available",
        "suggestions": tips,
    }


def make_plan(
    recipe: Recipe, num_train_rows: int, model_config: dict[str, Any] | None, world_size: int | None = None
) -> dict[str, Any]:
    """The derived numbers of a recipe.

    Steps follow transformers' Trainer: the dataloader has ceil(rows / (micro-batch x processes)) batches, an
    epoch has ceil(batches / accumulation) optimizer steps, and the run ceil(epochs x that) unless max_steps is
    set; warmup is ceil(warmup_ratio x steps).

    Args:
        recipe: The recipe.
        num_train_rows: Accepted training rows (or lines in the file, before validation).
        model_config: The base's config.json, if known.
        world_size: Training processes; ``hardware.num_gpus`` when not given.

    Returns:
        A JSON-ready dict (written as plan.json).
    """
    t = recipe.training
    world = world_size or recipe.hardware.num_gpus
    effective_batch = t.micro_batch_size * t.gradient_accumulation_steps * world
    batches_per_epoch = math.ceil(num_train_rows / (t.micro_batch_size * world)) if num_train_rows else 0
    steps_per_epoch = max(1, math.ceil(batches_per_epoch / t.gradient_accumulation_steps)) if num_train_rows else 0
    total_steps = t.max_steps if t.max_steps is not None else math.ceil(t.num_epochs * steps_per_epoch)
    plan: dict[str, Any] = {
        "recipe": recipe.name,
        "train_rows": num_train_rows,
        "processes": world,
        "effective_batch_size": effective_batch,
        "steps_per_epoch": steps_per_epoch,
        "optimizer_steps": total_steps,
        "epochs": round(total_steps / steps_per_epoch, 3) if steps_per_epoch else 0.0,
        "warmup_steps": math.ceil(t.warmup_ratio * total_steps),
        "max_tokens_per_step": effective_batch * t.max_length,
        "max_training_tokens": total_steps * effective_batch * t.max_length,
        "parameters": None,
        "weights_memory_gib": None,
        "memory": None,
        "fit": None,
    }
    if model_config is not None:
        try:
            counts = count_parameters(model_config, recipe)
        except (KeyError, TypeError, ValueError) as exc:
            plan["parameters_unknown"] = f"cannot count parameters from this config.json: {exc!r}"
            return plan
        plan["parameters"] = {
            **counts,
            "trainable_percent": round(100 * counts["trainable"] / counts["total"], 4),
        }
        # 16-bit storage for what is not quantized; bf16/fp16 = 2 bytes, fp32 = 4 (CPU recipes).
        rest_bytes = 4 if recipe.quantization.compute_dtype == "float32" else 2
        weight_bytes = counts["quantized"] * NF4_DQ_BITS / 8 + counts["kept_16bit"] * rest_bytes
        plan["weights_memory_gib"] = round(weight_bytes / 2**30, 4)
        plan["memory"] = estimate_memory(model_config, recipe, counts)
        plan["fit"] = fit_verdict(recipe, plan["memory"])
    return plan


def render_plan(plan: dict[str, Any], model_source: str | None = None) -> str:
    """The plan as the lines printed by ``plan`` and at the top of ``train``."""
    rows = plan["train_rows"]
    lines = [
        f"Plan for {plan['recipe']}:",
        f"  effective batch = micro-batch x accumulation x {plan['processes']} process(es) = "
        f"{plan['effective_batch_size']}",
        f"  {rows:,} training rows -> {plan['steps_per_epoch']:,} steps/epoch x {plan['epochs']:g} epochs = "
        f"{plan['optimizer_steps']:,} optimizer steps (warmup {plan['warmup_steps']:,})",
        f"  at most {plan['max_tokens_per_step']:,} tokens/step, {plan['max_training_tokens']:,} tokens in all "
        "(padding to max_length; real counts are printed once the data is tokenized)",
    ]
    params = plan["parameters"]
    if params:
        lines.append(
            f"  parameters: {_human(params['total'])} in the base ({_human(params['quantized'])} in 4-bit), "
            f"{_human(params['trainable'])} trainable ({params['trainable_percent']:.3g}%, "
            f"LoRA {_human(params['lora'])})"
        )
        gib = plan["weights_memory_gib"]
        shown = f"{gib:.2f} GiB" if gib >= 1 else f"{gib * 1024:.1f} MiB"
        lines.append(f"  base weights in memory: {shown} (NF4 + double quantization for linear layers, rest 16/32-bit)")
        memory, fit = plan.get("memory"), plan.get("fit")
        if memory and fit and fit["fits"] is not None:  # a GPU target: show where the memory goes
            lines.append(f"  peak GPU memory per process (estimate): {memory['needed_gib']:.1f} GiB")
            lines += [f"    {name:<48} {value:>8.2f}" for name, value in memory["components_gib"].items()]
        if fit:
            lines.append(f"  verdict: {fit['message']}")
            lines += [f"    - {tip}" for tip in fit.get("suggestions", [])]
    else:
        reason = plan.get("parameters_unknown") or model_source or "model config not found"
        lines.append(f"  parameters: unknown ({reason})")
    return "\n".join(lines)


def _human(n: int) -> str:
    for unit, size in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= size:
            return f"{n / size:.2f}{unit}"
    return str(n)
