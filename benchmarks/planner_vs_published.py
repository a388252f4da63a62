"""The planner's estimate next to published QLoRA memory figures (the table in docs/planner.md).

Run as:
    python benchmarks/planner_vs_published.py > benchmarks/planner_vs_published.md

Pure arithmetic (no torch, no GPU, under a second). Each row sets the planner up like the published run:
the architecture (shipped config, or the published facts of an older base given here), LoRA rank and
targets, sequence length, micro-batch, optimizer, GPUs, and the loss path of the stack that was measured
(transformers' full-logits loss for runs from 2023-2024; TRL's fused LM head is what `pipeline train` runs
today, shown alongside). Published numbers are quoted from ../shared/reference/memory-speed-cost.md, which
gives each source; "GB" there is the vendors' unit, converted to GiB (x 0.931) for the error column.
"""

from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from pipeline.memory import estimate_memory  # noqa: E402
from pipeline.plan import count_parameters, find_model_config  # noqa: E402
from pipeline.recipe import load_recipe  # noqa: E402

RECIPE = ROOT / "recipes" / "medical_coding.yaml"
GB_TO_GIB = 1e9 / 2**30

# LLaMA-1 65B (Touvron et al. 2023, table 2; params.json: dim 8192, 80 layers, 64 heads, FFN 22016, 32k vocab).
LLAMA1_65B = {
    "model_type": "llama",
    "hidden_size": 8192,
    "intermediate_size": 22016,
    "num_hidden_layers": 80,
    "num_attention_heads": 64,
    "num_key_value_heads": 64,
    "vocab_size": 32000,
    "tie_word_embeddings": False,
}
# Llama-2-70B: as Llama-3-70B but a 32k vocabulary.
LLAMA2_70B = {**LLAMA1_65B, "intermediate_size": 28672, "num_key_value_heads": 8}


def config_for(name: str | dict) -> dict:
    """A shipped config by model id, or the dict given."""
    if isinstance(name, dict):
        return name
    config, _ = find_model_config(name)
    return config


def needed(
    config: dict, overrides: list[str], loss: str, processes: int = 1, sharded: bool = False, fp32_norms: bool = True
) -> float:
    """The planner's peak GiB per GPU for the medical-coding recipe with these overrides."""
    recipe = load_recipe(RECIPE, overrides)
    counts = count_parameters(config, recipe)
    memory = estimate_memory(
        config, recipe, counts, processes=processes, sharded=sharded, loss=loss, fp32_norms=fp32_norms
    )
    return memory["needed_gib"]


def max_context(config: dict, overrides: list[str], loss: str, gib: float, fp32_norms: bool = True) -> int:
    """Longest max_length (micro-batch 1) whose estimate fits ``gib``, to the nearest 64 tokens."""
    low, high = 64, 262_144
    while high - low > 64:
        mid = (low + high) // 2 // 64 * 64
        if needed(config, [*overrides, f"training.max_length={mid}"], loss, fp32_norms=fp32_norms) <= gib:
            low = mid
        else:
            high = mid
    return low


# fp32_norms: whether the measured stack ran peft's k-bit preparation, which leaves the norms in fp32 (and so
# the residual stream): the QLoRA reference code does; peft skips the upcast for GPTQ models, and FSDP-QLoRA
# skips the preparation (TRL's "sharded QLoRA" check), keeping every layer in bf16.
ROWS = [
    # (label, config, overrides, published GiB, note, processes, sharded, fp32_norms)
    (
        "QLoRA paper: LLaMA-65B, r=64 all linear, seq 512, bs 1, paged AdamW 32-bit, bf16 adapters",
        LLAMA1_65B,
        ["lora.r=64", "lora.dropout=0.05", "training.max_length=512", "training.optim=paged_adamw_32bit"],
        45.0 * GB_TO_GIB,
        "45.0 GB in the paper's memory figure (secondary transcription; headline: fits a 48 GB GPU)",
        1,
        False,
        True,
    ),
    (
        "Qwen-72B Q-LoRA (GPTQ int4 base), r=64, seq 2048, bs 1, A100-80G",
        "Qwen/Qwen2.5-72B-Instruct",
        ["lora.r=64", "training.max_length=2048", "training.optim=paged_adamw_32bit", "lora.dropout=0.05"],
        64.1 * GB_TO_GIB,
        "64.1 GB measured (QwenLM/Qwen README); GPTQ base, not NF4: indicative only",
        1,
        False,
        False,
    ),
    (
        "Qwen-72B Q-LoRA, same at seq 4096",
        "Qwen/Qwen2.5-72B-Instruct",
        ["lora.r=64", "training.max_length=4096", "training.optim=paged_adamw_32bit", "lora.dropout=0.05"],
        68.0 * GB_TO_GIB,
        "68.0 GB measured; slope 3.9 GB per 2,048 tokens",
        1,
        False,
        False,
    ),
    (
        "peft docs: Llama-2-70B FSDP-QLoRA, 2 GPUs, seq 2048 packed, bs 2, r=8",
        LLAMA2_70B,
        ["lora.r=8", "training.max_length=2048", "training.micro_batch_size=2", "lora.dropout=0.1"],
        35.6 * GB_TO_GIB,
        "35.6 GB per GPU without CPU offload (huggingface/peft docs/source/accelerate/fsdp.md)",
        2,
        True,
        False,
    ),
    (
        "philschmid: Llama-3-70B FSDP-QLoRA, 2 GPUs, seq 3072, bs 1, r=16",
        "meta-llama/Llama-3.1-70B",
        ["lora.r=16", "training.max_length=3072"],
        40.0 * GB_TO_GIB,
        '"FSDP + Q-Lora needs ~2x40GB GPUs" (an envelope, not a measurement)',
        2,
        True,
        False,
    ),
]


def main() -> None:
    """Print both tables as Markdown."""
    print("# Planner vs published QLoRA memory figures\n")
    print("Reproduce: `python benchmarks/planner_vs_published.py > benchmarks/planner_vs_published.md`")
    print("(arithmetic only, no GPU; sources and reading in docs/planner.md section 5).\n")
    header = "| Published setup | Published (GiB) | Planner, full-logits loss (GiB) | error | Planner, TRL fused head |"
    print(header + " Note |")
    print("|---|---|---|---|---|---|")
    for label, name, overrides, published, note, processes, sharded, fp32_norms in ROWS:
        config = config_for(name)
        full = needed(config, overrides, "full_logits", processes, sharded, fp32_norms)
        fused = needed(config, overrides, "fused", processes, sharded, fp32_norms)
        error = f"{(full - published) / published:+.0%}" if published else "-"
        print(f"| {label} | {published:.1f} | {full:.1f} | {error} | {fused:.1f} | {note} |")
    llama70 = config_for("meta-llama/Llama-3.3-70B-Instruct")
    r32 = ["lora.r=32", "lora.dropout=0"]
    stock = max_context(llama70, r32, "full_logits", 80)
    fp32_embed = max_context(llama70, r32, "full_logits", 80 - 3.91)
    fused = max_context(llama70, r32, "fused", 80)
    print()
    print("| Longest context on one 80 GB A100, Llama-3.3-70B, r=32, bs 1 | Tokens |")
    print("|---|---|")
    print("| Unsloth's measured HF + FlashAttention-2 baseline (unslothai/unsloth README) | 6,916 |")
    print(f"| Planner, full-logits loss, bf16 embeddings and head | {stock:,} |")
    label = "Planner, full-logits loss, fp32 embeddings and head (+3.91 GiB, plain k-bit preparation)"
    print(f"| {label} | {fp32_embed:,} |")
    print(f"| Planner, TRL fused LM head (what `pipeline train` runs) | {fused:,} |")


if __name__ == "__main__":
    main()
