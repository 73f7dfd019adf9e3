"""The sandbox policy as an OCI runtime bundle (``config.json`` + a rootfs of empty dirs).

Shared by the ``gvisor`` tier (``runsc run``) and, for env and mount rules, the
``container`` tier. Paths are mounted at their host paths so argv written for the host
(the venv's python, the runner script) works unchanged inside.

Ownership: the process runs as uid/gid 65534 and the spec adds a user namespace mapping
65534 to the *host* user that owns the run (and 0, which runsc's gofer needs, to host
nobody). So the worktree is writable as it would be for that user, files created inside
belong to that user on the host, and runsc's own sandbox and gofer processes run as host
``nobody``, not root.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from codeevolver.sandbox.base import SandboxPolicy

SANDBOX_UID = 65534
GATEWAY_PATH = "/run/codeevolver/gateway.sock"
"""Where the gateway's unix socket appears inside the sandbox."""
BRIDGE_PYTHON = "/usr/bin/python3"
DEFAULT_PATH = "/usr/local/bin:/usr/bin:/bin"
DEFAULT_PIDS = 128
"""Processes allowed when the policy sets none: a fork bomb must never reach the host."""
SENTRY_MB = 32
"""Headroom for gVisor's own kernel, charged to the same cgroup as the command (measured: a
128 MB limit without it let a command hold ~115 MB; an 8 MB one killed runsc itself)."""
THREADS_PER_PROCESS = 17
IDLE_THREADS = 50
"""runsc's pids.limit counts host threads of the sandbox: ~43 idle, ~17 per process inside."""

ROOTFS_DIRS = ("usr", "etc/ssl", "proc", "dev", "tmp", "sys", "run/codeevolver")
ROOTFS_LINKS = {"bin": "usr/bin", "lib": "usr/lib", "lib64": "usr/lib64", "sbin": "usr/sbin"}
CAPABILITIES: dict[str, list[str]] = {k: [] for k in ("bounding", "effective", "permitted", "inheritable", "ambient")}
NAMESPACES = ("pid", "ipc", "uts", "mount", "network", "user")


def sandbox_env(policy: SandboxPolicy) -> dict[str, str]:
    """Exactly ``policy.env``, plus PATH/HOME defaults and the proxy variables when a gateway exists."""
    env = dict(policy.env)
    env.setdefault("PATH", DEFAULT_PATH)
    env.setdefault("HOME", "/tmp")
    if policy.gateway_socket is not None:
        proxy = f"http://127.0.0.1:{policy.proxy_port}"
        for key in ("HTTP_PROXY", "HTTPS_PROXY", "http_proxy", "https_proxy"):
            env.setdefault(key, proxy)
        for key in ("NO_PROXY", "no_proxy"):
            env.setdefault(key, "127.0.0.1,localhost")
    return env


def make_rootfs(rootfs: Path) -> None:
    """A read-only root of empty mount points: nothing of the host is visible unless mounted."""
    for name in ROOTFS_DIRS:
        (rootfs / name).mkdir(parents=True, exist_ok=True)
    for name, target in ROOTFS_LINKS.items():
        os.symlink(target, rootfs / name)
    etc = rootfs / "etc"
    (etc / "ld.so.cache").touch()
    (etc / "resolv.conf").touch()
    (etc / "hosts").write_text("127.0.0.1 localhost\n::1 localhost\n")
    (etc / "passwd").write_text(f"nobody:x:{SANDBOX_UID}:{SANDBOX_UID}:nobody:/tmp:/usr/sbin/nologin\n")
    (etc / "group").write_text(f"nogroup:x:{SANDBOX_UID}:\n")
    (rootfs / GATEWAY_PATH.lstrip("/")).touch()


def _bind(path: Path, writable: bool) -> dict[str, Any]:
    options = ["rbind", "rw" if writable else "ro", "nosuid", "nodev"]
    return {"destination": str(path), "type": "bind", "source": os.path.realpath(path), "options": options}


def policy_mounts(policy: SandboxPolicy) -> list[dict[str, Any]]:
    """User-visible mounts, parents before children so a read-only path inside a writable one wins."""
    binds: list[tuple[Path, bool]] = [(Path(policy.workdir), True)]
    binds += [(Path(p), True) for p in policy.writable_paths]
    binds += [(Path(p), False) for p in policy.readonly_paths]
    git = Path(policy.workdir) / ".git"
    if git.exists() or git.is_symlink():
        binds.append((git, False))
    seen: dict[str, bool] = {}
    for path, writable in binds:
        if path.exists():
            key = os.path.abspath(path)
            seen[key] = writable and seen.get(key, True)  # read-only wins when a path is named twice
    ordered = sorted(seen.items(), key=lambda item: len(Path(item[0]).parts))
    return [_bind(Path(p), w) for p, w in ordered]


def system_mounts(policy: SandboxPolicy) -> list[dict[str, Any]]:
    """proc, private /dev and size-capped /tmp, the host's /usr and CA certificates read-only."""
    mounts: list[dict[str, Any]] = [
        {"destination": "/proc", "type": "proc", "source": "proc"},
        {"destination": "/dev", "type": "tmpfs", "source": "tmpfs", "options": ["nosuid", "noexec", "mode=755"]},
        {
            "destination": "/tmp",
            "type": "tmpfs",
            "source": "tmpfs",
            "options": ["nosuid", "nodev", f"size={policy.tmp_mb}m", "mode=1777"],
        },
        {"destination": "/sys", "type": "tmpfs", "source": "tmpfs", "options": ["ro", "nosuid", "nodev", "noexec"]},
        {"destination": "/usr", "type": "bind", "source": "/usr", "options": ["rbind", "ro", "nodev"]},
    ]
    for extra in ("/etc/ssl", "/etc/ld.so.cache"):
        if os.path.exists(extra):
            mounts.append({"destination": extra, "type": "bind", "source": extra, "options": ["rbind", "ro", "nodev"]})
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
            "rlimits": [{"type": "RLIMIT_NOFILE", "hard": 4096, "soft": 4096}],
        },
        "mounts": system_mounts(policy) + policy_mounts(policy),
        "linux": {
            "namespaces": [{"type": t} for t in NAMESPACES],
            "uidMappings": id_mappings(os.getuid()),
            "gidMappings": id_mappings(os.getgid()),
            "resources": resources(policy),
        },
    }
