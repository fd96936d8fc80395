"""Running the CLI in tests and checking its failure contract (one line, exit code, no output)."""

from __future__ import annotations

import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from click.testing import CliRunner

from adaptertools.cli import cli


@dataclass
class Outcome:
    code: int
    stdout: str
    stderr: str
    crash: BaseException | None = None   # an exception that escaped the CLI (in-process runs)


def run_subprocess(*args: str) -> Outcome:
    proc = subprocess.run([sys.executable, "-m", "adaptertools.cli", *map(str, args)],
                          capture_output=True, text=True, timeout=120)
    return Outcome(proc.returncode, proc.stdout, proc.stderr)


def run_inprocess(*args: str) -> Outcome:
    result = CliRunner().invoke(cli, [str(a) for a in args])
    crash = None if isinstance(result.exception, (SystemExit, type(None))) else result.exception
    return Outcome(result.exit_code, result.stdout, result.stderr, crash)


def stderr_lines(outcome: Outcome) -> list[str]:
    return [line for line in outcome.stderr.splitlines() if line.strip()]


def assert_cli_error(outcome: Outcome, fragments: list[str], *, code: int = 1) -> str:
    """Exit ``code``, exactly one ``error:`` line naming every fragment, no traceback."""
    assert outcome.crash is None, f"exception escaped the CLI: {outcome.crash!r}"
    assert "Traceback" not in outcome.stdout + outcome.stderr
    lines = stderr_lines(outcome)
    assert len(lines) == 1, f"expected one stderr line, got {outcome.stderr!r}"
    line = lines[0]
    assert line.startswith("error:"), line
    for fragment in fragments:
        assert fragment in line, f"{fragment!r} not in {line!r}"
    assert "\x1b" not in outcome.stderr, "escape sequences in the error line"
    assert outcome.code == code, (outcome.code, outcome.stderr)
    return line


def assert_nothing_written(dst: Path) -> None:
    assert not os.path.lexists(dst), f"{dst} was created"
    leftovers = [p.name for p in dst.parent.iterdir() if p.name.startswith("." + dst.name)]
    assert leftovers == [], f"temporary leftovers beside {dst}: {leftovers}"


def leftovers_beside(dst: Path) -> list[str]:
    return [p.name for p in dst.parent.iterdir() if p.name.startswith("." + dst.name)]
