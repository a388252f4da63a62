"""Tasks: how a row becomes a prompt and a target, how an answer is parsed, and how answers are scored.

The same rendering serves training and evaluation, so the fine-tune is scored on exactly the prompts it
learned from. A prompt exists in two forms: chat messages (rendered through the tokenizer's chat template,
as an Instruct base expects) and plain text (the task's own template, for a base with no chat template).

Leaf module: no torch, no package imports besides the ICD-10-CM table.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from pipeline import chat, icd10cm
from pipeline.freeform import example_stats as _freeform_stats
from pipeline.freeform import prf as _prf
from pipeline.freeform import rouge_l, score_freeform


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
    # The main metric rebuilt from per-example numbers that add up (TP/FP/FN, correct/total...): the paired
    # bootstrap resamples examples and recomputes it from sums, without re-scoring text thousands of times.
    example_stats: Callable[[Any, Any], tuple[float, ...]] | None = None
    main_from_totals: Callable[[Sequence[float]], float] | None = None
    per_label: Callable[[Sequence[Any], Sequence[Any]], dict[str, dict[str, float]]] | None = None
    table_metrics: tuple[str, ...] = ()
    # Task-specific structures for metrics.json (e.g. the confusion matrix of a classifier).
    extras: Callable[[Sequence[Any], Sequence[Any]], dict[str, Any]] | None = None
    # A row's reference for the free-form metrics (text or structured; ``pipeline.freeform``), for a task whose
    # answers are free text, JSON or tool calls: each of those metrics then gets its own paired-bootstrap interval.
    freeform_reference: Callable[[dict[str, Any]], Any] | None = None
    # A task whose rows are whole conversations (chat): the messages before the scored answer, and the row's
    # tool definitions. The prompt is then the row's own conversation, not system_prompt + user_prompt.
    conversation: Callable[[dict[str, Any]], list[dict[str, Any]]] | None = None
    tools: Callable[[dict[str, Any]], list[dict[str, Any]] | None] | None = None

    def chat_messages(self, row: dict[str, Any]) -> list[dict[str, Any]]:
        """The prompt as chat messages (system + user, or the conversation before the answer), without the answer."""
        if self.conversation is not None:
            return chat.template_messages(self.conversation(row))
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
    example_stats=lambda gold, pred: _set_counts(set(gold), set(pred)),
    main_from_totals=lambda totals: _prf(*totals)[2],
    per_label=per_label_f1,
    table_metrics=("micro_f1", "micro_precision", "micro_recall", "macro_f1", "exact_match", "invalid_code_rate"),
)


def _set_counts(gold: set[Any], pred: set[Any]) -> tuple[float, float, float]:
    """(TP, FP, FN) of one example's predicted set against its gold set."""
    return float(len(gold & pred)), float(len(pred - gold)), float(len(gold - pred))


# --------------------------------------------------------------------------------------------------
# Classification: a text in, one label of a fixed set out. The labels come from the contract (the enum of
# the `label` field), so the prompt lists exactly the labels the data may hold.

INVALID_LABEL = "<invalid>"


def parse_label(text: str, labels: Sequence[str]) -> str:
    """The label an answer gives: an exact (case-insensitive) match, else the first label named in it.

    An answer that names no label parses to ``"<invalid>"`` (a wrong answer, counted in invalid_label_rate).
    """
    answer = text.strip().strip(".").strip()
    by_fold = {label.casefold(): label for label in labels}
    if answer.casefold() in by_fold:
        return by_fold[answer.casefold()]
    found = []
    for label in labels:
        match = re.search(rf"(?<!\w){re.escape(label)}(?!\w)", text, flags=re.IGNORECASE)
        if match:
            found.append((match.start(), -len(label), label))  # earliest; the longest at the same place
    return min(found)[2] if found else INVALID_LABEL


def score_labels(golds: Sequence[str], preds: Sequence[str]) -> dict[str, float]:
    """Accuracy, macro P/R/F1 and the invalid-answer rate of single-label predictions.

    Macro scores average over every label that is gold or (validly) predicted somewhere; an invalid answer
    is a miss for its gold label but not a label of its own (as scikit-learn would make it).
    """
    if len(golds) != len(preds):
        raise ValueError(f"{len(golds)} gold rows but {len(preds)} predictions")
    n = len(golds)
    per_label = per_label_classes(golds, preds)
    count = len(per_label) or 1
    return {
        "accuracy": sum(g == p for g, p in zip(golds, preds, strict=True)) / n if n else 0.0,
        "macro_precision": sum(s["precision"] for s in per_label.values()) / count,
        "macro_recall": sum(s["recall"] for s in per_label.values()) / count,
        "macro_f1": sum(s["f1"] for s in per_label.values()) / count,
        "invalid_label_rate": sum(p == INVALID_LABEL for p in preds) / n if n else 0.0,
        "num_examples": float(n),
    }


def per_label_classes(golds: Sequence[str], preds: Sequence[str]) -> dict[str, dict[str, float]]:
    """Per-label precision, recall, F1 and support of single-label predictions."""
    labels = sorted((set(golds) | set(preds)) - {INVALID_LABEL})
    out = {}
    for label in labels:
        tp = sum(g == label and p == label for g, p in zip(golds, preds, strict=True))
        fp = sum(g != label and p == label for g, p in zip(golds, preds, strict=True))
        fn = sum(g == label and p != label for g, p in zip(golds, preds, strict=True))
        precision, recall, f1 = _prf(tp, fp, fn)
        out[label] = {"precision": precision, "recall": recall, "f1": f1, "support": float(tp + fn)}
    return out


def confusion_matrix(golds: Sequence[str], preds: Sequence[str]) -> dict[str, Any]:
    """``{"confusion_matrix": {gold: {predicted: count}}}`` (invalid answers under ``"<invalid>"``)."""
    matrix: dict[str, dict[str, int]] = {}
    for gold, pred in zip(golds, preds, strict=True):
        row = matrix.setdefault(gold, {})
        row[pred] = row.get(pred, 0) + 1
    return {"confusion_matrix": {g: dict(sorted(r.items())) for g, r in sorted(matrix.items())}}


def classification_task(labels: Sequence[str]) -> Task:
    """The classification task for a fixed label set (from the contract's ``label`` enum)."""
    labels = [str(label) for label in labels]
    listed = ", ".join(labels)
    return Task(
        name="classification",
        system_prompt=f"Classify the text into exactly one of these labels: {listed}. Answer with the label only.",
        user_prompt=lambda row: row["text"],
        plain_prompt=lambda row: f"Labels: {listed}\nText: {row['text']}\nLabel:",
        target=lambda row: str(row["label"]),
        parse=lambda text: parse_label(text, labels),
        gold=lambda row: str(row["label"]),
        score=score_labels,
        main_metric="accuracy",
        example_stats=lambda gold, pred: (float(gold == pred), 1.0),
        main_from_totals=lambda totals: totals[0] / totals[1] if totals[1] else 0.0,
        per_label=per_label_classes,
        table_metrics=("accuracy", "macro_f1", "macro_precision", "macro_recall", "invalid_label_rate"),
        extras=confusion_matrix,
    )


# --------------------------------------------------------------------------------------------------
# Extraction: a text in, a JSON object of named fields out. A row lists every field of its schema under
# `fields` (null when the text does not give it), so the prompt can name the fields without a schema file.


def parse_json_object(text: str) -> dict[str, Any] | None:
    """The JSON object in an answer (the whole answer, else its outermost braces); None if there is none."""
    candidates = [text.strip()]
    start, end = text.find("{"), text.rfind("}")
    if 0 <= start < end:
        candidates.append(text[start : end + 1])
    for candidate in candidates:
        try:
            value = json.loads(candidate)
        except ValueError:
            continue
        if isinstance(value, dict):
            return value
    return None


def _norm_value(value: Any) -> str | None:
    """Compare values as text, ignoring case and spacing: 12, "12" and " 12 " match; null is absent."""
    if value is None:
        return None
    text = value if isinstance(value, str) else json.dumps(value, sort_keys=True, ensure_ascii=False)
    text = " ".join(text.split()).casefold()
    return text or None


def _field_counts(gold: dict[str, Any], pred: dict[str, Any] | None) -> dict[str, list[int]]:
    """Per field [TP, FP, FN]: a predicted value that is wrong is both a false positive and a false negative."""
    pred = pred or {}
    counts: dict[str, list[int]] = {}
    for key in set(gold) | set(pred):
        g, p = _norm_value(gold.get(key)), _norm_value(pred.get(key))
        tp_fp_fn = counts.setdefault(key, [0, 0, 0])
        if g is not None and g == p:
            tp_fp_fn[0] += 1
            continue
        if p is not None:
            tp_fp_fn[1] += 1
        if g is not None:
            tp_fp_fn[2] += 1
    return counts


def score_fields(golds: Sequence[dict[str, Any]], preds: Sequence[dict[str, Any] | None]) -> dict[str, float]:
    """Parse rate, field-level micro P/R/F1 and exact match of extracted JSON objects.

    * parse_rate: answers that held a JSON object.
    * field P/R/F1 count (example, field) pairs with a non-null value: TP = predicted value equals the gold
      value (normalized), FP = a predicted value that is not the gold one, FN = a gold value not predicted.
    * exact_match: examples whose every field matches (nulls included).
    """
    if len(golds) != len(preds):
        raise ValueError(f"{len(golds)} gold rows but {len(preds)} predictions")
    tp = fp = fn = exact = 0
    for gold, pred in zip(golds, preds, strict=True):
        counts = _field_counts(gold, pred)
        tp += sum(c[0] for c in counts.values())
        fp += sum(c[1] for c in counts.values())
        fn += sum(c[2] for c in counts.values())
        exact += pred is not None and not any(c[1] or c[2] for c in counts.values())
    precision, recall, f1 = _prf(tp, fp, fn)
    n = len(golds)
    return {
        "field_f1": f1,
        "field_precision": precision,
        "field_recall": recall,
        "parse_rate": sum(p is not None for p in preds) / n if n else 0.0,
        "exact_match": exact / n if n else 0.0,
        "num_examples": float(n),
    }


def per_field_f1(
    golds: Sequence[dict[str, Any]], preds: Sequence[dict[str, Any] | None]
) -> dict[str, dict[str, float]]:
    """Per-field precision, recall, F1 and support (examples with a gold value)."""
    totals: dict[str, list[int]] = {}
    for gold, pred in zip(golds, preds, strict=True):
        for key, (tp, fp, fn) in _field_counts(gold, pred).items():
            acc = totals.setdefault(key, [0, 0, 0])
            acc[0], acc[1], acc[2] = acc[0] + tp, acc[1] + fp, acc[2] + fn
    out = {}
    for key, (tp, fp, fn) in sorted(totals.items()):
        precision, recall, f1 = _prf(tp, fp, fn)
        out[key] = {"precision": precision, "recall": recall, "f1": f1, "support": float(tp + fn)}
    return out


def _field_stats(gold: dict[str, Any], pred: dict[str, Any] | None) -> tuple[float, float, float]:
    counts = _field_counts(gold, pred).values()
    return float(sum(c[0] for c in counts)), float(sum(c[1] for c in counts)), float(sum(c[2] for c in counts))


EXTRACTION = Task(
    name="extraction",
    system_prompt=(
        "Extract the requested fields from the text. Answer with one JSON object that has exactly the requested "
        "fields as keys, using null for a field the text does not give, and nothing else."
    ),
    user_prompt=lambda row: f"Fields: {', '.join(row['fields'])}\nText: {row['text']}",
    plain_prompt=lambda row: f"Fields: {', '.join(row['fields'])}\nText: {row['text']}\nJSON:",
    target=lambda row: json.dumps(row["fields"], ensure_ascii=False),
    parse=parse_json_object,
    gold=lambda row: dict(row["fields"]),
    score=score_fields,
    main_metric="field_f1",
    example_stats=_field_stats,
    main_from_totals=lambda totals: _prf(*totals)[2],
    per_label=per_field_f1,
    table_metrics=("field_f1", "field_precision", "field_recall", "parse_rate", "exact_match"),
)


# --------------------------------------------------------------------------------------------------
# Summarization: a text in, a short summary out, scored with ROUGE-L (Google's rouge-score package).


def score_summaries(golds: Sequence[str], preds: Sequence[str]) -> dict[str, float]:
    """Mean ROUGE-L precision, recall and F1 over examples (the per-example average, as rouge-score reports).

    The free-form metrics (``pipeline.freeform``: exact match, token F1...) come beside them; rougeL_f is the
    same number in both.
    """
    if len(golds) != len(preds):
        raise ValueError(f"{len(golds)} gold rows but {len(preds)} predictions")
    scores = [rouge_l(g, p) for g, p in zip(golds, preds, strict=True)]
    n = len(scores)
    return {
        **score_freeform(golds, preds),
        "rougeL_f": sum(s[2] for s in scores) / n if n else 0.0,
        "rougeL_precision": sum(s[0] for s in scores) / n if n else 0.0,
        "rougeL_recall": sum(s[1] for s in scores) / n if n else 0.0,
        "empty_rate": sum(not p.strip() for p in preds) / n if n else 0.0,
        "num_examples": float(n),
    }


SUMMARIZATION = Task(
    name="summarization",
    system_prompt="Summarize the text in one or two sentences. Answer with the summary only.",
    user_prompt=lambda row: row["text"],
    plain_prompt=lambda row: f"Text: {row['text']}\nSummary:",
    target=lambda row: row["summary"],
    parse=lambda text: text.strip(),
    gold=lambda row: row["summary"],
    score=score_summaries,
    main_metric="rougeL_f",
    example_stats=lambda gold, pred: (rouge_l(gold, pred)[2], 1.0),
    main_from_totals=lambda totals: totals[0] / totals[1] if totals[1] else 0.0,
    table_metrics=("rougeL_f", "rougeL_precision", "rougeL_recall", "token_f1", "exact_match", "empty_rate"),
    freeform_reference=lambda row: row["summary"],
)


# --------------------------------------------------------------------------------------------------
# Chat: an OpenAI fine-tuning file as it is. Each row is a conversation; its final assistant message is the
# answer, generated from the messages before it (with the row's tools) and compared with it: text after
# whitespace normalization, JSON as parsed JSON, tool calls as parsed (name, arguments) (``pipeline.chat``).


def _plain_chat(row: dict[str, Any]) -> str:
    raise ValueError("the chat task renders conversations through the base's chat template only")


CHAT = Task(
    name="chat",
    system_prompt="",
    user_prompt=lambda row: chat.prompt_text(row),
    plain_prompt=_plain_chat,
    target=lambda row: chat.answer_text(row["messages"][-1]),
    parse=chat.canonical_answer,
    gold=lambda row: chat.reference(row["messages"][-1]),
    score=score_freeform,
    main_metric="exact_match",
    example_stats=lambda gold, pred: _freeform_stats(gold, pred)["exact_match"],
    main_from_totals=lambda totals: totals[0] / totals[1] if totals[1] else 0.0,
    table_metrics=("exact_match", "token_f1", "json_valid_rate", "json_field_f1", "tool_call_accuracy"),
    freeform_reference=lambda row: chat.reference(row["messages"][-1]),
    conversation=lambda row: chat.split_final(row)[0],
    tools=lambda row: row.get("tools"),
)

TASKS: dict[str, Task] = {task.name: task for task in (MEDICAL_CODING, EXTRACTION, SUMMARIZATION, CHAT)}
TASK_NAMES = ("medical_coding", "classification", "extraction", "summarization", "chat")


def get_task(name: str, labels: Sequence[str] | None = None) -> Task:
    """The task a recipe names (the recipe schema already restricts the names).

    Args:
        name: The task name.
        labels: The label set, required for ``classification`` (the contract's ``label`` enum).
    """
    if name == "classification":
        if not labels:
            raise ValueError("the classification task needs its label set (the contract's `label` enum)")
        return classification_task(labels)
    return TASKS[name]
