"""Database benchmark: `migrator import postgresql://` of an Orthanc whose index and files
live in PostgreSQL (Debian's orthanc-postgresql plugins) against `migrator replicate` from
that same Orthanc while it still runs, and the import's peak RSS as the database grows.

    .venv/bin/python bench/database_bench.py [--instances 5000] [--concurrency 8]
        [--stages 4] [--size 128]

Goals: the import is at least as fast as replicate from the running Orthanc (same run,
same data, same concurrency), and its peak RSS stays flat as the database grows.

One database is filled in `--stages` steps (instances of size x size 8-bit pixels). After
each step the Orthanc is stopped and the database imported into a fresh target (a new
process, a new SQLite ledger): time, rate, peak RSS (VmHWM) and CPU. At the last step,
before stopping, `migrator replicate` copies the running Orthanc into another fresh
target with the same concurrency. Every target's count is checked.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from benchkit import (
    Child,
    machine_facts,
    migrator_cmd,
    print_facts,
    print_table,
    work_folder,
    write_results,
)

from migrator.testkit.dbplugins import db_url, fresh_database, plugin_orthanc
from migrator.testkit.dicomgen import upload_all
from migrator.testkit.fastgen import iter_fast_dataset
from migrator.testkit.orthanc import OrthancProcess


def _run(cmd: list[str], log: Path) -> dict[str, Any]:
    """Run one migrator process to its end; its wall time, peak RSS and CPU."""
    child = Child.start(cmd, log, env={"MIGRATOR_PROGRESS": "none"})
    code = child.finish(timeout=3600)
    if code != 0:
        raise SystemExit(f"{' '.join(cmd[:3])} exited {code}:\n{child.log_tail()}")
    assert child.ended is not None
    return {
        "seconds": child.ended - child.started,
        "peak_rss_mb": child.max_rss_mb,
        "cpu_seconds": child.cpu_seconds,
    }


def _target(workdir: Path, name: str) -> OrthancProcess:
    return OrthancProcess(workdir / name, name=name).start()


def main() -> None:
    """Fill, measure, print the table and write the JSON results."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--instances", type=int, default=5000)
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--stages", type=int, default=4)
    parser.add_argument("--size", type=int, default=128)
    args = parser.parse_args()
    facts = machine_facts()
    print_facts(facts)
    rows: list[list[Any]] = []
    doc: dict[str, Any] = {"facts": facts, "args": vars(args), "imports": []}
    conc = ["-c", str(args.concurrency), "--fixed"]
    with work_folder("migrator-dbbench-") as work, fresh_database("postgresql") as name:
        source = plugin_orthanc(work / "source", "postgresql", name)
        url = db_url("postgresql", name)
        held = 0
        for stage in range(1, args.stages + 1):
            want = args.instances * stage // args.stages
            source.start(120)
            started = time.monotonic()
            upload_all(
                source, iter_fast_dataset(want - held, seed=stage, size=args.size), concurrency=8
            )
            print(f"filled {want} instances ({time.monotonic() - started:.0f} s)")
            held = want
            assert source.count() == held
            if stage == args.stages:
                target = _target(work, "replicated")
                ledger = f"sqlite:///{work / 'replicate.db'}"
                cmd = [*migrator_cmd(), "replicate", source.url, target.url, "--ledger", ledger]
                got = _run([*cmd, *conc], work / "replicate.log")
                assert target.count() == held, target.count()
                target.stop()
                doc["replicate"] = {"instances": held, **got}
                rows.append(["replicate (running Orthanc)", held, *_cells(held, got)])
            source.stop()
            target = _target(work, f"imported-{stage}")
            ledger = f"sqlite:///{work / f'import-{stage}.db'}"
            cmd = [*migrator_cmd(), "import", url, target.url, "--ledger", ledger, *conc]
            got = _run(cmd, work / f"import-{stage}.log")
            assert target.count() == held, target.count()
            target.stop()
            doc["imports"].append({"instances": held, **got})
            rows.append(["import postgresql://", held, *_cells(held, got)])
    print_table(["run", "instances", "seconds", "inst/s", "peak RSS MiB", "CPU s"], rows)
    last, rep = doc["imports"][-1], doc["replicate"]
    speedup = rep["seconds"] / last["seconds"]
    rss = [i["peak_rss_mb"] for i in doc["imports"]]
    print(f"import vs replicate at {last['instances']}: {speedup:.2f}x (goal >= 1)")
    print(f"import peak RSS from {rss[0]:.0f} to {rss[-1]:.0f} MiB as the database grew")
    doc["speedup"] = speedup
    write_results("database", doc)


def _cells(n: int, got: dict[str, Any]) -> list[Any]:
    return [got["seconds"], n / got["seconds"], got["peak_rss_mb"], got["cpu_seconds"]]


if __name__ == "__main__":
    main()
