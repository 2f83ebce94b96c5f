"""`migrator demo`: the main job end to end on two throwaway local Orthancs.

Starts a source and a target Orthanc in a temporary folder, fills the source with
synthetic studies, replicates it through a fresh ledger, shows the status and checks that
the target holds every instance with the same MD5. Nothing outside the folder is touched.
"""

from __future__ import annotations

import hashlib
import logging
import tempfile
import time
from pathlib import Path

from migrator.app import replicate
from migrator.config import Settings
from migrator.errors import EXIT_INCOMPLETE, EXIT_OK
from migrator.ledger.store import Ledger
from migrator.testkit.dicomgen import iter_dataset, upload_all
from migrator.testkit.orthanc import OrthancProcess
from migrator.views.reports import render_status, status_document

log = logging.getLogger("migrator")


def run_demo(instances: int = 500, concurrency: int = 8, keep: Path | None = None) -> int:
    """Run the demo; returns the exit code (0 when the target is a byte-exact copy)."""
    with tempfile.TemporaryDirectory(prefix="migrator-demo-") as tmp:
        root = keep or Path(tmp)
        root.mkdir(parents=True, exist_ok=True)
        for name in ("source", "target"):
            (root / name).mkdir(exist_ok=True)
        source = OrthancProcess(root / "source", name="demo-source")
        target = OrthancProcess(root / "target", name="demo-target")
        with source, target:
            log.info("source Orthanc at %s, target Orthanc at %s", source.url, target.url)
            started = time.monotonic()
            upload_all(source, iter_dataset(instances, size=64), concurrency=4)
            log.info(
                "filled the source with %d synthetic instances in %.1f s",
                source.count(),
                time.monotonic() - started,
            )
            settings = Settings(ledger=f"sqlite:///{root / 'ledger.db'}", concurrency=concurrency)
            report = replicate(source.url, target.url, settings)
            print(report.summary())
            ledger = Ledger.open(settings.ledger)
            try:
                print(render_status(status_document(ledger)))
            finally:
                ledger.close()
            return _check_copy(source, target, report.exit_code)


def _check_copy(source: OrthancProcess, target: OrthancProcess, code: int) -> int:
    source_ids, target_ids = sorted(source.instance_ids()), sorted(target.instance_ids())
    if source_ids != target_ids:
        print(f"demo FAILED: source has {len(source_ids)} instances, target {len(target_ids)}")
        return EXIT_INCOMPLETE
    differ = [
        i
        for i in source_ids
        if hashlib.md5(source.file(i)).hexdigest() != hashlib.md5(target.file(i)).hexdigest()
    ]
    if differ:
        print(f"demo FAILED: {len(differ)} instances differ, e.g. {differ[0]}")
        return EXIT_INCOMPLETE
    print(f"demo OK: the target holds all {len(target_ids)} instances, byte-identical (MD5)")
    return code if code != EXIT_OK else EXIT_OK
