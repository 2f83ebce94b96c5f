"""DICOMweb ends against real Orthancs running Debian's DICOMweb plugin: QIDO-RS
listing (paged, split by StudyDate under a search limit), WADO-RS fetch, STOW-RS store,
verify by WADO-RS MD5 or QIDO-RS presence, crashes and bad answers."""

from __future__ import annotations

import asyncio
import dataclasses
import datetime
import os
import signal
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import httpx
import pytest
from conftest import ledger_rows, start_cli
from faultkit import assert_converged, invoke, md5_of, write_config
from test_crash import _count, _poll

from migrator.config import Settings
from migrator.ends.dicomweb import open_dicomweb_source, open_dicomweb_target
from migrator.ends.dicomweb.multipart import Truncated, related_body, split_related
from migrator.ends.dicomweb.target import DicomWebTarget
from migrator.errors import Kind, TransferError
from migrator.testkit.dicomgen import SyntheticInstance, make_dataset, upload_all
from migrator.testkit.fastgen import fast_dataset
from migrator.testkit.faults import Status, TruncateResponse
from migrator.testkit.orthanc import OrthancProcess
from migrator.testkit.proxy import Proxy

PLUGIN = "/usr/share/orthanc/plugins/libOrthancDicomWeb.so"
DICOMWEB = {"Plugins": [PLUGIN], "DicomWeb": {"Enable": True, "Root": "/dicom-web/"}}

pytestmark = pytest.mark.skipif(
    not os.path.exists(PLUGIN) and not os.environ.get("CI"),
    reason="Debian's orthanc-dicomweb plugin is not installed",
)


def dicomweb_orthanc(factory, name: str, **kwargs) -> OrthancProcess:
    """An Orthanc serving DICOMweb under /dicom-web/ (extra config merged in)."""
    extra = {**DICOMWEB, **kwargs.pop("extra", {})}
    return factory(name, extra=extra, **kwargs)


def dw(url: str) -> str:
    """The DICOMweb URL of an Orthanc (or proxy) base URL."""
    return "dicomweb+" + url + "dicom-web"


def dated_dataset(n: int, seed: int) -> list[SyntheticInstance]:
    """`n` instances (20 per study), each study on a day of its own."""
    out = []
    day = datetime.date(2024, 1, 1)
    dates: dict[str, str] = {}
    for inst in fast_dataset(n, seed=seed):
        date = dates.setdefault(
            inst.study_uid, (day + datetime.timedelta(days=3 * len(dates))).strftime("%Y%m%d")
        )
        out.append(dataclasses.replace(inst, data=inst.data.replace(b"20240101", date.encode())))
    return out


def fill(server: OrthancProcess, data: list[SyntheticInstance]) -> None:
    upload_all(server, data)
    assert server.count() == len(data)


# -- the multipart reader -----------------------------------------------------------------


def test_multipart_round_trip_and_cut_short() -> None:
    parts = [b"\0" * 128 + b"DICM one", b"two\r\n--not-the-boundary\r\n", b""]
    body, content_type = related_body(parts)
    boundary = content_type.rsplit("boundary=", 1)[1]
    assert split_related(body, boundary) == parts
    # Cut anywhere before the closing delimiter: never a silently shorter part.
    for cut in (len(body) - 3, len(body) // 2, 40):
        with pytest.raises(Truncated):
            split_related(body[:cut], boundary)
    # A part whose announced length disagrees with where the delimiter is.
    head = f"--{boundary}\r\nContent-Length: 9\r\n\r\nabc\r\n--{boundary}--\r\n".encode()
    with pytest.raises(Truncated):
        split_related(head, boundary)


# -- dicomweb -> Orthanc ------------------------------------------------------------------


def test_dicomweb_to_orthanc_byte_identical_under_a_search_limit(
    orthanc_factory, tmp_path, ledger_path, ledger_url
):
    # The source answers at most 3 studies per search (LimitFindResults 2: Orthanc gives
    # one more), silently: only splitting by StudyDate finds all 7 studies.
    source = dicomweb_orthanc(orthanc_factory, "source", extra={"LimitFindResults": 2})
    target = orthanc_factory("target")
    data = dated_dataset(140, seed=31)
    fill(source, data)
    config = write_config(tmp_path / "c.toml", page_size=7)
    result = invoke(
        "replicate", dw(source.url), target.url, "--ledger", ledger_url, "-c", "4",
        "--config", str(config),
    )  # fmt: skip
    assert result.code == 0, result.stderr[-3000:]
    assert "listing by StudyDate" in result.stderr
    assert_converged(ledger_path, data, target)
    keys = {r[0] for r in ledger_rows(ledger_path, "SELECT source_key FROM instances")}
    assert keys == {f"{d.study_uid}/{d.series_uid}/{d.sop_uid}" for d in data}
    jobs = ledger_rows(ledger_path, "SELECT kind, source FROM jobs")
    assert jobs == [("dicomweb", dw(source.url) + "/")]


def test_listing_resumes_from_every_cursor_under_a_search_limit(orthanc_factory):
    source = dicomweb_orthanc(orthanc_factory, "source", extra={"LimitFindResults": 2})
    data = dated_dataset(140, seed=40)
    fill(source, data)
    expected = {f"{d.study_uid}/{d.series_uid}/{d.sop_uid}": d.orthanc_id for d in data}

    async def pages(cursor: str | None) -> list[tuple[dict[str, str], str | None, bool]]:
        end = open_dicomweb_source(dw(source.url), Settings(page_size=15), {})
        try:
            return [
                ({r["source_key"]: r["orthanc_id"] for r in p.rows}, p.cursor, p.done)
                async for p in end.listing(cursor)
            ]
        finally:
            await end.aclose()

    def union(listed: list[tuple[dict[str, str], str | None, bool]]) -> dict[str, str]:
        return {k: v for rows, _, _ in listed for k, v in rows.items()}

    full = asyncio.run(pages(None))
    assert union(full) == expected and full[-1][2]
    assert len(full) > 8
    # A crash after any page: the listing resumed from that page's cursor (in a new
    # process, which knows nothing but the cursor) lists everything the pages missed.
    for i, (_, cursor, _) in enumerate(full[:-1]):
        resumed = asyncio.run(pages(cursor))
        assert union(full[: i + 1]) | union(resumed) == expected, i
        assert resumed[-1][2]


def test_selection_by_date_and_modality(orthanc_factory, ledger_url):
    from migrator.selection import Selection

    source = dicomweb_orthanc(orthanc_factory, "source")
    data = dated_dataset(100, seed=32)  # studies on 20240101, 04, 07, 10, 13
    fill(source, data)
    picked = {d.study_uid for d in data if b"20240104" in d.data or b"20240107" in d.data}

    async def listed(selection: Selection) -> set[str]:
        options = {"selection": selection.to_options()}
        end = open_dicomweb_source(dw(source.url), Settings(page_size=5), options)
        studies = set()
        async for page in end.listing(None):
            studies |= {r["study_uid"] for r in page.rows}
        await end.aclose()
        return studies

    assert asyncio.run(listed(Selection(since="20240102", until="20240108"))) == picked
    assert asyncio.run(listed(Selection(modalities=frozenset({"MR"})))) == set()
    assert len(asyncio.run(listed(Selection(modalities=frozenset({"OT"}))))) == 5
    # The same through the command line.
    target = orthanc_factory("target")
    result = invoke("replicate", dw(source.url), target.url, "--ledger", ledger_url,
                    "--since", "2024-01-02", "--until", "20240108")  # fmt: skip
    assert result.code == 0, result.stderr[-2000:]
    assert sorted(target.instance_ids()) == sorted(
        d.orthanc_id for d in data if d.study_uid in picked
    )


# -- Orthanc -> dicomweb, and verify ---------------------------------------------------------


def test_orthanc_to_dicomweb_then_verify_match_present_missing(
    orthanc_factory, tmp_path, ledger_path, ledger_url
):
    source = orthanc_factory("source")
    target = dicomweb_orthanc(orthanc_factory, "target")
    data = dated_dataset(40, seed=33)
    fill(source, data)
    result = invoke("replicate", source.url, dw(target.url), "--ledger", ledger_url, "-c", "4")
    assert result.code == 0, result.stderr[-3000:]
    # Byte-identical on the target (STOW-RS between Orthancs keeps the file).
    assert sorted(target.instance_ids()) == sorted(d.orthanc_id for d in data)
    assert {i: target.md5(i) for i in target.instance_ids()} == {
        d.orthanc_id: md5_of(d.data) for d in data
    }
    assert ledger_rows(ledger_path, "SELECT state, COUNT(*) FROM instances GROUP BY state") == [
        ("sent", 40)
    ]

    verified = invoke("verify", "--ledger", ledger_url)
    assert verified.code == 0, verified.stdout + verified.stderr
    assert "40 match" in verified.stdout and "present" not in verified.stdout

    # WADO-RS retrieve refused (406): the instances are found by QIDO-RS only: `present`,
    # complete, but never called a match.
    with Proxy("127.0.0.1", target.http_port) as proxy:
        proxy.set_faults(
            lambda method, path, i: Status(406) if "/instances/" in path.split("?")[0] else None
        )
        verified = invoke("verify", "--ledger", ledger_url, "--all", "--target-url", dw(proxy.url))
    assert verified.code == 0, verified.stdout + verified.stderr
    assert "0 match" in verified.stdout and "40 present" in verified.stdout
    assert ledger_rows(ledger_path, "SELECT DISTINCT verify_result FROM instances") == [
        ("present",)
    ]

    # One instance deleted on the target: `missing`, not complete.
    target.delete_instance(data[0].orthanc_id)
    verified = invoke("verify", "--ledger", ledger_url, "--all")
    assert verified.code == 1, verified.stdout
    assert "39 match" in verified.stdout and "1 missing" in verified.stdout


def test_store_many_reads_each_instance_outcome(orthanc_factory):
    target = dicomweb_orthanc(orthanc_factory, "target")
    data = fast_dataset(3, seed=34)

    async def run() -> list:
        end = open_dicomweb_target(dw(target.url), Settings())
        try:
            return await end.store_many([data[0].data, b"not dicom" * 20, data[1].data])
        finally:
            await end.aclose()

    first, bad, third = asyncio.run(run())
    assert first.status == "Success" and third.status == "Success"
    assert isinstance(bad, TransferError) and bad.verdict.kind is Kind.PERMANENT
    assert sorted(target.instance_ids()) == sorted([data[0].orthanc_id, data[1].orthanc_id])


def test_concurrent_stores_share_requests_each_with_its_outcome(orthanc_factory):
    target = dicomweb_orthanc(orthanc_factory, "target")
    data = fast_dataset(12, seed=38)
    blobs = [d.data for d in data[:6]] + [b"not dicom" * 20] + [d.data for d in data[6:]]

    async def run(url: str) -> list:
        end = DicomWebTarget(open_dicomweb_target(url, Settings()).web, requests=1)
        try:
            return await asyncio.gather(*(end.store(b) for b in blobs), return_exceptions=True)
        finally:
            await end.aclose()

    with Proxy("127.0.0.1", target.http_port, delay=0.01) as proxy:
        outcomes = asyncio.run(run(dw(proxy.url)))
        posts = proxy.count("POST", "/dicom-web/studies")
    # The first store went alone; the others waited for it and left together; the one
    # the answer did not name (Orthanc cannot name what it cannot parse) went again
    # alone, for a verdict of its own.
    assert posts == 3, posts
    bad = outcomes.pop(6)
    assert isinstance(bad, TransferError) and bad.verdict.kind is Kind.PERMANENT
    assert [o.status for o in outcomes] == ["Success"] * 12
    assert sorted(target.instance_ids()) == sorted(d.orthanc_id for d in data)


# -- crashes ---------------------------------------------------------------------------------


def test_kill_9_during_listing_and_transfers_then_rerun(
    orthanc_factory, tmp_path, ledger_path, ledger_url
):
    source = dicomweb_orthanc(orthanc_factory, "source")
    target = orthanc_factory("target")
    data = dated_dataset(300, seed=35)
    fill(source, data)
    config = write_config(tmp_path / "c.toml", page_size=10)
    with Proxy("127.0.0.1", source.http_port, delay=0.005) as proxy:
        args = ("replicate", dw(proxy.url), target.url, "--ledger", ledger_url, "-c", "4",
                "--config", str(config), "--job", "dw")  # fmt: skip
        moments = [
            lambda p: _poll(lambda: _count(ledger_path) >= 40, p),
            lambda p: _poll(lambda: _count(ledger_path, "state='sent'") >= 150, p),
        ]
        for i, wait in enumerate(moments):
            proc = start_cli(*args, env={"MIGRATOR_PROGRESS": "none"})
            wait(proc)
            os.kill(proc.pid, signal.SIGKILL)
            proc.communicate(timeout=30)
            # Truthful after each kill: every row called sent is on the target.
            sent = ledger_rows(ledger_path, "SELECT orthanc_id FROM instances WHERE state='sent'")
            assert {r[0] for r in sent} <= set(target.instance_ids())
            if i == 0:
                # Cut mid-listing: the next run resumes from the saved cursor.
                assert not ledger_rows(ledger_path, "SELECT listing_done FROM jobs")[0][0]
                assert _count(ledger_path) < 300
        assert _count(ledger_path, "state='sent'") < 300
        result = invoke(*args)
    assert result.code == 0, result.stderr[-3000:]
    assert_converged(ledger_path, data, target)


# -- bad inputs ------------------------------------------------------------------------------


def test_qido_answer_not_json_is_one_line(orthanc_factory, ledger_url):
    source = dicomweb_orthanc(orthanc_factory, "source")
    target = orthanc_factory("target")
    page = b"<html><body>Welcome to the portal</body></html>"
    with Proxy("127.0.0.1", source.http_port) as proxy:
        proxy.set_faults(lambda m, p, i: Status(200, page, "text/html"))
        result = invoke("replicate", dw(proxy.url), target.url, "--ledger", ledger_url)
    assert result.code == 3
    result.assert_one_line_error()
    assert "not DICOM JSON" in result.stderr and "text/html" in result.stderr


def test_wrong_credentials_exit_3_without_the_password(orthanc_factory, ledger_url):
    source = dicomweb_orthanc(orthanc_factory, "source", users={"alice": "s3cret"})
    target = orthanc_factory("target")
    url = dw(source.url).replace("http://", "http://alice:wrongpass@")
    result = invoke("replicate", url, target.url, "--ledger", ledger_url)
    assert result.code == 3
    result.assert_one_line_error()
    assert "refused the credentials" in result.stderr
    assert "wrongpass" not in result.stderr + result.stdout
    # The right password (from the environment) works, and is never stored.
    fill(source, fast_dataset(5, seed=36))
    url = dw(source.url).replace("http://", "http://alice@")
    result = invoke(
        "replicate", url, target.url, "--ledger", ledger_url,
        env={"MIGRATOR_SOURCE_PASSWORD": "s3cret"},
    )  # fmt: skip
    assert result.code == 0, result.stderr[-2000:]
    assert target.count() == 5


def token_gate(upstream: str, token: str) -> ThreadingHTTPServer:
    """A reverse proxy in front of `upstream` that lets through only requests bearing
    `token` (Orthanc has no bearer tokens of its own): 401 otherwise."""

    class Gate(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def _forward(self) -> None:
            if self.headers.get("Authorization") != f"Bearer {token}":
                self._answer(401, "application/json", b'{"error": "invalid token"}')
                return
            length = int(self.headers.get("Content-Length") or 0)
            keep = ("accept", "content-type")
            answer = httpx.request(
                self.command,
                upstream + self.path.lstrip("/"),
                content=self.rfile.read(length) if length else None,
                headers={k: v for k, v in self.headers.items() if k.lower() in keep},
                timeout=60,
            )
            self._answer(answer.status_code, answer.headers.get("Content-Type"), answer.content)

        def _answer(self, status: int, content_type: str | None, body: bytes) -> None:
            self.send_response(status)
            if content_type:
                self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        do_GET = do_POST = _forward

        def log_message(self, *args: object) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Gate)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server


def test_bearer_token_from_the_environment(orthanc_factory, ledger_path, ledger_url):
    source = dicomweb_orthanc(orthanc_factory, "source")
    target = orthanc_factory("target")
    fill(source, fast_dataset(10, seed=39))
    gate = token_gate(source.url, "tok-7f3a")
    url = f"dicomweb+http://127.0.0.1:{gate.server_address[1]}/dicom-web"
    try:
        refused = invoke("replicate", url, target.url, "--ledger", ledger_url,
                         env={"MIGRATOR_SOURCE_TOKEN": "tok-wrong"})  # fmt: skip
        assert refused.code == 3
        refused.assert_one_line_error()
        assert "refused the credentials" in refused.stderr and "tok-wrong" not in refused.stderr
        result = invoke("replicate", url, target.url, "--ledger", ledger_url,
                        env={"MIGRATOR_SOURCE_TOKEN": "tok-7f3a"})  # fmt: skip
    finally:
        gate.shutdown()
    assert result.code == 0, result.stderr[-2000:]
    assert target.count() == 10
    for path in ledger_path.parent.glob(ledger_path.name + "*"):  # the WAL too
        assert b"tok-7f3a" not in path.read_bytes()


def test_single_instance_series_are_retrieved_alone(orthanc_factory, ledger_path, ledger_url):
    # A series of one instance is retrieved by that instance's own WADO-RS request (the
    # one that streams a large file); a series of several is read whole, once.
    source = dicomweb_orthanc(orthanc_factory, "source")
    target = orthanc_factory("target")
    singles = make_dataset(4, studies=2, series_per_study=2, seed=41)
    several = fast_dataset(20, seed=42)
    assert len({i.series_uid for i in singles}) == 4
    fill(source, singles + several)
    with Proxy("127.0.0.1", source.http_port) as proxy:
        result = invoke("replicate", dw(proxy.url), target.url, "--ledger", ledger_url)
        paths = [p.split("?")[0].rstrip("/").split("/") for m, p in proxy.requests()]
    assert result.code == 0, result.stderr[-2000:]
    assert_converged(ledger_path, singles + several, target)
    series_reads = [p[-1] for p in paths if p[-2] == "series"]
    alone = {p[-1] for p in paths if p[-2] == "instances"}
    assert sorted(series_reads) == sorted({i.series_uid for i in several})
    assert {i.sop_uid for i in singles} <= alone


def test_wado_answer_cut_short_is_never_sent(orthanc_factory, tmp_path, ledger_path, ledger_url):
    source = dicomweb_orthanc(orthanc_factory, "source")
    target = orthanc_factory("target")
    data = fast_dataset(20, seed=37)
    fill(source, data)
    victim = data[3]
    config = tmp_path / "c.toml"
    config.write_text("[retry]\nmax_attempts = 2\nbackoff_initial = 0.05\nbackoff_max = 0.1\n")
    with Proxy("127.0.0.1", source.http_port) as proxy:
        # Every retrieve of one instance, and of its series, stops mid-answer.
        cut = (victim.sop_uid, victim.series_uid)
        proxy.set_faults(lambda m, p, i: TruncateResponse(600) if p.endswith(cut) else None)
        result = invoke("replicate", dw(proxy.url), target.url, "--ledger", ledger_url,
                        "--config", str(config))  # fmt: skip
    assert result.code == 1, result.stderr[-2000:]
    states = dict(ledger_rows(ledger_path, "SELECT sop_uid, state FROM instances"))
    assert states.pop(victim.sop_uid) == "failed"
    assert set(states.values()) == {"sent"}
    assert victim.orthanc_id not in target.instance_ids() and target.count() == 19
