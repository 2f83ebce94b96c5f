"""Instance states and the transitions allowed between them.

One table (`TRANSITIONS`) is the whole state machine; the ledger checks every write
against it. ``in_flight -> in_flight`` is a lease taken over from a dead worker.
"""

from __future__ import annotations

import enum


class State(enum.StrEnum):
    """Where one instance stands in a job."""

    # Listed, waiting to be sent (possibly not before `next_attempt_at`).
    PENDING = "pending"
    # Leased by a worker that is transferring it; `lease_owner` / `lease_expires` say who.
    IN_FLIGHT = "in_flight"
    # The target confirmed it holds the instance (Success or AlreadyStored).
    SENT = "sent"
    # The target refused this content (400, 404 on POST, FilteredOut). Retrying is useless
    # until something changes on the target.
    REJECTED = "rejected"
    # Retryable errors until the attempts ran out. `migrator retry` puts it back.
    FAILED = "failed"
    # Deliberately not sent (JSON summary, header-only copy, duplicate...): `last_error`
    # holds the reason. Never counted as a failure.
    SKIPPED = "skipped"
    # The source no longer has it (deleted after it was listed, or, for a mirror, after
    # it was sent: `last_error` then starts with "deleted on source").
    VANISHED = "vanished"


ALL_STATES: tuple[State, ...] = tuple(State)

# Final states: nothing happens to them unless a user asks (`migrator retry`).
TERMINAL: frozenset[State] = frozenset(
    {State.SENT, State.REJECTED, State.FAILED, State.SKIPPED, State.VANISHED}
)

# States a user may put back to pending with `migrator retry`.
RETRYABLE_BY_USER: frozenset[State] = frozenset(
    {State.FAILED, State.REJECTED, State.VANISHED, State.SKIPPED, State.SENT}
)

TRANSITIONS: dict[State, frozenset[State]] = {
    State.PENDING: frozenset({State.IN_FLIGHT, State.SKIPPED}),
    # Skipped: a file that could not be identified and that the target says is not DICOM.
    State.IN_FLIGHT: frozenset(
        {
            State.SENT,
            State.REJECTED,
            State.FAILED,
            State.VANISHED,
            State.PENDING,
            State.IN_FLIGHT,
            State.SKIPPED,
        }
    ),
    # Vanished: a mirror found the instance deleted on its source (`last_error` says
    # so, and whether it was deleted on the target too).
    State.SENT: frozenset({State.PENDING, State.VANISHED}),
    # A refused, failed or vanished copy ends skipped (superseded) once another copy of
    # its instance is sent: the instance is on the target, nothing is left to do.
    State.REJECTED: frozenset({State.PENDING, State.SKIPPED}),
    State.FAILED: frozenset({State.PENDING, State.SKIPPED}),
    State.SKIPPED: frozenset({State.PENDING}),
    State.VANISHED: frozenset({State.PENDING, State.SKIPPED}),
}

# Reasons (the start of `last_error`) of rows skipped because their file must never reach
# a target: a header-only copy (or a copy without pixel data of an instance that has a
# full copy) would be stored first and make the real file "AlreadyStored"; a JSON summary
# or a DICOMDIR is not an instance. `migrator retry
# --state skipped` leaves these rows skipped. The texts are those `fileclass` writes.
NEVER_SEND_REASONS: tuple[str, ...] = (
    "header-only copy",
    "copy without pixel data",
    "JSON summary",
    "DICOMDIR",
)


class IllegalTransition(ValueError):
    """A write tried to move an instance along an edge the table does not have."""


def check_transition(old: State, new: State) -> None:
    """Raise IllegalTransition unless `old -> new` is an edge of the state machine."""
    if new not in TRANSITIONS[old]:
        raise IllegalTransition(f"{old.value} -> {new.value} is not allowed")


def parse_state(text: str) -> State:
    """Turn user text into a State, with a one-line error listing the valid names."""
    try:
        return State(text.strip().lower().replace("-", "_"))
    except ValueError:
        names = ", ".join(s.value for s in State)
        raise ValueError(f"unknown state {text!r} (one of: {names})") from None


class VerifyResult(enum.StrEnum):
    """What `migrator verify` found on the target for one `sent` row (not a state: the
    row stays `sent`; `migrator retry --state missing|differ` sends it again)."""

    # The target holds the instance and its DICOM attachment has the MD5 that was sent.
    MATCH = "match"
    # The target does not know the instance (deleted, recycled, never really stored).
    MISSING = "missing"
    # The target holds other bytes under that ID (it kept an older version and answered
    # AlreadyStored, or transcoded on ingest).
    DIFFER = "differ"
    # The check could not tell (no MD5 recorded, network errors after retries...).
    ERROR = "error"
    # The target holds an instance with these UIDs, but could not hand back its bytes to
    # compare (a DICOMweb or DIMSE target asked by UID): found, not byte-proven.
    PRESENT = "present"


def parse_state_or_result(text: str) -> State | VerifyResult:
    """A state name, or one of the verify results (match, missing, differ, error,
    present)."""
    word = text.strip().lower().replace("-", "_")
    try:
        return VerifyResult(word)
    except ValueError:
        pass
    try:
        return parse_state(word)
    except ValueError:
        names = ", ".join([*(s.value for s in State), *(r.value for r in VerifyResult)])
        raise ValueError(f"unknown state {text!r} (one of: {names})") from None
