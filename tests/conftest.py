"""Fixtures shared by the test modules: a SQLite store in the test's temp dir and a run in it."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from codeevolver.store import Store


@pytest.fixture
def store(tmp_path: Path) -> Iterator[Store]:
    s = Store(f"sqlite:///{tmp_path / 'runs.db'}")
    yield s
    s.close()


@pytest.fixture
def run_id(store: Store, tmp_path: Path) -> str:
    return store.create_run({}, str(tmp_path), "abc", 0)
