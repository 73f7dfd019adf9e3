"""Run one command in a sandbox with its stdin/stdout/stderr attached to ours, as a process of its own.

``Sandbox.run`` captures output, which is right for a command we wait for. A
program that *talks* to a sandboxed process over its pipes (the Claude Agent
SDK driving the Claude Code CLI) needs the pipes themselves, and wants to start
it as if it were the real binary. So :func:`prepare` writes, into a private
directory, a spec and a tiny wrapper script; running ``wrapper ARGS...`` runs
``python -m codeevolver.sandbox.attach SPEC -- COMMAND... ARGS...``, which:

- starts ``COMMAND ARGS`` in the spec's tier under the spec's policy, with
  stdin, stdout and stderr passed straight through (nothing captured);
- exits with the command's status (124 after the policy's wall timeout,
  125 when the sandbox itself cannot start);
- on SIGTERM, SIGINT or SIGHUP, and on any exit, kills the whole sandbox
  (the tier's cgroup or process group); if it is SIGKILLed, bwrap's
  ``--die-with-parent`` takes the sandbox down with it.

The spec holds no secret: the policy's environment is written as *names* only;
their values reach the launcher through the environment of whoever starts the
wrapper (the SDK passes ``options.env``), never through a file.
"""

from __future__ import annotations

import contextlib
import json
import os
import shlex
import signal
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from codeevolver.errors import CodeEvolverError, SandboxError
from codeevolver.sandbox import get_sandbox
from codeevolver.sandbox.base import CommandResult, SandboxPolicy

CANNOT_START = 125
"""Exit status when the sandbox itself could not start (as ``env``/``timeout`` use it)."""
TIMED_OUT = 124
SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)


@dataclass(frozen=True)
class Attached:
    """A prepared attached command: run ``script`` with extra arguments and ``env`` in its environment."""

    script: Path
    spec: Path
    env: dict[str, str]
    """The policy's environment: hand it to the process that runs ``script`` (it is not on disk)."""


def prepare(
    directory: Path,
    tier: str,
    policy: SandboxPolicy,
    command: Sequence[str],
    *,
    inherit: Sequence[str] = (),
) -> Attached:
    """Write the spec and the wrapper into ``directory`` (private to us, 0700).

    ``inherit`` names variables copied into the sandbox from the launcher's own
    environment when present (what the starting program adds itself, e.g. the SDK's
    ``CLAUDE_CODE_ENTRYPOINT``); list only names that can never hold a secret.
    """
    directory.mkdir(parents=True, exist_ok=True)
    directory.chmod(0o700)
    spec = {
        "tier": tier,
        "env": sorted(policy.env),
        "inherit": sorted(set(inherit) - set(policy.env)),
        "policy": _policy_doc(policy),
    }
    spec_path = directory / "spec.json"
    spec_path.write_text(json.dumps(spec, indent=1))
    script = directory / "sandboxed"
    # The caller's cwd is the worktree, written by the AI: the launcher runs on the host, so it must
    # never import from there. -P keeps the cwd off sys.path, and it starts from our own directory.
    launcher = [sys.executable, "-P", "-m", "codeevolver.sandbox.attach", str(spec_path), "--", *command]
    script.write_text(
        f"#!/bin/sh\ncd {shlex.quote(str(directory))} || exit {CANNOT_START}\n"
        f'exec {" ".join(map(shlex.quote, launcher))} "$@"\n'
    )
    script.chmod(0o700)
    return Attached(script=script, spec=spec_path, env=dict(policy.env))


def _policy_doc(policy: SandboxPolicy) -> dict[str, Any]:
    return {
        "workdir": str(policy.workdir),
        "readonly_paths": [str(p) for p in policy.readonly_paths],
        "writable_paths": [str(p) for p in policy.writable_paths],
        "timeout_s": policy.timeout_s,
        "memory_mb": policy.memory_mb,
        "pids": policy.pids,
        "cpu_percent": policy.cpu_percent,
        "tmp_mb": policy.tmp_mb,
        "gateway_socket": str(policy.gateway_socket) if policy.gateway_socket is not None else None,
        "proxy_port": policy.proxy_port,
        "allow_domains": list(policy.allow_domains),
    }


def load_policy(spec: Mapping[str, Any], environ: Mapping[str, str]) -> SandboxPolicy:
    """The spec's policy, its environment values taken from ``environ``."""
    missing = [name for name in spec["env"] if name not in environ]
    if missing:
        raise SandboxError(
            f"the attached sandbox's environment lacks {', '.join(missing)}",
            "start the wrapper with the env returned by attach.prepare()",
        )
    env = {name: environ[name] for name in spec["env"]}
    env.update({name: environ[name] for name in spec.get("inherit", ()) if name in environ})
    doc = spec["policy"]
    return SandboxPolicy(
        workdir=Path(doc["workdir"]),
        env=env,
        readonly_paths=tuple(Path(p) for p in doc["readonly_paths"]),
        writable_paths=tuple(Path(p) for p in doc["writable_paths"]),
        timeout_s=doc["timeout_s"],
        memory_mb=doc["memory_mb"],
        pids=doc["pids"],
        cpu_percent=doc["cpu_percent"],
        tmp_mb=doc["tmp_mb"],
        gateway_socket=Path(doc["gateway_socket"]) if doc["gateway_socket"] else None,
        proxy_port=doc["proxy_port"],
        allow_domains=tuple(doc["allow_domains"]),
    )


def run_attached(tier: str, argv: Sequence[str], policy: SandboxPolicy) -> CommandResult:
    """Run ``argv`` in ``tier`` with our stdio attached; the tier kills everything on return or exception."""
    sandbox = get_sandbox(tier)
    attached = getattr(sandbox, "run_attached", None)
    if attached is not None:
        result: CommandResult = attached(argv, policy)
        return result
    if tier == "unsafe":
        return _run_unsafe(argv, policy)
    raise SandboxError(f"the {tier} tier cannot run an attached command yet", "use the bwrap or gvisor tier")


def _run_unsafe(argv: Sequence[str], policy: SandboxPolicy) -> CommandResult:
    """The unsafe tier: a plain process group on the host, killed whole on return."""
    env = dict(policy.env)
    env.setdefault("PATH", os.environ.get("PATH", "/usr/bin:/bin"))
    started = time.monotonic()
    try:
        proc = subprocess.Popen(list(argv), cwd=policy.workdir, env=env, start_new_session=True)
    except OSError as exc:
        raise SandboxError(f"cannot start {argv[0]!r}: {exc.strerror}", "check the program exists") from exc
    try:
        code = proc.wait(policy.timeout_s)
        return CommandResult(code, "", "", duration_s=time.monotonic() - started)
    except subprocess.TimeoutExpired:
        return CommandResult(TIMED_OUT, "", "", timed_out=True, duration_s=time.monotonic() - started)
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


class _Signalled(BaseException):
    """Raised in the main thread by a termination signal, so every ``finally`` kills the sandbox."""

    def __init__(self, signum: int) -> None:
        super().__init__(signum)
        self.signum = signum


def _on_signal(signum: int, frame: object) -> None:
    for other in SIGNALS:  # one is enough: a second must not interrupt the clean-up it started
        signal.signal(other, signal.SIG_IGN)
    raise _Signalled(signum)


def main(args: Sequence[str] | None = None) -> int:
    """``python -m codeevolver.sandbox.attach SPEC -- COMMAND [ARGS...]``; returns the exit status."""
    args = list(sys.argv[1:] if args is None else args)
    if len(args) < 3 or args[1] != "--":
        print("usage: python -m codeevolver.sandbox.attach SPEC.json -- COMMAND [ARGS...]", file=sys.stderr)
        return 2
    for signum in SIGNALS:
        signal.signal(signum, _on_signal)
    try:
        return _main(args[0], args[2:])
    except _Signalled as exc:  # every sandbox was removed on the way out
        return 128 + exc.signum


def _main(spec_path: str, argv: list[str]) -> int:
    try:
        spec = json.loads(Path(spec_path).read_text())
        policy = load_policy(spec, os.environ)
        result = run_attached(spec["tier"], argv, policy)
    except (CodeEvolverError, OSError, ValueError, KeyError) as exc:
        print(f"codeevolver: cannot run the attached sandbox: {exc}", file=sys.stderr)
        return CANNOT_START
    if result.timed_out:
        print(
            f"codeevolver: the sandbox's wall timeout of {policy.timeout_s:g} s passed; everything in it was killed",
            file=sys.stderr,
        )
        return TIMED_OUT
    return result.returncode


if __name__ == "__main__":
    sys.exit(main())
