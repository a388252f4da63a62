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
from dataclasses import dataclass, field
from typing import Any, Protocol

from pipeline import chat, icd10cm
from pipeline.freeform import FREEFORM_METRICS, FROM_TOTALS, rouge_l, score_freeform
from pipeline.freeform import example_stats as _freeform_stats
from pipeline.freeform import prf as _prf


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
    # The label set the prompts list ({label_set}), and the plain prompt's template, for the prompt record.
    labels: tuple[str, ...] = ()
    plain_template: str = ""

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
    """Multi-label scores over ICD-10-CM code sets (``score_label_sets`` with ICD-10-CM validity).

    * invalid_code_rate: predicted codes that are not ICD-10-CM codes at all, over all predicted codes.
    """
    return score_label_sets(golds, preds, lambda code: icd10cm.status(code) == "invalid", "invalid_code_rate")


def score_label_sets(
    golds: Sequence[Sequence[str]],
    preds: Sequence[Sequence[str]],
    is_invalid: Callable[[str], bool] | None = None,
    invalid_metric: str = "invalid_label_rate",
) -> dict[str, float]:
    """Multi-label scores over label sets.

    * micro P/R/F1 count every (example, label) pair: TP = labels in both, FP = predicted only, FN = gold only.
    * macro P/R/F1 average the per-label scores over every label that is gold or predicted somewhere
      (a label never right scores 0, as in scikit-learn with zero_division=0).
    * exact_match: examples whose predicted set equals the gold set.
    * ``invalid_metric`` (when ``is_invalid`` is given): predicted labels outside the label set (or the code
      system), over all predicted labels.

    Args:
        golds: Gold labels per example.
        preds: Predicted labels per example (same order).
        is_invalid: Whether a predicted label is not a label at all; None: no invalid-label metric.
        invalid_metric: Its name (``invalid_code_rate`` for ICD-10-CM codes, as medical coding reports it).

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
        if is_invalid is not None:
            invalid += sum(is_invalid(code) for code in pred)
    tp, fp, fn = sum(tp_by.values()), sum(fp_by.values()), sum(fn_by.values())
    micro_p, micro_r, micro_f1 = _prf(tp, fp, fn)
    labels = set(tp_by) | set(fp_by) | set(fn_by)
    per_label = [_prf(tp_by.get(c, 0), fp_by.get(c, 0), fn_by.get(c, 0)) for c in labels]
    n_labels = len(per_label) or 1
    n = len(golds)
    scores = {
        "micro_precision": micro_p,
        "micro_recall": micro_r,
        "micro_f1": micro_f1,
        "macro_precision": sum(p for p, _, _ in per_label) / n_labels,
        "macro_recall": sum(r for _, r, _ in per_label) / n_labels,
        "macro_f1": sum(f for _, _, f in per_label) / n_labels,
        "exact_match": exact / n if n else 0.0,
        invalid_metric: invalid / predicted if predicted else 0.0,
        "num_examples": float(n),
        "num_predicted_codes": float(predicted),
    }
    if is_invalid is None:
        del scores[invalid_metric]
    return scores


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


# --------------------------------------------------------------------------------------------------
# Chat: an OpenAI fine-tuning file as it is. Each row is a conversation; its final assistant message is the
# answer, generated from the messages before it (with the row's tools) and compared with it: text after
# whitespace normalization, JSON as parsed JSON, tool calls as parsed (name, arguments) (``pipeline.chat``).


def _plain_chat(row: dict[str, Any]) -> str:
    raise ValueError("the chat task renders conversations through the base's chat template only")


# --------------------------------------------------------------------------------------------------
# Numbers: a text in, one number out, right when within the task's tolerance.

_NUMBER = re.compile(r"[-+]?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?(?:[eE][-+]?\d+)?|[-+]?\.\d+")


def parse_number(text: str) -> float | None:
    """The first number in an answer (``"about 1,250.5 USD"`` -> 1250.5); None if it holds none."""
    match = _NUMBER.search(text)
    return float(match.group(0).replace(",", "")) if match else None


def score_numbers(golds: Sequence[float], preds: Sequence[float | None], tolerance: float = 0.0) -> dict[str, float]:
    """Accuracy (|answer - gold| <= tolerance; no number is wrong), mae over answers that held a number, parse_rate."""
    if len(golds) != len(preds):
        raise ValueError(f"{len(golds)} gold rows but {len(preds)} predictions")
    n = len(golds)
    errors = [abs(p - g) for g, p in zip(golds, preds, strict=True) if p is not None]
    return {
        "accuracy": sum(e <= tolerance for e in errors) / n if n else 0.0,
        "mae": sum(errors) / len(errors) if errors else 0.0,
        "parse_rate": len(errors) / n if n else 0.0,
        "num_examples": float(n),
    }


def _number_text(value: Any) -> str:
    number = float(value)
    return str(int(number)) if number.is_integer() and abs(number) < 1e15 else repr(number)


# --------------------------------------------------------------------------------------------------
# Declared tasks. A recipe's `task:` is data: an answer type, the target field, prompt templates over the
# row's fields, a parser and metrics from the answer type's set. The built-in tasks are presets of the same
# spec (PRESETS); the recipe schema (``pipeline.recipe.TaskSection``) merges a preset with the recipe's keys
# and checks them, and ``build_task`` turns the result into the functions training and evaluation call.

ANSWER_TYPES = ("label", "labels", "json", "text", "number", "chat")
# Placeholders that are not row fields: the label set (from the contract) and the target object's keys.
SPECIAL_PLACEHOLDERS: dict[str, tuple[str, ...]] = {"label_set": ("label", "labels"), "json_fields": ("json",)}

# What each answer type's scorer reports (docs/recipe.md lists them). `metrics:` picks from these; the
# first is the main metric (the margin, the paired-bootstrap interval, the model card's headline).
ANSWER_METRICS: dict[str, tuple[str, ...]] = {
    "label": ("accuracy", "macro_f1", "macro_precision", "macro_recall", "invalid_label_rate"),
    "labels": (
        "micro_f1",
        "micro_precision",
        "micro_recall",
        "macro_f1",
        "macro_precision",
        "macro_recall",
        "exact_match",
        "invalid_label_rate",
        "invalid_code_rate",
    ),
    "json": ("field_f1", "field_precision", "field_recall", "parse_rate", "exact_match"),
    "text": ("rougeL_f", "rougeL_precision", "rougeL_recall", "token_f1", "exact_match", "empty_rate"),
    "number": ("accuracy", "parse_rate", "mae"),
    "chat": FREEFORM_METRICS,
}
# Parsers each answer type accepts; the first is its default.
ANSWER_PARSERS: dict[str, tuple[str, ...]] = {
    "label": ("label", "exact"),
    "labels": ("list", "regex"),
    "json": ("json",),
    "text": ("text",),
    "number": ("number",),
    "chat": ("chat",),
}
# Defaults of a declared task with no preset (a preset's own values come first).
ANSWER_DEFAULTS: dict[str, dict[str, Any]] = {
    "label": {
        "system_prompt": "Classify the text into exactly one of these labels: {label_set}. Answer with the label only."
    },
    "labels": {
        "system_prompt": "List every label that applies to the text, separated by commas. Answer with the labels only."
    },
    "json": {
        "system_prompt": "Extract the requested fields from the text. Answer with one JSON object that has exactly the "
        "requested fields as keys, using null for a field the text does not give, and nothing else."
    },
    "text": {"system_prompt": "Answer as the examples do. Answer with the answer only."},
    "number": {"system_prompt": "Answer with a number only."},
    "chat": {},
}

PRESETS: dict[str, dict[str, Any]] = {
    "medical_coding": {
        "answer": "labels",
        "target": "codes",
        "system_prompt": (
            "You are a certified medical coder. Read the clinical note and list the ICD-10-CM codes it "
            "supports: billable codes only, in order of first mention, separated by commas. Answer with the "
            "codes and nothing else."
        ),
        "user_prompt": "{note}",
        "plain_prompt": "Note: {note}\nCodes:",
        "parse": "regex",
        "parse_pattern": CODE_PATTERN.pattern,
        "vocabulary": "icd10cm",
        "metrics": ["micro_f1", "micro_precision", "micro_recall", "macro_f1", "exact_match", "invalid_code_rate"],
    },
    "classification": {
        "answer": "label",
        "target": "label",
        "system_prompt": ANSWER_DEFAULTS["label"]["system_prompt"],
        "user_prompt": "{text}",
        "plain_prompt": "Labels: {label_set}\nText: {text}\nLabel:",
        "parse": "label",
        "metrics": ["accuracy", "macro_f1", "macro_precision", "macro_recall", "invalid_label_rate"],
    },
    "extraction": {
        "answer": "json",
        "target": "fields",
        "system_prompt": ANSWER_DEFAULTS["json"]["system_prompt"],
        "user_prompt": "Fields: {json_fields}\nText: {text}",
        "plain_prompt": "Fields: {json_fields}\nText: {text}\nJSON:",
        "parse": "json",
        "metrics": ["field_f1", "field_precision", "field_recall", "parse_rate", "exact_match"],
    },
    "summarization": {
        "answer": "text",
        "target": "summary",
        "system_prompt": "Summarize the text in one or two sentences. Answer with the summary only.",
        "user_prompt": "{text}",
        "plain_prompt": "Text: {text}\nSummary:",
        "parse": "text",
        "metrics": ["rougeL_f", "rougeL_precision", "rougeL_recall", "token_f1", "exact_match", "empty_rate"],
    },
    "chat": {
        "answer": "chat",
        "target": "messages",
        "parse": "chat",
        "metrics": ["exact_match", "token_f1", "json_valid_rate", "json_field_f1", "tool_call_accuracy"],
    },
}
PRESET_NAMES = tuple(PRESETS)
TASK_NAMES = PRESET_NAMES


# --------------------------------------------------------------------------------------------------
# Templates: "{field}" is the row's value (a list joined with ", ", an object as JSON), "{{" and "}}" braces.

_TOKEN = re.compile(r"\{\{|\}\}|\{([^{}]*)\}|[{}]")
_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")


class TemplateError(ValueError):
    """A template that cannot be parsed: a lone brace, or a placeholder that is not a name."""


def compile_template(template: str) -> tuple[tuple[str, bool], ...]:
    """The template as (text, False) and (placeholder name, True) parts, in order.

    Raises:
        TemplateError: Naming the character and the fix.
    """
    parts: list[tuple[str, bool]] = []
    last = 0
    for match in _TOKEN.finditer(template):
        parts.append((template[last : match.start()], False))
        last = match.end()
        token = match.group(0)
        if token in ("{{", "}}"):
            parts.append((token[0], False))
        elif match.group(1) is None:
            raise TemplateError(
                f"a lone {token!r} at character {match.start() + 1}; write {token * 2!r} for a literal brace"
            )
        elif not _NAME.fullmatch(match.group(1).strip()):
            raise TemplateError(
                f"{token!r} at character {match.start() + 1} is not a placeholder: use {{field_name}}, or "
                "{{ and }} for literal braces"
            )
        else:
            parts.append((match.group(1).strip(), True))
    parts.append((template[last:], False))
    return tuple(p for p in parts if p[1] or p[0])


def template_fields(template: str) -> list[str]:
    """The placeholder names of a template, in order, each once."""
    return list(dict.fromkeys(name for name, is_field in compile_template(template) if is_field))


def value_text(value: Any) -> str:
    """A row value as prompt text: strings as they are, lists joined with ", ", objects as JSON, null empty."""
    if value is None:
        return ""
    if isinstance(value, str):
        return value
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, list):
        return ", ".join(value_text(v) for v in value)
    if isinstance(value, dict):
        return json.dumps(value, ensure_ascii=False)
    return str(value)


def _renderer(template: str, specials: Callable[[dict[str, Any]], dict[str, str]]) -> Callable[[dict[str, Any]], str]:
    parts = compile_template(template)

    def render(row: dict[str, Any]) -> str:
        extra = specials(row)
        return "".join(
            (extra[text] if text in extra else value_text(row.get(text))) if is_field else text
            for text, is_field in parts
        )

    return render


# --------------------------------------------------------------------------------------------------
# Building a Task from a spec


class SpecLike(Protocol):
    """What ``build_task`` reads from a spec.

    That is ``pipeline.recipe.TaskSection``; kept structural so this leaf module does not import the recipe.
    """

    preset: str | None
    answer: str
    target: str
    system_prompt: str
    user_prompt: str
    plain_prompt: str | None
    parse: str
    parse_pattern: str | None
    metrics: list[str]
    vocabulary: str | None
    tolerance: float

    @property
    def name(self) -> str:
        """The preset's name, or ``custom-<answer>`` for a task with no preset."""
        ...


# Metrics that can be the main one: rebuilt from per-example numbers that add up (the paired bootstrap
# resamples examples without re-scoring). Per answer type: metric -> (example stats, metric from totals).
_Stats = tuple[Callable[[Any, Any], tuple[float, ...]], Callable[[Sequence[float]], float]]
_RATIO: Callable[[Sequence[float]], float] = lambda t: t[0] / t[1] if t[1] else 0.0  # noqa: E731


def _freeform_main(metric: str) -> _Stats:
    return (lambda gold, pred: _freeform_stats(gold, pred)[metric], FROM_TOTALS[metric])


MAIN_METRICS: dict[str, dict[str, _Stats]] = {
    "label": {"accuracy": (lambda gold, pred: (float(gold == pred), 1.0), _RATIO)},
    "labels": {
        "micro_f1": (lambda gold, pred: _set_counts(set(gold), set(pred)), lambda t: _prf(*t)[2]),
        "micro_precision": (lambda gold, pred: _set_counts(set(gold), set(pred)), lambda t: _prf(*t)[0]),
        "micro_recall": (lambda gold, pred: _set_counts(set(gold), set(pred)), lambda t: _prf(*t)[1]),
        "exact_match": (lambda gold, pred: (float(set(gold) == set(pred)), 1.0), _RATIO),
    },
    "json": {
        "field_f1": (lambda gold, pred: _field_stats(gold, pred), lambda t: _prf(*t)[2]),
        "field_precision": (lambda gold, pred: _field_stats(gold, pred), lambda t: _prf(*t)[0]),
        "field_recall": (lambda gold, pred: _field_stats(gold, pred), lambda t: _prf(*t)[1]),
        "parse_rate": (lambda gold, pred: (float(pred is not None), 1.0), _RATIO),
        "exact_match": (lambda gold, pred: (float(score_fields([gold], [pred])["exact_match"]), 1.0), _RATIO),
    },
    "text": {
        "rougeL_f": (lambda gold, pred: (rouge_l(gold, pred)[2], 1.0), _RATIO),
        "token_f1": _freeform_main("token_f1"),
        "exact_match": _freeform_main("exact_match"),
    },
    "number": {},  # filled in build_task: accuracy depends on the tolerance
    "chat": {"exact_match": _freeform_main("exact_match"), "token_f1": _freeform_main("token_f1")},
}
MAIN_METRIC_NAMES: dict[str, tuple[str, ...]] = {
    **{answer: tuple(stats) for answer, stats in MAIN_METRICS.items()},
    "number": ("accuracy", "parse_rate"),
}


def build_task(spec: SpecLike, labels: Sequence[Any] | None = None, vocabulary: str | None = None) -> Task:
    """The task a spec declares, with the label set the contract gives its target field.

    Args:
        spec: A resolved spec (every key filled: the recipe's ``task`` section).
        labels: The target's allowed values (``enum``; for ``labels``, the items' ``enum``), if any.
        vocabulary: The target items' code system (``icd10cm``), if any.

    Raises:
        ValueError: The spec needs a label set it was not given (``task_problems`` in ``pipeline.data`` reports
            this, and every other spec/contract mismatch, by its key first).
    """
    if spec.answer == "chat":
        return _chat_task(spec)
    label_list = [str(label) for label in labels] if labels else []
    if spec.answer == "label" and not label_list:
        raise ValueError(f"answer type 'label' needs the label set of the target field {spec.target!r}")
    listed = ", ".join(label_list)
    target = spec.target

    def specials(row: dict[str, Any]) -> dict[str, str]:
        extra = {"label_set": listed}
        if spec.answer == "json":
            extra["json_fields"] = ", ".join(_json_target(row.get(target)) or {})
        return extra

    system = _renderer(spec.system_prompt, specials)({})
    user = _renderer(spec.user_prompt, specials)
    plain_template = spec.plain_prompt if spec.plain_prompt is not None else spec.user_prompt + "\nAnswer:"
    plain = _renderer(plain_template, specials)
    parts = _ANSWER_BUILDERS[spec.answer](spec, label_list, vocabulary)
    main = spec.metrics[0]
    stats = parts.pop("main_stats")[main]
    return Task(
        name=spec.name,
        system_prompt=system,
        user_prompt=user,
        plain_prompt=plain,
        main_metric=main,
        example_stats=stats[0],
        main_from_totals=stats[1],
        table_metrics=tuple(spec.metrics),
        labels=tuple(label_list),
        plain_template=plain_template,
        **parts,
    )


def _label_parts(spec: SpecLike, labels: list[str], vocabulary: str | None) -> dict[str, Any]:
    target = spec.target
    by_fold = {label.casefold(): label for label in labels}

    def parse(text: str) -> str:
        if spec.parse == "exact":  # the whole answer must be a label (case and a final period aside)
            return by_fold.get(text.strip().strip(".").strip().casefold(), INVALID_LABEL)
        return parse_label(text, labels)

    return {
        "target": lambda row: value_text(row[target]),
        "gold": lambda row: value_text(row[target]),
        "parse": parse,
        "score": score_labels,
        "per_label": per_label_classes,
        "extras": confusion_matrix,
        "main_stats": MAIN_METRICS["label"],
    }


def _labels_parts(spec: SpecLike, labels: list[str], vocabulary: str | None) -> dict[str, Any]:
    target = spec.target
    if spec.parse == "regex":
        pattern = re.compile(spec.parse_pattern or CODE_PATTERN.pattern)
        parse: Callable[[str], Any] = lambda text: list(dict.fromkeys(pattern.findall(text)))  # noqa: E731
    else:
        by_fold = {label.casefold(): label for label in labels}
        parse = lambda text: list(  # noqa: E731
            dict.fromkeys(by_fold.get(p.strip().casefold(), p.strip()) for p in re.split(r"[,;\n]", text) if p.strip())
        )
    if vocabulary == "icd10cm":
        score: Callable[..., dict[str, float]] = score_codes
    elif labels:
        allowed = set(labels)
        score = lambda golds, preds: score_label_sets(golds, preds, lambda label: label not in allowed)  # noqa: E731
    else:
        score = score_label_sets
    return {
        "target": lambda row: ", ".join(value_text(v) for v in row[target]),
        "gold": lambda row: [value_text(v) for v in row[target]],
        "parse": parse,
        "score": score,
        "per_label": per_label_f1,
        "main_stats": MAIN_METRICS["labels"],
    }


def _json_target(value: Any) -> dict[str, Any] | None:
    """A JSON target as an object: an object field as it is, a string field holding a JSON object parsed."""
    if isinstance(value, dict):
        return value
    if isinstance(value, str):
        return parse_json_object(value)
    return None


def _json_parts(spec: SpecLike, labels: list[str], vocabulary: str | None) -> dict[str, Any]:
    target = spec.target
    return {
        "target": lambda row: json.dumps(_json_target(row[target]), ensure_ascii=False),
        "gold": lambda row: dict(_json_target(row[target]) or {}),
        "parse": parse_json_object,
        "score": score_fields,
        "per_label": per_field_f1,
        "main_stats": MAIN_METRICS["json"],
    }


def _text_parts(spec: SpecLike, labels: list[str], vocabulary: str | None) -> dict[str, Any]:
    target = spec.target
    return {
        "target": lambda row: value_text(row[target]),
        "gold": lambda row: value_text(row[target]),
        "parse": lambda text: text.strip(),
        "score": score_summaries,
        "freeform_reference": lambda row: value_text(row[target]),
        "main_stats": MAIN_METRICS["text"],
    }


def _number_parts(spec: SpecLike, labels: list[str], vocabulary: str | None) -> dict[str, Any]:
    target, tolerance = spec.target, spec.tolerance

    def hit(gold: float, pred: float | None) -> tuple[float, ...]:
        return (float(pred is not None and abs(pred - gold) <= tolerance), 1.0)

    return {
        "target": lambda row: _number_text(row[target]),
        "gold": lambda row: float(row[target]),
        "parse": parse_number,
        "score": lambda golds, preds: score_numbers(golds, preds, tolerance),
        "main_stats": {
            "accuracy": (hit, _RATIO),
            "parse_rate": (lambda gold, pred: (float(pred is not None), 1.0), _RATIO),
        },
    }


_ANSWER_BUILDERS: dict[str, Callable[[SpecLike, list[str], str | None], dict[str, Any]]] = {
    "label": _label_parts,
    "labels": _labels_parts,
    "json": _json_parts,
    "text": _text_parts,
    "number": _number_parts,
}


def _chat_task(spec: SpecLike) -> Task:
    """An OpenAI fine-tuning file as it is: the conversation is the prompt, its final assistant message the answer."""
    stats = MAIN_METRICS["chat"][spec.metrics[0]]
    return Task(
        name=spec.name,
        system_prompt="",
        user_prompt=lambda row: chat.prompt_text(row),
        plain_prompt=_plain_chat,
        target=lambda row: chat.answer_text(row["messages"][-1]),
        parse=chat.canonical_answer,
        gold=lambda row: chat.reference(row["messages"][-1]),
        score=score_freeform,
        main_metric=spec.metrics[0],
        example_stats=stats[0],
        main_from_totals=stats[1],
        table_metrics=tuple(spec.metrics),
        freeform_reference=lambda row: chat.reference(row["messages"][-1]),
        conversation=lambda row: chat.split_final(row)[0],
        tools=lambda row: row.get("tools"),
    )


@dataclass(frozen=True)
class PresetSpec:
    """A preset as a resolved spec, for callers with no recipe (tests, benchmarks): ``get_task``."""

    preset: str
    answer: str
    target: str
    system_prompt: str = ""
    user_prompt: str = ""
    plain_prompt: str | None = None
    parse: str = ""
    parse_pattern: str | None = None
    metrics: list[str] = field(default_factory=list)
    vocabulary: str | None = None
    tolerance: float = 0.0

    @property
    def name(self) -> str:
        """The preset's name."""
        return self.preset


def get_task(name: str, labels: Sequence[str] | None = None) -> Task:
    """A preset as it is (no recipe overrides).

    Args:
        name: The preset name.
        labels: The label set, required for ``classification`` (the contract's ``label`` enum).
    """
    if name == "classification" and not labels:
        raise ValueError("the classification task needs its label set (the contract's `label` enum)")
    spec = PresetSpec(preset=name, **PRESETS[name])
    return build_task(spec, labels, spec.vocabulary)
