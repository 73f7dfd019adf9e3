"""The ``unsafe`` tier: a plain subprocess on the host. Opt-in only.

It still clears the environment to ``policy.env``, starts the command in a new
session and kills the whole process group on timeout, but nothing stops the
command from reading or writing anything the user can.
"""

from __future__ import annotations

import atexit
import contextlib
import os
import signal
import subprocess
import threading
import time
from collections.abc import Sequence

from codeevolver.errors import SandboxError
from codeevolver.sandbox.base import CommandResult, SandboxPolicy

UNPROTECTED = (
    "the program and every AI-written change run as your user, can read and write "
    "any of your files, can reach any network address and can see your environment"
)


_live_groups: set[int] = set()
_live_lock = threading.Lock()


@atexit.register
def _kill_leftovers() -> None:
    """An interrupted run exits at once; the commands it started must not outlive it."""
    with _live_lock:
        groups = list(_live_groups)
    for pgid in groups:
        _kill_group(pgid)


class UnsafeSandbox:
    name = "unsafe"
    isolated = False

    def run(self, argv: Sequence[str], policy: SandboxPolicy, stdin: bytes | None = None) -> CommandResult:
        env = dict(policy.env)
        env.setdefault("PATH", os.environ.get("PATH", "/usr/bin:/bin"))
        started = time.monotonic()
        try:
            proc = subprocess.Popen(
                list(argv),
                cwd=policy.workdir,
                env=env,
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                start_new_session=True,
            )
        except OSError as exc:
            raise SandboxError(
                f"cannot start {argv[0]!r}: {exc.strerror}",
                "check that the program exists and is executable",
            ) from exc
        with _live_lock:
            _live_groups.add(proc.pid)
        timed_out = False
        try:
            out, err = proc.communicate(stdin, timeout=policy.timeout_s)
        except subprocess.TimeoutExpired:
            timed_out = True
            _kill_group(proc.pid)
            out, err = proc.communicate()
        finally:
            _kill_group(proc.pid)  # daemonized children of a finished command too
            with _live_lock:
                _live_groups.discard(proc.pid)
        return CommandResult(
            returncode=124 if timed_out else proc.returncode,
            stdout=out.decode("utf-8", "replace"),
            stderr=err.decode("utf-8", "replace"),
            timed_out=timed_out,
            duration_s=time.monotonic() - started,
        )


def _kill_group(pgid: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, signal.SIGKILL)
