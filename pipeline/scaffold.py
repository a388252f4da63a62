"""``init``: a data contract and a recipe inferred from one data file.

``init_project`` reads the file (JSON Lines, CSV or Parquet, with ``records``' readers: the first
``SAMPLE_ROWS`` rows), profiles every field, and writes ``data_contracts/<name>.yaml`` and
``recipes/<name>.yaml`` under the working directory:

* each field's type, whether it is required (present and non-null in every row), length limits with headroom
  (``HEADROOM`` x the longest value seen), list sizes, and the target's label set as an ``enum``;
* the dataset checks on: exact duplicates quarantined, near duplicates reported, train/eval leakage quarantined,
  compared over the free-text fields, which also get a PII ``warn`` policy;
* a recipe that extends the quickstart (the tiny demo base on a CPU) or the production recipe, replacing its
  task, data and experiment; an OpenAI chat file gets ``task: chat`` and extends the OpenAI migration recipes.

Every inferred choice carries a YAML comment saying what was seen in how many rows. Without ``--eval FILE`` the
file is split into ``data/<name>/train.<ext>`` and ``eval.<ext>`` by ``holdout.split_file`` (copies and near
copies kept on one side). Nothing is written when any output exists already, unless ``force``. ``cli`` then runs
``validate`` on the new recipe.
"""

from __future__ import annotations

import contextlib
import json
import math
import re
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pipeline import holdout, icd10cm
from pipeline.errors import UsageError
from pipeline.pii import PII_ENTITIES
from pipeline.profiling import (
    ANSWERS,
    CONTRACT_TYPES,
    Choices,
    FieldStats,
    Profile,
    choose,
    choose_target,
    counts,
    is_icd,
    profile,
)
from pipeline.records import file_format
from pipeline.rundir import write_text
from pipeline.tasks import ANSWER_DEFAULTS
from pipeline.yamlnotes import Y, document

BASES = ("quickstart", "production")
HEADROOM = 1.5  # max_length / max_items = HEADROOM x the longest seen, rounded up
PARENTS = {  # (--base, chat file) -> the shipped recipe the new one extends
    ("quickstart", False): "quickstart.yaml",
    ("production", False): "medical_coding.yaml",
    ("quickstart", True): "openai_migration_quickstart.yaml",
    ("production", True): "openai_migration.yaml",
}
CHECKOUT = Path(__file__).resolve().parents[1]  # the pipeline checkout this module runs from (its recipes/)


# --------------------------------------------------------------------------------------------------
# The contract


def contract_nodes(name: str, prof: Profile, ch: Choices) -> list[Y]:
    """The data contract, key by key, each inferred value with its comment."""
    pii_fields = set(ch.text_fields) | ({ch.target} if ch.answer == "text" else set())
    rules: list[Y] = []
    for field_name, stats in prof.fields.items():
        if stats.kind not in CONTRACT_TYPES:
            rules.append(Y(None, note=f"not listed: {field_name} holds {stats.kind} values, which a contract cannot "
                                      "type (extra_fields: ignore keeps them)"))  # fmt: skip
            continue
        is_target = field_name == ch.target
        pii = "warn" if field_name in pii_fields and ch.target is not None else None
        rules.append(Y(field_name, _rule(stats, prof.rows, is_target, ch.answer if is_target else None, pii)))
    text_note = "free text: compared for exact/near duplicates and train/eval leakage"
    if ch.target is None:
        text_note = "compared as the conversation before its final assistant message"
    dataset = [Y("text_fields", ch.text_fields, text_note if ch.text_fields else "no free-text field found: the "
                 "duplicate and leakage checks are off; name the fields that hold text to turn them on")]  # fmt: skip
    if ch.answer in ("label", "labels"):
        dataset.append(Y("label_field", ch.target, "label coverage, distribution and imbalance in the report"))
    dataset += [
        Y("exact_duplicates", "quarantine", "copies over-weight a row in training; the first is kept"),
        Y("near_duplicates", "report", "listed, not removed: templated rows are often alike"),
        Y("leakage", "quarantine", "an eval row (near-)copied from train would inflate the score"),
    ]
    nodes = [
        Y("name", name),
        Y("version", 1),
        Y("description", f"Rows like those of {' + '.join(f.name for f in prof.files)} (inferred by pipeline init)."),
        Y("format", prof.fmt),
        Y("id_field", ch.id_field, "named like an identifier" if ch.id_field else "no id field: reports give rows"),
        Y("extra_fields", "ignore", "fields not listed here are kept and not checked"),
        Y("max_quarantine_fraction", 0.05, "more bad rows than this in a split stops validate and train"),
    ]
    if ch.target is None:
        nodes.append(Y("conversation", [Y("legacy_functions", "convert"), Y("pii", "warn", _PII_NOTE)]))
    nodes += [
        Y("tokens", [Y("min_tokens", 1)], _TOKENS_NOTE),
        Y("pii", [Y("entities", list(PII_ENTITIES)), Y("min_score", 0.4)], _ENTITIES_NOTE),
        Y("dataset", dataset),
        Y("fields", rules),
    ]
    return nodes


_TOKENS_NOTE = (
    "each row as the training example, with the recipe's tokenizer: one longer than training.max_length (max_tokens) "
    "would lose its answer to truncation, so it is quarantined"
)
_ENTITIES_NOTE = (
    "what the scan of fields with a pii policy looks for (PERSON needs a spaCy model; the report says when none is "
    "installed)"
)
_PII_NOTE = "report rows with SSNs, phones, e-mails...; 'redact' replaces them with <US_SSN> etc., 'block' quarantines"


def _rule(stats: FieldStats, rows: int, is_target: bool, answer: str | None, pii: str | None) -> list[Y]:
    """One field's rule: type, required, enum (the target's label set), length or size limits, pii."""
    kind, out = stats.kind, []
    others = Counter({k: n for k, n in stats.kinds.items() if k != kind and not (kind == "number" and k == "integer")})
    out.append(Y("type", kind, f"{sum(others.values()):,} value(s) of another type ({counts(others)}) are "
                 "quarantined" if others else ""))  # fmt: skip
    missing = rows - stats.present
    if is_target:
        note = "the answer: a row without it cannot train" + (
            f" ({missing:,} of {rows:,} rows lack it)" * bool(missing)
        )
        out.append(Y("required", True, note))
    else:
        out.append(Y("required", not missing, f"missing or null in {missing:,} of {rows:,} rows" if missing
                     else f"present in all {rows:,} rows"))  # fmt: skip
    if answer == "label":
        out.append(_enum(stats, rows))
    elif kind == "string":
        out += _lengths(stats, rows)
    if kind == "list":
        out += _sizes(stats, rows, is_target)
        items = stats.items or FieldStats()
        item_rule = [Y("type", items.kind if items.kinds else "string")]
        if answer == "labels" and is_icd(items):
            billable = all(icd10cm.status(c) == "billable" for _, c in items.values)
            item_rule.append(Y("vocabulary", "icd10cm", f"all {items.distinct:,} distinct items are ICD-10-CM codes"))
            item_rule.append(Y("billable_only", billable, "every code seen is billable" if billable else ""))
        elif answer == "labels":
            item_rule.append(_enum(items, rows))
        elif items.kind == "string":
            item_rule += _lengths(items, rows)
        out.append(Y("items", item_rule))
    if pii:
        out.append(Y("pii", pii, "free text: reported when it holds PII; 'redact' or 'block' to act on it"))
    return out


def _enum(stats: FieldStats, rows: int) -> Y:
    ranked = stats.values.most_common()
    shown = ", ".join(f"{v} {n:,}" for (_, v), n in ranked[:6]) + (", ..." if len(ranked) > 6 else "")
    once = [str(v) for (_, v), n in ranked if n == 1]
    note = f"{stats.distinct:,} distinct values in {rows:,} rows: {shown}"
    if once:
        note += f"; seen once: {', '.join(once[:5])}{', ...' if len(once) > 5 else ''} (a typo?)"
    typed = stats.kind != "string"  # CSV cells of a number or boolean column are kept as their text
    values = [json.loads(v) if typed and isinstance(v, str) else v for _, v in stats.values]
    return Y("enum", sorted(values, key=str), note)


def _lengths(stats: FieldStats, rows: int) -> list[Y]:
    if not stats.longest:
        return []
    out = [Y("min_length", 1, "no empty value seen")] if stats.shortest else []
    limit = math.ceil(HEADROOM * stats.longest)
    return [*out, Y("max_length", limit, f"longest {stats.longest:,} chars in {rows:,} rows; limit = {HEADROOM}x")]


def _sizes(stats: FieldStats, rows: int, is_target: bool) -> list[Y]:
    out = [Y("min_items", 1, "no empty list seen")] if stats.fewest else []
    if stats.most:
        limit = math.ceil(HEADROOM * stats.most)
        out.append(Y("max_items", limit, f"longest list {stats.most:,} items in {rows:,} rows; limit = {HEADROOM}x"))
    if is_target and not stats.repeats:
        out.append(Y("unique_items", True, "no list repeats an item"))
    return out


# --------------------------------------------------------------------------------------------------
# The recipe


@dataclass(frozen=True)
class Parent:
    """The shipped recipe the new one extends, and what the new one must change so that it works from here."""

    file: str  # recipes/<file>
    extends: str  # what `extends:` says: relative to recipes/<name>.yaml, or absolute
    model_path: str  # the parent's base
    device: str
    overrides: tuple[Y, ...] = ()


_PRODUCTION = "Llama-3.3-70B-Instruct in 4-bit NF4 on one 80 GB GPU (python -m pipeline plan: does it fit?)"
_BASE_HINTS = {
    "quickstart.yaml": "The tiny demo base on a CPU in minutes: it proves the job end to end on your data, its scores "
    "mean little (build it once: python scripts/make_demo_assets.py); --base production for Llama-3.3-70B",
    "openai_migration_quickstart.yaml": "The tiny demo chat base on a CPU (build it once: python "
    "scripts/make_demo_assets.py --chat); --base production for Llama-3.3-70B",
    "medical_coding.yaml": _PRODUCTION,
    "openai_migration.yaml": _PRODUCTION,
}


def find_parent(root: Path, base: str, chat: bool) -> Parent:
    """``recipes/<parent>`` under ``root`` (then ``extends:`` is relative), else the pipeline checkout's (absolute).

    From outside the checkout, a parent base that is a path inside the checkout (the demo base) is made absolute
    in the new recipe, so that it is found from ``root``.

    Raises:
        UsageError: Neither place has the parent recipe.
    """
    from pipeline.recipe import load_recipe

    file = PARENTS[(base, chat)]
    local, shipped = root / "recipes" / file, CHECKOUT / "recipes" / file
    if not local.is_file() and not shipped.is_file():
        raise UsageError(
            f"recipes/{file}: not found in {root.resolve()} nor in the pipeline checkout {CHECKOUT}; the new recipe "
            "extends it: run init in the pipeline checkout, or copy its recipes/ directory here"
        )
    parent = load_recipe(local if local.is_file() else shipped)
    model, overrides = Path(parent.model.path), ()
    if not local.is_file() and not model.is_absolute() and not (root / model).exists() and (CHECKOUT / model).exists():
        overrides = (Y("model", [Y("path", str(CHECKOUT / model), "the parent's base, in the pipeline checkout")]),)
    extends = file if local.is_file() else str(shipped)
    return Parent(file, extends, parent.model.path, parent.hardware.device, overrides)


def recipe_nodes(
    name: str, prof: Profile, ch: Choices, parent: Parent, data: dict[str, str], split: str, limits: list[Y] = ()
) -> list[Y]:
    """The recipe: extends the parent, replaces its task, data, description, experiment and (``limits``) lengths."""
    if ch.target is None:
        task: Any = "chat"
        what = "chat: the model learns every assistant message of each conversation (docs/chat.md)"
    else:
        task = [
            Y("answer", ch.answer, ch.answer_why),
            Y("target", ch.target, ch.target_why),
            Y("user_prompt", _template(ch.prompt_fields), _prompt_note(prof, ch)),
            Y(
                None,
                note=f"system_prompt (unset: answer {ch.answer}'s default): "
                f"{json.dumps(ANSWER_DEFAULTS[ch.answer]['system_prompt'])}; say what the task is here",
            ),  # fmt: skip
        ]
        what = f"answer {ch.answer} from {ch.target}; edit task: to change the prompt (docs/tasks.md)"
    header = [
        f"Recipe written by `python -m pipeline init` from {prof.source}.",
        f"Task: {what}.",
        f"Base: extends {parent.extends} ({parent.model_path}, {parent.device}); every setting not below is its "
        f"own. {_BASE_HINTS[parent.file]}.",
        f"Data: {split}; checked against {data['contract']}.",
        f"Run: python -m pipeline validate recipes/{name}.yaml (init ran it once), then python -m pipeline plan "
        f"recipes/{name}.yaml (steps, tokens, memory), then python -m pipeline train recipes/{name}.yaml",
    ]
    return [
        *(Y(None, note=line) for line in header),
        Y("extends", parent.extends),
        Y("name", name),
        Y("description", f"Fine-tuned on {prof.files[0].name} (recipe written by pipeline init)."),
        Y("task", task),
        *parent.overrides,
        Y("data", [Y(key, data[key]) for key in ("contract", "train", "eval")]),
        *limits,
        Y("tracking", [Y("experiment", name)]),
    ]


def _template(fields: list[str]) -> str:
    if len(fields) == 1:
        return "{" + fields[0] + "}"
    return "\n\n".join(f"{f}: {{{f}}}" for f in fields)


def _prompt_note(prof: Profile, ch: Choices) -> str:
    left = [n for n in prof.fields if n not in (*ch.prompt_fields, ch.target, ch.id_field)]
    what = "the free-text field(s)" if ch.prompt_fields == ch.text_fields else "the fields besides the answer"
    return what + (f"; not in the prompt: {', '.join(left)} (add {{{left[0]}}} to use it)" if left else "")


# --------------------------------------------------------------------------------------------------
# init


@dataclass
class Scaffold:
    """What ``init_project`` wrote (paths as the recipe names them, relative to ``root``) and what it says."""

    name: str
    contract: str
    recipe: str
    train: str
    eval: str
    lines: list[str]
    base_here: bool  # the recipe's base is on this machine (else validate checks the data only)


def init_project(
    data_file: str | Path,
    *,
    root: str | Path = ".",
    target: str | None = None,
    answer: str | None = None,
    name: str | None = None,
    eval_file: str | Path | None = None,
    eval_fraction: float = 0.1,
    base: str = "quickstart",
    force: bool = False,
) -> Scaffold:
    """Infer a contract and a recipe from ``data_file`` and write them (and the split) under ``root``.

    Args:
        data_file: JSON Lines, CSV or Parquet (an OpenAI chat file is recognised).
        root: The directory the commands run from: ``data_contracts/``, ``recipes/`` and ``data/<name>/`` go there,
            and the recipe's paths are relative to it.
        target: The field holding the answer; default: a field named like one (``TARGET_NAMES``).
        answer: ``label``, ``labels``, ``json``, ``text`` or ``number``; default: inferred from the target's values.
        name: Recipe, contract and data directory name; default: the file's stem, slugged.
        eval_file: An eval split of its own; without it ``data_file`` is split (``eval_fraction``, leakage-free).
        eval_fraction: Share of rows for eval when splitting.
        base: ``quickstart`` (the tiny demo base on a CPU) or ``production`` (the 70B recipe).
        force: Replace outputs that exist; without it nothing is written when any does.

    Raises:
        UsageError: A missing or unreadable file, no target, an answer type the data contradicts, an output that
            exists (named, all of them), a bad name, or a file too small to split.
    """
    root, source = Path(root), Path(data_file)
    files = [source, *([Path(eval_file)] if eval_file is not None else [])]
    missing = [str(f) for f in files if not f.is_file()]
    if missing:
        raise UsageError(f"{', '.join(missing)}: no such file")
    if answer is not None and answer not in ANSWERS:
        raise UsageError(f"--answer {answer}: choose one of {', '.join(ANSWERS)}")
    if base not in BASES:
        raise UsageError(f"--base {base}: choose one of {', '.join(BASES)}")
    name = _name(name, source)
    prof = profile(files)
    if answer == "labels" and prof.fmt in ("csv", "auto") and not prof.is_chat():
        wanted = choose_target(prof, target)[0]
        if prof.fields[wanted].kind == "string":  # CSV cells such as E11.9;I10, as the reader splits a list field
            prof = profile(files, frozenset({wanted}))
    ch = choose(prof, target, answer)

    contract, recipe = root / "data_contracts" / f"{name}.yaml", root / "recipes" / f"{name}.yaml"
    splits = holdout.output_paths(root / "data" / name, file_format(source)) if eval_file is None else {}
    if f"{name}.yaml" in PARENTS.values():  # the parents and what they extend: --force would make a cycle
        raise UsageError(f"--name {name}: recipes/{name}.yaml is a recipe init extends; choose another --name")
    existing = [str(p) for p in (contract, recipe, *splits.values()) if p.exists()]
    if existing and not force:
        raise UsageError(
            f"{', '.join(existing)} already exist(s); init never overwrites: pass --force to replace them, or "
            "--name NAME to write new ones"
        )
    parent = find_parent(root, base, ch.target is None)

    lines, had_contract = _summary(prof, ch), contract.exists()
    write_text(contract, document(contract_nodes(name, prof, ch), _contract_header(name, prof)))
    data = {"contract": _rel(contract, root)}
    if eval_file is None:
        # Grouped by the new contract's text fields, threshold and shingles: what validate's leakage check compares.
        fields = None if ch.text_fields else ch.prompt_fields
        try:
            manifest = holdout.split_file(
                source, splits["train"].parent, eval_fraction, contract_path=contract, text_fields=fields, force=force
            )
        except UsageError:
            if not had_contract:  # nothing is left behind by a refused init
                contract.unlink()
                with contextlib.suppress(OSError):
                    contract.parent.rmdir()  # when init made it
            raise
        lines += holdout.summary(manifest)
        data |= {"train": _rel(splits["train"], root), "eval": _rel(splits["eval"], root)}
        split = f"{source} split by init into {data['train']} and {data['eval']} ({_rel(splits['manifest'], root)})"
    else:
        data |= {"train": _rel(source, root), "eval": _rel(Path(eval_file), root)}
        split = f"train {data['train']}, eval {data['eval']} (as given)"
    write_text(recipe, document(recipe_nodes(name, prof, ch, parent, data, split)))
    limits, said, base_here = _limits(recipe, root)
    if limits:
        write_text(recipe, document(recipe_nodes(name, prof, ch, parent, data, split, limits)))
    lines += [said, f"wrote {data['contract']} (the data contract) and {_rel(recipe, root)} (extends {parent.extends})"]
    return Scaffold(name, data["contract"], _rel(recipe, root), data["train"], data["eval"], lines, base_here)


def _limits(recipe_path: Path, root: Path) -> tuple[list[Y], str, bool]:
    """``training.max_length`` and ``eval.max_new_tokens`` the rows need, when the parent's are too small.

    Counted with the base's tokenizer as validate counts them (``lengths.fit_lengths``); without it (the base is
    not on this machine) the parent's values stay, and validate or train quarantine a row that does not fit.
    Also returns whether the base is on this machine.
    """
    from pipeline.lengths import ANSWER_MARGIN, MARGIN, fit_lengths
    from pipeline.recipe import RecipeError, load_recipe

    try:
        recipe = load_recipe(recipe_path)
    except RecipeError as exc:  # validate, next, reports it in full
        return [], f"  token lengths not measured: {exc.lines()[0]}", True
    fit, why, base_here = fit_lengths(recipe, root)
    parent = f"training.max_length {recipe.training.max_length}, eval.max_new_tokens {recipe.eval.max_new_tokens}"
    if fit is None:
        return [], f"  token lengths not measured ({why}): the parent's {parent} stay", base_here
    seen = f"in {fit.rows:,} rows, with {fit.tokenizer}'s tokenizer"
    nodes = []
    if fit.max_length:
        note = f"longest example {fit.longest:,} tokens (prompt + answer) {seen}; {MARGIN}x, rounded up to 64"
        if fit.too_long:
            note += f"; the base has {fit.context:,} positions: {fit.too_long:,} longer rows are quarantined"
        nodes.append(Y("training", [Y("max_length", fit.max_length, note)]))
    if fit.max_new_tokens:
        note = f"longest answer {fit.longest_answer:,} tokens {seen}; {ANSWER_MARGIN}x, rounded up to 8"
        nodes.append(Y("eval", [Y("max_new_tokens", fit.max_new_tokens, note)]))
    chosen = ", ".join(f"{n.key}.{n.value[0].key} {n.value[0].value}" for n in nodes)
    said = f"  token lengths {seen}: longest example {fit.longest:,}, longest answer {fit.longest_answer:,}; "
    said += f"set {chosen}" if nodes else f"the parent's {parent} fit"
    if fit.too_long:
        said += (
            f"; {fit.too_long:,} rows are longer than the base's {fit.context:,} positions and will be quarantined "
            "(a base with a longer context: --base production or model.path; or shorter rows)"
        )
    return nodes, said, True


def _name(name: str | None, source: Path) -> str:
    if name is not None:
        if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}", name):
            raise UsageError(
                f"--name {name!r}: use 1-64 letters, digits, '.', '_' or '-', starting with a letter or digit (it "
                "names the recipe, the contract and the run directories)"
            )
        return name
    return re.sub(r"[^A-Za-z0-9_.-]+", "-", source.stem).strip("-._")[:64].rstrip("-._") or "data"


def _rel(path: Path, root: Path) -> str:
    """``path`` as the recipe names it: relative to ``root`` (where commands run) when inside it, else absolute."""
    resolved = path.resolve()
    try:
        return resolved.relative_to(root.resolve()).as_posix()
    except ValueError:
        return str(resolved)


def _contract_header(name: str, prof: Profile) -> list[str]:
    lines = [
        f"Data contract for recipes/{name}.yaml, written by `python -m pipeline init` from {prof.source}.",
        "Each rule was inferred from those rows and says so; edit it to say what every row MUST be: validate and",
        "train quarantine a row that breaks a rule, with its line number and reason (docs/data_contracts.md).",
        f"A row: {{{', '.join(json.dumps(n) + ': ...' for n in prof.fields)}}}",
    ]
    if prof.unreadable:
        lines.append(f"Rows that could not be read ({counts(prof.unreadable)}) are quarantined by validate.")
    return lines


def _summary(prof: Profile, ch: Choices) -> list[str]:
    lines = [f"init: {len(prof.fields)} fields in {prof.source}"]
    if ch.target is None:
        lines.append(f"  OpenAI chat file ({ch.answer_why}): task chat")
    else:
        lines.append(f"  answer {ch.answer} from {ch.target!r} ({ch.target_why}; {ch.answer_why})")
        lines.append(f"  prompt: {_template(ch.prompt_fields)!r}")
    if ch.text_fields:
        lines.append(f"  duplicates, leakage and the PII scan on: {', '.join(ch.text_fields)}")
    if prof.unreadable:
        lines.append(f"  rows that could not be read: {counts(prof.unreadable)} (validate quarantines them)")
    return lines
