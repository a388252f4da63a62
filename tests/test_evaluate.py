"""Evaluation: the paired bootstrap, cost of ownership, and `evaluate --run` on the shared trained run."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import ROOT, write_recipe
from fake_llm import FakeLLM
from helpers import shipped_contract_without_dataset_checks

from pipeline.cost import cost_of_ownership, cost_per_1000_examples
from pipeline.evaluate import paired_bootstrap
from pipeline.recipe import load_recipe
from pipeline.scoring import INVALID_LABEL
from pipeline.tasks import get_task

KEY_ENV = "PIPELINE_TEST_EVAL_KEY"
KEY = "sk-eval-NEVER-WRITE-ME-93b1"


def test_bootstrap_of_identical_systems_is_no_difference():
    task = get_task("classification", ["a", "b"])
    golds = ["a", "b"] * 20
    preds = ["a", "a"] * 20
    result = paired_bootstrap(task, golds, preds, preds, samples=500, seed=1)
    assert result["difference"] == 0 and result["ci95"] == [0.0, 0.0]
    assert result["verdict"] == "no significant difference"
    assert (result["metric"], result["a"], result["b"]) == ("accuracy", "finetuned", "baseline")


def test_bootstrap_verdicts_follow_the_interval():
    task = get_task("classification", ["a", "b"])
    golds = ["a", "b"] * 20
    right, wrong = golds, [INVALID_LABEL] * 40
    better = paired_bootstrap(task, golds, right, wrong, samples=200)
    assert better["difference"] == 1.0 and better["ci95"] == [1.0, 1.0] and better["verdict"] == "better"
    assert paired_bootstrap(task, golds, wrong, right, samples=200)["verdict"] == "worse"
    # One example of 40 apart: +0.025 on all data, but resamples that miss it give 0, so the interval
    # includes 0 and the verdict is no significant difference.
    close = list(wrong)
    close[0] = golds[0]
    near = paired_bootstrap(task, golds, close, wrong, samples=1000, seed=3)
    assert near["difference"] == pytest.approx(1 / 40)
    assert near["ci95"][0] == 0.0 and near["verdict"] == "no significant difference"
    # Seeded: the same interval every time.
    assert paired_bootstrap(task, golds, close, wrong, samples=1000, seed=3) == near


def test_bootstrap_recomputes_micro_f1_from_pooled_counts():
    task = get_task("medical_coding")
    golds = [["I10"], ["E11.9", "I10"], ["J44.9"]] * 10
    a = [["I10"], ["E11.9"], ["J44.9"]] * 10  # TP 3, FN 1 per block: micro-F1 = 6/7
    b = [["I10"], [], []] * 10  # TP 1, FN 3: micro-F1 = 2/5
    result = paired_bootstrap(task, golds, a, b, samples=300)
    assert result["difference"] == pytest.approx(6 / 7 - 2 / 5)
    assert 0 < result["ci95"][0] <= result["difference"] <= result["ci95"][1]
    assert result["verdict"] == "better"


def _cost_recipe(tmp_path, *extra):
    return load_recipe(
        ROOT / "recipes" / "quickstart.yaml",
        [
            "baseline.provider=openai",
            "baseline.model=gpt-4o",
            "baseline.price_input_per_1m=2.5",
            "baseline.price_output_per_1m=10",
            "cost.gpu_price_per_hour=2",
            *extra,
        ],
    )


def test_cost_of_ownership_matches_the_worked_example(tmp_path):
    recipe = _cost_recipe(tmp_path, "cost.throughput_tokens_per_s=1000")
    n = 200.0
    metrics = {
        # 450 + 50 = 500 tokens per case on the self-hosted fine-tune.
        "finetuned": {"num_examples": n, "tokens_in": 450 * n, "tokens_out": 50 * n, "failed": 0.0},
        # 1,000 + 100 tokens per case at the API; 10 of 200 failed (no tokens, no cost).
        "baseline": {"num_examples": n, "tokens_in": 1000 * 190, "tokens_out": 100 * 190, "failed": 10.0},
    }
    cost = cost_of_ownership(recipe, metrics, "cuda")
    hosted, api = cost["self_hosted"], cost["api"]
    # 500 tokens / 1,000 tokens/s = 0.5 s per case; $2/h = $2/3,600 per second.
    assert hosted["seconds_per_case"] == pytest.approx(0.5)
    assert hosted["cost_per_1m_tokens"] == pytest.approx(2 / 3600 * 1000)  # 1M tokens take 1,000 s
    assert hosted["cost_per_1000_cases"] == pytest.approx(2 / 3600 * 0.5 * 1000)
    assert hosted["monthly_gpu_cost"] == pytest.approx(2 * 730)
    assert hosted["capacity_cases_per_month"] == pytest.approx(730 * 3600 / 0.5)
    assert hosted["throughput_source"].startswith("given")
    # API: 1,000 x 2.5/1M + 100 x 10/1M = $0.0035 per answered case.
    assert api["cost_per_case"] == pytest.approx(0.0035)
    assert api["cost_per_1000_cases"] == pytest.approx(3.5)
    assert api["cost_per_1m_tokens"] == pytest.approx(0.0035 / 1100 * 1e6)
    assert cost["break_even_cases_per_month"] == pytest.approx(1460 / 0.0035)
    assert cost["one_gpu_suffices"] is True
    assert cost_per_1000_examples(recipe, "baseline", metrics["baseline"]) == pytest.approx(3.5)
    assert cost_per_1000_examples(recipe, "finetuned", metrics["finetuned"]) == pytest.approx(2 / 3600 * 500)


def test_cost_of_ownership_uses_measured_time_and_says_when_one_gpu_cannot_pay_off(tmp_path):
    recipe = _cost_recipe(tmp_path)
    # Measured: 20 cases in 100 s of generation = 5 s per case, 100 tokens per case -> 20 tokens/s.
    metrics = {
        "finetuned": {"num_examples": 20.0, "tokens_in": 1800.0, "tokens_out": 200.0, "generation_seconds": 100.0},
        "baseline": {"num_examples": 20.0, "tokens_in": 2000.0, "tokens_out": 200.0, "failed": 0.0},
    }
    cost = cost_of_ownership(recipe, metrics, "cpu")
    assert cost["self_hosted"]["throughput_tokens_per_s"] == pytest.approx(20.0)
    assert cost["self_hosted"]["throughput_source"] == "measured during this evaluation (cpu)"
    # One GPU: 730 h x 3,600 / 5 s = 525,600 cases; API case = 100 x 2.5/1M + 10 x 10/1M = $0.00035;
    # break-even 1,460 / 0.00035 = 4.17M cases a month, more than one GPU serves.
    assert cost["break_even_cases_per_month"] == pytest.approx(1460 / 0.00035)
    assert cost["one_gpu_suffices"] is False


# --------------------------------------------------------------------------------------------------
# `python -m pipeline evaluate RECIPE --run RUN` on a copy of the shared trained run


def _answer_gold(notes_to_codes: dict[str, list[str]]):
    return lambda messages: ", ".join(notes_to_codes.get(messages[-1]["content"], []))


@pytest.fixture
def run_copy(trained_run, tiny_assets, tmp_path):
    """A copy of the trained run, its MLflow database and artifacts, so this test's additions stay here.

    The database records absolute artifact locations: they are pointed at the copied artifacts, or an
    evaluation of the copy would write into the shared run's artifacts (which other tests read).
    """
    import sqlite3

    run_dir = tmp_path / "run"
    shutil.copytree(trained_run.run_dir, run_dir)
    db = tmp_path / "mlruns.db"
    shutil.copy(tiny_assets["root"] / "mlruns.db", db)
    shutil.copytree(tiny_assets["root"] / "mlartifacts", tmp_path / "mlartifacts")
    old, new = str(tiny_assets["root"] / "mlartifacts"), str(tmp_path / "mlartifacts")
    with sqlite3.connect(db) as connection:
        connection.execute("UPDATE runs SET artifact_uri = replace(artifact_uri, ?, ?)", (old, new))
        connection.execute("UPDATE experiments SET artifact_location = replace(artifact_location, ?, ?)", (old, new))
    return run_dir, db


def _evaluate(recipe: Path, run: str, *extra: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "pipeline", "evaluate", str(recipe), "--run", run, *extra],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
        env={**os.environ, KEY_ENV: KEY},
    )


def test_evaluate_adds_the_baseline_to_an_existing_run(trained_run, tiny_assets, recipe_with, run_copy, tmp_path):
    run_dir, db = run_copy
    rows = [json.loads(line) for line in (tiny_assets["data"] / "eval.jsonl").read_text().splitlines()]
    server = FakeLLM("openai", _answer_gold({r["note"]: r["codes"] for r in rows}))
    try:
        recipe = recipe_with(
            "with_baseline.yaml",
            baseline={
                "provider": "openai",
                "model": "gpt-test",
                "base_url": server.base_url,
                "api_key_env": KEY_ENV,
                "send_data": True,
                "price_input_per_1m": 2.5,
                "price_output_per_1m": 10.0,
                "max_concurrency": 4,
            },
            eval={"bootstrap_samples": 500},
            cost={"gpu_price_per_hour": 2.0},
            tracking={"uri": f"sqlite:///{db}", "experiment": "tiny-tests"},
        )
        result = _evaluate(recipe, str(run_dir), "--systems", "baseline")
        assert result.returncode == 0, result.stderr[-3000:]
        assert len(server.requests) == 24  # one per eval row
        assert "generations reused" in result.stdout  # base and fine-tune were not generated again
        metrics = json.loads((run_dir / "eval" / "metrics.json").read_text())
        assert set(metrics["systems"]) == {"base", "finetuned", "baseline"}
        # The fine-tune's numbers are exactly those of training time: same cached answers.
        assert metrics["systems"]["finetuned"]["micro_f1"] == trained_run.metrics["finetuned"]["micro_f1"]
        assert metrics["systems"]["baseline"]["micro_f1"] == 1.0  # the fake codes every note right
        comparison = metrics["comparison"]
        finetuned_f1 = trained_run.metrics["finetuned"]["micro_f1"]
        assert comparison["difference"] == pytest.approx(finetuned_f1 - 1.0)
        assert comparison["ci95"][0] <= comparison["difference"] <= comparison["ci95"][1]
        assert comparison["verdict"] == "worse"  # 12 steps of a random tiny model against a perfect coder
        assert metrics["baseline"]["status"] == "ok" and metrics["baseline"]["rows_sent"] == 24
        assert metrics["cost"]["api"]["cost_per_1000_cases"] > 0 and metrics["cost"]["self_hosted"] is not None
        assert metrics["systems"]["baseline"]["cost_per_1000_examples"] == pytest.approx(
            metrics["cost"]["api"]["cost_per_1000_cases"]
        )
        report = (run_dir / "eval" / "report.md").read_text()
        assert "**worse**" in report and "## What was sent" in report and "## Cost of ownership" in report
        assert "| baseline |" in result.stdout and "The fine-tune is worse than the baseline" in result.stdout
        for name in ("cost.png", "per_label_f1.png", "baseline_sent.jsonl", "predictions.jsonl"):
            assert (run_dir / "eval" / name).is_file(), name
        predictions = (run_dir / "eval" / "predictions.jsonl").read_text().splitlines()
        assert len(predictions) == 3 * 24

        # The same MLflow run got the baseline's metrics and the comparison table.
        from mlflow.tracking import MlflowClient

        client = MlflowClient(tracking_uri=f"sqlite:///{db}")
        run = client.get_run(trained_run.mlflow_run_id)
        assert run.data.metrics["eval.baseline.micro_f1"] == 1.0
        assert run.data.metrics["eval.comparison.difference"] == pytest.approx(comparison["difference"])
        assert run.data.tags["eval.comparison.verdict"] == "worse" and run.info.status == "FINISHED"
        # mlflow.log_table: a JSON table artifact, registered in the run's logged-artifacts tag (the UI reads it).
        assert '"path": "eval/comparison_table.json", "type": "table"' in run.data.tags["mlflow.loggedArtifacts"]
        table = json.loads(
            Path(client.download_artifacts(run.info.run_id, "eval/comparison_table.json", tmp_path)).read_text()
        )
        rows = [dict(zip(table["columns"], values, strict=True)) for values in table["data"]]
        # Training logged base and fine-tune; this evaluation appended its three systems.
        assert [r["system"] for r in rows] == ["base", "finetuned", "base", "finetuned", "baseline"]
        assert rows[-1]["micro_f1"] == 1.0 and rows[-1]["evaluated_at"] >= rows[0]["evaluated_at"]

        # A second evaluation sends nothing: every answer is in the cache.
        again = _evaluate(recipe, str(run_dir), "--systems", "baseline")
        assert again.returncode == 0, again.stderr[-3000:]
        assert len(server.requests) == 24
        assert json.loads((run_dir / "eval" / "metrics.json").read_text())["baseline"]["answers_from_cache"] == 24

        # Re-scoring only the base keeps the baseline scored above: its answers come from the cache, so nothing
        # is sent and no key is needed (this process has none).
        from pipeline.evaluate import evaluate_existing

        assert KEY_ENV not in os.environ
        quiet = load_recipe(recipe, ["tracking.enabled=false"])
        rescored, _, _ = evaluate_existing(quiet, str(run_dir), systems=["base"], recipe_source=recipe)
        assert set(rescored.metrics) == {"base", "finetuned", "baseline"} and len(server.requests) == 24
        document = json.loads((run_dir / "eval" / "metrics.json").read_text())
        assert set(document["systems"]) == {"base", "finetuned", "baseline"}
        assert document["baseline"]["requests_sent"] == 0 and document["baseline"]["answers_from_cache"] == 24
        assert document["comparison"]["difference"] == pytest.approx(comparison["difference"])
    finally:
        server.close()

    # The API key is nowhere: not in the run directory, the MLflow database or artifacts, the audit log.
    artifacts = Path(client.get_run(trained_run.mlflow_run_id).info.artifact_uri.removeprefix("file://"))
    scanned = 0
    for root in (run_dir, artifacts, Path(os.environ["PIPELINE_AUDIT_LOG"]).parent):
        for path in root.rglob("*"):
            if path.is_file():
                assert KEY.encode() not in path.read_bytes(), path
                scanned += 1
    assert KEY.encode() not in db.read_bytes()
    assert scanned > 20


def test_train_and_evaluate_choose_the_same_default_systems():
    from pipeline.evaluate import default_systems

    quickstart = ROOT / "recipes" / "quickstart.yaml"  # has a baseline section (send_data: false)
    assert default_systems(load_recipe(quickstart)) == ["base", "finetuned", "baseline"]
    assert default_systems(load_recipe(quickstart, ["baseline=null"])) == ["base", "finetuned"]
    # eval.systems set in the recipe is taken as it is, baseline section or not.
    assert default_systems(load_recipe(quickstart, ["eval.systems=[finetuned]"])) == ["finetuned"]
    assert default_systems(load_recipe(quickstart, ["eval.systems=[base, finetuned]"])) == ["base", "finetuned"]


def test_evaluate_refuses_a_recipe_that_does_not_match_the_run(recipe_with, run_copy, tmp_path):
    run_dir, _ = run_copy
    recipe = recipe_with("other.yaml", model={"path": str(tmp_path)}, tracking={"enabled": False})
    result = _evaluate(recipe, str(run_dir))
    assert result.returncode == 2
    assert "model.path: the run used" in result.stderr and "Traceback" not in result.stderr
    missing = _evaluate(recipe, str(tmp_path / "nowhere"))
    assert missing.returncode == 2 and "no such run directory" in missing.stderr


def test_run_is_found_by_its_mlflow_run_id(trained_run, tiny_recipe_path):
    from pipeline.runlookup import RunNotFound, resolve_run
    from pipeline.tracking import tracking_uri

    uri = tracking_uri(load_recipe(tiny_recipe_path))
    assert resolve_run(trained_run.mlflow_run_id, uri) == (Path(trained_run.run_dir), trained_run.mlflow_run_id)
    with pytest.raises(RunNotFound, match="no MLflow run"):
        resolve_run("0" * 32, uri)


def test_evaluate_regenerates_what_is_not_cached_with_the_same_answers(trained_run, tiny_recipe_path, run_copy):
    from pipeline.evaluate import evaluate_existing

    run_dir, _ = run_copy
    shutil.rmtree(run_dir / "eval" / "generations")
    recipe = load_recipe(tiny_recipe_path, ["tracking.enabled=false"])
    result, _, _ = evaluate_existing(recipe, str(run_dir), systems=["finetuned"], recipe_source=tiny_recipe_path)
    # The adapter loaded from disk answers exactly as the model in memory did at the end of training.
    assert result.metrics["finetuned"]["micro_f1"] == trained_run.metrics["finetuned"]["micro_f1"]
    before = [
        json.loads(line)["answer"]
        for line in (trained_run.run_dir / "eval" / "predictions.jsonl").read_text().splitlines()
        if json.loads(line)["system"] == "finetuned"
    ]
    after = [
        json.loads(line)["text"]
        for line in (run_dir / "eval" / "generations" / "finetuned.jsonl").read_text().splitlines()
    ]
    assert after == before


def _write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


LABELS = ["billing", "technical", "account", "other"]


def _messages(n: int) -> list[dict]:
    """Classification rows whose text ends with their label."""
    return [{"id": f"m{i}", "text": f"message {i} about {LABELS[i % 4]}", "label": LABELS[i % 4]} for i in range(n)]


def _classification_recipe(tmp_path: Path, contract: Path, train: list[dict], eval_rows: list[dict]) -> dict:
    """A baseline-only classification recipe (as a dict) over these rows; tracking off."""
    data_dir = tmp_path / "data"
    data_dir.mkdir()
    return {
        "extends": str(ROOT / "recipes" / "quickstart.yaml"),
        "name": "cls",
        "task": "classification",
        "data": {
            "contract": str(contract),
            "train": str(_write_jsonl(data_dir / "train.jsonl", train)),
            "eval": str(_write_jsonl(data_dir / "eval.jsonl", eval_rows)),
        },
        "eval": {"systems": ["baseline"], "bootstrap_samples": 200},
        "tracking": {"enabled": False},
    }


def test_classification_against_a_baseline_only_and_a_skipped_one(tmp_path, monkeypatch):
    from pipeline.data import task_for, validate_data
    from pipeline.evaluate import evaluate_run

    rows = _messages(12)
    _, contract = shipped_contract_without_dataset_checks("classification", tmp_path)  # eval includes train rows
    recipe_data = _classification_recipe(tmp_path, contract, rows[:4], rows)
    # The fake labels "other" messages as billing: 3 of 12 wrong, accuracy 0.75.
    server = FakeLLM("anthropic", lambda m: m[-1]["content"].split()[-1].replace("other", "billing"))
    monkeypatch.setenv(KEY_ENV, KEY)
    try:
        baseline = {"provider": "anthropic", "model": "claude-test", "base_url": server.base_url}
        baseline |= {"api_key_env": KEY_ENV, "send_data": True, "price_input_per_1m": 3, "price_output_per_1m": 15}
        recipe = load_recipe(write_recipe(tmp_path / "cls.yaml", {**recipe_data, "baseline": baseline}))
        data = validate_data(recipe, tmp_path / "run")
        task = task_for(recipe, data.contract)
        result = evaluate_run(recipe, tmp_path / "run", data, task, "chat")
    finally:
        server.close()
    assert len(server.requests) == 12 and "billing, technical, account, other" in server.requests[0]["body"]["system"]
    values = result.metrics["baseline"]
    assert values["accuracy"] == pytest.approx(0.75)
    # billing: TP 3, FP 3 -> P 1/2, R 1, F1 2/3; technical and account perfect; other: F1 0.
    assert values["macro_f1"] == pytest.approx((2 / 3 + 1 + 1 + 0) / 4)
    document = json.loads((tmp_path / "run" / "eval" / "metrics.json").read_text())
    assert document["main_metric"] == "accuracy" and "comparison" not in document
    assert document["details"]["baseline"]["confusion_matrix"]["other"] == {"billing": 3}
    report = (tmp_path / "run" / "eval" / "report.md").read_text()
    assert "## Confusion matrix (baseline" in report and "No comparison" in report

    # The same recipe with send_data false: nothing sent, and the report says why.
    quiet = load_recipe(
        write_recipe(tmp_path / "q.yaml", {**recipe_data, "baseline": {**baseline, "send_data": False}})
    )
    skipped = evaluate_run(quiet, tmp_path / "run2", data, task, "chat")
    assert skipped.metrics == {} and skipped.baseline["status"] == "skipped"
    report = (tmp_path / "run2" / "eval" / "report.md").read_text()
    assert "was skipped: baseline.send_data is false" in report


def test_a_row_under_a_block_policy_never_reaches_the_baseline(tmp_path, monkeypatch):
    import yaml

    from pipeline.baseline import row_hash
    from pipeline.data import task_for, validate_data
    from pipeline.evaluate import evaluate_run

    contract, _ = shipped_contract_without_dataset_checks("classification", tmp_path)  # eval includes train rows
    contract["pii"] = {"entities": ["US_SSN", "PHONE_NUMBER"]}
    contract["fields"]["text"]["pii"] = "block"
    contract["max_quarantine_fraction"] = 0.5
    (tmp_path / "contract.yaml").write_text(yaml.safe_dump(contract))
    rows = _messages(8)
    ssn, phone = "536-22-8726", "(212) 555-0187"
    rows[1]["text"] += f", my SSN is {ssn}"
    rows[6]["text"] += f", call me at {phone}"
    recipe_data = _classification_recipe(tmp_path, tmp_path / "contract.yaml", rows[2:6], rows)
    server = FakeLLM("openai", lambda m: "billing")
    monkeypatch.setenv(KEY_ENV, KEY)
    try:
        baseline = {"provider": "openai", "model": "gpt-test", "base_url": server.base_url}
        baseline |= {"api_key_env": KEY_ENV, "send_data": True, "few_shot": 4}
        recipe = load_recipe(write_recipe(tmp_path / "r.yaml", {**recipe_data, "baseline": baseline}))
        data = validate_data(recipe, tmp_path / "run")
        result = evaluate_run(recipe, tmp_path / "run", data, task_for(recipe, data.contract), "chat")
    finally:
        server.close()
    # The two rows were quarantined by the contract; the other six went out, with the four train rows as shots.
    assert sorted(r["id"] for r in data.eval.rows) == ["m0", "m2", "m3", "m4", "m5", "m7"]
    assert len(server.requests) == 6 and result.metrics["baseline"]["num_examples"] == 6
    sent = json.dumps([r["body"] for r in server.requests])
    assert ssn not in sent and phone not in sent and "message 1 about" not in sent and "message 6 about" not in sent
    logged = [json.loads(line) for line in (tmp_path / "run" / "eval" / "baseline_sent.jsonl").read_text().splitlines()]
    assert {e["id"] for e in logged if e["split"] == "eval"} == {"m0", "m2", "m3", "m4", "m5", "m7"}
    blocked = {row_hash(r) for r in (rows[1], rows[6])}
    assert not blocked & {e["row_sha256"] for e in logged}
