"""Evaluation: generate answers for the eval split with each system, parse them, score them, report.

Local systems share one model: ``base`` is the fine-tune with its adapter switched off (exactly the 4-bit
base it was trained on), ``finetuned`` has it on. Generation is greedy, batched with left padding, and stops
at an end-of-sequence token; an answer that reaches ``eval.max_new_tokens`` without one is cut there and
counted (``cut_at_max_new_tokens``), since a fine-tune that never stops is a failure worth seeing.
"""

from __future__ import annotations

import contextlib
import statistics
import time
from pathlib import Path
from typing import Any

from pipeline import rundir
from pipeline.data import prompt_input_ids
from pipeline.recipe import EvalSection
from pipeline.tasks import Task, per_label_f1

# Metrics shown in the terminal table and report, in this order.
TABLE_METRICS = (
    "micro_f1",
    "micro_precision",
    "micro_recall",
    "macro_f1",
    "exact_match",
    "invalid_code_rate",
)


def generate(
    model: Any,
    tokenizer: Any,
    examples: list[dict[str, Any]],
    *,
    max_new_tokens: int,
    batch_size: int,
    eos_ids: set[int],
    label: str = "",
) -> list[dict[str, Any]]:
    """Greedy answers for prompt/completion examples, in the order given.

    Prompts are tokenized exactly as in training, sorted by length (less padding per batch), left-padded,
    and generated in batches.

    Returns:
        Per example: ``text`` (decoded answer), ``stopped`` (an EOS was produced), ``tokens_in``,
        ``tokens_out`` and ``latency_s`` (wall time of its batch).
    """
    import torch

    prompts = [prompt_input_ids(tokenizer, ex) for ex in examples]
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    device = next(model.parameters()).device
    results: list[dict[str, Any] | None] = [None] * len(prompts)
    eos_list = sorted(eos_ids)
    done = 0
    start_all = time.perf_counter()
    for begin in range(0, len(order), batch_size):
        batch_idx = order[begin : begin + batch_size]
        width = max(len(prompts[i]) for i in batch_idx)
        input_ids = torch.full((len(batch_idx), width), pad_id, dtype=torch.long)
        attention = torch.zeros((len(batch_idx), width), dtype=torch.long)
        for row, i in enumerate(batch_idx):
            ids = prompts[i]
            input_ids[row, width - len(ids) :] = torch.tensor(ids)
            attention[row, width - len(ids) :] = 1
        start = time.perf_counter()
        with torch.inference_mode():
            out = model.generate(
                input_ids=input_ids.to(device),
                attention_mask=attention.to(device),
                max_new_tokens=max_new_tokens,
                do_sample=False,
                eos_token_id=eos_list,
                pad_token_id=pad_id,
                use_cache=True,
            )
        latency = time.perf_counter() - start
        for row, i in enumerate(batch_idx):
            new = out[row, width:].tolist()
            stop_at = next((k for k, t in enumerate(new) if t in eos_ids), None)
            kept = new if stop_at is None else new[:stop_at]
            results[i] = {
                "text": tokenizer.decode(kept, skip_special_tokens=True),
                "stopped": stop_at is not None,
                "tokens_in": len(prompts[i]),
                "tokens_out": len(kept) + (stop_at is not None),
                "latency_s": latency,
            }
        done += len(batch_idx)
        elapsed = time.perf_counter() - start_all
        print(f"  {label} generated {done}/{len(prompts)} ({done / elapsed:.1f} examples/s)", flush=True)
    return [r for r in results if r is not None]


def score_system(task: Task, rows: list[dict[str, Any]], outputs: list[dict[str, Any]]) -> dict[str, Any]:
    """Task metrics plus the operational numbers of one system."""
    golds = [task.gold(row) for row in rows]
    preds = [task.parse(o["text"]) for o in outputs]
    metrics: dict[str, Any] = dict(task.score(golds, preds))
    latencies = sorted(o["latency_s"] for o in outputs)
    metrics.update(
        {
            "cut_at_max_new_tokens": float(sum(not o["stopped"] for o in outputs)),
            "tokens_in": float(sum(o["tokens_in"] for o in outputs)),
            "tokens_out": float(sum(o["tokens_out"] for o in outputs)),
            "latency_p50_s": _percentile(latencies, 50),
            "latency_p95_s": _percentile(latencies, 95),
        }
    )
    return metrics


def evaluate_local(
    model: Any,
    tokenizer: Any,
    rows: list[dict[str, Any]],
    examples: list[dict[str, Any]],
    task: Task,
    settings: EvalSection,
    eos_ids: set[int],
    out_dir: str | Path,
) -> dict[str, dict[str, Any]]:
    """Score the base (adapter off) and the fine-tune (adapter on) on the eval rows and write ``eval/``.

    Args:
        model: The PEFT model after training.
        tokenizer: Its tokenizer.
        rows: Accepted eval rows (gold answers).
        examples: The same rows rendered as prompt/completion examples (see ``data.sft_example``).
        task: The recipe's task.
        settings: The recipe's eval section.
        eos_ids: Token ids that end an answer.
        out_dir: The run directory.

    Returns:
        Metrics per system.
    """
    if settings.max_examples is not None:
        rows, examples = rows[: settings.max_examples], examples[: settings.max_examples]
    model.eval()
    outputs: dict[str, list[dict[str, Any]]] = {}
    for system in settings.systems:
        # The base is the same 4-bit weights with the adapter switched off: no second copy in memory.
        switch = model.disable_adapter() if system == "base" else contextlib.nullcontext()
        print(f"Evaluating {system} on {len(rows)} eval rows")
        with switch:
            outputs[system] = generate(
                model,
                tokenizer,
                examples,
                max_new_tokens=settings.max_new_tokens,
                batch_size=settings.batch_size,
                eos_ids=eos_ids,
                label=system,
            )
    metrics = {system: score_system(task, rows, outs) for system, outs in outputs.items()}
    write_outputs(Path(out_dir) / "eval", task, rows, outputs, metrics)
    return metrics


def write_outputs(
    eval_dir: Path,
    task: Task,
    rows: list[dict[str, Any]],
    outputs: dict[str, list[dict[str, Any]]],
    metrics: dict[str, dict[str, Any]],
) -> None:
    """predictions.jsonl, metrics.json (with per-label scores), report.md and a per-label F1 plot."""
    predictions = []
    for system, outs in outputs.items():
        for row, out in zip(rows, outs, strict=True):
            predictions.append(
                {
                    "system": system,
                    "id": row.get("id"),
                    "row": row["_row"],
                    "gold": task.gold(row),
                    "predicted": task.parse(out["text"]),
                    "answer": out["text"],
                    "stopped": out["stopped"],
                }
            )
    rundir.write_jsonl(eval_dir / "predictions.jsonl", predictions)
    golds = [task.gold(row) for row in rows]
    per_label = {s: per_label_f1(golds, [task.parse(o["text"]) for o in outs]) for s, outs in outputs.items()}
    rundir.write_json(
        eval_dir / "metrics.json",
        {"main_metric": task.main_metric, "systems": metrics, "per_label": per_label},
    )
    rundir.write_text(eval_dir / "report.md", render_report(task, metrics, per_label))
    save_per_label_plot(eval_dir / "per_label_f1.png", per_label)


def render_table(metrics: dict[str, dict[str, Any]]) -> str:
    """Systems x metrics as a Markdown table (also printed in the terminal)."""
    columns = [m for m in TABLE_METRICS if all(m in v for v in metrics.values())]
    columns += ["cut_at_max_new_tokens", "latency_p50_s"]
    header = "| system | " + " | ".join(columns) + " |"
    rule = "|---" * (len(columns) + 1) + "|"
    lines = [header, rule]
    for system, values in metrics.items():
        cells = [f"{values[c]:.3f}" if c != "cut_at_max_new_tokens" else f"{values[c]:.0f}" for c in columns]
        lines.append(f"| {system} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def render_report(task: Task, metrics: dict[str, dict[str, Any]], per_label: dict[str, dict[str, Any]]) -> str:
    """eval/report.md: the comparison table, the main-metric difference, and the weakest labels."""
    lines = [f"# Evaluation: {task.name}", "", render_table(metrics), ""]
    if "base" in metrics and "finetuned" in metrics:
        diff = metrics["finetuned"][task.main_metric] - metrics["base"][task.main_metric]
        lines += [f"Fine-tune minus base on {task.main_metric}: {diff:+.3f}", ""]
    if "finetuned" in per_label:
        worst = sorted(per_label["finetuned"].items(), key=lambda kv: (kv[1]["f1"], -kv[1]["support"]))[:10]
        lines += [
            "## Weakest labels (fine-tune)",
            "",
            "| label | F1 | precision | recall | support |",
            "|---|---|---|---|---|",
        ]
        lines += [
            f"| {label} | {s['f1']:.3f} | {s['precision']:.3f} | {s['recall']:.3f} | {s['support']:.0f} |"
            for label, s in worst
        ]
        lines.append("")
    return "\n".join(lines)


def save_per_label_plot(path: Path, per_label: dict[str, dict[str, dict[str, float]]]) -> None:
    """Horizontal bars of per-label F1 for each system (labels with gold support only)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = sorted({label for scores in per_label.values() for label, s in scores.items() if s["support"] > 0})
    if not labels:
        return
    fig, ax = plt.subplots(figsize=(7, max(3, 0.22 * len(labels))))
    height = 0.8 / max(1, len(per_label))
    for k, (system, scores) in enumerate(per_label.items()):
        ax.barh(
            [i + k * height for i in range(len(labels))],
            [scores.get(lb, {}).get("f1", 0.0) for lb in labels],
            height=height,
            label=system,
        )
    ax.set_yticks([i + height * (len(per_label) - 1) / 2 for i in range(len(labels))], labels, fontsize=7)
    ax.set_xlabel("F1")
    ax.set_xlim(0, 1)
    ax.invert_yaxis()
    ax.legend(loc="lower right")
    ax.set_title("Per-label F1 on the eval split")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _percentile(sorted_values: list[float], q: float) -> float:
    if not sorted_values:
        return 0.0
    if len(sorted_values) == 1:
        return sorted_values[0]
    return statistics.quantiles(sorted_values, n=100, method="inclusive")[int(q) - 1]
