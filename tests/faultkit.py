"""Helpers for the fault, crash and throttle tests: fast data, a mixed fault plan, a config
with quick retries, and one `assert_converged` that states what "complete" means."""

from __future__ import annotations

import functools
import hashlib
import json
import logging
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from conftest import CliResult, ledger_rows
from typer.testing import CliRunner

from migrator.cli import cli
from migrator.testkit.dicomgen import SyntheticInstance, upload_all
from migrator.testkit.fastgen import fast_dataset
from migrator.testkit.orthanc import OrthancProcess

_RUNNER = CliRunner()


def invoke(*args: str, env: dict[str, str] | None = None) -> CliResult:
    """Run `migrator ARGS` in this process (the same code as the console script, without
    the 2-3 s of a new interpreter); an exception that escaped the CLI fails the test."""
    logger = logging.getLogger("migrator")
    saved = (logger.handlers[:], logger.level, logger.propagate)
    try:
        result = _RUNNER.invoke(cli, list(args), env={"MIGRATOR_PROGRESS": "none", **(env or {})})
    finally:
        # The CLI points the logger at the runner's stderr, closed once it returns: put
        # things back for the tests that follow (caplog, other invocations).
        logger.handlers[:], logger.level, logger.propagate = saved
    if result.exception is not None and not isinstance(result.exception, SystemExit):
        raise AssertionError(f"migrator {args} raised {result.exception!r}") from result.exception
    return CliResult(result.exit_code, result.stdout, result.stderr)


def fast_fill(server: OrthancProcess, n: int, *, seed: int = 0) -> list[SyntheticInstance]:
    """Upload `n` quickly generated instances to `server`; returns them."""
    data = fast_dataset(n, seed=seed)
    upload_all(server, data)
    assert server.count() == n
    return data


def write_files(root: Path, data: list[SyntheticInstance]) -> None:
    """Write instances as a tree of .dcm files (one folder per series), for `import`."""
    for i, inst in enumerate(data):
        folder = root / inst.patient_id / inst.series_uid[-12:]
        folder.mkdir(parents=True, exist_ok=True)
        (folder / f"{i:06d}.dcm").write_bytes(inst.data)


def _toml(value: object) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, list | tuple):
        return "[" + ", ".join(_toml(v) for v in value) + "]"
    return json.dumps(value)


def write_config(path: Path, throttle: dict[str, object] | None = None, **top: object) -> Path:
    """A TOML config with quick retries (so faults cost little time), `top` keys and an
    optional [throttle] table."""
    lines = [f"{key} = {_toml(value)}" for key, value in top.items()]
    lines += ["[retry]", "max_attempts = 15", "backoff_initial = 0.05", "backoff_max = 0.5"]
    if throttle:
        lines += ["[throttle]", *(f"{k} = {_toml(v)}" for k, v in throttle.items())]
    path.write_text("\n".join(lines) + "\n")
    return path


def md5_of(data: bytes) -> str:
    """Hex MD5, as Orthanc prints it."""
    return hashlib.md5(data).hexdigest()


def assert_converged(
    ledger: Path | Callable[[str], list[Any]], data: list[SyntheticInstance], target: OrthancProcess
) -> None:
    """The job is complete and counted once: one `sent` row per instance, no lease left,
    runs' counters add up, the target holds exactly these instances, byte-identical.

    `ledger` is an SQLite ledger's path, or a function running SQL on the ledger.
    """
    query = ledger if callable(ledger) else functools.partial(ledger_rows, ledger)
    n = len(data)
    rows = query("SELECT state, COUNT(*), COUNT(DISTINCT orthanc_id) FROM instances GROUP BY state")
    assert [tuple(r) for r in rows] == [("sent", n, n)], rows
    assert query("SELECT COUNT(*) FROM instances WHERE lease_owner IS NOT NULL")[0][0] == 0
    total_bytes = sum(len(d.data) for d in data)
    assert query("SELECT SUM(size) FROM instances")[0][0] == total_bytes
    # Nothing counted twice: the runs' counters add up to the instances, exactly.
    assert tuple(query("SELECT SUM(sent), SUM(bytes) FROM runs")[0]) == (n, total_bytes)
    expected = {d.orthanc_id: md5_of(d.data) for d in data}
    assert sorted(target.instance_ids()) == sorted(expected)
    recorded = {r[0]: r[1] for r in query("SELECT orthanc_id, md5 FROM instances")}
    assert recorded == expected
    with ThreadPoolExecutor(8) as pool:
        stored = dict(zip(expected, pool.map(target.md5, expected), strict=True))
    assert stored == expected
