"""Per-tensor validation of a merged checkpoint against its base and adapters.

For every tensor an adapter changes, with X a few seeded Gaussian probe vectors (cols, k):

- the reference output is ``W X + sum_i w_i s_i B_i (A_i X)`` in float64, never forming a delta
  (DoRA, whose norms need the whole weight, forms ``W + delta`` in float64 and rescales it);
- the merged output is ``M X`` (float64 products of the stored values);
- the floor: ``F X`` where F is the same merge evaluated with the roundings a correct merge cannot
  avoid: fp32 arithmetic (what PEFT, llama.cpp and our engine compute in), the stored dtype after
  each adapter in stacked mode (and PEFT's rounding of an embedding delta), and the merged
  tensor's own dtype at the end (``floor_for``). For a 16-bit output F is the float64 reference
  simply rounded to that dtype (the fp32 arithmetic adds 2^-15 of its noise); for an fp32 output
  the fp32 arithmetic is the noise (rounding alone was measured up to 4.7 dB better than any fp32
  merge, PEFT's included, when ||delta|| ~ ||W||). F is computed here, from the factors, by this
  module's own code: a bug in the engine or its reference kernel moves M, not the floor.
- F is one order of fp32 arithmetic; a correct merge may add in another (several adapters in one
  product of their stacked factors, scales folded into B, a DoRA norm summed another way), and
  where the change is as large as the weight its noise was measured 1.5-3 dB above F's. So the
  floor's noise also counts the expected power of the fp32 roundings ANY order may make
  (``arithmetic_allowance``: a rounding model bounding every partial sum by
  |W| + sum |s b a|). It is 2^-15 of the rounding noise of a 16-bit output, and keeps an fp32
  floor near 130 dB: 1e-5 relative mistakes in one adapter's share still fail.

SQNR = 10 log10(||ref||^2 / ||out - ref||^2) over all probes; a tensor passes when
``SQNR(M) >= SQNR(F) - tolerance_db`` (1 dB by default), i.e. when its noise power is at most
1.26x the floor's on the same probes. Every other tensor must be byte-identical to the base (or to
the base cast once, when the merge changed the dtype).

Why this is not flaky. The probes are seeded (``seed`` and the tensor name: reruns repeat). Both
noises are measured on the same probes, and a correct CPU merge makes M equal to F bit for bit or
up to rare one-ulp flips, so the ratio of the two noises is 1 whatever the probes are. Where M and
F differ by independent roundings (fp32 outputs summed in another order, another device), each
noise estimate ||E X||^2 / (k ||E||_F^2) has relative standard deviation at most
sqrt(2 (m + n) / (m n k)): 0.011 for a 2048x2048 weight and k = 16. Smaller tensors get more
probes until that is at most 3.5% (``probe_count``), so two fully independent noises differ by
0.21 dB rms: the 1 dB tolerance is 4.7 standard deviations (p ~ 1e-6 per tensor). A tensor
with no more columns than probes is probed with the identity: exact. A mistake of size D is missed only if
||D X||^2 falls 10^(gap/10) below its mean; for a rank-1 D (the worst case) that is a chi-square
with k degrees of freedom: P(chi2_16 < 16 * 10^-1) < 2e-6 for a 10 dB gap, and the mistakes of
interest (a missing delta, a wrong scale) are 20-60 dB above the floor.
"""

from __future__ import annotations

import math
import time
import zlib
from dataclasses import dataclass
from pathlib import Path

import torch

from ..dtypes import FLOAT_DTYPES, TORCH_DTYPES
from ..errors import UnsupportedError
from ..merging.bases import GGUFBase, HFBase, TensorEntry
from ..merging.jobs import Job, Plan
from .stored import Files, check_untouched, stored_values

BLOCK_ELEMENTS = 1 << 18          # rows per block: ~1 MB of fp32, the elementwise work stays in cache
RELATIVE_SPREAD = 0.035           # target relative std of one noise estimate (0.15 dB)
MAX_PROBES = 256


@dataclass(frozen=True)
class Settings:
    probes: int = 16              # k Gaussian probe vectors per tensor
    seed: int = 0
    tolerance_db: float = 1.0


@dataclass(frozen=True)
class Term:
    """One adapter's share of one tensor, rows [start, stop) of it: ``scale * b @ a`` or, for a
    lora_bias, ``scale * dense``; ``pre_round``: PEFT rounds this delta to the stored dtype
    before adding it (a plain embedding LoRA merged in PEFT's order)."""

    scale: float
    a: torch.Tensor | None = None          # (r, cols)
    b: torch.Tensor | None = None          # (rows, r)
    dense: torch.Tensor | None = None      # (rows, cols): a lora_bias viewed (1, n)
    magnitude: torch.Tensor | None = None  # DoRA
    norm_dim: int = 1
    pre_round: bool = False
    norm_eps: float = 0.0                  # LyCORIS's DoRA adds it to each norm (kernels/deltas.py)

    def rows(self, start: int, stop: int) -> Term:
        magnitude = self.magnitude
        if magnitude is not None and self.norm_dim == 1:
            magnitude = magnitude[start:stop]
        if self.dense is not None:
            return Term(self.scale, dense=self.dense[start:stop], magnitude=magnitude,
                        norm_dim=self.norm_dim, pre_round=self.pre_round, norm_eps=self.norm_eps)
        return Term(self.scale, self.a, self.b[start:stop], None, magnitude, self.norm_dim,
                    self.pre_round)

    def delta(self, dtype: torch.dtype) -> torch.Tensor:
        if self.dense is not None:
            return self.dense.to(dtype) * self.scale
        return (self.b.to(dtype) @ self.a.to(dtype)).mul_(self.scale)


def terms_of(job: Job, *, stacked: bool) -> list[Term]:
    from ..adapter import LoraWeight
    from ..kernels.deltas import delta
    from ..kernels.reference import rounds_delta_first

    out = []
    for c in job.contributions:
        w = c.weight
        if not isinstance(w, LoraWeight):       # LoHa, LoKr: their dense delta, in float64
            out.append(Term(c.factor, dense=delta(w, torch.float64), magnitude=w.magnitude,
                            norm_dim=getattr(w, "norm_dim", 1), norm_eps=getattr(w, "norm_eps", 0.0),
                            pre_round=stacked and rounds_delta_first(w)))
            continue
        out.append(Term(w.scale * c.factor, w.a, w.b, None, w.magnitude, w.norm_dim,
                        pre_round=stacked and rounds_delta_first(w)))
    for c in job.bias_contributions:
        out.append(Term(c.weight.scale * c.factor, dense=c.weight.bias.reshape(1, -1)))
    return out


# ----------------------------------------------------------------------------- the maths

def floor_for(dtype: str):
    """How the merged model stores a tensor of type ``dtype``: a function from an fp32/fp64
    tensor (rows, cols) to the stored values (as a tensor the probes can multiply). Quantized
    GGUF types go through the same codecs the merge uses (kernels/quant, or ggml's own)."""
    if dtype in TORCH_DTYPES:
        torch_dtype = TORCH_DTYPES[dtype]
        return lambda x: x.to(torch_dtype)
    from ..kernels.quant.types import resolve
    from ..codecs.gguf import roundtrip

    if not resolve(dtype).requantizable:
        raise UnsupportedError(f"validating merged tensors stored as {dtype} needs a {dtype} "
                               "quantizer, which adaptertools does not have")
    return lambda x: roundtrip(x.to(torch.float32), dtype)


def _rescale(x: torch.Tensor, t: Term) -> torch.Tensor:
    """DoRA: (m / ||V||) V, the norm along ``t.norm_dim``."""
    factor = t.magnitude.to(x.dtype) / (torch.linalg.norm(x, dim=t.norm_dim) + t.norm_eps)
    return (factor.view(-1, 1) if t.norm_dim == 1 else factor.view(1, -1)) * x


def evaluate(weight: torch.Tensor, terms: list[Term], *, compute: torch.dtype, stacked: bool,
             store: torch.dtype | None = None) -> torch.Tensor:
    """The merge of ``terms`` into ``weight`` (rows, cols), computed in ``compute``.

    Weighted: ``W + sum(delta)``, then the (single) DoRA rescale. Stacked: one adapter after
    another, each DoRA norm taken on what the previous ones made. With ``store`` (the stored
    dtype), stacked steps are rounded to it, as a merge one after another must."""
    x = weight.to(compute, copy=True)
    for step in ([t] for t in terms) if stacked else [terms]:
        for t in step:
            delta = t.delta(compute)
            if t.pre_round and store is not None:
                delta = delta.to(store).to(compute)
            x += delta
        dora = next((t for t in step if t.magnitude is not None), None)
        if dora is not None:
            x = _rescale(x, dora)
        if stacked and store is not None:
            x = x.to(store).to(compute)
    return x


def survival(base: torch.Tensor, merged: torch.Tensor, intended: torch.Tensor) -> float | None:
    """Cosine between the intended change and the realized one, ``merged - base`` (both given
    as float tensors: dequantize quantized ones first). 1 when the change survived storage; a
    requantized 4-bit base keeps almost none of a typical LoRA (FORMATS.md: 0.01-0.04 for NF4).
    None when nothing was meant to change."""
    from ..merging.quantized import survival as score

    if not bool(intended.any()):
        return None
    return score("", "", intended, merged.float() - base.float()).cosine


def quantized_survival(job: Job, weight: torch.Tensor, merged: torch.Tensor, *,
                       stacked: bool) -> float | None:
    """For a tensor stored in a block type: the survival of the intended change, measured from
    what the output type would store of the base (the base itself for a keep-type merge)."""
    rows = weight.shape[0]
    w = weight.reshape(rows, -1).to(torch.float32)
    intended = evaluate(w, terms_of(job, stacked=stacked), compute=torch.float64,
                        stacked=stacked) - w.double()
    old = w if job.source.dtype == job.out_dtype else floor_for(job.out_dtype)(w)
    return survival(old, merged.reshape(rows, -1), intended)


def probe_count(rows: int, cols: int, settings: Settings) -> int:
    """k, raised for small tensors until each noise estimate's relative standard deviation,
    sqrt(2 (m + n) / (m n k)), is at most RELATIVE_SPREAD (capped at MAX_PROBES)."""
    needed = math.ceil(2 * (rows + cols) / (rows * cols * RELATIVE_SPREAD ** 2))
    return max(settings.probes, min(needed, MAX_PROBES))


def probes(rows: int, cols: int, settings: Settings, name: str) -> torch.Tensor:
    """(cols, k) seeded Gaussian probes; the identity (exact) when k >= cols."""
    k = probe_count(rows, cols, settings)
    if cols <= k:
        return torch.eye(cols, dtype=torch.float64)
    gen = torch.Generator().manual_seed(settings.seed * 1_000_003 + zlib.crc32(name.encode()))
    return torch.randn(cols, k, generator=gen, dtype=torch.float64)


FP32_ROUNDOFF = 2.0 ** -24


def arithmetic_allowance(w: torch.Tensor, terms: list[Term], final: torch.Tensor,
                         energy: torch.Tensor, *, norm_length: int) -> float:
    """Expected noise power, on the probes, of the fp32 roundings that ANY correct merge of
    ``terms`` into ``w`` (rows, cols) may make, whatever order it adds in and wherever it folds
    its scales (``final``: the merged values, (rows, cols); ``energy``: (cols,), each column's
    squared probe norm, sum_p X[c, p]^2).

    The floor ``F`` is one such merge; another (the engine folding w_i s_i into B_i and running
    one product of the stacked factors, a GPU kernel summing in blocks) rounds elsewhere, and
    where the change is as large as the weight its noise can exceed F's by several dB. The
    model: each rounding multiplies its result by (1 + d), d uniform on [-u, u] (variance u^2/3,
    u = 2^-24), independently. One element is W + sum_j t_j over the n rank terms t_j =
    c b_ij a_jk of every adapter (a lora_bias is one term), the products summed before they
    meet W (as PEFT, the engine, the Triton kernels and llama.cpp's export-lora all do), in any
    order and grouping. Each t_j is rounded at most 3 times (B scaled, the scale, the product);
    each of the n partial sums of products once, each at most S = sum_j |t_j|; and each of the
    at most k + 1 sums that involve W (k terms added one after another, or all at once) once,
    each at most T = |W| + S. So

        var <= (u^2 / 3) (3 sum_j t_j^2 + n S^2 + (k + 1) T^2)
            <= (u^2 / 3) ((n + 3) S^2 + (k + 1) T^2).

    For a typical LoRA (S << |W|) that is about two roundings of W, 3-5 dB above the floor of
    one merge; for a change as large as the weight, the product's own sums dominate.
    DoRA scales V = W + delta by m / ||V||: V's errors scale by that gain g, and the norm (a sum
    of N squares, N = ``norm_length``: N partial sums each at most ||V||^2, half the relative
    error after the square root), the division and the product add (u^2/3) (N/4 + 2) M^2.
    Summed over the probes: E ||E X||^2 = sum_ik var_ik energy_k."""
    if not terms:                   # a replacement stored as it is: no arithmetic at all
        return 0.0
    work = energy.dtype
    products = torch.zeros(w.shape, dtype=work)                   # S: (rows, cols)
    count = 0
    for t in terms:
        if t.dense is not None:
            products += t.dense.to(work).abs() * abs(t.scale)
            count += 1
        else:
            products += (t.b.to(work).abs() @ t.a.to(work).abs()) * abs(t.scale)
            count += t.a.shape[0]
    total = products + w.to(work).abs()                           # T = |W| + S
    var = products.square_().mul_(count + 3).add_(total.square_(), alpha=len(terms) + 1)
    dora = next((t for t in terms if t.magnitude is not None), None)
    if dora is not None:
        plain = [Term(t.scale, t.a, t.b, t.dense) for t in terms]
        v = evaluate(w, plain, compute=work, stacked=False)
        m = final.to(work)
        gain = torch.linalg.norm(m, dim=dora.norm_dim) / torch.linalg.norm(v, dim=dora.norm_dim)
        gain = gain.view(-1, 1) if dora.norm_dim == 1 else gain.view(1, -1)
        var.mul_(gain.square()).add_(m.square() * (norm_length / 4 + 2))
    return float(var.sum(dim=0) @ energy) * FP32_ROUNDOFF ** 2 / 3


def _same_values(x: torch.Tensor, y: torch.Tensor) -> bool:
    """Bit for bit (a memcmp: torch.equal is slow on 16-bit tensors, and calls -0.0 == 0.0)."""
    if x.dtype != y.dtype or x.shape != y.shape:
        return False
    raw = lambda t: t.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()
    return raw(x) == raw(y)


def _sqnr(signal: float, noise: float) -> float | None:
    if noise == 0.0:
        return math.inf
    return 10 * math.log10(signal / noise) if signal > 0 else None


def check_adapted(job: Job, weight: torch.Tensor, merged: torch.Tensor, *, stacked: bool,
                  settings: Settings, whole_floor=None) -> dict:
    """SQNR of ``merged`` against the float64 reference, and the floor, for one job's tensor.

    Everything is computed as a change from the base: with D = out - W, ``out X - ref X`` is
    ``D X - delta X`` (delta X = sum s B (A X) from the factors), free of the cancellation that
    subtracting two large outputs would suffer. For 16-bit outputs this runs in fp32: D of two
    nearby 16-bit numbers is exact in fp32, and fp32's own error is 2^-15 of the rounding being
    measured; for fp32 outputs in float64."""
    shape = tuple(weight.shape)
    rows = shape[0] if len(shape) > 1 else 1
    cols = weight.numel() // max(rows, 1)
    w2, m2 = weight.reshape(rows, cols), merged.reshape(rows, cols)
    terms = terms_of(job, stacked=stacked)
    work = torch.float64 if job.out_dtype in ("F32", "F64") else torch.float32
    # whole_floor: a quantization whose blocks span rows (bitsandbytes) rounds the whole tensor
    rounding = None if whole_floor is not None else floor_for(job.out_dtype)
    x = probes(rows, cols, settings, job.name)
    xw = x.to(work)
    projected = [(t.a.to(work) @ xw) if t.dense is None else None for t in terms]   # (r, k)
    blockable = all(t.magnitude is None or t.norm_dim == 1 for t in terms)
    step = max(1, BLOCK_ELEMENTS // max(cols, 1)) if blockable else rows
    energy = xw.square().sum(dim=1)                                          # (cols,)
    norm_length = cols if all(t.norm_dim == 1 for t in terms) else rows
    signal = noise_merged = noise_floor = allowance = 0.0
    identical = True
    for start in range(0, rows, step):
        stop = min(rows, start + step)
        w, m = w2[start:stop].to(work), m2[start:stop]
        part = [t.rows(start, stop) for t in terms]
        if any(t.magnitude is not None for t in part):      # DoRA: the float64 weight itself
            change = ((evaluate(w, part, compute=torch.float64, stacked=stacked) - w.double())
                      @ x).to(work)
        else:
            change = torch.zeros(stop - start, xw.shape[1], dtype=work)
            for t, ax in zip(part, projected):
                change += (t.dense.to(work) @ xw if ax is None else t.b.to(work) @ ax) * t.scale
        floor = whole_floor.reshape(rows, cols)[start:stop] if whole_floor is not None else \
            rounding(evaluate(w, part, compute=torch.float32, stacked=stacked,
                                  store=weight.dtype))
        floor_change = (floor.to(work) - w) @ xw
        same = _same_values(m, floor)
        merged_change = floor_change if same else (m.to(work) - w) @ xw
        identical &= same
        allowance += arithmetic_allowance(w, part, floor, energy, norm_length=norm_length)
        signal += float(floor.double().square().sum()) if work == torch.float64 else \
            float(floor.float().square().sum())
        noise_floor += float((floor_change - change).double().square().sum())
        noise_merged += float((merged_change - change).double().square().sum())
    # the probes' expected output power, k ||W + delta||_F^2 (||x||^2 = cols on average): the
    # same for merged and floor, so it only places the two on the dB scale
    signal *= float(x.square().sum()) / cols
    noise_floor += allowance        # what a merge summing in another order may add (fp32)
    passed = noise_merged <= noise_floor * 10 ** (settings.tolerance_db / 10)
    sqnr, floor_db = _sqnr(signal, noise_merged), _sqnr(signal, noise_floor)
    margin = None if sqnr is None or floor_db is None else \
        0.0 if sqnr == floor_db else sqnr - floor_db
    finite = lambda v: None if v is None or math.isinf(v) else v
    return {"name": job.name, "kind": _kind(job), "dtype": job.out_dtype, "shape": list(shape),
            "sqnr_db": finite(sqnr), "floor_db": finite(floor_db), "margin_db": finite(margin),
            "exact": noise_merged == 0.0, "identical_to_floor": identical,
            "probes": int(x.shape[1]), "adapters": sorted({c.adapter for c in
                                                           job.contributions + job.bias_contributions}),
            "passed": passed,
            "problem": "" if passed else "merged tensor is further from the reference than "
                                         f"its dtype's noise allows ({_db(sqnr)} dB vs floor "
                                         f"{_db(floor_db)} dB)"}


def _db(value: float | None) -> str:
    return "exact" if value is None or math.isinf(value) else f"{value:.1f}"


def _check_token_rows(job: Job, entry: TensorEntry, weight: torch.Tensor,
                      merged: torch.Tensor, *, stacked: bool) -> dict:
    """Trained token rows replace the base's (kernels/token_rows.py): the merged tensor must be
    exactly that copy, the other rows the base's, in the stored dtype."""
    from ..kernels.token_rows import apply_token_rows

    expected = apply_token_rows(weight, job.token_rows, stacked=stacked, out_dtype=merged.dtype)
    same = torch.equal(expected.reshape(merged.shape), merged)
    rows = sum(len(r.indices) for r, *_ in job.token_rows)
    return {"name": job.name, "kind": "tokens", "dtype": entry.dtype, "shape": list(entry.shape),
            "passed": same, "problem": "" if same else
            f"not the base with its {rows} trained token row(s) copied in"}


def _kind(job: Job) -> str:
    if job.replacement is not None:
        return "replaced"
    return "bias" if job.bias_contributions and not job.contributions else "adapted"


def _layout_problem(job: Job, entry: TensorEntry | None) -> str:
    if entry is None:
        return "missing from the merged model"
    expected = job.output_shape          # a resized vocabulary's copy: its own shape
    if job.group is not None and entry.dtype not in FLOAT_DTYPES:     # encoded (packed)
        expected = job.group.members[job.name].shape
    if tuple(entry.shape) != tuple(expected):
        return f"stored with shape {tuple(entry.shape)}, expected {tuple(expected)}"
    # a float tensor may have been cast (--dtype), an adapted one requantized (--requantize):
    # each is judged in the type it is stored in
    if entry.dtype != job.out_dtype and not (entry.dtype in FLOAT_DTYPES and
                                             job.source.dtype in FLOAT_DTYPES) \
            and not job.changed:
        return f"stored as {entry.dtype}, expected {job.out_dtype}"
    return ""


def check_plan(plan: Plan, merged: HFBase | GGUFBase, *, stacked: bool, settings: Settings,
               progress=None) -> dict:
    """Every tensor of ``plan`` against the ``merged`` checkpoint; rows worst first."""
    from concurrent.futures import ThreadPoolExecutor

    # one torch thread, as in the merge (merging/run.py one_compute_thread): OpenMP threads
    # spin between the many small products and starve the rest (measured 2-9 s on one
    # 5632x2048 tensor with two threads on a busy machine, 0.17-0.24 s with one)
    from ..merging.run import one_compute_thread

    start = time.perf_counter()
    stored = merged.entries()
    base_files, merged_files = Files(plan.base), Files(merged)
    # an encoded weight's companions (quant states, scales) change with it and are checked through it
    companions = {name for job in plan.jobs if job.group is not None
                  for name in job.group.members if name != job.group.name}
    # a float output (--requantize bf16) stores an encoded weight under its float name
    # (MXFP4's X_blocks as X, compressed-tensors' X.weight_packed as X.weight)
    renamed = {job.name: job.group.logical for job in plan.jobs
               if job.group is not None and job.name not in stored}
    work = [(job, stored.get(renamed.get(job.name, job.name))) for job in plan.jobs
            if job.name not in companions]
    rows = []

    def check(item) -> dict:
        job, entry = item
        data = None
        if (job.changed or job.group is not None) and not _layout_problem(job, entry):
            data = (None if job.replacement is not None else base_files.read(job.source),
                    merged_files.read(entry))
        return _check_one(job, entry, data, base_files, merged_files, stacked=stacked,
                          settings=settings)

    try:
        # two tensors at a time, each on one torch thread: one's reads overlap the other's
        # arithmetic, and both cores compute (torch releases the GIL inside its ops)
        with torch.inference_mode(), one_compute_thread(), \
                ThreadPoolExecutor(max_workers=2, thread_name_prefix="validate") as pool:
            for (job, _), row in zip(work, pool.map(_in_inference_mode(check), work)):
                rows.append(row)
                if progress is not None:
                    progress(job.nbytes)
    finally:
        base_files.close()
        merged_files.close()
    planned = {j.name for j in plan.jobs} | companions | set(renamed.values())
    rows += [{"name": n, "kind": "extra", "passed": False,
              "problem": "in the merged model but not in the base"}
             for n in sorted(stored.keys() - planned)]
    return summarize(rows, settings, time.perf_counter() - start)


def check_encoded(job: Job, entry: TensorEntry, data, merged_files: Files, *, stacked: bool,
              settings: Settings) -> dict:
    """An encoded weight (merging/encoded.py group: bitsandbytes, ...): base and merged values
    decoded with their companions; the floor is the fp32 merge encoded the way the base is (its
    blocks may run across rows, so the whole tensor at once), or cast for a float output."""
    from dataclasses import replace

    group = job.group
    weight, state = group.dequantized(data[0])                  # (out, in) fp32
    if entry.dtype in TORCH_DTYPES:                             # --requantize bf16/fp16/fp32
        merged, whole = data[1], None
        job = replace(job, out_dtype=entry.dtype)
    else:
        folder = Path(merged_files.checkpoint.folder)
        stored = merged_files.checkpoint.entries()
        merged_group = replace(group, folder=folder,
                               members={n: stored[n] for n in group.members})
        merged, _ = merged_group.dequantized(data[1])
        # a fused 3-D expert weight (E, in, out) is folded as the merge does: (E, in * out)
        flat = weight.reshape(weight.shape[0], -1)
        whole = group.roundtrip(evaluate(flat, terms_of(job, stacked=stacked),
                                         compute=torch.float32, stacked=stacked,
                                         store=torch.float32).reshape(weight.shape), state)
    if not job.changed and whole is None:                       # only cast: exactly once
        same = _same_values(merged, weight.to(merged.dtype))
        return {"name": job.name, "kind": "untouched", "dtype": entry.dtype,
                "shape": list(group.shape), "passed": same,
                "problem": "" if same else f"not the dequantized base cast to {entry.dtype}"}
    row = check_adapted(job, weight, merged, stacked=stacked, settings=settings,
                        whole_floor=whole)
    row["dtype"] = group.type if whole is not None else entry.dtype
    if job.contributions:
        flat = weight.reshape(weight.shape[0], -1)
        intended = (evaluate(flat, terms_of(job, stacked=stacked), compute=torch.float64,
                             stacked=stacked) - flat.double()).reshape(weight.shape)
        row["survival"] = survival(weight, merged, intended)
    return row


def _in_inference_mode(func):
    """``func`` run under torch.inference_mode (a thread-local mode: worker threads need it)."""
    def run(*args):
        with torch.inference_mode():
            return func(*args)
    return run


def _check_one(job: Job, entry: TensorEntry | None, data, base_files: Files,
               merged_files: Files, *, stacked: bool, settings: Settings) -> dict:
    """One tensor's row; ``data``: its (base, merged) stored tensors, read ahead."""
    from dataclasses import replace

    problem = _layout_problem(job, entry)
    if problem:
        return {"name": job.name, "kind": _kind(job) if job.changed else "untouched",
                "passed": False, "problem": problem}
    if job.group is not None:
        return check_encoded(job, entry, data, merged_files, stacked=stacked, settings=settings)
    # a float tensor is judged in the dtype the merge stored it in (--dtype)
    job = replace(job, out_dtype=entry.dtype)
    if not job.changed:
        return check_untouched(job, entry, base_files, merged_files)
    base_raw, merged_raw = data
    weight = job.replacement if job.replacement is not None else \
        stored_values(job.source, base_raw)
    merged_values = stored_values(entry, merged_raw)
    if job.token_rows:
        return _check_token_rows(job, entry, weight, merged_values, stacked=stacked)
    row = check_adapted(job, weight, merged_values, stacked=stacked, settings=settings)
    if entry.dtype not in TORCH_DTYPES and job.contributions:
        row["survival"] = quantized_survival(job, weight, merged_values, stacked=stacked)
    return row


def _badness(row: dict) -> tuple:
    margin = row.get("margin_db")
    return (row["passed"], row["kind"] == "untouched",
            math.inf if margin is None else margin)


def summarize(rows: list[dict], settings: Settings, wall_s: float) -> dict:
    rows.sort(key=_badness)
    adapted = [r for r in rows if r["kind"] not in ("untouched", "extra")]
    return {"passed": all(r["passed"] for r in rows), "failed": sum(not r["passed"] for r in rows),
            "checked": len(rows), "adapted": len(adapted),
            "untouched": sum(r["kind"] == "untouched" for r in rows),
            "worst_margin_db": min((r["margin_db"] for r in adapted
                                    if r.get("margin_db") is not None), default=None),
            "probes": settings.probes, "seed": settings.seed,
            "tolerance_db": settings.tolerance_db, "wall_s": wall_s, "tensors": rows}
