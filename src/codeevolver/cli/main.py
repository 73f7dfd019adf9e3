"""The ``codeevolver`` command: builds options, calls the session, prints results.

Every :class:`CodeEvolverError` becomes one message on stderr and exit status 2
(a traceback only with ``--debug``).
"""

from __future__ import annotations

import json
import sys
import traceback
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Annotated, Any, TypeVar

import typer
from rich.console import Console
from rich.table import Table
from rich.text import Text

from codeevolver.cli.progress import ProgressPrinter
from codeevolver.cli.sandbox_cmds import doctor, init_app, sandbox_app
from codeevolver.errors import CodeEvolverError, GitError, RunNotFound

app = typer.Typer(
    name="codeevolver",
    help="Evolve an AI application's prompts and code against a dataset and a metric.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
# Piped output (scripts, tests) gets wide lines, so ids and branch names are never cut short.
out = Console(width=None if sys.stdout.isatty() else 200)
err = Console(stderr=True, width=None if sys.stderr.isatty() else 200)
T = TypeVar("T")

DebugOpt = Annotated[bool, typer.Option("--debug", help="Show tracebacks.")]
PathOpt = Annotated[Path, typer.Option("--path", "-C", help="The project repository.")]
StateOpt = Annotated[
    Path | None, typer.Option("--state-dir", help="Where runs are stored (default REPO/.codeevolver).")
]


def _guard(debug: bool, action: Callable[[], T]) -> T:
    """Run ``action``; turn our errors into one message and exit status 2."""
    try:
        return action()
    except CodeEvolverError as exc:
        if debug:
            traceback.print_exc()
        err.print(Text.assemble(("error: ", "bold red"), exc.message), highlight=False, soft_wrap=True)
        if exc.fix:
            err.print(Text.assemble(("fix: ", "bold"), exc.fix), highlight=False, soft_wrap=True)
        raise typer.Exit(2) from None
    except KeyboardInterrupt:
        err.print("interrupted")
        raise typer.Exit(130) from None
    except Exception as exc:
        if debug:
            traceback.print_exc()
        err.print(Text.assemble(("internal error: ", "bold red"), f"{type(exc).__name__}: {exc}"), highlight=False)
        err.print("please report it; run again with --debug for the traceback", highlight=False)
        raise typer.Exit(1) from None


@app.command()
def optimize(
    path: Annotated[Path, typer.Argument(help="The project repository (holds codeevolver.toml).")] = Path("."),
    model: Annotated[str | None, typer.Option(help="Model the program uses (litellm name).")] = None,
    reflection_model: Annotated[str | None, typer.Option(help="Model that proposes changes.")] = None,
    agent_model: Annotated[str | None, typer.Option(help="Model of the coding agent.")] = None,
    api_base: Annotated[str | None, typer.Option(help="Send every model call to this OpenAI-compatible URL.")] = None,
    mutate: Annotated[str | None, typer.Option(help="prompts | code | both")] = None,
    max_metric_calls: Annotated[int | None, typer.Option(help="Budget in metric calls.")] = None,
    max_usd: Annotated[float | None, typer.Option(help="Budget in US dollars of model usage.")] = None,
    max_minutes: Annotated[float | None, typer.Option(help="Budget in wall-clock minutes.")] = None,
    concurrency: Annotated[int | None, typer.Option(help="Proposals in flight at once.")] = None,
    seed: Annotated[int | None, typer.Option(help="Random seed (reproducible at concurrency 1).")] = None,
    sandbox: Annotated[str | None, typer.Option("--sandbox", help="Sandbox tier.")] = None,
    dangerously_skip_sandbox: Annotated[
        bool, typer.Option("--dangerously-skip-sandbox", help="Allow the unprotected 'unsafe' tier.")
    ] = False,
    state_dir: StateOpt = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print one final JSON object.")] = False,
    debug: DebugOpt = False,
) -> None:
    """Evolve the project at PATH until a budget runs out."""
    from codeevolver.session import RunOptions, start_run

    if mutate is not None and mutate not in ("prompts", "code", "both"):
        _guard(debug, _raise_config(f"--mutate {mutate!r} is not one of prompts, code, both"))
    overrides: dict[str, Any] = {
        "optimize.model": model,
        "optimize.reflection_model": reflection_model,
        "optimize.agent_model": agent_model,
        "optimize.api_base": api_base,
        "optimize.mutate": mutate,
        "optimize.max_metric_calls": max_metric_calls,
        "optimize.max_usd": max_usd,
        "optimize.max_minutes": max_minutes,
        "optimize.concurrency": concurrency,
        "optimize.seed": seed,
        # The opt-in alone means "no sandbox"; with --sandbox it only permits an explicit unsafe tier.
        "sandbox.tier": sandbox or ("unsafe" if dangerously_skip_sandbox else None),
    }
    options = RunOptions(path, overrides, dangerously_skip_sandbox, state_dir)
    printer = ProgressPrinter(err, enabled=not as_json)
    with printer:
        summary = _guard(debug, lambda: start_run(options, printer.update))
    _print_summary(summary, as_json)


@app.command()
def resume(
    run_id: str,
    path: PathOpt = Path("."),
    state_dir: StateOpt = None,
    dangerously_skip_sandbox: Annotated[bool, typer.Option("--dangerously-skip-sandbox")] = False,
    as_json: Annotated[bool, typer.Option("--json")] = False,
    debug: DebugOpt = False,
) -> None:
    """Continue a stopped, failed or killed run within its original budget."""
    from codeevolver.session import resume_run

    printer = ProgressPrinter(err, enabled=not as_json)
    with printer:
        summary = _guard(
            debug,
            lambda: resume_run(run_id, _repo_root(path), state_dir, printer.update, dangerously_skip_sandbox),
        )
    _print_summary(summary, as_json)


@app.command()
def runs(path: PathOpt = Path("."), state_dir: StateOpt = None, debug: DebugOpt = False) -> None:
    """List the runs of this repository."""

    def action() -> None:
        with _store(path, state_dir) as store:
            table = Table("run", "status", "started", "calls", "seed", "best", "best candidate")
            for run in store.list_runs():
                table.add_row(
                    run.id,
                    _status_of(run),
                    f"{run.created_at:%Y-%m-%d %H:%M}",
                    str(run.metric_calls),
                    _fmt(run.seed_score),
                    _fmt(run.best_score),
                    run.best_candidate_id or "",
                )
            out.print(table)

    _guard(debug, action)


@app.command()
def status(
    run_id: Annotated[str | None, typer.Argument()] = None,
    path: PathOpt = Path("."),
    state_dir: StateOpt = None,
    as_json: Annotated[bool, typer.Option("--json")] = False,
    debug: DebugOpt = False,
) -> None:
    """Show one run (the newest when RUN_ID is omitted)."""
    from codeevolver.session import summarize

    def action() -> None:
        with _store(path, state_dir) as store:
            rid = run_id or _newest(store)
            summary = summarize(store, rid)
            run = store.get_run(rid)
            if as_json:
                out.print_json(json.dumps(summary.to_json() | {"iteration": run.iteration, "error": run.error}))
                return
            _print_summary(summary, False)
            if _status_of(run) != run.status:
                out.print(
                    f"[yellow]no sign of life for {_silence(run)}: if its process died, "
                    f"`codeevolver resume {rid}` continues it[/yellow]"
                )
            out.print(f"iterations: {run.iteration}", highlight=False)
            for event in store.events(rid)[-8:]:
                out.print(f"  {event.time:%H:%M:%S} {event.kind} {json.dumps(event.data)[:150]}", highlight=False)

    _guard(debug, action)


@app.command()
def candidates(
    run_id: str,
    path: PathOpt = Path("."),
    state_dir: StateOpt = None,
    show: Annotated[str | None, typer.Option("--show", help="Print one candidate in full.")] = None,
    debug: DebugOpt = False,
) -> None:
    """List a run's candidates, accepted and rejected."""

    def action() -> None:
        with _store(path, state_dir) as store:
            if show:
                _show_candidate(store, run_id, show)
                return
            table = Table("id", "status", "type", "parents", "val score", "branch / reason")
            for c in store.list_candidates(run_id):
                table.add_row(
                    c.id,
                    c.status,
                    c.change_type,
                    ",".join(c.parents),
                    _fmt(c.val_score),
                    c.branch or (c.reason or "")[:70],
                )
            out.print(table)

    _guard(debug, action)


@app.command()
def diff(
    run_id: str,
    candidate: str,
    path: PathOpt = Path("."),
    state_dir: StateOpt = None,
    debug: DebugOpt = False,
) -> None:
    """Show what CANDIDATE changed against the run's starting commit (code and prompts)."""
    from codeevolver.workspace.git import GitWorkspace

    def action() -> None:
        with _store(path, state_dir) as store:
            run = store.get_run(run_id)
            cand = store.get_candidate(run_id, candidate)
            seed = store.list_candidates(run_id)[0]
            repo = Path(run.repo_path)
            ws = GitWorkspace(repo, repo / ".codeevolver" / "work" / "diff")
            out.print(ws.diff(run.base_commit, cand.commit) or "(no code change)", highlight=False, markup=False)
            for name, text in cand.components.items():
                if seed.components.get(name) != text:
                    out.print(f"--- prompt {name} ---", markup=False)
                    out.print(text, highlight=False, markup=False)

    _guard(debug, action)


@app.command()
def apply(
    run_id: str,
    candidate: Annotated[str | None, typer.Argument(help="Default: the run's best candidate.")] = None,
    path: PathOpt = Path("."),
    state_dir: StateOpt = None,
    debug: DebugOpt = False,
) -> None:
    """Check out the best (or given) candidate's branch and write its prompts into the repo."""
    from codeevolver.session import apply_candidate

    def action() -> None:
        with _store(path, state_dir) as store:
            message = apply_candidate(store, run_id, candidate)
        out.print(message, highlight=False)

    _guard(debug, action)


@app.command()
def cancel(run_id: str, path: PathOpt = Path("."), state_dir: StateOpt = None, debug: DebugOpt = False) -> None:
    """Ask a running optimization to stop after saving its state."""

    def action() -> None:
        with _store(path, state_dir) as store:
            run = store.get_run(run_id)
            if run.status != "running":
                raise CodeEvolverError(
                    f"run {run_id} is not running (it is {run.status})",
                    "nothing to cancel; `codeevolver runs` lists the runs",
                )
            store.update_run(run_id, status="cancelling")
        out.print(f"asked run {run_id} to stop; it saves its state and exits")

    _guard(debug, action)


@app.command()
def egress(
    run_id: str,
    path: PathOpt = Path("."),
    state_dir: StateOpt = None,
    blocked: Annotated[bool, typer.Option("--blocked", help="Only blocked requests.")] = False,
    debug: DebugOpt = False,
) -> None:
    """Show a run's egress audit log: every request its sandboxes sent, allowed or blocked."""

    def action() -> None:
        with _store(path, state_dir) as store:
            store.get_run(run_id)
            rows = store.audit(run_id, decision="blocked" if blocked else None)
            table = Table("time", "sandbox", "candidate", "host", "port", "method", "path", "status", "up", "down",
                          "decision", "reason")  # fmt: skip
            for r in rows:
                table.add_row(f"{r.time:%H:%M:%S}", r.sandbox_id, r.candidate_id or "", r.host, str(r.port or ""),
                              r.method or "", (r.path or "")[:60], str(r.status or ""), str(r.bytes_up),
                              str(r.bytes_down), r.decision, r.reason)  # fmt: skip
            out.print(table)
            out.print(f"{len(rows)} request(s)", highlight=False)

    _guard(debug, action)


app.add_typer(sandbox_app, name="sandbox")
app.add_typer(init_app, name="init")
app.command("doctor")(doctor)


# ----- helpers -------------------------------------------------------------


def _raise_config(message: str) -> Callable[[], None]:
    from codeevolver.errors import ConfigError

    def action() -> None:
        raise ConfigError(message, "use --mutate prompts, code or both")

    return action


def _repo_root(path: Path) -> Path:
    import subprocess

    proc = subprocess.run(
        ["git", "rev-parse", "--show-toplevel"], cwd=path, capture_output=True, text=True, check=False
    )
    if proc.returncode != 0:
        raise GitError(
            f"{path.resolve()} is not a git repository", "run the command inside your project, or pass --path"
        )
    return Path(proc.stdout.strip())


def _store(path: Path, state_dir: Path | None) -> Any:
    from codeevolver.session import open_store, state_dir_for

    return open_store(state_dir_for(_repo_root(path), state_dir), create=False)


def _newest(store: Any) -> str:
    runs = store.list_runs()
    if not runs:
        raise RunNotFound("this repository has no runs yet", "start one with `codeevolver optimize`")
    return str(runs[0].id)


def _show_candidate(store: Any, run_id: str, cand_id: str) -> None:
    cand = store.get_candidate(run_id, cand_id)
    out.print(
        f"[bold]{cand.id}[/] {cand.status} {cand.change_type} parents={cand.parents} "
        f"val={_fmt(cand.val_score)} branch={cand.branch or '-'}"
    )
    if cand.reason:
        out.print(f"reason: {cand.reason}", markup=False)
    out.print(f"description: {cand.description}", markup=False)
    for name, text in cand.components.items():
        out.print(f"--- {name} ---\n{text}", markup=False, highlight=False)
    for entry in store.transcript(run_id, cand_id):
        for step in entry.content:
            role = step.get("role", "?") if isinstance(step, dict) else "?"
            content = step.get("content", step) if isinstance(step, dict) else step
            out.print(f"[{role}] {str(content)[:1500]}", markup=False, highlight=False)


def _fmt(value: float | None) -> str:
    return "-" if value is None else f"{value:.3f}"


STALE_AFTER_S = 120
"""A running run silent this long (its engine beats every 15 s) has probably lost its process."""


def _silence(run: Any) -> str:
    seconds = int((datetime.now(UTC) - run.updated_at).total_seconds())
    return f"{seconds // 60}m{seconds % 60:02d}s" if seconds >= 60 else f"{seconds}s"


def _status_of(run: Any) -> str:
    """The stored status, with running runs that stopped beating marked as probably dead."""
    if run.status in ("running", "cancelling"):
        silent = (datetime.now(UTC) - run.updated_at).total_seconds()
        if silent > STALE_AFTER_S:
            return f"{run.status}? (silent {_silence(run)})"
    return str(run.status)


def _print_summary(summary: Any, as_json: bool) -> None:
    if as_json:
        print(json.dumps(summary.to_json()))
        return
    out.print(
        f"run {summary.run_id} {summary.status}: seed {_fmt(summary.seed_score)} -> best "
        f"{_fmt(summary.best_score)} ({summary.best_candidate}) after {summary.metric_calls} metric calls; "
        f"{summary.usage['input_tokens'] + summary.usage['output_tokens']} tokens, ${summary.usage['usd']}",
        highlight=False,
    )
    if summary.reason:
        out.print(f"ended: {summary.reason}", highlight=False, markup=False)
    if summary.best_branch:
        out.print(f"best branch: {summary.best_branch}  (codeevolver apply {summary.run_id})", highlight=False)


def main() -> None:
    app(prog_name="codeevolver")


if __name__ == "__main__":
    main()
