"""ggml's per-sub-block scale searches (ggml-quants.c), vectorized over sub-blocks.

Each search runs all of its candidate scales at once and keeps ggml's sequential pieces sequential:
sums over a sub-block's values are folded left to right (``seqsum``), and the best candidate is picked
in ggml's order with its strict comparisons, so the chosen codes and scales are the C code's bits.
Tensors are laid out value-major, ``xt`` (n, B): n values of B sub-blocks, so each step is contiguous.
"""

from __future__ import annotations

import numpy as np
import torch

from ._ops import F32, div, nearest_int, seqsum

GROUP_MAX_EPS = float(np.float32(1e-15))


def _signed_absmax(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x (B, n) -> (amax (B,), the first value with that magnitude (B,))."""
    idx = x.abs().argmax(1, keepdim=True)
    return x.abs().amax(1), x.gather(1, idx).squeeze(1)


def make_qkx2(x: torch.Tensor, w: torch.Tensor, nmax: int, rmin: float, rdelta: float, nstep: int,
              use_mad: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``make_qkx2_quants``: x, w (B, n) -> (scale (B,), the_min (B,) >= 0, L (B, n) int32 in 0..nmax)."""
    xt, wt = x.t().contiguous(), w.t().contiguous()                  # (n, B)
    mn0 = torch.clamp(x.amin(1), max=0.0)                            # C: if (min > 0) min = 0
    mn = mn0
    mx = x.amax(1)
    sum_w = seqsum(wt[1:], wt[0])
    sum_x = seqsum(wt[1:] * xt[1:], wt[0] * xt[0])
    iscale = div(float(nmax), mx - mn)
    scale = div(1.0, iscale)
    L = nearest_int(iscale * (xt - mn)).clamp(0, nmax)              # (n, B)
    diff = (scale * L.to(F32) + mn) - xt
    best = seqsum(wt * (diff.abs() if use_mad else diff * diff))
    # candidates is = 0..nstep, in order: iscale = (rmin + rdelta*is + nmax) / (max - min), where min is
    # the one of the last accepted candidate (ggml updates it inside the loop), so they are sequential
    for i in range(nstep + 1):
        c = float(np.float32(np.float32(rmin) + np.float32(rdelta) * np.float32(i)) + np.float32(nmax))
        xm = xt - mn
        laux = nearest_int(div(c, mx - mn) * xm).clamp(0, nmax)      # (n, B)
        lf = laux.to(F32)
        wl = wt * lf
        sum_l, sum_l2, sum_xl = seqsum(wl), seqsum(wl * lf), seqsum(wl * xt)
        D = sum_w * sum_l2 - sum_l * sum_l
        this_scale = (sum_w * sum_xl - sum_x * sum_l) / D
        this_min = (sum_l2 * sum_x - sum_l * sum_xl) / D
        pos = this_min > 0
        this_min = torch.where(pos, torch.zeros_like(this_min), this_min)
        this_scale = torch.where(pos, sum_xl / sum_l2, this_scale)
        diff = (this_scale * lf + this_min) - xt
        cur = seqsum(wt * (diff.abs() if use_mad else diff * diff))
        take = (D > 0) & (cur < best)                                # strict <, as ggml
        best = torch.where(take, cur, best)
        scale = torch.where(take, this_scale, scale)
        mn = torch.where(take, this_min, mn)
        L = torch.where(take, laux, L)
    flat = mx == mn0                                                 # C: max == min -> all zero codes
    L = torch.where(flat, 0, L)
    scale = torch.where(flat, torch.zeros_like(scale), scale)
    return scale, torch.where(flat, -mn0, -mn), L.t()


def make_qx_rmse1(x: torch.Tensor, nmax: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``make_qx_quants(n, nmax, x, L, rmse_type=1, NULL)``: x (B, n) -> (scale (B,), L (B, n) in 0..2nmax-1)."""
    xt = x.t().contiguous()                                          # (n, B)
    amax, mx = _signed_absmax(x)
    # candidate 0: -nmax/max, then is = -9..9 (not 0): -(nmax + 0.1f*is)/max
    c = [float(-nmax)] + [float(-(np.float32(nmax) + np.float32(0.1) * np.float32(i)))
                          for i in range(-9, 10) if i]
    iscale = div(torch.tensor(c, dtype=F32, device=x.device).view(-1, 1), mx)   # (S, B)
    lv = nearest_int(iscale.unsqueeze(1) * xt).clamp(-nmax, nmax - 1)          # (S, n, B)
    lf = lv.to(F32)
    w = xt * xt
    sumlx = seqsum(((w * xt) * lf).transpose(0, 1))                  # (S, B)
    suml2 = seqsum(((w * lf) * lf).transpose(0, 1))
    scale = torch.where(suml2 != 0, sumlx / suml2, torch.zeros_like(sumlx[0]))[0]
    best = scale * sumlx[0]
    pick = torch.zeros_like(lv[0, 0])
    for s in range(1, len(c)):
        take = (suml2[s] > 0) & (sumlx[s] * sumlx[s] > best * suml2[s])
        scale = torch.where(take, sumlx[s] / suml2[s], scale)
        best = torch.where(take, scale * sumlx[s], best)
        pick = torch.where(take, s, pick)
    L = lv.gather(0, pick.view(1, 1, -1).expand(1, lv.shape[1], -1))[0] + nmax   # (n, B)
    zero = amax < GROUP_MAX_EPS
    return torch.where(zero, torch.zeros_like(scale), scale), torch.where(zero, 0, L).t()


def make_q3(x: torch.Tensor, nmax: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``make_q3_quants(n, nmax, x, L, do_rmse=true)``: x (B, n) -> (scale (B,), L (B, n) in 0..2nmax-1).

    The coordinate descent is sequential in the values, so it loops over them; a pass that changes
    nothing leaves the state as it was, so running all 5 passes equals ggml's early ``break``.
    """
    xt = x.t().contiguous()
    n = xt.shape[0]
    amax, mx = _signed_absmax(x)
    L = nearest_int(div(float(-nmax), mx) * xt).clamp(-nmax, nmax - 1)   # (n, B)
    w = xt * xt
    wx = w * xt
    sumlx = seqsum(wx * L.to(F32))
    suml2 = seqsum((w * L.to(F32)) * L.to(F32))
    for _ in range(5):
        for i in range(n):
            li = L[i].to(F32)
            slx = sumlx - wx[i] * li
            sl2 = suml2 - (w[i] * li) * li
            new = nearest_int(div(xt[i] * sl2, slx)).clamp(-nmax, nmax - 1)
            nf = new.to(F32)
            slx2 = slx + wx[i] * nf
            sl22 = sl2 + (w[i] * nf) * nf
            take = (slx > 0) & (new != L[i]) & (sl22 > 0) & ((slx2 * slx2) * suml2 > (sumlx * sumlx) * sl22)
            L[i] = torch.where(take, new, L[i])
            sumlx = torch.where(take, slx2, sumlx)
            suml2 = torch.where(take, sl22, suml2)
    scale = torch.where(suml2 > 0, sumlx / suml2, torch.zeros_like(sumlx))
    zero = amax < GROUP_MAX_EPS
    return torch.where(zero, torch.zeros_like(scale), scale), torch.where(zero, 0, L + nmax).t()
