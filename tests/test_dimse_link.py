"""The target's store associations on the event loop (`migrator.ends.dimse.link`): the
association request as pynetdicom reads it, statuses and broken answers from a peer
written here, and DCMTK's storescp taking only implicit VR (files re-encoded)."""

from __future__ import annotations

import asyncio
import io
import struct
import subprocess
from collections.abc import Callable
from pathlib import Path

import pydicom
import pytest
from conftest import run_cli, state_counts

from migrator.config import Settings
from migrator.ends.dimse import pdu
from migrator.ends.dimse.peer import parse_dicom_url
from migrator.ends.dimse.target import DimseTarget
from migrator.errors import Kind, TransferError
from migrator.testkit import make_dataset
from migrator.testkit.orthanc import free_port, wait_port

CT = "1.2.840.10008.5.1.4.1.1.2"


def test_association_request_is_read_by_pynetdicom():
    """Our A-ASSOCIATE-RQ decodes, in pynetdicom, to the AE titles, contexts (odd IDs, the
    syntaxes in order) and maximum length we asked for."""
    from pynetdicom.pdu import A_ASSOCIATE_RQ

    contexts = [
        (pdu.VERIFICATION, [pdu.IMPLICIT_LE]),
        (CT, [pdu.EXPLICIT_LE, pdu.IMPLICIT_LE]),
        (CT, ["1.2.840.10008.1.2.5"]),
    ]
    raw = pdu.associate_rq("PACS", "MIGRATOR", contexts, max_length=16384)
    decoded = A_ASSOCIATE_RQ()
    decoded.decode(raw)
    assert decoded.called_ae_title.strip() == "PACS"
    assert decoded.calling_ae_title.strip() == "MIGRATOR"
    got = [
        (cx.context_id, str(cx.abstract_syntax), [str(t) for t in cx.transfer_syntax])
        for cx in decoded.presentation_context
    ]
    assert got == [(2 * i + 1, a, t) for i, (a, t) in enumerate(contexts)]
    assert decoded.user_information.maximum_length == 16384
    assert decoded.user_information.implementation_class_uid == pdu.IMPLEMENTATION_UID


# -- a peer written here -----------------------------------------------------------------


async def _read_pdu(reader: asyncio.StreamReader) -> tuple[int, bytes]:
    kind, _, length = struct.unpack(">BBI", await reader.readexactly(6))
    return kind, await reader.readexactly(length)


def _accept(body: bytes) -> bytes:
    """An A-ASSOCIATE-AC accepting every proposed context in its first syntax."""
    items = [pdu._item(0x10, pdu.APPLICATION_CONTEXT.encode())]
    pos = 68
    while pos + 4 <= len(body):
        kind, _, length = struct.unpack_from(">BBH", body, pos)
        value = body[pos + 4 : pos + 4 + length]
        pos += 4 + length
        if kind != 0x20:
            continue
        sub, first = 4, None
        while sub + 4 <= len(value):
            sub_kind, _, sub_length = struct.unpack_from(">BBH", value, sub)
            if sub_kind == 0x40 and first is None:
                first = value[sub + 4 : sub + 4 + sub_length]
            sub += 4 + sub_length
        items.append(_item_ac(value[0], first or b""))
    items.append(pdu._item(0x50, pdu._item(0x51, struct.pack(">I", 16384))))
    out = body[:68] + b"".join(items)
    return struct.pack(">BBI", 0x02, 0, len(out)) + out


def _item_ac(context_id: int, ts: bytes) -> bytes:
    return pdu._item(0x21, bytes([context_id, 0, 0, 0]) + pdu._item(0x40, ts))


def _store_rsp(msg_id: int, status: int) -> bytes:
    command = pdu._command(
        pdu._element(0x0100, struct.pack("<H", 0x8001)),
        pdu._element(0x0120, struct.pack("<H", msg_id)),
        pdu._element(0x0800, struct.pack("<H", 0x0101)),
        pdu._element(0x0900, struct.pack("<H", status)),
    )
    return b"".join(pdu.pdata_pdus(1, command, None, 0))


Answer = Callable[[int, int], bytes | None]


async def _serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, answer: Answer):
    """Accept the association, then answer the n-th C-STORE with `answer(n, msg_id)`'s
    bytes (None: an A-ABORT, and the connection closed)."""
    _, body = await _read_pdu(reader)
    writer.write(_accept(body))
    stores = 0
    command = b""
    try:
        while True:
            kind, body = await _read_pdu(reader)
            if kind == pdu.RELEASE_RQ:
                writer.write(struct.pack(">BBII", pdu.RELEASE_RP, 0, 4, 0))
                break
            if kind != pdu.P_DATA:
                break
            control = body[5]
            if control & 0x01:
                command += body[6:]
                if control & 0x02:
                    msg_id = pdu.command_fields(command)[0x0110]
                    command = b""
            elif control & 0x02:
                # The last fragment of a C-STORE's dataset.
                stores += 1
                reply = answer(stores, msg_id)
                if reply is None:
                    writer.write(struct.pack(">BBIBBBB", pdu.ABORT, 0, 4, 0, 0, 2, 0))
                    break
                writer.write(reply)
            await writer.drain()
    except asyncio.IncompleteReadError:
        pass
    finally:
        writer.close()


def _store_all(answer: Answer, files: list[bytes]) -> tuple[list[object], int]:
    """Each file stored one after the other through a DimseTarget at a peer answering
    with `answer`: the outcomes (Stored or the TransferError) and the connections made."""
    connections = 0

    async def run() -> list[object]:
        nonlocal connections

        async def handle(reader, writer):
            nonlocal connections
            connections += 1
            await _serve(reader, writer, answer)

        server = await asyncio.start_server(handle, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        peer = parse_dicom_url(f"dicom://FAKE@127.0.0.1:{port}", "target", "MIGRATOR")
        target = DimseTarget(peer, Settings(concurrency=1, timeout=5.0))
        outcomes: list[object] = []
        try:
            for data in files:
                try:
                    outcomes.append(await target.store(data))
                except TransferError as exc:
                    outcomes.append(exc)
        finally:
            await target.aclose()
            server.close()
        return outcomes

    return asyncio.run(run()), connections


@pytest.fixture(scope="module")
def files() -> list[bytes]:
    return [i.data for i in make_dataset(4, seed=81)]


@pytest.mark.parametrize("max_length", [16384, 0])
def test_streamed_dataset_pdus_as_pynetdicom_reads_them(max_length):
    """A dataset sent as its chunks come (`pdu.dataset_parts`): P-DATA-TF PDUs that
    pynetdicom decodes to data fragments within the peer's maximum, in order, the whole
    dataset, only the very last one flagged last, whatever the chunks' sizes."""
    from pynetdicom.pdu import P_DATA_TF

    dataset = bytes(range(256)) * 300 + b"odd"
    chunks = [dataset[:1000], dataset[1000:1000], dataset[1000:50_001], dataset[50_001:]]
    raw, sent = b"", 0
    for chunk in chunks:
        raw += b"".join(pdu.dataset_parts(5, memoryview(chunk), sent, len(dataset), max_length))
        sent += len(chunk)
    fragments, pos = [], 0
    while pos < len(raw):
        (length,) = struct.unpack_from(">I", raw, pos + 2)
        decoded = P_DATA_TF()
        decoded.decode(raw[pos : pos + 6 + length])
        [item] = decoded.presentation_data_value_items
        control = item.data[0]
        assert item.context_id == 5 and control & 0x01 == 0  # a dataset fragment
        fragments.append((item.data[1:], bool(control & 0x02)))
        pos += 6 + length
    assert b"".join(f for f, _ in fragments) == dataset
    assert [last for _, last in fragments] == [False] * (len(fragments) - 1) + [True]
    if max_length:
        assert all(len(f) <= max_length - 6 for f, _ in fragments)


def test_statuses_are_classified(files):
    """Success and a warning store the instance; 0xA700 refuses it (permanent) and the
    association goes on serving the next one."""
    statuses = {1: 0x0000, 2: 0xB000, 3: 0xA700, 4: 0x0000}
    outcomes, connections = _store_all(lambda n, m: _store_rsp(m, statuses[n]), files)
    assert [getattr(o, "status", None) for o in outcomes] == ["Success", "Success", None, "Success"]
    assert outcomes[1].warning
    assert isinstance(outcomes[2], TransferError)
    assert outcomes[2].verdict.kind is Kind.PERMANENT
    assert connections == 1


def test_abort_or_wrong_answer_is_retryable_and_replaces_the_association(files):
    """A peer aborting during a store, or answering another message ID: that store is
    retryable (nothing confirmed), and the next store goes over a new association."""

    def answer(n: int, msg_id: int) -> bytes | None:
        if n == 1:
            return None
        return _store_rsp(msg_id + 1, 0)  # never the right ID

    outcomes, connections = _store_all(answer, files[:2])
    assert all(isinstance(o, TransferError) for o in outcomes)
    assert all(o.verdict.kind is Kind.RETRYABLE for o in outcomes)
    assert connections == 2


def test_implicit_only_peer_gets_files_re_encoded(tmp_path: Path, ledger_path, ledger_url):
    """storescp accepting implicit VR little endian only: the explicit VR files are
    re-encoded (pydicom) and stored, same SOP Instance UIDs and pixel data."""
    instances = make_dataset(3, seed=82)
    folder = tmp_path / "files"
    folder.mkdir()
    for i, inst in enumerate(instances):
        (folder / f"{i}.dcm").write_bytes(inst.data)
    received = tmp_path / "received"
    received.mkdir()
    port = free_port()
    cmd = ["storescp", "-aet", "STORESCP", "+xi", "-od", str(received), str(port)]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_port(port)
        url = f"dicom://STORESCP@127.0.0.1:{port}"
        result = run_cli("import", str(folder), url, "--ledger", ledger_url)
    finally:
        proc.terminate()
        proc.wait(10)
    assert result.code == 0, result.stderr
    assert state_counts(ledger_path) == {"sent": 3}
    got = {}
    for path in received.iterdir():
        ds = pydicom.dcmread(path)
        assert ds.file_meta.TransferSyntaxUID == pdu.IMPLICIT_LE
        got[str(ds.SOPInstanceUID)] = ds.PixelData
    for inst in instances:
        want = pydicom.dcmread(io.BytesIO(inst.data))
        assert got[str(want.SOPInstanceUID)] == want.PixelData
