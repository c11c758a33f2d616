"""Shared fixtures: throwaway databases (SQLite file and PostgreSQL), real-cluster opt-in."""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.helpers.paths import FIXTURES

CALICO = FIXTURES / "calico"
PG_ADMIN = os.environ.get("FELIXSCAN_TEST_PG", "postgresql://postgres@127.0.0.1:5432/test")


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption("--real-cluster", action="store_true", default=False,
                     help="also run tests marked realcluster against the cluster of $KUBECONFIG")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if config.getoption("--real-cluster"):
        return
    skip = pytest.mark.skip(reason="needs --real-cluster and a KUBECONFIG")
    for item in items:
        if "realcluster" in item.keywords:
            item.add_marker(skip)


@pytest.fixture
def pg_url() -> Iterator[str]:
    """A fresh PostgreSQL database, dropped afterwards."""
    import psycopg

    name = f"felixscan_t_{uuid.uuid4().hex[:12]}"
    admin = PG_ADMIN.replace("postgresql+psycopg://", "postgresql://")
    with psycopg.connect(admin, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    base = admin.rsplit("/", 1)[0]
    try:
        yield f"postgresql+psycopg://{base.split('://', 1)[1]}/{name}"
    finally:
        with psycopg.connect(admin, autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@pytest.fixture
def sqlite_url(tmp_path: Path) -> str:
    return f"sqlite:///{tmp_path / 'felixscan.db'}"


@pytest.fixture(params=["sqlite", pytest.param("postgresql", marks=pytest.mark.postgres)])
def db_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    """Each test that takes it runs on SQLite and on PostgreSQL."""
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'felixscan.db'}"
    else:
        yield request.getfixturevalue("pg_url")


@pytest.fixture
def harness(tmp_path: Path) -> Iterator[Any]:
    """Emulated clusters and node listeners for end-to-end scans (see scan_harness.py)."""
    from tests.helpers.scan_harness import Harness

    h = Harness(tmp_path)
    try:
        yield h
    finally:
        h.close()


@pytest.fixture
def serves() -> Iterator[list[Any]]:
    """`felixscan serve` processes a test starts (anything with `kill()`): killed at the end,
    whatever the test's outcome."""
    started: list[Any] = []
    yield started
    for s in started:
        s.kill()
