"""Data: validate the splits against the contract, render rows as prompts, and check what TRL will train on.

``validate_data`` is light (no torch): ``python -m pipeline validate`` uses it. The functions that touch a
tokenizer or a ``datasets.Dataset`` import those libraries inside.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from pipeline import chat, rundir
from pipeline.contracts import DataContract, load_contract
from pipeline.errors import JobFailed
from pipeline.recipe import Recipe, RecipeError, check_data_files
from pipeline.records import ContractFailed
from pipeline.schema_errors import did_you_mean
from pipeline.splits import ContractRun, SplitResult, TokenCounter, build_report, over_threshold
from pipeline.tasks import SPECIAL_PLACEHOLDERS, Task, build_task, template_fields, value_text


@dataclass
class ValidatedData:
    """The accepted rows of each split (already redacted), the contract, and the report written for them."""

    contract: DataContract
    train: SplitResult
    eval: SplitResult
    report: dict[str, Any]


# tokenizer_for(recipe) -> (tokenizer, None), or (None, why it is not available): model.tokenizer_or_reason.
TokenizerSource = Callable[[Recipe], tuple[Any, str | None]]


def validate_data(
    recipe: Recipe,
    out_dir: str | Path,
    tokenizer_for: TokenizerSource | None = None,
    recipe_source: str | Path = "recipe",
    keep_rows: bool = True,
    require_tokenizer: bool = False,
) -> ValidatedData:
    """Check both splits against the recipe's contract and write ``validation/`` in ``out_dir``.

    Writes ``validation/report.json`` (per split: counts that reconcile, content hash, every check with its
    count, example row numbers and duplicate/leakage pairs; dataset checks), ``validation/quarantine.jsonl``
    (one line per quarantined row: split, 1-based row, id, reasons), ``validation/report.md``, and the plots
    ``validation/token_lengths.png`` and ``validation/label_frequency.png``. Accepted rows come back with
    fields under a ``redact`` PII policy already redacted: nothing downstream sees the original text.
    ``validation/pairs.jsonl`` holds every duplicate/leakage pair (report.json keeps the first 100 per check).

    Args:
        recipe: The recipe (its data files, contract and ``training.max_length``).
        out_dir: The run directory; reports go to ``validation/`` inside it.
        tokenizer_for: Gives the recipe's tokenizer for the contract's ``tokens`` checks
            (``model.tokenizer_or_reason``). Called only when the contract has a ``tokens`` section, after the
            contract is loaded: a tokenizer takes seconds to load. When it gives (None, reason), the token
            checks are skipped with a warning and the reason in the report. Only a contract without
            ``tokens`` may be checked without it.
        recipe_source: The recipe file, for error messages and relative paths.
        keep_rows: Return the accepted rows (training needs them). ``validate`` passes False: memory then holds
            only the per-row state the dataset checks need, not the rows.
        require_tokenizer: A tokenizer that cannot be found is an error (``validate``, ``train``), not a
            skipped check (``validate --data-only``).

    Raises:
        RecipeError: A file is missing, the contract is invalid, or the task does not fit it (exit code 2).
        ContractFailed: Too many rows were quarantined, a split is too small, or a file cannot be read at all
            (exit code 1). The reports are written first when there is anything to report.
    """
    check_data_files(recipe, recipe_source)
    contract = load_contract(recipe.data.contract)
    counter, token_status = preflight(recipe, contract, recipe_source, tokenizer_for, require_tokenizer)
    run = ContractRun(contract, measure_tokens=counter, max_length=recipe.training.max_length, keep_rows=keep_rows)
    splits = [run.split(name, getattr(recipe.data, name)) for name in ("train", "eval")]
    dataset = run.finish()
    if token_status is not None:
        dataset["tokens"] = token_status
    report = build_report(recipe.data.contract, contract, splits, dataset)
    out = Path(out_dir) / "validation"
    rundir.write_json(out / "report.json", report)
    rundir.write_jsonl(out / "quarantine.jsonl", [q for s in splits for q in s.quarantined])
    rundir.write_jsonl(out / "pairs.jsonl", [pair for s in splits for pair in s.all_pairs()])
    rundir.write_text(out / "report.md", report_markdown(report))
    save_validation_plots(out, splits, run.max_tokens)
    print(render_report(report))
    problems = over_threshold(contract, splits, out / "quarantine.jsonl")
    if problems:
        raise ContractFailed("\n".join(problems))
    return ValidatedData(contract=contract, train=splits[0], eval=splits[1], report=report)


def preflight(
    recipe: Recipe,
    contract: DataContract,
    recipe_source: str | Path,
    tokenizer_for: TokenizerSource | None,
    require_tokenizer: bool,
) -> tuple[TokenCounter | None, dict[str, Any] | None]:
    """Everything ``train`` would refuse before reading a row, all at once; then the contract's token counter.

    The task against the contract (``task_problems``), the tokenizer (when required, or for token checks) and
    the chat template the recipe asks for. Without ``require_tokenizer`` a base that is not on this machine
    (a laptop checking data for a 70B run: ``validate --data-only``) skips the token checks with a warning and
    the reason in the report instead.

    Returns:
        The token counter (None without token checks or a tokenizer) and the report's ``tokens`` status.

    Raises:
        RecipeError: One line per problem, each naming the key that causes it (exit 2).
    """
    problems = task_problems(recipe, contract, recipe_source)
    tokenizer, status = None, None
    if require_tokenizer or contract.tokens is not None:
        if tokenizer_for is None:
            raise ValueError(f"{recipe.data.contract}: validate_data needs tokenizer_for (model.tokenizer_or_reason)")
        tokenizer, reason = tokenizer_for(recipe)
        if tokenizer is None and require_tokenizer:
            problems.append(
                f"{recipe_source}: model.path: {reason}; fix the path (or HF_HOME for a model id), or run "
                "`validate --data-only` to check the data without the base"
            )
        elif tokenizer is None:
            print(f"warning: {recipe_source}: token-length checks skipped: {reason}")
            status = {"status": "skipped", "reason": reason}
    fmt: Literal["chat", "plain"] | None = None
    if tokenizer is not None:
        try:
            fmt = prompt_format(recipe, tokenizer)
        except RecipeError as exc:
            problems += [f"{recipe_source}: {line}" for line in exc.lines()]
    if problems:
        raise RecipeError(problems)
    if tokenizer is None or fmt is None or contract.tokens is None:
        return None, status
    return token_counter(tokenizer, _build_task(recipe, contract), fmt), {
        "status": "measured",
        "tokenizer": recipe.model.path,
        "prompt_format": fmt,
        "max_length": recipe.training.max_length,
    }


def token_counter(tokenizer: Any, task: Task, fmt: Literal["chat", "plain"]) -> TokenCounter:
    """Count (prompt, whole example) tokens for a batch of rows as TRL will tokenize them for training.

    Plain: the prompt and prompt + " " + target through the tokenizer (BOS added if the tokenizer does), plus
    the EOS token TRL appends. Chat: the chat template rendered with the generation prompt, and with the
    assistant answer (whose end-of-turn token closes it), tokenized without adding special tokens again.
    Batches go through the fast tokenizer's Rust batch encoder.
    """

    def measure(rows: list[dict[str, Any]]) -> list[tuple[int, int] | chat.TemplateProblem]:
        if not rows:
            return []
        if task.conversation is not None:
            return [_conversation_lengths(tokenizer, row) for row in rows]
        if fmt == "chat":
            prompts = [
                tokenizer.apply_chat_template(task.chat_messages(r), tokenize=False, add_generation_prompt=True)
                for r in rows
            ]
            fulls = [
                tokenizer.apply_chat_template(
                    [*task.chat_messages(r), {"role": "assistant", "content": task.target(r)}], tokenize=False
                )
                for r in rows
            ]
            special, eos = False, 0
        else:
            prompts = [task.plain_prompt(r) for r in rows]
            fulls = [p + " " + task.target(r) for p, r in zip(prompts, rows, strict=True)]
            special, eos = True, 1
        return [(p, f + eos) for p, f in zip(lengths(prompts, special), lengths(fulls, special), strict=True)]

    # The Rust encoder's lengths directly (no Python lists of ids, no offsets), when it is configured as
    # __call__ would use it here: no truncation, no padding. Otherwise __call__ itself.
    backend = getattr(tokenizer, "_tokenizer", None)
    direct = (
        hasattr(backend, "encode_batch_fast")
        and getattr(backend, "truncation", True) is None
        and getattr(backend, "padding", True) is None
    )

    def lengths(texts: list[str], special: bool) -> list[int]:
        if direct:
            return [len(e) for e in backend.encode_batch_fast(texts, add_special_tokens=special)]
        return [len(ids) for ids in tokenizer(texts, add_special_tokens=special)["input_ids"]]

    return measure


def _conversation_lengths(tokenizer: Any, row: dict[str, Any]) -> tuple[int, int] | chat.TemplateProblem:
    """(tokens before the final assistant turn, whole conversation), rendered and masked as training will."""
    try:
        tokenized = chat.tokenize(tokenizer, row)
    except chat.TemplateProblem as problem:
        return problem
    return tokenized.prompt_tokens, len(tokenized.input_ids)


def check_tool_rendering(recipe: Recipe, tokenizer: Any, limit: int = 1000) -> int:
    """``plan``'s look at a chat recipe's data: do the base's template render its tools and tool calls?

    ``plan`` reads no data otherwise, but a base whose template drops tool calls would waste a GPU booking: the
    first ``limit`` well-formed rows of each split that carry tools or tool calls are rendered as training will
    render them. Returns the rows checked.

    Raises:
        TemplateCannotRender: Some of those rows cannot be rendered (the message names them), as ``validate``.
    """
    from pipeline.records import iter_records
    from pipeline.splits import TemplateCannotRender

    checked = 0
    for path in (recipe.data.train, recipe.data.eval):
        if not Path(path).is_file():
            continue
        problems: list[tuple[int, str]] = []
        seen = 0
        for record in iter_records(path, "auto", 16 << 20, {}):
            if record.reasons or not isinstance(record.value, dict):
                continue
            row, issues = chat.normalize(record.value)
            if issues or chat.check(row):
                continue  # validate quarantines it; not a template question
            calls = any(isinstance(m, dict) and m.get("tool_calls") for m in row["messages"])
            if not (row.get("tools") or calls):
                continue
            try:
                chat.tokenize(tokenizer, row)
            except chat.TemplateProblem as problem:
                problems.append((record.row, str(problem)))
            seen += 1
            if seen >= limit:
                break
        if problems:
            raise TemplateCannotRender(str(path), problems)
        checked += seen
    return checked


def render_report(report: dict[str, Any]) -> str:
    """A terminal table of the validation report: counts per split, then what each check found."""
    contract = report["contract"]
    lines = [f"Data contract {contract['name']} v{contract['version']} ({contract['path']})"]
    lines.append(f"  {'split':<6} {'rows in':>9} {'accepted':>9} {'quarantined':>12}  failed checks")
    for name, split in report["splits"].items():
        failed = ", ".join(f"{k}={v}" for k, v in split["failed_checks"].items()) or "-"
        lines.append(
            f"  {name:<6} {split['rows_in']:>9,} {split['rows_accepted']:>9,} "
            f"{split['rows_quarantined']:>12,}  {failed}"
        )
    findings = [
        (name, check, stat)
        for name, split in report["splits"].items()
        for check, stat in split.get("checks", {}).items()
        if stat["count"]
        and (stat["action"] != "quarantine" or check in ("leakage", "exact_duplicate", "near_duplicate"))
    ]
    if findings:
        lines.append(f"  {'split':<6} {'check':<18} {'action':<10} {'rows':>7}  example rows")
        for name, check, stat in findings:
            examples = ", ".join(str(r) for r in stat["examples"][:5])
            lines.append(f"  {name:<6} {check:<18} {stat['action']:<10} {stat['count']:>7,}  {examples}")
    for name, split in report["splits"].items():
        clean = [check for check, stat in split.get("checks", {}).items() if not stat["count"]]
        if clean:
            lines.append(f"  {name:<6} nothing found by: {', '.join(clean)}")
    lines.extend(f"  {line}" for line in _dataset_lines(report.get("dataset", {})))
    return "\n".join(lines)


def _dataset_lines(dataset: dict[str, Any]) -> list[str]:
    lines = []
    coverage = dataset.get("label_coverage")
    if coverage and coverage["uncovered_labels"]:
        shown = ", ".join(list(coverage["labels"])[:8])
        lines.append(
            f"label coverage: {coverage['uncovered_labels']} eval labels seen < {coverage['min_train_count']} "
            f"times in train ({coverage['action']}): {shown}"
        )
    rare = dataset.get("rare_labels")
    if rare and rare["count"]:
        lines.append(f"rare labels: {rare['count']} train labels seen fewer than {rare['below']} times")
    imbalance = dataset.get("imbalance")
    if imbalance:
        warn = " (above max_imbalance_ratio)" if imbalance["warning"] else ""
        lines.append(f"label imbalance: most / least frequent train label = {imbalance['ratio']:g}{warn}")
    pii = dataset.get("pii")
    if pii:
        lines.append(f"PII scan: {pii['detector']}; fields {pii['fields']}")
        lines.extend(f"PII {entity} not detected: {why}" for entity, why in pii["unavailable"].items())
    tokens = dataset.get("tokens")
    if tokens and tokens["status"] == "skipped":
        lines.append(f"token checks skipped: {tokens['reason']}")
    return lines


def report_markdown(report: dict[str, Any]) -> str:
    """validation/report.md: the same findings as the terminal table, for people and the MLflow UI."""
    contract = report["contract"]
    out = [
        f"# Data validation: {contract['name']} v{contract['version']}",
        "",
        f"Contract `{contract['path']}` (sha256 `{contract['sha256'][:16]}...`). "
        f"Counts reconcile: **{'yes' if report['reconciled'] else 'NO'}**.",
        "",
        "| split | format | rows in | accepted | quarantined | content sha256 |",
        "|---|---|---:|---:|---:|---|",
    ]
    for name, split in report["splits"].items():
        out.append(
            f"| {name} | {split['format']} | {split['rows_in']:,} | {split['rows_accepted']:,} | "
            f"{split['rows_quarantined']:,} | `{split['sha256'][:16]}...` |"
        )
    out += ["", "## Checks", "", "| split | check | action | rows | example rows |", "|---|---|---|---:|---|"]
    for name, split in report["splits"].items():
        for check, stat in split.get("checks", {}).items():
            examples = ", ".join(str(r) for r in stat["examples"])
            out.append(f"| {name} | {check} | {stat['action']} | {stat['count']:,} | {examples} |")
    pairs = [
        (name, check, pair)
        for name, split in report["splits"].items()
        for check, stat in split.get("checks", {}).items()
        for pair in stat.get("pairs", [])[:20]
    ]
    if pairs:
        out += ["", "## Duplicate and leakage pairs (first 20 per check; all of them: `pairs.jsonl`)", ""]
        out += [f"- {name} {check}: " + ", ".join(f"{k} {v}" for k, v in pair.items()) for name, check, pair in pairs]
    for name, split in report["splits"].items():
        if "tokens" in split:
            t = split["tokens"]
            out += ["", f"{name} tokens per example: min {t['min']}, median {t['p50']}, p95 {t['p95']}, max {t['max']}"]
        if "labels" in split:
            labels = split["labels"]
            top = ", ".join(f"{k} ({v})" for k, v in list(labels["most_common"].items())[:10])
            out += ["", f"{name} labels: {labels['distinct']} distinct; most common: {top}"]
    extra = _dataset_lines(report.get("dataset", {}))
    if extra:
        out += ["", "## Dataset", ""] + [f"- {line}" for line in extra]
    out += ["", "Quarantined rows and their reasons: `quarantine.jsonl` (row numbers, never row content).", ""]
    return "\n".join(out)


def save_validation_plots(out: Path, splits: list[SplitResult], max_tokens: int | None) -> None:
    """token_lengths.png (histogram per split, the max_length line) and label_frequency.png (top 40 labels)."""
    with_tokens = [s for s in splits if s.token_lengths]
    with_labels = [s for s in splits if s.label_counts]
    if not with_tokens and not with_labels:
        return
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if with_tokens:
        fig, ax = plt.subplots(figsize=(6, 3.5))
        for split in with_tokens:
            ax.hist(split.token_lengths, bins=40, alpha=0.6, label=f"{split.name} ({len(split.token_lengths):,})")
        if max_tokens:
            ax.axvline(max_tokens, color="red", linestyle="--", label=f"max_tokens {max_tokens}")
        ax.set_xlabel("tokens per example (prompt + completion)")
        ax.set_ylabel("accepted rows")
        ax.set_title("Token lengths")
        ax.legend()
        fig.tight_layout()
        fig.savefig(out / "token_lengths.png", dpi=100)
        plt.close(fig)
    if with_labels:
        train = with_labels[0]
        top = [label for label, _ in train.label_counts.most_common(40)]
        fig, ax = plt.subplots(figsize=(9, 4))
        width = 0.8 / len(with_labels)
        for i, split in enumerate(with_labels):
            ax.bar(
                [x + i * width for x in range(len(top))],
                [split.label_counts.get(label, 0) for label in top],
                width=width,
                label=split.name,
            )
        ax.set_xticks([x + 0.4 - width / 2 for x in range(len(top))], top, rotation=90, fontsize=7)
        ax.set_ylabel("rows")
        ax.set_title(f"Label frequency (top {len(top)} train labels of {len(train.label_counts)})")
        ax.legend()
        fig.tight_layout()
        fig.savefig(out / "label_frequency.png", dpi=100)
        plt.close(fig)


def task_for(recipe: Recipe, contract: DataContract, source: str | Path = "recipe") -> Task:
    """The recipe's task over the contract's fields, with the label set the contract gives its target.

    Raises:
        RecipeError: Every mismatch between the task and the contract (``task_problems``).
    """
    problems = task_problems(recipe, contract, source)
    if problems:
        raise RecipeError(problems)
    return _build_task(recipe, contract)


def _build_task(recipe: Recipe, contract: DataContract) -> Task:
    """The task once ``task_problems`` found nothing wrong."""
    labels, vocabulary = label_set(contract, recipe.task.target or "", recipe.task.answer == "labels")
    return build_task(recipe.task, labels, recipe.task.vocabulary or vocabulary)


def label_set(contract: DataContract, target: str, items: bool) -> tuple[list[str] | None, str | None]:
    """The target's allowed values (``enum`` or ``vocabulary_file``; a list's items' for ``items``) and code system."""
    from pipeline.contracts import vocabulary_values

    rule = contract.fields.get(target)
    if rule is not None and items:
        rule = rule.items
    if rule is None:
        return None, None
    if rule.enum:
        return [value_text(v) for v in rule.enum], rule.vocabulary  # as the gold is written: true, not True
    if rule.vocabulary_file:
        return sorted(vocabulary_values(rule.vocabulary_file)), rule.vocabulary
    return None, rule.vocabulary


# The contract field types each answer type can be read from.
_ANSWER_FIELD_TYPES = {
    "label": ("string", "integer", "boolean"),
    "labels": ("list",),
    "json": ("object", "string"),
    "text": ("string",),
    "number": ("integer", "number"),
    "chat": ("list",),
}


def task_problems(recipe: Recipe, contract: DataContract, source: str | Path = "recipe") -> list[str]:
    """Every way the recipe's task does not fit the contract, one ``source: task.key: what and how`` line each.

    What ``train`` would otherwise find after loading the data (a missing field, a template placeholder that
    names no field, a label set the answer type needs), found by ``validate`` and ``plan`` before any row is read.
    """
    spec, fields = recipe.task, contract.fields
    where = f"{source}: task"
    named = f"{recipe.data.contract} (fields: {', '.join(fields)})"
    rule = fields.get(spec.target or "")
    if rule is None:
        hint = did_you_mean(spec.target or "", list(fields))
        return [
            f"{where}.target: {spec.target!r} is not a field of {named}{hint}; name the field that holds the answer"
        ]
    problems = []
    if rule.type not in _ANSWER_FIELD_TYPES[spec.answer or "text"]:
        problems.append(
            f"{where}.answer: {spec.answer!r} reads a {' or '.join(_ANSWER_FIELD_TYPES[spec.answer or 'text'])} "
            f"field, and {recipe.data.contract} declares {spec.target!r} as {rule.type}; fix the answer type or "
            "the target"
        )
    labels, vocabulary = label_set(contract, spec.target or "", spec.answer == "labels")
    vocabulary = spec.vocabulary or vocabulary
    if spec.answer == "label" and not labels:
        problems.append(
            f"{where}.answer: 'label' needs the label set: list the labels under {recipe.data.contract}: "
            f"fields.{spec.target}.enum (enum: [a, b, c]), or use answer: text"
        )
    needs = {"invalid_label_rate": labels, "invalid_code_rate": vocabulary == "icd10cm"}
    if spec.answer == "labels":
        for metric in spec.metrics or ():
            if metric in needs and not needs[metric]:
                what = (
                    "an items.enum (or items.vocabulary_file)"
                    if metric == "invalid_label_rate"
                    else "items.vocabulary: icd10cm (or task.vocabulary: icd10cm)"
                )
                problems.append(
                    f"{where}.metrics: {metric} needs {what} on {recipe.data.contract}: fields.{spec.target}; "
                    "add it, or drop the metric"
                )
    if spec.answer == "chat":
        return problems
    for key in ("system_prompt", "user_prompt", "plain_prompt"):
        template = getattr(spec, key)
        for name in template_fields(template) if template else ():
            if name == "label_set" and not labels:
                problems.append(
                    f"{where}.{key}: {{label_set}} but {recipe.data.contract}: fields.{spec.target} lists no labels "
                    "(enum)"
                )
            elif name == spec.target:
                problems.append(
                    f"{where}.{key}: {{{name}}} is the target: the answer would be in the prompt; remove it"
                )
            elif name not in fields and name not in SPECIAL_PLACEHOLDERS:
                problems.append(
                    f"{where}.{key}: {{{name}}} names no field of {named}{did_you_mean(name, list(fields))}"
                )
    return problems


# --------------------------------------------------------------------------------------------------
# Prompts


def prompt_format(recipe: Recipe, tokenizer: Any) -> Literal["chat", "plain"]:
    """Chat template when asked for or (``auto``) when the tokenizer has one; else the task's plain template."""
    has_template = bool(getattr(tokenizer, "chat_template", None))
    wanted = recipe.data.prompt_format
    if recipe.task.is_chat and not has_template:
        raise RecipeError(
            [
                f"task: chat renders each conversation through the base's chat template, and the tokenizer of "
                f"{recipe.model.path} has none; use a chat (Instruct) base, or set tokenizer.chat_template in "
                "its tokenizer_config.json"
            ]
        )
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
        example = {
            "prompt": task.chat_messages(row),
            "completion": [{"role": "assistant", "content": task.target(row)}],
            "row": row["_row"],
        }
        if task.tools is not None:
            example["tools"] = task.tools(row)
        return example
    return {"prompt": task.plain_prompt(row), "completion": " " + task.target(row), "row": row["_row"]}


PROMPT_RECORD = "prompt.json"
# The keys of a prompt record that decide what the model sees: a run is scored only with the same ones.
RENDERING_KEYS = (
    "answer",
    "target",
    "system_prompt",
    "user_prompt",
    "plain_prompt",
    "label_set",
    "parse",
    "parse_pattern",
    "prompt_format",
    "chat_template_sha256",
)


def prompt_rendering(recipe: Recipe, task: Task, fmt: str, tokenizer: Any) -> dict[str, Any]:
    """How the recipe's task renders a row and reads an answer: templates, label set, format, chat template.

    The system prompt is as sent (labels filled in); the user and plain prompts are templates. The chat template
    is identified by its SHA-256: the same templates through another chat template are another prompt.
    """
    import hashlib

    spec = recipe.task
    template = getattr(tokenizer, "chat_template", None) if fmt == "chat" else None
    return {
        "task": spec.name,
        "answer": spec.answer,
        "target": spec.target,
        "system_prompt": task.system_prompt if not spec.is_chat else None,
        "user_prompt": spec.user_prompt,
        "plain_prompt": task.plain_template or None,
        "label_set": list(task.labels),
        "parse": spec.parse,
        "parse_pattern": spec.parse_pattern,
        "metrics": list(spec.metrics or ()),
        "prompt_format": fmt,
        "chat_template_sha256": hashlib.sha256(template.encode()).hexdigest() if isinstance(template, str) else None,
    }


def prompt_record(
    recipe: Recipe, task: Task, fmt: Literal["chat", "plain"], tokenizer: Any, row: dict[str, Any]
) -> dict[str, Any]:
    """``prompt.json``: the rendering, the prompt with its placeholders left in, and one row as training renders it.

    ``row`` is an accepted row, so the contract's PII policy is already applied to it (redacted fields hold
    ``<US_SSN>`` etc.). The skeleton renders the templates over placeholder text, through the chat template:
    what a serving stack must send, without any row's data (the model card shows it).
    """
    record = {"rendering": prompt_rendering(recipe, task, fmt, tokenizer)}
    if not recipe.task.is_chat:
        fields = {name: "{" + name + "}" for name in template_fields(recipe.task.user_prompt or "")}
        fields.update((n, "{" + n + "}") for n in template_fields(task.plain_template))
        target = recipe.task.target or ""
        value = row.get(target)
        if recipe.task.answer == "json":  # the field names ({json_fields}), not this row's values
            value = dict.fromkeys(json.loads(task.target(row)) or {})
        skeleton = {**fields, target: value, "_row": 0}
        record["skeleton"] = _rendered_text(tokenizer, sft_example(skeleton, task, fmt))["prompt"]
    example = training_example(row, task, fmt, tokenizer)
    if "input_ids" in example:  # a conversation: tokenized here with its turn masks
        record["example"] = {"row": row["_row"], "text": tokenizer.decode(example["input_ids"])}
    else:
        record["example"] = {"row": row["_row"], **_rendered_text(tokenizer, example)}
    return record


def _rendered_text(tokenizer: Any, example: dict[str, Any]) -> dict[str, str]:
    """A prompt/completion example as text: conversational ones through the chat template, as TRL renders them."""
    if not isinstance(example["prompt"], list):
        return {"prompt": example["prompt"], "completion": example["completion"]}
    tools = example.get("tools") or None
    prompt = tokenizer.apply_chat_template(example["prompt"], tools=tools, tokenize=False, add_generation_prompt=True)
    whole = tokenizer.apply_chat_template(example["prompt"] + example["completion"], tools=tools, tokenize=False)
    return {"prompt": prompt, "completion": whole[len(prompt) :] if whole.startswith(prompt) else whole}


def rendering_differences(recorded: dict[str, Any], current: dict[str, Any]) -> list[str]:
    """``task.<key>: the run used X, the recipe renders Y`` for each rendering key that differs."""
    out = []
    for key in RENDERING_KEYS:
        if recorded.get(key) != current.get(key):
            where = (
                "data.prompt_format"
                if key == "prompt_format"
                else "model.path (chat template)"
                if key == "chat_template_sha256"
                else f"task.{key}"
            )
            out.append(
                f"{where}: the run was trained with {recorded.get(key)!r}, the recipe renders {current.get(key)!r}"
            )
    return out


def training_example(row: dict[str, Any], task: Task, fmt: Literal["chat", "plain"], tokenizer: Any) -> dict[str, Any]:
    """One row as TRL trains on it.

    A conversation (task chat) is tokenized here with its per-turn mask (``chat.tokenize``): TRL takes
    ``input_ids`` and ``assistant_masks`` as they are, builds the labels from the mask (-100 on every system,
    user and tool token and on weight-0 assistant turns), truncates and packs whole examples. Any other task is
    TRL's prompt/completion example (``sft_example``), which TRL tokenizes itself.
    """
    if task.conversation is None:
        return sft_example(row, task, fmt)
    tokenized = chat.tokenize(tokenizer, row)
    return {"input_ids": tokenized.input_ids, "assistant_masks": tokenized.mask, "row": row["_row"]}


def prompt_input_ids(tokenizer: Any, example: dict[str, Any]) -> list[int]:
    """Token ids of an example's prompt exactly as TRL tokenizes it for training.

    Mirrors ``trl.data_utils._tokenize``: conversational prompts go through ``apply_chat_template`` with the
    generation prompt, plain prompts through the tokenizer's ``__call__`` (which adds BOS if the tokenizer does).
    """
    prompt = example["prompt"]
    if isinstance(prompt, list):
        out = tokenizer.apply_chat_template(
            prompt, tools=example.get("tools") or None, tokenize=True, add_generation_prompt=True, return_dict=True
        )
        return list(out["input_ids"])
    return list(tokenizer(text=prompt)["input_ids"])


def to_dataset(examples: list[dict[str, Any]]) -> Any:
    """A ``datasets.Dataset`` of prompt/completion examples."""
    from datasets import Dataset

    return Dataset.from_list(examples)


class LossMaskError(JobFailed):
    """Some examples would train on nothing, or would never learn to stop (exit code 1)."""


def check_loss_masks(
    prepared: Any, expected_rows: list[int], eos_ids: set[int], max_length: int, *, per_turn: bool = False
) -> dict[str, Any]:
    """Check the dataset TRL prepared, before the first step.

    Two failures of peer tools are silent: an example whose completion is truncated away trains on nothing
    (TRL even drops such rows), and a completion cut before its EOS teaches the model never to stop. Every
    accepted row must still be present, keep at least one completion token in the loss, and have an EOS
    token among its completion tokens.

    ``per_turn`` (conversations): every trained turn (a run of tokens in the loss) must end with the template's
    end-of-turn token. A turn cut by ``max_length`` is counted and reported by row instead (the contract's token
    check quarantines conversations longer than ``max_length``, so there should be none).

    Args:
        prepared: ``trainer.train_dataset`` after TRL's preparation (``input_ids``, ``labels``, ``row``).
        expected_rows: Line numbers of the accepted training rows.
        eos_ids: Token ids that end a completion (tokenizer EOS and the generation config's EOS ids).
        max_length: ``training.max_length``, for the error message.
        per_turn: Check each trained turn of a conversation rather than the example's completion.

    Returns:
        Counts for the run summary: examples, completion tokens, and the longest example; with ``per_turn``
        also the trained turns and the turns cut by ``max_length`` (with their rows).

    Raises:
        LossMaskError: Naming the rows (line numbers in the train file) and how to fix it.
    """
    seen: set[int] = set()
    no_loss: list[int] = []
    no_eos: list[int] = []
    cut_rows: list[int] = []
    completion_tokens = longest = turns = cut = 0
    for example in prepared:
        row = int(example["row"])
        seen.add(row)
        labels = example["labels"]
        targets = [t for t in labels if t != -100]
        longest = max(longest, len(example["input_ids"]))
        completion_tokens += len(targets)
        if not targets:
            no_loss.append(row)
        elif per_turn:
            runs = _trained_runs(labels)
            turns += len(runs)
            ends = [labels[end - 1] for _, end in runs]
            at_limit = len(labels) >= max_length
            last_cut = at_limit and runs[-1][1] == len(labels) and ends[-1] not in eos_ids
            cut += last_cut
            if last_cut:
                cut_rows.append(row)
            if any(e not in eos_ids for e in (ends[:-1] if last_cut else ends)):
                no_eos.append(row)
        elif not eos_ids.intersection(targets):
            no_eos.append(row)
    dropped = sorted(set(expected_rows) - seen)
    problems = []
    if dropped:
        problems.append(f"{len(dropped)} rows lost every completion token to truncation (lines {_few(dropped)})")
    if no_loss:
        problems.append(f"{len(no_loss)} rows have no completion token in the loss (lines {_few(sorted(no_loss))})")
    if no_eos:
        what = (
            "a trained assistant turn that does not end with the end-of-turn token"
            if per_turn
            else ("a completion cut before its end-of-sequence token")
        )
        problems.append(
            f"{len(no_eos)} rows have {what}, so the model would not learn to stop (lines {_few(sorted(no_eos))})"
        )
    if problems:
        raise LossMaskError(
            "training data check failed before the first step:\n  "
            + "\n  ".join(problems)
            + f"\nRaise training.max_length (now {max_length}) or shorten these rows in the train split."
        )
    counts: dict[str, Any] = {
        "examples": len(seen),
        "completion_tokens": completion_tokens,
        "longest_example_tokens": longest,
    }
    if per_turn:
        counts.update(trained_turns=turns, turns_cut_by_max_length=cut, rows_with_cut_turns=sorted(cut_rows))
    return counts


def _trained_runs(labels: list[int]) -> list[tuple[int, int]]:
    """(start, end) of each run of consecutive positions in the loss."""
    runs = []
    start = None
    for i, label in enumerate(labels):
        if label != -100 and start is None:
            start = i
        elif label == -100 and start is not None:
            runs.append((start, i))
            start = None
    if start is not None:
        runs.append((start, len(labels)))
    return runs


def _few(rows: list[int], limit: int = 10) -> str:
    shown = ", ".join(str(r) for r in rows[:limit])
    return shown + (f", ... {len(rows) - limit} more" if len(rows) > limit else "")
