"""`python -m pipeline split`: one file into train and eval with no leakage, deterministic, with a manifest."""

from __future__ import annotations

import csv
import json
import random
from pathlib import Path

import pytest

from pipeline.cli import main
from pipeline.contracts import load_contract
from pipeline.rundir import sha256_file
from pipeline.splits import ContractRun

ROOT = Path(__file__).resolve().parents[1]
WORDS = [f"w{i}" for i in range(400)]


def sentence(rng: random.Random, n: int = 24) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(n))


def chat_row(question: str, answer: str) -> dict:
    return {
        "messages": [
            {"role": "system", "content": "Route the ticket."},
            {"role": "user", "content": question},
            {"role": "assistant", "content": answer},
        ]
    }


def planted(rng: random.Random, n: int) -> tuple[list[str], list[tuple[int, int]]]:
    """``n`` distinct texts, then exact copies (case and punctuation changed) and near copies (last word changed).

    Returns the texts and the (original, copy) index pairs that must end on one side.
    """
    texts = [sentence(rng) for _ in range(n)]
    pairs = []
    for i in range(0, n, 10):
        pairs.append((i, len(texts)))
        texts.append(texts[i].upper() + ".")
        pairs.append((i, len(texts)))
        texts.append(texts[i].rsplit(" ", 1)[0] + " changed")
    order = list(range(len(texts)))
    rng.shuffle(order)  # copies spread over the file, not next to their originals
    where = {old: new for new, old in enumerate(order)}
    return [texts[i] for i in order], [(where[a], where[b]) for a, b in pairs]


def side_of(out: Path, key, fmt: str = "jsonl") -> dict:
    sides = {}
    for name in ("train", "eval"):
        for row in read_rows(out / f"{name}.{fmt}", fmt):
            sides[key(row)] = name
    return sides


def read_rows(path: Path, fmt: str) -> list[dict]:
    if fmt == "csv":
        with path.open(newline="") as handle:
            return list(csv.DictReader(handle))
    if fmt == "parquet":
        import pyarrow.parquet as pq

        return pq.read_table(path).to_pylist()
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def leakage(contract_path: Path, out: Path, fmt: str = "jsonl") -> int:
    """Eval rows that validate's own contract checks find in train (exact or near copies)."""
    run = ContractRun(load_contract(contract_path))
    run.split("train", out / f"train.{fmt}")
    evaluation = run.split("eval", out / f"eval.{fmt}")
    run.finish()
    return evaluation.checks["leakage"].count


@pytest.fixture(scope="module")
def chat_file(tmp_path_factory) -> tuple[Path, list[tuple[int, int]], list[str]]:
    rng = random.Random(3)
    questions, pairs = planted(rng, 200)
    rows = [chat_row(q, json.dumps({"queue": rng.choice(["billing", "shipping"])})) for q in questions]
    path = tmp_path_factory.mktemp("chat") / "openai_train.jsonl"
    lines = [json.dumps(r) for r in rows]
    lines.insert(17, "this line is not JSON")
    path.write_text("\n".join(lines) + "\n")
    return path, pairs, questions


def test_chat_file_splits_without_leakage_and_keeps_every_line(chat_file, tmp_path, capsys):
    path, pairs, questions = chat_file
    out = tmp_path / "out"
    assert main(["split", str(path), "--eval-fraction", "0.1", "--out", str(out), "--seed", "7"]) == 0
    printed = capsys.readouterr().out
    assert f"--set data.train={out / 'train.jsonl'} --set data.eval={out / 'eval.jsonl'}" in printed

    train_lines = (out / "train.jsonl").read_text().splitlines()
    eval_lines = (out / "eval.jsonl").read_text().splitlines()
    assert sorted(train_lines + eval_lines) == sorted(path.read_text().splitlines())  # nothing lost or changed
    assert "this line is not JSON" in train_lines  # unreadable rows go where validate quarantines them

    sides = {}
    for name, lines in (("train", train_lines), ("eval", eval_lines)):
        for line in lines:
            if line.startswith("{"):
                sides[json.loads(line)["messages"][1]["content"]] = name
    for a, b in pairs:  # every planted copy and near copy sits on its original's side
        assert sides[questions[a]] == sides[questions[b]]
    assert leakage(ROOT / "data_contracts" / "openai_chat.yaml", out) == 0

    manifest = json.loads((out / "split_manifest.json").read_text())
    assert manifest["source"]["sha256"] == sha256_file(path) and manifest["source"]["rows"] == 241
    assert manifest["outputs"]["eval"]["rows"] == len(eval_lines) == manifest["eval_target_rows"] == 24
    assert manifest["outputs"]["train"]["rows"] + manifest["outputs"]["eval"]["rows"] == 241
    for name in ("train", "eval"):
        assert manifest["outputs"][name]["sha256"] == sha256_file(out / f"{name}.jsonl")
    assert manifest["groups"]["with_copies"] == 20 and manifest["groups"]["rows_in_groups_with_copies"] == 60
    assert manifest["rows_without_text"] == {"json": 1} and manifest["rows_without_text_first_lines"] == [18]


def test_the_same_seed_gives_the_same_split_and_another_seed_another(chat_file, tmp_path):
    path = chat_file[0]
    digests = []
    for run, seed in (("a", 1), ("b", 1), ("c", 2)):
        assert main(["split", str(path), "--out", str(tmp_path / run), "--seed", str(seed)]) == 0
        digests.append(sha256_file(tmp_path / run / "eval.jsonl"))
    assert digests[0] == digests[1] != digests[2]


def test_naive_split_would_leak_so_the_test_can_fail(chat_file, tmp_path):
    """The planted copies really are copies to validate: every tenth line as eval leaks some of them."""
    path = chat_file[0]
    lines = path.read_text().splitlines()
    out = tmp_path / "naive"
    out.mkdir()
    (out / "train.jsonl").write_text("\n".join(l for i, l in enumerate(lines) if i % 10) + "\n")  # noqa: E741
    (out / "eval.jsonl").write_text("\n".join(l for i, l in enumerate(lines) if not i % 10) + "\n")  # noqa: E741
    assert leakage(ROOT / "data_contracts" / "openai_chat.yaml", out) > 0


@pytest.mark.parametrize("fmt", ["jsonl", "csv", "parquet"])
def test_task_files_in_every_format_split_without_leakage(fmt, tmp_path):
    rng = random.Random(5)
    notes, pairs = planted(rng, 120)
    rows = [{"id": f"note-{i:04d}", "note": note, "codes": "I10"} for i, note in enumerate(notes)]
    source = tmp_path / f"notes.{fmt}"
    if fmt == "jsonl":
        source.write_text("".join(json.dumps(r) + "\n" for r in rows))
    elif fmt == "csv":
        rows[3]["note"] = 'a quoted "note"\nthat spans two lines ' + rows[3]["note"]
        notes[3] = rows[3]["note"]
        with source.open("w", newline="") as handle:
            writer = csv.DictWriter(handle, fieldnames=["id", "note", "codes"])
            writer.writeheader()
            writer.writerows(rows)
    else:
        import pyarrow as pa
        import pyarrow.parquet as pq

        pq.write_table(pa.Table.from_pylist(rows), source)
    out = tmp_path / "out"
    assert main(["split", str(source), "--eval-fraction", "0.2", "--out", str(out)]) == 0
    sides = side_of(out, lambda row: row["id"], fmt)
    assert len(sides) == len(rows)  # every row on exactly one side, none lost
    assert sum(side == "eval" for side in sides.values()) == round(0.2 * len(rows))
    for a, b in pairs:
        assert sides[rows[a]["id"]] == sides[rows[b]["id"]]
    contract = tmp_path / "contract.yaml"
    contract.write_text(
        "name: notes\nversion: 1\nformat: auto\nextra_fields: ignore\nfields:\n  note: {type: string}\n"
        "dataset:\n  text_fields: [note]\n  leakage: quarantine\n"
    )
    assert leakage(contract, out, fmt) == 0
    assert read_rows(out / f"train.{fmt}", fmt)[0].keys() == rows[0].keys()
    assert json.loads((out / "split_manifest.json").read_text())["compared"]["text_fields"] == ["note"]


def test_a_contract_or_text_field_says_what_to_compare(tmp_path, capsys):
    rng = random.Random(9)
    source = tmp_path / "clauses.jsonl"
    source.write_text("".join(json.dumps({"clause_text": sentence(rng), "category": "x"}) + "\n" for _ in range(30)))
    assert main(["split", str(source), "--out", str(tmp_path / "a")]) == 2
    err = capsys.readouterr().err
    assert "cannot tell which field holds the text" in err and "--text-field" in err and "clause_text" in err
    assert main(["split", str(source), "--out", str(tmp_path / "b"), "--text-field", "clause_text"]) == 0
    contract = tmp_path / "c.yaml"
    contract.write_text(
        "name: c\nversion: 1\nextra_fields: ignore\nfields:\n  clause_text: {type: string}\n"
        "dataset:\n  text_fields: [clause_text]\n  near_duplicate_threshold: 0.9\n"
    )
    assert main(["split", str(source), "--out", str(tmp_path / "c"), "--contract", str(contract)]) == 0
    compared = json.loads((tmp_path / "c" / "split_manifest.json").read_text())["compared"]
    assert compared["text_fields"] == ["clause_text"] and compared["near_duplicate_threshold"] == 0.9


@pytest.mark.parametrize(
    "args, says",
    [
        (["--eval-fraction", "1.5"], "must be between 0 and 1"),
        (["--eval-fraction", "0.0001"], "no eval row"),
    ],
)
def test_bad_requests_are_usage_errors(chat_file, tmp_path, capsys, args, says):
    assert main(["split", str(chat_file[0]), "--out", str(tmp_path / "o"), *args]) == 2
    assert says in capsys.readouterr().err
    assert not (tmp_path / "o" / "train.jsonl").exists()


def test_existing_splits_are_not_replaced_without_force(chat_file, tmp_path, capsys):
    out = tmp_path / "o"
    assert main(["split", str(chat_file[0]), "--out", str(out)]) == 0
    before = sha256_file(out / "eval.jsonl")
    assert main(["split", str(chat_file[0]), "--out", str(out), "--seed", "4"]) == 2
    assert "--force" in capsys.readouterr().err and sha256_file(out / "eval.jsonl") == before
    assert main(["split", str(chat_file[0]), "--out", str(out), "--seed", "4", "--force"]) == 0
    assert main(["split", str(tmp_path / "missing.jsonl"), "--out", str(out)]) == 2
