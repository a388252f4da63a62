"""Batched local generation versus one example at a time, on the tiny model in 4-bit NF4 on the CPU.

Run as:  PYTHONPATH=. .venv/bin/python benchmarks/eval_generation.py [--examples 48] [--batch-size 16]

Builds the demo's tiny Llama shape (vocab 1,024, hidden 128, 2 layers, 4 heads; random weights, no
pre-training, so every answer runs to max_new_tokens and both modes generate the same number of tokens),
loads it through the pipeline's own 4-bit path (``model.load_base`` with the quickstart recipe), and times
``generation.generate`` on the same demo notes at batch size 1 and at ``--batch-size``. Prints a Markdown row
per mode; results are recorded in benchmarks/eval_generation.md.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    """Time both modes and print the Markdown table."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--examples", type=int, default=48)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--max-new-tokens", type=int, default=24)
    args = parser.parse_args()

    import torch

    from pipeline.data import sft_example
    from pipeline.demo import TinyModelSpec, build_demo_dataset, build_tiny_base
    from pipeline.egress import offline_environment
    from pipeline.generation import generate
    from pipeline.model import eos_token_ids, load_base, load_tokenizer
    from pipeline.recipe import load_recipe
    from pipeline.tasks import get_task

    offline_environment()
    torch.manual_seed(0)
    work = Path(tempfile.mkdtemp(prefix="bench-eval-"))
    data = build_demo_dataset(work / "data", num_train=10, num_eval=args.examples, seed=0)
    model_dir = build_tiny_base(work / "model", spec=TinyModelSpec(pretrain_steps=0))
    recipe = load_recipe(ROOT / "recipes" / "quickstart.yaml", [f"model.path={model_dir}"])
    tokenizer = load_tokenizer(model_dir)
    model = load_base(recipe, model_dir, "cpu")
    task = get_task("medical_coding")
    rows = [json.loads(line) for line in (data / "eval.jsonl").read_text().splitlines()][: args.examples]
    examples = [sft_example({**row, "_row": i}, task, "plain") for i, row in enumerate(rows)]
    eos = eos_token_ids(tokenizer, model)

    def timed(batch_size: int) -> tuple[float, list[str]]:
        generate(model, tokenizer, examples[:4], max_new_tokens=4, batch_size=batch_size, eos_ids=eos)  # warm-up
        start = time.perf_counter()
        outs = generate(
            model, tokenizer, examples, max_new_tokens=args.max_new_tokens, batch_size=batch_size, eos_ids=eos
        )
        return time.perf_counter() - start, [o["text"] for o in outs]

    one_s, one_texts = timed(1)
    batch_s, batch_texts = timed(args.batch_size)
    same = sum(a == b for a, b in zip(one_texts, batch_texts, strict=True))
    print()
    print(
        f"CPU: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}, "
        f"threads {torch.get_num_threads()}"
    )
    print(f"{len(examples)} examples, max_new_tokens {args.max_new_tokens}, 4-bit NF4 tiny Llama")
    print("| mode | seconds | examples/s | speed-up |")
    print("|---|---|---|---|")
    print(f"| one at a time (batch 1) | {one_s:.2f} | {len(examples) / one_s:.2f} | 1.0x |")
    print(
        f"| batched (batch {args.batch_size}) | {batch_s:.2f} | {len(examples) / batch_s:.2f} | "
        f"{one_s / batch_s:.1f}x |"
    )
    print(f"identical answers in both modes: {same}/{len(examples)}")


if __name__ == "__main__":
    main()
