"""The CLI's boundary: what happens to signals and exceptions between ``main`` and a command.

- Signals: SIGINT and SIGTERM are remembered, not acted on, from the start of ``main`` until
  the command has imported torch and the library (``ready``), then honoured at once
  (``StartupSignals``); exit 130 and 143, nothing left at OUT.
- Exceptions: every one ends as one ``error:`` line (``handle_errors``): the library's
  ``OptionError`` exits 2 with a usage hint, its other errors and OSError exit 1, anything else
  is an ``internal error`` line (exit 1); ``--debug`` / ADAPTERTOOLS_DEBUG=1 add the traceback.
"""

from __future__ import annotations

import functools
import os
import signal
import sys
import threading
import warnings

import click

from . import _signals
from ._signals import Terminated


def _show_warning(message, category, filename, lineno, file=None, line=None) -> None:
    from . import _ui

    _ui.warning(str(message))


# ----------------------------------------------------------------------------- signals

_raise_terminated = _signals.terminate
_raise_interrupt = _signals.interrupt


EXIT_CODES = {signal.SIGINT: 130, signal.SIGTERM: 143}      # 128 + the signal, as shells say
INTERRUPTED = {signal.SIGINT: "interrupted (Ctrl-C)", signal.SIGTERM: "terminated (SIGTERM)"}


class StartupSignals:
    """SIGINT and SIGTERM remembered, not acted on, from the start of ``main`` until the command
    has imported torch and the library (``ready``); then Ctrl-C raises KeyboardInterrupt again,
    SIGTERM raises Terminated, and a signal that came meanwhile acts at once.

    Why: a KeyboardInterrupt raised inside ``import torch`` is not safe. Measured (merge of a
    tiny model, SIGINT 0.3-0.5 s after the start, torch half imported): torch sometimes swallows
    it, and the merge then runs to the end with exit 0; or its C++ code turns it into an
    exception nothing catches (``terminate called after throwing an instance of
    'pybind11::error_already_set' ... KeyboardInterrupt``: SIGABRT). Nothing is written before
    ``ready`` (a merge's prefetch only reads), so a second signal in that time exits at once.

    A signal the CLI was started with ignored (SIG_IGN: a job a non-interactive shell runs in
    the background gets SIGINT so) stays ignored, as Python itself leaves it.
    """

    def __init__(self) -> None:
        self.after: dict[int, object] = {}     # signal -> its handler once the command is ready
        self.received: list[int] = []

    def defer(self) -> None:
        if threading.current_thread() is not threading.main_thread():
            return                              # (signal handlers can only be set there)
        for signum, default in ((signal.SIGINT, _raise_interrupt),
                                (signal.SIGTERM, _raise_terminated)):
            current = signal.getsignal(signum)
            if current is signal.SIG_IGN or current is None:   # None: set outside Python
                continue
            ours = current in (signal.SIG_DFL, signal.default_int_handler)   # Python's defaults
            self.after[signum] = default if ours else current
            signal.signal(signum, self._record)

    def _record(self, signum, frame) -> None:
        if self.received:                       # the second one: nothing to clean up yet
            os.write(2, f"error: {INTERRUPTED[signum]}\n".encode())
            os._exit(EXIT_CODES[signum])
        self.received.append(signum)

    def ready(self) -> None:
        """The heavy imports are done: the usual handlers back, and a signal received so far
        raised now (KeyboardInterrupt, Terminated). Safe to call more than once."""
        after, self.after = self.after, {}
        for signum in sorted(after, reverse=True):     # SIGINT last: it may raise at once
            signal.signal(signum, after[signum])
        if self.received and self.received[0] in after:
            signum = self.received.pop(0)
            self.received.clear()
            handler = after[signum]
            if callable(handler):
                handler(signum, None)
            else:                                       # SIG_DFL: what it would have done
                signal.raise_signal(signum)


STARTUP = StartupSignals()


def ready() -> None:
    """Call once a command's heavy imports (torch, the library) are done: see StartupSignals."""
    STARTUP.ready()


# ----------------------------------------------------------------------------- errors

def debugging() -> bool:
    """``--debug`` on the command line, or ADAPTERTOOLS_DEBUG=1: print tracebacks too."""
    ctx = click.get_current_context(silent=True)
    if ctx is not None and ctx.find_root().params.get("debug"):
        return True
    return os.environ.get("ADAPTERTOOLS_DEBUG", "").strip().lower() not in ("", "0", "false",
                                                                           "no", "off")


def fail(message: str, code: int, exc: BaseException | None = None) -> None:
    """One ``error:`` line on stderr (after the traceback of ``exc`` with --debug); exit."""
    from . import _ui

    if exc is not None and debugging():
        import traceback

        traceback.print_exception(exc, file=sys.stderr)
        sys.stderr.flush()
    _ui.error(message)
    sys.exit(code)


def internal_error(exc: BaseException, command: str | None) -> str:
    """The one line for an exception no code meant to raise: what and where, and what to do."""
    lines = str(exc).strip().splitlines()
    first = lines[0] if lines else ""
    if len(first) > 300:
        first = first[:300] + "..."
    what = f"{type(exc).__name__}: {first}" if first else type(exc).__name__
    where = f"adaptertools {command}" if command else "adaptertools"
    advice = ("please report it with the traceback above" if debugging() else
              "please report it (rerun with --debug for the traceback)")
    return f"internal error in '{where}': {what}; {advice}"


def usage_hint(ctx: click.Context | None) -> str:
    return f" (see `{ctx.command_path} --help`)" if ctx is not None else ""


CLICK_FLOW = (click.ClickException, click.exceptions.Exit, click.Abort)   # click's own business


def handle_errors(func):
    """Turn every exception into one red line on stderr, no traceback (with --debug: the
    traceback too): the library's misuse errors exit 2 with a usage hint, its other errors and
    OSError exit 1, Ctrl-C 130, SIGTERM 143, anything else is an internal error (exit 1). A
    signal that came before the command's ``ready()`` acts here at the latest."""

    @functools.wraps(func)
    def wrapper(*args, **kwargs):
        from .errors import AdapterToolsError, OptionError

        warnings.showwarning = _show_warning
        ctx = click.get_current_context(silent=True)
        _signals.clear()       # this command's record (in process, tests run many)
        try:
            try:
                try:
                    return func(*args, **kwargs)
                finally:
                    ready()
            except CLICK_FLOW:
                raise
            except OptionError as exc:
                fail(str(exc) + usage_hint(ctx), 2, exc)
            except (AdapterToolsError, OSError) as exc:
                fail(str(exc), 1, exc)
            except KeyboardInterrupt as exc:
                # outputs are atomic: the library removed its temporary files on the way out
                fail("interrupted (Ctrl-C); no partial output was left behind", 130, exc)
            except Terminated as exc:
                fail("terminated (SIGTERM); no partial output was left behind", 143, exc)
            except Exception as exc:  # noqa: BLE001  (RecursionError, MemoryError... too)
                fail(internal_error(exc, ctx.info_name if ctx else None), 1, exc)
        finally:
            _signals.clear()

    return wrapper
