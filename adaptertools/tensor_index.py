"""One safetensors file as a tensor index, read from its header alone: ``read_safetensors_header``
-> ``SafetensorsFile`` of ``TensorEntry`` (name, dtype, shape, byte range). Below formats and the
merge engine (merging/bases.py indexes base checkpoints with it; ``_io.load_safetensors`` checks
an adapter's declared sizes with it).

``read_entry`` is the one reader of a stored tensor's bytes (safetensors or GGUF entries alike):
the merge engine (merging/streams.py Reads, into pooled buffers), validation, extract and the
saved-copy checks all read through it, and a short read is a TruncatedFileError everywhere.
torch is imported only when a tensor is read (``import adaptertools`` stays light).
"""

from __future__ import annotations

import json
import math
import os
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from .dtypes import SAFETENSORS_SIZES
from .errors import FormatError, TruncatedFileError, UnsupportedError

if TYPE_CHECKING:
    import torch


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
            raise TruncatedFileError(path, None, " (the 8-byte length prefix)")
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
        raise TruncatedFileError(path, last.name,
                                 f" (which ends at byte {end}; the file has {size})")
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


# ----------------------------------------------------------------------------- reading

def stored_dtype(name: str) -> torch.dtype | None:
    """The torch dtype a stored dtype name is read as (floats, ints, fp8 codes), or None where
    the bytes are kept as they are: GGML block types, and BOOL / U16-U64, which no table maps."""
    from .dtypes import STORED_TORCH_DTYPES, TORCH_DTYPES

    return TORCH_DTYPES.get(name) or STORED_TORCH_DTYPES.get(name)


def entry_rows(entry: TensorEntry) -> int:
    """Rows of ``entry`` as stored: its first dimension (1 for a scalar)."""
    return int(entry.shape[0]) if entry.shape else 1


def as_stored(entry: TensorEntry, raw: torch.Tensor, rows: int | None = None) -> torch.Tensor:
    """``raw`` (uint8, (nbytes,): the bytes of ``rows`` whole rows of ``entry``, all by default)
    as the stored tensor, without a copy: typed and shaped (rows, *shape[1:]), the entry's shape
    when whole. Left as they are, flat uint8, where the bytes are not the shape's elements of a
    torch dtype: GGML block types (their (rows, row_bytes) layout is the codec's business), and
    an encoded weight whose entry carries its unencoded shape (merging/encoded.py
    ``Layout.logical``: 4-bit codes packed two to a byte)."""
    dtype = stored_dtype(entry.dtype)
    shape = entry.shape if rows is None else (rows, *entry.shape[1:])
    if dtype is None or math.prod(shape) * dtype.itemsize != raw.numel():
        return raw
    return raw.view(dtype).reshape(shape)


def read_entry(source: int | str | os.PathLike, entry: TensorEntry, *, pool=None,
               start: int = 0, stop: int | None = None) -> torch.Tensor:
    """The stored tensor ``entry`` of the file ``source`` (a path, or a descriptor open for
    reading: only ``os.preadv`` is used, so threads may share it), as ``as_stored`` types it;
    rows [start, stop) of it when given (memory stays at those rows). Bytes land in
    ``pool.take(nbytes)`` (merging/streams.BufferPool: memory already paged in) or in a fresh
    buffer, with one copy from the page cache. A short read is a TruncatedFileError naming the
    file (``entry.file`` for a descriptor) and the tensor."""
    import torch

    rows = entry_rows(entry)
    stop = rows if stop is None else stop
    if not 0 <= start <= stop <= rows:
        raise ValueError(f"{entry.name}: rows [{start}, {stop}) of {rows}")
    if start == 0 and stop == rows:
        offset, nbytes, shaped = entry.offset, entry.nbytes, None
    else:
        row_bytes = entry.nbytes // rows
        offset, nbytes, shaped = entry.offset + start * row_bytes, (stop - start) * row_bytes, \
            stop - start
    buffer = pool.take(nbytes) if pool is not None else torch.empty(nbytes, dtype=torch.uint8)
    if isinstance(source, int):
        _fill(source, buffer, offset, entry.file, entry)
    else:
        fd = os.open(source, os.O_RDONLY)
        try:
            _fill(fd, buffer, offset, source, entry)
        finally:
            os.close(fd)
    return as_stored(entry, buffer, shaped)


def _fill(fd: int, buffer: torch.Tensor, offset: int, file, entry: TensorEntry) -> None:
    """``buffer`` (uint8, (n,)) filled from ``fd`` at ``offset``, pread in a loop (a read may
    return fewer bytes than asked); 0 bytes before the end: the file is truncated."""
    view, done = memoryview(buffer.numpy()), 0
    while done < len(view):
        n = os.preadv(fd, [view[done:]], offset + done)
        if n == 0:
            raise short_read(file, entry, offset + done)
        done += n


def short_read(file, entry: TensorEntry, at: int) -> TruncatedFileError:
    """The error for ``file`` ending at byte ``at``, inside ``entry``'s bytes."""
    return TruncatedFileError(file, entry.name, f" (at byte {at}, before its end at byte "
                              f"{entry.offset + entry.nbytes})")
