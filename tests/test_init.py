"""`python -m pipeline init`: a contract and a recipe inferred from one file, the split, and the refusals."""

from __future__ import annotations

import csv
import json
import math
import random
import re
from pathlib import Path

import pytest
import yaml
from conftest import ROOT

from pipeline.contracts import load_contract
from pipeline.errors import UsageError
from pipeline.scaffold import init_project

WORDS = [f"w{i}" for i in range(300)]


def text(rng: random.Random, low: int = 6, high: int = 30) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(rng.randint(low, high)))


def clause_rows(n: int = 60, seed: int = 0) -> list[dict]:
    rng = random.Random(seed)
    labels = ["payment", "termination", "liability"]
    return [{"clause_id": f"C-{i:04d}", "clause_text": text(rng), "category": labels[i % 3]} for i in range(n)]


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def write_csv(path: Path, rows: list[dict]) -> Path:
    with path.open("w", newline="", encoding="utf-8") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return path


def written(root: Path, name: str) -> tuple[dict, dict, str, str]:
    contract_text = (root / "data_contracts" / f"{name}.yaml").read_text(encoding="utf-8")
    recipe_text = (root / "recipes" / f"{name}.yaml").read_text(encoding="utf-8")
    return yaml.safe_load(contract_text), yaml.safe_load(recipe_text), contract_text, recipe_text


def line_of(text: str, start: str) -> str:
    return next(line for line in text.splitlines() if line.strip().startswith(start))


def test_csv_with_its_own_column_names(tmp_path):
    rows = clause_rows()
    write_csv(tmp_path / "clauses.csv", rows)
    result = init_project(tmp_path / "clauses.csv", root=tmp_path)

    assert (result.name, result.contract, result.recipe) == (
        "clauses",
        "data_contracts/clauses.yaml",
        "recipes/clauses.yaml",
    )
    contract, recipe, contract_text, recipe_text = written(tmp_path, "clauses")
    loaded = load_contract(tmp_path / result.contract)  # the contract loader accepts what init wrote
    assert loaded.format == "csv" and loaded.id_field == "clause_id"
    category = loaded.fields["category"]
    assert category.type == "string" and category.required and category.enum == ["liability", "payment", "termination"]
    assert "3 distinct values in 60 rows: payment 20, termination 20, liability 20" in line_of(contract_text, "enum:")
    longest = max(len(r["clause_text"]) for r in rows)
    clause_text = loaded.fields["clause_text"]
    assert (clause_text.min_length, clause_text.max_length) == (1, math.ceil(1.5 * longest))
    assert f"longest {longest} chars in 60 rows; limit = 1.5x" in contract_text
    assert clause_text.pii == "warn" and loaded.fields["clause_id"].pii is None
    assert loaded.dataset.text_fields == ["clause_text"] and loaded.dataset.label_field == "category"
    assert (loaded.dataset.exact_duplicates, loaded.dataset.near_duplicates, loaded.dataset.leakage) == (
        "quarantine",
        "report",
        "quarantine",
    )
    assert loaded.tokens is not None and contract["pii"]["min_score"] == 0.4

    assert recipe["task"] == {"answer": "label", "target": "category", "user_prompt": "{clause_text}"}
    assert recipe["extends"] == str(ROOT / "recipes" / "quickstart.yaml")  # not in tmp_path: the checkout's, absolute
    assert recipe["data"] == {
        "contract": "data_contracts/clauses.yaml",
        "train": "data/clauses/train.csv",
        "eval": "data/clauses/eval.csv",
    }
    assert recipe["name"] == "clauses" and recipe["tracking"] == {"experiment": "clauses"}
    assert "named like a target" in line_of(recipe_text, "target:")
    # The split: every row on one side, the header on both, the manifest beside them.
    with (tmp_path / "data/clauses/train.csv").open() as f1, (tmp_path / "data/clauses/eval.csv").open() as f2:
        train, evaluation = list(csv.DictReader(f1)), list(csv.DictReader(f2))
    assert len(train) + len(evaluation) == 60 and len(evaluation) == 6
    assert sorted(r["clause_id"] for r in train + evaluation) == sorted(r["clause_id"] for r in rows)
    manifest = json.loads((tmp_path / "data/clauses/split_manifest.json").read_text())
    assert manifest["compared"]["text_fields"] == ["clause_text"]
    assert any("answer label from 'category'" in line for line in result.lines)


def test_jsonl_list_target_missing_fields_and_mixed_types(tmp_path):
    rng = random.Random(1)
    codes = ["A", "B", "C", "D"]
    rows = []
    for i in range(40):
        row = {"id": f"n{i}", "note": text(rng, 10, 40), "codes": rng.sample(codes, rng.randint(1, 3)), "age": 30 + i}
        if i % 10 == 0:
            del row["age"]  # missing in 4 of 40 rows
        rows.append(row)
    rows[5]["age"] = "forty"  # one value of another type
    write_jsonl(tmp_path / "notes.jsonl", rows)
    init_project(tmp_path / "notes.jsonl", root=tmp_path)

    contract, recipe, contract_text, _ = written(tmp_path, "notes")
    loaded = load_contract(tmp_path / "data_contracts/notes.yaml")
    assert recipe["task"] == {"answer": "labels", "target": "codes", "user_prompt": "{note}"}
    rule = loaded.fields["codes"]
    assert rule.type == "list" and rule.items.enum == codes and rule.unique_items
    most = max(len(r["codes"]) for r in rows)
    assert (rule.min_items, rule.max_items) == (1, math.ceil(1.5 * most))
    age = loaded.fields["age"]
    assert age.type == "integer" and age.required is False
    assert "missing or null in 4 of 40 rows" in contract_text
    assert "1 value(s) of another type (string 1) are quarantined" in contract_text
    assert loaded.id_field == "id" and loaded.dataset.text_fields == ["note"]


def test_parquet_with_a_number_field(tmp_path):
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    rng = random.Random(2)
    rows = [{"text": text(rng), "label": ["pos", "neg"][i % 2], "score": rng.random()} for i in range(40)]
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "reviews.parquet")
    result = init_project(tmp_path / "reviews.parquet", root=tmp_path, name="reviews-v1")

    loaded = load_contract(tmp_path / result.contract)
    assert loaded.format == "parquet" and loaded.id_field is None
    assert loaded.fields["label"].enum == ["neg", "pos"]
    assert loaded.fields["score"].type == "number" and loaded.fields["score"].required
    assert loaded.fields["text"].max_length == math.ceil(1.5 * max(len(r["text"]) for r in rows))
    _, recipe, _, _ = written(tmp_path, "reviews-v1")
    assert recipe["task"]["answer"] == "label" and recipe["data"]["train"] == "data/reviews-v1/train.parquet"
    assert pq.read_table(tmp_path / "data/reviews-v1/eval.parquet").num_rows == 4


def test_openai_chat_file_trains_as_task_chat(tmp_path):
    rows = chat_rows(30, seed=3)
    write_jsonl(tmp_path / "openai_train.jsonl", rows)
    result = init_project(tmp_path / "openai_train.jsonl", root=tmp_path)

    loaded = load_contract(tmp_path / result.contract)
    assert loaded.conversation is not None and loaded.conversation.pii == "warn"
    assert loaded.dataset.text_fields == ["messages"] and loaded.tokens is not None
    assert loaded.fields["messages"].type == "list" and loaded.fields["messages"].max_items == 5  # 3 x 1.5
    _, recipe, _, _ = written(tmp_path, "openai_train")
    assert recipe["task"] == "chat"
    assert recipe["extends"] == str(ROOT / "recipes" / "openai_migration_quickstart.yaml")
    with pytest.raises(UsageError, match="trains as task: chat"):
        init_project(tmp_path / "openai_train.jsonl", root=tmp_path, target="messages", name="other")


def test_never_overwrites_without_force(tmp_path):
    write_csv(tmp_path / "clauses.csv", clause_rows())
    init_project(tmp_path / "clauses.csv", root=tmp_path)
    contract = tmp_path / "data_contracts/clauses.yaml"
    contract.write_text("# my edits\n" + contract.read_text())
    with pytest.raises(UsageError) as refused:
        init_project(tmp_path / "clauses.csv", root=tmp_path)
    message = str(refused.value)
    for path in ("data_contracts/clauses.yaml", "recipes/clauses.yaml", "data/clauses/train.csv"):
        assert path in message
    assert "--force" in message
    assert contract.read_text().startswith("# my edits")
    init_project(tmp_path / "clauses.csv", root=tmp_path, force=True)
    assert not contract.read_text().startswith("# my edits")


def test_eval_file_given_and_parent_in_the_working_directory(tmp_path):
    (tmp_path / "recipes").mkdir()
    for name in ("quickstart.yaml", "medical_coding.yaml"):
        (tmp_path / "recipes" / name).write_text((ROOT / "recipes" / name).read_text())
    write_jsonl(tmp_path / "train.jsonl", clause_rows(30, seed=4))
    write_jsonl(tmp_path / "dev.jsonl", clause_rows(9, seed=5))
    result = init_project(tmp_path / "train.jsonl", root=tmp_path, eval_file=tmp_path / "dev.jsonl", name="legal")

    _, recipe, contract_text, _ = written(tmp_path, "legal")
    assert recipe["extends"] == "quickstart.yaml"  # beside it: relative, as every shipped recipe
    assert recipe["data"]["train"] == "train.jsonl" and recipe["data"]["eval"] == "dev.jsonl"
    assert not (tmp_path / "data").exists()  # no split
    assert "3 distinct values in 39 rows" in contract_text  # both files profiled
    assert result.train == "train.jsonl"
    production = init_project(
        tmp_path / "train.jsonl", root=tmp_path, eval_file=tmp_path / "dev.jsonl", base="production"
    )
    assert yaml.safe_load((tmp_path / production.recipe).read_text())["extends"] == "medical_coding.yaml"


def test_csv_labels_separated_by_semicolons_and_text_answers(tmp_path):
    rng = random.Random(6)
    rows = [{"note": text(rng), "codes": ";".join(rng.sample(["E11.9", "I10", "J45.909"], 2))} for _ in range(30)]
    write_csv(tmp_path / "coded.csv", rows)
    init_project(tmp_path / "coded.csv", root=tmp_path, answer="labels")
    loaded = load_contract(tmp_path / "data_contracts/coded.yaml")
    assert loaded.fields["codes"].type == "list" and loaded.fields["codes"].items.vocabulary == "icd10cm"
    assert loaded.fields["codes"].max_items == 3

    docs = [{"document": text(rng, 40, 80), "summary": text(rng, 5, 12)} for _ in range(30)]
    write_jsonl(tmp_path / "docs.jsonl", docs)
    init_project(tmp_path / "docs.jsonl", root=tmp_path)
    loaded = load_contract(tmp_path / "data_contracts/docs.yaml")
    _, recipe, _, _ = written(tmp_path, "docs")
    assert recipe["task"] == {"answer": "text", "target": "summary", "user_prompt": "{document}"}
    assert loaded.fields["summary"].pii == "warn" and loaded.fields["summary"].enum is None
    assert loaded.dataset.text_fields == ["document"] and loaded.dataset.label_field is None


@pytest.mark.parametrize(
    ("kwargs", "expected"),
    [
        ({"target": "nope"}, "--target nope: no such field; the rows have: clause_id (string), clause_text (string)"),
        ({"target": "clause_text", "answer": "label"}, "every value of 'clause_text' is distinct"),
        ({"target": "clause_text", "answer": "json"}, "string values (60 distinct values in 60 rows, up to"),
        ({"target": "clause_text", "answer": "json"}, "of which 0 hold a JSON object (json needs every one to)"),
        ({"target": "clause_id", "answer": "number"}, "--answer number: field 'clause_id' holds string values"),
        ({"name": "bad name!"}, "--name 'bad name!': use 1-64 letters"),
        ({"name": "medical_coding", "force": True}, "recipes/medical_coding.yaml is a recipe init extends"),
        ({"eval_fraction": 0.001}, "leaves no eval row"),
    ],
)
def test_refusals_name_the_problem_and_write_nothing(tmp_path, kwargs, expected):
    write_csv(tmp_path / "clauses.csv", clause_rows())
    with pytest.raises(UsageError) as refused:
        init_project(tmp_path / "clauses.csv", root=tmp_path, **kwargs)
    assert expected in str(refused.value)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["clauses.csv"]


def test_no_target_named_asks_for_one(tmp_path):
    rng = random.Random(7)
    write_jsonl(tmp_path / "x.jsonl", [{"question": text(rng), "reply": text(rng)} for _ in range(20)])
    with pytest.raises(UsageError, match=r"which field is the answer\? .*question \(string\), reply \(string\)\. "
                       r"Pass --target FIELD"):  # fmt: skip
        init_project(tmp_path / "x.jsonl", root=tmp_path)
    many = [{"text": text(rng), "label": f"l{i}"} for i in range(100)]  # 100 distinct labels in 100 rows: free text
    write_jsonl(tmp_path / "many.jsonl", many)
    with pytest.raises(UsageError, match="every value of 'label' is distinct"):
        init_project(tmp_path / "many.jsonl", root=tmp_path, answer="label")
    with pytest.raises(UsageError, match="--answer labels: field 'label' holds string values .*; use --answer label"):
        init_project(tmp_path / "many.jsonl", root=tmp_path, answer="labels")  # JSON Lines: a list is a JSON array
    result = init_project(tmp_path / "many.jsonl", root=tmp_path)  # without --answer: text, not a 100-label enum
    assert yaml.safe_load((tmp_path / result.recipe).read_text())["task"]["answer"] == "text"


def test_csv_cells_are_typed_as_the_reader_types_them(tmp_path):
    rng = random.Random(8)
    rows = [
        {
            "text": text(rng),
            "stars": str(1 + i % 5),
            "zip": "02134" if i % 2 else "12345",
            "ok": ["true", "false"][i % 2],
        }
        for i in range(40)
    ]
    write_csv(tmp_path / "reviews.csv", rows)
    init_project(tmp_path / "reviews.csv", root=tmp_path, target="stars", answer="label")
    loaded = load_contract(tmp_path / "data_contracts/reviews.yaml")
    assert loaded.fields["stars"].type == "integer" and loaded.fields["stars"].enum == [1, 2, 3, 4, 5]
    assert loaded.fields["zip"].type == "string"  # "02134" is not a JSON number, so the column is text
    assert loaded.fields["zip"].max_length == 8  # 5 characters, also for the cells that look like numbers
    assert loaded.fields["ok"].type == "boolean"
    # Without --answer an integer target is a number.
    init_project(tmp_path / "reviews.csv", root=tmp_path, target="stars", name="stars")
    assert yaml.safe_load((tmp_path / "recipes/stars.yaml").read_text())["task"]["answer"] == "number"


def test_json_answers_from_objects_or_their_text_in_csv(tmp_path):
    rng = random.Random(14)
    rows = [{"text": text(rng), "fields": {"vendor": rng.choice(["ACME", "Initech"]), "total": i}} for i in range(30)]
    write_jsonl(tmp_path / "invoices.jsonl", rows)
    init_project(tmp_path / "invoices.jsonl", root=tmp_path)
    assert yaml.safe_load((tmp_path / "recipes/invoices.yaml").read_text())["task"]["answer"] == "json"
    assert load_contract(tmp_path / "data_contracts/invoices.yaml").fields["fields"].type == "object"
    write_csv(tmp_path / "invoices.csv", [{**r, "fields": json.dumps(r["fields"])} for r in rows])
    init_project(tmp_path / "invoices.csv", root=tmp_path, name="invoices-csv")
    recipe = yaml.safe_load((tmp_path / "recipes/invoices-csv.yaml").read_text())
    assert recipe["task"] == {"answer": "json", "target": "fields", "user_prompt": "{text}"}


def test_a_long_label_set_is_written_one_label_a_line(tmp_path):
    rng = random.Random(9)
    labels = [f"topic-{i:02d}" for i in range(60)]
    rows = [{"text": text(rng), "labels": rng.sample(labels, 2)} for _ in range(90)]
    write_jsonl(tmp_path / "topics.jsonl", rows)
    init_project(tmp_path / "topics.jsonl", root=tmp_path)
    contract_text = (tmp_path / "data_contracts/topics.yaml").read_text()
    assert max(len(line) for line in contract_text.splitlines()) <= 118
    assert "      - topic-00" in contract_text
    assert load_contract(tmp_path / "data_contracts/topics.yaml").fields["labels"].items.enum == sorted(
        {label for r in rows for label in r["labels"]}
    )


def chat_rows(n: int, seed: int) -> list[dict]:
    rng = random.Random(seed)
    return [
        {
            "messages": [
                {"role": "system", "content": "Route the ticket."},
                {"role": "user", "content": text(rng)},
                {"role": "assistant", "content": rng.choice(["billing", "shipping"])},
            ]
        }
        for _ in range(n)
    ]


def run_init(tmp_path, monkeypatch, capsys, *args: str) -> tuple[int, str, str]:
    """``python -m pipeline init`` in-process, in ``tmp_path`` as the working directory."""
    from pipeline.cli import main

    monkeypatch.chdir(tmp_path)
    code = main(["init", *args])
    out, err = capsys.readouterr()
    return code, out, err


def test_init_then_validate_on_a_chat_file(tmp_path, monkeypatch, capsys):
    write_jsonl(tmp_path / "openai_train.jsonl", chat_rows(40, seed=10))
    code, out, err = run_init(tmp_path, monkeypatch, capsys, "openai_train.jsonl", "--name", "support")
    assert code == 0, out + err
    assert "OpenAI chat file" in out and "task chat" in out
    assert "Recipe recipes/support.yaml is valid; data meets the contract." in out
    assert out.rstrip().endswith("Next: python -m pipeline train recipes/support.yaml")
    assert (tmp_path / "runs" / "support").is_dir()  # validate's reports
    code, _, err = run_init(tmp_path, monkeypatch, capsys, "openai_train.jsonl", "--name", "support")
    assert code == 2 and "already exist(s); init never overwrites: pass --force" in err


def test_init_then_validate_on_a_csv_and_the_task_it_declares(tmp_path, monkeypatch, capsys):
    from pipeline.data import task_for
    from pipeline.recipe import load_recipe

    rows = clause_rows(60, seed=11)
    write_csv(tmp_path / "clauses.csv", rows)
    code, out, err = run_init(tmp_path, monkeypatch, capsys, "clauses.csv")
    assert code == 0, out + err
    assert "Recipe recipes/clauses.yaml is valid; data meets the contract." in out
    assert out.rstrip().endswith("Next: python -m pipeline train recipes/clauses.yaml")
    recipe = load_recipe(tmp_path / "recipes/clauses.yaml")  # working directory: tmp_path (run_init)
    assert (recipe.task.answer, recipe.task.target, recipe.task.user_prompt) == ("label", "category", "{clause_text}")
    task = task_for(recipe, load_contract(tmp_path / "data_contracts/clauses.yaml"))
    assert task.labels == ("liability", "payment", "termination")
    assert "liability, payment, termination" in task.system_prompt
    assert task.user_prompt(rows[0]) == rows[0]["clause_text"] and task.target(rows[0]) == "payment"
    # The 70B base is not on this machine: the data is validated alone and the next steps say what is missing.
    code, out, err = run_init(tmp_path, monkeypatch, capsys, "clauses.csv", "--base", "production", "--name", "big")
    assert code == 0, out + err
    assert "python -m pipeline validate recipes/big.yaml --data-only:" in out
    assert "The base of recipes/big.yaml is not on this machine" in out and "token lengths not measured" in out
    assert load_recipe(tmp_path / "recipes/big.yaml").model.path == "meta-llama/Llama-3.3-70B-Instruct"


def test_a_boolean_target_is_a_label_written_as_the_gold_is(tmp_path):
    from pipeline.data import task_for
    from pipeline.recipe import load_recipe

    rng = random.Random(12)
    write_jsonl(tmp_path / "mail.jsonl", [{"body": text(rng), "spam": i % 3 == 0} for i in range(30)])
    result = init_project(tmp_path / "mail.jsonl", root=tmp_path, target="spam")
    contract = load_contract(tmp_path / result.contract)
    assert contract.fields["spam"].type == "boolean" and contract.fields["spam"].enum == [False, True]
    monkeypatch = pytest.MonkeyPatch()
    with monkeypatch.context() as patch:
        patch.chdir(tmp_path)
        task = task_for(load_recipe(result.recipe), contract)
    assert task.labels == ("false", "true") and task.gold({"spam": True}) == "true"
    assert task.parse("true") == task.gold({"spam": True})


def test_token_limits_sized_with_the_base_tokenizer(tmp_path, tiny_assets):
    # A parent like the quickstart whose limits are too small for these rows, beside the new recipe.
    (tmp_path / "recipes").mkdir()
    (tmp_path / "recipes/medical_coding.yaml").write_text((ROOT / "recipes/medical_coding.yaml").read_text())
    parent = yaml.safe_load((ROOT / "recipes/quickstart.yaml").read_text())
    parent["model"]["path"] = str(tiny_assets["model"])  # 256 positions
    parent["training"]["max_length"], parent["eval"]["max_new_tokens"] = 64, 4
    (tmp_path / "recipes/quickstart.yaml").write_text(yaml.safe_dump(parent))
    rng = random.Random(13)
    docs = [{"document": text(rng, 5, 15), "summary": text(rng, 8, 16)} for _ in range(30)]
    docs[7]["document"] = text(rng, 400, 400)  # longer than the base's 256 positions
    write_jsonl(tmp_path / "docs.jsonl", docs)
    result = init_project(tmp_path / "docs.jsonl", root=tmp_path)

    recipe_text = (tmp_path / result.recipe).read_text()
    recipe = yaml.safe_load(recipe_text)
    assert recipe["training"]["max_length"] == 256  # capped at the base's positions
    notes = " ".join(line.split("#", 1)[1].strip() for line in recipe_text.splitlines() if "#" in line)
    assert re.search(r"the base has 256 positions: [1-9][0-9]* longer rows are quarantined", notes)
    new_tokens = recipe["eval"]["max_new_tokens"]
    assert new_tokens % 8 == 0 and new_tokens > 4 and "longest answer" in notes
    said = next(line for line in result.lines if "token lengths" in line)
    assert "set training.max_length 256, eval.max_new_tokens" in said and "rows are longer than the base's 256" in said
