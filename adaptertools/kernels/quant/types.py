"""The GGUF tensor types the codecs know, as data (no torch, no gguf import).

Sizes are ggml's (``gguf.GGML_QUANT_SIZES``): ``block`` values are stored in ``nbytes`` bytes. ``ggml_id``
is the ``enum ggml_type`` value (= ``gguf.GGMLQuantizationType``). ``requantizable`` types have a torch
quantizer here; every other GGUF type dequantizes through gguf-py and cannot be written back as itself.
"""

from __future__ import annotations

from dataclasses import dataclass

from ...errors import UnsupportedError


@dataclass(frozen=True)
class GGUFType:
    name: str            # ggml's spelling: "Q4_K"
    ggml_id: int         # enum ggml_type
    block: int           # values per block (1 for plain floats)
    nbytes: int          # bytes per block
    requantizable: bool  # torch quantize() exists

    def row_bytes(self, cols: int) -> int:
        return cols // self.block * self.nbytes


# Rows from ggml-common.h block structs (same numbers as gguf.GGML_QUANT_SIZES).
TYPES: dict[str, GGUFType] = {t.name: t for t in (
    GGUFType("F32", 0, 1, 4, True),
    GGUFType("F16", 1, 1, 2, True),
    GGUFType("BF16", 30, 1, 2, True),
    GGUFType("Q4_0", 2, 32, 18, True),     # d fp16, 16 B nibbles
    GGUFType("Q4_1", 3, 32, 20, True),     # d, m fp16, 16 B nibbles
    GGUFType("Q5_0", 6, 32, 22, True),     # d, 4 B high bits, 16 B nibbles
    GGUFType("Q5_1", 7, 32, 24, True),     # d, m, 4 B high bits, 16 B nibbles
    GGUFType("Q8_0", 8, 32, 34, True),     # d, 32 int8
    GGUFType("Q2_K", 10, 256, 84, True),   # 16 B scales/mins, 64 B 2-bit, d, dmin
    GGUFType("Q3_K", 11, 256, 110, True),  # 32 B hmask, 64 B 2-bit, 12 B scales, d
    GGUFType("Q4_K", 12, 256, 144, True),  # d, dmin, 12 B 6-bit scales/mins, 128 B nibbles
    GGUFType("Q5_K", 13, 256, 176, True),  # d, dmin, 12 B scales/mins, 32 B high bits, 128 B nibbles
    GGUFType("Q6_K", 14, 256, 210, True),  # 128 B low nibbles, 64 B high 2 bits, 16 int8 scales, d
)}
_BY_ID = {t.ggml_id: t for t in TYPES.values()}


def resolve(qtype) -> GGUFType:
    """A ``GGUFType`` from a name ("q4_k", "Q4_K"), a ggml id or a ``gguf.GGMLQuantizationType``.

    Types without a torch codec (IQ*, TQ*, MXFP4, ...) come back with ``requantizable=False`` and the
    sizes gguf-py knows; unknown names raise ``UnsupportedError``.
    """
    if isinstance(qtype, GGUFType):
        return qtype
    name = getattr(qtype, "name", None)
    if name is None and isinstance(qtype, str):
        name = qtype.upper()
    if name is None and isinstance(qtype, int) and qtype in _BY_ID:
        return _BY_ID[qtype]
    if name in TYPES:
        return TYPES[name]
    import gguf  # only for the types we do not implement

    try:
        gt = gguf.GGMLQuantizationType[name] if name is not None else gguf.GGMLQuantizationType(qtype)
    except (KeyError, ValueError):
        raise UnsupportedError(
            f"unknown GGUF tensor type {qtype!r}; known: {', '.join(TYPES)} and gguf-py's others") from None
    block, nbytes = gguf.GGML_QUANT_SIZES[gt]
    return GGUFType(gt.name, int(gt), block, nbytes, False)


def requantizable(qtype) -> bool:
    """True when ``quant.gguf.quantize`` can write this type (F32/F16/BF16, legacy and K quants)."""
    return resolve(qtype).requantizable
