"""PostgreSQL for the tests of this folder: a schema or a database of its own per test, dropped after.

The server is 127.0.0.1:5432 (user postgres, database test). Without it these tests are skipped on a
developer's machine and fail under CI (`CI` set): CI must not pass without having run them."""

from __future__ import annotations

import os
import uuid
from collections.abc import Callable, Iterator

import pytest

SERVER = "host=127.0.0.1 port=5432 user=postgres"
URL = "postgresql://postgres@127.0.0.1:5432"


def require_postgres() -> None:
    try:
        import psycopg

        with psycopg.connect(f"{SERVER} dbname=test", connect_timeout=2):
            return
    except Exception:
        if os.environ.get("CI"):
            pytest.fail("PostgreSQL is not reachable on 127.0.0.1:5432, and CI needs it")
        pytest.skip("PostgreSQL is not reachable")


@pytest.fixture
def pg_schema() -> Iterator[str]:
    """A new schema in the database `test` (its name: set it as POSTGRES_SCHEMA)."""
    require_postgres()
    import psycopg

    schema = f"t_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(f"{SERVER} dbname=test", autocommit=True) as conn:
        conn.execute(f"CREATE SCHEMA {schema}")
    yield schema
    with psycopg.connect(f"{SERVER} dbname=test", autocommit=True) as conn:
        conn.execute(f"DROP SCHEMA {schema} CASCADE")


@pytest.fixture
def pg_database() -> Iterator[Callable[[], str]]:
    """Makes new databases; each call returns the store URL of one."""
    require_postgres()
    import psycopg

    made: list[str] = []

    def make() -> str:
        name = f"podsettle_t_{uuid.uuid4().hex[:12]}"
        with psycopg.connect(f"{SERVER} dbname=test", autocommit=True) as conn:
            conn.execute(f"CREATE DATABASE {name}")
        made.append(name)
        return f"{URL}/{name}"

    yield make
    with psycopg.connect(f"{SERVER} dbname=test", autocommit=True) as conn:
        for name in made:
            conn.execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")
