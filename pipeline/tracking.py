"""MLflow tracking: the only module that imports mlflow.

One MLflow run per ``train``. The default store is a SQLite file in the working directory
(``sqlite:///mlruns.db``) with artifacts in ``mlartifacts/`` beside it; ``MLFLOW_TRACKING_URI`` in the
environment, then ``tracking.uri`` in the recipe, choose another. Params are the resolved recipe flattened
to dotted keys and sent in batches within MLflow's limits, so a long value or many keys never crash a run.
"""

from __future__ import annotations

import os
from pathlib import Path

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
    """An open MLflow run (or nothing at all when tracking is disabled).

    Uses an explicit ``MlflowClient`` bound to one store rather than mlflow's global "active run" state, so
    several runs against different stores in one process (notebooks, tests) never mix.
    """

    def __init__(self, recipe: Recipe, run_name: str):
        self.enabled = recipe.tracking.enabled
        self.run_id: str | None = None
        self.uri = tracking_uri(recipe)
        if not self.enabled:
            return
        from mlflow.tracking import MlflowClient

        self._client = MlflowClient(tracking_uri=self.uri)
        name = recipe.tracking.experiment or recipe.name
        experiment = self._client.get_experiment_by_name(name)
        if experiment is None:
            experiment_id = self._client.create_experiment(name, artifact_location=artifact_root(self.uri))
        else:
            experiment_id = experiment.experiment_id
        self.run_id = self._client.create_run(experiment_id, run_name=run_name).info.run_id

    def log_params(self, params: dict[str, str]) -> None:
        """Log params in batches of at most 100."""
        if not self.enabled:
            return
        from mlflow.entities import Param

        items = [Param(k, v) for k, v in params.items()]
        for start in range(0, len(items), PARAMS_PER_BATCH):
            self._client.log_batch(self.run_id, params=items[start : start + PARAMS_PER_BATCH])

    def set_tags(self, tags: dict[str, str]) -> None:
        """Tags on the run (pipeline version, base model, task...)."""
        if not self.enabled:
            return
        from mlflow.entities import RunTag

        safe = [RunTag(k, redact_secrets(str(v))[:MAX_PARAM_VALUE]) for k, v in tags.items()]
        self._client.log_batch(self.run_id, tags=safe)

    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
        """Numeric metrics; non-numeric values are skipped."""
        if not self.enabled:
            return
        import time

        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        batch = [
            Metric(k, float(v), now, step or 0)
            for k, v in metrics.items()
            if isinstance(v, (int, float)) and not isinstance(v, bool)
        ]
        for start in range(0, len(batch), 1000):  # MLflow accepts up to 1,000 metrics per batch
            self._client.log_batch(self.run_id, metrics=batch[start : start + 1000])

    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None:
        """Copy a file or a whole directory into the run's artifacts."""
        if not self.enabled:
            return
        path = Path(path)
        if path.is_dir():
            self._client.log_artifacts(self.run_id, str(path), artifact_path=artifact_path or path.name)
        elif path.is_file():
            self._client.log_artifact(self.run_id, str(path), artifact_path=artifact_path)

    def end(self, status: str = "FINISHED") -> None:
        """Close the run as FINISHED, FAILED or KILLED."""
        if self.enabled and self.run_id is not None:
            self._client.set_terminated(self.run_id, status=status)


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
