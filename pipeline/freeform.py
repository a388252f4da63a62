"""Reference metrics for free-form answers: free text, JSON and tool calls.

One scorer serves every task whose answer is not a code, a label or a number: the built-in ``summarization``
task now, and the ``chat`` task and declared ``text``/``json`` answer types through ``freeform_scoring``.
Each metric is rebuilt from per-example numbers that add up (``example_stats``), so the paired bootstrap can
resample examples and recompute every metric from sums, exactly as the full-data figure is computed
(``paired_bootstrap_stats``; ``compare_systems`` runs it for the fine-tune against the baseline and the base).

A reference is text, or already-structured data (a JSON object, a tool call in OpenAI's form). Per example:

* ``exact_match``: the answer equals the reference after normalization: surrounding and repeated
  whitespace ignored; when both parse as JSON, the parsed values are compared (key order and spacing ignored).
* ``token_f1``: SQuAD-style overlap of word tokens (runs of word characters after case folding), averaged over examples;
  both empty counts 1, one empty 0.
* ``rougeL_f``: ROUGE-L F1 (Google's rouge-score, Porter stemmer), averaged over examples.
* Only over examples whose reference is a JSON object (not a tool call): ``json_valid_rate`` (the whole answer,
  stripped and outside an optional Markdown code fence, parses as JSON) and field-level micro
  ``json_field_precision``/``recall``/``f1`` over leaf fields (nested objects flattened to dotted paths; a
  field counts when the value is equal as JSON; an answer that does not parse has every field missed).
* Only over examples whose reference is a tool call (``{"name": ..., "arguments": "<json>"}``, the
  ``{"tool_calls": [...]}`` message form or a list of calls): ``tool_call_accuracy`` (the same calls: names
  and arguments equal as JSON, order ignored) and ``tool_name_accuracy`` (the same function names).
  An answer whose arguments are not JSON is wrong and counted in ``tool_call_bad_arguments``.

Metrics over a subset are absent (not 0) when no reference falls in it. Light module: no torch, no pipeline
imports; numpy and rouge-score are imported on first use.
"""

from __future__ import annotations

import json
import re
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import cache
from typing import Any


def ratio(totals: Sequence[float]) -> float:
    """A rate from summed (hits, examples): 0 for no examples."""
    return totals[0] / totals[1] if totals[1] else 0.0


def _f1_from(t: Sequence[float]) -> float:
    return prf(t[0], t[1], t[2])[2]


# Metric -> (statistics it is rebuilt from, summed over examples) -> value. Every ratio is 0 on an empty set.
FROM_TOTALS: dict[str, Callable[[Sequence[float]], float]] = {
    "exact_match": ratio,
    "token_f1": ratio,
    "rougeL_f": ratio,
    "json_valid_rate": ratio,
    "json_field_precision": lambda t: prf(t[0], t[1], t[2])[0],
    "json_field_recall": lambda t: prf(t[0], t[1], t[2])[1],
    "json_field_f1": _f1_from,
    "tool_call_accuracy": ratio,
    "tool_name_accuracy": ratio,
}
# Metrics defined on a subset of examples, and the statistic that says an example belongs to it.
_SUBSET = {
    "json_valid_rate": "json",
    "json_field_precision": "json",
    "json_field_recall": "json",
    "json_field_f1": "json",
    "tool_call_accuracy": "tool",
    "tool_name_accuracy": "tool",
}
FREEFORM_METRICS = tuple(FROM_TOTALS)


# --------------------------------------------------------------------------------------------------
# Normalization and parsing


def normalize_text(text: str) -> str:
    """Whitespace-normalized text: stripped, every run of whitespace one space."""
    return " ".join(text.split())


_FENCE = re.compile(r"^```[A-Za-z0-9_-]*\s*\n?(.*?)\n?```$", re.DOTALL)


def parse_json(text: str) -> tuple[bool, Any]:
    """(parsed?, value) of a whole answer: stripped, and taken out of one Markdown code fence if it is in one."""
    stripped = text.strip()
    fenced = _FENCE.match(stripped)
    if fenced:
        stripped = fenced.group(1).strip()
    if not stripped:
        return False, None
    try:
        return True, json.loads(stripped)
    except ValueError:
        return False, None


def _as_structure(reference: Any) -> tuple[bool, Any]:
    """(is structured, value) of a reference: structured data as is, text parsed when it is JSON."""
    if isinstance(reference, (dict, list)):
        return True, reference
    return parse_json(str(reference))


def _canonical(value: Any) -> str:
    return json.dumps(value, sort_keys=True, ensure_ascii=False, separators=(",", ":"))


def _reference_text(reference: Any) -> str:
    """A reference as text (structured data as compact JSON), for token F1 and ROUGE-L."""
    if isinstance(reference, (dict, list)):
        return json.dumps(reference, ensure_ascii=False)
    return str(reference)


class BadArguments(ValueError):
    """A tool call whose ``arguments`` string is not JSON."""


def tool_calls(value: Any) -> list[tuple[str, Any]] | None:
    """The (function name, parsed arguments) of the tool calls in a value, or None when it holds none.

    Accepted forms (OpenAI's): one call ``{"name": ..., "arguments": "<json string>" | {...}}``, a call
    wrapped as ``{"type": "function", "function": {...}}``, a message ``{"tool_calls": [...]}`` (``content``
    then null), or a list of calls.

    Raises:
        BadArguments: A call's arguments are a string that is not JSON.
    """
    if isinstance(value, dict) and isinstance(value.get("tool_calls"), list):
        value = value["tool_calls"]
    items = value if isinstance(value, list) else [value]
    calls = []
    for item in items:
        if isinstance(item, dict) and isinstance(item.get("function"), dict):
            item = item["function"]
        if not (isinstance(item, dict) and isinstance(item.get("name"), str) and "arguments" in item):
            return None
        arguments = item["arguments"]
        if isinstance(arguments, str):
            try:
                arguments = json.loads(arguments) if arguments.strip() else {}
            except ValueError:
                raise BadArguments(f"arguments of {item['name']!r} are not JSON") from None
        calls.append((item["name"], arguments))
    return calls or None


def _leaves(value: Any, prefix: str = "") -> dict[str, str]:
    """Leaf fields of a JSON value as dotted path -> canonical JSON (lists are leaves)."""
    if isinstance(value, dict) and value:
        out: dict[str, str] = {}
        for key, item in value.items():
            out.update(_leaves(item, f"{prefix}{key}."))
        return out
    return {prefix.rstrip(".") or "$": _canonical(value)}


def tokens(text: str) -> list[str]:
    """Word tokens for token F1: runs of word characters after case folding (punctuation dropped)."""
    return re.findall(r"\w+", text.casefold())


# --------------------------------------------------------------------------------------------------
# Per-example metrics


def exact_match(reference: Any, answer: str) -> bool:
    """Equal after normalization; compared as parsed JSON when both are JSON."""
    structured, ref = _as_structure(reference)
    if structured:
        parsed, value = parse_json(answer)
        return parsed and _canonical(value) == _canonical(ref)
    return normalize_text(str(reference)) == normalize_text(answer)


def token_f1(reference: str, answer: str) -> float:
    """SQuAD-style token F1: overlap of token multisets; 1.0 when both are empty, 0.0 when one is."""
    ref, ans = tokens(reference), tokens(answer)
    if not ref or not ans:
        return float(ref == ans)
    common = sum((Counter(ref) & Counter(ans)).values())
    if not common:
        return 0.0
    precision, recall = common / len(ans), common / len(ref)
    return 2 * precision * recall / (precision + recall)


@cache
def _rouge_scorer() -> Any:
    from rouge_score import rouge_scorer  # imported on first use: freeform stays a light module

    # The Porter stemmer ("summarized" ~ "summarizes") is the setting most papers report.
    return rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)


def rouge_l(reference: str, prediction: str) -> tuple[float, float, float]:
    """ROUGE-L (precision, recall, F1) of one prediction: longest common subsequence of tokens."""
    score = _rouge_scorer().score(reference, prediction)["rougeL"]
    return score.precision, score.recall, score.fmeasure


def field_counts(reference: dict[str, Any], answer: Any) -> tuple[int, int, int]:
    """(TP, FP, FN) over leaf fields: a wrong value is both a false positive and a false negative."""
    gold = _leaves(reference)
    pred = _leaves(answer) if isinstance(answer, dict) else {}
    tp = sum(pred.get(path) == value for path, value in gold.items())
    return tp, len(pred) - tp, len(gold) - tp


def example_stats(reference: Any, answer: str) -> dict[str, tuple[float, ...]]:
    """Per metric, the numbers of one example that add up over examples (see ``FROM_TOTALS``).

    Also ``empty`` (1 for an empty answer), ``json``/``tool`` membership and ``bad_arguments``.
    """
    text = _reference_text(reference)
    structured, ref = _as_structure(reference)
    stats: dict[str, tuple[float, ...]] = {
        "exact_match": (float(exact_match(reference, answer)), 1.0),
        "token_f1": (token_f1(text, answer), 1.0),
        "rougeL_f": (rouge_l(text, answer)[2], 1.0),
        "empty": (float(not answer.strip()),),
    }
    try:
        ref_calls = tool_calls(ref) if structured else None
    except BadArguments:
        ref_calls = None  # a reference with broken arguments is not a tool call to score against
    parsed, value = parse_json(answer)
    if ref_calls is not None:
        bad = False
        try:
            ans_calls = tool_calls(value) if parsed else None
        except BadArguments:
            ans_calls, bad = None, True
        same = ans_calls is not None and sorted(_canonical(c) for c in ans_calls) == sorted(
            _canonical(c) for c in ref_calls
        )
        names = ans_calls is not None and sorted(n for n, _ in ans_calls) == sorted(n for n, _ in ref_calls)
        stats.update(
            tool_call_accuracy=(float(same), 1.0),
            tool_name_accuracy=(float(names), 1.0),
            bad_arguments=(float(bad),),
        )
    elif structured and isinstance(ref, dict):
        tp, fp, fn = field_counts(ref, value if parsed else None)
        stats.update(
            json_valid_rate=(float(parsed), 1.0),
            json_field_precision=(tp, fp, fn),
            json_field_recall=(tp, fp, fn),
            json_field_f1=(tp, fp, fn),
        )
    return stats


def prf(tp: float, fp: float, fn: float) -> tuple[float, float, float]:
    """(precision, recall, F1) from counts; 0 where a denominator is 0 (scikit-learn's zero_division=0)."""
    precision = tp / (tp + fp) if tp + fp else 0.0
    recall = tp / (tp + fn) if tp + fn else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return precision, recall, f1


# --------------------------------------------------------------------------------------------------
# Scoring a system, and comparing two


def metric_stats(references: Sequence[Any], answers: Sequence[str]) -> dict[str, list[tuple[float, ...]]]:
    """Per metric that applies to at least one example, its per-example statistics (zeros outside its subset).

    Every list has one entry per example, so two systems' lists pair up for the bootstrap.
    """
    if len(references) != len(answers):
        raise ValueError(f"{len(references)} references but {len(answers)} answers")
    per_example = [example_stats(r, a) for r, a in zip(references, answers, strict=True)]
    out: dict[str, list[tuple[float, ...]]] = {}
    for metric in FREEFORM_METRICS:
        if not any(metric in s for s in per_example):
            continue
        width = next(len(s[metric]) for s in per_example if metric in s)
        out[metric] = [s.get(metric, (0.0,) * width) for s in per_example]
    for extra in ("empty", "bad_arguments"):
        out[extra] = [s.get(extra, (0.0,)) for s in per_example]
    return out


def score_freeform(references: Sequence[Any], answers: Sequence[str]) -> dict[str, float]:
    """Every free-form metric that applies, plus the counts behind them.

    Counts: ``num_examples``, ``empty_answers``, ``json_references`` and ``tool_call_references`` (the
    examples the JSON and tool-call metrics are over, when there are any) and ``tool_call_bad_arguments``.
    """
    stats = metric_stats(references, answers)
    out = {m: FROM_TOTALS[m](_sum(stats[m])) for m in FREEFORM_METRICS if m in stats}
    out["num_examples"] = float(len(references))
    out["empty_answers"] = _sum(stats["empty"])[0]
    if "json_valid_rate" in stats:
        out["json_references"] = _sum(stats["json_valid_rate"])[1]
    if "tool_call_accuracy" in stats:
        out["tool_call_references"] = _sum(stats["tool_call_accuracy"])[1]
        out["tool_call_bad_arguments"] = _sum(stats["bad_arguments"])[0]
    return out


def _sum(rows: Sequence[tuple[float, ...]]) -> tuple[float, ...]:
    return tuple(float(sum(column)) for column in zip(*rows, strict=True)) if rows else ()


def paired_bootstrap_stats(
    stats_a: Sequence[Sequence[float]],
    stats_b: Sequence[Sequence[float]],
    from_totals: Callable[[Sequence[float]], float],
    *,
    samples: int = 1000,
    seed: int = 42,
) -> dict[str, Any]:
    """95% percentile interval of metric(a) - metric(b), resampling examples (pairs) with replacement.

    Both systems are scored on the same resampled examples, so example difficulty cancels out; each resample
    recomputes the metric from the summed per-example statistics.

    Returns:
        ``difference`` (on all examples), ``ci95`` [low, high], ``verdict`` ("better" when the interval is
        above 0, "worse" below, else "no significant difference"), ``samples`` and ``n``.
    """
    import numpy as np

    a, b = np.array(stats_a, dtype=float), np.array(stats_b, dtype=float)
    n = len(a)
    difference = from_totals(a.sum(axis=0)) - from_totals(b.sum(axis=0))
    rng = np.random.default_rng(seed)
    diffs: list[float] = []
    for start in range(0, samples if n else 0, 200):  # chunks keep memory at 200 x n x stats
        idx = rng.integers(0, n, size=(min(200, samples - start), n))
        diffs += [
            from_totals(ta) - from_totals(tb) for ta, tb in zip(a[idx].sum(axis=1), b[idx].sum(axis=1), strict=True)
        ]
    low, high = (float(np.percentile(diffs, q)) for q in (2.5, 97.5)) if n else (0.0, 0.0)
    verdict = "better" if low > 0 else "worse" if high < 0 else "no significant difference"
    return {"difference": float(difference), "ci95": [low, high], "verdict": verdict, "samples": samples, "n": n}


def compare_systems(
    references: Sequence[Any],
    answers: dict[str, Sequence[str]],
    *,
    samples: int = 1000,
    seed: int = 42,
) -> dict[str, dict[str, dict[str, Any]]]:
    """Paired-bootstrap intervals of every free-form metric: the fine-tune against the baseline and the base.

    Args:
        references: Per eval row, its reference (text or structured).
        answers: System -> answer text per row (a failed answer is the empty text: a wrong answer).
        samples: Bootstrap resamples.
        seed: Resampling seed.

    Returns:
        ``{"finetuned_vs_baseline": {metric: interval}, "finetuned_vs_base": {...}}`` for the systems present.
    """
    if "finetuned" not in answers:
        return {}
    stats = {system: metric_stats(references, texts) for system, texts in answers.items()}
    out = {}
    for other in ("baseline", "base"):
        if other not in stats:
            continue
        out[f"finetuned_vs_{other}"] = {
            metric: paired_bootstrap_stats(
                stats["finetuned"][metric], stats[other][metric], FROM_TOTALS[metric], samples=samples, seed=seed
            )
            for metric in FREEFORM_METRICS
            if metric in stats["finetuned"]
        }
    return out


def render_comparisons(comparisons: dict[str, dict[str, dict[str, Any]]]) -> list[str]:
    """The report's table of free-form metric differences with their intervals and verdicts."""
    if not comparisons:
        return []
    lines = ["| comparison | metric | difference | 95% CI | verdict |", "|---|---|---|---|---|"]
    for name, metrics in comparisons.items():
        for metric, c in metrics.items():
            low, high = c["ci95"]
            lines.append(
                f"| {name.replace('_', ' ')} | {metric} | {c['difference']:+.3f} | {low:+.3f} to {high:+.3f} | "
                f"{c['verdict']} |"
            )
    return lines


# --------------------------------------------------------------------------------------------------
# The hook for answer types: what a chat / text / json task plugs into its Task fields


@dataclass(frozen=True)
class FreeformScoring:
    """What a task with free-form answers uses: score, main metric and its per-example statistics.

    ``score(references, answers)`` takes the raw answer texts (a task's ``parse`` should keep the text).
    """

    main_metric: str
    table_metrics: tuple[str, ...]

    def score(self, references: Sequence[Any], answers: Sequence[str]) -> dict[str, float]:
        """Every free-form metric (``Task.score``)."""
        return score_freeform(references, answers)

    def example_stats(self, reference: Any, answer: str) -> tuple[float, ...]:
        """The main metric's statistics of one example (``Task.example_stats``); zeros outside its subset."""
        stats = example_stats(reference, answer)
        width = 3 if self.main_metric.startswith("json_field") else 2
        return stats.get(self.main_metric, (0.0,) * width)

    def main_from_totals(self, totals: Sequence[float]) -> float:
        """The main metric from summed statistics (``Task.main_from_totals``)."""
        return FROM_TOTALS[self.main_metric](totals)


ANSWER_TYPES = ("chat", "text", "json")


def freeform_scoring(answer_type: str) -> FreeformScoring:
    """The scoring of an answer type: ``text`` ranks by ROUGE-L, ``json`` by field F1, ``chat`` by token F1.

    Every free-form metric is reported for all three (``score``); only the main metric differs. A chat task
    whose references are tool calls gets ``tool_call_accuracy`` beside it.
    """
    shown = ("exact_match", "token_f1", "rougeL_f", "json_valid_rate", "json_field_f1", "tool_call_accuracy")
    main = {"text": "rougeL_f", "json": "json_field_f1", "chat": "token_f1"}
    if answer_type not in main:
        raise ValueError(f"answer type {answer_type!r} is not free-form; expected one of {ANSWER_TYPES}")
    return FreeformScoring(main[answer_type], (main[answer_type], *[m for m in shown if m != main[answer_type]]))
