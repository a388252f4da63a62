"""Free-form reference metrics against hand-computed values, and their paired-bootstrap intervals."""

import json

import pytest

from pipeline.freeform import (
    compare_systems,
    exact_match,
    field_counts,
    freeform_scoring,
    paired_bootstrap_stats,
    parse_json,
    score_freeform,
    token_f1,
    tool_calls,
)
from pipeline.tasks import get_task


def call(name: str, **arguments) -> dict:
    """An OpenAI-style tool call with its arguments as a JSON string."""
    return {"name": name, "arguments": json.dumps(arguments)}


def test_exact_match_ignores_whitespace_and_compares_json_parsed():
    assert exact_match("The  cat\n sat. ", "The cat sat.")
    assert not exact_match("The cat sat.", "the cat sat.")  # case is kept: only whitespace is normalized
    assert exact_match('{"a": 1, "b": [1, 2]}', '```json\n{"b":[1,2],"a":1}\n```')
    assert not exact_match('{"a": 1}', '{"a": "1"}')
    assert exact_match({"a": 1}, ' {"a":1} ')


def test_token_f1_matches_hand_computed_values():
    # ref tokens: the cat sat on the mat (6); answer: the cat lay on a mat (6); common: the, cat, on, mat = 4.
    # P = 4/6, R = 4/6, F1 = 2/3.
    assert token_f1("The cat sat on the mat.", "the cat lay on a mat") == pytest.approx(2 / 3)
    # ref "a b c d" answer "a b": P = 1, R = 1/2, F1 = 2/3; repeated tokens count once per occurrence.
    assert token_f1("a b c d", "a b") == pytest.approx(2 / 3)
    assert token_f1("a a b", "a") == pytest.approx(2 * 1 * (1 / 3) / (1 + 1 / 3))
    assert token_f1("", "") == 1.0 and token_f1("a", "") == 0.0 and token_f1("x", "y") == 0.0


def test_tool_calls_in_every_openai_form():
    assert tool_calls(call("get_weather", city="Oslo")) == [("get_weather", {"city": "Oslo"})]
    message = {"content": None, "tool_calls": [{"id": "c1", "type": "function", "function": call("f", x=1)}]}
    assert tool_calls(message) == [("f", {"x": 1})]
    assert tool_calls([{"name": "g", "arguments": {"y": 2}}]) == [("g", {"y": 2})]
    assert tool_calls({"city": "Oslo"}) is None
    with pytest.raises(ValueError, match="not JSON"):
        tool_calls({"name": "f", "arguments": "{city: Oslo"})


def test_field_counts_flatten_nested_objects():
    # Leaves: name, address.city, address.zip. Answer: name right, city wrong, zip absent, extra 'age'.
    reference = {"name": "Ann", "address": {"city": "Oslo", "zip": "0150"}}
    answer = {"name": "Ann", "address": {"city": "Bergen"}, "age": 40}
    assert field_counts(reference, answer) == (1, 2, 2)  # TP name; FP city, age; FN city, zip
    assert field_counts(reference, None) == (0, 0, 3)


def test_score_freeform_over_text_json_and_tool_call_references():
    references = [
        "the cat sat",  # text
        '{"name": "Ann", "age": 40}',  # JSON object
        {"name": "Bob", "city": "Oslo"},  # structured JSON object
        call("get_weather", city="Oslo", unit="c"),  # tool call
        call("book", day="mon"),  # tool call
    ]
    answers = [
        "the cat sat",  # exact
        '{"age": 40, "name": "Ann"}',  # exact as JSON
        "Name: Bob",  # not JSON: both fields missed
        json.dumps(call("get_weather", unit="c", city="Oslo")),  # same call, other argument order
        '{"name": "book", "arguments": "{day: mon"}',  # arguments not JSON
    ]
    m = score_freeform(references, answers)
    # Exact: rows 0, 1 (parsed equal), 3 as JSON? row 3's arguments string differs in order -> not exact.
    assert m["exact_match"] == pytest.approx(2 / 5)
    # JSON subset (rows 1, 2): valid 1 of 2; fields TP 2, FP 0, FN 2 -> P 1, R 1/2, F1 2/3.
    assert m["json_references"] == 2 and m["json_valid_rate"] == pytest.approx(0.5)
    assert m["json_field_precision"] == pytest.approx(1.0)
    assert m["json_field_recall"] == pytest.approx(0.5)
    assert m["json_field_f1"] == pytest.approx(2 / 3)
    # Tool-call subset (rows 3, 4): row 3 right, row 4 has arguments that are not JSON.
    assert m["tool_call_references"] == 2 and m["tool_call_accuracy"] == pytest.approx(0.5)
    assert m["tool_name_accuracy"] == pytest.approx(0.5) and m["tool_call_bad_arguments"] == 1
    assert m["num_examples"] == 5 and m["empty_answers"] == 0
    # Text only: the JSON and tool-call metrics are absent, not 0.
    plain = score_freeform(["a b", "c"], ["a b", ""])
    assert "json_valid_rate" not in plain and "tool_call_accuracy" not in plain
    assert plain["token_f1"] == pytest.approx(0.5) and plain["empty_answers"] == 1


def test_wrong_function_name_and_wrong_arguments():
    ref = call("get_weather", city="Oslo")
    m = score_freeform(
        [ref, ref], [json.dumps(call("get_time", city="Oslo")), json.dumps(call("get_weather", city="Rome"))]
    )
    assert m["tool_call_accuracy"] == 0.0 and m["tool_name_accuracy"] == pytest.approx(0.5)


def test_parse_json_takes_a_fenced_answer_and_refuses_prose():
    assert parse_json('```\n{"a": 1}\n```') == (True, {"a": 1})
    assert parse_json('Sure! {"a": 1}') == (False, None)
    assert parse_json("  ") == (False, None)


def test_summarization_gets_the_free_form_metrics_and_keeps_rouge_l_as_main():
    task = get_task("summarization")
    assert task.main_metric == "rougeL_f"
    m = task.score(["a b c d", "x y"], ["a b", "x y"])
    # token F1: row 0 P 1, R 1/2 -> 2/3; row 1 -> 1: mean 5/6. Exact match 1 of 2.
    assert m["token_f1"] == pytest.approx(5 / 6) and m["exact_match"] == pytest.approx(0.5)
    assert task.freeform_reference({"summary": "s"}) == "s"


def test_bootstrap_of_identical_systems_is_no_difference_and_a_clear_gap_is_significant():
    same = [(1.0, 1.0), (0.0, 1.0)] * 10
    result = paired_bootstrap_stats(same, same, lambda t: t[0] / t[1], samples=200)
    assert result["difference"] == 0 and result["ci95"] == [0.0, 0.0]
    assert result["verdict"] == "no significant difference" and result["n"] == 20
    better = paired_bootstrap_stats([(1.0, 1.0)] * 20, [(0.0, 1.0)] * 20, lambda t: t[0] / t[1], samples=200)
    assert better["difference"] == 1.0 and better["verdict"] == "better"


def test_compare_systems_gives_each_metric_against_the_baseline_and_the_base():
    refs = ["the cat sat"] * 12
    answers = {"finetuned": ["the cat sat"] * 12, "base": ["dogs run"] * 12, "baseline": ["the cat sat"] * 12}
    out = compare_systems(refs, answers, samples=200)
    assert set(out) == {"finetuned_vs_baseline", "finetuned_vs_base"}
    assert out["finetuned_vs_base"]["exact_match"]["verdict"] == "better"
    assert out["finetuned_vs_base"]["token_f1"]["difference"] == pytest.approx(1.0)
    assert out["finetuned_vs_baseline"]["rougeL_f"]["verdict"] == "no significant difference"
    assert compare_systems(refs, {"base": answers["base"]}) == {}


def test_freeform_scoring_hook_for_answer_types():
    text, js, chat = freeform_scoring("text"), freeform_scoring("json"), freeform_scoring("chat")
    assert (text.main_metric, js.main_metric, chat.main_metric) == ("rougeL_f", "json_field_f1", "token_f1")
    # json: one reference with 2 fields, the answer gets one right and one wrong -> TP 1, FP 1, FN 1.
    stats = js.example_stats({"a": 1, "b": 2}, '{"a": 1, "b": 3}')
    assert stats == (1, 1, 1) and js.main_from_totals(stats) == pytest.approx(0.5)
    assert chat.example_stats("a b", "a b") == (1.0, 1.0)
    with pytest.raises(ValueError, match="not free-form"):
        freeform_scoring("label")
