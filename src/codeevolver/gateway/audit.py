"""The audit trail of egress, written off the request path and never dropped silently.

The proxy appends rows to an unbounded queue (appending never blocks or fails);
one writer thread drains it in batches into the sink (``Store.add_audit``,
one transaction per batch, so a thousand requests a second cost a few commits).
A batch the sink refuses is retried row by row; a row that still fails is
logged at ERROR with its content and counted in ``failures``.
"""

from __future__ import annotations

import logging
import queue
import threading
from collections.abc import Callable, Sequence

from codeevolver.store.rows import AuditRow

log = logging.getLogger("codeevolver.gateway.audit")

AuditSink = Callable[[Sequence[AuditRow]], object]
_BATCH = 500
_STOP = object()


def log_sink(rows: Sequence[AuditRow]) -> None:
    """The sink when no store is given: one INFO log line per request."""
    for r in rows:
        log.info(
            "%s %s %s:%s %s %s %s (%s) up=%d down=%d run=%s sandbox=%s",
            r.decision, r.method or "-", r.host, r.port, r.path or "", r.status or "-", r.reason,
            r.candidate_id or "-", r.bytes_up, r.bytes_down, r.run_id, r.sandbox_id,
        )  # fmt: skip


class AuditWriter:
    """Queue plus writer thread in front of an audit sink."""

    def __init__(self, sink: AuditSink | None = None) -> None:
        self.sink = sink or log_sink
        self.failures = 0
        self.written = 0
        self._queue: queue.Queue[object] = queue.Queue()
        self._thread = threading.Thread(target=self._run, name="egress-audit", daemon=True)
        self._thread.start()

    def put(self, row: AuditRow) -> None:
        self._queue.put(row)

    def flush(self, timeout: float | None = None) -> bool:
        """Wait until every row queued so far is written (or failed loudly); False on timeout."""
        done = threading.Event()
        self._queue.put(done)
        return done.wait(timeout)

    def close(self) -> None:
        self._queue.put(_STOP)
        self._thread.join()

    def _run(self) -> None:
        while True:
            batch: list[AuditRow] = []
            markers: list[threading.Event] = []
            item = self._queue.get()
            stop = False
            while True:
                if item is _STOP:
                    stop = True
                elif isinstance(item, threading.Event):
                    markers.append(item)
                elif isinstance(item, AuditRow):
                    batch.append(item)
                if stop or len(batch) >= _BATCH:
                    break
                try:
                    item = self._queue.get_nowait()
                except queue.Empty:
                    break
            if batch:
                self._write(batch)
            for marker in markers:
                marker.set()
            if stop:
                return

    def _write(self, batch: list[AuditRow]) -> None:
        try:
            self.sink(batch)
            self.written += len(batch)
            return
        except Exception as exc:
            if len(batch) == 1:
                self._lost(batch[0], exc)
                return
        for row in batch:
            try:
                self.sink([row])
                self.written += 1
            except Exception as exc:
                self._lost(row, exc)

    def _lost(self, row: AuditRow, exc: Exception) -> None:
        self.failures += 1
        log.error("egress audit row could not be written (%s: %s): %r", type(exc).__name__, exc, row)
