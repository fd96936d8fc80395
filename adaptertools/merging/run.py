"""Executes a plan: read each base tensor once, fold, write it once, atomically.

Reading the next tensor (a thread: its pages faulted into a mapping, or ``os.pread``; see
``streams.Reads``) overlaps folding the current one and writing the one before (another thread:
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
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .._io import write_json
from ..paths import atomic_output, contained_file
from ..adapter import map_tensors
from ..dtypes import TORCH_DTYPES
from ..kernels.fold import Buffers, fold_linear
from ..kernels.fold import supports as fast_fold_supports
from ..kernels.reference import merge_bias, merge_stacked, merge_weighted
from ..kernels.triton.engine import fold_float_job, fold_gguf_job, resolve_kernels
from .bases import INDEX_NAME, HFBase
from .encoded import apply_left, due
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
class Workers:
    """One reading thread (prefetch), one writing thread (in order), reused fold buffers, a
    pool of I/O buffers, and the survival scores of quantized tensors as they are folded."""

    reader: ThreadPoolExecutor
    writer: ThreadPoolExecutor
    buffers: Buffers
    pool: BufferPool
    survival: list = field(default_factory=list)
    patches: list = field(default_factory=list)   # encoded weights' companions to overwrite (encoded.py)
    kernels: str = "torch"          # "triton": fused kernels where they cover a job (kernels/triton)


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


def fold(job: Job, tensor: torch.Tensor, mode: str, device: torch.device,
         buffers: Buffers | None = None, pool: BufferPool | None = None,
         survival: list | None = None, *, kernels: str = "torch",
         patches: list | None = None) -> torch.Tensor:
    """The output tensor of ``job`` from its source ``tensor``; the fast path writes it into
    memory from ``pool`` when given. Quantized GGUF tensors go through their codecs, and their
    survival scores are appended to ``survival``."""
    if job.group is not None:     # an encoded weight: its changed companions -> patches
        folded = job.group.fold(job, tensor, mode)
        if folded.survival is not None and survival is not None:
            survival.append(folded.survival)
        if patches is not None:
            patches.extend(folded.patches)
        return folded.tensor
    with caller_threads(job):
        return _fold(job, tensor, mode, device, buffers, pool, survival, kernels)


def _fold(job: Job, tensor: torch.Tensor, mode: str, device: torch.device,
          buffers: Buffers | None, pool: BufferPool | None, survival: list | None,
          kernels: str) -> torch.Tensor:
    if needs_codec(job):
        fused = fold_gguf_job(job, tensor, mode, device) if kernels == "triton" else None
        encoded, score = fused or fold_gguf(job, tensor, mode, buffers)
        if score is not None and survival is not None:
            survival.append(score)
        return encoded
    if job.replacement is not None:
        tensor = job.replacement
    out_dtype = TORCH_DTYPES.get(job.out_dtype, tensor.dtype)
    stacked = mode == "stacked"
    contributions = list(job.contributions)
    if kernels == "triton" and contributions:
        fused = fold_float_job(job, tensor, mode, device, out_dtype)
        if fused is not None:
            return fused
    if device.type == "cpu" and buffers is not None and fast_fold_supports(tensor, contributions):
        # the reference's arithmetic in reused blocks (kernels/fold.py): same bits, less memory
        if not stacked:
            return fold_linear(tensor, contributions, out_dtype, buffers,
                               out=_output(pool, tensor, out_dtype))
        result = tensor
        for c in contributions:      # rounded to the stored dtype after each, as PEFT does
            previous = result
            result = fold_linear(result, [c], result.dtype, buffers,
                                 out=_output(pool, result, result.dtype))
            if previous is not tensor and pool is not None:
                pool.give(previous)
        if result.dtype != out_dtype:
            previous, result = result, result.to(out_dtype)
            if pool is not None:
                pool.give(previous)
        return result
    if job.contributions:
        contributions = [_to(c, device) for c in job.contributions]
        tensor = tensor.to(device)
        merge = merge_stacked if stacked else merge_weighted
        tensor = merge(tensor, contributions, out_dtype)
    elif job.bias_contributions:
        tensor = merge_bias(tensor.to(device), [_to(c, device) for c in job.bias_contributions],
                            out_dtype, stacked=stacked)
    return tensor.to("cpu", out_dtype).contiguous()


def _output(pool: BufferPool | None, like: torch.Tensor, dtype: torch.dtype) -> torch.Tensor | None:
    """Pooled memory for a fold's result, shaped like ``like`` in ``dtype``."""
    if pool is None:
        return None
    nbytes = like.numel() * torch.empty(0, dtype=dtype).element_size()
    return pool.take(nbytes).view(dtype).view(like.shape)


def _to(contribution, device: torch.device):
    if device.type == "cpu":
        return contribution
    from dataclasses import replace

    return replace(contribution, weight=map_tensors(contribution.weight, lambda t: t.to(device)))


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


def source_path(plan: Plan, name: str) -> Path:
    """The base file holding a tensor whose ``TensorEntry.file`` is ``name``."""
    return plan.base.folder / name if isinstance(plan.base, HFBase) else plan.base.path


def write_sequential(plan: Plan, out_file: OutputFile, dst: Path, device: torch.device,
                     progress: Progress, workers: Workers, alignment: int = 1) -> None:
    """The header, then every tensor in order: runs of untouched tensors copied in the kernel,
    the others folded. Serves safetensors shards and re-laid-out GGUF files, whose tensors each
    start at a multiple of ``alignment`` from the data start (zero padding in between). Each
    tensor is read from the base file it lies in (several for --max-shard-size, shards.py)."""
    position = 0                                   # bytes written after the header
    size = len(out_file.header) + sum(j.nbytes for j in out_file.jobs)
    # companion patches write in place: weights folded here, or companions of weights placed here
    placed = {f for j in plan.jobs if j.group is not None for f, _ in j.group.placed.values()}
    direct = out_file.name not in placed and not any(j.group is not None for j in out_file.jobs)
    with _file_pair(lambda name: source_path(plan, name), dst, workers, progress,
                    size if direct else None, sequential=True) as (sources, out, writer):
        writer.submit(len(out_file.header), out.write, out_file.header)
        runs = _runs(out_file.jobs)
        pending = _prefetch(workers.reader, sources, runs, 0)
        for i, run in enumerate(runs):
            current, pending = pending, _prefetch(workers.reader, sources, runs, i + 1)
            position = _pad(writer, out, position, alignment)
            src, reads = sources.get(run[0].source.file)
            if _is_plain(run[0]):
                count = sum(j.source.nbytes for j in run)
                writer.submit(count, out.copy, src, run[0].source.offset, count)
            else:
                source = current.result()
                tensor = fold(run[0], source, fold_mode(plan), device, workers.buffers,
                              workers.pool, workers.survival, kernels=workers.kernels,
                              patches=workers.patches)
                check_output(run[0], tensor, source)      # no Inf/NaN written
                count = tensor.numel() * tensor.element_size()
                writer.submit(count, write_released, out, tensor, workers.pool, reads, source)
            position += count
            for patch in due(workers.patches, out_file.name, len(out_file.header) + position):
                writer.submit(0, write_all, out.fd, tensor_bytes(patch.data), patch.offset)
        _pad(writer, out, position, alignment)


class Sources:
    """The base files one output file reads, each opened on first use: (fd, its Reads)."""

    def __init__(self, path_of, pool: BufferPool, sequential: bool) -> None:
        self.path_of, self.pool, self.sequential = path_of, pool, sequential
        self.opened: dict[str, tuple[int, Reads]] = {}

    def get(self, name: str) -> tuple[int, Reads]:
        if name not in self.opened:
            fd = os.open(self.path_of(name), os.O_RDONLY)
            try:
                if self.sequential:
                    os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_SEQUENTIAL)
                self.opened[name] = fd, Reads(fd, self.pool)
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


@contextmanager
def _file_pair(path_of, dst: Path, workers: Workers, progress: Progress,
               out_bytes: int | None = None, sequential: bool = False):
    """(the sources: base files by name, opened through ``path_of(name)`` on first use; the
    output's sink; its ordered writer). The sink writes front to back: O_DIRECT for outputs of
    ``out_bytes`` >= DIRECT_MIN_BYTES where the filesystem allows it, else the page cache
    (streams.open_sink). On success every queued write is done and the output fsynced; on an
    error the queue is abandoned; every file is closed."""
    out = os.open(dst, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    sink = open_sink(out, dst, out_bytes)
    writer = OrderedWriter(workers.writer, progress)
    sources = Sources(path_of, workers.pool, sequential)
    try:
        yield sources, sink, writer
        writer.drain()
        sink.finish()
        os.fsync(out)
    finally:
        writer.abandon()
        workers.reader.submit(sources.close).result()
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


def write_gguf(plan: Plan, dst: Path, device: torch.device, progress: Progress,
               workers: Workers) -> None:
    """Same header, same layout: untouched regions copied, adapted tensors rewritten in place.
    Copies and writes go to the writer thread (each at its own offset), so they overlap the
    folds (a synchronous pwrite took 4.2 s of an F16 W1 merge's 10 s)."""
    base = plan.base
    with _file_pair(lambda name: base.path, dst, workers, progress, base.data_end) as \
            (sources, out, writer):
        src, reads = sources.get(base.path.name)
        position = 0
        jobs = [j for j in plan.files[0].jobs if j.changed]
        reader = workers.reader
        pool = workers.pool
        pending = reader.submit(reads.read, jobs[0]) if jobs else None
        for i, job in enumerate(jobs):
            current = pending
            pending = reader.submit(reads.read, jobs[i + 1]) if i + 1 < len(jobs) else None
            gap = job.source.offset - position
            writer.submit(gap, out.copy, src, position, gap)
            source = current.result()
            tensor = fold(job, source, fold_mode(plan), device, workers.buffers, pool,
                          workers.survival, kernels=workers.kernels)
            check_output(job, tensor, source)             # no Inf/NaN written
            writer.submit(tensor.numel() * tensor.element_size(), write_released, out, tensor,
                          pool, reads, source)
            position = job.source.offset + job.source.nbytes
        tail = base.data_end - position
        writer.submit(tail, out.copy, src, position, tail)


def copy_side_files(folder: Path, dst: Path, plan: Plan) -> list[str]:
    """Config, tokenizer and other non-weight files of the base folder, as they are; a symlink
    leading out of the folder is refused (paths.contained_file), never followed."""
    copied = []
    for path in sorted(folder.iterdir()):
        if not path.is_file() or path.name.startswith(".") or path.suffix in WEIGHT_SUFFIXES \
                or path.name == INDEX_NAME:
            continue
        if path.name == "config.json" and plan.config is not None:
            continue
        contained_file(folder, path.name)
        shutil.copy2(path, dst / path.name)
        copied.append(path.name)
    return copied


@contextmanager
def one_compute_thread():
    """torch's CPU ops on one thread while the merge runs (restored afterwards). The fold needs
    about one core (W1: 1 s of CPU in all); the reading and writing threads need the others. With
    torch's default of one OpenMP thread per core, its threads spin-wait between matmuls and
    take the cores the I/O threads need: measured on 2 cores, W1 took 69-112 s of wall and 28-34
    s of user CPU with the default, 14-17 s and 1.8 s with one thread (machine under load)."""
    threads = torch.get_num_threads()
    CALLER_THREADS[0] = threads
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)
        CALLER_THREADS[0] = None


CALLER_THREADS: list[int | None] = [None]    # torch's thread count outside the merge


@contextmanager
def caller_threads(job: Job):
    """A conv LoRA's delta, and a DoRA norm, on the caller's thread count: oneDNN picks its
    convolution algorithm, and with it the rounding, by thread count (measured: 7-13 of 160
    elements differ from PEFT on one thread), and torch.linalg.norm splits its sum by thread
    count (a DoRA embedding (100, 5), norm over the vocabulary: 1 ulp off PEFT on one thread);
    PEFT runs with torch's default. Matmuls do not depend on it."""
    saved = CALLER_THREADS[0]
    if saved is None or not any(c.weight.layer == "conv" or c.weight.magnitude is not None
                                for c in job.contributions):
        yield
        return
    torch.set_num_threads(saved)
    try:
        yield
    finally:
        torch.set_num_threads(1)


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
                       inputs=inputs) as tmp, \
            ThreadPoolExecutor(max_workers=1, thread_name_prefix="adaptertools-read") as reader, \
            ThreadPoolExecutor(max_workers=1, thread_name_prefix="adaptertools-write") as writer:
        workers = Workers(reader, writer, Buffers(), BufferPool(), kernels=kernels)
        with torch.inference_mode(), one_compute_thread():
            if is_hf:
                for out_file in plan.files:
                    write_sequential(plan, out_file, tmp / out_file.name, torch_device, progress,
                                     workers)
                apply_left(workers.patches, tmp)     # quant states in shards already written
                copied = copy_side_files(plan.base.folder, tmp, plan)
                if plan.config is not None:
                    write_json(tmp / "config.json", plan.config)
                if plan.index is not None:
                    write_json(tmp / INDEX_NAME, plan.index)
                elif plan.base.index is not None and plan.max_shard_size is None:
                    shutil.copy2(plan.base.folder / INDEX_NAME, tmp / INDEX_NAME)
            elif plan.files[0].header:          # types changed: a new layout
                write_sequential(plan, plan.files[0], tmp, torch_device, progress, workers,
                                 alignment=plan.base.header.alignment)
                copied = []
            else:
                write_gguf(plan, tmp, torch_device, progress, workers)
                copied = []
    return {"wall_s": time.perf_counter() - start, "device": str(torch_device), "kernels": kernels,
            "copied_files": copied, "survival": summarize(workers.survival, gguf=not is_hf)}
