"""Tasks: how a row becomes a prompt and a target, how an answer is parsed, and how answers are scored.

The same rendering serves training and evaluation, so the fine-tune is scored on exactly the prompts it
learned from. A prompt exists in two forms: chat messages (rendered through the tokenizer's chat template,
as an Instruct base expects) and plain text (the task's own template, for a base with no chat template).

Leaf module: no torch, no package imports besides the ICD-10-CM table.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from pipeline import icd10cm


@dataclass(frozen=True)
class Task:
    """One task's prompt, target, parser and metrics."""

    name: str
    system_prompt: str
    user_prompt: Callable[[dict[str, Any]], str]
    plain_prompt: Callable[[dict[str, Any]], str]
    target: Callable[[dict[str, Any]], str]
    parse: Callable[[str], Any]
    gold: Callable[[dict[str, Any]], Any]
    score: Callable[[Sequence[Any], Sequence[Any]], dict[str, float]]
    main_metric: str

    def chat_messages(self, row: dict[str, Any]) -> list[dict[str, str]]:
        """The prompt as chat messages (system + user), without the answer."""
        return [
            {"role": "system", "content": self.system_prompt},
            {"role": "user", "content": self.user_prompt(row)},
        ]


# --------------------------------------------------------------------------------------------------
# Medical coding: a note in, its ICD-10-CM codes out (multi-label).

CODE_PATTERN = re.compile(r"\b[A-Z][0-9][0-9A-Z](?:\.[0-9A-Z]{1,4})?\b")


def parse_codes(text: str) -> list[str]:
    """Codes in an answer, in order, each once (``"E11.9, I10, E11.9"`` -> ``["E11.9", "I10"]``)."""
    return list(dict.fromkeys(CODE_PATTERN.findall(text)))


def score_codes(golds: Sequence[Sequence[str]], preds: Sequence[Sequence[str]]) -> dict[str, float]:
    """Multi-label scores over code sets.

    * micro P/R/F1 count every (note, code) pair: TP = codes in both, FP = predicted only, FN = gold only.
    * macro P/R/F1 average the per-code scores over every code that is gold or predicted somewhere
      (a code never right scores 0, as in scikit-learn with zero_division=0).
    * exact_match: notes whose predicted set equals the gold set.
    * invalid_code_rate: predicted codes that are not ICD-10-CM codes at all, over all predicted codes.

    Args:
        golds: Gold codes per example.
        preds: Predicted codes per example (same order).

    Returns:
        Metric name -> value in [0, 1], plus counts ``num_examples`` and ``num_predicted_codes``.
    """
    if len(golds) != len(preds):
        raise ValueError(f"{len(golds)} gold rows but {len(preds)} predictions")
    tp_by: dict[str, int] = {}
    fp_by: dict[str, int] = {}
    fn_by: dict[str, int] = {}
    exact = 0
    predicted = invalid = 0
    for gold_codes, pred_codes in zip(golds, preds, strict=True):
        gold, pred = set(gold_codes), set(pred_codes)
        exact += gold == pred
        for code in gold & pred:
            tp_by[code] = tp_by.get(code, 0) + 1
        for code in pred - gold:
            fp_by[code] = fp_by.get(code, 0) + 1
        for code in gold - pred:
            fn_by[code] = fn_by.get(code, 0) + 1
        predicted += len(pred)
        invalid += sum(icd10cm.status(code) == "invalid" for code in pred)
    tp, fp, fn = sum(tp_by.values()), sum(fp_by.values()), sum(fn_by.values())
    micro_p, micro_r, micro_f1 = _prf(tp, fp, fn)
    labels = set(tp_by) | set(fp_by) | set(fn_by)
    per_label = [_prf(tp_by.get(c, 0), fp_by.get(c, 0), fn_by.get(c, 0)) for c in labels]
    n_labels = len(per_label) or 1
    n = len(golds)
    return {
        "micro_precision": micro_p,
        "micro_recall": micro_r,
        "micro_f1": micro_f1,
        "macro_precision": sum(p for p, _, _ in per_label) / n_labels,
        "macro_recall": sum(r for _, r, _ in per_label) / n_labels,
        "macro_f1": sum(f for _, _, f in per_label) / n_labels,
        "exact_match": exact / n if n else 0.0,
        "invalid_code_rate": invalid / predicted if predicted else 0.0,
        "num_examples": float(n),
        "num_predicted_codes": float(predicted),
    }


def per_label_f1(golds: Sequence[Sequence[str]], preds: Sequence[Sequence[str]]) -> dict[str, dict[str, float]]:
    """Per-code precision, recall, F1 and support (gold count), for the per-label report."""
    stats: dict[str, list[int]] = {}
    for gold_codes, pred_codes in zip(golds, preds, strict=True):
        gold, pred = set(gold_codes), set(pred_codes)
        for code in gold | pred:
            tp_fp_fn = stats.setdefault(code, [0, 0, 0])
            tp_fp_fn[0] += code in gold and code in pred
            tp_fp_fn[1] += code in pred and code not in gold
            tp_fp_fn[2] += code in gold and code not in pred
    out = {}
    for code, (tp, fp, fn) in sorted(stats.items()):
        p, r, f = _prf(tp, fp, fn)
        out[code] = {"precision": p, "recall": r, "f1": f, "support": float(tp + fn)}
    return out


def _prf(tp: int, fp: int, fn: int) -> tuple[float, float, float]:
    precision = tp / (tp + fp) if tp + fp else 0.0
    recall = tp / (tp + fn) if tp + fn else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return precision, recall, f1


MEDICAL_CODING = Task(
    name="medical_coding",
    system_prompt=(
        "You are a certified medical coder. Read the clinical note and list the ICD-10-CM codes it "
        "supports: billable codes only, in order of first mention, separated by commas. Answer with the "
        "codes and nothing else."
    ),
    user_prompt=lambda row: row["note"],
    plain_prompt=lambda row: f"Note: {row['note']}\nCodes:",
    target=lambda row: ", ".join(row["codes"]),
    parse=parse_codes,
    gold=lambda row: list(row["codes"]),
    score=score_codes,
    main_metric="micro_f1",
)

TASKS: dict[str, Task] = {MEDICAL_CODING.name: MEDICAL_CODING}


def get_task(name: str) -> Task:
    """The task a recipe names (the recipe schema already restricts the names)."""
    return TASKS[name]
