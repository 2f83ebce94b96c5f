"""Opening a ledger database: engines, SQLite pragmas, and the alembic revision check.

A new, empty ledger is created from the metadata in `migrator.ledger.schema` and stamped with
the head revision (alembic's recipe for new databases; a test checks the result is the
schema the revisions build). A ledger at an older revision is refused (exit 2) with the
command that upgrades it, the way Orthanc refuses an old database until ``--upgrade``.
Read-only commands never create a ledger.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from sqlalchemy import Connection, Engine, create_engine, event, inspect, text
from sqlalchemy.engine import make_url
from sqlalchemy.exc import (
    ArgumentError,
    DBAPIError,
    NoSuchModuleError,
    OperationalError,
    SQLAlchemyError,
)

from migrator.endpoints import redact
from migrator.errors import LedgerError, LedgerOutdated, UsageError


def _migrations_dir() -> Path:
    """Where the alembic revisions are: inside the installed package (a wheel maps the
    repository's migrations/ folder to `migrator/_migrations`), else the repository's own
    folder next to the package (a source checkout or an editable install)."""
    package = Path(__file__).resolve().parent.parent
    installed = package / "_migrations"
    if (installed / "env.py").is_file():
        return installed
    return package.parent / "migrations"


MIGRATIONS_DIR = _migrations_dir()
# The newest revision in migrations/versions (a test checks that alembic agrees). Known
# without alembic, whose import costs ~70 ms of every start; it is imported only to
# create or upgrade a ledger.
HEAD_REVISION = "0008"


def alembic_config(engine_url: str | None = None) -> Any:
    """An alembic Config pointing at this project's revisions."""
    from alembic.config import Config

    if not (MIGRATIONS_DIR / "env.py").is_file():
        # A broken installation: say so in one line instead of alembic's CommandError.
        raise LedgerError(
            f"this migrator installation lacks its schema revisions ({MIGRATIONS_DIR}): "
            "reinstall it"
        )
    cfg = Config()
    cfg.set_main_option("script_location", str(MIGRATIONS_DIR))
    if engine_url:
        cfg.set_main_option("sqlalchemy.url", engine_url.replace("%", "%%"))
    return cfg


def head_revision() -> str:
    """The newest revision this version of the tool knows."""
    return HEAD_REVISION


def known_revisions() -> set[str]:
    """Every revision in migrations/versions, as alembic reads them."""
    from alembic.script import ScriptDirectory

    return {rev.revision for rev in ScriptDirectory.from_config(alembic_config()).walk_revisions()}


def _normalise_url(url: str) -> str:
    try:
        parsed = make_url(url)
    except (ArgumentError, ValueError):
        # ValueError: a port that is not a number. The URL is shown without its password.
        shown = redact(url)
        raise UsageError(
            f"ledger URL {shown!r} is not valid (try sqlite:///migrator.ledger.db)"
        ) from None
    backend = parsed.get_backend_name()
    if backend == "postgresql" and parsed.drivername in ("postgresql", "postgres"):
        parsed = parsed.set(drivername="postgresql+psycopg")
    elif backend not in ("sqlite", "postgresql"):
        raise UsageError(f"ledger URL {parsed.render_as_string()!r}: use sqlite or postgresql")
    return parsed.render_as_string(hide_password=False)


def sqlite_path(url: str) -> Path | None:
    """The file behind an SQLite ledger URL, or None (PostgreSQL, in-memory)."""
    parsed = make_url(url)
    if parsed.get_backend_name() != "sqlite" or not parsed.database:
        return None
    if parsed.database == ":memory:" or parsed.database.startswith("file:"):
        return None
    return Path(parsed.database)


def _install_sqlite_hooks(engine: Engine) -> None:
    @event.listens_for(engine, "connect")
    def _on_connect(dbapi_conn, _record):  # type: ignore[no-untyped-def]
        # Let SQLAlchemy issue BEGIN itself (below), so that writers can take the write lock
        # up front with BEGIN IMMEDIATE instead of failing on a lock upgrade.
        dbapi_conn.isolation_level = None
        cur = dbapi_conn.cursor()
        # WAL: readers (status, the web page) never block the writer. synchronous=NORMAL
        # can lose the last commits on power loss, never on a process kill; a lost `sent`
        # only means one resend, which the target answers AlreadyStored.
        cur.execute("PRAGMA journal_mode=WAL")
        cur.execute("PRAGMA synchronous=NORMAL")
        cur.execute("PRAGMA foreign_keys=ON")
        cur.execute("PRAGMA busy_timeout=60000")
        # A listing inserts into seven indexes at once: a 16 MiB page cache (default 2 MiB)
        # and a checkpoint (with its fsync) every ~40 MB of WAL instead of every 4 MB
        # made listing 100,000 rows faster in each of 3 interleaved pairs (median 3.33 -> 3.14 s).
        cur.execute("PRAGMA cache_size=-16384")
        cur.execute("PRAGMA wal_autocheckpoint=10000")
        cur.close()

    @event.listens_for(engine, "begin")
    def _on_begin(conn):  # type: ignore[no-untyped-def]
        immediate = conn.get_execution_options().get("immediate", False)
        conn.exec_driver_sql("BEGIN IMMEDIATE" if immediate else "BEGIN")


def make_engine(url: str, *, must_exist: bool) -> Engine:
    """Create an engine for a ledger URL; `must_exist` refuses to create a new SQLite file."""
    url = _normalise_url(url)
    path = sqlite_path(url)
    if path is not None:
        if must_exist and not path.exists():
            raise UsageError(f"no ledger at {path}: run `migrator replicate` or `import` first")
        if not path.parent.exists():
            raise UsageError(f"ledger folder {path.parent} does not exist")
        if path.is_dir():
            raise UsageError(f"ledger path {path} is a directory")
    try:
        if url.startswith("sqlite"):
            engine = create_engine(url, connect_args={"timeout": 60, "check_same_thread": False})
            _install_sqlite_hooks(engine)
        else:
            engine = create_engine(url, pool_pre_ping=True, pool_size=5, max_overflow=5)
    except (NoSuchModuleError, ArgumentError) as exc:
        raise UsageError(f"ledger URL is not usable: {exc}") from None
    return engine


def check_revision(engine: Engine, *, create: bool, url_for_messages: str) -> None:
    """Make sure the ledger's schema is this tool's: create it, or refuse an old one."""
    head = head_revision()
    try:
        with engine.connect() as conn:
            tables = set(inspect(conn).get_table_names())
            current = _read_revision(conn, tables)
    except SQLAlchemyError as exc:
        raise _unreadable(exc, url_for_messages) from None
    if current == head:
        return
    if current is None:
        if tables:
            raise UsageError(f"{url_for_messages} holds tables but is not a migrator ledger")
        if not create:
            raise UsageError(f"{url_for_messages} is not a migrator ledger (no tables yet)")
        try:
            create_schema(engine)
        except SQLAlchemyError as exc:
            reason = short_error(exc)
            raise LedgerError(f"cannot create the ledger {url_for_messages}: {reason}") from None
        return
    if current not in known_revisions():
        raise LedgerError(
            f"the ledger {url_for_messages} is at revision {current}, written by a newer "
            f"migrator (this one knows up to {head})"
        )
    raise LedgerOutdated(
        f"the ledger {url_for_messages} is at revision {current}, this migrator needs {head}: "
        f"run `migrator db upgrade --ledger {url_for_messages}` (back it up first)"
    )


def create_schema(engine: Engine) -> None:
    """Create the head schema in an empty database, stamped as alembic would stamp it.

    Building it from the metadata in one transaction takes a few milliseconds; running
    every revision took ~0.1 s (and alembic's import) at the start of each new job.
    """
    from migrator.ledger.schema import metadata, use_dialect

    use_dialect(engine.dialect.name)
    with engine.begin() as conn:
        metadata.create_all(conn)
        # alembic's version table, as `alembic stamp` creates it.
        conn.execute(
            text(
                "CREATE TABLE alembic_version (version_num VARCHAR(32) NOT NULL, "
                "CONSTRAINT alembic_version_pkc PRIMARY KEY (version_num))"
            )
        )
        conn.execute(
            text("INSERT INTO alembic_version (version_num) VALUES (:v)"), {"v": HEAD_REVISION}
        )


def _migrate(engine: Engine, step: Any, revision: str) -> None:
    cfg = alembic_config()
    with engine.connect() as conn:
        sqlite = engine.dialect.name == "sqlite"
        if sqlite:
            # On SQLite, alembic rebuilds a table to alter it (copy, drop, rename). With
            # foreign keys on, dropping `jobs` would cascade into `instances` and empty
            # the ledger. The pragma only works outside a transaction, hence the raw
            # DBAPI connection before BEGIN.
            conn.connection.dbapi_connection.execute("PRAGMA foreign_keys=OFF")
        try:
            with conn.begin():
                cfg.attributes["connection"] = conn
                step(cfg, revision)
        finally:
            if sqlite:
                conn.connection.dbapi_connection.execute("PRAGMA foreign_keys=ON")


def upgrade(engine: Engine, revision: str = "head") -> None:
    """Apply alembic revisions up to `revision` on this engine."""
    from alembic import command

    _migrate(engine, command.upgrade, revision)


def downgrade(engine: Engine, revision: str) -> None:
    """Revert alembic revisions down to `revision` (used by tests and by hand)."""
    from alembic import command

    _migrate(engine, command.downgrade, revision)


def upgrade_ledger(engine: Engine) -> tuple[str | None, str | None]:
    """`migrator db upgrade`: bring a ledger to the head revision; returns (before, after).

    Refuses a database that holds other tables, or a ledger written by a newer migrator,
    in one line instead of alembic's own errors.
    """
    shown = engine.url.render_as_string(hide_password=True)
    try:
        with engine.connect() as conn:
            tables = set(inspect(conn).get_table_names())
            before = _read_revision(conn, tables)
    except SQLAlchemyError as exc:
        raise _unreadable(exc, shown) from None
    if before is None and tables:
        raise UsageError(f"{shown} holds tables but is not a migrator ledger")
    if before is not None and before not in known_revisions():
        raise LedgerError(
            f"the ledger {shown} is at revision {before}, written by a newer migrator "
            f"(this one knows up to {head_revision()})"
        )
    try:
        upgrade(engine)
    except SQLAlchemyError as exc:
        raise LedgerError(f"cannot upgrade the ledger {shown}: {short_error(exc)}") from None
    return before, current_revision(engine)


def current_revision(engine: Engine) -> str | None:
    """The ledger's alembic revision, or None for an empty database."""
    try:
        with engine.connect() as conn:
            return _read_revision(conn, set(inspect(conn).get_table_names()))
    except SQLAlchemyError as exc:
        raise _unreadable(exc, engine.url.render_as_string(hide_password=True)) from None


def _unreadable(exc: SQLAlchemyError, shown: str) -> LedgerError | UsageError:
    """The one-line error for a ledger that cannot be read: a file that is no database at
    all is bad input (exit 2); anything else, a fatal ledger error."""
    reason = short_error(exc)
    if "file is not a database" in reason:
        return UsageError(f"{shown} is not a migrator ledger ({reason})")
    return LedgerError(f"cannot open the ledger {shown}: {reason}")


def _read_revision(conn: Connection, tables: set[str]) -> str | None:
    # alembic's own table: one row, the revision the schema is at (none: no revision).
    if "alembic_version" not in tables:
        return None
    return conn.execute(text("SELECT version_num FROM alembic_version")).scalar()


def short_error(exc: BaseException) -> str:
    """The first line of a database error, for one-line messages."""
    text = str(getattr(exc, "orig", None) or exc).strip().splitlines()
    return text[0] if text else type(exc).__name__


class Transaction:
    """A transaction that turns database failures into one-line LedgerErrors."""

    def __init__(self, conn: Connection, display_url: str) -> None:
        self.conn = conn
        self.display_url = display_url

    def __enter__(self) -> Connection:
        try:
            self.conn.begin()
        except SQLAlchemyError as exc:
            self.conn.close()
            reason = self._reason(exc)
            raise LedgerError(f"ledger {self.display_url} is unusable: {reason}") from None
        return self.conn

    def _reason(self, exc: SQLAlchemyError) -> str:
        """Why the ledger failed, asked again on a new connection when the old one died.

        A connection the server cut (a dropped database, a restart) only says it was
        terminated; a new connection names the cause, e.g. that the database is gone.
        """
        cut = isinstance(exc, DBAPIError) and exc.connection_invalidated
        if not cut and not isinstance(exc, OperationalError):
            return short_error(exc)
        try:
            with self.conn.engine.connect() as probe:
                probe.exec_driver_sql("SELECT 1")
        except SQLAlchemyError as again:
            return short_error(again)
        return short_error(exc)

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        try:
            if exc_type is None:
                self.conn.commit()
            else:
                self.conn.rollback()
        except SQLAlchemyError as err:
            if exc_type is None:
                raise LedgerError(
                    f"ledger {self.display_url} could not be written: {self._reason(err)}"
                ) from None
        finally:
            self.conn.close()
        if isinstance(exc, SQLAlchemyError):
            raise LedgerError(
                f"ledger {self.display_url} could not be written: {self._reason(exc)}"
            ) from None


def display_url(url: str) -> str:
    """A ledger URL with any password hidden."""
    try:
        return make_url(url).render_as_string(hide_password=True)
    except Exception:
        return "<invalid ledger URL>"
