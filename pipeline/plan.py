"""Derived numbers, said out loud before training: batch, steps, tokens, parameters, memory, disk.

Pure functions of the recipe, the base's ``config.json`` and a row count: no weights. Parameters are counted
two ways that must agree (the tests check them against each other and against real models):

* analytic, for Llama-family decoders (llama, mistral, qwen2): instant, no torch;
* on the meta device (``count_parameters_meta``): transformers builds the architecture from config.json with
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

The memory estimate (``estimate_memory``) and the host RAM / disk estimate (``estimate_host``) are explained
term by term in docs/planner.md, with a side-by-side comparison against published figures.
"""

from __future__ import annotations

import json
import math
from importlib import resources
from pathlib import Path
from typing import Any

from pipeline.errors import JobFailed
from pipeline.recipe import Recipe

NF4_DQ_BITS = 4 + 8 / 64 + 32 / (64 * 256)  # 4.127 bits per weight (QLoRA section 3)
NF4_BITS = 4 + 32 / 64  # 4.5: one fp32 absmax per 64-weight block without double quantization
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


def transformers_config(config: dict[str, Any]) -> Any:
    """A transformers ``PretrainedConfig`` from a config.json dict (keys starting with '_' are notes, dropped).

    Raises:
        ValueError: When transformers does not know the model_type.
    """
    from transformers import AutoConfig

    fields = {k: v for k, v in config.items() if not k.startswith("_") and k != "model_type"}
    return AutoConfig.for_model(config.get("model_type"), **fields)


def build_meta_model(config: dict[str, Any], recipe: Recipe) -> Any:
    """The base architecture on the meta device (no storage), with 4-bit layers where training would have them.

    transformers' own bitsandbytes pass (``replace_with_bnb_linear`` with the modules it would skip: the
    output head and tied weights) swaps ``nn.Linear`` for ``bnb.nn.Linear4bit``, so what counts as quantized
    here is exactly what ``from_pretrained(quantization_config=...)`` quantizes. Used by the exact count and by
    the GPU probe, which fills each 4-bit layer with random data on the device.
    """
    import torch
    from accelerate import init_empty_weights
    from transformers import AutoModelForCausalLM

    from pipeline.model import bnb_config

    cfg = transformers_config(config)
    cfg.use_cache = False
    dtype = getattr(torch, recipe.quantization.compute_dtype)
    with init_empty_weights():
        model = AutoModelForCausalLM.from_config(cfg, dtype=dtype, attn_implementation=recipe.model.attn_implementation)
    # from_pretrained ties the head to the embeddings when the config says so. Outside init_empty_weights, whose
    # register_parameter hook would re-create the parameter and so untie it again.
    model.tie_weights()
    if recipe.quantization.load_in_4bit:
        from transformers.integrations import replace_with_bnb_linear
        from transformers.quantizers.base import get_keys_to_not_convert

        skip = list(set(get_keys_to_not_convert(model)) | set(getattr(model, "_keep_in_fp32_modules", None) or []))
        model = replace_with_bnb_linear(
            model, modules_to_not_convert=skip, quantization_config=bnb_config(recipe.quantization)
        )
        model.is_loaded_in_4bit = True  # what transformers sets after loading; peft's k-bit preparation reads it
    return model


def count_parameters_meta(config: dict[str, Any], recipe: Recipe) -> dict[str, int]:
    """Exact counts from the architecture built on the meta device, with the recipe's LoRA applied by peft.

    Same keys as ``count_parameters``. ``all-linear`` is resolved by peft itself, as in training.

    Raises:
        ValueError: When transformers cannot build the architecture from this config.
    """
    from accelerate import init_empty_weights
    from peft import get_peft_model

    from pipeline.model import lora_config

    # Parameters do not depend on the attention kernel; eager is the one every architecture has (Gemma2 refuses
    # sdpa in transformers 5.x), so counting never fails over a kernel the recipe could change.
    model = build_meta_model(config, _change(recipe, "model", attn_implementation="eager"))
    total = quantized = vectors = largest = 0
    for module in model.modules():
        weight = getattr(module, "weight", None)
        if type(module).__name__ == "Linear4bit":
            quantized += weight.numel()
            largest = max(largest, weight.numel())
    for param in model.parameters():
        total += param.numel()
        vectors += param.numel() if param.ndim == 1 else 0
    if not recipe.quantization.load_in_4bit:
        largest = max(
            (m.weight.numel() for n, m in model.named_modules() if type(m).__name__ == "Linear" and "lm_head" not in n),
            default=0,
        )
    with init_empty_weights():  # adapters are created on the meta device too
        peft_model = get_peft_model(model, lora_config(recipe.lora))
    trainable = sum(p.numel() for p in peft_model.parameters() if p.requires_grad)
    lora = sum(p.numel() for n, p in peft_model.named_parameters() if "lora_" in n)
    lora_a = {n: m.in_features for n, m in peft_model.named_modules() if n.endswith("lora_A.default")}
    output_projection = ("o_proj.", "out_proj.")  # the attention output projection: its input is bf16
    return {
        "total": total,
        "quantized": quantized,
        "kept_16bit": total - quantized,
        "vectors": vectors,
        "lora": lora,
        "trainable": trainable,
        "largest_linear": largest,
        "adapted_inputs": sum(lora_a.values()),
        "adapted_output_inputs": sum(v for n, v in lora_a.items() if any(p in n for p in output_projection)),
        "adapted_modules": len(lora_a),
    }


class DoesNotFit(JobFailed):
    """The memory estimate exceeds the GPU: refused before any weights load (exit 1; --force overrides)."""


# ------------------------------------------------------------------------------------------------------------
# Peak GPU memory of one training process. docs/planner.md derives every constant; the short version:

GIB = 2**30
# CUDA context + cuBLAS workspaces, outside PyTorch's allocator. Measured on an H200 (torch 2.11, CUDA 13.0,
# benchmarks/gpu_probe.md): 0.51 GiB in use before the first tensor, 0.86 GiB during training steps
# (device memory in use - reserved - the paged optimizer states).
CUDA_CONTEXT_GIB = 0.86
# reserved / allocated under PyTorch's caching allocator. The GPU probe measured 1.027-1.029 with fixed-shape
# batches; real batches vary in length from step to step, which fragments the cache more, so the planner keeps
# 8% as headroom rather than fitting the probe's figure (docs/planner.md section 6).
FRAGMENTATION = 1.08
DEQUANT_SLACK = 1.1  # the largest linear dequantized to 16 bits for its matmul, +10% for bitsandbytes' buffers
# Optimizer state bytes per trainable parameter. bitsandbytes' 8-bit AdamW: two uint8 states + one fp32 absmax
# per 256-value block per state (2 + 2 x 4/256). Its 32-bit AdamW: two fp32 states whatever the parameter dtype.
# torch's AdamW: two states in the parameter's dtype (the "2 x" is applied to the parameter bytes below).
OPTIMIZER_STATE_BYTES = {"paged_adamw_8bit": 2 + 8 / 256, "adamw_8bit": 2 + 8 / 256, "paged_adamw_32bit": 8}
PAGED_OPTIMIZERS = ("paged_adamw_8bit", "paged_adamw_32bit")  # states in CUDA unified memory, outside PyTorch
# Saved activations of one decoder layer, bytes per token (docs/planner.md section 3, measured on the CPU by
# tests/test_plan.py with saved-tensor hooks). k-bit preparation leaves the RMSNorm weights in fp32, so each
# norm's output is fp32, bitsandbytes returns a 4-bit layer's output in its input's dtype, and everything
# downstream of a norm runs in fp32 except what autocast casts to bf16 for a matmul: the residual stream after
# the first MLP is fp32 (a checkpointed layer keeps a 4h input), the norms keep their fp32 inputs (2 x 4h),
# attention keeps bf16 q, k, v and its output (4 q_dim + 4 kv_dim), SwiGLU keeps gate, silu(gate) and up in
# fp32 (3 x 4 I), and each adapted layer with an fp32 input keeps its own bf16 copy for lora_A (2 bytes per
# input feature: q, k, v, gate, up, down; not o_proj, whose input is the bf16 attention output), plus lora_B's
# r-wide bf16 input, two rsqrt and one logsumexp per head in fp32. Llama-3-70B, all-linear: 71.5 h per token.
# A 16-bit base has no fp32 norms: the all-bf16 layer keeps 12 h + 4 q_dim + 4 kv_dim + 8 I (44.5 h) and a
# checkpointed layer a 2h input (the research note's figures).
# The peak while one checkpointed layer is recomputed and back-propagated: its saved activations x this factor
# (the gradients of the layer's tensors coexist with part of them). The research note assumed 2; the GPU probe
# on an H200 (Llama-3.3-70B shapes, 2,048 and 4,096 tokens, benchmarks/gpu_probe.md) measured a slope of
# 6.70 GiB per 2,048 tokens of peak allocated memory, of which 5.00 GiB is the checkpointed layer inputs
# (exact): (1.70 - dropout 0.18) / 1.119 GiB of saved activations per layer = 1.36. Rounded up to 1.4.
LAYER_BACKWARD_FACTOR = 1.4
DROPOUT_MASK_BYTES = 1  # torch.native_dropout's bool mask on CUDA, per adapted input feature (the CPU keeps 2)
EAGER_ATTENTION_BYTES = 8  # per head per key per token: bf16 scores (2) + fp32 softmax (4) + bf16 probabilities (2)
FULL_LOGIT_BYTES = 22  # per vocab entry per token at the loss when the full logits exist (reference section 2.4)
# TRL's fused LM head (trl>=1.x, what `pipeline train` runs) never materializes the logits: it scores tiles of
# 4,096 tokens x 32,768 vocabulary entries and keeps per token 3 copies of the final hidden state in the norm's
# dtype (the saved input, its fp32 gradient accumulator, the full-size gradient scattered back) + 7 fp32 stats.
FUSED_TILE = (4096, 32768)
FUSED_HIDDEN_COPIES = 3
FUSED_STATS_BYTES = 7 * 4


def architecture(config: dict[str, Any]) -> dict[str, int]:
    """Hidden size, layers, vocabulary, MLP width, q/kv widths and heads from config.json."""
    h, heads = config["hidden_size"], config["num_attention_heads"]
    d = config.get("head_dim") or h // heads
    return {
        "hidden": h,
        "layers": config["num_hidden_layers"],
        "vocab": config["vocab_size"],
        "intermediate": config["intermediate_size"],
        "heads": heads,
        "q_dim": heads * d,
        "kv_dim": (config.get("num_key_value_heads") or heads) * d,
    }


def memory_config(config: dict[str, Any]) -> dict[str, Any]:
    """config.json with the Llama-style keys ``architecture`` reads, for a base that names them differently.

    A Gemma2 or Phi3 config already has them. Others (GPT-2: ``n_embd``, ``n_layer``, ``n_head``, ``n_inner``)
    are resolved through transformers' own attribute map; an MLP width it does not give is taken as 4 h, the
    classic transformer's.
    """
    try:
        architecture(config)
        return config
    except KeyError:
        pass
    cfg = transformers_config(config)
    h, heads = cfg.hidden_size, cfg.num_attention_heads
    return {
        **config,
        "hidden_size": h,
        "num_hidden_layers": cfg.num_hidden_layers,
        "num_attention_heads": heads,
        "vocab_size": cfg.vocab_size,
        "intermediate_size": getattr(cfg, "intermediate_size", None) or getattr(cfg, "n_inner", None) or 4 * h,
        "num_key_value_heads": getattr(cfg, "num_key_value_heads", None) or heads,
        "head_dim": getattr(cfg, "head_dim", None) or h // heads,
    }


def layer_activation_bytes(
    dims: dict[str, int], counts: dict[str, int], recipe: Recipe, fp32_norms: bool | None = None
) -> tuple[float, float, float]:
    """Per token: one layer's saved activations, a checkpointed layer's input, and lora_dropout's extra.

    See the comment above ``LAYER_BACKWARD_FACTOR`` for where each term comes from.
    """
    h, q_dim, kv_dim, inter, layers = (
        dims["hidden"],
        dims["q_dim"],
        dims["kv_dim"],
        dims["intermediate"],
        dims["layers"],
    )
    if fp32_norms is None:
        fp32_norms = recipe.quantization.load_in_4bit
    attention = 4 * q_dim + 4 * kv_dim
    if fp32_norms:
        lora_copies = 2 * (counts["adapted_inputs"] - counts["adapted_output_inputs"])
        lora_b_inputs = 2 * recipe.lora.r * counts["adapted_modules"]
        layer = 8 * h + attention + 12 * inter + (lora_copies + lora_b_inputs) / layers + 2 * 4 + 4 * dims["heads"]
        layer_input = 4 * h
    else:
        layer = 12 * h + attention + 8 * inter
        layer_input = 2 * h
    if recipe.model.attn_implementation == "eager":
        layer += dims["heads"] * recipe.training.max_length * EAGER_ATTENTION_BYTES
    dropout = 0.0
    if recipe.lora.dropout > 0:
        # a mask per adapted input feature; o_proj's bf16 input gets a new dropped-out copy for lora_A
        dropout = (DROPOUT_MASK_BYTES * counts["adapted_inputs"] + 2 * counts["adapted_output_inputs"]) / layers
    return layer, layer_input, dropout


def adapter_bytes(recipe: Recipe) -> int:
    """Bytes per trainable parameter in training.

    TRL casts the adapter of a 4-bit model to bf16 (QLoRA paper, section 3); ``model.restore_adapter_dtype``
    puts it back in fp32 for fp32 compute; on a 16-bit base peft keeps the adapter in fp32.
    """
    q = recipe.quantization
    return 2 if q.load_in_4bit and q.compute_dtype != "float32" else 4


def optimizer_bytes(recipe: Recipe, param_bytes: int) -> float:
    """Optimizer state bytes per trainable parameter for ``training.optim``."""
    return OPTIMIZER_STATE_BYTES.get(recipe.training.optim, 2 * param_bytes)


def estimate_memory(
    config: dict[str, Any],
    recipe: Recipe,
    counts: dict[str, int],
    *,
    processes: int = 1,
    sharded: bool = False,
    loss: str = "fused",
    param_bytes: int | None = None,
    fp32_norms: bool | None = None,
    backward_factor: float = LAYER_BACKWARD_FACTOR,
) -> dict[str, Any]:
    """Peak GPU memory of one training process, by component (GiB).

    Args:
        config: The base's config.json.
        recipe: The recipe.
        counts: ``count_parameters`` or ``count_parameters_meta``.
        processes: Training processes (GPUs).
        sharded: FSDP-QLoRA: weights, adapter, gradients and optimizer states are split over the processes;
            the 16-bit embeddings and head and one decoder layer (+ the prefetched next) are gathered whole.
            False with several processes is DDP: a whole replica per GPU plus DDP's gradient buckets.
        loss: ``"fused"`` (TRL's chunked LM head, what ``pipeline train`` runs) or ``"full_logits"``
            (transformers' own loss, the reference note's "stock path").
        param_bytes: Bytes per trainable parameter; ``adapter_bytes(recipe)`` when not given.
        fp32_norms: Norm weights in fp32 (what k-bit preparation leaves): fp32 residual stream and norm
            outputs. Default: true for a 4-bit base on one GPU or DDP; false under FSDP (``sharded``), where
            ``model.attach_lora`` skips k-bit preparation, and for a 16-bit base. False also reproduces the
            research note's all-bf16 layer.
        backward_factor: Peak of one recomputed layer's backward over its saved activations
            (``LAYER_BACKWARD_FACTOR``, measured; the research note's cells use 2).

    Returns:
        ``components_gib`` (every term), ``allocated_gib`` (what ``torch.cuda.max_memory_allocated`` should
        read), ``reserved_gib`` (allocated x 1.08 fragmentation), ``outside_allocator_gib`` (CUDA context and
        paged optimizer states), ``load_peak_gib`` and ``needed_gib`` (the largest of training and loading).
    """
    dims = architecture(config)
    h, layers, vocab = dims["hidden"], dims["layers"], dims["vocab"]
    q, t = recipe.quantization, recipe.training
    rest = 4 if q.compute_dtype == "float32" else 2  # bytes of a 16-bit (or fp32 on CPU) weight
    pb = param_bytes or adapter_bytes(recipe)
    n = max(1, processes)
    shard = n if sharded else 1
    bits = NF4_DQ_BITS if q.double_quant else NF4_BITS
    matrices = counts["kept_16bit"] - counts["vectors"]
    # k-bit preparation upcasts every 16-bit parameter to fp32; attach_lora casts the 2-D ones back. Under FSDP
    # (sharded) attach_lora skips the preparation (FSDP flattens a layer into one tensor of one dtype), so
    # nothing is upcast: norms stay 16-bit, the layers run all-bf16 and loading has no fp32 moment.
    kbit_prepared = q.load_in_4bit and not (sharded and n > 1)
    if fp32_norms is None:
        fp32_norms = kbit_prepared
    vector_bytes = 4 if kbit_prepared else rest
    trainable = counts["trainable"]
    state_bytes = optimizer_bytes(recipe, pb)
    paged = t.optim in PAGED_OPTIMIZERS

    inside = {
        "NF4 weights (4 bits)": counts["quantized"] * 0.5 / shard,
        "quantization constants": counts["quantized"] * (bits - 4) / 8 / shard,
        # FSDP gathers the root unit (embeddings, head) for the whole step: no saving from sharding it.
        "16-bit embeddings and head": matrices * rest,
        f"norms and biases ({'fp32' if vector_bytes == 4 else '16-bit'})": counts["vectors"] * vector_bytes / shard,
        "trainable weights": trainable * pb / shard,
        "gradients": trainable * pb / shard,
        "optimizer states": 0 if paged else trainable * state_bytes / shard,
        "dequantized weight in flight": counts["largest_linear"] * 2 * DEQUANT_SLACK if q.load_in_4bit else 0,
    }
    if n > 1 and sharded:
        # One decoder layer gathered for compute, the next prefetched.
        inside["gathered layers (FSDP)"] = 2 * counts["quantized"] / layers * bits / 8
    elif n > 1:
        inside["gradient buckets (DDP)"] = trainable * pb

    tokens = t.micro_batch_size * t.max_length
    layer, layer_input, dropout = layer_activation_bytes(dims, counts, recipe, fp32_norms)
    if t.gradient_checkpointing:
        stash = layer_input * layers * tokens  # each layer's input
        recompute = (backward_factor * layer + dropout) * tokens
    else:
        stash = (layer + dropout) * layers * tokens
        recompute = layer * tokens
    if loss == "fused":
        hidden_bytes = 4 if fp32_norms else rest  # the final norm's output is fp32 when its weight is
        tile = min(tokens, FUSED_TILE[0]) * min(vocab, FUSED_TILE[1]) * rest
        loss_peak = tokens * (FUSED_HIDDEN_COPIES * hidden_bytes * h + FUSED_STATS_BYTES) + tile
    else:
        loss_peak = FULL_LOGIT_BYTES * vocab * tokens
    inside["activations kept for backward"] = stash
    inside["peak of loss or layer recompute"] = max(loss_peak, recompute)

    outside = {
        "optimizer states (paged, unified memory)": trainable * state_bytes / shard if paged else 0,
        "CUDA context": CUDA_CONTEXT_GIB * GIB,
    }
    allocated = sum(inside.values())
    reserved = allocated * FRAGMENTATION
    training = reserved + sum(outside.values())
    # Loading: prepare_model_for_kbit_training holds every 16-bit parameter in fp32 at once before
    # attach_lora casts the matrices back (Llama-3-70B: 2.1B x 4 bytes = 7.8 GiB next to the 4-bit weights),
    # and while it casts the largest one (the embedding or the head, vocab x h) its 16-bit original still
    # exists: + 1.96 GiB on Llama-3-70B. The GPU probe measured 42.75 GiB allocated at that moment against
    # 42.68 from this sum. Without the preparation (FSDP, a 16-bit base) the weights load as stored: the
    # 16-bit matrices whole (the root unit is gathered whole) and the sharded rest, below the training peak.
    if kbit_prepared:
        upcast = (counts["kept_16bit"] * 4 + vocab * h * rest) / shard
    else:
        upcast = matrices * rest + counts["vectors"] * rest / shard
    load_peak = (
        inside["NF4 weights (4 bits)"] + inside["quantization constants"] + upcast
    ) * FRAGMENTATION + CUDA_CONTEXT_GIB * GIB
    components = {k: round(v / GIB, 2) for k, v in {**inside, **outside}.items() if v}
    components["allocator fragmentation (8%)"] = round((reserved - allocated) / GIB, 2)
    return {
        "components_gib": components,
        "components_bytes": {k: round(v) for k, v in {**inside, **outside}.items()},
        "allocated_gib": round(allocated / GIB, 2),
        "reserved_gib": round(reserved / GIB, 2),
        "outside_allocator_gib": round(sum(outside.values()) / GIB, 2),
        "load_peak_gib": round(load_peak / GIB, 2),
        "needed_gib": round(max(training, load_peak) / GIB, 2),
        "per_process": {"processes": n, "sharded": bool(sharded and n > 1), "loss": loss},
        "tokens_per_micro_batch": tokens,
    }


# ------------------------------------------------------------------------------------------------------------
# Host RAM and disk (docs/planner.md, "Host memory and disk").

HOST_PROCESS_GIB = 3.0  # python + torch/transformers/peft/trl + CUDA runtime and cuBLAS/cuDNN host code
# export --merge (pipeline/export.py stream_merge) holds one tensor at a time. Bytes per weight of the largest
# adapted linear of a 16-bit base while its update is added: the original (2) + the dequant(NF4(W)) source in
# fp32 (4) + the merged output (2) = 8; merging into the original weights (merge_base: original) keeps only the
# original and the output: 4. During the NF4 round trip itself the original (2), the packed codes (0.5), the
# bf16 dequantized copy (2) and its fp32 upcast (4) coexist: 8.5.
MERGE_BYTES_PER_WEIGHT = {"dequantized": 8.0, "original": 4.0}
NF4_ROUNDTRIP_BYTES = 8.5
# Per element of a ROW_CHUNK-row slice being updated: B @ A in fp32 (4) and its scaled copy (4) coexist, then
# the sum is rounded to 16 bits (2): 10 bytes. Merging into the original weights also upcasts the slice (+4).
MERGE_CHUNK_BYTES = {"dequantized": 10, "original": 14}
DEFAULT_SHARD_BYTES = 5 * 10**9  # save_pretrained's max_shard_size "5GB", what the shipped bases use
DTYPE_BYTES = {"bfloat16": 2, "float16": 2, "float32": 4}


def estimate_host(
    config: dict[str, Any], recipe: Recipe, counts: dict[str, int], model_dir: str | Path | None = None
) -> dict[str, Any]:
    """Host RAM to load, train and merge, and disk for the base, checkpoints, the adapter and a merged export.

    Args:
        config: The base's config.json.
        recipe: The recipe.
        counts: Parameter counts.
        model_dir: The local model directory; its safetensors are measured when present.

    Returns:
        ``ram_gib`` (load / train / merge) and ``disk_gib`` (base / checkpoints / adapter / merged / total).
    """
    files = sorted(Path(model_dir).glob("*.safetensors")) if model_dir and Path(model_dir).is_dir() else []
    if files:
        sizes = [f.stat().st_size for f in files]
        base_disk, shard = sum(sizes), max(sizes)
    else:
        base_disk = counts["total"] * DTYPE_BYTES.get(str(config.get("torch_dtype") or config.get("dtype")), 2)
        shard = min(DEFAULT_SHARD_BYTES, base_disk)
    pb = adapter_bytes(recipe)
    adapter = counts["trainable"] * pb
    states = counts["trainable"] * optimizer_bytes(recipe, pb)
    checkpoint = adapter + states  # + scheduler, RNG and trainer state: kilobytes
    kept = recipe.training.save_total_limit + 1  # the next checkpoint is complete before the oldest goes
    merged = counts["total"] * 2  # the base with the adapter folded in, bf16 safetensors
    process = HOST_PROCESS_GIB * GIB
    paged = states if recipe.training.optim in PAGED_OPTIMIZERS else 0
    ram = {
        # safetensors are memory-mapped and quantized onto the GPU tensor by tensor: one shard resident at a time.
        "load": process + shard,
        # paged optimizer states move to host memory when the GPU runs short.
        "train": process + paged,
        # the streaming merge: the adapter + the largest tensor's working set (export.py, constants above).
        "merge": process + adapter + merge_working_set(config, recipe, counts),
        # verify: base in 4-bit + adapter (loaded like training: one shard at a time), then the merged model in
        # 16 bits with device_map="auto", which spills to host RAM what does not fit the GPU (all of it on a CPU).
        "verify merge": process + max(shard, merged - _gpu_bytes(recipe)),
    }
    disk = {
        "base weights": base_disk,
        f"checkpoints ({kept} x {checkpoint / GIB:.2f} GiB)": kept * checkpoint,
        "adapter": adapter,
        "merged export (bf16)": merged,
    }
    disk["total"] = sum(disk.values())
    return {
        "ram_gib": {k: round(v / GIB, 2) for k, v in ram.items()},
        "disk_gib": {k: round(v / GIB, 2) for k, v in disk.items()},
        "base_measured": bool(files),
    }


def merge_working_set(config: dict[str, Any], recipe: Recipe, counts: dict[str, int]) -> float:
    """Bytes ``export --merge`` holds besides the process and the adapter: its largest tensor at work.

    Either the largest 16-bit tensor, read and written unchanged (Llama-3-70B: the 128,256 x 8,192 embedding,
    2 B each = 1.96 GiB), or the largest linear merged (234.9M weights x 8.5 B = 1.86 GiB during the NF4 round
    trip; 8 B + a 4,096-row slice of its widest input, 4,096 x 28,672 x 10 B = 1.09 GiB, while the update is
    added: 2.84 GiB). Llama-3-70B: 2.84 GiB, not the 131.4 GiB of the whole base.
    """
    from pipeline.weights import ROW_CHUNK  # light module: torch is imported inside its functions

    dims = architecture(config)
    base = recipe.export.merge_base
    widest = max(dims["hidden"], dims["intermediate"])
    largest_16bit = dims["vocab"] * dims["hidden"] * 2
    largest_linear = counts["largest_linear"]
    rows = min(ROW_CHUNK, max(1, largest_linear // widest))
    adding = MERGE_BYTES_PER_WEIGHT[base] * largest_linear + MERGE_CHUNK_BYTES[base] * rows * widest
    roundtrip = NF4_ROUNDTRIP_BYTES * largest_linear if base == "dequantized" else 0
    return max(largest_16bit, roundtrip, adding)


def _gpu_bytes(recipe: Recipe) -> float:
    """GPU memory left for model weights (hardware.gpu_memory_gb less the CUDA context), 0 on a CPU."""
    gpu = recipe.hardware.gpu_memory_gb
    if gpu is None or recipe.hardware.device == "cpu":
        return 0.0
    return max(0.0, (gpu - CUDA_CONTEXT_GIB) * GIB)


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
            dims_config = model_config if llama else memory_config(model_config)
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
