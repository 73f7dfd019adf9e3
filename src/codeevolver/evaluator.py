"""Runs the user's program and metric on examples, across the sandbox boundary.

The orchestrator never imports user code: it hands a JSON request to
``runner/user_runner.py`` running under the user's interpreter in the sandbox,
and reads one JSON answer back. Everything the user's code may see in its
environment is decided here (the ``env`` given, plus a few basics), never
inherited from the orchestrator's ``os.environ``.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, Literal

from codeevolver.errors import UserProgramError
from codeevolver.sandbox.base import CommandResult, Sandbox, SandboxPolicy
from codeevolver.types import ExampleResult
from codeevolver.userenv import python_prefixes

RUNNER_PATH = Path(__file__).resolve().parent / "runner" / "user_runner.py"
STARTUP_ALLOWANCE_S = 30.0
STDERR_TAIL_LINES = 20

Framework = Literal["python", "dspy"]


class Evaluator:
    """Evaluates candidates of one program; stateless after construction, so thread-safe."""

    def __init__(
        self,
        framework: Framework,
        entry: str,
        metric: str,
        input_keys: list[str] | None,
        sandbox: Sandbox,
        python: Path,
        env: Mapping[str, str],
        per_example_timeout_s: float = 60.0,
        policy_hook: Callable[[SandboxPolicy], SandboxPolicy] | None = None,
    ) -> None:
        """``policy_hook`` adds what the sandbox's way out needs (a gateway session's socket and env)."""
        self.policy_hook = policy_hook
        self.framework = framework
        self.entry = entry
        self.metric = metric
        self.input_keys = list(input_keys) if input_keys is not None else None
        self.sandbox = sandbox
        self.python = Path(python)
        self.env = dict(env)
        self.per_example_timeout_s = per_example_timeout_s

    def evaluate(
        self,
        worktree: Path,
        components: dict[str, str],
        examples: list[tuple[int, dict[str, Any]]],
        capture_traces: bool = False,
    ) -> list[ExampleResult]:
        """Score each example; per-example failures are results with ``error`` set, in input order."""
        results: list[ExampleResult] = []
        remaining = list(examples)
        while remaining:
            # A runner stops after a per-example timeout (its state is no longer
            # trustworthy); the rest of the batch goes to a fresh process.
            done = self._evaluate_batch(worktree, components, remaining, capture_traces)
            results.extend(done)
            remaining = remaining[len(done) :]
        return results

    def _evaluate_batch(
        self,
        worktree: Path,
        components: dict[str, str],
        examples: list[tuple[int, dict[str, Any]]],
        capture_traces: bool,
    ) -> list[ExampleResult]:
        """One runner process over ``examples``; returns a non-empty prefix of their results."""
        request = self._request("evaluate", components)
        request["examples"] = [{"index": index, "data": data} for index, data in examples]
        request["capture_traces"] = capture_traces
        timeout = len(examples) * self.per_example_timeout_s + STARTUP_ALLOWANCE_S
        answer = self._call(worktree, request, timeout, f"evaluating {len(examples)} example(s)")
        rows = answer.get("results")
        if not isinstance(rows, list):
            rows = []
        complete = len(rows) == len(examples)
        stopped = 0 < len(rows) < len(examples) and answer.get("stopped_after_timeout")
        if not (complete or stopped):
            raise UserProgramError(
                f"the runner answered {len(rows)} results for {len(examples)} examples",
                "this is a bug in CodeEvolver's runner; please report it",
            )
        results = []
        for (index, _), row in zip(examples, rows, strict=False):
            if row.get("index") != index:
                raise UserProgramError(
                    f"the runner answered example {row.get('index')!r} where {index!r} was expected",
                    "this is a bug in CodeEvolver's runner; please report it",
                )
            results.append(
                ExampleResult(
                    index=index,
                    score=float(row.get("score") or 0.0),
                    feedback=str(row.get("feedback") or ""),
                    output=row.get("output"),
                    traces=row.get("traces") or {},
                    error=row.get("error"),
                )
            )
        return results

    def describe(self, worktree: Path) -> dict[str, str]:
        """The program's own components (DSPy predictor instructions; empty for plain Python)."""
        answer = self._call(worktree, self._request("describe", {}), STARTUP_ALLOWANCE_S * 2, "loading the program")
        components = answer.get("components")
        if not isinstance(components, dict):
            raise UserProgramError(
                "the runner's describe answer has no components",
                "this is a bug in CodeEvolver's runner; please report it",
            )
        return {str(k): str(v) for k, v in components.items()}

    def policy(self, worktree: Path, timeout_s: float) -> SandboxPolicy:
        """What the runner may see: the worktree, the runner, the interpreter, and ``env`` only."""
        readonly = (RUNNER_PATH.parent, *python_prefixes(self.python))
        policy = SandboxPolicy(
            workdir=Path(worktree),
            env=self.child_env(),
            readonly_paths=tuple(dict.fromkeys(readonly)),
            timeout_s=timeout_s,
        )
        return self.policy_hook(policy) if self.policy_hook is not None else policy

    def child_env(self) -> dict[str, str]:
        """Exactly ``env`` plus PATH/HOME/LANG basics; nothing from the orchestrator's environment."""
        child = {
            "PATH": f"{self.python.parent}{os.pathsep}/usr/local/bin:/usr/bin:/bin",
            "HOME": os.environ.get("HOME", "/tmp"),
            "LANG": "C.UTF-8",
        }
        child.update(self.env)
        child["PYTHONDONTWRITEBYTECODE"] = "1"
        return child

    def _request(self, mode: str, components: dict[str, str]) -> dict[str, Any]:
        return {
            "mode": mode,
            "framework": self.framework,
            "entry": self.entry,
            "metric": self.metric,
            "input_keys": self.input_keys,
            "components": dict(components),
            "examples": [],
            "capture_traces": False,
            "timeout_s": self.per_example_timeout_s,
        }

    def _call(self, worktree: Path, request: dict[str, Any], timeout_s: float, doing: str) -> dict[str, Any]:
        result = self.sandbox.run(
            [str(self.python), str(RUNNER_PATH)],
            self.policy(worktree, timeout_s),
            stdin=json.dumps(request).encode("utf-8"),
        )
        answer = _parse_answer(result)
        if answer is None:
            raise UserProgramError(_death_message(result, doing, timeout_s), _death_fix(result))
        if not answer.get("ok"):
            raise UserProgramError(
                str(answer.get("message") or "the program cannot run"),
                answer.get("fix") or None,
            )
        return answer


def _parse_answer(result: CommandResult) -> dict[str, Any] | None:
    if result.timed_out:
        return None
    try:
        answer = json.loads(result.stdout)
    except ValueError:
        return None
    return answer if isinstance(answer, dict) and "ok" in answer else None


def _death_message(result: CommandResult, doing: str, timeout_s: float) -> str:
    if result.timed_out:
        head = f"the program was killed after {timeout_s:g}s while {doing}"
    elif result.returncode != 0:
        head = f"the program's process died with exit status {result.returncode} while {doing}"
    else:
        shown = result.stdout.strip()[:200] or "nothing"
        head = f"the runner printed {shown!r} instead of its JSON answer while {doing}"
    lines = result.stderr.strip().splitlines()[-STDERR_TAIL_LINES:]
    if lines:
        head += "; last lines of its stderr:\n" + "\n".join("    " + line for line in lines)
    return head


def _death_fix(result: CommandResult) -> str:
    if result.timed_out:
        return "make the program faster, or raise the per-example timeout"
    if result.returncode < 0 or result.returncode > 128:
        return "the process was killed by a signal (out of memory? a crash in a C extension?)"
    return "run the program by hand on one example to see why it exits"
