"""Base checkpoints as tensor indexes: names, dtypes, shapes and byte ranges, never the data.

Two kinds: HF safetensors folders (one file or shards with ``model.safetensors.index.json``)
and GGUF model files. Tensor data is read later, one tensor at a time (``merging/streams.py``
Reads: views of a private mapping whose pages are dropped once the tensor is written, or
``tensor_index.read_entry``'s pread into pooled buffers), so resident memory stays at the
tensors in flight. A GGUF base keeps the gguf-py reader it was parsed with: ``GGUFBase.info``
(the GGUF name mapping's BaseInfo) comes from it, not from parsing the file again.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path

from .._io import read_json, require_exists
from ..errors import FormatError, UnsupportedError
from ..paths import contained_file
from ..tensor_index import SafetensorsFile, TensorEntry, read_safetensors_header

INDEX_NAME = "model.safetensors.index.json"
# the shard indexes a folder may hold: transformers', and diffusers' model folders' (a sharded
# unet/ or transformer/: diffusion_pytorch_model-0000N-of-0000M.safetensors)
INDEX_NAMES = (INDEX_NAME, "diffusion_pytorch_model.safetensors.index.json")


@dataclass(frozen=True)
class HFBase:
    folder: Path
    files: tuple[SafetensorsFile, ...]   # shard order
    config: dict = field(default_factory=dict)
    index: dict | None = None
    index_name: str = INDEX_NAME          # the index file's name (INDEX_NAMES), kept in outputs

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
    """A GGUF model, the one owner of its parsed header: the tensor index, the key-value section
    a re-laid-out copy takes, and (``info``) the facts the GGUF name mapping needs, all from
    the one gguf-py reader ``open_base`` parsed (1-2 s for a 32000-token vocabulary)."""

    path: Path
    arch: str
    tensors: tuple[TensorEntry, ...]     # in data order
    data_end: int                        # file size
    header: GGUFHeader | None = None
    reader: object = field(default=None, repr=False, compare=False)   # gguf.GGUFReader

    kind = "gguf"

    def entries(self) -> dict[str, TensorEntry]:
        return {t.name: t for t in self.tensors}

    @cached_property
    def info(self):
        """formats.names.BaseInfo (arch, blocks, heads, tied embeddings), what
        ``load_base_info(self.path)`` gives, from the reader already parsed. Computed on first
        use, so that a GGUF opened for its tensors alone (a --quantize-like reference, a merged
        file to validate) is refused for missing head counts no sooner than before."""
        from ..formats.names import base_info_from_gguf, open_gguf

        reader = self.reader if self.reader is not None else open_gguf(self.path)
        return base_info_from_gguf(reader, self.path)


def open_base(path: str | os.PathLike) -> HFBase | GGUFBase:
    path = require_exists(path)
    if path.is_file() and path.suffix == ".gguf":
        return _open_gguf(path)
    if path.is_file() and path.suffix == ".safetensors":
        return _open_hf(path.parent, [path.name])
    if not path.is_dir():
        raise FormatError(f"{path}: not a model; a base is an HF folder with *.safetensors, "
                          "one .safetensors file, or a .gguf model")
    index_name = next((n for n in INDEX_NAMES if (path / n).is_file()), INDEX_NAME)
    index_path = path / index_name
    if index_path.is_file():
        index = read_json(contained_file(path, index_name))
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
            raise FormatError(f"{path}: shard {missing[0]} listed in {index_name} is missing "
                              f"({len(missing)} of {len(files)}); download the complete model")
        return _open_hf(path, files, index, index_name)
    files = sorted(p.name for p in path.glob("*.safetensors"))
    if not files:
        raise FormatError(f"{path}: no *.safetensors weights here (.bin checkpoints are not read: "
                          "they are pickles); convert the model to safetensors first")
    if len(files) > 1:
        raise FormatError(f"{path}: {len(files)} .safetensors files but no {INDEX_NAME}; "
                          "restore the index or pass one file")
    return _open_hf(path, files)


def _open_hf(folder: Path, files: list[str], index: dict | None = None,
             index_name: str | None = None) -> HFBase:
    if index_name is None:    # the index a resharded output gets: diffusers' for its files
        diffusers = all(f.startswith("diffusion_pytorch_model") for f in files)
        index_name = INDEX_NAMES[1] if diffusers else INDEX_NAME
    config_path = contained_file(folder, "config.json")
    config = read_json(config_path) if config_path.is_file() else {}
    shards = tuple(read_safetensors_header(contained_file(folder, f)) for f in files)
    return HFBase(folder, shards, config, index, index_name)


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
                    _gguf_header(path, reader), reader)


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
