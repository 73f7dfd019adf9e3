"""Alembic environment of the run database.

The store runs migrations programmatically and hands over its own open
connection (``config.attributes["connection"]``) inside a transaction it
commits; the URL path is for developers running ``alembic`` by hand with
``-c src/codeevolver/store/alembic.ini``.
"""

from __future__ import annotations

from alembic import context
from sqlalchemy import Connection, create_engine, pool

from codeevolver.store.tables import Base

config = context.config
target_metadata = Base.metadata


def _configure(**kwargs: object) -> None:
    context.configure(target_metadata=target_metadata, compare_type=True, **kwargs)  # type: ignore[arg-type]


def _run(connection: Connection) -> None:
    # Batch mode lets future ALTERs work on SQLite, which rebuilds tables to alter them.
    _configure(connection=connection, render_as_batch=connection.dialect.name == "sqlite")
    with context.begin_transaction():
        context.run_migrations()


def run_offline() -> None:
    _configure(url=config.get_main_option("sqlalchemy.url"), literal_binds=True)
    with context.begin_transaction():
        context.run_migrations()


def run_online() -> None:
    connection = config.attributes.get("connection")
    if connection is not None:
        _run(connection)
        return
    url = config.get_main_option("sqlalchemy.url")
    if not url:
        raise RuntimeError("set sqlalchemy.url in alembic.ini")
    engine = create_engine(url, poolclass=pool.NullPool)
    with engine.begin() as conn:
        _run(conn)
    engine.dispose()


if context.is_offline_mode():
    run_offline()
else:
    run_online()
