import json

import pytest
from conftest import ROOT

from pipeline.contracts import check_row, load_contract, validate_split
from pipeline.recipe import RecipeError

CONTRACT = load_contract(ROOT / "data_contracts" / "medical_coding.yaml")
GOOD = {"id": "n1", "note": "Pt with h/o essential hypertension, stable.", "codes": ["I10"]}

# (line content, expected failed check, field) -- each line is one planted problem.
PLANTED = [
    (json.dumps({**GOOD, "codes": ["E11"]}), "billable", "codes[0]"),  # a category, not billable
    (json.dumps({**GOOD, "codes": ["Q99.99"]}), "vocabulary", "codes[0]"),  # pattern-valid, not a code
    (json.dumps({**GOOD, "codes": ["e11.9"]}), "pattern", "codes[0]"),
    (json.dumps({**GOOD, "codes": []}), "min_items", "codes"),
    (json.dumps({**GOOD, "codes": ["I10", "I10"]}), "unique_items", "codes"),
    (json.dumps({**GOOD, "codes": "I10"}), "type", "codes"),
    (json.dumps({"id": "n9", "codes": ["I10"]}), "required", "note"),
    (json.dumps({**GOOD, "note": "too short"}), "min_length", "note"),
    (json.dumps({**GOOD, "note": 42}), "type", "note"),
    (json.dumps({**GOOD, "id": "bad id!"}), "pattern", "id"),
    ('{"id": "n1", "note": "Pt with essential hypertension.", "codes": ["I10"], "score": NaN}', "json", None),
    ('{"id": "n1", "note": ', "json", None),
    ("[1, 2, 3]", "row_type", None),
    ("", "blank_line", None),
]


def write_lines(path, lines):
    path.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
    return path


def test_good_row_passes():
    assert check_row(GOOD, CONTRACT) == []


@pytest.mark.parametrize("line,check,field", PLANTED, ids=[p[1] + ":" + str(p[2]) for p in PLANTED])
def test_each_planted_problem_is_caught_with_its_reason(tmp_path, line, check, field):
    path = write_lines(tmp_path / "split.jsonl", [json.dumps(GOOD), line])
    result = validate_split("train", path, CONTRACT)
    assert result.rows_in == 2 and result.rows_accepted == 1 and result.rows_quarantined == 1
    (quarantined,) = result.quarantined
    assert quarantined["row"] == 2 and quarantined["split"] == "train"
    assert {"check": check, "field": field} in [{k: r[k] for k in ("check", "field")} for r in quarantined["reasons"]]


def test_invalid_utf8_and_bom_and_crlf(tmp_path):
    path = tmp_path / "split.jsonl"
    path.write_bytes(b"\xef\xbb\xbf" + json.dumps(GOOD).encode() + b"\r\n" + b'{"note": "\xff\xfe"}\n')
    result = validate_split("eval", path, CONTRACT)
    assert result.rows_accepted == 1  # BOM and CRLF are tolerated
    assert result.quarantined[0]["reasons"][0]["check"] == "encoding"


def test_counts_reconcile_and_nothing_is_lost_through_the_cli(tmp_path):
    from test_recipe import run_cli

    good = [json.dumps({**GOOD, "id": f"g{i}"}) for i in range(20)]
    train = write_lines(tmp_path / "train.jsonl", good[:10] + [p[0] for p in PLANTED] + good[10:])
    evalf = write_lines(tmp_path / "eval.jsonl", good[:5])
    run_dir = tmp_path / "run"
    result = run_cli(
        "validate",
        "recipes/quickstart.yaml",
        "--set",
        f"data.train={train}",
        "--set",
        f"data.eval={evalf}",
        "--run-dir",
        str(run_dir),
    )
    # 14 of 34 rows bad is above the contract's 5% limit: the job stops with exit 1, reports written.
    assert result.returncode == 1, result.stderr
    assert "max_quarantine_fraction" in result.stderr
    report = json.loads((run_dir / "validation" / "report.json").read_text())
    split = report["splits"]["train"]
    assert split["rows_in"] == 34 and split["rows_accepted"] == 20 and split["rows_quarantined"] == 14
    assert report["reconciled"] is True
    quarantine = [json.loads(line) for line in (run_dir / "validation" / "quarantine.jsonl").read_text().splitlines()]
    assert sorted(q["row"] for q in quarantine) == list(range(11, 25))
    assert split["failed_checks"]["billable"] == 1 and split["failed_checks"]["json"] == 2


def test_validate_passes_on_clean_data(tmp_path, tiny_assets):
    from test_recipe import run_cli

    data = tiny_assets["data"]
    result = run_cli(
        "validate",
        "recipes/quickstart.yaml",
        "--set",
        f"data.train={data / 'train.jsonl'}",
        "--set",
        f"data.eval={data / 'eval.jsonl'}",
        "--run-dir",
        str(tmp_path / "run"),
    )
    assert result.returncode == 0, result.stderr
    report = json.loads((tmp_path / "run" / "validation" / "report.json").read_text())
    assert report["splits"]["train"]["rows_accepted"] == 160 and report["splits"]["eval"]["rows_accepted"] == 24


def test_bad_contract_is_a_usage_error_with_hint(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("name: x\nfields:\n  note: {type: string, min_lenght: 3}\n")
    with pytest.raises(RecipeError, match=r"fields.note.min_lenght: unknown key \(did you mean 'min_length'\?\)"):
        load_contract(path)
