"""Finding a run named on the command line: its directory, or its MLflow run id in a store.

The one lookup behind ``evaluate --run RUN`` and ``export RUN``, and the ``runs`` listing (each run's main metric,
verdict and registry versions with their aliases). It sits above ``tracking``, which it reads.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from pipeline.egress import redact_secrets
from pipeline.errors import JobFailed, UsageError
from pipeline.tracking import client_for, download_run, probe_store, run_dir_of


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


# --------------------------------------------------------------------------------------------------
# `runs`: the tracked runs, newest first


def run_metrics_json(client: Any, run_id: str) -> dict[str, Any] | None:
    """The run's ``eval/metrics.json`` artifact (systems, per_label, and comparison/cost when present)."""
    import tempfile

    try:
        with tempfile.TemporaryDirectory() as tmp:
            path = client.download_artifacts(run_id, "eval/metrics.json", tmp)
            return json.loads(Path(path).read_text(encoding="utf-8"))
    except Exception:  # noqa: BLE001 - a run without evaluation (failed, or still running)
        return None


def list_runs(uri: str, experiment: str | None = None, limit: int = 20) -> list[dict[str, Any]]:
    """Runs of one experiment (or all), newest first: systems' main metric and the verdict vs the baseline.

    The verdict and main metric come from the run's ``eval/metrics.json`` (``comparison`` when a baseline was
    scored); the systems' values from the run's ``eval.<system>.<metric>`` metrics.
    """
    client = client_for(uri)
    if experiment is not None:
        found = client.get_experiment_by_name(experiment)
        ids = [found.experiment_id] if found else []
    else:
        ids = [e.experiment_id for e in client.search_experiments()]
    if not ids:
        return []
    rows = []
    for run in client.search_runs(ids, order_by=["attributes.start_time DESC"], max_results=limit):
        results = run_metrics_json(client, run.info.run_id) or {}
        main = results.get("main_metric") or run.data.tags.get("eval.main_metric") or "micro_f1"
        systems = {
            key.split(".")[1]: value
            for key, value in run.data.metrics.items()
            if key.startswith("eval.") and key.count(".") == 2 and key.endswith(f".{main}")
        }
        comparison = results.get("comparison") or {}
        rows.append(
            {
                "run_id": run.info.run_id,
                "run_name": run.info.run_name,
                "experiment_id": run.info.experiment_id,
                "status": run.info.status,
                "start_time": run.info.start_time,
                "main_metric": main,
                "systems": systems,
                "verdict": comparison.get("verdict"),
                "baseline_skipped": (results.get("baseline") or {}).get("reason")
                if (results.get("baseline") or {}).get("status") == "skipped"
                else None,
                "difference": comparison.get("difference"),
                "ci95": comparison.get("ci95"),
                "base_model": run.data.tags.get("base_model"),
                "registry": registry_versions(client, run.info.run_id),
            }
        )
    return rows


def registry_versions(client: Any, run_id: str) -> list[str]:
    """The run's registry versions with their aliases: ``["tiny v3 @candidate,champion"]``."""
    try:
        versions = client.search_model_versions(f"run_id = '{run_id}'")
    except Exception:  # noqa: BLE001 - a store without a registry still lists its runs
        return []
    out = []
    for v in sorted(versions, key=lambda v: (v.name, int(v.version))):
        # A search result leaves aliases out (MLflow 3.17, SQL and REST stores); the version itself has them.
        aliases = ",".join(sorted(client.get_model_version(v.name, v.version).aliases or []))
        out.append(f"{v.name} v{v.version}" + (f" @{aliases}" if aliases else ""))
    return out


def render_runs(rows: list[dict[str, Any]]) -> str:
    """The ``runs`` table for the terminal."""
    if not rows:
        return "No runs found."
    from datetime import datetime

    systems = list(dict.fromkeys(s for row in rows for s in row["systems"]))
    header = ["run id", "name", "status", "started", "metric", *systems, "vs baseline", "registry"]
    table = [header]
    for row in rows:
        started = (
            datetime.fromtimestamp(row["start_time"] / 1000).strftime("%Y-%m-%d %H:%M") if row["start_time"] else "-"
        )
        verdict = row["verdict"] or (
            f"skipped: {row['baseline_skipped']}" if row.get("baseline_skipped") else "no baseline"
        )
        if row["verdict"] and row["difference"] is not None:
            verdict = f"{row['verdict']} ({row['difference']:+.3f})"
        values = [f"{row['systems'][s]:.3f}" if s in row["systems"] else "-" for s in systems]
        table.append(
            [
                row["run_id"][:12],
                row["run_name"] or "-",
                row["status"],
                started,
                row["main_metric"],
                *values,
                verdict,
                "; ".join(row.get("registry") or []) or "-",
            ]  # fmt: skip
        )
    widths = [max(len(str(r[i])) for r in table) for i in range(len(header))]
    return "\n".join("  ".join(str(cell).ljust(w) for cell, w in zip(r, widths, strict=True)).rstrip() for r in table)
