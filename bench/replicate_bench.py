"""Benchmark: ``migrator replicate`` against a bare httpx loop and Orthanc's Replicate.py.

One run, one machine. A source Orthanc is filled with N small synthetic instances; every
Orthanc is reached through a :class:`migrator.testkit.Proxy` that adds ``rtt / 2`` of
latency each way, so one request round trip costs about ``rtt``. Then, each into a fresh
target Orthanc:

1. *bare*: the least a client must do, in a subprocess: page ``GET /instances``, then with
   32 connections ``GET /instances/{id}/file`` and ``POST /instances``. No ledger.
2. *migrator*: ``migrator replicate SRC TGT --ledger sqlite:///... -c 32 --progress none``.
3. *Replicate.py*: Orthanc's sequential sample script, run unmodified on the first M
   instances (stopped once the target holds M), extrapolated linearly to N.

The table is printed and written as JSON to ``bench/results/replicate-<timestamp>.json``.
Every run also records the CPU seconds of each component (client, proxies, Orthancs and
"other": whatever else ran on the machine), because on a small shared machine the client
is CPU-bound and wall clocks are noisy; the client CPU per instance is the steadier figure.

    .venv/bin/python bench/replicate_bench.py [--instances 2000] [--rtt 0.02]
        [--replicate-py-instances 300] [--concurrency 32] [--repeats 1]
        [--wait-quiet 120] [--py-spy-profile] [--skip-replicate-py] [--keep]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import re
import resource
import statistics
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent))

from benchkit import REPO, RESULTS, machine_cpu, migrator_cmd, proc_cpu_seconds, work_folder

from migrator.testkit import OrthancProcess, Proxy, iter_dataset, upload_all

REPLICATE_PY = Path("/usr/share/doc/orthanc/Samples/Python/Replicate.py")
# Replicate.py needs httplib2; Debian's python3-httplib2 provides it to the system Python.
REPLICATE_PYTHON = "/usr/bin/python3"
# Orthanc answers "Keep-Alive: timeout=1": expire idle pooled connections well before.
KEEPALIVE_EXPIRY = 0.5
STORED_OK = {"Success", "AlreadyStored"}


# -- the bare baseline (runs in its own process, like migrator) -------------------------


async def _request(
    client: httpx.AsyncClient, method: str, path: str, stats: dict[str, int], **kwargs: Any
) -> httpx.Response:
    """One request, retried on transport errors (keep-alive races) and 409 conflicts."""
    for attempt in range(5):
        try:
            resp = await client.request(method, path, **kwargs)
        except httpx.TransportError:
            if attempt == 4:
                raise
            stats["retries"] += 1
            continue
        if resp.status_code == 409 and attempt < 4:
            stats["retries"] += 1
            continue
        resp.raise_for_status()
        return resp
    raise AssertionError("unreachable")


async def bare_copy(
    source_url: str, target_url: str | None, concurrency: int, page: int = 1000
) -> dict[str, Any]:
    """Copy every instance of the source to the target with a plain concurrent loop.

    With ``target_url`` None the files are only read (used to warm the source up).
    Returns counts and the elapsed time, listing included.
    """
    limits = httpx.Limits(
        max_connections=concurrency,
        max_keepalive_connections=concurrency,
        keepalive_expiry=KEEPALIVE_EXPIRY,
    )
    stats = {"listed": 0, "sent": 0, "bytes": 0, "retries": 0}
    started = time.perf_counter()
    async with (
        httpx.AsyncClient(base_url=source_url, limits=limits, timeout=120) as src,
        httpx.AsyncClient(base_url=target_url or source_url, limits=limits, timeout=120) as tgt,
    ):
        ids: list[str] = []
        while True:
            resp = await _request(
                src, "GET", "instances", stats, params={"since": len(ids), "limit": page}
            )
            batch = resp.json()
            ids.extend(batch)
            if len(batch) < page:
                break
        stats["listed"] = len(ids)
        todo = iter(ids)

        async def worker() -> None:
            # One event loop: ``next`` on the shared iterator needs no lock.
            for instance_id in todo:
                data = (await _request(src, "GET", f"instances/{instance_id}/file", stats)).content
                stats["bytes"] += len(data)
                if target_url is None:
                    continue
                resp = await _request(
                    tgt,
                    "POST",
                    "instances",
                    stats,
                    content=data,
                    headers={"Content-Type": "application/dicom"},
                )
                status = resp.json().get("Status")
                if status not in STORED_OK:
                    raise RuntimeError(f"target refused {instance_id}: {status}")
                stats["sent"] += 1

        await asyncio.gather(*(worker() for _ in range(concurrency)))
    return {**stats, "elapsed": time.perf_counter() - started}


def bare_worker_main(argv: list[str]) -> None:
    """Entry point of the baseline subprocess: print one JSON line with the outcome."""
    parser = argparse.ArgumentParser(prog="replicate_bench.py --bare-worker")
    parser.add_argument("source")
    parser.add_argument("target")
    parser.add_argument("--concurrency", type=int, default=32)
    args = parser.parse_args(argv)
    print(json.dumps(asyncio.run(bare_copy(args.source, args.target, args.concurrency))))


# -- CPU accounting ---------------------------------------------------------------------


def wait_quiet(max_wait: float, threshold: float = 0.15) -> float:
    """Wait (up to ``max_wait`` s) until the machine is at most ``threshold`` busy.

    Samples /proc/stat over one second at a time; returns the last busy fraction. On a
    shared machine other jobs (test suites...) otherwise land in the middle of a run.
    """
    deadline = time.monotonic() + max_wait
    while True:
        busy0, total0 = machine_cpu()
        time.sleep(1.0)
        busy1, total1 = machine_cpu()
        load = (busy1 - busy0) / (total1 - total0) if total1 > total0 else 0.0
        if load <= threshold or time.monotonic() >= deadline:
            return load
        time.sleep(2.0)


class CpuMeter:
    """CPU seconds used during one measurement, per component.

    ``client`` is the measured subprocess (reaped children of this process), ``proxies``
    this process (the delay proxies' threads, plus light polling), the Orthancs by pid.
    """

    def __init__(self, orthancs: dict[str, OrthancProcess]) -> None:
        self.orthancs = orthancs
        self.before = self._snapshot()

    def _snapshot(self) -> dict[str, float]:
        own = resource.getrusage(resource.RUSAGE_SELF)
        kids = resource.getrusage(resource.RUSAGE_CHILDREN)
        busy, total = machine_cpu()
        snap = {
            "client": kids.ru_utime + kids.ru_stime,
            "proxies+bench": own.ru_utime + own.ru_stime,
            "machine_busy": busy,
            "machine_total": total,
        }
        for name, orthanc in self.orthancs.items():
            snap[name] = proc_cpu_seconds(orthanc.pid)
        return snap

    def done(self) -> dict[str, float]:
        """CPU seconds per component since construction, and machine utilisation."""
        after = self._snapshot()
        diff = {k: round(after[k] - self.before[k], 2) for k in after}
        total = diff.pop("machine_total")
        busy = diff.pop("machine_busy")
        # Whatever else ran on the machine meanwhile (other jobs, the kernel): noise.
        diff["other"] = round(max(busy - sum(diff.values()), 0.0), 2)
        diff["machine_utilisation"] = round(busy / total, 3) if total else float("nan")
        return diff


# -- measurements -----------------------------------------------------------------------


@dataclass
class Measure:
    """One timed transfer into one target."""

    name: str
    instances: int
    seconds: float
    target_count: int
    ok: bool
    detail: dict[str, Any] = field(default_factory=dict)

    @property
    def rate(self) -> float:
        """Instances per second."""
        return self.instances / self.seconds if self.seconds > 0 else float("nan")


class Bench:
    """Owns the Orthancs and proxies of one benchmark run."""

    def __init__(self, workdir: Path, args: argparse.Namespace) -> None:
        self.workdir = workdir
        self.args = args
        self.delay = args.rtt / 2
        self.source = OrthancProcess(workdir / "source", name="source")
        self.source_proxy: Proxy | None = None
        self.targets = 0

    @contextmanager
    def target(self, label: str) -> Iterator[tuple[OrthancProcess, Proxy]]:
        """A fresh target Orthanc (own storage) behind its own delay proxy."""
        self.targets += 1
        orthanc = OrthancProcess(
            self.workdir / f"target{self.targets}-{label}", name=f"target{self.targets}"
        )
        orthanc.start()
        proxy = Proxy("127.0.0.1", orthanc.http_port, delay=self.delay).start()
        try:
            yield orthanc, proxy
        finally:
            proxy.stop()
            orthanc.stop()

    def setup(self) -> dict[str, Any]:
        """Start and fill the source, warm it up, put its proxy in front."""
        n = self.args.instances
        self.source.start()
        started = time.perf_counter()
        upload_all(
            self.source,
            iter_dataset(n, size=self.args.size, seed=self.args.seed),
            concurrency=8,
        )
        fill = time.perf_counter() - started
        count = self.source.count()
        if count != n:
            raise RuntimeError(f"source holds {count} instances, expected {n}")
        # Let Orthanc's "stable" events (StableAge 2 s) pass, then read every file once so
        # no measurement pays for a cold cache that another did not.
        time.sleep(3)
        warm = asyncio.run(bare_copy(self.source.url, None, 8))
        self.source_proxy = Proxy("127.0.0.1", self.source.http_port, delay=self.delay).start()
        files = sum(1 for p in self.source.storage_dir.rglob("*") if p.is_file())
        return {
            "fill_seconds": round(fill, 2),
            "warmup_seconds": round(warm["elapsed"], 2),
            "mean_file_bytes": round(warm["bytes"] / max(warm["listed"], 1)),
            "source_storage_files": files,
            "orthanc_version": self.source.system().get("Version"),
        }

    def close(self) -> None:
        """Stop the source proxy and the source."""
        if self.source_proxy is not None:
            self.source_proxy.stop()
        self.source.stop()

    @property
    def src_url(self) -> str:
        """The source URL through its delay proxy."""
        assert self.source_proxy is not None
        return self.source_proxy.url

    def _requests(self, proxy: Proxy) -> dict[str, int]:
        assert self.source_proxy is not None
        counts: dict[str, int] = {}
        for side, p in (("source", self.source_proxy), ("target", proxy)):
            for (method, prefix), k in sorted(p.counts.items()):
                counts[f"{side} {method} {prefix}"] = k
        return counts

    def run_bare(self) -> Measure:
        """The baseline, as a subprocess so it does not share a GIL with the proxies."""
        assert self.source_proxy is not None
        with self.target("bare") as (orthanc, proxy):
            self.source_proxy.reset_counts()
            cmd = [
                sys.executable,
                str(Path(__file__).resolve()),
                "--bare-worker",
                self.src_url,
                proxy.url,
                "--concurrency",
                str(self.args.concurrency),
            ]
            background = wait_quiet(self.args.wait_quiet)
            cpu = CpuMeter({"source orthanc": self.source, "target orthanc": orthanc})
            started = time.perf_counter()
            proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
            wall = time.perf_counter() - started
            cpu_used = cpu.done()
            if proc.returncode != 0:
                raise RuntimeError(f"bare baseline failed:\n{proc.stderr}")
            inner = json.loads(proc.stdout.strip().splitlines()[-1])
            count = orthanc.count()
            return Measure(
                "bare httpx",
                self.args.instances,
                wall,
                count,
                count == self.args.instances,
                {
                    "in_process_seconds": round(inner["elapsed"], 3),
                    "retries": inner["retries"],
                    "cpu_seconds": cpu_used,
                    "busy_before_start": round(background, 3),
                    "requests": self._requests(proxy),
                },
            )

    def run_migrator(self, startup: float, profile: Path | None = None) -> Measure:
        """``migrator replicate`` as a subprocess with a fresh SQLite ledger.

        With ``profile``, the run happens under ``py-spy record`` (raw collapsed stacks
        written there); its timings are then inflated by the sampling.
        """
        assert self.source_proxy is not None
        with self.target("migrator-profiled" if profile else "migrator") as (orthanc, proxy):
            self.source_proxy.reset_counts()
            ledger = orthanc.workdir / "bench.db"
            cmd = [
                *self.args.migrator_cmd,
                "replicate",
                self.src_url,
                proxy.url,
                "--ledger",
                f"sqlite:///{ledger}",
                "-c",
                str(self.args.concurrency),
                "--progress",
                "none",
            ]
            if profile is not None:
                spy = [str(self.args.py_spy), "record", "-r", "100", "-f", "raw"]
                cmd = [*spy, "-o", str(profile), "--", *cmd]
            background = wait_quiet(self.args.wait_quiet)
            cpu = CpuMeter({"source orthanc": self.source, "target orthanc": orthanc})
            started = time.perf_counter()
            proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
            wall = time.perf_counter() - started
            cpu_used = cpu.done()
            count = orthanc.count()
            out = (proc.stdout + proc.stderr).strip()
            match = re.search(r"sent (\d+) \(.*?\) in ([\d.]+) s", out)
            return Measure(
                "migrator under py-spy" if profile else "migrator",
                self.args.instances,
                wall,
                count,
                proc.returncode == 0 and count == self.args.instances,
                {
                    "exit_code": proc.returncode,
                    "scheduler_seconds": float(match.group(2)) if match else None,
                    "startup_seconds": round(startup, 3),
                    "wall_minus_startup": round(wall - startup, 3),
                    "summary": out.splitlines()[-3:],
                    "cpu_seconds": cpu_used,
                    "busy_before_start": round(background, 3),
                    "requests": self._requests(proxy),
                },
            )

    def run_replicate_py(self) -> Measure:
        """Replicate.py on the first M instances, timed until the target holds M."""
        n = self.args.instances
        m = min(self.args.replicate_py_instances, n)
        with self.target("replicate-py") as (orthanc, proxy):
            # Replicate.py builds URLs as '%s/studies' % SOURCE: no trailing slash.
            cmd = [
                self.args.replicate_python,
                "-u",
                str(REPLICATE_PY),
                self.src_url.rstrip("/"),
                proxy.url.rstrip("/"),
            ]
            background = wait_quiet(self.args.wait_quiet)
            cpu = CpuMeter({"source orthanc": self.source, "target orthanc": orthanc})
            started = time.perf_counter()
            proc = subprocess.Popen(
                cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, cwd=orthanc.workdir
            )
            count, reached = 0, False
            deadline = started + self.args.replicate_py_timeout
            try:
                while time.perf_counter() < deadline:
                    # Polled on the target directly, not through its proxy.
                    count = orthanc.count()
                    if count >= m:
                        reached = True
                        break
                    if proc.poll() is not None:
                        count = orthanc.count()
                        reached = count >= m
                        break
                    time.sleep(0.05)
                elapsed = time.perf_counter() - started
            finally:
                stopped_early = proc.poll() is None
                if stopped_early:
                    proc.terminate()
                stderr = proc.communicate(timeout=30)[1].decode(errors="replace")
                cpu_used = cpu.done()
            if proc.returncode not in (0, -15) and not reached:
                raise RuntimeError(f"Replicate.py failed ({proc.returncode}):\n{stderr[-2000:]}")
            return Measure(
                "Replicate.py",
                count,
                elapsed,
                count,
                reached,
                {
                    "measured_instances": count,
                    "measured_seconds": round(elapsed, 3),
                    "extrapolated_to": n,
                    "extrapolated_seconds": round(elapsed * n / max(count, 1), 2),
                    "stopped_early": stopped_early,
                    "cpu_seconds": cpu_used,
                    "busy_before_start": round(background, 3),
                    "how": (
                        f"run unmodified with {self.args.replicate_python} "
                        f"(Python {_python_version(self.args.replicate_python)}, system "
                        "httplib2); it copies everything, so it was stopped once the target "
                        f"held {m} instances (polled every 50 ms)"
                    ),
                },
            )


def _python_version(python: str) -> str:
    out = subprocess.run(
        [python, "-c", "import platform; print(platform.python_version())"],
        capture_output=True,
        text=True,
        check=False,
    )
    return out.stdout.strip() or "?"


def time_startup(cmd: list[str], runs: int = 3) -> float:
    """Median wall time of ``cmd --help`` (interpreter start plus imports)."""
    times = []
    for _ in range(runs):
        started = time.perf_counter()
        subprocess.run([*cmd, "--help"], capture_output=True, check=True)
        times.append(time.perf_counter() - started)
    return statistics.median(times)


def _git_rev() -> str:
    rev = subprocess.run(
        ["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"],
        capture_output=True,
        text=True,
        check=False,
    ).stdout.strip()
    dirty = subprocess.run(
        ["git", "-C", str(REPO), "status", "--porcelain", "--untracked-files=no"],
        capture_output=True,
        text=True,
        check=False,
    ).stdout.strip()
    return rev + ("-dirty" if dirty else "")


def cpu_line(measure: Measure) -> str:
    """One line with the CPU seconds each component used during a measurement."""
    cpu = dict(measure.detail.get("cpu_seconds", {}))
    util = cpu.pop("machine_utilisation", float("nan"))
    parts = ", ".join(f"{k} {v:.1f}" for k, v in cpu.items())
    before = measure.detail.get("busy_before_start", float("nan"))
    return (
        f"  CPU seconds: {parts}; machine busy {util:.0%} of all cores "
        f"(was {before:.0%} just before the start)"
    )


def summarize_profile(path: Path, top: int = 15) -> list[tuple[float, str]]:
    """Group py-spy's collapsed stacks into coarse buckets; return (share, bucket) pairs.

    Samples whose leaf is a thread-pool worker waiting for work (the idle ledger thread)
    are left out.
    """
    buckets: dict[str, int] = {}
    total = 0
    for line in path.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        if not count.isdigit():
            continue
        frames = stack.split(";")
        if frames[-1].startswith("_worker (concurrent/futures/thread.py"):
            continue
        n = int(count)
        total += n
        if "_find_and_load" in stack and "current_async_library (httpcore" in stack:
            key = "httpcore: failing `import sniffio` on every lock/event"
        elif "has_expired (httpcore" in stack or "_assign_requests_to_connections" in stack:
            key = "httpcore: connection-pool scans (has_expired, assign)"
        elif "Runner.run" not in stack and "Thread._bootstrap" not in stack:
            key = "start-up: imports, CLI"
        elif "ledger.py" in stack or "Scheduler.db" in stack or "sqlalchemy" in stack:
            key = "ledger (SQLite via SQLAlchemy, own thread)"
        elif any(m in stack for m in ("httpx", "httpcore", "h11", "anyio")):
            key = "httpx/httpcore/h11/anyio: other request work"
        elif "asyncio" in stack:
            key = "asyncio event loop, sockets"
        else:
            key = "other (migrator code, md5, ...)"
        buckets[key] = buckets.get(key, 0) + n
    ranked = sorted(buckets.items(), key=lambda kv: -kv[1])[:top]
    return [(n / total, key) for key, n in ranked] if total else []


def _versions() -> dict[str, str | None]:
    """Versions of the HTTP stack; sniffio matters: without it httpcore retries a failing
    ``import sniffio`` on every lock it creates (several per request)."""
    from importlib.metadata import PackageNotFoundError, version

    out: dict[str, str | None] = {}
    for name in ("httpx", "httpcore", "anyio", "h11", "sniffio"):
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            out[name] = None
    return out


def _client_cpu(measure: Measure) -> float:
    """CPU seconds the client process used, per instance, in milliseconds."""
    cpu = measure.detail.get("cpu_seconds", {}).get("client", float("nan"))
    return 1000 * cpu / measure.instances if measure.instances else float("nan")


def _median(measures: list[Measure]) -> Measure:
    """The run with the median wall time (the lower middle one for an even count)."""
    ordered = sorted(measures, key=lambda m: m.seconds)
    return ordered[(len(ordered) - 1) // 2]


def print_table(rows: list[dict[str, Any]]) -> None:
    """Print the result rows as an aligned text table."""
    head = ["run", "instances", "seconds", "inst/s", "note"]
    lines = [head] + [
        [
            r["run"],
            str(r["instances"]),
            f"{r['seconds']:.2f}",
            f"{r['rate']:.0f}",
            r["note"],
        ]
        for r in rows
    ]
    widths = [max(len(line[i]) for line in lines) for i in range(len(head))]
    for k, line in enumerate(lines):
        print("  ".join(cell.ljust(w) for cell, w in zip(line, widths, strict=True)).rstrip())
        if k == 0:
            print("  ".join("-" * w for w in widths))


def main() -> None:
    """Run every measurement once (or ``--repeats`` times) and report."""
    if len(sys.argv) > 1 and sys.argv[1] == "--bare-worker":
        bare_worker_main(sys.argv[2:])
        return
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--instances", type=int, default=2000)
    parser.add_argument("--rtt", type=float, default=0.02, help="added round trip, seconds")
    parser.add_argument("--replicate-py-instances", type=int, default=300)
    parser.add_argument("--replicate-py-timeout", type=float, default=1800)
    parser.add_argument("--replicate-python", default=REPLICATE_PYTHON)
    parser.add_argument("--skip-replicate-py", action="store_true")
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=1, help="bare+migrator pairs")
    parser.add_argument("--size", type=int, default=16, help="image rows = columns")
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument(
        "--wait-quiet",
        type=float,
        default=120,
        help="before each run, wait up to this many seconds for the CPUs to be idle",
    )
    parser.add_argument(
        "--py-spy-profile",
        action="store_true",
        help="also run migrator once under py-spy and summarise where its CPU goes",
    )
    parser.add_argument("--keep", action="store_true", help="keep the work directory")
    args = parser.parse_args()
    if not args.skip_replicate_py and not REPLICATE_PY.exists():
        # Debian ships Orthanc's sample scripts in orthanc-doc, not in orthanc.
        parser.error(
            f"{REPLICATE_PY} not found: apt-get install orthanc-doc, or --skip-replicate-py"
        )
    args.migrator_cmd = migrator_cmd()
    args.py_spy = Path(sys.executable).with_name("py-spy")
    if args.py_spy_profile and not args.py_spy.exists():
        parser.error(f"--py-spy-profile needs {args.py_spy} (pip install py-spy)")

    cpus = os.cpu_count() or 0
    affinity = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else cpus
    print(
        f"CPUs: {cpus} (usable {affinity}). The source and target Orthancs, the delay "
        "proxies (threads of this process) and the client under test all share them."
    )
    print(
        f"{args.instances} instances of {args.size}x{args.size} px, added RTT "
        f"{args.rtt * 1000:.0f} ms (delay {args.rtt * 500:.0f} ms each way), "
        f"concurrency {args.concurrency}"
    )
    stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
    with work_folder("replicate-bench-", keep=args.keep) as workdir:
        bench = Bench(workdir, args)
        try:
            print("filling the source...", flush=True)
            setup = bench.setup()
            print(
                f"  {args.instances} instances in {setup['fill_seconds']} s, "
                f"~{setup['mean_file_bytes']} bytes each, Orthanc {setup['orthanc_version']}"
            )
            startup = time_startup(args.migrator_cmd)
            print(f"`migrator --help` takes {startup:.2f} s (Python start-up and imports)")
            bares: list[Measure] = []
            migrators: list[Measure] = []
            for i in range(args.repeats):
                tag = f" [{i + 1}/{args.repeats}]" if args.repeats > 1 else ""
                print(f"bare httpx loop{tag}...", flush=True)
                bares.append(bench.run_bare())
                print(f"  {bares[-1].seconds:.2f} s, target holds {bares[-1].target_count}")
                print(cpu_line(bares[-1]))
                print(f"migrator replicate{tag}...", flush=True)
                migrators.append(bench.run_migrator(startup))
                mig = migrators[-1]
                print(
                    f"  {mig.seconds:.2f} s, exit {mig.detail['exit_code']}, "
                    f"target holds {mig.target_count}"
                )
                print(cpu_line(mig))
            profiled: Measure | None = None
            profile_summary: list[tuple[float, str]] = []
            if args.py_spy_profile:
                profile_path = RESULTS / f"replicate-{stamp}-migrator.pyspy.txt"
                RESULTS.mkdir(parents=True, exist_ok=True)
                print("migrator replicate under py-spy (not used in the ratios)...", flush=True)
                profiled = bench.run_migrator(startup, profile=profile_path)
                print(f"  {profiled.seconds:.2f} s, exit {profiled.detail['exit_code']}")
                if profile_path.exists():
                    profile_summary = summarize_profile(profile_path)
                    print(f"  samples in {profile_path.relative_to(REPO)}; where the CPU went:")
                    for share, key in profile_summary:
                        print(f"  {share:6.1%}  {key}")
            repl: Measure | None = None
            if not args.skip_replicate_py:
                m = min(args.replicate_py_instances, args.instances)
                print(f"Replicate.py on the first {m} instances...", flush=True)
                repl = bench.run_replicate_py()
                print(f"  {repl.seconds:.2f} s for {repl.target_count} instances")
                print(cpu_line(repl))
        finally:
            bench.close()

    bare, mig = _median(bares), _median(migrators)
    ratio = mig.seconds / bare.seconds
    inner_bare = bare.detail["in_process_seconds"]
    sched = mig.detail["scheduler_seconds"]
    rows: list[dict[str, Any]] = [
        {
            "run": "bare httpx (subprocess wall)",
            "instances": bare.instances,
            "seconds": bare.seconds,
            "rate": bare.rate,
            "note": (
                f"in-process {inner_bare:.2f} s; client CPU {_client_cpu(bare):.1f} ms/inst; "
                f"target count {bare.target_count}"
            ),
        },
        {
            "run": "migrator replicate (wall)",
            "instances": mig.instances,
            "seconds": mig.seconds,
            "rate": mig.rate,
            "note": (
                f"exit {mig.detail['exit_code']}; startup {startup:.2f} s; scheduler "
                f"{sched} s; client CPU {_client_cpu(mig):.1f} ms/inst; target count "
                f"{mig.target_count}; x{ratio:.2f} of bare (goal <= 1.1)"
            ),
        },
    ]
    repl_ratio = None
    if repl is not None:
        extra = repl.detail["extrapolated_seconds"]
        repl_ratio = extra / mig.seconds
        rows += [
            {
                "run": "Replicate.py (measured)",
                "instances": repl.instances,
                "seconds": repl.seconds,
                "rate": repl.rate,
                "note": "sequential, one new connection per request",
            },
            {
                "run": f"Replicate.py (extrapolated to {args.instances})",
                "instances": args.instances,
                "seconds": extra,
                "rate": args.instances / extra,
                "note": f"x{repl_ratio:.1f} of migrator (goal >= 20)",
            },
        ]
    print()
    print_table(rows)
    print()
    print(
        f"migrator / bare = {ratio:.2f} (wall clocks, both include Python start-up); "
        f"in-process: scheduler {sched} s / bare loop {inner_bare:.2f} s"
        + (f" = {sched / inner_bare:.2f}" if sched else "")
    )
    cpu_ratio = _client_cpu(mig) / _client_cpu(bare)
    print(
        f"client CPU per instance: migrator {_client_cpu(mig):.1f} ms, bare "
        f"{_client_cpu(bare):.1f} ms (x{cpu_ratio:.2f}; less sensitive to other load)"
    )
    if repl is not None:
        print(f"Replicate.py / migrator = {repl_ratio:.1f} (extrapolated)")
        print(
            f"Replicate.py: {repl.detail['how']}. It opens a new connection per request; "
            "the proxy does not delay TCP handshakes, so a real network would cost it one "
            "more round trip per request (the ratio above is conservative)."
        )
    noisy = [
        m
        for m in [*bares, *migrators, *([repl] if repl else [])]
        if m.detail.get("cpu_seconds", {}).get("other", 0) > 0.1 * m.seconds * affinity
    ]
    if noisy:
        print(
            "WARNING: other processes used over 10% of the CPUs during "
            + ", ".join(sorted({m.name for m in noisy}))
            + " (see 'other' CPU seconds): the timings are noisy; use --repeats 3."
        )
    print(
        f"Note: {affinity} CPU(s) shared by {3 if repl else 2}+ Orthanc processes, "
        "the Python delay proxies and the client under test."
    )

    doc = {
        "timestamp": stamp,
        "host": {
            "cpus": cpus,
            "usable_cpus": affinity,
            "python": platform.python_version(),
            "packages": _versions(),
            "migrator_rev": _git_rev(),
            "note": "Orthanc processes, delay proxies and the client share the CPUs",
        },
        "params": {
            "instances": args.instances,
            "rtt": args.rtt,
            "delay_one_way": args.rtt / 2,
            "concurrency": args.concurrency,
            "replicate_py_instances": args.replicate_py_instances,
            "size": args.size,
            "repeats": args.repeats,
        },
        "setup": setup,
        "migrator_startup_seconds": round(startup, 3),
        "bare": [asdict(b) | {"rate": b.rate} for b in bares],
        "migrator": [asdict(m) | {"rate": m.rate} for m in migrators],
        "replicate_py": asdict(repl) | {"rate": repl.rate} if repl else None,
        "migrator_profiled": asdict(profiled) if profiled else None,
        "migrator_profile_buckets": [
            {"share": round(share, 4), "bucket": key} for share, key in profile_summary
        ],
        "ratios": {
            "migrator_over_bare": round(ratio, 3),
            "migrator_over_bare_client_cpu": round(cpu_ratio, 3),
            "migrator_over_bare_goal": 1.1,
            "replicate_py_over_migrator": round(repl_ratio, 2) if repl_ratio else None,
            "replicate_py_over_migrator_goal": 20,
        },
        "table": rows,
    }
    RESULTS.mkdir(parents=True, exist_ok=True)
    out = RESULTS / f"replicate-{stamp}.json"
    out.write_text(json.dumps(doc, indent=2) + "\n")
    print(f"written {out.relative_to(REPO)}")


if __name__ == "__main__":
    main()
