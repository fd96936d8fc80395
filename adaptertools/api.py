"""The library's public functions; ``adaptertools/__init__.py`` re-exports them lazily."""

from __future__ import annotations

import inspect as _signature
import os
from pathlib import Path

from ._io import atomic_output, require_exists
from .adapter import Adapter, cast_adapter, nonfinite_tensors
from .errors import FormatError, UnsupportedError
from .registry import Format, detect_format, get_format

DTYPES = ("keep", "fp32", "fp16", "bf16")


def parse_dtype(name: str):
    """``keep`` -> None, else the torch dtype (``fp32``, ``fp16``, ``bf16``)."""
    import torch

    table = {"keep": None, "fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
    if name not in table:
        raise UnsupportedError(f"unknown dtype {name!r}; choose one of {', '.join(DTYPES)}")
    return table[name]


def _readable(path: Path, format: str | None) -> Format:
    fmt = get_format(format) if format else detect_format(path)
    if not fmt.can_read:
        raise UnsupportedError(f"format {fmt.name!r} can only be written, not read")
    return fmt


def load(path: str | os.PathLike, *, format: str | None = None,
         scale: float | None = None) -> Adapter:
    """Read an adapter; the format is detected unless given.

    ``scale`` is the effective scale for bare factor files that carry no config.
    """
    path = require_exists(path)
    fmt = _readable(path, format)
    return _read(fmt, path, scale)


def _read(fmt: Format, path: Path, scale: float | None) -> Adapter:
    options = {}
    if scale is not None:
        if "scale" not in _signature.signature(fmt.module.read).parameters:
            raise UnsupportedError(f"{path}: --scale only applies to files without a config; "
                                   f"{fmt.name} adapters carry their own scale, drop --scale")
        options["scale"] = scale
    return fmt.module.read(path, **options)


def save(adapter: Adapter, path: str | os.PathLike, *, format: str, dtype: str = "keep",
         force: bool = False) -> None:
    """Write ``adapter`` atomically: nothing appears at ``path`` unless the whole write succeeds."""
    fmt = get_format(format)
    if not fmt.can_write:
        raise UnsupportedError(f"format {fmt.name!r} can be read but not written")
    bad = nonfinite_tensors(adapter)
    if bad:
        raise FormatError(f"{bad[0]} holds NaN or Inf values ({len(bad)} tensor(s) in all); "
                          "refusing to write a broken adapter, fix or retrain it")
    adapter = cast_adapter(adapter, parse_dtype(dtype))
    nbytes = sum(t.numel() * t.element_size() for w in adapter.weights.values()
                 for t in (w.a, w.b, w.magnitude, w.bias) if t is not None)
    nbytes += sum(t.numel() * t.element_size() for t in adapter.replacements.values())
    with atomic_output(path, force=force, is_dir=fmt.output_is_dir, expected_bytes=nbytes) as tmp:
        fmt.module.write(adapter, tmp)


def convert(src: str | os.PathLike, dst: str | os.PathLike, *, to: str,
            from_format: str | None = None, dtype: str = "keep", force: bool = False,
            scale: float | None = None) -> dict:
    """Convert an adapter between formats; returns what was done (formats, tensor counts)."""
    src_path = require_exists(src)
    if Path(dst).resolve() == src_path.resolve():
        raise UnsupportedError(f"{dst}: destination is the source; choose another output path")
    fmt = _readable(src_path, from_format)
    adapter = _read(fmt, src_path, scale)
    save(adapter, dst, format=to, dtype=dtype, force=force)
    return {"src": str(src_path), "dst": str(dst), "from": fmt.name, "to": to, "dtype": dtype,
            "adapted_tensors": len(adapter.weights), "replaced_tensors": len(adapter.replacements)}


def inspect(path: str | os.PathLike, *, layers: bool = False, format: str | None = None,
            scale: float | None = None) -> dict:
    """Summary of an adapter (ranks, scales, targets, sizes, problems); per layer with ``layers``."""
    from .inspection import adapter_report

    path = require_exists(path)
    fmt = _readable(path, format)
    adapter = _read(fmt, path, scale)
    return adapter_report(adapter, path=path, format_name=fmt.name, layers=layers)
