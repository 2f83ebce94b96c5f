"""What a job moves: a selection of studies by date, modality, list and patient.

A `Selection` is a plain value, stored with the job (`to_options` / `from_options`) so
that a rerun with another selection is refused rather than mixed in. Each source applies
it where it can filter (Orthanc ``/tools/find``, QIDO-RS or C-FIND keys, the database
index) and calls `matches` on the study-level fields it has, so that every kind of source
selects the same studies.
"""

from __future__ import annotations

import csv
import re
from dataclasses import dataclass, field
from datetime import date, datetime, timedelta
from typing import Any

from migrator.errors import UsageError

__all__ = [
    "ORDERS",
    "Selection",
    "SelectionFlags",
    "StudyFields",
    "parse_date",
    "read_studies_file",
    "study_date_key",
]


def study_date_key(value: object) -> str:
    """A StudyDate as the ledger keeps and compares it: ``YYYYMMDD``, or "" when there is
    none or it is not a date (old ``YYYY.MM.DD`` forms are read; a range or a time is not a
    study's date)."""
    if not isinstance(value, str):
        return ""
    if len(value) == 8 and value.isdigit():
        return value  # the usual form, as it is (a listing asks this for every row)
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


# A relative date bound: a number of days, weeks, months (30 days) or years (365 days).
_RELATIVE = re.compile(r"\s*(\d+)\s*([dwmy])\s*", re.IGNORECASE)
_RELATIVE_DAYS = {"d": 1, "w": 7, "m": 30, "y": 365}
# The header of a --studies file's column, by what it lists.
_COLUMNS = {
    "studyinstanceuid": "study_uids",
    "accessionnumber": "accessions",
    "patientid": "patient_ids",
}
ORDERS = ("newest", "oldest", "listing")


def parse_date(text: str, option: str, today: date) -> str:
    """A StudyDate bound as ``YYYYMMDD``: given so (or ``YYYY-MM-DD``), or relative to
    `today` (``30d``, ``6w``, ``6m``, ``2y``: months of 30 days, years of 365)."""
    relative = _RELATIVE.fullmatch(text)
    if relative is not None:
        days = int(relative.group(1)) * _RELATIVE_DAYS[relative.group(2).lower()]
        try:
            return (today - timedelta(days=days)).strftime("%Y%m%d")
        except OverflowError:
            raise UsageError(f"{option} {text!r}: too far back") from None
    try:
        return datetime.strptime(text.strip().replace("-", ""), "%Y%m%d").strftime("%Y%m%d")
    except ValueError:
        raise UsageError(
            f"{option} {text!r}: give a date (YYYYMMDD or YYYY-MM-DD) or an age (30d, 6m, 2y)"
        ) from None


def read_studies_file(path: str) -> dict[str, frozenset[str]]:
    """The studies a ``--studies`` file names, by kind (``study_uids``, ``accessions``,
    ``patient_ids``). A CSV's columns are chosen by their header (StudyInstanceUID,
    AccessionNumber, PatientID; others are ignored); a file whose first line names none
    of them holds one StudyInstanceUID per line."""
    try:
        with open(path, encoding="utf-8-sig", newline="") as handle:
            lines = [line for line in handle.read().splitlines() if line.strip()]
    except (OSError, UnicodeDecodeError) as exc:
        raise UsageError(f"--studies {path}: {getattr(exc, 'strerror', None) or exc}") from None
    found: dict[str, set[str]] = {kind: set() for kind in _COLUMNS.values()}
    if not lines:
        raise UsageError(f"--studies {path}: the file is empty")
    dialect = csv.excel_tab if "\t" in lines[0] and "," not in lines[0] else csv.excel
    header = [_norm(cell) for cell in next(csv.reader([lines[0]], dialect))]
    columns = {i: _COLUMNS[name] for i, name in enumerate(header) if name in _COLUMNS}
    if not columns:
        found["study_uids"] = {line.strip() for line in lines}
    else:
        for cells in csv.reader(lines[1:], dialect):
            for i, kind in columns.items():
                if i < len(cells) and cells[i].strip():
                    found[kind].add(cells[i].strip())
    if not any(found.values()):
        raise UsageError(f"--studies {path}: no study, accession or patient listed")
    return {kind: frozenset(values) for kind, values in found.items()}


def _norm(cell: str) -> str:
    """A header cell as compared with the known column names."""
    return re.sub(r"[^a-z]", "", cell.lower())


@dataclass(frozen=True)
class SelectionFlags:
    """The selection as given on the command line: relative dates are resolved against
    the day the job was created (`resolve`), so that the same command, rerun days later,
    selects what it selected at first."""

    since: str | None = None
    until: str | None = None
    modalities: tuple[str, ...] = ()
    studies_file: str | None = None
    exclude_patients: tuple[str, ...] = ()
    include_undated: bool = False

    def resolve(self, today: date) -> Selection:
        """The selection these flags make on `today`; raises UsageError on bad input."""
        since = parse_date(self.since, "--since", today) if self.since else None
        until = parse_date(self.until, "--until", today) if self.until else None
        if since and until and since > until:
            raise UsageError(f"--since {self.since} is after --until {self.until}")
        if self.include_undated and not (since or until):
            raise UsageError("--include-undated goes with --since or --until")
        listed = read_studies_file(self.studies_file) if self.studies_file else {}
        return Selection(
            since=since,
            until=until,
            modalities=frozenset(m.strip().upper() for m in self.modalities if m.strip()),
            study_uids=listed.get("study_uids", frozenset()),
            accessions=listed.get("accessions", frozenset()),
            patient_ids=listed.get("patient_ids", frozenset()),
            exclude_patients=frozenset(p for p in self.exclude_patients if p),
            include_undated=self.include_undated,
        )
