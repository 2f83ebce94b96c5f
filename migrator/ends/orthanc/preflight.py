"""Preflight of the target: will it keep what it receives, as it was sent?

A migration counts an instance as done when the target answers Success. Some Orthanc
settings make that answer worthless, and nothing in the answer says so:

- ``MaximumStorageSize`` / ``MaximumPatientCount`` non-zero with the default
  ``MaximumStorageMode`` "Recycle": to make room Orthanc DELETES the oldest patients and
  still answers Success. A long migration into such a target ends with a target that
  lost its beginning.
- ``IngestTranscoding``: files are re-encoded on arrival; the stored bytes (and MD5) differ
  from the source's, and so may the Orthanc IDs.
- ``OverwriteInstances``: a second copy of an instance replaces the first instead of being
  answered AlreadyStored, so an older or header-only copy sent later wins.

`GET /system` reports these from Orthanc 1.11.0 (IngestTranscoding, OverwriteInstances),
1.11.3 (MaximumStorageSize, MaximumStorageMode) and 1.12.4 (MaximumPatientCount). An
older target cannot be checked: the operator is told which settings must be 0/false.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

log = logging.getLogger("migrator")


@dataclass(frozen=True)
class Finding:
    """One thing about the target; `danger` findings are logged as warnings."""

    danger: bool
    message: str


def _number(value: Any) -> float:
    try:
        return float(value)
    except (TypeError, ValueError):
        return 0.0


def check_target(system: dict[str, Any]) -> list[Finding]:
    """What the target's `GET /system` answer says about keeping what it receives."""
    version = str(system.get("Version", "?"))
    findings: list[Finding] = []
    size = system.get("MaximumStorageSize")
    count = system.get("MaximumPatientCount")
    mode = str(system.get("MaximumStorageMode") or "Recycle")
    limited = [
        f"{name}={value}{unit}"
        for name, value, unit in (
            ("MaximumStorageSize", size, " MB"),
            ("MaximumPatientCount", count, ""),
        )
        if _number(value) > 0
    ]
    if limited and mode.lower() == "reject":
        findings.append(
            Finding(
                False,
                f"target limits its storage ({', '.join(limited)}, MaximumStorageMode "
                f"Reject): when full it refuses instances and the run stops (exit 3)",
            )
        )
    elif limited:
        findings.append(
            Finding(
                True,
                f"target RECYCLES: {', '.join(limited)} makes Orthanc delete its oldest "
                f"patients to make room while still answering Success, so instances counted "
                f"as sent may later disappear. Set MaximumStorageSize and "
                f"MaximumPatientCount to 0 in the target's configuration and restart it",
            )
        )
    unreported = [
        name
        for name, value in (("MaximumStorageSize", size), ("MaximumPatientCount", count))
        if value is None
    ]
    if unreported:
        findings.append(
            Finding(
                True,
                f"target Orthanc {version} does not report {' and '.join(unreported)} in "
                f"/system, so they cannot be checked: make sure they are 0 in its "
                f"configuration (otherwise Orthanc silently deletes old patients when full)",
            )
        )
    transcoding = system.get("IngestTranscoding")
    if transcoding:
        findings.append(
            Finding(
                True,
                f"target TRANSCODES on ingest (IngestTranscoding={transcoding!r}): it stores "
                f"other bytes than the source's, so MD5 verification fails and instance IDs "
                f"may change. Remove IngestTranscoding from the target's configuration",
            )
        )
    if system.get("OverwriteInstances") is True:
        findings.append(
            Finding(
                True,
                "target OVERWRITES instances (OverwriteInstances=true): a later copy of an "
                "instance replaces the stored one instead of being answered AlreadyStored. "
                "Set OverwriteInstances to false for the migration",
            )
        )
    return findings


# Findings already logged in this process: a target is checked before the ledger is
# opened and again when the run starts, and each finding is worth saying once.
_said: set[tuple[str, str]] = set()


def warn_about_target(system: dict[str, Any], display: str) -> list[Finding]:
    """Log every finding about the target (warnings for dangers) once; return them."""
    findings = check_target(system)
    for finding in findings:
        if (display, finding.message) in _said:
            continue
        _said.add((display, finding.message))
        if finding.danger:
            log.warning("PREFLIGHT %s: %s", display, finding.message)
        else:
            log.info("preflight %s: %s", display, finding.message)
    return findings
