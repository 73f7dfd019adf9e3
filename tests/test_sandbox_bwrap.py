"""The bwrap tier's functional contract: environment, paths, exit codes, timeouts, interpreters, gateway.

Security properties (escapes, limits, kill-everything) are in tests/security/.
"""

from __future__ import annotations

import logging
import os
import socket
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from codeevolver.errors import SandboxError
from codeevolver.evaluator import Evaluator
from codeevolver.sandbox import _bwrap_argv, cgroups, get_sandbox
from codeevolver.sandbox._collect import Collector
from codeevolver.sandbox.base import SandboxPolicy
from codeevolver.sandbox.bwrap import BwrapSandbox, available
from codeevolver.userenv import python_prefixes, resolve_python

OK, WHY = available()
pytestmark = pytest.mark.skipif(not OK, reason=f"bwrap tier unavailable: {WHY}")

SYSTEM_PYTHON = "/usr/bin/python3"


@pytest.fixture
def sandbox() -> BwrapSandbox:
    return BwrapSandbox()


@pytest.fixture
def work(tmp_path: Path) -> Path:
    path = tmp_path / "work"
    path.mkdir()
    return path


def sh(sandbox: BwrapSandbox, script: str, policy: SandboxPolicy, stdin: bytes | None = None):
    return sandbox.run(["/bin/sh", "-c", script], policy, stdin=stdin)


def test_registered_and_available() -> None:
    assert isinstance(get_sandbox("bwrap"), BwrapSandbox)
    assert OK, WHY
    assert "cgroup v" in WHY


def test_environment_is_exactly_the_policy(sandbox: BwrapSandbox, work: Path, monkeypatch) -> None:
    monkeypatch.setenv("HOST_ONLY_VARIABLE", "leak")
    result = sandbox.run(["/usr/bin/env"], SandboxPolicy(workdir=work, env={"A": "1", "B": "two words"}))
    env = dict(line.split("=", 1) for line in result.stdout.splitlines())
    expected = {"A": "1", "B": "two words", "PATH": _bwrap_argv.DEFAULT_PATH, "HOME": "/tmp", "PWD": str(work)}
    assert env == expected  # bwrap always sets PWD to the directory it starts in


def test_given_path_and_home_are_kept(sandbox: BwrapSandbox, work: Path) -> None:
    policy = SandboxPolicy(workdir=work, env={"PATH": "/usr/bin", "HOME": "/tmp/h"})
    result = sh(sandbox, 'echo "$PATH $HOME"', policy)
    assert result.stdout.strip() == "/usr/bin /tmp/h"


def test_starts_in_workdir_and_writes_reach_the_host(sandbox: BwrapSandbox, work: Path) -> None:
    result = sh(sandbox, "pwd; echo hello > out.txt; id -u; id -un", SandboxPolicy(workdir=work))
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == [str(work), "65534", "sandbox"]
    assert (work / "out.txt").read_text() == "hello\n"


@pytest.mark.parametrize(("script", "code"), [("exit 0", 0), ("exit 3", 3), ("exit 255", 255), ("kill -9 $$", 137)])
def test_exit_codes(sandbox: BwrapSandbox, work: Path, script: str, code: int) -> None:
    result = sh(sandbox, script, SandboxPolicy(workdir=work))
    assert (result.returncode, result.timed_out) == (code, False)


def test_stdout_stderr_and_stdin(sandbox: BwrapSandbox, work: Path) -> None:
    data = os.urandom(300_000).hex().encode()
    result = sh(sandbox, "cat; echo oops >&2", SandboxPolicy(workdir=work), stdin=data)
    assert result.stdout.encode() == data
    assert result.stderr == "oops\n"


def test_timeout_is_124_and_prompt(sandbox: BwrapSandbox, work: Path) -> None:
    started = time.monotonic()
    result = sh(sandbox, "echo before; sleep 30", SandboxPolicy(workdir=work, timeout_s=1.0))
    assert (result.returncode, result.timed_out) == (124, True)
    assert result.stdout == "before\n"
    assert time.monotonic() - started < 5


def test_missing_command_is_a_result_not_an_error(sandbox: BwrapSandbox, work: Path) -> None:
    result = sandbox.run(["/no/such/program"], SandboxPolicy(workdir=work))
    assert result.returncode == 127
    assert "/no/such/program" in result.stderr


def test_missing_workdir_is_a_sandbox_error(sandbox: BwrapSandbox, tmp_path: Path) -> None:
    with pytest.raises(SandboxError, match="does not exist"):
        sandbox.run(["/bin/true"], SandboxPolicy(workdir=tmp_path / "nope"))


def test_binding_the_root_is_refused(sandbox: BwrapSandbox, work: Path) -> None:
    with pytest.raises(SandboxError, match="whole host"):
        sandbox.run(["/bin/true"], SandboxPolicy(workdir=work, readonly_paths=(Path("/"),)))


def test_readonly_and_writable_paths(sandbox: BwrapSandbox, work: Path, tmp_path: Path) -> None:
    ro = tmp_path / "ro"
    rw = tmp_path / "rw"
    ro.mkdir()
    rw.mkdir()
    (ro / "data.txt").write_text("visible")
    policy = SandboxPolicy(workdir=work, readonly_paths=(ro,), writable_paths=(rw,))
    script = (
        f"cat {ro}/data.txt; echo; echo x > {ro}/new 2>/dev/null || echo ro-refused; echo y > {rw}/new && echo rw-ok"
    )
    result = sh(sandbox, script, policy)
    assert result.stdout.split() == ["visible", "ro-refused", "rw-ok"]
    assert not (ro / "new").exists()
    assert (rw / "new").read_text() == "y\n"


def test_readonly_path_inside_the_workdir_stays_readonly(sandbox: BwrapSandbox, work: Path) -> None:
    (work / "vendor").mkdir()
    policy = SandboxPolicy(workdir=work, readonly_paths=(work / "vendor",))
    result = sh(sandbox, "touch vendor/x 2>/dev/null || echo refused; touch y && echo ok", policy)
    assert result.stdout.split() == ["refused", "ok"]


def test_git_dir_of_the_workdir_is_readonly(sandbox: BwrapSandbox, work: Path) -> None:
    subprocess.run(["git", "init", "-q", str(work)], check=True)
    result = sh(sandbox, "echo evil > .git/hooks/pre-commit 2>/dev/null || echo refused", SandboxPolicy(workdir=work))
    assert result.stdout.strip() == "refused"
    assert not (work / ".git" / "hooks" / "pre-commit").exists()


def test_home_outside_the_binds_is_a_private_writable_tmpfs(sandbox: BwrapSandbox, work: Path) -> None:
    policy = SandboxPolicy(workdir=work, env={"HOME": "/root"})
    result = sh(sandbox, "mkdir -p ~/.cache/x && echo hi > ~/.cache/x/f && ls -A ~", policy)
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == [".cache"]  # nothing of the host's /root
    assert not Path("/root/.cache/x/f").exists()


def test_system_python_runs(sandbox: BwrapSandbox, work: Path) -> None:
    result = sandbox.run([SYSTEM_PYTHON, "-c", "import ssl, json, sqlite3; print('ok')"], SandboxPolicy(workdir=work))
    assert result.stdout.strip() == "ok", result.stderr


@pytest.fixture(scope="module")
def venv_python(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An empty venv of our own base interpreter (pyenv's, under /root/.pyenv on this machine)."""
    empty = tmp_path_factory.mktemp("empty-repo")
    return resolve_python(empty, cache_dir=tmp_path_factory.mktemp("envs"))


def test_venv_python_runs_with_its_prefixes(sandbox: BwrapSandbox, work: Path, venv_python: Path) -> None:
    prefixes = python_prefixes(venv_python)
    code = "import sys, json, ssl; print(sys.prefix); print(sys.base_prefix)"
    result = sandbox.run([str(venv_python), "-c", code], SandboxPolicy(workdir=work, readonly_paths=prefixes))
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == [str(venv_python.parent.parent), os.path.realpath(prefixes[-1])]


def test_venv_python_is_invisible_without_its_prefixes(sandbox: BwrapSandbox, work: Path, venv_python: Path) -> None:
    result = sandbox.run([str(venv_python), "-c", "pass"], SandboxPolicy(workdir=work))
    assert result.returncode == 127


def test_evaluator_runs_the_real_runner_in_bwrap(work: Path, venv_python: Path) -> None:
    (work / "pipeline.py").write_text("def run(inputs, prompts):\n    return {'answer': inputs['q'].upper()}\n")
    (work / "metrics.py").write_text("def m(example, output):\n    return float(output['answer'] == example['a'])\n")
    evaluator = Evaluator(
        framework="python",
        entry="pipeline:run",
        metric="metrics:m",
        input_keys=["q"],
        sandbox=BwrapSandbox(),
        python=venv_python,
        env={},
        per_example_timeout_s=10.0,
    )
    results = evaluator.evaluate(work, {}, [(0, {"q": "a", "a": "A"}), (1, {"q": "b", "a": "x"})])
    assert [r.score for r in results] == [1.0, 0.0]


def test_cpu_quota_slows_a_busy_loop(sandbox: BwrapSandbox, work: Path) -> None:
    code = (
        "import os, time\nend = time.time() + 1.5\nwhile time.time() < end: pass\n"
        "t = os.times()\nprint(t.user + t.system)"
    )
    result = sandbox.run([SYSTEM_PYTHON, "-c", code], SandboxPolicy(workdir=work, cpu_percent=20))
    assert result.returncode == 0, result.stderr
    assert float(result.stdout) < 0.7  # about 0.3 s of CPU in 1.5 s at 20 %


def test_pids_limit_applies(sandbox: BwrapSandbox, work: Path) -> None:
    code = (
        "import os, time\nn = 0\ntry:\n    for _ in range(40):\n        if os.fork() == 0:\n"
        "            time.sleep(2); os._exit(0)\n        n += 1\nexcept OSError: pass\nprint(n)"
    )
    result = sandbox.run([SYSTEM_PYTHON, "-c", code], SandboxPolicy(workdir=work, pids=10, timeout_s=20))
    assert int(result.stdout) == 9  # the interpreter itself is the tenth


def test_no_cgroup_left_behind(sandbox: BwrapSandbox, work: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    made: list[Path] = []
    original = cgroups.RunGroup.__init__

    def recording(self: cgroups.RunGroup, found: cgroups.Layout, limits: cgroups.Limits) -> None:
        original(self, found, limits)
        made.extend(self.dirs.values())

    monkeypatch.setattr(cgroups.RunGroup, "__init__", recording)
    for _ in range(3):
        sh(sandbox, "sleep 5 & exit 0", SandboxPolicy(workdir=work))
    sh(sandbox, "sleep 5", SandboxPolicy(workdir=work, timeout_s=0.5))
    assert len(made) == 4 * len(cgroups.layout().parents)
    assert [path for path in made if path.exists()] == []


def test_many_runs_from_threads(sandbox: BwrapSandbox, work: Path) -> None:
    results: dict[int, str] = {}

    def one(i: int) -> None:
        results[i] = sh(sandbox, f"echo {i}", SandboxPolicy(workdir=work)).stdout.strip()

    threads = [threading.Thread(target=one, args=(i,)) for i in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert results == {i: str(i) for i in range(8)}


# --- the gateway bridge -------------------------------------------------------------------------


@pytest.fixture
def gateway(tmp_path: Path) -> Iterator[Path]:
    """A unix-socket HTTP server standing in for the egress gateway: answers with what it was asked."""
    path = tmp_path / "gateway.sock"
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    server.bind(str(path))
    server.listen(16)
    stop = threading.Event()

    def serve() -> None:
        while not stop.is_set():
            try:
                conn, _ = server.accept()
            except OSError:
                return
            with conn:
                request = conn.recv(65536).split(b"\r\n", 1)[0]
                body = b"via gateway: " + request
                conn.sendall(b"HTTP/1.0 200 OK\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body))

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    yield path
    stop.set()
    server.close()


PROXY_CLIENT = """
import os, urllib.request
print(os.environ["HTTP_PROXY"], os.environ["HTTPS_PROXY"], os.environ["NO_PROXY"])
print(urllib.request.urlopen("http://example.com/x", timeout=5).read().decode())
"""


def test_gateway_is_the_only_way_out(sandbox: BwrapSandbox, work: Path, gateway: Path) -> None:
    policy = SandboxPolicy(workdir=work, gateway_socket=gateway, proxy_port=3128, timeout_s=20)
    result = sandbox.run([SYSTEM_PYTHON, "-c", PROXY_CLIENT], policy)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0] == "http://127.0.0.1:3128 http://127.0.0.1:3128 localhost,127.0.0.1,::1"
    assert lines[1] == "via gateway: GET http://example.com/x HTTP/1.1"
    assert "gateway.sock" not in sh(sandbox, "ls -R /run 2>&1; env", policy).stdout


def test_other_port_and_no_gateway_mean_no_network(sandbox: BwrapSandbox, work: Path, gateway: Path) -> None:
    probe = (
        "import socket\ntry:\n    socket.create_connection(('127.0.0.1', 3128), 2)\n    print('open')\n"
        "except OSError:\n    print('closed')"
    )
    with_gateway = SandboxPolicy(workdir=work, gateway_socket=gateway, proxy_port=8080)
    assert sandbox.run([SYSTEM_PYTHON, "-c", probe], with_gateway).stdout.strip() == "closed"
    assert sandbox.run([SYSTEM_PYTHON, "-c", probe], SandboxPolicy(workdir=work)).stdout.strip() == "closed"


HELD_CLIENT = """
import socket
s = socket.create_connection(("127.0.0.1", 3128), 5)
s.sendall(b"GET http://example.com/ HTTP/1.1\\r\\nHost: example.com\\r\\n\\r\\n")
print("sent")
"""


def test_a_relay_still_open_when_the_sandbox_ends_is_dropped_quietly(
    sandbox: BwrapSandbox, work: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """The command exits while the gateway has not answered yet: the relay is cancelled without a traceback."""
    path = tmp_path / "held.sock"
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    server.bind(str(path))
    server.listen(4)
    held: list[socket.socket] = []

    def accept() -> None:
        while True:
            try:
                held.append(server.accept()[0])  # never answered
            except OSError:
                return

    threading.Thread(target=accept, daemon=True).start()
    policy = SandboxPolicy(workdir=work, gateway_socket=path, proxy_port=3128, timeout_s=20)
    with caplog.at_level(logging.DEBUG, logger="asyncio"):
        result = sandbox.run([SYSTEM_PYTHON, "-c", HELD_CLIENT], policy)
        time.sleep(0.5)  # the relay loop's callbacks for the cancelled connection run by now
    server.close()
    for conn in held:
        conn.close()
    assert result.returncode == 0 and result.stdout.strip() == "sent", result.stderr
    assert len(held) == 1, "the connection reached the gateway through the relay"
    assert [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING] == []


# --- pieces -------------------------------------------------------------------------------------


def test_mount_order_puts_deeper_and_readonly_paths_on_top(tmp_path: Path) -> None:
    work = tmp_path / "w"
    (work / ".git").mkdir(parents=True)
    policy = SandboxPolicy(
        workdir=work, readonly_paths=(work / "lib", tmp_path), writable_paths=(work / "lib" / "out",)
    )
    mounts = _bwrap_argv.user_mounts(policy, "/root")
    assert mounts == [
        ("home", "/root"),
        ("ro", str(tmp_path)),
        ("rw", str(work)),
        ("ro", str(work / ".git")),
        ("ro", str(work / "lib")),
        ("rw", str(work / "lib" / "out")),
    ]


def test_collector_caps_output_without_blocking_the_writer() -> None:
    proc = subprocess.Popen(
        ["/bin/sh", "-c", "head -c 3000000 /dev/zero; echo done >&2"], stdout=subprocess.PIPE, stderr=subprocess.PIPE
    )
    collector = Collector(proc, None, limit=1000)
    assert collector.pump(time.monotonic() + 10)
    proc.wait()
    assert collector.text(0).startswith("\0" * 1000 + "\n[codeevolver: output truncated")
    assert collector.text(1) == "done\n"
    collector.close()


V1_MOUNTINFO = """\
31 23 0:28 / /sys/fs/cgroup rw,relatime - tmpfs tmpfs rw,mode=755
32 31 0:29 / /sys/fs/cgroup/cpu rw,relatime - cgroup cgroup rw,cpu
35 31 0:32 / /sys/fs/cgroup/memory rw,relatime - cgroup cgroup rw,memory
37 31 0:34 / /sys/fs/cgroup/freezer rw,relatime - cgroup cgroup rw,freezer
39 31 0:36 / /sys/fs/cgroup/pids rw,relatime - cgroup cgroup rw,pids
41 31 0:38 / /sys/fs/cgroup/unified rw,relatime - cgroup2 cgroup2 rw
"""
V1_SELF = "8:pids:/\n6:freezer:/\n4:memory:/jobs/abc\n1:cpu:/\n0::/\n"


def test_cgroup_v1_layout_nests_under_our_own_groups() -> None:
    found = cgroups.detect(V1_MOUNTINFO, V1_SELF)
    assert found.version == 1
    assert found.parents == {
        "cpu": Path("/sys/fs/cgroup/cpu"),
        "memory": Path("/sys/fs/cgroup/memory/jobs/abc"),
        "freezer": Path("/sys/fs/cgroup/freezer"),
        "pids": Path("/sys/fs/cgroup/pids"),
    }


def test_cgroup_v2_layout_is_chosen_when_it_has_the_controllers(tmp_path: Path) -> None:
    (tmp_path / "cgroup.controllers").write_text("cpuset cpu io memory pids\n")
    mountinfo = f"30 23 0:26 / {tmp_path} rw - cgroup2 cgroup2 rw\n"
    found = cgroups.detect(mountinfo, "0::/user.slice/session-1.scope\n")
    assert found == cgroups.Layout(2, {"": tmp_path / "codeevolver"})


def test_cgroup_without_pids_controller_is_unavailable() -> None:
    with pytest.raises(cgroups.CgroupUnavailable, match="pids"):
        cgroups.detect(V1_MOUNTINFO.replace("rw,pids", "rw,blkio"), V1_SELF)
