"""``adaptertools batch JOBS.yaml``: many merges, conversions, validations, combines, extracts
and pushes from one file (schema.py), run in parallel locally or on Ray (executors.py), each
job resumable through a manifest beside the file (``JOBS.yaml.manifest.json``).

Resume and overwrites: a job whose manifest entry still holds (same inputs by size and mtime,
same options, same adaptertools, its output unchanged) is ``cached`` and not run. A job whose
output exists is run with ``force=True`` only when that output is this batch's own (recorded
in the manifest and unchanged since); a file there that this batch did not write fails the job
with "already exists" unless ``force`` (``--force``, which also redoes every job).
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from pathlib import Path

from ..reports import REPORT, Report, Row
from .schema import JobsFileError, Job, parse  # noqa: F401  (public)


@dataclass(**REPORT)
class BatchReport(Report):
    """``run_batch``: one row per job (index, source, kind, name, key, after, status, wall_s,
    peak_rss_bytes, memory_estimate_bytes, error); status is done, cached (up to date, not
    run), failed, skipped (a job it depends on failed) or planned (dry run)."""

    jobs_file: str
    executor: str
    manifest: str
    dry_run: bool
    jobs: list[Row]
    counts: dict[str, int]
    failed: int
    wall_s: float


def _row(job: Job, status: str, **extra) -> dict:
    return {"index": job.index, "source": job.source, "kind": job.kind, "name": job.name,
            "key": job.key, "after": list(job.after), "kwargs": job.kwargs, "status": status,
            "wall_s": None, "peak_rss_bytes": None, "memory_estimate_bytes": None,
            "error": None} | extra


def run_batch(path: str | os.PathLike, *, executor: str = "local", address: str | None = None,
              dry_run: bool = False, force: bool = False, manifest: str | os.PathLike | None = None,
              workers: int | None = None, progress=None) -> BatchReport:
    """Run the jobs file at ``path``; see the package docstring and schema.py.

    Raises JobsFileError (an OptionError) for a bad file, listing every problem; OptionError
    for an unknown ``executor``; UnsupportedError for ``executor="ray"`` without Ray. A job
    that fails is a row with its error, never an exception."""
    from ..errors import OptionError
    from ..manifest import Manifest

    if executor not in ("local", "ray"):
        raise OptionError(f"unknown executor {executor!r}; choose local or ray")
    if address is not None and executor != "ray":
        raise OptionError("--address names a Ray cluster; add --executor ray")
    start = time.perf_counter()
    jobs = parse(path)
    manifest_path = Path(manifest) if manifest else Path(f"{Path(path).resolve()}.manifest.json")
    book = Manifest(manifest_path)
    if dry_run:
        rows = [_row(j, "planned", up_to_date=not force and
                     book.fresh(j.key, j.inputs, _options(j)) is not None) for j in jobs]
    else:
        rows = _run_all(jobs, book, executor, address, force, workers, progress or _Quiet())
    counts: dict[str, int] = {}
    for row in rows:
        counts[row["status"]] = counts.get(row["status"], 0) + 1
    return BatchReport(jobs_file=str(path), executor=executor, manifest=str(manifest_path),
                       dry_run=dry_run, jobs=sorted(rows, key=lambda r: r["index"]),
                       counts=counts, failed=counts.get("failed", 0),
                       wall_s=time.perf_counter() - start)


def _options(job: Job) -> dict:
    from .run import options

    return options(job.kwargs)


class _Quiet:
    def started(self, row) -> None: ...
    def finished(self, row) -> None: ...


def _prepare(job: Job, book, force: bool) -> dict:
    """The keyword arguments the job runs with: ``force=True`` for --force, or for an output
    that is this batch's own (see the package docstring)."""
    from .run import ours

    kwargs = dict(job.kwargs)
    if "force" in kwargs or job.output is None:
        return kwargs
    if force or (os.path.lexists(job.output) and ours(book, job.key, job.output)):
        kwargs["force"] = True
    return kwargs


def _run_all(jobs, book, executor, address, force, workers, progress) -> list[dict]:
    from .executors import LocalPool, RayPool, memory_estimate

    pool = RayPool(address) if executor == "ray" else LocalPool(workers)
    rows: dict[int, dict] = {}
    waiting = list(jobs)
    running: dict = {}          # handle -> (job, memory)
    try:
        while waiting or running:
            for job in list(waiting):
                states = [rows.get(a, {}).get("status") for a in job.after]
                if any(s in ("failed", "skipped") for s in states):
                    bad = next(jobs_by(jobs, a).source for a in job.after
                               if rows[a]["status"] in ("failed", "skipped"))
                    rows[job.index] = _row(job, "skipped", error=f"{bad} did not finish")
                    waiting.remove(job)
                    progress.finished(rows[job.index])
                    continue
                if not all(s in ("done", "cached") for s in states):
                    continue
                if not force and book.fresh(job.key, job.inputs, _options(job)) is not None:
                    rows[job.index] = _row(job, "cached")
                    waiting.remove(job)
                    progress.finished(rows[job.index])
                    continue
                need = memory_estimate(job)
                if not pool.fits([m for _, m in running.values()], need):
                    continue
                args = (job.kind, _prepare(job, book, force), job.key, list(job.inputs),
                        job.output, str(book.path))
                running[pool.submit(job, args, need)] = (job, need)
                waiting.remove(job)
                progress.started(_row(job, "running", memory_estimate_bytes=need))
            if not running:
                if waiting:       # nothing runnable and nothing running: a bug, not a hang
                    raise AssertionError("batch: jobs left that can never start")
                break
            for handle, result in pool.wait(list(running)):
                job, need = running.pop(handle)
                rows[job.index] = _row(job, result["status"], error=result["error"],
                                       wall_s=result["wall_s"],
                                       peak_rss_bytes=result["peak_rss_bytes"],
                                       memory_estimate_bytes=need)
                progress.finished(rows[job.index])
    except BaseException:
        pool.close(cancel=True)
        raise
    pool.close()
    return list(rows.values())


def jobs_by(jobs, index: int) -> Job:
    return next(j for j in jobs if j.index == index)
