"""One job, in a worker process: the library function of the job's kind, timed, with its peak
memory; its manifest entry recorded when it succeeds (so a driver killed afterwards loses
nothing). Errors come back as their one line, never raised: a bad adapter fails its job only."""

from __future__ import annotations

import os
import resource
import time

from ..manifest import Manifest, entry_for, output_record

# fault injection for the tests: each job waits this long (seconds) before it runs
DELAY_ENV = "ADAPTERTOOLS_TEST_JOB_DELAY"


def _call(kind: str, kwargs: dict):
    if kind == "push":
        from ..hub import push

        return push(**kwargs)
    from .. import api

    return getattr(api, kind)(**kwargs)


def _failure(kind: str, report) -> str | None:
    """A report that says it failed (a validation) is a failed job."""
    if kind == "validate" and not report.get("passed", True):
        return f"validation failed: {report['failed']} of {report['checked']} tensors"
    checked = report.get("validation") if kind == "merge" else None
    if checked and not checked.get("passed", True):
        return f"validation failed: {checked.get('failed')} tensors; see {checked.get('report')}"
    return None


def run_job(kind: str, kwargs: dict, key: str, inputs: list[str], output: str | None,
            manifest_path: str) -> dict:
    """Run one job; {"status": "done"|"failed", "error", "wall_s", "peak_rss_bytes", "pid"}."""
    from ..errors import AdapterToolsError

    delay = float(os.environ.get(DELAY_ENV) or 0)
    start = time.perf_counter()
    error = None
    try:
        if delay:
            time.sleep(delay)
        report = _call(kind, kwargs)
        error = _failure(kind, report)
    except (AdapterToolsError, OSError) as exc:
        error = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
    except Exception as exc:  # noqa: BLE001  (a job's bug fails that job only)
        error = f"internal error: {type(exc).__name__}: {str(exc)[:300]}"
    wall = time.perf_counter() - start
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024     # KiB on Linux
    result = {"status": "failed" if error else "done", "error": error, "wall_s": wall,
              "peak_rss_bytes": peak, "pid": os.getpid()}
    manifest = Manifest(manifest_path)
    if error is None:
        manifest.record(entry_for(key, inputs, options(kwargs), [output] if output else [],
                                  hashed=True, extra={"wall_s": wall, "peak_rss_bytes": peak}))
    else:
        manifest.forget(key)
    return result


def options(kwargs: dict) -> dict:
    """What the manifest compares: the keyword arguments, less ``force`` (how, not what)."""
    return {k: v for k, v in kwargs.items() if k != "force"}


def ours(manifest: Manifest, key: str, output: str) -> bool:
    """``output`` is what an earlier run of this batch wrote there (recorded, unchanged since):
    this batch may replace it. Anything else at that path is the user's."""
    entry = manifest.entries().get(key)
    if entry is None or output not in entry.outputs:
        return False
    then = entry.outputs[output].get("files")
    now = output_record(output, hashed=False).get("files")
    return then is not None and now is not None and \
        {k: v[:2] for k, v in then.items()} == now
