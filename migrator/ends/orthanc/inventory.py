"""What an Orthanc holds, instance by instance, without reading a file or an instance.

Two requests give the whole inventory: ``GET /series?expand`` names every series with
the IDs of its instances and its study, and ``GET /studies?expand`` names every study
with its StudyInstanceUID, StudyDate, AccessionNumber and patient. Both are read at once
(each is one snapshot of the server's index). An instance is known by its Orthanc ID,
which hashes its PatientID and its study, series and SOP instance UIDs, so that two
servers name one instance alike; a study by its StudyInstanceUID.

A series whose study the study list does not hold (stored between the two reads) has
its study asked for on its own; a study deleted meanwhile leaves its instances without
study UID.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from typing import Any

from migrator.config import RetryPolicy
from migrator.ends.orthanc.client import OrthancClient
from migrator.ends.orthanc.uids import BULK
from migrator.ends.retrying import with_retries
from migrator.errors import Kind, TransferError, Verdict
from migrator.selection import Selection, StudyFields

__all__ = ["Inventory", "Study", "describe_instances", "read_inventory"]


@dataclass
class Study:
    """One study of an inventory: its UID, date, and the Orthanc IDs of its instances."""

    uid: str | None
    date: str | None
    instances: list[str] = field(default_factory=list)


@dataclass
class Inventory:
    """Every instance of one server (of the selected studies): Orthanc ID -> study UID,
    and the studies by UID."""

    instances: dict[str, str | None]
    studies: dict[str | None, Study]


async def read_inventory(
    client: OrthancClient, retry: RetryPolicy, selection: Selection | None = None
) -> Inventory:
    """The inventory of one Orthanc, limited to the studies `selection` takes."""
    studies, series = await asyncio.gather(
        _listing(client, retry, "studies"), _listing(client, retry, "series")
    )
    by_id = {s["ID"]: s for s in studies if isinstance(s.get("ID"), str)}
    orphans = sorted({s.get("ParentStudy") for s in series} - by_id.keys() - {None})
    for study_id in orphans:
        found = await with_retries(
            lambda i=study_id: client.resource("studies", i), retry, "GET /studies/{id}"
        )
        if found is not None:
            by_id[study_id] = found
    modalities: dict[str, set[str]] = {}
    for s in series:
        modality = (s.get("MainDicomTags") or {}).get("Modality")
        if modality:
            modalities.setdefault(s.get("ParentStudy"), set()).add(str(modality))
    taken: dict[str, Study] = {}
    for study_id, study in by_id.items():
        tags = study.get("MainDicomTags") or {}
        fields = StudyFields(
            study_uid=tags.get("StudyInstanceUID"),
            study_date=tags.get("StudyDate"),
            modalities=tuple(sorted(modalities.get(study_id, ()))),
            accession=tags.get("AccessionNumber"),
            patient_id=(study.get("PatientMainDicomTags") or {}).get("PatientID"),
        )
        if selection is None or selection.matches(fields):
            taken[study_id] = Study(fields.study_uid, fields.study_date)
    unknown = None if selection is not None and not selection.empty else Study(None, None)
    inventory = Inventory({}, {})
    for s in series:
        study = taken.get(s.get("ParentStudy"), unknown)
        if study is None:
            continue
        ids = [i for i in s.get("Instances") or () if isinstance(i, str)]
        study.instances.extend(ids)
        for orthanc_id in ids:
            inventory.instances[orthanc_id] = study.uid
    for study in (*taken.values(), unknown):
        if study is not None and study.instances:
            # Two Orthanc studies with one UID (two PatientIDs) count as one study.
            held = inventory.studies.setdefault(study.uid, Study(study.uid, study.date))
            held.instances.extend(study.instances)
    return inventory


async def _listing(client: OrthancClient, retry: RetryPolicy, level: str) -> list[dict[str, Any]]:
    """``GET /{level}?expand``: every resource of one level, described, in one answer."""
    body = await with_retries(
        lambda: client.get_json(level, {"expand": ""}, client.listing_headers),
        retry,
        f"GET /{level}?expand",
    )
    if not isinstance(body, list) or not all(isinstance(item, dict) for item in body):
        raise TransferError(Verdict(Kind.FATAL, f"{client.role}: /{level}?expand is not a list"))
    return body


async def describe_instances(
    client: OrthancClient, retry: RetryPolicy, ids: list[str]
) -> dict[str, str | None]:
    """The SOPInstanceUID of each of a few instances (bulk requests of `BULK`, Orthanc
    1.9.4+; {} on older servers, which would take a request per instance)."""
    found: dict[str, str | None] = {}
    for at in range(0, len(ids), BULK):
        chunk = ids[at : at + BULK]
        answer = await with_retries(
            lambda c=chunk: client.bulk_content(c), retry, "POST /tools/bulk-content"
        )
        if answer is None:
            return {}
        for item in answer:
            if isinstance(item.get("ID"), str):
                found[item["ID"]] = (item.get("MainDicomTags") or {}).get("SOPInstanceUID")
    return found
