"""Shard-parallel merges on Ray: one task per output file (HF) or byte range (GGUF).

The driver (``merge(..., executor="ray")``) plans as usual, cuts the plan into pieces
(``merging/pieces.py``) and submits one Ray task per piece that its manifest does not already
hold. Each task rebuilds the plan from the same inputs (``MergeSpec``: local paths every node
sees, on a shared filesystem), checks that it matches the driver's (``plan_digest``), and writes
its piece into the output's partial path beside OUT (``paths.resumable_output``). The driver
records every finished piece in the manifest, writes the patches that cross shards (bitsandbytes
companions), the side files, config and index last, and renames the output into place.

A killed worker: Ray runs its task again (``max_retries``); a piece is renamed into place or
recorded only when it is whole. A killed driver: the partial output and its manifest stay; the
same command again skips the pieces whose entries still hold (same inputs by size and mtime,
same options, same adaptertools, the piece's bytes unchanged) and runs the rest. ``force``
redoes everything.
"""

from __future__ import annotations

import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from .errors import UnsupportedError
from .manifest import Manifest, entry_for, sha256

RAY_INSTALL = "pip install 'adaptertools[ray]'"
MAX_RETRIES = 3
# fault injection for the tests: each piece waits this long (seconds) before it writes
DELAY_ENV = "ADAPTERTOOLS_TEST_PIECE_DELAY"
MIN_TASK_MEMORY = 256 << 20


@dataclass(frozen=True)
class MergeSpec:
    """What a worker needs to build the driver's plan again: local paths and options only."""

    base: str
    adapters: tuple[str, ...]
    names: tuple[str, ...]            # the adapters as the user gave them (messages)
    factors: tuple[float, ...]
    mode: str
    dtype: str
    requantize: str
    quantize_like: str | None = None
    max_shard_size: int | None = None
    scale: float | None = None
    allow_modified_base: bool = False
    device: str = "cpu"
    kernels: str = "auto"


def import_ray():
    try:
        import ray
    except ImportError:
        raise UnsupportedError(f"--executor ray needs Ray, which is not installed; {RAY_INSTALL}"
                               ) from None
    return ray


def build_plan(spec: MergeSpec):
    """The plan of ``spec``, as ``merge`` builds it."""
    from .inputs import load_finite, make_plan
    from .merging.bases import open_base

    checkpoint = open_base(spec.base)
    loaded = load_finite(list(spec.adapters), list(spec.names), refusal="refusing to merge it",
                         scale=spec.scale,
                         base=checkpoint.info if checkpoint.kind == "gguf" else spec.base)
    return make_plan(checkpoint, loaded, list(spec.names), list(spec.factors), mode=spec.mode,
                     dtype=spec.dtype, requantize=spec.requantize,
                     quantize_like=spec.quantize_like, max_shard_size=spec.max_shard_size,
                     allow_modified_base=spec.allow_modified_base)


def run_piece(spec: MergeSpec, piece, partial: str, digest: str) -> dict:
    """One piece, in a worker: plan again, check it is the driver's, write. Returns the
    piece's survival scores and cross-shard patches."""
    from .merging.pieces import plan_digest, write_piece

    delay = float(os.environ.get(DELAY_ENV) or 0)
    start = time.perf_counter()
    plan = build_plan(spec)
    if plan_digest(plan) != digest:
        raise UnsupportedError(f"{spec.base}: the base or an adapter changed while the merge "
                               "ran (a worker planned a different merge); run it again")
    if delay:
        time.sleep(delay)
    scores, patches = write_piece(plan, piece, Path(partial), device=spec.device,
                                  kernels=spec.kernels)
    return {"scores": scores, "patches": patches, "wall_s": time.perf_counter() - start,
            "pid": os.getpid()}


def _piece_output(piece, partial: Path) -> Path:
    return partial / piece.file if partial.is_dir() else partial


def _finished(manifest: Manifest, piece, partial: Path, inputs, options) -> dict | None:
    """The manifest's record of ``piece`` when its bytes are still the ones it recorded."""
    entry = manifest.fresh(piece.key, inputs, options)
    if entry is None:
        return None
    extra = entry.extra
    if piece.is_range:
        if not partial.is_file() or \
                sha256(partial, piece.start, piece.end) != extra.get("sha256"):
            return None
    elif extra.get("patches"):          # it wrote into other shards: redo it with them
        return None
    return extra


def _record(manifest: Manifest, piece, partial: Path, inputs, options, result: dict) -> None:
    from .kernels.survival import Survival

    extra = {"scores": [asdict(s) if isinstance(s, Survival) else s for s in result["scores"]],
             "patches": len(result["patches"]), "wall_s": result["wall_s"]}
    if piece.is_range:
        extra["sha256"] = sha256(partial, piece.start, piece.end)
        outputs = ()
    else:
        outputs = (_piece_output(piece, partial),)
    manifest.record(entry_for(piece.key, inputs, options, outputs, hashed=False, extra=extra))


def _inputs(spec: MergeSpec) -> list[str]:
    return [p for p in (spec.base, *spec.adapters, spec.quantize_like) if p is not None]


def _prepare(plan, partial: Path) -> None:
    """The partial output made ready for pieces: a folder (HF), or a file of the output's full
    size (GGUF ranges; kept when an earlier run left one of that size)."""
    from .merging.bases import HFBase

    if isinstance(plan.base, HFBase):
        partial.mkdir(exist_ok=True)
        return
    if plan.files[0].header:        # one piece that writes the file whole
        return
    size = plan.base.data_end
    if not partial.is_file() or partial.stat().st_size != size:
        with open(partial, "wb") as fh:
            fh.truncate(size)


def _ray_error(ray, exc):
    """The worker's own exception (an AdapterToolsError keeps its one line) out of Ray's
    wrapper."""
    cause = getattr(exc, "cause", None)
    if isinstance(cause, BaseException):
        return cause
    return exc


def connect_ray(address: str | None):
    """Ray, this process connected to the cluster at ``address`` (None: RAY_ADDRESS, else a
    new local one) unless it already is."""
    ray = import_ray()
    if not ray.is_initialized():
        ray.init(address=address, include_dashboard=False, log_to_driver=False,
                 configure_logging=False)
    return ray


def passed_env(*names: str) -> dict:
    """Task options handing these environment variables, where set, to Ray's workers (which do
    not inherit the driver's environment): the tests' fault injection."""
    env = {name: os.environ[name] for name in names if os.environ.get(name)}
    return {"runtime_env": {"env_vars": env}} if env else {}


def _submit_all(ray, spec: MergeSpec, pieces, partial: Path, digest: str):
    task, env = ray.remote(run_piece), passed_env(DELAY_ENV)
    return {task.options(num_cpus=1, max_retries=MAX_RETRIES,
                         memory=max(MIN_TASK_MEMORY, p.peak_bytes), **env).remote(
        spec, p, str(partial), digest): p for p in pieces}


def execute_parallel(plan, spec: MergeSpec, out, *, force: bool = False, progress=None,
                     address: str | None = None, inputs=()) -> dict:
    """Run ``plan`` as Ray tasks into ``out``; the report's fields as ``run.execute`` gives
    them, plus ``pieces``: how many ran, how many were already done, each run piece's wall
    (seconds in its task: planning again, then writing; in finishing order)."""
    from .kernels.survival import Survival
    from .merging.bases import HFBase
    from .merging.encoded import apply_left
    from .merging.pieces import plan_digest, split
    from .merging.quantized import summarize
    from .merging.run import write_side_files
    from .paths import resumable_output

    ray = connect_ray(address)
    progress = progress or (lambda n: None)
    start = time.perf_counter()
    is_hf = isinstance(plan.base, HFBase)
    digest, pieces = plan_digest(plan), split(plan)
    options = {"spec": asdict(spec), "digest": digest}
    input_paths = _inputs(spec)
    base_path = getattr(plan.base, "folder", None) or plan.base.path
    with resumable_output(out, force=force, is_dir=is_hf, expected_bytes=plan.size,
                          inputs=(base_path, *inputs)) as (partial, manifest_path):
        manifest = Manifest(manifest_path)
        _prepare(plan, partial)
        scores, patches, todo, skipped, walls = [], [], [], 0, []
        piece_options = {p.key: {**options, "piece": asdict(p)} for p in pieces}
        for piece in pieces:
            done = _finished(manifest, piece, partial, input_paths, piece_options[piece.key])
            if done is None:
                todo.append(piece)
                continue
            skipped += 1
            scores += [Survival(**s) for s in done.get("scores", [])]
            progress(piece.nbytes)
        refs = _submit_all(ray, spec, todo, partial, digest) if todo else {}
        try:
            while refs:
                ready, _ = ray.wait(list(refs), num_returns=1)
                piece = refs.pop(ready[0])
                try:
                    result = ray.get(ready[0])
                except Exception as exc:          # noqa: BLE001  (unwrapped and re-raised)
                    raise _ray_error(ray, exc) from None
                scores += result["scores"]
                patches += result["patches"]
                walls.append(round(result["wall_s"], 3))
                _record(manifest, piece, partial, input_paths, piece_options[piece.key],
                        result)
                progress(piece.nbytes)
        except BaseException:
            for ref in refs:
                ray.cancel(ref, force=True)
            raise
        copied = []
        if is_hf:
            apply_left(patches, partial)         # companions that lie in other shards
            copied = write_side_files(plan, partial)
    return {"wall_s": time.perf_counter() - start, "device": spec.device,
            "kernels": spec.kernels, "copied_files": copied,
            "survival": summarize(scores, gguf=not is_hf),
            "pieces": {"total": len(pieces), "ran": len(todo), "already_done": skipped,
                       "executor": "ray", "wall_s": walls}}

