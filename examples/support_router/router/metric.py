"""Score a routed ticket: the label counts most, the priority the rest.

The feedback names what was wrong and quotes the model, so a reflection model
can tell a bad prompt (wrong answer) from a bad parser (right answer, misread).
"""

from __future__ import annotations

from typing import Any

LABEL_WEIGHT = 0.7
PRIORITY_WEIGHT = 0.3


def score(example: dict[str, Any], output: dict[str, Any]) -> dict[str, Any]:
    """Return ``{"score": 0..1, "feedback": str}`` for one ticket."""
    label_ok = output.get("label") == example["label"]
    priority_ok = output.get("priority") == example["priority"]
    value = LABEL_WEIGHT * label_ok + PRIORITY_WEIGHT * priority_ok
    if label_ok and priority_ok:
        return {"score": 1.0, "feedback": f"Correct: {example['label']}, {example['priority']}."}
    problems = []
    if not label_ok:
        problems.append(f"label: expected {example['label']!r}, got {output.get('label')!r}")
    if not priority_ok:
        problems.append(f"priority: expected {example['priority']!r}, got {output.get('priority')!r}")
    raw = str(output.get("raw", ""))[:300]
    feedback = "Wrong " + "; ".join(problems) + f". The model replied: {raw!r}."
    return {"score": round(value, 4), "feedback": feedback}
