"""MLflow lineage: dataset inputs, lineage tags, environment, registry, `runs`; local SQLite and a real server."""

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import ROOT


@pytest.fixture(scope="module")
def client(trained_run):
    from mlflow.tracking import MlflowClient

    uri = trained_run.summary["tracking_uri"]
    return MlflowClient(tracking_uri=uri, registry_uri=uri)


def test_each_split_is_a_dataset_input_with_its_contract(trained_run, tiny_assets, client):
    inputs = client.get_run(trained_run.mlflow_run_id).inputs.dataset_inputs
    by_context = {next(t.value for t in i.tags if t.key == "mlflow.data.context"): i for i in inputs}
    assert set(by_context) == {"train", "eval"}
    for split in ("train", "eval"):
        dataset, tags = by_context[split].dataset, {t.key: t.value for t in by_context[split].tags}
        path = tiny_assets["data"] / f"{split}.jsonl"
        sha = hashlib.sha256(path.read_bytes()).hexdigest()
        assert dataset.digest == sha[:32] and json.loads(dataset.source)["uri"] == str(path.resolve())
        profile = json.loads(dataset.profile)
        assert profile["rows_in"] == profile["rows_accepted"] + profile["rows_quarantined"] > 0
        assert profile["sha256"] == sha
        columns = {c["name"]: c["type"] for c in json.loads(dataset.schema)["mlflow_colspec"]}
        assert columns["note"] == "string" and columns["codes"]["type"] == "array"
        assert tags["contract.name"] == "medical_coding" and tags["contract.report"] == "validation/report.json"


def test_lineage_tags_and_environment(trained_run, tiny_assets, client):
    from pipeline import __version__

    run = client.get_run(trained_run.mlflow_run_id)
    tags = run.data.tags
    assert tags["pipeline.version"] == __version__
    head = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "HEAD"], capture_output=True, text=True).stdout.strip()
    assert tags["pipeline.git_commit"].removesuffix("+dirty") == head
    weights = hashlib.sha256((tiny_assets["model"] / "model.safetensors").read_bytes()).hexdigest()
    assert tags["base_model.weights_sha256"] == hashlib.sha256(f"model.safetensors:{weights}".encode()).hexdigest()
    assert tags["base_model"] == str(tiny_assets["model"]) and tags["base_model.revision"] == "local"
    assert tags["base_model.license"] == "apache-2.0" and tags["eval.main_metric"] == "micro_f1"
    assert tags["env.cuda"]  # "None" on a CPU-only torch build, the CUDA version otherwise
    environment = json.loads((trained_run.run_dir / "environment.json").read_text())
    assert any(p.lower().startswith("torch==") for p in environment["packages"])
    assert {"python", "cuda_version", "gpus", "platform"} <= set(environment)
    assert "environment.json" in [a.path for a in client.list_artifacts(run.info.run_id)]


def test_adapter_is_a_registered_model_version_with_metrics_and_lineage(trained_run, client):
    (version,) = client.search_model_versions("name='tiny'")
    assert version.run_id == trained_run.mlflow_run_id and version.source.endswith("/adapter")
    assert float(version.tags["eval.finetuned.micro_f1"]) == trained_run.metrics["finetuned"]["micro_f1"]
    assert version.tags["base_model.weights_sha256"] and version.tags["kind"] == "adapter"
    assert trained_run.summary["registered_model"] == {"name": "tiny", "version": str(version.version)}
    files = os.listdir(client.download_artifacts(trained_run.mlflow_run_id, "adapter"))
    assert "adapter_model.safetensors" in files


def _runs_cli(*args: str, uri: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "pipeline", "runs", *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "MLFLOW_TRACKING_URI": uri},
    )


def _fake_evaluated_run(uri: str, tmp_path, comparison: dict | None) -> str:
    """A run as train + evaluate leave it: eval.<system>.<metric> metrics and eval/metrics.json."""
    from pipeline.recipe import load_recipe
    from pipeline.tracking import Tracker

    recipe = load_recipe(ROOT / "recipes" / "quickstart.yaml", [f"tracking.uri={uri}", "tracking.experiment=cmp"])
    tracker = Tracker(recipe, run_name="with-baseline", run_dir=tmp_path)
    systems = {"base": {"micro_f1": 0.05}, "finetuned": {"micro_f1": 0.8}, "baseline": {"micro_f1": 0.7}}
    for system, values in systems.items():
        tracker.log_metrics({f"eval.{system}.{k}": v for k, v in values.items()})
    metrics = {"main_metric": "micro_f1", "systems": systems, "per_label": {}}
    if comparison:
        metrics["comparison"] = comparison
    (tmp_path / "eval").mkdir()
    (tmp_path / "eval" / "metrics.json").write_text(json.dumps(metrics))
    tracker.log_artifact(tmp_path / "eval")
    tracker.end()
    return tracker.run_id


def test_runs_lists_each_system_main_metric_and_the_verdict(trained_run, tmp_path):
    uri = f"sqlite:///{tmp_path / 'cmp.db'}"
    comparison = {"metric": "micro_f1", "a": "finetuned", "b": "baseline", "difference": 0.1, "ci95": [0.02, 0.18]}
    run_id = _fake_evaluated_run(uri, tmp_path, {**comparison, "verdict": "better"})
    result = _runs_cli(uri=uri)
    assert result.returncode == 0, result.stderr[-2000:]
    header, line = result.stdout.strip().splitlines()
    assert header.split()[-6:] == ["base", "finetuned", "baseline", "vs", "baseline", "registry"]
    assert run_id[:12] in line and "0.050" in line and "0.800" in line and "0.700" in line
    assert line.endswith("better (+0.100)  -")  # no registered version

    # The session's trained run skipped its baseline (send_data false): said so with the reason, and its adapter
    # version is the registry's candidate.
    trained = _runs_cli(uri=trained_run.summary["tracking_uri"])
    assert trained.returncode == 0, trained.stderr[-2000:]
    row = next(x for x in trained.stdout.splitlines() if x.startswith(trained_run.mlflow_run_id[:12]))
    assert f"{trained_run.metrics['finetuned']['micro_f1']:.3f}" in row
    assert "skipped: baseline.send_data is false" in row and row.endswith("@candidate")


def test_remote_server_gets_params_within_limits_inputs_tags_and_a_registered_version(
    mlflow_server, trained_run, tmp_path
):
    from mlflow.tracking import MlflowClient

    from pipeline.contracts import load_contract
    from pipeline.recipe import load_recipe
    from pipeline.tracking import MAX_PARAM_VALUE, Tracker, dataset_inputs, params_for

    recipe = load_recipe(
        trained_run.run_dir / "recipe.resolved.yaml",
        [f"tracking.uri={mlflow_server}", "tracking.experiment=remote", "description=" + "y" * 9000],
    )
    tracker = Tracker(recipe, run_name="remote-run", run_dir=tmp_path)
    assert not tracker.offline and tracker.uri == mlflow_server
    many = {f"extra.{'k' * 300}{i}": "v" * 7000 for i in range(150)}  # long keys and values, over 100 per batch
    tracker.log_params({**params_for(recipe), **many})
    report = json.loads((trained_run.run_dir / "validation" / "report.json").read_text())
    tracker.log_inputs(dataset_inputs(report, load_contract(recipe.data.contract)))
    tracker.set_tags({"base_model": recipe.model.path, "eval.main_metric": "micro_f1"})
    tracker.log_metrics({"eval.finetuned.micro_f1": 0.5, "eval.base.micro_f1": 0.25})
    tracker.log_artifact(trained_run.run_dir / "adapter")
    version = tracker.register("remote-tiny", "adapter", {"eval.finetuned.micro_f1": "0.5"})
    tracker.end()
    assert not tracker.offline and version == "1"

    client = MlflowClient(tracking_uri=mlflow_server, registry_uri=mlflow_server)
    run = client.get_run(tracker.run_id)
    assert len(run.data.params) == len(params_for(recipe)) + 150
    assert all(len(v) <= MAX_PARAM_VALUE and len(k) <= 250 for k, v in run.data.params.items())
    assert run.data.params["description"].endswith("[truncated]")
    assert {i.dataset.name for i in run.inputs.dataset_inputs} == {"train:train.jsonl", "eval:eval.jsonl"}
    (registered,) = client.search_model_versions("name='remote-tiny'")
    assert registered.run_id == tracker.run_id and registered.tags["eval.finetuned.micro_f1"] == "0.5"
    local = client.download_artifacts(tracker.run_id, "adapter", str(tmp_path / "download"))
    assert "adapter_model.safetensors" in os.listdir(local)

    listed = _runs_cli(uri=mlflow_server)
    assert listed.returncode == 0, listed.stderr[-2000:]
    assert any(line.startswith(tracker.run_id[:12]) and "0.500" in line for line in listed.stdout.splitlines())


def test_runs_reads_the_store_and_experiment_of_a_recipe(mlflow_server, tmp_path, recipe_with):

    recipe = recipe_with("r.yaml", tracking={"uri": mlflow_server, "experiment": "remote"})
    result = subprocess.run(
        [sys.executable, "-m", "pipeline", "runs", str(recipe)], cwd=ROOT, capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert "remote-run" in result.stdout


def _rest(url: str) -> dict:
    import urllib.request

    with urllib.request.urlopen(url, timeout=30) as response:
        return json.loads(response.read().decode())


def test_a_reviewer_gets_the_training_view_a_description_and_promotion_by_alias(mlflow_server, recipe_with, tmp_path):
    """Through the server's REST API, as the UI reads it: the experiment kind, the run's description, the metrics a
    reviewer compares, the registered version with its `candidate` alias; then `promote` moves `champion`."""
    from helpers import run_main

    from pipeline.recipe import load_recipe
    from pipeline.train import train

    path = recipe_with(
        "review.yaml",
        training={"max_steps": 2, "logging_steps": 1},
        eval={"max_examples": 4},
        tracking={"uri": mlflow_server, "experiment": "review", "registered_model": "review-tiny"},
        cost={"gpu_price_per_hour": 2.0},
    )
    result = train(load_recipe(path), recipe_source=path, run_dir=tmp_path / "run")
    api = f"{mlflow_server}/api/2.0/mlflow"
    experiment = _rest(f"{api}/experiments/get-by-name?experiment_name=review")["experiment"]
    assert {"key": "mlflow.experimentKind", "value": "custom_model_development"} in experiment["tags"]
    run = _rest(f"{api}/runs/get?run_id={result.mlflow_run_id}")["run"]
    tags = {t["key"]: t["value"] for t in run["data"]["tags"]}
    note = tags["mlflow.note.content"]
    base, tuned = (result.metrics[s]["micro_f1"] for s in ("base", "finetuned"))
    assert f"**micro_f1**: base {base:.3f}, finetuned {tuned:.3f}" in note
    assert "**Against the baseline**: skipped (baseline.send_data is false" in note
    assert str(tmp_path / "run" / "adapter") in note
    assert "registry review-tiny version 1" in note and "**Cost per 1,000 cases**: self-hosted fine-tune $" in note
    metrics = {m["key"] for m in run["data"]["metrics"]}
    assert {"eval.base.micro_f1", "eval.finetuned.micro_f1", "train.loss"} <= metrics
    candidate = _rest(f"{api}/registered-models/alias?name=review-tiny&alias=candidate")["model_version"]
    assert candidate["version"] == "1" and candidate["run_id"] == result.mlflow_run_id

    promoted = run_main("promote", str(tmp_path / "run"))
    assert promoted.returncode == 0, promoted.stderr[-2000:]
    assert "review-tiny@champion -> version 1" in promoted.stdout
    champion = _rest(f"{api}/registered-models/alias?name=review-tiny&alias=champion")["model_version"]
    assert champion["version"] == "1"
    audit = [json.loads(line) for line in Path(os.environ["PIPELINE_AUDIT_LOG"]).read_text().splitlines()]
    entry = next(e for e in reversed(audit) if e["command"] == "promote")
    assert entry["promotion"]["version"] == "1" and entry["promotion"]["alias"] == "champion"
    assert entry["user"] and entry["time"]
    listed = _runs_cli(uri=mlflow_server)
    row = next(line for line in listed.stdout.splitlines() if line.startswith(result.mlflow_run_id[:12]))
    assert row.endswith("review-tiny v1 @candidate,champion") and "skipped: baseline.send_data is false" in row

    from mlflow.tracking import MlflowClient

    store = MlflowClient(tracking_uri=mlflow_server)
    store.set_tag(result.mlflow_run_id, "export.verified", "False")  # what a failed `export --merge` records
    refused = run_main("promote", result.mlflow_run_id, "--tracking-uri", mlflow_server, "--alias", "prod")
    assert refused.returncode == 1 and "its merged export failed verification" in refused.stderr
    store.set_tag(result.mlflow_run_id, "export.verified", "True")
    store.set_tag(result.mlflow_run_id, "eval.comparison.verdict", "worse")
    refused = run_main("promote", result.mlflow_run_id, "--tracking-uri", mlflow_server, "--alias", "prod")
    assert refused.returncode == 1 and "its verdict against the baseline is 'worse'" in refused.stderr
    assert "prod" not in store.get_model_version("review-tiny", "1").aliases
