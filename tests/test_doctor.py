"""``codeevolver doctor``'s verdicts, checked against what this machine really has."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from codeevolver.sandbox import TIERS
from codeevolver.sandbox.doctor import ORDER, TierReport, diagnose, split_fix


@pytest.fixture(scope="module")
def reports() -> dict[str, TierReport]:
    return {r.name: r for r in diagnose()}


def test_every_tier_is_reported_in_order(reports: dict[str, TierReport]) -> None:
    assert list(reports)[: len(ORDER)] == list(ORDER)
    assert set(TIERS) <= set(reports)
    for report in reports.values():
        assert report.reason, report
        assert (report.fix is None) == report.available, report  # a fix exactly when something is wrong
    json.dumps([r.as_dict() for r in reports.values()])


def test_unsafe_is_always_available_with_its_warning(reports: dict[str, TierReport]) -> None:
    unsafe = reports["unsafe"]
    assert unsafe.available
    assert "unprotected" in unsafe.reason and "--dangerously-skip-sandbox" in unsafe.reason


def test_modal_is_hosted_only(reports: dict[str, TierReport]) -> None:
    modal = reports["modal"]
    assert not modal.available
    assert "hosted only" in modal.reason
    assert "modal package" in modal.reason and "token" in modal.reason


def test_gvisor_verdict_matches_the_machine(reports: dict[str, TierReport]) -> None:
    gvisor = reports["gvisor"]
    expected = shutil.which("runsc") is not None and os.geteuid() == 0
    if expected:  # runsc is there and we are root: the probe sandbox must have started
        assert gvisor.available, gvisor
        assert "started a probe sandbox" in gvisor.reason and gvisor.reason.startswith(shutil.which("runsc") or "?")
    else:
        assert not gvisor.available, gvisor
        assert "runsc" in gvisor.reason and gvisor.fix


def test_bwrap_verdict_matches_the_machine(reports: dict[str, TierReport]) -> None:
    bwrap, binary = reports["bwrap"], shutil.which("bwrap")
    if binary is None:
        assert not bwrap.available
        assert bwrap.fix and "bubblewrap" in bwrap.fix
        return
    unshares = subprocess.run([binary, "--unshare-all", "--ro-bind", "/", "/", "true"], capture_output=True).returncode
    if bwrap.available:  # then bwrap really can unshare here, and the report says with what
        assert unshares == 0
        assert re.fullmatch(rf"{re.escape(binary)}, cgroup v[12], seccomp, gateway via (host relay|socat bridge)",
                            bwrap.reason), bwrap.reason  # fmt: skip
    else:
        assert bwrap.reason and bwrap.fix, bwrap


def _engine_answers(name: str) -> bool:
    path = shutil.which(name)
    if path is None:
        return False
    return subprocess.run([path, "info"], capture_output=True, timeout=30, stdin=subprocess.DEVNULL).returncode == 0


def test_container_reports_the_engine_status(reports: dict[str, TierReport]) -> None:
    container = reports["container"]
    answering = [name for name in ("docker", "podman") if _engine_answers(name)]
    assert container.available == bool(answering), (container, answering)
    if answering:
        assert container.reason.startswith(f"{answering[0]} at ")
        assert "runtime" in container.reason
    else:
        assert "docker" in container.reason and "podman" in container.reason
        assert container.fix
        for name in ("docker", "podman"):  # each engine's state is named: missing, or installed but silent
            if shutil.which(name) is None:
                assert f"{name} not installed" in container.reason
            else:
                assert re.search(rf"{name} (is installed but its engine does not answer|info failed)", container.reason)


def test_missing_runsc_and_engines_come_with_fixes(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PATH", str(tmp_path))
    reports = {r.name: r for r in diagnose()}
    assert not reports["gvisor"].available
    assert "not installed" in reports["gvisor"].reason
    assert reports["gvisor"].fix == "apt-get install runsc"
    assert not reports["container"].available
    assert reports["container"].fix and "Docker" in reports["container"].fix


def test_split_fix() -> None:
    assert split_fix("runsc missing; fix: apt-get install runsc") == ("runsc missing", "apt-get install runsc")
    assert split_fix("bad thing\n  fix: do it") == ("bad thing", "do it")
    assert split_fix("all good") == ("all good", None)
