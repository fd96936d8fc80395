"""The codec registry: encodings of a checkpoint's stored weights other than plain floats, as
their quantization libraries write them (the base-side seam, DESIGN.md).

A codec is a module of plain functions, like a format (registry.py), that knows one family of
encodings end to end and nothing of the merge engine::

    NAME: str                       # "bitsandbytes"
    QUANT_METHODS: tuple[str, ...]  # the config.json quantization_config.quant_method it reads
    DAMAGED: str                    # the fix for a checkpoint whose stored tensors disagree

    describe(entries, config, read, where) -> list[Encoding]
        Plan time, no weight data: every quantized weight of the checkpoint (``entries``: stored
        name -> merging.bases.TensorEntry; ``config``: its quantization_config), each with the
        stored tensors it owns (its companions: scales, zero points, quant states) and its
        logical (unquantized) shape, which adapters are matched against. ``read(entry)`` gives a
        small stored tensor's data (JSON quant states); ``where`` starts its messages
        about the config ("FOLDER/config.json quantization_config"). Raises FormatError/UnsupportedError
        naming the tensor for anything it cannot place or requantize, so a merge is refused
        before anything is written.
    decode(encoding, tensors) -> (fp32 values in encoding.shape, state)
        ``tensors``: every member of the encoding by stored name, in their stored dtypes and
        shapes. ``state``: whatever ``encode`` needs to write the same encoding again (codes,
        block sizes, offsets); opaque to the engine.
    encode(encoding, values, state) -> (changed, realized)
        fp32 ``values`` back into the encoding: ``changed`` holds every member whose bytes
        change (the weight always), each with its stored dtype, shape and byte size, so that
        the output keeps the base's header and layout; ``realized`` is what the new bytes
        decode to (fp32, for the survival score).

The engine (merging/encoded.py) does the rest for every codec alike: read the members, decode,
fold in fp32, encode, write the weight in its turn and the changed companions at their offsets,
score survival, and for ``--requantize bf16|fp16|fp32`` write plain float weights and drop the
companions and the quantization_config.

Third-party packages add codecs with::

    [project.entry-points."adaptertools.codecs"]
    mycodec = "mypackage.mycodec"

and code (tests) with ``register(module)``.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field
from importlib.metadata import entry_points
from types import ModuleType
from typing import Any

ENTRY_POINT_GROUP = "adaptertools.codecs"
BUILT_IN = {"bitsandbytes": "adaptertools.codecs.bnb", "gguf": "adaptertools.codecs.gguf",
            "fp8": "adaptertools.codecs.fp8",
            "compressed-tensors": "adaptertools.codecs.compressed_tensors",
            "mxfp4": "adaptertools.codecs.mxfp4", "gptq": "adaptertools.codecs.gptq"}
REQUIRED = ("NAME", "QUANT_METHODS", "describe", "decode", "encode")
_REGISTERED: dict[str, ModuleType] = {}


@dataclass(frozen=True)
class Encoding:
    """One quantized weight as stored: its tensors and what they encode."""

    codec: str                      # the codec's NAME
    type: str                       # what reports call it: "NF4", "INT8", ...
    name: str                       # the stored tensor holding the weight's codes
    shape: tuple[int, ...]          # the unquantized weight's shape (rows, cols)
    members: tuple[str, ...]        # every stored tensor of the weight, ``name`` included
    params: Any = field(default=None, compare=False)   # the codec's own plan-time facts


def register(module: ModuleType) -> None:
    """Add a codec module at run time (tests, embedding applications); entry points are the way
    for installed packages."""
    _check(module, getattr(module, "__name__", repr(module)))
    _REGISTERED[module.NAME] = module


def unregister(name: str) -> None:
    _REGISTERED.pop(name, None)


def _check(module: ModuleType, where: str) -> None:
    missing = [attr for attr in REQUIRED if not hasattr(module, attr)]
    if missing:
        raise TypeError(f"codec {where}: lacks {', '.join(missing)}")


@functools.cache
def _installed() -> dict[str, str]:
    """Entry-point codecs by name -> module path (built-ins first; loaded only when asked)."""
    found = dict(BUILT_IN)
    for ep in entry_points(group=ENTRY_POINT_GROUP):
        found.setdefault(ep.name, ep.value)
    return found


def codecs() -> dict[str, ModuleType]:
    """Every codec, by name: registered at run time, then installed."""
    import importlib

    out = {}
    for name, path in _installed().items():
        module = importlib.import_module(path)
        _check(module, path)
        out[name] = module
    out.update(_REGISTERED)
    return out


def for_quant_method(method: str) -> ModuleType | None:
    """The codec that reads checkpoints whose quantization_config has ``quant_method``."""
    return next((c for c in codecs().values() if method in c.QUANT_METHODS), None)


def by_name(name: str) -> ModuleType:
    return codecs()[name]


def quant_methods() -> list[str]:
    return sorted(m for c in codecs().values() for m in c.QUANT_METHODS)
