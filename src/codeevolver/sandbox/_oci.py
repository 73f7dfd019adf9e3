"""The sandbox policy as an OCI runtime bundle (``config.json`` + a rootfs of empty dirs), for ``runsc run``.

What the command sees follows the bwrap tier's rules (``_bwrap_argv``: environment,
which /etc files, which policy paths in which order, a private HOME), so a command
behaves the same in both tiers. Paths are mounted at their host paths so argv written
for the host (the venv's python, the runner script) works unchanged inside.

Ownership: the process runs as uid/gid 65534 and the spec adds a user namespace mapping
65534 to the *host* user that owns the run (and 0, which runsc's gofer needs, to host
nobody). So the worktree is writable as it would be for that user, files created inside
belong to that user on the host, and runsc's own sandbox and gofer processes run as host
``nobody``, not root.
"""

from __future__ import annotations

import os
import platform
from collections.abc import Sequence
from errno import EPERM
from pathlib import Path
from typing import Any

from codeevolver.errors import SandboxError
from codeevolver.sandbox import seccomp
from codeevolver.sandbox._bwrap_argv import ETC_FILES, SYNTHETIC_ETC, TOP_LINKS, sandbox_env, user_mounts
from codeevolver.sandbox.base import SandboxPolicy
from codeevolver.sandbox.bridge import INSIDE_SOCKET

SANDBOX_UID = 65534
GATEWAY_PATH = INSIDE_SOCKET
"""Where the gateway's unix socket appears inside the sandbox (where bwrap's socat fallback puts it too)."""
BRIDGE_PYTHON = "/usr/bin/python3"
SET_ID = (0o4000, 0o2000)
DEFAULT_PATH = "/usr/local/bin:/usr/bin:/bin"
DEFAULT_PIDS = 512
"""Processes (threads count too) allowed when the policy sets none, as in the bwrap tier."""
SENTRY_MB = 32
"""Headroom for gVisor's own kernel, charged to the same cgroup as the command (measured: a
128 MB limit without it let a command hold ~115 MB; an 8 MB one killed runsc itself)."""
THREADS_PER_PROCESS = 17
IDLE_THREADS = 50
"""runsc's pids.limit counts host threads of the sandbox: ~43 idle, ~17 per process inside."""

ROOTFS_DIRS = ("usr", "etc", "proc", "dev", "tmp", "sys", "run/codeevolver")
CAPABILITIES: dict[str, list[str]] = {k: [] for k in ("bounding", "effective", "permitted", "inheritable", "ambient")}
NAMESPACES = ("pid", "ipc", "uts", "mount", "network", "user")


def make_rootfs(rootfs: Path) -> None:
    """A read-only root of empty mount points and synthetic /etc files (the bwrap tier's, never the host's)."""
    for name in ROOTFS_DIRS:
        (rootfs / name).mkdir(parents=True, exist_ok=True)
    for name in TOP_LINKS:  # /bin -> usr/bin and friends, as on the host
        if os.path.islink(f"/{name}"):
            os.symlink(os.readlink(f"/{name}"), rootfs / name)
    for name, text in SYNTHETIC_ETC.items():
        (rootfs / "etc" / name).write_text(text)
    if os.path.islink("/etc/localtime"):
        os.symlink(os.readlink("/etc/localtime"), rootfs / "etc" / "localtime")
    (rootfs / GATEWAY_PATH.lstrip("/")).touch()


def _bind(path: str, writable: bool) -> dict[str, Any]:
    options = ["rbind", "rw" if writable else "ro", "nosuid", "nodev"]
    return {"destination": path, "type": "bind", "source": os.path.realpath(path), "options": options}


def _tmpfs(path: str, size_mb: int, mode: str) -> dict[str, Any]:
    options = ["nosuid", "nodev", f"size={size_mb}m", f"mode={mode}"]
    return {"destination": path, "type": "tmpfs", "source": "tmpfs", "options": options}


def policy_mounts(policy: SandboxPolicy) -> list[dict[str, Any]]:
    """The policy's paths at their host paths (missing read-only ones skipped), and a private HOME.

    Which paths, in which order, and where a private HOME goes are the bwrap tier's rules
    (``user_mounts``), so both tiers show a command the same files.
    """
    try:
        entries = user_mounts(policy, sandbox_env(policy)["HOME"])
    except ValueError as exc:
        raise SandboxError(str(exc), "narrow the policy's paths") from None
    mounts = []
    for kind, path in entries:
        if kind == "home":
            home = _tmpfs(path, policy.tmp_mb, "0700")
            home["options"] += [f"uid={SANDBOX_UID}", f"gid={SANDBOX_UID}"]  # the user's own, as bwrap makes it
            mounts.append(home)
        elif kind == "rw" or os.path.exists(path):
            mounts.append(_bind(path, kind == "rw"))
    return mounts


def system_mounts(policy: SandboxPolicy) -> list[dict[str, Any]]:
    """proc, private /dev, size-capped /tmp and /dev/shm, an empty /sys; host /usr and public /etc read-only."""
    mounts: list[dict[str, Any]] = [
        {"destination": "/proc", "type": "proc", "source": "proc"},
        {"destination": "/dev", "type": "tmpfs", "source": "tmpfs", "options": ["nosuid", "noexec", "mode=755"]},
        _tmpfs("/tmp", policy.tmp_mb, "1777"),
        _tmpfs("/dev/shm", policy.tmp_mb, "1777"),  # POSIX semaphores (multiprocessing) live here
        # gVisor mounts its own sysfs unless told otherwise; the policy says no /sys
        {"destination": "/sys", "type": "tmpfs", "source": "tmpfs", "options": ["ro", "nosuid", "nodev", "noexec"]},
        {"destination": "/usr", "type": "bind", "source": "/usr", "options": ["rbind", "ro", "nosuid", "nodev"]},
    ]
    for name in TOP_LINKS:  # a host without merged /usr has them as directories
        if os.path.isdir(f"/{name}") and not os.path.islink(f"/{name}"):
            mounts.append(_bind(f"/{name}", False))
    for name in ETC_FILES:
        if os.path.exists(f"/etc/{name}"):
            mounts.append(_bind(f"/etc/{name}", False))
    if policy.gateway_socket is not None:
        mounts.append(
            {"destination": GATEWAY_PATH, "type": "bind", "source": str(policy.gateway_socket), "options": ["bind"]}
        )
    return mounts


def resources(policy: SandboxPolicy) -> dict[str, Any]:
    """cgroup limits; pids sized in host threads (see IDLE_THREADS), memory plus the sentry's own."""
    processes = policy.pids or DEFAULT_PIDS
    limits: dict[str, Any] = {"pids": {"limit": THREADS_PER_PROCESS * processes + IDLE_THREADS}}
    if policy.memory_mb:
        limit = (policy.memory_mb + SENTRY_MB) << 20
        limits["memory"] = {"limit": limit, "swap": limit}
    if policy.cpu_percent:
        limits["cpu"] = {"quota": policy.cpu_percent * 1000, "period": 100_000}
    return limits


def seccomp_profile() -> dict[str, Any]:
    """The bwrap tier's seccomp rules (``seccomp.spec``) as OCI ``linux.seccomp``, which runsc enforces
    in its own kernel with ``--oci-seccomp``: gVisor would otherwise let a command ptrace its
    children, unshare namespaces or open AF_PACKET sockets (harmless there, but not our policy)."""
    rules = seccomp.spec()

    def deny(name: str, **arg: int | str) -> dict[str, Any]:
        rule: dict[str, Any] = {"names": [name], "action": "SCMP_ACT_ERRNO", "errnoRet": EPERM}
        if arg:
            rule["args"] = [arg]
        return rule

    # No rule for rules["enosys"] (clone3): gVisor answers ENOSYS by itself, and this runsc ignores
    # errnoRet, so such a rule would say EPERM and stop glibc falling back to clone (no threads).
    syscalls = [{"names": rules["denied"], "action": "SCMP_ACT_ERRNO", "errnoRet": EPERM}]
    syscalls += [deny("clone", index=0, value=f, valueTwo=f, op="SCMP_CMP_MASKED_EQ") for f in rules["clone_flags"]]
    for family in rules["families"]:
        syscalls += [deny(name, index=0, value=family, op="SCMP_CMP_EQ") for name in ("socket", "socketpair")]
    syscalls += [
        deny("ioctl", index=1, value=0xFFFFFFFF, valueTwo=request, op="SCMP_CMP_MASKED_EQ")
        for request in rules["ioctls"]
    ]
    for name, index in rules["mode_args"].items():  # no set-id bits, as in bwrap (fchmodat2 is unknown here)
        if name.isidentifier():
            syscalls += [deny(name, index=index, value=bit, valueTwo=bit, op="SCMP_CMP_MASKED_EQ") for bit in SET_ID]
    arch = {"x86_64": "SCMP_ARCH_X86_64", "aarch64": "SCMP_ARCH_AARCH64"}.get(platform.machine(), "SCMP_ARCH_NATIVE")
    return {"defaultAction": "SCMP_ACT_ALLOW", "architectures": [arch], "syscalls": syscalls}


def id_mappings(host_id: int) -> list[dict[str, int]]:
    """Sandbox 65534 is the host user; 0 (runsc's gofer only) is host nobody."""
    nobody = SANDBOX_UID if host_id != SANDBOX_UID else SANDBOX_UID - 1
    return [
        {"containerID": SANDBOX_UID, "hostID": host_id, "size": 1},
        {"containerID": 0, "hostID": nobody, "size": 1},
    ]


def command(policy: SandboxPolicy, argv: Sequence[str], bridge_source: str) -> list[str]:
    """argv itself, or behind the in-sandbox bridge when the policy has a gateway."""
    if policy.gateway_socket is None:
        return list(argv)
    return [BRIDGE_PYTHON, "-I", "-S", "-c", bridge_source, str(policy.proxy_port), GATEWAY_PATH, *argv]


def build_spec(policy: SandboxPolicy, args: Sequence[str]) -> dict[str, Any]:
    """The whole ``config.json`` for one command under ``policy``."""
    env = sandbox_env(policy)
    processes = policy.pids or DEFAULT_PIDS
    return {
        "ociVersion": "1.0.2",
        "root": {"path": "rootfs", "readonly": True},
        "hostname": "sandbox",
        "process": {
            "terminal": False,
            "user": {"uid": SANDBOX_UID, "gid": SANDBOX_UID},
            "args": list(args),
            "env": [f"{k}={v}" for k, v in env.items()],
            "cwd": os.path.abspath(policy.workdir),
            "noNewPrivileges": True,
            "capabilities": CAPABILITIES,
            # gVisor's pids cgroup counts the sentry's host threads, not the command's processes;
            # RLIMIT_NPROC, enforced by gVisor's own kernel for the sandbox's uid, caps those.
            "rlimits": [{"type": "RLIMIT_NPROC", "hard": processes, "soft": processes}],
        },
        "mounts": system_mounts(policy) + policy_mounts(policy),
        "linux": {
            "namespaces": [{"type": t} for t in NAMESPACES],
            "uidMappings": id_mappings(os.getuid()),
            "gidMappings": id_mappings(os.getgid()),
            "resources": resources(policy),
            "seccomp": seccomp_profile(),
        },
    }
