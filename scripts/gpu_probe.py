"""Measure a few real QLoRA steps at a recipe's exact shapes, with random 4-bit weights, against the planner.

Run as:
    # the 70B recipe on one H100/H200, 2,048 then 4,096 tokens (a fresh process each, under a minute each on an H200):
    for n in 2048 4096; do
        python scripts/gpu_probe.py recipes/medical_coding.yaml --set training.max_length=$n \
            --out benchmarks/results/gpu_probe-70b-$n.json
    done
    # tiny shape on a CPU (what the test suite runs; layer widths must be multiples of 64 for 4-bit on CPU):
    python scripts/gpu_probe.py recipes/quickstart.yaml --config demo/tiny-llama-icd10/config.json --steps 2

No weights are read or downloaded: the architecture comes from the base's config.json (the model directory,
a config shipped with pipeline, or --config), is built on the meta device, and every linear layer that a real
load would store in 4 bits is filled with random data quantized on the device one layer at a time
(``model.init: random``; ``build_random_base`` below). Then the same code paths as ``pipeline train``
run: ``attach_lora`` (k-bit preparation, the recipe's LoRA), what TRL's SFTTrainer adds (adapter cast to bf16,
input gradients for checkpointing, its fused LM head), the optimizer transformers builds for
``training.optim``, bf16 autocast. Each step is one micro-batch of ``micro_batch_size x max_length`` random
tokens, all of them trained (the worst case for the loss), forward + backward + optimizer step.

Recorded (JSON, written atomically to --out): peak allocated and reserved memory (PyTorch's allocator), the
device-wide memory in use (``cudaMemGetInfo``: adds the CUDA context and bitsandbytes' paged optimizer states,
which live outside PyTorch's allocator), peak host RSS, step time, tokens/s, MFU, the planner's estimate for
the same recipe and its relative error for each of the three memory figures.

MFU = tokens/s x (6 N + 12 L h s) / peak FLOP/s: N the base's parameters minus the input embeddings (the
lm_head matmul counts, the embedding lookup does not), 12 L h s the attention score/value matmuls forward and
backward (PaLM, appendix B). Gradient checkpointing recomputes the forward (8 N instead of 6 N of hardware
FLOPs), which MFU does not credit. Peak bf16 dense FLOP/s: H100/H200 SXM 989e12, H100 PCIe 756e12, A100
312e12, L40S 362e12; --peak-tflops for anything else.

On a GPU image with torch, transformers, peft and accelerate but no network, what it lacks travels as wheels
downloaded on a connected machine and is installed offline before the run. That is bitsandbytes, trl and
datasets (with dill and multiprocess), and pydantic (with pydantic-core, annotated-types and
typing-inspection), which the recipe loader needs. Also transformers and regex when the image's are older
than pyproject.toml asks, and pyarrow when the image's is older than datasets needs:
    pip download --no-deps --only-binary=:all: --python-version 3.12 --platform manylinux_2_28_x86_64 \
        -d wheels/ bitsandbytes trl datasets dill multiprocess pydantic pydantic-core annotated-types \
        typing-inspection                                     # on a machine with network access
    pip install --no-index --no-deps --target /tmp/site wheels/*.whl && export PYTHONPATH=/tmp/site
Timings of the 70B on an H200 (whole process, building the random model, each step): benchmarks/gpu_probe.md.
Exit codes: 0 measured; 1 the run failed (e.g. out of memory: recorded in the JSON); 2 bad arguments.
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import sys
import time
from contextlib import nullcontext
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

PEAK_TFLOPS = {"H200": 989.0, "H100 PCIe": 756.0, "H100": 989.0, "A100": 312.0, "L40S": 362.0}


def peak_flops(gpu_name: str | None, override_tflops: float | None) -> float | None:
    """Peak dense bf16 FLOP/s of the GPU (None when unknown)."""
    if override_tflops:
        return override_tflops * 1e12
    for key, tflops in PEAK_TFLOPS.items():  # "H100 PCIe" is checked before "H100"
        if gpu_name and key in gpu_name:
            return tflops * 1e12
    return None


def model_flops_per_token(config: dict[str, Any], counts: dict[str, int], seq_len: int) -> float:
    """6 N + 12 L h s, N without the input embeddings (see the module docstring)."""
    n = counts["total"] - config["vocab_size"] * config["hidden_size"]
    return 6 * n + 12 * config["num_hidden_layers"] * config["hidden_size"] * seq_len


def relative_error(planned: float | None, measured: float | None) -> float | None:
    """(planned - measured) / measured, rounded; positive means the planner over-estimates."""
    if planned is None or not measured:
        return None
    return round((planned - measured) / measured, 4)


def probe(
    recipe_path: str,
    overrides: list[str],
    config_path: str | None = None,
    steps: int = 3,
    warmup: int = 1,
    device: str = "auto",
    loss: str = "auto",
    override_tflops: float | None = None,
) -> dict[str, Any]:
    """Build the random 4-bit base, run ``warmup + steps`` training steps, and measure.

    Returns:
        The JSON-ready result (``status`` is ``"ok"`` or ``"failed"`` with the error).
    """
    import importlib.util

    import torch

    from pipeline.env import package_version
    from pipeline.model import count_4bit_linear
    from pipeline.plan import find_model_config, make_plan
    from pipeline.recipe import load_recipe

    recipe = load_recipe(recipe_path, [*overrides, "model.init=random"])
    if config_path:
        config, source = json.loads(Path(config_path).read_text(encoding="utf-8")), config_path
    else:
        config, source = find_model_config(recipe.model.path)
        if config is None:
            raise FileNotFoundError(f"{recipe_path}: model.path {recipe.model.path}: {source}; pass --config")
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if loss == "auto":
        loss = "fused" if importlib.util.find_spec("trl") else "full_logits"
    t = recipe.training
    plan = make_plan(recipe, 0, config, world_size=1)
    tokens = t.micro_batch_size * t.max_length
    cuda = device.startswith("cuda")
    result: dict[str, Any] = {
        "recipe": recipe_path,
        "overrides": overrides,
        "config_source": source,
        "model_init": recipe.model.init,
        "device": device,
        "gpu_name": torch.cuda.get_device_name(device) if cuda else None,
        "versions": {p: package_version(p) for p in ("torch", "transformers", "peft", "trl", "bitsandbytes")},
        "shape": {
            "micro_batch_size": t.micro_batch_size,
            "max_length": t.max_length,
            "tokens_per_step": tokens,
            "lora_r": recipe.lora.r,
            "gradient_checkpointing": t.gradient_checkpointing,
            "optim": t.optim,
            "attn_implementation": recipe.model.attn_implementation,
        },
        "loss": loss,
        "parameters": plan["parameters"],
        "planner": {k: plan["memory"][k] for k in ("allocated_gib", "reserved_gib", "needed_gib", "load_peak_gib")}
        | {"components_gib": plan["memory"]["components_gib"]},
        "status": "failed",
    }
    gib = 2**30
    try:
        started = time.perf_counter()
        if cuda:
            # In use right after the CUDA context exists, before any tensor: calibrates memory.CUDA_CONTEXT_GIB.
            free, total = torch.cuda.mem_get_info(device)
            result["device_used_at_start_gib"] = round((total - free) / gib, 3)
            torch.cuda.reset_peak_memory_stats(device)
        model = training_model(config, recipe, device, loss)
        result["linear4bit_layers"] = count_4bit_linear(model)
        result["trainable_parameters"] = sum(p.numel() for p in model.parameters() if p.requires_grad)
        result["static_bytes"] = static_bytes(model, plan["memory"]["components_bytes"])
        result["build_s"] = round(time.perf_counter() - started, 2)
        if cuda:
            torch.cuda.synchronize(device)
            result["load_peak_allocated_gib"] = round(torch.cuda.max_memory_allocated(device) / gib, 3)
            torch.cuda.reset_peak_memory_stats(device)

        optimizer = _optimizer(recipe, model)
        dtype = getattr(torch, recipe.quantization.compute_dtype)
        autocast = torch.autocast("cuda", dtype=dtype) if cuda and dtype != torch.float32 else nullcontext()
        generator = torch.Generator(device="cpu").manual_seed(t.seed)
        vocab = config["vocab_size"]
        times, used, losses = [], [], []
        model.train()
        for step in range(warmup + steps):
            ids = torch.randint(0, vocab, (t.micro_batch_size, t.max_length), generator=generator).to(device)
            begin = time.perf_counter()
            with autocast:
                if loss == "fused":
                    out = model(input_ids=ids, attention_mask=torch.ones_like(ids), labels=ids, fused_lm_head=True)
                else:
                    out = model(input_ids=ids, attention_mask=torch.ones_like(ids), labels=ids)
            out.loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            if cuda:
                torch.cuda.synchronize(device)
                free, total = torch.cuda.mem_get_info(device)
                used.append((total - free) / gib)
            losses.append(round(float(out.loss.detach()), 4))
            if step >= warmup:
                times.append(time.perf_counter() - begin)
            print(f"step {step + 1}/{warmup + steps}: {time.perf_counter() - begin:.2f} s, loss {losses[-1]}")
        step_time = statistics.median(times)
        result.update(
            status="ok",
            losses=losses,
            # Six decimals, so that tokens_per_s can be re-derived from step_time_s to 1e-4 even for the
            # millisecond steps of a tiny CPU shape.
            step_times_s=[round(x, 6) for x in times],
            step_time_s=round(step_time, 6),
            tokens_per_s=round(tokens / step_time, 2),
            host_peak_rss_gib=round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / gib, 3),
        )
        flops = peak_flops(result["gpu_name"], override_tflops)
        per_token = model_flops_per_token(config, plan["parameters"], t.max_length)
        result["model_flops_per_token"] = per_token
        result["mfu"] = round(tokens / step_time * per_token / flops, 4) if flops else None
        if cuda:
            measured = {
                "allocated_gib": round(torch.cuda.max_memory_allocated(device) / gib, 3),
                "reserved_gib": round(torch.cuda.max_memory_reserved(device) / gib, 3),
                "device_used_gib": round(max(used), 3),
            }
            result["measured"] = measured
            planner = result["planner"]
            result["planner_error"] = {
                "allocated": relative_error(planner["allocated_gib"], measured["allocated_gib"]),
                "reserved": relative_error(planner["reserved_gib"], measured["reserved_gib"]),
                "device": relative_error(planner["needed_gib"], measured["device_used_gib"]),
            }
            result["within_10_percent"] = abs(result["planner_error"]["device"]) <= 0.10
    except torch.OutOfMemoryError as exc:
        result["error"] = f"out of memory: {str(exc).splitlines()[0]}"
        if cuda:
            result["measured_at_failure"] = {
                "allocated_gib": round(torch.cuda.max_memory_allocated(device) / gib, 3),
                "reserved_gib": round(torch.cuda.max_memory_reserved(device) / gib, 3),
            }
    return result


def training_model(config: dict[str, Any], recipe: Any, device: str, loss: str = "fused") -> Any:
    """The random 4-bit base prepared exactly as ``pipeline train`` prepares a real one.

    ``build_random_base`` (4-bit layers filled on the device), gradient checkpointing (non-reentrant),
    ``attach_lora`` (k-bit preparation, the recipe's LoRA); then what TRL's SFTTrainer does
    (trl/trainer/sft_trainer.py): input gradients for checkpointing with peft, the adapter of a quantized model
    in bf16, and its fused LM head (``loss="fused"``).
    """
    import torch

    from pipeline.model import attach_lora

    t = recipe.training
    base = build_random_base(config, recipe, device, seed=t.seed)
    if t.gradient_checkpointing:
        base.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model = attach_lora(base, recipe)
    if t.gradient_checkpointing:
        model.enable_input_require_grads()
    if recipe.quantization.load_in_4bit and recipe.quantization.compute_dtype != "float32":
        for param in model.parameters():
            if param.requires_grad:
                param.data = param.data.to(torch.bfloat16)
    if loss == "fused":
        from trl.trainer.utils import add_fused_lm_head

        add_fused_lm_head(model.get_base_model(), outputs=("log_probs", "entropy", "is_top1"))
    return model


def build_random_base(config: dict[str, Any], recipe: Any, device: str, seed: int = 0) -> Any:
    """The base with random weights (``model.init: random``), created in 4 bits layer by layer on ``device``.

    The architecture is built on the meta device with the same 4-bit layers as a real load
    (``pipeline.model.build_meta_model``); then each ``Linear4bit`` gets a random 16-bit weight on the device that is
    quantized at once, so the 16-bit model never exists in memory (a 70B peaks at one 235M-weight matrix,
    0.44 GiB, on top of the 4-bit weights). Embeddings, norms and the head are created in the compute dtype.
    Values follow N(0, initializer_range) (norm weights 1): meaningless for quality, exact for memory and speed.

    Args:
        config: The base's config.json.
        recipe: The recipe (quantization, attention, compute dtype).
        device: ``"cuda"``, ``"cuda:N"`` or ``"cpu"``.
        seed: Seed of the random weights.

    Returns:
        The model, ready for ``attach_lora``.
    """
    import torch
    from torch import nn

    from pipeline.model import build_meta_model

    model = build_meta_model(config, recipe)
    dtype = getattr(torch, recipe.quantization.compute_dtype)
    std = float(config.get("initializer_range", 0.02))
    generator = torch.Generator(device=device).manual_seed(seed)

    def random(shape: tuple[int, ...], fill: float | None = None) -> torch.Tensor:
        tensor = torch.empty(shape, device=device, dtype=dtype)
        return tensor.fill_(fill) if fill is not None else tensor.normal_(0.0, std, generator=generator)

    q = recipe.quantization
    for module in model.modules():
        if type(module).__name__ == "Linear4bit":
            import bitsandbytes as bnb

            weight = bnb.nn.Params4bit(
                random((module.out_features, module.in_features)),
                requires_grad=False,
                compress_statistics=q.double_quant,
                quant_type=q.quant_type,
                module=module,
            )
            module.weight = weight._quantize(device)  # 16-bit matrix -> 4 bits now; the 16-bit copy is dropped
            module.compute_dtype = dtype
        for name, param in list(module.named_parameters(recurse=False)):
            if param.device.type == "meta":
                fill = 1.0 if param.ndim == 1 and "norm" in type(module).__name__.lower() else None
                fill = 0.0 if name == "bias" else fill
                setattr(module, name, nn.Parameter(random(tuple(param.shape), fill), requires_grad=False))
        for name, buffer in list(module.named_buffers(recurse=False)):
            if buffer is not None:
                module._buffers[name] = buffer.to(device)  # rotary inverse frequencies are built on the CPU
    if model.config.tie_word_embeddings and model.get_output_embeddings() is not None:
        model.get_output_embeddings().weight = model.get_input_embeddings().weight
    model.config.use_cache = False
    return model


def static_bytes(model: Any, planned: dict[str, int]) -> dict[str, dict[str, int]]:
    """Bytes the model's tensors really occupy, next to the planner's static terms.

    4-bit codes (``Params4bit`` storage); quantization constants (per layer: the first-level absmax, and
    with double quantization the fp32 second-level absmax, both 256-entry code tables and the offset); the
    frozen 16-bit/fp32 rest (embeddings, head, norms, biases); the trainable weights. The planner leaves out
    the code tables (16 + 256 fp32 values per layer): 0.6 MiB on a 70B, visible only on tiny shapes.
    """
    import bitsandbytes as bnb

    codes = constants = frozen = trainable = 0
    for module in model.modules():
        weight = getattr(module, "weight", None)
        if isinstance(module, bnb.nn.Linear4bit):  # not peft's LoRA wrapper, which shares the name
            codes += weight.data.nbytes
            state = weight.quant_state
            constants += state.absmax.nbytes + state.code.nbytes
            if state.nested:
                constants += state.state2.absmax.nbytes + state.state2.code.nbytes + state.offset.nbytes
    for param in model.parameters():
        if type(param).__name__ == "Params4bit":
            continue
        if param.requires_grad:
            trainable += param.nbytes
        else:
            frozen += param.nbytes
    return {
        "4-bit codes": {"planned": planned["NF4 weights (4 bits)"], "measured": codes},
        "quantization constants": {"planned": planned["quantization constants"], "measured": constants},
        "frozen 16-bit/fp32 weights": {
            "planned": planned["16-bit embeddings and head"] + planned["norms and biases (fp32)"],
            "measured": frozen,
        },
        "trainable weights": {"planned": planned["trainable weights"], "measured": trainable},
    }


def _optimizer(recipe: Any, model: Any) -> Any:
    """The optimizer transformers' Trainer builds for ``training.optim`` (same class and arguments)."""
    import tempfile

    from transformers import Trainer, TrainingArguments

    t = recipe.training
    args = TrainingArguments(
        output_dir=tempfile.mkdtemp(prefix="gpu-probe-"),
        optim=t.optim,
        learning_rate=t.learning_rate,
        weight_decay=t.weight_decay,
        report_to="none",
        use_cpu=not _on_cuda(model),
    )
    cls, kwargs = Trainer.get_optimizer_cls_and_kwargs(args, model)
    return cls([p for p in model.parameters() if p.requires_grad], **kwargs)


def _on_cuda(model: Any) -> bool:
    return next(model.parameters()).device.type == "cuda"


def main(argv: list[str] | None = None) -> int:
    """Command line: see the module docstring."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("recipe", help="recipe YAML")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE")
    parser.add_argument("--config", help="config.json of the architecture (default: the recipe's model.path)")
    parser.add_argument("--steps", type=int, default=3, help="measured steps (default 3)")
    parser.add_argument("--warmup", type=int, default=1, help="steps run before measuring (default 1)")
    parser.add_argument("--device", default="auto", help="cuda, cuda:N or cpu (default: cuda when available)")
    parser.add_argument("--loss", choices=("auto", "fused", "full_logits"), default="auto")
    parser.add_argument("--peak-tflops", type=float, help="peak dense bf16 TFLOP/s of the GPU, for MFU")
    parser.add_argument("--out", default="gpu_probe.json", help="JSON result (default gpu_probe.json)")
    args = parser.parse_args(argv)

    from pipeline.egress import offline_environment
    from pipeline.recipe import RecipeError
    from pipeline.rundir import write_json

    offline_environment()
    try:
        result = probe(
            args.recipe, args.overrides, args.config, args.steps, args.warmup, args.device, args.loss, args.peak_tflops
        )
    except (RecipeError, FileNotFoundError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    write_json(args.out, result)
    summary = {k: result.get(k) for k in ("status", "step_time_s", "tokens_per_s", "mfu", "measured", "planner_error")}
    print(json.dumps(summary))
    print(f"Result: {args.out}")
    return 0 if result["status"] == "ok" else 1


if __name__ == "__main__":
    sys.exit(main())
