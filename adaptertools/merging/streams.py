"""Streaming I/O for the merge engine: pread (or mapped) source tensors, pooled buffers, writes
in order on a background thread, and kernel-side copies of untouched byte ranges. No tensor
maths here."""

from __future__ import annotations

import ctypes
import errno
import mmap
import os
import sys
import threading
from collections import deque
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

import torch

from ..tensor_index import TensorEntry, as_stored, read_entry, stored_dtype
from .jobs import Job

COPY_CHUNK = 64 << 20
# Writes go to the kernel a piece at a time. Measured on the 2-core ext4 machine (kernel 6.18),
# 2.2 GB from a 46 MB buffer, fsync included: 256 KB pieces 1.3-1.5 s, 1 MB 5.2 s, whole 46 MB
# writes 6.7-7.2 s (dd with bs=256K vs bs=46M agrees). The page cache takes small writes far
# faster than large ones, which also keep the source out of the CPU cache for the copy.
WRITE_PIECE = 256 << 10
# Written data is handed to the disk every WRITEBACK_STEP bytes (sync_file_range), so that the
# disk writes overlap the merge instead of all waiting for the final fsync. Measured, 2.2 GB
# written and fsynced: 1.47-1.50 s plain (fsync 0.8-0.9 s of it), 1.12-1.22 s with a writeback
# started every 64 MB (fsync 0.02-0.04 s).
WRITEBACK_STEP = 64 << 20

Progress = Callable[[int], None]   # called with the bytes just written


class BufferPool:
    """Byte buffers handed from reads to folds to writes and back, so that tensor data lands in
    memory that is already paged in: a fresh 46 MB buffer per tensor costs its page faults and
    zeroing every time (about 1.4 s of a W1 merge). The pool holds at most what is in flight
    at once (one read ahead, one being folded, the writer's queue), so memory stays bounded by
    a few of the largest tensors, as before."""

    def __init__(self, keep: int = 6) -> None:
        self.free: list[torch.Tensor] = []       # uint8, (capacity,)
        self.made: set[int] = set()              # data pointers of the buffers it handed out
        self.keep = keep
        self.lock = threading.Lock()

    def take(self, nbytes: int) -> torch.Tensor:
        """A uint8 tensor of exactly ``nbytes`` (a view of a pooled buffer, or a new one)."""
        with self.lock:
            fits = [i for i, b in enumerate(self.free) if b.numel() >= nbytes]
            if fits:    # (list.remove would compare tensors elementwise: pop by position)
                buffer = self.free.pop(min(fits, key=lambda i: self.free[i].numel()))
                return buffer[:nbytes]
            buffer = torch.empty(nbytes, dtype=torch.uint8)
            self.made.add(buffer.untyped_storage().data_ptr())
            return buffer

    def give(self, *tensors: torch.Tensor | None) -> None:
        """Take back the buffers behind ``tensors``; tensors whose memory the pool did not make
        (an adapter's replacement, a reference fold's result) are left alone."""
        with self.lock:
            for tensor in tensors:
                if tensor is None:
                    continue
                storage = tensor.untyped_storage()
                pointer = storage.data_ptr()
                if pointer not in self.made or \
                        any(b.untyped_storage().data_ptr() == pointer for b in self.free):
                    continue
                self.free.append(torch.empty(0, dtype=torch.uint8).set_(storage))
            while len(self.free) > self.keep:             # drop the smallest first
                smallest = min(range(len(self.free)), key=lambda i: self.free[i].numel())
                self.made.discard(self.free.pop(smallest).untyped_storage().data_ptr())



def linux_libc(name: str, argtypes: list):
    """A Linux libc function through ctypes (which releases the GIL during the call), or None
    elsewhere."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        function = getattr(ctypes.CDLL(None, use_errno=True), name)
    except (OSError, AttributeError):
        return None
    function.argtypes = argtypes
    return function


MADVISE = linux_libc("madvise", [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int])
MADV_DONTNEED = 4
MADV_POPULATE_READ = 22        # Linux 5.14+: fault the range in now (EINVAL before)
PAGE = mmap.PAGESIZE


# Source tensors are read with pread into pooled buffers by default, not as views of a mapping.
# Measured on the 2-core VM (kernel 6.18, ext4, read_ahead_kb 4096), a 2.2 GB shard:
# cold, pread of 32 or 117 MB with POSIX_FADV_SEQUENTIAL 1.0-2.3 GB/s against 0.5-1.0 GB/s for
# the mapping faulted in 117 MB at a time (MADV_POPULATE_READ, then MADV_DONTNEED) and 1.0-1.4
# GB/s for O_DIRECT 8-32 MB reads (dd iflag=direct agrees): a fault reads around the faulting
# page, one readahead window at a time, where a large read keeps the kernel's asynchronous
# readahead going; warm, pread 6-11 GB/s against 0.9-1.0 GB/s (a page-table entry set up and
# torn down per 4 KB page costs more than the copy). benchmarks/coldread.py has the engine's
# figures.
MAPPED_READS = False


class Reads:
    """The source tensors of one base file, for the reading thread.

    By default (MAPPED_READS False) ``tensor_index.read_entry`` (pread) into pooled buffers:
    large sequential reads, and with ``drop`` set (a base larger than about half the memory
    available, run.py) the page cache of each tensor's bytes is dropped once it is written
    (POSIX_FADV_DONTNEED), so that a base larger than RAM does not push the rest out.

    With ``mapped`` (Linux), tensors are views of a private mapping of the file (ACCESS_COPY: an
    accidental in-place write changes a private page, never the file): no copy, but slower (see
    MAPPED_READS). The reading thread faults each tensor's pages in ahead of the fold
    (MADV_POPULATE_READ), and ``done`` drops them from this process once the tensor is written
    (MADV_DONTNEED: the pages stay in the page cache, but no longer count as this process's
    memory). Only pages wholly inside a tensor are dropped; the one or two it shares with a
    neighbour go with the mapping. A tensor not aligned to its element size is read with pread.
    """

    def __init__(self, fd: int, pool: BufferPool | None, *, mapped: bool | None = None,
                 drop: bool = False) -> None:
        self.fd, self.pool, self.drop = fd, pool, drop
        self.base: torch.Tensor | None = None        # uint8 (file size,) over the mapping
        self.populate = True
        self.ranges: dict[int, tuple[int, int]] = {}   # buffer address -> (offset, nbytes) read
        size = os.fstat(fd).st_size
        mapped = MAPPED_READS if mapped is None else mapped
        if mapped and MADVISE is not None and size > 0:
            try:
                self.base = torch.frombuffer(mmap.mmap(fd, size, access=mmap.ACCESS_COPY),
                                             dtype=torch.uint8)
            except (OSError, ValueError):
                self.base = None

    def read(self, entry: TensorEntry | Job) -> torch.Tensor:
        """The stored tensor ``entry`` (a job: its source), as ``tensor_index.as_stored``
        types it: a view of the mapping, or read into a pooled buffer."""
        if isinstance(entry, Job):         # run.py hands the jobs themselves
            entry = entry.source
        start, nbytes = entry.offset, entry.nbytes
        dtype = stored_dtype(entry.dtype)
        size = dtype.itemsize if dtype is not None else 1
        if self.base is None or start + nbytes > self.base.numel() or start % size or nbytes == 0:
            tensor = read_entry(self.fd, entry, pool=self.pool)   # (a short file raises there)
            if self.drop:
                self.ranges[tensor.data_ptr()] = (start, nbytes)
            return tensor
        view = self.base[start:start + nbytes]
        if self.populate:
            address = view.data_ptr()
            first = address - address % PAGE
            if MADVISE(first, address + nbytes - first, MADV_POPULATE_READ) != 0:
                self.populate = False     # an older kernel: the fold's page faults do it
        return as_stored(entry, view)

    def done(self, tensor: torch.Tensor | None) -> None:
        """``tensor`` (from ``read``) is written: let its memory go."""
        if tensor is None:
            return
        if self.base is None or not self._mapped(tensor):
            read = self.ranges.pop(tensor.data_ptr(), None)
            if read is not None:      # written: its bytes are not read again by this merge
                os.posix_fadvise(self.fd, read[0], read[1], os.POSIX_FADV_DONTNEED)
            if self.pool is not None:
                self.pool.give(tensor)
            return
        address = tensor.data_ptr()
        first = -(-address // PAGE) * PAGE
        last = (address + tensor.numel() * tensor.element_size()) // PAGE * PAGE
        if last > first:
            MADVISE(first, last - first, MADV_DONTNEED)

    def close(self) -> None:
        """Every tensor of the file is written: drop what is left of the mapping's pages."""
        if self.base is not None:
            MADVISE(self.base.data_ptr(), self.base.numel(), MADV_DONTNEED)
            self.base = None

    def _mapped(self, tensor: torch.Tensor) -> bool:
        start = self.base.data_ptr()
        return start <= tensor.data_ptr() < start + self.base.numel()


def tensor_bytes(tensor: torch.Tensor) -> memoryview:
    return memoryview(tensor.reshape(-1).view(torch.uint8).numpy())


def write_all(fd: int, data, offset: int | None = None, piece_bytes: int = WRITE_PIECE) -> int:
    view, done = memoryview(data).cast("B"), 0
    while done < len(view):
        piece = view[done:done + piece_bytes]
        if offset is None:
            done += os.write(fd, piece)
        else:
            done += os.pwrite(fd, piece, offset + done)
    return done


def truncated_copy(src: int, at: int):
    """The error for a base file (descriptor ``src``) that ends at byte ``at`` while untouched
    tensors are copied from it: it shrank after the plan checked its size."""
    from ..errors import TruncatedFileError

    try:
        name = os.readlink(f"/proc/self/fd/{src}")
    except OSError:
        name = f"base file (descriptor {src})"
    return TruncatedFileError(name, None, f" (at byte {at})", where="the tensors copied unchanged")


def copy_range(src: int, dst: int, offset: int, count: int, dst_offset: int | None = None) -> None:
    """Kernel-side copy of ``count`` bytes from ``src`` at ``offset`` to ``dst``."""
    while count > 0:
        try:
            n = os.copy_file_range(src, dst, min(count, COPY_CHUNK), offset, dst_offset)
        except OSError:          # filesystems without copy_file_range: plain reads and writes
            data = os.pread(src, min(count, COPY_CHUNK), offset)
            n = write_all(dst, data, dst_offset)
        if n == 0:
            raise truncated_copy(src, offset)
        offset, count = offset + n, count - n
        dst_offset = None if dst_offset is None else dst_offset + n



SYNC_FILE_RANGE = linux_libc("sync_file_range",
                             [ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint])
SYNC_FILE_RANGE_WRITE = 2


def start_writeback(fd: int) -> None:
    """Ask the kernel to start writing ``fd``'s dirty pages to disk, without waiting."""
    if SYNC_FILE_RANGE is not None:
        SYNC_FILE_RANGE(fd, 0, 0, SYNC_FILE_RANGE_WRITE)   # a hint: its failure changes nothing


class BufferedSink:
    """An output file written front to back through the page cache: ``write`` in WRITE_PIECE
    calls, ``copy`` (untouched base bytes) inside the kernel, and the disk's writeback started
    every WRITEBACK_STEP bytes."""

    direct = False

    def __init__(self, fd: int) -> None:
        self.fd = fd
        self.unflushed = 0                # bytes written since the last writeback started

    def write(self, data) -> int:
        return self._written(write_all(self.fd, data))

    def copy(self, src: int, offset: int, count: int) -> int:
        copy_range(src, self.fd, offset, count)
        return self._written(count)

    def _written(self, nbytes: int) -> int:
        self.unflushed += nbytes
        if self.unflushed >= WRITEBACK_STEP:
            start_writeback(self.fd)
            self.unflushed = 0
        return nbytes

    def finish(self) -> None:
        pass

    def close(self) -> None:
        pass


# O_DIRECT output: measured on this VM, 2.2 GB written and fsynced took 1.2-1.6 s with O_DIRECT
# (dd, 1-32 MB blocks) in a spell when buffered 256 KB writes took 6.2 s, the kernel's copies
# into fresh page-cache pages being the slow part (perf). Direct writes skip that copy, leave no
# dirty pages behind and do not push the base being read out of the page cache. W3 (26.7 GB):
# 51.6 s direct against 61.4 s buffered, and 74.0 against 90.8 s in a slow spell; W1 the same
# either way when the page cache is fast (ab.py: 0.97-1.03x). Large files only: smaller ones
# keep the page-cache path.
DIRECT_ALIGN = 4096
DIRECT_MIN_BYTES = 64 << 20
STAGING_BYTES = 4 << 20


class DirectSink:
    """An output file written front to back with O_DIRECT, through aligned staging buffers.

    Bytes are gathered in one of two STAGING_BYTES buffers of page-aligned memory; a full one is
    written as whole aligned blocks to a second descriptor opened with O_DIRECT by a thread of
    its own while the other fills (a direct write waits for the disk). Untouched base bytes are
    read (pread) straight into the staging buffer. ``finish`` writes the last block zero-padded
    to the alignment and truncates the file to its true size. If the filesystem turns O_DIRECT
    writes down (EINVAL), the rest goes through the page cache at the same offsets."""

    direct = True

    def __init__(self, fd: int, direct_fd: int) -> None:
        self.fd, self.direct_fd, self.opened = fd, direct_fd, direct_fd
        self.stages = [mmap.mmap(-1, STAGING_BYTES) for _ in range(2)]   # page-aligned
        self.views = [memoryview(stage) for stage in self.stages]
        self.pending: list = [None, None]        # each buffer's write in flight
        self.current = 0
        self.view = self.views[0]
        self.filled = 0          # bytes waiting in the current buffer
        self.flushed = 0         # file offset of the current buffer's first byte
        self.io = ThreadPoolExecutor(max_workers=1, thread_name_prefix="adaptertools-direct")

    def write(self, data) -> int:
        view, done = memoryview(data).cast("B"), 0
        while done < len(view):
            n = min(len(view) - done, STAGING_BYTES - self.filled)
            self.view[self.filled:self.filled + n] = view[done:done + n]
            self._filled(n)
            done += n
        return done

    def copy(self, src: int, offset: int, count: int) -> int:
        done = 0
        while done < count:
            n = min(count - done, STAGING_BYTES - self.filled)
            got = os.preadv(src, [self.view[self.filled:self.filled + n]], offset + done)
            if got == 0:
                raise truncated_copy(src, offset + done)
            self._filled(got)
            done += got
        return count

    def _filled(self, n: int) -> None:
        self.filled += n
        if self.filled == STAGING_BYTES:
            self._flush(STAGING_BYTES)

    def _flush(self, nbytes: int) -> None:
        """Start writing the current buffer's first ``nbytes`` (a multiple of DIRECT_ALIGN),
        and switch to the other buffer once its own write is done."""
        self.pending[self.current] = self.io.submit(self._write, self.view[:nbytes], self.flushed)
        self.flushed += nbytes
        self.filled = 0
        self.current ^= 1
        self.view = self.views[self.current]
        self._wait(self.current)

    def _write(self, view: memoryview, offset: int) -> None:
        if self.direct_fd is not None:
            try:
                write_all(self.direct_fd, view, offset, len(view))
                return
            except OSError as exc:
                if exc.errno != errno.EINVAL:
                    raise
                self.direct_fd = None            # this filesystem refuses O_DIRECT writes
        write_all(self.fd, view, offset)

    def _wait(self, i: int) -> None:
        future, self.pending[i] = self.pending[i], None
        if future is not None:
            future.result()                      # a failed write raises here

    def finish(self) -> None:
        size = self.flushed + self.filled
        if self.filled:
            padded = -(-self.filled // DIRECT_ALIGN) * DIRECT_ALIGN
            self.view[self.filled:padded] = bytes(padded - self.filled)
            self._flush(padded)
        for i in (0, 1):
            self._wait(i)
        if size != self.flushed:
            os.ftruncate(self.fd, size)

    def close(self) -> None:
        """Wait for writes in flight (errors are on their way out already), free the buffers
        and close the O_DIRECT descriptor (the caller closes ``fd``)."""
        for future in self.pending:
            if future is not None:
                future.exception()
        self.io.shutdown(wait=True)
        for view, stage in zip(self.views, self.stages):
            try:
                view.release()
                stage.close()
            except BufferError:   # a failed write's traceback still holds a slice: the
                pass              # garbage collector frees the buffer with it
        if self.opened is not None:
            os.close(self.opened)
            self.opened = self.direct_fd = None


def open_sink(fd: int, path, expected_bytes: int | None):
    """The sink for a new output file: DirectSink for files of ``expected_bytes`` >=
    DIRECT_MIN_BYTES where O_DIRECT opens, else (or for None: in-place patches will follow)
    BufferedSink."""
    if expected_bytes is not None and expected_bytes >= DIRECT_MIN_BYTES and \
            hasattr(os, "O_DIRECT"):
        try:
            direct_fd = os.open(path, os.O_WRONLY | os.O_DIRECT)
        except OSError:                   # e.g. tmpfs
            return BufferedSink(fd)
        return DirectSink(fd, direct_fd)
    return BufferedSink(fd)


class OrderedWriter:
    """Writes to one output file on a background thread, in submission order, at most ``depth``
    pending: writing one tensor overlaps folding the next, and memory stays bounded."""

    def __init__(self, executor: ThreadPoolExecutor, progress: Progress, depth: int = 2) -> None:
        self.executor, self.progress, self.depth = executor, progress, depth
        self.pending: deque = deque()
        self.failed = threading.Event()

    def submit(self, nbytes: int, fn, *args) -> None:
        self.pending.append((self.executor.submit(self._run, fn, args), nbytes))
        while len(self.pending) > self.depth:
            self._finish_one()

    def _run(self, fn, args):
        if self.failed.is_set():          # a write before this one failed: the file is lost
            return None
        try:
            return fn(*args)
        except BaseException:
            self.failed.set()
            raise

    def _finish_one(self) -> None:
        future, nbytes = self.pending.popleft()
        future.result()                     # a failed write raises here, in the caller
        self.progress(nbytes)

    def drain(self) -> None:
        while self.pending:
            self._finish_one()

    def abandon(self) -> None:
        """Skip the writes still queued and return once the writing thread is idle, without
        raising (an error or Ctrl-C is already on its way out): the caller closes the file next.

        It waits for a no-op queued behind everything, not for the futures in ``pending``: a
        Ctrl-C that interrupted ``_finish_one`` (after its ``popleft``) or ``submit`` (before
        its ``append``) leaves a write in flight that ``pending`` no longer holds, which would
        go on writing to a closed, perhaps reused, file descriptor. (The executor has one
        thread, so its queue runs in order.)"""
        self.failed.set()
        self.pending.clear()
        self.executor.submit(lambda: None).exception()



def write_released(sink, tensor: torch.Tensor, pool: BufferPool, reads: Reads,
                   source: torch.Tensor) -> int:
    """Write ``tensor`` to ``sink``, then hand its memory back to the pool and let its source
    go."""
    try:
        return sink.write(tensor_bytes(tensor))
    finally:
        pool.give(tensor)
        reads.done(source)
