"""In-sandbox init for OCI tiers: bridge 127.0.0.1:PORT to the gateway's unix socket, then run the command.

Run inside the sandbox as ``python3 -I -S -c SOURCE PORT SOCKET ARGV...`` (stdlib only, no
file to ship). It binds and listens *before* forking the command, so the proxy port is ready
the moment the command starts (no readiness poll). It stays the sandbox's PID 1 and exits
with the command's status; the runtime then kills every other process, daemons included.
"""

from __future__ import annotations

import os
import socket
import sys
import threading

CHUNK = 65536


def _pump(src: socket.socket, dst: socket.socket) -> None:
    """Copy one direction until EOF, then half-close so the peer sees it; on error drop both."""
    try:
        while data := src.recv(CHUNK):
            dst.sendall(data)
        dst.shutdown(socket.SHUT_WR)
    except OSError:
        src.close()
        dst.close()


def _serve(listener: socket.socket, path: str) -> None:
    while True:
        client, _ = listener.accept()
        upstream = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            upstream.connect(path)
        except OSError:
            client.close()
            upstream.close()
            continue
        threading.Thread(target=_pump, args=(client, upstream), daemon=True).start()
        threading.Thread(target=_pump, args=(upstream, client), daemon=True).start()


def _status(wait_status: int) -> int:
    if os.WIFSIGNALED(wait_status):
        return 128 + os.WTERMSIG(wait_status)
    return os.WEXITSTATUS(wait_status)


def main(args: list[str]) -> int:
    port, path, argv = int(args[0]), args[1], args[2:]
    listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
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
    threading.Thread(target=_serve, args=(listener, path), daemon=True).start()
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
