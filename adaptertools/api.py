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
# Storage types a format may offer beyond plain casts (its writer then takes ``dtype`` itself).
FORMAT_DTYPES = ("q8_0",)


def parse_dtype(name: str):
    """``keep`` -> None, else the torch dtype (``fp32``, ``fp16``, ``bf16``)."""
    import torch

    table = {"keep": None, "fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
    if name not in table:
        raise UnsupportedError(f"unknown dtype {name!r}; choose one of {', '.join(DTYPES)} "
                               f"({', '.join(FORMAT_DTYPES)} only where the format has it)")
    return table[name]


def _accepts(func, option: str) -> bool:
    return option in _signature.signature(func).parameters


def _base_info(base):
    """``base`` as a path (HF folder, config.json, GGUF model) -> BaseInfo; BaseInfo passes."""
    if base is None or not isinstance(base, (str, os.PathLike)):
        return base
    from .formats.names import load_base_info

    return load_base_info(base)


def _readable(path: Path, format: str | None) -> Format:
    fmt = get_format(format) if format else detect_format(path)
    if not fmt.can_read:
        raise UnsupportedError(f"format {fmt.name!r} can only be written, not read")
    return fmt


def load(path: str | os.PathLike, *, format: str | None = None, scale: float | None = None,
         base=None) -> Adapter:
    """Read an adapter; the format is detected unless given.

    ``scale`` is the effective scale for bare factor files that carry no config; ``base`` (a
    path to the HF model folder, its config.json or a GGUF model) maps GGUF names back to HF.
    """
    path = require_exists(path)
    fmt = _readable(path, format)
    return _read(fmt, path, scale, _base_info(base))


def _read(fmt: Format, path: Path, scale: float | None, base=None) -> Adapter:
    options = {}
    if scale is not None:
        if not _accepts(fmt.module.read, "scale"):
            raise UnsupportedError(f"{path}: --scale only applies to files without a config; "
                                   f"{fmt.name} adapters carry their own scale, drop --scale")
        options["scale"] = scale
    if base is not None and _accepts(fmt.module.read, "base"):
        options["base"] = base
    return fmt.module.read(path, **options)


def save(adapter: Adapter, path: str | os.PathLike, *, format: str, dtype: str = "keep",
         force: bool = False, base=None) -> None:
    """Write ``adapter`` atomically: nothing appears at ``path`` unless the whole write succeeds.

    ``dtype``: keep | fp32 | fp16 | bf16, plus q8_0 for GGUF. ``base`` as for ``load``; GGUF
    needs it unless the adapter came from one of our own GGUF files.
    """
    fmt = get_format(format)
    if not fmt.can_write:
        raise UnsupportedError(f"format {fmt.name!r} can be read but not written")
    bad = nonfinite_tensors(adapter)
    if bad:
        raise FormatError(f"{bad[0]} holds NaN or Inf values ({len(bad)} tensor(s) in all); "
                          "refusing to write a broken adapter, fix or retrain it")
    options = {}
    if _accepts(fmt.module.write, "dtype"):
        options["dtype"] = dtype          # the format casts (and may quantize) itself
    else:
        adapter = cast_adapter(adapter, parse_dtype(dtype))
    base = _base_info(base)
    if base is not None and _accepts(fmt.module.write, "base"):
        options["base"] = base
    nbytes = sum(t.numel() * t.element_size() for w in adapter.weights.values()
                 for t in (w.a, w.b, w.magnitude, w.bias) if t is not None)
    nbytes += sum(t.numel() * t.element_size() for t in adapter.replacements.values())
    with atomic_output(path, force=force, is_dir=fmt.output_is_dir, expected_bytes=nbytes) as tmp:
        fmt.module.write(adapter, tmp, **options)


def convert(src: str | os.PathLike, dst: str | os.PathLike, *, to: str,
            from_format: str | None = None, dtype: str = "keep", force: bool = False,
            scale: float | None = None, base=None) -> dict:
    """Convert an adapter between formats; returns what was done (formats, tensor counts)."""
    src_path = require_exists(src)
    if Path(dst).resolve() == src_path.resolve():
        raise UnsupportedError(f"{dst}: destination is the source; choose another output path")
    fmt, target = _readable(src_path, from_format), get_format(to)
    base = _base_info(base)
    if base is not None and not (_accepts(fmt.module.read, "base") or
                                 _accepts(target.module.write, "base")):
        raise UnsupportedError(f"--base does not apply to {fmt.name} -> {target.name}; drop it")
    adapter = _read(fmt, src_path, scale, base)
    save(adapter, dst, format=to, dtype=dtype, force=force, base=base)
    return {"src": str(src_path), "dst": str(dst), "from": fmt.name, "to": to, "dtype": dtype,
            "adapted_tensors": len(adapter.weights), "replaced_tensors": len(adapter.replacements)}


def inspect(path: str | os.PathLike, *, layers: bool = False, format: str | None = None,
            scale: float | None = None, base=None) -> dict:
    """Summary of an adapter (ranks, scales, targets, sizes, problems); per layer with ``layers``."""
    from .inspection import adapter_report

    path = require_exists(path)
    fmt = _readable(path, format)
    adapter = _read(fmt, path, scale, _base_info(base))
    report = adapter_report(adapter, path=path, format_name=fmt.name, layers=layers)
    describe = getattr(fmt.module, "describe", None)
    if callable(describe):  # storage facts only the format knows (e.g. GGUF tensor types)
        report["storage"] = describe(path)
    return report
