"""``codeevolver doctor``'s verdicts, checked against what this machine really has."""

from __future__ import annotations

import json
import os
import shutil
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
    expected = shutil.which("runsc") is not None and os.geteuid() == 0
    assert reports["gvisor"].available == expected, reports["gvisor"]
    if expected:
        assert "started a probe sandbox" in reports["gvisor"].reason


def test_bwrap_verdict_matches_the_machine(reports: dict[str, TierReport]) -> None:
    if shutil.which("bwrap") is None:
        assert not reports["bwrap"].available
        assert reports["bwrap"].fix and "bubblewrap" in reports["bwrap"].fix


def test_container_reports_the_engine_status(reports: dict[str, TierReport]) -> None:
    container = reports["container"]
    if not container.available:
        assert "docker" in container.reason and "podman" in container.reason
        assert container.fix


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
