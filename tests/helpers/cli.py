"""Running the CLI in tests and checking its failure contract (one line, exit code, no output).

``run_cli`` is the one way a test runs ``adaptertools ARGS`` to the end: in process through
click's ``CliRunner`` (the default) or through ``cli._main``, or in a fresh interpreter
(``how="subprocess"``: the exit code from the interpreter, stderr as written, start-up imports,
the CLI's own warning hook).
``start_cli`` starts the same command without waiting, for tests that signal the running child.
"""

from __future__ import annotations

import os
import signal
import subprocess as _subprocess
import sys
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, get_args

from click.testing import CliRunner

from adaptertools.cli import _main, cli


@dataclass
class Outcome:
    code: int
    stdout: str
    stderr: str
    crash: BaseException | None = None   # an exception that escaped the CLI (in-process runs)
    output: str = ""                     # what a terminal shows: stdout and stderr together


def cli_argv(*args, launcher: str | Path | None = None) -> list[str]:
    """The command line of ``adaptertools ARGS`` in a fresh interpreter: ``python -m
    adaptertools.cli ARGS``, or ``python LAUNCHER ARGS`` for a script that patches something
    and then calls ``adaptertools.cli.main()``."""
    start = ["-m", "adaptertools.cli"] if launcher is None else [str(launcher)]
    return [sys.executable, *start, *map(str, args)]


def _child_env(env: Mapping[str, str | None] | None) -> dict[str, str] | None:
    if env is None:
        return None
    merged = dict(os.environ)
    for key, value in env.items():
        if value is None:
            merged.pop(key, None)
        else:
            merged[key] = value
    return merged


class _Boundary:
    """``cli._main`` as CliRunner invokes a command: the whole boundary in process (click's usage
    errors become one ``error:`` line only there), without ``main``'s exit that skips the
    interpreter's teardown."""

    name = "adaptertools"

    def main(self, args=(), prog_name=None, **extra) -> None:
        _main(list(args))


How = Literal["runner", "main", "subprocess"]


def run_cli(*args, how: How = "runner", expect: int | None = None, input: str | None = None,
            env: Mapping[str, str | None] | None = None, launcher: str | Path | None = None,
            timeout: float = 120, terminal_width: int | None = None) -> Outcome:
    """``adaptertools ARGS`` run to the end; stdout and stderr come back apart.

    ``how``: ``"runner"``, the ``cli`` group through click's CliRunner; ``"main"``, in process
    through ``cli._main`` (what the console script runs, less its exit); ``"subprocess"``, in a
    fresh interpreter (``launcher``: a script run instead of ``-m adaptertools.cli``) for at most
    ``timeout`` seconds. ``expect``: the exit code the run must end with (no check when None);
    a run that ends otherwise, or with an exception escaping the CLI, fails the test here.
    ``input``: text on stdin (none: empty stdin). ``env``: variables set for the run on top of
    this process's environment, ``None`` values removed. ``terminal_width``: the width click
    formats help for, in process (a subprocess reads COLUMNS from ``env``)."""
    if how not in get_args(How):
        raise ValueError(f"how={how!r}: one of {get_args(How)}")
    if launcher is not None and how != "subprocess":
        raise ValueError("a launcher script runs in a subprocess: how='subprocess'")
    if how == "subprocess":
        proc = _subprocess.run(cli_argv(*args, launcher=launcher), input=input,
                               stdin=_subprocess.DEVNULL if input is None else None,
                               capture_output=True, text=True, timeout=timeout,
                               env=_child_env(env))
        outcome = Outcome(proc.returncode, proc.stdout, proc.stderr,
                          output=proc.stdout + proc.stderr)
    else:
        command = cli if how == "runner" else _Boundary()
        result = CliRunner().invoke(command, [str(a) for a in args], input=input, env=env,
                                    terminal_width=terminal_width)
        crash = None if isinstance(result.exception, (SystemExit, type(None))) else result.exception
        outcome = Outcome(result.exit_code, result.stdout, result.stderr, crash, result.output)
    if expect is not None:
        assert outcome.crash is None, f"exception escaped the CLI: {outcome.crash!r}"
        assert outcome.code == expect, (outcome.code, outcome.stderr)
    return outcome


@contextmanager
def foreground(ignored: bool = False) -> Iterator[None]:
    """Children started inside get SIGINT at its default, as from a terminal (``ignored``: as
    ignored, as a non-interactive shell starts a background job). A process started with SIGINT
    ignored keeps it so, and Python leaves it ignored too: Ctrl-C then does nothing. A test run
    started with ``pytest ... &`` from a script hands that on to every child unless the test
    says otherwise, which is what made ``test_real_sigint_to_a_running_merge`` hang once.
    (A handler, unlike SIG_IGN, is reset to the default in an exec'd child.)"""
    previous = signal.getsignal(signal.SIGINT)
    signal.signal(signal.SIGINT, signal.SIG_IGN if ignored else signal.default_int_handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)


def start_cli(*args, launcher: str | Path | None = None,
              ignored: bool = False) -> _subprocess.Popen:
    """``adaptertools ARGS`` started in a fresh interpreter (as ``run_cli(how="subprocess")``
    runs it) and left running, SIGINT as from a terminal (see ``foreground``); empty stdin,
    stdout and stderr piped as text."""
    with foreground(ignored):
        return _subprocess.Popen(cli_argv(*args, launcher=launcher), stdin=_subprocess.DEVNULL,
                                 stdout=_subprocess.PIPE, stderr=_subprocess.PIPE, text=True)


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
    leftovers = leftovers_beside(dst)
    assert leftovers == [], f"temporary leftovers beside {dst}: {leftovers}"


def leftovers_beside(dst: Path) -> list[str]:
    return [p.name for p in dst.parent.iterdir() if p.name.startswith("." + dst.name)]
