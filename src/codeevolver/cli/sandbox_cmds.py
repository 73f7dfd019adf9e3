"""Commands around the sandbox: ``sandbox run``, ``doctor``, ``init docker`` and ``egress``."""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

from codeevolver.errors import ConfigError
from codeevolver.store.rows import AuditRow

sandbox_app = typer.Typer(help="Run commands in a sandbox.", no_args_is_help=True)
init_app = typer.Typer(help="Generate files for your project.", no_args_is_help=True)
out = Console(width=None if sys.stdout.isatty() else 200)
err = Console(stderr=True, width=None if sys.stderr.isatty() else 200)

# Variables a command may keep from the caller: harmless, and programs misbehave without them.
_KEPT_ENV = ("TERM", "LANG", "LC_ALL", "TZ")


@sandbox_app.command("run", context_settings={"allow_extra_args": True, "ignore_unknown_options": True})
def sandbox_run(
    ctx: typer.Context,
    tier: Annotated[str, typer.Option("--tier", help="bwrap | gvisor | container | unsafe")] = "bwrap",
    allow_domain: Annotated[
        list[str] | None, typer.Option("--allow-domain", help="Host reachable via the gateway.")
    ] = None,
    timeout: Annotated[float, typer.Option(help="Wall-clock seconds; exit status 124 when exceeded.")] = 600.0,
    memory: Annotated[int, typer.Option(help="Memory cap in MB.")] = 2048,
    pids: Annotated[int, typer.Option(help="Process cap.")] = 256,
    debug: Annotated[bool, typer.Option("--debug")] = False,
) -> None:
    """Run CMD in a sandbox over the current directory, with the egress gateway in front.

    Usage: codeevolver sandbox run [OPTIONS] -- CMD [ARGS]...
    """
    from codeevolver.cli.main import _guard

    argv = list(ctx.args)
    if argv and argv[0] == "--":
        argv = argv[1:]

    def action() -> int:
        if not argv:
            raise ConfigError("no command given", "write it after --, e.g. codeevolver sandbox run -- python3 -V")
        return run_in_sandbox(argv, tier, allow_domain or [], timeout, memory, pids)

    code = _guard(debug, action)
    raise typer.Exit(code)


def run_in_sandbox(argv: list[str], tier: str, allow: list[str], timeout: float, memory: int, pids: int) -> int:
    from codeevolver.gateway import EgressGateway
    from codeevolver.sandbox import SandboxPolicy, get_sandbox

    sandbox = get_sandbox(tier)
    env = {name: os.environ[name] for name in _KEPT_ENV if name in os.environ}
    policy = SandboxPolicy(workdir=Path.cwd(), env=env, timeout_s=timeout, memory_mb=memory, pids=pids)
    if not sandbox.isolated:
        from codeevolver.sandbox.unsafe import UNPROTECTED

        warning = f"codeevolver: WARNING: the {tier} tier is no sandbox: {UNPROTECTED}"
        err.print(warning, highlight=False, markup=False, soft_wrap=True)
        if allow:
            err.print("codeevolver: --allow-domain is not enforced: no gateway stands in front", highlight=False)
    blocked: list[str] = []

    def audit(rows: Sequence[AuditRow]) -> None:
        for row in rows:
            if row.decision == "blocked":
                blocked.append(f"{row.host}:{row.port} ({row.reason})")

    with EgressGateway(audit=audit) as gateway:
        session = gateway.open_session("cli", run_id="cli", allow=allow)
        try:
            result = sandbox.run(argv, session.apply(policy) if sandbox.isolated else policy)
        finally:
            gateway.close_session(session)
            gateway.flush()
    sys.stdout.write(result.stdout)
    sys.stderr.write(result.stderr)
    if result.timed_out:
        err.print(f"codeevolver: the command ran past {timeout:g} s and was killed", highlight=False)
    for line in blocked:
        err.print(f"codeevolver: egress blocked: {line}", highlight=False, markup=False)
    return result.returncode


def doctor(as_json: Annotated[bool, typer.Option("--json")] = False) -> None:
    """Report which sandbox tiers work on this machine, and how to fix the others."""
    from codeevolver.sandbox.doctor import diagnose

    reports = diagnose()
    if as_json:
        print(json.dumps([r.as_dict() for r in reports]))
        return
    table = Table("tier", "available", "why", "fix")
    for r in reports:
        table.add_row(r.name, "yes" if r.available else "no", r.reason, r.fix or "")
    out.print(table)


@init_app.command("docker")
def init_docker(
    path: Annotated[Path, typer.Argument(help="The project repository.")] = Path("."),
    force: Annotated[bool, typer.Option("--force", help="Overwrite existing files.")] = False,
    debug: Annotated[bool, typer.Option("--debug")] = False,
) -> None:
    """Write a Dockerfile (and .dockerignore) that runs your project under the container tier."""
    from codeevolver.cli.main import _guard
    from codeevolver.sandbox.dockerfile import generate

    def action() -> None:
        if not path.is_dir():
            raise ConfigError(f"{path.resolve()} is not a directory", "pass the project's root folder, or run it there")
        files = generate(path)
        clashes = [name for name in files if (path / name).exists()]
        if clashes and not force:
            raise ConfigError(f"{', '.join(clashes)} already exist(s) in {path.resolve()}", "pass --force to replace")
        for name, text in files.items():
            (path / name).write_text(text, encoding="utf-8")
            out.print(f"wrote {path / name}", highlight=False)

    _guard(debug, action)
