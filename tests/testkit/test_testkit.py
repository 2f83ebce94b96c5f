"""Tests of migrator.testkit against a real Orthanc (the binary must be installed)."""

from __future__ import annotations

import hashlib
import io
import os
import shutil
import socket
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pydicom
import pytest

from migrator.ends.dicomid import orthanc_id_from_dataset, orthanc_instance_id
from migrator.testkit import (
    DropResponse,
    OrthancProcess,
    Proxy,
    RandomFaults,
    Reset,
    ScriptedFaults,
    Stall,
    Status,
    make_dataset,
    make_instance,
    upload_all,
)
from migrator.testkit.orthanc import DEFAULT_ORTHANC_BIN

ORTHANC_BIN = os.environ.get("MIGRATOR_ORTHANC_BIN", DEFAULT_ORTHANC_BIN)
needs_orthanc = pytest.mark.skipif(
    shutil.which(ORTHANC_BIN) is None, reason=f"Orthanc binary {ORTHANC_BIN} not found"
)
DICOM = {"Content-Type": "application/dicom"}


@pytest.fixture
def orthanc(tmp_path: Path) -> Iterator[OrthancProcess]:
    server = OrthancProcess(tmp_path / "orthanc").start()
    try:
        yield server
    finally:
        # The data is thrown away: skip Orthanc's ~3 s graceful shutdown.
        server.stop(graceful=False)


@pytest.fixture
def proxied(orthanc: OrthancProcess) -> Iterator[tuple[OrthancProcess, Proxy]]:
    with Proxy("127.0.0.1", orthanc.http_port) as proxy:
        yield orthanc, proxy


# -- identifiers and generated data -------------------------------------------------------


def test_orthanc_instance_id_reference_example() -> None:
    got = orthanc_instance_id("PAT1", "1.2.3.4.5.100", "1.2.3.4.5.100.1", "1.2.3.4.5.100.1.1")
    assert got == "1fa962ed-0ec1e6d0-beb96e87-5b3b2e7f-7909f001"


def test_make_instance_is_valid_deterministic_and_seeded() -> None:
    args = ("P1", "1.2.3", "1.2.3.1", "1.2.3.1.1")
    first = make_instance(*args, seed=1)
    assert first == make_instance(*args, seed=1)
    assert first != make_instance(*args, seed=2)
    assert first[128:132] == b"DICM"
    ds = pydicom.dcmread(io.BytesIO(first))
    assert ds.file_meta.TransferSyntaxUID == "1.2.840.10008.1.2.1"
    assert ds.SOPClassUID == "1.2.840.10008.5.1.4.1.1.7"
    assert (ds.Rows, ds.Columns, ds.BitsAllocated) == (16, 16, 16)
    assert len(ds.PixelData) == 16 * 16 * 2
    assert orthanc_id_from_dataset(ds) == orthanc_instance_id(*args)
    padded = make_instance(*args, seed=1, extra_bytes=10_001)
    assert len(padded) >= len(first) + 10_001


def test_make_dataset_layout() -> None:
    items = make_dataset(45, seed=3)
    assert len({i.orthanc_id for i in items}) == 45
    assert len({i.series_uid for i in items}) == 5  # about ten per series
    assert len({i.study_uid for i in items}) == 3  # two series per study
    assert len({i.patient_id for i in items}) == 2  # two studies per patient
    assert make_dataset(45, seed=3) == items
    assert not {i.sop_uid for i in items} & {i.sop_uid for i in make_dataset(45, seed=4)}
    even = make_dataset(12, studies=3, series_per_study=2)
    assert len({i.study_uid for i in even}) == 3
    assert all(len(i.sop_uid) <= 64 for i in items)


def test_random_faults_are_reproducible() -> None:
    def decisions(plan: RandomFaults) -> list[object]:
        return [plan("POST", "/instances", i) for i in range(200)]

    a = decisions(RandomFaults(7, p_reset=0.1, p_503=0.2, p_drop=0.1))
    assert a == decisions(RandomFaults(7, p_reset=0.1, p_503=0.2, p_drop=0.1))
    assert {type(x) for x in a} == {type(None), Reset, Status, DropResponse}
    assert RandomFaults(7, p_503=1.0)("GET", "/instances", 0) is None
    assert RandomFaults(7, p_503=1.0, max_faults=1)("POST", "/instances", 0) == Status(503)
    with pytest.raises(ValueError):
        RandomFaults(p_503=0.7, p_500=0.5)


# -- Orthanc process ------------------------------------------------------------------------


@needs_orthanc
def test_upload_roundtrip(orthanc: OrthancProcess) -> None:
    items = make_dataset(20, seed=1)
    answers = upload_all(orthanc, items, concurrency=4)
    assert [a["ID"] for a in answers] == [i.orthanc_id for i in items]
    assert {a["Status"] for a in answers} == {"Success"}
    assert orthanc.count() == 20
    assert sorted(orthanc.instance_ids()) == sorted(i.orthanc_id for i in items)
    for item in items:
        assert orthanc.file(item.orthanc_id) == item.data
    # StoreMD5ForAttachments defaults to true, so the MD5 is there without configuration.
    assert orthanc.md5(items[0].orthanc_id) == hashlib.md5(items[0].data).hexdigest()
    assert orthanc.upload(items[0].data)["Status"] == "AlreadyStored"
    orthanc.delete_instance(items[0].orthanc_id)
    assert orthanc.count() == 19


@needs_orthanc
def test_auth_restart_and_lua_filter(tmp_path: Path) -> None:
    lua = (
        "function ReceivedInstanceFilter(dicom, origin, info)\n"
        '  return dicom.PatientID ~= "REJECT"\n'
        "end\n"
    )
    server = OrthancProcess(tmp_path / "o", users={"alice": "s3cret"}, lua=lua).start()
    try:
        port = server.http_port
        assert httpx.get(server.url + "system").status_code == 401
        kept = make_instance("KEEP", "1.2.9", "1.2.9.1", "1.2.9.1.1")
        refused = make_instance("REJECT", "1.2.9", "1.2.9.1", "1.2.9.1.2")
        assert server.upload(kept)["Status"] == "Success"
        answer = server.upload(refused)
        assert answer["Status"] == "FilteredOut"
        assert answer["ID"] == orthanc_instance_id("REJECT", "1.2.9", "1.2.9.1", "1.2.9.1.2")
        server.restart()
        assert server.http_port == port
        assert server.count() == 1
    finally:
        server.stop(graceful=False)
    assert server.pid is None


@needs_orthanc
def test_start_failure_reports_log(tmp_path: Path) -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        server = OrthancProcess(tmp_path / "bad", http_port=busy.getsockname()[1])
        with pytest.raises(RuntimeError, match="log tail"):
            server.start(timeout=10)
    assert server.pid is None


# -- proxy ----------------------------------------------------------------------------------


@needs_orthanc
def test_proxy_delay_applies_each_way(orthanc: OrthancProcess) -> None:
    with Proxy("127.0.0.1", orthanc.http_port, delay=0.05) as proxy, httpx.Client() as client:
        client.get(proxy.url + "system").raise_for_status()  # open the connection first
        started = time.monotonic()
        client.get(proxy.url + "system").raise_for_status()
        elapsed = time.monotonic() - started
    assert 0.1 <= elapsed < 0.5


@needs_orthanc
def test_proxy_counts_requests_on_keepalive(proxied: tuple[OrthancProcess, Proxy]) -> None:
    orthanc, proxy = proxied
    items = make_dataset(10, seed=2)
    with httpx.Client(base_url=proxy.url) as client:
        for item in items:
            client.post("instances", content=item.data, headers=DICOM).raise_for_status()
        client.get(f"instances/{items[0].orthanc_id}/file").raise_for_status()
        # A chunked body must not confuse the framing of the next request.
        chunks = iter([items[1].data[:300], items[1].data[300:]])
        assert client.post("instances", content=chunks).json()["Status"] == "AlreadyStored"
        client.get("system").raise_for_status()
    assert proxy.count("POST", "/instances") == 11
    assert proxy.counts[("POST", "/instances")] == 11
    assert proxy.counts[("GET", "/instances")] == 1
    assert proxy.count("GET") == 2
    assert proxy.requests()[-1] == ("GET", "/system")
    assert orthanc.count() == 10
    proxy.reset_counts()
    assert proxy.count() == 0


@needs_orthanc
def test_proxy_forwards_large_bodies_intact(orthanc: OrthancProcess) -> None:
    big = make_dataset(1, size=512, seed=5)[0]  # ~512 KB, many chunks
    with Proxy("127.0.0.1", orthanc.http_port, delay=0.01) as proxy:
        with httpx.Client(base_url=proxy.url) as client:
            client.post("instances", content=big.data, headers=DICOM).raise_for_status()
            assert client.get(f"instances/{big.orthanc_id}/file").content == big.data
        assert proxy.bytes_up > len(big.data)
        assert proxy.bytes_down > len(big.data) // 2  # answers may be gzipped


@needs_orthanc
def test_proxy_random_503(proxied: tuple[OrthancProcess, Proxy]) -> None:
    orthanc, proxy = proxied
    proxy.set_faults(RandomFaults(seed=1, p_503=1.0))
    items = make_dataset(3, seed=3)
    with httpx.Client(base_url=proxy.url) as client:
        codes = [client.post("instances", content=i.data, headers=DICOM).status_code for i in items]
        assert client.get("system").status_code == 200  # only POST /instances is targeted
    assert codes == [503, 503, 503]
    assert proxy.fault_counts() == {"status_503": 3}
    assert orthanc.count() == 0


@needs_orthanc
def test_proxy_drop_response_stores_but_client_fails(
    proxied: tuple[OrthancProcess, Proxy],
) -> None:
    orthanc, proxy = proxied
    item = make_dataset(1, seed=4)[0]
    proxy.set_faults(ScriptedFaults([DropResponse()]))
    with httpx.Client(base_url=proxy.url) as client:
        with pytest.raises(httpx.TransportError):
            client.post("instances", content=item.data, headers=DICOM)
        answer = client.post("instances", content=item.data, headers=DICOM).json()
    assert answer["Status"] == "AlreadyStored"
    assert orthanc.instance_ids() == [item.orthanc_id]
    assert proxy.fault_counts() == {"drop_response": 1}


@needs_orthanc
def test_proxy_reset_and_stall(proxied: tuple[OrthancProcess, Proxy]) -> None:
    orthanc, proxy = proxied
    items = make_dataset(3, seed=6)
    proxy.set_faults(ScriptedFaults([Reset(), Reset(after_body_bytes=500), Stall(0.3)]))
    with httpx.Client(base_url=proxy.url) as client:
        for item in items[:2]:
            with pytest.raises(httpx.TransportError):
                client.post("instances", content=item.data, headers=DICOM)
        started = time.monotonic()
        client.post("instances", content=items[2].data, headers=DICOM).raise_for_status()
        assert time.monotonic() - started >= 0.3
    assert orthanc.instance_ids() == [items[2].orthanc_id]
    assert proxy.fault_counts() == {"reset": 1, "reset_mid_body": 1, "stall": 1}


@needs_orthanc
def test_proxy_down_and_up(proxied: tuple[OrthancProcess, Proxy]) -> None:
    _, proxy = proxied
    with httpx.Client(base_url=proxy.url) as client:
        client.get("system").raise_for_status()
        proxy.down()
        with pytest.raises(httpx.TransportError):
            client.get("system")
        with pytest.raises(httpx.ConnectError):
            httpx.get(proxy.url + "system")
        proxy.up()
        client.get("system").raise_for_status()


def test_proxy_unreachable_upstream_and_clean_stop() -> None:
    from migrator.testkit import free_port

    proxy = Proxy("127.0.0.1", free_port()).start()
    with pytest.raises(httpx.TransportError):
        httpx.get(proxy.url + "system", timeout=5)
    thread = proxy._thread
    proxy.stop()
    assert thread is not None and not thread.is_alive()


@needs_orthanc
def test_orthanc_started_again_on_other_ports_when_its_port_is_taken(tmp_path, monkeypatch):
    """Between choosing a free port and Orthanc's bind, a parallel test may take it."""
    from migrator.testkit import orthanc as orthanc_module

    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        busy = taken.getsockname()[1]
        ports = iter([busy])
        real = orthanc_module.free_port
        monkeypatch.setattr(orthanc_module, "free_port", lambda: next(ports, None) or real())
        proc = OrthancProcess(tmp_path / "o", name="o")
        assert proc.http_port == busy
        proc.start()
        try:
            assert proc.http_port != busy
            assert httpx.get(proc.url + "system").status_code == 200
        finally:
            proc.stop()
