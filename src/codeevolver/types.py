"""Plain data shared by every part of CodeEvolver (no behaviour, no I/O)."""

from __future__ import annotations

from dataclasses import dataclass, field
from decimal import Decimal
from typing import Any, Literal

CODE_COMPONENT = "_code"
"""Pseudo-component name: selecting it asks for a code mutation instead of a prompt rewrite."""

ChangeType = Literal["seed", "prompt", "code", "merge"]
Purpose = Literal["task", "reflection", "agent"]


@dataclass
class ExampleResult:
    """One example run through the user's program and metric.

    ``error`` is set (and ``score`` is 0.0) when the program or metric raised,
    timed out or returned something unusable; the message says which.
    ``traces`` maps a component name to the calls made through it, each a dict
    with ``inputs`` and ``outputs``.
    """

    index: int
    score: float
    feedback: str = ""
    output: Any = None
    traces: dict[str, list[dict[str, Any]]] = field(default_factory=dict)
    error: str | None = None


@dataclass
class Candidate:
    """A program version: a git commit plus the texts of its named components."""

    id: str
    components: dict[str, str]
    commit: str
    parents: list[str] = field(default_factory=list)
    branch: str | None = None
    change_type: ChangeType = "seed"
    description: str = ""
    iteration: int = 0


@dataclass
class UsageRecord:
    """One model call's tokens and cost. Money is a Decimal of US dollars, never a float."""

    model: str
    purpose: Purpose
    input_tokens: int = 0
    output_tokens: int = 0
    cached_tokens: int = 0
    cost_usd: Decimal = Decimal(0)
    request_id: str | None = None
    run_id: str | None = None
    candidate_id: str | None = None
