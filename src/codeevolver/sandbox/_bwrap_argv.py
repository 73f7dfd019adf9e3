"""What the bwrap sandbox sees: its filesystem, its environment and its namespaces, as bwrap flags.

Everything is built from the policy alone so it can be read and tested without
running anything. The view is an empty tmpfs root made read-only at the end,
holding only: ``/usr`` (and the ``/bin`` ``/lib`` ... links), a handful of
``/etc`` files that programs need (the loader cache, CA certificates, and a
synthetic passwd/group/hosts naming the sandbox user; never the host's
passwd or shadow), a private read-only ``/proc``, a private ``/dev``, size-capped tmpfs
``/tmp`` and ``/dev/shm``, and the policy's paths at their host locations.
"""

from __future__ import annotations

import atexit
import os
import shutil
import tempfile
import threading
from pathlib import Path

from codeevolver.sandbox.base import SandboxPolicy

UID = 65534
GID = 65534
USER = "sandbox"
HOSTNAME = "sandbox"
DEFAULT_PATH = "/usr/local/bin:/usr/bin:/bin"
PROXY_VARS = ("HTTP_PROXY", "HTTPS_PROXY", "http_proxy", "https_proxy")
NO_PROXY = "localhost,127.0.0.1,::1"
TOP_LINKS = ("bin", "lib", "lib32", "lib64", "libx32", "sbin")
ETC_FILES = (
    "ld.so.cache",
    "ssl/certs",
    "ssl/openssl.cnf",
    "ca-certificates.conf",
    "alternatives",
    "mime.types",
)
"""Host /etc entries that are public and that common programs fail without. Nothing else of /etc."""

SYNTHETIC_ETC = {
    "passwd": f"{USER}:x:{UID}:{GID}:CodeEvolver sandbox:/tmp:/bin/sh\n",
    "group": f"{USER}:x:{GID}:\n",
    "hosts": f"127.0.0.1\tlocalhost {HOSTNAME}\n::1\tlocalhost ip6-localhost ip6-loopback\n",
    "nsswitch.conf": "passwd: files\ngroup: files\nshadow: files\nhosts: files\n",
}

_skeleton: Path | None = None
_skeleton_lock = threading.Lock()


def skeleton() -> Path:
    """A private host directory holding the synthetic /etc files, made once per process."""
    global _skeleton
    with _skeleton_lock:
        if _skeleton is None:
            path = Path(tempfile.mkdtemp(prefix="codeevolver-etc-"))
            path.chmod(0o755)
            for name, text in SYNTHETIC_ETC.items():
                (path / name).write_text(text)
                (path / name).chmod(0o444)
            atexit.register(shutil.rmtree, path, True)
            _skeleton = path
        return _skeleton


def sandbox_env(policy: SandboxPolicy) -> dict[str, str]:
    """Exactly the policy's environment, plus PATH/HOME defaults and, with a gateway, the proxy.

    bwrap itself adds ``PWD`` (the workdir), as a shell would.
    """
    env = dict(policy.env)
    env.setdefault("PATH", DEFAULT_PATH)
    env.setdefault("HOME", "/tmp")
    if policy.gateway_socket is not None:
        proxy = f"http://127.0.0.1:{policy.proxy_port}"
        for name in PROXY_VARS:
            env[name] = proxy
        env["NO_PROXY"] = env["no_proxy"] = NO_PROXY
    return env


def _abs(path: Path | str) -> str:
    return os.path.normpath(os.path.abspath(path))


def _inside(path: str, parent: str) -> bool:
    return path == parent or path.startswith(parent.rstrip("/") + "/")


def user_mounts(policy: SandboxPolicy, home: str) -> list[tuple[str, str]]:
    """(kind, path) for the policy's paths, shallow first so deeper ones land on top.

    kind is ``ro``, ``rw`` or ``home`` (a private tmpfs for a HOME no writable path
    covers, so tools that write caches there work and nothing reaches the host).
    At the same path ``ro`` wins: it is mounted last.
    """
    workdir = _abs(policy.workdir)
    entries: dict[str, str] = {}
    for path in (workdir, *map(_abs, policy.writable_paths)):
        entries[path] = "rw"
    for path in map(_abs, policy.readonly_paths):
        entries[path] = "ro"
    git = os.path.join(workdir, ".git")
    if os.path.lexists(git) and not os.path.islink(git):
        entries[git] = "ro"  # hooks and config written here would run on the host
    for path in entries:
        if path == "/":
            raise ValueError("binding / would expose the whole host filesystem")
    writable = [p for p, kind in entries.items() if kind == "rw"] + ["/tmp"]
    readonly = [p for p, kind in entries.items() if kind == "ro"] + ["/usr", "/proc", "/dev", "/etc"]
    if home != "/" and not any(_inside(home, p) for p in writable + readonly) and home not in entries:
        entries[home] = "home"
    rank = {"home": 0, "rw": 1, "ro": 2}
    return sorted(((kind, path) for path, kind in entries.items()), key=lambda e: (e[1].count("/"), rank[e[0]], e[1]))


def system_mounts() -> list[str]:
    """The read-only host system: /usr, its top-level links, and the public bits of /etc."""
    args = ["--ro-bind", "/usr", "/usr"]
    for name in TOP_LINKS:
        path = f"/{name}"
        if os.path.islink(path):
            args += ["--symlink", os.readlink(path), path]
        elif os.path.isdir(path):
            args += ["--ro-bind", path, path]
    for name in ETC_FILES:
        path = f"/etc/{name}"
        if os.path.exists(path):
            args += ["--ro-bind", path, path]
    if os.path.islink("/etc/localtime"):
        args += ["--symlink", os.readlink("/etc/localtime"), "/etc/localtime"]
    etc = skeleton()
    for name in SYNTHETIC_ETC:
        args += ["--ro-bind", str(etc / name), f"/etc/{name}"]
    return args


def build(
    policy: SandboxPolicy,
    argv: list[str],
    *,
    bwrap: str,
    seccomp_fd: int,
    status_fd: int,
    block_fd: int,
    gateway_inside: str | None = None,
) -> list[str]:
    """The full bwrap command line for ``argv`` under ``policy``."""
    env = sandbox_env(policy)
    tmp_bytes = str(max(1, policy.tmp_mb) * 1024 * 1024)
    args = [
        bwrap,
        "--unshare-all",
        "--unshare-user",
        "--disable-userns",
        "--uid",
        str(UID),
        "--gid",
        str(GID),
        "--cap-drop",
        "ALL",
        "--die-with-parent",
        "--new-session",
        "--hostname",
        HOSTNAME,
        *system_mounts(),
        "--proc",
        "/proc",
        "--remount-ro",  # sysctls, sysrq-trigger, irq affinities: root-owned, guarded by uid alone
        "/proc",
        "--dev",
        "/dev",
        *("--perms", "1777", "--size", tmp_bytes, "--tmpfs", "/tmp"),
        *("--perms", "1777", "--size", tmp_bytes, "--tmpfs", "/dev/shm"),
    ]
    for kind, path in user_mounts(policy, env["HOME"]):
        if kind == "home":
            args += ["--perms", "0700", "--size", tmp_bytes, "--tmpfs", path]
        else:
            args += ["--ro-bind-try" if kind == "ro" else "--bind-try", path, path]
    if gateway_inside is not None and policy.gateway_socket is not None:
        args += ["--bind", _abs(policy.gateway_socket), gateway_inside]
    args += ["--remount-ro", "/", "--chdir", _abs(policy.workdir), "--clearenv"]
    for name, value in env.items():
        args += ["--setenv", name, value]
    args += ["--seccomp", str(seccomp_fd), "--json-status-fd", str(status_fd), "--block-fd", str(block_fd)]
    return [*args, "--", *argv]
