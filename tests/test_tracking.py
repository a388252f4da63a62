import json
import socket
import subprocess
import sys
import time
import urllib.request

import pytest
from conftest import ROOT


@pytest.fixture(scope="module")
def client(trained_run):
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri=trained_run.summary["tracking_uri"])


def test_run_holds_params_metrics_and_artifacts(trained_run, client):
    run = client.get_run(trained_run.mlflow_run_id)
    params = run.data.params
    assert params["lora.r"] == "16" and params["training.max_steps"] == "12"
    assert params["quantization.quant_type"] == "nf4" and params["model.path"].endswith("model")
    metrics = run.data.metrics
    for system in ("base", "finetuned"):
        for name in ("micro_f1", "macro_f1", "exact_match", "invalid_code_rate"):
            assert f"eval.{system}.{name}" in metrics
    assert metrics["eval.finetuned.micro_f1"] == pytest.approx(trained_run.metrics["finetuned"]["micro_f1"])
    history = client.get_metric_history(trained_run.mlflow_run_id, "train.loss")
    assert [m.step for m in history] == [4, 8, 12]
    assert client.get_metric_history(trained_run.mlflow_run_id, "train.learning_rate")
    assert client.get_metric_history(trained_run.mlflow_run_id, "train.grad_norm")

    def paths(prefix=""):
        found = []
        for item in client.list_artifacts(trained_run.mlflow_run_id, prefix or None):
            found += paths(item.path) if item.is_dir else [item.path]
        return found

    artifacts = set(paths())
    for name in [
        "recipe.resolved.yaml",
        "plan.json",
        "validation/report.json",
        "validation/quarantine.jsonl",
        "adapter/adapter_model.safetensors",
        "eval/report.md",
        "eval/metrics.json",
    ]:
        assert name in artifacts, name
    assert run.info.status == "FINISHED"
    assert run.data.tags["task"] == "medical_coding"


def test_params_stay_within_mlflow_limits(tmp_path):
    from pipeline.recipe import load_recipe
    from pipeline.tracking import MAX_PARAM_VALUE, Tracker, params_for

    long_description = "x" * 10_000
    recipe = load_recipe(
        ROOT / "recipes" / "quickstart.yaml",
        [f"description={long_description}", f"tracking.uri=sqlite:///{tmp_path / 'm.db'}"],
    )
    params = params_for(recipe)
    assert len(params["description"]) == MAX_PARAM_VALUE and params["description"].endswith("[truncated]")
    tracker = Tracker(recipe, run_name="limits")
    many = {f"extra.p{i}": str(i) for i in range(250)}  # over MLflow's 100-per-call batch limit
    tracker.log_params({**params, **many})
    tracker.end()
    from mlflow.tracking import MlflowClient

    logged = MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'm.db'}").get_run(tracker.run_id).data.params
    assert logged["extra.p249"] == "249" and len(logged) == len(params) + 250


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_ui_serves_the_store_on_loopback_only(tmp_path, trained_run):
    port = _free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "pipeline", "ui", "--port", str(port)],
        cwd=ROOT,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
        env={
            **__import__("os").environ,
            "MLFLOW_TRACKING_URI": trained_run.summary["tracking_uri"],
            "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false",  # no job-runner processes (tests/helpers.py)
        },
    )
    try:
        deadline = time.time() + 90
        body = ""
        while time.time() < deadline:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2) as response:
                    body = response.read().decode()
                    break
            except OSError:
                time.sleep(1)
        assert body.strip() == "OK"
        audit_log = __import__("pathlib").Path(__import__("os").environ["PIPELINE_AUDIT_LOG"])
        assert any('"command": "ui"' in line for line in audit_log.read_text().splitlines())
        with urllib.request.urlopen(
            f"http://127.0.0.1:{port}/api/2.0/mlflow/runs/get?run_id={trained_run.mlflow_run_id}", timeout=5
        ) as response:
            assert trained_run.mlflow_run_id in response.read().decode()
        listening = subprocess.run(["ss", "-ltnH", f"sport = :{port}"], capture_output=True, text=True).stdout
        if listening:  # ss is not on every machine; when it is, the socket must be bound to loopback
            assert all("127.0.0.1:" in line for line in listening.splitlines())
    finally:
        import os
        import signal

        os.killpg(proc.pid, signal.SIGTERM)  # the server and any workers it started
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)


def test_unreachable_tracking_server_does_not_stop_training_and_sync_uploads_later(tmp_path, recipe_with):
    import json
    import os

    from helpers import run_cli

    dead = f"http://127.0.0.1:{_free_port()}"  # loopback port with nothing listening
    path = recipe_with(
        "r.yaml",
        training={"max_steps": 4, "logging_steps": 2},
        eval={"max_examples": 2},
        tracking={"uri": dead, "experiment": "offline-test"},
    )
    result = run_cli("train", str(path), "--run-dir", str(tmp_path / "run"))
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stderr.count("is unreachable") == 1  # told once, clearly
    assert "Base model license: Apache License 2.0" in result.stdout  # train prints the license obligations
    pending = tmp_path / "run" / "tracking" / "pending.jsonl"
    ops = [json.loads(line)["op"] for line in pending.read_text().splitlines()]
    assert ops[0] == "start" and "params" in ops and "metrics" in ops
    assert ops[-3:] == ["end", "tags", "artifact"]  # the command's audit entry, queued after the run closed

    store = f"sqlite:///{tmp_path / 'later.db'}"
    synced = subprocess.run(
        [sys.executable, "-m", "pipeline", "sync", str(tmp_path / "run")],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "MLFLOW_TRACKING_URI": store},
    )
    assert synced.returncode == 0, synced.stderr[-2000:]
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=store)
    (run,) = client.search_runs([client.get_experiment_by_name("offline-test").experiment_id])
    assert run.info.status == "FINISHED" and run.data.params["training.max_steps"] == "4"
    assert "eval.finetuned.micro_f1" in run.data.metrics
    assert [m.step for m in client.get_metric_history(run.info.run_id, "train.loss")] == [2, 4]
    # The train command's audit entry reached the run through the queue, as it does for a run tracked live.
    assert run.data.tags["audit.entry_seq"] and len(run.data.tags["audit.entry_hash"]) == 64
    log_name = os.path.basename(os.environ["PIPELINE_AUDIT_LOG"])  # the session's audit log (tests/conftest.py)
    assert [a.path for a in client.list_artifacts(run.info.run_id, "audit")] == [f"audit/{log_name}"]
    assert not pending.exists() and (tmp_path / "run" / "tracking" / "synced.jsonl").is_file()
    again = run_cli("sync", str(tmp_path / "run"))
    assert again.returncode == 2 and "nothing to sync" in again.stderr


def test_a_refused_call_is_reported_as_refused_and_the_run_keeps_logging(tmp_path, capsys):
    """A store that answers "no" (a param logged again with another value) is not an unreachable store."""
    from mlflow.tracking import MlflowClient

    from pipeline.recipe import load_recipe
    from pipeline.tracking import Tracker

    uri = f"sqlite:///{tmp_path / 'm.db'}"
    recipe = load_recipe(ROOT / "recipes" / "quickstart.yaml", [f"tracking.uri={uri}"])
    tracker = Tracker(recipe, run_name="refused", run_dir=tmp_path / "run")
    tracker.log_params({"lora.r": "8"})
    tracker.log_params({"lora.r": "16"})  # MLflow params are immutable: INVALID_PARAMETER_VALUE (400)
    tracker.log_metrics({"loss": 1.5})
    tracker.end()
    err = capsys.readouterr().err
    assert "refused a params call" in err and "unreachable" not in err
    assert not tracker.offline and not (tmp_path / "run" / "tracking" / "pending.jsonl").exists()
    rejected = [json.loads(line) for line in (tmp_path / "run" / "tracking" / "rejected.jsonl").open()]
    assert rejected == [{"op": "params", "keys": ["lora.r"], "reason": rejected[0]["reason"]}]
    run = MlflowClient(tracking_uri=uri).get_run(tracker.run_id)
    assert run.data.params["lora.r"] == "8" and run.data.metrics["loss"] == 1.5 and run.info.status == "FINISHED"


# --------------------------------------------------------------------------------------------------
# sync survives a torn queue and resumes where a failed sync stopped (a local SQLite store, no server)


def _queue(tmp_path, steps=4):
    """A run's offline queue as the Tracker writes it: start, params, one metrics line per step."""
    run = tmp_path / "run"
    (run / "tracking").mkdir(parents=True)
    uri = f"sqlite:///{tmp_path / 'store.db'}"
    lines = [{"op": "start", "uri": uri, "experiment": "sync-test", "run_name": "r", "run_id": None}]
    lines.append({"op": "params", "lora.r": "8"})
    lines += [
        {"op": "metrics", "values": {"train.loss": 2.0 - s / 10}, "step": s, "time": 1000 + s} for s in range(steps)
    ]
    pending = run / "tracking" / "pending.jsonl"
    pending.write_text("".join(json.dumps(line) + "\n" for line in lines))
    return run, pending, uri


def test_sync_skips_a_line_cut_short_by_kill_9(tmp_path, capsys):
    from mlflow.tracking import MlflowClient

    from pipeline.tracking import sync

    run, pending, uri = _queue(tmp_path)
    with pending.open("a") as handle:
        handle.write('{"op": "metrics", "values": {"train.lo')  # the write kill -9 interrupted
    run_id, sent = sync(run)
    assert sent == 5 and "skipped line(s) 7: cut short by a crash" in capsys.readouterr().err
    history = MlflowClient(tracking_uri=uri).get_metric_history(run_id, "train.loss")
    assert [m.step for m in history] == [0, 1, 2, 3]


def test_a_queue_written_after_a_torn_line_keeps_every_later_operation(tmp_path):
    from pipeline.tracking import Tracker, read_pending

    run, pending, _ = _queue(tmp_path, steps=1)
    with pending.open("a") as handle:
        handle.write('{"op": "metr')  # kill -9, then train --resume appends to the same queue
    tracker = Tracker.__new__(Tracker)  # only the queue writer: no store is contacted
    tracker._pending = pending
    tracker._queue("metrics", {"values": {"train.loss": 1.0}, "step": 9, "time": 1})
    ops, torn = read_pending(pending)
    assert torn == [4] and ops[-1]["step"] == 9


def test_a_sync_that_stops_partway_resumes_without_sending_twice(tmp_path, monkeypatch):
    from mlflow.tracking import MlflowClient

    import pipeline.tracking as tracking

    run, pending, uri = _queue(tmp_path)
    real_apply, calls = tracking.apply_op, []

    def store_goes_down_after_three(client, run_id, kind, payload):
        if len(calls) == 3:
            raise ConnectionError("the store went down again")
        calls.append(kind)
        real_apply(client, run_id, kind, payload)

    monkeypatch.setattr(tracking, "apply_op", store_goes_down_after_three)
    with pytest.raises(tracking.SyncFailed, match="ConnectionError: the store went down again") as failed:
        tracking.sync(run)
    assert isinstance(failed.value.__cause__, ConnectionError)
    assert str(failed.value).startswith(f"sync failed, {pending} is kept and the next try resumes after what was sent")
    assert pending.is_file()
    progress = json.loads((run / "tracking" / "sync_progress.json").read_text())
    assert progress["done"] == 3
    monkeypatch.setattr(tracking, "apply_op", real_apply)
    run_id, sent = tracking.sync(run)
    assert run_id == progress["run_id"] and sent == 2  # 5 operations after start: 3 then 2
    history = MlflowClient(tracking_uri=uri).get_metric_history(run_id, "train.loss")
    assert [m.step for m in history] == [0, 1, 2, 3]  # each step once
    assert not (run / "tracking" / "sync_progress.json").exists() and (run / "tracking" / "synced.jsonl").is_file()


def test_sync_of_a_directory_without_a_queue_is_a_usage_error_with_cli_s_message(tmp_path):
    from pipeline.errors import UsageError
    from pipeline.tracking import NothingToSync, sync

    pending = tmp_path / "tracking" / "pending.jsonl"
    with pytest.raises(NothingToSync) as nothing:
        sync(tmp_path)
    assert isinstance(nothing.value, UsageError) and nothing.value.exit_code == 2
    said = "nothing to sync (the run was tracked live, or this is not a run directory)"
    assert str(nothing.value) == f"{pending}: {said}"


def test_tracking_uri_is_explicit_then_environment_then_configured_then_the_default(monkeypatch):
    from pipeline.recipe import load_recipe
    from pipeline.tracking import tracking_uri

    recipe = load_recipe(ROOT / "recipes" / "quickstart.yaml", ["tracking.uri=sqlite:///recipe.db"])
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    assert tracking_uri() == "sqlite:///mlruns.db"
    assert tracking_uri(recipe) == "sqlite:///recipe.db"
    assert tracking_uri(configured="sqlite:///run.db") == "sqlite:///run.db"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "sqlite:///env.db")
    assert tracking_uri(recipe) == tracking_uri(configured="sqlite:///run.db") == "sqlite:///env.db"
    assert tracking_uri(recipe, explicit="sqlite:///flag.db") == "sqlite:///flag.db"


def test_experiments_open_on_the_training_view_unless_the_user_chose_a_kind(tmp_path):
    from mlflow.tracking import MlflowClient

    from pipeline.recipe import load_recipe
    from pipeline.tracking import Tracker

    uri = f"sqlite:///{tmp_path / 'm.db'}"
    client = MlflowClient(tracking_uri=uri)
    client.create_experiment("theirs", tags={"mlflow.experimentKind": "genai_development"})
    client.create_experiment("untagged")
    for name in ("ours", "theirs", "untagged"):
        recipe = load_recipe(
            ROOT / "recipes" / "quickstart.yaml", [f"tracking.uri={uri}", f"tracking.experiment={name}"]
        )
        with Tracker(recipe, run_name=name):
            pass
    kinds = {
        n: client.get_experiment_by_name(n).tags.get("mlflow.experimentKind") for n in ("ours", "theirs", "untagged")
    }
    assert kinds == {
        "ours": "custom_model_development",
        "theirs": "genai_development",
        "untagged": "custom_model_development",
    }


def test_a_server_that_dies_mid_run_costs_seconds_not_minutes(tmp_path, monkeypatch):
    """A store that accepts connections and drops every request (a server dying): the run goes offline within
    seconds (MLflow alone retries 7 times with doubling backoff, minutes) and queues everything after."""
    import socket
    import threading

    from pipeline.recipe import load_recipe
    from pipeline.tracking import HTTP_BOUNDS, Tracker

    for key in HTTP_BOUNDS:
        monkeypatch.delenv(key, raising=False)
    listener = socket.create_server(("127.0.0.1", 0))
    stop = threading.Event()

    def drop_everything():
        listener.settimeout(0.2)
        while not stop.is_set():
            try:
                connection, _ = listener.accept()
            except TimeoutError:
                continue
            connection.close()

    thread = threading.Thread(target=drop_everything, daemon=True)
    thread.start()
    uri = f"http://127.0.0.1:{listener.getsockname()[1]}"
    recipe = load_recipe(ROOT / "recipes" / "quickstart.yaml", [f"tracking.uri={uri}"])
    started = time.monotonic()
    try:
        tracker = Tracker(recipe, run_name="dying", run_dir=tmp_path)
        tracker.log_metrics({"train.loss": 1.0}, step=1)
    finally:
        stop.set()
        thread.join()
        listener.close()
    assert tracker.offline and time.monotonic() - started < 30
    ops = [json.loads(line)["op"] for line in (tmp_path / "tracking" / "pending.jsonl").read_text().splitlines()]
    assert ops == ["start", "metrics"]


def test_metrics_leave_the_training_loop_at_once_and_reach_the_store_in_order(tmp_path, monkeypatch):
    """A slow store does not hold a training step: metrics go out on a background thread, in order, and every
    other call (and the end of the run) waits for them."""
    from mlflow.tracking import MlflowClient

    import pipeline.tracking as tracking
    from pipeline.recipe import load_recipe

    real = tracking.apply_op

    def slow(client, run_id, kind, payload):
        if kind == "metrics":
            time.sleep(0.5)  # a store taking half a second per call
        real(client, run_id, kind, payload)

    monkeypatch.setattr(tracking, "apply_op", slow)
    uri = f"sqlite:///{tmp_path / 'm.db'}"
    recipe = load_recipe(ROOT / "recipes" / "quickstart.yaml", [f"tracking.uri={uri}"])
    with tracking.Tracker(recipe, run_name="slow-store") as tracker:
        started = time.monotonic()
        for step in range(1, 5):
            tracker.log_metrics({"train.loss": 1.0 / step}, step=step)
        assert time.monotonic() - started < 0.5  # 2 s of sending did not hold the loop
        tracker.set_tags({"after": "the metrics"})
    client = MlflowClient(tracking_uri=uri)
    history = client.get_metric_history(tracker.run_id, "train.loss")
    assert [(m.step, m.value) for m in sorted(history, key=lambda m: m.step)] == [(s, 1.0 / s) for s in range(1, 5)]
    assert client.get_run(tracker.run_id).info.status == "FINISHED"


def test_tracker_as_a_context_manager_closes_its_run_finished_or_failed(tmp_path):
    from mlflow.tracking import MlflowClient

    from pipeline.recipe import load_recipe
    from pipeline.tracking import Tracker

    uri = f"sqlite:///{tmp_path / 'm.db'}"
    recipe = load_recipe(ROOT / "recipes" / "quickstart.yaml", [f"tracking.uri={uri}"])
    with Tracker(recipe, run_name="ok", run_dir=tmp_path / "ok") as ok:
        ok.write_artifact(tmp_path / "ok" / "summary.json", {"a": 1})
    with pytest.raises(RuntimeError, match="boom"), Tracker(recipe, run_name="boom") as failed:
        raise RuntimeError("boom")
    client = MlflowClient(tracking_uri=uri)
    assert client.get_run(ok.run_id).info.status == "FINISHED"
    assert client.get_run(failed.run_id).info.status == "FAILED"
    assert client.get_run(failed.run_id).data.tags["failure_reason"] == "RuntimeError: boom"  # why, in the UI
    assert "failure_reason" not in client.get_run(ok.run_id).data.tags
    assert json.loads((tmp_path / "ok" / "summary.json").read_text()) == {"a": 1}
    assert [a.path for a in client.list_artifacts(ok.run_id)] == ["summary.json"]

    # Another rank's tracker: no MLflow run, and it writes nothing into the run directory.
    with Tracker(recipe, run_name="rank1", run_dir=tmp_path / "r1", main_process=False) as other:
        other.write_artifact(tmp_path / "r1" / "plan.json", {"b": 2})
    assert other.run_id is None and not (tmp_path / "r1").exists()
