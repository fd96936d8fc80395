"""Where jobs run: ``local`` (a pool of fresh 'spawn' processes, one process per job, as many
at a time as the cores and the memory estimates allow) or ``ray`` (one Ray task per job with
``num_cpus=1``, its ``memory`` estimate, ``max_retries`` on worker loss and ``max_calls=1``,
so that a task's peak memory is its own). The driver (``run_all``) submits a job once the jobs
whose named outputs it takes have finished; both executors share that loop.

Memory estimate (conservative; a merge streams its base, so the base is not counted whole):
512 MiB for the process (torch), plus twice the adapters' and other small inputs' size on
disk (they are read eagerly), plus 8 x the largest tensor of the base in fp32 (read, decoded,
folded, encoded, written) for merge, validate and extract.
"""

from __future__ import annotations

import os
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from pathlib import Path

from .run import run_job

PROCESS = 512 << 20
MAX_RETRIES = 3


def _size(path: str) -> int:
    p = Path(path)
    if not p.exists():
        return 0
    if p.is_file():
        return p.stat().st_size
    return sum(f.stat().st_size for f in p.rglob("*") if f.is_file())


def _largest_tensor(base: str) -> int:
    try:
        from ..merging.bases import open_base

        entries = open_base(base).entries().values()
        return max((4 * e.nbytes // max(1, _itemsize(e.dtype)) for e in entries), default=0)
    except Exception:  # noqa: BLE001  (no estimate: the process share only)
        return 0


def _itemsize(dtype: str) -> int:
    return {"F64": 8, "F32": 4, "I32": 4, "F16": 2, "BF16": 2}.get(str(dtype).upper(), 1)


def memory_estimate(job) -> int:
    """Bytes a job may need at its peak (see the module's docstring)."""
    small = [p for k, v in job.kwargs.items() if k in ("adapters", "src", "quantize_like")
             for p in (v if isinstance(v, list) else [v]) if isinstance(p, str)]
    total = PROCESS + 2 * sum(_size(p) for p in small)
    base = job.kwargs.get("base")
    if job.kind in ("merge", "validate", "extract") and isinstance(base, str):
        total += 8 * _largest_tensor(base)
    return total


def available_memory() -> int:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


class LocalPool:
    """Fresh spawned processes, one per job (``max_tasks_per_child=1``): a crash or the memory
    of one job stays its own."""

    def __init__(self, workers: int | None = None) -> None:
        import multiprocessing

        self.workers = workers or os.cpu_count() or 1
        self.memory = available_memory()
        self.pool = ProcessPoolExecutor(self.workers, mp_context=multiprocessing.get_context(
            "spawn"), max_tasks_per_child=1)

    def fits(self, running: list[int], need: int) -> bool:
        return not running or (len(running) < self.workers
                               and sum(running) + need <= self.memory)

    def submit(self, job, args, memory: int):
        return self.pool.submit(run_job, *args)

    def wait(self, handles):
        done, _ = wait(handles, return_when=FIRST_COMPLETED)
        return [(h, _result(h)) for h in done]

    def close(self, cancel: bool = False) -> None:
        self.pool.shutdown(wait=not cancel, cancel_futures=cancel)


def _result(future) -> dict:
    try:
        return future.result()
    except Exception as exc:  # noqa: BLE001  (BrokenProcessPool: the worker died)
        return {"status": "failed", "error": f"the job's worker process died ({exc})",
                "wall_s": None, "peak_rss_bytes": None}


class RayPool:
    def __init__(self, address: str | None) -> None:
        from ..parallel import connect_ray

        self.ray = ray = connect_ray(address)
        self.task = ray.remote(max_calls=1)(run_job)
        self.cpus = max(1, int(ray.cluster_resources().get("CPU", 1)))

    def fits(self, running: list[int], need: int) -> bool:
        return len(running) < 2 * self.cpus      # Ray queues the rest by its resources

    def submit(self, job, args, memory: int):
        from ..parallel import passed_env
        from .run import DELAY_ENV

        return self.task.options(num_cpus=1, memory=memory, max_retries=MAX_RETRIES,
                                 **passed_env(DELAY_ENV)).remote(*args)

    def wait(self, handles):
        ready, _ = self.ray.wait(list(handles), num_returns=1)
        out = []
        for ref in ready:
            try:
                out.append((ref, self.ray.get(ref)))
            except Exception as exc:  # noqa: BLE001  (retries exhausted, node gone)
                out.append((ref, {"status": "failed", "error": f"Ray task failed: "
                                  f"{str(exc).splitlines()[0]}", "wall_s": None,
                                  "peak_rss_bytes": None}))
        return out

    def close(self, cancel: bool = False) -> None:
        pass
