"""A GGUF model file laid out anew: the base's metadata byte for byte, new tensor types and
offsets. Needed when a merge changes a tensor's type (``--requantize``, ``--quantize-like``),
and with it the tensor's size and every offset after it.

Layout (gguf-py's GGUFWriter, llama.cpp's gguf.cpp): magic, version (u32), tensor count and
key-value count (u64), the key-value pairs, one info per tensor (name as u64 length + UTF-8,
n_dims u32, dims u64 in ggml order (innermost first), type u32, offset u64 relative to the data
start), zero padding to the alignment, then each tensor's data padded to the alignment.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

from .bases import GGUFHeader

GGUF_MAGIC = b"GGUF"


def align(n: int, alignment: int) -> int:
    return (n + alignment - 1) // alignment * alignment


@dataclass(frozen=True)
class LaidOutTensor:
    name: str
    shape: tuple[int, ...]     # numpy order, as TensorEntry
    type_name: str             # ggml's spelling: "Q4_K"
    nbytes: int


def tensor_info(t: LaidOutTensor, type_id: int, offset: int) -> bytes:
    name = t.name.encode("utf-8")
    dims = tuple(reversed(t.shape)) or (1,)
    return (struct.pack("<Q", len(name)) + name + struct.pack("<I", len(dims))
            + struct.pack(f"<{len(dims)}Q", *dims) + struct.pack("<IQ", type_id, offset))


def header_bytes(base: GGUFHeader, tensors: list[LaidOutTensor]) -> bytes:
    """The whole header up to the first tensor's data, padded to the alignment; tensors are
    stored in the given order, each padded to the alignment."""
    from ..kernels.quant.types import resolve

    parts = [GGUF_MAGIC, struct.pack("<IQQ", base.version, len(tensors), base.kv_count), base.kv]
    offset = 0
    for t in tensors:
        parts.append(tensor_info(t, resolve(t.type_name).ggml_id, offset))
        offset = align(offset + t.nbytes, base.alignment)
    header = b"".join(parts)
    return header + bytes(align(len(header), base.alignment) - len(header))


def file_size(header: bytes, tensors: list[LaidOutTensor], alignment: int) -> int:
    return len(header) + sum(align(t.nbytes, alignment) for t in tensors)
