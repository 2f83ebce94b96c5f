"""Listed rows into the ledger (multi-row inserts on SQLite, executemany on PostgreSQL),
and how a REST listing asks its source: one request at a time, the series and studies of
several pages looked up together."""

from __future__ import annotations

import asyncio
import itertools
import json
import time

import pytest

from migrator.config import RetryPolicy
from migrator.endpoints import parse_endpoint
from migrator.ends.orthanc.client import OrthancClient
from migrator.ends.orthanc.offsets import LOOKUP_PAGES
from migrator.ends.orthanc.source import RestSource
from migrator.errors import Kind, TransferError, Verdict
from migrator.ledger import listed
from migrator.ledger.store import Ledger
from migrator.testkit import upload_all
from migrator.testkit.fastgen import fast_dataset

# (given StudyDate, as the ledger keeps it)
DATES = [("20200102", "20200102"), ("2020.01.03", "20200103"), (" 20200104 ", "20200104"),
         ("2020-01-05", "20200105"), ("bad", ""), (None, ""), (20200106, "")]  # fmt: skip


def _rows(n: int, prefix: str = "k") -> list[dict]:
    rows = []
    for i in range(n):
        date = DATES[i % len(DATES)][0]
        rows.append(
            {
                "source_key": f"{prefix}{i}",
                "orthanc_id": f"o{i}",
                "sop_uid": f"1.2.{i}",
                "study_uid": f"1.2.{i // 20}",
                "series_uid": f"1.2.{i // 20}.{i // 10}",
                "size": 1000 + i,
                "study_date": date,
                "has_pixels": i % 2 == 0,
            }
        )
    return rows


def _check_saving(url: str) -> None:
    ledger = Ledger.open(url, create=True)
    try:
        job = ledger.ensure_job("j", "replicate", "http://a/", "http://b/", {})
        rows = _rows(2_345)
        # Skipped as listed (a reason, or a state given), and one row listed twice.
        rows[3]["skip_reason"] = "held: no pixel data"
        rows[4]["state"] = "skipped"
        rows.append(dict(rows[10]))
        first = ledger.save_listing(job.id, rows[:1_000], '{"at": 1}')
        assert (first, first.to_send) == (1_000, 998)
        # The rows saved already are ignored, each new one counted once.
        again = ledger.save_listing(job.id, rows, '{"at": 2}')
        assert (again, again.to_send) == (1_345, 1_345)
        with ledger._read() as conn:
            got = conn.exec_driver_sql(
                "SELECT source_key, orthanc_id, sop_uid, study_uid, series_uid, size, "
                "study_date, has_pixels, state, last_error, attempts FROM instances"
            ).all()
            cursor = conn.exec_driver_sql("SELECT listing_cursor FROM jobs").scalar()
        assert cursor == '{"at": 2}'
        by_key = {r[0]: r for r in got}
        assert len(got) == len(by_key) == 2_345
        for i, row in enumerate(rows[:2_345]):
            saved = by_key[row["source_key"]]
            assert saved[1:6] == (
                row["orthanc_id"],
                row["sop_uid"],
                row["study_uid"],
                row["series_uid"],
                row["size"],
            )
            assert saved[6] == DATES[i % len(DATES)][1]
            assert bool(saved[7]) == row["has_pixels"]
            state = "skipped" if i in (3, 4) else "pending"
            assert (saved[8], saved[10]) == (state, 0)
        assert by_key["k3"][9] == "held: no pixel data"
    finally:
        ledger.close()


def test_listed_rows_are_saved_in_statements_of_many_rows(tmp_path, monkeypatch):
    # Statements of 7 rows: whole ones, and a shorter last one, in each transaction.
    monkeypatch.setattr(listed, "ROWS_PER_INSERT", 7)
    _check_saving(f"sqlite:///{tmp_path / 'ledger.db'}")


def test_listed_rows_are_saved_in_statements_of_the_default_size(tmp_path):
    _check_saving(f"sqlite:///{tmp_path / 'ledger.db'}")


def test_listed_rows_are_saved_on_postgresql(pg_url):
    _check_saving(pg_url.replace("postgresql://", "postgresql+psycopg://", 1))


def test_listing_asks_one_thing_at_a_time_and_series_for_several_pages(orthanc_factory):
    """The offset pages of a REST listing are read one after the other (the next one is
    asked for once the answer to the one before it arrived), and the series and studies of
    several pages are looked up together, never beside a page."""
    server = orthanc_factory("source")
    data = fast_dataset(600, seed=91)
    upload_all(server, [d.data for d in data])
    client = OrthancClient(parse_endpoint(server.url, role="source"), "source")
    source = RestSource(client, RetryPolicy(), page_size=30, ahead=0)
    spans: list[tuple[str, float, float, int, int | None]] = []

    arrivals: dict[int, float] = {}

    async def arrived(response) -> None:
        if response.request.url.path.endswith("/instances"):
            arrivals[int(response.request.url.params.get("since", -1))] = time.monotonic()

    client.listing_http.event_hooks["response"].append(arrived)

    def watch(name: str) -> None:
        call = getattr(client, name)

        async def watched(*args, **kwargs):
            began = time.monotonic()
            answer = await call(*args, **kwargs)
            since = args[0] if name == "list_instances" else None
            spans.append((name, began, time.monotonic(), len(answer or ()), since))
            return answer

        setattr(client, name, watched)

    watch("list_instances")
    watch("bulk_content")

    async def main() -> list[dict]:
        try:
            return [r async for page in source.listing(None) for r in page.rows]
        finally:
            await source.aclose()

    rows = asyncio.run(main())
    assert sorted(r["orthanc_id"] for r in rows) == sorted(d.orthanc_id for d in data)
    assert all(r["study_uid"] and r["series_uid"] for r in rows)
    # A page is at the server from its request until its answer arrives (its body is read
    # and parsed after that, while the next one is asked for).
    pages = sorted(
        (b, arrivals[since]) for n, b, _, size, since in spans if n == "list_instances" and size
    )
    lookups = [(b, e) for n, b, e, _, _ in spans if n == "bulk_content"]
    assert len(pages) >= 600 // 27
    # Two levels (series, then studies) per lookup, one lookup per `LOOKUP_PAGES` pages
    # (the first page alone); not two per page.
    assert len(lookups) <= 2 * (len(pages) // LOOKUP_PAGES + 2), (len(lookups), len(pages))
    for b, e in lookups:
        assert not any(pb < e and b < pe for pb, pe in pages), "a lookup beside a page"
    for (_, answered), (asked, _) in itertools.pairwise(pages):
        assert asked >= answered, "two pages at the server at once"


@pytest.mark.parametrize("ahead", [0, 3])
def test_listing_resumes_from_each_saved_cursor(orthanc_factory, ahead):
    """Every cursor of the offset pages (saved with the rows read up to it) resumes the
    listing: the rows up to that cursor and the offset pages of the listing resumed from
    it are every instance, without the reconciliation (a kill -9 after any saved page
    loses nothing, and the pages resumed do not start over)."""
    server = orthanc_factory("source")
    data = fast_dataset(250, seed=92)
    upload_all(server, [d.data for d in data])
    every = {d.orthanc_id for d in data}

    async def pages(cursor: str | None) -> list[tuple[list[str], str]]:
        client = OrthancClient(parse_endpoint(server.url, role="source"), "source")
        src = RestSource(client, RetryPolicy(), page_size=20, ahead=ahead)
        src.merge_seconds, src.merge = 0.0, 1  # a ledger page per page read
        try:
            return [
                ([r["orthanc_id"] for r in p.rows], p.cursor) async for p in src.listing(cursor)
            ]
        finally:
            await src.aclose()

    def offset_rows(listed: list[tuple[list[str], str]]) -> list[str]:
        # The offset pages: those whose cursor is still in the offset phase, and the last
        # one (its cursor moves to the reconciliation, which then names the next phase).
        phases = [json.loads(cursor)["phase"] for _, cursor in listed]
        return [
            i
            for (ids, _), phase, following in zip(listed, phases, [*phases[1:], None], strict=True)
            if phase == "offset" or (phase == "reconcile" and following is not None)
            for i in ids
        ]

    first = asyncio.run(pages(None))
    assert sorted(offset_rows(first)) == sorted(every)
    cursors = [at for at, (_, c) in enumerate(first) if json.loads(c)["phase"] == "offset"]
    assert len(cursors) > 5
    for at in cursors[1:]:
        before = {i for ids, _ in first[: at + 1] for i in ids}
        resumed = asyncio.run(pages(first[at][1]))
        assert before | set(offset_rows(resumed)) == every, at
        assert len(offset_rows(resumed)) < len(every)  # not from the start


def test_a_failing_page_ends_the_listing_after_the_pages_before_it(orthanc_factory):
    """A page the source refuses (after its retries) ends the listing with that failure,
    once the rows read before it are handed out with their cursor; the listing resumed
    from that cursor lists the rest."""
    server = orthanc_factory("source")
    data = fast_dataset(200, seed=93)
    upload_all(server, [d.data for d in data])
    client = OrthancClient(parse_endpoint(server.url, role="source"), "source")
    source = RestSource(client, RetryPolicy(), page_size=20)
    real = client.list_instances
    calls: list[int] = []

    async def refusing(since: int, limit: int) -> list[dict]:
        calls.append(since)
        if len(calls) == 6:
            raise TransferError(Verdict(Kind.FATAL, "source refused the page"))
        return await real(since, limit)

    client.list_instances = refusing  # type: ignore[method-assign]
    got: list[tuple[list[str], str]] = []

    async def main() -> None:
        try:
            async for page in source.listing(None):
                got.append(([r["orthanc_id"] for r in page.rows], page.cursor))
        finally:
            await source.aclose()

    with pytest.raises(TransferError, match="refused the page"):
        asyncio.run(main())
    listed = {i for ids, _ in got for i in ids}
    assert 0 < len(listed) < 200
    cursor = json.loads(got[-1][1])
    assert cursor["phase"] == "offset" and cursor["offset"] <= 5 * 20

    async def rest() -> set[str]:
        again = RestSource(
            OrthancClient(parse_endpoint(server.url, role="source"), "source"),
            RetryPolicy(),
            page_size=20,
        )
        try:
            return {r["orthanc_id"] async for p in again.listing(got[-1][1]) for r in p.rows}
        finally:
            await again.aclose()

    assert listed | asyncio.run(rest()) == {d.orthanc_id for d in data}
