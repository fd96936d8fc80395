"""Which path a command takes: the light one (numpy, no torch) where it can, else torch's.

``light_or_torch(run)`` calls ``run(True)``; whatever goes wrong in it (``NeedsTorch`` for what
the light path does not do, or any error, whose words the torch path then gives) makes it call
``run(False)``, today's path, instead. Warnings the light run raised are shown only when its
answer is the one returned, so none is shown twice.

The registry finds the format as always (every built-in format module loads without torch);
the light path reads it when it is one of ours with a light reader (``LIGHT``), and writes
with the writers in ``LIGHT_WRITERS``. ``ADAPTERTOOLS_LIGHT=0`` turns the light path off.
"""

from __future__ import annotations

import os
import warnings

from ..registry import Format
from .arrays import NeedsTorch

# the built-in formats whose readers take light=True
LIGHT = ("mlx", "peft", "gguf", "safetensors")
# the built-in formats whose writers take Stored tensors at which --dtype (None: every one):
# they rename, transpose and reshape; casts are light.arrays.cast's (Tensor.to's rounding),
# through adapter.cast_adapter or GGUF's writer, which also quantizes to Q8_0 (gguf-py)
LIGHT_WRITERS = {"mlx": None, "peft": None, "safetensors": None, "gguf": None}
PACKAGE = "adaptertools"
# the path the last light_or_torch call took, "light" or "torch" (what tests and benchmarks ask)
taken: list[str] = []


def enabled() -> bool:
    return os.environ.get("ADAPTERTOOLS_LIGHT", "1") != "0"


def require_reader(fmt: Format) -> Format:
    """``fmt`` (the registry's pick) when the light path reads it, else NeedsTorch."""
    if fmt.package != PACKAGE or fmt.name not in LIGHT:
        raise NeedsTorch(f"format {fmt.name} from {fmt.package}")
    return fmt


def require_writer(fmt: Format, dtype: str) -> Format:
    """``fmt`` when its writer takes Stored tensors at ``dtype``, else NeedsTorch."""
    allowed = LIGHT_WRITERS.get(fmt.name, ()) if fmt.package == PACKAGE else ()
    if allowed is not None and dtype not in allowed:
        raise NeedsTorch(f"writing {fmt.name} at dtype {dtype}")
    return fmt


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
