"""Base checkpoints as tensor indexes: names, dtypes, shapes and byte ranges, never the data.

Two kinds: HF safetensors folders (one file or shards with ``model.safetensors.index.json``)
and GGUF model files. Tensor data is read later, one tensor at a time (``merging/streams.py``
Reads: views of a private mapping whose pages are dropped once the tensor is written, or
``os.pread`` into pooled buffers), so resident memory stays at the tensors in flight.
"""

from __future__ import annotations

import json
import os
import struct
from dataclasses import dataclass, field
from pathlib import Path

from .._io import read_json, require_exists
from ..errors import FormatError, UnsupportedError
from ..paths import contained_file

INDEX_NAME = "model.safetensors.index.json"
# safetensors dtype names -> bytes per element (the float ones are what merges can touch)
SAFETENSORS_SIZES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2,
                     "I8": 1, "U8": 1, "BOOL": 1, "F8_E4M3": 1, "F8_E5M2": 1, "U16": 2,
                     "U32": 4, "U64": 8}
FLOAT_DTYPES = ("F32", "F16", "BF16")


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


@dataclass(frozen=True)
class HFBase:
    folder: Path
    files: tuple[SafetensorsFile, ...]   # shard order
    config: dict = field(default_factory=dict)
    index: dict | None = None

    kind = "safetensors"

    def entries(self) -> dict[str, TensorEntry]:
        return {t.name: t for f in self.files for t in f.tensors}


@dataclass(frozen=True)
class GGUFHeader:
    """What a re-laid-out GGUF copies from its base: the key-value section byte for byte."""

    version: int
    kv_count: int
    kv: bytes              # the metadata key-value pairs as stored (between counts and tensor infos)
    alignment: int
    data_offset: int       # where tensor data starts in the base


@dataclass(frozen=True)
class GGUFBase:
    path: Path
    arch: str
    tensors: tuple[TensorEntry, ...]     # in data order
    data_end: int                        # file size
    header: GGUFHeader | None = None

    kind = "gguf"

    def entries(self) -> dict[str, TensorEntry]:
        return {t.name: t for t in self.tensors}


def open_base(path: str | os.PathLike) -> HFBase | GGUFBase:
    path = require_exists(path)
    if path.is_file() and path.suffix == ".gguf":
        return _open_gguf(path)
    if path.is_file() and path.suffix == ".safetensors":
        return _open_hf(path.parent, [path.name])
    if not path.is_dir():
        raise FormatError(f"{path}: not a model; a base is an HF folder with *.safetensors, "
                          "one .safetensors file, or a .gguf model")
    index_path = path / INDEX_NAME
    if index_path.is_file():
        index = read_json(contained_file(path, INDEX_NAME))
        weight_map = index.get("weight_map")
        if not isinstance(weight_map, dict) or not weight_map:
            raise FormatError(f"{index_path}: no `weight_map`; the index is damaged")
        files = list(dict.fromkeys(weight_map.values()))
        bad = [f for f in files if not isinstance(f, str) or not f]
        if bad:
            raise FormatError(f"{index_path}: `weight_map` names {bad[0]!r}, not a shard file "
                              "name; the index is damaged")
        for f in files:            # an index may not send us to files outside the folder
            contained_file(path, f)
        missing = [f for f in files if not (path / f).is_file()]
        if missing:
            raise FormatError(f"{path}: shard {missing[0]} listed in {INDEX_NAME} is missing "
                              f"({len(missing)} of {len(files)}); download the complete model")
        return _open_hf(path, files, index)
    files = sorted(p.name for p in path.glob("*.safetensors"))
    if not files:
        raise FormatError(f"{path}: no *.safetensors weights here (.bin checkpoints are not read: "
                          "they are pickles); convert the model to safetensors first")
    if len(files) > 1:
        raise FormatError(f"{path}: {len(files)} .safetensors files but no {INDEX_NAME}; "
                          "restore the index or pass one file")
    return _open_hf(path, files)


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


def _open_hf(folder: Path, files: list[str], index: dict | None = None) -> HFBase:
    config_path = contained_file(folder, "config.json")
    config = read_json(config_path) if config_path.is_file() else {}
    shards = tuple(read_safetensors_header(contained_file(folder, f)) for f in files)
    return HFBase(folder, shards, config, index)


def _open_gguf(path: Path) -> GGUFBase:
    from ..formats.names import field_value, open_gguf

    reader = open_gguf(path)
    if field_value(reader, "general.type", "model") == "adapter":
        raise FormatError(f"{path}: is a GGUF adapter, not a model; pass the base model")
    splits = int(field_value(reader, "split.count", 1) or 1)
    if splits > 1:      # llama.cpp's gguf-split shards: tensors live in several files
        raise UnsupportedError(f"{path}: is part {int(field_value(reader, 'split.no', 0)) + 1} of a "
                               f"GGUF split into {splits} files; join it first with `llama-gguf-split "
                               "--merge FIRST.gguf JOINED.gguf` and merge into the joined file")
    size = path.stat().st_size
    tensors = []
    for t in reader.tensors:
        shape = tuple(int(s) for s in reversed(t.shape))   # ggml ne -> numpy order
        tensors.append(TensorEntry(t.name, path.name, t.tensor_type.name, shape,
                                   int(t.data_offset), int(t.n_bytes)))
    tensors.sort(key=lambda t: t.offset)
    return GGUFBase(path, field_value(reader, "general.architecture"), tuple(tensors), size,
                    _gguf_header(path, reader))


def _gguf_header(path: Path, reader) -> GGUFHeader:
    """The base's key-value section as raw bytes: 24 bytes of magic, version and counts precede
    it; the first tensor info follows it (gguf-py's ReaderTensor.field.offset)."""
    if reader.byte_order == "S":     # swapped: written for the other endianness
        raise UnsupportedError(f"{path}: big-endian GGUF files are not supported; convert it to "
                               "little-endian with gguf-py's gguf_convert_endian")
    start = 24
    end = min((t.field.offset for t in reader.tensors), default=int(reader.data_offset))
    version = int(reader.fields["GGUF.version"].parts[0][0])
    kv_count = int(reader.fields["GGUF.kv_count"].parts[0][0])
    return GGUFHeader(version, kv_count, bytes(reader.data[start:end]), int(reader.alignment),
                      int(reader.data_offset))
