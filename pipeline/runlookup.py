"""Finding a run named on the command line: its directory, or its MLflow run id in a store.

The one lookup behind ``evaluate --run RUN`` and ``export RUN`` (it sits above ``tracking``, which it reads).
"""

from __future__ import annotations

import json
from pathlib import Path

from pipeline.egress import redact_secrets
from pipeline.errors import JobFailed, UsageError
from pipeline.tracking import download_run, probe_store, run_dir_of


class RunNotFound(UsageError):
    """A run named on the command line is neither a run directory nor an MLflow run this machine can use (exit 2)."""


def resolve_run(run: str, uri: str, *, flag: str = "", download_to: Path | None = None) -> tuple[Path, str | None]:
    """(run directory, MLflow run id) for a run named by its directory or by its MLflow run id in ``uri``.

    The one lookup behind ``evaluate --run RUN`` and ``export RUN``. A run id is looked up in the store: its
    ``run_dir`` tag is used when that directory is on this machine; otherwise, with ``download_to``, the run's
    artifacts (adapter, resolved recipe, validation, eval, summary) are downloaded into ``download_to/<run id>``
    (export of a run trained elsewhere), and without it the run is refused (evaluate writes into the run directory).

    Args:
        run: A run directory (``runs/<name>/<id>/``) or an MLflow run id (32 hex digits).
        uri: The store to look a run id up in (``tracking_uri(...)``).
        flag: How the command line named the run (``"--run "``), to prefix the messages.
        download_to: Where to fetch a run whose directory is not on this machine; None refuses such a run.

    Raises:
        RunNotFound: Not a run directory, not a run id, not in the store, or (without ``download_to``) not here.
        egress.EgressBlocked: The store's host is not allowed (exit 1; the message names privacy.allowed_hosts).
        StoreUnreachable: The store does not answer (exit 1), said at once rather than after MLflow's retries.
    """
    import re

    path = Path(run)
    if path.is_dir():
        if not (path / "recipe.resolved.yaml").is_file():
            raise RunNotFound(f"{flag}{path}: not a run directory (no recipe.resolved.yaml); pass runs/<name>/<id>/")
        summary = path / "summary.json"
        run_id = json.loads(summary.read_text(encoding="utf-8")).get("mlflow_run_id") if summary.is_file() else None
        return path, run_id
    if not re.fullmatch(r"[0-9a-f]{32}", run):
        raise RunNotFound(
            f"{flag}{run}: no such run directory, and not an MLflow run id (32 hex digits); pass the directory a "
            "`train` printed (runs/<name>/<run-id>) or its MLflow run id"
        )
    try:
        probe_store(uri)
    except OSError as exc:
        if isinstance(exc, JobFailed):  # the egress guard's refusal, which names the allow-list
            raise
        raise StoreUnreachable(f"the tracking store {redact_secrets(uri)} does not answer: {exc}") from exc
    try:
        found = run_dir_of(uri, run)
    except LookupError:
        raise RunNotFound(
            f"{flag}{run}: no MLflow run {run} in {redact_secrets(uri)}; pass runs/<name>/<id>/ or a run id of "
            "that store (check tracking.uri, --tracking-uri or MLFLOW_TRACKING_URI)"
        ) from None
    if found and (Path(found) / "recipe.resolved.yaml").is_file():
        return Path(found), run
    if download_to is None:
        raise RunNotFound(
            f"{flag}{run}: the MLflow run's directory {found!r} is not on this machine; pass the directory"
        )
    return download_run(uri, run, Path(download_to) / run), run


class StoreUnreachable(JobFailed):
    """The MLflow store a command must read from does not answer (exit 1)."""
