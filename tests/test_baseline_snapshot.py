"""The baseline snapshot: recorded live, scored from alone with the server stopped, never partially; and the
whole evaluation with a judge on a summarization run (metrics.json, judge.jsonl, report, MLflow)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import ROOT, write_recipe
from fake_llm import FakeLLM
from helpers import shipped_contract_without_dataset_checks

from pipeline.baseline import run_baseline
from pipeline.evaluate import score_system
from pipeline.recipe import BaselineSection
from pipeline.snapshot import SNAPSHOT_FILE, dataset_input, prompt_sha256, read_snapshot
from pipeline.tasks import get_task

KEY_ENV = "PIPELINE_TEST_SNAPSHOT_KEY"
KEY = "sk-snapshot-NEVER-WRITE-ME-31b7"
TASK = get_task("medical_coding")
CODES = ["I10", "E11.9", "J44.9", "K21.9"]


def make_rows(n: int) -> list[dict]:
    return [{"id": f"e{i}", "note": f"note {i}: seen today", "codes": [CODES[i % 4]], "_row": i + 1} for i in range(n)]


def gold_answer(messages: list[dict]) -> str:
    return CODES[int(messages[-1]["content"].split()[1].rstrip(":")) % 4]


def settings(server: FakeLLM, **changes) -> BaselineSection:
    values = {"provider": server.api, "model": "test-model", "base_url": server.base_url, "api_key_env": KEY_ENV}
    return BaselineSection(**{**values, "send_data": True, "timeout_s": 2, **changes})


def run(section: BaselineSection, rows: list[dict], tmp_path: Path):
    return run_baseline(
        section, TASK, rows, train_rows=[], allowed_hosts=[], cache_dir=tmp_path / "cache", eval_dir=tmp_path / "eval"
    )


@pytest.fixture(autouse=True)
def api_key(monkeypatch):
    monkeypatch.setenv(KEY_ENV, KEY)


def test_snapshot_scores_identically_with_the_server_stopped_and_no_key(tmp_path, monkeypatch):
    rows = make_rows(6)
    server = FakeLLM("openai", gold_answer)
    try:
        live = run(settings(server), rows, tmp_path)
    finally:
        server.close()
    path = tmp_path / SNAPSHOT_FILE
    records, refused = read_snapshot(path)
    assert len(records) == 6 and refused == 0 and live.summary["snapshot_added"] == 6
    record = next(iter(records.values()))
    assert record["model"] == "test-model" and record["model_reported"] == "test-model"
    assert record["answered_at"].endswith("Z") and set(record["usage"]) == {"tokens_in", "tokens_out", "reported"}
    assert len(record["prompt_sha256"]) == 64 and len(record["record_sha256"]) == 64
    assert live.summary["models_reported"] == ["test-model"]

    monkeypatch.delenv(KEY_ENV)  # no key, and the server is gone: nothing could be sent
    replay = run(settings(server, snapshot=str(path), send_data=False), rows, tmp_path / "replay")
    assert replay.status == "ok" and replay.summary["source"] == "snapshot" and replay.summary["requests_sent"] == 0
    golds_live = score_system(TASK, rows, live.outputs)
    assert score_system(TASK, rows, replay.outputs) == golds_live  # every number, latency and tokens included
    assert [o["text"] for o in replay.outputs] == [o["text"] for o in live.outputs]
    assert not (tmp_path / "replay" / "eval" / "baseline_sent.jsonl").exists()


def test_a_snapshot_missing_rows_says_how_many_and_scores_nothing(tmp_path):
    rows = make_rows(5)
    server = FakeLLM("anthropic", gold_answer)
    try:
        run(settings(server), rows[:3], tmp_path)  # only 3 of the 5 rows were ever recorded
    finally:
        server.close()
    path = tmp_path / SNAPSHOT_FILE
    partial = run(settings(server, snapshot=str(path)), rows, tmp_path / "replay")
    assert partial.status == "skipped" and partial.outputs is None
    assert partial.summary["missing_rows"] == 2 and "for 2 of 5 eval rows" in partial.reason
    assert "a partial baseline is never scored" in partial.reason
    # An edited record no longer matches its hash: refused, so that row is missing too.
    lines = path.read_text().splitlines()
    edited = json.loads(lines[0])
    edited["answer"] = "Z99.9"
    path.write_text("\n".join([json.dumps(edited), *lines[1:]]) + "\n")
    tampered = run(settings(server, snapshot=str(path)), rows[:3], tmp_path / "again")
    assert tampered.status == "skipped" and "1 of 3" in tampered.reason and "1 lines refused" in tampered.reason


def test_snapshot_records_are_added_once_and_describe_themselves_as_a_dataset(tmp_path):
    rows = make_rows(3)
    server = FakeLLM("openai", gold_answer)
    try:
        run(settings(server), rows, tmp_path)
        again = run(settings(server), rows, tmp_path)
    finally:
        server.close()
    assert again.summary["snapshot_added"] == 0 and len((tmp_path / SNAPSHOT_FILE).read_text().splitlines()) == 3
    assert prompt_sha256([{"role": "user", "content": "x"}]) == prompt_sha256([{"content": "x", "role": "user"}])
    dataset = dataset_input(tmp_path / SNAPSHOT_FILE, model="test-model")
    assert dataset["tags"]["mlflow.data.context"] == "baseline_snapshot" and len(dataset["digest"]) == 32
    assert json.loads(dataset["profile"])["records"] == 3 and "note" not in json.dumps(dataset)


# --------------------------------------------------------------------------------------------------
# The whole evaluation: summarization, base + fine-tune (cached generations) + baseline + judge


def _summaries(n: int) -> list[dict]:
    return [
        {"id": f"d{i}", "text": f"document {i}: the board approved budget {i}.", "summary": f"budget {i} approved"}
        for i in range(n)
    ]


def _write_generations(recipe, task, rows, run_dir: Path, answers: dict[str, list[str]]) -> None:
    """Cached local generations, as an earlier evaluation would have left them (no model is loaded)."""
    from pipeline.data import sft_example
    from pipeline.generation import GENERATIONS, generation_key

    for system, texts in answers.items():
        lines = []
        for row, text in zip(rows, texts, strict=True):
            key = generation_key(recipe, system, sft_example(row, task, "chat"), None)
            out = {"text": text, "stopped": True, "tokens_in": 10, "tokens_out": 3, "latency_s": 0.1, "seconds": 0.1}
            lines.append(json.dumps({"key": key, **out}))
        path = run_dir / "eval" / GENERATIONS / f"{system}.jsonl"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("\n".join(lines) + "\n")


def _judge_prefers_reference(messages: list[dict]) -> str:
    text = messages[-1]["content"]
    ref = text.split("# Reference answer\n\n", 1)[1].split("\n\n", 1)[0]
    a = text.split("# Answer A\n\n", 1)[1].split("\n\n# Answer B", 1)[0]
    return json.dumps({"winner": "A" if a == ref else "B", "reason": "closer to the reference"})


def test_evaluation_with_a_judge_and_a_snapshot_end_to_end(tmp_path, monkeypatch):
    from pipeline.data import task_for, validate_data
    from pipeline.evaluate import evaluate_run
    from pipeline.recipe import load_recipe
    from pipeline.tracking import Tracker, client_for

    rows = _summaries(12)
    data_dir = tmp_path / "data"
    data_dir.mkdir()
    for split, part in (("train", rows[:4]), ("eval", rows)):
        (data_dir / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in part))
    # The baseline gets 8 of 12 right; the fine-tune 10 (its last two are wrong): the judge sees both.
    baseline_server = FakeLLM(
        "openai",
        lambda m: (
            f"budget {m[-1]['content'].split()[1].rstrip(':')} approved"
            if int(m[-1]["content"].split()[1].rstrip(":")) < 8
            else "no idea"
        ),
    )
    judge_server = FakeLLM("anthropic", _judge_prefers_reference)
    judge_key = "sk-judge-NEVER-WRITE-ME-9d2"
    monkeypatch.setenv("PIPELINE_TEST_JUDGE_KEY", judge_key)
    uri = f"sqlite:///{tmp_path / 'mlruns.db'}"
    recipe_data = {
        "extends": str(ROOT / "recipes" / "quickstart.yaml"),
        "name": "summ",
        "task": "summarization",
        "data": {
            # Eval includes the train rows, and its rows differ by a number: the dataset checks are off here.
            "contract": str(shipped_contract_without_dataset_checks("summarization", tmp_path)[1]),
            "train": str(data_dir / "train.jsonl"),
            "eval": str(data_dir / "eval.jsonl"),
        },
        "eval": {"systems": ["base", "finetuned", "baseline"], "bootstrap_samples": 200},
        "tracking": {"uri": uri, "experiment": "summ"},
        "baseline": {
            "provider": "openai",
            "model": "gpt-test",
            "base_url": baseline_server.base_url,
            "api_key_env": KEY_ENV,
            "send_data": True,
        },
        "judge": {
            "provider": "anthropic",
            "model": "judge-test",
            "base_url": judge_server.base_url,
            "api_key_env": "PIPELINE_TEST_JUDGE_KEY",
            "send_data": True,
            "rubric": "Prefer the answer that names the right budget.",
            "price_input_per_1m": 3,
            "price_output_per_1m": 15,
        },
    }
    try:
        recipe = load_recipe(write_recipe(tmp_path / "summ.yaml", recipe_data))
        data = validate_data(recipe, tmp_path / "run")
        task = task_for(recipe, data.contract)
        fine = [r["summary"] for r in rows[:10]] + ["wrong", "wrong"]
        _write_generations(
            recipe, task, data.eval.rows, tmp_path / "run", {"base": ["nothing"] * 12, "finetuned": fine}
        )
        with Tracker(recipe, run_name="summ", run_dir=tmp_path / "run") as tracker:
            result = evaluate_run(recipe, tmp_path / "run", data, task, "chat", tracker=tracker)
    finally:
        baseline_server.close()
        judge_server.close()
    eval_dir = tmp_path / "run" / "eval"
    document = json.loads((eval_dir / "metrics.json").read_text())
    j = document["judge"]
    # Rows 0-7: both right, same text -> the judge picks A in both orders: inconsistent. Rows 8, 9: the fine-tune
    # wins; rows 10, 11: both wrong, "wrong" vs "no idea", neither is the reference -> B each time: inconsistent.
    assert (j["wins"], j["losses"], j["ties"], j["inconsistent"], j["failed"]) == (2, 0, 10, 10, 0)
    assert j["win_rate"] == pytest.approx((2 + 5) / 12) and j["model"] == "judge-test"
    assert j["requests_sent"] == 24 and j["cost_usd"] > 0 and len(judge_server.requests) == 24
    assert "Prefer the answer that names the right budget." in judge_server.requests[0]["body"]["system"]
    assert len((eval_dir / "judge.jsonl").read_text().splitlines()) == 12
    # Free-form metrics with intervals against the baseline and the base; rougeL_f stays the main metric.
    assert document["main_metric"] == "rougeL_f"
    assert document["systems"]["finetuned"]["exact_match"] == pytest.approx(10 / 12)
    assert document["systems"]["baseline"]["exact_match"] == pytest.approx(8 / 12)
    cmp = document["freeform_comparisons"]
    assert cmp["finetuned_vs_base"]["exact_match"]["verdict"] == "better"
    assert cmp["finetuned_vs_baseline"]["exact_match"]["difference"] == pytest.approx(2 / 12)
    report = (eval_dir / "report.md").read_text()
    assert "## Pairwise judge" in report and "## Free-form metrics" in report and "token_f1" in report
    assert "## Where the fine-tune loses" not in report  # it never loses here
    assert result.judge["verdict"] == j["verdict"]
    # MLflow: eval.judge.* metrics, the judge table, and the snapshot as a dataset input.
    run = client_for(uri).get_run(tracker.run_id)
    assert run.data.metrics["eval.judge.wins"] == 2 and run.data.metrics["eval.judge.inconsistent"] == 10
    assert "eval.judge.win_rate" in run.data.metrics and run.data.tags["eval.judge.model"] == "judge-test"
    assert any(d.dataset.name == f"baseline_snapshot:{SNAPSHOT_FILE}" for d in run.inputs.dataset_inputs)
    artifacts = {f.path for f in client_for(uri).list_artifacts(tracker.run_id, "eval")}
    assert "eval/judge_table.json" in artifacts

    # Again with the servers gone: the baseline from its snapshot, the judge from its cache; the same numbers.
    monkeypatch.delenv(KEY_ENV)
    monkeypatch.delenv("PIPELINE_TEST_JUDGE_KEY")
    replay_data = {
        **recipe_data,
        "baseline": {**recipe_data["baseline"], "snapshot": str(tmp_path / "run" / SNAPSHOT_FILE)},
        "tracking": {"enabled": False},
    }
    replay = load_recipe(write_recipe(tmp_path / "replay.yaml", replay_data))
    again = evaluate_run(replay, tmp_path / "run", data, task, "chat")
    assert again.metrics["baseline"] == result.metrics["baseline"]
    assert again.judge["requests_sent"] == 0 and again.judge["wins"] == 2
    for path in tmp_path.rglob("*"):
        if path.is_file() and path.suffix != ".db":
            text = path.read_text(errors="replace")
            assert KEY not in text and judge_key not in text, path
    assert all(
        KEY.encode() not in p.read_bytes() and judge_key.encode() not in p.read_bytes() for p in tmp_path.rglob("*.db")
    )
