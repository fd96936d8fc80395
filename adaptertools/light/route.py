"""Which path a command takes: the light one (numpy, no torch) where it can, else torch's.

``light_or_torch(run)`` calls ``run(True)``; whatever goes wrong in it (``NeedsTorch`` for what
the light path does not do, or any error, whose words the torch path then gives) makes it call
``run(False)``, today's path, instead. Warnings the light run raised are shown only when its
answer is the one returned, so none is shown twice.

The light path finds formats without the registry, which imports every format module (and
torch with them): only when every registered format is one of ours, whose sniffing order puts
the light formats (``LIGHT``) before all the others (tests/test_light.py checks that order).
``ADAPTERTOOLS_LIGHT=0`` turns the light path off.
"""

from __future__ import annotations

import importlib
import os
import warnings
from pathlib import Path

from ..registry import ENTRY_POINT_GROUP, Format
from .arrays import NeedsTorch

# the built-in formats whose readers take light=True, in sniffing order (mlx 5, peft 10,
# gguf 20)
LIGHT = ("mlx", "peft", "gguf")
# the built-in formats whose writers take Stored tensors at which --dtype: they rename,
# transpose and reshape; GGUF's writer also casts (light.arrays.cast) and quantizes to Q8_0
# (gguf-py); the others' casts are adapter.cast_adapter's, in torch
LIGHT_WRITERS = {"mlx": ("keep",), "peft": ("keep",), "gguf": None}   # None: every dtype
PACKAGE = "adaptertools"
# the path the last light_or_torch call took, "light" or "torch" (what tests and benchmarks ask)
taken: list[str] = []


def _builtin_only() -> bool:
    """Every registered format is one of ours (a plugin could sniff before ours). Asked each
    time (a plugin installed meanwhile counts, as registry.formats after its cache_clear)."""
    from importlib.metadata import entry_points

    found = entry_points(group=ENTRY_POINT_GROUP)
    for ep in found:
        dist = getattr(ep, "dist", None)
        if not ep.value.startswith(f"{PACKAGE}.formats.") or \
                (dist is not None and dist.name != PACKAGE):
            return False
    return bool(found)       # none: not installed, which the registry's own error says


def enabled() -> bool:
    return os.environ.get("ADAPTERTOOLS_LIGHT", "1") != "0" and _builtin_only()


def _format(name: str) -> Format:
    return Format(name, importlib.import_module(f"{PACKAGE}.formats.{name}"), PACKAGE)


def readable(path: Path, format: str | None) -> Format:
    """The format the registry would pick for ``path`` (or ``format``), when it is a light
    one; else NeedsTorch."""
    if format is not None:
        if format in LIGHT:
            return _format(format)
        raise NeedsTorch(f"format {format}")
    for name in LIGHT:
        fmt = _format(name)
        if fmt.module.sniff(path):
            return fmt
    raise NeedsTorch(f"{path}: no light format sniffs it first")


def writable(to: str, dtype: str) -> Format:
    """The format ``to`` writes with, when its writer takes Stored tensors at ``dtype``."""
    if to in LIGHT_WRITERS and (LIGHT_WRITERS[to] is None or dtype in LIGHT_WRITERS[to]):
        return _format(to)
    raise NeedsTorch(f"writing {to} at dtype {dtype}")


def light_or_torch(run):
    """``run(light=True)``'s answer, or ``run(light=False)``'s where the light run failed."""
    if enabled():
        import numpy as np

        # np.errstate: numpy's float warnings (Inf * 0 in a norm) are none of torch's, which
        # says nothing there; the readers name NaN/Inf values themselves
        with warnings.catch_warnings(record=True) as caught, np.errstate(all="ignore"):
            warnings.simplefilter("always")
            try:
                answer = run(True)
            except Exception:       # noqa: BLE001  (the torch path answers, in its words)
                answer = caught = None
        if caught is not None:
            registry: dict = {}      # as the torch path's warnings: once per place (``default``)
            for w in caught:
                warnings.warn_explicit(w.message, w.category, w.filename, w.lineno,
                                       registry=registry, source=w.source)
            taken[:] = ["light"]
            return answer
    taken[:] = ["torch"]
    return run(False)
