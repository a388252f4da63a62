"""Token lengths of a recipe's rows with its own tokenizer, and the limits that fit them.

``init`` writes a recipe whose parent's ``training.max_length`` and ``eval.max_new_tokens`` may not fit the new
data; ``fit_lengths`` says what does.

Each row is counted as ``validate``'s token check counts it (``data.token_counter``: the task's prompt and answer in
the recipe's prompt format, or a whole conversation through the chat template), so a limit chosen here is one
that check passes. Only rows that pass the contract are counted. Needs the base's tokenizer on this machine;
without it, nothing is measured and the reason is returned.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

from pipeline.contracts import conversation_row, load_contract, row_passes
from pipeline.recipe import Recipe, RecipeError
from pipeline.records import DataFileError, iter_records

MARGIN = 1.1  # max_length = MARGIN x the longest example, rounded up to a multiple of 64
ANSWER_MARGIN = 1.25  # max_new_tokens = ANSWER_MARGIN x the longest answer, rounded up to a multiple of 8
MAX_ROWS = 100_000  # rows counted (train first, then eval)
BATCH = 1024


@dataclass(frozen=True)
class Fit:
    """What the rows need, and the values that fit them (None: the recipe's own value fits)."""

    rows: int
    longest: int  # tokens of the longest example, prompt + answer
    longest_answer: int
    tokenizer: str
    context: int | None  # the base's max_position_embeddings
    max_length: int | None
    max_new_tokens: int | None
    too_long: int  # rows longer than the max_length chosen (above the base's context)


def fit_lengths(recipe: Recipe, root: Path) -> tuple[Fit | None, str, bool]:
    """Count every row's tokens and choose the limits: (fit, "", True), or (None, why not, whether the base is here).

    Args:
        recipe: The recipe as loaded (its paths relative to ``root``).
        root: The directory its relative paths are relative to.
    """
    from pipeline.data import prompt_format, task_for, token_counter
    from pipeline.model import ModelNotFound, RevisionMismatch, load_tokenizer, resolve_model_path

    local = root / recipe.model.path
    try:
        model_dir = resolve_model_path(str(local) if local.is_dir() else recipe.model.path, recipe.model.revision)
    except (ModelNotFound, RevisionMismatch) as exc:
        return None, str(exc), False
    try:
        tokenizer = load_tokenizer(model_dir)
        contract = load_contract(root / recipe.data.contract)
        measure = token_counter(tokenizer, task_for(recipe, contract), prompt_format(recipe, tokenizer))
    except RecipeError as exc:  # validate, next, reports it with the rest
        return None, exc.lines()[0], True
    counted: list[tuple[int, int]] = []
    passes, types = row_passes(contract), {name: rule.type for name, rule in contract.fields.items()}
    batch = []
    for split in (recipe.data.train, recipe.data.eval):
        try:
            for record in iter_records(root / split, contract.format, contract.max_row_bytes, types):
                if len(counted) + len(batch) >= MAX_ROWS:
                    break
                row = conversation_row(record.value, contract)[0]
                if not record.reasons and passes(row):
                    batch.append(row)
                if len(batch) == BATCH:
                    counted += [n for n in measure(batch) if isinstance(n, tuple)]
                    batch = []
        except DataFileError as exc:
            return None, str(exc), True
    counted += [n for n in measure(batch) if isinstance(n, tuple)]
    if not counted:
        return None, "no row passes the contract", True
    longest = max(total for _, total in counted)
    answer = max(total - prompt for prompt, total in counted)
    context = _context(model_dir)
    max_length = new_tokens = None
    if longest > recipe.training.max_length:
        max_length = 64 * math.ceil(MARGIN * longest / 64)
        max_length = min(max_length, context) if context else max_length
    if ANSWER_MARGIN * answer > recipe.eval.max_new_tokens:
        new_tokens = 8 * math.ceil(ANSWER_MARGIN * answer / 8)
    limit = max_length or recipe.training.max_length
    too_long = sum(total > limit for _, total in counted)
    return Fit(len(counted), longest, answer, recipe.model.path, context, max_length, new_tokens, too_long), "", True


def _context(model_dir: Path) -> int | None:
    try:
        value = json.loads((model_dir / "config.json").read_text(encoding="utf-8")).get("max_position_embeddings")
    except (OSError, ValueError, AttributeError):
        return None
    return value if isinstance(value, int) and value > 0 else None
