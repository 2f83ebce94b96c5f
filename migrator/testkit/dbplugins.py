"""Throwaway databases and Orthanc processes that keep their index (and files) in them.

:func:`fresh_database` makes an empty PostgreSQL or MariaDB database with a unique name
and drops it afterwards; :func:`plugin_orthanc` configures an :class:`OrthancProcess` to
load Debian's ``orthanc-postgresql`` / ``orthanc-mysql`` plugins on it (index, and the
storage area too unless ``storage=False``). Tests, benchmarks and demos use them.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from migrator.testkit.orthanc import OrthancProcess

__all__ = [
    "MYSQL_ADMIN",
    "PG_ADMIN",
    "PLUGINS",
    "admin_connection",
    "db_url",
    "fresh_database",
    "plugin_orthanc",
]

PLUGINS = os.environ.get("MIGRATOR_ORTHANC_PLUGINS", "/usr/share/orthanc/plugins")
# The servers the tests use: PostgreSQL with trust auth, MariaDB's root without password.
PG_ADMIN = {"host": "127.0.0.1", "port": 5432, "user": "postgres"}
MYSQL_ADMIN = {"host": "127.0.0.1", "port": 3306, "user": "root"}
_LIBS = {
    "postgresql": ("libOrthancPostgreSQLIndex.so", "libOrthancPostgreSQLStorage.so"),
    "mysql": ("libOrthancMySQLIndex.so", "libOrthancMySQLStorage.so"),
}


def admin_connection(dialect: str, database: str | None = None) -> Any:
    """An autocommit connection as the server's administrator (to `database`, if given)."""
    if dialect == "postgresql":
        import psycopg

        return psycopg.connect(
            **PG_ADMIN, dbname=database or "postgres", autocommit=True, connect_timeout=5
        )
    import pymysql

    return pymysql.connect(
        **MYSQL_ADMIN, password="", database=database, autocommit=True, connect_timeout=5
    )


def execute(dialect: str, database: str, sql: str, args: tuple[Any, ...] = ()) -> list[tuple]:
    """Run one statement on `database` as administrator; its rows (if any)."""
    conn = admin_connection(dialect, database)
    try:
        cur = conn.cursor()
        cur.execute(sql, args)
        try:
            return list(cur.fetchall())
        except Exception:  # a statement without rows
            return []
    finally:
        conn.close()


def db_url(dialect: str, database: str) -> str:
    """The migrator URL of a test database (no password: trust / root without one)."""
    admin = PG_ADMIN if dialect == "postgresql" else MYSQL_ADMIN
    return f"{dialect}://{admin['user']}@{admin['host']}:{admin['port']}/{database}"


@contextmanager
def fresh_database(dialect: str) -> Iterator[str]:
    """An empty database with a unique name, dropped at the end (its sessions ended)."""
    name = f"migrator_db_{uuid.uuid4().hex[:12]}"
    admin = admin_connection(dialect)
    try:
        admin.cursor().execute(f"CREATE DATABASE {name}")
        yield name
    finally:
        cur = admin.cursor()
        if dialect == "postgresql":
            cur.execute(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = %s",
                (name,),
            )
        cur.execute(f"DROP DATABASE IF EXISTS {name}")
        admin.close()


def plugin_orthanc(
    workdir: Path,
    dialect: str,
    database: str,
    *,
    storage: bool = True,
    compression: bool = False,
    name: str = "orthanc",
) -> OrthancProcess:
    """An Orthanc (not started) whose index, and storage area when `storage`, are in
    `database`; otherwise its files go to its own StorageDirectory."""
    index_lib, storage_lib = _LIBS[dialect]
    plugins = [f"{PLUGINS}/{index_lib}"] + ([f"{PLUGINS}/{storage_lib}"] if storage else [])
    admin = PG_ADMIN if dialect == "postgresql" else MYSQL_ADMIN
    section = {
        "EnableIndex": True,
        "EnableStorage": storage,
        "Host": admin["host"],
        "Port": admin["port"],
        "Database": database,
        "Username": admin["user"],
        "Password": "",
        "Lock": True,
    }
    if dialect == "mysql":
        section["UnixSocket"] = ""  # TCP, not Debian's default socket
    key = "PostgreSQL" if dialect == "postgresql" else "MySQL"
    extra = {"Plugins": plugins, "StorageCompression": compression, key: section}
    return OrthancProcess(workdir, name=name, extra=extra)
