"""The ``gvisor`` tier: each command in its own gVisor sandbox, started with ``runsc run`` from an OCI bundle.

gVisor answers the command's system calls in a user-space kernel, so a kernel bug
reachable from inside is not a host kernel bug. The bundle (see ``_oci``) shows only
/usr, the CA certificates, the worktree and the policy's paths; networking is off
(``--network=none``) and the gateway's unix socket, bridged to 127.0.0.1:PORT inside,
is the only way out. ``runsc do`` is never used: it shows the host's root filesystem.

runsc starts inside a cgroup of ours with the policy's limits (``--ignore-cgroups``: letting
runsc build its own cost ~130 ms of every start), so its sentry, gofer and the command are
all limited and all killed with the group; ``RLIMIT_NPROC`` caps the command's processes.

``--platform=ptrace`` because KVM hangs on machines like ours. When the command exits,
runsc ends every process of the sandbox (daemons too); a run that timed out or did not
end cleanly is also ``runsc delete --force``-d, so no process, cgroup or state outlives it.
"""

from __future__ import annotations

import atexit
import contextlib
import json
import os
import shutil
import signal
import subprocess
import tempfile
import threading
import time
import uuid
from collections.abc import Sequence
from pathlib import Path

from codeevolver.errors import SandboxError
from codeevolver.sandbox import _oci, _oci_bridge, cgroups
from codeevolver.sandbox.base import CommandResult, SandboxPolicy

FIX = "apt-get install runsc"
PLATFORM = "ptrace"
KILL_GRACE_S = 5.0
_STARTUP_ERRORS = ("running container:", "creating container:", "starting container:")
_EXEC_ERRORS = ("error finding executable", "failed to load")

_BRIDGE_SOURCE = Path(_oci_bridge.__file__).read_text()
_live: dict[str, Path] = {}
_live_lock = threading.Lock()


def default_state_dir() -> Path:
    """runsc's ``--root``: private to this user, stable so leftovers of a crash can be listed."""
    base = os.environ.get("XDG_RUNTIME_DIR") or tempfile.gettempdir()
    return Path(base) / f"codeevolver-runsc-{os.getuid()}"


def available() -> tuple[bool, str]:
    """Whether runsc can start a sandbox here, and if not why and the fix (after ``; fix: ``)."""
    runsc = shutil.which("runsc")
    if runsc is None:
        return False, f"runsc (gVisor) is not installed; fix: {FIX}"
    if os.geteuid() != 0:
        return False, "runsc needs root to create sandboxes; fix: run CodeEvolver as root, or use the bwrap tier"
    try:
        with tempfile.TemporaryDirectory(prefix="codeevolver-probe-") as empty:
            probe = GvisorSandbox().run(["/usr/bin/true"], SandboxPolicy(workdir=Path(empty), timeout_s=30))
    except SandboxError as exc:
        return False, f"runsc is installed but cannot start a sandbox: {exc.message}; fix: {FIX}"
    if probe.returncode != 0:
        reason = (probe.stderr.strip().splitlines() or ["no output"])[-1]
        return False, f"runsc is installed but a probe failed ({probe.returncode}): {reason}; fix: {FIX}"
    return True, f"{runsc} (platform {PLATFORM}) started a probe sandbox in {probe.duration_s * 1000:.0f} ms"


@atexit.register
def _delete_leftovers() -> None:
    """An interrupted run must not leave sandboxes behind."""
    with _live_lock:
        live = list(_live.items())
    for cid, root in live:
        _runsc_quiet(root, "delete", "--force", cid)


class GvisorSandbox:
    name = "gvisor"
    isolated = True

    def __init__(self, state_dir: Path | None = None) -> None:
        self.state_dir = Path(state_dir) if state_dir else default_state_dir()

    def run(self, argv: Sequence[str], policy: SandboxPolicy, stdin: bytes | None = None) -> CommandResult:
        return self._run(argv, policy, stdin, attached=False)

    def run_attached(self, argv: Sequence[str], policy: SandboxPolicy) -> CommandResult:
        """Run with our stdin/stdout/stderr handed to runsc (for ``codeevolver.sandbox.attach``)."""
        return self._run(argv, policy, None, attached=True)

    def _run(self, argv: Sequence[str], policy: SandboxPolicy, stdin: bytes | None, *, attached: bool) -> CommandResult:
        if not argv:
            raise SandboxError("nothing to run: empty command", "pass the command to run")
        if not Path(policy.workdir).is_dir():
            raise SandboxError(f"the sandbox's workdir {policy.workdir} is not a directory", "create it first")
        runsc = shutil.which("runsc")
        if runsc is None:
            raise SandboxError("runsc (gVisor) is not installed", FIX)
        self._ensure_state_dir()
        cid = f"ce-{uuid.uuid4().hex[:16]}"
        started = time.monotonic()
        with tempfile.TemporaryDirectory(prefix="codeevolver-oci-") as tmp:
            bundle = Path(tmp)
            _oci.make_rootfs(bundle / "rootfs")
            spec = _oci.build_spec(policy, _oci.command(policy, argv, _BRIDGE_SOURCE))
            (bundle / "config.json").write_text(json.dumps(spec))
            group = _make_group(policy)
            try:
                # runsc starts inside our group (sentry, gofer and all), so it need not make its own.
                cmd = [*_enter(group), runsc, *self._flags(policy), "run", "--bundle", str(bundle), cid]
                out, err, code, timed_out = self._supervise(cmd, cid, stdin, policy.timeout_s, attached)
            finally:
                group.kill_all()
                group.remove()
        if code == 128 and any(marker in err for marker in _STARTUP_ERRORS):
            return _start_failure(err, argv, started)
        return CommandResult(
            returncode=124 if timed_out else code,
            stdout=out.decode("utf-8", "replace"),
            stderr=err,
            timed_out=timed_out,
            duration_s=time.monotonic() - started,
        )

    def _ensure_state_dir(self) -> None:
        """runsc's state must be ours alone: a directory someone else made could redirect it."""
        self.state_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        info = self.state_dir.lstat()
        if self.state_dir.is_symlink() or info.st_uid != os.getuid():
            raise SandboxError(
                f"runsc's state directory {self.state_dir} is not a directory owned by this user",
                "remove it, or set XDG_RUNTIME_DIR to a private directory",
            )

    def _flags(self, policy: SandboxPolicy) -> list[str]:
        flags = [f"--root={self.state_dir}", f"--platform={PLATFORM}", "--network=none", "--oci-seccomp"]
        flags.append("--ignore-cgroups")  # it runs inside our own run group (``_make_group``)
        if policy.gateway_socket is not None:
            flags.append("--host-uds=open")  # only to connect to the bound gateway socket
        return flags

    def _supervise(
        self, cmd: list[str], cid: str, stdin: bytes | None, timeout_s: float | None, attached: bool = False
    ) -> tuple[bytes, str, int, bool]:
        """Run runsc with piped output (a shared file loses it), kill and delete on timeout or error.

        Attached, runsc gets our own stdio instead and nothing is captured."""
        pipe = None if attached else subprocess.PIPE
        try:
            proc = subprocess.Popen(
                cmd,
                stdin=pipe,
                stdout=pipe,
                stderr=pipe,
                env={"PATH": _oci.DEFAULT_PATH},
                start_new_session=True,
            )
        except OSError as exc:
            raise SandboxError(f"cannot start runsc: {exc.strerror}", FIX) from exc
        with _live_lock:
            _live[cid] = self.state_dir
        timed_out = False
        try:
            try:
                out, err = proc.communicate(None if attached else stdin, timeout=timeout_s)
            except subprocess.TimeoutExpired:
                timed_out = True
                _runsc_quiet(self.state_dir, "kill", "--all", cid, "KILL")
                _runsc_quiet(self.state_dir, "delete", "--force", cid)
                try:
                    out, err = proc.communicate(timeout=KILL_GRACE_S)
                except subprocess.TimeoutExpired:
                    with contextlib.suppress(ProcessLookupError):
                        os.killpg(proc.pid, signal.SIGKILL)
                    out, err = proc.communicate()
        finally:
            if proc.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
            if timed_out or any(self.state_dir.glob(f"{cid}_*")):  # a clean ``runsc run`` removes its own
                _runsc_quiet(self.state_dir, "delete", "--force", cid)
            with _live_lock:
                _live.pop(cid, None)
        code = proc.returncode if proc.returncode >= 0 else 128 - proc.returncode  # runsc itself killed
        return out or b"", (err or b"").decode("utf-8", "replace"), code, timed_out


def _make_group(policy: SandboxPolicy) -> cgroups.RunGroup:
    """The run's cgroup, with the limits the OCI spec states (``_oci.resources``)."""
    limits = _oci.resources(policy)
    memory = limits.get("memory", {}).get("limit")
    cpu = limits.get("cpu")
    wanted = cgroups.Limits(
        memory_bytes=memory,
        pids=limits["pids"]["limit"],
        cpu_percent=cpu["quota"] // 1000 if cpu else None,
    )
    try:
        return cgroups.RunGroup(cgroups.layout(), wanted)
    except cgroups.CgroupUnavailable as exc:
        raise SandboxError(f"the gvisor tier cannot limit its sandboxes: {exc}", FIX) from exc


def _enter(group: cgroups.RunGroup) -> list[str]:
    """A shell prefix that moves itself into every hierarchy of ``group``, then execs the rest."""
    script = 'while [ "$1" != -- ]; do echo $$ > "$1" || exit 125; shift; done; shift; exec "$@"'
    return ["/bin/sh", "-c", script, "sh", *map(str, group.procs_files), "--"]


def _start_failure(err: str, argv: Sequence[str], started: float) -> CommandResult:
    """A command that cannot be executed is the command's failure (127); anything else is the tier's."""
    if any(marker in err for marker in _EXEC_ERRORS):
        return CommandResult(127, "", f"{argv[0]}: {err.strip()}", False, time.monotonic() - started)
    raise SandboxError(f"runsc could not start the sandbox: {err.strip()[-500:]}", FIX)


def _runsc_quiet(root: Path, *args: str) -> None:
    runsc = shutil.which("runsc") or "runsc"
    with contextlib.suppress(OSError, subprocess.TimeoutExpired):
        subprocess.run(
            [runsc, f"--root={root}", *args],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            timeout=30,
        )
