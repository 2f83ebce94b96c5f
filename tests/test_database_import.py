"""`migrator import` / `inspect` of a stopped Orthanc whose index (and files) live in
PostgreSQL or MariaDB, written by Debian's orthanc-postgresql / orthanc-mysql plugins."""

from __future__ import annotations

import asyncio
import hashlib
import os
import signal
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from conftest import ledger_rows, run_cli, start_cli, state_counts, wait_for_sent

from migrator.config import Settings
from migrator.ends.database import open_database_source
from migrator.ends.streams import CHUNK, STREAM_ABOVE, FileChunks
from migrator.testkit import OrthancProcess, make_dataset, upload_all
from migrator.testkit.dbplugins import (
    PLUGINS,
    admin_connection,
    db_url,
    execute,
    fresh_database,
    plugin_orthanc,
)
from migrator.testkit.dicomgen import orthanc_compressed

pytestmark = pytest.mark.skipif(
    not os.path.exists(f"{PLUGINS}/libOrthancPostgreSQLIndex.so"),
    reason="Debian's orthanc-postgresql / orthanc-mysql plugins are not installed",
)


def _server_up(dialect: str) -> None:
    try:
        admin_connection(dialect).close()
    except Exception as exc:
        if os.environ.get("CI"):
            pytest.fail(f"{dialect} is needed in CI: {exc}")
        pytest.skip(f"no {dialect} server: {exc}")


@dataclass
class Row:
    """What a source is handed for one listed instance (the lease's fields)."""

    source_key: str
    path: str | None
    size: int | None
    md5: str | None
    orthanc_id: str | None


@dataclass
class OldServer:
    """A stopped Orthanc's database: its URL, name, and the MD5 of each instance."""

    dialect: str
    database: str
    url: str
    md5s: dict[str, str]
    orthanc: OrthancProcess


@pytest.fixture
def old_server(tmp_path: Path) -> Iterator[Callable[..., OldServer]]:
    """Make an Orthanc write `n` instances into a fresh database (half of them stored
    compressed, unless told), then stop it for good."""
    made: list = []

    def make(
        dialect: str,
        *,
        storage: bool = True,
        n: int = 12,
        compressed: str = "half",
        extra_bytes: int = 0,
    ) -> OldServer:
        _server_up(dialect)
        ctx = fresh_database(dialect)
        database = ctx.__enter__()
        made.append(ctx)
        server = plugin_orthanc(tmp_path / f"old-{dialect}", dialect, database, storage=storage)
        data = make_dataset(n, seed=len(made), extra_bytes=extra_bytes)
        plain = n // 2 if compressed == "half" else (n if compressed == "none" else 0)
        try:
            if plain:
                server.start(60)
                upload_all(server, data[:plain])
            if plain < n:
                # The same database, written on by an Orthanc that compresses.
                server.stop(graceful=False)
                server.extra["StorageCompression"] = True
                server.start(60)
                upload_all(server, data[plain:])
            md5s = {i: server.md5(i) for i in server.instance_ids()}
        finally:
            # Killed, as on a dead host: what Orthanc answered is committed.
            server.stop(graceful=False)
        assert len(md5s) == n
        return OldServer(dialect, database, db_url(dialect, database), md5s, server)

    yield make
    for ctx in made:
        ctx.__exit__(None, None, None)


def _import(old: OldServer, target: OrthancProcess, ledger: Path, *extra: str, **kw):
    return run_cli("import", old.url, target.url, "--ledger", f"sqlite:///{ledger}", *extra, **kw)


def _assert_identical(old: OldServer, target: OrthancProcess, missing: set[str] = frozenset()):
    """Every instance (but `missing`) is on the target, byte for byte the old server's."""
    assert set(target.instance_ids()) == set(old.md5s) - set(missing)
    for instance, md5 in old.md5s.items():
        if instance not in missing:
            assert target.md5(instance) == md5, instance


def _compressed_count(old: OldServer) -> int:
    rows = execute(
        old.dialect,
        old.database,
        "SELECT COUNT(*) FROM AttachedFiles WHERE fileType = 1 AND compressionType = 2",
    )
    return int(rows[0][0])


@pytest.mark.parametrize("dialect", ["postgresql", "mysql"])
def test_index_and_storage_in_database(dialect, old_server, orthanc_factory, tmp_path):
    """Index and attachments (plain and compressed) in the database: every instance
    arrives byte-identical; inspect tells the numbers and the next command."""
    old = old_server(dialect)
    assert _compressed_count(old) == 6  # both kinds of attachment are read
    found = run_cli("inspect", old.url)
    assert found.code == 0, found.stderr
    assert "instances      12" in found.stdout
    assert "6 of 12 DICOM files" in found.stdout
    assert "in the database" in found.stdout
    assert f"next: migrator import {old.url} http://TARGET:8042/" in found.stdout
    target = orthanc_factory("target")
    ledger = tmp_path / "ledger.db"
    result = _import(old, target, ledger)
    assert result.code == 0, result.stderr
    assert state_counts(ledger) == {"sent": 12}
    _assert_identical(old, target)
    # The ledger keeps the URL without credentials, and the instance's identifiers.
    (source,) = ledger_rows(ledger, "SELECT source FROM jobs")[0]
    assert source == old.url
    rows = ledger_rows(ledger, "SELECT sop_uid, study_uid, series_uid, md5 FROM instances")
    assert all(all(row) for row in rows)


def test_kill_and_rerun_finishes(old_server, orthanc_factory, tmp_path):
    """kill -9 in the middle of an import of a PostgreSQL storage area: the rerun sends
    the rest, and every instance arrives byte-identical."""
    old = old_server("postgresql", n=20)
    target = orthanc_factory("target")
    ledger = tmp_path / "ledger.db"
    args = ("import", old.url, target.url, "--ledger", f"sqlite:///{ledger}")
    proc = start_cli(*args, "-c", "1", "--fixed", "--max-rate", "20", "--progress", "none")
    try:
        wait_for_sent(ledger, 5, timeout=60)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    assert state_counts(ledger).get("sent", 0) < 20
    result = run_cli(*args)
    assert result.code == 0, result.stderr
    assert state_counts(ledger) == {"sent": 20}
    _assert_identical(old, target)


def test_index_in_database_files_on_disk(old_server, orthanc_factory, tmp_path):
    """Index plugin only, files (compressed) in the old StorageDirectory: --storage
    reads them; without it, one line says where to look."""
    old = old_server("postgresql", storage=False, compressed="all")
    target = orthanc_factory("target")
    ledger = tmp_path / "ledger.db"
    without = _import(old, target, ledger)
    without.assert_one_line_error()
    assert without.code == 2 and "--storage" in without.stderr
    storage = str(old.orthanc.storage_dir)
    found = run_cli("inspect", old.url, "--storage", storage)
    assert found.code == 0, found.stderr
    assert f"on disk under {storage}" in found.stdout and "missing        0" in found.stdout
    result = _import(old, target, ledger, "--storage", storage)
    assert result.code == 0, result.stderr
    assert state_counts(ledger) == {"sent": 12}
    _assert_identical(old, target)


def test_large_instances_stream_from_large_objects(old_server, orthanc_factory, tmp_path):
    """Instances over the streaming threshold (one plain, one compressed) are read from
    their large objects a piece at a time, inflated on the way, and arrive identical."""
    old = old_server("postgresql", n=2, extra_bytes=STREAM_ABOVE + 1024)
    assert _compressed_count(old) == 1
    source = open_database_source(old.url, Settings(), {})

    async def read_streamed() -> dict[str, str]:
        digests = {}
        try:
            await source.preflight()
            for key in old.md5s:
                # Listed over the streaming threshold (the index gives the exact size).
                item = Row(key, None, STREAM_ABOVE + 2048, old.md5s[key], key)
                chunks = await source.open(item)
                assert isinstance(chunks, FileChunks), key  # not read whole
                digest = hashlib.md5()
                async for chunk in chunks:
                    assert len(chunk) <= CHUNK
                    digest.update(chunk)
                await chunks.aclose()
                digests[key] = digest.hexdigest()
        finally:
            await source.aclose()
        return digests

    assert asyncio.run(read_streamed()) == old.md5s
    target = orthanc_factory("target")
    ledger = tmp_path / "ledger.db"
    result = _import(old, target, ledger)
    assert result.code == 0, result.stderr
    assert state_counts(ledger) == {"sent": 2}
    _assert_identical(old, target)


def test_selection_lists_only_the_selected_studies(old_server):
    """A job's selection (studies by UID, modality, date) is applied at listing time: the
    rows are those of the selected studies, no others."""
    old = old_server("postgresql", n=24, compressed="none")
    studies = execute(
        "postgresql",
        old.database,
        "SELECT st.publicId, m.value FROM Resources st JOIN MainDicomTags m ON m.id = "
        "st.internalId AND m.tagGroup = 32 AND m.tagElement = 13 WHERE st.resourceType = 1",
    )
    assert len(studies) == 2
    uid = studies[0][1]

    def listed(selection: dict) -> list[dict]:
        source = open_database_source(old.url, Settings(), {"selection": selection})

        async def rows() -> list[dict]:
            try:
                return [row async for page in source.listing(None) for row in page.rows]
            finally:
                await source.aclose()

        return asyncio.run(rows())

    one = listed({"study_uids": [uid]})
    assert one and {row["study_uid"] for row in one} == {uid}
    assert len(listed({})) == 24
    assert len(listed({"modalities": ["OT"]})) == 24
    assert listed({"modalities": ["CT"]}) == []
    assert listed({"since": "20990101"}) == []


def test_removed_large_object_ends_vanished(old_server, orthanc_factory, tmp_path):
    """An attachment row whose large object was removed: that instance ends vanished
    (inspect counts it missing), every other one arrives."""
    old = old_server("postgresql")
    gone = sorted(old.md5s)[3]
    execute(
        "postgresql",
        old.database,
        "SELECT lo_unlink(s.content) FROM StorageArea s JOIN AttachedFiles a ON a.uuid = s.uuid "
        "JOIN Resources r ON r.internalId = a.id WHERE r.publicId = %s AND a.fileType = 1",
        (gone,),
    )
    found = run_cli("inspect", old.url)
    assert "missing        1" in found.stdout and gone in found.stdout
    target = orthanc_factory("target")
    ledger = tmp_path / "ledger.db"
    _import(old, target, ledger)
    assert state_counts(ledger) == {"sent": 11, "vanished": 1}
    ((key, error),) = ledger_rows(
        ledger, "SELECT source_key, last_error FROM instances WHERE state = 'vanished'"
    )
    assert key == gone and "no content" in error
    _assert_identical(old, target, missing={gone})


def test_damaged_compressed_attachment_is_rejected(old_server, orthanc_factory, tmp_path):
    """A compressed attachment whose content inflates to other bytes than the index's
    MD5 says: rejected, never sent; a damaged zlib stream likewise."""
    old = old_server("postgresql", compressed="all")
    other, garbled = sorted(old.md5s)[2], sorted(old.md5s)[5]
    swap = orthanc_compressed(make_dataset(1, seed=99)[0].data)
    sql = (
        "UPDATE StorageArea SET content = lo_from_bytea(0, %s) WHERE uuid = (SELECT a.uuid "
        "FROM AttachedFiles a JOIN Resources r ON r.internalId = a.id "
        "WHERE r.publicId = %s AND a.fileType = 1)"
    )
    execute("postgresql", old.database, sql, (swap, other))
    execute("postgresql", old.database, sql, (swap[:8] + b"\x78\x9c" + b"\xff" * 40, garbled))
    target = orthanc_factory("target")
    ledger = tmp_path / "ledger.db"
    _import(old, target, ledger)
    assert state_counts(ledger) == {"sent": 10, "rejected": 2}
    errors = dict(
        ledger_rows(ledger, "SELECT source_key, last_error FROM instances WHERE state = 'rejected'")
    )
    assert "MD5" in errors[other] and old.md5s[other] in errors[other]
    assert "corrupt" in errors[garbled]
    _assert_identical(old, target, missing={other, garbled})


@pytest.mark.parametrize("dialect", ["postgresql", "mysql"])
def test_database_held_by_running_orthanc(dialect, old_server, orthanc_factory, tmp_path):
    """An Orthanc still runs on the database: refused in one line (exit 3) and nothing
    listed; --force reads it anyway."""
    old = old_server(dialect, n=4)
    target = orthanc_factory("target")
    ledger = tmp_path / "ledger.db"
    old.orthanc.start(60)
    try:
        refused = _import(old, target, ledger)
        refused.assert_one_line_error()
        assert refused.code == 3 and "still running" in refused.stderr
        assert not ledger.exists() or not ledger_rows(ledger, "SELECT * FROM instances")
        forced = _import(old, target, ledger, "--force")
        assert forced.code == 0, forced.stderr
    finally:
        old.orthanc.stop(graceful=False)
    _assert_identical(old, target)


def test_unknown_schema_is_refused(old_server, orthanc_factory, tmp_path):
    """A schema version this tool was not tested with: one line, nothing read."""
    old = old_server("postgresql", n=2)
    execute(
        "postgresql", old.database, "UPDATE GlobalProperties SET value = '7' WHERE property = 1"
    )
    target = orthanc_factory("target")
    result = _import(old, target, tmp_path / "ledger.db")
    result.assert_one_line_error()
    assert result.code == 3 and "schema version 7" in result.stderr
    assert target.count() == 0


def test_wrong_database_or_password_is_one_line(tmp_path):
    """A database that does not exist, a refused password (in the URL or the
    environment): one line, exit 3, and the password shown nowhere."""
    _server_up("postgresql")
    _server_up("mysql")
    ledger = f"sqlite:///{tmp_path / 'ledger.db'}"
    target = "http://127.0.0.1:9/"
    missing = run_cli("import", db_url("postgresql", "no_such_db_here"), target, "--ledger", ledger)
    missing.assert_one_line_error()
    assert missing.code == 3 and "no_such_db_here" in missing.stderr
    url = "mysql://root:s3cr3t-word@127.0.0.1:3306/mysql"
    refused = run_cli("import", url, target, "--ledger", ledger)
    refused.assert_one_line_error()
    assert refused.code == 3 and "Access denied" in refused.stderr
    by_env = run_cli(
        "inspect",
        "mysql://root@127.0.0.1:3306/mysql",
        env={"MIGRATOR_SOURCE_PASSWORD": "s3cr3t-word"},
    )
    by_env.assert_one_line_error()
    assert by_env.code == 3
    for result in (refused, by_env):
        assert "s3cr3t" not in result.stderr + result.stdout


def test_reads_are_read_only(old_server):
    """The source's session cannot write: its transactions are read-only."""
    from migrator.config import Settings
    from migrator.ends.database.index import IndexDatabase, parse_db_url

    for dialect in ("postgresql", "mysql"):
        old = old_server(dialect, n=1, compressed="none")
        db = IndexDatabase(parse_db_url(old.url, Settings()), connections=1)
        try:
            with pytest.raises(Exception, match=r"(?i)read.only"):
                db._rows("UPDATE GlobalProperties SET value = value WHERE property = 1")
        finally:
            db.close()
