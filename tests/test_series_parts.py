"""`dicomweb.spilled.SeriesParts`: a WADO-RS series answer split as it arrives, in pieces
of any size, its parts in memory within a budget and in spool files past it; the same
parts as `multipart.split_related` reads from the whole body."""

from __future__ import annotations

import random
from pathlib import Path

import pytest

from migrator.ends.dicomweb.multipart import Truncated, split_related
from migrator.ends.dicomweb.spilled import NoRoom, SeriesParts
from migrator.ends.spool import Spooled, SpoolFolder

BOUNDARY = "b0und4ry"


def _answer(datas: list[bytes], lengths: bool) -> bytes:
    """A multipart/related answer of `datas`, with or without each part's length."""
    parts = [
        b"--" + BOUNDARY.encode() + b"\r\nContent-Type: application/dicom\r\n"
        + (b"Content-Length: %d\r\n" % len(data) if lengths else b"")
        + b"\r\n" + data + b"\r\n"
        for data in datas
    ]  # fmt: skip
    return b"preamble\r\n" + b"".join(parts) + b"--" + BOUNDARY.encode() + b"--\r\n"


def _feed(parts: SeriesParts, body: bytes, rng: random.Random) -> None:
    at = 0
    while at < len(body):
        size = rng.randint(1, 9000)
        parts.feed(body[at : at + size])
        at += size


def _bytes(part: bytes | Spooled) -> bytes:
    return part if isinstance(part, bytes) else Path(part.path).read_bytes()


@pytest.mark.parametrize("seed", range(40))
def test_parts_as_split_whole_in_memory_or_on_disk(seed: int, tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setattr("tempfile.tempdir", str(tmp_path))
    rng = random.Random(seed)
    sizes = [rng.choice([0, 1, 5, 100, 3000, 70000]) for _ in range(rng.randint(1, 5))]
    datas = [rng.randbytes(size) for size in sizes]
    body = _answer(datas, lengths=seed % 2 == 0)
    most = rng.choice([0, 10, 5000, 10**9])
    spool = SpoolFolder()
    parts = SeriesParts(BOUNDARY, most, spool)
    _feed(parts, body, rng)
    found = parts.finish()
    assert [_bytes(p) for p in found] == datas == split_related(body, BOUNDARY)
    held = sum(len(p) for p in found if isinstance(p, bytes))
    assert held <= most
    assert any(isinstance(p, Spooled) for p in found) == (sum(map(len, datas)) > most)
    spool.close()
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("seed", range(10))
def test_an_answer_cut_short_is_truncated_and_leaves_nothing(
    seed: int, tmp_path: Path, monkeypatch
) -> None:
    monkeypatch.setattr("tempfile.tempdir", str(tmp_path))
    rng = random.Random(seed)
    body = _answer([rng.randbytes(20000) for _ in range(3)], lengths=seed % 2 == 0)
    spool = SpoolFolder()
    parts = SeriesParts(BOUNDARY, 100, spool)
    # Anywhere before the closing delimiter's last "--".
    _feed(parts, body[: rng.randint(0, len(body) - 3)], rng)
    with pytest.raises(Truncated):
        parts.finish()
    parts.abandon()
    assert all(not list(folder.iterdir()) for folder in tmp_path.iterdir())


def test_past_the_budget_without_a_spool_folder_is_no_room() -> None:
    parts = SeriesParts(BOUNDARY, 100, None)
    with pytest.raises(NoRoom):
        parts.feed(_answer([b"x" * 50, b"y" * 80], lengths=False))


def test_a_part_announcing_more_than_it_has_is_truncated() -> None:
    body = _answer([b"abc"], lengths=True).replace(b"Content-Length: 3", b"Content-Length: 2")
    parts = SeriesParts(BOUNDARY, 100, None)
    with pytest.raises(Truncated):
        parts.feed(body)
