"""In-sandbox init for OCI tiers: bridge 127.0.0.1:PORT to the gateway's unix socket, then run the command.

Run inside the sandbox as ``python3 -I -S -c SOURCE PORT SOCKET ARGV...`` (no file to ship).
It binds and listens *before* forking the command, so the proxy port is ready the moment
the command starts (no readiness poll). It stays the sandbox's PID 1 and exits with the
command's status; the runtime then kills every other process, daemons included.

Only builtin C modules (``_socket``, ``_thread``): under gVisor every file an import opens
is a round trip to the gofer, and ``import socket, threading`` cost more than the rest
of this script.
"""

from __future__ import annotations

import _socket
import _thread
import os
import sys

CHUNK = 65536
SHUT_WR = 1


def _pump(src: _socket.socket, dst: _socket.socket) -> None:
    """Copy one direction until EOF, then half-close so the peer sees it; on error drop both."""
    try:
        while data := src.recv(CHUNK):
            dst.sendall(data)
        dst.shutdown(SHUT_WR)
    except OSError:
        src.close()
        dst.close()


def _serve(listener: _socket.socket, path: str) -> None:
    while True:
        fd, _ = listener._accept()  # type: ignore[attr-defined]  # the C socket: (fd, address)
        client = _socket.socket(_socket.AF_INET, _socket.SOCK_STREAM, 0, fd)
        upstream = _socket.socket(_socket.AF_UNIX, _socket.SOCK_STREAM)
        try:
            upstream.connect(path)
        except OSError:
            client.close()
            upstream.close()
            continue
        _thread.start_new_thread(_pump, (client, upstream))
        _thread.start_new_thread(_pump, (upstream, client))


def _status(wait_status: int) -> int:
    if os.WIFSIGNALED(wait_status):
        return 128 + os.WTERMSIG(wait_status)
    return os.WEXITSTATUS(wait_status)


def main(args: list[str]) -> int:
    port, path, argv = int(args[0]), args[1], args[2:]
    listener = _socket.socket(_socket.AF_INET, _socket.SOCK_STREAM)
    listener.setsockopt(_socket.SOL_SOCKET, _socket.SO_REUSEADDR, 1)
    listener.bind(("127.0.0.1", port))
    listener.listen(128)
    pid = os.fork()
    if pid == 0:
        listener.close()
        try:
            os.execvp(argv[0], argv)
        except OSError as exc:
            os.write(2, f"{argv[0]}: {exc.strerror}\n".encode())
            os._exit(127)
    _thread.start_new_thread(_serve, (listener, path))
    while True:
        try:
            done, wait_status = os.waitpid(pid, 0)
        except InterruptedError:
            continue
        if done == pid:
            return _status(wait_status)


if __name__ == "__main__":
    sys.stdout.flush()
    os._exit(main(sys.argv[1:]))
