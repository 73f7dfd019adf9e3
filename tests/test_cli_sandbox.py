"""The sandbox commands as a user runs them: ``sandbox run``, ``doctor``, ``init docker``."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from codeevolver.sandbox.bwrap import available as bwrap_available
from scripted import cli_env

needs_bwrap = pytest.mark.skipif(not bwrap_available()[0], reason="bwrap is not usable here")


def cli_in(cwd: Path, *args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "codeevolver.cli.main", *args], cwd=cwd, capture_output=True, text=True,
        env=cli_env(), timeout=timeout,
    )  # fmt: skip


@needs_bwrap
def test_sandbox_run_starts_in_the_current_directory_and_exits_with_the_commands_status(tmp_path: Path) -> None:
    script = "pwd; id -u; echo made > out.txt; exit 3"
    proc = cli_in(tmp_path, "sandbox", "run", "--", "sh", "-c", script)
    assert proc.returncode == 3, proc.stderr
    assert proc.stdout.split() == [str(tmp_path), "65534"]
    assert (tmp_path / "out.txt").read_text() == "made\n"


@needs_bwrap
def test_sandbox_run_timeout_is_124(tmp_path: Path) -> None:
    proc = cli_in(tmp_path, "sandbox", "run", "--timeout", "1", "--", "sleep", "30")
    assert proc.returncode == 124
    assert "ran past 1 s and was killed" in proc.stderr


@needs_bwrap
def test_sandbox_run_reports_what_the_gateway_blocked(tmp_path: Path) -> None:
    fetch = (
        "import urllib.request, urllib.error\n"
        "try:\n    urllib.request.urlopen('http://blocked.invalid/x', timeout=10)\n"
        "except urllib.error.HTTPError as e:\n    print('status', e.code)\n"
    )
    proc = cli_in(tmp_path, "sandbox", "run", "--allow-domain", "example.com", "--", "/usr/bin/python3", "-c", fetch)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "status 403"
    assert "egress blocked: blocked.invalid:80" in proc.stderr


def test_sandbox_run_without_a_command_is_a_clear_error(tmp_path: Path) -> None:
    proc = cli_in(tmp_path, "sandbox", "run")
    assert proc.returncode == 2
    assert "no command given" in proc.stderr and "Traceback" not in proc.stderr


def test_sandbox_run_unsafe_warns_that_nothing_is_protected(tmp_path: Path) -> None:
    proc = cli_in(tmp_path, "sandbox", "run", "--tier", "unsafe", "--allow-domain", "x.org", "--", "true")
    assert proc.returncode == 0
    assert "WARNING: the unsafe tier is no sandbox" in proc.stderr
    assert "--allow-domain is not enforced" in proc.stderr


def test_doctor_json_reports_every_tier(tmp_path: Path) -> None:
    proc = cli_in(tmp_path, "doctor", "--json")
    assert proc.returncode == 0, proc.stderr
    tiers = {row["name"]: row for row in json.loads(proc.stdout)}
    assert {"bwrap", "gvisor", "container", "unsafe"} <= set(tiers)
    assert tiers["unsafe"]["available"] is True
    assert tiers["bwrap"]["available"] is bwrap_available()[0]
    for row in tiers.values():
        assert row["available"] or row["fix"], f"{row['name']} is unavailable without a fix"


def test_init_docker_writes_files_once_and_refuses_to_overwrite(tmp_path: Path) -> None:
    project = tmp_path / "project"
    project.mkdir()
    (project / "requirements.txt").write_text("requests\n")
    first = cli_in(tmp_path, "init", "docker", str(project))
    assert first.returncode == 0, first.stderr
    written = sorted(os.listdir(project))
    assert written == ["Dockerfile.codeevolver", "Dockerfile.codeevolver.dockerignore", "requirements.txt"]
    dockerfile = (project / "Dockerfile.codeevolver").read_text()
    assert "requirements.txt" in dockerfile
    again = cli_in(tmp_path, "init", "docker", str(project))
    assert again.returncode == 2 and "--force" in again.stderr and "Traceback" not in again.stderr
    assert (project / "Dockerfile.codeevolver").read_text() == dockerfile
    assert cli_in(tmp_path, "init", "docker", str(project), "--force").returncode == 0
    missing = cli_in(tmp_path, "init", "docker", str(tmp_path / "nope"))
    assert missing.returncode == 2 and "is not a directory" in missing.stderr
