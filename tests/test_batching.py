"""Batched transfers against real Orthancs: several instances per request each way (a
create-archive on the source, a ZIP POST on the target), each row with its own outcome."""

from __future__ import annotations

import os
import signal
import sqlite3
import struct
import time
from pathlib import Path

from conftest import ledger_rows, run_cli, start_cli, state_counts
from faultkit import assert_converged, fast_fill, invoke, md5_of, write_files

from migrator.testkit.fastgen import fast_dataset
from migrator.testkit.proxy import Proxy


def corrupt(data: bytes) -> bytes:
    """A file Orthanc 1.10.1 refuses (400): the pixel data's length field 2 bytes short,
    and 600 bytes of junk after it. Its header still reads fine (the import lists it)."""
    at = data.rfind(b"\xe0\x7f\x10\x00")
    assert at > 0 and data[at + 4 : at + 6] in (b"OB", b"OW")
    (length,) = struct.unpack_from("<I", data, at + 8)
    return data[: at + 8] + struct.pack("<I", length - 2) + data[at + 12 :] + b"\xab" * 600


def test_forced_batches_replicate_and_import_copy_everything(orthanc_factory, tmp_path):
    source = orthanc_factory("source")
    data = fast_fill(source, 60, seed=31)
    target = orthanc_factory("target")
    ledger = tmp_path / "replicate.db"
    with (
        Proxy("127.0.0.1", source.http_port) as src,
        Proxy("127.0.0.1", target.http_port) as tgt,
    ):
        result = invoke("replicate", src.url, tgt.url, "--ledger", f"sqlite:///{ledger}",
                        "-c", "3", "--batch", "8")  # fmt: skip
        assert result.code == 0, result.stderr[-2000:]
        # Batches each way, no instance alone: 60 rows in batches of at most 8.
        archives = src.count("POST", "/tools/create-archive")
        assert 8 <= archives <= 12, archives
        assert src.count("GET", "/instances/") == 0
        assert tgt.count("POST", "/instances") == archives
        assert_converged(ledger, data, target)
        assert run_cli("verify", "--ledger", f"sqlite:///{ledger}").code == 0

    folder = tmp_path / "dicom"
    write_files(folder, data)
    target2 = orthanc_factory("target2")
    ledger2 = tmp_path / "import.db"
    with Proxy("127.0.0.1", target2.http_port) as tgt:
        result = invoke("import", str(folder), tgt.url, "--ledger", f"sqlite:///{ledger2}",
                        "-c", "3", "--batch", "8")  # fmt: skip
        assert result.code == 0, result.stderr[-2000:]
        assert 8 <= tgt.count("POST", "/instances") <= 12
        assert_converged(ledger2, data, target2)
        assert run_cli("verify", "--ledger", f"sqlite:///{ledger2}").code == 0


def test_batch_one_sends_alone(orthanc_factory, ledger_path, ledger_url):
    source, target = orthanc_factory("source"), orthanc_factory("target")
    data = fast_fill(source, 20, seed=32)
    with Proxy("127.0.0.1", source.http_port) as src:
        result = invoke("replicate", src.url, target.url, "--ledger", ledger_url, "--batch", "1")
        assert result.code == 0, result.stderr[-2000:]
        assert src.count("POST", "/tools/create-archive") == 0
        assert src.count("GET", "/instances/") == 20
    assert_converged(ledger_path, data, target)
    bad = run_cli("replicate", source.url, target.url, "--ledger", ledger_url, "--batch", "-3")
    bad.assert_one_line_error()


def _states_by_key(ledger: Path, column: str) -> dict[str, str]:
    return dict(ledger_rows(ledger, f"SELECT {column}, state FROM instances"))


def test_import_batch_with_vanished_refused_and_good(orthanc_factory, tmp_path, ledger_path):
    data = fast_dataset(6, seed=33)
    folder = tmp_path / "dicom"
    folder.mkdir()
    paths = []
    for i, inst in enumerate(data):
        path = folder / f"{i}.dcm"
        path.write_bytes(corrupt(inst.data) if i == 2 else inst.data)
        paths.append(path)
    target = orthanc_factory("target")
    ledger_url = f"sqlite:///{ledger_path}"
    with Proxy("127.0.0.1", target.http_port) as tgt:
        listed = invoke("import", str(folder), tgt.url, "--ledger", ledger_url, "--dry-run")
        assert listed.code == 0, listed.stderr
        paths[4].unlink()  # gone after the listing
        result = invoke("import", str(folder), tgt.url, "--ledger", ledger_url,
                        "-c", "1", "--batch", "8")  # fmt: skip
        # One ZIP for the five files read, then the one it left out, alone.
        assert tgt.count("POST", "/instances") == 2
    assert result.code != 0  # a rejected row: not everything is on the target
    states = {Path(p).name: s for p, s in _states_by_key(ledger_path, "path").items()}
    assert states == {"0.dcm": "sent", "1.dcm": "sent", "2.dcm": "rejected",
                      "3.dcm": "sent", "4.dcm": "vanished", "5.dcm": "sent"}  # fmt: skip
    rejected = ledger_rows(ledger_path, "SELECT last_error FROM instances WHERE state='rejected'")
    assert "400" in rejected[0][0]
    good = [data[i] for i in (0, 1, 3, 5)]
    assert sorted(target.instance_ids()) == sorted(d.orthanc_id for d in good)
    md5s = dict(
        ledger_rows(ledger_path, "SELECT orthanc_id, md5 FROM instances WHERE state='sent'")
    )
    assert md5s == {d.orthanc_id: md5_of(d.data) for d in good}
    assert {target.md5(d.orthanc_id) for d in good} == {md5_of(d.data) for d in good}


FILTER = """
function ReceivedInstanceFilter(dicom, origin, info)
  if dicom.SOPInstanceUID == '{sop}' then
    return false
  end
  return true
end
"""


def test_replicate_batch_with_vanished_refused_and_good(orthanc_factory, ledger_path):
    source = orthanc_factory("source")
    data = fast_fill(source, 8, seed=34)
    refused, gone = data[1], data[5]
    target = orthanc_factory("target", lua=FILTER.format(sop=refused.sop_uid))
    ledger_url = f"sqlite:///{ledger_path}"
    with Proxy("127.0.0.1", source.http_port) as src:
        listed = invoke("replicate", src.url, target.url, "--ledger", ledger_url, "--dry-run")
        assert listed.code == 0, listed.stderr
        source.delete_instance(gone.orthanc_id)
        src.reset_counts()
        result = invoke("replicate", src.url, target.url, "--ledger", ledger_url,
                        "-c", "1", "--batch", "8")  # fmt: skip
        # The 404 of the whole batch is bisected: 8 -> 4 + 4 -> the 4 with the vanished
        # one as 2 + 2 -> 1 + 1 (each alone, one GET answering 404).
        assert src.count("POST", "/tools/create-archive") == 5
        assert src.count("GET", "/instances/") == 2
    assert result.code != 0
    states = _states_by_key(ledger_path, "orthanc_id")
    expected = {d.orthanc_id: "sent" for d in data}
    expected[refused.orthanc_id] = "rejected"
    expected[gone.orthanc_id] = "vanished"
    assert states == expected
    reason = ledger_rows(ledger_path, "SELECT last_error FROM instances WHERE state='rejected'")
    assert "FilteredOut" in reason[0][0]
    sent = [d for d in data if d not in (refused, gone)]
    assert sorted(target.instance_ids()) == sorted(d.orthanc_id for d in sent)


def _in_flight_post(tgt: Proxy, proc, ledger: Path, timeout: float = 60) -> None:
    """Wait until a batched POST is on its way through the slow proxy."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"migrator ended early: {proc.communicate()}")
        try:
            sent = state_counts(ledger).get("sent", 0)
        except sqlite3.Error:
            sent = 0
        if sent >= 20 and tgt.count("POST", "/instances") > sent // 20:
            return
        time.sleep(0.02)
    raise AssertionError("no batched POST seen in flight")


def test_sigkill_during_batched_post_resumes(orthanc_factory, tmp_path, ledger_path):
    source, target = orthanc_factory("source"), orthanc_factory("target")
    data = fast_fill(source, 200, seed=35)
    ledger_url = f"sqlite:///{ledger_path}"
    # The target 0.25 s away each way: every POST stays in flight for half a second.
    with Proxy("127.0.0.1", target.http_port, delay=0.25) as tgt:
        args = ("replicate", source.url, tgt.url, "--ledger", ledger_url,
                "-c", "2", "--batch", "20", "--job", "batches")  # fmt: skip
        proc = start_cli(*args, env={"MIGRATOR_PROGRESS": "none"})
        _in_flight_post(tgt, proc, ledger_path)
        os.kill(proc.pid, signal.SIGKILL)
        proc.communicate(timeout=30)
        counts = state_counts(ledger_path)
        assert counts.get("in_flight", 0) >= 20, counts  # a batch was cut mid-POST
        sent = {r[0] for r in ledger_rows(ledger_path, "SELECT orthanc_id FROM instances "
                                                       "WHERE state='sent'")}  # fmt: skip
        assert sent <= set(target.instance_ids())
        # The rerun takes back the dead run's leases and sends the cut batch again.
        result = invoke(*args)
        assert result.code == 0, result.stderr[-2000:]
    assert_converged(ledger_path, data, target)


def test_proxy_rate_caps_the_bandwidth_of_all_connections(orthanc_factory):
    import httpx

    from migrator.testkit.dicomgen import make_dataset

    server = orthanc_factory("server")
    data = make_dataset(2, extra_bytes=1_000_000, seed=36)
    for inst in data:
        server.upload(inst.data)
    with Proxy("127.0.0.1", server.http_port, rate=4_000_000) as capped:
        started = time.monotonic()
        with httpx.Client(base_url=capped.url, timeout=30) as client:
            for inst in data:  # 2 MB each way at 4 MB/s: about 0.5 s each way
                response = client.get(f"instances/{inst.orthanc_id}/file",
                                      headers={"Accept-Encoding": "identity"})  # fmt: skip
                assert response.content == inst.data
                client.post("instances", content=inst.data).raise_for_status()
        elapsed = time.monotonic() - started
    assert 0.9 < elapsed < 3.0, elapsed


def test_failed_batched_requests_are_retried_without_an_outage(orthanc_factory, tmp_path):
    from faultkit import write_config

    from migrator.testkit.faults import DropResponse, Reset, ScriptedFaults, Status

    source, target = orthanc_factory("source"), orthanc_factory("target")
    data = fast_fill(source, 48, seed=37)
    ledger = tmp_path / "ledger.db"
    config = write_config(tmp_path / "quick.toml")
    with (
        Proxy("127.0.0.1", source.http_port) as src,
        Proxy("127.0.0.1", target.http_port) as tgt,
    ):
        src.set_faults(ScriptedFaults([Status(503)], only=("POST", "/tools/create-archive")))
        # The first ZIP is stored but its answer lost; the second never arrives.
        tgt.set_faults(ScriptedFaults([DropResponse(), Reset()]))
        result = invoke("replicate", src.url, tgt.url, "--ledger", f"sqlite:///{ledger}",
                        "--config", str(config), "-c", "2", "--batch", "8")  # fmt: skip
        assert src.fault_counts() == {"status_503": 1}
        assert sum(tgt.fault_counts().values()) == 2
    assert result.code == 0, result.stderr[-2000:]
    # One failed request of 8 rows is one network error for the breaker, not eight.
    assert "not answering" not in result.stderr
    assert_converged(ledger, data, target)
    retried = ledger_rows(ledger, "SELECT COUNT(*) FROM instances WHERE attempts > 1")[0][0]
    assert retried == 24, retried


def test_batches_decided_from_round_trips(orthanc_factory, tmp_path):
    source = orthanc_factory("source")
    data = fast_fill(source, 120, seed=38)
    for delay, batched in ((0.05, True), (0.0, False)):
        target = orthanc_factory(f"target{int(batched)}")
        ledger = tmp_path / f"auto-{batched}.db"
        with (
            Proxy("127.0.0.1", source.http_port, delay=delay) as src,
            Proxy("127.0.0.1", target.http_port, delay=delay) as tgt,
        ):
            result = invoke("replicate", src.url, tgt.url, "--ledger", f"sqlite:///{ledger}",
                            "-c", "4")  # fmt: skip
            assert result.code == 0, result.stderr[-2000:]
            archives = src.count("POST", "/tools/create-archive")
            # 200 ms of round trips per transfer: batches; none on a local link.
            assert (archives > 0) is batched, (delay, archives)
            assert ("small instances per request" in result.stderr) is batched
            if batched:
                assert tgt.count("POST", "/instances") < 60
        assert_converged(ledger, data, target)


def test_batched_workers_one_killed(orthanc_factory, tmp_path, ledger_path):
    from faultkit import write_config

    source, target = orthanc_factory("source"), orthanc_factory("target")
    data = fast_fill(source, 400, seed=39)
    ledger_url = f"sqlite:///{ledger_path}"
    config = write_config(tmp_path / "leases.toml", lease_seconds=3.0)
    with Proxy("127.0.0.1", target.http_port, delay=0.05) as tgt:
        common = ("--ledger", ledger_url, "-c", "2", "--batch", "8", "--config", str(config),
                  "--progress", "none")  # fmt: skip
        first = start_cli("replicate", source.url, tgt.url, "--job", "shared", *common)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            try:
                if ledger_rows(ledger_path, "SELECT COUNT(*) FROM jobs")[0][0]:
                    break
            except sqlite3.Error:
                pass
            time.sleep(0.1)
        victim = start_cli("worker", "--job", "shared", *common)
        # Killed once it has taken part: leased rows and sent at least one batch.
        while time.monotonic() < deadline:
            rows = ledger_rows(ledger_path, f"SELECT sent FROM runs WHERE pid = {victim.pid}")
            if rows and rows[0][0] >= 8:
                break
            time.sleep(0.05)
        else:
            raise AssertionError("the worker never sent a batch")
        os.kill(victim.pid, signal.SIGKILL)
        victim.communicate(timeout=30)
        _out, err = first.communicate(timeout=180)
    assert first.returncode == 0, err[-2000:]
    assert_converged(ledger_path, data, target)
    assert ledger_rows(ledger_path, "SELECT MAX(attempts) FROM instances")[0][0] <= 2
    statuses = dict(ledger_rows(ledger_path, "SELECT status, COUNT(*) FROM runs GROUP BY status"))
    assert statuses == {"crashed": 1, "finished": 1}, statuses


def test_a_source_without_archives_is_sent_one_by_one(orthanc_factory, ledger_path):
    from migrator.testkit.faults import ScriptedFaults, Status

    source, target = orthanc_factory("source"), orthanc_factory("target")
    data = fast_fill(source, 40, seed=40)
    with Proxy("127.0.0.1", source.http_port) as src:
        # A source that answers 404 to every create-archive (no such route).
        src.set_faults(ScriptedFaults([Status(404)] * 100, only=("POST", "/tools/create-archive")))
        result = invoke("replicate", src.url, target.url, "--ledger", f"sqlite:///{ledger_path}",
                        "-c", "1", "--batch", "8")  # fmt: skip
        # The first batch is split (8, then 4, then 2) down to single instances, all
        # there: batches stop, and the rest of that batch goes one by one too.
        assert src.count("POST", "/tools/create-archive") == 3
        assert src.count("GET", "/instances/") == 40
    assert result.code == 0, result.stderr[-2000:]
    assert "batched transfers off" in result.stderr
    assert_converged(ledger_path, data, target)
