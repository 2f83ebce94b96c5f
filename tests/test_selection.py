"""Selections (dates, modalities, lists, excluded patients), the lease order, `prioritize`
and per-study progress, against real Orthancs."""

from __future__ import annotations

import asyncio
import json
import signal
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import date, timedelta
from pathlib import Path

import pytest
from conftest import ledger_rows, run_cli, start_cli, wait_for_sent

from migrator.app import choose_selection
from migrator.config import load_settings
from migrator.ends.dicomid import orthanc_instance_id
from migrator.errors import UsageError
from migrator.ledger.store import Ledger
from migrator.selection import SelectionFlags
from migrator.testkit.dicomgen import UID_ROOT, make_dataset, make_instance, upload_all
from migrator.testkit.orthanc import OrthancProcess
from migrator.testkit.proxy import Proxy
from migrator.views.web import DashboardServer


@dataclass(frozen=True)
class Study:
    """One generated study: its fields and the Orthanc IDs of its instances."""

    name: str
    date: str
    modalities: tuple[str, ...]  # one per series
    patient: str
    accession: str

    @property
    def uid(self) -> str:
        return f"{UID_ROOT}77.{self.name[1:]}"

    def files(self) -> list[tuple[str, bytes]]:
        """(Orthanc ID, file) of its instances: two per series."""
        out = []
        for series_no, modality in enumerate(self.modalities, 1):
            series = f"{self.uid}.{series_no}"
            for inst in (1, 2):
                sop = f"{series}.{inst}"
                data = make_instance(
                    self.patient,
                    self.uid,
                    series,
                    sop,
                    rows=4,
                    cols=4,
                    study_date=self.date,
                    modality=modality,
                    accession=self.accession,
                    series_number=series_no,
                    instance_number=inst,
                )
                out.append((orthanc_instance_id(self.patient, self.uid, series, sop), data))
        return out


# Studies over ten years and three modalities; S3 holds a CT and an SR series (taken or
# left whole); S8 has no StudyDate.
STUDIES = [
    Study("S1", "20160310", ("CT",), "P1", "ACC1"),
    Study("S2", "20190605", ("MR",), "P2", "ACC2"),
    Study("S3", "20210101", ("CT", "SR"), "P3", "ACC3"),
    Study("S4", "20230815", ("US",), "P1", "ACC4"),
    Study("S5", "20240220", ("CT",), "P4", "ACC5"),
    Study("S6", "20250110", ("MR",), "P5", "ACC6"),
    Study("S7", "20251120", ("CT",), "P6", "ACC7"),
    Study("S8", "", ("CT",), "P7", "ACC8"),
]
BY_NAME = {s.name: s for s in STUDIES}


@pytest.fixture(scope="module")
def archive(tmp_path_factory: pytest.TempPathFactory) -> Iterator[OrthancProcess]:
    """A source Orthanc holding `STUDIES` (shared by the tests of this module)."""
    server = OrthancProcess(tmp_path_factory.mktemp("archive"), name="archive").start()
    try:
        upload_all(server, [data for study in STUDIES for _, data in study.files()])
        yield server
    finally:
        server.stop(graceful=False)


def _ids(*names: str) -> set[str]:
    return {oid for n in names for oid, _ in BY_NAME[n].files()}


def _target_ids(server: OrthancProcess) -> set[str]:
    with server.client() as http:
        return set(http.get("/instances").json())


def _ledger_studies(path: Path) -> set[str]:
    return {uid for (uid,) in ledger_rows(path, "SELECT DISTINCT study_uid FROM instances")}


@pytest.mark.parametrize(
    ("flags", "expected"),
    [
        (("--since", "20230101"), ("S4", "S5", "S6", "S7")),
        (("--until", "2019-06-05"), ("S1", "S2")),
        (("--modality", "ct", "--modality", "US"), ("S1", "S3", "S4", "S5", "S7", "S8")),
        (
            ("--since", "20230101", "--include-undated", "--exclude-patient", "P1"),
            ("S5", "S6", "S7", "S8"),
        ),
    ],
    ids=["since", "until", "modality", "undated-excluded"],
)
def test_replicate_sends_exactly_the_selected_studies_whole(
    archive: OrthancProcess,
    orthanc_factory: Callable[..., OrthancProcess],
    tmp_path: Path,
    flags: tuple[str, ...],
    expected: tuple[str, ...],
) -> None:
    target = orthanc_factory("target")
    ledger = tmp_path / "l.db"
    args = ("replicate", archive.url, target.url, "--ledger", f"sqlite:///{ledger}", "-c", "4")
    done = run_cli(*args, *flags)
    assert done.code == 0, done.stderr
    assert _target_ids(target) == _ids(*expected)
    # The ledger holds the selected studies' instances and nothing else.
    assert _ledger_studies(ledger) == {BY_NAME[n].uid for n in expected}
    assert ledger_rows(ledger, "SELECT COUNT(*) FROM instances")[0][0] == len(_ids(*expected))


def test_studies_file_status_and_another_selection_refused(
    archive: OrthancProcess, source_target: tuple[OrthancProcess, OrthancProcess], tmp_path: Path
) -> None:
    _, target = source_target
    listed = tmp_path / "studies.csv"
    listed.write_text("PatientName,AccessionNumber\nX,ACC2\nY,ACC6\n")
    uids = tmp_path / "uids.txt"
    uids.write_text(f"{BY_NAME['S3'].uid}\n")
    ledger = tmp_path / "l.db"
    base = ("replicate", archive.url, target.url, "--ledger", f"sqlite:///{ledger}")
    done = run_cli(*base, "--studies", str(listed))
    assert done.code == 0, done.stderr
    assert _target_ids(target) == _ids("S2", "S6")
    assert _ledger_studies(ledger) == {BY_NAME["S2"].uid, BY_NAME["S6"].uid}

    status = run_cli("status", "--ledger", f"sqlite:///{ledger}", "--json", "--studies")
    job = json.loads(status.stdout)["jobs"][0]
    assert job["selection"] == "2 listed studies/accessions/patients"
    assert job["order"] == "newest"
    assert job["studies"]["complete"] == 2 and job["studies"]["pending"] == 0
    assert job["studies"]["complete_since"] == "2019-06-05"
    assert job["studies"]["latest_complete"] == "2025-01-10"
    text = run_cli("status", "--ledger", f"sqlite:///{ledger}", "--studies").stdout
    assert "studies: 2 complete, 0 partial, 0 pending, 0 failed" in text
    assert "everything since 2019-06-05 is on the target" in text

    # The page's /api/studies: counted beside it, shown once counted.
    server = DashboardServer(("127.0.0.1", 0), Ledger.open(f"sqlite:///{ledger}"))
    try:
        deadline = time.monotonic() + 10
        while (page := server.studies()["jobs"])[job["name"]] is None:
            assert time.monotonic() < deadline
            time.sleep(0.05)
        assert page[job["name"]] == job["studies"]
        assert server.status()["jobs"][0]["selection"] == job["selection"]
    finally:
        server.server_close()

    # prioritize --patient asks the source for the patient's studies (all sent here).
    prio = ("prioritize", "--ledger", f"sqlite:///{ledger}")
    assert "0 pending instances moved" in run_cli(*prio, "--patient", "P2").stdout
    nobody = run_cli(*prio, "--patient", "NOBODY")
    assert nobody.code == 2 and "no study of patient 'NOBODY'" in nobody.stderr
    nobody.assert_one_line_error()

    # The same job with another selection: refused in one line, nothing sent.
    refused = run_cli(*base, "--studies", str(uids))
    assert refused.code == 2
    refused.assert_one_line_error()
    assert "selects 2 listed studies" in refused.stderr
    assert run_cli(*base, "--since", "1y").code == 2
    assert _target_ids(target) == _ids("S2", "S6")
    # The same selection again resumes (nothing left to send).
    assert run_cli(*base, "--studies", str(listed)).code == 0


def test_import_of_a_folder_with_since(
    orthanc_factory: Callable[..., OrthancProcess], tmp_path: Path
) -> None:
    target = orthanc_factory("target")
    folder = tmp_path / "dicom"
    for study in STUDIES:
        for oid, data in study.files():
            (folder / study.name).mkdir(parents=True, exist_ok=True)
            (folder / study.name / f"{oid}.dcm").write_bytes(data)
    (folder / "notes.txt").write_text("not DICOM")
    ledger = tmp_path / "l.db"
    done = run_cli(
        "import", str(folder), target.url, "--ledger", f"sqlite:///{ledger}", "--since", "20240101"
    )
    assert done.code == 0, done.stderr
    assert _target_ids(target) == _ids("S5", "S6", "S7")
    # Nothing else in the ledger: neither the other studies nor the text file.
    assert _ledger_studies(ledger) == {BY_NAME[n].uid for n in ("S5", "S6", "S7")}
    assert ledger_rows(ledger, "SELECT COUNT(*) FROM instances")[0][0] == 6


def _sent_sequence(ledger: Path) -> list[tuple[str, str]]:
    """(study_date, study_uid) of the sent rows in the order they were sent, from `report`."""
    out = run_cli("report", "--ledger", f"sqlite:///{ledger}", "--format", "jsonl")
    assert out.code == 0, out.stderr
    rows = [json.loads(line) for line in out.stdout.splitlines()]
    # Outcomes recorded in one batch share their time: among those, newest first.
    rows.sort(key=lambda r: (r["sent_at"], _negated(r["study_date"]), r["study_uid"]))
    return [(r["study_date"], r["study_uid"]) for r in rows if r["state"] == "sent"]


def _sent_times(ledger: Path) -> list[float]:
    return [t for (t,) in ledger_rows(ledger, "SELECT sent_at FROM instances")]


def _negated(day: str) -> str:
    return "".join(str(9 - int(c)) for c in day)


def test_newest_first_study_by_study(
    archive: OrthancProcess, orthanc_factory: Callable[..., OrthancProcess], tmp_path: Path
) -> None:
    target = orthanc_factory("target")
    ledger = tmp_path / "l.db"
    # One instance at a time through a slow link: outcomes are recorded in several
    # batches (every 0.25 s), whose order the report shows.
    with Proxy("127.0.0.1", archive.http_port, delay=0.1) as slow:
        done = run_cli(
            "replicate",
            slow.url,
            target.url,
            "--ledger",
            f"sqlite:///{ledger}",
            "--since",
            "20210101",
            "-c",
            "1",
            "--fixed",
            "--batch",
            "1",
        )
    assert done.code == 0, done.stderr
    sequence = _sent_sequence(ledger)
    assert len(sequence) == len(_ids("S3", "S4", "S5", "S6", "S7"))
    assert len({_at for _at in _sent_times(ledger)}) > 3  # several batches, not one
    # Dates never rise, and each study is sent in one stretch.
    assert [d for d, _ in sequence] == sorted((d for d, _ in sequence), reverse=True)
    stretches = [uid for i, (_, uid) in enumerate(sequence) if i == 0 or sequence[i - 1][1] != uid]
    assert len(stretches) == len(set(stretches)) == 5


def test_prioritize_moves_a_study_ahead_of_a_running_job(
    source_target: tuple[OrthancProcess, OrthancProcess], tmp_path: Path
) -> None:
    source, target = source_target
    # More rows than a lease takes ahead (32 or more): the oldest study would come last.
    upload_all(source, [data for study in STUDIES for _, data in study.files()])
    upload_all(source, make_dataset(60, seed=5))
    ledger = tmp_path / "l.db"
    oldest = BY_NAME["S1"]
    with Proxy("127.0.0.1", source.http_port, delay=0.03) as slow:
        proc = start_cli(
            "replicate",
            slow.url,
            target.url,
            "--ledger",
            f"sqlite:///{ledger}",
            "-c",
            "1",
            "--fixed",
            "--batch",
            "1",
            env={"MIGRATOR_PROGRESS": "none"},
        )
        try:
            wait_for_sent(ledger, 2)
            moved = run_cli("prioritize", "--ledger", f"sqlite:///{ledger}", "--study", oldest.uid)
            asked = time.time()
            waiting = {
                key
                for (key,) in ledger_rows(
                    ledger, "SELECT source_key FROM instances WHERE state = 'pending'"
                )
            }
            proc.communicate(timeout=60)  # the job runs to its end
        finally:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
                proc.communicate(timeout=60)
    assert moved.code == 0, moved.stderr
    assert "2 pending instances moved to the front" in moved.stdout
    assert proc.returncode == 0
    sent = dict(ledger_rows(ledger, "SELECT source_key, sent_at FROM instances"))
    own = dict(oldest.files())
    first = [sent[oid] for oid in own]
    # Within seconds, and before every row that was still waiting when it was asked for.
    assert all(t - asked < 5 for t in first)
    others = [sent[k] for k in waiting if k not in own]
    # (`<=`: outcomes recorded in one batch share their time.)
    assert others and max(first) <= min(others)


def test_import_of_an_orthanc_index_takes_studies_whole(
    orthanc_factory: Callable[..., OrthancProcess], tmp_path: Path
) -> None:
    # An Orthanc's storage with its index: the modalities of every series of a study
    # decide (S3 has a CT and an SR series: both go).
    old = orthanc_factory("old")
    upload_all(old, [data for study in STUDIES for _, data in study.files()])
    old.stop()
    target = orthanc_factory("target")
    ledger = tmp_path / "l.db"
    args = ("import", str(old.storage_dir), target.url, "--ledger", f"sqlite:///{ledger}")
    done = run_cli(*args, "--modality", "CT", "--exclude-patient", "P6")
    assert done.code == 0, done.stderr
    assert _target_ids(target) == _ids("S1", "S3", "S5", "S8")
    assert _ledger_studies(ledger) == {BY_NAME[n].uid for n in ("S1", "S3", "S5", "S8")}
    assert ledger_rows(ledger, "SELECT COUNT(*) FROM instances")[0][0] == 10


@pytest.mark.parametrize("backend", ["sqlite", "postgresql"])
def test_lease_order_and_priority_on_both_databases(
    backend: str, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    url = (
        f"sqlite:///{tmp_path / 'l.db'}"
        if backend == "sqlite"
        else request.getfixturevalue("pg_url")
    )
    ledger = Ledger.open(url, create=True)
    try:
        dates = {"a": "20200101", "b": "20240101", "c": "", "d": "20220101"}
        rows = [
            {"source_key": f"{s}{i}", "study_uid": s, "study_date": d, "orthanc_id": f"{s}{i}"}
            for s, d in dates.items()
            for i in range(3)
        ]
        leased = {}
        for order in ("newest", "oldest", "listing"):
            job = ledger.ensure_job(order, "replicate", "a", f"b-{order}", {"order": order})
            ledger.save_listing(job.id, rows, None, done=True)
            # A retry waiting out its backoff is passed over, not leased early.
            with ledger.engine.begin() as conn:
                conn.exec_driver_sql(
                    "UPDATE instances SET next_attempt_at = 1e12 "
                    f"WHERE job_id = {job.id} AND source_key = 'b1'"
                )
            assert ledger.prioritize(job.id, study_uids={"d"}) == 3
            leased[order] = [lease.source_key for lease in ledger.lease(job.id, "w", 20, 60)]
        # Prioritized first, then whole studies by date (undated last when newest first,
        # first when oldest first); within a study, one way or the other.
        assert [k[0] for k in leased["newest"]] == list("dddbbaaaccc")
        assert [k[0] for k in leased["oldest"]] == list("dddcccaaabb")
        assert leased["listing"] == [
            "d0",
            "d1",
            "d2",
            "a0",
            "a1",
            "a2",
            "b0",
            "b2",
            "c0",
            "c1",
            "c2",
        ]
        # A later prioritization goes ahead of an earlier one.
        job = ledger.get_job("newest")
        assert job is not None
        with ledger.engine.begin() as conn:
            conn.exec_driver_sql(f"UPDATE instances SET state = 'pending' WHERE job_id = {job.id}")
        ledger.prioritize(job.id, since="20240101")
        assert [x.source_key[0] for x in ledger.lease(job.id, "w", 2, 60)] == ["b", "b"]
        progress = ledger.study_progress(job.id)
        assert (progress.pending, progress.total) == (4, 4)
    finally:
        ledger.close()


def test_relative_dates_count_from_the_day_the_job_was_made(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'l.db'}"
    settings = load_settings(None, env={}, ledger=url)
    made = date.today() - timedelta(days=100)
    stored = SelectionFlags(since="30d").resolve(made).to_options()
    assert stored == {"since": (made - timedelta(days=30)).strftime("%Y%m%d")}
    ledger = Ledger.open(url, create=True)
    try:
        job = ledger.ensure_job(
            "j", "replicate", "a", "b", {"selection": stored, "order": "oldest"}
        )
        with ledger.engine.begin() as conn:
            conn.exec_driver_sql(
                f"UPDATE jobs SET created_at = {time.time() - 100 * 86400} WHERE id = {job.id}"
            )
    finally:
        ledger.close()
    # The same command a hundred days later names the same job, in its own order.
    options: dict[str, object] = {}
    choose_selection(settings, "j", options, SelectionFlags(since="30d"), None)
    assert options == {"selection": stored, "order": "oldest"}
    for flags, order in ((SelectionFlags(since="31d"), None), (SelectionFlags(), None)):
        with pytest.raises(UsageError, match="selects StudyDate"):
            choose_selection(settings, "j", {}, flags, order)
    with pytest.raises(UsageError, match="oldest order"):
        choose_selection(settings, "j", {}, SelectionFlags(since="30d"), "newest")
    # A new job: resolved today, newest first by default.
    fresh: dict[str, object] = {}
    choose_selection(settings, "k", fresh, SelectionFlags(until="2y"), None)
    until = (date.today() - timedelta(days=730)).strftime("%Y%m%d")
    assert fresh == {"selection": {"until": until}, "order": "newest"}


def test_a_selected_listing_resumes_after_its_last_study(
    archive: OrthancProcess, monkeypatch: pytest.MonkeyPatch
) -> None:
    from migrator.config import RetryPolicy
    from migrator.endpoints import parse_endpoint
    from migrator.ends.orthanc import source as rest
    from migrator.ends.orthanc.client import OrthancClient
    from migrator.selection import Selection

    monkeypatch.setattr(rest, "STUDIES_PER_PAGE", 2)  # several pages of studies
    selection = Selection(modalities=frozenset({"CT", "MR"}))

    async def pages(cursor: str | None) -> list[tuple[list[str], str | None]]:
        client = OrthancClient(parse_endpoint(archive.url, role="source"), "source")
        source = rest.RestSource(client, RetryPolicy(), selection=selection)
        try:
            return [
                (sorted(r["source_key"] for r in page.rows), page.cursor)
                async for page in source.listing(cursor)
            ]
        finally:
            await source.aclose()

    whole = asyncio.run(pages(None))
    listed = [key for keys, _ in whole for key in keys]
    assert sorted(listed) == sorted(_ids("S1", "S2", "S3", "S5", "S6", "S7", "S8"))
    assert len(listed) == len(set(listed))
    # Resumed from the cursor saved with each page: exactly the rows of the pages after.
    for at in range(1, len(whole) - 1):
        rest_of = asyncio.run(pages(whole[at][1]))
        assert [keys for keys, _ in rest_of] == [keys for keys, _ in whole[at + 1 :]]


def test_the_change_log_keeps_only_instances_of_selected_studies(
    orthanc_factory: Callable[..., OrthancProcess],
) -> None:
    from migrator.config import RetryPolicy
    from migrator.endpoints import parse_endpoint
    from migrator.ends.orthanc.client import OrthancClient
    from migrator.ends.orthanc.source import RestSource
    from migrator.selection import Selection

    server = orthanc_factory("source")
    with server.client() as http:
        last = http.get("/changes", params={"last": ""}).json()["Last"]
    # Arrive after the listing began (as a mirror sees them): S3 (CT and SR), S4 (US),
    # S7 (CT, 2025), S1 (CT, 2016).
    upload_all(server, [d for n in ("S3", "S4", "S7", "S1") for _, d in BY_NAME[n].files()])
    cursor = json.dumps({"phase": "changes", "changes": last})

    async def listed(selection: Selection) -> set[str]:
        client = OrthancClient(parse_endpoint(server.url, role="source"), "source")
        source = RestSource(client, RetryPolicy(), selection=selection)
        try:
            return {r["source_key"] async for page in source.listing(cursor) for r in page.rows}
        finally:
            await source.aclose()

    ct = asyncio.run(listed(Selection(modalities=frozenset({"CT"}))))
    assert ct == _ids("S3", "S7", "S1")  # S3 whole: its SR series too
    recent_ct = Selection(since="20200101", modalities=frozenset({"CT"}))
    assert asyncio.run(listed(recent_ct)) == _ids("S3", "S7")
