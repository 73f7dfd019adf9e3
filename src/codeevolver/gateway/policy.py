"""Who a sandbox may reach: the host/port allowlist, the address check, name resolution.

Three rules, applied in this order to every proxied connection:

1. the name is a DNS name, never an IP literal (``10.0.0.1``, ``[::1]``, and the
   inet_aton spellings ``127.1``, ``2130706433``, ``0x7f.1``);
2. ``host:port`` matches an allowlist entry: ``host`` or ``*.suffix`` (subdomains
   only), port 443 unless the entry names one;
3. the gateway resolves the name itself and *every* address must be public: one
   loopback, private, link-local, multicast, reserved, unspecified or cloud
   metadata answer refuses the whole name. Only a checked address is dialed, so
   a second, different DNS answer (rebinding) is never used.
"""

from __future__ import annotations

import asyncio
import ipaddress
import re
import socket
import time
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass

from codeevolver.errors import ConfigError

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
Resolver = Callable[[str, int], Awaitable[Sequence[str]]]
"""``await resolver(host, port)`` -> the host's IP addresses as strings; raises OSError when unknown."""

PACKAGE_INDEX_HOSTS: tuple[str, ...] = ("pypi.org", "files.pythonhosted.org")
"""Add these to a session's ``allow`` for a setup phase that installs the user's requirements."""

DEFAULT_PORT = 443

METADATA_ADDRESSES: frozenset[IPAddress] = frozenset(
    ipaddress.ip_address(a)
    for a in (
        "169.254.169.254",  # AWS, GCP, Azure, OpenStack instance metadata
        "169.254.170.2",  # AWS ECS task metadata
        "169.254.169.123",  # AWS time sync
        "169.254.169.253",  # AWS DNS
        "100.100.100.200",  # Alibaba Cloud metadata
        "168.63.129.16",  # Azure wire server: a *public* address, so named here
        "192.0.0.192",  # Oracle Cloud metadata
        "fd00:ec2::254",  # AWS metadata over IPv6
        "fd00:ec2::23",  # AWS DNS over IPv6
    )
)

_NAT64 = ipaddress.ip_network("64:ff9b::/96")
_LABEL = re.compile(r"^(?!-)[a-z0-9_-]{1,63}(?<!-)$")
_NUMERIC_LABEL = re.compile(r"^(0x[0-9a-f]*|[0-9]+)$")


def normalize_host(host: str) -> str:
    """Lower-case, without a trailing dot, IDNA-encoded; ValueError if it is not a usable name."""
    host = host.strip().rstrip(".").lower()
    if host.startswith("[") and host.endswith("]"):
        return host[1:-1]  # an IPv6 literal: is_ip_literal refuses it next
    if not host.isascii():
        try:
            host = host.encode("idna").decode("ascii")
        except UnicodeError as exc:
            raise ValueError(f"not a valid host name: {host!r}") from exc
    if not host or len(host) > 253:
        raise ValueError(f"not a valid host name: {host!r}")
    if ":" in host:
        return host  # IPv6 literal without brackets
    if not all(_LABEL.match(label) for label in host.split(".")):
        raise ValueError(f"not a valid host name: {host!r}")
    return host


def is_ip_literal(host: str) -> bool:
    """True for any spelling of an address; a DNS name never ends in an all-numeric label."""
    host = host.strip("[]")
    try:
        ipaddress.ip_address(host.split("%", 1)[0])
        return True
    except ValueError:
        pass
    return bool(_NUMERIC_LABEL.match(host.rstrip(".").rsplit(".", 1)[-1].lower()))


def address_refusal(address: str | IPAddress) -> str | None:
    """Why a sandbox may not connect to ``address`` (None when it may): only global unicast passes."""
    ip = ipaddress.ip_address(address) if isinstance(address, str) else address
    if ip in METADATA_ADDRESSES:
        return f"cloud metadata address {ip}"
    if isinstance(ip, ipaddress.IPv6Address):
        embedded = ip.ipv4_mapped or ip.sixtofour
        if embedded is None and ip in _NAT64:
            embedded = ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF)
        if embedded is not None:
            inner = address_refusal(embedded)
            return f"{inner} (inside {ip})" if inner else None
    for attr, label in (
        ("is_unspecified", "unspecified"),
        ("is_loopback", "loopback"),
        ("is_link_local", "link-local"),
        ("is_multicast", "multicast"),
        ("is_private", "private"),
        ("is_reserved", "reserved"),
    ):
        if getattr(ip, attr):
            return f"{label} address {ip}"
    if not ip.is_global:
        return f"non-public address {ip}"
    return None


@dataclass(frozen=True)
class AllowRule:
    """``host`` exactly, or any subdomain of ``suffix`` when ``wildcard``; on one port."""

    host: str
    port: int
    wildcard: bool = False

    def matches(self, host: str, port: int) -> bool:
        if port != self.port:
            return False
        return host.endswith("." + self.host) if self.wildcard else host == self.host


def parse_rule(entry: str) -> AllowRule:
    """``example.com``, ``*.example.com``, ``example.com:8443``; ConfigError for anything else."""
    text = entry.strip().lower()
    host, port = text, DEFAULT_PORT
    if text.count(":") == 1:
        host, _, port_text = text.partition(":")
        if not port_text.isdigit() or not 0 < int(port_text) < 65536:
            raise ConfigError(f"allowlist entry {entry!r} has a bad port", "write HOST or HOST:PORT, port 1-65535")
        port = int(port_text)
    wildcard = host.startswith("*.")
    if wildcard:
        host = host[2:]
    try:
        host = normalize_host(host)
    except ValueError:
        raise ConfigError(
            f"allowlist entry {entry!r} is not a host name", "write example.com, *.example.com or example.com:8443"
        ) from None
    if is_ip_literal(host) or "*" in host:
        raise ConfigError(
            f"allowlist entry {entry!r} is not a host name",
            "name hosts, not addresses: the gateway refuses IP literals and private addresses",
        )
    return AllowRule(host, port, wildcard)


class Allowlist:
    """The hosts and ports one sandbox may reach through the proxy."""

    def __init__(self, entries: Iterable[str] = ()) -> None:
        self.rules = tuple(parse_rule(e) for e in entries)

    def allows(self, host: str, port: int) -> bool:
        return any(rule.matches(host, port) for rule in self.rules)

    def __repr__(self) -> str:
        return f"Allowlist({[('*.' if r.wildcard else '') + f'{r.host}:{r.port}' for r in self.rules]})"


class SystemResolver:
    """The host's resolver (getaddrinfo) with a short cache; answers are checked by the caller."""

    def __init__(self, ttl_s: float = 30.0, max_entries: int = 4096) -> None:
        self.ttl_s = ttl_s
        self.max_entries = max_entries
        self._cache: dict[str, tuple[float, list[str]]] = {}

    async def __call__(self, host: str, port: int) -> list[str]:
        now = time.monotonic()
        hit = self._cache.get(host)
        if hit and hit[0] > now:
            return hit[1]
        infos = await asyncio.get_running_loop().getaddrinfo(host, port, type=socket.SOCK_STREAM)
        addresses = list(dict.fromkeys(str(info[4][0]) for info in infos))
        if len(self._cache) >= self.max_entries:
            self._cache.clear()
        self._cache[host] = (now + self.ttl_s, addresses)
        return addresses


def static_resolver(table: Mapping[str, Sequence[str]]) -> Resolver:
    """A resolver answering from ``table`` only (tests, benchmarks, air-gapped setups)."""

    async def resolve(host: str, port: int) -> Sequence[str]:
        try:
            return list(table[host])
        except KeyError:
            raise OSError(f"unknown host {host}") from None

    return resolve
