"""Tasks declared in the recipe: any contract's own field names, presets overridden key by key, every task/contract
mismatch found by ``validate`` by its key, and the prompt on record (``prompt.json``) as training saw it."""

from __future__ import annotations

import csv
import json
import random

import pytest
import yaml
from helpers import run_main

from pipeline.contracts import load_contract
from pipeline.data import task_for
from pipeline.recipe import RecipeError, load_recipe
from pipeline.tasks import get_task

LABELS = ["termination", "liability", "payment"]
CLAUSES = {
    "termination": "Either party may terminate this agreement with {n} days written notice to the other party.",
    "liability": "Neither party is liable for indirect damages above {n} times the fees paid under this agreement.",
    "payment": "Invoices are payable within {n} days of receipt by wire transfer to the supplier account.",
}

LEGAL_CONTRACT = {
    "name": "legal_clauses",
    "version": 1,
    "format": "auto",
    "id_field": "clause_id",
    "extra_fields": "ignore",
    "fields": {
        "clause_id": {"type": "string"},
        "clause_text": {"type": "string", "min_length": 10, "max_length": 400},
        "category": {"type": "string", "enum": LABELS},
    },
    "dataset": {"text_fields": ["clause_text"], "exact_duplicates": "quarantine", "leakage": "quarantine"},
}


def _write_csv(path, rows):
    with path.open("w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=["clause_id", "clause_text", "category"])
        writer.writeheader()
        writer.writerows(rows)
    return path


@pytest.fixture(scope="module")
def legal(tmp_path_factory):
    """A CSV of contract clauses under the user's own column names, split, with its contract."""
    root = tmp_path_factory.mktemp("legal")
    rng = random.Random(3)
    rows = []
    for i in range(120):
        category = LABELS[i % 3]
        rows.append({"clause_id": f"c{i}", "clause_text": CLAUSES[category].format(n=i + 7), "category": category})
    rng.shuffle(rows)
    contract = root / "legal.yaml"
    contract.write_text(yaml.safe_dump(LEGAL_CONTRACT, sort_keys=False), encoding="utf-8")
    return {
        "contract": contract,
        "train": _write_csv(root / "train.csv", rows[:96]),
        "eval": _write_csv(root / "eval.csv", rows[96:]),
    }


def _legal_recipe(recipe_with, legal, name="legal.yaml", **task):
    return recipe_with(
        name,
        name="legal",
        task={"answer": "label", "target": "category", "user_prompt": "Clause: {clause_text}", **task},
        data={"contract": str(legal["contract"]), "train": str(legal["train"]), "eval": str(legal["eval"])},
    )


def test_a_declared_task_over_a_csv_with_its_own_column_names_trains_evaluates_and_records_its_prompt(
    recipe_with, legal, tmp_path
):
    path = _legal_recipe(recipe_with, legal)
    run_dir = tmp_path / "run"
    result = run_main("train", str(path), "--run-dir", str(run_dir), "--set", "training.max_steps=6")
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]

    metrics = json.loads((run_dir / "eval" / "metrics.json").read_text())
    assert metrics["main_metric"] == "accuracy"
    assert set(metrics["systems"]) >= {"base", "finetuned"}
    assert "accuracy" in metrics["systems"]["finetuned"] and "macro_f1" in metrics["systems"]["finetuned"]

    record = json.loads((run_dir / "prompt.json").read_text())
    rendering = record["rendering"]
    assert rendering["user_prompt"] == "Clause: {clause_text}" and rendering["target"] == "category"
    assert rendering["label_set"] == LABELS and rendering["prompt_format"] == "plain"
    assert rendering["system_prompt"] == (
        "Classify the text into exactly one of these labels: termination, liability, payment. Answer with the label "
        "only."
    )
    example = record["example"]
    assert example["prompt"].startswith("Clause: ") and example["prompt"].endswith("\nAnswer:")
    assert example["completion"].strip() in LABELS
    # What TRL tokenized for the first training row is our rendering of it: BOS + prompt + completion + EOS.
    assert example["trained_text"] == "<s>" + example["prompt"] + example["completion"] + "</s>"
    assert record["skeleton"] == "Clause: {clause_text}\nAnswer:"
    plan = json.loads((run_dir / "plan.json").read_text())
    assert plan["prompt"] == rendering

    # The same run scored with another prompt is refused, key by key, before any model loads.
    refused = run_main("evaluate", str(path), "--run", str(run_dir), "--set", "task.user_prompt='Text: {clause_text}'")
    assert refused.returncode == 2
    assert "task.user_prompt: the run was trained with 'Clause: {clause_text}'" in refused.stderr


def test_a_preset_with_only_its_system_prompt_overridden_keeps_everything_else(recipe_with):
    path = recipe_with(task={"preset": "medical_coding", "system_prompt": "List the ICD-10-CM codes."})
    recipe = load_recipe(path)
    contract = load_contract(recipe.data.contract)
    task, preset = task_for(recipe, contract), get_task("medical_coding")
    row = {"note": "Type 2 diabetes without complications.", "codes": ["E11.9"]}
    assert task.system_prompt == "List the ICD-10-CM codes." != preset.system_prompt
    assert task.user_prompt(row) == preset.user_prompt(row) and task.plain_prompt(row) == preset.plain_prompt(row)
    assert task.target(row) == preset.target(row) == "E11.9"
    assert task.parse("E11.9, I10") == preset.parse("E11.9, I10") == ["E11.9", "I10"]
    assert task.main_metric == "micro_f1" and task.table_metrics == preset.table_metrics
    assert task.score([["E11.9"]], [["E11.9", "ZZZ.9"]]) == preset.score([["E11.9"]], [["E11.9", "ZZZ.9"]])


def test_the_classification_preset_reads_the_users_own_field_names(recipe_with, legal):
    path = _legal_recipe(recipe_with, legal, preset="classification")
    recipe = load_recipe(path)
    task = task_for(recipe, load_contract(recipe.data.contract))
    row = {"clause_text": "Invoices are payable within 30 days.", "category": "payment"}
    assert task.user_prompt(row) == "Clause: Invoices are payable within 30 days."
    assert task.target(row) == "payment" and task.parse("It is Payment.") == "payment"
    # The preset's plain prompt names `{text}`; with the user's own prompt it gives way to that prompt.
    assert task.plain_prompt(row) == "Clause: Invoices are payable within 30 days.\nAnswer:"


def test_validate_reports_every_task_contract_mismatch_by_its_key_with_exit_2(recipe_with, legal, tmp_path):
    path = _legal_recipe(
        recipe_with,
        legal,
        target="categroy",
        user_prompt="Clause: {clause_txt} ({category})",
        system_prompt="Labels: {label_set}",
    )
    result = run_main("validate", str(path), "--run-dir", str(tmp_path / "v"))
    assert result.returncode == 2, result.stderr
    err = result.stderr
    assert "task.target: 'categroy' is not a field of" in err and "(did you mean 'category'?)" in err
    planned = run_main("plan", str(path), "--run-dir", str(tmp_path / "p"))  # plan checks the task the same way
    assert planned.returncode == 2 and "task.target: 'categroy' is not a field of" in planned.stderr

    path = _legal_recipe(recipe_with, legal, "two.yaml", user_prompt="Clause: {clause_txt} {category}")
    err = run_main("validate", str(path), "--run-dir", str(tmp_path / "v2")).stderr
    assert "task.user_prompt: {clause_txt} names no field of" in err and "(did you mean 'clause_text'?)" in err
    assert "task.user_prompt: {category} is the target: the answer would be in the prompt" in err

    no_enum = tmp_path / "no_enum.yaml"
    contract = json.loads(json.dumps(LEGAL_CONTRACT))
    del contract["fields"]["category"]["enum"]
    no_enum.write_text(yaml.safe_dump(contract), encoding="utf-8")
    path = recipe_with(
        "three.yaml",
        name="legal",
        task={"answer": "label", "target": "category", "user_prompt": "{clause_text}"},
        data={"contract": str(no_enum), "train": str(legal["train"]), "eval": str(legal["eval"])},
        model={"path": str(tmp_path / "no-such-base")},
    )
    result = run_main("validate", str(path), "--run-dir", str(tmp_path / "v3"))
    assert result.returncode == 2
    lines = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    # All at once: the missing label set and the tokenizer that cannot be found.
    assert any("task.answer: 'label' needs the label set" in line and "fields.category.enum" in line for line in lines)
    assert any("model.path:" in line and "--data-only" in line for line in lines)
    assert "Traceback" not in result.stderr
    # --data-only checks the data without the base: the task mismatch is still an error, the tokenizer is not.
    data_only = run_main("validate", str(path), "--data-only", "--run-dir", str(tmp_path / "v4"))
    assert data_only.returncode == 2 and "model.path:" not in data_only.stderr


def test_validate_refuses_chat_where_the_base_has_no_chat_template(recipe_with, tmp_path):
    path = recipe_with(data={"prompt_format": "chat"})
    result = run_main("validate", str(path), "--run-dir", str(tmp_path / "v"))
    assert result.returncode == 2
    assert "data.prompt_format: 'chat' needs a chat template" in result.stderr


@pytest.mark.parametrize(
    ("task", "key", "says"),
    [
        ({"answer": "label", "target": "category"}, "task.user_prompt", "required without a preset"),
        ({"answer": "label", "target": "c", "user_prompt": "{x"}, "task.user_prompt", "a lone '{'"),
        ({"preset": "classification", "metrics": ["acuracy"]}, "task.metrics", "did you mean 'accuracy'"),
        ({"preset": "classification", "metrics": ["macro_f1"]}, "task.metrics", "cannot come first"),
        ({"preset": "classification", "parse": "list"}, "task.parse", "does not read a 'label' answer"),
        ({"preset": "chat", "user_prompt": "{text}"}, "task.user_prompt", "does not apply to answer chat"),
        ({"preset": "summarization", "user_prompt": "{label_set} {text}"}, "task.user_prompt", "applies to answer"),
        ({"answer": "labels", "target": "c", "user_prompt": "{t}", "parse": "regex"}, "task.parse_pattern", "needs"),
        ({"preset": "nosuch"}, "task.preset", "medical_coding"),
    ],
)
def test_a_wrong_task_section_is_refused_by_its_key(recipe_with, task, key, says):
    with pytest.raises(RecipeError) as caught:
        load_recipe(recipe_with(task=task))
    assert any(f": {key}: " in line and says in line for line in caught.value.errors), caught.value.errors


def test_declared_answer_types_parse_and_score(recipe_with):
    from pipeline.tasks import build_task
    from pipeline.taskspec import TaskSection

    number = build_task(
        TaskSection.model_validate({"answer": "number", "target": "n", "user_prompt": "{q}", "tolerance": 0.5})
    )
    assert number.parse("about 1,250.5 USD") == 1250.5 and number.target({"n": 3.0}) == "3"
    scores = number.score([1.0, 2.0, 3.0], [1.4, None, 9.0])
    assert scores["accuracy"] == pytest.approx(1 / 3) and scores["parse_rate"] == pytest.approx(2 / 3)
    assert scores["mae"] == pytest.approx((0.4 + 6.0) / 2)
    labels = build_task(
        TaskSection.model_validate({"answer": "labels", "target": "tags", "user_prompt": "{t}"}), ["urgent", "legal"]
    )
    assert labels.parse("Urgent; legal\nother") == ["urgent", "legal", "other"]
    assert labels.score([["urgent"]], [["urgent", "other"]])["invalid_label_rate"] == 0.5
    text = build_task(TaskSection.model_validate({"answer": "text", "target": "reply", "user_prompt": "{q}"}))
    assert text.main_metric == "rougeL_f" and text.freeform_reference({"reply": "ok"}) == "ok"
    js = build_task(
        TaskSection.model_validate({"answer": "json", "target": "out", "user_prompt": "{q} -> {json_fields}"})
    )
    row = {"q": "Bob, 12", "out": {"name": "Bob", "age": 12}}
    assert js.user_prompt(row) == "Bob, 12 -> name, age" and js.gold(row) == {"name": "Bob", "age": 12}
