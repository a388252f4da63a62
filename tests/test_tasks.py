import pytest

from pipeline.tasks import get_task, parse_codes, per_label_f1, score_codes


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
