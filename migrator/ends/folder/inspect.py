"""Pre-migration assessment of a folder to import: what is there, sending nothing.

:func:`inspect_path` returns a plain dict (JSON-serialisable) and :func:`render_text`
turns it into the human report of ``migrator inspect``.
"""

from __future__ import annotations

import errno
import os
import re
import shlex
import sqlite3
from collections.abc import Iterable
from typing import Any

from migrator.ends.folder.archives import DAMAGED, EMPTY_ARCHIVE
from migrator.ends.folder.fileclass import (
    HELD_REASONS,
    SKIP_DICOMDIR,
    SKIP_EMPTY,
    SKIP_JSON,
    Candidate,
)
from migrator.ends.folder.storage import (
    FolderInfo,
    detect,
    index_summary,
    iter_index,
    iter_orphans,
    open_index,
    walk_files,
)
from migrator.ends.folder.walk import Listed, iter_tree
from migrator.units import human_bytes

__all__ = ["inspect_path", "render_text"]

EXAMPLES = 5
# The one advice about orphans, the same as the import's reason for them and the README.
ORPHAN_ADVICE = (
    "the import lists them skipped as orphans; `migrator retry --state skipped --error "
    "orphan` sends them"
)
PERMISSION_ADVICE = "permission denied; run as a user who can read it"
# An attachment's place in an Orthanc storage folder: xx/yy/uuid.
_ATTACHMENT = re.compile(
    r"^[0-9a-f]{2}/[0-9a-f]{2}/[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$"
)
TARGET_PLACEHOLDER = "http://TARGET:8042/"
_KIND_TEXT = {
    "orthanc-index": "Orthanc storage area with its index",
    "orthanc-storage-no-index": "Orthanc storage area without index (files only)",
    "dicom-tree": "folder of files (no Orthanc index)",
    "empty": "empty folder",
}


def inspect_path(path: str) -> dict[str, Any]:
    """Assess ``path`` before an import and return the numbers as a dict.

    Always present: ``path``, ``kind`` (see :func:`migrator.ends.folder.storage.detect`)
    and ``advice``
    (the command line to run next). An index adds ``schema_version``, ``instances``, sizes,
    ``compression``, ``attachments``, ``missing_files``/``missing_examples`` and
    ``orphan_files``/``orphan_examples``, ``compressed_files``/``plain_files`` (attachments
    stored with and without compression) and ``other_files``/``other_examples`` (files of
    the storage folder that are no attachment); a bare folder adds per-category file
    counts and ``distinct_instances``. Raises ``FileNotFoundError``/``PermissionError`` for
    a path that is absent or unreadable and ``IndexLocked`` if Orthanc is running on the
    index.
    """
    path = os.path.abspath(path)
    try:
        os.lstat(path)
    except PermissionError:
        # A folder on the way cannot be entered (Debian's /var/lib/orthanc is 0750): the
        # path may well exist, "no such path" would send the user looking elsewhere.
        raise PermissionError(
            errno.EACCES, f"cannot read {path}: {PERMISSION_ADVICE}", path
        ) from None
    except (OSError, ValueError):  # ValueError: a NUL byte in the path
        raise FileNotFoundError(
            errno.ENOENT, f"nothing to import at {path}: no such path", path
        ) from None
    try:
        info = detect(path)
        report: dict[str, Any] = {"path": path, "kind": info.kind}
        if info.kind == "orthanc-index":
            report.update(_inspect_index(info))
        elif info.kind in ("orthanc-storage-no-index", "dicom-tree"):
            report.update(_inspect_tree(info))
    except PermissionError as exc:
        where = exc.filename or path
        raise PermissionError(
            errno.EACCES, f"cannot read {where}: {PERMISSION_ADVICE}", where
        ) from exc
    report["advice"] = _advice(report)
    return report


def _inspect_index(info: FolderInfo) -> dict[str, Any]:
    assert info.index is not None and info.storage is not None
    report: dict[str, Any] = {"index": info.index, "storage": info.storage}
    report.update(index_summary(info.index))
    missing = 0
    missing_examples: list[str] = []
    unsupported = 0
    for _, cand in iter_index(info.index, storage=info.storage):
        if cand.missing:
            missing += 1
            if len(missing_examples) < EXAMPLES:
                missing_examples.append(os.path.relpath(cand.path, info.storage))
        if cand.skip_reason:
            unsupported += 1
    report["missing_files"] = missing
    report["missing_examples"] = missing_examples
    report["unsupported_files"] = unsupported
    orphans = 0
    orphan_examples: list[str] = []
    for rel in iter_orphans(info.index, storage=info.storage):
        orphans += 1
        if len(orphan_examples) < EXAMPLES:
            orphan_examples.append(rel)
    report["orphan_files"] = orphans
    report["orphan_examples"] = orphan_examples
    report.update(_compression_counts(info.index))
    report.update(_other_files(info.storage))
    return report


def _compression_counts(index: str) -> dict[str, int]:
    """Attachments stored compressed and plain: a store where StorageCompression was
    switched on (or off) at some point holds both."""
    conn = open_index(index)
    try:
        rows = conn.execute(
            "SELECT compressionType = 1, COUNT(*) FROM AttachedFiles GROUP BY compressionType = 1"
        ).fetchall()
    finally:
        conn.close()
    counts = dict(rows)
    return {"compressed_files": counts.get(0, 0), "plain_files": counts.get(1, 0)}


def _other_files(storage: str) -> dict[str, Any]:
    """Files of a storage folder outside the xx/yy/uuid layout: no attachment of Orthanc's,
    so neither the index nor the import lists them."""
    count = 0
    examples: list[str] = []
    for rel in walk_files(storage):
        if not _ATTACHMENT.match(rel):
            count += 1
            if len(examples) < EXAMPLES:
                examples.append(rel)
    return {"other_files": count, "other_examples": examples}


_COUNTERS = (
    "files",
    "dicom_files",
    "dicom_bytes",
    "compressed_files",
    "json_summaries",
    "header_only",
    "no_pixel_instances",
    "dicomdir",
    "empty_files",
    "other_files",
    "undecided_files",
    "truncated",
    "archives",
    "archive_members",
    "damaged_archives",
)


def _inspect_tree(info: FolderInfo) -> dict[str, Any]:
    assert info.storage is not None
    counts = dict.fromkeys(_COUNTERS, 0)
    other_examples: list[str] = []
    # Distinct instances are counted in a throwaway on-disk SQLite table rather than a
    # Python set, so millions of files do not have to fit in memory.
    ids = sqlite3.connect("")
    try:
        # Per instance: whether a copy has pixel data, another copy to send, and the
        # held copies without pixel data (files and bytes), settled as the import does.
        ids.execute(
            "CREATE TABLE ids(id TEXT PRIMARY KEY, pixels INTEGER, sent INTEGER,"
            " held INTEGER, held_bytes INTEGER) WITHOUT ROWID"
        )
        batch: list[tuple[str, int, int, int, int]] = []
        archive: tuple[str, int | None] | None = None
        for row in iter_tree(info.storage):
            cand = row.cand
            archive = _count_archive(row, archive, counts)
            _count(cand, counts, other_examples)
            held = cand.skip_reason in HELD_REASONS
            if cand.orthanc_id and (held or cand.skip_reason is None):
                size = cand.size or 0
                batch.append(
                    (cand.orthanc_id, int(bool(cand.has_pixels)), int(not held), held, held * size)
                )
            if len(batch) >= 1000:
                _add_ids(ids, batch)
                batch = []
        _add_ids(ids, batch)
        distinct, header_only, alone, alone_bytes = ids.execute(
            "SELECT COUNT(*), TOTAL(held * pixels), TOTAL(held * (1 - pixels)),"
            " TOTAL(held_bytes * (1 - pixels)) FROM ids"
        ).fetchone()
    finally:
        ids.close()
    # A copy without pixel data is skipped when its instance has a copy with them, and
    # sent (a valid instance without pixels) when it has not.
    counts["header_only"] = int(header_only)
    counts["no_pixel_instances"] = int(alone)
    counts["dicom_files"] += int(alone)
    counts["dicom_bytes"] += int(alone_bytes)
    return {
        **counts,
        "distinct_instances": int(distinct),
        "duplicates": counts["dicom_files"] - int(distinct),
        "other_examples": other_examples,
    }


def _count(cand: Candidate, counts: dict[str, int], examples: list[str]) -> None:
    counts["files"] += 1
    counts["compressed_files"] += cand.compressed
    reason = cand.skip_reason
    if reason is None and cand.undecided is not None:
        # No reader found its identifiers: the import offers it and the target decides.
        counts["undecided_files"] += 1
    elif reason is None:
        counts["dicom_files"] += 1
        counts["dicom_bytes"] += cand.size or 0
        counts["truncated"] += cand.problem is not None
    elif reason == SKIP_JSON:
        counts["json_summaries"] += 1
    elif reason in HELD_REASONS:
        pass  # settled once every file is seen (see _inspect_tree)
    elif reason == SKIP_DICOMDIR:
        counts["dicomdir"] += 1
    elif reason == SKIP_EMPTY:
        counts["empty_files"] += 1
    else:
        counts["other_files"] += 1
        if len(examples) < EXAMPLES:
            examples.append(f"{cand.source_key}: {reason}")


def _count_archive(
    row: Listed, last: tuple[str, int | None] | None, counts: dict[str, int]
) -> tuple[str, int | None] | None:
    """Count the ZIP archives (one inside another too; damaged and empty ones as well)
    and the rows their members make; returns the archive of this row (its walk path, the
    position of the inner archive or None), to tell the next row's from it."""
    reason = row.failure or row.cand.skip_reason or ""
    whole = reason.startswith(DAMAGED) or reason == EMPTY_ARCHIVE  # one row, no members
    if row.member is None:
        counts["archives"] += whole
        counts["damaged_archives"] += reason.startswith(DAMAGED)
        return None
    counts["archive_members"] += 1
    if last is None or last[0] != row.rel:
        counts["archives"] += 1
    inner = row.member[0] if len(row.member) > 1 else None
    if inner is not None and last != (row.rel, inner):
        counts["archives"] += 1
    if whole:  # an archive inside this one that could not be opened, or an empty one
        counts["archives"] += 1
        counts["damaged_archives"] += reason.startswith(DAMAGED)
    return (row.rel, inner)


def _add_ids(conn: sqlite3.Connection, rows: Iterable[tuple[str, int, int, int, int]]) -> None:
    conn.executemany(
        "INSERT INTO ids(id, pixels, sent, held, held_bytes) VALUES (?, ?, ?, ?, ?) "
        "ON CONFLICT(id) DO UPDATE SET pixels = max(pixels, excluded.pixels), "
        "sent = sent + excluded.sent, held = held + excluded.held, "
        "held_bytes = held_bytes + excluded.held_bytes",
        rows,
    )


def _advice(report: dict[str, Any]) -> str:
    if report["kind"] == "empty":
        return f"nothing to import: {report['path']} holds no files"
    if report["kind"] == "dicom-tree" and not report.get("dicom_files"):
        return f"nothing to import: no DICOM file found under {report['path']}"
    return f"migrator import {shlex.quote(report['path'])} {TARGET_PLACEHOLDER}"


# --- text rendering -----------------------------------------------------------------------


def _size(n: float) -> str:
    return human_bytes(n)


def _line(label: str, value: object, note: str = "") -> str:
    text = f"{value:,}" if isinstance(value, int) else str(value)
    return f"  {label + ':':<24}{text}" + (f"  ({note})" if note else "")


def render_text(report: dict[str, Any]) -> str:
    """Render an :func:`inspect_path` report as a few aligned lines for a terminal."""
    kind = report["kind"]
    lines = [f"{report['path']}: {_KIND_TEXT.get(kind, kind)}"]
    if kind == "orthanc-index":
        lines += _render_index(report)
    elif kind in ("orthanc-storage-no-index", "dicom-tree"):
        lines += _render_tree(report)
    lines.append(f"next: {report['advice']}")
    return "\n".join(lines)


def _render_index(r: dict[str, Any]) -> list[str]:
    compressed, plain = r["compressed_files"], r["plain_files"]
    if compressed and plain:
        stored = f"mixed: {compressed:,} files compressed, {plain:,} plain"
    elif compressed:
        stored = f"all {compressed:,} files compressed"
    else:
        stored = f"none ({plain:,} files plain)"
    attachments = ", ".join(f"{k} {v:,}" for k, v in sorted(r["attachments"].items()))
    lines = [
        _line("index schema", r["schema_version"]),
        _line("instances", r["instances"]),
        _line("DICOM size", _size(r["dicom_bytes"]), f"{_size(r['stored_bytes'])} on disk"),
        _line("compression", stored),
        _line("attachments", attachments or "none"),
        _line("missing files", r["missing_files"], ", ".join(r["missing_examples"])),
        _line("orphan files", r["orphan_files"], ", ".join(r["orphan_examples"])),
        _line("other files", r["other_files"], ", ".join(r["other_examples"])),
    ]
    if r.get("unsupported_files"):
        lines.append(_line("unsupported files", r["unsupported_files"], "will be skipped"))
    if r["missing_files"]:
        lines.append("  missing files cannot be migrated and will be reported as such")
    if r["orphan_files"]:
        lines.append(f"  orphan files are not in the index: {ORPHAN_ADVICE}")
    if r["other_files"]:
        lines.append("  other files are not Orthanc attachments: the import leaves them out")
    return lines


def _render_tree(r: dict[str, Any]) -> list[str]:
    dup = f"{r['distinct_instances']:,} distinct instances, {r['duplicates']:,} duplicates"
    alone = r["no_pixel_instances"]
    plain = r["files"] - r["compressed_files"]
    # "Header-only" is what such copies are in an Orthanc storage folder; elsewhere they
    # are plain copies that happen to lack their pixels.
    storage = r["kind"] == "orthanc-storage-no-index"
    copies = "header-only copies" if storage else "copies without pixels"
    lines = [
        _line("files", r["files"]),
        _line("DICOM to send", r["dicom_files"], f"{dup}, {_size(r['dicom_bytes'])}"),
        _line("Orthanc-compressed", r["compressed_files"], f"{plain:,} not compressed"),
        _line("JSON summaries", r["json_summaries"], "skipped"),
        _line(copies, r["header_only"], "skipped: a copy with pixel data is sent"),
        _line("instances w/o pixels", alone, "sent: no copy with pixel data"),
        _line("DICOMDIR", r["dicomdir"], "skipped"),
        _line("empty files", r["empty_files"], "skipped"),
        _line("other files", r["other_files"], "skipped"),
    ]
    if r.get("archives"):
        note = f"{r['archive_members']:,} members, each a file of its own"
        if r["damaged_archives"]:
            note += f"; {r['damaged_archives']:,} damaged: rejected"
        lines.insert(1, _line("ZIP archives", r["archives"], note))
    if r["truncated"]:
        lines.append(_line("truncated DICOM", r["truncated"], "sent; the target decides"))
    if r.get("undecided_files"):
        note = "not identified as DICOM: offered, the target decides"
        lines.append(_line("unidentified files", r["undecided_files"], note))
    lines += [f"    {example}" for example in r["other_examples"]]
    return lines
