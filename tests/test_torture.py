"""Torture tests: several ways of losing data at once, against real Orthanc processes.

The promise checked here is the one a site relies on before retiring a source: `replicate`
/ `import` followed by `verify` exit 0 only when the target holds every instance that the
source still holds; otherwise they exit non-zero and say why.
"""

from __future__ import annotations

import os
import struct
import threading
from collections.abc import Callable
from pathlib import Path

from migrator.testkit.dicomgen import make_dataset, upload_all, without_pixel_data
from migrator.testkit.orthanc import OrthancProcess
from migrator.testkit.proxy import Pass, Proxy
from tests.conftest import run_cli


def _source_changing_under_listing(
    source: OrthancProcess, extra: list[bytes], page_size: int
) -> Callable[[str, str, int], Pass | None]:
    """A fault plan that, before each listing page after the first is read, deletes
    instances from the pages already listed (25 before the second page, then 5 a page, at
    most 45) and uploads a new one: the source changing while the listing pages through."""
    lock = threading.Lock()
    pages = [0]
    deleted = [0]

    def plan(method: str, path: str, index: int) -> Pass | None:
        if method != "GET" or path != "/instances":
            return None
        with lock:
            pages[0] += 1
            if pages[0] >= 2:
                quota = min(25 if pages[0] == 2 else 5, 45 - deleted[0])
                listed = source.instance_ids()[: (pages[0] - 1) * page_size]
                for orthanc_id in listed[:quota]:
                    source.delete_instance(orthanc_id)
                deleted[0] += max(quota, 0)
                if extra:
                    upload_all(source, [extra.pop()], concurrency=1)
        return None

    return plan


def test_replicate_from_a_source_that_deletes_and_adds_during_listing(
    orthanc_factory: Callable[..., OrthancProcess], tmp_path: Path, ledger_url: str
) -> None:
    source, target = orthanc_factory("source"), orthanc_factory("target")
    upload_all(source, make_dataset(200, seed=11))
    added = [inst.data for inst in make_dataset(12, seed=12)]
    config = tmp_path / "migrator.toml"
    config.write_text("page_size = 20\n")
    job = ["--job", "torture", "--ledger", ledger_url, "--config", str(config)]
    with Proxy("127.0.0.1", source.http_port) as proxy:
        proxy.set_faults(_source_changing_under_listing(source, added, page_size=20))
        first = run_cli("replicate", proxy.url, target.url, *job, "-c", "4")
        proxy.set_faults(None)
        held = set(source.instance_ids())
        assert len(held) < 200, "the source did not change under the listing"
        missing = held - set(target.instance_ids())
        if first.code == 0:
            assert not missing, f"exit 0 but {len(missing)} instances of the source not copied"
        # A rerun of the same command finishes the job: everything the source holds is there.
        rerun = run_cli("replicate", proxy.url, target.url, *job)
    assert rerun.code == 0, rerun.stdout + rerun.stderr
    assert held <= set(target.instance_ids())
    # Instances deleted from the source are vanished rows: a plain verify names them and
    # does not pass; accepting them says the source's deletions were meant.
    plain = run_cli("verify", "--ledger", ledger_url, "--job", "torture")
    assert plain.code != 0 and "vanished" in plain.stdout + plain.stderr, plain.stdout
    verify = run_cli("verify", "--ledger", ledger_url, "--job", "torture", "--accept-vanished")
    assert verify.code == 0, verify.stdout + verify.stderr
    # A loss on the target afterwards is caught by a plain verify.
    target.delete_instance(sorted(held)[0])
    again = run_cli("verify", "--ledger", ledger_url, "--job", "torture", "--accept-vanished")
    assert again.code != 0, again.stdout


def _corrupt_but_larger(data: bytes) -> bytes:
    """A copy that ranks before the good one (larger) but that Orthanc refuses: the
    PixelData element claims more bytes than the file holds."""
    at = data.rindex(b"\xe0\x7f\x10\x00")  # (7FE0,0010) PixelData, explicit VR OW
    length = struct.unpack_from("<I", data, at + 8)[0]
    header = data[: at + 8] + struct.pack("<I", length + 100_000)
    return header + data[at + 12 :] + b"\0" * 64


def test_import_of_a_messy_folder_sends_every_dicom_file(
    orthanc_factory: Callable[..., OrthancProcess], tmp_path: Path, ledger_url: str
) -> None:
    target = orthanc_factory("target")
    instances = make_dataset(30, seed=21)
    root = tmp_path / "messy"
    (root / "a" / "b").mkdir(parents=True)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    expected: set[str] = set()
    for i, inst in enumerate(instances[:20]):
        (root / "a" / "b" / f"{i:03d} file.dcm").write_bytes(inst.data)
        expected.add(inst.orthanc_id)
    # Odd names, one of them not valid UTF-8.
    odd = instances[20]
    (root / os.fsdecode(b"odd-\xff-name.dcm")).write_bytes(odd.data)
    (root / "ünïcødé name.dcm").write_bytes(instances[21].data)
    expected |= {odd.orthanc_id, instances[21].orthanc_id}
    # Two copies of one instance: the larger one corrupt, the good one smaller.
    dup = instances[22]
    (root / "dup-good.dcm").write_bytes(dup.data)
    (root / "a" / "dup-corrupt.dcm").write_bytes(_corrupt_but_larger(dup.data))
    expected.add(dup.orthanc_id)
    # A valid instance without pixel data, and a Part-10 file whose preamble starts with {.
    (root / "nopixels.dcm").write_bytes(without_pixel_data(instances[23].data))
    expected.add(instances[23].orthanc_id)
    braced = bytearray(instances[24].data)
    braced[:16] = b'{"not": "json"} '
    (root / "braced.dcm").write_bytes(bytes(braced))
    expected.add(instances[24].orthanc_id)
    # DICOM under a symlinked directory, and a symlink loop.
    for inst in instances[25:28]:
        (elsewhere / f"{inst.sop_uid}.dcm").write_bytes(inst.data)
        expected.add(inst.orthanc_id)
    (root / "linked").symlink_to(elsewhere, target_is_directory=True)
    (root / "a" / "loop").symlink_to(root, target_is_directory=True)
    # Files that are not DICOM.
    (root / "notes.txt").write_text("not dicom\n")
    (root / "summary.json").write_text('{"ID": "x"}\n')

    job = ["--job", "messy", "--ledger", ledger_url, "-c", "4"]
    dry = run_cli("import", str(root), target.url, *job, "--dry-run")
    assert dry.code == 0, dry.stdout + dry.stderr
    result = run_cli("import", str(root), target.url, *job)
    on_target = set(target.instance_ids())
    missing = expected - on_target
    assert not missing, f"{len(missing)} DICOM files never arrived\n{result.stdout}{result.stderr}"
    assert result.code == 0, result.stdout + result.stderr
    verify = run_cli("verify", "--ledger", ledger_url, "--job", "messy")
    assert verify.code == 0, verify.stdout + verify.stderr
