"""The model card (README.md) of an export: what the model is, its license, data, training, evaluation, merge.

Counts and hashes only: no row of the data is ever written into a card.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from pipeline import rundir
from pipeline.recipe import Recipe


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, list):
        return ", ".join(_fmt(v) for v in value)
    return str(value)


def _eval_section(metrics_json: dict[str, Any]) -> list[str]:
    """The evaluation table (systems x metrics, main metric first), the baseline verdict, and the cost."""
    systems = metrics_json.get("systems") or {}
    if not systems:
        return ["No evaluation results were found in the run.", ""]
    main = metrics_json.get("main_metric")
    names = [
        m for m in dict.fromkeys([main, *next(iter(systems.values()))]) if m and all(m in v for v in systems.values())
    ]
    names = [m for m in names if all(isinstance(v[m], (int, float)) for v in systems.values())][:8]
    lines = ["| system | " + " | ".join(names) + " |", "|---" * (len(names) + 1) + "|"]
    lines += [f"| {s} | " + " | ".join(_fmt(float(v[m])) for m in names) + " |" for s, v in systems.items()]
    lines.append("")
    comparison = metrics_json.get("comparison")
    if comparison:
        lines.append(
            f"Against the baseline on {comparison.get('metric', main)}: {comparison.get('a', 'finetuned')} minus "
            f"{comparison.get('b', 'baseline')} = {_fmt(comparison.get('difference'))} (95% CI "
            f"{_fmt(comparison.get('ci95'))}): **{comparison.get('verdict')}**."
        )
        lines.append("")
    baseline = metrics_json.get("baseline")
    if baseline and baseline.get("status") != "ok":
        lines += [f"Baseline: {baseline.get('status')} ({baseline.get('reason', '')}).", ""]
    cost = metrics_json.get("cost")
    if cost:
        from pipeline.cost import render_cost_lines  # the same table as the run's eval/report.md

        lines += ["### Cost", "", *render_cost_lines(cost), ""]
    return lines


def model_card(
    recipe: Recipe,
    run_dir: Path,
    *,
    model_name: str,
    kind: str,
    ack: dict[str, Any],
    lic: Any,
    mlflow_run_id: str | None,
    merge_report: dict[str, Any] | None = None,
    verification: dict[str, Any] | None = None,
    serving: dict[str, Any] | None = None,
) -> str:
    """README.md of an export.

    Sections: base, license and obligations, data contract summary (counts only, no rows), training settings,
    evaluation incl. baseline and cost, merge verification, serving (``serving.serving_report``: whether vLLM
    loads the adapter, and the commands), intended use, limitations, the MLflow run id.
    """
    validation = rundir.read_json(run_dir / "validation" / "report.json")
    metrics_json = rundir.read_json(run_dir / "eval" / "metrics.json")
    summary = rundir.read_json(run_dir / "summary.json")
    lines = _header(recipe, model_name=model_name, kind=kind, lic=lic, mlflow_run_id=mlflow_run_id)
    lines += _license_section(ack, lic)
    lines += _data_section(validation)
    lines += _settings_section(recipe, summary)
    lines += ["## Evaluation", "", *_eval_section(metrics_json)]
    if merge_report:
        lines += _merge_section(merge_report)
    if verification:
        lines += _verification_section(verification)
    if serving:
        lines += _serving_section(serving)
    lines += _use_and_limitations(recipe, kind, validation, metrics_json)
    return "\n".join(lines) + "\n"


def _header(recipe: Recipe, *, model_name: str, kind: str, lic: Any, mlflow_run_id: str | None) -> list[str]:
    """The YAML front matter (license, base, library, tags), the title, and what the model is."""
    from pipeline import __version__

    license_tag = lic.id if lic else "other"
    lines = [
        "---",
        f"license: {license_tag}",
        f"base_model: {recipe.model.path}",
        f"library_name: {'peft' if kind == 'adapter' else 'transformers'}",
        f"tags: [pipeline, qlora, {recipe.task.name}]",
        "---",
        "",
        f"# {model_name}",
        "",
    ]
    if lic and lic.attribution:
        lines += [f"**{lic.attribution}**", ""]
    what = "A LoRA adapter (PEFT format)" if kind == "adapter" else "Merged weights (base + LoRA adapter)"
    return lines + [
        f"{what}, fine-tuned from `{recipe.model.path}` for the `{recipe.task.name}` task with pipeline {__version__} "
        f"(4-bit QLoRA). {recipe.description or ''}".rstrip(),
        "",
        f"- MLflow run: `{mlflow_run_id or 'not tracked'}`",
        f"- Base model revision: `{recipe.model.revision or 'local copy'}`",
        "",
    ]


def _license_section(ack: dict[str, Any], lic: Any) -> list[str]:
    """The base's license, its obligations and use policy, and when the recipe accepted them."""
    lines = [
        "## License",
        "",
        f"Base model license: {ack['license_name']} (`{ack['license']}`)"
        + (f", full text at {ack['license_url']}" if ack.get("license_url") else "")
        + ". The license files of the base and a NOTICE file are shipped next to the weights.",
        "",
    ]
    if ack["obligations"]:
        lines += ["Obligations of anyone who uses or shares this model:", ""]
        lines += [f"- {item}" for item in ack["obligations"]]
        lines.append("")
    if lic and lic.usage_policy:
        lines += [f"Use policy: {lic.usage_policy}", ""]
    return lines + [f"Accepted by the recipe (`model.license_accepted: true`) on {ack['accepted_at']}.", ""]


def _data_section(validation: dict[str, Any]) -> list[str]:
    """The data contract and per-split counts from the validation report (counts and hashes, never a row)."""
    lines = ["## Training data", ""]
    if not validation:
        return lines + ["The run's validation report was not found.", ""]
    contract = validation["contract"]
    lines += [
        f"Checked against data contract `{contract['name']}` v{contract['version']} "
        f"(sha256 `{contract['sha256'][:16]}`). Counts only; no rows are included in this card.",
        "",
        "| split | rows in | accepted | quarantined | failed checks | file sha256 |",
        "|---|---|---|---|---|---|",
    ]
    for name, split in validation["splits"].items():
        failed = ", ".join(f"{k}: {v}" for k, v in split["failed_checks"].items()) or "none"
        lines.append(
            f"| {name} | {split['rows_in']:,} | {split['rows_accepted']:,} | {split['rows_quarantined']:,} | "
            f"{failed} | `{split['sha256'][:16]}` |"
        )
    return lines + [""]


def _settings_section(recipe: Recipe, summary: dict[str, Any]) -> list[str]:
    """The training settings table: base storage, LoRA, optimizer, batch, length, duration, seed."""
    t, lora, q = recipe.training, recipe.lora, recipe.quantization
    steps = summary.get("optimizer_steps")
    storage = f"4-bit {q.quant_type}" + (" + double quant" if q.double_quant else "") if q.load_in_4bit else "16-bit"
    return [
        "## Training settings",
        "",
        "| setting | value |",
        "|---|---|",
        f"| base storage | {storage}, compute {q.compute_dtype} |",
        f"| LoRA | r {lora.r}, alpha {lora.alpha}, dropout {lora.dropout}, targets {_fmt(lora.target_modules)}"
        + (f", trained in full: {_fmt(lora.modules_to_save)}" if lora.modules_to_save else "")
        + " |",
        f"| optimizer | {t.optim}, learning rate {t.learning_rate:g} ({t.lr_scheduler_type}), "
        f"warmup {t.warmup_ratio:g} |",
        f"| batch | {t.micro_batch_size} x {t.gradient_accumulation_steps} accumulation per device |",
        f"| length | max {t.max_length} tokens |",
        f"| duration | {t.max_steps or t.num_epochs} {'steps' if t.max_steps else 'epochs'}"
        + (f" ({steps} optimizer steps{_loss_text(summary)})" if steps else "")
        + " |",
        f"| seed | {t.seed} |",
        "",
    ]


def _loss_text(summary: dict[str, Any]) -> str:
    """The training loss the run reported, named for what it is: the mean over the run's optimizer steps.

    ``summary.json``'s ``train_loss_mean`` (runs before it have the trainer's ``train_loss``, the same figure on a
    run that was not resumed), not the last logged loss, which is lower on a run that is still learning.
    """
    for key in ("train_loss_mean", "train_loss"):
        if isinstance(summary.get(key), (int, float)):
            return f", mean training loss {summary[key]:.4f}"
    return ""


def _serving_section(serving: dict[str, Any]) -> list[str]:
    """Whether vLLM loads the adapter (and if not, why and what to serve instead), and the serving commands."""
    from pipeline.serving import NF4_NOTE, merged_lines

    check, commands = serving["vllm"], serving["commands"]
    lines = ["## Serving", "", f"vLLM: the adapter **{check['verdict']}**.", ""]
    if check["loads"]:
        lines += [
            "The adapter on its base, with vLLM (clients ask for the adapter's name as the model) or TGI:",
            "",
            "```",
            commands["vllm_adapter"],
            commands["tgi_adapter"],
            "```",
            "",
        ]
    else:
        lines += [f"Instead: {check['instead']}.", ""]
    heading, merged = merged_lines(serving)
    lines += [heading, ""]
    if merged:
        lines += ["```", *merged, "```", ""]
    return lines + ([NF4_NOTE, ""] if check["loads"] else [])


def _merge_section(merge_report: dict[str, Any]) -> list[str]:
    """Which base weights the adapter was merged into, the shards and dtypes, and whether the head was untied."""
    into = "dequantized NF4" if merge_report["merge_base"] == "dequantized" else "original 16-bit"
    return [
        "## Merge",
        "",
        f"Merged into the {into} base weights, {merge_report['shards']} shard(s), dtypes {merge_report['dtypes']}"
        + (
            ", embeddings untied (the input embeddings were trained, the output head was not)"
            if merge_report["untied"]
            else ""
        )
        + ".",
        "",
    ]


def _verification_section(v: dict[str, Any]) -> list[str]:
    """The merge verification's numbers; a failed one says in bold not to deploy the weights."""
    if not v["passed"]:
        return [
            f"**Verification FAILED: do not deploy these weights.** Against base-in-4-bit + adapter on {v['examples']} "
            f"eval prompts ({v['positions']} positions): next-token agreement {v['next_token_agreement']:.4f}, below "
            f"the required {v['min_next_token_agreement']} (export.min_next_token_agreement); max |logit difference| "
            f"{v['max_abs_logit_diff']:.4g}, mean {v['mean_abs_logit_diff']:.4g}; {v['task_metric']} "
            f"{v['task_metric_reference']:.4f} (4-bit + adapter) vs {v['task_metric_merged']:.4f} (merged). "
            "This export was kept for inspection only and was not registered.",
            "",
        ]
    return [
        f"Verified against base-in-4-bit + adapter on {v['examples']} eval prompts ({v['positions']} positions): "
        f"next-token agreement {v['next_token_agreement']:.4f} (required {v['min_next_token_agreement']}), "
        f"max |logit difference| {v['max_abs_logit_diff']:.4g}, mean {v['mean_abs_logit_diff']:.4g}; "
        f"{v['task_metric']} {v['task_metric_reference']:.4f} (4-bit + adapter) vs {v['task_metric_merged']:.4f} "
        "(merged).",
        "",
    ]


WEAKEST_LABELS = 5  # at most this many in the card, the lowest F1 first


def weakest_labels(metrics_json: dict[str, Any]) -> tuple[list[tuple[str, float, float]], str]:
    """Labels the fine-tune is actually weak on, and the bar: ([(label, F1, support)], bar), lowest F1 first.

    Weak means an F1 below the fine-tune's own main metric (micro-F1 for codes, accuracy for a class: its
    average over all decisions) on a label that occurs in the eval split; a label at F1 1.0, or at the model's
    average, is not a limitation to report. At most ``WEAKEST_LABELS``.
    """
    per_label = (metrics_json.get("per_label") or {}).get("finetuned") or {}
    main = metrics_json.get("main_metric") or "micro_f1"
    overall = ((metrics_json.get("systems") or {}).get("finetuned") or {}).get(main)
    bar, name = (float(overall), f"the fine-tune's {main}") if isinstance(overall, (int, float)) else (1.0, "1.0")
    weak = [
        (label, float(s["f1"]), float(s.get("support", 0)))
        for label, s in per_label.items()
        if s.get("support", 0) > 0 and float(s["f1"]) < bar
    ]
    return sorted(weak, key=lambda item: (item[1], item[0]))[:WEAKEST_LABELS], f"{name} ({bar:.2f})"


def _use_and_limitations(
    recipe: Recipe, kind: str, validation: dict[str, Any], metrics_json: dict[str, Any]
) -> list[str]:
    """Intended use, and the limitations: the eval's scope, the weakest labels, the merge's small drift."""
    weak, bar = weakest_labels(metrics_json)
    lines = [
        "## Intended use",
        "",
        f"Assisting people with `{recipe.task.name}` on data like the training split (the contract above describes "
        "it), with a person reviewing each output. Evaluate it on your own held-out data before relying on it.",
        "",
        "## Limitations",
        "",
        f"- Evaluated on {(validation.get('splits', {}).get('eval') or {}).get('rows_accepted', 'the')} held-out rows "
        "from the same source as the training data; quality on other sources, formats or time periods is unknown.",
        "- Only the task it was fine-tuned for was evaluated; it inherits the base model's biases and failure modes.",
        "- Outputs can be wrong with confidence; they are suggestions, not decisions.",
    ]
    if weak:
        listed = ", ".join(f"{label} (F1 {f1:.2f}, {support:g} in eval)" for label, f1, support in weak)
        lines.append(f"- Weakest labels on the eval split (F1 below {bar}): {listed}.")
    elif (metrics_json.get("per_label") or {}).get("finetuned"):
        lines.append(f"- No weak label on the eval split: every label scores an F1 at or above {bar}.")
    if kind == "merged":
        lines.append("- Merged weights differ slightly from the evaluated 4-bit model; see the verification above.")
    return lines
