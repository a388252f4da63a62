"""Data: validate the splits against the contract, render rows as prompts, and check what TRL will train on.

``validate_data`` is light (no torch): ``python -m pipeline validate`` uses it. The functions that touch a
tokenizer or a ``datasets.Dataset`` import those libraries inside.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from pipeline import rundir
from pipeline.contracts import (
    ContractFailed,
    DataContract,
    SplitResult,
    build_report,
    load_contract,
    over_threshold,
    validate_split,
)
from pipeline.recipe import Recipe, RecipeError, check_data_files
from pipeline.tasks import Task, get_task


@dataclass
class ValidatedData:
    """The accepted rows of each split, the contract, and the report written for them."""

    contract: DataContract
    train: SplitResult
    eval: SplitResult
    report: dict[str, Any]


def validate_data(recipe: Recipe, out_dir: str | Path, recipe_source: str | Path = "recipe") -> ValidatedData:
    """Check both splits against the recipe's contract and write ``validation/`` in ``out_dir``.

    Writes ``validation/report.json`` (counts per split that reconcile, failed checks, file hashes) and
    ``validation/quarantine.jsonl`` (one line per quarantined row: split, 1-based line, id, reasons).

    Raises:
        RecipeError: A file is missing or the contract is invalid (exit code 2).
        ContractFailed: Too many rows were quarantined (exit code 1). The reports are written first.
    """
    check_data_files(recipe, recipe_source)
    contract = load_contract(recipe.data.contract)
    splits = [validate_split(name, getattr(recipe.data, name), contract) for name in ("train", "eval")]
    report = build_report(recipe.data.contract, contract, splits)
    out = Path(out_dir) / "validation"
    rundir.write_json(out / "report.json", report)
    rundir.write_jsonl(out / "quarantine.jsonl", [q for s in splits for q in s.quarantined])
    print(render_report(report))
    problems = over_threshold(contract, splits)
    if problems:
        raise ContractFailed("\n".join(problems))
    return ValidatedData(contract=contract, train=splits[0], eval=splits[1], report=report)


def render_report(report: dict[str, Any]) -> str:
    """A short terminal table of the validation report."""
    contract = report["contract"]
    lines = [f"Data contract {contract['name']} v{contract['version']} ({contract['path']})"]
    lines.append(f"  {'split':<6} {'rows in':>9} {'accepted':>9} {'quarantined':>12}  failed checks")
    for name, split in report["splits"].items():
        failed = ", ".join(f"{k}={v}" for k, v in split["failed_checks"].items()) or "-"
        lines.append(
            f"  {name:<6} {split['rows_in']:>9,} {split['rows_accepted']:>9,} "
            f"{split['rows_quarantined']:>12,}  {failed}"
        )
    return "\n".join(lines)


def task_for(recipe: Recipe, contract: DataContract) -> Task:
    """The recipe's task; a classifier takes its label set from the contract's ``label`` enum.

    Raises:
        RecipeError: A classification contract that does not list its labels.
    """
    if recipe.task == "classification":
        rule = contract.fields.get("label")
        if rule is None or not rule.enum:
            raise RecipeError(
                [
                    f"{recipe.data.contract}: fields.label.enum: the classification task needs the label set; "
                    "list the labels under the contract's label field (enum: [a, b, c])"
                ]
            )
        return get_task("classification", [str(label) for label in rule.enum])
    return get_task(recipe.task)


# --------------------------------------------------------------------------------------------------
# Prompts


def prompt_format(recipe: Recipe, tokenizer: Any) -> Literal["chat", "plain"]:
    """Chat template when asked for or (``auto``) when the tokenizer has one; else the task's plain template."""
    has_template = bool(getattr(tokenizer, "chat_template", None))
    wanted = recipe.data.prompt_format
    if wanted == "chat" and not has_template:
        raise RecipeError(
            [
                f"data.prompt_format: 'chat' needs a chat template, and the tokenizer of {recipe.model.path} has "
                "none; use prompt_format: plain (the task's own template) or auto"
            ]
        )
    if wanted == "auto":
        return "chat" if has_template else "plain"
    return wanted


def sft_example(row: dict[str, Any], task: Task, fmt: Literal["chat", "plain"]) -> dict[str, Any]:
    """One row as TRL's prompt/completion example.

    Chat: conversational messages; TRL renders them with the chat template, whose end-of-turn token closes
    the completion. Plain: strings; TRL appends the EOS token to the completion. A space starts the plain
    completion so that "Codes:" and the first code tokenize the same way in training and at inference.
    """
    if fmt == "chat":
        return {
            "prompt": task.chat_messages(row),
            "completion": [{"role": "assistant", "content": task.target(row)}],
            "row": row["_row"],
        }
    return {"prompt": task.plain_prompt(row), "completion": " " + task.target(row), "row": row["_row"]}


def prompt_input_ids(tokenizer: Any, example: dict[str, Any]) -> list[int]:
    """Token ids of an example's prompt exactly as TRL tokenizes it for training.

    Mirrors ``trl.data_utils._tokenize``: conversational prompts go through ``apply_chat_template`` with the
    generation prompt, plain prompts through the tokenizer's ``__call__`` (which adds BOS if the tokenizer does).
    """
    prompt = example["prompt"]
    if isinstance(prompt, list):
        out = tokenizer.apply_chat_template(prompt, tokenize=True, add_generation_prompt=True, return_dict=True)
        return list(out["input_ids"])
    return list(tokenizer(text=prompt)["input_ids"])


def to_dataset(examples: list[dict[str, Any]]) -> Any:
    """A ``datasets.Dataset`` of prompt/completion examples."""
    from datasets import Dataset

    return Dataset.from_list(examples)


class LossMaskError(Exception):
    """Some examples would train on nothing, or would never learn to stop (exit code 1)."""


def check_loss_masks(prepared: Any, expected_rows: list[int], eos_ids: set[int], max_length: int) -> dict[str, int]:
    """Check the dataset TRL prepared, before the first step.

    Two failures of peer tools are silent: an example whose completion is truncated away trains on nothing
    (TRL even drops such rows), and a completion cut before its EOS teaches the model never to stop. Every
    accepted row must still be present, keep at least one completion token in the loss, and have an EOS
    token among its completion tokens.

    Args:
        prepared: ``trainer.train_dataset`` after TRL's preparation (``input_ids``, ``labels``, ``row``).
        expected_rows: Line numbers of the accepted training rows.
        eos_ids: Token ids that end a completion (tokenizer EOS and the generation config's EOS ids).
        max_length: ``training.max_length``, for the error message.

    Returns:
        Counts for the run summary: examples, completion tokens, and the longest example.

    Raises:
        LossMaskError: Naming the rows (line numbers in the train file) and how to fix it.
    """
    seen: set[int] = set()
    no_loss: list[int] = []
    no_eos: list[int] = []
    completion_tokens = longest = 0
    for example in prepared:
        row = int(example["row"])
        seen.add(row)
        labels = example["labels"]
        targets = [t for t in labels if t != -100]
        longest = max(longest, len(example["input_ids"]))
        completion_tokens += len(targets)
        if not targets:
            no_loss.append(row)
        elif not eos_ids.intersection(targets):
            no_eos.append(row)
    dropped = sorted(set(expected_rows) - seen)
    problems = []
    if dropped:
        problems.append(f"{len(dropped)} rows lost every completion token to truncation (lines {_few(dropped)})")
    if no_loss:
        problems.append(f"{len(no_loss)} rows have no completion token in the loss (lines {_few(sorted(no_loss))})")
    if no_eos:
        problems.append(
            f"{len(no_eos)} rows have a completion cut before its end-of-sequence token, so the model would "
            f"not learn to stop (lines {_few(sorted(no_eos))})"
        )
    if problems:
        raise LossMaskError(
            "training data check failed before the first step:\n  "
            + "\n  ".join(problems)
            + f"\nRaise training.max_length (now {max_length}) or shorten these rows in the train split."
        )
    return {"examples": len(seen), "completion_tokens": completion_tokens, "longest_example_tokens": longest}


def _few(rows: list[int], limit: int = 10) -> str:
    shown = ", ".join(str(r) for r in rows[:limit])
    return shown + (f", ... {len(rows) - limit} more" if len(rows) > limit else "")
