"""Base-model licenses as data (``licenses.yaml``): what a derived model must carry, and the acknowledgment.

``train`` prints the obligations of the base's license; ``export`` prints them again and refuses until the
recipe says ``model.license_accepted: true``, then writes the attribution, the NOTICE text and a pointer to the
license into the export. The license comes from ``model.license`` or, when that is unset, from the base's own
files (the ``license:`` line of a Hugging Face README, or the title of its LICENSE file).

A light leaf module: it imports only yaml and the standard library.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass
from datetime import datetime, timezone
from functools import cache
from pathlib import Path
from typing import Any

import yaml

from pipeline.errors import UsageError

TABLE = Path(__file__).with_name("licenses.yaml")


class LicenseError(UsageError):
    """The license is unknown, not accepted, or the export's name breaks it (exit code 2)."""


@dataclass(frozen=True)
class License:
    """One row of licenses.yaml."""

    id: str
    name: str
    url: str
    aliases: tuple[str, ...]
    detect: tuple[str, ...]
    attribution: str | None
    name_prefix: str | None
    notice: str | None
    usage_policy: str | None
    obligations: tuple[str, ...]


@cache
def table() -> dict[str, License]:
    """Every license in licenses.yaml by id."""
    raw = yaml.safe_load(TABLE.read_text(encoding="utf-8"))
    return {
        key: License(
            id=key,
            name=entry["name"],
            url=entry["url"],
            aliases=tuple(entry.get("aliases") or ()),
            detect=tuple(entry.get("detect") or ()),
            attribution=entry.get("attribution"),
            name_prefix=entry.get("name_prefix"),
            notice=entry.get("notice"),
            usage_policy=entry.get("usage_policy"),
            obligations=tuple(entry["obligations"]),
        )
        for key, entry in raw.items()
    }


def lookup(name: str) -> License | None:
    """The license an id or alias names (case-insensitive), or None."""
    wanted = name.strip().lower()
    for lic in table().values():
        if wanted == lic.id or wanted in (a.lower() for a in lic.aliases):
            return lic
    return None


def detect(model_dir: str | Path) -> tuple[str | None, str | None]:
    """The license named by the base's own files: (license id or raw name, file it came from).

    Looks at the YAML front matter of README.md (``license:``, and ``license_name:`` when the license is
    ``other``, as Qwen's model cards do), then at the first 2,000 characters of LICENSE / LICENSE.txt /
    LICENSE.md against each license's ``detect`` patterns.
    """
    model_dir = Path(model_dir)
    readme = model_dir / "README.md"
    if readme.is_file():
        text = readme.read_text(encoding="utf-8", errors="replace")
        match = re.match(r"---\s*\n(.*?)\n---", text, re.S)
        if match:
            try:
                front = yaml.safe_load(match.group(1)) or {}
            except yaml.YAMLError:
                front = {}
            if isinstance(front, dict) and front.get("license"):
                name = str(front.get("license_name") or front["license"]) if front["license"] == "other" else None
                return str(name or front["license"]), str(readme)
    for filename in ("LICENSE", "LICENSE.txt", "LICENSE.md", "LICENCE"):
        path = model_dir / filename
        if path.is_file():
            head = path.read_text(encoding="utf-8", errors="replace")[:2000]
            for lic in table().values():
                if any(re.search(p, head, re.I | re.M) for p in lic.detect):
                    return lic.id, str(path)
    return None, None


def resolve(declared: str | None, model_dir: str | Path | None) -> tuple[License | None, str, str]:
    """The base's license: (table entry or None, the name as given, where it came from).

    ``model.license`` wins; otherwise the base's files are read. An unknown name returns None with that name.
    """
    if declared:
        return lookup(declared), declared, "model.license"
    if model_dir is not None:
        found, source = detect(model_dir)
        if found:
            return lookup(found), found, source or "base files"
    return None, "unknown", "nowhere (model.license is unset and the base's files name no license)"


def render_obligations(lic: License | None, name: str, source: str) -> str:
    """The obligations as terminal lines."""
    if lic is None:
        known = ", ".join(table())
        return (
            f"Base model license: {name} (from {source}), not in pipeline's license table ({known}). "
            "Read it yourself before distributing a derived model."
        )
    lines = [
        f"Base model license: {lic.name} ({lic.id}, from {source}), {lic.url}",
        "  Obligations when you use or share the fine-tune:",
    ]
    lines += [f"  - {item}" for item in lic.obligations]
    if lic.usage_policy:
        lines.append(f"  Use policy: {lic.usage_policy}")
    return "\n".join(lines)


def require_acceptance(accepted: bool, lic: License | None, name: str, source: str, recipe_source: str) -> None:
    """Raise LicenseError (with the obligations and the fix) unless the recipe accepted the license."""
    if accepted:
        return
    what = f"{lic.name} ({lic.url})" if lic else f"license '{name}'"
    raise LicenseError(
        f"{recipe_source}: model.license_accepted is false: export refuses until you accept the base model's "
        f"{what} and the obligations printed above. When you have read them, set model.license_accepted: true "
        "in the recipe (or pass --set model.license_accepted=true)."
    )


def _name_key(name: str) -> str:
    """A name with spaces and hyphens counted alike: 'Llama 3' and 'Llama-3' begin 'Llama-3-medcode' equally."""
    return re.sub(r"[\s-]+", "-", name.strip())


def derived_name(requested: str | None, default: str, lic: License | None) -> str:
    """The exported model's name, with the prefix the license requires.

    The prefix is compared with spaces and hyphens counted alike (the Llama 3 license's "Llama 3" is met by
    ``Llama-3-medcode``, the name this function derives itself), case-sensitively.

    Raises:
        LicenseError: ``export.model_name`` was set and does not begin with the required prefix.
    """
    prefix = lic.name_prefix if lic else None
    if not prefix:
        return requested or default
    hyphenated = _name_key(prefix)
    if requested:
        if not _name_key(requested).startswith(hyphenated):
            raise LicenseError(
                f"export.model_name: {requested!r} must begin with {prefix!r} under the {lic.name}; "
                f"use e.g. {hyphenated}-{requested}"
            )
        return requested
    return default if _name_key(default).startswith(hyphenated) else f"{hyphenated}-{default}"


def acknowledgment(lic: License | None, name: str, source: str, model_name: str) -> dict[str, Any]:
    """What was accepted, for the export report, MLflow and the audit log."""
    obligations = list(lic.obligations) if lic else []
    return {
        "license": lic.id if lic else name,
        "license_name": lic.name if lic else name,
        "license_url": lic.url if lic else None,
        "source": source,
        "accepted_by": "model.license_accepted: true",
        "obligations": obligations,
        "obligations_sha256": hashlib.sha256("\n".join(obligations).encode("utf-8")).hexdigest(),
        "attribution": lic.attribution if lic else None,
        "model_name": model_name,
        "accepted_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }


def notice_text(lic: License | None, name: str, base_model: str, copied: list[str]) -> str:
    """NOTICE file of an export: attribution, the license's notice, and where its full text is."""
    lines = [f"This model is a fine-tune of {base_model}.", ""]
    if lic is None:
        lines.append(f"Base model license: {name} (not in pipeline's license table; see the base's own files).")
    else:
        if lic.attribution:
            lines += [lic.attribution, ""]
        if lic.notice:
            lines += [lic.notice, ""]
        lines.append(f"License: {lic.name}, full text at {lic.url}")
        if lic.usage_policy:
            lines.append(f"Use policy: {lic.usage_policy}")
    if copied:
        lines.append(f"The base's license files are included here: {', '.join(copied)}")
    return "\n".join(lines) + "\n"
