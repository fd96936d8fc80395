"""compressed-tensors checkpoints (llm-compressor's W8A8 / W8A16 / W4A16 / FP8 output, vLLM's
format) as a codec: config.json ``quantization_config = {"quant_method": "compressed-tensors",
"format": ..., "config_groups": {name: {"targets": [...], "weights": {num_bits, type,
symmetric, strategy, group_size, block_structure}, "format": ...}}, "ignore": [...]}``.

Stored per quantized Linear ``X`` (weight (rows, cols)), as compressed-tensors 0.20 writes them:

  float-quantized  ``X.weight``  F8_E4M3 (rows, cols) codes q; ``X.weight_scale`` s
  int-quantized    ``X.weight``  I8 (rows, cols) codes q; ``X.weight_scale`` s;
                   ``X.weight_zero_point`` z (asymmetric only, same shape as s)
  pack-quantized   ``X.weight_packed`` I32 (rows, ceil(cols * bits / 32)): the codes q + 2^(b-1)
                   as one dense little-endian bit stream per row; ``X.weight_shape`` I64 [rows,
                   cols]; ``X.weight_scale`` s; ``X.weight_zero_point`` (asymmetric only):
                   I32 (ceil(rows * bits / 32), groups), packed the same way down the columns
                   for the group and channel strategies, else as s

``s`` (and ``z``) by strategy: tensor (1,); channel (rows, 1); group (rows, cols / group_size);
block (ceil(rows / bh), ceil(cols / bw)). Every strategy is a grid of (bh, bw) cells here
(tensor: one cell; channel: (1, cols); group: (1, group_size)), each with one scale.
``W = (q - z) * s`` computed in s's dtype, as compressed-tensors' ``dequantize`` does.

Requantizing (``--requantize keep``):

- integer formats keep the stored grid: scales and zero points unchanged, ``q = round(clamp(x /
  s + z, qmin, qmax))`` as compressed-tensors' ``quantize`` rounds (half to even). A 4-bit grid
  keeps little of a small change: the survival report says so.
- FP8 takes a new amax scale for every cell whose values change (compressed-tensors'
  ``calculate_qparams``: ``amax / 448``, in the stored scale dtype) and keeps the stored scale
  and codes of every unchanged cell. FP8 is a floating-point grid, so its relative precision
  does not depend on the scale: a new scale costs nothing where the stored one would still do,
  and it avoids clipping where the adapter pushes a cell's amax beyond ``448 * s`` (a stored
  scale fitted by llm-compressor's min-max observer is exactly the old amax / 448, with no
  headroom). A changed cell is then what compressed-tensors itself would write for the merged
  weight.

Values the merge leaves unchanged keep their stored codes (an untouched weight, a merge with a
zero adapter: byte copies).
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

import torch

from ..errors import FormatError, UnsupportedError
from . import Encoding

NAME = "compressed-tensors"
QUANT_METHODS = ("compressed-tensors",)
DAMAGED = ("the checkpoint is damaged: download it again, or compress and save it again with "
           "compressed-tensors (llm-compressor's oneshot, save_pretrained)")
FORMATS = ("float-quantized", "int-quantized", "naive-quantized", "pack-quantized")
STRATEGIES = ("tensor", "channel", "group", "block")
FP8_MAX = 448.0
PACKED = "_packed"
# static activation quantization's parameters of the module: kept as they are, dropped with the
# quantization_config by a float output (--requantize bf16)
CARRIED = (".input_scale", ".input_zero_point", ".input_global_scale", ".output_scale",
           ".output_zero_point")
ROUTE = ("merge into the unquantized model and quantize the result with llm-compressor, or "
         "use --requantize bf16")


@dataclass(frozen=True)
class Scheme:
    """One quantized weight's encoding (the plan-time facts ``Encoding.params`` holds)."""

    format: str                 # "float-quantized" | "int-quantized" | "pack-quantized"
    type: str                   # "int" | "float"
    bits: int
    strategy: str
    symmetric: bool
    cell: tuple[int, int]       # rows x columns sharing one scale
    shape: tuple[int, int]      # the weight (rows, cols)

    @property
    def grid(self) -> tuple[int, int]:
        return (math.ceil(self.shape[0] / self.cell[0]), math.ceil(self.shape[1] / self.cell[1]))

    @property
    def qrange(self) -> tuple[float, float]:
        if self.type == "float":
            return -FP8_MAX, FP8_MAX
        return float(-(1 << (self.bits - 1))), float((1 << (self.bits - 1)) - 1)

    @property
    def packed_zero(self) -> bool:
        return self.format == "pack-quantized" and not self.symmetric and \
            self.strategy in ("group", "channel")


def weight_name(prefix: str, scheme: Scheme) -> str:
    """The stored tensor of a module's codes: ``X.weight`` or ``X.weight_packed``."""
    return prefix + (".weight_packed" if scheme.format == "pack-quantized" else ".weight")


def logical_name(encoding: Encoding) -> str:
    """The weight's name as a float checkpoint (and an adapter) has it: ``X.weight``."""
    return encoding.name.removesuffix(PACKED)


# ----------------------------------------------------------------------------- plan time

def describe(entries, config: dict, read, where: str) -> list[Encoding]:
    """Every module with a ``weight_scale``, in the scheme of its config group; companions
    without a scale, and tensors that disagree with the scheme, are refused by name."""
    groups = _groups(config, where)
    ignore = list(config.get("ignore") or [])
    out = []
    prefixes = sorted(n.removesuffix(".weight_scale") for n in entries if n.endswith(".weight_scale"))
    for name in sorted(entries):
        for suffix in (".weight_zero_point", ".weight_packed", ".weight_shape", ".weight_g_idx"):
            if name.endswith(suffix) and name.removesuffix(suffix) + ".weight_scale" not in entries:
                raise FormatError(f"{entries[name].file}: {name} has no "
                                  f"{name.removesuffix(suffix)}.weight_scale beside it; {DAMAGED}")
        if name.endswith(".weight") and entries[name].dtype in ("I8", "F8_E4M3", "F8_E5M2") \
                and name.removesuffix(".weight") + ".weight_scale" not in entries:
            raise FormatError(f"{entries[name].file}: {name} is {entries[name].dtype} but "
                              f"{name}_scale is missing; {DAMAGED}")
    for prefix in prefixes:
        args, fmt = _scheme_for(prefix, groups, ignore, where, entries[prefix + ".weight_scale"].file)
        out.append(_encoding(entries, prefix, args, fmt, read))
    return out


def _groups(qc: dict, where: str) -> list[tuple[list[str], dict, str]]:
    """(targets, weights args, format) per config group, each checked to be one we encode."""
    for key in ("sparsity_config", "transform_config"):
        if qc.get(key):
            raise UnsupportedError(f"{where}: {key} is set; compressed-tensors checkpoints with "
                                   f"sparsity or transforms are not supported: {ROUTE}")
    status = qc.get("quantization_status", "compressed")
    if status != "compressed":
        raise UnsupportedError(f"{where}: quantization_status {status!r}: only compressed "
                               "checkpoints (save_pretrained's output) are supported")
    top = qc.get("format")
    groups = qc.get("config_groups")
    if not isinstance(groups, dict) or not groups:
        raise FormatError(f"{where}: config_groups is missing or empty; fix config.json")
    out = []
    for key, group in groups.items():
        here = f"{where} config_groups.{key}"
        fmt = (group or {}).get("format") or top
        weights = (group or {}).get("weights")
        if weights is None:
            continue                              # activations only: no weight stored quantized
        if fmt not in FORMATS:
            raise UnsupportedError(f"{here}: format {fmt!r} is not supported for merging "
                                   f"({', '.join(FORMATS)} are): {ROUTE}")
        _check_args(weights, fmt, here)
        targets = group.get("targets") or []
        out.append((list(targets), weights, "int-quantized" if fmt == "naive-quantized" and
                    weights.get("type") == "int" else fmt))
    return out


def _check_args(args: dict, fmt: str, where: str) -> None:
    kind, bits = args.get("type", "int"), args.get("num_bits", 8)
    strategy = args.get("strategy", "tensor")
    if args.get("dynamic"):
        raise UnsupportedError(f"{where}: dynamic weight quantization is not supported")
    if strategy not in STRATEGIES or (fmt == "pack-quantized" and strategy == "block"):
        raise UnsupportedError(f"{where}: weight strategy {strategy!r} is not supported for "
                               f"{fmt} (tensor, channel, group{', block' if fmt != 'pack-quantized' else ''} "
                               f"are): {ROUTE}")
    if args.get("actorder") or args.get("scale_dtype") or args.get("global_scale"):
        raise UnsupportedError(f"{where}: actorder / scale_dtype / global scales are not "
                               f"supported: {ROUTE}")
    if kind == "float":
        if bits != 8 or fmt == "pack-quantized" or not args.get("symmetric", True):
            raise UnsupportedError(f"{where}: float weights of {bits} bits ({fmt}, symmetric="
                                   f"{args.get('symmetric', True)}) are not supported (symmetric "
                                   f"float8_e4m3fn is): {ROUTE}")
    elif kind != "int" or not 1 <= bits <= 8:
        raise UnsupportedError(f"{where}: weights of type {kind!r} with {bits} bits are not "
                               f"supported (int of 1-8 bits and fp8 are): {ROUTE}")
    if strategy == "group" and not (isinstance(args.get("group_size"), int) and args["group_size"] > 0):
        raise FormatError(f"{where}: strategy group needs a positive group_size; fix config.json")
    block = args.get("block_structure")
    if strategy == "block" and not (isinstance(block, list) and len(block) == 2
                                    and all(isinstance(b, int) and b > 0 for b in block)):
        raise FormatError(f"{where}: strategy block needs block_structure [rows, cols]; got "
                          f"{block!r}; fix config.json")


def _matches(target: str, name: str) -> bool | None:
    """True/False for a name or ``re:`` target; None for a module class name (``Linear``),
    which a checkpoint alone cannot decide."""
    if target.startswith("re:"):
        return re.match(target[3:], name) is not None
    if "." in target or target[:1].islower():
        return name == target or name.endswith("." + target)
    return None


def _scheme_for(prefix: str, groups, ignore, where: str, file: str) -> tuple[dict, str]:
    named = [g for g in groups if any(_matches(t, prefix) for t in g[0])]
    by_class = [g for g in groups if any(_matches(t, prefix) is None for t in g[0])]
    found = named or by_class
    if not found or any(_matches(t, prefix) for t in ignore):
        raise FormatError(f"{file}: {prefix}.weight_scale is stored but no config group of "
                          f"{where} quantizes {prefix} (or it is in ignore); {DAMAGED}")
    if len({repr((g[1], g[2])) for g in found}) > 1:
        raise UnsupportedError(f"{file}: {prefix} matches config groups with different schemes "
                               "by module class; name its group's targets with re: patterns")
    return found[0][1], found[0][2]


def _encoding(entries, prefix: str, args: dict, fmt: str, read) -> Encoding:
    scale = entries[prefix + ".weight_scale"]
    bits, kind = int(args.get("num_bits", 8)), args.get("type", "int")
    packed = fmt == "pack-quantized"
    if prefix + ".weight_g_idx" in entries:
        raise UnsupportedError(f"{scale.file}: {prefix}.weight_g_idx (activation order) is not "
                               f"supported: {ROUTE}")
    name = prefix + (".weight_packed" if packed else ".weight")
    entry = entries.get(name)
    want = "I32" if packed else ("F8_E4M3" if kind == "float" else "I8")
    if entry is None or entry.dtype != want or len(entry.shape) != 2:
        got = "missing" if entry is None else f"{entry.dtype} {list(entry.shape)}"
        raise FormatError(f"{scale.file}: {prefix}.weight_scale has no 2-D {want} {name} beside it "
                          f"({got}) as {fmt} stores it; {DAMAGED}")
    shape = tuple(entry.shape)
    if packed:
        shape = _weight_shape(entries, prefix, entry, bits, read)
    rows, cols = shape
    strategy = args.get("strategy", "tensor")
    cell = {"tensor": (rows, cols), "channel": (1, cols),
            "group": (1, args.get("group_size") or 1),
            "block": tuple(args.get("block_structure") or (1, 1))}[strategy]
    if strategy == "group" and cols % cell[1]:
        raise FormatError(f"{entry.file}: {prefix}.weight has {cols} columns, which group_size "
                          f"{cell[1]} does not divide: set config.json's group_size to the one the "
                          f"checkpoint was compressed with, or {DAMAGED.split(': ', 1)[1]}")
    scheme = Scheme(fmt, kind, bits, strategy, bool(args.get("symmetric", True)), cell, shape)
    grid = scheme.grid
    if scale.dtype not in ("F32", "BF16", "F16") or math.prod(scale.shape) != math.prod(grid) \
            or (strategy != "tensor" and tuple(scale.shape) != grid):
        raise FormatError(f"{scale.file}: {prefix}.weight_scale is {scale.dtype} "
                          f"{list(scale.shape)}, but {name} {list(shape)} in the {strategy} strategy "
                          f"needs an F32/BF16/F16 scale of {list(grid) if strategy != 'tensor' else [1]} "
                          f"(the config group's strategy and sizes, or {DAMAGED.split(': ', 1)[1]})")
    members = [name, prefix + ".weight_scale"] + ([prefix + ".weight_shape"] if packed else [])
    zero = entries.get(prefix + ".weight_zero_point")
    if scheme.symmetric and zero is not None:
        raise FormatError(f"{zero.file}: {prefix}.weight_zero_point is stored but the scheme is "
                          f"symmetric; {DAMAGED}")
    if not scheme.symmetric:
        zshape = (math.ceil(rows * bits / 32), grid[1]) if scheme.packed_zero else tuple(scale.shape)
        if zero is None or tuple(zero.shape) != zshape:
            got = "missing" if zero is None else list(zero.shape)
            raise FormatError(f"{scale.file}: {prefix}.weight_zero_point is {got}; the asymmetric "
                              f"scheme needs {list(zshape)}; {DAMAGED}")
        members.append(prefix + ".weight_zero_point")
    members += [prefix + c for c in CARRIED if prefix + c in entries]
    label = "FP8_E4M3" if kind == "float" else f"INT{bits}"
    return Encoding(NAME, label, name, shape, tuple(members), scheme)


def _weight_shape(entries, prefix: str, packed, bits: int, read) -> tuple[int, int]:
    entry = entries.get(prefix + ".weight_shape")
    if entry is None:
        raise FormatError(f"{packed.file}: {prefix}.weight_packed has no {prefix}.weight_shape "
                          f"beside it; {DAMAGED}")
    values = [int(v) for v in read(entry).reshape(-1).tolist()]
    rows, words = packed.shape
    if len(values) != 2 or values[0] != rows or math.ceil(values[1] * bits / 32) != words:
        raise FormatError(f"{entry.file}: {prefix}.weight_shape is {values}, but "
                          f"{prefix}.weight_packed {[rows, words]} holds {rows} rows of "
                          f"{words * 32 // bits} {bits}-bit values at most; {DAMAGED}")
    return values[0], values[1]


# ----------------------------------------------------------------------------- run time

def decode(encoding: Encoding, tensors) -> tuple[torch.Tensor, object]:
    """(fp32 weight (rows, cols), (codes (int8 or fp8, unpacked), scale (grid), zero point
    (grid, unpacked), values, the stored scale's shape))."""
    scheme: Scheme = encoding.params
    prefix = encoding.name.removesuffix(".weight_packed").removesuffix(".weight")
    codes = tensors[encoding.name]
    if scheme.format == "pack-quantized":
        codes = unpack(codes, scheme.bits, scheme.shape[1])
    stored_scale = tensors[prefix + ".weight_scale"]
    scale = stored_scale.reshape(scheme.grid)
    zero = tensors.get(prefix + ".weight_zero_point")
    if zero is not None:
        zero = unpack(zero.T, scheme.bits, scheme.shape[0]).T if scheme.packed_zero \
            else zero.reshape(scheme.grid)
    values = dequantize(codes, scale, zero, scheme)
    return values, (codes, scale, zero, values, tuple(stored_scale.shape))


def encode(encoding: Encoding, values: torch.Tensor, state) -> tuple[dict, torch.Tensor]:
    """(the new codes (and FP8 scales), what they decode to); unchanged values keep theirs."""
    scheme: Scheme = encoding.params
    old_codes, scale, zero, old_values, scale_shape = state
    same = values == old_values                                     # (rows, cols)
    out = {}
    if scheme.type == "float":
        scale = new_fp8_scales(values, scale, same, scheme)
        out[encoding.name.removesuffix(".weight") + ".weight_scale"] = scale.reshape(scale_shape)
    codes = quantize(values, scale, zero, scheme)
    codes = torch.where(same, old_codes, codes) if scheme.type == "int" else \
        torch.where(same, old_codes.view(torch.uint8), codes.view(torch.uint8)).view(codes.dtype)
    realized = dequantize(codes, scale, zero, scheme)
    out[encoding.name] = pack(codes, scheme.bits) if scheme.format == "pack-quantized" else codes
    return out, realized


def expand(per_cell: torch.Tensor, scheme: Scheme) -> torch.Tensor:
    """A (grid) tensor spread over the weight's (rows, cols), edge cells cut to size."""
    rows, cols = scheme.shape
    out = per_cell.reshape(scheme.grid).repeat_interleave(scheme.cell[0], dim=0)[:rows]
    return out.repeat_interleave(scheme.cell[1], dim=1)[:, :cols]


def per_cell(x: torch.Tensor, scheme: Scheme, reduce: str) -> torch.Tensor:
    """(rows, cols) reduced (``amax`` / ``all``) over each cell -> (grid); the ragged edge is
    padded with what leaves the reduction unchanged."""
    (bh, bw), (gr, gc) = scheme.cell, scheme.grid
    fill = True if x.dtype == torch.bool else 0.0
    padded = torch.nn.functional.pad(x, (0, gc * bw - x.shape[1], 0, gr * bh - x.shape[0]),
                                     value=fill)
    cells = padded.reshape(gr, bh, gc, bw)
    return cells.all(dim=3).all(dim=1) if reduce == "all" else cells.amax(dim=(1, 3))


def dequantize(codes, scale, zero, scheme: Scheme) -> torch.Tensor:
    """compressed-tensors' ``dequantize``: ``(q - z) * s`` in s's dtype, returned as fp32."""
    out = codes.to(scale.dtype)
    if zero is not None:
        out = out - expand(zero, scheme).to(scale.dtype)
    return (out * expand(scale, scheme)).to(torch.float32)


def quantize(values, scale, zero, scheme: Scheme) -> torch.Tensor:
    """compressed-tensors' ``quantize`` of fp32 ``values`` with the given scale (and zero
    point): int8 codes (``round(clamp(x / s + z))``, half to even) or fp8 ones."""
    lo, hi = scheme.qrange
    scaled = values / expand(scale, scheme)
    if zero is not None:
        scaled += expand(zero, scheme).to(scaled.dtype)
    scaled = scaled.clamp_(lo, hi)
    if scheme.type == "float":
        return scaled.to(torch.float8_e4m3fn)
    return torch.round(scaled).to(torch.int8)


def new_fp8_scales(values, scale, same, scheme: Scheme) -> torch.Tensor:
    """Each changed cell's scale as compressed-tensors' ``calculate_qparams`` makes it from the
    cell's amax (``amax / 448`` in the scale's dtype, an all-zero cell the dtype's eps); an
    unchanged cell keeps its stored scale."""
    amax = per_cell(values.abs(), scheme, "amax")
    fresh = (amax / FP8_MAX).to(scale.dtype)
    fresh = torch.where(fresh == 0, torch.tensor(torch.finfo(scale.dtype).eps, dtype=scale.dtype), fresh)
    return torch.where(per_cell(same, scheme, "all"), scale, fresh)


# ----------------------------------------------------------------------------- packing

def pack(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """int8 codes (rows, cols) -> I32 (rows, ceil(cols * bits / 32)): ``q + 2^(b-1)`` as one
    little-endian bit stream per row (compressed-tensors' ``pack_to_int32``): value i at bits
    [i * b, (i + 1) * b) of the row."""
    rows, cols = codes.shape
    words = math.ceil(cols * bits / 32)
    if 32 % bits == 0:                 # no value spans two words: OR each word's values in, int32
        per = 32 // bits
        u = codes.to(torch.int32) + (1 << (bits - 1))                 # (rows, cols), unsigned
        u = torch.nn.functional.pad(u, (0, words * per - cols)).view(rows, words, per)
        out = u[..., 0].clone()
        for k in range(1, per):
            out |= u[..., k] << (k * bits)   # the top value's shift wraps into the sign bit
        return out
    u = codes.to(torch.int64) + (1 << (bits - 1))                     # (rows, cols), unsigned
    # 3, 5, 6, 7 bits: bit by bit
    bit_values = (u.unsqueeze(-1) >> torch.arange(bits, dtype=torch.int64)) & 1
    stream = torch.nn.functional.pad(bit_values.reshape(rows, cols * bits),
                                     (0, words * 32 - cols * bits))
    out = (stream.view(rows, words, 32) << torch.arange(32, dtype=torch.int64)).sum(dim=-1)
    return torch.where(out >= 1 << 31, out - (1 << 32), out).to(torch.int32)


def unpack(packed: torch.Tensor, bits: int, cols: int) -> torch.Tensor:
    """I32 (rows, words) -> int8 codes (rows, cols), the inverse of ``pack``."""
    rows, words = packed.shape
    if 32 % bits == 0:                 # int32 shifts; the mask drops the sign extension
        per, mask = 32 // bits, (1 << bits) - 1
        out = torch.empty(rows, words, per, dtype=torch.int8)
        for k in range(per):
            out[..., k] = ((packed >> (k * bits)) & mask) - (1 << (bits - 1))
        return out.view(rows, words * per)[:, :cols].contiguous()
    u = packed.to(torch.int64) & 0xFFFFFFFF                            # 3, 5, 6, 7 bits
    stream = ((u.unsqueeze(-1) >> torch.arange(32, dtype=torch.int64)) & 1).reshape(rows, -1)
    bit_values = stream[:, : cols * bits].reshape(rows, cols, bits)
    values = (bit_values << torch.arange(bits, dtype=torch.int64)).sum(dim=-1)
    return (values - (1 << (bits - 1))).to(torch.int8)
