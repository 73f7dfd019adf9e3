"""``codeevolver doctor``: which sandbox tiers work on this machine, why not, and the fix.

Each tier module answers for itself through ``available() -> (ok, reason)``, where a
reason may end in ``; fix: ...``; this module only gathers the answers (in parallel:
the gvisor probe and ``docker info`` each take a moment) and splits off the fixes.
"""

from __future__ import annotations

import importlib
import importlib.util
import os
import shutil
import subprocess
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from codeevolver.sandbox import TIERS

ORDER = ("bwrap", "gvisor", "container", "modal", "unsafe")
DEFAULT_FIXES = {
    "bwrap": "apt-get install bubblewrap",
    "gvisor": "apt-get install runsc",
    "container": "install Docker or Podman (apt-get install podman)",
    "modal": "pip install modal && modal token new",
}
PROBE_TIMEOUT_S = 60.0


@dataclass(frozen=True)
class TierReport:
    """One tier's verdict, as ``doctor`` prints it (and ``--json`` dumps it)."""

    name: str
    available: bool
    reason: str
    fix: str | None

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def diagnose() -> list[TierReport]:
    """Every known tier, in order of preference, each checked for real on this machine."""
    names = list(ORDER) + sorted(set(TIERS) - set(ORDER))
    with ThreadPoolExecutor(max_workers=len(names)) as pool:
        return list(pool.map(_report, names))


def _report(name: str) -> TierReport:
    try:
        ok, reason = _checker(name)()
    except Exception as exc:  # a broken check must not hide the other tiers
        ok, reason = False, f"the availability check failed: {exc!r}"
    text, fix = split_fix(reason)
    if not ok and fix is None:
        fix = DEFAULT_FIXES.get(name)
    return TierReport(name, ok, text, None if ok else fix)


def split_fix(reason: str) -> tuple[str, str | None]:
    """``"why; fix: how"`` (or a SandboxError's ``"why\\n  fix: how"``) into its two parts."""
    for marker in ("; fix: ", "\n  fix: "):
        if marker in reason:
            text, _, fix = reason.partition(marker)
            return text.strip(), fix.strip()
    return reason.strip(), None


def _checker(name: str) -> Callable[[], tuple[bool, str]]:
    special = {"unsafe": _unsafe, "modal": _modal}
    if name in special:
        return special[name]
    module = TIERS.get(name, "").partition(":")[0]
    try:
        found = getattr(importlib.import_module(module), "available", None) if module else None
    except ImportError:
        found = None
    if found is not None:
        return found  # type: ignore[no-any-return]
    if name == "bwrap":
        return _bwrap_fallback
    return lambda: (False, f"the {name} tier is not part of this installation")


def _unsafe() -> tuple[bool, str]:
    from codeevolver.sandbox.unsafe import UNPROTECTED

    return True, f"always available, and unprotected: {UNPROTECTED}; only with --dangerously-skip-sandbox"


def _modal() -> tuple[bool, str]:
    """Modal sandboxes run from CodeEvolver's hosted service; locally we can only say what is missing."""
    package = importlib.util.find_spec("modal") is not None
    token = (
        bool(os.environ.get("MODAL_TOKEN_ID") and os.environ.get("MODAL_TOKEN_SECRET"))
        or (Path.home() / ".modal.toml").is_file()
    )
    have = f"modal package {'installed' if package else 'missing'}, token {'found' if token else 'missing'}"
    if "modal" not in TIERS:
        return False, f"hosted only: runs in CodeEvolver's hosted service ({have}); fix: use the hosted service"
    if package and token:
        return True, have
    return False, f"{have}; fix: {DEFAULT_FIXES['modal']}"


def _bwrap_fallback() -> tuple[bool, str]:
    """Used only while the bwrap module has no ``available()``: is bwrap there, and can it unshare?"""
    binary = shutil.which("bwrap")
    if binary is None:
        return False, f"bubblewrap is not installed; fix: {DEFAULT_FIXES['bwrap']}"
    try:
        probe = subprocess.run(
            [binary, "--unshare-all", "--ro-bind", "/", "/", "true"],
            capture_output=True,
            text=True,
            timeout=PROBE_TIMEOUT_S,
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        return False, f"{binary} does not run ({exc}); fix: {DEFAULT_FIXES['bwrap']}"
    if probe.returncode != 0:
        why = (probe.stderr.strip().splitlines() or ["no output"])[-1]
        return False, f"{binary} cannot create namespaces here ({why}); fix: allow unprivileged user namespaces"
    return True, f"{binary} works"
