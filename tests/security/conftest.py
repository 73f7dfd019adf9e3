"""Fixtures of the security battery: one sandbox per isolated tier, proved isolated before any attack.

Every case runs a real attempt inside the sandbox and checks the outcome on the
host. Attacks are bounded (fixed process counts, megabytes, seconds) so that a
broken tier fails the battery instead of harming the machine; and the
``sandbox`` fixture first runs a probe (uid, pid namespace, network, pids cap)
so a tier that is not isolated at all errors out before any attack runs.

At the end the terminal summary reports how many cases passed per tier.
"""

from __future__ import annotations

import importlib
import re
import secrets
import textwrap
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
from battery_support import TIERS, policy, run_inside

from codeevolver.sandbox import Sandbox, get_sandbox


@pytest.fixture(scope="session", params=TIERS)
def tier(request: pytest.FixtureRequest) -> str:
    name = request.param
    if name == "gvisor":
        pytest.importorskip("codeevolver.sandbox.gvisor", reason="the gvisor tier is not written yet")
    return name


def _availability(name: str) -> tuple[bool, str]:
    module = importlib.import_module(f"codeevolver.sandbox.{name}")
    check = getattr(module, "available", None)
    return check() if check is not None else (True, "")


@pytest.fixture(scope="session")
def sandbox(tier: str, tmp_path_factory: pytest.TempPathFactory) -> Sandbox:
    """The tier's sandbox, after a probe proved it isolates (else every case of the tier errors)."""
    ok, why = _availability(tier)
    if not ok:
        pytest.fail(f"the {tier} tier cannot run here: {why}")
    box = get_sandbox(tier)
    work = tmp_path_factory.mktemp(f"probe-{tier}")
    probe = textwrap.dedent(
        """
        out["uid"] = os.getuid()
        out["pid1"] = open("/proc/1/cmdline", "rb").read().decode("utf-8", "replace")
        out["ifaces"] = [l.split(":")[0].strip() for l in open("/proc/net/dev").read().splitlines()[2:]]
        n = 0
        for _ in range(40):
            try:
                pid = os.fork()
            except OSError:
                break
            if pid == 0:
                time.sleep(3)
                os._exit(0)
            n += 1
        out["forked"] = n
        """
    )
    result = run_inside(box, probe, policy(work, pids=16, timeout_s=30))
    info = result.data
    host_pid1 = Path("/proc/1/cmdline").read_bytes().decode("utf-8", "replace")
    problems = []
    if info.get("uid") in (None, 0):
        problems.append(f"runs as uid {info.get('uid')}")
    if info.get("pid1") == host_pid1:
        problems.append("shares the host's pid namespace")
    if set(info.get("ifaces") or ["?"]) - {"lo"}:
        problems.append(f"sees network interfaces {info.get('ifaces')}")
    if not isinstance(info.get("forked"), int) or info["forked"] >= 40:
        problems.append(f"has no pids cap (forked {info.get('forked')} of 40 with pids=16)")
    if problems:
        pytest.fail(f"{tier} is not isolated, no attack will run: " + "; ".join(problems) + f"\n{result.stderr}")
    return box


@pytest.fixture
def work(tmp_path: Path) -> Path:
    path = tmp_path / "work"
    path.mkdir()
    return path


@pytest.fixture
def token() -> str:
    return "CE-SECRET-" + secrets.token_hex(12)


_outcomes: Counter[tuple[str, str]] = Counter()
_TIER_ID = re.compile(r"\[(?:[^\]]*-)?(" + "|".join(TIERS) + r")(?:-[^\]]*)?\]")


def pytest_runtest_logreport(report: pytest.TestReport) -> None:
    if "tests/security/" not in report.nodeid.replace("\\", "/"):
        return
    match = _TIER_ID.search(report.nodeid)
    if not match:
        return
    if report.when == "call":
        _outcomes[(match.group(1), report.outcome)] += 1
    elif report.outcome != "passed":  # setup errors and skips count too
        _outcomes[(match.group(1), "skipped" if report.skipped else "error")] += 1


def pytest_terminal_summary(terminalreporter: Any) -> None:
    if not _outcomes:
        return
    terminalreporter.section("security battery")
    for name in TIERS:
        counts = {kind: n for (tier, kind), n in _outcomes.items() if tier == name}
        if not counts:
            continue
        total = sum(counts.values())
        detail = ", ".join(f"{n} {kind}" for kind, n in sorted(counts.items()) if kind != "passed")
        terminalreporter.write_line(
            f"{name}: {counts.get('passed', 0)}/{total} cases passed" + (f" ({detail})" if detail else "")
        )
