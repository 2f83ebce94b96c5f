"""Micro benchmark: listing a 100,000-instance Orthanc index with ``iter_index``.

Builds a synthetic index with the schema Orthanc 1.10.1 creates (schema 6, copied from
``sqlite3 index .schema``), filled the way Orthanc fills it (instance, then its new
series/study/patient, one MainDicomTags row per identifier), then times the listing.

    .venv/bin/python bench/index_listing.py [--instances 100000] [--keep DIR]
"""

from __future__ import annotations

import argparse
import hashlib
import os
import sqlite3
import tempfile
import time
import uuid

from migrator.ends.folder.storage import iter_index

# The tables and triggers of an index written by Orthanc 1.10.1 (schema 6), verbatim.
SCHEMA = """
CREATE TABLE GlobalProperties(
       property INTEGER PRIMARY KEY,
       value TEXT
       );
CREATE TABLE Resources(
       internalId INTEGER PRIMARY KEY AUTOINCREMENT,
       resourceType INTEGER,
       publicId TEXT,
       parentId INTEGER REFERENCES Resources(internalId) ON DELETE CASCADE
       );
CREATE TABLE MainDicomTags(
       id INTEGER REFERENCES Resources(internalId) ON DELETE CASCADE,
       tagGroup INTEGER,
       tagElement INTEGER,
       value TEXT,
       PRIMARY KEY(id, tagGroup, tagElement)
       );
CREATE TABLE DicomIdentifiers(
       id INTEGER REFERENCES Resources(internalId) ON DELETE CASCADE,
       tagGroup INTEGER,
       tagElement INTEGER,
       value TEXT,
       PRIMARY KEY(id, tagGroup, tagElement)
       );
CREATE TABLE Metadata(
       id INTEGER REFERENCES Resources(internalId) ON DELETE CASCADE,
       type INTEGER,
       value TEXT,
       PRIMARY KEY(id, type)
       );
CREATE TABLE AttachedFiles(
       id INTEGER REFERENCES Resources(internalId) ON DELETE CASCADE,
       fileType INTEGER,
       uuid TEXT,
       compressedSize INTEGER,
       uncompressedSize INTEGER,
       compressionType INTEGER,
       uncompressedMD5 TEXT,  -- New in Orthanc 0.7.3 (database v4)
       compressedMD5 TEXT,    -- New in Orthanc 0.7.3 (database v4)
       PRIMARY KEY(id, fileType)
       );
CREATE TABLE Changes(
       seq INTEGER PRIMARY KEY AUTOINCREMENT,
       changeType INTEGER,
       internalId INTEGER REFERENCES Resources(internalId) ON DELETE CASCADE,
       resourceType INTEGER,
       date TEXT
       );
CREATE TABLE ExportedResources(
       seq INTEGER PRIMARY KEY AUTOINCREMENT,
       resourceType INTEGER,
       publicId TEXT,
       remoteModality TEXT,
       patientId TEXT,
       studyInstanceUid TEXT,
       seriesInstanceUid TEXT,
       sopInstanceUid TEXT,
       date TEXT
       );
CREATE TABLE PatientRecyclingOrder(
       seq INTEGER PRIMARY KEY AUTOINCREMENT,
       patientId INTEGER REFERENCES Resources(internalId) ON DELETE CASCADE
       );
CREATE INDEX ChildrenIndex ON Resources(parentId);
CREATE INDEX PublicIndex ON Resources(publicId);
CREATE INDEX ResourceTypeIndex ON Resources(resourceType);
CREATE INDEX PatientRecyclingIndex ON PatientRecyclingOrder(patientId);
CREATE INDEX MainDicomTagsIndex1 ON MainDicomTags(id);
CREATE INDEX DicomIdentifiersIndex1 ON DicomIdentifiers(id);
CREATE INDEX DicomIdentifiersIndex2 ON DicomIdentifiers(tagGroup, tagElement);
CREATE INDEX DicomIdentifiersIndexValues ON DicomIdentifiers(value COLLATE BINARY);
CREATE INDEX ChangesIndex ON Changes(internalId);
CREATE TRIGGER AttachedFileDeleted
AFTER DELETE ON AttachedFiles
BEGIN
  SELECT SignalFileDeleted(old.uuid, old.fileType, old.uncompressedSize,
                           old.compressionType, old.compressedSize,
                           -- These 2 arguments are new in Orthanc 0.7.3 (database v4)
                           old.uncompressedMD5, old.compressedMD5);
END;
CREATE TRIGGER ResourceDeleted
AFTER DELETE ON Resources
BEGIN
  SELECT SignalResourceDeleted(old.publicId, old.resourceType);  -- New in Orthanc 0.8.5 (db v5)
  SELECT SignalRemainingAncestor(parent.publicId, parent.resourceType)
    FROM Resources AS parent WHERE internalId = old.parentId;
END;
CREATE TRIGGER ResourceDeletedParentCleaning
AFTER DELETE ON Resources
FOR EACH ROW WHEN (SELECT COUNT(*) FROM Resources WHERE parentId = old.parentId) = 0
BEGIN
  DELETE FROM Resources WHERE internalId = old.parentId;
END;
CREATE TRIGGER PatientAdded
AFTER INSERT ON Resources
FOR EACH ROW WHEN new.resourceType = 1  -- "1" corresponds to "ResourceType_Patient" in C++
BEGIN
  INSERT INTO PatientRecyclingOrder VALUES (NULL, new.internalId);
END;
CREATE TABLE GlobalIntegers(
       key INTEGER PRIMARY KEY,
       value INTEGER);
CREATE TRIGGER AttachedFileIncrementSize
AFTER INSERT ON AttachedFiles
BEGIN
  UPDATE GlobalIntegers SET value = value + new.compressedSize WHERE key = 0;
  UPDATE GlobalIntegers SET value = value + new.uncompressedSize WHERE key = 1;
END;
CREATE TRIGGER AttachedFileDecrementSize
AFTER DELETE ON AttachedFiles
BEGIN
  UPDATE GlobalIntegers SET value = value - old.compressedSize WHERE key = 0;
  UPDATE GlobalIntegers SET value = value - old.uncompressedSize WHERE key = 1;
END;
"""

PER_SERIES, SERIES_PER_STUDY, STUDIES_PER_PATIENT = 10, 5, 2


def _public_id(text: str) -> str:
    digest = hashlib.sha1(text.encode()).hexdigest()
    return "-".join(digest[i : i + 8] for i in range(0, 40, 8))


def build_index(path: str, instances: int) -> None:
    """Write a schema-6 index of ``instances`` instances (files themselves not created)."""
    db = sqlite3.connect(path)
    db.executescript(SCHEMA)
    db.executemany("INSERT INTO GlobalProperties VALUES (?, ?)", [(1, "6"), (6, "1")])
    db.executemany("INSERT INTO GlobalIntegers VALUES (?, 0)", [(0,), (1,)])
    resources: list[tuple[int, int, str, int | None]] = []
    tags: list[tuple[int, int, int, str]] = []
    files: list[tuple[int, int, str, int, int, int, str, str]] = []
    next_id = 1
    series_id = study_id = patient_id = 0
    for i in range(instances):
        series_no, _ = divmod(i, PER_SERIES)
        study_no, _ = divmod(series_no, SERIES_PER_STUDY)
        study_uid = f"1.2.826.0.1.3680043.8.498.1.{study_no}"
        series_uid = f"{study_uid}.{series_no}"
        sop_uid = f"{series_uid}.{i}"
        instance_id = next_id
        next_id += 1
        if i % PER_SERIES == 0:
            # Orthanc creates the instance row first, then any new ancestors after it.
            series_id, next_id = next_id, next_id + 1
            if series_no % SERIES_PER_STUDY == 0:
                study_id, next_id = next_id, next_id + 1
                if study_no % STUDIES_PER_PATIENT == 0:
                    patient_id, next_id = next_id, next_id + 1
                    resources.append((patient_id, 1, _public_id(f"P{study_no}"), None))
                resources.append((study_id, 2, _public_id(study_uid), patient_id))
                tags.append((study_id, 0x20, 0x0D, study_uid))
            resources.append((series_id, 3, _public_id(series_uid), study_id))
            tags.append((series_id, 0x20, 0x0E, series_uid))
        resources.append((instance_id, 4, _public_id(sop_uid), series_id))
        tags.append((instance_id, 0x08, 0x18, sop_uid))
        md5 = hashlib.md5(sop_uid.encode()).hexdigest()
        files.append((instance_id, 1, str(uuid.uuid4()), 131_000, 131_000, 1, md5, md5))
    db.executemany("INSERT INTO Resources VALUES (?, ?, ?, ?)", resources)
    db.executemany("INSERT INTO MainDicomTags VALUES (?, ?, ?, ?)", tags)
    db.executemany("INSERT INTO AttachedFiles VALUES (?, ?, ?, ?, ?, ?, ?, ?)", files)
    db.commit()
    db.close()


def main() -> None:
    """Build the index, then time full listings with and without the file-existence check."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--instances", type=int, default=100_000)
    parser.add_argument("--keep", help="build the index in this folder and keep it")
    args = parser.parse_args()
    folder = args.keep or tempfile.mkdtemp(prefix="bench-index-")
    os.makedirs(folder, exist_ok=True)
    index = os.path.join(folder, "index")
    if os.path.exists(index):
        os.unlink(index)
    started = time.perf_counter()
    build_index(index, args.instances)
    print(f"built {args.instances:,} instances in {time.perf_counter() - started:.1f} s")
    for check_files in (False, True):
        started = time.perf_counter()
        count = 0
        missing_uid = 0
        for _, cand in iter_index(folder, check_files=check_files):
            count += 1
            missing_uid += cand.study_uid is None or cand.series_uid is None
        elapsed = time.perf_counter() - started
        assert count == args.instances and missing_uid == 0, (count, missing_uid)
        print(
            f"iter_index check_files={check_files}: {count:,} rows in {elapsed:.2f} s "
            f"({count / elapsed:,.0f} rows/s)"
        )
    if not args.keep:
        os.unlink(index)
        os.rmdir(folder)


if __name__ == "__main__":
    main()
