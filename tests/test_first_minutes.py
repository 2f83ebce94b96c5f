"""What a new user meets in the first minutes: `--help` that reads as sentences, a page
started before the first job, rows in flight told apart (transferring or queued), and a
rate chart that agrees with the rate shown above it."""

from __future__ import annotations

import inspect
import os
import re
import subprocess
from collections.abc import Iterator
from itertools import pairwise
from typing import Any

import typer
from conftest import MIGRATOR

from migrator.cli import cli

# A line that ends a sentence (possibly inside a closing bracket or quote).
SENTENCE_END = re.compile(r"[.!?:][)\]'\"`]*$")


def _commands() -> Iterator[tuple[list[str], Any]]:
    """Every command and group of the typer app, with the words that call it."""

    def walk(cmd: Any, path: list[str]) -> Iterator[tuple[list[str], Any]]:
        yield path, cmd
        if hasattr(cmd, "commands"):
            for name, sub in cmd.commands.items():
                yield from walk(sub, [*path, name])

    yield from walk(typer.main.get_command(cli), [])


COMMANDS = list(_commands())


def _help(path: list[str]) -> str:
    env = {**os.environ, "COLUMNS": "200", "TERMINAL_WIDTH": "200", "NO_COLOR": "1"}
    proc = subprocess.run(
        [*MIGRATOR, *path, "--help"], capture_output=True, text=True, env=env, timeout=60
    )
    assert proc.returncode == 0, proc.stderr
    return proc.stdout


def _description(text: str) -> list[list[str]]:
    """The paragraphs between the usage line and the first box, as stripped lines."""
    lines = text.splitlines()
    start = next(i for i, line in enumerate(lines) if line.strip().startswith("Usage:"))
    paragraphs: list[list[str]] = [[]]
    for line in lines[start + 1 :]:
        if line.lstrip().startswith("╭"):
            break
        if line.strip():
            paragraphs[-1].append(line.strip())
        elif paragraphs[-1]:
            paragraphs.append([])
    return [p for p in paragraphs if p]


def _listed(text: str) -> list[str]:
    """The rows of the Commands box."""
    rows, inside = [], False
    for line in text.splitlines():
        if line.startswith("╭─ Commands"):
            inside = True
        elif line.startswith("╰"):
            inside = False
        elif inside:
            rows.append(line.strip("│").rstrip())
    return rows


def test_every_command_has_help_in_full_sentences():
    assert len(COMMANDS) > 10
    for path, cmd in COMMANDS:
        name = " ".join(["migrator", *path])
        doc = inspect.cleandoc(cmd.help or "")
        assert doc, f"{name} has no help"
        first = doc.split("\n\n")[0]
        assert "\n" not in first, f"{name}: the first paragraph is not one line: {first!r}"
        text = _help(path)
        paragraphs = _description(text)
        assert paragraphs and paragraphs[0][0].startswith(first[:40]), (name, text)
        for paragraph in paragraphs:
            for line, following in pairwise(paragraph):
                assert SENTENCE_END.search(line), (
                    f"{name} --help breaks a sentence: {line!r} / {following!r}"
                )
        if hasattr(cmd, "commands"):
            rows = _listed(text)
            assert len(rows) == len(cmd.commands), (name, rows)
            for row in rows:
                # A row that starts blank continues the description of the one above.
                assert row.startswith(" ") and row[1] != " ", f"{name}: wrapped row {row!r}"
                assert len(row.split()) > 1, f"{name}: a command without help: {row!r}"
