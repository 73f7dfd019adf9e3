"""The sandbox's only way out: ``127.0.0.1:<port>`` inside, relayed to the gateway's unix socket.

Preferred (we hold CAP_SYS_ADMIN, as root does): the host opens the listening
socket *inside* the sandbox's empty network namespace (a thread ``setns``-es
into it, listens, and returns) while bwrap waits on ``--block-fd``; a shared
asyncio thread on the host relays each accepted connection to the gateway.
Nothing runs in the sandbox for this and the port is listening before the
command starts, so there is no readiness wait at all, and the gateway socket
file is never visible inside.

Fallback (no CAP_SYS_ADMIN, e.g. an unprivileged orchestrator on cgroup v2):
the socket file is bound in and ``socat`` inside the sandbox relays; a shell
loop of builtins watches ``/proc/net/tcp`` so the command starts the moment
the port listens.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import errno
import os
import shlex
import shutil
import socket
import threading
import time
from concurrent.futures import Future
from pathlib import Path

CLONE_NEWNET = 0x40000000
INSIDE_SOCKET = "/run/codeevolver/gateway.sock"
"""Where the fallback binds the gateway socket inside the sandbox."""
BIND_WAIT_S = 2.0
CHUNK = 65536

_libc = ctypes.CDLL(None, use_errno=True)


def _setns(fd: int) -> None:
    if _libc.setns(fd, CLONE_NEWNET) != 0:
        code = ctypes.get_errno()
        raise OSError(code, os.strerror(code))


def can_enter_netns() -> bool:
    """Whether this process may ``setns`` into a sandbox's network namespace (needs CAP_SYS_ADMIN)."""
    return _probe()


_probe_result: bool | None = None


def _probe() -> bool:
    global _probe_result
    if _probe_result is None:
        fd = os.open("/proc/thread-self/ns/net", os.O_RDONLY)
        try:
            _setns(fd)
            _probe_result = True
        except OSError:
            _probe_result = False
        finally:
            os.close(fd)
    return _probe_result


def listen_in_netns(pid: int, port: int) -> socket.socket:
    """A TCP socket listening on 127.0.0.1:``port`` in the network namespace of process ``pid``.

    Runs on a throwaway thread: namespaces belong to threads, and a thread that
    failed to switch back must never serve anything else.
    """
    result: Future[socket.socket] = Future()

    def work() -> None:
        try:
            result.set_result(_listen_in(pid, port))
        except BaseException as exc:
            result.set_exception(exc)

    thread = threading.Thread(target=work, name="codeevolver-netns", daemon=True)
    thread.start()
    thread.join()
    return result.result()


def _listen_in(pid: int, port: int) -> socket.socket:
    own = os.open("/proc/thread-self/ns/net", os.O_RDONLY)
    try:
        target = os.open(f"/proc/{pid}/ns/net", os.O_RDONLY)
        try:
            _setns(target)
        finally:
            os.close(target)
        try:
            return _bind_loopback(port)
        finally:
            _setns(own)  # if this raises, the thread dies with it: nothing else runs there
    finally:
        os.close(own)


def _bind_loopback(port: int) -> socket.socket:
    """Bind once bwrap has brought ``lo`` up (it does so right after the namespace exists)."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    deadline = time.monotonic() + BIND_WAIT_S
    while True:
        try:
            sock.bind(("127.0.0.1", port))
            break
        except OSError as exc:
            if exc.errno != errno.EADDRNOTAVAIL or time.monotonic() > deadline:
                sock.close()
                raise
            time.sleep(0.0002)
    sock.listen(128)
    sock.setblocking(False)
    return sock


class Relay:
    """One asyncio thread for the whole process, relaying sandbox connections to gateway sockets."""

    def __init__(self) -> None:
        self._loop: asyncio.AbstractEventLoop | None = None
        self._lock = threading.Lock()

    def _running_loop(self) -> asyncio.AbstractEventLoop:
        with self._lock:
            if self._loop is None:
                loop = asyncio.new_event_loop()
                threading.Thread(target=loop.run_forever, name="codeevolver-relay", daemon=True).start()
                self._loop = loop
            return self._loop

    def serve(self, listener: socket.socket, gateway: Path) -> Serving:
        """Relay every connection made to ``listener`` to the unix socket ``gateway``, until closed."""
        loop = self._running_loop()
        server = _Server(str(gateway))
        asyncio.run_coroutine_threadsafe(server.start(listener), loop).result()
        return Serving(loop, server)


class Serving:
    """A relay in progress; ``close`` stops it and drops its open connections."""

    def __init__(self, loop: asyncio.AbstractEventLoop, server: _Server) -> None:
        self._loop = loop
        self._server = server

    def close(self) -> None:
        with contextlib.suppress(RuntimeError, TimeoutError):
            asyncio.run_coroutine_threadsafe(self._server.close(), self._loop).result(timeout=5)


class _Server:
    """Accepts on one sandbox's listener; each connection gets its own gateway connection."""

    def __init__(self, gateway: str) -> None:
        self.gateway = gateway
        self.server: asyncio.AbstractServer | None = None
        self.tasks: set[asyncio.Task[None]] = set()

    async def start(self, listener: socket.socket) -> None:
        self.server = await asyncio.start_server(self.handle, sock=listener, limit=CHUNK)

    async def close(self) -> None:
        if self.server is not None:
            self.server.close()
        for task in list(self.tasks):
            task.cancel()
        await asyncio.gather(*self.tasks, return_exceptions=True)

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        if task is not None:
            self.tasks.add(task)
        try:
            await self._relay(reader, writer)
        except asyncio.CancelledError:
            # ``close`` cancels open relays. The task must end normally: Python 3.11's
            # ``start_server`` asks a finished handler task for its exception, and a
            # cancelled one answers by raising, which asyncio prints as a traceback.
            pass
        finally:
            writer.close()
            if task is not None:
                self.tasks.discard(task)

    async def _relay(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            up_reader, up_writer = await asyncio.open_unix_connection(self.gateway, limit=CHUNK)
        except OSError:
            return  # gateway gone: the sandbox sees a closed connection
        try:
            await asyncio.gather(_pump(reader, up_writer), _pump(up_reader, writer))
        finally:
            up_writer.close()


async def _pump(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        while data := await reader.read(CHUNK):
            writer.write(data)
            await writer.drain()
        if writer.can_write_eof():
            writer.write_eof()
    except (ConnectionError, OSError):
        writer.close()


RELAY = Relay()


def socat_path() -> str | None:
    """The socat binary for the in-sandbox fallback, if installed."""
    return shutil.which("socat", path="/usr/bin:/bin:/usr/local/bin")


def inside_command(argv: list[str], port: int, socat: str) -> list[str]:
    """The fallback: start socat in the sandbox, wait (builtins only) until it listens, exec ``argv``."""
    hexport = f"0100007F:{port:04X}"
    script = (
        f"{shlex.quote(socat)} TCP-LISTEN:{port},bind=127.0.0.1,fork,reuseaddr"
        f" UNIX-CONNECT:{INSIDE_SOCKET} </dev/null >/dev/null 2>&1 &\n"
        "ready() { while read -r _ a _ s _; do "
        f'[ "$a" = {hexport} ] && [ "$s" = 0A ] && return 0; done </proc/net/tcp; return 1; }}\n'
        "n=0; until ready; do n=$((n+1)); [ $n -gt 200000 ] && break; done\n"
        'exec "$@"\n'
    )
    return ["/bin/sh", "-c", script, "sh", *argv]
