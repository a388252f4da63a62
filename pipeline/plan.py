"""Derived numbers, said out loud before training: batch, steps, tokens, parameters, memory, disk.

Pure functions of the recipe, the base's ``config.json`` and a row count: no weights. Parameters are counted
two ways that must agree (the tests check them against each other and against real models):

* analytic, for Llama-family decoders (llama, mistral, qwen2): instant, no torch;
* on the meta device (``model.count_parameters_meta``): transformers builds the architecture from config.json with
  no storage, transformers' own bitsandbytes pass swaps the linear layers that would be stored in 4 bits, and
  peft attaches the recipe's LoRA (the same ``LoraConfig`` as training). Works for any architecture
  transformers knows; it costs the torch/transformers/peft import (seconds).

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

The memory estimate (``memory.estimate_memory``) and the host RAM / disk estimate (``memory.estimate_host``) are
explained term by term in docs/planner.md, with a side-by-side comparison against published figures.
"""

from __future__ import annotations

import json
import math
from importlib import resources
from pathlib import Path
from typing import Any

from pipeline.errors import JobFailed
from pipeline.memory import NF4_DQ_BITS, estimate_host, estimate_memory, memory_config
from pipeline.model import count_parameters_meta, transformers_config
from pipeline.recipe import Recipe

LLAMA_FAMILY = ("llama", "mistral", "qwen2")
LINEAR_NAMES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def shipped_config_name(model_id: str) -> str:
    """File name of a shipped architecture config for a model id (``org/name`` -> ``org--name.json``)."""
    return model_id.replace("/", "--") + ".json"


def shipped_model_ids() -> list[str]:
    """Model ids whose config.json ships with pipeline (planning without the model on disk)."""
    folder = resources.files("pipeline") / "model_configs"
    return sorted(f.name[: -len(".json")].replace("--", "/") for f in folder.iterdir() if f.name.endswith(".json"))


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
    """Exact parameter counts of a Llama-family base with the recipe's adapter (analytic, no torch).

    Returns:
        ``total`` (base), ``quantized`` (decoder linear weights stored in 4 bits, 0 for a 16-bit base),
        ``kept_16bit`` (everything else in the base), ``vectors`` (the 1-D part of kept_16bit: norms and
        biases), ``trainable`` (LoRA + modules_to_save), ``lora``, ``largest_linear`` (weights of the
        biggest linear layer), and for the activation estimate, summed over all layers: ``adapted_inputs``
        (in_features of adapted layers), ``adapted_output_inputs`` (the same for the attention output
        projection, whose input is already bf16) and ``adapted_modules`` (how many layers are adapted).

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
        "vectors": layers * (biases + norms) + h,
        "lora": lora,
        "trainable": lora + full,
        "largest_linear": max(i * o for i, o in shapes.values()),
        "adapted_inputs": layers * sum(shapes[n][0] for n in adapted),
        "adapted_output_inputs": layers * shapes["o_proj"][0] if "o_proj" in adapted else 0,
        "adapted_modules": layers * len(adapted),
    }


class DoesNotFit(JobFailed):
    """The memory estimate exceeds the GPU: refused before any weights load (exit 1; --force overrides)."""


FSDP_CHOICES = (2, 4, 8)
HEADROOM = 0.10  # the planner's accuracy goal: within 10% of the measured peak


def fit_verdict(recipe: Recipe, memory: dict[str, Any], options: list[dict[str, Any]] | None = None) -> dict[str, Any]:
    """Compare the estimate with ``hardware.gpu_memory_gb`` and say what would make it fit.

    Units: every figure is GiB (2**30 bytes), and ``gpu_memory_gb`` is read as GiB too: the capacity
    nvidia-smi shows in MiB, / 1,024 (an "A100 80GB" has 81,920 MiB = 80 GiB; an H200 "141 GB" 143,771 MiB =
    140.4 GiB). The field keeps its name so recipes do not change.

    Args:
        recipe: The recipe.
        memory: ``estimate_memory``'s result for the recipe as written.
        options: ``alternatives``: single changes re-estimated, only those that fit.
    """
    gpu = recipe.hardware.gpu_memory_gb
    if gpu is None or recipe.hardware.device == "cpu":
        return {"fits": None, "message": "no GPU memory given (hardware.gpu_memory_gb): fit not checked"}
    needed = memory["needed_gib"]
    where = "per GPU" if memory["per_process"]["processes"] > 1 else "on the GPU"
    if needed <= gpu:
        message = f"fits with {gpu - needed:.1f} GiB to spare ({needed:.1f} of {gpu:g} GiB {where})"
        if gpu - needed < HEADROOM * gpu:
            message += "; less than 10% headroom, which is the estimate's own accuracy goal: measure first"
        return {"fits": True, "message": message}
    options = options or []
    return {
        "fits": False,
        "message": f"does not fit: {needed:.1f} GiB needed {where}, {gpu:g} GiB available",
        "suggestions": [option["text"] for option in options],
        "alternatives": options,
    }


def _change(recipe: Recipe, section: str, **values: Any) -> Recipe:
    """The recipe with some fields of one section replaced (recipes are frozen)."""
    return recipe.model_copy(update={section: getattr(recipe, section).model_copy(update=values)})


def alternatives(
    config: dict[str, Any], recipe: Recipe, counts: dict[str, int], memory: dict[str, Any]
) -> list[dict[str, Any]] | None:
    """Single changes that make a recipe fit, each with its value and the re-estimated GiB; None when it fits.

    For each knob the mildest value that fits is named: the longest ``max_length`` among halvings (down to
    256), micro-batch 1 with the accumulation that keeps the effective batch, checkpointing on, the largest
    ``lora.r`` among halvings (down to 4; LoRA parameters scale linearly with r, so the counts are rescaled, not
    recounted), 8-bit paged AdamW, then the fewest GPUs (2, 4, 8) for which FSDP fits, and a big enough GPU. A knob that
    cannot make the recipe fit on its own is left out: when the 4-bit weights alone exceed the GPU, only
    sharding and a bigger GPU remain.
    """
    gpu = recipe.hardware.gpu_memory_gb
    if gpu is None or recipe.hardware.device == "cpu" or memory["needed_gib"] <= gpu:
        return None
    shape = memory["per_process"]
    t, options = recipe.training, []

    def offer(setting: str, before: Any, after: Any, changed: Recipe, new_counts: dict[str, int] = counts) -> bool:
        needed = estimate_memory(
            config, changed, new_counts, processes=shape["processes"], sharded=shape["sharded"], loss=shape["loss"]
        )["needed_gib"]
        if needed > gpu:
            return False
        text = f"{setting} {before} -> {after}: {needed:.1f} GiB"
        options.append({"setting": setting, "from": before, "to": after, "needed_gib": needed, "text": text})
        return True

    length = t.max_length // 2
    while length >= 256 and not offer(
        "training.max_length", t.max_length, length, _change(recipe, "training", max_length=length)
    ):
        length //= 2
    if t.micro_batch_size > 1:
        accumulation = t.gradient_accumulation_steps * t.micro_batch_size
        offer(
            "training.micro_batch_size",
            t.micro_batch_size,
            f"1 (gradient_accumulation_steps {t.gradient_accumulation_steps} -> {accumulation}, same batch)",
            _change(recipe, "training", micro_batch_size=1, gradient_accumulation_steps=accumulation),
        )
    if not t.gradient_checkpointing:
        offer(
            "training.gradient_checkpointing", "false", "true", _change(recipe, "training", gradient_checkpointing=True)
        )
    rank = recipe.lora.r // 2
    while rank >= 4:
        lora = counts["lora"] * rank // recipe.lora.r
        scaled = {**counts, "lora": lora, "trainable": counts["trainable"] - counts["lora"] + lora}
        if offer("lora.r", recipe.lora.r, rank, _change(recipe, "lora", r=rank), scaled):
            break
        rank //= 2
    if t.optim not in ("paged_adamw_8bit", "adamw_8bit"):
        offer("training.optim", t.optim, "paged_adamw_8bit", _change(recipe, "training", optim="paged_adamw_8bit"))
    for gpus in (g for g in FSDP_CHOICES if g > shape["processes"]):
        per_gpu = estimate_memory(config, recipe, counts, processes=gpus, sharded=True, loss=shape["loss"])[
            "needed_gib"
        ]
        if per_gpu <= gpu:
            text = (
                f"FSDP-QLoRA over {gpus} GPUs (hardware.num_gpus: {gpus}, hardware.distributed: fsdp): "
                f"{per_gpu:.1f} GiB per GPU"
            )
            options.append(
                {
                    "setting": "hardware.num_gpus",
                    "from": shape["processes"],
                    "to": gpus,
                    "needed_gib": per_gpu,
                    "text": text,
                }
            )
            break
    needed = memory["needed_gib"]
    options.append(
        {
            "setting": "GPU",
            "to": math.ceil(needed),
            "needed_gib": needed,
            "text": f"a GPU with at least {math.ceil(needed)} GiB",
        }
    )
    return options


def parameter_counts(config: dict[str, Any], recipe: Recipe, exact: bool = False) -> tuple[dict[str, int], str]:
    """Counts and how they were made: analytic (Llama family) unless ``exact`` asks for the meta device.

    Other architectures are counted on the meta device automatically (method ``meta-device (automatic)``): the
    verdict, and ``train``'s refusal, must not depend on the base being a Llama. It builds no storage, only
    costs the torch/transformers/peft import and a few seconds for a 70B.

    Raises:
        KeyError, TypeError, ValueError: When the config cannot be counted.
    """
    if not exact and config.get("model_type") in LLAMA_FAMILY:
        return count_parameters(config, recipe), "analytic"
    method = "meta-device" if exact else "meta-device (automatic)"
    try:
        return count_parameters_meta(config, recipe), method
    except ImportError as exc:
        raise ValueError(f"counting on the meta device needs torch, transformers and peft ({exc})") from None
    except Exception as exc:  # noqa: BLE001 - transformers raises many types for a config it cannot build
        raise ValueError(f"transformers cannot build this architecture on the meta device: {exc}") from None


def make_plan(
    recipe: Recipe,
    num_train_rows: int,
    model_config: dict[str, Any] | None,
    world_size: int | None = None,
    exact: bool = False,
    model_dir: str | Path | None = None,
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
        exact: Count parameters on the meta device even for architectures the analytic count knows.
        model_dir: Local model directory, to measure the base's size on disk.

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
        "host": None,
        "fit": None,
    }
    if model_config is not None:
        try:
            counts, method = parameter_counts(model_config, recipe, exact)
        except (KeyError, TypeError, ValueError) as exc:
            plan["parameters_unknown"] = f"cannot count parameters from this config.json: {exc}"
            if recipe.hardware.gpu_memory_gb is not None and recipe.hardware.device != "cpu":
                plan["fit"] = {"fits": None, "message": "fit NOT checked: the parameters could not be counted"}
            return plan
        plan["parameters"] = {
            **counts,
            "method": method,
            "trainable_percent": round(100 * counts["trainable"] / counts["total"], 4),
        }
        # 16-bit storage for what is not quantized; bf16/fp16 = 2 bytes, fp32 = 4 (CPU recipes).
        rest_bytes = 4 if recipe.quantization.compute_dtype == "float32" else 2
        weight_bytes = counts["quantized"] * NF4_DQ_BITS / 8 + counts["kept_16bit"] * rest_bytes
        plan["weights_memory_gib"] = round(weight_bytes / 2**30, 4)
        try:
            sharded = getattr(recipe.hardware, "distributed", "ddp") == "fsdp" and world > 1
            llama = model_config.get("model_type") in LLAMA_FAMILY
            dims_config = model_config if llama else memory_config(model_config, transformers_config)
            plan["memory"] = estimate_memory(dims_config, recipe, counts, processes=world, sharded=sharded)
            if not llama:
                plan["memory"]["note"] = (
                    f"the memory terms model a Llama-style decoder layer; {model_config.get('model_type')} differs "
                    "(unmeasured): keep at least 10% headroom"
                )
            plan["fit"] = fit_verdict(recipe, plan["memory"], alternatives(dims_config, recipe, counts, plan["memory"]))
            plan["host"] = estimate_host(dims_config, recipe, counts, model_dir)
        except (KeyError, TypeError, ValueError, ZeroDivisionError) as exc:
            plan["memory_unknown"] = f"cannot estimate memory from this config.json: {exc!r}"
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
            f"LoRA {_human(params['lora'])}; counted {params['method']})"
        )
        gib = plan["weights_memory_gib"]
        shown = f"{gib:.2f} GiB" if gib >= 1 else f"{gib * 1024:.1f} MiB"
        lines.append(f"  base weights in memory: {shown} (NF4 + double quantization for linear layers, rest 16/32-bit)")
        memory, fit = plan.get("memory"), plan.get("fit")
        if memory and fit and fit["fits"] is not None:  # a GPU target: show where the memory goes
            shape = memory["per_process"]
            scope = "per process"
            if shape["processes"] > 1:
                scope = f"per GPU, {'FSDP' if shape['sharded'] else 'DDP'} over {shape['processes']} GPUs"
            lines.append(f"  peak GPU memory {scope} (estimate): {memory['needed_gib']:.1f} GiB")
            lines += [f"    {name:<48} {value:>8.2f}" for name, value in memory["components_gib"].items()]
            if memory["load_peak_gib"] >= memory["needed_gib"]:
                lines.append(
                    f"    (loading peaks higher: {memory['load_peak_gib']:.2f} GiB while 16-bit weights are fp32)"
                )
            host = plan.get("host")
            if host:
                ram, disk = host["ram_gib"], host["disk_gib"]
                lines.append(
                    f"  host RAM: load {ram['load']:.1f} GiB, train {ram['train']:.1f} GiB, "
                    f"merge for export {ram['merge']:.1f} GiB, verify the merge {ram['verify merge']:.1f} GiB"
                )
                lines.append(
                    "  disk: "
                    + ", ".join(f"{name} {value:.1f} GiB" for name, value in disk.items() if name != "total")
                    + f" = {disk['total']:.1f} GiB"
                )
        if memory and memory.get("note"):
            lines.append(f"  note: {memory['note']}")
        if fit:
            lines.append(f"  verdict: {fit['message']}")
            lines += [f"    - {tip}" for tip in fit.get("suggestions", [])]
    else:
        reason = plan.get("parameters_unknown") or model_source or "model config not found"
        lines.append(f"  parameters: unknown ({reason})")
        if plan.get("fit"):
            lines.append(f"  verdict: {plan['fit']['message']}")
    return "\n".join(lines)


def _human(n: int) -> str:
    for unit, size in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= size:
            return f"{n / size:.2f}{unit}"
    return str(n)
