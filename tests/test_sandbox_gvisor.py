"""The gvisor tier, for real: every check runs a command in a runsc sandbox and looks at the result on the host."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from codeevolver.sandbox import get_sandbox
from codeevolver.sandbox.base import SandboxPolicy
from codeevolver.sandbox.gvisor import GvisorSandbox, available
from codeevolver.userenv import python_prefixes

OK, WHY = available()
pytestmark = pytest.mark.skipif(not OK, reason=f"gvisor tier unavailable: {WHY}")

PY = "/usr/bin/python3"


@pytest.fixture
def state_dir(tmp_path: Path) -> Path:
    return tmp_path / "runsc-state"


@pytest.fixture
def sandbox(state_dir: Path) -> GvisorSandbox:
    return GvisorSandbox(state_dir)


@pytest.fixture
def worktree(tmp_path: Path) -> Path:
    wt = tmp_path / "worktree"
    wt.mkdir()
    (wt / "input.txt").write_text("from the host\n")
    return wt


def runsc_list(state_dir: Path) -> list[str]:
    if not state_dir.exists():
        return []
    out = subprocess.run(
        ["runsc", f"--root={state_dir}", "list", "--quiet"], capture_output=True, text=True, check=True
    ).stdout
    return out.split()


def runsc_processes(state_dir: Path) -> list[str]:
    """Host processes of sandboxes started with this state dir (sentry, gofer, runsc itself)."""
    out = subprocess.run(["ps", "-eo", "args"], capture_output=True, text=True, check=True).stdout
    return [line for line in out.splitlines() if f"--root={state_dir}" in line]


def test_registered_by_name() -> None:
    assert isinstance(get_sandbox("gvisor"), GvisorSandbox)
    assert get_sandbox("gvisor").isolated


def test_env_is_exactly_the_policy_env(sandbox: GvisorSandbox, worktree: Path) -> None:
    os.environ["CODEEVOLVER_TEST_SECRET"] = "s3cret"
    try:
        result = sandbox.run(["/usr/bin/env"], SandboxPolicy(workdir=worktree, env={"A": "1", "PATH": "/usr/bin"}))
    finally:
        del os.environ["CODEEVOLVER_TEST_SECRET"]
    assert result.returncode == 0, result.stderr
    assert dict(line.split("=", 1) for line in result.stdout.splitlines()) == {
        "A": "1",
        "PATH": "/usr/bin",
        "HOME": "/tmp",
    }


def test_workdir_uid_stdin_and_exit_codes(sandbox: GvisorSandbox, worktree: Path) -> None:
    policy = SandboxPolicy(workdir=worktree)
    result = sandbox.run(["/usr/bin/sh", "-c", "pwd; id -u; cat input.txt; cat; exit 3"], policy, stdin=b"piped in")
    assert result.returncode == 3
    assert result.stdout.splitlines() == [str(worktree), "65534", "from the host", "piped in"]
    assert sandbox.run(["/usr/bin/sh", "-c", "kill -9 $$"], policy).returncode == 137
    missing = sandbox.run(["no-such-program"], policy)
    assert missing.returncode == 127
    assert "no-such-program" in missing.stderr


def test_workdir_is_writable_git_is_not(sandbox: GvisorSandbox, worktree: Path) -> None:
    subprocess.run(["git", "init", "-q", str(worktree)], check=True)
    script = (
        "echo new > made.txt && echo changed > input.txt && "
        "(echo evil > .git/hooks/pre-commit && echo HOOK-WRITTEN; true) && "
        "(echo x >> .git/config && echo CONFIG-WRITTEN; true)"
    )
    result = sandbox.run(["/usr/bin/sh", "-c", script], SandboxPolicy(workdir=worktree))
    assert result.returncode == 0, result.stderr
    assert "WRITTEN" not in result.stdout
    assert (worktree / "made.txt").read_text() == "new\n"
    assert (worktree / "input.txt").read_text() == "changed\n"
    assert not (worktree / ".git/hooks/pre-commit").exists()
    # created files belong to the user who ran the sandbox, not to some sandbox uid
    assert (worktree / "made.txt").stat().st_uid == os.getuid()


def test_host_files_are_invisible(sandbox: GvisorSandbox, worktree: Path, tmp_path: Path) -> None:
    secret = tmp_path / "secret.txt"
    secret.write_text("TOP SECRET")
    probe = (
        "import os, sys\n"
        f"paths = [{str(secret)!r}, '/etc/shadow', '/root', '/home', '/sys/class',"
        " '/run/docker.sock', '/var', '/opt']\n"
        "for p in paths: print(p, os.path.exists(p))\n"
        "print('passwd', open('/etc/passwd').read().count(':x:'))\n"
        "print('pids', sorted(int(d) for d in os.listdir('/proc') if d.isdigit()))\n"
    )
    result = sandbox.run([PY, "-c", probe], SandboxPolicy(workdir=worktree))
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert all(line.endswith("False") for line in lines[:8]), lines
    assert lines[8] == "passwd 1"
    assert lines[9] == "pids [1]"


def test_readonly_venv_is_usable_but_not_writable(sandbox: GvisorSandbox, worktree: Path) -> None:
    python = Path(sys.executable)
    prefixes = python_prefixes(python)
    policy = SandboxPolicy(workdir=worktree, readonly_paths=prefixes)
    probe = "import sys, yaml; print(sys.prefix); open(sys.prefix + '/pwned', 'w')"
    result = sandbox.run([str(python), "-c", probe], policy)
    assert str(prefixes[0]) in result.stdout
    assert "Read-only file system" in result.stderr or "Permission denied" in result.stderr
    assert not (Path(sys.prefix) / "pwned").exists()


def test_writable_paths_are_writable(sandbox: GvisorSandbox, worktree: Path, tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    cache.mkdir()
    policy = SandboxPolicy(workdir=worktree, writable_paths=(cache,))
    result = sandbox.run(["/usr/bin/sh", "-c", f"echo cached > {cache}/x"], policy)
    assert result.returncode == 0, result.stderr
    assert (cache / "x").read_text() == "cached\n"


def test_tmp_is_private_and_capped(sandbox: GvisorSandbox, worktree: Path) -> None:
    policy = SandboxPolicy(workdir=worktree, tmp_mb=8)
    script = "echo inside > /tmp/codeevolver-gvisor-probe; head -c 20000000 /dev/zero > /tmp/fill; echo $?"
    result = sandbox.run(["/usr/bin/sh", "-c", script], policy)
    assert result.stdout.strip() != "0"
    assert "No space left" in result.stderr
    assert not Path("/tmp/codeevolver-gvisor-probe").exists()


def test_timeout_kills_everything(sandbox: GvisorSandbox, worktree: Path, state_dir: Path) -> None:
    script = "nohup sleep 300 >/dev/null 2>&1 & (setsid sleep 300 &) ; echo started; sleep 300"
    result = sandbox.run(["/usr/bin/sh", "-c", script], SandboxPolicy(workdir=worktree, timeout_s=1.5))
    assert result.timed_out
    assert result.returncode == 124
    assert result.duration_s < 15
    assert runsc_list(state_dir) == []
    assert runsc_processes(state_dir) == []


def test_daemons_do_not_outlive_the_command(sandbox: GvisorSandbox, worktree: Path, state_dir: Path) -> None:
    script = "(setsid sh -c 'sleep 2; echo late > late.txt' &); echo done"
    result = sandbox.run(["/usr/bin/sh", "-c", script], SandboxPolicy(workdir=worktree, timeout_s=30))
    assert result.returncode == 0
    assert runsc_list(state_dir) == []
    assert runsc_processes(state_dir) == []
    subprocess.run(["sleep", "3"], check=True)
    assert not (worktree / "late.txt").exists()


def test_memory_limit_kills(sandbox: GvisorSandbox, worktree: Path) -> None:
    policy = SandboxPolicy(workdir=worktree, memory_mb=64, timeout_s=60)
    hog = "b = bytearray(1 << 30); b[::4096] = b'x' * (len(b) // 4096); print('alive')"
    result = sandbox.run([PY, "-c", hog], policy)
    assert result.returncode != 0
    assert "alive" not in result.stdout


def test_fork_bomb_is_capped(sandbox: GvisorSandbox, worktree: Path, state_dir: Path) -> None:
    policy = SandboxPolicy(workdir=worktree, pids=8, timeout_s=60)
    bomb = "import os, time\nfor _ in range(60):\n    if os.fork() == 0:\n        time.sleep(30); os._exit(0)\n"
    bomb += "print('all forked')"
    result = sandbox.run([PY, "-c", bomb], policy)
    assert "all forked" not in result.stdout
    assert result.returncode != 0
    assert runsc_list(state_dir) == []


def test_no_network_without_gateway(sandbox: GvisorSandbox, worktree: Path) -> None:
    probe = (
        "import socket\n"
        "for addr in [('1.1.1.1', 53), ('127.0.0.1', 3128)]:\n"
        "    try:\n"
        "        socket.create_connection(addr, timeout=3); print('CONNECTED', addr)\n"
        "    except OSError as exc:\n"
        "        print('refused', exc)\n"
    )
    result = sandbox.run([PY, "-c", probe], SandboxPolicy(workdir=worktree))
    assert result.returncode == 0, result.stderr
    assert "CONNECTED" not in result.stdout


class EchoGateway:
    """A tiny HTTP server on a host unix socket that answers with the request it saw."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.requests: list[str] = []
        self.server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.server.bind(str(path))
        self.server.listen(16)
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self.server.accept()
            except OSError:
                return
            with conn:
                data = b""
                while b"\r\n\r\n" not in data:
                    chunk = conn.recv(65536)
                    if not chunk:
                        break
                    data += chunk
                head = data.split(b"\r\n\r\n", 1)[0].decode()
                self.requests.append(head)
                body = json.dumps({"request": head.splitlines()[0]}).encode()
                conn.sendall(
                    b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: %d\r\n"
                    b"Connection: close\r\n\r\n%s" % (len(body), body)
                )

    def close(self) -> None:
        self.server.close()


@pytest.fixture
def gateway(tmp_path: Path) -> Iterator[EchoGateway]:
    echo = EchoGateway(tmp_path / "gateway.sock")
    yield echo
    echo.close()


def test_gateway_socket_is_bridged_to_the_proxy_port(
    sandbox: GvisorSandbox, worktree: Path, gateway: EchoGateway
) -> None:
    policy = SandboxPolicy(workdir=worktree, gateway_socket=gateway.path, proxy_port=3199, env={"K": "v"})
    probe = (
        "import os, urllib.request\n"
        "print(os.environ['HTTP_PROXY'], os.environ['HTTPS_PROXY'])\n"
        "print(urllib.request.urlopen('http://example.com/some/path', timeout=10).read().decode())\n"
        "import socket\n"
        "try:\n"
        "    socket.create_connection(('1.1.1.1', 443), timeout=3); print('DIRECT')\n"
        "except OSError:\n"
        "    print('no direct route')\n"
    )
    result = sandbox.run([PY, "-c", probe], policy)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0] == "http://127.0.0.1:3199 http://127.0.0.1:3199"
    assert json.loads(lines[1]) == {"request": "GET http://example.com/some/path HTTP/1.1"}
    assert lines[2] == "no direct route"
    assert gateway.requests and gateway.requests[0].startswith("GET http://example.com/some/path")


def test_gateway_bridge_keeps_exit_status_and_env(sandbox: GvisorSandbox, worktree: Path, gateway: EchoGateway) -> None:
    policy = SandboxPolicy(workdir=worktree, gateway_socket=gateway.path, env={"K": "v"})
    result = sandbox.run(["/usr/bin/sh", "-c", "echo $K; exit 7"], policy)
    assert (result.returncode, result.stdout) == (7, "v\n")
    assert sandbox.run(["no-such-program"], policy).returncode == 127


def test_concurrent_runs(sandbox: GvisorSandbox, worktree: Path, state_dir: Path) -> None:
    results: list[int] = []

    def one(i: int) -> None:
        r = sandbox.run(["/usr/bin/sh", "-c", f"echo {i}"], SandboxPolicy(workdir=worktree, timeout_s=60))
        results.append(int(r.stdout.strip()) if r.returncode == 0 else -1)

    threads = [threading.Thread(target=one, args=(i,)) for i in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(results) == list(range(6))
    assert runsc_list(state_dir) == []


def test_home_outside_the_mounts_is_private(sandbox: GvisorSandbox, worktree: Path) -> None:
    policy = SandboxPolicy(workdir=worktree, env={"HOME": "/root"})
    result = sandbox.run(["/usr/bin/sh", "-c", "echo cache > $HOME/.cache-probe && cat $HOME/.cache-probe"], policy)
    assert (result.returncode, result.stdout) == (0, "cache\n"), result.stderr
    assert not Path("/root/.cache-probe").exists()


def test_real_runner_evaluates_a_program(sandbox: GvisorSandbox, tmp_path: Path) -> None:
    """The evaluator's own policy (venv + runner read-only, HOME from the host) works unchanged in gVisor."""
    from codeevolver.evaluator import Evaluator

    repo = tmp_path / "repo"
    repo.mkdir()
    (repo / "pipeline.py").write_text("def run(inputs, prompts):\n    return {'answer': inputs['q'].upper()}\n")
    metric = "def score(example, output):\n    return float(output['answer'] == example['a'])\n"
    (repo / "metrics.py").write_text(metric)
    evaluator = Evaluator(
        framework="python",
        entry="pipeline:run",
        metric="metrics:score",
        input_keys=["q"],
        sandbox=sandbox,
        python=Path(sys.executable),
        env={},
        per_example_timeout_s=30.0,
    )
    results = evaluator.evaluate(repo, {}, [(0, {"q": "x", "a": "X"}), (1, {"q": "y", "a": "nope"})])
    assert [(r.score, r.error) for r in results] == [(1.0, None), (0.0, None)]


SYSCALL_PROBE = r"""
import ctypes, errno, os, socket
libc = ctypes.CDLL(None, use_errno=True)
def report(name, result):
    print(name, result, errno.errorcode.get(ctypes.get_errno(), 0))
report("ptrace", libc.ptrace(0, 0, 0, 0))
report("unshare", libc.unshare(0x10000000 | 0x40000000))
report("mount", libc.mount(b"none", b"/tmp", b"tmpfs", 0, None))
report("keyctl", libc.syscall(250, 0, 0, 0, 0))
report("bpf", libc.syscall(321, 0, 0, 0))
report("io_uring_setup", libc.syscall(425, 1, 0))
report("syslog", libc.syscall(103, 3, 0, 0))
try:
    socket.socket(17, socket.SOCK_RAW)
    print("AF_PACKET 0 0")
except OSError as exc:
    print("AF_PACKET -1", errno.errorcode[exc.errno])
pid = os.fork()
if pid == 0:
    os._exit(3)
print("fork", os.waitpid(pid, 0)[1] >> 8, 0)
"""


def test_seccomp_policy_is_enforced_inside_gvisor(sandbox: GvisorSandbox, worktree: Path) -> None:
    result = sandbox.run([PY, "-c", SYSCALL_PROBE], SandboxPolicy(workdir=worktree))
    assert result.returncode == 0, result.stderr
    outcome = {name: (int(code), err) for name, code, err in (line.split() for line in result.stdout.splitlines())}
    for name in ("ptrace", "unshare", "mount", "keyctl", "bpf", "io_uring_setup", "syslog", "AF_PACKET"):
        assert outcome[name] == (-1, "EPERM"), (name, outcome[name])
    assert outcome["fork"] == (3, "0")  # ordinary process creation still works
