"""Throwaway Orthanc servers for tests, demos and benchmarks.

:class:`OrthancProcess` writes a self-contained JSON configuration into a work directory,
runs the Orthanc binary on it and offers a few synchronous REST helpers. Nothing is shared
with a system-wide Orthanc: storage, index, ports and log all live in the work directory.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import time
import weakref
from pathlib import Path
from types import TracebackType
from typing import Any, Self

import httpx

__all__ = ["DEFAULT_ORTHANC_BIN", "OrthancProcess", "free_port"]

DEFAULT_ORTHANC_BIN = "/usr/sbin/Orthanc"

# Orthanc answers "Keep-Alive: timeout=1" and closes idle connections after a second;
# expiring pooled connections earlier on our side avoids reusing one that is being closed.
_KEEPALIVE_EXPIRY = 0.5


def free_port() -> int:
    """Return a TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def wait_port(port: int, timeout: float = 10) -> None:
    """Return once something listens on 127.0.0.1:`port` (TimeoutError after `timeout` s)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with socket.socket() as sock:
            if sock.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.05)
    raise TimeoutError(f"nothing listens on {port}")


class _PortTaken(RuntimeError):
    """Orthanc could not bind a port chosen for it."""


def _log_tail(path: Path, lines: int = 40) -> str:
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return "(no log)"
    return "\n".join(text.splitlines()[-lines:])


def _terminate(proc: subprocess.Popen[bytes]) -> None:
    # Finalizer for processes whose owner was garbage-collected or never stopped them:
    # a stray Orthanc would keep its ports and storage directory busy.
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


class OrthancProcess:
    """One Orthanc server process with its own configuration, storage and ports.

    The HTTP and DICOM ports are picked once and kept across :meth:`restart`, so URLs
    handed out earlier stay valid. The configuration is rewritten on every :meth:`start`,
    which lets a test change :attr:`extra` and restart. ``http_compression`` is
    ``HttpCompressionEnabled``: on, as in Orthanc's own default and Debian's config (the
    server gzips its answers to clients that accept gzip).
    """

    def __init__(
        self,
        workdir: Path,
        *,
        name: str = "orthanc",
        users: dict[str, str] | None = None,
        lua: str | None = None,
        extra: dict[str, Any] | None = None,
        http_port: int | None = None,
        http_compression: bool = True,
    ) -> None:
        self.workdir = Path(workdir)
        self.name = name
        self.users = dict(users) if users else None
        self.lua = lua
        self.extra: dict[str, Any] = dict(extra or {})
        self.http_compression = http_compression
        # Ports chosen here are chosen again if another process takes one first.
        self._own_port = http_port is None
        self.http_port = http_port if http_port is not None else free_port()
        self.dicom_port = free_port()
        self.config_path = self.workdir / "orthanc.json"
        self.log_path = self.workdir / "orthanc.log"
        self.lua_path = self.workdir / "script.lua"
        self.binary = os.environ.get("MIGRATOR_ORTHANC_BIN", DEFAULT_ORTHANC_BIN)
        self._proc: subprocess.Popen[bytes] | None = None
        self._finalizer: weakref.finalize | None = None
        self._client: httpx.Client | None = None

    # -- configuration -----------------------------------------------------------------

    @property
    def storage_dir(self) -> Path:
        """Folder holding the attachment files (``StorageDirectory``)."""
        return Path(self.config()["StorageDirectory"])

    @property
    def index_dir(self) -> Path:
        """Folder holding the SQLite index (``IndexDirectory``)."""
        return Path(self.config()["IndexDirectory"])

    def config(self) -> dict[str, Any]:
        """Return the configuration that :meth:`start` writes, ``extra`` applied last."""
        storage = str((self.workdir / "storage").resolve())
        cfg: dict[str, Any] = {
            "Name": self.name,
            "StorageDirectory": storage,
            "IndexDirectory": storage,
            "HttpPort": self.http_port,
            "DicomPort": self.dicom_port,
            "RemoteAccessAllowed": True,
            "AuthenticationEnabled": self.users is not None,
            "Plugins": [],
            "HttpThreadsCount": 50,
            "StableAge": 2,
            "SaveJobs": False,
            "ConcurrentJobs": 1,
            "MaximumStorageSize": 0,
            "MaximumPatientCount": 0,
            "OverwriteInstances": False,
            "HttpCompressionEnabled": self.http_compression,
        }
        if self.users is not None:
            cfg["RegisteredUsers"] = dict(self.users)
        if self.lua is not None:
            cfg["LuaScripts"] = [str(self.lua_path.resolve())]
        cfg.update(self.extra)
        return cfg

    def write_config(self) -> Path:
        """Write the configuration (and the Lua script, if any); return the config path."""
        self.workdir.mkdir(parents=True, exist_ok=True)
        if self.lua is not None:
            self.lua_path.write_text(self.lua)
        cfg = self.config()
        Path(cfg["StorageDirectory"]).mkdir(parents=True, exist_ok=True)
        Path(cfg["IndexDirectory"]).mkdir(parents=True, exist_ok=True)
        self.config_path.write_text(json.dumps(cfg, indent=2))
        return self.config_path

    # -- process lifecycle -------------------------------------------------------------

    @property
    def url(self) -> str:
        """Base URL of the REST API, with a trailing slash."""
        return f"http://127.0.0.1:{self.http_port}/"

    @property
    def auth(self) -> tuple[str, str] | None:
        """Basic-auth credentials of the first registered user, or ``None``."""
        if not self.users:
            return None
        user, password = next(iter(self.users.items()))
        return (user, password)

    @property
    def pid(self) -> int | None:
        """Process ID while running, else ``None``."""
        return self._proc.pid if self.running else None  # type: ignore[union-attr]

    @property
    def running(self) -> bool:
        """Whether the Orthanc process is alive."""
        return self._proc is not None and self._proc.poll() is None

    def start(self, timeout: float = 30) -> Self:
        """Spawn Orthanc and wait until ``GET /system`` answers.

        Raises ``RuntimeError`` with the end of the log when the process exits early or
        does not answer within ``timeout`` seconds.
        """
        if self.running:
            return self
        # A restart keeps its ports (its URL is known); a first start may choose others.
        retries = 0 if self._proc is not None else 3
        for _ in range(retries):
            try:
                return self._start(timeout)
            except _PortTaken:
                # Between free_port() and Orthanc's bind, another process (a parallel
                # test's connection) took the port: choose others.
                self.dicom_port = free_port()
                if self._own_port:
                    self.http_port = free_port()
        return self._start(timeout)

    def _log_since(self, offset: int) -> str:
        try:
            with open(self.log_path, "rb") as log:
                log.seek(offset)
                return log.read().decode(errors="replace")
        except OSError:
            return ""

    def _start(self, timeout: float) -> Self:
        self.write_config()
        logged = self.log_path.stat().st_size if self.log_path.exists() else 0
        with open(self.log_path, "ab") as log:
            self._proc = subprocess.Popen(
                [self.binary, str(self.config_path)],
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                cwd=self.workdir,
            )
        self._finalizer = weakref.finalize(self, _terminate, self._proc)
        deadline = time.monotonic() + timeout
        while True:
            code = self._proc.poll()
            if code is not None:
                if "is privileged or already in use" in self._log_since(logged):
                    raise _PortTaken(
                        f"Orthanc {self.name!r} could not bind its ports; log tail "
                        f"({self.log_path}):\n{_log_tail(self.log_path)}"
                    )
                raise RuntimeError(
                    f"Orthanc {self.name!r} exited with code {code} during startup; "
                    f"log tail ({self.log_path}):\n{_log_tail(self.log_path)}"
                )
            try:
                resp = httpx.get(self.url + "system", auth=self.auth, timeout=1.0)
                if resp.status_code == 200:
                    return self
            except httpx.TransportError:
                pass
            if time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(
                    f"Orthanc {self.name!r} did not answer on {self.url} within {timeout} s; "
                    f"log tail ({self.log_path}):\n{_log_tail(self.log_path)}"
                )
            time.sleep(0.05)

    def stop(self, timeout: float = 15, *, graceful: bool = True) -> None:
        """SIGTERM the process and wait; SIGKILL it after ``timeout`` seconds.

        A graceful stop of Orthanc 1.10.1 takes about 3 s (its HTTP and DICOM servers
        wind down on timers). ``graceful=False`` sends SIGKILL at once, which is enough
        for a server whose storage is about to be thrown away.
        """
        if self._client is not None:
            self._client.close()
            self._client = None
        proc, self._proc = self._proc, None
        if self._finalizer is not None:
            self._finalizer.detach()
            self._finalizer = None
        if proc is None or proc.poll() is not None:
            return
        if not graceful:
            proc.kill()
            proc.wait()
            return
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()

    def restart(self, timeout: float = 30) -> Self:
        """Stop then start again with the same ports and a freshly written config."""
        self.stop()
        return self.start(timeout)

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    def log_tail(self, lines: int = 40) -> str:
        """Return the last lines of the Orthanc log."""
        return _log_tail(self.log_path, lines)

    # -- REST helpers --------------------------------------------------------------------

    def client(self, **kwargs: Any) -> httpx.Client:
        """Return a new ``httpx.Client`` bound to this server (caller closes it).

        Keyword arguments are passed to ``httpx.Client`` and override the defaults.
        """
        options: dict[str, Any] = {
            "base_url": self.url,
            "auth": self.auth,
            "timeout": 60.0,
            "limits": httpx.Limits(keepalive_expiry=_KEEPALIVE_EXPIRY),
        }
        options.update(kwargs)
        return httpx.Client(**options)

    def _http(self) -> httpx.Client:
        if self._client is None:
            self._client = self.client()
        return self._client

    def _request(self, method: str, path: str, **kwargs: Any) -> httpx.Response:
        # One retry on a transport error covers the keep-alive race described above;
        # every helper below is idempotent, POST /instances included.
        try:
            resp = self._http().request(method, path, **kwargs)
        except httpx.TransportError:
            resp = self._http().request(method, path, **kwargs)
        resp.raise_for_status()
        return resp

    def system(self) -> dict[str, Any]:
        """Return ``GET /system``."""
        return dict(self._request("GET", "system").json())

    def upload(self, data: bytes) -> dict[str, Any]:
        """POST one DICOM file to ``/instances`` and return Orthanc's JSON answer."""
        resp = self._request(
            "POST", "instances", content=data, headers={"Content-Type": "application/dicom"}
        )
        return dict(resp.json())

    def instance_ids(self) -> list[str]:
        """Return the IDs of all stored instances."""
        return list(self._request("GET", "instances").json())

    def count(self) -> int:
        """Return the number of stored instances (``CountInstances``)."""
        return int(self._request("GET", "statistics").json()["CountInstances"])

    def file(self, instance_id: str) -> bytes:
        """Return the stored DICOM file of an instance."""
        return self._request("GET", f"instances/{instance_id}/file").content

    def delete_instance(self, instance_id: str) -> None:
        """Delete one instance."""
        self._request("DELETE", f"instances/{instance_id}")

    def md5(self, instance_id: str) -> str:
        """Return the MD5 Orthanc recorded for the instance's DICOM file.

        Orthanc answers 404 (raised as ``httpx.HTTPStatusError``) when the file was stored
        with ``StoreMD5ForAttachments`` set to false.
        """
        return self._request("GET", f"instances/{instance_id}/attachments/dicom/md5").text.strip()

    def __repr__(self) -> str:
        state = f"pid={self.pid}" if self.running else "stopped"
        return f"OrthancProcess(name={self.name!r}, url={self.url!r}, {state})"
