"""The ICD-10-CM code table (from the ``simple-icd-10-cm`` package, which ships it: no network).

Shared by the data contract (codes in the data must be billable) and the medical-coding task (how many
predicted codes are not codes at all). The table is loaded on first use, not on import.
"""

from __future__ import annotations

from functools import cache
from typing import Any, Literal


@cache
def _table() -> Any:
    import simple_icd_10_cm as icd

    return icd


def status(code: str) -> Literal["billable", "not_billable", "invalid"]:
    """Classify a code (dotted form such as ``E11.9``): a billable leaf, a category above leaves, or not a code."""
    icd = _table()
    if not icd.is_valid_item(code):
        return "invalid"
    return "billable" if icd.is_leaf(code) else "not_billable"


def description(code: str) -> str:
    """The official description of a valid code."""
    return _table().get_description(code)


def billable_codes() -> list[str]:
    """Every billable code (a leaf of the table), in table order, dotted form."""
    icd = _table()
    return [c for c in icd.get_all_codes(with_dots=True) if icd.is_leaf(c)]
