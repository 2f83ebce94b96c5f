"""`migrator import` on folders that are not what they seem: an index whose files live
elsewhere, names that are not UTF-8, files that cannot be read, symbolic links.

Storage folders are written by real Orthanc processes; every import goes to a real one.
"""

from __future__ import annotations

import os
import shutil
import sqlite3
import subprocess
from pathlib import Path

import pytest
from conftest import MIGRATOR, CliResult, ledger_rows, run_cli, state_counts

from migrator.ends.folder import source as folder_source
from migrator.ends.folder.storage import escape_name, ledger_path, real_path, walk_files
from migrator.errors import FatalError
from migrator.testkit import OrthancProcess, SyntheticInstance, make_dataset, upload_all

# Root reads any file whatever its mode: without these two capabilities it obeys the mode
# bits like any user, so that a `chmod 000` file really cannot be read.
_NO_DAC = ["setpriv", "--bounding-set", "-dac_override,-dac_read_search"]


def _orthanc_store(workdir: Path, instances: list[SyntheticInstance], **extra: object) -> None:
    with OrthancProcess(workdir, extra=dict(extra)) as orthanc:
        upload_all(orthanc, instances)


def _index_order(index: Path) -> list[tuple[str, str]]:
    """(instance public id, attachment uuid) of the DICOM files, in the index's own order."""
    conn = sqlite3.connect(f"file:{index}?mode=ro", uri=True)
    try:
        return conn.execute(
            "SELECT r.publicId, a.uuid FROM Resources r JOIN AttachedFiles a "
            "ON a.id = r.internalId AND a.fileType = 1 ORDER BY r.internalId"
        ).fetchall()
    finally:
        conn.close()


def _attachment(storage: Path, uuid: str) -> Path:
    return storage / uuid[:2] / uuid[2:4] / uuid


# --- an index whose files are elsewhere ----------------------------------------------------


def test_index_apart_from_its_storage_is_refused_then_imported_with_storage(
    orthanc_factory, tmp_path, ledger_path, ledger_url
):
    # Orthanc configured as some installations are: IndexDirectory apart from StorageDirectory.
    instances = make_dataset(6, seed=161)
    index_dir, files_dir = tmp_path / "db-index", tmp_path / "db-files"
    _orthanc_store(
        tmp_path / "orthanc",
        instances,
        IndexDirectory=str(index_dir),
        StorageDirectory=str(files_dir),
    )
    assert (index_dir / "index").is_file() and not (files_dir / "index").exists()
    target = orthanc_factory("target")

    refused = run_cli("import", str(index_dir), target.url, "--ledger", ledger_url)
    assert refused.code == 3, refused.stdout + refused.stderr
    out = refused.stdout + refused.stderr
    assert "--storage" in out and str(index_dir) in out
    refused.assert_one_line_error()
    assert target.count() == 0
    # Refused before any job was made: no row calls the instances vanished.
    assert not ledger_path.exists()

    done = run_cli(
        "import", str(index_dir), target.url, "--storage", str(files_dir), "--ledger", ledger_url
    )
    assert done.code == 0, done.stderr
    assert sorted(target.instance_ids()) == sorted(i.orthanc_id for i in instances)
    assert state_counts(ledger_path) == {"sent": len(instances)}


def test_storage_missing_most_files_is_refused(orthanc_factory, tmp_path, ledger_path, ledger_url):
    # An incomplete copy of a storage folder: it has Orthanc's layout, but the first 105
    # files the index lists are not there.
    instances = make_dataset(110, seed=162, size=8)
    _orthanc_store(tmp_path / "orthanc", instances)
    storage = tmp_path / "orthanc" / "storage"
    order = _index_order(storage / "index")
    for _, uuid in order[:105]:
        _attachment(storage, uuid).unlink()
    target = orthanc_factory("target")

    result = run_cli("import", str(storage), target.url, "--ledger", ledger_url)
    assert result.code == 3, result.stdout + result.stderr
    result.assert_one_line_error()
    assert "none of the first 100 files the index lists exists" in result.stderr
    assert "--storage" in result.stderr
    assert target.count() == 0
    assert not ledger_path.exists()


def test_a_run_of_missing_files_stops_the_listing_before_saving_it(tmp_path, monkeypatch):
    # Bounds as small as the store: 8 files missing in a row after 4 that are there.
    monkeypatch.setattr(folder_source, "MISSING_RUN", 5)
    monkeypatch.setattr(folder_source, "PAGE", 2)
    _orthanc_store(tmp_path / "orthanc", make_dataset(12, seed=167))
    storage = tmp_path / "orthanc" / "storage"
    order = _index_order(storage / "index")
    for _, uuid in order[4:]:
        _attachment(storage, uuid).unlink()
    pages = []
    with pytest.raises(FatalError, match="5 files in a row that the index lists are missing"):
        for page in folder_source.FolderSource(str(storage))._index_pages({}):
            pages.append(page)
    # The pages before the run were saved; the missing ones were not, so that a rerun
    # with the right --storage lists them.
    assert [row["source_key"] for page in pages for row in page.rows] == [
        public_id for public_id, _ in order[:4]
    ]
    assert all("state" not in row for page in pages for row in page.rows)


def test_storage_unmounted_after_listing_is_fatal(
    orthanc_factory, tmp_path, ledger_path, ledger_url
):
    instances = make_dataset(5, seed=163)
    _orthanc_store(tmp_path / "orthanc", instances)
    storage = tmp_path / "orthanc" / "storage"
    target = orthanc_factory("target")
    listed = run_cli("import", str(storage), target.url, "--dry-run", "--ledger", ledger_url)
    assert listed.code == 0, listed.stderr
    assert state_counts(ledger_path) == {"pending": 5}

    # The share goes away: what is left is the empty mount point and the index elsewhere.
    away = tmp_path / "away"
    away.mkdir()
    for entry in storage.iterdir():
        if entry.name != "index":
            shutil.move(str(entry), str(away / entry.name))

    result = run_cli("import", str(storage), target.url, "--ledger", ledger_url)
    assert result.code == 3, result.stdout + result.stderr
    assert "unmounted" in result.stdout + result.stderr
    assert target.count() == 0
    assert "vanished" not in state_counts(ledger_path)


def test_storage_option_needs_an_index(tmp_path, ledger_url):
    tree = tmp_path / "tree"
    tree.mkdir()
    (tree / "a.dcm").write_bytes(make_dataset(1, seed=164)[0].data)
    result = run_cli(
        "import",
        str(tree),
        "http://127.0.0.1:9/",
        "--storage",
        str(tmp_path),
        "--ledger",
        ledger_url,
    )
    assert result.code == 2
    result.assert_one_line_error()
    assert "--storage" in result.stderr


# --- odd names, unreadable files -----------------------------------------------------------


def _run_as_plain_root(*args: str) -> CliResult:
    """Run the CLI without the capabilities that let root read any file."""
    probe = subprocess.run([*_NO_DAC, "true"], capture_output=True)
    prefix = _NO_DAC if probe.returncode == 0 else []
    if os.geteuid() == 0 and not prefix:
        pytest.skip("root without setpriv reads every file")
    env = {**os.environ, "MIGRATOR_PROGRESS": "none"}
    proc = subprocess.run(
        [*prefix, *MIGRATOR, *args], capture_output=True, text=True, env=env, timeout=120
    )
    return CliResult(proc.returncode, proc.stdout, proc.stderr)


def _odd_folder(root: Path) -> dict[str, SyntheticInstance]:
    """Good files, a valid file under a name that is not UTF-8, one that cannot be read,
    a folder that cannot be listed, a named pipe and a broken link."""
    inst = make_dataset(6, seed=165)
    root.mkdir()
    good = {"a.dcm": inst[0], "c/d.dcm": inst[1]}
    for rel, item in good.items():
        (root / rel).parent.mkdir(exist_ok=True)
        (root / rel).write_bytes(item.data)
    raw_root = os.fsencode(root)
    with open(raw_root + b"/b\xff.dcm", "wb") as fh:
        fh.write(inst[2].data)
    os.mkdir(raw_root + b"/\xe9t\xe9")  # "été" in Latin-1
    with open(raw_root + b"/\xe9t\xe9/e.dcm", "wb") as fh:
        fh.write(inst[3].data)
    locked = root / "locked.dcm"
    locked.write_bytes(inst[4].data)
    locked.chmod(0)
    closed = root / "closed"
    closed.mkdir()
    (closed / "f.dcm").write_bytes(inst[5].data)
    closed.chmod(0)
    os.mkfifo(root / "pipe.dcm")
    (root / "gone.dcm").symlink_to(root / "nowhere.dcm")
    return {
        "a.dcm": inst[0],
        "c/d.dcm": inst[1],
        "b\\xff.dcm": inst[2],
        "\\xe9t\\xe9/e.dcm": inst[3],
        "locked.dcm": inst[4],
        "closed/f.dcm": inst[5],
    }


@pytest.mark.parametrize("ledger_kind", ["sqlite", "postgresql"])
def test_odd_names_and_unreadable_files_are_rows_of_their_own(
    ledger_kind, orthanc_factory, tmp_path, request
):
    ledger = (
        request.getfixturevalue("pg_url")
        if ledger_kind == "postgresql"
        else f"sqlite:///{tmp_path / 'ledger.db'}"
    )
    root = tmp_path / "odd"
    expected = _odd_folder(root)
    target = orthanc_factory("target")

    result = _run_as_plain_root("import", str(root), target.url, "--ledger", ledger)
    # The unreadable file and folder are not sent: the job is not complete. They are
    # rejected, as a corrupt source file is.
    assert result.code == 1, result.stdout + result.stderr
    assert "internal error" not in result.stdout + result.stderr
    sendable = ["a.dcm", "c/d.dcm", "b\\xff.dcm", "\\xe9t\\xe9/e.dcm"]
    assert sorted(target.instance_ids()) == sorted(expected[k].orthanc_id for k in sendable)

    rows = _rows(ledger)
    assert {k: rows[k][0] for k in rows} == {
        "a.dcm": "sent",
        "b\\xff.dcm": "sent",
        "c/d.dcm": "sent",
        "\\xe9t\\xe9/e.dcm": "sent",
        "locked.dcm": "rejected",
        "closed": "rejected",
        "pipe.dcm": "skipped",
        "gone.dcm": "skipped",
    }
    assert rows["locked.dcm"][1] == "cannot read this file: permission denied"
    assert rows["closed"][1].startswith("cannot list this folder: permission denied (")
    assert rows["pipe.dcm"][1] == "not a file: named pipe"
    assert rows["gone.dcm"][1] == "not a file: broken symbolic link"
    # The stored path of the non-UTF-8 name leads back to the very file.
    assert rows["b\\xff.dcm"][2] == "escaped:" + str(root).replace("\\", "\\\\") + "/b\\xff.dcm"

    # Once readable, a retry sends the file. The folder was passed by the listing: its
    # files are imported on their own, as its row says.
    (root / "locked.dcm").chmod(0o644)
    (root / "closed").chmod(0o755)
    retried = _run_as_plain_root("retry", "--state", "rejected", "--ledger", ledger)
    assert retried.code == 0, retried.stdout + retried.stderr
    again = _run_as_plain_root("import", str(root), target.url, "--ledger", ledger)
    assert again.code == 1, again.stdout + again.stderr
    rows = _rows(ledger)
    assert rows["locked.dcm"][0] == "sent"
    assert rows["closed"][0] == "rejected" and "on its own" in rows["closed"][1]
    alone = _run_as_plain_root("import", str(root / "closed"), target.url, "--ledger", ledger)
    assert alone.code == 0, alone.stdout + alone.stderr
    assert sorted(target.instance_ids()) == sorted(i.orthanc_id for i in expected.values())


def test_names_round_trip_and_the_walk_resumes_across_them(tmp_path):
    names = ["a.dcm", "b\udcff.dcm", "c\\d", "c\\x41", "c\\\\x", "d\\\udcfe", "e\\xAB"]
    texts = [escape_name(n) for n in names]
    assert texts[:3] == ["a.dcm", "b\\xff.dcm", "c\\d"]
    assert len(set(texts)) == len(names)  # no two names share a key
    for name, text in zip(names, texts, strict=True):
        text.encode("utf-8")  # storable
        assert real_path(ledger_path(f"/x/{name}")) == f"/x/{name}"
    raw_root = os.fsencode(tmp_path)
    for raw in (b"a.dcm", b"b\xff.dcm", b"c.dcm"):
        with open(raw_root + b"/" + raw, "wb") as fh:
            fh.write(b"x")
    files = list(walk_files(str(tmp_path)))
    assert files == ["a.dcm", "b\udcff.dcm", "c.dcm"]
    assert list(walk_files(str(tmp_path), after=files[1])) == ["c.dcm"]


def test_unreadable_file_of_an_index_is_rejected_alone(orthanc_factory, tmp_path, ledger_url):
    instances = make_dataset(5, seed=168)
    _orthanc_store(tmp_path / "orthanc", instances)
    storage = tmp_path / "orthanc" / "storage"
    order = _index_order(storage / "index")
    locked_id, locked_uuid = order[1]
    _attachment(storage, locked_uuid).chmod(0)
    target = orthanc_factory("target")

    result = _run_as_plain_root("import", str(storage), target.url, "--ledger", ledger_url)
    assert result.code == 1, result.stdout + result.stderr
    assert sorted(target.instance_ids()) == sorted(
        i.orthanc_id for i in instances if i.orthanc_id != locked_id
    )
    state, error, _ = _rows(ledger_url)[locked_id]
    assert state == "rejected"
    assert error.startswith("cannot read this file: permission denied")


def test_many_unreadable_files_in_a_row_stop_the_run(orthanc_factory, tmp_path, ledger_url):
    # The wrong user: every file refused. The run stops rather than reject them all.
    _orthanc_store(tmp_path / "orthanc", make_dataset(30, seed=169, size=8))
    storage = tmp_path / "orthanc" / "storage"
    for _, uuid in _index_order(storage / "index"):
        _attachment(storage, uuid).chmod(0)
    target = orthanc_factory("target")
    result = _run_as_plain_root("import", str(storage), target.url, "--ledger", ledger_url)
    assert result.code == 3, result.stdout + result.stderr
    assert "run as a user who can read it" in result.stdout + result.stderr
    assert target.count() == 0
    assert sum(1 for row in _rows(ledger_url).values() if row[0] == "rejected") < 20


def _rows(ledger: str) -> dict[str, tuple[str, str | None, str]]:
    """source_key -> (state, last_error, path), read without migrator's code."""
    sql = "SELECT source_key, state, last_error, path FROM instances"
    if ledger.startswith("sqlite:///"):
        found = ledger_rows(Path(ledger.removeprefix("sqlite:///")), sql)
    else:
        import psycopg

        with psycopg.connect(ledger) as conn:
            found = conn.execute(sql).fetchall()
    return {key: (state, error, path) for key, state, error, path in found}


# --- symbolic links --------------------------------------------------------------------------


def test_symlinked_folders_are_followed_once(orthanc_factory, tmp_path, ledger_path, ledger_url):
    inst = make_dataset(3, seed=166)
    root, outside = tmp_path / "root", tmp_path / "outside"
    (root / "real").mkdir(parents=True)
    (root / "real" / "x.dcm").write_bytes(inst[0].data)
    outside.mkdir()
    (outside / "y.dcm").write_bytes(inst[1].data)
    (outside / "deeper").mkdir()
    (outside / "deeper" / "z.dcm").write_bytes(inst[2].data)
    (root / "linked").symlink_to(outside)  # a folder kept elsewhere
    (root / "alias").symlink_to(root / "real")  # the same folder under another name
    (root / "loop").symlink_to(root)  # a loop to the root
    (outside / "deeper" / "up").symlink_to(outside)  # a loop outside the root
    target = orthanc_factory("target")

    result = run_cli("import", str(root), target.url, "--ledger", ledger_url)
    assert result.code == 0, result.stderr
    assert sorted(target.instance_ids()) == sorted(i.orthanc_id for i in inst)
    keys = sorted(k for (k,) in ledger_rows(ledger_path, "SELECT source_key FROM instances"))
    # Each file once: under its real path inside the root, under the link otherwise.
    assert keys == ["linked/deeper/z.dcm", "linked/y.dcm", "real/x.dcm"]
    assert state_counts(ledger_path) == {"sent": 3}
