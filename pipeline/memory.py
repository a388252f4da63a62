"""Peak memory of a QLoRA job before a single weight loads: GPU memory by component, host RAM and disk.

Pure functions of the base's ``config.json``, the recipe and the parameter counts (``plan.count_parameters``
or ``model.count_parameters_meta``): no torch. docs/planner.md derives every term and constant;
benchmarks/gpu_probe.md has the measurements the constants were calibrated on.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from pipeline.recipe import Recipe

GIB = 2**30
NF4_DQ_BITS = 4 + 8 / 64 + 32 / (64 * 256)  # 4.127 bits per weight (QLoRA section 3)
NF4_BITS = 4 + 32 / 64  # 4.5: one fp32 absmax per 64-weight block without double quantization

# ------------------------------------------------------------------------------------------------------------
# Peak GPU memory of one training process. docs/planner.md derives every constant; the short version:

# CUDA context + cuBLAS workspaces during training steps, outside PyTorch's allocator (benchmarks/gpu_probe.md).
CUDA_CONTEXT_GIB = 0.86
# reserved / allocated under PyTorch's caching allocator: headroom for variable-length batches, which fragment
# the cache more than the probe's fixed-shape ones (docs/planner.md section 6).
FRAGMENTATION = 1.08
DEQUANT_SLACK = 1.1  # the largest linear dequantized to 16 bits for its matmul, +10% for bitsandbytes' buffers
# Optimizer state bytes per trainable parameter. bitsandbytes' 8-bit AdamW: two uint8 states + one fp32 absmax
# per 256-value block per state (2 + 2 x 4/256). Its 32-bit AdamW: two fp32 states whatever the parameter dtype.
# torch's AdamW: two states in the parameter's dtype (the "2 x" is applied to the parameter bytes below).
OPTIMIZER_STATE_BYTES = {"paged_adamw_8bit": 2 + 8 / 256, "adamw_8bit": 2 + 8 / 256, "paged_adamw_32bit": 8}
PAGED_OPTIMIZERS = ("paged_adamw_8bit", "paged_adamw_32bit")  # states in CUDA unified memory, outside PyTorch
# The peak while one checkpointed layer is recomputed and back-propagated: its saved activations x this factor
# (the gradients of the layer's tensors coexist with part of them). Fitted from the GPU probe's components
# (docs/planner.md section 6: 1.36, rounded up); the research note assumed 2.
LAYER_BACKWARD_FACTOR = 1.4
DROPOUT_MASK_BYTES = 1  # torch.native_dropout's bool mask on CUDA, per adapted input feature (the CPU keeps 2)
EAGER_ATTENTION_BYTES = 8  # per head per key per token: bf16 scores (2) + fp32 softmax (4) + bf16 probabilities (2)
FULL_LOGIT_BYTES = 22  # per vocab entry per token at the loss when the full logits exist (reference section 2.4)
# TRL's fused LM head (what `pipeline train` runs) never materializes the logits: it scores tiles of
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


def memory_config(config: dict[str, Any], library_config: Callable[[dict[str, Any]], Any]) -> dict[str, Any]:
    """config.json with the Llama-style keys ``architecture`` reads, for a base that names them differently.

    A Gemma2 or Phi3 config already has them. Others (GPT-2: ``n_embd``, ``n_layer``, ``n_head``, ``n_inner``)
    are resolved through transformers' own attribute map; an MLP width it does not give is taken as 4 h, the
    classic transformer's.

    Args:
        config: The base's config.json.
        library_config: Builds transformers' config object from config.json (``model.transformers_config``);
            called only when the Llama-style keys are missing.
    """
    try:
        architecture(config)
        return config
    except KeyError:
        pass
    cfg = library_config(config)
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

    docs/planner.md section 3 derives each term; tests/test_plan.py checks them against the tensors autograd
    saves (saved-tensor hooks, on the CPU). k-bit preparation leaves the RMSNorm weights in fp32, so each norm's
    output is fp32, bitsandbytes returns a 4-bit layer's output in its input's dtype, and everything downstream
    of a norm runs in fp32 except what autocast casts to bf16 for a matmul:

    * a checkpointed layer keeps its input, the residual stream, fp32 after the first MLP: 4h;
    * a layer keeps the norms' fp32 inputs (2 x 4h), attention's bf16 q, k, v and output (4 q_dim + 4 kv_dim),
      SwiGLU's gate, silu(gate) and up in fp32 (3 x 4 I), for each adapted layer with an fp32 input its own
      bf16 copy for lora_A (2 bytes per input feature: q, k, v, gate, up, down; not o_proj, whose input is the
      bf16 attention output), lora_B's r-wide bf16 input, two rsqrt and one logsumexp per head in fp32.
      Llama-3-70B, all-linear: 71.6 h (586,216 B) per token;
    * a 16-bit base has no fp32 norms: the all-bf16 layer keeps 12 h + 4 q_dim + 4 kv_dim + 8 I (44.5 h) and a
      checkpointed layer a 2h input (the research note's figures).
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
        counts: ``plan.count_parameters`` or ``model.count_parameters_meta``.
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
    n = max(1, processes)
    shard = n if sharded else 1
    # k-bit preparation upcasts every 16-bit parameter to fp32; attach_lora casts the 2-D ones back. Under FSDP
    # (sharded) attach_lora skips the preparation (FSDP flattens a layer into one tensor of one dtype), so
    # nothing is upcast: norms stay 16-bit, the layers run all-bf16 and loading has no fp32 moment.
    kbit_prepared = recipe.quantization.load_in_4bit and not (sharded and n > 1)
    if fp32_norms is None:
        fp32_norms = kbit_prepared
    pb = param_bytes or adapter_bytes(recipe)
    state_bytes = optimizer_bytes(recipe, pb)
    paged = recipe.training.optim in PAGED_OPTIMIZERS

    inside = _static_bytes(dims, recipe, counts, n, sharded, kbit_prepared, pb, state_bytes, paged)
    inside |= _activation_bytes(dims, recipe, counts, fp32_norms, loss, backward_factor)
    outside = {
        "optimizer states (paged, unified memory)": counts["trainable"] * state_bytes / shard if paged else 0,
        "CUDA context": CUDA_CONTEXT_GIB * GIB,
    }
    allocated = sum(inside.values())
    reserved = allocated * FRAGMENTATION
    training = reserved + sum(outside.values())
    load_peak = _load_peak_bytes(dims, recipe, counts, shard, kbit_prepared, inside)
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
        "tokens_per_micro_batch": _tokens(recipe),
    }


def _tokens(recipe: Recipe) -> int:
    """Tokens of one micro-batch padded to max_length: what every per-token term is multiplied by."""
    return recipe.training.micro_batch_size * recipe.training.max_length


def _rest_bytes(recipe: Recipe) -> int:
    """Bytes of a weight that is not quantized: 16-bit, or fp32 when the recipe computes in fp32 (CPU)."""
    return 4 if recipe.quantization.compute_dtype == "float32" else 2


def _static_bytes(
    dims: dict[str, int],
    recipe: Recipe,
    counts: dict[str, int],
    n: int,
    sharded: bool,
    kbit_prepared: bool,
    param_bytes: float,
    state_bytes: float,
    paged: bool,
) -> dict[str, float]:
    """The allocator's terms that do not depend on the tokens: weights, adapter, gradients, optimizer states.

    A paged optimizer's states live outside PyTorch's allocator (``estimate_memory`` counts them there).
    """
    q = recipe.quantization
    rest = _rest_bytes(recipe)
    shard = n if sharded else 1
    bits = NF4_DQ_BITS if q.double_quant else NF4_BITS
    matrices = counts["kept_16bit"] - counts["vectors"]
    vector_bytes = 4 if kbit_prepared else rest
    trainable = counts["trainable"]
    terms = {
        "NF4 weights (4 bits)": counts["quantized"] * 0.5 / shard,
        "quantization constants": counts["quantized"] * (bits - 4) / 8 / shard,
        # FSDP gathers the root unit (embeddings, head) for the whole step: no saving from sharding it.
        "16-bit embeddings and head": matrices * rest,
        f"norms and biases ({'fp32' if vector_bytes == 4 else '16-bit'})": counts["vectors"] * vector_bytes / shard,
        "trainable weights": trainable * param_bytes / shard,
        "gradients": trainable * param_bytes / shard,
        "optimizer states": 0 if paged else trainable * state_bytes / shard,
        "dequantized weight in flight": counts["largest_linear"] * 2 * DEQUANT_SLACK if q.load_in_4bit else 0,
    }
    if n > 1 and sharded:
        # One decoder layer gathered for compute, the next prefetched.
        terms["gathered layers (FSDP)"] = 2 * counts["quantized"] / dims["layers"] * bits / 8
    elif n > 1:
        terms["gradient buckets (DDP)"] = trainable * param_bytes
    return terms


def _activation_bytes(
    dims: dict[str, int],
    recipe: Recipe,
    counts: dict[str, int],
    fp32_norms: bool,
    loss: str,
    backward_factor: float,
) -> dict[str, float]:
    """The allocator's terms that grow with the tokens: what backward keeps, and the larger of two peaks.

    The loss and the recompute of a checkpointed layer happen at different moments, so only the larger counts.
    """
    h, layers, vocab = dims["hidden"], dims["layers"], dims["vocab"]
    rest = _rest_bytes(recipe)
    tokens = _tokens(recipe)
    layer, layer_input, dropout = layer_activation_bytes(dims, counts, recipe, fp32_norms)
    if recipe.training.gradient_checkpointing:
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
    return {"activations kept for backward": stash, "peak of loss or layer recompute": max(loss_peak, recompute)}


def _load_peak_bytes(
    dims: dict[str, int],
    recipe: Recipe,
    counts: dict[str, int],
    shard: int,
    kbit_prepared: bool,
    inside: dict[str, float],
) -> float:
    """Device memory while the base loads, before training starts.

    prepare_model_for_kbit_training holds every 16-bit parameter in fp32 at once before attach_lora casts the
    matrices back (Llama-3-70B: 2.1B x 4 bytes = 7.8 GiB next to the 4-bit weights), and while it casts the
    largest one (the embedding or the head, vocab x h) its 16-bit original still exists: + 1.96 GiB on
    Llama-3-70B (checked by the GPU probe, docs/planner.md section 6). Without the preparation (FSDP, a 16-bit
    base) the weights load as stored: the 16-bit matrices whole (the root unit is gathered whole) and the
    sharded rest, below the training peak.
    """
    rest = _rest_bytes(recipe)
    matrices = counts["kept_16bit"] - counts["vectors"]
    if kbit_prepared:
        upcast = (counts["kept_16bit"] * 4 + dims["vocab"] * dims["hidden"] * rest) / shard
    else:
        upcast = matrices * rest + counts["vectors"] * rest / shard
    weights = inside["NF4 weights (4 bits)"] + inside["quantization constants"] + upcast
    return weights * FRAGMENTATION + CUDA_CONTEXT_GIB * GIB


# ------------------------------------------------------------------------------------------------------------
# Host RAM and disk (docs/planner.md section 4).

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
