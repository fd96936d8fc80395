"""Real signals sent to ``adaptertools merge`` in its first second, and the pieces behind them.

Until a command has imported torch and the library, the CLI only remembers SIGINT and SIGTERM
(``_boundary.StartupSignals``): a KeyboardInterrupt raised inside ``import torch`` was sometimes
swallowed (the merge ran on and wrote OUT, exit 0) or aborted the process (SIGABRT, "terminate
called after throwing an instance of 'pybind11::error_already_set'"). Each delay below gets its
own merge subprocess and one signal; every outcome must be one of:

- exit 130 (143 for SIGTERM), one ``error:`` line, nothing at OUT and nothing beside it;
- the signal came after the merge was done (OUT already existed right after it was sent): exit 0
  or 130/143, with OUT complete;
- the signal came before ``main`` ran (Python starting, ``import click``): the process dies of
  it, as any Python program does, with nothing written and no frame of the CLI's own functions.

Never exit 0 for a signal that came before OUT existed, never SIGABRT. Children get SIGINT as a
terminal's Ctrl-C finds it even when this test runs as a background job
(``helpers.cli.foreground``).
"""

from __future__ import annotations

import re
import signal
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch

import adaptertools as at
from adaptertools import _boundary, _signals, paths
from adaptertools.merging import streams
from adaptertools.tiny import TinyLlama, make_adapter, make_base

from helpers.cli import assert_nothing_written, start_cli

DELAYS = [round(0.05 + i * 1.15 / 13, 3) for i in range(14)]      # 0.05 .. 1.2 s
OWN_FRAME = re.compile(r'adaptertools[/\\](cli|_boundary)\.py", line \d+, in (?!<module>)')


def folder_bytes(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


def error_lines(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if line.strip()]


@pytest.fixture(scope="module")
def inputs(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("signals")
    base = make_base(root / "base", TinyLlama(), dtype=torch.bfloat16)
    at.save(make_adapter(TinyLlama()), root / "adapter", format="peft")
    at.merge(base, [root / "adapter"], root / "reference")
    return {"base": base, "adapter": root / "adapter",
            "reference": folder_bytes(root / "reference")}


def signal_a_merge(inputs, out: Path, delay: float, signum: int = signal.SIGINT) -> int:
    """One merge into ``out``, ``signum`` sent ``delay`` s after it started; checks the outcome
    (module docstring) and returns the exit status."""
    proc = start_cli("merge", inputs["base"], inputs["adapter"], "--out", out)
    try:
        time.sleep(delay)
        proc.send_signal(signum)
        done = out.exists()               # renamed into place before the signal was sent
        stdout, stderr = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    code, where = proc.returncode, f"{signal.Signals(signum).name} at {delay} s"
    assert code != -signal.SIGABRT, f"{where}: aborted: {stderr}"
    if code == 0:
        assert done, (f"{where}: exit 0, but OUT did not exist yet when the signal was sent; "
                      f"stderr: {stderr[-3000:]!r}")
        assert folder_bytes(out) == inputs["reference"], where
    elif code == _boundary.EXIT_CODES[signum]:
        lines = error_lines(stderr)
        assert len(lines) == 1 and lines[0].startswith(f"error: {_boundary.INTERRUPTED[signum]}"), \
            f"{where}: {stderr!r}"
        if out.exists():                   # the signal came as OUT was renamed into place
            assert folder_bytes(out) == inputs["reference"], where
        else:
            assert_nothing_written(out)
    elif code == -signum:                  # before main: Python's own handling, nothing of ours
        assert not OWN_FRAME.search(stderr), f"{where}: escaped the CLI: {stderr}"
        assert_nothing_written(out)
    else:
        pytest.fail(f"{where}: exit {code}: {stderr}")
    assert "Traceback" not in stdout
    return code


# ----------------------------------------------------------------------------- real signals

def test_sigint_in_the_first_second_of_a_merge(inputs, tmp_path):
    codes = [signal_a_merge(inputs, tmp_path / f"out-{i}", delay)
             for i, delay in enumerate(DELAYS)]
    assert 130 in codes, codes            # at least one signal came while there was work left


def test_sigterm_in_the_first_second_of_a_merge(inputs, tmp_path):
    codes = [signal_a_merge(inputs, tmp_path / f"out-{i}", delay, signal.SIGTERM)
             for i, delay in enumerate(DELAYS[1::4])]
    assert 143 in codes, codes


def test_a_second_ctrl_c_during_startup_exits_at_once(inputs, tmp_path):
    out = tmp_path / "out"
    proc = start_cli("merge", inputs["base"], inputs["adapter"], "--out", out)
    time.sleep(0.3)
    proc.send_signal(signal.SIGINT)
    time.sleep(0.05)
    proc.send_signal(signal.SIGINT)
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode in (130, -signal.SIGINT), stderr
    assert not OWN_FRAME.search(stderr), stderr
    if proc.returncode == 130:
        assert [line[:19] for line in error_lines(stderr)] == ["error: interrupted "], stderr
    assert_nothing_written(out)


def test_a_merge_started_with_sigint_ignored_keeps_ignoring_it(inputs, tmp_path):
    """As Python leaves it (a background job of a non-interactive shell): the CLI does not
    take Ctrl-C back; the merge runs to the end."""
    out = tmp_path / "out"
    proc = start_cli("merge", inputs["base"], inputs["adapter"], "--out", out, ignored=True)
    time.sleep(0.4)
    proc.send_signal(signal.SIGINT)
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 0, stderr
    assert folder_bytes(out) == inputs["reference"]


# ----------------------------------------------------------------------------- in process

@pytest.fixture
def handlers():
    """The test's own SIGINT/SIGTERM handlers, put back afterwards."""
    saved = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    signal.signal(signal.SIGINT, signal.default_int_handler)
    yield
    for signum, handler in saved.items():
        signal.signal(signum, handler)
    _signals.clear()          # what our handlers noted here must not stop later commits


@pytest.mark.parametrize("signum, raised", [(signal.SIGINT, KeyboardInterrupt),
                                            (signal.SIGTERM, _boundary.Terminated)])
def test_startup_signals_remembered_then_raised_at_ready(handlers, signum, raised):
    startup = _boundary.StartupSignals()
    startup.defer()
    signal.raise_signal(signum)           # handled here, in the main thread: only remembered
    assert startup.received == [signum]
    with pytest.raises(raised):
        startup.ready()
    assert signal.getsignal(signal.SIGINT) is _boundary._raise_interrupt
    assert signal.getsignal(signal.SIGTERM) is _boundary._raise_terminated
    startup.ready()                        # once only


@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
def test_a_signal_whose_exception_was_lost_still_stops_the_commit(handlers, tmp_path):
    """A handler that ran inside a ``__del__`` raised into the void (Python prints "Exception
    ignored in" and goes on): the atomic output must still refuse to rename, and leave
    nothing (_signals.py)."""
    class Finalized:
        def __del__(self):
            _boundary._raise_terminated(signal.SIGTERM, None)

    _signals.clear()
    out = tmp_path / "out"
    try:
        with pytest.raises(_boundary.Terminated), paths.atomic_output(out, is_dir=True) as tmp:
            (tmp / "a.txt").write_text("x")
            Finalized()                # dropped at once: its __del__ runs here
        assert list(tmp_path.iterdir()) == []
    finally:
        _signals.clear()


def test_startup_signals_without_a_signal_just_restore(handlers):
    startup = _boundary.StartupSignals()
    startup.defer()
    assert signal.getsignal(signal.SIGINT) == startup._record
    startup.ready()
    assert signal.getsignal(signal.SIGINT) is _boundary._raise_interrupt
    with pytest.raises(KeyboardInterrupt):
        signal.raise_signal(signal.SIGINT)


def test_startup_signals_leave_an_ignored_sigint_ignored(handlers):
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    startup = _boundary.StartupSignals()
    startup.defer()
    assert signal.getsignal(signal.SIGINT) is signal.SIG_IGN
    startup.ready()
    assert signal.getsignal(signal.SIGINT) is signal.SIG_IGN


def test_abandoned_writer_waits_for_writes_it_no_longer_tracks():
    """A Ctrl-C that interrupts ``_finish_one`` after its ``popleft``, or ``submit`` before its
    ``append``, leaves writes that ``pending`` no longer holds; ``abandon`` must still return
    only once the writing thread is idle (its caller closes the file next), and skip what is
    still queued."""
    release, started, done = threading.Event(), threading.Event(), []

    def slow_write(name):
        started.set()
        release.wait(timeout=30)
        done.append(name)

    with ThreadPoolExecutor(max_workers=1) as executor:
        writer = streams.OrderedWriter(executor, lambda n: None, depth=5)
        writer.submit(1, slow_write, "in flight")
        writer.submit(1, done.append, "queued")
        started.wait(timeout=30)
        writer.pending.clear()             # as interrupted _finish_one / submit leave them
        threading.Timer(0.2, release.set).start()
        writer.abandon()
        assert done == ["in flight"]
