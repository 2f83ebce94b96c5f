"""The REST listing against real Orthanc processes: study and series UIDs on every row
(offset pages, reconciliation, change log; with and without ``/tools/bulk-content``),
so that `verify` checks the studies of a replicate job; and offset pages requested ahead
that still list everything while instances are deleted under them.
"""

from __future__ import annotations

import asyncio
import json
import random
from pathlib import Path
from typing import Any

import httpx
from conftest import ledger_rows, run_cli
from test_listing_defects import DeleteBeforePage

from migrator.config import RetryPolicy
from migrator.endpoints import parse_endpoint
from migrator.ends.base import ListingPage
from migrator.ends.orthanc.client import OrthancClient
from migrator.ends.orthanc.source import RestSource
from migrator.testkit import Proxy, make_dataset, upload_all
from migrator.testkit.fastgen import fast_dataset
from migrator.testkit.orthanc import OrthancProcess
from migrator.testkit.proxy import ScriptedFaults, Status


def _source(url: str, page_size: int, ahead: int = 4) -> RestSource:
    client = OrthancClient(parse_endpoint(url, role="source"), "source")
    return RestSource(client, RetryPolicy(), page_size=page_size, ahead=ahead)


async def _pages(source: RestSource, hook=None, pause: float = 0.0) -> list[ListingPage]:
    """Every page of a listing from the start; `hook(n)` runs before page n is asked for
    (1: the change-log position), `pause` seconds pass between pages (a slow ledger)."""
    pages: list[ListingPage] = []
    try:
        generator = source.listing(None)
        while True:
            if hook is not None:
                hook(len(pages) + 1)
            try:
                pages.append(await generator.__anext__())
            except StopAsyncIteration:
                return pages
            await asyncio.sleep(pause)
    finally:
        await source.aclose()


def _expected(data) -> dict[str, tuple[str, str, str]]:
    return {d.orthanc_id: (d.study_uid, d.series_uid, d.sop_uid) for d in data}


def _uids(row: dict[str, Any]) -> tuple[str, str, str]:
    return (row["study_uid"], row["series_uid"], row["sop_uid"])


def _config(tmp_path: Path, page_size: int) -> Path:
    path = tmp_path / "migrator.toml"
    path.write_text(f"page_size = {page_size}\n")
    return path


def test_verify_checks_the_studies_of_a_replicate_job(
    source_target, ledger_path, ledger_url, tmp_path
):
    """After a REST replicate every sent row has its study: `verify --json` checks every
    study, skips no row, and a study missing an instance on the target is named."""
    source, target = source_target
    data = make_dataset(40, studies=4, seed=71)
    upload_all(source, data)
    config = str(_config(tmp_path, 7))
    result = run_cli(
        "replicate", source.url, target.url, "--ledger", ledger_url, "--config", config
    )
    assert result.code == 0, result.stderr
    rows = ledger_rows(
        ledger_path, "SELECT orthanc_id, study_uid, series_uid, sop_uid FROM instances"
    )
    assert {r[0]: tuple(r[1:]) for r in rows} == _expected(data)

    verify = run_cli("verify", "--ledger", ledger_url, "--json")
    assert verify.code == 0, verify.stderr
    (job,) = json.loads(verify.stdout)["jobs"]
    studies = job["studies"]
    assert (studies["checked"], studies["skipped_rows"], studies["fewer"]) == (4, 0, [])

    lost = data[13]
    target.delete_instance(lost.orthanc_id)
    verify = run_cli("verify", "--ledger", ledger_url, "--json")
    assert verify.code == 1, verify.stderr
    (job,) = json.loads(verify.stdout)["jobs"]
    assert job["missing"] == 1
    assert job["studies"]["fewer"] == [{"study_uid": lost.study_uid, "sent": 10, "target": 9}]


def _newcomers_plan(server: OrthancProcess, newcomers: list[bytes]):
    """A hook that stores `newcomers` once the change-log position was taken."""

    def hook(number: int) -> None:
        if number == 2:
            upload_all(server, newcomers)

    return hook


def test_rows_from_the_change_log_carry_uids(orthanc_factory):
    """Instances stored while the source is listed come (also) from the change log,
    which names them by ID only: their rows are described like the others."""
    server = orthanc_factory("source")
    upload_all(server, make_dataset(30, studies=3, seed=72))
    newcomers = make_dataset(6, studies=2, seed=73)
    source = _source(server.url, 10)
    pages = asyncio.run(_pages(source, _newcomers_plan(server, [d.data for d in newcomers])))
    logged = [
        row for page in pages if json.loads(page.cursor)["phase"] == "changes" for row in page.rows
    ]
    assert {r["orthanc_id"]: _uids(r) for r in logged} == _expected(newcomers)
    assert all(r["size"] == len(d.data) for r, d in zip(logged, newcomers, strict=True))
    assert source.uids.bulk is True


def test_uids_without_bulk_content(orthanc_factory):
    """An Orthanc without ``/tools/bulk-content`` (before 1.9.4: 404, as a route it
    does not know): series and studies are asked for one by one, once each."""
    server = orthanc_factory("source")
    data = make_dataset(24, studies=3, seed=74)
    upload_all(server, data)
    newcomers = make_dataset(4, studies=1, seed=75)
    refuse = ScriptedFaults([Status(404)] * 1000, only=("POST", "/tools/bulk-content"))
    with Proxy("127.0.0.1", server.http_port) as proxy:
        proxy.set_faults(refuse)
        source = _source(proxy.url, 10)
        pages = asyncio.run(_pages(source, _newcomers_plan(server, [d.data for d in newcomers])))
    rows = {r["orthanc_id"]: _uids(r) for page in pages for r in page.rows}
    assert rows == _expected(data + newcomers)
    assert source.uids.bulk is False and refuse.position == 1
    # Each series and study asked for once, and each instance from the change log.
    everything = data + newcomers
    series, studies = {d.series_uid for d in everything}, {d.study_uid for d in everything}
    assert (len(series), len(studies)) == (8, 4)
    assert source.uids.requests["single"] == 8 + 4 + len(newcomers)


def test_reconciliation_describes_what_the_pages_missed(orthanc_factory):
    """An instance the offset pages did not return (an index whose order changed under
    the listing) is listed by the reconciliation, with its UIDs."""
    server = orthanc_factory("source")
    data = make_dataset(30, studies=3, seed=76)
    upload_all(server, data)
    source = _source(server.url, 10)
    order = server._request("GET", "instances").json()
    hidden = order[-1]  # only in the last page (pages: 0-9, 9-18, 18-27, 27-29)
    list_instances = source.client.list_instances

    async def hiding(since: int, limit: int) -> list[dict]:
        page = await list_instances(since, limit)
        return [item for item in page if item["ID"] != hidden]

    source.client.list_instances = hiding  # type: ignore[method-assign]
    pages = asyncio.run(_pages(source))
    # The reconciliation's rows come with the cursor of the change-log phase.
    reconciled = [r for p in pages if json.loads(p.cursor)["phase"] == "changes" for r in p.rows]
    (instance,) = (d for d in data if d.orthanc_id == hidden)
    assert [(r["orthanc_id"], _uids(r)) for r in reconciled] == [(hidden, _uids_of(instance))]
    rows = [r["orthanc_id"] for p in pages for r in p.rows]
    assert sorted(rows) == sorted(d.orthanc_id for d in data)  # each once


def _uids_of(instance) -> tuple[str, str, str]:
    return (instance.study_uid, instance.series_uid, instance.sop_uid)


def test_pages_read_ahead_are_saved_together_when_the_ledger_is_slow(orthanc_factory):
    server = orthanc_factory("source")
    upload_all(server, fast_dataset(400, seed=77))
    source = _source(server.url, 20, ahead=4)
    pages = asyncio.run(_pages(source, pause=0.2))
    offset = [p for p in pages if json.loads(p.cursor)["phase"] in ("offset", "reconcile")]
    rows = [r for p in offset for r in p.rows]
    assert len(rows) == len({r["orthanc_id"] for r in rows}) == 400  # no row twice
    # 21 pages of 20 (each starting 2 before the end of the one before): fewer saves.
    assert 1 < len(offset) < 15, [len(p.rows) for p in offset]
    assert max(len(p.rows) for p in offset) > 20


def test_pages_read_ahead_list_everything_while_instances_are_deleted(orthanc_factory):
    """Deletions at random moments of listings that read four pages ahead: every
    instance the source holds from start to end is listed, and the listing steps back
    to its anchors rather than starting over."""
    server = orthanc_factory("source")
    files = {d.orthanc_id: d.data for d in fast_dataset(150, seed=78)}
    upload_all(server, list(files.values()))
    rng = random.Random(5)
    with Proxy("127.0.0.1", server.http_port) as proxy:
        for trial in range(6):
            order = server._request("GET", "instances", params={"since": 0, "limit": 1000}).json()
            victims = rng.sample(order[: len(order) // 2], 12)
            plan = DeleteBeforePage(server, victims, page=rng.randint(2, 6), newcomers=[])
            proxy.set_faults(plan)
            source = _source(proxy.url, 10, ahead=4)
            offsets: list[int] = []
            list_instances = source.client.list_instances

            async def watched(
                since: int, limit: int, read=list_instances, seen=offsets
            ) -> list[dict]:
                seen.append(since)
                return await read(since, limit)

            source.client.list_instances = watched  # type: ignore[method-assign]
            pages = asyncio.run(_pages(source))
            assert plan.fired
            listed = {r["orthanc_id"] for p in pages for r in p.rows}
            missing = set(order) - set(victims) - listed
            assert not missing, (trial, plan.page, offsets)
            assert offsets.count(0) == 1, (trial, offsets)
            # Put the victims back (at the end of the order) for the next trial.
            with httpx.Client(base_url=server.url, timeout=30) as http:
                for victim in victims:
                    http.post("instances", content=files[victim]).raise_for_status()


def test_pages_of_one_instance_reach_the_end(orthanc_factory, ledger_path, ledger_url, tmp_path):
    """``page_size = 1`` (allowed by the config): each page starting one instance back
    read the same instance again and again, forever; a page now always reaches past the
    overlap."""
    source, target = orthanc_factory("source"), orthanc_factory("target")
    data = make_dataset(5, seed=79)
    upload_all(source, data)
    config = str(_config(tmp_path, 1))
    args = ("replicate", source.url, target.url, "--ledger", ledger_url, "--config", config)
    result = run_cli(*args, "--dry-run", timeout=60)
    assert result.code == 0, result.stderr
    rows = ledger_rows(ledger_path, "SELECT orthanc_id, study_uid FROM instances")
    assert {r[0]: r[1] for r in rows} == {d.orthanc_id: d.study_uid for d in data}
