"""The task every coding agent backend is given: one text, so the backends differ only in how they act.

It carries the change request and CodeEvolver's rules: the worktree is the whole
world, the evaluator's entry point and metric stay callable as they are, the
orchestrator (not the agent) commits, the architecture summary ``codeevolver.md``
is written by the first code mutation and kept current by every later one, and
the agent proves its change by running the program on two examples.
Backend-specific instructions (how to submit, which tools exist) are added by
each backend around this text.
"""

from __future__ import annotations

from pathlib import Path

from codeevolver.agents.base import AgentTask

ARCHITECTURE_FILE = "codeevolver.md"
ARCHITECTURE_CHARS = 6000
"""The summary is quoted in the task up to this many characters (it is meant to be short)."""

_TEMPLATE = """\
Carry out this change request in the repository in the current directory:

<change_request>
{change_request}
</change_request>

## The application

{entry_line}
{architecture}

## Rules

1. Work only inside the current directory (a copy of the application's repository). Do not read or write \
files outside it, and do not install system packages.
2. Keep the program's entry point and the metric intact: do not rename, move or change the signature \
of the functions, classes or modules that the evaluator calls{names}. Change their insides as the request asks. \
Do not touch the datasets or the metric.
3. Do not commit: no `git commit`, `git add`, `git stash`, `git checkout` of other branches, no changes to \
git config or hooks. The orchestrator commits whatever you leave in the working tree.
4. Keep `{architecture_file}` current: {architecture_rule}
5. Self-check before you finish: run the program on two examples of its training data (the files are named \
in `codeevolver.toml`) with `{python}`, calling the entry point the way the evaluator does, and check that \
the metric accepts the output. Keep it small and fast: do not run the full evaluation.
"""


def render_task(task: AgentTask) -> str:
    """The task text for ``task``: change request, application facts, rules and the self-check."""
    if task.entry and task.metric:
        entry_line = (
            f"The evaluator calls the entry point `{task.entry}` on each example and scores its output with "
            f"the metric `{task.metric}` (both `module:attribute`, as in `codeevolver.toml`)."
        )
        names = f" (`{task.entry}` and `{task.metric}`)"
    else:
        entry_line = "The evaluator calls the entry point and the metric named in `codeevolver.toml`."
        names = ""
    summary = _read_summary(task.worktree)
    if summary is None:
        architecture = (
            f"There is no `{ARCHITECTURE_FILE}` yet: you write it (rule 4). Read only what you need to "
            "understand the code the request touches."
        )
        rule = (
            f"this is the first code change of the run, so create `{ARCHITECTURE_FILE}` at the repository root: "
            "a short summary (under 60 lines) of the architecture for the next engineer: the modules, the data "
            "flow from the entry point to the output, where the prompts live, and how the metric scores. "
            "Later changes keep it up to date."
        )
    else:
        architecture = (
            f"`{ARCHITECTURE_FILE}` at the repository root summarises the architecture; its current text:\n\n"
            f"<architecture>\n{summary}\n</architecture>"
        )
        rule = (
            f"if your change alters what `{ARCHITECTURE_FILE}` describes (modules, data flow, prompts), "
            "update it in the same change; keep it short."
        )
    return _TEMPLATE.format(
        change_request=task.change_request.strip(),
        entry_line=entry_line,
        architecture=architecture,
        names=names,
        architecture_file=ARCHITECTURE_FILE,
        architecture_rule=rule,
        python=task.python or "python3",
    )


def _read_summary(worktree: Path) -> str | None:
    """The summary's text, clipped; None when the repository has none (a symlink counts as none)."""
    path = worktree / ARCHITECTURE_FILE
    if path.is_symlink() or not path.is_file():  # never follow a link out of the worktree on the host
        return None
    text = path.read_text(encoding="utf-8", errors="replace").strip()
    if len(text) > ARCHITECTURE_CHARS:
        text = text[:ARCHITECTURE_CHARS] + f"\n[... cut: read {ARCHITECTURE_FILE} for the rest]"
    return text
