import pytest

from pipeline.scoring import parse_codes, per_label_f1, score_codes
from pipeline.tasks import get_task


def test_parse_codes_keeps_order_and_drops_repeats_and_noise():
    assert parse_codes(" E11.9, I10, E11.9") == ["E11.9", "I10"]
    assert parse_codes("Codes: S93.401A and F32.A; not e11.9 or 123") == ["S93.401A", "F32.A"]
    assert parse_codes("") == []


def test_scores_match_hand_computed_values():
    golds = [["E11.9", "I10"], ["J44.9"], ["I10"]]
    preds = [["E11.9"], ["J44.9", "Q99.99"], []]
    m = score_codes(golds, preds)
    # TP = E11.9, J44.9 = 2; FP = Q99.99 = 1; FN = I10 twice = 2.
    assert m["micro_precision"] == pytest.approx(2 / 3)
    assert m["micro_recall"] == pytest.approx(2 / 4)
    assert m["micro_f1"] == pytest.approx(2 * (2 / 3) * (1 / 2) / (2 / 3 + 1 / 2))
    # Labels: E11.9 (P=R=F=1), J44.9 (1), I10 (P=0, R=0, F=0), Q99.99 (0): macro F1 = 2/4.
    assert m["macro_f1"] == pytest.approx(0.5)
    assert m["macro_precision"] == pytest.approx(0.5) and m["macro_recall"] == pytest.approx(0.5)
    assert m["exact_match"] == pytest.approx(0.0)
    # Q99.99 is not an ICD-10-CM code: 1 of 3 predicted codes.
    assert m["invalid_code_rate"] == pytest.approx(1 / 3)
    assert m["num_examples"] == 3 and m["num_predicted_codes"] == 3


def test_perfect_and_empty_predictions():
    assert score_codes([["I10"]], [["I10"]])["exact_match"] == 1.0
    empty = score_codes([["I10"]], [[]])
    assert empty["micro_f1"] == 0.0 and empty["invalid_code_rate"] == 0.0
    with pytest.raises(ValueError):
        score_codes([["I10"]], [])


def test_per_label_scores():
    scores = per_label_f1([["E11.9", "I10"], ["I10"]], [["E11.9"], ["I10", "J44.9"]])
    assert scores["E11.9"] == {"precision": 1.0, "recall": 1.0, "f1": 1.0, "support": 1.0}
    assert scores["I10"]["recall"] == 0.5 and scores["I10"]["support"] == 2.0
    assert scores["J44.9"]["precision"] == 0.0 and scores["J44.9"]["support"] == 0.0


def test_medical_coding_prompt_and_target():
    task = get_task("medical_coding")
    row = {"note": "Dx: essential hypertension.", "codes": ["I10", "E11.9"]}
    assert task.target(row) == "I10, E11.9"
    assert task.plain_prompt(row) == "Note: Dx: essential hypertension.\nCodes:"
    messages = task.chat_messages(row)
    assert [m["role"] for m in messages] == ["system", "user"] and messages[1]["content"] == row["note"]
    assert task.parse(task.target(row)) == task.gold(row)


# --------------------------------------------------------------------------------------------------
# Classification, extraction, summarization: metrics against values worked out by hand.

from pipeline.freeform import rouge_l  # noqa: E402
from pipeline.scoring import (  # noqa: E402
    INVALID_LABEL,
    confusion_matrix,
    parse_json_object,
    per_field_f1,
    per_label_classes,
    score_fields,
    score_labels,
    score_summaries,
)


def test_classification_parse_maps_answers_to_labels():
    task = get_task("classification", ["billing", "technical", "account"])
    assert task.parse("Billing.") == "billing"
    assert task.parse("This is a technical issue, not billing") == "technical"  # the first label named
    assert task.parse("no idea") == INVALID_LABEL
    assert "billing, technical, account" in task.system_prompt
    with pytest.raises(ValueError, match="label set"):
        get_task("classification")


def test_classification_scores_match_hand_computed_values():
    golds = ["a", "a", "b", "c"]
    preds = ["a", "b", "b", INVALID_LABEL]
    m = score_labels(golds, preds)
    assert m["accuracy"] == pytest.approx(2 / 4)
    # a: TP1 FP0 FN1 -> P 1, R 1/2, F 2/3; b: TP1 FP1 FN0 -> P 1/2, R 1, F 2/3; c: TP0 FN1 -> 0.
    assert m["macro_f1"] == pytest.approx((2 / 3 + 2 / 3 + 0) / 3)
    assert m["macro_precision"] == pytest.approx((1 + 0.5 + 0) / 3)
    assert m["macro_recall"] == pytest.approx((0.5 + 1 + 0) / 3)
    assert m["invalid_label_rate"] == pytest.approx(1 / 4)
    assert per_label_classes(golds, preds)["c"] == {"precision": 0.0, "recall": 0.0, "f1": 0.0, "support": 1.0}
    assert confusion_matrix(golds, preds)["confusion_matrix"] == {
        "a": {"a": 1, "b": 1},
        "b": {"b": 1},
        "c": {INVALID_LABEL: 1},
    }


def test_extraction_parse_and_field_scores_match_hand_computed_values():
    assert parse_json_object('Here: {"name": "Ann"} done') == {"name": "Ann"}
    assert parse_json_object("[1, 2]") is None and parse_json_object("{not json") is None
    golds = [{"name": "Ann", "age": "30", "city": None}, {"name": "Bob", "age": "41", "city": "Oslo"}]
    preds = [{"name": "ann ", "age": 30, "city": "Rome"}, None]
    m = score_fields(golds, preds)
    # Row 1: name and age match (case, spacing and 30 vs "30" normalized) = 2 TP; city predicted where the
    # gold is null = 1 FP. Row 2 did not parse: its 3 gold values are FN. P = 2/3, R = 2/5, F1 = 1/2.
    assert m["field_precision"] == pytest.approx(2 / 3)
    assert m["field_recall"] == pytest.approx(2 / 5)
    assert m["field_f1"] == pytest.approx(0.5)
    assert m["parse_rate"] == pytest.approx(0.5) and m["exact_match"] == 0.0
    assert score_fields([{"a": 1, "b": None}], [{"a": "1"}])["exact_match"] == 1.0
    per_field = per_field_f1(golds, preds)
    assert per_field["name"] == {"precision": 1.0, "recall": 0.5, "f1": pytest.approx(2 / 3), "support": 2.0}
    assert per_field["city"]["f1"] == 0.0 and per_field["city"]["support"] == 1.0


def test_rouge_l_matches_hand_computed_lcs():
    # LCS of "the cat sat on the mat" and "the cat lay on the mat" = "the cat on the mat", 5 of 6 tokens each.
    assert rouge_l("the cat sat on the mat", "the cat lay on the mat") == pytest.approx((5 / 6, 5 / 6, 5 / 6))
    # "patients rest" is a subsequence of "patients need rest today": P = 2/2, R = 2/4, F1 = 2/3.
    assert rouge_l("patients need rest today", "patients rest") == pytest.approx((1.0, 0.5, 2 / 3))
    m = score_summaries(["the cat sat on the mat", "patients need rest today"], ["the cat lay on the mat", " "])
    assert m["rougeL_f"] == pytest.approx((5 / 6 + 0) / 2) and m["empty_rate"] == 0.5


@pytest.mark.parametrize(
    ("name", "labels", "golds", "preds"),
    [
        ("medical_coding", None, [["E11.9", "I10"], ["J44.9"], ["I10"]], [["E11.9"], ["J44.9", "Q99.99"], []]),
        ("classification", ["a", "b"], ["a", "b", "b"], ["a", "a", INVALID_LABEL]),
        ("extraction", None, [{"x": "1", "y": None}, {"x": "2", "y": "3"}], [{"x": "1", "y": "9"}, None]),
        ("summarization", None, ["the cat sat", "a long day"], ["the cat", "day"]),
    ],
)
def test_main_metric_rebuilt_from_example_stats_equals_the_score(name, labels, golds, preds):
    # The bootstrap recomputes the main metric from summed per-example numbers; on all examples it must
    # equal the task's own score exactly.
    task = get_task(name, labels)
    stats = [task.example_stats(g, p) for g, p in zip(golds, preds, strict=True)]
    totals = [sum(col) for col in zip(*stats, strict=True)]
    assert task.main_from_totals(totals) == pytest.approx(task.score(golds, preds)[task.main_metric])
