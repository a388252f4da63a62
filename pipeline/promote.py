"""``promote``: point a registry alias (``champion`` by default) at a run's adapter version.

MLflow's registry replaced stages with aliases: every registered adapter version is made the ``candidate``
(``tracking.register_version``), and serving resolves ``models:/<name>@champion``. Promotion is refused, with the
reason, when the run did worse than its baseline or when its merged export failed verification: both are facts
the run recorded as tags (``eval.comparison.verdict``, ``export.verified``), so a run id is enough to check them.
"""

from __future__ import annotations

from typing import Any

from pipeline.errors import JobFailed, UsageError
from pipeline.tracking import client_for, probe_store


class PromotionRefused(JobFailed):
    """The run must not become the alias's version (exit 1): its verdict or its export says why."""


class NothingToPromote(UsageError):
    """The run has no registered version to point the alias at (exit 2)."""


def promote(uri: str, run_id: str, alias: str = "champion") -> dict[str, Any]:
    """Move ``alias`` to the run's newest registered adapter version; returns what was done, for the audit log.

    Raises:
        PromotionRefused: The run's verdict against its baseline is "worse", or its export failed verification.
        NothingToPromote: No registered version came from this run (tracking.register_adapter off, or queued).
        OSError: The store does not answer.
    """
    probe_store(uri)
    client = client_for(uri)
    tags = client.get_run(run_id).data.tags
    verdict = tags.get("eval.comparison.verdict")
    if verdict == "worse":
        raise PromotionRefused(
            f"run {run_id}: its verdict against the baseline is 'worse' (eval/metrics.json comparison); a model "
            "that loses to the baseline is not promoted"
        )
    if tags.get("export.verified") == "False":
        raise PromotionRefused(
            f"run {run_id}: its merged export failed verification (export/failed-verification/export_report.json); "
            "export it again (export --merge) and promote once it passes"
        )
    versions = client.search_model_versions(f"run_id = '{run_id}'")
    adapters = [v for v in versions if (v.tags or {}).get("kind") == "adapter"] or list(versions)
    if not adapters:
        raise NothingToPromote(
            f"run {run_id}: no registered model version came from it (tracking.register_adapter is off, or the "
            "registration is still queued: python -m pipeline sync RUN_DIR)"
        )
    version = max(adapters, key=lambda v: int(v.version))
    try:
        previous = client.get_model_version_by_alias(version.name, alias).version
    except Exception:  # noqa: BLE001 - mlflow raises its own type for an alias that points nowhere yet
        previous = None
    client.set_registered_model_alias(version.name, alias, str(version.version))
    return {
        "name": version.name,
        "version": str(version.version),
        "alias": alias,
        "previous_version": str(previous) if previous is not None else None,
        "verdict": verdict,
        "export_verified": tags.get("export.verified"),
        "run_id": run_id,
    }
