"""`migrator inspect postgresql://...` / `mysql://...`: a stopped Orthanc's index database
assessed before an import, sending nothing.

:func:`inspect_database` returns a plain dict (JSON-serialisable); :func:`render_text`
the lines ``migrator inspect`` prints.
"""

from __future__ import annotations

import os
import shlex
from typing import Any

from migrator.config import Settings
from migrator.ends.database.index import IndexDatabase, parse_db_url, storage_file
from migrator.ends.database.source import HELD_ADVICE
from migrator.units import human_bytes

__all__ = ["inspect_database", "render_text"]

EXAMPLES = 5
TARGET_PLACEHOLDER = "http://TARGET:8042/"


def inspect_database(url: str, settings: Settings, storage: str | None = None) -> dict[str, Any]:
    """Assess the Orthanc index database at `url` (its attachments in its storage area,
    or under `storage` when given): schema, counts, sizes, where the attachments are,
    which are missing, whether an Orthanc holds it, and the command to run next."""
    where = parse_db_url(url, settings)
    db = IndexDatabase(where, connections=1)
    try:
        version, revision = db.schema()
        report: dict[str, Any] = {
            "kind": "orthanc-database",
            "url": where.display,
            "dialect": where.dialect,
            "schema_version": version,
            "schema_revision": revision,
            "held_by": db.holder(),
            **db.summary(),
        }
        area = db.has_storage_area()
        if storage is not None:
            folder = os.path.abspath(storage)
            report["attachments_in"] = folder
            report["missing"], report["missing_examples"] = _missing_files(db, folder)
        elif area:
            report["attachments_in"] = "database"
            report["missing"], report["missing_examples"] = db.missing_in_area(EXAMPLES)
        else:
            report["attachments_in"] = None
            report["missing"], report["missing_examples"] = 0, []
    finally:
        db.close()
    report["advice"] = _advice(report, storage)
    return report


def _missing_files(db: IndexDatabase, folder: str) -> tuple[int, list[str]]:
    """DICOM attachments of the index whose file is not under `folder`."""
    count, examples = 0, []
    for a in db.iter_attachments():
        if not os.path.exists(storage_file(folder, a.uuid)):
            count += 1
            if len(examples) < EXAMPLES:
                examples.append(a.public_id)
    return count, examples


def _advice(r: dict[str, Any], storage: str | None) -> str:
    if r["attachments_in"] is None:
        return (
            "the attachments are not in the database (Orthanc kept its files on disk): "
            f"migrator inspect {shlex.quote(r['url'])} --storage DIR (the old StorageDirectory)"
        )
    if r["dicom_files"] and r["missing"] == r["dicom_files"]:
        return "no attachment is where it is looked for: check --storage (or its absence)"
    command = f"migrator import {shlex.quote(r['url'])} {TARGET_PLACEHOLDER}"
    if storage is not None:
        command += f" --storage {shlex.quote(r['attachments_in'])}"
    if r["held_by"]:
        return f"{r['held_by']}: {HELD_ADVICE}; then {command}"
    return command


def render_text(r: dict[str, Any]) -> str:
    """An :func:`inspect_database` report as a few aligned lines for a terminal."""
    compressed, files = r["compressed_files"], r["dicom_files"]
    stored = human_bytes(r["dicom_stored_bytes"])
    where = r["attachments_in"]
    place = {"database": "in the database (storage area)", None: "not in the database"}
    attachments = ", ".join(f"{k} {v:,}" for k, v in sorted(r["attachments"].items()))
    lines = [
        f"{r['url']}: Orthanc index database ({r['dialect']})",
        _line("index schema", f"{r['schema_version']} revision {r['schema_revision']}"),
        _line("instances", f"{r['instances']:,}"),
        _line("DICOM size", human_bytes(r["dicom_bytes"]), f"{stored} stored"),
        _line("compressed", f"{compressed:,} of {files:,} DICOM files"),
        _line("attachments", attachments or "none"),
        _line("stored", place.get(where, f"on disk under {where}")),
        _line("missing", f"{r['missing']:,}", ", ".join(r["missing_examples"])),
    ]
    if r["missing"]:
        lines.append("  missing attachments cannot be migrated: the import ends them vanished")
    if r["held_by"]:
        lines.append(f"  in use: {r['held_by']}")
    lines.append(f"next: {r['advice']}")
    return "\n".join(lines)


def _line(label: str, value: Any, detail: str = "") -> str:
    text = f"  {label:<14} {value}"
    return f"{text}  ({detail})" if detail else text
