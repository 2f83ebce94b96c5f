"""Whether two Orthanc endpoints are one and the same server.

Replicating an Orthanc into itself (`http://localhost:8042/` and `http://127.0.0.1:8042/`,
a host name and its address, a reverse proxy and the server behind it) stores nothing,
answers `AlreadyStored` for every instance and ends "all sent": a user who then retires
"the source" deletes the only copy. The URLs cannot tell; the servers can.

The rule, in order (it must never call two distinct servers the same):

1. Different `GET /system` answers: two servers. One Orthanc process always gives the
   same answer (its name, AET, ports, version, database and plugins); two fresh servers
   configured alike may give the same one too, so equal answers prove nothing.
2. Equal answers: a positive probe. An asynchronous job that archives nothing
   (`POST /tools/create-archive` with no resources: no data is read or changed, the job
   only enters the server's job history) is started on one end, and the other end is
   asked for that job. Job IDs are random UUIDs that live in one Orthanc process: only
   the same server knows it. The probe is started on the target first (a migration
   writes there anyway), else on the source.
3. When neither end accepts the probe (e.g. credentials limited by an authorization
   plugin), their contents are compared: equal and non-empty job histories (lists of
   random job IDs) are one server's; so are an equal change-log position, equal
   `/statistics` and equal attachment UUIDs (random, given when a file is stored) for
   the first instances of the source. A distinct server can match all of that only as
   an untouched copy of the source's storage, which holds everything already: refusing
   it loses nothing. Anything else is taken as two servers, with a warning.

Two Orthanc processes sharing one database are different processes: this rule does not
call them the same, and a copy of a storage folder served by a second Orthanc (a
legitimate start of a migration) is rightly a second server.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

import httpx

from migrator.ends.orthanc.client import OrthancClient

log = logging.getLogger("migrator")

_PROBE = {"Resources": [], "Asynchronous": True}
# How often, and how far apart, a job that is starting is asked about.
_JOB_ASKS = 10
_JOB_PAUSE = 0.05


async def same_orthanc(source: OrthancClient, target: OrthancClient) -> bool:
    """True when `source` and `target` are the same Orthanc server (see the module)."""
    first, second = await source.system(), await target.system()
    if first.raw != second.raw:
        return False
    for origin, other in ((target, source), (source, target)):
        job = await _start_probe(origin)
        if job is None:
            continue
        known = await _knows_job(other, job)
        if known is not None:
            return known
    if await _same_contents(source, target):
        return True
    log.warning(
        "cannot tell whether %s and %s are two servers (same /system answer, no probe "
        "accepted): make sure the target is not the source",
        source.endpoint.display,
        target.endpoint.display,
    )
    return False


async def _same_contents(source: OrthancClient, target: OrthancClient) -> bool:
    """Whether both ends hold the same job history, or the same change-log position,
    statistics and stored files (rule 3 of the module)."""
    jobs = [await _json(end, "jobs") for end in (source, target)]
    if isinstance(jobs[0], list) and jobs[0] and jobs[0] == jobs[1]:
        return True
    for path in ("changes?last", "statistics"):
        answers = [await _json(end, path) for end in (source, target)]
        if answers[0] is None or answers[0] != answers[1]:
            return False
    sample = await _json(source, "instances?since=0&limit=3&expand")
    if not isinstance(sample, list) or not sample:
        return False
    for item in sample:
        theirs = await _json(target, f"instances/{item.get('ID')}")
        if not isinstance(theirs, dict) or theirs.get("FileUuid") != item.get("FileUuid"):
            return False
    return True


async def _start_probe(client: OrthancClient) -> str | None:
    """The ID of a job that archives nothing, started on `client`; None if refused."""
    try:
        response = await client.http.post("tools/create-archive", json=_PROBE)
    except httpx.HTTPError:
        return None
    body = _body(response)
    job = body.get("ID") if response.status_code == 200 and isinstance(body, dict) else None
    return job if isinstance(job, str) and job else None


async def _knows_job(client: OrthancClient, job: str) -> bool | None:
    """Whether `client` knows job `job` (None: no clear answer)."""
    for attempt in range(_JOB_ASKS):
        if attempt:
            await asyncio.sleep(_JOB_PAUSE)
        try:
            response = await client.http.get(f"jobs/{job}")
        except httpx.HTTPError:
            return None
        if response.status_code == 404:
            return False
        body = _body(response)
        if response.status_code == 200 and isinstance(body, dict) and body.get("ID") == job:
            return True
        # Orthanc 1.10 answers 400 ("Bad request") for a job it knows while the job is
        # starting; asked again a moment later, it describes the job.
        if response.status_code != 400:
            return None
    return None


async def _json(client: OrthancClient, path: str) -> Any:
    try:
        response = await client.http.get(path)
    except httpx.HTTPError:
        return None
    return _body(response) if response.status_code == 200 else None


def _body(response: httpx.Response) -> Any:
    try:
        return response.json()
    except ValueError:
        return None
