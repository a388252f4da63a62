"""YAML written with a comment beside (or above) each value, for files people read and edit (``init``'s).

``yaml.safe_dump`` writes no comments; here a document is a list of ``Y`` nodes (a key, a value or a nested block,
and a note), and each scalar goes through ``yaml.safe_dump`` so quoting stays YAML's own. What it writes loads back
with ``yaml.safe_load`` as the same mapping.
"""

from __future__ import annotations

import textwrap
from dataclasses import dataclass
from typing import Any

import yaml

WIDTH = 118  # characters a line may take


@dataclass
class Y:
    """One YAML key: a scalar (written in flow style) or a nested block (a list of Y), with an end-of-line comment.

    ``key=None`` is a comment line of its own.
    """

    key: str | None
    value: Any = None
    note: str = ""


def emit(nodes: list[Y], indent: int = 0) -> list[str]:
    """The YAML lines for ``nodes``; scalars go through ``yaml.safe_dump`` so quoting is YAML's own.

    A comment that does not fit after its value within ``WIDTH`` goes above the key, wrapped.
    """
    pad, lines = " " * indent, []
    for node in nodes:
        if node.key is None:
            lines += comment(node.note, indent)
            continue
        block = isinstance(node.value, list) and node.value and isinstance(node.value[0], Y)
        line = f"{pad}{flow(node.key)}:" + ("" if block else f" {flow(node.value)}")
        sequence = isinstance(node.value, list) and not block and len(line) > WIDTH  # a long label set: one a line
        if sequence:
            line = f"{pad}{flow(node.key)}:"
        if node.note and len(line) + len(node.note) + 4 > WIDTH:
            lines += comment(node.note, indent)
        elif node.note:
            line += f"  # {node.note}"
        lines.append(line)
        if block:
            lines += emit(node.value, indent + 2)
        elif sequence:
            lines += [f"{pad}  - {flow(item)}" for item in node.value]
    return lines


def comment(text: str, indent: int) -> list[str]:
    """``text`` as comment lines at ``indent``, wrapped within ``WIDTH``."""
    return [f"{' ' * indent}# {part}" for part in textwrap.wrap(text, WIDTH - indent - 2, break_on_hyphens=False)]


def flow(value: Any) -> str:
    """One value in YAML's flow style, on one line."""
    text = yaml.safe_dump(value, default_flow_style=True, width=1 << 30, allow_unicode=True).strip()
    return text[: -len("...")].strip() if text.endswith("\n...") or text.endswith("...") else text


def document(nodes: list[Y], header: list[str] = ()) -> str:
    """The whole file: ``header`` as comment lines, then the nodes."""
    return "\n".join([*(c for line in header for c in comment(line, 0)), *emit(nodes)]) + "\n"
