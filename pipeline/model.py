"""The base model: find it offline, build it on the meta device, load it in 4 bits, attach LoRA.

Every library object of the base is built here, the meta-device model included (``build_meta_model``: the
planner's exact parameter count and the GPU probe's random base start from it).

``bnb_config()`` and ``lora_config()`` are the only places a recipe becomes a ``BitsAndBytesConfig`` or a
``LoraConfig``, field by field, so a library rename changes one line here and nothing in recipes.
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

from pipeline.env import Env
from pipeline.errors import UsageError
from pipeline.recipe import LoraSection, QuantizationSection, Recipe


class ModelNotFound(UsageError):
    """The recipe's model.path is neither a local model directory nor in the local Hugging Face cache."""


class RevisionMismatch(UsageError):
    """The base model's files are not those of the recipe's ``model.revision`` (or cannot be shown to be)."""


class DeviceUnavailable(UsageError):
    """The recipe asks for hardware this machine does not have."""


def resolve_model_path(path: str, revision: str | None = None) -> Path:
    """Find the base model without touching the network.

    Args:
        path: A local directory, or a model id (``org/name``) looked up in the local Hugging Face cache.
        revision: Cached commit or branch of the model id.

    Returns:
        The directory holding ``config.json`` and the weights.

    Raises:
        ModelNotFound: With the path, where it looked, and what to do.
    """
    local = Path(path)
    if local.is_dir():
        if not (local / "config.json").is_file():
            raise ModelNotFound(f"model.path: {path} is a directory but has no config.json; is it a model directory?")
        if revision is not None:
            check_revision(local, revision)
        return local
    looks_like_id = path.count("/") == 1 and not path.startswith((".", "/", "~"))
    if looks_like_id:
        from huggingface_hub import snapshot_download
        from huggingface_hub.errors import LocalEntryNotFoundError

        try:
            return Path(snapshot_download(repo_id=path, revision=revision, local_files_only=True))
        except (LocalEntryNotFoundError, FileNotFoundError, OSError, ValueError):
            from huggingface_hub.constants import HF_HUB_CACHE

            raise ModelNotFound(
                f"model.path: {path} is not a local directory and is not in the local Hugging Face cache "
                f"({HF_HUB_CACHE}). pipeline never downloads weights: copy the model to a directory and set "
                f"model.path to it (or --set model.path=DIR), or populate the cache on a machine allowed to."
            ) from None
    raise ModelNotFound(f"model.path: {path}: no such directory (working directory: {Path.cwd()})")


# Files whose content decides the model's behaviour; their provenance is what model.revision pins.
_MODEL_FILE_SUFFIXES = (".safetensors", ".bin", ".json", ".model", ".tiktoken", ".txt")


def check_revision(model_dir: Path, revision: str) -> None:
    """Prove that a local model directory holds the files of ``revision``, or raise ``RevisionMismatch``.

    A model id is resolved through the Hugging Face cache by revision, so it cannot mismatch. A local directory
    can: someone copied another version, or edited a file. Two kinds of evidence are accepted, both written by
    ``huggingface_hub`` when the model was fetched on a connected machine:

    - a cache snapshot directory (``.../snapshots/<commit>/``): its name is the commit;
    - a ``--local-dir`` download: ``.cache/huggingface/download/<file>.metadata`` per file, whose first line is
      the commit and third the download time. A file modified after its download no longer matches.

    With neither, the revision cannot be shown, which is an error too: a pinned revision that is not checked
    would be a false claim in the audit trail.
    """
    if model_dir.resolve().parent.name == "snapshots":
        commit = model_dir.resolve().name
        if not commit.startswith(revision):
            raise RevisionMismatch(
                f"model.revision: {model_dir} is the cached snapshot of commit {commit}, not {revision}. "
                f"Point model.path at snapshots/{revision}*/ or set model.revision: {commit}."
            )
        return
    meta_dir = model_dir / ".cache" / "huggingface" / "download"
    files = sorted(
        p for p in model_dir.rglob("*") if p.is_file() and p.suffix in _MODEL_FILE_SUFFIXES and ".cache" not in p.parts
    )
    if not meta_dir.is_dir():
        raise RevisionMismatch(
            f"model.revision: {revision} cannot be verified for {model_dir}: it is not a Hugging Face cache snapshot "
            f"and has no download metadata ({meta_dir}). Copy the model with `hf download --local-dir` (which "
            "records each file's commit) or the whole cache snapshot, or remove model.revision from the recipe."
        )
    for file in files:
        relative = file.relative_to(model_dir).as_posix()
        meta = meta_dir / f"{relative}.metadata"
        if not meta.is_file():
            raise RevisionMismatch(
                f"model.revision: {file} has no download record in {meta_dir}, so it is not known to belong to "
                f"revision {revision}; remove the file or fetch the model again with `hf download --local-dir`."
            )
        lines = meta.read_text(encoding="utf-8", errors="replace").splitlines()
        commit = lines[0].strip() if lines else ""
        if not commit.startswith(revision):
            raise RevisionMismatch(
                f"model.revision: {file} was downloaded at commit {commit or '(unreadable)'}, not {revision} "
                f"({meta}). Fetch revision {revision} again, or set model.revision: {commit} if that is the one."
            )
        try:
            downloaded = float(lines[2])
        except (IndexError, ValueError):
            downloaded = None
        # huggingface_hub itself allows 1 s between its recorded time and the file's mtime.
        if downloaded is not None and file.stat().st_mtime - 1 > downloaded:
            raise RevisionMismatch(
                f"model.revision: {file} was modified after it was downloaded at {revision} "
                f"(recorded in {meta}); restore the original file or fetch the model again."
            )


def bnb_config(q: QuantizationSection, fsdp: bool = False) -> Any:
    """The recipe's quantization as transformers' ``BitsAndBytesConfig`` (None for a 16-bit base).

    Args:
        q: The recipe's quantization section.
        fsdp: FSDP-QLoRA (``hardware.distributed: fsdp``). FSDP shards only floating-point tensors and flattens
            a layer's weights into one tensor of a single dtype, so the packed 4-bit weights are stored in the
            compute dtype (two NF4 values per byte either way: a bf16 storage element holds four) instead of
            uint8. This is bitsandbytes' documented FSDP-QLoRA setting (``bnb_4bit_quant_storage``).
    """
    if not q.load_in_4bit:
        return None
    import torch
    from transformers import BitsAndBytesConfig

    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type=q.quant_type,
        bnb_4bit_use_double_quant=q.double_quant,
        bnb_4bit_compute_dtype=getattr(torch, q.compute_dtype),
        bnb_4bit_quant_storage=getattr(torch, q.compute_dtype) if fsdp else torch.uint8,
    )


def lora_config(lora: LoraSection) -> Any:
    """The recipe's adapter as peft's ``LoraConfig``."""
    from peft import LoraConfig

    return LoraConfig(
        r=lora.r,
        lora_alpha=lora.alpha,
        lora_dropout=lora.dropout,
        target_modules=lora.target_modules if isinstance(lora.target_modules, str) else list(lora.target_modules),
        modules_to_save=list(lora.modules_to_save) or None,
        bias="none",
        task_type="CAUSAL_LM",
    )


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

    Same keys as ``plan.count_parameters`` (the analytic count, which the tests hold equal to this one).
    ``all-linear`` is resolved by peft itself, as in training.

    Raises:
        ValueError: When transformers cannot build the architecture from this config.
    """
    from accelerate import init_empty_weights
    from peft import get_peft_model

    # Parameters do not depend on the attention kernel; eager is the one every architecture has (docs/planner.md
    # section 2), so counting never fails over a kernel the recipe could change.
    eager = recipe.model_copy(update={"model": recipe.model.model_copy(update={"attn_implementation": "eager"})})
    model = build_meta_model(config, eager)
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


def device_for(recipe: Recipe, env: Env) -> str:
    """'cuda' or 'cpu', failing clearly when the recipe demands a GPU that is not there."""
    wanted = recipe.hardware.device
    if wanted == "cuda" and not env.cuda:
        raise DeviceUnavailable(
            "hardware.device is 'cuda' but no CUDA GPU is visible. Run on a GPU machine, or for a CPU smoke run "
            "pass --set hardware.device=cpu (and a small model)."
        )
    if wanted == "auto":
        return "cuda" if env.cuda else "cpu"
    return wanted


def check_attn_implementation(recipe: Recipe, device: str) -> None:
    """Fail before loading anything when ``model.attn_implementation`` cannot run here.

    flash_attention_2 needs the ``flash-attn`` package, a CUDA GPU and 16-bit compute (its kernels exist for
    fp16/bf16 only); sdpa (PyTorch's own kernels, flash or memory-efficient on a GPU) and eager run anywhere.

    Raises:
        DeviceUnavailable: Naming the key, the reason and the fix.
    """
    import importlib.util

    if recipe.model.attn_implementation != "flash_attention_2":
        return
    problems = []
    if importlib.util.find_spec("flash_attn") is None:
        problems.append("the flash-attn package is not installed (pip install flash-attn on the GPU machine)")
    if device != "cuda":
        problems.append(f"it needs a CUDA GPU and this run is on {device}")
    if recipe.quantization.compute_dtype == "float32":
        problems.append("it has kernels for float16/bfloat16 only and quantization.compute_dtype is float32")
    if problems:
        raise DeviceUnavailable(
            "model.attn_implementation is 'flash_attention_2' but " + "; ".join(problems) + ". Use sdpa "
            "(PyTorch's fused attention, the default; --set model.attn_implementation=sdpa)."
        )


def check_optimizer(recipe: Recipe, device: str) -> None:
    """Fail before loading anything when ``training.optim`` is a paged optimizer and there is no GPU.

    Paged optimizers keep their states in CUDA unified memory, which the driver pages to host RAM under
    pressure; without CUDA there is nothing to page.

    Raises:
        DeviceUnavailable: Naming the key and the CPU alternative.
    """
    if recipe.training.optim.startswith("paged_") and device != "cuda":
        raise DeviceUnavailable(
            f"training.optim is '{recipe.training.optim}', a paged optimizer, which needs a CUDA GPU (its states "
            f"live in CUDA unified memory) and this run is on {device}; use --set training.optim=adamw_torch"
        )


def load_tokenizer(model_dir: Path) -> Any:
    """The base's tokenizer, with a pad token (EOS when the base defines none) for batched training and generation."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_base(recipe: Recipe, model_dir: Path, device: str) -> Any:
    """Load the frozen base: 4-bit via bitsandbytes when the recipe says so, on one device.

    Non-quantized parts (embeddings, norms, output head) are kept in the compute dtype: bf16 on a GPU,
    fp32 when the recipe computes in fp32 (CPU).
    """
    import torch
    from transformers import AutoModelForCausalLM

    dtype = getattr(torch, recipe.quantization.compute_dtype)
    local_rank = _local_rank()
    fsdp = uses_fsdp(recipe)
    device_map = {"": f"cuda:{local_rank}"} if device == "cuda" else {"": "cpu"}
    if fsdp:
        # FSDP places the shards itself; with cpu_ram_efficient_loading rank 0 reads the weights and the other
        # ranks receive them by broadcast, so no process may pin the whole model to its GPU first.
        device_map = None
    model = AutoModelForCausalLM.from_pretrained(
        model_dir,
        quantization_config=bnb_config(recipe.quantization, fsdp=fsdp),
        dtype=dtype,
        device_map=device_map,
        attn_implementation=recipe.model.attn_implementation,
        revision=None,  # model_dir is already the resolved snapshot
    )
    model.config.use_cache = False  # the KV cache is useless in training and costs memory
    keep_compute_dtype_on_cpu(model, recipe.quantization.compute_dtype)
    return model


def keep_compute_dtype_on_cpu(model: Any, compute_dtype: str) -> int:
    """Keep bitsandbytes' 4-bit layers computing in the recipe's dtype on CPUs with AVX512-BF16.

    On such CPUs (Intel Sapphire Rapids and later) ``Linear4bit.forward`` in eval mode repacks the weight in
    place and switches to a fused kernel that casts the input to bfloat16 whatever the compute dtype: a
    float32 recipe is then evaluated in bf16 (logits off by ~2e-3 against the same weights in fp32, so export
    verification compares two different computations) and the stored 4-bit codes change layout. The switch is
    the layer's ``support_avx512bf16_for_cpu`` attribute (bitsandbytes 0.49-0.50; no public option exists);
    ``tests/test_model.py`` fails loudly if a bitsandbytes release drops it. Returns the layers switched off.
    """
    if compute_dtype == "bfloat16":
        return 0  # the fused kernel computes in the recipe's own dtype: keep its speed
    import bitsandbytes as bnb

    layers = [m for m in model.modules() if isinstance(m, bnb.nn.Linear4bit)]
    for layer in layers:
        layer.support_avx512bf16_for_cpu = False
    return len(layers)


def attach_lora(model: Any, recipe: Recipe) -> Any:
    """Prepare the 4-bit base for training and wrap it with the recipe's LoRA adapter.

    ``prepare_model_for_kbit_training`` freezes the base, casts small layers (norms) to fp32 for stability and
    enables input gradients for checkpointing. It also upcasts the 16-bit embeddings and output head to fp32,
    which costs 2 x 128,256 x 8,192 x 2 bytes = 3.9 GiB on a Llama-3 70B for no gain while they are frozen,
    so those are cast back (as the QLoRA reference code does).
    """
    import torch
    from peft import get_peft_model, prepare_model_for_kbit_training

    if recipe.quantization.load_in_4bit and not uses_fsdp(recipe):
        # (Skipped under FSDP: its fp32 casts of the norms would leave a decoder layer with two dtypes, and FSDP
        # flattens a layer's frozen weights into one tensor of a single dtype. The base stays frozen either way:
        # get_peft_model freezes everything but the adapter.)
        kept = {name: p.dtype for name, p in model.named_parameters() if p.dtype in (torch.bfloat16, torch.float16)}
        model = prepare_model_for_kbit_training(
            model,
            use_gradient_checkpointing=recipe.training.gradient_checkpointing,
            gradient_checkpointing_kwargs={"use_reentrant": False},
        )
        for name, param in model.named_parameters():
            if name in kept and param.ndim == 2 and param.dtype == torch.float32:
                param.data = param.data.to(kept[name])
    with warnings.catch_warnings():
        # With modules_to_save=[embed_tokens] on a base with tied embeddings (the demo model), peft warns that
        # the trained input copy and the frozen output head stop being tied. That is the intent: tying them
        # (ensure_weight_tying) was slower and scored lower at equal training time (benchmarks/gpu_probe.md).
        warnings.filterwarnings("ignore", message=".*ensure_weight_tying.*")
        return get_peft_model(model, lora_config(recipe.lora))


def restore_adapter_dtype(model: Any, recipe: Recipe) -> int:
    """Put trainable weights back in fp32 when the recipe computes in fp32.

    TRL casts every trainable parameter of a 4-bit model to bf16 (the QLoRA paper's choice for bf16
    compute on a GPU). With fp32 compute on a CPU that only costs: a CPU without native bf16 runs it much
    slower (benchmarks/gpu_probe.md), and bf16 embeddings lose small updates. Returns the number of tensors cast.
    """
    import torch

    if recipe.quantization.compute_dtype != "float32":
        return 0
    cast = 0
    for param in model.parameters():
        if param.requires_grad and param.dtype != torch.float32:
            param.data = param.data.float()
            cast += 1
    return cast


def count_4bit_linear(model: Any) -> int:
    """Number of bitsandbytes ``Linear4bit`` layers in a model (0 when bitsandbytes is not in use)."""
    try:
        import bitsandbytes as bnb
    except ImportError:
        return 0
    return sum(isinstance(m, bnb.nn.Linear4bit) for m in model.modules())


def eos_token_ids(tokenizer: Any, model: Any) -> set[int]:
    """Every id that ends an answer: the tokenizer's EOS and the generation config's (e.g. Llama 3's <|eot_id|>)."""
    ids = {tokenizer.eos_token_id} if tokenizer.eos_token_id is not None else set()
    configured = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    if isinstance(configured, int):
        ids.add(configured)
    elif configured:
        ids.update(configured)
    return ids


def uses_fsdp(recipe: Recipe) -> bool:
    """True when this process trains under FSDP-QLoRA: the recipe asks for it and several processes run."""
    import os

    return recipe.hardware.distributed == "fsdp" and int(os.environ.get("WORLD_SIZE", "1")) > 1


def _local_rank() -> int:
    import os

    return int(os.environ.get("LOCAL_RANK", "0"))


def tokenizer_or_reason(recipe: Recipe) -> tuple[Any, str | None]:
    """The recipe's tokenizer and None, or None and why it is not available (the base is not on this machine).

    What ``data.validate_data`` is given for the contract's token checks: ``validate`` may run where the base is
    not (a laptop checking data for a 70B run), and then skips them with a warning instead of failing.
    """
    try:
        return load_tokenizer(resolve_model_path(recipe.model.path, recipe.model.revision)), None
    except ModelNotFound as exc:
        return None, f"tokenizer not available: {exc}"


def weight_files_digest(model_dir: str | Path) -> tuple[str, dict[str, str]]:
    """SHA-256 over the base's weight files: (combined digest, per-file digests).

    A file in the Hugging Face cache is a symlink to a blob named by its own SHA-256 (for LFS files), so that name
    is used rather than re-reading 140 GB; other files are hashed. The combined digest hashes the sorted
    ``name:sha256`` lines, so it changes when any weight file does.
    """
    import hashlib
    import re

    from pipeline.rundir import sha256_file

    model_dir = Path(model_dir)
    files = sorted(p for p in model_dir.iterdir() if p.suffix in (".safetensors", ".bin") and p.is_file())
    digests = {}
    for path in files:
        target = path.resolve()
        if path.is_symlink() and re.fullmatch(r"[0-9a-f]{64}", target.name):
            digests[path.name] = target.name
            continue
        digests[path.name] = sha256_file(target)
    combined = hashlib.sha256("\n".join(f"{k}:{v}" for k, v in digests.items()).encode()).hexdigest()
    return combined, digests
