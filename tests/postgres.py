"""The PostgreSQL the outbox's tests use (started by scripts/postgres), and a database per test.

TEST_POSTGRES_DSN names a role that may create databases (scripts/postgres prints it); each
test gets a database of its own with the outbox schema, dropped afterwards, so tests never see
each other's rows, notifications or advisory locks (all three are per database).
"""

from __future__ import annotations

import os
import subprocess
import time
import uuid
from urllib.parse import urlsplit, urlunsplit

import psycopg

DSN = os.environ.get(
    "TEST_POSTGRES_DSN", "postgresql://vercel_outbox:vercel_outbox@127.0.0.1:5432/vercel_outbox"
)


def with_database(dsn: str, name: str) -> str:
    return urlunsplit(urlsplit(dsn)._replace(path=f"/{name}"))


def create_database() -> str:
    """A new, empty database; its DSN."""
    name = f"outbox_test_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(DSN, autocommit=True) as admin:
        admin.execute(f"CREATE DATABASE {name}")  # type: ignore[arg-type]
    return with_database(DSN, name)


def drop_database(dsn: str) -> None:
    name = urlsplit(dsn).path.lstrip("/")
    with psycopg.connect(DSN, autocommit=True) as admin:
        admin.execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")  # type: ignore[arg-type]


def restart_cluster() -> None:
    """`pg_ctlcluster <version> main restart` (shared: every connection to it is cut)."""
    version = sorted(os.listdir("/usr/lib/postgresql"), key=int)[-1]
    subprocess.run(["pg_ctlcluster", version, "main", "restart"], check=True, timeout=120)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        try:
            psycopg.connect(DSN, connect_timeout=2).close()
            return
        except psycopg.OperationalError:
            time.sleep(0.2)
    raise RuntimeError("PostgreSQL did not come back within 60 s")
