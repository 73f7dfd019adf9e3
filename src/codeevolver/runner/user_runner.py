"""Runs the user's program and metric on a batch of examples; speaks JSON.

This file is executed as a script by the *user's* interpreter, inside the
sandbox, with the candidate's worktree as the working directory. It must not
import codeevolver (the user's environment does not have it) and must keep to
the standard library and Python 3.9 syntax.

Protocol: one JSON request on stdin, one JSON object on the original stdout.
While user code runs, file descriptor 1 points at stderr, so neither ``print``
nor a child process can corrupt the answer. Tracebacks go to stderr only.

Request::

    {"mode": "evaluate" | "describe", "framework": "python" | "dspy",
     "entry": "pkg.module:attr", "metric": "pkg.module:fn",
     "input_keys": [...] | null, "components": {name: text},
     "examples": [{"index": int, "data": {...}}],
     "capture_traces": bool, "timeout_s": float}

Answers: ``{"ok": true, "components": {...}}`` (describe),
``{"ok": true, "results": [{"index", "score", "feedback", "output", "traces",
"error"}]}`` (evaluate), or ``{"ok": false, "kind", "message", "fix"}`` when
the program cannot run at all.
"""

from __future__ import annotations

import contextlib
import importlib
import inspect
import json
import math
import numbers
import os
import signal
import sys
import traceback
from collections.abc import Callable
from typing import Any

MAX_ERROR_CHARS = 400
METRIC_SHAPES = "expected a float, (float, str) or {'score', 'feedback'}"


class Fatal(Exception):
    """The program cannot run at all: reported as ``ok: false``."""

    def __init__(self, kind: str, message: str, fix: str) -> None:
        super().__init__(message)
        self.kind = kind
        self.message = message
        self.fix = fix


class ExampleTimeout(BaseException):
    """Raised by SIGALRM; a BaseException so user ``except Exception`` cannot swallow it."""


# --------------------------------------------------------------------------- loading


def load_attr(spec: str, role: str) -> Any:
    """Import ``pkg.module:attr`` from the worktree; every failure names the spec and the fix."""
    module_name, sep, attr_path = (spec or "").partition(":")
    if not sep or not module_name or not attr_path:
        raise Fatal(
            f"{role}_spec",
            f"{role} {spec!r} is not of the form 'package.module:attribute'",
            f"set {role} to something like 'src.pipeline:{'Pipeline' if role == 'entry' else 'score'}'",
        )
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        missing = exc.name or ""
        if missing and (module_name == missing or module_name.startswith(missing + ".")):
            raise Fatal(
                f"{role}_import",
                f"{role} {spec!r}: no module named {missing!r} in the repository",
                f"check the module path of {role} (relative to the repository root, dots not slashes)",
            ) from None
        traceback.print_exc(file=sys.stderr)
        raise Fatal(
            f"{role}_import",
            f"{role} {spec!r}: importing {module_name} failed: no module named {missing!r}",
            f"add the package that provides {missing!r} to requirements.txt",
        ) from None
    except BaseException as exc:  # user code at import time may raise anything
        traceback.print_exc(file=sys.stderr)
        raise Fatal(
            f"{role}_import",
            f"{role} {spec!r}: importing {module_name} raised {describe_exception(exc)}",
            f"fix the error in {module_name}",
        ) from None
    obj: Any = module
    for part in attr_path.split("."):
        if not hasattr(obj, part):
            raise Fatal(
                f"{role}_attr",
                f"{role} {spec!r}: module {module_name} has no attribute {attr_path!r}",
                f"define {attr_path} in {module_name} or point {role} at an existing name",
            )
        obj = getattr(obj, part)
    return obj


def load_metric(spec: str) -> Callable[..., Any]:
    metric: Callable[..., Any] = load_attr(spec, "metric")
    if not callable(metric):
        raise Fatal(
            "metric_not_callable",
            f"metric {spec!r} is a {type(metric).__name__}, not a function",
            "point metric at a function (example, output[, trace]) -> float",
        )
    return metric


def wants_trace(fn: Callable[..., Any]) -> bool:
    """Whether ``fn`` accepts a third positional argument (the trace)."""
    try:
        params = list(inspect.signature(fn).parameters.values())
    except (TypeError, ValueError):
        return False
    positional = 0
    for p in params:
        if p.kind == p.VAR_POSITIONAL:
            return True
        if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD):
            positional += 1
    return positional >= 3


# --------------------------------------------------------------------------- errors and JSON


def describe_exception(exc: BaseException) -> str:
    """``ValueError: message (at pipeline.py:12)``, on one line, located in the user's code."""
    text = " ".join(str(exc).split())
    head = type(exc).__name__ + (": " + text if text else "")
    where = user_location(exc)
    if where:
        head += f" (at {where})"
    return clip(head)


def user_location(exc: BaseException) -> str:
    """The deepest frame inside the worktree, else the deepest frame at all."""
    frames = traceback.extract_tb(exc.__traceback__)
    if not frames:
        return ""
    cwd = os.getcwd() + os.sep
    here = os.path.abspath(__file__)
    ours = [f for f in frames if os.path.abspath(f.filename).startswith(cwd)]
    ours = [f for f in ours if os.path.abspath(f.filename) != here]
    frame = ours[-1] if ours else frames[-1]
    name = os.path.abspath(frame.filename)
    shown = name[len(cwd) :] if name.startswith(cwd) else frame.filename
    return f"{shown}:{frame.lineno}"


def clip(text: str, limit: int = MAX_ERROR_CHARS) -> str:
    return text if len(text) <= limit else text[: limit - 3] + "..."


def jsonable(value: Any, depth: int = 0) -> Any:
    """A JSON-safe copy of ``value``: containers recursed, known objects converted, rest repr'd."""
    if depth > 20:
        return clip(repr(value), 2000)
    if value is None or isinstance(value, (bool, str)):
        return value
    if isinstance(value, numbers.Integral):
        return int(value)
    if isinstance(value, numbers.Real):
        number = float(value)
        return number if math.isfinite(number) else repr(number)
    if isinstance(value, dict):
        return {str(k): jsonable(v, depth + 1) for k, v in value.items()}
    if isinstance(value, (list, tuple, set, frozenset)):
        return [jsonable(v, depth + 1) for v in value]
    for method in ("toDict", "model_dump"):
        convert = getattr(value, method, None)
        if callable(convert):
            try:
                return jsonable(convert(), depth + 1)
            except Exception:  # fall back to repr below
                break
    return clip(repr(value), 2000)


# --------------------------------------------------------------------------- metric results


def parse_metric(result: Any) -> tuple[float | None, str, str | None]:
    """(score, feedback, error): accepts a number, (number, feedback), a dict or an object with .score."""
    feedback: Any = ""
    score: Any = result
    if isinstance(result, (tuple, list)) and len(result) == 2:
        score, feedback = result
    elif isinstance(result, dict) and "score" in result:
        score, feedback = result["score"], result.get("feedback", "")
    elif not isinstance(result, numbers.Real) and hasattr(result, "score"):
        score, feedback = result.score, getattr(result, "feedback", "")
    if isinstance(score, numbers.Real):
        number = float(score)
        if math.isnan(number) or math.isinf(number):
            return None, "", f"metric returned {number!r}, expected a finite number"
        return number, "" if feedback is None else str(feedback), None
    shown = clip(repr(result), 120)
    return None, "", f"metric returned {shown} ({type(result).__name__}), {METRIC_SHAPES}"


# --------------------------------------------------------------------------- frameworks


class PythonProgram:
    """A plain callable ``(inputs, prompts) -> output``; a black box for traces."""

    def __init__(self, entry: str, components: dict[str, str]) -> None:
        self.fn = load_attr(entry, "entry")
        if not callable(self.fn):
            raise Fatal(
                "entry_not_callable",
                f"entry {entry!r} is a {type(self.fn).__name__}, not callable",
                "point entry at a function (inputs: dict, prompts: Mapping[str, str]) -> output",
            )
        self.components = dict(components)

    def warm_up(self) -> None:
        pass

    def describe(self) -> dict[str, str]:
        return {}

    def run(self, inputs: dict[str, Any]) -> tuple[Any, dict[str, list[dict[str, Any]]], Any]:
        output = self.fn(inputs, dict(self.components))
        traces = {name: [{"inputs": inputs, "outputs": output}] for name in self.components}
        return output, traces, None

    def metric_example(self, row: dict[str, Any], input_keys: list[str]) -> Any:
        return row

    def output_json(self, output: Any) -> Any:
        return jsonable(output)


class DspyProgram:
    """A ``dspy.Module``: components are the instructions of its named predictors."""

    def __init__(self, entry: str, components: dict[str, str]) -> None:
        try:
            import dspy  # type: ignore[import-untyped,import-not-found,unused-ignore]
        except ImportError as exc:
            traceback.print_exc(file=sys.stderr)
            raise Fatal(
                "dspy_missing",
                f"framework is 'dspy' but importing dspy failed in the program's environment: {exc}",
                "add dspy to the repository's requirements.txt",
            ) from None
        self.dspy = dspy
        target = load_attr(entry, "entry")
        if isinstance(target, dspy.Module):
            self.program = target
        elif isinstance(target, type) and issubclass(target, dspy.Module):
            try:
                self.program = target()
            except BaseException as exc:  # user constructor
                traceback.print_exc(file=sys.stderr)
                raise Fatal(
                    "entry_init",
                    f"entry {entry!r}: {target.__name__}() raised {describe_exception(exc)}",
                    f"make {target.__name__} constructible with no arguments",
                ) from None
        else:
            raise Fatal(
                "entry_not_module",
                f"entry {entry!r} is {type(target).__name__}, not a dspy.Module subclass",
                "point entry at a class that subclasses dspy.Module (or use framework = 'python')",
            )
        self.names = {id(pred): name for name, pred in self.program.named_predictors()}
        for name, pred in self.program.named_predictors():
            if name in components:
                pred.signature = pred.signature.with_instructions(components[name])
        model = os.environ.get("CODEEVOLVER_MODEL")
        if model and dspy.settings.lm is None:
            lm = dspy.LM(
                model,
                api_base=os.environ.get("OPENAI_BASE_URL"),
                api_key=os.environ.get("OPENAI_API_KEY"),
                cache=False,
            )
            dspy.configure(lm=lm)

    def warm_up(self) -> None:
        """Import litellm now: dspy does it lazily on the first call, which would charge the
        first example seconds of import, and an alarm there leaves a half-imported module."""
        with contextlib.suppress(Exception):
            import litellm  # type: ignore[import-untyped,import-not-found,unused-ignore]  # noqa: F401

    def describe(self) -> dict[str, str]:
        return {name: pred.signature.instructions for name, pred in self.program.named_predictors()}

    def run(self, inputs: dict[str, Any]) -> tuple[Any, dict[str, list[dict[str, Any]]], Any]:
        trace: list[Any] = []
        with self.dspy.context(trace=trace):
            prediction = self.program(**inputs)
        traces: dict[str, list[dict[str, Any]]] = {}
        for entry in trace:
            pred, call_inputs, call_outputs = entry[0], entry[1], entry[2]
            name = self.names.get(id(pred), type(pred).__name__)
            traces.setdefault(name, []).append({"inputs": call_inputs, "outputs": call_outputs})
        return prediction, traces, trace

    def metric_example(self, row: dict[str, Any], input_keys: list[str]) -> Any:
        return self.dspy.Example(**row).with_inputs(*input_keys)

    def output_json(self, output: Any) -> Any:
        return jsonable(output)


FRAMEWORKS: dict[str, type[PythonProgram] | type[DspyProgram]] = {
    "python": PythonProgram,
    "dspy": DspyProgram,
}


# --------------------------------------------------------------------------- evaluation


class Alarm:
    """Per-example wall clock through SIGALRM (main thread only)."""

    def __init__(self, seconds: float) -> None:
        self.seconds = seconds
        self.usable = seconds > 0 and hasattr(signal, "setitimer")
        if self.usable:
            signal.signal(signal.SIGALRM, self._fire)

    @staticmethod
    def _fire(signum: int, frame: Any) -> None:
        raise ExampleTimeout()

    def start(self) -> None:
        if self.usable:
            signal.setitimer(signal.ITIMER_REAL, self.seconds)

    def stop(self) -> None:
        if self.usable:
            signal.setitimer(signal.ITIMER_REAL, 0)


def evaluate_one(
    program: PythonProgram | DspyProgram,
    metric: Callable[..., Any],
    metric_takes_trace: bool,
    row: dict[str, Any],
    input_keys: list[str] | None,
    capture: bool,
    alarm: Alarm,
) -> dict[str, Any]:
    keys = list(row) if input_keys is None else list(input_keys)
    missing = [k for k in keys if k not in row]
    if missing:
        return failure(f"example has no field {missing[0]!r} (input_keys: {keys})")
    inputs = {k: row[k] for k in keys}
    phase = "program"
    output: Any = None
    traces: dict[str, list[dict[str, Any]]] = {}
    alarm.start()
    try:
        output, traces, trace = program.run(inputs)
        phase = "metric"
        example = program.metric_example(row, keys)
        args = (example, output, trace) if metric_takes_trace else (example, output)
        raw = metric(*args)
    except ExampleTimeout:
        alarm.stop()
        return failure(f"{phase} timed out after {alarm.seconds:g}s", output, program, timed_out=True)
    except (Exception, SystemExit) as exc:  # any user failure is this example's
        alarm.stop()
        traceback.print_exc(file=sys.stderr)
        return failure(f"{phase} raised {describe_exception(exc)}", output, program)
    finally:
        alarm.stop()
    score, feedback, error = parse_metric(raw)
    if error is not None:
        return failure(error, output, program)
    return {
        "score": score,
        "feedback": feedback,
        "output": program.output_json(output),
        "traces": jsonable(traces) if capture else {},
        "error": None,
    }


def failure(
    message: str,
    output: Any = None,
    program: PythonProgram | DspyProgram | None = None,
    timed_out: bool = False,
) -> dict[str, Any]:
    shown = program.output_json(output) if program is not None and output is not None else None
    result: dict[str, Any] = {"score": 0.0, "feedback": "", "output": shown, "traces": {}, "error": clip(message)}
    if timed_out:
        result["timed_out"] = True
    return result


def handle(request: dict[str, Any]) -> dict[str, Any]:
    framework = request.get("framework", "python")
    if framework not in FRAMEWORKS:
        raise Fatal(
            "framework",
            f"unknown framework {framework!r}",
            f"use one of: {', '.join(sorted(FRAMEWORKS))}",
        )
    components = dict(request.get("components") or {})
    program = FRAMEWORKS[framework](request.get("entry", ""), components)
    metric_spec = request.get("metric")
    metric = load_metric(metric_spec) if metric_spec else None
    if request.get("mode") == "describe":
        return {"ok": True, "components": program.describe()}
    if metric is None:
        raise Fatal("metric_spec", "no metric given", "set metric to 'package.module:function'")
    takes_trace = wants_trace(metric)
    program.warm_up()
    alarm = Alarm(float(request.get("timeout_s") or 0))
    capture = bool(request.get("capture_traces"))
    input_keys = request.get("input_keys")
    results = []
    for item in request.get("examples") or []:
        try:
            result = evaluate_one(program, metric, takes_trace, item["data"], input_keys, capture, alarm)
        except ExampleTimeout:  # the alarm fired while a failure was being recorded
            result = failure(f"program timed out after {alarm.seconds:g}s", timed_out=True)
        timed_out = result.pop("timed_out", False)
        result["index"] = item["index"]
        results.append(result)
        if timed_out:
            # The alarm interrupted arbitrary code (a half-done import, a held lock, a
            # connection pool mid-update): this process is no longer trustworthy. Stop
            # here; the caller runs the remaining examples in a fresh process.
            return {"ok": True, "results": results, "stopped_after_timeout": True}
    return {"ok": True, "results": results}


def main() -> int:
    answer_fd = os.dup(1)
    os.dup2(2, 1)  # user prints, C extensions and child processes all land on stderr
    sys.stdout = sys.stderr
    cwd = os.getcwd()
    sys.path[0:1] = [cwd]  # the worktree, not this script's folder
    try:
        request = json.loads(sys.stdin.read())
        sys.stdin = open(os.devnull)  # noqa: SIM115 - lives as long as the process
        answer = handle(request)
    except Fatal as exc:
        answer = {"ok": False, "kind": exc.kind, "message": exc.message, "fix": exc.fix}
    except BaseException as exc:  # the answer must always be JSON
        traceback.print_exc(file=sys.stderr)
        answer = {
            "ok": False,
            "kind": "runner",
            "message": f"the runner failed: {describe_exception(exc)}",
            "fix": "see the runner's stderr",
        }
    data = json.dumps(answer, default=repr).encode("utf-8")
    with os.fdopen(answer_fd, "wb") as out:
        out.write(data)
    return 0


if __name__ == "__main__":
    code = main()
    sys.stderr.flush()
    # Skip interpreter shutdown: a thread the user's code left running must not hold the process open.
    os._exit(code)
