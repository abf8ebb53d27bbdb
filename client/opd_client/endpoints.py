"""Several teacher replicas behind one client: round-robin, and failover away from a replica that fails.

A client is given one URL, several (a list, or one string with commas), or one DNS name that resolves to
several addresses (a Kubernetes headless Service). Requests go round-robin over the replicas; a replica that
refused or failed a request (unreachable, draining, overloaded) sits out for a cooldown, and the request is
retried on the next one at once. Names are resolved again every `refresh_s`, so replicas that come and go
behind a headless Service are picked up.
"""

from __future__ import annotations

import ipaddress
import socket
import threading
import time
from collections.abc import Sequence
from urllib.parse import urlsplit, urlunsplit

DEFAULT_COOLDOWN_S = 2.0
DEFAULT_REFRESH_S = 30.0


def split_urls(urls: str | Sequence[str]) -> list[str]:
    """["http://a:8000", "http://b:8000"] from a list or a comma-separated string; no trailing slashes."""
    items = urls.split(",") if isinstance(urls, str) else list(urls)
    out = [u.strip().rstrip("/") for u in items if u.strip()]
    if not out:
        raise ValueError("no teacher URL given")
    for url in out:
        parts = urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError(f"teacher URL {url!r} must look like http://HOST:PORT")
    return out


class Endpoints:
    """Thread-safe rotation over replica base URLs with per-replica cooldowns."""

    def __init__(
        self,
        urls: str | Sequence[str],
        resolve: bool = True,
        cooldown_s: float = DEFAULT_COOLDOWN_S,
        refresh_s: float = DEFAULT_REFRESH_S,
        first: int = 0,
    ) -> None:
        """first: where the rotation starts (a trainer rank passes its rank, so N ranks begin on N
        different replicas instead of all on the first)."""
        self.configured = split_urls(urls)
        self.resolve = resolve
        self.cooldown_s = cooldown_s
        self.refresh_s = refresh_s
        self._lock = threading.Lock()
        self._down_until: dict[str, float] = {}
        self._next = first
        self._replicas: list[str] = []
        self._resolved_at = -float("inf")

    @property
    def label(self) -> str:
        """How to name the teacher in messages: the URLs the user gave."""
        return ", ".join(self.configured)

    def replicas(self) -> list[str]:
        with self._lock:
            self._refresh()
            return list(self._replicas)

    def pick(self) -> str:
        """The next replica in turn that is not cooling down (if all are, the one that recovers first)."""
        with self._lock:
            self._refresh()
            now = time.monotonic()
            n = len(self._replicas)
            for step in range(n):
                url = self._replicas[(self._next + step) % n]  # _next may exceed n (first)
                if self._down_until.get(url, 0.0) <= now:
                    self._next = (self._next + step + 1) % n
                    return url
            return min(self._replicas, key=lambda u: self._down_until.get(u, 0.0))

    def mark_down(self, url: str, seconds: float | None = None) -> None:
        with self._lock:
            self._down_until[url] = time.monotonic() + (self.cooldown_s if seconds is None else seconds)

    def mark_up(self, url: str) -> None:
        with self._lock:
            self._down_until.pop(url, None)

    def any_available(self, besides: str) -> bool:
        """Whether another replica than `besides` could take a request right now."""
        with self._lock:
            now = time.monotonic()
            return any(u != besides and self._down_until.get(u, 0.0) <= now for u in self._replicas)

    def _refresh(self) -> None:
        now = time.monotonic()
        if self._replicas and now - self._resolved_at < self.refresh_s:
            return
        replicas: list[str] = []
        for url in self.configured:
            for expanded in _expand(url) if self.resolve else [url]:
                if expanded not in replicas:
                    replicas.append(expanded)
        self._replicas, self._resolved_at = replicas, now


def _expand(url: str) -> list[str]:
    """One URL per address a plain-HTTP host name resolves to; IPs, https and unresolvable names as given.

    https keeps the name, since certificates are issued for names; resolution failures keep the URL, so
    the request itself reports the problem with the name the user wrote.
    """
    parts = urlsplit(url)
    host = parts.hostname or ""
    if parts.scheme != "http" or _is_ip(host):
        return [url]
    port = parts.port or 80
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except OSError:
        return [url]
    by_family: dict[int, list[str]] = {}
    for family, *_, sockaddr in infos:
        # An IP family's sockaddr starts with the address string (typeshed's str | int covers AF_CAN etc.).
        literal = f"[{sockaddr[0]}]" if family == socket.AF_INET6 else str(sockaddr[0])
        if literal not in by_family.setdefault(family, []):
            by_family[family].append(literal)
    # Several addresses of one family are replicas (a headless Service); one IPv4 plus one IPv6 address is
    # one host reachable two ways (localhost), which stays a name.
    addresses = max(by_family.values(), key=len)
    if len(addresses) <= 1:
        return [url]
    return [
        urlunsplit((parts.scheme, f"{a}:{port}", parts.path, parts.query, parts.fragment)) for a in addresses
    ]


def _is_ip(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


def grpc_target(targets: str | Sequence[str]) -> tuple[str, list[tuple[str, object]]]:
    """A gRPC channel target and options that spread calls over several replicas (round_robin).

    One "host:port": `dns:///host:port`, which gRPC resolves to every address (a headless Service) and
    re-resolves as replicas change. Several: gRPC's `ipv4:`/`ipv6:` address list, names resolved here.
    """
    items = targets.split(",") if isinstance(targets, str) else list(targets)
    items = [t.strip() for t in items if t.strip()]
    if not items:
        raise ValueError("no teacher gRPC target given")
    options: list[tuple[str, object]] = [("grpc.lb_policy_name", "round_robin")]
    if len(items) == 1:
        target = items[0]
        if "://" in target or target.startswith(("unix:", "ipv4:", "ipv6:", "dns:")):
            return target, options
        return f"dns:///{target}", options
    v4, v6 = [], []
    for item in items:
        host, _, port = item.rpartition(":")
        host = host.strip("[]")
        for family, *_, sockaddr in socket.getaddrinfo(host, int(port), type=socket.SOCK_STREAM):
            if family == socket.AF_INET6:
                v6.append(f"[{sockaddr[0]}]:{port}")
            else:
                v4.append(f"{sockaddr[0]}:{port}")
    if v4 and v6:
        raise ValueError(f"gRPC targets {items} mix IPv4 and IPv6 addresses; give one family")
    return ("ipv4:" + ",".join(dict.fromkeys(v4))) if v4 else ("ipv6:" + ",".join(dict.fromkeys(v6))), options
