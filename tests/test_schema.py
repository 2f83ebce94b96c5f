"""The alembic revisions build exactly the schema the code queries and creates."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from sqlalchemy import Engine, text

from migrator.ledger import db
from migrator.ledger.schema import metadata
from migrator.ledger.store import Ledger


def test_revisions_match_metadata(tmp_path: Path) -> None:
    engine = db.make_engine(f"sqlite:///{tmp_path / 'l.db'}", must_exist=False)
    try:
        db.upgrade(engine)
        with engine.connect() as conn:
            diff = compare_metadata(MigrationContext.configure(conn), metadata)
        assert diff == []
    finally:
        engine.dispose()


def _sqlite_schema(engine: Engine) -> dict[str, Any]:
    """Every column, key, index (with its WHERE clause) and the revision, from SQLite."""
    found: dict[str, Any] = {}
    with engine.connect() as conn:
        rows = conn.exec_driver_sql(
            "SELECT type, name, tbl_name, sql FROM sqlite_master WHERE name NOT LIKE 'sqlite_%'"
        ).all()
        for kind, name, table, sql in rows:
            if kind == "table":
                found[name] = {
                    "columns": conn.exec_driver_sql(f"PRAGMA table_info('{name}')").all(),
                    "keys": sorted(
                        tuple(r[2:])
                        for r in conn.exec_driver_sql(f"PRAGMA foreign_key_list('{name}')")
                    ),
                    "indexes": sorted(
                        (
                            r[1],
                            r[2],
                            r[3],
                            r[4],
                            tuple(conn.exec_driver_sql(f"PRAGMA index_xinfo('{r[1]}')").all()),
                        )
                        for r in conn.exec_driver_sql(f"PRAGMA index_list('{name}')")
                    ),
                }
            elif kind == "index" and sql and " WHERE " in sql:
                where = sql.split(" WHERE ", 1)[1]
                found[f"{table}.{name}.where"] = re.sub(r"\s+", " ", where).strip()
        found["revision"] = conn.execute(text("SELECT version_num FROM alembic_version")).all()
    return found


def _pg_schema(engine: Engine) -> dict[str, Any]:
    """Every column, constraint, index definition and the revision, from PostgreSQL."""
    with engine.connect() as conn:
        return {
            "columns": conn.exec_driver_sql(
                "SELECT table_name, column_name, data_type, is_nullable, column_default, "
                "character_maximum_length FROM information_schema.columns "
                "WHERE table_schema = 'public' ORDER BY 1, 2"
            ).all(),
            "constraints": conn.exec_driver_sql(
                "SELECT conrelid::regclass::text, conname, pg_get_constraintdef(oid) "
                "FROM pg_constraint WHERE connamespace = 'public'::regnamespace ORDER BY 1, 2"
            ).all(),
            "indexes": conn.exec_driver_sql(
                "SELECT indexname, indexdef FROM pg_indexes WHERE schemaname = 'public' ORDER BY 1"
            ).all(),
            "revision": conn.execute(text("SELECT version_num FROM alembic_version")).all(),
        }


def _both_ways(url_a: str, url_b: str, snapshot: Any) -> tuple[Any, Any]:
    by_revisions = db.make_engine(url_a, must_exist=False)
    try:
        db.upgrade(by_revisions)
        a = snapshot(by_revisions)
    finally:
        by_revisions.dispose()
    ledger = Ledger.open(url_b, create=True)  # a new ledger: created in one step
    try:
        b = snapshot(ledger.engine)
    finally:
        ledger.close()
    return a, b


def test_new_sqlite_ledger_is_the_revisions_schema(tmp_path: Path) -> None:
    a, b = _both_ways(
        f"sqlite:///{tmp_path / 'a.db'}", f"sqlite:///{tmp_path / 'b.db'}", _sqlite_schema
    )
    assert a["instances"]["indexes"] and a["instances.ix_instances_copies.where"]
    # Revision 0008: the study date and priority, and the index of the lease order.
    assert {"study_date", "priority"} <= {c[1] for c in a["instances"]["columns"]}
    assert "ix_instances_order" in {i[0] for i in a["instances"]["indexes"]}
    assert a == b


def test_new_postgresql_ledger_is_the_revisions_schema(pg_url: str) -> None:
    import psycopg

    # A second fresh database beside the fixture's, for the other way of building.
    name = pg_url.rsplit("/", 1)[1] + "_b"
    with psycopg.connect(pg_url, autocommit=True) as admin:
        admin.execute(f'CREATE DATABASE "{name}"')
    try:
        a, b = _both_ways(pg_url, pg_url.rsplit("/", 1)[0] + "/" + name, _pg_schema)
    finally:
        with psycopg.connect(pg_url, autocommit=True) as admin:
            admin.execute(f'DROP DATABASE IF EXISTS "{name}"')
    assert any("ix_instances_copies" in name and "WHERE" in d for name, d in a["indexes"])
    assert any(name == "ix_instances_order" for name, _ in a["indexes"])
    assert a == b


def test_downgrade_and_upgrade_round_trip(tmp_path: Path) -> None:
    ledger = Ledger.open(f"sqlite:///{tmp_path / 'l.db'}", create=True)
    try:
        db.downgrade(ledger.engine, "base")
        assert db.current_revision(ledger.engine) is None
        db.upgrade(ledger.engine)
        assert db.current_revision(ledger.engine) == db.head_revision()
    finally:
        ledger.close()


def test_head_revision_is_alembics() -> None:
    # The tool knows its head revision without importing alembic at start-up.
    from alembic.script import ScriptDirectory

    script = ScriptDirectory.from_config(db.alembic_config())
    assert script.get_current_head() == db.HEAD_REVISION
    assert db.HEAD_REVISION in db.known_revisions()


def test_start_up_does_not_import_alembic_or_postgresql() -> None:
    import subprocess
    import sys

    code = (
        "import sys, migrator.cli, migrator.app, migrator.ledger.store, migrator.engine.scheduler; "
        "print(sorted(m for m in sys.modules if m.startswith(('alembic', "
        "'sqlalchemy.dialects.postgresql'))))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
