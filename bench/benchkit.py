"""Shared helpers of the hand-run benchmarks in ``bench/`` (not a test fixture).

Machine facts, a PostgreSQL database per run, a proxy that timestamps requests, a child
process whose peak RSS and CPU come from ``wait4``, and the table / JSON output.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]


def _snapshot_code() -> Path:
    """Measure a frozen copy of the code: the working tree may change while a benchmark
    runs (other work goes on in the same checkout), and a ledger created by one version
    must be resumed by the same one. The package and its alembic revisions are copied to
    a temporary folder that this process and every child (via PYTHONPATH, which comes
    before the editable install's finder) import from."""
    inherited = os.environ.get("MIGRATOR_BENCH_SNAPSHOT")
    if inherited and Path(inherited, "migrator").is_dir():
        dest = Path(inherited)
    else:
        import atexit
        import tempfile

        dest = Path(tempfile.mkdtemp(prefix="migrator-snapshot-"))
        skip = shutil.ignore_patterns("__pycache__", "*.pyc")
        shutil.copytree(REPO / "migrator", dest / "migrator", ignore=skip)
        shutil.copytree(REPO / "migrations", dest / "migrations", ignore=skip)
        atexit.register(shutil.rmtree, dest, ignore_errors=True)
        os.environ["MIGRATOR_BENCH_SNAPSHOT"] = str(dest)
    sys.path.insert(0, str(dest))
    os.environ["PYTHONPATH"] = os.pathsep.join(
        p for p in (str(dest), os.environ.get("PYTHONPATH", "")) if p
    )
    return dest


SNAPSHOT = _snapshot_code()

from migrator.testkit.proxy import Proxy  # noqa: E402  (from the snapshot)

RESULTS = REPO / "bench" / "results"
PG_ADMIN_URL = os.environ.get("MIGRATOR_BENCH_PG", "postgresql://postgres@127.0.0.1:5432/test")


def migrator_cmd() -> list[str]:
    """The console script of this venv (what a user runs)."""
    exe = Path(sys.executable).with_name("migrator")
    if exe.exists():
        return [str(exe)]
    found = shutil.which("migrator")
    return [found] if found else [sys.executable, "-m", "migrator"]


# -- machine facts ----------------------------------------------------------------------


def _cmd_out(cmd: list[str]) -> str:
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, check=False, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return "?"
    return (out.stdout or out.stderr).strip().splitlines()[0] if (out.stdout or out.stderr) else "?"


def machine_facts() -> dict[str, Any]:
    """CPU, memory and software versions of this machine."""
    cpu_model = "?"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu_model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    mem_mb = None
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal"):
                mem_mb = int(line.split()[1]) // 1024
    except OSError:
        pass
    rev = _cmd_out(["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"])
    dirty = subprocess.run(
        ["git", "-C", str(REPO), "status", "--porcelain", "--untracked-files=no"],
        capture_output=True,
        text=True,
        check=False,
    ).stdout.strip()
    tree = hashlib.sha1()
    for path in sorted([*SNAPSHOT.glob("migrator/**/*.py"), *SNAPSHOT.glob("migrations/**/*.py")]):
        tree.update(path.relative_to(SNAPSHOT).as_posix().encode() + b"\0" + path.read_bytes())
    changed = subprocess.run(
        ["git", "-C", str(REPO), "status", "--porcelain", "--", "migrator", "migrations"],
        capture_output=True,
        text=True,
        check=False,
    ).stdout.split("\n")
    return {
        "migrator_tree_sha1": tree.hexdigest()[:12],
        "migrator_snapshot": str(SNAPSHOT),
        "uncommitted_at_snapshot": [line.strip() for line in changed if line.strip()],
        "cpus": os.cpu_count(),
        "usable_cpus": len(os.sched_getaffinity(0)),
        "cpu_model": cpu_model,
        "mem_mb": mem_mb,
        "loadavg_at_start": os.getloadavg(),
        "python": platform.python_version(),
        "orthanc": _cmd_out(
            [os.environ.get("MIGRATOR_ORTHANC_BIN", "/usr/sbin/Orthanc"), "--version"]
        ),
        "postgresql": _cmd_out(["psql", "--version"]),
        "migrator_rev": rev + ("-dirty" if dirty else ""),
        "note": "Orthanc processes, the Python delay proxies (threads of the bench process), "
        "PostgreSQL and migrator all share these CPUs",
    }


def print_facts(facts: dict[str, Any]) -> None:
    print(
        f"machine: {facts['usable_cpus']} CPUs ({facts['cpu_model']}), {facts['mem_mb']} MB; "
        f"{facts['orthanc']}; {facts['postgresql']}; Python {facts['python']}; "
        f"migrator {facts['migrator_rev']} (tree {facts['migrator_tree_sha1']})"
    )
    print("  (Orthancs, proxies, PostgreSQL and migrator share the CPUs)")


# -- output -----------------------------------------------------------------------------


def print_table(head: list[str], rows: list[list[Any]]) -> None:
    """An aligned text table."""
    lines = [head] + [[_cell(c) for c in r] for r in rows]
    widths = [max(len(line[i]) for line in lines) for i in range(len(head))]
    for k, line in enumerate(lines):
        print("  ".join(c.ljust(w) for c, w in zip(line, widths, strict=True)).rstrip())
        if k == 0:
            print("  ".join("-" * w for w in widths))


def _cell(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.3f}" if abs(value) < 10 else f"{value:.1f}"
    return str(value)


def write_results(name: str, doc: dict[str, Any]) -> Path:
    """Write ``bench/results/<name>-<timestamp>.json``."""
    stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
    RESULTS.mkdir(parents=True, exist_ok=True)
    out = RESULTS / f"{name}-{stamp}.json"
    out.write_text(json.dumps({"timestamp": stamp, **doc}, indent=2, default=str) + "\n")
    print(f"written {out.relative_to(REPO)}")
    return out


# -- PostgreSQL -------------------------------------------------------------------------


@contextmanager
def work_folder(prefix: str, *, keep: bool = False) -> Iterator[Path]:
    """A new temporary folder for one benchmark, removed at the end unless `keep` (then
    its path is printed). Servers started in it must be stopped inside the block."""
    workdir = Path(tempfile.mkdtemp(prefix=prefix)).resolve()
    try:
        yield workdir
    finally:
        if keep:
            print(f"work directory kept: {workdir}")
        else:
            shutil.rmtree(workdir, ignore_errors=True)


@contextmanager
def pg_database(prefix: str) -> Iterator[str]:
    """A fresh database for one measurement, dropped afterwards; yields its URL."""
    import psycopg

    name = f"{prefix}_{uuid.uuid4().hex[:10]}"
    with psycopg.connect(PG_ADMIN_URL, autocommit=True, connect_timeout=5) as admin:
        admin.execute(f'CREATE DATABASE "{name}"')
    base = PG_ADMIN_URL.rsplit("/", 1)[0]
    try:
        yield f"{base}/{name}"
    finally:
        with psycopg.connect(PG_ADMIN_URL, autocommit=True, connect_timeout=5) as admin:
            admin.execute(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = %s",
                (name,),
            )
            admin.execute(f'DROP DATABASE IF EXISTS "{name}"')


# -- a proxy that timestamps requests ---------------------------------------------------


class TimedProxy(Proxy):
    """A testkit Proxy that also records when (time.monotonic) each request began."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.times: list[tuple[float, str, str]] = []
        self._times_lock = threading.Lock()

    def _on_request(self, method: str, path: str) -> Any:
        with self._times_lock:
            self.times.append((time.monotonic(), method, path))
        return super()._on_request(method, path)

    def first(self, method: str, prefix: str, suffix: str = "") -> float | None:
        """Monotonic time of the first request matching, or None."""
        with self._times_lock:
            for t, m, p in self.times:
                if m == method and p.startswith(prefix) and p.endswith(suffix):
                    return t
        return None

    def clear_times(self) -> None:
        with self._times_lock:
            self.times.clear()


# -- child processes with rusage --------------------------------------------------------


@dataclass
class Child:
    """A started subprocess, reaped with wait4 (CPU seconds). Its peak RSS is the kernel's
    high-water mark VmHWM of its own address space, sampled at every `alive()` while it
    runs: wait4's ru_maxrss is useless here, since Linux folds the hiwater RSS of the
    address space replaced by exec (the parent's, with Python's vfork) into it."""

    proc: subprocess.Popen[bytes]
    started: float
    log_path: Path
    exit_code: int | None = None
    max_rss_mb: float | None = None
    cpu_seconds: float | None = None
    ended: float | None = None

    @classmethod
    def start(cls, cmd: list[str], log_path: Path, env: dict[str, str] | None = None) -> Child:
        log = open(log_path, "wb")  # noqa: SIM115 - kept open for the child's lifetime
        started = time.monotonic()
        proc = subprocess.Popen(
            cmd,
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            env={**os.environ, **(env or {})},
        )
        log.close()
        return cls(proc, started, log_path)

    @property
    def pid(self) -> int:
        return self.proc.pid

    def sample(self) -> None:
        try:
            with open(f"/proc/{self.proc.pid}/status") as handle:
                for line in handle:
                    if line.startswith("VmHWM:"):
                        self.max_rss_mb = max(self.max_rss_mb or 0.0, int(line.split()[1]) / 1024)
                        break
        except (OSError, ValueError):
            pass

    def alive(self) -> bool:
        if self.exit_code is not None:
            return False
        self.sample()
        pid, status, ru = os.wait4(self.proc.pid, os.WNOHANG)
        if pid == 0:
            return True
        self._reaped(status, ru)
        return False

    def _reaped(self, status: int, ru: Any) -> None:
        self.ended = time.monotonic()
        self.exit_code = os.waitstatus_to_exitcode(status)
        self.proc.returncode = self.exit_code  # keep Popen from waiting again
        self.cpu_seconds = ru.ru_utime + ru.ru_stime

    def signal(self, sig: int = signal.SIGTERM) -> None:
        if self.exit_code is None:
            self.proc.send_signal(sig)

    def finish(self, timeout: float = 120) -> int:
        """Wait for the exit (SIGKILL after `timeout`); returns the exit code."""
        deadline = time.monotonic() + timeout
        while self.alive():
            if time.monotonic() > deadline:
                self.proc.kill()
                _, status, ru = os.wait4(self.proc.pid, 0)
                self._reaped(status, ru)
                break
            time.sleep(0.01)
        assert self.exit_code is not None
        return self.exit_code

    def log_tail(self, lines: int = 15) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""


def proc_cpu_seconds(pid: int | None) -> float:
    """User + system CPU seconds of a live process (0 if unknown)."""
    if pid is None:
        return 0.0
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def percentile(values: list[float], q: float) -> float:
    """Nearest-rank percentile (q in 0..100) of a non-empty list."""
    ordered = sorted(values)
    k = max(0, min(len(ordered) - 1, round(q / 100 * len(ordered) + 0.5) - 1))
    return ordered[k]


# -- machine load -----------------------------------------------------------------------


def machine_cpu() -> tuple[float, float]:
    """(busy, total) CPU seconds of the whole machine since boot, from /proc/stat."""
    values = [int(v) for v in Path("/proc/stat").read_text().split("\n")[0].split()[1:]]
    idle = values[3] + (values[4] if len(values) > 4 else 0)
    tick = os.sysconf("SC_CLK_TCK")
    return (sum(values) - idle) / tick, sum(values) / tick


class MachineMeter:
    """Machine-wide CPU use between construction and `done()`: how busy all cores were,
    and how many CPU seconds went to processes other than the ones we account for."""

    def __init__(self) -> None:
        self.busy0, self.total0 = machine_cpu()
        self.t0 = time.monotonic()

    def done(self, accounted_cpu: float = 0.0) -> dict[str, float]:
        busy, total = machine_cpu()
        d_busy, d_total = busy - self.busy0, total - self.total0
        return {
            "wall": round(time.monotonic() - self.t0, 2),
            "machine_busy_fraction": round(d_busy / d_total, 3) if d_total else float("nan"),
            "machine_busy_cpu_s": round(d_busy, 2),
            "accounted_cpu_s": round(accounted_cpu, 2),
            "other_cpu_s": round(max(d_busy - accounted_cpu, 0.0), 2),
        }


def wait_quiet(threshold: float = 0.3, max_wait: float = 45.0, sample: float = 2.0) -> float:
    """Wait (at most `max_wait` s) until the machine's CPUs are less than `threshold` busy
    over `sample` seconds: other sessions may share this machine. Returns the last busy
    fraction seen (reported with each measurement)."""
    deadline = time.monotonic() + max_wait
    while True:
        busy0, total0 = machine_cpu()
        time.sleep(sample)
        busy, total = machine_cpu()
        frac = (busy - busy0) / max(total - total0, 1e-9)
        if frac < threshold or time.monotonic() > deadline:
            return round(frac, 3)


def import_profile(
    modules: tuple[str, ...] = (
        "migrator.cli",
        "migrator.app",
        "migrator.ledger.store",
        "migrator.ends.folder.source",
        "sqlalchemy",
        "alembic",
        "pydicom",
        "numpy",
        "httpx",
        "typer",
        "rich",
        "psycopg",
    ),
) -> dict[str, float]:
    """Cumulative import time (ms, `python -X importtime`) of `import migrator.cli`, for
    a few packages, each where it is first imported."""
    out = subprocess.run(
        [sys.executable, "-X", "importtime", "-c", "import migrator.cli"],
        capture_output=True,
        text=True,
        check=False,
    ).stderr
    found: dict[str, float] = {}
    for line in out.splitlines():
        if not line.startswith("import time:") or "|" not in line:
            continue
        _, cumulative, name = line.split("|")
        name = name.strip()
        if name in modules and name not in found:
            with suppress(ValueError):
                found[name] = round(int(cumulative) / 1000, 1)
    return found
