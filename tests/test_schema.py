"""The alembic revisions build exactly the schema the code queries, on SQLite."""

from __future__ import annotations

from pathlib import Path

from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext

from migrator import db
from migrator.ledger import Ledger
from migrator.schema import metadata


def test_revisions_match_metadata(tmp_path: Path) -> None:
    ledger = Ledger.open(f"sqlite:///{tmp_path / 'l.db'}", create=True)
    try:
        with ledger.engine.connect() as conn:
            diff = compare_metadata(MigrationContext.configure(conn), metadata)
        assert diff == []
    finally:
        ledger.close()


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
