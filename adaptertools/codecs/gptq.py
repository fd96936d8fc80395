"""GPTQ and AWQ checkpoints (GPTQModel 7.x, AutoGPTQ, AutoAWQ; what transformers and vLLM load)
as one codec: config.json ``quantization_config.quant_method`` "gptq" or "awq".

Stored per quantized Linear ``X`` (in_features i, out_features o, b bits, G groups), as
GPTQModel 7.7 writes them (nn_modules/qlinear/__init__.py, quantization/awq/utils/packing_utils.py):

  GPTQ  ``X.qweight`` I32 (i * b / 32, o): the unsigned codes q packed down the input dimension,
        value k of a column at bits [k * b, (k + 1) * b) of the column's bit stream;
        ``X.qzeros`` I32 (G, o * b / 32): the zero points packed along the output dimension, in
        checkpoint_format "gptq" (v1) stored minus one (GPTQModel adds 0x11111111 to the whole
        int32 word on load, for 4 bits, so a borrow of the v1 subtraction is undone too);
        ``X.scales`` F16 (G, o); ``X.g_idx`` I32 (i,): each input column's group (act-order,
        desc_act, makes it non-monotonic; absent in some AutoGPTQ files: ``k // group_size``).
  AWQ   ``X.qweight`` I32 (i, o * b / 32): packed along the output dimension, eight 4-bit codes
        per word in AWQ's interleaved order: nibble n holds column ``ORDER[n]`` of its eight;
        ``X.qzeros`` I32 (G, o / 8), the same; ``X.scales`` F16 (G, o); groups ``k // group_size``.

``W[o, k] = (q[k, o] - z[g(k), o]) * s[g(k), o]`` computed in the scales' dtype (one rounding,
as GPTQModel's ``dequantize_weight`` and AWQ's ``dequantize_gemm`` do), logical shape (o, i) as
an adapter sees it under the name ``X.weight``. ``X.bias`` stays a plain tensor.

Requantizing (``--requantize keep``) keeps the stored grid (scales, zeros and g_idx unchanged):
``q = clamp(round(w / s) + z, 0, 2^b - 1)`` (half to even, GPTQModel's quantizer); values the
merge leaves unchanged keep their stored codes, so only qweight changes and a zero adapter gives
back the base's bytes. A 4-bit grid keeps little of a small change: the survival report says so.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ..errors import FormatError, UnsupportedError
from . import Encoding
from .compressed_tensors import pack, unpack

NAME = "gptq"
QUANT_METHODS = ("gptq", "awq")
DAMAGED = ("the checkpoint is damaged: download it again, or quantize and save it again with "
           "GPTQModel (or AutoAWQ)")
ROUTE = ("merge into the unquantized model and quantize the result with GPTQModel (or the tool "
         "that made the checkpoint), or use --requantize bf16")
BITS = {"gptq": (2, 4, 8), "awq": (4,)}
GPTQ_FORMATS = ("gptq", "gptq_v2")
AWQ_VERSIONS = ("gemm",)
ORDER = (0, 2, 4, 6, 1, 3, 5, 7)           # AWQ: the column each nibble of a word holds
REVERSE = (0, 4, 1, 5, 2, 6, 3, 7)         # its inverse: the nibble each column is in
MEMBERS = (".qweight", ".qzeros", ".scales", ".g_idx")
SCALE_DTYPES = ("F16", "BF16", "F32")


@dataclass(frozen=True)
class Scheme:
    """One quantized Linear's encoding (the plan-time facts ``Encoding.params`` holds)."""

    method: str                 # "gptq" | "awq"
    bits: int
    group_size: int             # the effective one: in_features for per-channel (-1)
    v1_zeros: bool              # GPTQ checkpoint_format "gptq": zero points stored minus one
    shape: tuple[int, int]      # the weight (out_features, in_features)
    g_idx: bool                 # a stored g_idx (GPTQ); else k // group_size

    @property
    def groups(self) -> int:
        return math.ceil(self.shape[1] / self.group_size)

    @property
    def qmax(self) -> int:
        return (1 << self.bits) - 1


def logical_name(encoding: Encoding) -> str:
    """The weight's name as a float checkpoint (and an adapter) has it: ``X.weight``."""
    return encoding.name.removesuffix(".qweight") + ".weight"


# ----------------------------------------------------------------------------- plan time

def describe(entries, config: dict, read, where: str) -> list[Encoding]:
    """Every module with a ``qweight``, checked against the config and its companions' shapes;
    a companion without its qweight is refused by name."""
    method, bits, group_size, v1 = _settings(config, where)
    for name in sorted(entries):
        for suffix in MEMBERS[1:]:
            if name.endswith(suffix) and name.removesuffix(suffix) + ".qweight" not in entries:
                raise FormatError(f"{entries[name].file}: {name} has no "
                                  f"{name.removesuffix(suffix)}.qweight beside it; {DAMAGED}")
    out = []
    for name in sorted(n for n in entries if n.endswith(".qweight")):
        prefix = name.removesuffix(".qweight")
        scheme = _scheme(entries, prefix, method, bits, group_size, v1, read)
        members = tuple(prefix + s for s in MEMBERS if prefix + s in entries)
        out.append(Encoding(NAME, f"{method.upper()}-INT{bits}", name, scheme.shape, members,
                            scheme))
    return out


def _settings(qc: dict, where: str) -> tuple[str, int, int, bool]:
    """(method, bits, group_size as stored, v1 zero points) from the quantization_config."""
    method = qc["quant_method"]
    bits = qc.get("bits", qc.get("w_bit"))
    group_size = qc.get("group_size", qc.get("q_group_size", 128 if method == "awq" else None))
    if not isinstance(bits, int) or bits not in BITS[method]:
        raise UnsupportedError(f"{where}: {method} with bits={bits!r} is not supported for merging "
                               f"({', '.join(map(str, BITS[method]))} are): {ROUTE}")
    if not isinstance(group_size, int) or not (group_size == -1 or group_size > 0):
        raise FormatError(f"{where}: group_size {group_size!r} is not a positive integer or -1; "
                          "fix config.json")
    if qc.get("dynamic"):
        raise UnsupportedError(f"{where}: per-module overrides (dynamic) are not supported: {ROUTE}")
    if qc.get("pack_dtype", "int32") != "int32":
        raise UnsupportedError(f"{where}: pack_dtype {qc['pack_dtype']!r} is not supported (int32 "
                               f"is): {ROUTE}")
    if method == "awq":
        version = str(qc.get("version", qc.get("format", "gemm"))).lower()
        # zero_point false (GPTQModel's symmetric AWQ) still stores qzeros (all 2^(b-1)),
        # which dequantization uses as any
        if version not in AWQ_VERSIONS:
            raise UnsupportedError(f"{where}: AWQ version {version!r} is not supported "
                                   f"({', '.join(AWQ_VERSIONS)} is): {ROUTE}")
        return method, bits, group_size, False
    fmt = qc.get("checkpoint_format", qc.get("format", "gptq"))
    if fmt not in GPTQ_FORMATS:
        raise UnsupportedError(f"{where}: checkpoint_format {fmt!r} is not supported for merging "
                               f"({', '.join(GPTQ_FORMATS)} are): {ROUTE}")
    return method, bits, group_size, fmt == "gptq"


def _scheme(entries, prefix: str, method: str, bits: int, group_size: int, v1: bool,
            read) -> Scheme:
    qweight = entries[prefix + ".qweight"]
    file = qweight.file
    for suffix in (".qzeros", ".scales"):
        if prefix + suffix not in entries:
            raise FormatError(f"{file}: {prefix}.qweight has no {prefix}{suffix} beside it; "
                              f"{DAMAGED}")
    if qweight.dtype != "I32" or len(qweight.shape) != 2:
        raise FormatError(f"{file}: {prefix}.qweight is {qweight.dtype} {list(qweight.shape)}; "
                          f"{method} stores a 2-D I32 tensor of packed codes; {DAMAGED}")
    rows, cols = qweight.shape
    if method == "gptq":              # (in * b / 32, out)
        shape = (cols, rows * 32 // bits)
    else:                             # AWQ: (in, out * b / 32)
        shape = (cols * 32 // bits, rows)
    group = shape[1] if group_size == -1 else group_size
    scheme = Scheme(method, bits, group, v1, shape, prefix + ".g_idx" in entries)
    if method == "awq" and scheme.g_idx:
        raise FormatError(f"{file}: {prefix}.g_idx is stored, but AWQ has no act-order; {DAMAGED}")
    out_words = math.ceil(shape[0] * bits / 32)
    want = {".scales": (scheme.groups, shape[0]), ".qzeros": (scheme.groups, out_words)}
    for suffix, expect in want.items():
        entry = entries[prefix + suffix]
        dtypes = SCALE_DTYPES if suffix == ".scales" else ("I32",)
        if tuple(entry.shape) != expect or entry.dtype not in dtypes:
            raise FormatError(
                f"{entry.file}: {prefix}{suffix} is {entry.dtype} {list(entry.shape)}, but "
                f"{prefix}.qweight {[rows, cols]} ({method}, {bits} bits: weight "
                f"{list(shape)}) in groups of {group} needs {'/'.join(dtypes)} {list(expect)} "
                f"(config.json's bits and group_size, or {DAMAGED.split(': ', 1)[1]})")
    if scheme.g_idx:
        _check_g_idx(entries[prefix + ".g_idx"], prefix, scheme, read)
    return scheme


def _check_g_idx(entry, prefix: str, scheme: Scheme, read) -> None:
    if entry.dtype not in ("I32", "I64") or tuple(entry.shape) != (scheme.shape[1],):
        raise FormatError(f"{entry.file}: {prefix}.g_idx is {entry.dtype} {list(entry.shape)}; "
                          f"the weight's {scheme.shape[1]} input columns need I32 "
                          f"[{scheme.shape[1]}]; {DAMAGED}")
    g_idx = read(entry)
    bad = ((g_idx < 0) | (g_idx >= scheme.groups)).nonzero()
    if len(bad):
        k = int(bad[0])
        raise FormatError(f"{entry.file}: {prefix}.g_idx[{k}] is {int(g_idx[k])}, outside the "
                          f"{scheme.groups} groups of {prefix}.scales; {DAMAGED}")


# ----------------------------------------------------------------------------- run time

def decode(encoding: Encoding, tensors) -> tuple[torch.Tensor, object]:
    """(fp32 weight (out, in), (codes, zero points, scales, g_idx, values)); codes and zero
    points are offset by -2^(b-1) (compressed_tensors.unpack's int8), which cancels in q - z."""
    scheme: Scheme = encoding.params
    prefix = encoding.name.removesuffix(".qweight")
    out_features, in_features = scheme.shape
    qweight, qzeros = tensors[encoding.name], tensors[prefix + ".qzeros"]
    if scheme.method == "gptq":
        codes = unpack(qweight.T.contiguous(), scheme.bits, in_features)     # (out, in)
        if scheme.v1_zeros:
            qzeros = _add_words(qzeros, scheme.bits)
        zeros = unpack(qzeros, scheme.bits, out_features)                     # (G, out)
    else:
        codes = unpack(qweight, scheme.bits, out_features)[:, _columns(out_features, REVERSE)].T
        zeros = unpack(qzeros, scheme.bits, out_features)[:, _columns(out_features, REVERSE)]
    g_idx = tensors.get(prefix + ".g_idx")
    g_idx = torch.arange(in_features) // scheme.group_size if g_idx is None else g_idx.long()
    zeros, scales = zeros[g_idx].T, tensors[prefix + ".scales"][g_idx].T       # (out, in)
    values = dequantize(codes, zeros, scales)
    return values, (codes.contiguous(), zeros, scales, values)


def encode(encoding: Encoding, values: torch.Tensor, state) -> tuple[dict, torch.Tensor]:
    """({qweight: the new packed codes}, what they decode to); unchanged values keep theirs."""
    scheme: Scheme = encoding.params
    old_codes, zeros, scales, old_values = state
    lo = -(1 << (scheme.bits - 1))
    fresh = torch.round(values / scales.float()) + zeros
    fresh = torch.where(scales == 0, zeros.float(), fresh).clamp_(lo, lo + scheme.qmax)
    codes = torch.where(values == old_values, old_codes, fresh.to(torch.int8))
    realized = dequantize(codes, zeros, scales)
    if scheme.method == "gptq":
        packed = pack(codes, scheme.bits).T.contiguous()                      # (in * b / 32, out)
    else:
        packed = pack(codes.T[:, _columns(scheme.shape[0], ORDER)], scheme.bits)
    return {encoding.name: packed}, realized


def dequantize(codes: torch.Tensor, zeros: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """``(q - z) * s`` in the scales' dtype (the integer difference is exact there), as fp32."""
    return ((codes.to(torch.int16) - zeros.to(torch.int16)).to(scales.dtype) * scales).float()


def _add_words(qzeros: torch.Tensor, bits: int) -> torch.Tensor:
    """GPTQ v1 zero points -> v2: one added to every field of each int32 word, the word
    wrapping as a whole (GPTQModel's convert_gptq_v1_to_v2_format_module)."""
    ones = sum(1 << (k * bits) for k in range(32 // bits))
    words = (qzeros.to(torch.int64) + ones) & 0xFFFFFFFF
    return torch.where(words >= 1 << 31, words - (1 << 32), words).to(torch.int32)


def _columns(count: int, order: tuple[int, ...]) -> torch.Tensor:
    """Index that applies ``order`` within every run of eight columns (AWQ's interleave)."""
    return (torch.arange(count).view(-1, 8)[:, list(order)]).reshape(-1)
