"""Helpers of the security battery: run Python attacks inside a sandbox, look for leftovers on the host."""

from __future__ import annotations

import json
import os
import textwrap
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

from codeevolver.sandbox import Sandbox, SandboxPolicy
from codeevolver.sandbox.base import CommandResult

TIERS = ("bwrap", "gvisor")
PYTHON = "/usr/bin/python3"
MARK = "@@RESULT@@"

PRELUDE = r'''
import ctypes, errno, json, os, socket, struct, sys, time
libc = ctypes.CDLL(None, use_errno=True)
libc.syscall.restype = ctypes.c_long

def sc(nr, *args):
    """A raw syscall: (return value, errno)."""
    ctypes.set_errno(0)
    conv = [ctypes.c_long(a) if isinstance(a, int) else a for a in args]
    return int(libc.syscall(ctypes.c_long(nr), *conv)), ctypes.get_errno()

def attempt(fn):
    try:
        value = fn()
        return {"ok": True, "value": value if isinstance(value, (int, str, bool, type(None))) else repr(value)}
    except BaseException as exc:
        return {"ok": False, "error": f"{type(exc).__name__}: {exc}", "errno": getattr(exc, "errno", None)}

out = {}
'''


def policy(workdir: Path, **overrides: Any) -> SandboxPolicy:
    """Small, bounded limits: an attack that gets through still cannot hurt the machine much."""
    base = SandboxPolicy(workdir=workdir, timeout_s=30, memory_mb=256, pids=64, tmp_mb=16)
    return replace(base, **overrides)


class Inside(CommandResult):
    data: dict[str, Any]


def run_inside(box: Sandbox, code: str, pol: SandboxPolicy, args: Sequence[str] = ()) -> Inside:
    """Run Python ``code`` (which fills the dict ``out``) in the sandbox; ``.data`` is ``out``.

    The script goes in on stdin, so a secret it searches for is in no command line; ``args``
    (e.g. a marker to find leftover processes by) are in every process it forks.
    """
    script = PRELUDE + textwrap.dedent(code) + f"\nprint({MARK!r} + json.dumps(out), flush=True)\n"
    result = box.run([PYTHON, "-", *args], pol, stdin=script.encode())
    inside = Inside(result.returncode, result.stdout, result.stderr, result.timed_out, result.duration_s)
    inside.data = {}
    for line in result.stdout.splitlines():
        if line.startswith(MARK):
            inside.data = json.loads(line[len(MARK) :])
    return inside


def host_processes_with(text: str) -> list[int]:
    """Host pids whose command line mentions ``text``: what the sandbox left running."""
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == os.getpid():
            continue
        try:
            cmdline = Path(f"/proc/{entry}/cmdline").read_bytes()
        except OSError:
            continue
        if text.encode() in cmdline:
            found.append(int(entry))
    return found
