import json

import pytest
from conftest import ROOT

from pipeline.contracts import check_row, load_contract
from pipeline.recipe import RecipeError
from pipeline.splits import validate_split

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
    from helpers import run_main

    good = [json.dumps({**GOOD, "id": f"g{i}", "note": note_row(i)["note"]}) for i in range(25)]
    train = write_lines(tmp_path / "train.jsonl", good[:10] + [p[0] for p in PLANTED] + good[10:20])
    evalf = write_lines(tmp_path / "eval.jsonl", good[20:])
    run_dir = tmp_path / "run"
    result = run_main(
        "validate",
        "recipes/quickstart.yaml",
        "--data-only",  # the data only: a fresh clone has no demo base until make demo
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
    from helpers import run_main

    data = tiny_assets["data"]
    result = run_main(
        "validate",
        "recipes/quickstart.yaml",
        "--data-only",  # the data only: a fresh clone has no demo base until make demo
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


# --------------------------------------------------------------------------------------------------
# Contract v2: dataset checks, PII policy, tokens, formats. Each test plants a problem and checks the reason.

SSN, PHONE, MRN = "536-22-8726", "617-726-2000", "00412345"


def note_row(i, text=None, codes=("I10",)):
    words = ["alpha", "bravo", "charlie", "delta", "echo", "foxtrot", "golf", "hotel", "india", "juliet"]
    text = text or f"Pt {i} seen. " + " ".join(words[(i * 7 + k) % 10] + str((i * 13 + k) % 97) for k in range(12))
    return {"id": f"r{i}", "note": text, "codes": list(codes)}


def write_rows(path, rows):
    return write_lines(path, [json.dumps(r) for r in rows])


def run_contract(contract, train, evaluation, measure=None, max_length=None):
    from pipeline.splits import ContractRun

    run = ContractRun(contract, measure_tokens=measure, max_length=max_length)
    splits = [run.split("train", train), run.split("eval", evaluation)]
    dataset = run.finish()
    for split in splits:  # nothing is ever lost
        assert split.rows_in == split.rows_accepted + split.rows_quarantined == len(split.rows) + split.rows_quarantined
        every_row = sorted([q["row"] for q in split.quarantined] + [r["_row"] for r in split.rows])
        assert every_row == list(range(1, split.rows_in + 1))  # each line exactly once, accepted or quarantined
    return splits, dataset


def reasons_of(split):
    return {q["row"]: {(r["check"], r["field"]) for r in q["reasons"]} for q in split.quarantined}


def test_planted_dataset_problems_are_caught_with_their_reasons(tmp_path):
    train_rows = [note_row(i, codes=("I10",) if i % 3 else ("E11.9",)) for i in range(30)]  # 20 vs 10
    train_rows.append({**train_rows[3], "id": "copy", "note": train_rows[3]["note"].upper() + "!!"})  # exact dup
    eval_rows = [note_row(100 + i) for i in range(10)]
    eval_rows.append({**train_rows[5], "id": "leak-exact"})  # row 11: copied from train row 6
    near = train_rows[7]["note"].split()
    near[-1] = "zulu"  # one word changed of 14: estimated similarity ~0.8+
    eval_rows.append({**train_rows[7], "id": "leak-near", "note": " ".join(near) + " " + " ".join(near[-4:])})
    eval_rows.append(note_row(200, codes=("K35.80",)))  # row 13: a code train never saw
    splits, dataset = run_contract(
        CONTRACT, write_rows(tmp_path / "t.jsonl", train_rows), write_rows(tmp_path / "e.jsonl", eval_rows)
    )
    train, evaluation = splits
    assert reasons_of(train) == {31: {("exact_duplicate", "note")}}
    assert train.checks["exact_duplicate"].pairs == [{"row": 31, "duplicate_of": 4}]
    assert reasons_of(evaluation) == {11: {("leakage", "note")}, 12: {("leakage", "note")}}
    pairs = {p["row"]: p["train_row"] for p in evaluation.checks["leakage"].pairs}
    assert pairs == {11: 6, 12: 8}
    # label coverage is reported (default action), the row stays in eval
    assert evaluation.checks["label_coverage"].examples == [13] and 13 in {r["_row"] for r in evaluation.rows}
    assert dataset["label_coverage"]["labels"] == {"K35.80": {"train_count": 0, "eval_rows": 1}}
    assert dataset["imbalance"]["ratio"] == 2.0


def test_coverage_and_near_duplicates_can_quarantine(tmp_path):
    rules = CONTRACT.dataset.model_copy(update={"label_coverage": "quarantine", "near_duplicates": "quarantine"})
    contract = CONTRACT.model_copy(update={"dataset": rules})
    base = note_row(1)  # 15 words, 13 shingles; one word more shares all 13 of 14: similarity ~0.93
    train_rows = [note_row(i) for i in range(10)] + [{**base, "id": "n", "note": base["note"] + " today"}]
    splits, _ = run_contract(
        contract,
        write_rows(tmp_path / "t.jsonl", train_rows),
        write_rows(tmp_path / "e.jsonl", [note_row(50, codes=("K35.80",))]),
    )
    assert reasons_of(splits[0]) == {11: {("near_duplicate", "note")}}
    # noted once where found, not again when quarantined
    assert splits[0].checks["near_duplicate"].count == 1 and splits[1].checks["label_coverage"].count == 1
    (quarantined,) = splits[1].quarantined
    assert (
        quarantined["reasons"][0]["check"] == "label_coverage" and "K35.80 (0x)" in quarantined["reasons"][0]["message"]
    )


def test_pii_is_redacted_before_anything_sees_the_row(tmp_path):
    rows = [note_row(i) for i in range(5)]
    rows[1]["note"] += f" SSN {SSN}. Call {PHONE}. MRN: {MRN}. DOB: 03/14/1962."
    train, evaluation = run_contract(
        CONTRACT, write_rows(tmp_path / "t.jsonl", rows), write_rows(tmp_path / "e.jsonl", [note_row(9)])
    )[0]
    redacted = next(r for r in train.rows if r["_row"] == 2)["note"]
    assert "SSN <US_SSN>. Call <PHONE_NUMBER>. MRN: <MEDICAL_RECORD_NUMBER>. DOB: <DATE_OF_BIRTH>." in redacted
    assert SSN not in redacted and PHONE not in redacted and MRN not in redacted
    stat = train.checks["pii_redact"]
    assert stat.count == 1 and stat.examples == [2]
    assert dict(stat.by) == {
        f"note:{e}": 1 for e in ("US_SSN", "PHONE_NUMBER", "MEDICAL_RECORD_NUMBER", "DATE_OF_BIRTH")
    }
    assert train.rows_quarantined == 0


def test_pii_block_quarantines_without_quoting_the_value(tmp_path):
    fields = {
        **CONTRACT.fields,
        "note": CONTRACT.fields["note"].model_copy(update={"pii": "block", "pattern": "Pt .*"}),
    }
    contract = CONTRACT.model_copy(update={"fields": fields})
    rows = [note_row(i) for i in range(4)]
    rows[2]["note"] += f" SSN {SSN} phone {PHONE}"
    rows[1]["note"] = f"SSN {SSN} seen for hypertension follow-up"  # fails the pattern: not quoted either
    train = run_contract(
        contract, write_rows(tmp_path / "t.jsonl", rows), write_rows(tmp_path / "e.jsonl", [note_row(9)])
    )[0][0]
    quarantine = json.dumps(train.quarantined) + json.dumps(train.summary())
    assert SSN not in quarantine and PHONE not in quarantine and "pt 2 seen" not in quarantine.lower()
    row3 = next(q for q in train.quarantined if q["row"] == 3)
    assert ("pii", "note") in {(r["check"], r["field"]) for r in row3["reasons"]}
    assert "US_SSN x1" in json.dumps(row3)
    row2 = next(q for q in train.quarantined if q["row"] == 2)
    assert row2["reasons"][0]["message"].startswith("the value (withheld: the field has a pii policy) does not match")


def test_over_long_examples_are_quarantined_because_truncation_would_cut_the_codes(tmp_path):
    def words(rows):  # a stand-in tokenizer: one token per word, prompt = note, completion = codes + EOS
        return [(len(r["note"].split()), len(r["note"].split()) + len(r["codes"]) + 1) for r in rows]

    rows = [note_row(i) for i in range(5)]
    rows[3]["note"] += " more" * 6  # 15 + 6 = 21 prompt tokens: above 20 before the completion starts
    train = run_contract(
        CONTRACT, write_rows(tmp_path / "t.jsonl", rows), write_rows(tmp_path / "e.jsonl", [note_row(9)]), words, 20
    )[0][0]
    (q,) = train.quarantined
    assert q["row"] == 4 and q["reasons"][0]["check"] == "max_tokens"
    assert "truncation would cut all of the completion" in q["reasons"][0]["message"]
    assert train.token_lengths == [17] * 4  # 15 note words + 1 code + EOS


def test_token_lengths_use_the_recipes_tokenizer(tmp_path, tiny_assets, tiny_recipe_path):
    from pipeline.data import validate_data
    from pipeline.model import tokenizer_or_reason
    from pipeline.recipe import load_recipe

    rows = [json.loads(line) for line in (tiny_assets["data"] / "train.jsonl").read_text().splitlines()][:40]
    rows[7]["note"] = rows[7]["note"] + " Follow up in 3 months." * 80  # over 400 tokens
    train = write_rows(tmp_path / "train.jsonl", rows)
    recipe = load_recipe(tiny_recipe_path, [f"data.train={train}"])  # max_length 384
    data = validate_data(recipe, tmp_path / "run", tokenizer_or_reason)
    assert data.report["dataset"]["tokens"]["status"] == "measured"
    (q,) = data.train.quarantined
    assert q["row"] == 8 and q["reasons"][0]["check"] == "max_tokens"
    assert data.report["splits"]["train"]["tokens"]["max"] <= 384
    out = tmp_path / "run" / "validation"
    for name in ("report.json", "quarantine.jsonl", "report.md", "token_lengths.png", "label_frequency.png"):
        assert (out / name).stat().st_size > 0
    assert "| train | max_tokens | quarantine | 1 | 8 |" in (out / "report.md").read_text()


def test_token_checks_are_skipped_with_a_warning_when_the_model_is_not_here(tmp_path, tiny_assets, capsys):
    from pipeline.data import validate_data
    from pipeline.model import tokenizer_or_reason
    from pipeline.recipe import load_recipe

    train, evalf = tiny_assets["data"] / "train.jsonl", tiny_assets["data"] / "eval.jsonl"
    overrides = [f"data.train={train}", f"data.eval={evalf}", f"model.path={tmp_path / 'absent-model'}"]
    recipe = load_recipe(ROOT / "recipes" / "quickstart.yaml", overrides)
    tokenizer, reason = tokenizer_or_reason(recipe)
    assert tokenizer is None and reason.startswith("tokenizer not available: ") and "absent-model" in reason
    data = validate_data(recipe, tmp_path / "run", tokenizer_or_reason, "r.yaml")
    assert data.report["dataset"]["tokens"] == {"status": "skipped", "reason": reason}
    assert f"warning: r.yaml: token-length checks skipped: {reason}" in capsys.readouterr().out
    assert "tokens" not in data.report["splits"]["train"]


def test_the_tokenizer_is_asked_for_only_when_the_contract_has_token_checks(tmp_path, tiny_assets):
    from pipeline.data import validate_data
    from pipeline.recipe import load_recipe

    asked = []
    overrides = [f"data.train={tiny_assets['data'] / 'train.jsonl'}", f"data.eval={tiny_assets['data'] / 'eval.jsonl'}"]
    recipe = load_recipe(ROOT / "recipes" / "quickstart.yaml", overrides)
    contract = str(light_contract(tmp_path))
    recipe = recipe.model_copy(update={"data": recipe.data.model_copy(update={"contract": contract})})
    data = validate_data(recipe, tmp_path / "run", lambda r: asked.append(r) or (None, "unused"))
    assert asked == [] and "tokens" not in data.report["dataset"]
    with pytest.raises(ValueError, match="needs tokenizer_for"):
        validate_data(load_recipe(ROOT / "recipes" / "quickstart.yaml", overrides), tmp_path / "run2")


def test_min_rows_and_empty_file_stop_the_job(tmp_path):
    from pipeline.splits import over_threshold

    rules = CONTRACT.dataset.model_copy(update={"min_rows": {"train": 5}})
    contract = CONTRACT.model_copy(update={"dataset": rules})
    splits, _ = run_contract(
        contract, write_rows(tmp_path / "t.jsonl", [note_row(1), note_row(2)]), write_lines(tmp_path / "e.jsonl", [])
    )
    problems = over_threshold(contract, splits)
    assert any("2 accepted train rows, fewer than the contract's dataset.min_rows.train 5" in p for p in problems)
    assert any(p.startswith(str(tmp_path / "e.jsonl")) and "empty" in p for p in problems)


# Malformed input: each line becomes a quarantined row with its reason (or one error naming the file).
MALFORMED = [
    (b'{"id": "x", "note": "Pt with essential hypertension.", "codes": ["I10"], "v": Infinity}', "json"),
    (b'{"id": "x", "note": "Pt with essential hypertension.", "codes": ["I10"], "v": -Infinity}', "json"),
    (b"[" * 5000 + b"]" * 5000, "json"),  # nesting too deep for the parser (10 kB, under max_row_bytes)
    (b'"just a string"', "row_type"),
    (b"null", "row_type"),
    (b"   \t ", "blank_line"),
    (b'{"note": "caf\xe9 au lait"}', "encoding"),
    (b'{"id": "big", "note": "' + b"x" * 30_000 + b'", "codes": ["I10"]}', "row_size"),
    # valid JSON escapes, but a lone surrogate is no UTF-8 text: the tokenizer would fail on it mid-training
    (b'{"id": "x", "note": "Pt with essential hypertension \\ud800 noted.", "codes": ["I10"]}', "encoding"),
    (b'{"id": "x\\udfff", "note": "Pt with essential hypertension noted.", "codes": ["I10"]}', "encoding"),
    # valid JSON, but beyond a double: read as Infinity, in a field the contract does not list
    (b'{"id": "x", "note": "Pt with essential hypertension noted.", "codes": ["I10"], "v": [1, -1e400]}', "non_finite"),
]


@pytest.mark.parametrize("line,check", MALFORMED, ids=[m[1] + str(i) for i, m in enumerate(MALFORMED)])
def test_malformed_jsonl_lines_are_quarantined(tmp_path, line, check):
    contract = CONTRACT.model_copy(update={"max_row_bytes": 20_000})
    path = tmp_path / "split.jsonl"
    path.write_bytes(
        json.dumps(GOOD).encode()
        + b"\r\n"
        + line
        + b"\n"
        + json.dumps({**GOOD, "id": "n2", "note": GOOD["note"] + " x"}).encode()
    )
    result = validate_split("train", path, contract)
    assert result.rows_in == 3 and result.rows_accepted == 2, result.quarantined
    assert result.quarantined[0]["row"] == 2 and result.quarantined[0]["reasons"][0]["check"] == check


def test_csv_input(tmp_path):
    path = tmp_path / "train.csv"
    path.write_bytes(
        b"\xef\xbb\xbfid,note,codes\r\n"
        b'a1,"Pt with essential hypertension, stable.",I10\r\n'
        b'a2,"Pt with type 2 diabetes,\nfollowed up.","E11.9;I10"\r\n'  # a quoted newline: one record, lines 3-4
        b"a3,too,many,columns\r\n"
        b"\r\n"
        b'a5,"Pt with caf\xe9 allergy noted in chart.",I10\r\n'
        b'a6,"Pt with type 2 diabetes, stable.","[""E11""]"\r\n'
    )
    result = validate_split("train", path, CONTRACT)
    assert result.format == "csv" and result.rows_in == 6 and result.rows_accepted == 2
    assert [r["codes"] for r in result.rows] == [["I10"], ["E11.9", "I10"]]
    assert {q["row"]: q["reasons"][0]["check"] for q in result.quarantined} == {
        5: "csv_columns",
        6: "blank_line",
        7: "encoding",
        8: "billable",
    }


def test_parquet_input_streams_row_groups(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = [{"id": f"p{i}", "note": GOOD["note"] + f" visit {i}", "codes": ["I10"]} for i in range(10)]
    rows[4] = {"id": "p4", "note": None, "codes": ["E11"]}
    path = tmp_path / "train.parquet"
    pq.write_table(pa.Table.from_pylist(rows), path, row_group_size=3)
    result = validate_split("train", path, CONTRACT)
    assert result.rows_in == 10 and result.rows_accepted == 9
    assert reasons_of(result) == {5: {("required", "note"), ("billable", "codes[0]")}}
    (tmp_path / "bad.parquet").write_bytes(b"PAR1 not really")
    from pipeline.records import DataFileError

    with pytest.raises(DataFileError, match=r"bad\.parquet: not a readable Parquet file"):
        validate_split("train", tmp_path / "bad.parquet", CONTRACT)


def test_vocabulary_file_and_missing_vocabulary(tmp_path):
    (tmp_path / "wards.txt").write_text("# wards\ncardiology\noncology  # second floor\n\n")
    (tmp_path / "c.yaml").write_text(
        "name: x\nfields:\n  ward: {type: string, vocabulary_file: wards.txt}\n"
        "  tags: {type: list, items: {type: string, vocabulary_file: wards.txt}}\n"
    )
    contract = load_contract(tmp_path / "c.yaml")
    assert check_row({"ward": "oncology", "tags": ["cardiology"]}, contract) == []
    (reason,) = check_row({"ward": "oncology", "tags": ["ent"]}, contract)
    assert (reason.check, reason.field) == ("vocabulary", "tags[0]") and "wards.txt" in reason.message
    (tmp_path / "c.yaml").write_text("name: x\nfields:\n  ward: {type: string, vocabulary_file: nope.txt}\n")
    with pytest.raises(RecipeError, match=r"fields\.ward\.vocabulary_file: cannot read .*nope\.txt"):
        load_contract(tmp_path / "c.yaml")


def test_exact_leakage_is_caught_with_duplicate_checks_off(tmp_path):
    rules = CONTRACT.dataset.model_copy(update={"exact_duplicates": "off", "near_duplicates": "off"})
    contract = CONTRACT.model_copy(update={"dataset": rules})
    train_rows = [note_row(i) for i in range(5)] + [note_row(2)]  # a copy, not flagged: the check is off
    splits, _ = run_contract(
        contract, write_rows(tmp_path / "t.jsonl", train_rows), write_rows(tmp_path / "e.jsonl", [note_row(3)])
    )
    assert splits[0].rows_quarantined == 0
    assert reasons_of(splits[1]) == {1: {("leakage", "note")}}


# Values where a fast path could disagree with the reference: str subclasses, bools as ints, unhashable or
# repeated items, a category code, integers beyond 64 bits (which orjson would read as floats).
FAST_PATH_ROWS = [
    GOOD,
    {**GOOD, "codes": ["I10", "E11.9"]},
    {**GOOD, "codes": [1, 1]},
    {**GOOD, "codes": [[1], [1]]},
    {**GOOD, "codes": [{"a": 1}, {"a": 2}]},
    {**GOOD, "codes": [True]},
    {**GOOD, "codes": ["I10"] * 26},
    {**GOOD, "id": 12345678901234567890123},
    {**GOOD, "id": None, "extra": 1},
    {**GOOD, "note": "naïve café façade note, long enough"},
    {"note": GOOD["note"]},
    [GOOD],
]


@pytest.mark.parametrize("row", FAST_PATH_ROWS)
@pytest.mark.parametrize("extra", ["ignore", "reject"])
def test_compiled_row_check_passes_exactly_the_rows_check_row_passes(row, extra):
    from pipeline.contracts import row_passes

    contract = CONTRACT.model_copy(update={"extra_fields": extra})
    assert row_passes(contract)(row) == (check_row(row, contract) == [])


def test_fast_json_path_keeps_integers_beyond_64_bits_exact():
    from pipeline.records import _parse_line

    big = 123456789012345678901234567890
    value, reasons = _parse_line(json.dumps({**GOOD, "id": big, "n": -9223372036854775809}).encode() + b"\n")
    assert reasons == [] and value["id"] == big and type(value["n"]) is int
    value, reasons = _parse_line(b'{"x": 1e400}')  # orjson refuses it; the json module reads infinity
    assert value == {"x": float("inf")} and [(r.check, r.field) for r in reasons] == [("non_finite", "x")]
    assert _parse_line(b"\xef\xbb\xbf" + json.dumps(GOOD).encode())[0] == GOOD  # BOM: the json-module path


def test_exact_copies_reported_as_leakage_are_counted_once(tmp_path):
    # 150 eval rows copied from train, leakage only reported: each is an exact leak and, with similarity 1.0, also
    # a near-duplicate candidate. Counted once each, also beyond the report's first 100 pairs (it was 200).
    rules = CONTRACT.dataset.model_copy(update={"leakage": "report"})
    contract = CONTRACT.model_copy(update={"dataset": rules})
    train_rows = [note_row(i) for i in range(200)]
    eval_rows = [{**train_rows[i], "id": f"copy{i}"} for i in range(150)] + [note_row(1000 + i) for i in range(5)]
    splits, _ = run_contract(
        contract, write_rows(tmp_path / "t.jsonl", train_rows), write_rows(tmp_path / "e.jsonl", eval_rows)
    )
    leakage = splits[1].checks["leakage"]
    assert leakage.count == 150 and splits[1].rows_quarantined == 0
    assert {(p["row"], p["train_row"]) for p in leakage.all_pairs()} == {(i + 1, i + 1) for i in range(150)}


NUMBERS = "name: n\nfields:\n  id: {type: string}\n  score: {type: number}\n"


def test_non_finite_numbers_are_quarantined_in_every_format(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    (tmp_path / "c.yaml").write_text(NUMBERS)
    contract = load_contract(tmp_path / "c.yaml")
    (reason,) = check_row({"id": "a", "score": float("nan")}, contract)
    assert reason.message == "expected number, got NaN (not a finite number)"
    jsonl = write_lines(
        tmp_path / "s.jsonl",
        ['{"id": "a", "score": 0.5}', '{"id": "b", "score": 1e400}', '{"id": "c", "score": 1, "other": -1e999}'],
    )
    result = validate_split("train", jsonl, contract)
    assert reasons_of(result) == {2: {("non_finite", "score")}, 3: {("non_finite", "other")}}
    assert "Infinity (not a finite number)" in result.quarantined[0]["reasons"][0]["message"]
    csv = tmp_path / "s.csv"
    csv.write_text("id,score\na,0.5\nb,1e400\nc,NaN\n")
    result = validate_split("train", csv, contract)
    assert reasons_of(result) == {3: {("non_finite", "score")}, 4: {("type", "score")}}  # NaN stays text in CSV
    rows = [{"id": "a", "score": 0.5, "x": 1.0}, {"id": "b", "score": float("nan"), "x": 1.0}]
    rows.append({"id": "c", "score": 2.0, "x": float("inf")})  # a column the contract does not list
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "s.parquet")
    result = validate_split("train", tmp_path / "s.parquet", contract)
    assert reasons_of(result) == {2: {("non_finite", "score")}, 3: {("non_finite", "x")}}
    assert result.rows_accepted == 1


def test_a_lone_surrogate_never_reaches_the_reports_unescaped(tmp_path):
    from pipeline import rundir

    path = tmp_path / "s.jsonl"
    path.write_bytes(json.dumps(GOOD).encode() + b'\n{"id": "n\\ud800", "note": "x", "codes": ["I10"]}\n')
    result = validate_split("train", path, CONTRACT)
    (q,) = result.quarantined
    assert q["id"] == "n\\ud800" and q["reasons"][0]["check"] == "encoding"
    rundir.write_jsonl(tmp_path / "q.jsonl", result.quarantined)  # encodable: no UnicodeEncodeError


def light_contract(tmp_path, **changes):
    """The shipped contract without token checks (no tokenizer to load), with top-level keys changed."""
    import yaml

    raw = yaml.safe_load((ROOT / "data_contracts" / "medical_coding.yaml").read_text())
    raw.pop("tokens")
    raw.update(changes)
    path = tmp_path / "contract.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def test_report_lists_every_check_run_and_pairs_file_holds_every_pair(tmp_path, capsys):
    from pipeline.data import validate_data
    from pipeline.recipe import load_recipe
    from pipeline.splits import PAIRS

    contract = light_contract(tmp_path, max_quarantine_fraction=1.0)
    train_rows = [note_row(i) for i in range(30)] + [{**note_row(i % 30), "id": f"c{i}"} for i in range(120)]
    train = write_rows(tmp_path / "t.jsonl", train_rows)
    evalf = write_rows(tmp_path / "e.jsonl", [note_row(100 + i) for i in range(12)])
    recipe = load_recipe(ROOT / "recipes" / "quickstart.yaml", [f"data.train={train}", f"data.eval={evalf}"])
    recipe = recipe.model_copy(update={"data": recipe.data.model_copy(update={"contract": str(contract)})})
    data = validate_data(recipe, tmp_path / "run", keep_rows=False)
    assert data.train.rows == [] and data.train.rows_accepted == 30  # validate's mode: counts, not rows
    out = tmp_path / "run" / "validation"
    report = json.loads((out / "report.json").read_text())
    train_checks, eval_checks = report["splits"]["train"]["checks"], report["splits"]["eval"]["checks"]
    exact = train_checks["exact_duplicate"]
    assert exact["count"] == 120 and len(exact["pairs"]) == PAIRS == 100
    assert exact["pairs_total"] == 120 and exact["pairs_file"] == "pairs.jsonl"
    # every check the contract runs is listed, found something or not
    for check in ("json", "encoding", "row_size", "non_finite", "type", "pattern", "billable", "max_length"):
        assert train_checks[check]["count"] == 0, check
    assert eval_checks["leakage"] == {"action": "quarantine", "count": 0, "examples": []}
    assert eval_checks["label_coverage"]["count"] == 0 and "leakage" not in train_checks
    pairs = [json.loads(line) for line in (out / "pairs.jsonl").read_text().splitlines()]
    assert len(pairs) == 120
    assert pairs[-1] == {"split": "train", "check": "exact_duplicate", "row": 150, "duplicate_of": 30}
    # the terminal table: counts per split, the finding with example rows, and the checks that found nothing
    table = capsys.readouterr().out
    assert "  split    rows in  accepted  quarantined  failed checks" in table
    assert "  train        150        30          120  exact_duplicate=120" in table
    assert "  train  exact_duplicate    quarantine     120  31, 32, 33, 34, 35" in table
    assert "  eval   nothing found by: " in table and "leakage" in table.split("eval   nothing found by: ")[1]


def test_pii_warn_keeps_the_text_and_counts_the_row(tmp_path):
    fields = {**CONTRACT.fields, "note": CONTRACT.fields["note"].model_copy(update={"pii": "warn"})}
    contract = CONTRACT.model_copy(update={"fields": fields})
    rows = [note_row(i) for i in range(4)]
    rows[2]["note"] += f" SSN {SSN}."
    train = run_contract(
        contract, write_rows(tmp_path / "t.jsonl", rows), write_rows(tmp_path / "e.jsonl", [note_row(9)])
    )[0][0]
    assert train.rows_quarantined == 0 and [r["note"] for r in train.rows] == [r["note"] for r in rows]
    stat = train.checks["pii_warn"]
    assert (stat.action, stat.count, stat.examples, dict(stat.by)) == ("warn", 1, [3], {"note:US_SSN": 1})
    assert SSN not in json.dumps(train.summary())


def test_enum_max_length_and_extra_fields_reject(tmp_path):
    (tmp_path / "c.yaml").write_text(
        "name: wards\nextra_fields: reject\nfields:\n  id: {type: string}\n"
        "  ward: {type: string, enum: [cardiology, oncology]}\n  note: {type: string, max_length: 12}\n"
    )
    contract = load_contract(tmp_path / "c.yaml")
    good = {"id": "a", "ward": "oncology", "note": "stable"}
    path = write_rows(
        tmp_path / "s.jsonl",
        [good, {**good, "ward": "ent"}, {**good, "note": "thirteen char"}, {**good, "bed": 4}],
    )
    result = validate_split("train", path, contract)
    assert result.rows_accepted == 1
    messages = {q["row"]: [(r["check"], r["field"], r["message"]) for r in q["reasons"]] for q in result.quarantined}
    assert messages == {
        2: [("enum", "ward", "'ent' is not one of ['cardiology', 'oncology']")],
        3: [("max_length", "note", "13 characters, at most 12 allowed")],
        4: [("extra_fields", None, "fields not in the contract: bed")],
    }


def test_rare_labels_and_imbalance_warning(tmp_path):
    from pipeline.data import render_report

    rules = CONTRACT.dataset.model_copy(update={"rare_label_count": 11, "max_imbalance_ratio": 1.5})
    contract = CONTRACT.model_copy(update={"dataset": rules})
    train_rows = [note_row(i, codes=("I10",) if i % 3 else ("E11.9",)) for i in range(30)]  # I10 x20, E11.9 x10
    _, dataset = run_contract(
        contract, write_rows(tmp_path / "t.jsonl", train_rows), write_rows(tmp_path / "e.jsonl", [note_row(99)])
    )
    assert dataset["rare_labels"] == {"below": 11, "count": 1, "labels": {"E11.9": 10}}
    assert dataset["imbalance"] == {"ratio": 2.0, "max_ratio": 1.5, "warning": True}
    report = {"contract": {"name": "c", "version": 1, "path": "c.yaml"}, "splits": {}, "dataset": dataset}
    table = render_report(report)
    assert "rare labels: 1 train labels seen fewer than 11 times" in table
    assert "label imbalance: most / least frequent train label = 2 (above max_imbalance_ratio)" in table


def test_cli_validate_empty_file_and_over_long_csv_record(tmp_path):
    from helpers import run_cli

    # Only what this test needs: no ICD-10-CM table or PII scanner to load in the subprocess (seconds each).
    contract = tmp_path / "c.yaml"
    contract.write_text(
        "name: cli\nmax_row_bytes: 2000\nfields:\n  id: {type: string}\n  note: {type: string}\n"
        "  codes: {type: list, items: {type: string}}\n"
    )
    good = [note_row(i) for i in range(25)]
    train = tmp_path / "train.csv"
    lines = ["id,note,codes"] + [f'{r["id"]},"{r["note"]}",I10' for r in good]
    lines.insert(5, f'big,"{"x" * 5000}",I10')  # line 6: a 5 kB field, above max_row_bytes 2000
    train.write_text("\n".join(lines) + "\n")
    evalf = write_rows(tmp_path / "e.jsonl", [note_row(100 + i) for i in range(12)])
    empty = write_lines(tmp_path / "empty.jsonl", [])

    def validate(train_file, eval_file, run):
        sets = [f"data.train={train_file}", f"data.eval={eval_file}", f"data.contract={contract}"]
        args = [a for s in sets for a in ("--set", s)]
        # --data-only: a fresh clone has no demo base until make demo
        return run_cli("validate", "recipes/quickstart.yaml", "--data-only", *args, "--run-dir", str(tmp_path / run))

    result = validate(train, evalf, "csv")
    assert result.returncode == 0, result.stderr
    assert "Traceback" not in result.stderr + result.stdout and "csv=1" in result.stdout
    (q,) = [
        json.loads(line) for line in (tmp_path / "csv" / "validation" / "quarantine.jsonl").read_text().splitlines()
    ]
    assert (
        q["row"] == 6
        and q["reasons"][0]["check"] == "csv"
        and "field larger than field limit" in q["reasons"][0]["message"]
    )
    result = validate(empty, empty, "empty")
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert f"{empty}: the train file is empty (no rows)" in result.stderr.splitlines()
    assert f"{empty}: the eval file is empty (no rows)" in result.stderr.splitlines()


def test_validate_command_does_not_keep_the_rows(tmp_path, monkeypatch):
    import argparse

    import pipeline.data
    from pipeline import cli

    seen = {}
    monkeypatch.setattr(pipeline.data, "validate_data", lambda *args, **kwargs: seen.update(kwargs))
    recipe = str(ROOT / "recipes" / "quickstart.yaml")
    args = argparse.Namespace(recipe=recipe, overrides=[], run_dir=str(tmp_path / "run"), data_only=False)
    assert cli.cmd_validate(args, cli.Outcome()) == cli.EXIT_OK
    assert seen == {
        "keep_rows": False,
        "require_tokenizer": True,
    }  # train keeps its rows for TRL; validate only writes the reports
