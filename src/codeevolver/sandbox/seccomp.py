"""The seccomp filter of the bwrap tier, compiled once per process.

Our interpreter may not be the system's, and libseccomp's Python binding ships
only with the distribution (Debian's ``python3-seccomp``). So the classic BPF
program is built by a short ``/usr/bin/python3`` subprocess the first time it
is needed and the bytes are cached; each run hands them to bwrap as a memfd
(``--seccomp FD``). Default action is ALLOW: the filter removes the kernel
surface that sandbox escapes and host snooping use, it is not a whitelist.
A foreign architecture (i386 ``int 0x80``, x32) hits libseccomp's bad-arch
action, which kills the process, so the filter cannot be sidestepped that way.
"""

from __future__ import annotations

import json
import os
import subprocess
import threading
from typing import Any

SYSTEM_PYTHONS = ("/usr/bin/python3", "/usr/local/bin/python3", "/bin/python3")
FIX = "apt-get install python3-seccomp (libseccomp's Python binding for the system python3)"

DENIED = (
    # looking into or controlling other processes
    "ptrace",
    "process_vm_readv",
    "process_vm_writev",
    "process_madvise",
    "pidfd_getfd",
    # the filesystem view: mounts and namespaces
    "mount",
    "umount2",
    "pivot_root",
    "chroot",
    "move_mount",
    "open_tree",
    "fsopen",
    "fsmount",
    "fsconfig",
    "fspick",
    "mount_setattr",
    "unshare",
    "setns",
    # kernel attack surface with a long CVE history
    "bpf",
    "keyctl",
    "add_key",
    "request_key",
    "perf_event_open",
    "userfaultfd",
    "io_uring_setup",
    "io_uring_enter",
    "io_uring_register",
    "fanotify_init",
    "open_by_handle_at",
    # the machine itself
    "kexec_load",
    "kexec_file_load",
    "init_module",
    "finit_module",
    "delete_module",
    "syslog",
    "acct",
    "swapon",
    "swapoff",
    "reboot",
    "quotactl",
)
"""Syscalls that fail with EPERM whatever their arguments."""

ENOSYS = ("clone3", "openat2")
"""clone3 and openat2 hide their flags in memory a filter cannot read; ENOSYS makes libc fall back."""

CLONE_NAMESPACE_FLAGS = {
    "CLONE_NEWNS": 0x00020000,
    "CLONE_NEWCGROUP": 0x02000000,
    "CLONE_NEWUTS": 0x04000000,
    "CLONE_NEWIPC": 0x08000000,
    "CLONE_NEWUSER": 0x10000000,
    "CLONE_NEWPID": 0x20000000,
    "CLONE_NEWNET": 0x40000000,
}
SOCKET_FAMILIES = {"AF_KEY": 15, "AF_PACKET": 17, "AF_VSOCK": 40}
IOCTLS = {"TIOCSTI": 0x5412, "TIOCLINUX": 0x541C}
"""Terminal ioctls that push keystrokes into (or read) a terminal someone else reads."""
MODE_ARGS = {
    "chmod": 1,
    "fchmod": 1,
    "fchmodat": 2,
    "452": 2,  # fchmodat2 (Linux 6.6), by number: newer than libseccomp 2.5's table; same number on every arch
    "open": 2,
    "openat": 3,
    "creat": 1,
    "mknod": 1,
    "mknodat": 2,
}
"""Where each file-mode-setting syscall takes its mode: setuid/setgid bits there are refused, so the
sandbox cannot leave a set-id program in the worktree for someone on the host to run."""

_GENERATOR = r"""
import errno, json, sys, seccomp
spec = json.load(sys.stdin)
f = seccomp.SyscallFilter(seccomp.ALLOW)
eperm = seccomp.ERRNO(errno.EPERM)
for name in spec["denied"]:
    f.add_rule(eperm, name)
for name in spec["enosys"]:
    f.add_rule(seccomp.ERRNO(errno.ENOSYS), name)
for flag in spec["clone_flags"]:
    f.add_rule(eperm, "clone", seccomp.Arg(0, seccomp.MASKED_EQ, flag, flag))
for family in spec["families"]:
    f.add_rule(eperm, "socket", seccomp.Arg(0, seccomp.EQ, family))
    f.add_rule(eperm, "socketpair", seccomp.Arg(0, seccomp.EQ, family))
for request in spec["ioctls"]:
    f.add_rule(eperm, "ioctl", seccomp.Arg(1, seccomp.MASKED_EQ, 0xFFFFFFFF, request))
for name, index in spec["mode_args"].items():
    for bit in (0o4000, 0o2000):
        f.add_rule(eperm, int(name) if name.isdigit() else name, seccomp.Arg(index, seccomp.MASKED_EQ, bit, bit))
f.export_bpf(sys.stdout)
"""

_lock = threading.Lock()
_cached: bytes | None = None


class SeccompUnavailable(RuntimeError):
    """No system interpreter here can compile the filter."""


def spec() -> dict[str, Any]:
    """The rules as data, so tests and docs can see what is denied."""
    return {
        "denied": list(DENIED),
        "enosys": list(ENOSYS),
        "clone_flags": list(CLONE_NAMESPACE_FLAGS.values()),
        "families": list(SOCKET_FAMILIES.values()),
        "ioctls": list(IOCTLS.values()),
        "mode_args": dict(MODE_ARGS),
    }


def oci_profile() -> dict[str, Any]:
    """The same rules as an OCI ``linux.seccomp`` section, for tiers that take a runtime spec."""
    errno_eperm = {"action": "SCMP_ACT_ERRNO", "errnoRet": 1}

    def masked(index: int, value: int, mask: int | None = None) -> dict[str, Any]:
        return {
            "index": index,
            "value": mask if mask is not None else value,
            "valueTwo": value,
            "op": "SCMP_CMP_MASKED_EQ",
        }

    rules: list[dict[str, Any]] = [
        {"names": list(DENIED), **errno_eperm},
        {"names": list(ENOSYS), "action": "SCMP_ACT_ERRNO", "errnoRet": 38},
    ]
    rules += [{"names": ["clone"], **errno_eperm, "args": [masked(0, flag)]} for flag in CLONE_NAMESPACE_FLAGS.values()]
    for family in SOCKET_FAMILIES.values():
        arg = {"index": 0, "value": family, "op": "SCMP_CMP_EQ"}
        rules.append({"names": ["socket", "socketpair"], **errno_eperm, "args": [arg]})
    rules += [{"names": ["ioctl"], **errno_eperm, "args": [masked(1, req, 0xFFFFFFFF)]} for req in IOCTLS.values()]
    for name, index in MODE_ARGS.items():
        label = "fchmodat2" if name == "452" else name
        rules += [{"names": [label], **errno_eperm, "args": [masked(index, bit)]} for bit in (0o4000, 0o2000)]
    return {"defaultAction": "SCMP_ACT_ALLOW", "architectures": ["SCMP_ARCH_X86_64"], "syscalls": rules}


def program() -> bytes:
    """The compiled BPF program; built on first use, then served from memory."""
    global _cached
    with _lock:
        if _cached is None:
            _cached = _compile()
        return _cached


def memfd() -> int:
    """A fresh read-only-positioned fd holding the program, for one bwrap to consume."""
    fd = os.memfd_create("codeevolver-seccomp", os.MFD_CLOEXEC)
    try:
        os.write(fd, program())
        os.lseek(fd, 0, os.SEEK_SET)
    except BaseException:
        os.close(fd)
        raise
    return fd


def _compile() -> bytes:
    problems = []
    payload = json.dumps(spec()).encode()
    for python in SYSTEM_PYTHONS:
        if not os.path.exists(python):
            continue
        try:
            proc = subprocess.run(
                [python, "-I", "-c", _GENERATOR],
                input=payload,
                capture_output=True,
                timeout=30,
                env={},
            )
        except (OSError, subprocess.TimeoutExpired) as exc:
            problems.append(f"{python}: {exc}")
            continue
        if proc.returncode == 0 and proc.stdout and len(proc.stdout) % 8 == 0:
            return proc.stdout
        tail = proc.stderr.decode("utf-8", "replace").strip().splitlines()
        problems.append(f"{python}: {tail[-1] if tail else f'exit {proc.returncode}'}")
    raise SeccompUnavailable("; ".join(problems) or "no system python3 found")
