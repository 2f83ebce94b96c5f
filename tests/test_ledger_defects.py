"""The ledger and what reads it, against real Orthanc processes (and PostgreSQL): copies of
one instance, over-long UIDs, `retry --state skipped`, dead workers in `status`, progress
totals and size units."""

from __future__ import annotations

import json
import os
import re
import signal
import struct
import warnings
from pathlib import Path

import sqlalchemy as sa
from conftest import ledger_rows, run_cli, start_cli, wait_for_sent

from migrator.ledger.store import Ledger, Outcome
from migrator.states import State
from migrator.testkit import make_dataset, upload_all
from migrator.testkit.dicomgen import without_pixel_data
from migrator.testkit.fastgen import fast_dataset


def _write_tree(root: Path, files: dict[str, bytes]) -> Path:
    for rel, content in files.items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(content)
    return root


def _wrong_pixel_length(data: bytes) -> bytes:
    """The same instance with its PixelData length two bytes short and junk after it: a
    larger file, with pixel data, that Orthanc refuses (400 "Bad file format")."""
    at = data.rindex(b"\xe0\x7f\x10\x00")  # (7FE0,0010), explicit VR: OW, 2 reserved
    length = struct.unpack("<I", data[at + 8 : at + 12])[0]
    return data[: at + 8] + struct.pack("<I", length - 2) + data[at + 12 :] + b"\0" * 600


def _rows(ledger_path: Path) -> dict[str, tuple[str, str | None]]:
    rows = ledger_rows(ledger_path, "SELECT source_key, state, last_error FROM instances")
    return {key: (state, error) for key, state, error in rows}


# -- copies of one instance ---------------------------------------------------------------


def test_refused_copy_after_dry_run_is_followed_by_its_good_twin(
    orthanc_factory, tmp_path, ledger_path, ledger_url
):
    # After a dry run every copy is listed and pending. Ranking them then (largest first)
    # skipped the good copy as "superseded" before anything was sent; the larger, corrupt
    # copy was refused and the instance never reached the target.
    inst = make_dataset(2, seed=31)
    bad = _wrong_pixel_length(inst[0].data)
    assert len(bad) > len(inst[0].data)
    root = _write_tree(
        tmp_path / "copies",
        {"a/good.dcm": inst[0].data, "b/bad.dcm": bad, "c/other.dcm": inst[1].data},
    )
    target = orthanc_factory("target")

    dry = run_cli("import", str(root), target.url, "--ledger", ledger_url, "--dry-run")
    assert dry.code == 0, dry.stderr
    assert target.count() == 0

    result = run_cli("import", str(root), target.url, "--ledger", ledger_url)
    # The refused copy is superseded by its sent twin: nothing is left to do, exit 0.
    assert result.code == 0, result.stderr
    assert sorted(target.instance_ids()) == sorted(i.orthanc_id for i in inst)
    assert target.file(inst[0].orthanc_id) == inst[0].data
    rows = _rows(ledger_path)
    assert rows["a/good.dcm"][0] == "sent"
    assert rows["c/other.dcm"][0] == "sent"
    state, error = rows["b/bad.dcm"]
    assert state == "skipped"
    assert error is not None and error.startswith("superseded")
    # The refusal is kept for the record.
    assert "Bad file format" in error


def test_copy_superseded_without_a_sent_twin_is_tried_again(
    orthanc_factory, tmp_path, ledger_path, ledger_url
):
    # A ledger left by the old ranking: the good copy skipped as superseded, the corrupt
    # one refused. `retry --state rejected` and a rerun must get the instance across.
    inst = make_dataset(1, seed=32)
    root = _write_tree(
        tmp_path / "copies",
        {"a/good.dcm": inst[0].data, "b/bad.dcm": _wrong_pixel_length(inst[0].data)},
    )
    target = orthanc_factory("target")
    assert run_cli("import", str(root), target.url, "--ledger", ledger_url, "--dry-run").code == 0
    ledger = Ledger.open(ledger_url)
    try:
        with ledger.engine.begin() as conn:
            conn.exec_driver_sql(
                "UPDATE instances SET state = 'skipped', last_error = 'superseded: a better "
                "copy of this instance is sent instead' WHERE source_key = 'a/good.dcm'"
            )
            conn.exec_driver_sql(
                "UPDATE instances SET state = 'rejected', last_error = 'HTTP 400: Bad file "
                "format' WHERE source_key = 'b/bad.dcm'"
            )
    finally:
        ledger.close()
    retry = run_cli("retry", "--state", "rejected", "--ledger", ledger_url)
    assert retry.code == 0, retry.stderr
    result = run_cli("import", str(root), target.url, "--ledger", ledger_url)
    assert result.code == 0, result.stderr
    assert target.instance_ids() == [inst[0].orthanc_id]
    assert _rows(ledger_path)["a/good.dcm"][0] == "sent"
    assert _rows(ledger_path)["b/bad.dcm"][0] == "skipped"


def test_lease_tries_copies_best_first(tmp_path):
    # One instance, three pending copies: the lease takes the one with pixel data, then
    # the largest; when it is refused, the next one; never the copies before a send.
    ledger = Ledger.open(f"sqlite:///{tmp_path / 'l.db'}", create=True)
    try:
        job = ledger.ensure_job("j", "import", "/data", "http://b/", {})
        rows = [
            {"source_key": "small", "orthanc_id": "o1", "size": 100, "has_pixels": True},
            {"source_key": "nopix", "orthanc_id": "o1", "size": 900, "has_pixels": False},
            {"source_key": "large", "orthanc_id": "o1", "size": 500, "has_pixels": True},
        ]
        ledger.save_listing(job.id, rows, None, done=True)
        assert ledger.skip_superseded(job.id) == 0  # nothing sent: nothing superseded
        order = []
        for _ in range(3):
            with ledger.engine.begin() as conn:
                conn.exec_driver_sql("UPDATE instances SET next_attempt_at = 0")
            (lease,) = ledger.lease(job.id, "w", 10, 60, one_per_instance=True)
            order.append(lease.source_key)
            ledger.record("w", [Outcome(lease.id, State.REJECTED, error="HTTP 400")])
        assert order == ["large", "small", "nopix"]
    finally:
        ledger.close()


def test_skip_superseded_settles_only_copies_of_sent_instances(tmp_path, pg_url):
    for url in (f"sqlite:///{tmp_path / 's.db'}", pg_url):
        ledger = Ledger.open(url, create=True)
        try:
            job = ledger.ensure_job("j", "import", "/data", "http://b/", {})
            rows = [
                {"source_key": key, "orthanc_id": oid, "size": 10}
                for key, oid in [
                    ("sent", "o1"),
                    ("pending", "o1"),
                    ("refused", "o1"),
                    ("alone-a", "o2"),
                    ("alone-b", "o2"),
                    ("old-mark", "o3"),
                    ("old-kept", "o3"),
                ]
            ]
            ledger.save_listing(job.id, rows, None, done=True)
            with ledger.engine.begin() as conn:
                for key, state, error in [
                    ("sent", "sent", None),
                    ("refused", "rejected", "HTTP 400: Bad file format"),
                    (
                        "old-mark",
                        "skipped",
                        "superseded: a better copy of this instance is sent instead",
                    ),
                    ("old-kept", "rejected", "HTTP 400: Bad file format"),
                ]:
                    conn.execute(
                        sa.text(
                            "UPDATE instances SET state = :s, last_error = :e WHERE source_key = :k"
                        ),
                        {"s": state, "e": error, "k": key},
                    )
            # One pending copy skipped, one wrongly superseded copy put back: net 0.
            assert ledger.skip_superseded(job.id) == 0
            with ledger.engine.connect() as conn:
                got = {
                    key: (state, error)
                    for key, state, error in conn.execute(
                        sa.text("SELECT source_key, state, last_error FROM instances")
                    )
                }
            assert got["sent"] == ("sent", None)
            assert got["pending"][0] == "skipped" and got["pending"][1].startswith("superseded")
            assert got["refused"][0] == "skipped"
            assert (
                got["refused"][1].startswith("superseded")
                and "Bad file format" in got["refused"][1]
            )
            assert got["alone-a"] == got["alone-b"] == ("pending", None)
            assert got["old-mark"] == ("pending", None)
            assert got["old-kept"][0] == "rejected"
        finally:
            ledger.close()


# -- retry --state skipped ----------------------------------------------------------------


def test_retry_skipped_leaves_files_that_must_never_be_sent(
    orthanc_factory, tmp_path, ledger_path, ledger_url
):
    # `retry --state skipped` put header-only copies back to pending; sent first, they
    # make the target keep an instance without pixel data ("AlreadyStored" to the rest).
    inst = make_dataset(2, seed=33)
    summary = json.dumps({"0008,0018": {"Name": "SOPInstanceUID", "Value": "1"}}).encode()
    root = _write_tree(
        tmp_path / "tree",
        {
            "a/header.dcm": without_pixel_data(inst[0].data),
            "e/full.dcm": inst[0].data,
            "b/summary.json": summary,
            "c/other.dcm": inst[1].data,
            "d/notes.txt": b"not DICOM\n",
        },
    )
    target = orthanc_factory("target")
    assert run_cli("import", str(root), target.url, "--ledger", ledger_url).code == 0
    before = _rows(ledger_path)
    assert before["a/header.dcm"][0] == before["b/summary.json"][0] == "skipped"
    # The target holds the full copy; sending the header-only one later would be
    # harmless here, so the target is cleared to see whether it would be sent.
    for instance_id in target.instance_ids():
        target.client().delete(f"/instances/{instance_id}").raise_for_status()

    retry = run_cli("retry", "--state", "skipped", "--ledger", ledger_url)
    assert retry.code == 0, retry.stderr
    assert "1 rows (skipped)" in retry.stdout  # only notes.txt
    left = re.findall(r"^(\d+) skipped rows \((.*)\) left skipped", retry.stdout, re.M)
    assert "JSON summary" in {reason for _, reason in left}, retry.stdout
    assert sum(int(n) for n, _ in left) == 2, retry.stdout
    after = _rows(ledger_path)
    assert after["a/header.dcm"] == before["a/header.dcm"]
    assert after["b/summary.json"] == before["b/summary.json"]
    assert after["d/notes.txt"][0] == "pending"

    run_cli("import", str(root), target.url, "--ledger", ledger_url)
    # The header-only copy never reached the target.
    assert target.count() == 0
    assert _rows(ledger_path)["a/header.dcm"][0] == "skipped"


def test_never_send_reasons_are_the_ones_fileclass_writes():
    from migrator.ends.folder import fileclass
    from migrator.states import NEVER_SEND_REASONS

    names = ("SKIP_HEADER_ONLY", "SKIP_NO_PIXELS", "HELD_STORAGE", "HELD_TREE", "SKIP_JSON")
    for name in (*names, "SKIP_DICOMDIR"):
        reason = getattr(fileclass, name, None)
        assert reason is None or reason.startswith(NEVER_SEND_REASONS), reason


# -- over-long UIDs and names -------------------------------------------------------------

LONG_SOP_UID = "1.2.826.0.1.3680043.8.498." + "1234567890" * 5
assert len(LONG_SOP_UID) == 76


def _long_uid_instance() -> bytes:
    from migrator.testkit.dicomgen import make_instance

    with warnings.catch_warnings():  # pydicom warns: longer than DICOM allows
        warnings.simplefilter("ignore", UserWarning)
        return make_instance(
            "LONG-1", "1.2.826.0.1.3680043.8.498.7", "1.2.826.0.1.3680043.8.498.7.1", LONG_SOP_UID
        )


def test_long_uid_replicates_into_a_postgresql_ledger(orthanc_factory, tmp_path, pg_url):
    # Orthanc accepts a 76-character SOPInstanceUID; VARCHAR(64) columns made every run
    # of a PostgreSQL-ledger job stop with "value too long".
    source, target = orthanc_factory("source"), orthanc_factory("target")
    source.upload(_long_uid_instance())
    (instance_id,) = source.instance_ids()
    result = run_cli("replicate", source.url, target.url, "--ledger", pg_url)
    assert result.code == 0, result.stderr
    assert target.instance_ids() == [instance_id]
    ledger = Ledger.open(pg_url)
    try:
        with ledger.engine.connect() as conn:
            assert conn.exec_driver_sql("SELECT sop_uid, state FROM instances").all() == [
                (LONG_SOP_UID, "sent")
            ]
    finally:
        ledger.close()


def test_long_uid_and_long_job_name_import_on_both_ledgers(orthanc_factory, tmp_path, pg_url):
    # A folder import records the UIDs it read; its default job name holds the folder's
    # path, which can pass 200 characters.
    deep = tmp_path / ("d" * 120) / ("e" * 120)
    _write_tree(deep, {"long.dcm": _long_uid_instance()})
    target = orthanc_factory("target")
    for url in (f"sqlite:///{tmp_path / 'l.db'}", pg_url):
        result = run_cli("import", str(deep), target.url, "--ledger", url)
        assert result.code == 0, result.stderr
        ledger = Ledger.open(url)
        try:
            (job,) = ledger.list_jobs()
            assert len(job.name) > 240
            with ledger.engine.connect() as conn:
                rows = conn.exec_driver_sql("SELECT sop_uid, state FROM instances").all()
            assert rows == [(LONG_SOP_UID, "sent")]
        finally:
            ledger.close()
    assert len(target.instance_ids()) == 1


def test_upgrade_to_unbounded_text_keeps_rows(tmp_path, pg_url):
    # A ledger at the previous revision, with rows, upgraded in place: the rows stay, and
    # a long UID fits afterwards.
    from migrator.ledger import db

    for url in (f"sqlite:///{tmp_path / 'u.db'}", pg_url):
        ledger = Ledger.open(url, create=True)
        job = ledger.ensure_job("j", "import", "/data", "http://b/", {})
        db.downgrade(ledger.engine, "0005")
        ledger.close()
        engine = db.make_engine(url, must_exist=True)
        with engine.begin() as conn:
            conn.exec_driver_sql(
                "INSERT INTO instances (job_id, source_key, orthanc_id, state, created_at, "
                f"updated_at) VALUES ({job.id}, 'k1', 'o1', 'sent', 0, 0)"
            )
        db.upgrade(engine)
        engine.dispose()
        ledger = Ledger.open(url)
        try:
            ledger.save_listing(job.id, [{"source_key": "k2", "sop_uid": LONG_SOP_UID}], None)
            with ledger.engine.connect() as conn:
                rows = conn.exec_driver_sql(
                    "SELECT source_key, sop_uid, state FROM instances ORDER BY source_key"
                ).all()
            assert rows == [("k1", None, "sent"), ("k2", LONG_SOP_UID, "pending")]
            assert db.current_revision(ledger.engine) == db.HEAD_REVISION
        finally:
            ledger.close()


# -- dead workers in status ---------------------------------------------------------------


def test_status_shows_a_killed_worker_as_gone(orthanc_factory, ledger_path, ledger_url):
    # A worker killed with -9 stayed in `status` as running, with its rows in flight and
    # an ETA, long after its lease ran out.
    source, target = orthanc_factory("source"), orthanc_factory("target")
    upload_all(source, fast_dataset(60, seed=41))
    proc = start_cli(
        "replicate",
        source.url,
        target.url,
        "--ledger",
        ledger_url,
        "--max-rate",
        "10",
        env={"MIGRATOR_PROGRESS": "none"},
    )
    try:
        wait_for_sent(ledger_path, 5)
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.communicate(timeout=30)
    held = ledger_rows(ledger_path, "SELECT COUNT(*) FROM instances WHERE state = 'in_flight'")
    assert held[0][0] > 0  # the killed worker's leases are still in the ledger

    result = run_cli("status", "--json", "--ledger", ledger_url)
    assert result.code == 0, result.stderr
    (job,) = json.loads(result.stdout)["jobs"]
    assert job["workers"] == []
    assert job["eta_seconds"] is None and job["rate"] == 0
    (gone,) = job["gone_workers"]
    assert gone["in_flight"] == job["abandoned"] == held[0][0]
    assert f"process {proc.pid} ended" in gone["reason"]

    text = run_cli("status", "--ledger", ledger_url).stdout
    assert "ETA" not in text and "no worker running" in text
    assert "is gone" in text and "the next run takes them back" in text

    # The next run takes the rows back and finishes the job.
    assert run_cli("replicate", source.url, target.url, "--ledger", ledger_url).code == 0
    (job,) = json.loads(run_cli("status", "--json", "--ledger", ledger_url).stdout)["jobs"]
    assert job["gone_workers"] == [] and job["counts"]["sent"] == 60


# -- progress totals, units, idle status --------------------------------------------------


def _tree_with_summaries(root: Path, n: int, seed: int) -> Path:
    files = {f"i{i}.dcm": inst.data for i, inst in enumerate(make_dataset(n, seed=seed))}
    for i in range(4):
        doc = {"0008,0018": {"Name": "SOPInstanceUID", "Value": str(i)}}
        files[f"s{i}.json"] = json.dumps(doc).encode()
    return _write_tree(root, files)


def _last_progress(stderr: str) -> tuple[int, int]:
    found = re.findall(r"progress (\d+)/(\d+) ", stderr)
    assert found, stderr
    return int(found[-1][0]), int(found[-1][1])


def test_progress_totals_count_only_rows_to_send(orthanc_factory, tmp_path, ledger_url):
    # Files skipped as they were listed (here JSON summaries) counted in the total and
    # never in the done: a finished import ended "progress 6/10".
    root = _tree_with_summaries(tmp_path / "tree", 6, seed=51)
    target = orthanc_factory("target")
    plain = {"MIGRATOR_PROGRESS": "plain"}
    result = run_cli("import", str(root), target.url, "--ledger", ledger_url, env=plain)
    assert result.code == 0, result.stderr
    assert _last_progress(result.stderr) == (6, 6)

    # Resumed after a dry run: the listing is done, the rows are counted from the ledger.
    other = f"sqlite:///{tmp_path / 'other.db'}"
    target2 = orthanc_factory("target2")
    assert run_cli("import", str(root), target2.url, "--ledger", other, "--dry-run").code == 0
    result = run_cli("import", str(root), target2.url, "--ledger", other, env=plain)
    assert result.code == 0, result.stderr
    assert _last_progress(result.stderr) == (6, 6)


def test_progress_counts_files_released_after_the_listing(orthanc_factory, tmp_path, ledger_url):
    # A file without pixel data is held (listed skipped) until the listing is complete,
    # then sent when no copy with pixel data of its instance exists: it is a row to send.
    inst = make_dataset(3, seed=53)
    files = {f"i{i}.dcm": x.data for i, x in enumerate(inst[1:])}
    files["nopixels.dcm"] = without_pixel_data(inst[0].data)
    root = _write_tree(tmp_path / "tree", files)
    target = orthanc_factory("target")
    plain = {"MIGRATOR_PROGRESS": "plain"}
    result = run_cli("import", str(root), target.url, "--ledger", ledger_url, env=plain)
    assert result.code == 0, result.stderr
    assert target.count() == 3
    assert _last_progress(result.stderr) == (3, 3)


def test_sizes_are_shown_in_iec_units_and_idle_status_has_no_rate(
    orthanc_factory, tmp_path, ledger_url
):
    # The run summary said MB (10^6 bytes), `status` MiB (2^20): one convention, IEC.
    root = _tree_with_summaries(tmp_path / "tree", 6, seed=52)
    target = orthanc_factory("target")
    result = run_cli(
        "import", str(root), target.url, "--ledger", ledger_url, env={"MIGRATOR_PROGRESS": "plain"}
    )
    assert result.code == 0, result.stderr
    sent_bytes = sum(len(p.read_bytes()) for p in root.glob("*.dcm"))
    size = f"{sent_bytes / 1024:.1f} KiB"
    out = result.stdout + result.stderr
    assert f"this run: sent 6 ({size})" in out, out
    assert f"{size} sent this run" in out
    assert not re.search(r"\d (MB|KB|GB)\b", out), out
    status = run_cli("status", "--ledger", ledger_url).stdout
    assert f"sent {size}" in status, status
    inspected = run_cli("inspect", str(root))
    assert inspected.code == 0, inspected.stderr
    assert size in inspected.stdout and not re.search(r"\d (MB|KB)\b", inspected.stdout)

    # Sent rows put back to pending while no worker runs: the recent sends gave a rate
    # and an ETA, as if something were moving.
    assert run_cli("retry", "--state", "sent", "--ledger", ledger_url).code == 0
    (job,) = json.loads(run_cli("status", "--json", "--ledger", ledger_url).stdout)["jobs"]
    assert job["remaining"] == 6 and job["workers"] == []
    assert job["rate"] == 0 and job["bytes_rate"] == 0 and job["eta_seconds"] is None
    text = run_cli("status", "--ledger", ledger_url).stdout
    assert "ETA" not in text and "no worker running" in text
