"""Fine-grained block FP8 checkpoints as a codec (DeepSeek-V3/R1, Qwen3-FP8 and transformers'
``FineGrainedFP8Config``): config.json ``quantization_config = {"quant_method": "fp8", "fmt":
"e4m3", "weight_block_size": [128, 128], ...}``.

Stored per quantized weight ``X.weight`` (rows, cols) (or ``X.gate_up_proj`` (E, rows, cols) of
fused experts, transformers' naming):

  ``X.weight``            F8_E4M3 (rows, cols)                       codes q
  ``X.weight_scale_inv``  F32     (ceil(rows / bm), ceil(cols / bn))  one scale s per block

``W = q * s`` per (bm, bn) block; the last block row and column may be ragged (shorter), as
DeepSeek's own ``weight_dequant`` reads them. ``weight_block_size`` null means one scale per
tensor (shape (), (1,) or (1, 1)).

Requantizing (``--requantize keep``) is transformers' own ``Fp8Quantize`` per block: ``scale =
448 / amax`` (1 for an all-zero block), ``q = fp8(clamp(x * scale, -448, 448))``, stored
``s = 1 / scale``, extended to ragged edge blocks (transformers leaves such weights unquantized).
A block whose values the merge leaves unchanged keeps its stored codes and scale, so that an
untouched block (and a merge with a zero adapter) is a byte copy whatever quantizer made the
base. transformers' CPU dequantizer (``Fp8Dequantize``) derives the block from the scale grid
(``rows // scale_rows``), which is right only when the block size divides the weight; this codec
takes the block from ``weight_block_size``.
"""

from __future__ import annotations

import math
from collections.abc import Iterator

import torch

from ..errors import FormatError, UnsupportedError
from . import Encoding

NAME = "fp8"
QUANT_METHODS = ("fp8",)
TYPE = "FP8_E4M3"
DAMAGED = ("the checkpoint is damaged: download it again, or quantize and save it again "
           "(transformers' FineGrainedFP8Config, save_pretrained)")
FP8 = torch.float8_e4m3fn
FP8_MAX = float(torch.finfo(FP8).max)          # 448
SCALE_SUFFIX = "_scale_inv"


def scale_name(name: str) -> str:
    """transformers' companion name: ``X.weight`` -> ``X.weight_scale_inv``; a fused expert
    parameter ``X.gate_up_proj`` -> ``X.gate_up_proj_scale_inv``."""
    return name + SCALE_SUFFIX


def grid(shape: tuple[int, ...], block: tuple[int, int]) -> tuple[int, ...]:
    """The scale tensor's shape for a weight ``shape`` (..., rows, cols) in ``block``s."""
    *lead, rows, cols = shape
    return (*lead, math.ceil(rows / block[0]), math.ceil(cols / block[1]))


# ----------------------------------------------------------------------------- plan time

def describe(entries, config: dict, read, where: str) -> list[Encoding]:
    """Every F8_E4M3 weight with its ``weight_scale_inv``; a weight without its scale, a scale
    without its weight, or a scale whose shape is not the weight's block grid is refused by
    name."""
    block = _block_size(config, where)
    out = []
    for name in sorted(entries):
        entry = entries[name]
        if name.endswith(SCALE_SUFFIX):
            owner = entries.get(name.removesuffix(SCALE_SUFFIX))
            if owner is None or owner.dtype != "F8_E4M3":
                raise FormatError(f"{entry.file}: {name} has no F8_E4M3 weight "
                                  f"{name.removesuffix(SCALE_SUFFIX)} beside it; {DAMAGED}")
            continue
        if entry.dtype == "F8_E5M2":
            raise UnsupportedError(f"{entry.file}: {name} is F8_E5M2; FP8 checkpoints with "
                                   "float8_e4m3fn weights are supported: merge into the BF16 "
                                   "model and quantize the result")
        if entry.dtype == "F8_E4M3":
            out.append(_encoding(entries, name, block))
    return out


def _block_size(qc: dict, where: str) -> tuple[int, int] | None:
    fmt = qc.get("fmt", "e4m3")
    if fmt != "e4m3":
        raise UnsupportedError(f"{where}: fmt {fmt!r} is not supported (e4m3 is)")
    if qc.get("scale_fmt", "float") != "float":
        raise UnsupportedError(f"{where}: scale_fmt {qc.get('scale_fmt')!r} is not supported "
                               "(float, i.e. fp32 weight_scale_inv, is); use --requantize bf16 "
                               "after dequantizing with transformers, or the BF16 model")
    if qc.get("expert_dtype", "fp8") != "fp8":
        raise UnsupportedError(f"{where}: expert_dtype {qc.get('expert_dtype')!r} is not "
                               "supported (fp8 is)")
    block = qc.get("weight_block_size", [128, 128])
    if block is None:
        return None
    if not (isinstance(block, list | tuple) and len(block) == 2
            and all(isinstance(b, int) and not isinstance(b, bool) and b > 0 for b in block)):
        raise FormatError(f"{where}: weight_block_size {block!r} is not two positive integers; "
                          "fix config.json (DeepSeek-V3 and Qwen3-FP8 use [128, 128])")
    return int(block[0]), int(block[1])


def _encoding(entries, name: str, block: tuple[int, int] | None) -> Encoding:
    entry = entries[name]
    scale = entries.get(scale_name(name))
    shape = tuple(entry.shape)
    if scale is None:
        raise FormatError(f"{entry.file}: {name} is F8_E4M3 but {scale_name(name)} is missing; "
                          f"{DAMAGED}")
    if scale.dtype != "F32":
        raise UnsupportedError(f"{scale.file}: {scale_name(name)} is {scale.dtype}; FP8 block "
                               "scales are supported as F32 (DeepSeek-V3 style)")
    if len(shape) < 2:
        raise UnsupportedError(f"{entry.file}: {name} is F8_E4M3 of shape {list(shape)}; only "
                               "weights of 2 or more dimensions are supported")
    if block is None:
        if math.prod(scale.shape) != 1:
            raise FormatError(f"{scale.file}: {scale_name(name)} has shape {list(scale.shape)} but "
                              "weight_block_size is null (one scale per tensor); set config.json's "
                              "weight_block_size to the block size the checkpoint was made with")
        return Encoding(NAME, TYPE, name, shape, (name, scale_name(name)), shape[-2:])
    want = grid(shape, block)
    if tuple(scale.shape) != want:
        raise FormatError(f"{scale.file}: {scale_name(name)} has shape {list(scale.shape)}, but "
                          f"{name} {list(shape)} in weight_block_size {list(block)} blocks needs "
                          f"{list(want)} (one scale per block, edge blocks included); set "
                          "config.json's weight_block_size to the block size the checkpoint was "
                          f"made with, or {DAMAGED.split(': ', 1)[1]}")
    return Encoding(NAME, TYPE, name, shape, (name, scale_name(name)), block)


# ----------------------------------------------------------------------------- run time

def decode(encoding: Encoding, tensors) -> tuple[torch.Tensor, object]:
    """(fp32 weight in the stored shape, (codes, scales, decoded values): the state ``encode``
    compares blocks against)."""
    q, s = tensors[encoding.name], tensors[scale_name(encoding.name)]
    s = s.reshape(grid(tuple(q.shape), encoding.params))
    values = dequantize(q, s, encoding.params)
    return values, (q, s, values)


def encode(encoding: Encoding, values: torch.Tensor, state) -> tuple[dict, torch.Tensor]:
    """(the new codes and scales, what they decode to); unchanged blocks keep their bytes."""
    q, s = quantize(values, encoding.params)
    if state is not None:
        old_q, old_s, old_values = state
        keep_unchanged(q, s, values, old_q, old_s.reshape(s.shape), old_values, encoding.params)
    name = encoding.name
    return {name: q, scale_name(name): s}, dequantize(q, s, encoding.params)


def _row_blocks(shape: tuple[int, ...], block: tuple[int, int]) -> Iterator[tuple[int, int, slice]]:
    """(leading index, block row, the block row's slice of rows) over a (lead, rows, cols) view."""
    lead = math.prod(shape[:-2])
    rows = shape[-2]
    for e in range(lead):
        for i in range(math.ceil(rows / block[0])):
            yield e, i, slice(i * block[0], min(rows, (i + 1) * block[0]))


def _per_column(row_scales: torch.Tensor, block_cols: int, cols: int) -> torch.Tensor:
    """One block row's scales (C,) spread over its columns (cols,)."""
    return row_scales.repeat_interleave(block_cols)[:cols]


def _per_block(per_col: torch.Tensor, block_cols: int, fill) -> torch.Tensor:
    """A per-column quantity (cols,) reduced to one per block column (C,): ``fill`` pads the
    ragged edge (0 for amax, True for all)."""
    cols = per_col.shape[0]
    padded = torch.nn.functional.pad(per_col, (0, -cols % block_cols), value=fill)
    return padded.view(-1, block_cols)


def dequantize(q: torch.Tensor, s: torch.Tensor, block: tuple[int, int] | None) -> torch.Tensor:
    """codes q (..., rows, cols) and scales s (grid) -> fp32 ``q * s`` per block (one fp32
    multiply per value, as transformers' Fp8Dequantize)."""
    out = q.to(torch.float32)
    block = block or tuple(q.shape[-2:])
    view = out.reshape(-1, *q.shape[-2:])
    scales = s.reshape(-1, *s.shape[-2:])
    for e, i, rows in _row_blocks(tuple(q.shape), block):
        view[e, rows].mul_(_per_column(scales[e, i], block[1], q.shape[-1]))
    return out


def quantize(values: torch.Tensor, block: tuple[int, int] | None) -> tuple[torch.Tensor, torch.Tensor]:
    """fp32 (..., rows, cols) -> (F8_E4M3 codes, F32 scale_inv (grid)), per block as
    transformers' Fp8Quantize: scale = 448 / amax, stored 1 / scale."""
    block = block or tuple(values.shape[-2:])
    shape = tuple(values.shape)
    q = torch.empty(shape, dtype=FP8)
    s = torch.empty(grid(shape, block), dtype=torch.float32)
    src, codes, scales = values.reshape(-1, *shape[-2:]), q.view(-1, *shape[-2:]), s.view(-1, *s.shape[-2:])
    for e, i, rows in _row_blocks(shape, block):
        x = src[e, rows]                                              # (<= bm, cols)
        amax = _per_block(x.abs().amax(dim=0), block[1], 0.0).amax(dim=1)   # (C,)
        scale = FP8_MAX / torch.where(amax > 0, amax, torch.ones_like(amax))
        scale = torch.where(amax > 0, scale, torch.ones_like(scale))
        scales[e, i] = 1.0 / scale
        scaled = x * _per_column(scale, block[1], shape[-1])
        codes[e, rows] = scaled.clamp_(-FP8_MAX, FP8_MAX).to(FP8)
    return q, s


def keep_unchanged(q: torch.Tensor, s: torch.Tensor, values: torch.Tensor, old_q: torch.Tensor,
                   old_s: torch.Tensor, old_values: torch.Tensor, block: tuple[int, int] | None) -> None:
    """Blocks whose ``values`` equal ``old_values`` (the stored tensor decoded) take the stored
    codes ``old_q`` and scales ``old_s`` again, in place in ``q`` and ``s``."""
    block = block or tuple(values.shape[-2:])
    shape = tuple(values.shape)
    new, old = values.reshape(-1, *shape[-2:]), old_values.reshape(-1, *shape[-2:])
    codes, stored = q.view(torch.uint8).view(-1, *shape[-2:]), old_q.view(torch.uint8).reshape(-1, *shape[-2:])
    scales, old_scales = s.view(-1, *s.shape[-2:]), old_s.reshape(-1, *s.shape[-2:])
    for e, i, rows in _row_blocks(shape, block):
        same = _per_block((new[e, rows] == old[e, rows]).all(dim=0), block[1], True).all(dim=1)
        if not bool(same.any()):
            continue
        scales[e, i] = torch.where(same, old_scales[e, i], scales[e, i])
        columns = _per_column(same, block[1], shape[-1])               # (cols,) bool
        codes[e, rows] = torch.where(columns, stored[e, rows], codes[e, rows])
