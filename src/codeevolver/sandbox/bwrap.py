"""The ``bwrap`` tier: bubblewrap namespaces + seccomp + a per-run cgroup. The default on Linux.

One run, in order:

1. a cgroup is made with the memory, pids and CPU limits (``cgroups.py``);
2. bwrap starts, unshares every namespace (user, mount, pid, net, ipc, uts,
   cgroup), builds the filesystem view (``_bwrap_argv.py``) and waits on
   ``--block-fd``;
3. meanwhile bwrap and its pid 1 are moved into the cgroup, and with a
   gateway the host opens ``127.0.0.1:<port>`` in the sandbox's network
   namespace and relays it to the gateway's unix socket (``bridge.py``);
   without one there is no network at all;
4. released, bwrap drops every capability, forbids new user namespaces,
   loads the seccomp filter (``seccomp.py``) and execs the command as
   uid/gid 65534; nothing of the command ever runs outside the cgroup;
5. on exit or timeout the cgroup is frozen, everything in it SIGKILLed and
   the group removed, so daemonized descendants die too.

Run by root, bwrap maps the sandbox's uid 65534 to host uid 0 without any
capability (the Docker model, plus a user namespace). What the kernel still
grants to uid 0 by uid alone is closed off: ``/proc`` is mounted read-only
(a sandbox had rewritten the host's ``kernel.core_pattern`` through it),
set-id bits cannot be set (``seccomp.py``), keyrings are unreachable, and no
host path is visible unless the policy binds it. Files the command writes in
the worktree are owned by the caller, as they would be had it written them.

bwrap reports on ``--json-status-fd`` whether the command was started: if it
never was, the tier failed (``SandboxError``); anything after that is the
command's own result.

:meth:`BwrapSandbox.run_attached` is the same run with this process's stdin,
stdout and stderr handed to the command instead of captured: a program on the
host (the Claude Agent SDK) can then talk to a process in the sandbox over its
pipes (``attach.py``). Every guarantee above holds unchanged.
"""

from __future__ import annotations

import atexit
import contextlib
import json
import os
import select
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Sequence
from pathlib import Path

from codeevolver.errors import SandboxError
from codeevolver.sandbox import _bwrap_argv, bridge, cgroups, seccomp
from codeevolver.sandbox._collect import Collector
from codeevolver.sandbox.base import CommandResult, SandboxPolicy

DEFAULT_PIDS = 512
"""Threads count as pids too: a Python program with a thread pool and BLAS threads needs room."""
OVERHEAD_PIDS = 2
"""bwrap's outer process and its pid-1 init; the fallback bridge adds its shell and socat."""
START_WAIT_S = 10.0
EXIT_GRACE_S = 1.0
DRAIN_S = 2.0
REQUIRED_FLAGS = ("--size", "--disable-userns", "--json-status-fd", "--block-fd", "--seccomp", "--cap-drop")
INSTALL_FIX = "apt-get install bubblewrap (0.8 or newer), or pick another tier with --tier"

_live: set[cgroups.RunGroup] = set()
_live_lock = threading.Lock()


@atexit.register
def _kill_leftovers() -> None:
    """An interrupted orchestrator exits at once; its sandboxes must not outlive it."""
    with _live_lock:
        groups = list(_live)
    for group in groups:
        with contextlib.suppress(OSError):
            group.remove()


def default_memory_bytes() -> int:
    """Half the machine: a memory bomb can never take the host down, normal programs never notice."""
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") // 2


class BwrapSandbox:
    name = "bwrap"
    isolated = True

    def run(self, argv: Sequence[str], policy: SandboxPolicy, stdin: bytes | None = None) -> CommandResult:
        return self._run(argv, policy, stdin, attached=False)

    def run_attached(self, argv: Sequence[str], policy: SandboxPolicy) -> CommandResult:
        """Run with our stdin/stdout/stderr passed straight through; the result's output is empty.

        Meant for a process of its own (``python -m codeevolver.sandbox.attach``): the caller's
        pipes become the command's. A SIGTERM turned into an exception still removes the cgroup.
        """
        return self._run(argv, policy, None, attached=True)

    def _run(self, argv: Sequence[str], policy: SandboxPolicy, stdin: bytes | None, *, attached: bool) -> CommandResult:
        started = time.monotonic()
        if not argv:
            raise SandboxError("no command to run", "pass the program and its arguments")
        binary = _bwrap_binary()
        if not Path(policy.workdir).is_dir():
            raise SandboxError(f"the sandbox's working directory {policy.workdir} does not exist", "create it first")
        group = _make_group(policy)
        with _live_lock:
            _live.add(group)
        try:
            return _Run(binary, list(argv), policy, stdin, group, started, attached=attached).execute()
        finally:
            group.remove()
            with _live_lock:
                _live.discard(group)


class _Run:
    """The state of one sandboxed command, from launch to reaping."""

    def __init__(
        self,
        binary: str,
        argv: list[str],
        policy: SandboxPolicy,
        stdin: bytes | None,
        group: cgroups.RunGroup,
        started: float,
        *,
        attached: bool = False,
    ) -> None:
        self.binary, self.argv, self.policy, self.stdin = binary, argv, policy, stdin
        self.attached = attached
        """stdin/stdout/stderr are ours, passed through (nothing to feed or collect)."""
        self.group = group
        self.started = started
        self.deadline = None if policy.timeout_s is None else started + policy.timeout_s
        gateway = policy.gateway_socket
        self.host_relay = gateway is not None and bridge.can_enter_netns()
        self.inside_bridge = gateway is not None and not self.host_relay
        self.status = b""
        self.setup_error: tuple[str, str] | None = None

    def execute(self) -> CommandResult:
        proc, status_r, block_w = self._launch()
        collector = Collector(proc, self.stdin)
        serving = None
        try:
            serving = self._release(proc, status_r, block_w)
            timed_out = self._wait(proc, collector)
            if not timed_out:  # let bwrap report the exit code before anything left is killed
                with contextlib.suppress(subprocess.TimeoutExpired):
                    proc.wait(timeout=EXIT_GRACE_S)
            self.group.kill_all()
            collector.pump(time.monotonic() + DRAIN_S)
            proc.wait()
            self.status += _read_available(status_r)
        finally:
            if serving is not None:
                serving.close()
            collector.close()
            for pipe in (proc.stdout, proc.stderr):
                if pipe is not None:
                    pipe.close()
            _close(status_r, block_w)
        return self._result(proc, collector, timed_out)

    def _launch(self) -> tuple[subprocess.Popen[bytes], int, int]:
        """Start bwrap, which sets the sandbox up and then waits on ``--block-fd`` for :meth:`_release`."""
        command, gateway_inside = self._command()
        try:  # refuse a bad policy before any fd is opened
            _bwrap_argv.user_mounts(self.policy, _bwrap_argv.sandbox_env(self.policy)["HOME"])
        except ValueError as exc:
            raise SandboxError(f"refusing the sandbox policy: {exc}", "bind narrower paths") from exc
        try:
            seccomp_fd = seccomp.memfd()
        except seccomp.SeccompUnavailable as exc:
            raise SandboxError(f"cannot build the bwrap tier's seccomp filter: {exc}", seccomp.FIX) from exc
        status_r, status_w = os.pipe()
        block_r, block_w = os.pipe()
        passed = (seccomp_fd, status_w, block_r)
        full = _bwrap_argv.build(
            self.policy,
            command,
            bwrap=self.binary,
            seccomp_fd=seccomp_fd,
            status_fd=status_w,
            block_fd=block_r,
            gateway_inside=gateway_inside,
        )
        try:
            if self.attached:
                stdin, out = None, None
            else:
                stdin = subprocess.PIPE if self.stdin is not None else subprocess.DEVNULL
                out = subprocess.PIPE
            proc = subprocess.Popen(
                full,
                stdin=stdin,
                stdout=out,
                stderr=out,
                pass_fds=passed,
                close_fds=True,
                env={},
                cwd="/",
                start_new_session=True,
            )
        except OSError as exc:
            _close(status_r, block_w)
            raise SandboxError(f"cannot start bwrap: {exc}", INSTALL_FIX) from exc
        finally:
            _close(*passed)
        return proc, status_r, block_w

    def _command(self) -> tuple[list[str], str | None]:
        """The command bwrap execs, and where the gateway socket is bound inside (fallback only)."""
        if not self.inside_bridge:
            return self.argv, None
        socat = bridge.socat_path()
        if socat is None:
            raise SandboxError(
                "the gateway bridge needs CAP_SYS_ADMIN (run as root) or socat in the sandbox",
                "apt-get install socat, or run CodeEvolver as root",
            )
        return bridge.inside_command(self.argv, self.policy.proxy_port, socat), bridge.INSIDE_SOCKET

    def _release(self, proc: subprocess.Popen[bytes], status_r: int, block_w: int) -> bridge.Serving | None:
        """While bwrap waits: put it in the cgroup, open the gateway port; then let the command start.

        ``block_w`` stays open (the caller closes it once): closing an fd twice from threads closes
        someone else's.
        """
        pid = self._child_pid(status_r)
        if pid is None and proc.poll() is None:
            self.setup_error = (f"bwrap did not create the sandbox within {START_WAIT_S:g} s", INSTALL_FIX)
            _kill(proc.pid)
            return None
        if pid is None or not _is_child_of(pid, proc.pid):
            return None  # bwrap failed while setting up: its status and stderr say why
        try:
            self.group.enter(proc.pid, pid)
        except OSError as exc:
            self.setup_error = (f"cannot put the sandbox in its cgroup: {exc}", _CGROUP_FIX)
            _kill(proc.pid)
            return None
        serving = None
        if self.host_relay and self.policy.gateway_socket is not None:
            try:
                listener = bridge.listen_in_netns(pid, self.policy.proxy_port)
                serving = bridge.RELAY.serve(listener, Path(self.policy.gateway_socket))
            except OSError as exc:
                self.setup_error = (f"cannot open the gateway port inside the sandbox: {exc}", GATEWAY_FIX)
                self.group.kill_all()
                return None
        with contextlib.suppress(OSError):
            os.write(block_w, b"go")
        return serving

    def _child_pid(self, status_r: int) -> int | None:
        """bwrap's first status line, written once its namespaces exist."""
        limit = time.monotonic() + START_WAIT_S
        while b"\n" not in self.status and time.monotonic() < limit:
            ready, _, _ = select.select([status_r], [], [], max(0.0, limit - time.monotonic()))
            if not ready:
                break
            chunk = os.read(status_r, 4096)
            if not chunk:
                break
            self.status += chunk
        for doc in _docs(self.status):
            if "child-pid" in doc:
                return int(doc["child-pid"])
        return None

    def _wait(self, proc: subprocess.Popen[bytes], collector: Collector) -> bool:
        """Pump output until the streams close, the command exits, or the deadline passes (True)."""
        if self.attached:  # no pipes of ours: bwrap exits when the command (its pid 1) does
            try:
                proc.wait(None if self.deadline is None else max(0.0, self.deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                return True
            return False
        exited_at = None
        while True:
            now = time.monotonic()
            step = now + 0.25 if self.deadline is None else min(self.deadline, now + 0.25)
            if collector.pump(step):
                return False
            now = time.monotonic()
            if self.deadline is not None and now >= self.deadline and proc.poll() is None:
                return True
            if proc.poll() is not None:
                exited_at = exited_at or now
                if now - exited_at > EXIT_GRACE_S:
                    return False  # something still holds the pipes: kill_all ends it

    def _result(self, proc: subprocess.Popen[bytes], collector: Collector, timed_out: bool) -> CommandResult:
        stdout, stderr = collector.text(0), collector.text(1)
        duration = time.monotonic() - self.started
        if self.setup_error is not None:
            message, fix = self.setup_error
            raise SandboxError(f"the bwrap tier could not start the command: {message}", fix)
        if timed_out:
            return CommandResult(124, stdout, stderr, timed_out=True, duration_s=duration)
        exit_codes = [doc["exit-code"] for doc in _docs(self.status) if "exit-code" in doc]
        if exit_codes:
            code = int(exit_codes[-1])
        elif self.group.oom_killed():
            code = 137
        elif "bwrap: execvp " in stderr:
            code = 127  # the command itself does not exist in the sandbox
        else:
            lines = stderr.strip().splitlines()
            raise SandboxError(
                f"bwrap could not start the sandbox: {lines[-1] if lines else f'exit {proc.returncode}'}",
                f"run `codeevolver doctor`; {INSTALL_FIX}",
            )
        if code == 137 and self.group.oom_killed():
            limit_mb = self.policy.memory_mb or default_memory_bytes() // 2**20
            stderr += f"\n[codeevolver: killed by the sandbox's memory limit of {limit_mb} MB]\n"
        return CommandResult(code, stdout, stderr, duration_s=duration)


def _docs(raw: bytes) -> list[dict]:
    docs = []
    for line in raw.decode("utf-8", "replace").splitlines():
        with contextlib.suppress(ValueError):
            doc = json.loads(line)
            if isinstance(doc, dict):
                docs.append(doc)
    return docs


def _read_available(fd: int) -> bytes:
    os.set_blocking(fd, False)
    data = b""
    with contextlib.suppress(BlockingIOError):
        while chunk := os.read(fd, 4096):
            data += chunk
    return data


def _is_child_of(pid: int, parent: int) -> bool:
    """Whether ``pid`` is still bwrap's child: never move (or kill) a process that reused its number."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return False
    for line in status.splitlines():
        if line.startswith("PPid:"):
            return int(line.split()[1]) == parent
    return False


def _kill(*pids: int) -> None:
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)


def _close(*fds: int | None) -> None:
    for fd in fds:
        if fd is not None:
            with contextlib.suppress(OSError):
                os.close(fd)


def _make_group(policy: SandboxPolicy) -> cgroups.RunGroup:
    memory = policy.memory_mb * 2**20 if policy.memory_mb is not None else default_memory_bytes()
    limits = cgroups.Limits(
        memory_bytes=memory,
        pids=(policy.pids or DEFAULT_PIDS) + OVERHEAD_PIDS + (2 if policy.gateway_socket else 0),
        cpu_percent=policy.cpu_percent,
    )
    try:
        return cgroups.RunGroup(cgroups.layout(), limits)
    except cgroups.CgroupUnavailable as exc:
        raise SandboxError(f"the bwrap tier cannot limit its sandboxes: {exc}", _CGROUP_FIX) from exc


_CGROUP_FIX = (
    "run CodeEvolver as root, or inside a cgroup with delegated memory, pids and cpu controllers "
    "(e.g. systemd-run --user --scope -p Delegate=yes codeevolver ...)"
)
GATEWAY_FIX = "check that the egress gateway is running and its socket exists; run `codeevolver doctor`"

_binary: str | None = None


def _bwrap_binary() -> str:
    global _binary
    if _binary is None:
        found = shutil.which("bwrap")
        if found is None:
            raise SandboxError("bubblewrap (bwrap) is not installed", INSTALL_FIX)
        _binary = found
    return _binary


_availability: tuple[bool, str] | None = None
_availability_lock = threading.Lock()


def available() -> tuple[bool, str]:
    """Whether this tier works here: (True, what it runs with) or (False, the problem and its fix)."""
    global _availability
    with _availability_lock:
        if _availability is None:
            _availability = _check()
        return _availability


def _check() -> tuple[bool, str]:
    if not sys.platform.startswith("linux"):
        return False, "bubblewrap needs Linux; fix: use the gvisor or container tier on a Linux host"
    try:
        binary = _bwrap_binary()
        helptext = subprocess.run([binary, "--help"], capture_output=True, text=True, timeout=10).stdout
    except SandboxError as exc:
        return False, str(exc)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return False, f"{binary} does not run ({exc}); fix: {INSTALL_FIX}"
    missing = [flag for flag in REQUIRED_FLAGS if flag not in helptext]
    if missing:
        return False, f"{binary} is too old (no {', '.join(missing)}); fix: {INSTALL_FIX}"
    try:
        seccomp.program()
    except seccomp.SeccompUnavailable as exc:
        return False, f"cannot build the seccomp filter ({exc}); fix: {seccomp.FIX}"
    try:
        found = cgroups.layout()
    except cgroups.CgroupUnavailable as exc:
        return False, f"no usable cgroups ({exc}); fix: {_CGROUP_FIX}"
    with tempfile.TemporaryDirectory(prefix="codeevolver-doctor-") as tmp:
        try:
            result = BwrapSandbox().run(["/bin/sh", "-c", "echo ok"], SandboxPolicy(workdir=Path(tmp), timeout_s=20))
        except SandboxError as exc:
            return False, str(exc)
    if result.returncode != 0 or result.stdout.strip() != "ok":
        return False, f"a test command failed in the sandbox: {result.stderr.strip()[-300:]}; fix: {INSTALL_FIX}"
    relay = "host relay" if bridge.can_enter_netns() else "socat bridge"
    return True, f"{binary}, cgroup v{found.version}, seccomp, gateway via {relay}"
