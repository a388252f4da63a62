"""Training speed: `pipeline train` against a plain TRL script with the same settings, and packing on vs off.

Run as:
    nice -n 10 .venv/bin/python benchmarks/train_speed.py            # ~6 min on 2 CPU cores
    nice -n 10 .venv/bin/python benchmarks/train_speed.py --repeats 1

Writes benchmarks/train_speed.md (the table below is regenerated) and benchmarks/train_speed_loss.png.

What is compared, on the CPU with the quickstart's tiny Llama shape (random weights, 4-bit NF4 base, LoRA on
every linear layer plus the trained embedding copy, fp32 compute):

(a) overhead: the same job through `python -m pipeline train` (contract validation, plan, MLflow logging every
    `logging_steps`, sealed checkpoints) and through `plain`, below: transformers + peft + TRL only, reading the
    same rendered prompt/completion pairs, with the same BitsAndBytesConfig, LoraConfig and SFTConfig values.
    tokens/s counts the real (non-padding) tokens of one epoch over the trainer's own `train_runtime`, so
    loading, validation and evaluation are outside both timings. The loss curves must coincide.
(b) packing: the pipeline with `training.packing` on and off: tokens/s and the fraction of padding among the
    token positions the model computes (counted by walking the trainer's own dataloader for one epoch).

Each configuration runs `--repeats` times, interleaved (a, plain, packed, a, plain, packed, ...), so slow
phases of a shared machine hit all of them alike; the median is reported.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

SETTINGS = {
    "micro_batch_size": 8,
    "gradient_accumulation_steps": 1,
    "num_epochs": 1,
    "max_length": 256,
    "learning_rate": 5.0e-3,
    "logging_steps": 5,
    "save_steps": 20,
}
NUM_TRAIN = 320


def build_assets(root: Path) -> Path:
    """Tiny model, data and the recipe (YAML) for every run; returns the recipe path."""
    import yaml

    from pipeline.demo import TinyModelSpec, build_demo_dataset, build_tiny_base

    data = build_demo_dataset(root / "data", num_train=NUM_TRAIN, num_eval=8, seed=3)
    model = build_tiny_base(root / "model", spec=TinyModelSpec(pretrain_steps=0))
    recipe = {
        "extends": str(ROOT / "recipes" / "quickstart.yaml"),
        "name": "speed",
        "model": {"path": str(model)},
        "data": {
            "contract": str(ROOT / "data_contracts" / "medical_coding.yaml"),
            "train": str(data / "train.jsonl"),
            "eval": str(data / "eval.jsonl"),
        },
        "training": dict(SETTINGS),
        "eval": {"batch_size": 4, "max_new_tokens": 4, "max_examples": 4, "systems": ["finetuned"]},
        "tracking": {"uri": f"sqlite:///{root / 'mlruns.db'}", "experiment": "speed"},
    }
    path = root / "speed.yaml"
    path.write_text(yaml.safe_dump(recipe, sort_keys=False), encoding="utf-8")
    return path


def export_examples(recipe_path: Path, out: Path) -> None:
    """The rendered prompt/completion pairs the pipeline trains on, as JSON Lines for the plain script."""
    from pipeline.data import prompt_format, sft_example, validate_data
    from pipeline.model import load_tokenizer, tokenizer_or_reason
    from pipeline.recipe import load_recipe
    from pipeline.tasks import get_task

    recipe = load_recipe(recipe_path)
    data = validate_data(recipe, out.parent / "validation-export", tokenizer_or_reason)
    fmt = prompt_format(recipe, load_tokenizer(Path(recipe.model.path)))
    task = get_task(recipe.task)
    with out.open("w", encoding="utf-8") as handle:
        for row in data.train.rows:
            handle.write(json.dumps(sft_example(row, task, fmt)) + "\n")


def run_pipeline(recipe_path: Path, run_dir: Path, packing: bool) -> dict:
    """`python -m pipeline train` in a fresh process; returns its loss curve and train_runtime."""
    command = [sys.executable, "-m", "pipeline", "train", str(recipe_path), "--run-dir", str(run_dir)]
    command += ["--set", f"training.packing={str(packing).lower()}"]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, env=env)
    if done.returncode != 0:
        raise SystemExit(f"pipeline train failed:\n{done.stderr[-3000:]}")
    return _curve(json.loads((run_dir / "train_log.json").read_text()))


def run_plain(examples: Path, model_dir: Path, out_dir: Path, mode: str = "train", packing: bool = False) -> dict:
    """This file's `plain` command in a fresh process."""
    command = [sys.executable, __file__, "plain", "--examples", str(examples), "--model", str(model_dir)]
    command += ["--out", str(out_dir), "--mode", mode] + (["--packing"] if packing else [])
    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"plain TRL run failed:\n{done.stderr[-3000:]}")
    result = json.loads(done.stdout.strip().splitlines()[-1])
    if "loss" in result:
        result["loss"] = {int(step): value for step, value in result["loss"].items()}  # JSON keys are strings
    return result


def _curve(log_history: list[dict]) -> dict:
    final = next(e for e in reversed(log_history) if "train_runtime" in e)
    return {
        "loss": {e["step"]: e["loss"] for e in log_history if "loss" in e},
        "train_runtime": final["train_runtime"],
        "steps": final["step"],
    }


# --------------------------------------------------------------------------------------------------
# The plain TRL script: transformers + peft + TRL, the settings written out by hand.


def plain(examples: Path, model_dir: Path, out_dir: Path, mode: str, packing: bool) -> dict:
    """Train with TRL directly (mode 'train'), or walk one epoch of its dataloader counting padding ('count')."""
    import torch
    from datasets import load_dataset
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training
    from transformers import AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig, set_seed
    from trl import SFTConfig, SFTTrainer

    seed = 42
    set_seed(seed)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    tokenizer.pad_token = tokenizer.pad_token or tokenizer.eos_token
    model = AutoModelForCausalLM.from_pretrained(
        model_dir,
        quantization_config=BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=torch.float32,
        ),
        dtype=torch.float32,
        device_map={"": "cpu"},
        attn_implementation="sdpa",
    )
    model.config.use_cache = False
    model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
    model = get_peft_model(
        model,
        LoraConfig(
            r=16,
            lora_alpha=32,
            lora_dropout=0.0,
            target_modules="all-linear",
            modules_to_save=["embed_tokens"],
            bias="none",
            task_type="CAUSAL_LM",
        ),
    )
    args = SFTConfig(
        output_dir=str(out_dir),
        per_device_train_batch_size=SETTINGS["micro_batch_size"],
        gradient_accumulation_steps=SETTINGS["gradient_accumulation_steps"],
        learning_rate=SETTINGS["learning_rate"],
        num_train_epochs=SETTINGS["num_epochs"],
        lr_scheduler_type="cosine",
        warmup_steps=0.02,
        weight_decay=0.0,
        max_grad_norm=1.0,
        optim="adamw_torch",
        activation_checkpointing=False,
        use_cpu=True,
        bf16=False,
        fp16=False,
        seed=seed,
        data_seed=seed,
        logging_steps=SETTINGS["logging_steps"],
        save_strategy="steps",
        save_steps=SETTINGS["save_steps"],
        save_total_limit=2,
        report_to="none",
        disable_tqdm=True,
        max_length=SETTINGS["max_length"],
        completion_only_loss=True,
        packing=packing,
    )
    dataset = load_dataset("json", data_files=str(examples), split="train")
    trainer = SFTTrainer(model=model, args=args, train_dataset=dataset, processing_class=tokenizer)
    # TRL stores a 4-bit model's adapters in bf16; with fp32 compute on a CPU they are put back in fp32
    # (the pipeline does the same, see model.restore_adapter_dtype).
    for param in trainer.model.parameters():
        if param.requires_grad:
            param.data = param.data.float()
    if mode == "count":
        positions = real = 0
        for batch in trainer.get_train_dataloader():
            positions += batch["input_ids"].numel()
            mask = batch.get("attention_mask")
            real += int(mask.sum()) if mask is not None else batch["input_ids"].numel()  # padding-free: all real
        return {"positions": positions, "real_tokens": real, "rows": len(trainer.train_dataset)}
    trainer.train()
    return _curve(trainer.state.log_history)


# --------------------------------------------------------------------------------------------------


def main() -> None:
    """Build the assets once, run every configuration, write the results."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command")
    p = sub.add_parser("plain")
    p.add_argument("--examples", type=Path, required=True)
    p.add_argument("--model", type=Path, required=True)
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--mode", choices=["train", "count"], default="train")
    p.add_argument("--packing", action="store_true")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--results", type=Path, default=ROOT / "benchmarks" / "train_speed.md")
    args = parser.parse_args()
    if args.command == "plain":
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        print(json.dumps(plain(args.examples, args.model, args.out, args.mode, args.packing)))
        return

    from pipeline.egress import offline_environment

    offline_environment()
    started = time.time()
    load_before = os.getloadavg()
    root = Path(tempfile.mkdtemp(prefix="train-speed-"))
    recipe = build_assets(root)
    examples = root / "examples.jsonl"
    export_examples(recipe, examples)
    model_dir = root / "model"

    counts = {
        packing: run_plain(examples, model_dir, root / f"count-{packing}", mode="count", packing=packing)
        for packing in (False, True)
    }
    runs: dict[str, list[dict]] = {"pipeline": [], "plain": [], "pipeline_packed": []}
    for i in range(args.repeats):
        runs["pipeline"].append(run_pipeline(recipe, root / f"pipeline-{i}", packing=False))
        runs["plain"].append(run_plain(examples, model_dir, root / f"plain-{i}"))
        runs["pipeline_packed"].append(run_pipeline(recipe, root / f"packed-{i}", packing=True))
        print(f"repeat {i + 1}/{args.repeats} done ({time.time() - started:.0f}s)", flush=True)
    load_after = os.getloadavg()

    real_tokens = counts[False]["real_tokens"]
    assert counts[True]["real_tokens"] == real_tokens, "packing must train on the same tokens"
    summary = {}
    for name, items in runs.items():
        runtime = statistics.median(r["train_runtime"] for r in items)
        summary[name] = {
            "runtime": runtime,
            "runtimes": [round(r["train_runtime"], 2) for r in items],
            "tokens_per_s": real_tokens / runtime,
            "steps": items[0]["steps"],
        }
    ratio = summary["pipeline"]["tokens_per_s"] / summary["plain"]["tokens_per_s"]
    loss_a, loss_b = runs["pipeline"][0]["loss"], runs["plain"][0]["loss"]
    common = sorted(set(loss_a) & set(loss_b))
    max_loss_diff = max(abs(loss_a[s] - loss_b[s]) for s in common)
    write_results(args.results, summary, counts, ratio, loss_a, loss_b, max_loss_diff, load_before, load_after)
    save_plot(args.results.with_name("train_speed_loss.png"), loss_a, loss_b, runs["pipeline_packed"][0]["loss"])
    print(args.results.read_text())


def write_results(path, summary, counts, ratio, loss_a, loss_b, max_loss_diff, load_before, load_after) -> None:  # noqa: ANN001
    """The Markdown results file, with the command that reproduces it."""
    import platform

    import torch
    import transformers
    import trl

    pad = {k: 1 - c["real_tokens"] / c["positions"] for k, c in counts.items()}
    lines = [
        "# Training speed: pipeline vs plain TRL, packing on vs off",
        "",
        "Reproduce: `nice -n 10 .venv/bin/python benchmarks/train_speed.py` (what it runs: the script's docstring).",
        "",
        f"Measured {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())} on {platform.platform()}, "
        f"{os.cpu_count()} CPU cores, torch {torch.__version__}, transformers {transformers.__version__}, "
        f"trl {trl.__version__}. The machine was shared with other jobs: load average "
        f"{load_before[0]:.1f} before and {load_after[0]:.1f} after on {os.cpu_count()} cores, so absolute "
        "times are inflated and noisy; each configuration ran interleaved with the others and the median "
        "train_runtime is used.",
        "",
        f"Job: {NUM_TRAIN} synthetic notes, 1 epoch, micro-batch {SETTINGS['micro_batch_size']}, max_length "
        f"{SETTINGS['max_length']}, tiny Llama (hidden 128, 2 layers, vocab 1,024) in 4-bit NF4 on the CPU, "
        f"LoRA r=16 on all linear layers + embeddings, {counts[False]['real_tokens']:,} real tokens per epoch.",
        "",
        "## (a) pipeline vs plain TRL (same settings, no packing)",
        "",
        "| run | optimizer steps | train_runtime (median, s) | runs (s) | real tokens/s |",
        "|---|---|---|---|---|",
    ]
    for name in ("pipeline", "plain"):
        s = summary[name]
        lines.append(
            f"| {name} | {s['steps']} | {s['runtime']:.2f} | {', '.join(map(str, s['runtimes']))} | "
            f"{s['tokens_per_s']:.0f} |"
        )
    lines += [
        "",
        f"tokens/s ratio pipeline / plain TRL = **{ratio:.3f}** (target >= 0.95).",
        "",
        f"Loss curves (logged every {SETTINGS['logging_steps']} steps), largest difference {max_loss_diff:.2e}:",
        "",
        "| step | pipeline | plain TRL |",
        "|---|---|---|",
    ]
    for step in sorted(set(loss_a) & set(loss_b)):
        lines.append(f"| {step} | {loss_a[step]:.4f} | {loss_b[step]:.4f} |")
    p, u = summary["pipeline_packed"], summary["pipeline"]
    lines += [
        "",
        "![loss curves](train_speed_loss.png)",
        "",
        "## (b) packing on vs off (pipeline)",
        "",
        "| packing | rows per epoch | optimizer steps | token positions computed | padding fraction | "
        "train_runtime (median, s) | real tokens/s |",
        "|---|---|---|---|---|---|---|",
        f"| off | {counts[False]['rows']} | {u['steps']} | {counts[False]['positions']:,} | {pad[False]:.1%} | "
        f"{u['runtime']:.2f} | {u['tokens_per_s']:.0f} |",
        f"| on (bfd) | {counts[True]['rows']} | {p['steps']} | {counts[True]['positions']:,} | {pad[True]:.1%} | "
        f"{p['runtime']:.2f} | {p['tokens_per_s']:.0f} |",
        "",
        f"Packing speed-up: {p['tokens_per_s'] / u['tokens_per_s']:.2f}x real tokens/s. With packing an optimizer "
        "step sees more examples (rows are fuller), so the same epoch takes fewer, larger steps: compare "
        "learning-rate settings accordingly. Examples keep their boundaries (position ids restart per example).",
        "",
    ]
    path.write_text("\n".join(lines), encoding="utf-8")


def save_plot(path: Path, loss_a: dict, loss_b: dict, loss_packed: dict) -> None:
    """Loss by step: pipeline and plain TRL (should overlap), and the packed run."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.plot(list(loss_a), list(loss_a.values()), marker="o", label="pipeline train")
    ax.plot(list(loss_b), list(loss_b.values()), marker="x", linestyle="--", label="plain TRL")
    ax.plot(list(loss_packed), list(loss_packed.values()), marker=".", label="pipeline, packing on")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("training loss")
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


if __name__ == "__main__":
    main()
