"""Tasks: how a row becomes a prompt and a target, and which parser and scorer (``pipeline.scoring``) read answers.

The same rendering serves training and evaluation, so the fine-tune is scored on exactly the prompts it
learned from. A prompt exists in two forms: chat messages (rendered through the tokenizer's chat template,
as an Instruct base expects) and plain text (the task's own template, for a base with no chat template).

Leaf module: no torch; imports only the parsers and scorers, the free-form metrics and the chat format.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from pipeline import chat
from pipeline.freeform import FREEFORM_METRICS, FROM_TOTALS, rouge_l, score_freeform
from pipeline.freeform import example_stats as _freeform_stats
from pipeline.freeform import prf as _prf
from pipeline.freeform import ratio as _RATIO
from pipeline.scoring import (
    CODE_PATTERN,
    INVALID_LABEL,
    confusion_matrix,
    field_stats,
    parse_json_object,
    parse_label,
    parse_number,
    per_field_f1,
    per_label_classes,
    per_label_f1,
    score_codes,
    score_fields,
    score_label_sets,
    score_labels,
    score_numbers,
    score_summaries,
    set_counts,
)


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
# Chat: an OpenAI fine-tuning file as it is. Each row is a conversation; its final assistant message is the
# answer, generated from the messages before it (with the row's tools) and compared with it: text after
# whitespace normalization, JSON as parsed JSON, tool calls as parsed (name, arguments) (``pipeline.chat``).


def _plain_chat(row: dict[str, Any]) -> str:
    raise ValueError("the chat task renders conversations through the base's chat template only")


def _number_text(value: Any) -> str:
    number = float(value)
    return str(int(number)) if number.is_integer() and abs(number) < 1e15 else repr(number)


# --------------------------------------------------------------------------------------------------
# Declared tasks. A recipe's `task:` is data: an answer type, the target field, prompt templates over the
# row's fields, a parser and metrics from the answer type's set. The built-in tasks are presets of the same
# spec (PRESETS); the recipe schema (``pipeline.taskspec.TaskSection``) merges a preset with the recipe's keys
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

    That is ``pipeline.taskspec.TaskSection``; kept structural so this leaf module does not import the recipe.
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


def _set_stats(gold: Sequence[str], pred: Sequence[str]) -> tuple[float, float, float]:
    return set_counts(set(gold), set(pred))


def _freeform_main(metric: str) -> _Stats:
    return (lambda gold, pred: _freeform_stats(gold, pred)[metric], FROM_TOTALS[metric])


MAIN_METRICS: dict[str, dict[str, _Stats]] = {
    "label": {"accuracy": (lambda gold, pred: (float(gold == pred), 1.0), _RATIO)},
    "labels": {
        "micro_f1": (_set_stats, lambda t: _prf(*t)[2]),
        "micro_precision": (_set_stats, lambda t: _prf(*t)[0]),
        "micro_recall": (_set_stats, lambda t: _prf(*t)[1]),
        "exact_match": (lambda gold, pred: (float(set(gold) == set(pred)), 1.0), _RATIO),
    },
    "json": {
        "field_f1": (field_stats, lambda t: _prf(*t)[2]),
        "field_precision": (field_stats, lambda t: _prf(*t)[0]),
        "field_recall": (field_stats, lambda t: _prf(*t)[1]),
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
