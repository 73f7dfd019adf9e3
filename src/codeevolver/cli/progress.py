"""Live progress of a run on stderr: a status line on a terminal, one line per event otherwise."""

from __future__ import annotations

from types import TracebackType
from typing import Any

from rich.console import Console
from rich.live import Live
from rich.text import Text

_EVENTS = {
    "seed_evaluated",
    "mutation_started",
    "candidate_accepted",
    "candidate_rejected",
    "proposal_skipped",
    "proposal_failed",
    "run_finished",
}


class ProgressPrinter:
    def __init__(self, console: Console, enabled: bool = True) -> None:
        self.console = console
        self.enabled = enabled
        self.live: Live | None = None

    def __enter__(self) -> ProgressPrinter:
        if self.enabled and self.console.is_terminal:
            self.live = Live(Text("starting…"), console=self.console, refresh_per_second=4, transient=False)
            self.live.start()
        return self

    def __exit__(self, t: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None) -> None:
        if self.live is not None:
            self.live.stop()

    def update(self, state: dict[str, Any]) -> None:
        if not self.enabled:
            return
        if state["kind"] == "phase":
            self.console.print(f"… {state['message']}", highlight=False, markup=False)
            return
        line = status_line(state)
        if self.live is not None:
            self.live.update(Text(line))
            if state["kind"] in _EVENTS - {"proposal_skipped"}:
                self.live.console.print(event_line(state), highlight=False, markup=False)
        elif state["kind"] in _EVENTS:
            self.console.print(f"{event_line(state)}  | {line}", highlight=False, soft_wrap=True, markup=False)


def status_line(s: dict[str, Any]) -> str:
    """One line of live progress. Fewer proposals in flight than ``--concurrency`` once the calls left
    cannot cover one more proposal's worst case (2 x minibatch + valset)."""
    budget = s["max_metric_calls"]
    calls = f"{s['metric_calls']}/{budget}" if budget else str(s["metric_calls"])
    return (
        f"iteration {s['iteration']} · metric calls {calls} · best {s['best_score']:.3f} ({s['best_candidate']})"
        f" · frontier {s['frontier']} · in flight {s['in_flight']}/{s['concurrency']}"
        f" · {s['tokens']:,} tokens · ${s['usd']:.4f}"
    )


def event_line(s: dict[str, Any]) -> str:
    d = s["data"]
    kind = s["kind"]
    if kind == "candidate_accepted":
        old, new = d["minibatch"]
        return f"✓ {d['candidate']} accepted: minibatch {old:g} → {new:g}, val {d['val_score']:.3f}"
    if kind == "candidate_rejected":
        return f"✗ {d['candidate']} rejected: {d['reason'][:120]}"
    if kind == "mutation_started":
        what = "code" if d["component"] == "_code" else f"prompt {d['component']!r}"
        return f"→ {d['candidate']}: changing {what} of {d['parent']} (iteration {d['iteration']})"
    if kind == "seed_evaluated":
        return f"seed {d['candidate']} val {d['val_score']:.3f}"
    if kind == "proposal_skipped":
        return f"· {d['candidate']} skipped: {d['reason']}"
    if kind == "proposal_failed":
        return f"! proposal failed: {d['error'][:160]}"
    return f"run {d.get('status')}{': ' + d['reason'] if d.get('reason') else ''}"
