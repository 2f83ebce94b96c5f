"""What a job moves: a selection of studies by date, modality, list and patient.

A `Selection` is a plain value, stored with the job (`to_options` / `from_options`) so
that a rerun with another selection is refused rather than mixed in. Each source applies
it where it can filter (Orthanc ``/tools/find``, QIDO-RS or C-FIND keys, the database
index) and calls `matches` on the study-level fields it has, so that every kind of source
selects the same studies.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

__all__ = ["Selection", "StudyFields", "study_date_key"]


def study_date_key(value: object) -> str:
    """A StudyDate as the ledger keeps and compares it: ``YYYYMMDD``, or "" when there is
    none or it is not a date (old ``YYYY.MM.DD`` forms are read; a range or a time is not a
    study's date)."""
    if not isinstance(value, str):
        return ""
    digits = value.strip().replace(".", "").replace("-", "")
    if len(digits) != 8 or not digits.isdigit():
        return ""
    return digits


@dataclass(frozen=True)
class StudyFields:
    """The study-level fields a selection looks at (None or empty: not known)."""

    study_uid: str | None = None
    study_date: str | None = None
    modalities: tuple[str, ...] = ()
    accession: str | None = None
    patient_id: str | None = None


@dataclass(frozen=True)
class Selection:
    """Studies to move. Empty (the default): everything.

    Dates are ``YYYYMMDD`` (StudyDate), both bounds inclusive. The lists (``study_uids``,
    ``accessions``, ``patient_ids``) come from ``--studies FILE``: a study matches when it
    is in any of them. A study without StudyDate is taken by a date bound only with
    ``include_undated``.
    """

    since: str | None = None
    until: str | None = None
    modalities: frozenset[str] = field(default_factory=frozenset)
    study_uids: frozenset[str] = field(default_factory=frozenset)
    accessions: frozenset[str] = field(default_factory=frozenset)
    patient_ids: frozenset[str] = field(default_factory=frozenset)
    exclude_patients: frozenset[str] = field(default_factory=frozenset)
    include_undated: bool = False

    @property
    def empty(self) -> bool:
        """True when the selection takes everything."""
        return not (
            self.since
            or self.until
            or self.modalities
            or self.study_uids
            or self.accessions
            or self.patient_ids
            or self.exclude_patients
        )

    @property
    def listed(self) -> bool:
        """True when the selection names its studies (``--studies FILE``)."""
        return bool(self.study_uids or self.accessions or self.patient_ids)

    def date_range(self) -> str | None:
        """The DICOM range query of the date bounds (``YYYYMMDD-YYYYMMDD``, an open end
        left empty), or None without bounds. A server answering such a query leaves out
        undated studies: with ``include_undated`` they must be looked for apart."""
        if not (self.since or self.until):
            return None
        return f"{self.since or ''}-{self.until or ''}"

    def matches(self, study: StudyFields) -> bool:
        """Whether a study with these fields is selected."""
        if study.patient_id is not None and study.patient_id in self.exclude_patients:
            return False
        if self.since or self.until:
            date = (study.study_date or "").strip()[:8]
            if not date:
                if not self.include_undated:
                    return False
            elif (self.since and date < self.since) or (self.until and date > self.until):
                return False
        if self.modalities and not (self.modalities & {m.upper() for m in study.modalities}):
            return False
        if self.listed:
            return (
                (study.study_uid is not None and study.study_uid in self.study_uids)
                or (bool(study.accession) and study.accession in self.accessions)
                or (study.patient_id is not None and study.patient_id in self.patient_ids)
            )
        return True

    def to_options(self) -> dict[str, Any]:
        """The selection as JSON-ready job options ({} when empty)."""
        if self.empty:
            return {}
        out: dict[str, Any] = {}
        for name in ("since", "until"):
            if getattr(self, name):
                out[name] = getattr(self, name)
        for name in (
            "modalities",
            "study_uids",
            "accessions",
            "patient_ids",
            "exclude_patients",
        ):
            if getattr(self, name):
                out[name] = sorted(getattr(self, name))
        if self.include_undated:
            out["include_undated"] = True
        return out

    @classmethod
    def from_options(cls, data: dict[str, Any] | None) -> Selection:
        """The selection stored with a job (the inverse of `to_options`)."""
        data = data or {}
        return cls(
            since=data.get("since"),
            until=data.get("until"),
            modalities=frozenset(m.upper() for m in data.get("modalities", ())),
            study_uids=frozenset(data.get("study_uids", ())),
            accessions=frozenset(data.get("accessions", ())),
            patient_ids=frozenset(data.get("patient_ids", ())),
            exclude_patients=frozenset(data.get("exclude_patients", ())),
            include_undated=bool(data.get("include_undated", False)),
        )

    def describe(self) -> str:
        """One line for status and the page ("everything" when empty)."""
        if self.empty:
            return "everything"
        parts = []
        if self.since or self.until:
            parts.append(f"StudyDate {self.since or '…'} to {self.until or '…'}")
            if self.include_undated:
                parts.append("undated studies included")
        if self.modalities:
            parts.append("modality " + "/".join(sorted(self.modalities)))
        if self.listed:
            n = len(self.study_uids) + len(self.accessions) + len(self.patient_ids)
            parts.append(f"{n} listed studies/accessions/patients")
        if self.exclude_patients:
            parts.append(f"{len(self.exclude_patients)} patients excluded")
        return ", ".join(parts)
