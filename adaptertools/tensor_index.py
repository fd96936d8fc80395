"""One safetensors file as a tensor index, read from its header alone: ``read_safetensors_header``
-> ``SafetensorsFile`` of ``TensorEntry`` (name, dtype, shape, byte range). Below formats and the
merge engine (merging/bases.py indexes base checkpoints with it; ``_io.load_safetensors`` checks
an adapter's declared sizes with it).
"""

from __future__ import annotations

import json
import struct
from dataclasses import dataclass
from pathlib import Path

from .dtypes import SAFETENSORS_SIZES
from .errors import FormatError, UnsupportedError


@dataclass(frozen=True)
class TensorEntry:
    """One stored tensor: where its bytes are and what they hold."""

    name: str
    file: str                 # file name inside the base folder (or the GGUF file name)
    dtype: str                # safetensors dtype ("BF16") or GGML type name ("F16", "Q4_K")
    shape: tuple[int, ...]    # as stored (numpy order for GGUF)
    offset: int               # absolute byte offset in ``file``
    nbytes: int


@dataclass(frozen=True)
class SafetensorsFile:
    name: str
    metadata: dict[str, str]
    tensors: tuple[TensorEntry, ...]     # in data order, as the file stores them
    header: bytes                         # the 8-byte length prefix plus the JSON header


def read_safetensors_header(path: Path) -> SafetensorsFile:
    """Parse a safetensors header (8-byte little-endian length, then JSON) without reading data."""
    size = path.stat().st_size
    with open(path, "rb") as fh:
        prefix = fh.read(8)
        if len(prefix) < 8:
            raise FormatError(f"{path}: truncated safetensors file (no header); download it again")
        (length,) = struct.unpack("<Q", prefix)
        if length > min(size - 8, 100_000_000):
            raise FormatError(f"{path}: corrupt safetensors header (length {length} for a "
                              f"{size}-byte file); download it again")
        raw = fh.read(length)
    try:
        header = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError):   # (nested too deeply)
        raise FormatError(f"{path}: corrupt safetensors header (not JSON); download it again") from None
    if not isinstance(header, dict):
        raise FormatError(f"{path}: corrupt safetensors header (a JSON {type(header).__name__}, "
                          "not an object of tensors); download it again")
    metadata = header.pop("__metadata__", None) or {}
    if not isinstance(metadata, dict):
        raise FormatError(f"{path}: corrupt safetensors header (__metadata__ is not an object); "
                          "download it again")
    data_start = 8 + length
    tensors = [_header_entry(path, name, info, data_start) for name, info in header.items()]
    tensors.sort(key=lambda t: t.offset)
    for prev, cur in zip(tensors, tensors[1:]):
        if cur.offset < prev.offset + prev.nbytes:
            raise FormatError(f"{path}: corrupt safetensors header: the bytes of {cur.name} "
                              f"overlap those of {prev.name}; download it again")
    end = max((t.offset + t.nbytes for t in tensors), default=data_start)
    if end > size:
        last = max(tensors, key=lambda t: t.offset + t.nbytes)
        raise FormatError(f"{path}: truncated: {last.name} ends at byte {end} but the file has "
                          f"{size}; download it again")
    return SafetensorsFile(path.name, metadata, tuple(tensors), prefix + raw)


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _header_entry(path: Path, name: str, info, data_start: int) -> TensorEntry:
    """One tensor of a safetensors header, checked: {dtype, shape, data_offsets=[begin, end]}
    with 0 <= begin <= end and end - begin == numel * itemsize; else a FormatError."""
    def corrupt(problem: str) -> FormatError:
        return FormatError(f"{path}: corrupt safetensors header: tensor {name} {problem}; "
                           "download the file again")

    if not isinstance(info, dict):
        raise corrupt(f"is described by a JSON {type(info).__name__}, not an object")
    for key in ("dtype", "shape", "data_offsets"):
        if key not in info:
            raise corrupt(f"has no `{key}`")
    dtype, shape, offsets = info["dtype"], info["shape"], info["data_offsets"]
    if not isinstance(dtype, str):
        raise corrupt(f"has dtype {dtype!r}, not a dtype name")
    if dtype not in SAFETENSORS_SIZES:
        raise UnsupportedError(f"{path}: {name} has dtype {dtype}, unknown here")
    if not isinstance(shape, list) or not all(_is_int(d) and d >= 0 for d in shape):
        raise corrupt(f"has shape {shape!r}, not a list of sizes")
    if not isinstance(offsets, list) or len(offsets) != 2 or not all(map(_is_int, offsets)):
        raise corrupt(f"has data_offsets {offsets!r}, not [begin, end]")
    begin, end = offsets
    if not 0 <= begin <= end:
        raise corrupt(f"has data_offsets [{begin}, {end}]: not 0 <= begin <= end")
    numel = 1
    for d in shape:
        numel *= d
    expected = numel * SAFETENSORS_SIZES[dtype]
    if end - begin != expected:
        raise corrupt(f"({dtype}, shape {tuple(shape)}) needs {expected} bytes but its "
                      f"data_offsets span {end - begin}")
    return TensorEntry(name, path.name, dtype, tuple(shape), data_start + begin, end - begin)
