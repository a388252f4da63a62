"""MLflow tracking: the only module that imports mlflow.

One MLflow run per ``train``. The default store is a SQLite file in the working directory
(``sqlite:///mlruns.db``) with artifacts in ``mlartifacts/`` beside it; ``MLFLOW_TRACKING_URI`` in the
environment, then ``tracking.uri`` in the recipe, choose another. Params are the resolved recipe flattened
to dotted keys and sent in batches within MLflow's limits, so a long value or many keys never crash a run.
"""

from __future__ import annotations

import json
import os
import socket
import sys
import time
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from pipeline.privacy import redact_secrets
from pipeline.recipe import Recipe, flatten

# MLflow's own limits (mlflow.utils.validation): 100 params per batch call, 6,000 characters per value,
# 250 per key. Values are cut with a marker rather than rejected.
PARAMS_PER_BATCH = 100
MAX_PARAM_VALUE = 6000
MAX_KEY = 250
TRUNCATED = "...[truncated]"


def tracking_uri(recipe: Recipe) -> str:
    """The store to use: MLFLOW_TRACKING_URI wins over the recipe."""
    return os.environ.get("MLFLOW_TRACKING_URI") or recipe.tracking.uri


def artifact_root(uri: str) -> str | None:
    """For a local SQLite store, artifacts go to ``mlartifacts/`` next to the database file."""
    if uri.startswith("sqlite:///"):
        db = Path(uri[len("sqlite:///") :])
        return (db.resolve().parent / "mlartifacts").as_uri()
    return None


def params_for(recipe: Recipe) -> dict[str, str]:
    """The resolved recipe as MLflow params: dotted keys, string values within MLflow's length limits."""
    params = {}
    for key, value in flatten(recipe.model_dump(mode="json")).items():
        text = "" if value is None else redact_secrets(str(value))
        if len(text) > MAX_PARAM_VALUE:
            text = text[: MAX_PARAM_VALUE - len(TRUNCATED)] + TRUNCATED
        params[key[:MAX_KEY]] = text
    return params


class Tracker:
    """An MLflow run, or a queue of what it would receive while the tracking server cannot be reached.

    Uses an explicit ``MlflowClient`` bound to one store rather than mlflow's global "active run" state, so
    several runs against different stores in one process (notebooks, tests) never mix.

    If the store is unreachable when the run starts, or a call fails later, the user is told once and the
    job goes on: every further call is appended to ``<run_dir>/tracking/pending.jsonl`` (artifacts by path,
    they are in the run directory anyway) and ``python -m pipeline sync RUN_DIR`` replays it later.
    """

    def __init__(
        self, recipe: Recipe, run_name: str, run_dir: str | Path | None = None, resume_run_id: str | None = None
    ):
        """Start the run, or reopen ``resume_run_id`` (``train --resume``) when the store has it."""
        self.enabled = recipe.tracking.enabled
        self.run_id: str | None = None
        self.uri = tracking_uri(recipe)
        self.offline = False
        self._pending = Path(run_dir) / "tracking" / "pending.jsonl" if run_dir is not None else None
        if not self.enabled:
            return
        self._experiment = recipe.tracking.experiment or recipe.name
        self._run_name = run_name
        try:
            _probe(self.uri)
            self._client = _client(self.uri)
            self.run_id = reopen_run(self._client, resume_run_id) if resume_run_id else None
            if self.run_id is None:
                self.run_id = start_run(self._client, self.uri, self._experiment, run_name)
        except Exception as exc:  # noqa: BLE001 - any store failure must not stop training
            self._go_offline(exc)

    # Each public call becomes one operation, done now or queued for `sync`.
    def log_params(self, params: dict[str, str]) -> None:
        """Log params (sent in batches of at most 100)."""
        self._op("params", params)

    def set_tags(self, tags: dict[str, str]) -> None:
        """Tags on the run (pipeline version, base model, task...), secrets redacted."""
        self._op("tags", {k: redact_secrets(str(v))[:MAX_PARAM_VALUE] for k, v in tags.items()})

    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
        """Numeric metrics; non-numeric values are skipped."""
        numeric = {k: float(v) for k, v in metrics.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
        if numeric:
            self._op("metrics", {"values": numeric, "step": step or 0, "time": int(time.time() * 1000)})

    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None:
        """Copy a file or a whole directory into the run's artifacts."""
        self._op("artifact", {"path": str(Path(path).resolve()), "artifact_path": artifact_path})

    def end(self, status: str = "FINISHED") -> None:
        """Close the run as FINISHED, FAILED or KILLED."""
        self._op("end", {"status": status})

    def _op(self, kind: str, payload: dict[str, Any]) -> None:
        if not self.enabled:
            return
        if not self.offline:
            try:
                apply_op(self._client, self.run_id, kind, payload)
                return
            except Exception as exc:  # noqa: BLE001 - the job goes on without the server
                self._go_offline(exc)
        self._queue(kind, payload)

    def _go_offline(self, exc: Exception) -> None:
        self.offline = True
        where = self._pending.parent if self._pending else "nowhere (no run directory)"
        print(
            f"warning: MLflow tracking at {redact_secrets(self.uri)} is unreachable ({type(exc).__name__}: "
            f"{redact_secrets(str(exc))[:200]}). Training continues; params, metrics and artifacts are kept in "
            f"{where} and `python -m pipeline sync RUN_DIR` uploads them when the server is back.",
            file=sys.stderr,
            flush=True,
        )
        if self._pending is not None and not self._pending.exists():
            self._queue(
                "start",
                {"uri": self.uri, "experiment": self._experiment, "run_name": self._run_name, "run_id": self.run_id},
            )

    def _queue(self, kind: str, payload: dict[str, Any]) -> None:
        if self._pending is None:
            return
        self._pending.parent.mkdir(parents=True, exist_ok=True)
        with self._pending.open("a", encoding="utf-8") as handle:
            handle.write(json.dumps({"op": kind, **payload}) + "\n")


def _client(uri: str) -> Any:
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri=uri)


def _probe(uri: str, timeout: float = 3.0) -> None:
    """Fail fast when an HTTP tracking server does not accept connections (MLflow itself retries for minutes)."""
    parsed = urlparse(uri)
    if parsed.scheme in ("http", "https") and parsed.hostname:
        port = parsed.port or (443 if parsed.scheme == "https" else 80)
        with socket.create_connection((parsed.hostname, port), timeout=timeout):
            pass


def start_run(client: Any, uri: str, experiment: str, run_name: str) -> str:
    """Create (or reuse) the experiment and start a run in it; returns the run id."""
    found = client.get_experiment_by_name(experiment)
    if found is None:
        experiment_id = client.create_experiment(experiment, artifact_location=artifact_root(uri))
    else:
        experiment_id = found.experiment_id
    return client.create_run(experiment_id, run_name=run_name).info.run_id


def reopen_run(client: Any, run_id: str) -> str | None:
    """Mark an existing run RUNNING again (a resumed training run); None when this store does not have it.

    A run killed with ``kill -9`` never closed itself, so MLflow still shows it RUNNING (or FAILED after a
    clean interruption); resuming continues the same run: its metrics go on from the checkpoint's step and it
    ends FINISHED or FAILED like any other run.
    """
    try:
        client.get_run(run_id)
    except Exception:  # noqa: BLE001 - a different store, or the run was deleted: start a new one
        return None
    client.update_run(run_id, status="RUNNING")
    return run_id


def apply_op(client: Any, run_id: str | None, kind: str, payload: dict[str, Any]) -> None:
    """Send one operation to the store (used live and by ``sync``)."""
    from mlflow.entities import Metric, Param, RunTag

    if kind == "params":
        items = [Param(k, v) for k, v in payload.items()]
        for start in range(0, len(items), PARAMS_PER_BATCH):
            client.log_batch(run_id, params=items[start : start + PARAMS_PER_BATCH])
    elif kind == "tags":
        client.log_batch(run_id, tags=[RunTag(k, v) for k, v in payload.items()])
    elif kind == "metrics":
        batch = [Metric(k, v, payload["time"], payload["step"]) for k, v in payload["values"].items()]
        for start in range(0, len(batch), 1000):  # MLflow accepts up to 1,000 metrics per batch
            client.log_batch(run_id, metrics=batch[start : start + 1000])
    elif kind == "artifact":
        path = Path(payload["path"])
        if path.is_dir():
            client.log_artifacts(run_id, str(path), artifact_path=payload["artifact_path"] or path.name)
        elif path.is_file():
            client.log_artifact(run_id, str(path), artifact_path=payload["artifact_path"])
    elif kind == "end":
        client.set_terminated(run_id, status=payload["status"])


def sync(run_dir: str | Path, uri: str | None = None) -> tuple[str, int]:
    """Upload what a run queued while the tracking server was unreachable.

    Args:
        run_dir: The run directory holding ``tracking/pending.jsonl``.
        uri: Store to upload to; by default the one the run was meant for (MLFLOW_TRACKING_URI wins).

    Returns:
        The MLflow run id and the number of operations sent. The queue is renamed to ``synced.jsonl``.
    """
    pending = Path(run_dir) / "tracking" / "pending.jsonl"
    if not pending.is_file():
        raise FileNotFoundError(f"{pending}: nothing to sync (the run was tracked live, or this is not a run dir)")
    ops = [json.loads(line) for line in pending.read_text(encoding="utf-8").splitlines() if line.strip()]
    start = ops[0]
    target = os.environ.get("MLFLOW_TRACKING_URI") or uri or start["uri"]
    client = _client(target)
    run_id = start.get("run_id")
    if run_id is not None:
        try:
            client.get_run(run_id)
        except Exception:  # noqa: BLE001 - the run was never created on this store
            run_id = None
    if run_id is None:
        run_id = start_run(client, target, start["experiment"], start["run_name"])
    for op in ops[1:]:
        kind = op.pop("op")
        apply_op(client, run_id, kind, op)
    pending.rename(pending.with_name("synced.jsonl"))
    return run_id, len(ops) - 1


def annotate_run(uri: str, run_id: str, tags: dict[str, str], files: list[Path]) -> None:
    """Add tags and files to an existing (possibly finished) run, e.g. the audit entry of the command."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=uri)
    for key, value in tags.items():
        client.set_tag(run_id, key, value)
    for path in files:
        if Path(path).is_file():
            client.log_artifact(run_id, str(path), artifact_path="audit")


def ui_command(uri: str, host: str, port: int) -> list[str]:
    """The ``mlflow ui`` command line for a store, bound to ``host`` (127.0.0.1 by default)."""
    import sys

    command = [
        sys.executable,
        "-m",
        "mlflow",
        "ui",
        "--backend-store-uri",
        uri,
        "--host",
        host,
        "--port",
        str(port),
    ]
    root = artifact_root(uri)
    if root is not None:
        command += ["--default-artifact-root", root]
    return command
