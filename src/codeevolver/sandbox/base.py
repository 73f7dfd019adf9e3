"""The Sandbox interface: every execution of user or AI-written code goes through it.

Contract for implementations:

- ``run`` executes ``argv`` with ``policy.workdir`` as the working directory and
  *exactly* ``policy.env`` as the environment (plus nothing secret, ever).
- Only ``policy.workdir`` (and ``policy.writable_paths``) may be written;
  ``policy.readonly_paths`` are made visible read-only where the tier hides the host.
- On timeout the whole process tree is killed, ``timed_out`` is True and
  ``returncode`` is 124.
- ``run`` never raises for a failing command (that is a ``CommandResult`` with a
  non-zero ``returncode``); it raises :class:`~codeevolver.errors.SandboxError`
  only when the tier itself cannot start.
- ``run`` is synchronous and thread-safe: callers run several at once from threads.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol


@dataclass(frozen=True)
class SandboxPolicy:
    """What one sandboxed command may see and use."""

    workdir: Path
    env: Mapping[str, str] = field(default_factory=dict)
    readonly_paths: tuple[Path, ...] = ()
    writable_paths: tuple[Path, ...] = ()
    timeout_s: float | None = None
    memory_mb: int | None = None
    pids: int | None = None
    cpu_percent: int | None = None
    """CPU quota in percent of one core (200 = two cores); None = no cap."""
    tmp_mb: int = 256
    """Size cap of the private /tmp."""
    gateway_socket: Path | None = None
    """Host unix socket of the egress gateway: the sandbox's only way out. The tier makes it
    reachable at ``127.0.0.1:proxy_port`` inside and sets HTTP_PROXY/HTTPS_PROXY to it.
    None means no network at all."""
    proxy_port: int = 3128
    allow_domains: tuple[str, ...] = ()


@dataclass
class CommandResult:
    returncode: int
    stdout: str
    stderr: str
    timed_out: bool = False
    duration_s: float = 0.0


class Sandbox(Protocol):
    """Runs one command under a :class:`SandboxPolicy`."""

    name: str
    isolated: bool
    """False only for the ``unsafe`` tier: the CLI refuses it without an explicit opt-in."""

    def run(self, argv: Sequence[str], policy: SandboxPolicy, stdin: bytes | None = None) -> CommandResult: ...
