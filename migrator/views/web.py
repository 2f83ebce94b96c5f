"""`migrator serve`: a read-only web page and API for people watching a migration.

Routes (GET only; the server never writes the ledger, so it can run beside the workers):

    /              the page (`migrator.views.web_page`), which polls the two APIs every 2 s
    /api/status    the same JSON as ``migrator status --json``
    /api/history   instances sent per minute and per second, from ``sent_at``
                   (``?minutes=60``; `migrator.views.web_history`)
    /api/verify    verification results per job, as `migrator verify` counts them
    /api/studies   each job's studies complete, partial, pending, failed (counted beside
                   the page, at most 10 s old; null until first counted)
    /metrics       Prometheus text format

It may start before the first job: until a job has made the ledger it answers "no jobs"
(and never makes it itself; `LedgerWhenReady`).

Standard library only (``ThreadingHTTPServer``): no CDN, nothing to install. Answers are
cached for a second, so ten open pages cost the ledger what one does. Requests for a host
name the server does not know get 421 (`migrator.views.web_hosts`: DNS rebinding).
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import Callable, Sequence
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, urlsplit

from sqlalchemy import inspect
from sqlalchemy.exc import SQLAlchemyError

from migrator.errors import LedgerError, MigratorError, UsageError
from migrator.ledger import db
from migrator.ledger.store import Ledger
from migrator.views.reports import status_document, study_counts
from migrator.views.verify_report import verification_totals
from migrator.views.web_history import BUCKET, History, history
from migrator.views.web_hosts import HostCheck, hostname
from migrator.views.web_page import PAGE

log = logging.getLogger("migrator")
# How old the per-study counts on the page may be, in seconds (see `study_counts`).
STUDY_COUNTS_AGE = 10.0

__all__ = ["BUCKET", "DashboardServer", "History", "history", "metrics", "serve", "verify_counts"]

CACHE_SECONDS = 1.0
MAX_MINUTES = 24 * 60


def verify_counts(ledger: Ledger) -> dict[str, Any]:
    """Per job, the sent rows per verify result, as `migrator verify` counts them: a row
    sent again since its check is `unverified` (results of zero are left out); and when
    the latest verification pass began (None: never verified)."""
    out = []
    for job in ledger.list_jobs():
        totals = verification_totals(ledger, job.id)
        latest = ledger.verify_pass(job.id)
        out.append(
            {
                "name": job.name,
                "results": {k: n for k, n in totals.items() if n},
                "pass_started": latest.started_at if latest is not None else None,
            }
        )
    return {"jobs": out}


def _label(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def metrics(status: dict[str, Any], verified: dict[str, Any]) -> str:
    """Prometheus text exposition (format 0.0.4) of the status and verify documents."""
    lines: list[str] = []

    def family(name: str, kind: str, help_text: str, samples: list[tuple[str, Any]]) -> None:
        lines.append(f"# HELP {name} {help_text}")
        lines.append(f"# TYPE {name} {kind}")
        lines.extend(f"{name}{{{labels}}} {value}" for labels, value in samples)

    jobs = status["jobs"]
    family(
        "migrator_instances",
        "gauge",
        "Instances per job and state.",
        [
            (f'job="{_label(j["name"])}",state="{s}"', n)
            for j in jobs
            for s, n in j["counts"].items()
        ],
    )
    one = [("bytes_sent", "migrator_bytes_sent_total", "counter", "Bytes sent.")]
    one += [
        ("rate", "migrator_rate", "gauge", "Instances per second over the last 5 minutes."),
        ("bytes_rate", "migrator_bytes_rate", "gauge", "Bytes per second, last 5 minutes."),
        ("remaining", "migrator_remaining", "gauge", "Instances pending or in flight."),
        ("transferring", "migrator_transferring", "gauge", "Instances being sent now."),
        ("queued", "migrator_queued", "gauge", "Instances leased ahead, waiting in a worker."),
        ("total", "migrator_total", "gauge", "Instances listed."),
        ("eta_seconds", "migrator_eta_seconds", "gauge", "Estimated seconds to finish."),
    ]
    for key, name, kind, help_text in one:
        family(
            name,
            kind,
            help_text,
            [(f'job="{_label(j["name"])}"', j[key]) for j in jobs if j[key] is not None],
        )
    family(
        "migrator_listing_done",
        "gauge",
        "1 when the source listing is complete.",
        [(f'job="{_label(j["name"])}"', int(bool(j["listing_done"]))) for j in jobs],
    )
    family(
        "migrator_workers",
        "gauge",
        "Worker processes running on the job.",
        [(f'job="{_label(j["name"])}"', len(j["workers"])) for j in jobs],
    )
    family(
        "migrator_verified",
        "gauge",
        "Latest verification result per job and result.",
        [
            (f'job="{_label(v["name"])}",result="{_label(r)}"', n)
            for v in verified["jobs"]
            for r, n in v["results"].items()
        ],
    )
    return "\n".join(lines) + "\n"


class _Cache:
    """Each answer, per key, is fresh for CACHE_SECONDS or twice as long as it took to
    compute, so a slow ledger is not kept busy by pages polling it. A stale answer is
    served at once while one background thread computes the next (stale-while-
    revalidate): on millions of rows the page never waits for the ledger after its
    first load."""

    def __init__(self) -> None:
        self.guard = threading.Lock()
        self.locks: dict[str, threading.Lock] = {}
        self.items: dict[str, tuple[float, Any]] = {}
        self.refreshing: set[str] = set()

    def get(self, key: str, compute: Callable[[], Any]) -> Any:
        with self.guard:
            lock = self.locks.setdefault(key, threading.Lock())
            hit = self.items.get(key)
            if hit is not None:
                if time.monotonic() >= hit[0] and key not in self.refreshing:
                    self.refreshing.add(key)
                    threading.Thread(
                        target=self._refresh, args=(key, lock, compute), daemon=True
                    ).start()
                return hit[1]
        # First request for this key: compute it (one computation for concurrent callers).
        with lock:
            hit = self.items.get(key)
            return hit[1] if hit is not None else self._compute(key, compute)

    def _refresh(self, key: str, lock: threading.Lock, compute: Callable[[], Any]) -> None:
        try:
            with lock:
                self._compute(key, compute)
        except Exception as exc:
            # Forget the old answer: the next request computes it and reports the error.
            log.debug("refreshing %s failed: %s", key, exc)
            with self.guard:
                self.items.pop(key, None)
        finally:
            with self.guard:
                self.refreshing.discard(key)

    def _compute(self, key: str, compute: Callable[[], Any]) -> Any:
        started = time.monotonic()
        value = compute()
        took = time.monotonic() - started
        with self.guard:
            self.items[key] = (time.monotonic() + max(CACHE_SECONDS, 2 * took), value)
        return value


class Handler(BaseHTTPRequestHandler):
    """Serves the page, the JSON APIs and /metrics from one ledger."""

    server: DashboardServer
    protocol_version = "HTTP/1.1"
    # Headers and body are separate writes: without TCP_NODELAY, Nagle's algorithm and
    # delayed ACKs add 40 ms to every answer.
    disable_nagle_algorithm = True

    def do_GET(self) -> None:
        """Route a GET."""
        self._answer(send_body=True)

    def do_HEAD(self) -> None:
        """Like GET, without the body."""
        self._answer(send_body=False)

    def _answer(self, *, send_body: bool) -> None:
        if not self.server.hosts.accepts(self.headers.get("Host")):
            self._refuse_host(send_body)
            return
        url = urlsplit(self.path)
        query = parse_qs(url.query)
        server, cache = self.server, self.server.cache
        try:
            if url.path in ("/", "/index.html"):
                body, ctype = PAGE.encode(), "text/html; charset=utf-8"
            elif url.path == "/api/status":
                body = _json(cache.get("status", server.status))
                ctype = "application/json"
            elif url.path == "/api/history":
                minutes = _minutes(query)
                body = _json(cache.get(f"history{minutes}", lambda: server.rates(minutes)))
                ctype = "application/json"
            elif url.path == "/api/studies":
                body = _json(cache.get("studies", server.studies))
                ctype = "application/json"
            elif url.path == "/api/verify":
                body = _json(cache.get("verify", server.verified))
                ctype = "application/json"
            elif url.path == "/metrics":
                status = cache.get("status", server.status)
                verified = cache.get("verify", server.verified)
                body = metrics(status, verified).encode()
                ctype = "text/plain; version=0.0.4; charset=utf-8"
            else:
                self._send(404, b"not found\n", "text/plain", send_body)
                return
        except UsageError as exc:
            self._send(400, _json({"error": str(exc)}), "application/json", send_body)
            return
        except MigratorError as exc:
            # The ledger is unreachable for a moment: the page shows it and keeps polling.
            self._send(503, _json({"error": str(exc)}), "application/json", send_body)
            return
        self._send(200, body, ctype, send_body)

    def _refuse_host(self, send_body: bool) -> None:
        # A page on another domain rebound to this address (or a name nobody declared):
        # nothing from the ledger. Logged once per name, for the operator of a proxy.
        name = hostname(self.headers.get("Host", "")) or "?"
        if name not in self.server.refused:
            self.server.refused.add(name)
            log.warning("refused requests for host name %r (allow it with --allow-host)", name)
        body = b"unknown host name: start migrator serve with --allow-host NAME\n"
        self._send(421, body, "text/plain", send_body)

    def do_POST(self) -> None:
        """Read-only server: nothing accepts a POST."""
        self._send(405, b"read-only\n", "text/plain", True)

    def _send(self, code: int, body: bytes, ctype: str, send_body: bool) -> None:
        self.send_response(code)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Cache-Control", "no-store")
        self.send_header("X-Content-Type-Options", "nosniff")
        self.end_headers()
        if send_body:
            self.wfile.write(body)

    def log_message(self, format: str, *args: Any) -> None:
        """Requests go to the debug log, not to stderr."""
        log.debug("%s " + format, self.address_string(), *args)


class LedgerWhenReady:
    """The ledger a server reads, opened once the first job has made it.

    `migrator serve` may start before any job. It never creates the ledger (an SQLite
    file, or the tables of an empty PostgreSQL database: the job that creates them must
    find them missing), but looks again at each request and answers "no jobs" until then.
    """

    def __init__(self, url: str, ledger: Ledger | None = None) -> None:
        self.url = url
        self.ledger = ledger
        self.lock = threading.Lock()
        self.display_url = ledger.display_url if ledger else db.display_url(url)
        # Checks the URL (and an SQLite ledger's folder) at once; connects only when asked.
        self.probe = None if ledger else db.make_engine(url, must_exist=False)
        self.path = db.sqlite_path(self.probe.url) if self.probe else None

    def get(self) -> Ledger | None:
        """The ledger, or None while no job has created it yet."""
        with self.lock:
            if self.ledger is None and self._made():
                self.ledger = Ledger.open(self.url, create=False)
                self.close()
            return self.ledger

    def _made(self) -> bool:
        if self.path is not None and (not self.path.exists() or not self.path.stat().st_size):
            # Connecting would create the file (an empty one: the first job is making it).
            return False
        assert self.probe is not None
        try:
            with self.probe.connect() as conn:
                # The first job creates every table in one transaction.
                return bool(inspect(conn).get_table_names())
        except SQLAlchemyError as exc:
            reason = db.short_error(exc)
            raise LedgerError(f"cannot open the ledger {self.display_url}: {reason}") from None

    def close(self) -> None:
        """Release the probe's connections (the ledger's are the caller's to close)."""
        if self.probe is not None:
            self.probe.dispose()
            self.probe = None


class DashboardServer(ThreadingHTTPServer):
    """A ThreadingHTTPServer holding the ledger (maybe not made yet) and the answer cache."""

    daemon_threads = True

    def __init__(
        self,
        address: tuple[str, int],
        ledger: Ledger | LedgerWhenReady,
        hosts: HostCheck | None = None,
    ) -> None:
        super().__init__(address, Handler)
        if isinstance(ledger, Ledger):
            ledger = LedgerWhenReady(ledger.display_url, ledger)
        self.ledgers = ledger
        self.hosts = hosts or HostCheck(address[0])
        self.refused: set[str] = set()
        self.cache = _Cache()
        self.history = History()

    def status(self) -> dict[str, Any]:
        """The `status --json` document (no jobs while there is no ledger yet)."""
        ledger = self.ledgers.get()
        return status_document(ledger) if ledger is not None else {"jobs": []}

    def studies(self) -> dict[str, Any]:
        """The `/api/studies` document: each job's studies by how far they got (null
        until first counted). Counting reads every row, so it runs beside the page and
        the counts shown may be a few seconds old."""
        ledger = self.ledgers.get()
        if ledger is None:
            return {"jobs": {}}
        jobs = ledger.list_jobs()
        return {"jobs": {job.name: study_counts(ledger, job, STUDY_COUNTS_AGE) for job in jobs}}

    def rates(self, minutes: int) -> dict[str, Any]:
        """The `/api/history` document."""
        self.history.ledger = self.ledgers.get()
        return self.history.get(minutes)

    def verified(self) -> dict[str, Any]:
        """The `/api/verify` document."""
        ledger = self.ledgers.get()
        return verify_counts(ledger) if ledger is not None else {"jobs": []}

    def prime(self) -> None:
        """Compute the page's answers once in the background, so that even the first
        load of the page is served from the cache."""

        def work() -> None:
            try:
                self.cache.get("status", self.status)
                self.cache.get("history60", lambda: self.rates(60))
                self.cache.get("verify", self.verified)
            except MigratorError as exc:
                log.warning("cannot read the ledger yet: %s", exc)

        threading.Thread(target=work, name="prime", daemon=True).start()


def _json(doc: Any) -> bytes:
    return json.dumps(doc, separators=(",", ":")).encode()


def _minutes(query: dict[str, list[str]]) -> int:
    raw = query.get("minutes", ["60"])[0]
    try:
        minutes = int(raw)
    except ValueError:
        raise UsageError(f"minutes must be a whole number, not {raw!r}") from None
    return min(max(minutes, 1), MAX_MINUTES)


def serve(
    ledger_url: str, host: str = "127.0.0.1", port: int = 8080, allow_hosts: Sequence[str] = ()
) -> None:
    """Serve until interrupted (`migrator serve`); `allow_hosts`: more host names to answer
    for, besides addresses, localhost and this machine's names."""
    ledgers = LedgerWhenReady(ledger_url)
    try:
        # An unusable ledger (not migrator's, too old, unreachable) is an error now.
        ready = ledgers.get() is not None
        server = DashboardServer((host, port), ledgers, HostCheck(host, allow_hosts))
    except OSError as exc:
        _close(ledgers)
        raise UsageError(f"cannot listen on {host}:{port}: {exc.strerror or exc}") from None
    except BaseException:
        _close(ledgers)
        raise
    shown = f"[{host}]" if ":" in host else host
    server.prime()
    log.info("serving %s on http://%s:%d/ (Ctrl-C to stop)", ledgers.display_url, shown, port)
    if not ready:
        log.info("no jobs yet: the page fills in once the first job has made the ledger")
    try:
        server.serve_forever()
    finally:
        server.server_close()
        _close(ledgers)


def _close(ledgers: LedgerWhenReady) -> None:
    ledgers.close()
    if ledgers.ledger is not None:
        ledgers.ledger.close()
