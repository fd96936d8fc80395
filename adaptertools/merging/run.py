"""Executes a plan: read each base tensor once, fold, write it once, atomically.

Reading the next tensors (a thread: ``os.pread`` into pooled buffers, in file order, one or two
ahead; see ``streams.Reads`` and READ_AHEAD) overlaps folding the current one and writing the one before (another thread:
files of 64 MB or more with O_DIRECT from double-buffered staging, smaller ones through the page
cache 256 KB per call with writeback started every 64 MB; ``streams.open_sink``).
Runs of tensors the adapters do not touch are copied inside the kernel (``copy_file_range``), so
they never enter this process's memory. The output goes to a temporary path beside OUT and is
renamed at the end: an error or Ctrl-C leaves nothing at OUT.
"""

from __future__ import annotations

import os
import shutil
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch

from .._io import available_memory, write_json
from ..dtypes import TORCH_DTYPES
from ..kernels.fold import Buffers
from ..kernels.folding import fold_tensor
from ..kernels.survival import Survival
from ..kernels.triton.engine import fold_gguf_job, resolve_kernels
from ..paths import atomic_output, contained_file
from .bases import HFBase
from .encoded import Folded, Patch, apply_left, due
from .jobs import Job, OutputFile, Plan
from .quantized import check_output, fold_gguf, needs_codec, summarize
from .streams import (
    BufferPool,
    OrderedWriter,
    Progress,
    Reads,
    open_sink,
    tensor_bytes,
    write_all,
    write_released,
)

# files of a base folder that are weights (never copied: the merge writes its own)
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".h5", ".msgpack", ".gguf")



@dataclass(frozen=True)
class RunContext:
    """What every tensor of one run shares, fixed once in ``execute``: the fold's mode, device
    and kernels, torch's thread count outside the merge, one reading thread (prefetch), one
    writing thread (in order), reused fold buffers and a pool of I/O buffers."""

    plan: Plan
    mode: str                       # fold_mode(plan)
    device: torch.device
    kernels: str                    # "triton": fused kernels where they cover a job
    threads: int                    # torch's thread count outside the merge (folding.py)
    reader: ThreadPoolExecutor
    writer: ThreadPoolExecutor
    buffers: Buffers
    pool: BufferPool


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        from ..errors import UnsupportedError

        raise UnsupportedError("--device cuda: no CUDA device is available here; use --device cpu")
    return torch.device(device)


# ----------------------------------------------------------------------------- tensors

def fold_mode(plan: Plan) -> str:
    """The mode ``fold`` runs: one adapter into an HF checkpoint is merged in PEFT's own order
    (``merge_stacked``), bit for bit what ``merge_and_unload`` gives. That differs from
    "weighted"'s single rounding only for plain embedding LoRA on 16-bit bases, where PEFT rounds
    the delta before adding it; GGUF bases, whose reference is llama.cpp, keep the single rounding."""
    single = len(plan.adapter_names) == 1 and isinstance(plan.base, HFBase)
    return "stacked" if single else plan.mode


def fold(job: Job, tensor: torch.Tensor, ctx: RunContext) -> Folded:
    """The output of ``job`` from its source ``tensor``: a codec-encoded weight through its
    codec (encoded.py), a GGUF block type through the GGUF codecs (quantized.py), a float
    tensor through the one fold (kernels/folding.py), its memory from the pool."""
    if job.group is not None:     # an encoded weight: its changed companions come back too
        return job.group.fold(job, tensor, ctx.mode)
    if needs_codec(job):
        fused = fold_gguf_job(job, tensor, ctx.mode, ctx.device) \
            if ctx.kernels == "triton" else None
        encoded, score = fused or fold_gguf(job, tensor, ctx.mode, ctx.buffers, ctx.pool,
                                            threads=ctx.threads)
        return Folded(encoded, (), score)
    source = job.replacement if job.replacement is not None else tensor
    out_dtype = TORCH_DTYPES.get(job.out_dtype, source.dtype)
    return Folded(fold_tensor(tensor, job.contributions, job.bias_contributions, job.replacement,
                              stacked=ctx.mode == "stacked", out_dtype=out_dtype,
                              device=ctx.device, buffers=ctx.buffers, pool=ctx.pool,
                              kernels=ctx.kernels, threads=ctx.threads,
                              token_rows=job.token_rows))


# ----------------------------------------------------------------------------- files

def _is_plain(job: Job) -> bool:
    """Untouched and not cast: its bytes go to the output as they are."""
    return not job.changed and job.out_dtype == job.source.dtype


def _runs(jobs: tuple[Job, ...]) -> list[list[Job]]:
    """Consecutive jobs grouped: plain neighbours stored back to back form one copy run."""
    runs: list[list[Job]] = []
    for job in jobs:
        prev = runs[-1][-1] if runs else None
        if prev is not None and _is_plain(job) and _is_plain(prev) and \
                prev.source.file == job.source.file and \
                prev.source.offset + prev.source.nbytes == job.source.offset:
            runs[-1].append(job)
        else:
            runs.append([job])
    return runs


# Tensors read ahead of the fold (on the reading thread, in file order). Two keep a read in
# the disk's queue while the fold and the writer's queue are busy with the ones before, when
# both fit in READ_AHEAD_BYTES: W3's 117 MB MLP weights are read one ahead (two took the peak RSS
# of a 16.2 GB merge from 1.27 to 1.51 GB), its 8-34 MB attention weights two.
READ_AHEAD = 2
READ_AHEAD_BYTES = 160 << 20


def source_path(plan: Plan, name: str) -> Path:
    """The base file holding a tensor whose ``TensorEntry.file`` is ``name``."""
    return plan.base.folder / name if isinstance(plan.base, HFBase) else plan.base.path


def write_sequential(ctx: RunContext, out_file: OutputFile, dst: Path, progress: Progress,
                     patches: tuple[Patch, ...] = (), alignment: int = 1
                     ) -> tuple[list[Survival], list[Patch]]:
    """The header, then every tensor in order: runs of untouched tensors copied in the kernel,
    the others folded. Serves safetensors shards and re-laid-out GGUF files, whose tensors each
    start at a multiple of ``alignment`` from the data start (zero padding in between). Each
    tensor is read from the base file it lies in (several for --max-shard-size, shards.py).
    ``patches``: companions of encoded weights folded earlier, still to be written; returns the
    survival scores of this file's tensors and the patches left for other files."""
    plan, pending_patches, scores = ctx.plan, list(patches), []
    position = 0                                   # bytes written after the header
    size = len(out_file.header) + sum(j.nbytes for j in out_file.jobs)
    # companion patches write in place: weights folded here, or companions of weights placed here
    placed = {f for j in plan.jobs if j.group is not None for f, _ in j.group.placed.values()}
    direct = out_file.name not in placed and not any(j.group is not None for j in out_file.jobs)
    with _file_pair(lambda name: source_path(plan, name), dst, ctx, progress,
                    size if direct else None, sequential=True) as (sources, out, writer):
        writer.submit(len(out_file.header), out.write, out_file.header)
        runs = _runs(out_file.jobs)
        reading = {0: _prefetch(ctx.reader, sources, runs, 0)}
        for i, run in enumerate(runs):
            current = reading.pop(i)
            _read_ahead(ctx.reader, sources, runs, i, reading)
            position = _pad(writer, out, position, alignment)
            src, reads = sources.get(run[0].source.file)
            if _is_plain(run[0]):
                count = sum(j.source.nbytes for j in run)
                writer.submit(count, out.copy, src, run[0].source.offset, count)
            else:
                source = current.result()
                folded = fold(run[0], source, ctx)
                tensor = folded.tensor
                check_output(run[0], tensor, source)      # no Inf/NaN written
                scores += [folded.survival] if folded.survival is not None else []
                pending_patches += folded.patches
                count = tensor.numel() * tensor.element_size()
                writer.submit(count, write_released, out, tensor, ctx.pool, reads, source)
            position += count
            for patch in due(pending_patches, out_file.name, len(out_file.header) + position):
                writer.submit(0, write_all, out.fd, tensor_bytes(patch.data), patch.offset)
        _pad(writer, out, position, alignment)
    return scores, pending_patches


class Sources:
    """The base files one output file reads, each opened on first use: (fd, its Reads)."""

    def __init__(self, path_of, pool: BufferPool, sequential: bool, drop: bool = False) -> None:
        self.path_of, self.pool, self.sequential, self.drop = path_of, pool, sequential, drop
        self.opened: dict[str, tuple[int, Reads]] = {}

    def get(self, name: str) -> tuple[int, Reads]:
        if name not in self.opened:
            fd = os.open(self.path_of(name), os.O_RDONLY)
            try:
                if self.sequential:
                    os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_SEQUENTIAL)
                self.opened[name] = fd, Reads(fd, self.pool, drop=self.drop)
            except BaseException:
                os.close(fd)
                raise
        return self.opened[name]

    def close(self) -> None:
        """On the reading thread: after any read still in flight."""
        while self.opened:
            fd, reads = self.opened.popitem()[1]
            try:
                reads.close()
            finally:
                os.close(fd)


def drops_pages(plan: Plan) -> bool:
    """Whether the base's pages are dropped from the page cache once read and written: for a
    base of more than half the memory available, which the page cache cannot hold beside the
    output anyway (a smaller one stays cached for the next command, as after ``cp``)."""
    return hasattr(os, "posix_fadvise") and plan.size is not None and \
        plan.size > available_memory() // 2


@contextmanager
def _file_pair(path_of, dst: Path, ctx: RunContext, progress: Progress,
               out_bytes: int | None = None, sequential: bool = False, at: int | None = None):
    """(the sources: base files by name, opened through ``path_of(name)`` on first use; the
    output's sink; its ordered writer). The sink writes front to back: O_DIRECT for outputs of
    ``out_bytes`` >= DIRECT_MIN_BYTES where the filesystem allows it, else the page cache
    (streams.open_sink). ``at``: write into the existing (preallocated) ``dst`` from this
    offset on, through the page cache, leaving its other bytes as they are (a byte range of a
    shard-parallel merge, pieces.py). On success every queued write is done and the output
    fsynced; on an error the queue is abandoned; every file is closed."""
    if at is None:
        out = os.open(dst, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        sink = open_sink(out, dst, out_bytes)
    else:
        out = os.open(dst, os.O_WRONLY)
        os.lseek(out, at, os.SEEK_SET)
        sink = open_sink(out, dst, None)
    writer = OrderedWriter(ctx.writer, progress)
    sources = Sources(path_of, ctx.pool, sequential, drop=drops_pages(ctx.plan))
    try:
        yield sources, sink, writer
        writer.drain()
        sink.finish()
        os.fsync(out)
    finally:
        writer.abandon()
        ctx.reader.submit(sources.close).result()
        sink.close()
        os.close(out)


def _pad(writer: OrderedWriter, sink, position: int, alignment: int) -> int:
    """Zero bytes up to the next multiple of ``alignment``; returns the new position."""
    padding = -position % alignment
    if padding:
        writer.submit(padding, sink.write, bytes(padding))
    return position + padding


def _prefetch(reader: ThreadPoolExecutor, sources: Sources, runs: list[list[Job]], i: int):
    """Start reading run ``i``'s tensor in the background, when it needs its bytes here."""
    if i >= len(runs) or _is_plain(runs[i][0]):
        return None
    return reader.submit(sources.get(runs[i][0].source.file)[1].read, runs[i][0])


def _read_ahead(reader: ThreadPoolExecutor, sources: Sources, runs: list[list[Job]], i: int,
                reading: dict) -> None:
    """Start the reads of the runs after run ``i`` (``reading``: run index -> its read) up to
    READ_AHEAD runs ahead, while their bytes together stay within READ_AHEAD_BYTES (always
    the next one)."""
    ahead = 0
    for j in range(i + 1, min(i + 1 + READ_AHEAD, len(runs))):
        job = runs[j][0]
        ahead += 0 if _is_plain(job) else job.source.nbytes
        if j > i + 1 and ahead > READ_AHEAD_BYTES:
            break
        if j not in reading:
            reading[j] = _prefetch(reader, sources, runs, j)


def write_gguf(ctx: RunContext, dst: Path, progress: Progress, start: int = 0,
               end: int | None = None) -> list[Survival]:
    """Same header, same layout: untouched regions copied, adapted tensors rewritten in place.
    Copies and writes go to the writer thread (each at its own offset), so they overlap the
    folds (a synchronous pwrite took 4.2 s of an F16 W1 merge's 10 s). ``start``/``end``: only
    the bytes [start, end) of the output, into a preallocated ``dst`` (pieces.py; ``start`` at
    an adapted tensor's first byte or 0). Returns the survival scores of the quantized
    tensors."""
    base, scores = ctx.plan.base, []
    end = base.data_end if end is None else end
    whole = start == 0 and end == base.data_end
    with _file_pair(lambda name: base.path, dst, ctx, progress, base.data_end,
                    at=None if whole else start) as (sources, out, writer):
        src, reads = sources.get(base.path.name)
        position = start
        jobs = [j for j in ctx.plan.files[0].jobs if j.changed and start <= j.source.offset < end]
        reader = ctx.reader
        pending = reader.submit(reads.read, jobs[0]) if jobs else None
        for i, job in enumerate(jobs):
            current = pending
            pending = reader.submit(reads.read, jobs[i + 1]) if i + 1 < len(jobs) else None
            gap = job.source.offset - position
            writer.submit(gap, out.copy, src, position, gap)
            source = current.result()
            folded = fold(job, source, ctx)
            tensor = folded.tensor
            check_output(job, tensor, source)             # no Inf/NaN written
            scores += [folded.survival] if folded.survival is not None else []
            writer.submit(tensor.numel() * tensor.element_size(), write_released, out, tensor,
                          ctx.pool, reads, source)
            position = job.source.offset + job.source.nbytes
        tail = end - position
        writer.submit(tail, out.copy, src, position, tail)
    return scores


def copy_side_files(folder: Path, dst: Path, plan: Plan) -> list[str]:
    """Config, tokenizer and other non-weight files of the base folder, as they are; a symlink
    leading out of the folder is refused (paths.contained_file), never followed."""
    copied = []
    for path in sorted(folder.iterdir()):
        if not path.is_file() or path.name.startswith(".") or path.suffix in WEIGHT_SUFFIXES \
                or path.name == plan.base.index_name:
            continue
        if path.name == "config.json" and plan.config is not None:
            continue
        contained_file(folder, path.name)
        shutil.copy2(path, dst / path.name)
        copied.append(path.name)
    return copied


@contextmanager
def one_compute_thread():
    """torch's CPU ops on one thread while the merge runs (restored afterwards); yields the
    caller's thread count, which conv deltas and DoRA norms still use (kernels/folding.py). The
    fold needs about one core (W1: 1 s of CPU in all); the reading and writing threads need the
    others. With torch's default of one OpenMP thread per core, its threads spin-wait between
    matmuls and take the cores the I/O threads need: measured on 2 cores, W1 took 69-112 s of
    wall and 28-34 s of user CPU with the default, 14-17 s and 1.8 s with one thread (machine
    under load)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield threads
    finally:
        torch.set_num_threads(threads)


@contextmanager
def run_context(plan: Plan, device: torch.device, kernels: str):
    """The RunContext of one run (or one piece of a shard-parallel run, pieces.py): its reading
    and writing threads, torch on one compute thread, no autograd."""
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="adaptertools-read") as reader, \
            ThreadPoolExecutor(max_workers=1, thread_name_prefix="adaptertools-write") as writer, \
            torch.inference_mode(), one_compute_thread() as threads:
        yield RunContext(plan, fold_mode(plan), device, kernels, threads, reader, writer,
                         Buffers(), BufferPool())


def write_side_files(plan: Plan, tmp: Path) -> list[str]:
    """An HF output's files besides the shards, after them: the base's side files, config.json
    and the index (each as the plan says)."""
    copied = copy_side_files(plan.base.folder, tmp, plan)
    if plan.config is not None:
        write_json(tmp / "config.json", plan.config)
    if plan.index is not None:
        write_json(tmp / plan.base.index_name, plan.index)
    elif plan.base.index is not None and plan.max_shard_size is None:
        shutil.copy2(plan.base.folder / plan.base.index_name, tmp / plan.base.index_name)
    return copied


def execute(plan: Plan, out: str | os.PathLike, *, device: str = "cpu", force: bool = False,
            progress: Progress | None = None, kernels: str = "auto", inputs=()) -> dict:
    """Run ``plan`` into ``out``; returns timings and counts for the report. ``inputs``: the
    paths the merge reads, which ``out`` must neither be, contain nor lie inside."""
    progress = progress or (lambda n: None)
    torch_device = resolve_device(device)
    kernels = resolve_kernels(kernels, torch_device)
    start = time.perf_counter()
    is_hf = isinstance(plan.base, HFBase)
    inputs = (getattr(plan.base, "folder", None) or getattr(plan.base, "path", None), *inputs)
    with atomic_output(out, force=force, is_dir=is_hf, expected_bytes=plan.size,
                       inputs=inputs) as tmp, run_context(plan, torch_device, kernels) as ctx:
        scores, patches = [], []
        if is_hf:
            for out_file in plan.files:
                done, patches = write_sequential(ctx, out_file, tmp / out_file.name,
                                                 progress, tuple(patches))
                scores += done
            apply_left(patches, tmp)     # companions in shards already written
            copied = write_side_files(plan, tmp)
        elif plan.files[0].header:          # types changed: a new layout
            scores, _ = write_sequential(ctx, plan.files[0], tmp, progress,
                                         alignment=plan.base.header.alignment)
            copied = []
        else:
            scores = write_gguf(ctx, tmp, progress)
            copied = []
    return {"wall_s": time.perf_counter() - start, "device": str(torch_device), "kernels": kernels,
            "copied_files": copied, "survival": summarize(scores, gguf=not is_hf)}
