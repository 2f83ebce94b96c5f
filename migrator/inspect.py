"""Pre-migration assessment of a folder to import: what is there, sending nothing.

:func:`inspect_path` returns a plain dict (JSON-serialisable) and :func:`render_text`
turns it into the human report of ``migrator inspect``.
"""

from __future__ import annotations

import errno
import os
import shlex
import sqlite3
from collections.abc import Iterable
from typing import Any

from migrator.fileclass import SKIP_DICOMDIR, SKIP_EMPTY, SKIP_HEADER_ONLY, SKIP_JSON, Candidate
from migrator.folder import FolderInfo, detect, index_summary, iter_folder, iter_index, iter_orphans
from migrator.units import human_bytes

__all__ = ["inspect_path", "render_text"]

EXAMPLES = 5
TARGET_PLACEHOLDER = "http://TARGET:8042/"
_KIND_TEXT = {
    "orthanc-index": "Orthanc storage area with its index",
    "orthanc-storage-no-index": "Orthanc storage area without index (files only)",
    "dicom-tree": "folder of files (no Orthanc index)",
    "empty": "empty folder",
}


def inspect_path(path: str) -> dict[str, Any]:
    """Assess ``path`` before an import and return the numbers as a dict.

    Always present: ``path``, ``kind`` (see :func:`migrator.folder.detect`) and ``advice``
    (the command line to run next). An index adds ``schema_version``, ``instances``, sizes,
    ``compression``, ``attachments``, ``missing_files``/``missing_examples`` and
    ``orphan_files``/``orphan_examples``; a bare folder adds per-category file counts and
    ``distinct_instances``. Raises ``FileNotFoundError``/``PermissionError`` for a path
    that is absent or unreadable and ``IndexLocked`` if Orthanc is running on the index.
    """
    path = os.path.abspath(path)
    if not os.path.lexists(path):
        raise FileNotFoundError(errno.ENOENT, f"nothing to import at {path}: no such path", path)
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
            errno.EACCES,
            f"cannot read {where}: permission denied (run as a user who can read the source)",
            where,
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
    return report


_COUNTERS = (
    "files",
    "dicom_files",
    "dicom_bytes",
    "compressed_files",
    "json_summaries",
    "header_only",
    "dicomdir",
    "empty_files",
    "other_files",
    "truncated",
)


def _inspect_tree(info: FolderInfo) -> dict[str, Any]:
    assert info.storage is not None
    counts = dict.fromkeys(_COUNTERS, 0)
    other_examples: list[str] = []
    # Distinct instances are counted in a throwaway on-disk SQLite table rather than a
    # Python set, so millions of files do not have to fit in memory.
    ids = sqlite3.connect("")
    try:
        ids.execute("CREATE TABLE ids(id TEXT PRIMARY KEY, full INTEGER) WITHOUT ROWID")
        batch: list[tuple[str, int]] = []
        for cand in iter_folder(info.storage):
            _count(cand, counts, other_examples)
            if cand.orthanc_id and cand.skip_reason in (None, SKIP_HEADER_ONLY):
                batch.append((cand.orthanc_id, int(cand.skip_reason is None)))
            if len(batch) >= 1000:
                _add_ids(ids, batch)
                batch = []
        _add_ids(ids, batch)
        distinct, header_only_alone = ids.execute(
            "SELECT TOTAL(full), COUNT(*) - TOTAL(full) FROM ids"
        ).fetchone()
    finally:
        ids.close()
    return {
        **counts,
        "distinct_instances": int(distinct),
        "duplicates": counts["dicom_files"] - int(distinct),
        "header_only_without_full_copy": int(header_only_alone),
        "other_examples": other_examples,
    }


def _count(cand: Candidate, counts: dict[str, int], examples: list[str]) -> None:
    counts["files"] += 1
    counts["compressed_files"] += cand.compressed
    reason = cand.skip_reason
    if reason is None:
        counts["dicom_files"] += 1
        counts["dicom_bytes"] += cand.size or 0
        counts["truncated"] += cand.problem is not None
    elif reason == SKIP_JSON:
        counts["json_summaries"] += 1
    elif reason == SKIP_HEADER_ONLY:
        counts["header_only"] += 1
    elif reason == SKIP_DICOMDIR:
        counts["dicomdir"] += 1
    elif reason == SKIP_EMPTY:
        counts["empty_files"] += 1
    else:
        counts["other_files"] += 1
        if len(examples) < EXAMPLES:
            examples.append(f"{cand.source_key}: {reason}")


def _add_ids(conn: sqlite3.Connection, rows: Iterable[tuple[str, int]]) -> None:
    conn.executemany(
        "INSERT INTO ids(id, full) VALUES (?, ?) "
        "ON CONFLICT(id) DO UPDATE SET full = max(full, excluded.full)",
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
    stored = "stored compressed" if r["compression"] else "stored uncompressed"
    attachments = ", ".join(f"{k} {v:,}" for k, v in sorted(r["attachments"].items()))
    lines = [
        _line("index schema", r["schema_version"]),
        _line("instances", r["instances"]),
        _line("DICOM size", _size(r["dicom_bytes"]), f"{_size(r['stored_bytes'])} on disk"),
        _line("compression", stored),
        _line("attachments", attachments or "none"),
        _line("missing files", r["missing_files"], ", ".join(r["missing_examples"])),
        _line("orphan files", r["orphan_files"], ", ".join(r["orphan_examples"])),
    ]
    if r.get("unsupported_files"):
        lines.append(_line("unsupported files", r["unsupported_files"], "will be skipped"))
    if r["missing_files"]:
        lines.append("  missing files cannot be migrated and will be reported as such")
    if r["orphan_files"]:
        lines.append(
            "  orphan files are not in the index; import the folder without its index "
            "to include them"
        )
    return lines


def _render_tree(r: dict[str, Any]) -> list[str]:
    dup = f"{r['distinct_instances']:,} distinct instances, {r['duplicates']:,} duplicates"
    alone = r["header_only_without_full_copy"]
    lines = [
        _line("files", r["files"]),
        _line("DICOM to send", r["dicom_files"], f"{dup}, {_size(r['dicom_bytes'])}"),
        _line("Orthanc-compressed", r["compressed_files"]),
        _line("JSON summaries", r["json_summaries"], "skipped"),
        _line("header-only copies", r["header_only"], f"skipped; {alone:,} without full copy"),
        _line("DICOMDIR", r["dicomdir"], "skipped"),
        _line("empty files", r["empty_files"], "skipped"),
        _line("other files", r["other_files"], "skipped"),
    ]
    if r["truncated"]:
        lines.append(_line("truncated DICOM", r["truncated"], "sent; the target decides"))
    lines += [f"    {example}" for example in r["other_examples"]]
    return lines
