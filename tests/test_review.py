"""The run description a reviewer reads first on the MLflow run page (``mlflow.note.content``)."""

from pipeline.review import run_note

DOCUMENT = {
    "main_metric": "exact_match",
    "systems": {
        "base": {"exact_match": 0.0, "cost_per_1000_examples": 0.01},
        "finetuned": {"exact_match": 0.81, "cost_per_1000_examples": 0.02},
        "baseline": {"exact_match": 0.79},
    },
    "comparison": {
        "metric": "exact_match",
        "difference": 0.02,
        "ci95": [-0.03, 0.07],
        "verdict": "no significant difference",
    },
    "cost": {"self_hosted": {"cost_per_1000_cases": 0.278}, "api": {"cost_per_1000_cases": 3.5}},
    "judge": {
        "status": "ok",
        "model": "judge-7b",
        "pairs": [{"a": "finetuned", "b": "baseline", "win_rate": 0.55, "verdict": "no significant difference"}],
    },
}


def test_the_description_says_scores_verdict_judge_cost_and_where_the_adapter_is():
    note = run_note(DOCUMENT, "runs/x/adapter", {"name": "tiny", "version": "3"})
    assert "**exact_match**: base 0.000, finetuned 0.810, baseline 0.790" in note
    assert "no significant difference (exact_match difference +0.020, 95% CI -0.030 to +0.070)" in note
    assert "**Judge** (judge-7b): finetuned vs baseline win rate 0.550, no significant difference" in note
    assert "self-hosted fine-tune $0.2780, baseline API $3.5000" in note
    assert "**Adapter**: `runs/x/adapter`; registry tiny version 3" in note


def test_a_skipped_baseline_says_why_and_an_unpriced_run_says_so():
    document = {
        "main_metric": "micro_f1",
        "systems": {"finetuned": {"micro_f1": 0.5}},
        "baseline": {"status": "skipped", "reason": "baseline.send_data is false"},
        "judge": {"status": "skipped", "reason": "judge.send_data is false"},
    }
    note = run_note(document, None)
    assert "**Against the baseline**: skipped (baseline.send_data is false)" in note
    assert "**Judge**: skipped (judge.send_data is false)" in note
    assert "not priced" in note and "**Adapter**: not saved" in note
    assert run_note({}, None).startswith("Not evaluated.")
