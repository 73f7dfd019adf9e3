"""The read-only reflection agent that writes a code change request, and the constraint check.

Code-mutation reflection is a small tool-calling loop: the reflection model reads the parent's
worktree with four read-only tools (``read_file``, ``grep``, ``glob``, ``list_dir``) and ends
by calling ``submit_change_request`` with a structured request (what, where, why, expected
effect) that is rendered into the coding agent's task. The tools are plain Python in the
orchestrator over an exported directory: nothing in the worktree is executed, no path may leave
it (every path is resolved, symlinks included, and checked), and each call returns a bounded
number of bytes.

Mode: the agent alternates by proposal number. The n-th code change of a run (n counted from
the run's code-change history, so it survives a resume) is a *fix* when n is even, aimed at
the failing examples shown, and an *explore* when n is odd, asked for a structurally different
design than anything in the history. Both modes see the history (what earlier code changes
tried and how they ended) and are told not to repeat an idea that was rejected or failed.

:meth:`ReflectionAgent.run` returns ``None`` when the model cannot do this (it answers in plain
text, calls unknown tools, runs out of steps or the endpoint refuses tool calls); the caller
then falls back to the single-call reflection, so a model without tool support never breaks a
run.

:func:`check_constraints` asks the reflection model, once, whether a change request violates
the user's ``additional_instructions``, and parses a strict JSON verdict. An unparseable
verdict counts as no violation (logged), so a flaky checker never blocks a run.
"""

from __future__ import annotations

import fnmatch
import json
import logging
import os
import re
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from codeevolver.errors import ModelError
from codeevolver.models.base import LanguageModel
from codeevolver.proposers.reflective import render

log = logging.getLogger("codeevolver.reflection")

MAX_STEPS = 12
MAX_TOOL_BYTES = 12_000
"""Cap on what one tool call returns to the model, so a big file cannot flood the context."""
MAX_FILE_BYTES = 1_000_000
"""Files larger than this are not searched by ``grep``."""
MAX_LINE_CHARS = 400
MAX_MATCHES = 80
MAX_INVALID_IN_A_ROW = 3
SKIP_DIRS = frozenset({".git", "__pycache__", "node_modules", ".venv", "venv", ".mypy_cache", ".pytest_cache"})

Mode = Literal["fix", "explore"]


class ToolError(Exception):
    """A tool call the agent may not make or that cannot succeed; its message goes back to the model."""


class WorktreeTools:
    """Read-only views of one directory. Every path is relative to ``root`` and must stay inside it."""

    def __init__(self, root: Path, max_bytes: int = MAX_TOOL_BYTES) -> None:
        self.root = Path(os.path.realpath(root))
        self.max_bytes = max_bytes

    def resolve(self, path: str) -> Path:
        """The real path of ``path``; refuse absolute paths and anything (symlinks too) that leaves the root."""
        if not isinstance(path, str) or "\x00" in path:
            raise ToolError("the path must be a string")
        path = path.strip() or "."
        if os.path.isabs(path) or path.startswith("~"):
            raise ToolError(f"{path}: absolute paths are refused; give a path relative to the repository root")
        real = Path(os.path.realpath(self.root / path))
        if not real.is_relative_to(self.root):
            raise ToolError(f"{path}: refused, it resolves outside the repository")
        return real

    def _rel(self, path: Path) -> str:
        return path.relative_to(self.root).as_posix()

    def read_file(self, path: str, start: int | None = None, end: int | None = None) -> str:
        real = self.resolve(path)
        if not real.is_file():
            raise ToolError(f"{path}: no such file" + (" (it is a directory)" if real.is_dir() else ""))
        data = _read_prefix(real, MAX_FILE_BYTES)
        if b"\x00" in data[:8192]:
            raise ToolError(f"{path}: binary file, not shown")
        lines = data.decode("utf-8", "replace").splitlines()
        first = max(1, int(start or 1))
        last = min(len(lines), int(end) if end else len(lines))
        out: list[str] = []
        size = 0
        for number in range(first, last + 1):
            line = f"{number:5}| {_clip_line(lines[number - 1])}"
            size += len(line) + 1
            if size > self.max_bytes:
                out.append(f"[truncated at line {number - 1} of {len(lines)}; call read_file with start={number}]")
                break
            out.append(line)
        return "\n".join(out) if out else f"(no lines {first}-{last}; the file has {len(lines)} lines)"

    def list_dir(self, path: str = ".") -> str:
        real = self.resolve(path)
        if not real.is_dir():
            raise ToolError(f"{path}: not a directory")
        rows = []
        for entry in sorted(os.scandir(real), key=lambda e: e.name):
            if entry.is_symlink():
                rows.append(f"{entry.name}@ (symlink)")
            elif entry.is_dir(follow_symlinks=False):
                rows.append(f"{entry.name}/")
            else:
                rows.append(f"{entry.name} ({entry.stat(follow_symlinks=False).st_size} bytes)")
        return self._cap("\n".join(rows) or "(empty directory)")

    def glob(self, pattern: str) -> str:
        _check_pattern(pattern)
        matches = [rel for rel in self._walk() if _glob_match(rel, pattern)]
        return self._cap("\n".join(matches) or f"(no files match {pattern})")

    def grep(self, pattern: str, glob: str | None = None) -> str:
        """Lines matching a regular expression (a literal string when it is not one), as ``path:line: text``."""
        if glob:
            _check_pattern(glob)
        regex = _compile(pattern)
        deadline = time.monotonic() + 5.0
        hits: list[str] = []
        for rel in self._walk():
            if glob and not _glob_match(rel, glob):
                continue
            data = _read_prefix(self.root / rel, MAX_FILE_BYTES)
            if b"\x00" in data[:8192]:
                continue
            for number, line in enumerate(data.decode("utf-8", "replace").splitlines(), start=1):
                clipped = _clip_line(line)
                if regex.search(clipped):
                    hits.append(f"{rel}:{number}: {clipped.strip()}")
                if len(hits) >= MAX_MATCHES or time.monotonic() > deadline:
                    hits.append("[stopped: too many matches or too slow; narrow the pattern or the glob]")
                    return self._cap("\n".join(hits))
        return self._cap("\n".join(hits) or f"(no matches for {pattern!r})")

    def _walk(self) -> list[str]:
        """Regular files under the root, relative, never through a symlink."""
        found: list[str] = []
        for top, dirs, files in os.walk(self.root, followlinks=False):
            dirs[:] = sorted(d for d in dirs if d not in SKIP_DIRS and not os.path.islink(os.path.join(top, d)))
            for name in sorted(files):
                full = Path(top) / name
                if not full.is_symlink():
                    found.append(self._rel(full))
        return found

    def _cap(self, text: str) -> str:
        encoded = text.encode("utf-8")
        if len(encoded) <= self.max_bytes:
            return text
        return encoded[: self.max_bytes].decode("utf-8", "ignore") + "\n[truncated; narrow the request]"


def _read_prefix(path: Path, limit: int) -> bytes:
    with path.open("rb") as handle:
        return handle.read(limit)


def _clip_line(line: str) -> str:
    return line if len(line) <= MAX_LINE_CHARS else line[:MAX_LINE_CHARS] + " …"


def _check_pattern(pattern: str) -> None:
    if not isinstance(pattern, str) or not pattern.strip():
        raise ToolError("the pattern must be a non-empty string")
    if os.path.isabs(pattern) or ".." in Path(pattern).parts:
        raise ToolError(f"{pattern}: patterns are relative to the repository root and may not use '..'")


def _glob_match(rel: str, pattern: str) -> bool:
    """fnmatch on the relative path (``*`` crosses '/'), also on the basename for a pattern without '/'."""
    pattern = pattern.removeprefix("./")
    if fnmatch.fnmatchcase(rel, pattern):
        return True
    if pattern.startswith("**/") and fnmatch.fnmatchcase(rel, pattern[3:]):
        return True
    return "/" not in pattern and fnmatch.fnmatchcase(rel.rsplit("/", 1)[-1], pattern)


def _compile(pattern: str) -> re.Pattern[str]:
    if not isinstance(pattern, str) or not pattern or len(pattern) > 200:
        raise ToolError("the pattern must be a string of 1 to 200 characters")
    try:
        return re.compile(pattern)
    except re.error:
        return re.compile(re.escape(pattern))


def _tool(name: str, description: str, properties: dict[str, Any], required: list[str]) -> dict[str, Any]:
    return {
        "type": "function",
        "function": {
            "name": name,
            "description": description,
            "parameters": {"type": "object", "properties": properties, "required": required},
        },
    }


_STR = {"type": "string"}
TOOLS: list[dict[str, Any]] = [
    _tool(
        "read_file",
        "Read a text file of the repository, with line numbers. start/end (1-based, inclusive) select lines.",
        {"path": _STR, "start": {"type": "integer"}, "end": {"type": "integer"}},
        ["path"],
    ),
    _tool(
        "grep",
        "Search the repository's files for a Python regular expression; optional glob filters files (e.g. '*.py').",
        {"pattern": _STR, "glob": _STR},
        ["pattern"],
    ),
    _tool(
        "glob", "List the repository's files matching a glob pattern, e.g. '**/*.py'.", {"pattern": _STR}, ["pattern"]
    ),
    _tool("list_dir", "List one directory of the repository ('.' is the root).", {"path": _STR}, ["path"]),
    _tool(
        "submit_change_request",
        "Finish: submit the ONE code change the coding agent should make. Call this exactly once, at the end.",
        {
            "what": {"type": "string", "description": "the concrete change to make"},
            "where": {"type": "array", "items": _STR, "description": "the file(s) to change, relative paths"},
            "why": {"type": "string", "description": "the failure or limitation it addresses, with evidence"},
            "expected_effect": {"type": "string", "description": "the effect on the metric you expect"},
        },
        ["what", "where", "why", "expected_effect"],
    ),
]
READ_TOOLS = frozenset({"read_file", "grep", "glob", "list_dir"})


@dataclass(frozen=True)
class ChangeRequest:
    """The structured change request the reflection agent submits."""

    what: str
    where: list[str]
    why: str
    expected_effect: str

    def render(self) -> str:
        """The text the coding agent is given."""
        files = ", ".join(self.where) or "(the agent decides)"
        return (
            f"What to change: {self.what}\n"
            f"Where: {files}\n"
            f"Why: {self.why}\n"
            f"Expected effect on the metric: {self.expected_effect}"
        )

    @classmethod
    def from_arguments(cls, arguments: dict[str, Any]) -> ChangeRequest:
        where = arguments.get("where") or []
        if isinstance(where, str):
            where = [part.strip() for part in where.split(",") if part.strip()]
        fields = {key: str(arguments.get(key) or "").strip() for key in ("what", "why", "expected_effect")}
        missing = [key for key, value in fields.items() if not value]
        if missing:
            raise ToolError(f"submit_change_request is missing {', '.join(missing)}; call it again with every field")
        return cls(fields["what"], [str(w) for w in where], fields["why"], fields["expected_effect"])


SYSTEM = """You are the architect of an AI application that is being improved automatically. You
propose ONE concrete change to the application's CODE (not only its prompt wording) for a
coding agent to carry out. You may read the repository with the tools read_file, grep, glob
and list_dir (read-only; paths are relative to the repository root). Look at the code that
produced the failures before you decide. You have at most {steps} tool calls. Finish by calling
submit_change_request exactly once, with what to change, where (files), why and the expected
effect on the metric. Be specific and brief."""

MODE_TEXT: dict[Mode, str] = {
    "fix": "FIX OBSERVED FAILURES. Find in the code the root cause of the failing examples above "
    "and propose the smallest change that fixes it.",
    "explore": "EXPLORE A NEW DESIGN. Propose a structurally different approach (a new step, another way "
    "of calling the model, better post-processing, a new predictor), not a variation of what earlier "
    "changes tried.",
}

TASK = """## Files in the repository
{files}

## Current prompts (components)
{components}

## Recent results on a minibatch
{records}

## Earlier code changes in this run and how they did
{history}
{instructions}
## Mode for this proposal
{mode}

## Rules
- Keep the program's entry point `{entry}` and the metric `{metric}` with their signatures.
- Do not touch the datasets or the metric.
- Do not repeat an idea that an earlier change tried and that was rejected or failed.
"""


def choose_mode(history: list[str]) -> Mode:
    """Even-numbered code changes of a run fix failures, odd-numbered ones explore."""
    return "fix" if len(history) % 2 == 0 else "explore"


def task_prompt(
    *,
    files: list[str],
    components: dict[str, str],
    records: list[dict[str, str]],
    history: list[str],
    additional_instructions: str,
    entry: str,
    metric: str,
    mode: Mode,
) -> str:
    instructions = (
        f"\n## Constraints and ideas from the user\n{additional_instructions}\n" if additional_instructions else ""
    )
    return TASK.format(
        files="\n".join(files[:200]) + (f"\n… and {len(files) - 200} more" if len(files) > 200 else ""),
        components="\n".join(f"### {k}\n{v}" for k, v in components.items()) or "(none)",
        records=render(records),
        history="\n".join(f"- {h}" for h in history[-10:]) or "(none yet)",
        instructions=instructions,
        mode=MODE_TEXT[mode],
        entry=entry,
        metric=metric,
    )


@dataclass
class ReflectionResult:
    """What the loop produced: a request, or ``None`` with why the caller must fall back."""

    request: ChangeRequest | None
    fallback_reason: str = ""
    transcript: list[dict[str, Any]] = field(default_factory=list)


class _GaveUp(Exception):
    """Ends the loop early; its message is the fallback reason."""


@dataclass
class _Loop:
    used_tools: bool = False
    invalid_in_a_row: int = 0

    def invalid(self, what: str) -> None:
        """Count a useless reply; a model that keeps making them cannot do this, so give up."""
        self.invalid_in_a_row += 1
        if self.invalid_in_a_row >= MAX_INVALID_IN_A_ROW:
            raise _GaveUp(f"{MAX_INVALID_IN_A_ROW} {what} in a row")


class ReflectionAgent:
    """A read-only tool loop over a worktree that ends in a structured change request."""

    def __init__(self, lm: LanguageModel, max_steps: int = MAX_STEPS) -> None:
        self.lm = lm
        self.max_steps = max_steps

    def run(self, root: Path, prompt: str, candidate_id: str | None = None) -> ReflectionResult:
        """Never raises for the model's inability to use tools; returns a fallback reason instead."""
        tools = WorktreeTools(root)
        messages: list[dict[str, Any]] = [
            {"role": "system", "content": SYSTEM.format(steps=self.max_steps)},
            {"role": "user", "content": prompt},
        ]
        state = _Loop()
        try:
            for step in range(self.max_steps):
                if step == self.max_steps - 1:
                    messages.append({"role": "user", "content": "Last step: call submit_change_request now."})
                request = self._step(messages, tools, state, candidate_id)
                if request is not None:
                    return ReflectionResult(request, transcript=messages)
            raise _GaveUp(f"no change request after {self.max_steps} steps")
        except _GaveUp as stop:
            return ReflectionResult(None, str(stop), messages)
        except ModelError as exc:  # e.g. an endpoint that refuses tool calls; the single call may still work
            return ReflectionResult(None, f"the tool-calling request failed: {exc.message}", messages)

    def _step(
        self, messages: list[dict[str, Any]], tools: WorktreeTools, state: _Loop, candidate_id: str | None
    ) -> ChangeRequest | None:
        reply = self.lm.complete(messages, purpose="reflection", tools=TOOLS, candidate_id=candidate_id)
        messages.append(reply.message)
        if not reply.tool_calls:
            if not state.used_tools:
                raise _GaveUp("the model answered without calling a tool")
            state.invalid("replies without a tool call")
            messages.append({"role": "user", "content": "Call a tool; finish with submit_change_request."})
            return None
        state.used_tools = True
        for call in reply.tool_calls:
            output, request = self._call(call, tools)
            if request is not None:
                return request
            messages.append({"role": "tool", "tool_call_id": call["id"], "content": output})
            if output.startswith("error:"):
                state.invalid("invalid tool calls")
            else:
                state.invalid_in_a_row = 0
        return None

    def _call(self, call: dict[str, Any], tools: WorktreeTools) -> tuple[str, ChangeRequest | None]:
        name = call["name"]
        try:
            arguments = json.loads(call["arguments"] or "{}")
            if not isinstance(arguments, dict):
                raise ToolError("arguments must be a JSON object")
            if name == "submit_change_request":
                return "", ChangeRequest.from_arguments(arguments)
            if name not in READ_TOOLS:
                raise ToolError(f"no tool {name!r}; use read_file, grep, glob, list_dir or submit_change_request")
            method: Callable[..., str] = getattr(tools, name)
            return method(**arguments), None
        except json.JSONDecodeError:
            return "error: the arguments are not valid JSON", None
        except TypeError as exc:
            return f"error: wrong arguments for {name}: {exc}", None
        except (ToolError, OSError, ValueError) as exc:
            return f"error: {exc}", None


CHECK_TEMPLATE = """The user of an automatic code-improvement tool stated these constraints:

<constraints>
{constraints}
</constraints>

A coding agent is about to carry out this change request:

<change_request>
{request}
</change_request>

Does carrying out the change request violate any of the constraints? Only a clear violation
counts; ideas and preferences in the constraints are not violated by doing something else.
Answer with ONE JSON object and nothing else:
{{"violates": true or false, "constraint": "the constraint violated, or empty", "why": "one sentence"}}
"""

_JSON_OBJECT = re.compile(r"\{.*\}", re.DOTALL)


@dataclass(frozen=True)
class Verdict:
    violates: bool
    constraint: str = ""
    why: str = ""
    parsed: bool = True


def parse_verdict(text: str) -> Verdict:
    """The checker's JSON verdict; ``parsed=False`` (no violation) when it is not one."""
    match = _JSON_OBJECT.search(text or "")
    try:
        data = json.loads(match.group(0)) if match else None
    except json.JSONDecodeError:
        data = None
    if not isinstance(data, dict) or not isinstance(data.get("violates"), bool):
        return Verdict(False, parsed=False)
    return Verdict(data["violates"], str(data.get("constraint") or "").strip(), str(data.get("why") or "").strip())


def check_constraints(lm: LanguageModel, request: str, constraints: str, candidate_id: str | None = None) -> Verdict:
    """One reflection call: does ``request`` violate the user's ``constraints``?"""
    prompt = CHECK_TEMPLATE.format(constraints=constraints, request=request)
    reply = lm.complete([{"role": "user", "content": prompt}], purpose="reflection", candidate_id=candidate_id)
    verdict = parse_verdict(reply.text)
    if not verdict.parsed:
        log.warning(
            "constraint check for %s: unparseable verdict %r, counted as no violation",
            candidate_id,
            reply.text[:160] + ("…" if len(reply.text) > 160 else ""),
        )
    return verdict
