"""`migrator diff`: what the source holds that the target lacks, and the other way round.

Both inventories (`migrator.ends.orthanc.inventory`) are read at once, two requests per
server and no file read, then compared by Orthanc ID (which hashes the PatientID and the
study, series and SOP instance UIDs) and counted per StudyInstanceUID. Only the few
instances listed in the answer (``max_list``) are described further (their
SOPInstanceUID, in bulk requests).
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass
from typing import Any

from migrator.config import RetryPolicy, Settings
from migrator.ends.base import Source
from migrator.ends.orthanc.client import OrthancClient
from migrator.ends.orthanc.inventory import Inventory, describe_instances, read_inventory
from migrator.errors import FatalError, Kind, TransferError
from migrator.selection import Selection

__all__ = [
    "Diff",
    "StudyDiff",
    "compare",
    "diff_servers",
    "missing_ids",
    "open_delta_source",
]


@dataclass(frozen=True)
class StudyDiff:
    """The counts of one study that differs between the two servers."""

    uid: str | None
    date: str | None
    source: int
    target: int
    missing: int
    extra: int

    def as_json(self) -> dict[str, Any]:
        """The study as it appears in ``diff --json``."""
        return {
            "study_uid": self.uid,
            "study_date": self.date,
            "source_instances": self.source,
            "target_instances": self.target,
            "missing": self.missing,
            "extra": self.extra,
        }


@dataclass
class Diff:
    """The comparison of two inventories."""

    source: str
    target: str
    source_studies: int
    source_instances: int
    target_studies: int
    target_instances: int
    # Orthanc ID -> study UID, in the order of `studies` (newest study first).
    missing: dict[str, str | None]
    extra: dict[str, str | None]
    # The studies that differ, newest StudyDate first.
    studies: list[StudyDiff]
    seconds: float = 0.0
    # SOPInstanceUIDs of the instances listed (those within `max_list`).
    sop_uids: dict[str, str | None] | None = None

    @property
    def exit_code(self) -> int:
        """0 when the target holds every instance of the source, else 1."""
        return 1 if self.missing else 0

    def as_json(self, max_list: int) -> dict[str, Any]:
        """The ``diff --json`` document; each list holds at most `max_list` entries."""
        sops = self.sop_uids or {}

        def rows(ids: dict[str, str | None]) -> list[dict[str, Any]]:
            return [
                {"orthanc_id": i, "study_uid": study, "sop_uid": sops.get(i)}
                for i, study in list(ids.items())[:max_list]
            ]

        missing_studies = [s.as_json() for s in self.studies if s.missing]
        extra_studies = [s.as_json() for s in self.studies if s.extra]
        return {
            "source": {
                "url": self.source,
                "studies": self.source_studies,
                "instances": self.source_instances,
            },
            "target": {
                "url": self.target,
                "studies": self.target_studies,
                "instances": self.target_instances,
            },
            "missing": len(self.missing),
            "extra": len(self.extra),
            "studies_differing": len(self.studies),
            "missing_studies": missing_studies[:max_list],
            "extra_studies": extra_studies[:max_list],
            "missing_instances": rows(self.missing),
            "extra_instances": rows(self.extra),
            "truncated": max(len(self.missing), len(self.extra), len(self.studies)) > max_list,
            "seconds": round(self.seconds, 3),
        }

    def render_text(self, max_list: int) -> str:
        """The human text of `diff`: totals, the studies that differ, the missing ones."""
        lines = [
            f"source {self.source}: {self.source_studies} studies, "
            f"{self.source_instances} instances",
            f"target {self.target}: {self.target_studies} studies, "
            f"{self.target_instances} instances",
        ]
        short = sum(1 for s in self.studies if s.missing)
        over = sum(1 for s in self.studies if s.extra)
        lines.append(f"missing on the target: {_count(len(self.missing), short)}")
        lines.append(f"on the target only: {_count(len(self.extra), over)}")
        if self.studies:
            lines.append("studies that differ (instances on source / target):")
            for s in self.studies[:max_list]:
                notes = [
                    f"{s.missing} missing" * bool(s.missing),
                    f"{s.extra} extra" * bool(s.extra),
                ]
                detail = ", ".join(n for n in notes if n)
                lines.append(
                    f"  {s.uid or '(unknown study)'} ({s.date or 'no date'}): "
                    f"{s.source} / {s.target}, {detail}"
                )
            if len(self.studies) > max_list:
                lines.append(f"  ... and {len(self.studies) - max_list} more (--max-list)")
        if self.missing:
            lines.append("missing instances (Orthanc ID, study):")
            for orthanc_id, study in list(self.missing.items())[:max_list]:
                lines.append(f"  {orthanc_id}  {study or '(unknown study)'}")
            if len(self.missing) > max_list:
                lines.append(f"  ... and {len(self.missing) - max_list} more (--max-list)")
            lines.append(
                "the target lacks some of the source's instances: "
                "`migrator replicate --only-missing` sends just those"
            )
        else:
            lines.append("the target holds every instance of the source")
        return "\n".join(lines)


def _count(instances: int, studies: int) -> str:
    """``3 instances in 1 study``."""
    return (
        f"{instances} instance{'s' * (instances != 1)} in {studies} "
        f"stud{'ies' if studies != 1 else 'y'}"
    )


def compare(source: Inventory, target: Inventory, source_name: str, target_name: str) -> Diff:
    """The difference between two inventories."""
    missing_by_study: dict[str | None, list[str]] = {}
    for orthanc_id, study in source.instances.items():
        if orthanc_id not in target.instances:
            missing_by_study.setdefault(study, []).append(orthanc_id)
    extra_by_study: dict[str | None, list[str]] = {}
    for orthanc_id, study in target.instances.items():
        if orthanc_id not in source.instances:
            extra_by_study.setdefault(study, []).append(orthanc_id)
    studies = []
    for uid in missing_by_study.keys() | extra_by_study.keys():
        held = source.studies.get(uid) or target.studies.get(uid)
        studies.append(
            StudyDiff(
                uid=uid,
                date=held.date if held is not None else None,
                source=len(source.studies[uid].instances) if uid in source.studies else 0,
                target=len(target.studies[uid].instances) if uid in target.studies else 0,
                missing=len(missing_by_study.get(uid, ())),
                extra=len(extra_by_study.get(uid, ())),
            )
        )
    # Newest first: the studies a site wants on the new server before the switch.
    studies.sort(key=lambda s: s.uid or "")
    studies.sort(key=lambda s: s.date or "", reverse=True)
    order = [s.uid for s in studies]
    return Diff(
        source=source_name,
        target=target_name,
        source_studies=len(source.studies),
        source_instances=len(source.instances),
        target_studies=len(target.studies),
        target_instances=len(target.instances),
        missing={i: uid for uid in order for i in sorted(missing_by_study.get(uid, ()))},
        extra={i: uid for uid in order for i in sorted(extra_by_study.get(uid, ()))},
        studies=studies,
    )


async def _inventories(
    source: OrthancClient,
    target: OrthancClient,
    retry: RetryPolicy,
    selection: Selection | None,
) -> tuple[Inventory, Inventory]:
    """Both inventories, read at the same time; a failure is fatal for the command."""
    try:
        await asyncio.gather(source.system(), target.system())
        return await asyncio.gather(
            read_inventory(source, retry, selection), read_inventory(target, retry, selection)
        )
    except TransferError as exc:
        kind = "" if exc.verdict.kind is Kind.FATAL else " after retries"
        raise FatalError(f"reading the inventories failed{kind}: {exc.verdict.reason}") from None


async def diff_servers(
    source: OrthancClient,
    target: OrthancClient,
    retry: RetryPolicy,
    *,
    selection: Selection | None = None,
    max_list: int = 1000,
) -> Diff:
    """Compare two Orthancs' inventories (of the studies `selection` takes)."""
    started = time.monotonic()
    src, tgt = await _inventories(source, target, retry, selection)
    result = compare(src, tgt, source.endpoint.display, target.endpoint.display)
    try:
        listed = list(result.missing)[:max_list]
        shown = list(result.extra)[:max_list]
        sops = await asyncio.gather(
            describe_instances(source, retry, listed), describe_instances(target, retry, shown)
        )
        result.sop_uids = {**sops[0], **sops[1]}
    except TransferError:
        result.sop_uids = None  # the lists keep their Orthanc IDs and studies
    result.seconds = time.monotonic() - started
    return result


async def missing_ids(
    source: OrthancClient,
    target: OrthancClient,
    retry: RetryPolicy,
    selection: Selection | None = None,
) -> list[str]:
    """The Orthanc IDs of the source's instances that the target lacks, newest study
    first (what `replicate --only-missing` lists)."""
    src, tgt = await _inventories(source, target, retry, selection)
    return list(compare(src, tgt, "", "").missing)


def open_delta_source(source_url: str, target_url: str, settings: Settings) -> Source:
    """The source of `replicate --only-missing`: the source's instances the target lacks
    (their inventories compared when the listing starts)."""
    from migrator.ends.factory import endpoint_from, orthanc_client
    from migrator.ends.orthanc.delta import DeltaSource

    client = orthanc_client(endpoint_from(source_url, "source", settings), "source", settings)
    target = orthanc_client(endpoint_from(target_url, "target", settings), "target", settings)
    return DeltaSource(
        client,
        settings.retry,
        settings.page_size,
        lambda: missing_ids(client, target, settings.retry),
        also_close=target,
    )
