"""The embedded SmolLM2 server: starts, answers a real chat completion, and goes away cleanly."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from codeevolver.errors import ModelError
from codeevolver.models.base import LanguageModel
from codeevolver.models.embedded import MODEL_NAME, EmbeddedModelServer, available

pytestmark = pytest.mark.slow


def _port_open(port: int) -> bool:
    with socket.socket() as sock:
        sock.settimeout(1)
        return sock.connect_ex(("127.0.0.1", port)) == 0


def _alive(pid: int) -> bool:
    """True while ``pid`` runs; a zombie nobody has reaped yet counts as gone."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    stat = Path(f"/proc/{pid}/stat")
    with contextlib.suppress(OSError):
        return stat.read_text().rsplit(")", 1)[1].split()[0] != "Z"
    return True


@pytest.fixture(scope="module")
def ready() -> None:
    ok, reason = available()
    if not ok:
        pytest.skip(reason)


def test_serves_a_chat_completion_and_stops(ready: None) -> None:
    server = EmbeddedModelServer(n_threads=2)
    with server:
        assert server.process is not None and server.port is not None
        pid, port, log = server.process.pid, server.port, server.log_path
        spec = server.spec()
        assert spec.name == MODEL_NAME == server.model_name
        assert spec.api_base == server.api_base == f"http://127.0.0.1:{port}/v1"
        completion = LanguageModel(spec).complete(
            [{"role": "user", "content": "Name one colour of the sky."}], purpose="task"
        )
        assert completion.text.strip()
        assert completion.usage is not None
        assert completion.usage.input_tokens > 0 and completion.usage.output_tokens > 0
        assert completion.usage.cost_usd == 0
    assert server.process is None
    assert not _port_open(port)
    assert not _alive(pid)
    assert log is not None and not log.parent.exists()  # the temp log of a clean run goes too
    server.stop()  # idempotent


# Starts a server, reports its pid and port, then waits to be killed.
ORPHAN = """
import json, sys, time
from pathlib import Path
from codeevolver.models.embedded import EmbeddedModelServer
server = EmbeddedModelServer(n_threads=1, log_path=Path(sys.argv[1])).start()
print(json.dumps({"pid": server.process.pid, "port": server.port}), flush=True)
time.sleep(300)
"""


def test_the_server_exits_when_its_parent_is_killed(ready: None, tmp_path: Path) -> None:
    parent = subprocess.Popen(
        [sys.executable, "-c", ORPHAN, str(tmp_path / "server.log")], stdout=subprocess.PIPE, text=True
    )
    try:
        assert parent.stdout is not None
        started = json.loads(parent.stdout.readline())
        assert _alive(started["pid"]) and _port_open(started["port"])
    finally:
        parent.send_signal(signal.SIGKILL)  # no atexit, no finally: only the watchdog can help
        parent.wait()
    deadline = time.monotonic() + 10
    while _alive(started["pid"]) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not _alive(started["pid"])
    assert not _port_open(started["port"])


def test_a_missing_model_file_fails_with_the_log(ready: None, tmp_path: Path) -> None:
    bogus = tmp_path / "missing.gguf"
    bogus.write_bytes(b"not a gguf")
    server = EmbeddedModelServer(gguf=bogus, log_path=tmp_path / "server.log", ready_timeout_s=30)
    with pytest.raises(ModelError, match="exited with status"):
        server.start()
    assert server.process is None
