"""The ``container`` tier: Docker or Podman running the sandbox policy, gVisor's runsc as runtime when registered.

The image comes from ``codeevolver init docker`` (see ``dockerfile``); the candidate's
worktree is mounted over its /work. ``command`` is a pure function of the policy so
every flag can be checked without an engine (our CI machines have none).

Environment: ``--entrypoint /usr/bin/env`` with ``-i`` clears what the image and the
engine add (PATH, HOSTNAME, PYTHON_VERSION...), so the command sees exactly the policy's.
Ownership: Podman maps container uid 65534 to the host user (``--uidmap``), like the
gvisor tier; Docker cannot map per container, so under Docker the worktree must be
writable by uid 65534 (or the run's own non-root uid, which it then uses).
Seccomp: the engine's default profile is replaced by ours (the bwrap tier's rules, as
JSON in a private temporary file: ``--security-opt seccomp=FILE``, which both engines
read on the client side); /tmp and /dev/shm are both capped at the policy's ``tmp_mb``.
"""

from __future__ import annotations

import atexit
import contextlib
import errno
import hashlib
import json
import os
import shutil
import subprocess
import tempfile
import threading
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from codeevolver.errors import SandboxError
from codeevolver.sandbox import _oci, _oci_bridge, seccomp
from codeevolver.sandbox._bwrap_argv import sandbox_env
from codeevolver.sandbox.base import CommandResult, SandboxPolicy
from codeevolver.sandbox.dockerfile import DEFAULT_IMAGE

ENGINES = ("docker", "podman")
CONTAINER_WORKDIR = "/work"
FIX = "install Docker (https://docs.docker.com/engine/install/) or Podman (apt-get install podman)"
INFO_TIMEOUT_S = 10.0
_BRIDGE_SOURCE = Path(_oci_bridge.__file__).read_text()
_live: dict[str, str] = {}
_live_lock = threading.Lock()
_profiles_dir: str | None = None
_profiles_lock = threading.Lock()


@dataclass(frozen=True)
class Engine:
    """A container engine found on this machine."""

    name: str
    path: str
    runsc: bool
    """Whether gVisor's runsc is registered with it (then every container runs under gVisor)."""


def detect() -> tuple[Engine | None, str]:
    """The first working engine (docker, then podman), or None and why not."""
    reasons = []
    for name in ENGINES:
        path = shutil.which(name)
        if path is None:
            reasons.append(f"{name} not installed")
            continue
        try:
            info = subprocess.run(
                [path, "info", "--format", "{{json .}}"],
                capture_output=True,
                text=True,
                timeout=INFO_TIMEOUT_S,
                stdin=subprocess.DEVNULL,
            )
        except (OSError, subprocess.TimeoutExpired) as exc:
            reasons.append(f"{name} info failed: {exc}")
            continue
        if info.returncode != 0:
            last = (info.stderr.strip().splitlines() or ["no output"])[-1]
            reasons.append(f"{name} is installed but its engine does not answer ({last})")
            continue
        return Engine(name, path, _has_runsc(name, info.stdout)), f"{name} engine running"
    return None, "; ".join(reasons)


def _has_runsc(name: str, info_json: str) -> bool:
    try:
        info = json.loads(info_json)
    except json.JSONDecodeError:
        return False
    if name == "docker":
        return "runsc" in (info.get("Runtimes") or {})
    runtimes = (info.get("host") or {}).get("runtimes") or {}
    return "runsc" in runtimes or shutil.which("runsc") is not None


def available() -> tuple[bool, str]:
    """Whether a container engine answers here, and if not why and the fix (after ``; fix: ``)."""
    engine, reason = detect()
    if engine is None:
        installed = [name for name in ENGINES if shutil.which(name)]
        fix = f"start the {installed[0]} engine (e.g. systemctl start {installed[0]})" if installed else FIX
        return False, f"no container engine: {reason}; fix: {fix}"
    runtime = "runtime runsc (gVisor)" if engine.runsc else "default runtime (install runsc for gVisor)"
    return True, f"{engine.name} at {engine.path}, {runtime}"


def container_user(engine: str, workdir: Path) -> str:
    """65534, or under Docker a non-root owner of the worktree, who can then write it."""
    owner = Path(workdir).stat()
    if engine == "docker" and owner.st_uid != 0:
        return f"{owner.st_uid}:{owner.st_gid}"
    return f"{_oci.SANDBOX_UID}:{_oci.SANDBOX_UID}"


def _inside(path: str, workdir: Path) -> str:
    """A host path as the container sees it: the worktree is at /work, everything else where it is."""
    if not path.startswith("/"):
        return path
    absolute, root = Path(os.path.abspath(path)), Path(os.path.abspath(workdir))
    if absolute == root or root in absolute.parents:
        return str(Path(CONTAINER_WORKDIR) / absolute.relative_to(root))
    return path


def _bind(source: Path | str, target: str, writable: bool) -> list[str]:
    """``--mount`` rather than ``-v``: it fails on a missing source instead of creating it."""
    spec = f"type=bind,source={source},target={target}"
    return ["--mount", spec if writable else f"{spec},readonly"]


def _mounts(policy: SandboxPolicy) -> list[str]:
    workdir = Path(policy.workdir)
    flags = _bind(os.path.abspath(workdir), CONTAINER_WORKDIR, True)
    for path in policy.writable_paths:
        flags += _bind(os.path.realpath(path), _inside(str(path), workdir), True)
    readonly = [Path(p) for p in policy.readonly_paths]
    if (workdir / ".git").exists():
        readonly.append(workdir / ".git")
    for path in readonly:
        flags += _bind(os.path.realpath(path), _inside(str(path), workdir), False)
    if policy.gateway_socket is not None:
        flags += _bind(os.path.abspath(policy.gateway_socket), _oci.GATEWAY_PATH, True)
    return flags


def _limits(policy: SandboxPolicy, runsc: bool) -> list[str]:
    """Under runsc, pids count host threads and memory includes gVisor's kernel, as in the gvisor tier."""
    processes = policy.pids or _oci.DEFAULT_PIDS
    pids = _oci.THREADS_PER_PROCESS * processes + _oci.IDLE_THREADS if runsc else processes
    flags = ["--pids-limit", str(pids)]
    if policy.memory_mb:
        memory = policy.memory_mb + (_oci.SENTRY_MB if runsc else 0)
        flags += ["--memory", f"{memory}m", "--memory-swap", f"{memory}m"]
    if policy.cpu_percent:
        flags += ["--cpus", f"{policy.cpu_percent / 100:g}"]
    return flags


def _identity(engine: str, workdir: Path, user: str | None) -> list[str]:
    flags = ["--user", user or container_user(engine, workdir)]
    if engine == "podman":
        for flag, host_id in (("--uidmap", os.getuid()), ("--gidmap", os.getgid())):
            flags += [flag, f"{_oci.SANDBOX_UID}:{host_id}:1", flag, f"0:{_oci.id_mappings(host_id)[1]['hostID']}:1"]
    return flags


def seccomp_profile(runsc: bool) -> dict[str, Any]:
    """The gvisor tier's OCI profile; under runc/crun also clone3 and openat2 answering ENOSYS.

    Their flags are in memory a filter cannot read, so without the ENOSYS rule clone3 could
    create the namespaces the clone rules deny (Docker's own default profile does the same).
    runsc gets none: it answers ENOSYS by itself and ignores ``errnoRet`` (see ``_oci``).
    """
    profile = _oci.seccomp_profile()
    if not runsc:
        enosys = {"names": seccomp.spec()["enosys"], "action": "SCMP_ACT_ERRNO", "errnoRet": errno.ENOSYS}
        profile["syscalls"] = [enosys, *profile["syscalls"]]
    return profile


def seccomp_file(runsc: bool) -> Path:
    """``seccomp_profile`` written once per process into a private (0700) temporary folder."""
    global _profiles_dir
    text = json.dumps(seccomp_profile(runsc), indent=1, sort_keys=True)
    with _profiles_lock:
        if _profiles_dir is None:
            _profiles_dir = tempfile.mkdtemp(prefix="codeevolver-seccomp-")
            atexit.register(shutil.rmtree, _profiles_dir, True)
        path = Path(_profiles_dir) / f"seccomp-{hashlib.sha256(text.encode()).hexdigest()[:16]}.json"
        if not path.exists():
            partial = path.with_suffix(".partial")
            partial.write_text(text, encoding="utf-8")
            partial.replace(path)
    return path


def command(
    policy: SandboxPolicy,
    argv: Sequence[str],
    *,
    engine: str,
    image: str,
    name: str,
    runsc: bool,
    user: str | None = None,
    seccomp_path: Path | None = None,
) -> list[str]:
    """The full ``docker run`` / ``podman run`` argv (``engine`` is the name) for ``argv`` under ``policy``.

    ``seccomp_path`` defaults to ``seccomp_file(runsc)`` (written on first use).
    """
    workdir = Path(policy.workdir)
    profile = seccomp_path or seccomp_file(runsc)
    flags = [engine, "run", "--rm", "-i", "--name", name, "--hostname", "sandbox"]
    if runsc:
        flags.append("--runtime=runsc")
    flags += ["--network", "none", "--read-only", "--cap-drop", "ALL", "--security-opt", "no-new-privileges"]
    flags += ["--security-opt", f"seccomp={profile}"]
    flags += ["--tmpfs", f"/tmp:rw,nosuid,nodev,size={policy.tmp_mb}m,mode=1777", "--shm-size", f"{policy.tmp_mb}m"]
    flags += _identity(engine, workdir, user)
    flags += _limits(policy, runsc)
    flags += _mounts(policy)
    flags += ["-w", CONTAINER_WORKDIR, "--entrypoint", "/usr/bin/env", image, "-i"]
    flags += [f"{k}={v}" for k, v in sandbox_env(policy).items()]
    inner = [_inside(a, workdir) for a in argv]
    if policy.gateway_socket is not None:
        inner = ["python3", "-I", "-S", "-c", _BRIDGE_SOURCE, str(policy.proxy_port), _oci.GATEWAY_PATH, *inner]
    return [*flags, "--", *inner]


@atexit.register
def _kill_leftovers() -> None:
    """An interrupted run must not leave containers behind."""
    with _live_lock:
        live = list(_live.items())
    for name, engine in live:
        _quiet(engine, "rm", "-f", name)


class ContainerSandbox:
    name = "container"
    isolated = True

    def __init__(self, image: str | None = None, engine: Engine | None = None) -> None:
        self.image = image or os.environ.get("CODEEVOLVER_IMAGE") or DEFAULT_IMAGE
        self._engine = engine

    def engine(self) -> Engine:
        if self._engine is None:
            found, reason = detect()
            if found is None:
                raise SandboxError(f"the container tier has no engine: {reason}", FIX)
            self._engine = found
        return self._engine

    def run(self, argv: Sequence[str], policy: SandboxPolicy, stdin: bytes | None = None) -> CommandResult:
        if not argv:
            raise SandboxError("nothing to run: empty command", "pass the command to run")
        engine = self.engine()
        name = f"codeevolver-{uuid.uuid4().hex[:16]}"
        cmd = command(policy, argv, engine=engine.name, image=self.image, name=name, runsc=engine.runsc)
        cmd[0] = engine.path
        started = time.monotonic()
        with _live_lock:
            _live[name] = engine.path
        timed_out = False
        try:
            proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
            try:
                out, err = proc.communicate(stdin, timeout=policy.timeout_s)
            except subprocess.TimeoutExpired:
                timed_out = True
                _quiet(engine.path, "kill", name)
                out, err = proc.communicate()
        except OSError as exc:
            raise SandboxError(f"cannot start {engine.name}: {exc.strerror}", FIX) from exc
        finally:
            _quiet(engine.path, "rm", "-f", name)
            with _live_lock:
                _live.pop(name, None)
        if proc.returncode == 125 and not timed_out:  # the engine's own failure, not the command's
            raise SandboxError(f"{engine.name} could not start the container: {err.decode(errors='replace')[-500:]}")
        return CommandResult(
            returncode=124 if timed_out else proc.returncode,
            stdout=out.decode("utf-8", "replace"),
            stderr=err.decode("utf-8", "replace"),
            timed_out=timed_out,
            duration_s=time.monotonic() - started,
        )


def _quiet(engine: str, *args: str) -> None:
    with contextlib.suppress(OSError, subprocess.TimeoutExpired):
        subprocess.run(
            [engine, *args], stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, timeout=30
        )
