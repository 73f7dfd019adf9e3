"""The gateway as a service: an event loop in a daemon thread, one unix socket per sandbox.

Synchronous callers (the evaluator, the agents, the CLI) start it once per
worker and open a session per sandbox; the session says what the sandbox must
be given (socket, environment, CA bundle) and nothing in it is secret.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import os
import re
import secrets as random
import shutil
import socket
import tempfile
import threading
from collections.abc import Coroutine, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, TypeVar

from codeevolver.errors import ConfigError, SandboxError
from codeevolver.gateway.audit import AuditSink, AuditWriter
from codeevolver.gateway.core import BudgetCheck, Core, Ledger, LLMUpstream, SessionState, utcnow
from codeevolver.gateway.llm import error_response, mount
from codeevolver.gateway.policy import Allowlist, Resolver, SystemResolver, normalize_host
from codeevolver.gateway.proxy import Connection
from codeevolver.gateway.tls import SessionCA, system_ca_pem, upstream_context
from codeevolver.gateway.usage import litellm_prices
from codeevolver.sandbox.base import SandboxPolicy
from codeevolver.types import Purpose

log = logging.getLogger("codeevolver.gateway")
T = TypeVar("T")
DEFAULT_PROXY_PORT = 3128
_MAX_SOCKET_PATH = 100  # sun_path is 108 bytes on Linux, 104 on macOS
CA_ENV_VARS = ("SSL_CERT_FILE", "REQUESTS_CA_BUNDLE", "NODE_EXTRA_CA_CERTS", "PIP_CERT", "CURL_CA_BUNDLE")


@dataclass(frozen=True)
class GatewaySession:
    """What a sandbox needs to use its gateway session. Holds no secret: the key is a placeholder."""

    sandbox_id: str
    run_id: str
    socket_path: Path
    proxy_port: int
    env: dict[str, str]
    placeholder_key: str
    ca_bundle_path: Path | None = None
    readonly_paths: tuple[Path, ...] = ()
    candidate_id: str | None = None
    _id: str = field(default="", repr=False)

    def apply(self, policy: SandboxPolicy) -> SandboxPolicy:
        """``policy`` with this session's socket, port, environment and CA bundle added."""
        return replace(
            policy,
            env={**policy.env, **self.env},
            readonly_paths=(*policy.readonly_paths, *self.readonly_paths),
            gateway_socket=self.socket_path,
            proxy_port=self.proxy_port,
        )


class EgressGateway:
    """Host-side egress proxy for one worker's sandboxes.

    ``ledger`` takes each LLM call's :class:`~codeevolver.types.UsageRecord` (``Store.add_usage``);
    ``budget_exceeded(run_id)`` is asked before each LLM call (truthy: answer 402);
    ``audit`` takes batches of :class:`~codeevolver.store.rows.AuditRow` (``Store.add_audit``;
    default: the log). ``resolver``, ``upstream_ca_file`` and ``trusted_targets`` exist
    for tests and benchmarks against local servers: ``trusted_targets`` are exact
    ``(ip, port)`` pairs let through the address check, never to come from user config.
    """

    def __init__(
        self,
        *,
        proxy_port: int = DEFAULT_PROXY_PORT,
        ledger: Ledger | None = None,
        budget_exceeded: BudgetCheck | None = None,
        audit: AuditSink | None = None,
        resolver: Resolver | None = None,
        upstream_ca_file: str | os.PathLike[str] | None = None,
        trusted_targets: Sequence[tuple[str, int]] = (),
        state_dir: str | os.PathLike[str] | None = None,
        idle_timeout_s: float = 300.0,
        max_connections_per_session: int = 256,
    ) -> None:
        self.proxy_port = proxy_port
        self._settings: dict[str, Any] = {
            "ledger": ledger,
            "budget_exceeded": budget_exceeded,
            "resolver": resolver,
            "upstream_ca_file": upstream_ca_file,
            "trusted_targets": frozenset((str(a), int(p)) for a, p in trusted_targets),
            "idle_timeout_s": idle_timeout_s,
            "max_connections": max_connections_per_session,
        }
        self._audit_sink = audit
        self._state_parent = Path(state_dir) if state_dir is not None else None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._core: Core | None = None
        self._sessions: dict[str, SessionState] = {}
        self.directory: Path | None = None

    # -- lifecycle ----------------------------------------------------------------------------

    def start(self) -> EgressGateway:
        if self._loop is not None:
            return self
        self.directory = Path(tempfile.mkdtemp(prefix="codeevolver-gw-", dir=self._state_parent))
        os.chmod(self.directory, 0o700)
        s = self._settings
        self._core = Core(
            resolver=s["resolver"] or SystemResolver(),
            audit=AuditWriter(self._audit_sink),
            ledger=s["ledger"],
            budget_exceeded=s["budget_exceeded"],
            upstream_ssl=upstream_context(s["upstream_ca_file"]),
            trusted_targets=s["trusted_targets"],
            idle_timeout_s=s["idle_timeout_s"],
            max_connections=s["max_connections"],
        )
        loop = asyncio.new_event_loop()
        ready = threading.Event()

        def run() -> None:
            asyncio.set_event_loop(loop)
            loop.call_soon(ready.set)
            loop.run_forever()

        self._thread = threading.Thread(target=run, name="egress-gateway", daemon=True)
        self._thread.start()
        ready.wait()
        self._loop = loop
        return self

    def stop(self) -> None:
        """Close every session, write out the audit queue, stop the loop, remove the private dir."""
        loop, thread, core = self._loop, self._thread, self._core
        if loop is None or thread is None or core is None:
            return
        for state in list(self._sessions.values()):
            self._call(self._close(state))
        loop.call_soon_threadsafe(loop.stop)
        thread.join()
        loop.close()
        core.audit.close()
        self._loop = self._thread = None
        if self.directory is not None:
            shutil.rmtree(self.directory, ignore_errors=True)

    def __enter__(self) -> EgressGateway:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def flush(self, timeout: float | None = 30.0) -> bool:
        """Block until every usage record and audit row so far is written; False on timeout."""
        core = self._require_core()
        sessions = list(self._sessions.values())

        async def settle() -> None:
            pending = [task for state in sessions for task in state.pending]
            if pending:
                await asyncio.wait(pending)

        self._call(asyncio.wait_for(settle(), timeout))
        return core.audit.flush(timeout)

    @property
    def audit_failures(self) -> int:
        """Audit rows the sink refused (each was logged at ERROR)."""
        return self._require_core().audit.failures

    # -- sessions -----------------------------------------------------------------------------

    def open_session(
        self,
        sandbox_id: str,
        *,
        run_id: str,
        candidate_id: str | None = None,
        purpose: Purpose = "task",
        allow: Sequence[str] = (),
        secrets: Mapping[str, Mapping[str, str]] | None = None,
        llm_routes: Mapping[str, LLMUpstream] | None = None,
        proxy_port: int | None = None,
        trusted_hosts: Sequence[str] = (),
    ) -> GatewaySession:
        """A new socket for one sandbox, with its own allowlist, secrets, LLM routes and placeholder key.

        ``secrets`` maps a host to headers injected on HTTPS requests to exactly that host
        (its port 443 is allowed implicitly). ``llm_routes`` maps a route name (``openai``,
        ``anthropic``) to the upstream it reaches. ``trusted_hosts`` are exact names, each also
        in ``allow``, that the operator trusts like a model endpoint: they may resolve to
        private addresses (a package index behind an intercepting mirror). Only the setup
        phase's session names any; user config never does.
        """
        core = self._require_core()
        port = proxy_port or self.proxy_port
        secret_map = {normalize_host(h): dict(v) for h, v in (secrets or {}).items()}
        for host in secret_map:
            if host.startswith("*") or ":" in host:
                raise ConfigError(f"secret host {host!r} must be one exact host name", "write e.g. api.github.com")
        allowlist = Allowlist([*allow, *secret_map])
        trusted = frozenset(normalize_host(h) for h in trusted_hosts)
        for host in trusted:
            if not any(allowlist.allows(host, rule.port) for rule in allowlist.rules):
                raise ConfigError(f"trusted host {host!r} is not in the session's allowlist", "allow it too")
        routes = dict(llm_routes or {})
        for name, upstream in routes.items():
            if not re.fullmatch(r"[a-z][a-z0-9_-]*", name) or upstream.provider not in ("openai", "anthropic"):
                raise ConfigError(f"bad LLM route {name!r} ({upstream.provider})", "name routes openai or anthropic")
        assert self.directory is not None
        session_id = random.token_hex(4)
        directory = self.directory / session_id
        if len(str(directory / "proxy.sock")) > _MAX_SOCKET_PATH:
            raise ConfigError(
                f"gateway state directory {self.directory} is too deep for a unix socket path",
                "pass a shorter state_dir (the default, the system temp dir, works)",
            )
        directory.mkdir(mode=0o700)
        placeholder = f"sk-codeevolver-sandbox-{random.token_urlsafe(24)}"
        state = SessionState(
            sandbox_id=sandbox_id, run_id=run_id, candidate_id=candidate_id, purpose=purpose, allow=allowlist,
            secrets=secret_map, llm_routes=routes, placeholder=placeholder, proxy_port=port,
            directory=directory, socket_path=directory / "proxy.sock",
            ca=SessionCA(secret_map) if secret_map else None, trusted_hosts=trusted,
        )  # fmt: skip
        env = self._session_env(state)
        bundle = None
        if state.ca is not None:
            bundle = directory / "ca-bundle.pem"
            bundle.write_bytes(system_ca_pem().rstrip() + b"\n" + state.ca.cert_pem)
            bundle.chmod(0o644)
            env.update(dict.fromkeys(CA_ENV_VARS, str(bundle)))
        if any(u.prices is None for u in routes.values()) and self._loop is not None:
            self._loop.call_soon_threadsafe(self._warm_prices)
        self._call(self._listen(core, state))
        self._sessions[session_id] = state
        return GatewaySession(
            sandbox_id=sandbox_id, run_id=run_id, candidate_id=candidate_id, socket_path=state.socket_path,
            proxy_port=port, env=env, placeholder_key=placeholder, ca_bundle_path=bundle,
            readonly_paths=(bundle,) if bundle else (), _id=session_id,
        )  # fmt: skip

    def close_session(self, session: GatewaySession) -> None:
        """Stop serving the session's socket, end its open connections, remove its files."""
        state = self._sessions.pop(session._id, None)
        if state is not None and self._loop is not None:
            self._call(self._close(state))

    def _session_env(self, state: SessionState) -> dict[str, str]:
        proxy = f"http://127.0.0.1:{state.proxy_port}"
        env = {
            "HTTP_PROXY": proxy, "HTTPS_PROXY": proxy, "http_proxy": proxy, "https_proxy": proxy,
            "NO_PROXY": "127.0.0.1,localhost", "no_proxy": "127.0.0.1,localhost",
        }  # fmt: skip
        for name, upstream in state.llm_routes.items():
            if name == "openai" and upstream.provider == "openai":
                env["OPENAI_BASE_URL"] = env["OPENAI_API_BASE"] = proxy + mount(name, upstream)
                env["OPENAI_API_KEY"] = state.placeholder
            elif name == "anthropic" and upstream.provider == "anthropic":
                env["ANTHROPIC_BASE_URL"] = proxy + mount(name, upstream)
                env["ANTHROPIC_API_KEY"] = state.placeholder
        return env

    def _warm_prices(self) -> None:
        """Import litellm's price table off the request path before the first call needs it."""
        assert self._loop is not None
        self._loop.run_in_executor(None, litellm_prices, "openai", "")

    # -- on the loop --------------------------------------------------------------------------

    def _require_core(self) -> Core:
        if self._core is None or self._loop is None:
            raise SandboxError("the egress gateway is not running", "call EgressGateway.start() first")
        return self._core

    def _call(self, coro: Coroutine[Any, Any, T]) -> T:
        assert self._loop is not None
        if threading.current_thread() is self._thread:
            coro.close()
            raise RuntimeError("EgressGateway's sync API cannot be called from its own event loop")
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result()

    async def _listen(self, core: Core, state: SessionState) -> None:
        """Accept the session's connections with our own loop.

        Not ``asyncio.start_unix_server``: on Python 3.11 a connection accepted just
        before ``Server.close()`` is leaked open, so a closed session could keep a
        sandbox's connection alive. Here closing wakes the loop with a connection of
        its own, and nothing accepted is ever left unhandled.
        """
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        listener.bind(str(state.socket_path))
        # The directory (0700) keeps host users out; the socket itself must accept the
        # sandbox's unprivileged uid once the tier bind-mounts it in.
        os.chmod(state.socket_path, 0o666)
        listener.listen(128)
        listener.setblocking(False)
        state.listener = listener
        state.accepting = asyncio.create_task(self._accept_loop(core, state, listener))

    async def _accept_loop(self, core: Core, state: SessionState, listener: socket.socket) -> None:
        loop = asyncio.get_running_loop()
        try:
            while True:
                conn, _ = await loop.sock_accept(listener)
                if state.closed:
                    conn.close()
                    return
                task = asyncio.create_task(self._serve_client(core, state, conn))
                state.tasks.add(task)
                task.add_done_callback(state.tasks.discard)
                # A task cancelled before it started never runs its clean-up: close the socket here too.
                task.add_done_callback(functools.partial(_close_socket, conn))
        finally:
            listener.close()

    async def _serve_client(self, core: Core, state: SessionState, conn: socket.socket) -> None:
        try:
            reader, writer = await asyncio.open_unix_connection(sock=conn, limit=64 * 1024)
        except BaseException:
            conn.close()
            raise
        try:
            if len(state.tasks) > core.max_connections:
                reason = f"over {core.max_connections} open connections for one sandbox"
                core.audit.put(state.audit_row(utcnow(), "gateway", state.proxy_port, "blocked", reason, status=503))
                writer.write(error_response(503, reason))
                return
            await Connection(core, state, reader, writer).serve()
        except asyncio.CancelledError:
            pass
        except Exception:
            log.exception("egress gateway connection of sandbox %s failed", state.sandbox_id)
        finally:
            writer.close()

    @staticmethod
    async def _wake(state: SessionState) -> None:
        """Connect once to our own socket so that the accept loop sees ``closed`` and ends."""
        if state.accepting is None or state.accepting.done():
            return
        with contextlib.suppress(OSError):
            _, writer = await asyncio.open_unix_connection(str(state.socket_path))
            writer.close()

    async def _close(self, state: SessionState) -> None:
        state.closed = True
        if state.accepting is not None:
            await self._wake(state)
            with contextlib.suppress(Exception):
                await asyncio.wait_for(state.accepting, 5)
        for task in list(state.tasks):
            task.cancel()
        if state.tasks:
            await asyncio.wait(list(state.tasks), timeout=5)
        if state.pending:
            await asyncio.wait(list(state.pending))
        shutil.rmtree(state.directory, ignore_errors=True)


def _close_socket(conn: socket.socket, _task: asyncio.Task[None]) -> None:
    conn.close()
