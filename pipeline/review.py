"""What a reviewer reads first on a run's MLflow page: its description (the ``mlflow.note.content`` tag).

A few Markdown lines from the run's ``eval/metrics.json``: each system's main metric, the verdict against the
baseline (or why there was none), the judge's win rate, cost per 1,000 cases, and where the adapter is. Leaf
module: it formats a dict and imports nothing from the pipeline.
"""

from __future__ import annotations

from typing import Any

NOTE_TAG = "mlflow.note.content"


def run_note(document: dict[str, Any], adapter: str | None, registered: dict[str, Any] | None = None) -> str:
    """The run's description.

    Args:
        document: The run's ``eval/metrics.json`` (``{}`` when it was not evaluated).
        adapter: Where the adapter is (the run's ``adapter/`` directory), or None.
        registered: ``{"name", "version"}`` of the adapter's registry version, or None.
    """
    main = document.get("main_metric")
    systems = document.get("systems") or {}
    lines = []
    if main and systems:
        scores = ", ".join(f"{s} {v[main]:.3f}" for s, v in systems.items() if isinstance(v.get(main), (int, float)))
        lines.append(f"**{main}**: {scores}")
    else:
        lines.append("Not evaluated.")
    comparison, baseline = document.get("comparison"), document.get("baseline") or {}
    if comparison:
        low, high = comparison["ci95"]
        lines.append(
            f"**Against the baseline**: {comparison['verdict']} ({comparison['metric']} difference "
            f"{comparison['difference']:+.3f}, 95% CI {low:+.3f} to {high:+.3f})"
        )
    elif baseline.get("status") == "skipped":
        lines.append(f"**Against the baseline**: skipped ({baseline.get('reason', 'no reason recorded')})")
    else:
        lines.append("**Against the baseline**: no baseline in the recipe")
    judge = document.get("judge") or {}
    if judge.get("status") == "ok":
        for pair in judge.get("pairs") or []:
            if pair.get("win_rate") is not None:
                lines.append(
                    f"**Judge** ({judge.get('model')}): {pair['a']} vs {pair['b']} win rate {pair['win_rate']:.3f}, "
                    f"{pair['verdict']}"
                )
    elif judge:
        lines.append(f"**Judge**: skipped ({judge.get('reason', 'no reason recorded')})")
    costs = _costs(document) or "not priced (the recipe's cost.gpu_price_per_hour and baseline prices are unset)"
    lines.append(f"**Cost per 1,000 cases**: {costs}")
    where = f"`{adapter}`" if adapter else "not saved"
    if registered and registered.get("version"):
        where += f"; registry {registered['name']} version {registered['version']}"
    lines.append(f"**Adapter**: {where}")
    return "\n\n".join(lines)


def _costs(document: dict[str, Any]) -> str:
    cost = document.get("cost") or {}
    parts = []
    for side, label in (("self_hosted", "self-hosted fine-tune"), ("api", "baseline API")):
        value = (cost.get(side) or {}).get("cost_per_1000_cases")
        if isinstance(value, (int, float)):
            parts.append(f"{label} ${value:.4f}")
    if not parts:
        for system, values in (document.get("systems") or {}).items():
            value = values.get("cost_per_1000_examples")
            if isinstance(value, (int, float)):
                parts.append(f"{system} ${value:.4f}")
    return ", ".join(parts)
