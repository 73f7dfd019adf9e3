"""Sandbox tiers, looked up by short name and imported lazily."""

from __future__ import annotations

import importlib

from codeevolver.errors import ConfigError
from codeevolver.sandbox.base import CommandResult, Sandbox, SandboxPolicy

TIERS: dict[str, str] = {
    "gvisor": "codeevolver.sandbox.gvisor:GvisorSandbox",
    "container": "codeevolver.sandbox.container:ContainerSandbox",
    "unsafe": "codeevolver.sandbox.unsafe:UnsafeSandbox",
    "bwrap": "codeevolver.sandbox.bwrap:BwrapSandbox",
}

__all__ = ["TIERS", "CommandResult", "Sandbox", "SandboxPolicy", "get_sandbox"]


def get_sandbox(name: str) -> Sandbox:
    """Return an instance of the tier called ``name``."""
    try:
        target = TIERS[name]
    except KeyError:
        raise ConfigError(
            f"unknown sandbox tier {name!r}",
            f"use one of: {', '.join(sorted(TIERS))}",
        ) from None
    module, _, attr = target.partition(":")
    return getattr(importlib.import_module(module), attr)()
