"""Error taxonomy: every failure is classified here, once.

Three kinds of failure exist, and each decides what happens next::

    MigratorError
    ├── UsageError        bad command line, URL, config or path       -> exit 2
    ├── FatalError        the run cannot go on (auth refused, not an
    │   │                 Orthanc, endpoint unreachable, storage full) -> exit 3
    │   └── LedgerError   the ledger cannot be read or written        -> exit 3
    └── TransferError     one instance failed; carries a Verdict:
                            RETRYABLE  try again later (network, timeout, 409, 429, 5xx)
                            PERMANENT  the target refused this content (400, 404 on POST,
                                       FilteredOut): state `rejected`
                            VANISHED   the source no longer has the instance: `vanished`

A file the listing could not identify (a folder's file whose identifiers no reader found,
sent without an Orthanc ID) is offered to the target; `refused_as_not_dicom` tells when
the target's PERMANENT answer means "not DICOM" or "no identifiers", which ends the row
`skipped` rather than `rejected`.

`classify_status` and `classify_exception` are the only places where an HTTP status or an
exception becomes a decision. A fatal error never marks an instance: the scheduler stops
and hands its leases back.
"""

from __future__ import annotations

import enum
import json
import sys
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import httpx

EXIT_OK = 0
EXIT_INCOMPLETE = 1
EXIT_USAGE = 2
EXIT_FATAL = 3
EXIT_INTERRUPTED = 130


class Kind(enum.Enum):
    """What a failed transfer means for the instance and for the run."""

    RETRYABLE = "retryable"
    PERMANENT = "permanent"
    VANISHED = "vanished"
    FATAL = "fatal"


@dataclass(frozen=True)
class Verdict:
    """A classified failure: its kind, the HTTP status if any, and a one-line reason."""

    kind: Kind
    reason: str
    http_status: int | None = None


class MigratorError(Exception):
    """Base of every error the tool reports to the user as one line."""

    exit_code = EXIT_FATAL


class UsageError(MigratorError):
    """Bad input from the user: command line, URL, config file or path."""

    exit_code = EXIT_USAGE


class FatalError(MigratorError):
    """The run cannot continue; no instance is marked because of it."""

    exit_code = EXIT_FATAL


class LedgerError(FatalError):
    """The ledger is unusable (cannot be opened, read or written)."""


class LedgerOutdated(MigratorError):
    """The ledger's schema is older than this version of the tool."""

    exit_code = EXIT_USAGE


class TransferError(Exception):
    """One instance could not be transferred; `verdict` says why and what next."""

    def __init__(self, verdict: Verdict) -> None:
        super().__init__(verdict.reason)
        self.verdict = verdict


def orthanc_message(response: httpx.Response) -> str:
    """Extract Orthanc's own explanation from an error answer, falling back to the body."""
    try:
        body = response.json()
    except (json.JSONDecodeError, UnicodeDecodeError, ValueError):
        text = response.text.strip().replace("\n", " ")
        return text[:200] if text else response.reason_phrase
    if isinstance(body, dict):
        parts = [str(body[k]) for k in ("Message", "Details") if body.get(k)]
        if parts:
            return ": ".join(parts)
    return json.dumps(body)[:200]


def classify_status(status: int, *, side: str, method: str) -> Kind:
    """Decide what an HTTP error status means.

    `side` is "source" or "target"; `method` the HTTP verb. Only non-2xx statuses come here.
    """
    if status in (401, 403, 407):
        return Kind.FATAL
    if status in (408, 409, 425, 429) or (500 <= status < 600 and status != 507):
        return Kind.RETRYABLE
    if status == 507:
        # The target's storage is full: nothing else will get in either.
        return Kind.FATAL
    if side == "source" and method == "GET" and status == 404:
        return Kind.VANISHED
    if side == "target" and 400 <= status < 500:
        return Kind.PERMANENT
    # A source answering e.g. 400 or 3xx to a plain GET is misconfigured, not the instance.
    return Kind.FATAL


def verdict_for_response(response: httpx.Response, *, side: str) -> Verdict:
    """Classify a non-2xx answer into a Verdict carrying Orthanc's message."""
    method = response.request.method
    kind = classify_status(response.status_code, side=side, method=method)
    message = orthanc_message(response)
    if kind is Kind.FATAL and response.status_code in (401, 403, 407):
        message = f"{side} refused the credentials ({response.status_code}): {message}"
    elif kind is Kind.VANISHED:
        message = f"no longer on the source: {message}"
    return Verdict(kind, f"HTTP {response.status_code}: {message}", response.status_code)


def classify_exception(exc: BaseException, *, side: str) -> Verdict:
    """Classify a transport-level exception (no HTTP answer was received)."""
    # httpx is loaded by the HTTP ends only: without it, no exception can be one of its.
    httpx = sys.modules.get("httpx")
    if httpx is not None and isinstance(exc, httpx.TimeoutException):
        return Verdict(Kind.RETRYABLE, f"{side} timed out ({type(exc).__name__})")
    if httpx is not None and isinstance(exc, httpx.TransportError):
        detail = str(exc) or type(exc).__name__
        return Verdict(Kind.RETRYABLE, f"{side} network error: {detail}")
    if isinstance(exc, TransferError):
        return exc.verdict
    return Verdict(Kind.FATAL, f"{side}: unexpected {type(exc).__name__}: {exc}")


def verdict_for_store_status(status: str | None) -> Verdict | None:
    """Classify the Status field of a 200 answer to POST /instances.

    Returns None when the target stored the instance (Success, AlreadyStored).
    """
    if status in ("Success", "AlreadyStored"):
        return None
    if status == "FilteredOut":
        return Verdict(Kind.PERMANENT, "FilteredOut: the target's filter refused the instance")
    return Verdict(Kind.FATAL, f"target answered an unknown store status {status!r}")


# STOW-RS FailureReason (0008,1197) values with a meaning of their own (PS3.18 / PS3.7).
_STOW_PROCESSING_FAILURE = 0x0110
_STOW_DUPLICATE = 0x0111
_STOW_RESOURCE_LIMITATION = 0x0213


def verdict_for_stow_failure(reason: int | None) -> Verdict | None:
    """Classify an instance a STOW-RS answer lists in its FailedSOPSequence.

    None: the instance is there all the same (0x0111 duplicate SOP instance: an earlier
    copy is stored). 0x0110 (processing failure) and 0x0213 (resource limitation) are
    the server's trouble, not the content's: retryable. 0xA7xx (out of resources),
    0xA9xx (data set does not match the SOP class), 0xCxxx (cannot understand), 0x0122
    (SOP class not supported) and any other reason refuse the instance: permanent.
    """
    if reason == _STOW_DUPLICATE:
        return None
    if reason is None:
        return Verdict(Kind.PERMANENT, "STOW-RS: refused (no failure reason given)")
    text = f"STOW-RS failure 0x{reason:04X}"
    if reason in (_STOW_PROCESSING_FAILURE, _STOW_RESOURCE_LIMITATION):
        return Verdict(Kind.RETRYABLE, f"{text}: processing failure on the target")
    return Verdict(Kind.PERMANENT, f"{text}: {_refusal(reason)}")


def _refusal(status: int) -> str:
    """What a storage failure status (a C-STORE's, a STOW-RS FailureReason) says."""
    if 0xA700 <= status <= 0xA7FF:
        return "refused (out of resources)"
    if 0xA900 <= status <= 0xA9FF:
        return "refused (data set does not match SOP class)"
    if 0xC000 <= status <= 0xCFFF:
        return "refused (cannot understand)"
    if status == 0x0122:
        return "refused (SOP class not supported)"
    return "refused"


def verdict_for_stow_silence(http_status: int) -> Verdict:
    """Classify an instance a STOW-RS answer names neither as stored nor as failed: an
    error status (400, 409...) refused the request's content; a success status that
    leaves an instance out is a server not keeping its word, tried again."""
    if 200 <= http_status < 300:
        return Verdict(
            Kind.RETRYABLE,
            f"STOW-RS answered HTTP {http_status} without naming this instance",
            http_status,
        )
    return Verdict(
        Kind.PERMANENT,
        f"HTTP {http_status}: STOW-RS refused the instance (not in the answer)",
        http_status,
    )


# Orthanc's answers to a body it cannot parse as DICOM (OrthancStatus 15), and to a
# dataset without one of the identifiers it names instances by (OrthancStatus 21).
_BAD_FILE_FORMAT = "HTTP 400: Bad file format"
_INEXISTENT_TAG = "HTTP 404: Inexistent tag"


def refused_as_not_dicom(verdict: Verdict) -> str | None:
    """The skip reason when the target refused a file as not DICOM (or as DICOM without
    identifiers), else None.

    Meant for files that could not be identified before sending: for a file known to be
    a DICOM instance the same answer is a refusal of its content (`rejected`).
    """
    if verdict.kind is not Kind.PERMANENT:
        return None
    # One reason per kind of answer (without Orthanc's details, which name the file's
    # size), so that reports group these rows.
    if verdict.reason.startswith(_BAD_FILE_FORMAT):
        return f"not DICOM: the target could not parse it ({_BAD_FILE_FORMAT})"
    if verdict.reason.startswith(_INEXISTENT_TAG):
        return f"incomplete DICOM: the target found no identifiers ({_INEXISTENT_TAG})"
    return None


# DIMSE (DICOM network) outcomes. A-ASSOCIATE-RJ: result 1 permanent, 2 transient; source
# 1 service user, 2 provider (ACSE), 3 provider (presentation); the diagnostic of a
# service-user rejection: 1 no reason, 2 application context, 3 calling AE, 7 called AE.
_RJ_CALLED_AE = 7
_RJ_CALLING_AE = 3
_RJ_CONTEXT = 2


def verdict_for_association(
    rejection: tuple[int, int, int] | None, *, side: str, peer: str, connected: bool
) -> Verdict:
    """Classify an association that could not be established with a DIMSE peer.

    `rejection` is the A-ASSOCIATE-RJ's (result, source, diagnostic) when the peer
    rejected it; `connected` says whether a TCP connection was made at all. A permanent
    rejection naming our AE titles or the application context will not heal by itself
    (the peer's configuration must change): fatal for the run. Refused connections,
    transient rejections (busy peer), other rejections and aborts are retryable.
    """
    if rejection is None:
        if not connected:
            return Verdict(
                Kind.RETRYABLE, f"{side} {peer}: connection failed (refused or timed out)"
            )
        return Verdict(Kind.RETRYABLE, f"{side} {peer}: association aborted")
    result, source, diagnostic = rejection
    if result == 1 and source == 1:
        if diagnostic == _RJ_CALLED_AE:
            return Verdict(
                Kind.FATAL, f"{side} {peer}: association rejected: called AE title not recognised"
            )
        if diagnostic == _RJ_CALLING_AE:
            return Verdict(
                Kind.FATAL,
                f"{side} {peer}: association rejected: our (calling) AE title is not "
                "recognised; declare it on the peer or give --aet",
            )
        if diagnostic == _RJ_CONTEXT:
            return Verdict(
                Kind.FATAL, f"{side} {peer}: association rejected: application context refused"
            )
    kind = "transient" if result == 2 else "permanent"
    return Verdict(
        Kind.RETRYABLE,
        f"{side} {peer}: association rejected ({kind}, source {source}, reason {diagnostic})",
    )


def verdict_for_dimse_status(status: int | None, *, side: str, operation: str) -> Verdict | None:
    """Classify the status of a DIMSE response; None when the operation succeeded (0x0000,
    or a 0xB0xx warning: the instance is stored, see `dimse_warning`).

    For a C-STORE on the target: 0xA7xx (out of resources), 0xA9xx (data set does not
    match the SOP class) and 0xCxxx (cannot understand) refuse the instance: permanent.
    0xA700 on a source's C-GET/C-MOVE/C-FIND is the peer out of resources: retryable. No
    response at all (None: DIMSE timeout, association aborted) is retryable, and so is a
    0xFE00 cancel. 0xA801 on a C-MOVE (move destination unknown) is fatal: the peer does
    not know our AE title. Any other failure of a source's query or retrieve is retried
    (the row ends `failed` when it persists); any other C-STORE failure (0x0122 SOP class
    not supported...) is permanent for the instance.
    """
    if status is None:
        return Verdict(Kind.RETRYABLE, f"{side} {operation}: no response (timeout or abort)")
    text = f"{side} {operation} status 0x{status:04X}"
    if status == 0x0000 or 0xB000 <= status <= 0xBFFF:
        return None
    if status in (0xFF00, 0xFF01):
        # Pending: not a final status; a caller that sees one as final was cut short.
        return Verdict(Kind.RETRYABLE, f"{text}: ended while pending")
    if status == 0xFE00:
        return Verdict(Kind.RETRYABLE, f"{text}: cancelled")
    if operation in ("C-MOVE", "C-GET", "C-FIND") and side == "source":
        if status == 0xA801:
            return Verdict(
                Kind.FATAL,
                f"{text}: move destination unknown: declare our AE title on the peer",
            )
        if 0xA700 <= status <= 0xA7FF:
            return Verdict(Kind.RETRYABLE, f"{text}: peer out of resources")
        return Verdict(Kind.RETRYABLE, text)
    return Verdict(Kind.PERMANENT, f"{text}: {_refusal(status)}")


def dimse_warning(status: int) -> str | None:
    """The warning of a C-STORE stored with a 0xB0xx status (coercion, elements
    discarded...), else None."""
    if 0xB000 <= status <= 0xBFFF:
        names = {
            0xB000: "coercion of data elements",
            0xB006: "elements discarded",
            0xB007: "data set does not match SOP class",
        }
        return f"status 0x{status:04X}: {names.get(status, 'warning')}"
    return None
