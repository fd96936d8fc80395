"""MXFP4 checkpoints as a codec (gpt-oss, transformers' ``Mxfp4Config``): config.json
``quantization_config = {"quant_method": "mxfp4", "modules_to_not_convert": [...]}``.

gpt-oss stores only its fused expert weights in MXFP4 (the OCP Microscaling e2m1 format);
attention, router, embeddings and the expert biases stay bf16 (``modules_to_not_convert`` names
them for transformers' quantizer; here the stored ``_blocks`` / ``_scales`` say which are MXFP4). Per expert parameter ``X``
(``model.layers.N.mlp.experts.gate_up_proj`` or ``.down_proj``), as transformers' loader reads
them (integrations/mxfp4.py, ``convert_moe_packed_tensors``):

  ``X_blocks``  U8 (E, rows, G, 16)  two e2m1 codes per byte, element 2k in the low nibble and
                                    2k + 1 in the high one: 32 elements per block, G blocks a row
  ``X_scales``  U8 (E, rows, G)      one e8m0 exponent per block (bias 127): scale 2^(s - 127)

The stored rows run along the parameter's output features: the float parameter transformers
dequantizes them into (and adapters target) is the transpose, ``X`` (E, G * 32, rows), e.g.
``gate_up_proj`` (E, hidden, 2 * intermediate) as ``GptOssExperts`` holds it. A code is 1 sign
bit and 3 magnitude bits indexing {0, 0.5, 1, 1.5, 2, 3, 4, 6}; ``W = code * 2^(s - 127)``
(``torch.ldexp``, exact in fp32 and bf16).

Requantizing (``--requantize keep``) is the OCP MX v1.0 conversion: per block ``s = floor(log2
amax) - 2`` (2 is e2m1's largest exponent; an all-zero block takes the smallest, -127), clamped
to e8m0's [-127, 127], then each value / 2^s rounded to the nearest e2m1 value, ties to the even
code, beyond 6 saturated to 6. A block whose values the merge leaves unchanged keeps its stored
codes and scale (whatever quantizer made the base, and although a block whose largest code is
below 4 would get another scale from the rule), so that an untouched block, and a merge with a
zero adapter, is a byte copy.
"""

from __future__ import annotations

import torch

from ..errors import FormatError, UnsupportedError
from . import Encoding

NAME = "mxfp4"
QUANT_METHODS = ("mxfp4",)
TYPE = "MXFP4"
DAMAGED = ("the checkpoint is damaged: download it again, or quantize and save it again with "
           "the tool that made it (gpt-oss checkpoints come MXFP4 from their publisher)")
BLOCKS, SCALES = "_blocks", "_scales"
BLOCK = 32                               # elements sharing one scale
E2M1 = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0)
# midpoints between neighbouring magnitudes; a tie at an odd k goes up (to the even code k + 1)
MIDPOINTS = (0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0)
EMAX_ELEM = 2                            # e2m1: 6 = 1.5 * 2^2
SCALE_MIN, SCALE_MAX = -127, 127         # e8m0 without its NaN (255)
BIAS = 127


def scales_name(name: str) -> str:
    """``X_blocks`` -> ``X_scales``."""
    return name.removesuffix(BLOCKS) + SCALES


def logical_name(encoding: Encoding) -> str:
    """The float parameter's name, which adapters use: ``X_blocks`` -> ``X``."""
    return encoding.name.removesuffix(BLOCKS)


# ----------------------------------------------------------------------------- plan time

def describe(entries, config: dict, read, where: str) -> list[Encoding]:
    """Every ``X_blocks`` with its ``X_scales``; blocks without scales, scales without blocks,
    and shapes or dtypes that are not MXFP4's are refused by name."""
    out = []
    for name in sorted(entries):
        entry = entries[name]
        if name.endswith(SCALES):
            owner = entries.get(name.removesuffix(SCALES) + BLOCKS)
            if owner is None:
                raise FormatError(f"{entry.file}: {name} has no {name.removesuffix(SCALES)}"
                                  f"{BLOCKS} beside it; {DAMAGED}")
        elif name.endswith(BLOCKS):
            out.append(_encoding(entries, name))
    return out


def _encoding(entries, name: str) -> Encoding:
    entry = entries[name]
    scale = entries.get(scales_name(name))
    shape = tuple(entry.shape)
    if entry.dtype != "U8" or not shape or shape[-1] != BLOCK // 2:
        raise FormatError(f"{entry.file}: {name} is {entry.dtype} {list(shape)}; MXFP4 blocks "
                          f"are U8 (experts, rows, blocks, {BLOCK // 2}) as gpt-oss stores them; "
                          f"{DAMAGED}")
    if len(shape) != 4:
        raise UnsupportedError(f"{entry.file}: {name} is U8 {list(shape)}; MXFP4 is supported "
                               f"for fused expert weights (experts, rows, blocks, {BLOCK // 2}), "
                               "as gpt-oss stores them")
    if scale is None:
        raise FormatError(f"{entry.file}: {name} is MXFP4 but {scales_name(name)} is missing; "
                          f"{DAMAGED}")
    if name.removesuffix(BLOCKS) in entries:     # both encodings of one parameter
        raise FormatError(f"{entry.file}: {name} and {name.removesuffix(BLOCKS)} are both stored "
                          "(the MXFP4 and the float parameter); keep one of them")
    if scale.dtype != "U8" or tuple(scale.shape) != shape[:-1]:
        raise FormatError(f"{scale.file}: {scales_name(name)} is {scale.dtype} "
                          f"{list(scale.shape)}, but {name} {list(shape)} needs U8 "
                          f"{list(shape[:-1])} (one e8m0 scale per block of {BLOCK}); {DAMAGED}")
    experts, rows, groups, _ = shape
    return Encoding(NAME, TYPE, name, (experts, groups * BLOCK, rows), (name, scales_name(name)))


# ----------------------------------------------------------------------------- run time

def decode(encoding: Encoding, tensors) -> tuple[torch.Tensor, object]:
    """(fp32 parameter (E, cols, rows), (blocks, scales): the state ``encode`` compares blocks
    against, decoded again one expert at a time rather than held as a second fp32 copy)."""
    blocks, scales = tensors[encoding.name], tensors[scales_name(encoding.name)]
    if tuple(blocks.shape[:-1]) != tuple(scales.shape):
        raise FormatError(f"{encoding.name} {list(blocks.shape)} and its scales "
                          f"{list(scales.shape)} disagree")
    return dequantize(blocks, scales), (blocks, scales)


def encode(encoding: Encoding, values: torch.Tensor, state) -> tuple[dict, torch.Tensor]:
    """(the new blocks and scales, what they decode to); unchanged blocks keep their bytes."""
    blocks, scales = quantize(values)
    if state is not None:
        old_blocks, old_scales = state
        for e in range(values.shape[0]):
            old = dequantize(old_blocks[e:e + 1], old_scales[e:e + 1])
            same = (_as_blocks(values[e:e + 1]) == _as_blocks(old)).all(dim=-1)[0]   # (rows, G)
            blocks[e] = torch.where(same.unsqueeze(-1), old_blocks[e], blocks[e])
            scales[e] = torch.where(same, old_scales[e], scales[e])
    name = encoding.name
    return {name: blocks, scales_name(name): scales}, dequantize(blocks, scales)


def _as_blocks(values: torch.Tensor) -> torch.Tensor:
    """A parameter (E, cols, rows) as its stored blocks' values (E, rows, G, 32)."""
    experts, cols, rows = values.shape
    return values.transpose(1, 2).reshape(experts, rows, cols // BLOCK, BLOCK)


def dequantize(blocks: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """U8 blocks (E, rows, G, 16) and scales (E, rows, G) -> fp32 (E, G * 32, rows): transformers'
    ``convert_moe_packed_tensors`` (the e2m1 value of each nibble, times 2^(s - 127) as
    ``ldexp`` multiplies), one expert at a time, both nibbles of a byte in one lookup."""
    experts, rows, groups, half = blocks.shape
    lut = torch.tensor(E2M1 + tuple(-v for v in E2M1), dtype=torch.float32)
    pairs = torch.stack([lut.repeat(16), lut.repeat_interleave(16)], dim=1)   # byte -> (lo, hi)
    out = torch.empty(experts, rows, groups, 2 * half, dtype=torch.float32)
    for e in range(experts):
        power = torch.ldexp(torch.ones(rows, groups), scales[e].to(torch.int32) - BIAS)
        values = pairs[blocks[e].to(torch.long)].view(rows, groups, 2 * half)
        torch.mul(values, power.unsqueeze(-1), out=out[e])
        nan = scales[e] == 255          # e8m0's NaN: transformers' ldexp gives x * 2^128 (or 0)
        if bool(nan.any()):
            out[e][nan] = torch.ldexp(values[nan], torch.tensor(255 - BIAS, dtype=torch.int32))
    return out.view(experts, rows, groups * 2 * half).transpose(1, 2).contiguous()


def quantize(values: torch.Tensor, exponents: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """fp32 parameter (E, cols, rows) -> (U8 blocks (E, rows, G, 16), U8 scales (E, rows, G)),
    the OCP MX conversion (module docstring), one expert at a time; ``exponents`` (E, rows, G),
    unbiased, replaces the OCP scale rule (tests: other quantizers' scales)."""
    experts, cols, rows = values.shape
    if cols % BLOCK:
        raise UnsupportedError(f"MXFP4 needs the blocked dimension to be a multiple of {BLOCK}, "
                               f"got {cols}")
    x = _as_blocks(values.to(torch.float32))
    blocks = torch.empty(experts, rows, cols // BLOCK, BLOCK // 2, dtype=torch.uint8)
    scales = torch.empty(experts, rows, cols // BLOCK, dtype=torch.uint8)
    for e in range(experts):
        xe = x[e].contiguous()                                           # (rows, G, 32)
        exponent = ocp_exponents(xe.abs().amax(dim=-1)) if exponents is None else \
            exponents[e].to(torch.int32).clamp(SCALE_MIN, SCALE_MAX)
        scales[e] = (exponent + BIAS).to(torch.uint8)
        # x / 2^s as one multiply by the power of two (ldexp's arithmetic, one pow per block)
        code = e2m1_codes(xe * torch.ldexp(torch.ones(exponent.shape), -exponent).unsqueeze(-1))
        blocks[e] = code[..., 0::2] | (code[..., 1::2] << 4)
    return blocks, scales


def ocp_exponents(amax: torch.Tensor) -> torch.Tensor:
    """Each block's unbiased scale exponent from its amax: floor(log2 amax) - 2 (``frexp``,
    exact), -127 for an all-zero block, clamped to e8m0's range; int32."""
    exponent = torch.frexp(amax).exponent - 1 - EMAX_ELEM
    return torch.where(amax > 0, exponent, SCALE_MIN).clamp(SCALE_MIN, SCALE_MAX).to(torch.int32)


def e2m1_codes(y: torch.Tensor) -> torch.Tensor:
    """fp32 values already divided by their block's scale -> U8 e2m1 codes (sign << 3 | the
    index of the nearest magnitude, ties to the even index, saturating at 6); uint8 compares
    throughout (4x faster than bucketize's int64 indices)."""
    a = y.abs()
    code = (a > MIDPOINTS[0]).to(torch.uint8)
    for midpoint in MIDPOINTS[1:]:
        code += a > midpoint                                           # midpoints below a
    code += (a == 0.75) | (a == 1.75) | (a == 3.5)                   # ties to the even code
    code |= torch.signbit(y).to(torch.uint8) << 3
    return code
