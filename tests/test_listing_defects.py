"""The ends of a REST job, against real Orthanc processes.

- Listing a source that changes under it: the REST listing pages through an offset
  (``/instances?since=``) and deletions shift later instances down. These tests delete
  instances between two pages and check that every instance the source still holds
  ends up in the ledger and on the target.
- A job's identity: the same ends with credentials given another way are the same job.
- A target that is the source under another URL is refused; two servers are not.
"""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import httpx
from conftest import fill, ledger_rows, run_cli, state_counts

from migrator.config import RetryPolicy
from migrator.endpoints import parse_endpoint
from migrator.ends.orthanc.client import OrthancClient
from migrator.ends.orthanc.source import AHEAD, RestSource
from migrator.testkit.dicomgen import make_dataset
from migrator.testkit.orthanc import OrthancProcess
from migrator.testkit.proxy import Proxy, ScriptedFaults, Status


def _listing_order(server: OrthancProcess) -> list[str]:
    """The source's own paging order (the order of `/instances?since=`)."""
    return list(server._request("GET", "instances", params={"since": 0, "limit": 100000}).json())


class DeleteBeforePage:
    """A proxy fault plan that deletes `victims` from the source just before the listing
    request number `page` (1-based) of `GET /instances` reaches it (the proxy sees paths
    without their query: every listing request counts)."""

    def __init__(
        self, server: OrthancProcess, victims: list[str], page: int, newcomers: list[bytes]
    ) -> None:
        self.server = server
        self.victims = victims
        self.page = page
        self.newcomers = newcomers
        self.seen = 0
        self.fired = False

    def __call__(self, method: str, path: str, index: int) -> None:
        if method == "GET" and path == "/instances":
            self.seen += 1
            if self.seen == self.page and not self.fired:
                self.fired = True
                with httpx.Client(base_url=self.server.url, timeout=30) as http:
                    for victim in self.victims:
                        http.delete(f"instances/{victim}").raise_for_status()
                    for data in self.newcomers:
                        headers = {"Content-Type": "application/dicom"}
                        http.post("instances", content=data, headers=headers).raise_for_status()
        return None


def _config(tmp_path: Path, page_size: int) -> Path:
    path = tmp_path / "migrator.toml"
    path.write_text(f"page_size = {page_size}\n")
    return path


def test_replicate_lists_everything_when_listed_instances_are_deleted(
    source_target, ledger_path, ledger_url, tmp_path
):
    source, target = source_target
    fill(source, 200)
    order = _listing_order(source)
    victims = order[:20]  # the whole first page, deleted before the second is read
    # Stored at the same moment: found in the change log.
    newcomers = [i.data for i in make_dataset(5, seed=99)]
    plan = DeleteBeforePage(source, victims, page=2, newcomers=newcomers)
    with Proxy("127.0.0.1", source.http_port) as src:
        src.set_faults(plan)
        result = run_cli(
            *("replicate", src.url, target.url, "--ledger", ledger_url, "-c", "2"),
            *("--config", str(_config(tmp_path, 20))),
        )
    assert plan.fired
    assert result.code == 0, result.stderr
    remaining = set(source.instance_ids())
    assert len(remaining) == 185 and not remaining & set(victims)
    listed = {r[0] for r in ledger_rows(ledger_path, "SELECT source_key FROM instances")}
    assert remaining <= listed
    assert set(target.instance_ids()) >= remaining
    counts = state_counts(ledger_path)
    assert counts.get("pending", 0) == 0 and counts.get("failed", 0) == 0


async def _list_all(source: RestSource, cursor: str | None = None) -> list[dict]:
    """Every row the listing yields."""
    rows: list[dict] = []
    async for page in source.listing(cursor):
        rows.extend(page.rows)
    return rows


def _rest_source(url: str, page_size: int, ahead: int = AHEAD) -> RestSource:
    client = OrthancClient(parse_endpoint(url, role="source"), "source")
    return RestSource(client, RetryPolicy(), page_size=page_size, ahead=ahead)


def test_listing_steps_back_to_the_anchor_instead_of_starting_over(orthanc_factory):
    """Ten instances of the first page deleted: the next page is read again from the
    moved end of the first page (found by ID-only requests), not from offset 0."""
    server = orthanc_factory("source")
    fill(server, 100)
    order = _listing_order(server)
    victims = order[:10]
    # No page requested ahead: the offsets read are those of a sequential listing (pages
    # requested ahead: tests/test_rest_listing.py).
    source = _rest_source(server.url, 20, ahead=0)
    # Which offsets the expanded pages were read from (the real client, only watched);
    # the victims are deleted just before the second page is read.
    offsets: list[int] = []
    list_instances = source.client.list_instances

    async def watched(since: int, limit: int) -> list[dict]:
        offsets.append(since)
        if len(offsets) == 2:
            for victim in victims:
                server.delete_instance(victim)
        return await list_instances(since, limit)

    source.client.list_instances = watched  # type: ignore[method-assign]

    async def main() -> list[dict]:
        try:
            return await _list_all(source)
        finally:
            await source.aclose()

    listed = {r["source_key"] for r in asyncio.run(main())}
    assert set(order) - set(victims) <= listed
    # Offset 0 is read once: the anchors were found further back, not by starting over.
    assert offsets.count(0) == 1, offsets
    assert offsets[1] == 18  # the overlapping page, then the page from the moved anchor
    # (the page after 18 may have been requested as 18's answer arrived, and dropped)
    assert next(o for o in offsets[2:] if o != 36) == 9, offsets


def test_reconcile_adds_what_the_offset_pages_missed(orthanc_factory):
    """A listing resumed from a cursor without anchors (as saved by earlier versions)
    after deletions: the offset pages miss instances; the reconciliation finds them."""
    server = orthanc_factory("source")
    fill(server, 60)
    order = _listing_order(server)
    # As if pages up to offset 40 had been listed, then 20 of them deleted: the 20
    # instances after them now sit at offsets 20..39, below the resumed offset.
    for victim in order[:20]:
        server.delete_instance(victim)
    last = server._request("GET", "changes", params={"last": ""}).json()["Last"]
    cursor = json.dumps({"phase": "offset", "offset": 40, "changes": last})
    source = _rest_source(server.url, 20)

    async def main() -> list[dict]:
        try:
            return await _list_all(source, cursor)
        finally:
            await source.aclose()

    listed = {r["source_key"] for r in asyncio.run(main())}
    assert set(order[20:]) <= listed


# -- a job's identity leaves credentials out ----------------------------------------------


def _with_user(url: str, user: str, password: str) -> str:
    return url.replace("http://", f"http://{user}:{password}@", 1)


USERS = {"alice": "s3cret", "bob": "hunter2"}
AS_BOB = {"MIGRATOR_TARGET_USERNAME": "bob", "MIGRATOR_TARGET_PASSWORD": "hunter2"}


def test_rerun_with_other_credentials_resumes_the_replicate_job(orthanc_factory, ledger_path):
    """A dry run with a user in the URL, then the real run with another user from the
    environment: the same job (same source, same target server), which sends everything."""
    source = orthanc_factory("source")
    target = orthanc_factory("target", users=USERS)
    fill(source, 10)
    ledger = f"sqlite:///{ledger_path}"
    as_alice = _with_user(target.url, "alice", "s3cret")
    first = run_cli("replicate", source.url, as_alice, "--ledger", ledger, "--dry-run")
    assert first.code == 0, first.stderr
    again = run_cli("replicate", source.url, target.url, "--ledger", ledger, env=AS_BOB)
    assert again.code == 0, again.stderr
    assert ledger_rows(ledger_path, "SELECT COUNT(*) FROM jobs") == [(1,)]
    assert state_counts(ledger_path) == {"sent": 10}
    assert target.count() == 10


def test_rerun_with_other_credentials_resumes_the_import_job(
    orthanc_factory, ledger_path, tmp_path
):
    target = orthanc_factory("target", users=USERS)
    folder = tmp_path / "old"
    folder.mkdir()
    for number, instance in enumerate(make_dataset(6, seed=3)):
        (folder / f"{number}.dcm").write_bytes(instance.data)
    ledger = f"sqlite:///{ledger_path}"
    as_alice = _with_user(target.url, "alice", "s3cret")
    first = run_cli("import", str(folder), as_alice, "--ledger", ledger, "--dry-run")
    assert first.code == 0, first.stderr
    again = run_cli("import", str(folder), target.url, "--ledger", ledger, env=AS_BOB)
    assert again.code == 0, again.stderr
    assert ledger_rows(ledger_path, "SELECT COUNT(*) FROM jobs") == [(1,)]
    assert target.count() == 6


# -- a source that is the target ---------------------------------------------------------


def test_replicating_an_orthanc_into_itself_is_refused(orthanc_factory, ledger_path):
    server = orthanc_factory("only")
    fill(server, 3)
    ledger = f"sqlite:///{ledger_path}"
    as_localhost = server.url.replace("127.0.0.1", "localhost")
    result = run_cli("replicate", server.url, as_localhost, "--ledger", ledger)
    assert result.code == 2, result.stderr
    result.assert_one_line_error()
    assert "are the same Orthanc" in result.stderr
    # Behind a proxy (another port): the same server still.
    with Proxy("127.0.0.1", server.http_port) as proxy:
        behind = run_cli("mirror", proxy.url, server.url, "--ledger", ledger)
    assert behind.code == 2, behind.stderr
    behind.assert_one_line_error()
    assert not ledger_path.exists() or ledger_rows(ledger_path, "SELECT COUNT(*) FROM jobs") == [
        (0,)
    ]


def test_two_servers_configured_alike_are_two(orthanc_factory, ledger_path):
    """Two fresh servers with the same name and AET: accepted. Their /system answers
    differ only by ports, so the probe itself is checked too: a job started on one is
    unknown to the other, and known to the same server under another name."""
    from migrator.ends.orthanc import identity

    first, second = orthanc_factory("orthanc"), orthanc_factory("orthanc")
    fill(first, 3)
    result = run_cli("replicate", first.url, second.url, "--ledger", f"sqlite:///{ledger_path}")
    assert result.code == 0, result.stderr
    assert second.count() == 3

    async def probe(origin_url: str, other_url: str) -> bool | None:
        origin = OrthancClient(parse_endpoint(origin_url, role="source"), "source")
        other = OrthancClient(parse_endpoint(other_url, role="target"), "target")
        try:
            job = await identity._start_probe(origin)
            assert job is not None
            return await identity._knows_job(other, job)
        finally:
            await origin.aclose()
            await other.aclose()

    assert asyncio.run(probe(first.url, second.url)) is False
    assert asyncio.run(probe(second.url, first.url)) is False
    assert asyncio.run(probe(first.url, first.url.replace("127.0.0.1", "localhost"))) is True


def test_same_server_is_refused_when_no_probe_job_is_allowed(orthanc_factory, ledger_path):
    """Both URLs refuse the probe job (as an authorization plugin may): the contents
    (change log, statistics, stored files) still tell the same server from two."""
    server = orthanc_factory("only")
    fill(server, 3)
    refuse = ScriptedFaults([Status(403)] * 10, only=("POST", "/tools/create-archive"))
    with (
        Proxy("127.0.0.1", server.http_port) as one,
        Proxy("127.0.0.1", server.http_port) as other,
    ):
        one.set_faults(refuse)
        other.set_faults(refuse)
        result = run_cli("replicate", one.url, other.url, "--ledger", f"sqlite:///{ledger_path}")
    assert result.code == 2, result.stderr
    result.assert_one_line_error()
    assert refuse.position == 2  # the probe was tried on both ends, and refused


def test_two_servers_holding_the_same_instances_have_different_contents(orthanc_factory):
    from migrator.ends.orthanc import identity

    first, second = orthanc_factory("orthanc"), orthanc_factory("orthanc")
    data = make_dataset(3, seed=5)
    for server in (first, second):
        for instance in data:
            server.upload(instance.data)

    async def same() -> bool:
        a = OrthancClient(parse_endpoint(first.url, role="source"), "source")
        b = OrthancClient(parse_endpoint(second.url, role="target"), "target")
        try:
            return await identity._same_contents(a, b)
        finally:
            await a.aclose()
            await b.aclose()

    # Same change-log position and statistics: only the stored files' UUIDs differ.
    assert first._request("GET", "statistics").json() == second._request("GET", "statistics").json()
    assert asyncio.run(same()) is False
