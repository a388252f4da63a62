"""Egress: keep every library offline and quiet, and refuse network egress the recipe does not allow.

``cli.main`` calls ``offline_environment()`` and ``install_egress_guard()`` before anything else, so no
library can reach the network behind the user's back. ``redact_secrets`` keeps credentials out of logs.
This module stays a leaf (standard library only). PII/PHI detection is in ``pii``.
"""

from __future__ import annotations

import ipaddress
import os
import re
import socket
import sys
from dataclasses import dataclass, field

from pipeline.errors import JobFailed

# Each variable switches off a network call a library would otherwise make on its own.
OFFLINE_ENVIRONMENT = {
    "HF_HUB_OFFLINE": "1",  # huggingface_hub: never resolve or download from the Hub
    "TRANSFORMERS_OFFLINE": "1",  # transformers (older spelling, still honoured)
    "HF_DATASETS_OFFLINE": "1",  # datasets
    "HF_HUB_DISABLE_TELEMETRY": "1",  # no usage pings
    "HF_HUB_DISABLE_IMPLICIT_TOKEN": "1",  # never attach a stored token to a request
    "DO_NOT_TRACK": "1",  # the cross-tool convention (read by huggingface_hub, mlflow and others)
    "MLFLOW_DISABLE_TELEMETRY": "true",  # mlflow 3 usage telemetry
    "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR": "false",  # keep logs readable
    "TOKENIZERS_PARALLELISM": "false",  # avoid the fork warning; we tokenize in one process
    "TLDEXTRACT_PUBLIC_SUFFIX_LIST_URLS": "",  # tldextract (used by PII detectors) must not fetch its list
}


class EgressBlocked(JobFailed, ConnectionRefusedError):
    """An outbound connection was refused by the egress guard before any packet left the machine."""


@dataclass
class EgressGuard:
    """Decides whether this process may open a network connection to a destination.

    Loopback (127.0.0.0/8, ::1, ``localhost``) is always allowed unless ``allow_loopback`` is False (tests
    use that to check refusals without ever addressing another machine). Anything else must be on
    ``privacy.allowed_hosts``: a host name, an IP address or a network in CIDR form. Every decision is kept
    in ``decisions`` (per destination, with a count) for the audit trail.
    """

    allowed_hosts: tuple[str, ...] = ()
    allow_loopback: bool = True
    decisions: dict[str, dict[str, object]] = field(default_factory=dict)
    _resolved_for: tuple[str, ...] = field(default=(), repr=False)
    _addresses: dict[str, set[str]] = field(default_factory=dict, repr=False)

    def decide(self, host: str, resolve: bool = True) -> tuple[bool, str]:
        """(allowed, reason) for a destination host name or address.

        ``resolve=False`` decides from the list alone, without looking up the listed names (for checking a
        recipe's hosts ahead of time, which must send nothing, not even a DNS query).
        """
        host = host.strip("[]").lower()
        if self.allow_loopback and _is_loopback(host):
            return True, "loopback"
        for entry in self.allowed_hosts:
            entry = entry.lower()
            if host == entry:
                return True, f"privacy.allowed_hosts: {entry}"
            if "/" in entry and _in_network(host, entry):
                return True, f"privacy.allowed_hosts: {entry}"
        # Libraries resolve a name first and then connect to the address: an address that an allowed name
        # resolves to is allowed too (names are resolved once, when first needed).
        for entry, addresses in (self._resolved() if resolve else {}).items():
            if host in addresses:
                return True, f"privacy.allowed_hosts: {entry} ({host})"
        return False, "not loopback and not on privacy.allowed_hosts"

    def _resolved(self) -> dict[str, set[str]]:
        names = [e for e in self.allowed_hosts if "/" not in e and not _is_ip(e)]
        if self._resolved_for != tuple(names):
            self._resolved_for, self._addresses = tuple(names), {}
            for name in names:
                try:
                    infos = socket.getaddrinfo(name, None)  # allowed by decide(): the name is on the list
                except OSError:
                    continue
                self._addresses[name] = {info[4][0] for info in infos}
        return self._addresses

    def check(self, event: str, host: str, port: object = None) -> None:
        """Record the decision for a connection attempt; raise ``EgressBlocked`` when it is refused."""
        allowed, reason = self.decide(host)
        # One record per destination with a count: a week-long run against a loopback server makes
        # millions of connections, and the audit entry needs the destinations, not each attempt.
        record = self.decisions.setdefault(
            f"{host}:{port}", {"event": event, "allowed": allowed, "reason": reason, "count": 0}
        )
        record["count"] += 1
        if not allowed:
            destination = f"{host}:{port}" if port not in (None, 0) else host
            raise EgressBlocked(
                f"egress guard: refused outbound connection to {destination} ({reason}). pipeline sends nothing "
                f"off this machine unless the recipe allows it: add {host!r} to privacy.allowed_hosts if this "
                "destination is intended."
            )

    def audit_hook(self, event: str, args: tuple) -> None:
        """``sys.addaudithook`` callback: look at name lookups and connections before they happen."""
        if event == "socket.getaddrinfo":
            host = args[0]
            if isinstance(host, bytes):
                host = host.decode("ascii", "replace")
            if host:  # None / "" means the local machine
                self.check(event, str(host), args[1])
        elif event in ("socket.connect", "socket.sendto", "socket.sendmsg"):
            address = args[1]
            if isinstance(address, tuple) and address and isinstance(address[0], str):  # AF_INET / AF_INET6
                self.check(event, address[0], address[1] if len(address) > 1 else None)


_GUARD: EgressGuard | None = None


def refused_destinations(destinations: list[tuple[str, str]], allowed_hosts: tuple[str, ...] | list[str]) -> list[str]:
    """``(recipe key, URL)`` pairs whose host the guard would refuse, each as a line saying how to allow it.

    ``validate`` and ``plan`` call it so that a tracking server or endpoint the recipe cannot reach is said before
    a run starts, not when ``train`` goes offline. Decided from the list alone: nothing is looked up.
    """
    from urllib.parse import urlparse

    guard = EgressGuard(tuple(allowed_hosts))
    lines = []
    for key, url in destinations:
        host = urlparse(url).hostname if "://" in url else None
        if host and not guard.decide(host, resolve=False)[0]:
            lines.append(
                f"{key}: {host} is not loopback and not on privacy.allowed_hosts, so the egress guard will refuse "
                f"it; to allow it add to the recipe: privacy: {{allowed_hosts: [{host}]}}"
            )
    return lines


def install_egress_guard(allowed_hosts: tuple[str, ...] | list[str] | None = None) -> EgressGuard:
    """Guard every outbound connection of this process from now on (idempotent).

    ``allowed_hosts`` replaces the allow-list (an empty one means loopback only); None leaves it as it is.

    Python audit hooks cannot be removed, so one guard is installed per process and later calls update its
    allow-list (``cli.main`` installs it with loopback only, then adds the recipe's hosts once it is loaded).
    """
    global _GUARD
    if _GUARD is None:
        _GUARD = EgressGuard(tuple(allowed_hosts or ()))
        sys.addaudithook(_GUARD.audit_hook)
    elif allowed_hosts is not None:
        _GUARD.allowed_hosts = tuple(allowed_hosts)
    return _GUARD


def update_allowed_hosts(allowed_hosts: tuple[str, ...] | list[str]) -> EgressGuard | None:
    """Replace the allow-list of the guard this process runs under, if any (a library call installs none)."""
    if _GUARD is not None:
        _GUARD.allowed_hosts = tuple(allowed_hosts)
    return _GUARD


def _is_loopback(host: str) -> bool:
    if host in ("localhost", "localhost.localdomain", "ip6-localhost"):
        return True
    try:
        return ipaddress.ip_address(host.split("%", 1)[0]).is_loopback
    except ValueError:
        return False


def _is_ip(text: str) -> bool:
    try:
        ipaddress.ip_address(text)
        return True
    except ValueError:
        return False


def _in_network(host: str, network: str) -> bool:
    try:
        return ipaddress.ip_address(host) in ipaddress.ip_network(network, strict=False)
    except ValueError:
        return False


_URL_PASSWORD = re.compile(r"(?P<scheme>[A-Za-z][A-Za-z0-9+.-]*://)(?P<user>[^:/@\s]*):(?P<password>[^@/\s]+)@")
_SECRET_QUERY = re.compile(r"(?i)(?P<key>[?&](?:token|access_token|api_key|apikey|key|password|secret|sig)=)[^&\s]+")


def redact_secrets(text: str) -> str:
    """Remove credentials from text bound for logs, params or tags.

    ``https://user:pw@host/x?token=abc`` -> ``https://user:***@host/x?token=***``.
    """
    text = _URL_PASSWORD.sub(lambda m: f"{m['scheme']}{m['user']}:***@", text)
    return _SECRET_QUERY.sub(lambda m: f"{m['key']}***", text)


def offline_environment() -> dict[str, str]:
    """Force the offline and no-telemetry variables, whatever the shell had, and return them.

    No recipe setting allows Hub access, so a stray ``HF_HUB_OFFLINE=0`` in a user's shell must not turn
    it on.
    """
    os.environ.update(OFFLINE_ENVIRONMENT)
    return dict(OFFLINE_ENVIRONMENT)
