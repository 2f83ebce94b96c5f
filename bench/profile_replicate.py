"""Profile: where ``migrator replicate`` spends its CPU, sampled by py-spy.

A source Orthanc receives N small instances; ``migrator replicate SRC TGT -c 8`` (direct,
no proxy, PostgreSQL or SQLite ledger) runs under ``py-spy record --format raw`` and the
folded stacks are summed per package (the innermost frame of a known package wins) and
per "own" function of migrator. Needs py-spy (``.venv/bin/pip install py-spy``) and root
or ptrace rights.

    .venv/bin/python bench/profile_replicate.py [--instances 3000] [--ledger sqlite]
"""

from __future__ import annotations

import argparse
import collections
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from benchkit import (
    Child,
    machine_facts,
    migrator_cmd,
    pg_database,
    print_facts,
    print_table,
    wait_quiet,
    write_results,
)

from migrator.testkit import OrthancProcess, iter_dataset, upload_all

PACKAGES = (
    ("migrator/", "migrator"),
    ("sqlalchemy/", "sqlalchemy"),
    ("psycopg", "psycopg"),
    ("sqlite3/", "sqlite3"),
    ("httpcore/", "httpcore"),
    ("httpx/", "httpx"),
    ("h11/", "h11"),
    ("anyio/", "anyio"),
    ("asyncio/", "asyncio"),
    ("selectors", "asyncio"),
    ("ssl", "ssl"),
    ("logging/", "logging"),
    ("rich/", "rich"),
    ("alembic/", "alembic"),
    ("importlib", "imports"),
    ("<frozen", "imports"),
)


def classify(stack: list[str]) -> str:
    """The package of the innermost frame that belongs to a known package."""
    for frame in reversed(stack):
        for needle, name in PACKAGES:
            if needle in frame:
                return name
    return "other"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--instances", type=int, default=3000)
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--ledger", choices=("sqlite", "postgresql"), default="postgresql")
    parser.add_argument("--rate", type=int, default=250, help="py-spy samples per second")
    args = parser.parse_args()
    pyspy = shutil.which("py-spy") or str(Path(sys.executable).with_name("py-spy"))
    facts = machine_facts()
    print_facts(facts)
    workdir = Path(tempfile.mkdtemp(prefix="profile-replicate-")).resolve()
    try:
        source = OrthancProcess(workdir / "source", name="source").start()
        target = OrthancProcess(workdir / "target", name="target").start()
        try:
            upload_all(source, iter_dataset(args.instances, seed=5), concurrency=8)
            time.sleep(3)
            wait_quiet()
            raw = workdir / "stacks.txt"
            with (
                pg_database("bench_profile")
                if args.ledger == "postgresql"
                else _null(f"sqlite:///{workdir / 'l.db'}") as url
            ):
                cmd = [
                    pyspy,
                    "record",
                    "--rate",
                    str(args.rate),
                    "--format",
                    "raw",
                    "--output",
                    str(raw),
                    "--nonblocking",
                    "--",
                    *migrator_cmd(),
                    "replicate",
                    source.url,
                    target.url,
                    "--ledger",
                    url,
                    "-c",
                    str(args.concurrency),
                    "--progress",
                    "none",
                ]
                child = Child.start(cmd, workdir / "run.log")
                code = child.finish(timeout=600)
                wall = (child.ended or 0) - child.started
            count = target.count()
        finally:
            source.stop(graceful=False)
            target.stop(graceful=False)
        per_package: collections.Counter[str] = collections.Counter()
        per_function: collections.Counter[str] = collections.Counter()
        total = 0
        for line in raw.read_text().splitlines():
            stack_text, _, n = line.rpartition(" ")
            if not n.isdigit():
                continue
            stack = stack_text.split(";")
            k = int(n)
            total += k
            if any(
                "(idle)" in f or "select (selectors.py" in f or "epoll" in f for f in stack[-2:]
            ):
                per_package["(idle: waiting in epoll)"] += k
                continue
            per_package[classify(stack)] += k
            own = [f for f in stack if "migrator/" in f and "testkit" not in f]
            if own:
                per_function[own[-1].split(" (")[0] + " (" + own[-1].split("/")[-1]] += k
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    print(
        f"\nexit {code}, target holds {count}/{args.instances}, {wall:.1f} s wall, "
        f"{total} samples at {args.rate}/s"
    )
    rows = [[name, n, f"{100 * n / total:.1f}%"] for name, n in per_package.most_common()]
    print_table(["innermost package", "samples", "share"], rows)
    print()
    rows2 = [[name, n, f"{100 * n / total:.1f}%"] for name, n in per_function.most_common(15)]
    print_table(["innermost migrator frame", "samples", "share"], rows2)
    doc: dict[str, Any] = {
        "host": facts,
        "params": vars(args),
        "exit_code": code,
        "wall_seconds": round(wall, 2),
        "target_count": count,
        "samples": total,
        "per_package": dict(per_package),
        "per_migrator_frame": dict(per_function.most_common(40)),
    }
    write_results("profile-replicate", doc)


class _null:
    def __init__(self, value: str) -> None:
        self.value = value

    def __enter__(self) -> str:
        return self.value

    def __exit__(self, *exc: object) -> None:
        return None


if __name__ == "__main__":
    main()
