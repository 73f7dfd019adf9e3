"""The reflective dataset: what a proposer is shown about a candidate's behaviour on a minibatch."""

from __future__ import annotations

import json
from typing import Any

from codeevolver.types import ExampleResult

MAX_FIELD_CHARS = 2000
CODE_TRACE_CHARS = 4000
"""Code reflection: every component's calls of one example share at most this many characters."""


def _clip(value: Any, limit: int = MAX_FIELD_CHARS) -> str:
    text = value if isinstance(value, str) else json.dumps(value, ensure_ascii=False, default=repr)
    return text if len(text) <= limit else text[:limit] + f"… [{len(text) - limit} more characters]"


def build_records(
    examples: list[dict[str, Any]], results: list[ExampleResult], component: str | None
) -> list[dict[str, str]]:
    """One record per example: inputs, output, score, feedback and the calls made through components.

    For a prompt mutation (``component`` named) the record holds that component's own calls; for a
    code mutation (``component=None``) it holds every component's, all together clipped to
    :data:`CODE_TRACE_CHARS`, so the reflection sees the whole pipeline's intermediate steps.
    """
    records = []
    for example, result in zip(examples, results, strict=True):
        record = {
            "Inputs": _clip(example),
            "Output": _clip(result.output) if result.error is None else f"(failed) {result.error}",
            "Score": f"{result.score:g}",
            "Feedback": result.feedback or "(no feedback)",
        }
        if component is not None:
            calls = result.traces.get(component, [])
            if calls:
                record["Calls of this component"] = _clip(calls)
        else:
            traced = {name: calls for name, calls in sorted(result.traces.items()) if calls}
            share = CODE_TRACE_CHARS // max(1, len(traced))
            for name, calls in traced.items():
                record[f"Calls of component {name!r}"] = _clip(calls, share)
        records.append(record)
    return records


def render(records: list[dict[str, str]]) -> str:
    parts = []
    for number, record in enumerate(records, start=1):
        fields = "\n".join(f"#### {key}\n{value}" for key, value in record.items())
        parts.append(f"### Example {number}\n{fields}")
    return "\n\n".join(parts)
