"""A plan cut into pieces that run independently (a shard-parallel merge, ``parallel.py``).

HF bases: one piece per output file (the base's shards, or ``--max-shard-size``'s). Each piece
writes ``.NAME.part<pid>`` in the shared partial folder and renames it to NAME when done, so a
killed worker never leaves a half-written shard under a finished shard's name.

GGUF bases whose layout is kept (``--requantize keep``, the default): byte ranges of the one
output file, which the driver preallocates at its full size. A range starts at an adapted
tensor's first byte (the first range at 0: the header, which is the base's) and runs to the
next range's start; its piece copies the untouched bytes and writes the folded tensors at their
own offsets (``run.write_gguf`` with ``start``/``end``). Ranges are cut by the bytes the adapters
touch, so their fold work is about even. A GGUF whose types change gets a new layout, written
front to back: one piece.

Every piece is the same code the single-process merge runs on that file or range, so the bytes
are the same.
"""

from __future__ import annotations

import hashlib
import math
import os
from dataclasses import dataclass
from pathlib import Path

from .bases import HFBase
from .jobs import Plan
from .run import resolve_device, run_context, write_gguf, write_sequential


@dataclass(frozen=True)
class Piece:
    key: str                  # unique in its plan: "file model-00001-of-00002.safetensors"
    file: str                 # the output file it writes (HF: a name in the output folder)
    start: int = 0            # GGUF byte range [start, end); end None: the whole file
    end: int | None = None
    nbytes: int = 0           # the bytes it writes (progress, scheduling)
    peak_bytes: int = 0       # working memory: the largest adapted tensor's fp32 copies

    @property
    def is_range(self) -> bool:
        return self.end is not None


def _peak(jobs) -> int:
    """fp32 source, fp32 result and the encoded copy of the largest adapted tensor, about."""
    sizes = [4 * math.prod(j.shape) for j in jobs if j.changed]
    return 3 * max(sizes, default=0)


def split(plan: Plan, ranges: int | None = None) -> list[Piece]:
    """The pieces of ``plan``. ``ranges``: how many byte ranges a same-layout GGUF output is cut
    into (default: one per 512 MiB the adapters touch, at least 2 where 2 adapted tensors
    exist); HF outputs have one piece per file."""
    if isinstance(plan.base, HFBase):
        return [Piece(f"file {f.name}", f.name, nbytes=f.size, peak_bytes=_peak(f.jobs))
                for f in plan.files]
    out = plan.files[0]
    if out.header:                       # types changed: a new layout, front to back
        return [Piece(f"file {out.name}", out.name, nbytes=out.size, peak_bytes=_peak(out.jobs))]
    changed = sorted((j for j in out.jobs if j.changed), key=lambda j: j.source.offset)
    touched = sum(j.source.nbytes for j in changed)
    count = ranges or max(2, -(-touched // (512 << 20)))
    count = max(1, min(count, len(changed)))
    starts, done, target = [0], 0, touched / count
    groups: list[list] = [[]]
    for i, job in enumerate(changed):
        # a new range once this one holds its share, or where every job left needs one
        wanted = count - len(groups)
        if groups[-1] and wanted > 0 and (done >= target * len(groups)
                                          or len(changed) - i <= wanted):
            starts.append(job.source.offset)
            groups.append([])
        groups[-1].append(job)
        done += job.source.nbytes
    end = plan.base.data_end
    bounds = list(zip(starts, starts[1:] + [end]))
    return [Piece(f"bytes {a}-{b} of {out.name}", out.name, a, b, b - a, _peak(g))
            for (a, b), g in zip(bounds, groups)]


def plan_digest(plan: Plan) -> str:
    """What two runs must agree on to share pieces: every output file's name, header and
    tensors (source bytes, output type, whether adapted, the adapters' factors). A worker that
    rebuilt the plan from the same inputs checks it against the driver's."""
    digest = hashlib.sha256()
    for f in plan.files:
        digest.update(f"{f.name}\0{f.size}\0".encode())
        digest.update(hashlib.sha256(f.header).digest())
        for j in f.jobs:
            digest.update(f"{j.name}\0{j.source.file}\0{j.source.offset}\0{j.source.nbytes}\0"
                          f"{j.out_dtype}\0{j.changed}\0{len(j.contributions)}\0"
                          f"{[c.factor for c in j.contributions]}\0".encode())
    digest.update(repr((plan.mode, plan.factors, plan.max_shard_size)).encode())
    return digest.hexdigest()


def write_piece(plan: Plan, piece: Piece, partial: Path, *, device: str = "cpu",
                kernels: str = "torch") -> tuple[list, list]:
    """Write ``piece`` of ``plan`` into ``partial`` (HF: the output's partial folder; GGUF: the
    preallocated partial file). Returns (survival scores, patches for other files: companions
    of encoded weights that lie in another shard, which the driver writes last)."""
    from ..kernels.triton.engine import resolve_kernels

    torch_device = resolve_device(device)
    kernels = resolve_kernels(kernels, torch_device)
    progress = lambda n: None  # the driver counts whole pieces
    with run_context(plan, torch_device, kernels) as ctx:
        if piece.is_range:
            return write_gguf(ctx, partial, progress, piece.start, piece.end), []
        out_file = next(f for f in plan.files if f.name == piece.file)
        final = partial / piece.file if isinstance(plan.base, HFBase) else partial
        tmp = final.with_name(f".{final.name}.part{os.getpid()}")
        try:
            alignment = 1 if isinstance(plan.base, HFBase) else plan.base.header.alignment
            scores, left = write_sequential(ctx, out_file, tmp, progress, alignment=alignment)
            os.replace(tmp, final)
        finally:
            if tmp.exists():
                tmp.unlink()
        return scores, left
