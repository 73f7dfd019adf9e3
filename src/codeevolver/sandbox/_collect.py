"""Feed stdin and read stdout/stderr of a sandboxed process with a deadline and a size cap.

``Popen.communicate`` keeps everything in memory: a candidate running ``yes``
until its timeout would fill the orchestrator's RAM. Here each stream keeps at
most ``limit`` bytes and the rest is read and dropped, so the writer never
blocks and never costs us memory.
"""

from __future__ import annotations

import contextlib
import os
import selectors
import subprocess
import time

LIMIT = 64 * 1024 * 1024
TRUNCATED = b"\n[codeevolver: output truncated at %d bytes]\n"


class Collector:
    """The pipes of one process; call :meth:`pump` until it returns True."""

    def __init__(self, proc: subprocess.Popen[bytes], stdin: bytes | None, limit: int = LIMIT) -> None:
        self.limit = limit
        self.out: dict[int, bytearray] = {}
        self.dropped: dict[int, int] = {}
        self._selector = selectors.DefaultSelector()
        self._stdin = memoryview(stdin or b"")
        self._streams: dict[int, int] = {}
        for index, pipe in enumerate((proc.stdout, proc.stderr)):
            if pipe is not None:
                fd = pipe.fileno()
                os.set_blocking(fd, False)
                self._selector.register(fd, selectors.EVENT_READ)
                self._streams[fd] = index
                self.out[index] = bytearray()
                self.dropped[index] = 0
        self._in_fd: int | None = None
        if proc.stdin is not None:
            self._in_fd = proc.stdin.fileno()
            self._proc_stdin = proc.stdin
            if self._stdin:
                os.set_blocking(self._in_fd, False)
                self._selector.register(self._in_fd, selectors.EVENT_WRITE)
            else:
                self._close_stdin()

    def pump(self, until: float | None) -> bool:
        """Move data until both output streams hit EOF (True) or ``until`` passes (False)."""
        while self._streams:
            timeout = None if until is None else until - time.monotonic()
            if timeout is not None and timeout <= 0:
                return False
            for key, _ in self._selector.select(timeout):
                if key.fd == self._in_fd:
                    self._write_some()
                else:
                    self._read_some(key.fd)
        return True

    def _write_some(self) -> None:
        assert self._in_fd is not None
        try:
            sent = os.write(self._in_fd, self._stdin[:65536])
        except BlockingIOError:
            return
        except OSError:  # the command closed its stdin or died: the rest is not wanted
            sent = len(self._stdin)
        self._stdin = self._stdin[sent:]
        if not self._stdin:
            self._close_stdin()

    def _close_stdin(self) -> None:
        if self._in_fd is not None:
            with contextlib.suppress(KeyError, ValueError):
                self._selector.unregister(self._in_fd)
            with contextlib.suppress(OSError):
                self._proc_stdin.close()
            self._in_fd = None

    def _read_some(self, fd: int) -> None:
        try:
            data = os.read(fd, 65536)
        except BlockingIOError:
            return
        index = self._streams[fd]
        if not data:
            self._selector.unregister(fd)
            del self._streams[fd]
            return
        room = self.limit - len(self.out[index])
        self.out[index] += data[: max(room, 0)]
        self.dropped[index] += max(len(data) - max(room, 0), 0)

    def close(self) -> None:
        """Drop whatever is still open (after the process tree is dead)."""
        self._close_stdin()
        self._selector.close()

    def text(self, index: int) -> str:
        data = bytes(self.out.get(index, b""))
        if self.dropped.get(index):
            data += TRUNCATED % self.limit
        return data.decode("utf-8", "replace")
