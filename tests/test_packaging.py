"""The package as users install it: a wheel (`pip install .`) in a fresh virtual environment.

The wheel is built from a copy of the working tree, so that the build leaves nothing in the
checkout. The fresh environment gets the wheel itself through pip and, to stay fast and
offline, reads the third-party dependencies from this environment's site-packages through a
`.pth` line (never the source checkout: the test checks where `migrator` is imported from).
`.ci/run` does the same once with dependencies resolved from the index.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import pytest

from migrator.ledger import db

REPO = Path(__file__).resolve().parent.parent

pytestmark = [pytest.mark.packaging, pytest.mark.timeout(180)]


def _run(*args: str | Path, cwd: Path, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    env["MIGRATOR_PROGRESS"] = "none"
    return subprocess.run(
        [str(a) for a in args], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout
    )


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A wheel built from a copy of the working tree."""
    src = tmp_path_factory.mktemp("src")
    for name in ("pyproject.toml", "README.md"):
        shutil.copy2(REPO / name, src / name)
    skip = shutil.ignore_patterns("__pycache__", "*.pyc")
    for name in ("migrator", "migrations"):
        shutil.copytree(REPO / name, src / name, ignore=skip)
    dist = tmp_path_factory.mktemp("dist")
    built = _run(sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", dist, src, cwd=dist)
    assert built.returncode == 0, built.stderr
    return next(dist.glob("migrator-*.whl"))


@pytest.fixture(scope="module")
def venv(wheel: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A fresh virtual environment with the wheel installed; returns its bin folder."""
    root = tmp_path_factory.mktemp("venv")
    made = _run(sys.executable, "-m", "venv", "--without-pip", root, cwd=root)
    assert made.returncode == 0, made.stderr
    bindir = root / "bin"
    installed = _run(
        *(sys.executable, "-m", "pip", "--python", bindir / "python", "install", "-q"),
        *("--no-deps", "--no-index", wheel),
        cwd=root,
    )
    assert installed.returncode == 0, installed.stderr
    purelib = Path(
        _run(
            bindir / "python",
            "-c",
            "import sysconfig; print(sysconfig.get_paths()['purelib'])",
            cwd=root,
        ).stdout.strip()
    )
    # Dependencies only: a line of a .pth file is added to sys.path as is, and the .pth
    # files found there (this environment's editable install of migrator) are not run.
    (purelib / "deps.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    return bindir


def test_wheel_ships_every_module_and_the_revisions_inside_the_package(wheel):
    names = set(zipfile.ZipFile(wheel).namelist())
    for path in (REPO / "migrator").rglob("*.py"):
        assert f"migrator/{path.relative_to(REPO / 'migrator')}" in names
    for path in (REPO / "migrations").rglob("*.py"):
        assert f"migrator/_migrations/{path.relative_to(REPO / 'migrations')}" in names
    # Never a top-level `migrations` package, a name other distributions use too.
    assert not [n for n in names if n.startswith("migrations/")]


def test_installed_wheel_upgrades_an_old_ledger(venv, tmp_path):
    where = _run(venv / "python", "-c", "import migrator; print(migrator.__file__)", cwd=tmp_path)
    assert where.stdout.startswith(str(venv.parent)), where.stdout + where.stderr

    ledger = f"sqlite:///{tmp_path / 'old.db'}"
    old = sorted(db.known_revisions())[-2]
    engine = db.make_engine(ledger, must_exist=False)
    try:
        db.upgrade(engine, old)
    finally:
        engine.dispose()
    migrator = venv / "migrator"

    assert _run(migrator, "--help", cwd=tmp_path).returncode == 0
    refused = _run(migrator, "status", "--ledger", ledger, cwd=tmp_path)
    assert refused.returncode == 2, refused.stderr
    assert "internal error" not in refused.stderr
    assert f"revision {old}" in refused.stderr and "db upgrade" in refused.stderr

    upgraded = _run(migrator, "db", "upgrade", "--ledger", ledger, cwd=tmp_path)
    assert upgraded.returncode == 0, upgraded.stderr
    assert f"{old} -> {db.head_revision()}" in upgraded.stdout

    current = _run(migrator, "db", "current", "--ledger", ledger, cwd=tmp_path)
    assert current.returncode == 0, current.stderr
    assert f"ledger revision {db.head_revision()}" in current.stdout
    status = _run(migrator, "status", "--ledger", ledger, cwd=tmp_path)
    assert status.returncode == 0, status.stderr
