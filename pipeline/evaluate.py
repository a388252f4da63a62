"""Evaluation: answer the eval split with each system, parse, score, compare, cost, report.

Local systems share one model: ``base`` is the fine-tune with its adapter switched off (exactly the 4-bit
base it was trained on), ``finetuned`` has it on. Generation (``pipeline.generation``) is greedy, batched with
left padding, and stops at an end-of-sequence token; an answer that reaches ``eval.max_new_tokens`` without
one is cut there and counted (``cut_at_max_new_tokens``), since a fine-tune that never stops is a failure
worth seeing. Local answers are kept in ``eval/generations/`` keyed by what they depend on, so re-scoring
reuses them.

``baseline`` is the commercial model of the recipe's baseline section (see ``pipeline.baseline``). With a
fine-tune and a baseline scored, the difference on the task's main metric gets a paired-bootstrap 95%
interval and a verdict; with prices, each system gets its $ per 1,000 examples and the report a
cost-of-ownership section (``pipeline.cost``). ``evaluate_run`` is the one path: ``train`` calls it at its end
and ``python -m pipeline evaluate --run`` calls it on an existing run.
"""

from __future__ import annotations

import contextlib
import json
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pipeline import rundir
from pipeline.baseline import run_baseline, snapshot_input
from pipeline.cost import cost_of_ownership, cost_per_1000_examples, render_cost_lines, save_cost_plot
from pipeline.data import PROMPT_RECORD, ValidatedData, rendering_differences, sft_example
from pipeline.errors import UsageError
from pipeline.freeform import compare_systems, paired_bootstrap_stats, render_comparisons
from pipeline.generation import (
    GENERATIONS,
    LOCAL_SYSTEMS,
    LocalModel,
    cached_generations,
    generate_local,
    generation_key,
)
from pipeline.judge import JudgeResult, judge_sentence, log_judge, report_lines, run_judge
from pipeline.recipe import Recipe
from pipeline.review import NOTE_TAG, run_note
from pipeline.runlookup import RunNotFound, resolve_run  # one lookup for evaluate --run and export (re-exported)
from pipeline.tasks import Task
from pipeline.taskspec import TaskSection

# Metrics shown in the terminal table and report, in this order.
TABLE_METRICS = (
    "micro_f1",
    "micro_precision",
    "micro_recall",
    "macro_f1",
    "exact_match",
    "invalid_code_rate",
)


def default_systems(recipe: Recipe) -> list[str]:
    """The systems an evaluation scores when none are named (``train``, and ``evaluate`` without ``--systems``).

    ``eval.systems`` when the recipe sets it; otherwise base and fine-tune, plus the baseline when the recipe
    has a baseline section. With ``send_data: false`` the baseline then sends nothing and the report says it
    was skipped and why, instead of leaving it out without a word.
    """
    if "systems" in recipe.eval.model_fields_set:
        return list(recipe.eval.systems)
    return list(recipe.eval.systems) + (["baseline"] if recipe.baseline is not None else [])


@dataclass
class EvalResult:
    """What an evaluation produced (also written to ``eval/``)."""

    metrics: dict[str, dict[str, Any]]
    comparison: dict[str, Any] | None
    baseline: dict[str, Any] | None
    cost: dict[str, Any] | None
    eval_dir: Path
    judge: dict[str, Any] | None = None
    freeform: dict[str, Any] | None = None


def evaluate_run(
    recipe: Recipe,
    run_dir: str | Path,
    data: ValidatedData,
    task: Task,
    fmt: str,
    *,
    systems: list[str] | None = None,
    local: LocalModel | Callable[[], LocalModel] | None = None,
    tracker: Any = None,
    device: str = "cpu",
    reuse_previous: bool = False,
) -> EvalResult:
    """Score each system on the eval split, compare, cost, and write ``eval/`` (the one evaluation path).

    ``train`` calls it at its end with the model in memory; ``python -m pipeline evaluate`` calls it on an
    existing run with a loader that builds the model only if a local system has no cached generations.

    Args:
        recipe: The recipe (eval, baseline, cost and privacy sections are read).
        run_dir: The run directory; ``eval/`` is written there.
        data: The validated splits. Only ``data.eval.rows`` (and few-shot ``data.train.rows``) are used.
        task: The task (prompt, parser, metrics).
        fmt: Prompt format of the run ('chat' or 'plain').
        systems: Systems to score; ``default_systems(recipe)`` if None.
        local: The local model, or a function that loads it on first need.
        tracker: ``tracking.Tracker`` of the run, or None.
        device: Where local generation runs (named in the cost section).
        reuse_previous: Also report systems not asked for whose answers are all cached: local generations, and
            the baseline's cached answers (nothing is sent for a system not asked for).

    Returns:
        Metrics per system, the fine-tune/baseline comparison, the baseline summary and the cost block.
    """
    run_dir = Path(run_dir)
    eval_dir = run_dir / "eval"
    wanted = list(systems or default_systems(recipe))
    rows = data.eval.rows
    if recipe.eval.max_examples is not None:
        rows = rows[: recipe.eval.max_examples]
    examples = [sft_example(row, task, fmt) for row in rows]  # type: ignore[arg-type]

    outputs = local_outputs(recipe, run_dir, examples, wanted, local, reuse_previous=reuse_previous)
    baseline_summary = None
    if recipe.baseline is not None and ("baseline" in wanted or reuse_previous):
        baseline_summary, baseline_outputs = baseline_answers(recipe, run_dir, task, rows, data.train.rows, wanted)
        if baseline_outputs is not None:
            outputs["baseline"] = baseline_outputs

    metrics = {system: score_system(task, rows, outs) for system, outs in outputs.items()}
    cost = cost_of_ownership(recipe, metrics, device)
    for system, values in metrics.items():
        per_1000 = cost_per_1000_examples(recipe, system, values)
        if per_1000 is not None:
            values["cost_per_1000_examples"] = per_1000
    comparison = None
    if "finetuned" in outputs and "baseline" in outputs:
        comparison = paired_bootstrap(
            task,
            [task.gold(row) for row in rows],
            [task.parse(o["text"]) for o in outputs["finetuned"]],
            [task.parse(o["text"]) for o in outputs["baseline"]],
            samples=recipe.eval.bootstrap_samples,
            seed=recipe.training.seed,
        )

    freeform = freeform_comparisons(recipe, task, rows, outputs)
    judged = None
    if recipe.judge is not None:
        judged = run_judge(
            recipe.judge,
            task,
            rows,
            outputs,
            allowed_hosts=recipe.privacy.allowed_hosts,
            contract=data.contract,
            cache_dir=recipe.judge.cache_dir or run_dir / "judge_cache",
            eval_dir=eval_dir,
            samples=recipe.eval.bootstrap_samples,
            seed=recipe.training.seed,
        )
    extra = {"freeform_comparisons": freeform, "judge": judged.summary if judged else None}
    write_outputs(
        eval_dir,
        task,
        rows,
        outputs,
        metrics,
        comparison=comparison,
        baseline=baseline_summary,
        cost=cost,
        extra=extra,
        judged=judged,
    )
    print_summary(task, metrics, comparison, cost)
    if freeform:
        print("\n".join(render_comparisons(freeform)))
    if judged is not None:
        print(judge_sentence(judged.summary))
    if tracker is not None:
        log_to_tracker(tracker, metrics, comparison, cost, eval_dir)
        if judged is not None:
            log_judge(tracker, judged)
        snapshot = snapshot_input(baseline_summary)
        if snapshot is not None:
            tracker.log_inputs([snapshot])
    return EvalResult(metrics, comparison, baseline_summary, cost, eval_dir, extra["judge"], freeform)


def freeform_comparisons(
    recipe: Recipe, task: Task, rows: list[dict[str, Any]], outputs: dict[str, list[dict[str, Any]]]
) -> dict[str, Any] | None:
    """Every free-form metric's paired-bootstrap interval, fine-tune against baseline and base (free-form tasks)."""
    if task.freeform_reference is None or "finetuned" not in outputs:
        return None
    references = [task.freeform_reference(row) for row in rows]
    # The task's parse keeps a free-form answer's text; a chat answer's tool calls become the reference's JSON.
    answers = {system: [task.parse(o["text"]) for o in outs] for system, outs in outputs.items()}
    samples, seed = recipe.eval.bootstrap_samples, recipe.training.seed
    return compare_systems(references, answers, samples=samples, seed=seed) or None


def local_outputs(
    recipe: Recipe,
    run_dir: Path,
    examples: list[dict[str, Any]],
    wanted: list[str],
    local: LocalModel | Callable[[], LocalModel] | None,
    *,
    reuse_previous: bool,
) -> dict[str, list[dict[str, Any]]]:
    """Answers of the local systems asked for (and, with ``reuse_previous``, of those fully cached).

    Cached generations are reused; the rest are generated (loading the model on first need) and cached.
    """
    adapter = run_dir / "adapter" / "adapter_model.safetensors"
    adapter_sha = rundir.sha256_file(adapter) if adapter.is_file() else None
    outputs: dict[str, list[dict[str, Any]]] = {}
    loaded: LocalModel | None = local if isinstance(local, LocalModel) else None
    for system in [s for s in LOCAL_SYSTEMS if s in wanted or reuse_previous]:
        keys = [generation_key(recipe, system, ex, adapter_sha) for ex in examples]
        path = run_dir / "eval" / GENERATIONS / f"{system}.jsonl"
        cached = cached_generations(path, keys)
        if cached is not None:
            print(f"Evaluating {system}: {len(cached)} generations reused from {path}")
            outputs[system] = cached
            continue
        if system not in wanted:
            continue
        if loaded is None:
            if local is None:
                raise ValueError(f"{system}: no cached generations in {path} and no model to generate with")
            loaded = local()  # type: ignore[operator]
        print(f"Evaluating {system} on {len(examples)} eval rows")
        outputs[system] = generate_local(loaded, system, examples, recipe.eval)
        rundir.write_jsonl(path, [{"key": k, **o} for k, o in zip(keys, outputs[system], strict=True)])
    return outputs


def baseline_answers(
    recipe: Recipe,
    run_dir: Path,
    task: Task,
    rows: list[dict[str, Any]],
    train_rows: list[dict[str, Any]],
    wanted: list[str],
) -> tuple[dict[str, Any] | None, list[dict[str, Any]] | None]:
    """(summary, answers) of the recipe's baseline; only its cached answers when it was not asked for.

    The summary is None when the baseline was not re-scored (not asked for and not all answers cached).
    """
    assert recipe.baseline is not None
    result = run_baseline(
        recipe.baseline,
        task,
        rows,
        train_rows=train_rows,
        allowed_hosts=recipe.privacy.allowed_hosts,
        cache_dir=recipe.baseline.cache_dir or run_dir / "baseline_cache",
        eval_dir=run_dir / "eval",
        seed=recipe.training.seed,
        cache_only="baseline" not in wanted,
    )
    summary = None
    if result.status == "not_cached":
        print(f"Baseline not re-scored: {result.reason} (add --systems baseline to ask the rest)")
    else:
        summary = result.summary
    if result.outputs is not None and "baseline" not in wanted:
        print(f"Evaluating baseline: {len(result.outputs)} answers reused from its cache, nothing sent")
    return summary, result.outputs


def print_summary(
    task: Task, metrics: dict[str, dict[str, Any]], comparison: dict[str, Any] | None, cost: dict[str, Any] | None
) -> None:
    """The terminal's view of eval/report.md: quality and operations tables, the verdict, the cost block."""
    print(render_table(metrics, task.table_metrics))
    print(render_ops_table(metrics))
    if usage_warning(metrics):
        print(usage_warning(metrics))
    if comparison is not None:
        print(comparison_sentence(comparison))
    if cost is not None:
        print("Cost of ownership:\n" + "\n".join(render_cost_lines(cost)))


def score_system(task: Task, rows: list[dict[str, Any]], outputs: list[dict[str, Any]]) -> dict[str, Any]:
    """Task metrics plus the operational numbers of one system.

    A baseline example that failed after its retries counts as a wrong (empty) answer and in ``failed``: it
    keeps the comparison paired and shows what production would have got.
    """
    golds = [task.gold(row) for row in rows]
    preds = [task.parse(o["text"]) for o in outputs]
    metrics: dict[str, Any] = dict(task.score(golds, preds))
    answered = [o for o in outputs if "error" not in o]
    latencies = [o["latency_s"] for o in answered if o.get("latency_s") is not None]
    metrics.update(
        {
            "failed": float(len(outputs) - len(answered)),
            "cut_at_max_new_tokens": float(sum(not o["stopped"] for o in answered)),
            "tokens_in": float(sum(o["tokens_in"] for o in outputs)),
            "tokens_out": float(sum(o["tokens_out"] for o in outputs)),
            "latency_p50_s": percentile(latencies, 50),
            "latency_p95_s": percentile(latencies, 95),
        }
    )
    if any("seconds" in o for o in outputs):
        metrics["generation_seconds"] = float(sum(o.get("seconds", 0.0) for o in outputs))
    if any("usage_reported" in o for o in answered):
        # An API answer without token usage counts 0 tokens: its cost is missing, so costs are lower bounds.
        metrics["usage_not_reported"] = float(sum(o.get("usage_reported") is False for o in answered))
    return metrics


def percentile(values: Sequence[float], q: float) -> float:
    """The ``q``-th percentile (0 to 100) of ``values``, 0.0 when there are none.

    Linear interpolation between the closest ranks (numpy's default method; ``statistics.quantiles`` with
    ``method="inclusive"`` defines the same number but rounds differently in the last bits). Used for the
    latency p50/p95 and the bootstrap interval alike.
    """
    if len(values) == 0:
        return 0.0
    import numpy as np

    return float(np.percentile(values, q))


def usage_warning(metrics: dict[str, dict[str, Any]]) -> str | None:
    """The sentence saying that API costs are lower bounds because answers came without token usage, or None."""
    missing = metrics.get("baseline", {}).get("usage_not_reported", 0)
    if not missing:
        return None
    return (
        f"{missing:.0f} baseline answers came without token usage from the provider: their tokens count as 0, so "
        "the baseline's tokens and $ figures are lower bounds (marked >=)."
    )


# --------------------------------------------------------------------------------------------------
# Comparison: paired bootstrap of fine-tune minus baseline on the main metric


def paired_bootstrap(
    task: Task, golds: list[Any], preds_a: list[Any], preds_b: list[Any], *, samples: int = 1000, seed: int = 42
) -> dict[str, Any]:
    """95% percentile interval of main_metric(a) - main_metric(b), resampling examples with replacement.

    Both systems are scored on the same resampled examples (paired), so example difficulty cancels out. Each
    resample recomputes the main metric from per-example numbers that add up (``task.example_stats``), e.g.
    micro-F1 from summed TP/FP/FN, exactly as the full-data metric is computed.

    Returns:
        The interface of eval/metrics.json ``comparison``: metric, a, b, difference (on all examples),
        ci95 [low, high], verdict ("better" when the interval is above 0, "worse" below, else "no significant
        difference"), plus samples and n.
    """
    assert task.example_stats is not None and task.main_from_totals is not None
    stats_a = [task.example_stats(g, p) for g, p in zip(golds, preds_a, strict=True)]
    stats_b = [task.example_stats(g, p) for g, p in zip(golds, preds_b, strict=True)]
    interval = paired_bootstrap_stats(stats_a, stats_b, task.main_from_totals, samples=samples, seed=seed)
    return {"metric": task.main_metric, "a": "finetuned", "b": "baseline", **interval}


def comparison_sentence(comparison: dict[str, Any]) -> str:
    """The verdict in words, e.g. 'The fine-tune is better than the baseline on micro_f1: +0.120 (95% CI ...)'."""
    low, high = comparison["ci95"]
    words = {
        "better": "is better than",
        "worse": "is worse than",
        "no significant difference": "shows no significant difference from",
    }[comparison["verdict"]]
    return (
        f"The fine-tune {words} the baseline on {comparison['metric']}: {comparison['difference']:+.3f} "
        f"(95% CI {low:+.3f} to {high:+.3f}, paired bootstrap, {comparison['samples']} resamples of "
        f"{comparison['n']} examples)"
    )


# --------------------------------------------------------------------------------------------------
# Outputs


def write_outputs(
    eval_dir: Path,
    task: Task,
    rows: list[dict[str, Any]],
    outputs: dict[str, list[dict[str, Any]]],
    metrics: dict[str, dict[str, Any]],
    *,
    comparison: dict[str, Any] | None = None,
    baseline: dict[str, Any] | None = None,
    cost: dict[str, Any] | None = None,
    extra: dict[str, Any] | None = None,
    judged: JudgeResult | None = None,
) -> None:
    """predictions.jsonl, metrics.json, report.md, and the per-label F1 and cost plots.

    ``extra``: more blocks of metrics.json (``freeform_comparisons``, ``judge``); ``judged``: the judge's
    records, for the report's side-by-side examples where the fine-tune loses.
    """
    predictions = []
    for system, outs in outputs.items():
        for row, out in zip(rows, outs, strict=True):
            record = {
                "system": system,
                "id": row.get("id"),
                "row": row["_row"],
                "gold": task.gold(row),
                "predicted": task.parse(out["text"]),
                "answer": out["text"],
                "stopped": out["stopped"],
            }
            if "error" in out:
                record["error"] = out["error"]
            predictions.append(record)
    rundir.write_jsonl(eval_dir / "predictions.jsonl", predictions)
    golds = [task.gold(row) for row in rows]
    parsed = {s: [task.parse(o["text"]) for o in outs] for s, outs in outputs.items()}
    per_label = {s: task.per_label(golds, p) for s, p in parsed.items()} if task.per_label else {}
    document: dict[str, Any] = {"main_metric": task.main_metric, "systems": metrics, "per_label": per_label}
    if task.extras is not None:
        document["details"] = {s: task.extras(golds, p) for s, p in parsed.items()}
    if comparison is not None:
        document["comparison"] = comparison
    if baseline is not None:
        document["baseline"] = baseline
    if cost is not None:
        document["cost"] = cost
    document.update({k: v for k, v in (extra or {}).items() if v is not None})
    rundir.write_json(eval_dir / "metrics.json", document)
    report = render_report(task, metrics, per_label, document)
    if document.get("freeform_comparisons"):
        report += "\n## Free-form metrics: the fine-tune against the baseline and the base\n\n"
        report += "\n".join(render_comparisons(document["freeform_comparisons"])) + "\n"
    if judged is not None:
        report += "\n" + "\n".join(report_lines(judged, task, rows))
    rundir.write_text(eval_dir / "report.md", report)
    if per_label:
        save_per_label_plot(eval_dir / "per_label_f1.png", per_label)
    if cost is not None:
        save_cost_plot(eval_dir / "cost.png", cost)


def render_table(metrics: dict[str, dict[str, Any]], table_metrics: tuple[str, ...] = ()) -> str:
    """Systems x quality metrics as a Markdown table (also printed in the terminal)."""
    columns = [m for m in (table_metrics or TABLE_METRICS) if all(m in v for v in metrics.values())]
    columns += ["cut_at_max_new_tokens", "latency_p50_s"]
    header = "| system | " + " | ".join(columns) + " |"
    rule = "|---" * (len(columns) + 1) + "|"
    lines = [header, rule]
    for system, values in metrics.items():
        cells = [f"{values[c]:.3f}" if c != "cut_at_max_new_tokens" else f"{values[c]:.0f}" for c in columns]
        lines.append(f"| {system} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def render_ops_table(metrics: dict[str, dict[str, Any]]) -> str:
    """Systems x operational numbers: failures, latency p50/p95, tokens in/out, $ per 1,000 examples."""
    lines = [
        "| system | examples | failed | cut at max tokens | latency p50 (s) | latency p95 (s) | tokens in | "
        "tokens out | $ per 1,000 examples |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for system, v in metrics.items():
        price = v.get("cost_per_1000_examples")
        bound = ">=" if v.get("usage_not_reported") else ""  # answers without token usage count no cost
        lines.append(
            f"| {system} | {v.get('num_examples', 0):.0f} | {v['failed']:.0f} | {v['cut_at_max_new_tokens']:.0f} | "
            f"{v['latency_p50_s']:.3f} | {v['latency_p95_s']:.3f} | "
            f"{bound}{v['tokens_in']:,.0f} | {bound}{v['tokens_out']:,.0f} | "
            + (f"{bound}{price:.4f}" if price is not None else "n/a")
            + " |"
        )
    return "\n".join(lines)


def render_report(
    task: Task,
    metrics: dict[str, dict[str, Any]],
    per_label: dict[str, dict[str, Any]],
    document: dict[str, Any] | None = None,
) -> str:
    """eval/report.md: quality, the comparison with its interval, operations, egress, cost, weakest labels."""
    document = document or {}
    lines = [f"# Evaluation: {task.name}", "", "## Quality", "", render_table(metrics, task.table_metrics), ""]
    if "base" in metrics and "finetuned" in metrics:
        diff = metrics["finetuned"][task.main_metric] - metrics["base"][task.main_metric]
        lines += [f"Fine-tune minus base on {task.main_metric}: {diff:+.3f}", ""]
    baseline = document.get("baseline")
    comparison = document.get("comparison")
    lines += ["## Fine-tune versus the baseline", ""]
    if comparison is not None:
        lines += [f"**{comparison['verdict']}**. {comparison_sentence(comparison)}.", ""]
        failed = metrics.get("baseline", {}).get("failed", 0)
        if failed:
            lines += [f"{failed:.0f} baseline examples failed after their retries and are scored as wrong answers.", ""]
    elif baseline is not None and baseline.get("status") == "skipped":
        lines += [f"The baseline ({baseline['provider']}/{baseline['model']}) was skipped: {baseline['reason']}.", ""]
    else:
        lines += ["No comparison: the fine-tune and a baseline were not both scored.", ""]
    lines += ["## Operations", "", render_ops_table(metrics), ""]
    if usage_warning(metrics):
        lines += [usage_warning(metrics), ""]
    if baseline is not None and baseline.get("status") == "ok" and baseline.get("source") == "snapshot":
        reported = ", ".join(baseline.get("models_reported") or []) or "not recorded"
        lines += [
            "## Baseline from its snapshot",
            "",
            f"- {baseline['answered']} answers of {baseline['provider']} `{baseline['model']}` (model id reported by "
            f"the provider: {reported}) from `{baseline['snapshot']}` (SHA-256 {baseline['snapshot_sha256'][:16]}...). "
            "Nothing was sent and no key was used.",
            "",
        ]
    elif baseline is not None and baseline.get("status") == "ok":
        kinds = ", ".join(f"{k} {v}" for k, v in baseline["failures_by_kind"].items()) or "none"
        lines += [
            "## What was sent",
            "",
            f"- Endpoint: {baseline['provider']} `{baseline['model']}` at host `{baseline['host']}` "
            f"(key from the environment variable `{baseline['api_key_env']}`).",
            f"- Eval rows sent in this evaluation: {baseline['rows_sent']}, few-shot train rows: "
            f"{baseline['few_shot_rows_sent']}; distinct rows ever sent from this run: "
            f"{baseline['rows_sent_all_runs']}. SHA-256 of each in `{baseline['sent_log']}`.",
            f"- Requests {baseline['requests_sent']}, answers from the cache {baseline['answers_from_cache']}, "
            f"retries {baseline['retries']}, failed examples {baseline['failed']} ({kinds}).",
        ]
        if baseline.get("snapshot"):
            lines.append(
                f"- Every answer is kept in the snapshot `{baseline['snapshot']}` ({baseline.get('snapshot_added', 0)} "
                "added now; `baseline.snapshot` scores from it alone)."
                + (f" It could not be written: {baseline['snapshot_error']}." if baseline.get("snapshot_error") else "")
            )
        lines.append("")
    cost = document.get("cost")
    if cost is not None:
        lines += ["## Cost of ownership", "", *render_cost_lines(cost), "", "![cost](cost.png)", ""]
    details = document.get("details") or {}
    for system, extra in details.items():
        matrix = extra.get("confusion_matrix")
        if matrix:
            predicted = sorted({p for row in matrix.values() for p in row})
            lines += [f"## Confusion matrix ({system}; rows gold, columns predicted)", ""]
            lines += ["| gold \\ predicted | " + " | ".join(predicted) + " |", "|---" * (len(predicted) + 1) + "|"]
            lines += [
                f"| {gold} | " + " | ".join(str(row.get(p, 0)) for p in predicted) + " |"
                for gold, row in matrix.items()
            ]
            lines.append("")
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


def log_to_tracker(
    tracker: Any,
    metrics: dict[str, dict[str, Any]],
    comparison: dict[str, Any] | None,
    cost: dict[str, Any] | None,
    eval_dir: Path,
) -> None:
    """MLflow: ``eval.<system>.<metric>``, the comparison and cost numbers, a comparison table, ``eval/``."""
    for system, values in metrics.items():
        tracker.log_metrics({f"eval.{system}.{name}": value for name, value in values.items()})
    if comparison is not None:
        tracker.log_metrics(
            {
                "eval.comparison.difference": comparison["difference"],
                "eval.comparison.ci95_low": comparison["ci95"][0],
                "eval.comparison.ci95_high": comparison["ci95"][1],
            }
        )
        tracker.set_tags({"eval.comparison.verdict": comparison["verdict"]})
    if cost is not None:
        flat = {}
        for side in ("self_hosted", "api"):
            for key, value in (cost.get(side) or {}).items():
                flat[f"cost.{side}.{key}"] = value
        if cost.get("break_even_cases_per_month") is not None:
            flat["cost.break_even_cases_per_month"] = cost["break_even_cases_per_month"]
        tracker.log_metrics(flat)
    # One row per system. mlflow appends to an existing table, so a re-evaluation adds rows, dated.
    names = sorted({name for values in metrics.values() for name in values})
    stamp = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    table: dict[str, list[Any]] = {"system": list(metrics), "evaluated_at": [stamp] * len(metrics)}
    table.update({name: [metrics[s].get(name) for s in metrics] for name in names})
    tracker.log_table(table, "eval/comparison_table.json")
    tracker.log_artifact(eval_dir)


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


# --------------------------------------------------------------------------------------------------
# Re-scoring an existing run (`python -m pipeline evaluate RECIPE --run RUN`)


class RunMismatch(UsageError):
    """The recipe (or its eval split) is not the one the run was trained with: one line per difference."""

    def __init__(self, problems: list[str]):
        self.problems = problems
        super().__init__("\n".join(problems))

    def lines(self) -> list[str]:
        """One ``error:`` line per difference."""
        return list(self.problems)


def check_run_matches(
    recipe: Recipe, run_dir: Path, data: ValidatedData, rendering: dict[str, Any] | None = None
) -> None:
    """Refuse to re-score a run with a recipe or eval split other than the ones it was trained with.

    ``rendering`` is how the recipe renders prompts now (``data.prompt_rendering``): a run is scored on the
    prompts it learned, so any difference from its ``prompt.json`` (a template, the label set, the prompt
    format, the chat template) is refused, key by key.

    Raises:
        RunMismatch: Naming the key (task, model.path, data.eval, task.user_prompt...) and both values.
    """
    resolved = run_dir / "recipe.resolved.yaml"
    if not resolved.is_file():
        raise RunNotFound(f"{run_dir}: no recipe.resolved.yaml; is this a run directory?")
    import yaml

    ran = yaml.safe_load(resolved.read_text(encoding="utf-8"))
    problems = [
        f"{key}: the run used {old!r}, the recipe says {new!r}"
        for key, old, new in (
            ("task", TaskSection.model_validate(ran.get("task")).name, recipe.task.name),
            ("model.path", ran.get("model", {}).get("path"), recipe.model.path),
        )
        if old != new
    ]
    recorded = run_dir / PROMPT_RECORD
    if rendering is not None and recorded.is_file():
        problems += rendering_differences(rundir.read_json(recorded)["rendering"], rendering)
    report = run_dir / "validation" / "report.json"
    if report.is_file():
        before = json.loads(report.read_text(encoding="utf-8"))["splits"].get("eval", {}).get("sha256")
        if before and before != data.eval.sha256:
            problems.append(
                f"data.eval: {data.eval.path} changed since the run (SHA-256 {before[:12]}... then, "
                f"{data.eval.sha256[:12]}... now); score the split the run was evaluated on"
            )
    if problems:
        raise RunMismatch([f"{run_dir}: {p}" for p in problems])


def check_adapter_files(adapter: Path) -> None:
    """Name a corrupt or truncated adapter and the fix here, before PEFT and safetensors fail inside themselves.

    Cheap: the config is parsed and the weights' header checked against the file size (no tensor is read).

    Raises:
        RunNotFound: Naming the file, what is wrong and what to do (exit 2).
    """
    from pipeline.weights import ADAPTER_CONFIG, ADAPTER_WEIGHTS, ExportInputError, ShardReader

    fix = f"re-run training, or restore {adapter} from the MLflow run's 'adapter' artifact"
    try:
        json.loads((adapter / ADAPTER_CONFIG).read_text(encoding="utf-8"))
    except ValueError as exc:
        raise RunNotFound(f"{adapter / ADAPTER_CONFIG}: adapter config is corrupt ({exc}); {fix}") from None
    try:
        ShardReader(adapter / ADAPTER_WEIGHTS, "adapter weights", fix).close()
    except ExportInputError as exc:
        raise RunNotFound(str(exc)) from None


def _run_tokenizer(recipe: Recipe, run_dir: Path) -> Any:
    """The tokenizer saved with the run's adapter (the one it trained with), else the base's."""
    from pipeline.model import load_tokenizer, resolve_model_path

    adapter = run_dir / "adapter"
    if (adapter / "tokenizer_config.json").is_file():
        return load_tokenizer(adapter)
    return load_tokenizer(resolve_model_path(recipe.model.path, recipe.model.revision))


def load_local_model(recipe: Recipe, run_dir: Path) -> LocalModel:
    """The 4-bit base with the run's adapter, for generating what the run has not cached."""
    from peft import PeftModel

    from pipeline.env import gather
    from pipeline.model import device_for, eos_token_ids, load_base, load_tokenizer, resolve_model_path

    adapter = run_dir / "adapter"
    if not (adapter / "adapter_config.json").is_file():
        raise RunNotFound(f"{adapter}: no adapter here (the run did not finish training); train again")
    check_adapter_files(adapter)
    model_dir = resolve_model_path(recipe.model.path, recipe.model.revision)
    device = device_for(recipe, gather())
    print(f"Loading {model_dir} with the adapter {adapter} on {device}", flush=True)
    tokenizer = load_tokenizer(adapter)
    model = PeftModel.from_pretrained(load_base(recipe, model_dir, device), adapter)
    return LocalModel(model, tokenizer, eos_token_ids(tokenizer, model), device)


def evaluate_existing(
    recipe: Recipe, run: str, *, systems: list[str] | None = None, recipe_source: str | Path = "recipe"
) -> tuple[EvalResult, Path, str | None]:
    """Re-score a run: reuse its cached generations, add systems, write eval/ and log to the same MLflow run.

    Returns:
        The evaluation, the run directory and the MLflow run id.
    """
    import tempfile

    from pipeline.data import prompt_format, prompt_rendering, task_for, validate_data
    from pipeline.model import tokenizer_or_reason
    from pipeline.tracking import Tracker, tracking_uri

    run_dir, run_id = resolve_run(run, tracking_uri(recipe), flag="--run ")
    with tempfile.TemporaryDirectory(prefix="pipeline-revalidate-") as scratch:
        data = validate_data(recipe, scratch, tokenizer_or_reason, recipe_source)
    task = task_for(recipe, data.contract, recipe_source)
    plan = rundir.read_json(run_dir / "plan.json")
    fmt, device = plan.get("prompt_format"), plan.get("device", "cpu")
    tokenizer = _run_tokenizer(recipe, run_dir)
    fmt = fmt or prompt_format(recipe, tokenizer)
    check_run_matches(recipe, run_dir, data, prompt_rendering(recipe, task, fmt, tokenizer))
    tracker = Tracker(recipe, run_name=run_dir.name, run_dir=run_dir, run_id=run_id)
    if run_id is None:
        tracker.set_tags({"run_dir": str(run_dir), "task": recipe.task.name})
    # A run this command created is closed FINISHED/FAILED by the context manager; an existing training run
    # keeps the status its training gave it.
    with tracker if run_id is None else contextlib.nullcontext(tracker):
        result = evaluate_run(
            recipe,
            run_dir,
            data,
            task,
            fmt,
            systems=systems,
            local=lambda: load_local_model(recipe, run_dir),
            tracker=tracker,
            device=device,
            reuse_previous=True,
        )
        registered = rundir.read_json(run_dir / "summary.json").get("registered_model")
        adapter = str(run_dir / "adapter") if (run_dir / "adapter").is_dir() else None
        tracker.set_tags({NOTE_TAG: run_note(rundir.read_json(result.eval_dir / "metrics.json"), adapter, registered)})
    return result, run_dir, tracker.run_id
