"""Alembic environment for the migrator ledger.

Runs against the connection handed over by `migrator.ledger.store` (``config.attributes``) or,
when alembic is called by hand, against ``sqlalchemy.url`` from the config.
"""

from __future__ import annotations

from alembic import context
from sqlalchemy import create_engine

from migrator.ledger.schema import metadata

config = context.config
target_metadata = metadata


def run_migrations() -> None:
    """Apply the revisions on one connection, in one transaction where the dialect allows."""
    connection = config.attributes.get("connection")
    if connection is not None:
        context.configure(
            connection=connection, target_metadata=target_metadata, render_as_batch=True
        )
        with context.begin_transaction():
            context.run_migrations()
        return
    engine = create_engine(config.get_main_option("sqlalchemy.url"))
    with engine.connect() as conn:
        context.configure(connection=conn, target_metadata=target_metadata, render_as_batch=True)
        with context.begin_transaction():
            context.run_migrations()


if context.is_offline_mode():
    raise SystemExit("offline migrations are not supported")
run_migrations()
