"""The CLI's SIGINT and SIGTERM handlers, and the record they keep so that a signal whose
exception was lost on its way still stops the command before its output is committed.

Python runs a signal handler in the main thread between two bytecodes, wherever those are:
inside a ``__del__``, a weakref callback or a generator the garbage collector closes, the
exception the handler raises is printed ("Exception ignored in ...") and dropped, and the
command goes on to finish with exit 0. (Seen once in tests/test_signals.py's SIGTERM test under
CI load: exit 0, and OUT absent when the signal was sent.) So each handler notes its signal
before raising, and atomic outputs call ``raise_if_signalled`` just before their rename.
Dependency-free: the library's paths.py imports it.
"""

from __future__ import annotations

import signal

_RAISED: list[int] = []          # signals the handlers raised during this command, in order


class Terminated(BaseException):
    """SIGTERM, raised in the main thread as Ctrl-C raises KeyboardInterrupt: the library's
    atomic outputs clean up on the way out, and the CLI exits 143."""


def interrupt(signum, frame) -> None:
    """SIGINT's handler once a command is ready: Python's own (KeyboardInterrupt), noted."""
    _RAISED.append(signum)
    raise KeyboardInterrupt


def terminate(signum, frame) -> None:
    """SIGTERM's handler once a command is ready: Terminated, noted."""
    _RAISED.append(signum)
    raise Terminated()


def clear() -> None:
    """A new command starts (the CLI run in process, as tests do, runs many)."""
    _RAISED.clear()


def raise_if_signalled() -> None:
    """Raise again the first signal a handler raised during this command: called where an
    output is about to be committed, so a lost exception still leaves nothing behind. A signal
    the CLI handled on its way out has ended the process before any later commit."""
    if _RAISED:
        if _RAISED[0] == signal.SIGINT:
            raise KeyboardInterrupt
        raise Terminated()
