"""Fused dequantize -> fold -> requantize for block-quantized weights: GGUF Q8_0 and Q4_0 (blocks of
32 along a row) and bitsandbytes NF4 (blocksize 64 over the flattened weight, no double quant).

Each program takes a (BM, 32 * G) tile of the weight: the delta tile from ``fold.delta_tile``
(``tl.dot``, fp32), viewed as BM * G blocks of 32 (or 64); the blocks' bytes dequantized exactly as the
torch codecs do, the delta added in fp32, and the blocks requantized with the codecs' operations:

- Q8_0 (``legacy.quantize_q8_0``, gguf-py/ggml): ``d = amax / 127`` (IEEE division, ``div_rn``),
  ``id = d ? 1 / d : 0``, ``q = roundf(x * id)`` (half away from zero, the codec's floor formula), d
  stored as fp16 (round to nearest even).
- Q4_0 (``legacy.quantize_q4_0``): ``d = signed_max / -8`` (the value of largest magnitude, first on
  ties), ``q = trunc(x * id + 8.5)`` clamped to [0, 15], element j < 16 in byte j's low nibble.
- NF4 (``bnb.quantize_4bit``): ``absmax`` per block (fp32), ``x * (1 / absmax)`` clamped to [-1, 1],
  the code index = how many midpoints of the sorted code lie below it (``bucketize``, right=False),
  first element of a pair in the high nibble.

So given the same fp32 merged values the bytes are the codecs' bytes. The merged values themselves
differ from the torch path's only by the order of the rank-K dot product (``tl.dot`` vs. torch's
matmul), which moves a few values across a rounding boundary of the 4- or 8-bit grid. Divisions are
``tl.math.div_rn`` and fp contraction is off (``enable_fp_fusion=False``): the default fp32 division
on NVIDIA GPUs is approximate and ``x * id + 8.5`` would otherwise become one fma.

Each program also writes four fp32 partial sums for the survival score (quantized.survival): with
``i = merged - old`` and ``r = deq(new) - old``: i.r, i.i, r.r, (r - i).(r - i).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .fold import delta_tile, rank_pad

BLOCK_M = 16
GROUPS = 4          # quant blocks per row in one program: a tile is (BLOCK_M, 32 * GROUPS)
Q8_0_BYTES = 34     # fp16 d | 32 x int8
Q4_0_BYTES = 18     # fp16 d | 16 bytes of nibbles


@triton.jit
def _tile(b_ptr, a_ptr, scale, rows, cols, rank, QK: tl.constexpr, BM: tl.constexpr,
          G: tl.constexpr, KP: tl.constexpr):
    """The delta of this program's tile as (BM * G, QK) blocks, with each block's row and index in
    its row, and the mask of blocks inside the tensor."""
    offs_m = tl.program_id(0) * BM + tl.arange(0, BM)
    offs_n = tl.program_id(1) * (G * QK) + tl.arange(0, G * QK)
    delta = tl.reshape(delta_tile(b_ptr, a_ptr, scale, rows, cols, rank, offs_m, offs_n, KP),
                       (BM * G, QK))
    blk = tl.arange(0, BM * G)
    row = tl.program_id(0) * BM + blk // G
    col_blk = tl.program_id(1) * G + blk % G
    ok = (row < rows) & (col_blk < cols // QK)
    return delta, row, col_blk, ok


@triton.jit
def _f16_of(lo, hi):
    """Two little-endian bytes (uint8) -> fp32 value of the fp16 they hold."""
    bits = lo.to(tl.uint16) | (hi.to(tl.uint16) << 8)
    return bits.to(tl.float16, bitcast=True).to(tl.float32)


@triton.jit
def _store_f16(ptr, d, ok):
    """fp32 d (N,) -> fp16 (nearest even), two bytes at ptr (N,), ptr + 1."""
    bits = d.to(tl.float16).to(tl.uint16, bitcast=True)
    tl.store(ptr, (bits & 0xFF).to(tl.uint8), mask=ok)
    tl.store(ptr + 1, (bits >> 8).to(tl.uint8), mask=ok)


@triton.jit
def _roundf(x):
    """C roundf, as the codec's round_away: sign(x) * (fl + floor(2 * (|x| - fl))), fl = floor(|x|)."""
    a = tl.abs(x)
    fl = tl.floor(a)
    r = fl + tl.floor(2.0 * (a - fl))
    return tl.where(x < 0, -r, r)


@triton.jit
def _stats(stats_ptr, old, merged, new, ok2):
    i = tl.where(ok2, merged - old, 0.0)
    r = tl.where(ok2, new - old, 0.0)
    pid = tl.program_id(0) * tl.num_programs(1) + tl.program_id(1)
    tl.store(stats_ptr + pid * 4 + 0, tl.sum(tl.sum(i * r, axis=1), axis=0))
    tl.store(stats_ptr + pid * 4 + 1, tl.sum(tl.sum(i * i, axis=1), axis=0))
    tl.store(stats_ptr + pid * 4 + 2, tl.sum(tl.sum(r * r, axis=1), axis=0))
    tl.store(stats_ptr + pid * 4 + 3, tl.sum(tl.sum((r - i) * (r - i), axis=1), axis=0))


@triton.jit
def _q8_0_kernel(src_ptr, dst_ptr, stats_ptr, b_ptr, a_ptr, scale, rows, cols, rank,
                 BM: tl.constexpr, G: tl.constexpr, KP: tl.constexpr):
    delta, row, col_blk, ok = _tile(b_ptr, a_ptr, scale, rows, cols, rank, 32, BM, G, KP)
    base = row * ((cols // 32) * 34) + col_blk * 34                           # (N,) block starts
    ok2 = ok[:, None]
    j = tl.arange(0, 32)[None, :]
    d_old = _f16_of(tl.load(src_ptr + base, mask=ok, other=0), tl.load(src_ptr + base + 1, mask=ok, other=0))
    qs = tl.load(src_ptr + base[:, None] + 2 + j, mask=ok2, other=0).to(tl.int8, bitcast=True)
    old = qs.to(tl.float32) * d_old[:, None]
    merged = old + delta
    amax = tl.max(tl.abs(merged), axis=1)
    d = tl.math.div_rn(amax, tl.full(amax.shape, 127.0, tl.float32))
    inv = tl.where(d == 0, 0.0, tl.math.div_rn(tl.full(d.shape, 1.0, tl.float32), tl.where(d == 0, 1.0, d)))
    q = _roundf(merged * inv[:, None])
    _store_f16(dst_ptr + base, d, ok)
    tl.store(dst_ptr + base[:, None] + 2 + j, q.to(tl.int8).to(tl.uint8, bitcast=True), mask=ok2)
    new = q * d.to(tl.float16).to(tl.float32)[:, None]
    _stats(stats_ptr, old, merged, new, ok2)


@triton.jit
def _q4_0_kernel(src_ptr, dst_ptr, stats_ptr, b_ptr, a_ptr, scale, rows, cols, rank,
                 BM: tl.constexpr, G: tl.constexpr, KP: tl.constexpr):
    delta, row, col_blk, ok = _tile(b_ptr, a_ptr, scale, rows, cols, rank, 32, BM, G, KP)
    base = row * ((cols // 32) * 18) + col_blk * 18
    ok2 = ok[:, None]
    ok3 = ok[:, None, None]
    half = tl.arange(0, 2)[None, :, None]                                     # (1, 2, 1)
    jj = tl.arange(0, 16)[None, None, :]                                      # (1, 1, 16)
    d_old = _f16_of(tl.load(src_ptr + base, mask=ok, other=0), tl.load(src_ptr + base + 1, mask=ok, other=0))
    byte = tl.load(src_ptr + base[:, None, None] + 2 + jj, mask=ok3, other=0)  # (N, 1, 16)
    nib = (byte >> (half * 4).to(tl.uint8)) & 0x0F                            # (N, 2, 16): element h*16+j
    q_old = nib.to(tl.int32) - 8
    old = tl.reshape(d_old[:, None, None] * q_old.to(tl.float32), (BM * G, 32))
    merged = old + delta
    idx = tl.argmax(tl.abs(merged), axis=1, tie_break_left=True)
    pick = tl.arange(0, 32)[None, :] == idx[:, None]
    signed = tl.max(tl.where(pick, merged, float("-inf")), axis=1)          # keeps -0.0
    d = tl.math.div_rn(signed, tl.full(signed.shape, -8.0, tl.float32))
    inv = tl.where(d == 0, 0.0, tl.math.div_rn(tl.full(d.shape, 1.0, tl.float32), tl.where(d == 0, 1.0, d)))
    q = tl.minimum(tl.maximum(tl.floor(merged * inv[:, None] + 8.5), 0.0), 15.0)   # (N, 32)
    q3 = tl.reshape(q.to(tl.int32), (BM * G, 2, 16))
    packed = tl.sum(q3 << (half * 4), axis=1)                                 # (N, 16)
    _store_f16(dst_ptr + base, d, ok)
    tl.store(dst_ptr + base[:, None] + 2 + tl.arange(0, 16)[None, :], packed.to(tl.uint8), mask=ok2)
    new = (q - 8.0) * d.to(tl.float16).to(tl.float32)[:, None]
    _stats(stats_ptr, old, merged, new, ok2)


@triton.jit
def _nf4_kernel(src_ptr, absmax_ptr, dst_ptr, absmax_out_ptr, code_ptr, bounds_ptr, stats_ptr,
                b_ptr, a_ptr, scale, rows, cols, rank,
                BM: tl.constexpr, G: tl.constexpr, KP: tl.constexpr):
    delta, row, col_blk, ok = _tile(b_ptr, a_ptr, scale, rows, cols, rank, 64, BM, G, KP)
    blk = row * (cols // 64) + col_blk                                        # flat block index
    ok2 = ok[:, None]
    pair = tl.arange(0, 2)[None, None, :]                                     # (1, 1, 2)
    jj = tl.arange(0, 32)[None, :, None]                                      # (1, 32, 1)
    byte = tl.load(src_ptr + blk[:, None, None] * 32 + jj, mask=ok[:, None, None], other=0)
    nib = (byte >> ((1 - pair) * 4).to(tl.uint8)) & 0x0F                      # (N, 32, 2): element 2j+p
    vals = tl.load(code_ptr + nib.to(tl.int32))
    am_old = tl.load(absmax_ptr + blk, mask=ok, other=0.0)
    old = tl.reshape(vals * am_old[:, None, None], (BM * G, 64))
    merged = old + delta
    amax = tl.max(tl.abs(merged), axis=1)
    inv = tl.math.div_rn(tl.full(amax.shape, 1.0, tl.float32), tl.maximum(amax, 1e-38))
    x = tl.minimum(tl.maximum(merged * inv[:, None], -1.0), 1.0)
    q = tl.zeros(x.shape, tl.int32)
    for k in tl.static_range(15):
        q += (x > tl.load(bounds_ptr + k)).to(tl.int32)
    q3 = tl.reshape(q, (BM * G, 32, 2))
    packed = tl.sum(q3 << ((1 - pair) * 4), axis=2)                           # (N, 32)
    tl.store(absmax_out_ptr + blk, amax, mask=ok)
    tl.store(dst_ptr + blk[:, None] * 32 + tl.arange(0, 32)[None, :], packed.to(tl.uint8), mask=ok2)
    new = tl.load(code_ptr + q) * amax[:, None]
    _stats(stats_ptr, old, merged, new, ok2)


def _launch(kernel, qk: int, args: tuple, rows: int, cols: int, a: torch.Tensor, b: torch.Tensor,
            scale: float, device) -> torch.Tensor:
    r = a.shape[0]
    assert a.shape == (r, cols) and b.shape == (rows, r), (rows, cols, a.shape, b.shape)
    a = a.to(device=device, dtype=torch.float32).contiguous()
    b = b.to(device=device, dtype=torch.float32).contiguous()
    grid = (triton.cdiv(rows, BLOCK_M), triton.cdiv(cols // qk, GROUPS))
    stats = torch.zeros(grid[0] * grid[1] * 4, dtype=torch.float32, device=device)
    kernel[grid](*args, stats, b, a, float(scale), rows, cols, r,
                 BM=BLOCK_M, G=GROUPS, KP=rank_pad(r), enable_fp_fusion=False)
    return stats.view(-1, 4)


def _check_cols(cols: int, qk: int, what: str) -> None:
    if cols % qk:
        raise ValueError(f"{what}: the row length {cols} is not a multiple of the block size {qk}")


def fold_gguf(raw: torch.Tensor, qtype: str, shape: tuple[int, int], a: torch.Tensor, b: torch.Tensor,
              scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """GGUF Q8_0/Q4_0 bytes (rows, row_bytes) uint8 -> (new bytes, same shape; stats (programs, 4))."""
    rows, cols = shape
    _check_cols(cols, 32, qtype)
    kernel, nbytes = {"Q8_0": (_q8_0_kernel, Q8_0_BYTES), "Q4_0": (_q4_0_kernel, Q4_0_BYTES)}[qtype]
    raw = raw.contiguous().view(torch.uint8).reshape(rows, (cols // 32) * nbytes)
    out = torch.empty_like(raw)
    stats = _launch(kernel, 32, (raw, out), rows, cols, a, b, scale, raw.device)
    return out, stats


def fold_q8_0(raw, shape, a, b, scale):
    return fold_gguf(raw, "Q8_0", shape, a, b, scale)


def fold_q4_0(raw, shape, a, b, scale):
    return fold_gguf(raw, "Q4_0", shape, a, b, scale)


def nf4_bounds(code: torch.Tensor) -> torch.Tensor:
    """(15,) fp32 midpoints of the sorted code, as ``bnb.quantize_4bit`` computes them (NF4 is sorted)."""
    return (code[:-1] + code[1:]) / 2


def fold_nf4(packed: torch.Tensor, absmax: torch.Tensor, shape: tuple[int, int], a: torch.Tensor,
             b: torch.Tensor, scale: float, code: torch.Tensor | None = None
             ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """bitsandbytes NF4, blocksize 64, plain fp32 absmax: packed (n/2, 1) uint8 + absmax (n/64,) ->
    (new packed, new absmax, stats). Needs cols % 64 == 0 so that blocks never straddle rows."""
    from ..quant.bnb import code_4bit

    rows, cols = shape
    _check_cols(cols, 64, "NF4")
    device = packed.device
    code = (code_4bit("nf4", device) if code is None else code).to(device, torch.float32).contiguous()
    assert bool((code[1:] > code[:-1]).all()), "fold_nf4 needs the sorted NF4 code"
    flat = packed.contiguous().view(torch.uint8).reshape(-1)
    absmax = absmax.to(device, torch.float32).contiguous().reshape(-1)
    out, absmax_out = torch.empty_like(flat), torch.empty_like(absmax)
    stats = _launch(_nf4_kernel, 64, (flat, absmax, out, absmax_out, code, nf4_bounds(code).contiguous()),
                    rows, cols, a, b, scale, device)
    return out.view(packed.shape), absmax_out, stats
