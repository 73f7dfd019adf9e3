"""The ``bwrap`` tier: bubblewrap namespaces + seccomp + a per-run cgroup. The default on Linux.

One run, in order:

1. a cgroup is made with the memory, pids and CPU limits (``cgroups.py``);
2. ``/bin/sh`` writes its own pid into that cgroup and ``exec``-s bwrap, so
   bwrap and everything it starts are inside before any user code runs;
3. bwrap unshares every namespace (user, mount, pid, net, ipc, uts, cgroup),
   maps the caller to uid/gid 65534 with no capabilities and no way to make
   new user namespaces, builds the filesystem view (``_bwrap_argv.py``),
   loads the seccomp filter (``seccomp.py``) and execs the command;
4. with a gateway, the host opens ``127.0.0.1:<port>`` inside the sandbox's
   network namespace while bwrap waits on ``--block-fd``, and relays it to the
   gateway's unix socket (``bridge.py``); otherwise there is no network at all;
5. on exit or timeout the cgroup is frozen, everything in it SIGKILLed and
   the group removed, so daemonized descendants die too.

bwrap reports on ``--json-status-fd`` whether the command was started: if it
never was, the tier failed (``SandboxError``); anything after that is the
command's own result.
"""

from __future__ import annotations

import atexit
import contextlib
import json
import os
import select
import shlex
import shutil
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
            return _Run(binary, list(argv), policy, stdin, group, started).execute()
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
    ) -> None:
        self.binary, self.argv, self.policy, self.stdin = binary, argv, policy, stdin
        self.group = group
        self.started = started
        self.deadline = None if policy.timeout_s is None else started + policy.timeout_s
        gateway = policy.gateway_socket
        self.host_relay = gateway is not None and bridge.can_enter_netns()
        self.inside_bridge = gateway is not None and not self.host_relay
        self.status = b""

    def execute(self) -> CommandResult:
        proc, status_r, block_w = self._launch()
        collector = Collector(proc, self.stdin)
        serving = None
        try:
            if block_w is not None:
                serving = self._open_gateway(status_r, block_w)
            timed_out = self._wait(proc, collector)
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
            os.close(status_r)
            if block_w is not None:
                with contextlib.suppress(OSError):
                    os.close(block_w)
        return self._result(proc, collector, timed_out)

    def _launch(self) -> tuple[subprocess.Popen[bytes], int, int | None]:
        command, gateway_inside = self._command()
        try:
            seccomp_fd = seccomp.memfd()
        except seccomp.SeccompUnavailable as exc:
            raise SandboxError(f"cannot build the bwrap tier's seccomp filter: {exc}", seccomp.FIX) from exc
        status_r, status_w = os.pipe()
        block_r, block_w = os.pipe() if self.host_relay else (None, None)
        try:
            full = _bwrap_argv.build(
                self.policy,
                command,
                bwrap=self.binary,
                seccomp_fd=seccomp_fd,
                status_fd=status_w,
                block_fd=block_r,
                gateway_inside=gateway_inside,
            )
        except ValueError as exc:
            _close(seccomp_fd, status_w, status_r, block_r, block_w)
            raise SandboxError(f"refusing the sandbox policy: {exc}", "bind narrower paths") from exc
        enter = " && ".join(f"echo $$ > {shlex.quote(str(path))}" for path in self.group.procs_files)
        launcher = ["/bin/sh", "-c", f'{enter} && exec "$@"', "sh", *full]
        passed = tuple(fd for fd in (seccomp_fd, status_w, block_r) if fd is not None)
        try:
            proc = subprocess.Popen(
                launcher,
                stdin=subprocess.PIPE if self.stdin is not None else subprocess.DEVNULL,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                pass_fds=passed,
                close_fds=True,
                env={},
                cwd="/",
                start_new_session=True,
            )
        except OSError as exc:
            _close(status_r, block_w)
            raise SandboxError(f"cannot start bwrap: {exc.strerror}", INSTALL_FIX) from exc
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

    def _open_gateway(self, status_r: int, block_w: int) -> bridge.Serving | None:
        """Listen inside the new network namespace, relay to the gateway, then let the command start."""
        serving = None
        try:
            pid = self._child_pid(status_r)
            if pid is not None and self.policy.gateway_socket is not None:
                listener = bridge.listen_in_netns(pid, self.policy.proxy_port)
                serving = bridge.RELAY.serve(listener, Path(self.policy.gateway_socket))
        except OSError:
            pass  # the sandbox died while starting: its status says so below
        finally:
            with contextlib.suppress(OSError):
                os.write(block_w, b"go")
            os.close(block_w)
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
