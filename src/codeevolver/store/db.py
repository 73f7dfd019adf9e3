"""Opening the run database: engine settings, the state directory, migrations.

SQLite is set up for many engine threads and crash safety: WAL journal (readers
never block the writer), a busy timeout (writers queue instead of failing),
``synchronous=FULL`` (a returned commit survives power loss, not just
``kill -9``) and foreign keys on. SQLAlchemy emits BEGIN itself so that write
transactions take the write lock up front (``BEGIN IMMEDIATE``): a
read-then-write transaction can then never fail on a stale snapshot.
"""

from __future__ import annotations

import threading
from datetime import UTC, datetime, timedelta
from decimal import ROUND_HALF_EVEN, Decimal
from pathlib import Path
from typing import Any

from alembic import command
from alembic.config import Config
from alembic.util.exc import CommandError
from sqlalchemy import Engine, create_engine, event
from sqlalchemy.engine import URL, make_url
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.pool import StaticPool

from codeevolver.errors import StoreError

STATE_DIR_NAME = ".codeevolver"
DB_FILE_NAME = "runs.db"
BUSY_TIMEOUT_S = 60
WRITE_OPTION = "codeevolver_write"
MIGRATIONS_DIR = Path(__file__).resolve().parent / "migrations"
_PG_MIGRATION_LOCK = 0x0CE5_70E5  # any constant; serialises concurrent migrators on PostgreSQL
_MICRO = Decimal(1_000_000)


def state_dir(repo_path: str | Path) -> Path:
    """Where CodeEvolver keeps a repository's state (the DB, stop files)."""
    return Path(repo_path).resolve() / STATE_DIR_NAME


def db_path(repo_path: str | Path) -> Path:
    return state_dir(repo_path) / DB_FILE_NAME


def ensure_writable_dir(directory: Path, *, git_ignored: bool = False) -> None:
    """Create ``directory`` and prove it is writable, or raise StoreError naming it.

    With ``git_ignored`` a ``.gitignore`` of ``*`` goes inside, so git ignores
    the whole state dir and runs never make the user's repository dirty.
    """
    try:
        directory.mkdir(parents=True, exist_ok=True)
        ignore = directory / ".gitignore"
        if git_ignored and not ignore.exists():
            ignore.write_text("# CodeEvolver state; never committed\n*\n")
        probe = directory / f".write-probe-{threading.get_ident()}"
        probe.write_text("")
        probe.unlink()
    except OSError as exc:
        raise StoreError(
            f"cannot write state directory {directory}: {exc.strerror or exc}",
            fix=f"make {directory.parent} writable, or run from a checkout you own",
        ) from exc


def describe(url: URL) -> str:
    """The DB as shown in messages: a file path, or the URL without its password."""
    if url.get_backend_name() == "sqlite" and url.database not in (None, "", ":memory:"):
        return str(url.database)
    return url.render_as_string(hide_password=True)


def is_memory_sqlite(url: URL) -> bool:
    return url.get_backend_name() == "sqlite" and url.database in (None, "", ":memory:")


def make_engine(url: URL) -> Engine:
    """An engine with the settings above; write sessions use ``engine.execution_options(**WRITE)``."""
    if url.get_backend_name() != "sqlite":
        return create_engine(url, pool_pre_ping=True, future=True)
    if is_memory_sqlite(url):
        # One shared connection, or each pool connection would see its own empty DB.
        engine = create_engine(url, connect_args={"check_same_thread": False}, poolclass=StaticPool, future=True)
    else:
        engine = create_engine(
            url,
            connect_args={"check_same_thread": False, "timeout": BUSY_TIMEOUT_S},
            pool_size=8,
            max_overflow=56,
            pool_timeout=BUSY_TIMEOUT_S,
            future=True,
        )

    @event.listens_for(engine, "connect")
    def _on_connect(dbapi_conn: Any, _record: Any) -> None:
        dbapi_conn.isolation_level = None  # we emit BEGIN ourselves, see module doc
        cur = dbapi_conn.cursor()
        if not is_memory_sqlite(url):
            cur.execute("PRAGMA journal_mode=WAL")
        cur.execute(f"PRAGMA busy_timeout={BUSY_TIMEOUT_S * 1000}")
        cur.execute("PRAGMA synchronous=FULL")
        cur.execute("PRAGMA foreign_keys=ON")
        cur.close()

    @event.listens_for(engine, "begin")
    def _on_begin(conn: Any) -> None:
        write = conn.get_execution_options().get(WRITE_OPTION, False)
        conn.exec_driver_sql("BEGIN IMMEDIATE" if write else "BEGIN")

    return engine


def migrate(engine: Engine) -> None:
    """Bring the schema to the newest revision this package ships (a no-op when current).

    Runs inside one write transaction on our own connection, so a second
    process opening the same DB waits and then finds nothing to do.
    """
    cfg = Config()
    cfg.set_main_option("script_location", str(MIGRATIONS_DIR).replace("%", "%%"))
    write_engine = engine.execution_options(**{WRITE_OPTION: True})
    where = describe(engine.url)
    try:
        with write_engine.begin() as conn:
            if conn.dialect.name == "postgresql":
                conn.exec_driver_sql(f"SELECT pg_advisory_xact_lock({_PG_MIGRATION_LOCK})")
            cfg.attributes["connection"] = conn
            command.upgrade(cfg, "head")
    except CommandError as exc:
        raise StoreError(
            f"database {where} has a schema this CodeEvolver does not know: {exc}",
            fix="upgrade codeevolver to the version that wrote this database",
        ) from exc
    except SQLAlchemyError as exc:
        raise StoreError(
            f"cannot open database {where}: {getattr(exc, 'orig', None) or exc}",
            fix="check the path or URL, its permissions, and that the server is reachable",
        ) from exc


def to_micro(usd: Decimal | int) -> int:
    """US dollars to integer micro-dollars, rounding half-even (floats refused: they are inexact)."""
    if isinstance(usd, float) or not isinstance(usd, Decimal | int):
        raise TypeError(f"money must be a Decimal or int, not {type(usd).__name__}")
    return int((Decimal(usd) * _MICRO).to_integral_value(rounding=ROUND_HALF_EVEN))


def from_micro(micro: int) -> Decimal:
    return Decimal(int(micro)).scaleb(-6)


_clock_lock = threading.Lock()
_last_time = datetime.min.replace(tzinfo=UTC)


def now() -> datetime:
    """UTC now, strictly increasing within this process, so creation order survives equal clock reads."""
    global _last_time
    with _clock_lock:
        t = datetime.now(UTC)
        if t <= _last_time:
            t = _last_time + timedelta(microseconds=1)
        _last_time = t
        return t


def parse_url(url: str | URL) -> URL:
    try:
        return make_url(url)
    except SQLAlchemyError as exc:
        raise StoreError(
            f"not a database URL: {url!s}",
            fix="use sqlite:///path/to/runs.db or postgresql+psycopg://user@host/db",
        ) from exc
