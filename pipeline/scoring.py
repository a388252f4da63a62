"""Answer parsers and scorers, one family per answer type.

Label sets (ICD-10-CM codes or any labels), single labels, JSON objects of named fields, free text (ROUGE-L
beside the free-form metrics) and numbers.

What a declared task (``pipeline.tasks``) calls to read and score answers; each scorer returns every metric of its
answer type (``tasks.ANSWER_METRICS`` lists them). Leaf module: no torch.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Sequence
from typing import Any

from pipeline import icd10cm
from pipeline.freeform import prf as _prf
from pipeline.freeform import rouge_l, score_freeform

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


def set_counts(gold: set[Any], pred: set[Any]) -> tuple[float, float, float]:
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


def field_stats(gold: dict[str, Any], pred: dict[str, Any] | None) -> tuple[float, float, float]:
    """(TP, FP, FN) over one example's fields, for the paired bootstrap of field P/R/F1."""
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
