"""The ``adaptertools`` command: thin click wrappers around the library.

Exit codes: 0 success, 1 failed operation (bad input, refused conversion, an internal error), 2
command-line misuse (click's usage errors and the library's OptionError), 130 Ctrl-C, 143 SIGTERM.
Nothing heavy is imported at module level, so ``adaptertools --help`` stays fast (no torch).
"""

from __future__ import annotations

import os
import signal
import sys

import click

from . import __version__
from ._boundary import (EXIT_CODES, INTERRUPTED, STARTUP, Terminated, fail, handle_errors,
                        internal_error, ready, usage_hint)

DTYPE_CHOICE = click.Choice(["keep", "fp32", "fp16", "bf16", "q8_0"])
BASE_HELP = ("Base model (HF folder, its config.json, or a GGUF model): architecture and head "
             "counts for GGUF.")
SCALE_HELP = "Scale for bare factor files without a config."
SCALE_EACH_HELP = SCALE_HELP + " Applies to every ADAPTER; one that carries its own is refused."
HUB_OPTIONS = (
    click.option("--token", metavar="TOKEN", default=None,
                 help="Hub token (default: HF_TOKEN, then the stored login); never printed."),
    click.option("--endpoint", metavar="URL", default=None,
                 help="Hub endpoint for hf:// inputs and pushes (default: HF_ENDPOINT, then "
                      "https://huggingface.co)."),
)
VERBOSITY_OPTIONS = (
    click.option("-v", "--verbose", is_flag=True,
                 help="One row per changed tensor (default: one per kind of tensor) and every "
                      "survival and validation row (default: the worst few)."),
    click.option("-q", "--quiet", is_flag=True, help="Print only warnings and errors."),
)
PUSH_OPTIONS = (
    click.option("--push-to", metavar="OWNER/NAME", help="Upload the output to this Hub repo, "
                 "with a model card."),
    click.option("--private", is_flag=True, help="Create the --push-to repo private."),
    click.option("--revision", metavar="BRANCH", help="Branch to push to (created from main "
                 "when missing; default main)."),
    click.option("--commit-message", metavar="TEXT", help="Message of the pushed commit."),
)


def _options(*options):
    def decorate(func):
        for option in reversed(options):
            func = option(func)
        return func
    return decorate


def _echo_pushed(report: dict) -> None:
    pushed = report.get("pushed")
    if pushed:
        click.echo(f"pushed {len(pushed['files'])} file(s) to {pushed['repo_id']}@"
                   f"{pushed['revision']}: {pushed['url']}")


# click >= 8.2 raises this for a bare `adaptertools`; older versions print the help themselves.
NO_ARGS_IS_HELP = getattr(click.exceptions, "NoArgsIsHelpError", ())


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="adaptertools")
@click.option("--debug", is_flag=True,
              help="Print the traceback of any error (also: ADAPTERTOOLS_DEBUG=1).")
def cli(debug: bool) -> None:
    """Convert, merge and validate LoRA adapters (PEFT, safetensors, GGUF)."""


@cli.command("formats", short_help="List the adapter formats, built-in and from plugins.")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@handle_errors
def formats_cmd(as_json: bool) -> None:
    """List the adapter formats, built-in and from plugins."""
    from . import _ui
    from .registry import formats

    found = formats()         # imports the format modules, and torch with them
    ready()
    rows = [{"name": f.name, "read": f.can_read, "write": f.can_write, "package": f.package,
             "description": f.description, "available": f.available, "error": f.error}
            for f in found.values()]
    _ui.print_json(rows) if as_json else _ui.formats_table(rows)


def _one_blas_thread() -> None:
    """numpy's OpenBLAS on one thread for the light path's small float64 QRs (inspect), set
    before numpy loads: its threads fight for this machine's 2 cores, 80x slower on a (5632, 16)
    QR with other work running. torch's own threads (a fallback, a fold) are not OpenBLAS's."""
    os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")


@cli.command("inspect", short_help="Show an adapter's ranks, scales, targets, size and problems.")
@click.argument("path", type=click.Path())
@click.option("--layers", is_flag=True, help="One row per adapted tensor.")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@click.option("--from", "from_format", metavar="FORMAT", help="Skip format detection.")
@click.option("--scale", type=float, help=SCALE_HELP)
@click.option("--base", type=click.Path(), help=BASE_HELP)
@_options(*HUB_OPTIONS)
@handle_errors
def inspect_cmd(path: str, layers: bool, as_json: bool, from_format: str | None,
                scale: float | None, base: str | None, token: str | None,
                endpoint: str | None) -> None:
    """Show what an adapter holds: ranks, scales, targets, sizes and problems (PATH may be
    hf://owner/name[@revision][/subfolder])."""
    _one_blas_thread()
    from . import _ui
    from .api import inspect

    ready()
    report = inspect(path, layers=layers, format=from_format, scale=scale, base=base,
                     token=token, endpoint=endpoint)
    _ui.print_json(report.to_dict()) if as_json else _ui.inspect_report(report)


@cli.command("convert",
             short_help="Convert an adapter to another format, losslessly or not at all.")
@click.argument("src", type=click.Path())
@click.argument("dst", type=click.Path())
@click.option("--to", "to_format", required=True, metavar="FORMAT",
              help="Target format (see `adaptertools formats`).")
@click.option("--from", "from_format", metavar="FORMAT", help="Skip format detection.")
@click.option("--dtype", type=DTYPE_CHOICE, default="keep", show_default=True,
              help="Cast the factors (q8_0: GGUF only; rows not a multiple of 32 stay f16).")
@click.option("--base", type=click.Path(), help=BASE_HELP)
@click.option("--scale", type=float, help=SCALE_HELP)
@click.option("--force", is_flag=True, help="Overwrite DST.")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@_options(*PUSH_OPTIONS, *HUB_OPTIONS)
@handle_errors
def convert_cmd(src: str, dst: str, to_format: str, from_format: str | None, dtype: str,
                base: str | None, scale: float | None, force: bool, as_json: bool,
                push_to: str | None, private: bool, revision: str | None,
                commit_message: str | None, token: str | None, endpoint: str | None) -> None:
    """Convert the adapter SRC into DST in another format, losslessly or not at all (SRC may be
    hf://owner/name[@revision][/subfolder])."""
    from . import _ui
    from .api import convert

    ready()
    result = convert(src, dst, to=to_format, from_format=from_format, dtype=dtype, force=force,
                     scale=scale, base=base, push_to=push_to, private=private,
                     revision=revision, commit_message=commit_message, token=token,
                     endpoint=endpoint)
    if as_json:
        _ui.print_json(result.to_dict())
    else:
        _ui.convert_result(result)
        _echo_pushed(result)


@cli.command("merge", short_help="Fold adapters into a base checkpoint (HF or GGUF).")
@click.argument("base", type=click.Path())
@click.argument("adapters", nargs=-1, required=True, type=click.Path())
@click.option("--out", "out", type=click.Path(), help="Output folder (HF base) or file (GGUF base).")
@click.option("--weights", help="One weight per adapter, comma separated (default 1 each).")
@click.option("--mode", type=click.Choice(["weighted", "stacked"]), default="weighted",
              show_default=True, help="Sum the deltas, or apply adapters one after another.")
@click.option("--dtype", type=click.Choice(["keep", "bf16", "fp16", "fp32"]), default="keep",
              show_default=True, help="Storage dtype of the output's floating tensors.")
@click.option("--device", type=click.Choice(["auto", "cpu", "cuda"]), default="cpu",
              show_default=True, help="Where the fold runs (cpu is the reference).")
@click.option("--kernels", type=click.Choice(["auto", "torch", "triton"]), default="auto",
              show_default=True, help="Fused Triton kernels (auto: on CUDA when triton is installed) "
                                      "or the torch reference.")
@click.option("--dry-run", is_flag=True, help="Print the plan; write nothing.")
@click.option("--force", is_flag=True, help="Overwrite OUT.")
@click.option("--validate", "check", is_flag=True,
              help="Check every tensor of OUT afterwards (validation.json beside it); exit 1 "
                   "if any fails.")
@click.option("--requantize", default="keep", show_default=True, metavar="TYPE",
              help="GGUF bases: type of the adapted tensors: keep (each its own), f32, f16, bf16, "
                   "q8_0, q4_0, q4_1, q5_0, q5_1, q2_k..q6_k. bitsandbytes checkpoints: keep "
                   "(same NF4/FP4/int8), or bf16/fp16/fp32 for a plain model without "
                   "quantization_config.")
@click.option("--quantize-like", type=click.Path(), metavar="REF.gguf",
              help="GGUF F16/BF16/F32 base: give every tensor the type it has in REF (a quantized "
                   "GGUF of the same model); one quantization instead of two.")
@click.option("--max-shard-size", metavar="SIZE",
              help="HF base: write new shards of at most SIZE (5GB, 500MB, 2GiB or bytes), named "
                   "and indexed as save_pretrained does. Default: the base's own files.")
@click.option("--scale", type=float, help=SCALE_EACH_HELP)
@click.option("--allow-modified-base", is_flag=True,
              help="Merge PiSSA/OLoRA/CorDA/LoRA-GA/LoftQ adapters saved without PEFT's "
                   "conversion; BASE must then be the base as PEFT modified it.")
@click.option("--executor", type=click.Choice(["local", "ray"]), default="local",
              show_default=True,
              help="ray: one Ray task per output shard (GGUF: byte range), same bytes as local; "
                   "inputs and OUT on storage every node sees; a stopped run resumes. Needs "
                   "adaptertools[ray].")
@click.option("--address", metavar="ADDR",
              help="With --executor ray: the cluster to join (auto, ray://host:10001); default "
                   "RAY_ADDRESS, else a new local one.")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@_options(*VERBOSITY_OPTIONS, *PUSH_OPTIONS, *HUB_OPTIONS)
@handle_errors
def merge_cmd(base: str, adapters: tuple[str, ...], out: str | None, weights: str | None,
              mode: str, dtype: str, device: str, kernels: str, dry_run: bool, force: bool,
              check: bool, requantize: str, quantize_like: str | None, max_shard_size: str | None,
              scale: float | None, allow_modified_base: bool, executor: str,
              address: str | None, as_json: bool, verbose: bool,
              quiet: bool, push_to: str | None, private: bool,
              revision: str | None, commit_message: str | None, token: str | None,
              endpoint: str | None) -> None:
    """Fold ADAPTERS into the BASE checkpoint, streaming it tensor by tensor (any of them may be
    hf://owner/name[@revision][/subfolder])."""
    if out is None and not dry_run:
        raise click.UsageError("missing option '--out' (or pass --dry-run)")
    if check and dry_run:
        raise click.UsageError("--validate needs a real run; drop --dry-run")
    if verbose and quiet:
        raise click.UsageError("--verbose and --quiet contradict each other; pass one")
    if address is not None and executor != "ray":
        raise click.UsageError("--address names a Ray cluster; add --executor ray")
    if not dry_run:       # the disk reads the base while torch is imported (_prefetch.py)
        from . import _prefetch as prefetch

        prefetch.start(base, adapters)
    from . import _ui
    from .api import merge
    from .merging import run  # noqa: F401  (the engine, which api.merge imports first thing)

    ready()
    with _ui.progress_bar("merging", show=not quiet) as bar:
        report = merge(base, adapters, out, weights=weights, mode=mode, dtype=dtype,
                       device=device, dry_run=dry_run, force=force, progress=bar,
                       push_to=push_to, private=private, revision=revision,
                       commit_message=commit_message, token=token, endpoint=endpoint,
                       validate=check, requantize=requantize.lower(), quantize_like=quantize_like,
                       kernels=kernels, max_shard_size=max_shard_size, scale=scale,
                       allow_modified_base=allow_modified_base, executor=executor,
                       address=address)
    if as_json:
        _ui.print_json(report.to_dict())
    else:
        _ui.merge_report(report, dry_run=dry_run, verbose=verbose, quiet=quiet)
        if report.get("shards") and not quiet:      # --max-shard-size: the new files
            _ui.shards_table(report)
        quiet or _echo_pushed(report)
        if "validation" in report:
            _ui.merge_validation(report["validation"], verbose=verbose, quiet=quiet)
    if "validation" in report and not report["validation"]["passed"]:
        sys.exit(1)


@cli.command("validate", short_help="Check a merge (--merged) or a conversion (--against).")
@click.argument("paths", nargs=-1, required=True, type=click.Path())
@click.option("--merged", type=click.Path(),
              help="A merge of BASE and ADAPTERS to check: validate BASE ADAPTER... --merged M.")
@click.option("--against", type=click.Path(),
              help="The adapter to compare with (e.g. the source of a conversion): "
                   "validate ADAPTER --against OTHER.")
@click.option("--weights", help="With --merged: the merge's weights, one per adapter.")
@click.option("--mode", type=click.Choice(["weighted", "stacked"]), default="weighted",
              show_default=True, help="With --merged: the merge's mode.")
@click.option("--e2e", is_flag=True,
              help="With --merged: also compare logits of the merged and unmerged models "
                   "(transformers + PEFT, or llama.cpp for GGUF).")
@click.option("--probes", type=click.IntRange(min=1), default=16, show_default=True,
              help="Random probe vectors per tensor.")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of the probes.")
@click.option("--tolerance-db", type=click.FloatRange(min=0), default=1.0, show_default=True,
              help="How far below its dtype's noise floor a tensor's SQNR may fall.")
@click.option("--plot", type=click.Path(), help="With --merged: per-layer SQNR vs floor, as a PNG.")
@click.option("--base", type=click.Path(), help=BASE_HELP + " (with --against)")
@click.option("--scale", type=float, help=SCALE_EACH_HELP)
@click.option("--allow-modified-base", is_flag=True,
              help="With --merged: check a merge of PiSSA/OLoRA/CorDA/LoRA-GA/LoftQ adapters "
                   "saved without PEFT's conversion; BASE is then the base PEFT modified.")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@_options(*HUB_OPTIONS)
@handle_errors
def validate_cmd(paths: tuple[str, ...], merged: str | None, against: str | None,
                 weights: str | None, mode: str, e2e: bool, probes: int, seed: int,
                 tolerance_db: float, plot: str | None, base: str | None, scale: float | None,
                 allow_modified_base: bool, as_json: bool, token: str | None,
                 endpoint: str | None) -> None:
    """Check a merge (validate BASE ADAPTER... --merged MERGED: every tensor against the unmerged
    adapters, within its dtype's noise) or a conversion (validate ADAPTER --against OTHER: the
    same delta for every tensor). Exit 1 when anything fails."""
    from . import _ui

    if (merged is None) == (against is None):
        raise click.UsageError("give --merged MERGED (check a merge: BASE ADAPTER... --merged M) "
                               "or --against OTHER (compare two adapters: ADAPTER --against O)")
    if against is not None:
        extra = [n for n, v in (("--weights", weights), ("--e2e", e2e), ("--plot", plot),
                                ("--allow-modified-base", allow_modified_base)) if v]
        if len(paths) != 1 or extra:
            raise click.UsageError("--against compares exactly one ADAPTER with OTHER"
                                   + (f"; {extra[0]} only applies with --merged" if extra else ""))
        from .api import validate_against

        ready()
        report = validate_against(paths[0], against, base=base, scale=scale, token=token,
                                  endpoint=endpoint)
        _ui.print_json(report.to_dict()) if as_json else _ui.validation_table(report)
        sys.exit(0 if report.passed else 1)
    if len(paths) < 2:
        raise click.UsageError("--merged needs the BASE and at least one ADAPTER")
    if base is not None:
        raise click.UsageError("--base applies to --against; with --merged the base is the "
                               "first argument")
    from . import _prefetch as prefetch

    prefetch.start(paths[0], (merged,), first="base")   # read while torch is imported
    from .api import validate

    ready()
    report = validate(paths[0], paths[1:], merged, weights=weights, mode=mode, e2e=e2e,
                      probes=probes, seed=seed, tolerance_db=tolerance_db, endpoint=endpoint,
                      token=token, scale=scale, allow_modified_base=allow_modified_base)
    shown = report.to_dict()     # the report is frozen; --plot adds its path to what is shown
    if plot is not None:
        from .validation.plot import plot_report

        shown["plot"] = str(plot_report(report, plot))
    _ui.print_json(shown) if as_json else _ui.merged_validation_table(shown)
    sys.exit(0 if report.passed else 1)


def truncation_options(seed_help: str) -> tuple:
    """combine's and extract's shared options; ``seed_help``: what --seed seeds there."""
    return (*TRUNCATION_OPTIONS[:3],
            click.option("--seed", type=int, default=0, show_default=True, help=seed_help),
            *TRUNCATION_OPTIONS[3:])


TRUNCATION_OPTIONS = (
    click.option("--rank", type=int, help="Rank of each output tensor."),
    click.option("--energy", type=float,
                 help="Instead of --rank: the fewest ranks keeping this fraction (0 < E <= 1) of "
                      "each delta's squared Frobenius norm."),
    click.option("--svd", type=click.Choice(["auto", "exact", "randomized"]), default="auto",
                 show_default=True, help="SVD for full matrices; randomized is seeded by --seed."),
    click.option("--to", "to_format", default="peft", show_default=True, metavar="FORMAT",
                 help="Output format (see `adaptertools formats`)."),
    click.option("--force", is_flag=True, help="Overwrite OUT."),
    click.option("--json", "as_json", is_flag=True, help="Machine-readable output."),
)


@cli.command("combine", short_help="Combine adapters into one (cat, svd, ties, dare, pruning).")
@click.argument("adapters", nargs=-1, required=True, type=click.Path())
@click.option("--out", "out", type=click.Path(), required=True, help="The combined adapter.")
@click.option("--method", type=click.Choice(["cat", "svd", "ties", "dare_linear", "dare_ties",
                                             "magnitude_prune"]),
              default="cat", show_default=True,
              help="cat: exact (ranks add up); svd: truncated weighted sum; the rest: on the "
                   "full deltas, then truncated.")
@click.option("--weights", help="One weight per adapter, comma separated (default 1 each).")
@click.option("--density", type=float, help="ties/dare/magnitude_prune: fraction of entries kept.")
@click.option("--materialize", is_flag=True,
              help="Combine DoRA adapters through their full delta (needs --base).")
@click.option("--base", type=click.Path(),
              help="HF base folder: base weights for --materialize, names for GGUF in/out.")
@click.option("--dtype", type=DTYPE_CHOICE, default="keep", show_default=True,
              help="Factor dtype (keep: the inputs' widest).")
@click.option("--scale", type=float, help=SCALE_EACH_HELP)
@_options(*truncation_options("Seed of the random draws (DARE masks, randomized SVD)."))
@handle_errors
def combine_cmd(adapters: tuple[str, ...], out: str, method: str, weights: str | None,
                density: float | None, materialize: bool, base: str | None, dtype: str,
                scale: float | None, rank: int | None, energy: float | None, svd: str, seed: int,
                to_format: str, force: bool, as_json: bool) -> None:
    """Combine ADAPTERS into one new adapter, saying how much of each delta it keeps."""
    from . import _ui
    from .api import combine

    ready()
    report = combine(adapters, out, method=method, weights=weights, rank=rank, energy=energy,
                     density=density, seed=seed, svd=svd, materialize=materialize, base=base,
                     to=to_format, dtype=dtype, force=force, scale=scale)
    _ui.print_json(report.to_dict()) if as_json else _ui.algebra_report(report)


@cli.command("extract", short_help="Extract a LoRA from a fine-tune: FINETUNED - BASE.")
@click.argument("base", type=click.Path())
@click.argument("finetuned", type=click.Path())
@click.option("--out", "out", type=click.Path(), required=True, help="The extracted adapter.")
@click.option("--targets", help="Modules to factor, comma separated names or suffixes "
                                "(default: every 2-D weight but the embeddings).")
@click.option("--dtype", type=DTYPE_CHOICE, default="fp32", show_default=True,
              help="Factor dtype.")
@_options(*truncation_options("Seed of the randomized SVD (with --rank: --svd randomized, "
                              "or auto on a rank well below the matrix's)."))
@handle_errors
def extract_cmd(base: str, finetuned: str, out: str, targets: str | None, dtype: str,
                rank: int | None, energy: float | None, svd: str, seed: int, to_format: str,
                force: bool, as_json: bool) -> None:
    """A LoRA approximating FINETUNED - BASE (HF checkpoints), streamed tensor by tensor."""
    from . import _ui
    from .api import extract

    ready()
    with _ui.progress_bar("extracting") as bar:
        report = extract(base, finetuned, out, rank=rank, energy=energy, targets=targets, svd=svd,
                         seed=seed, to=to_format, dtype=dtype, force=force, progress=bar)
    _ui.print_json(report.to_dict()) if as_json else _ui.algebra_report(report)


@cli.command("pull", short_help="Fetch a model or adapter from the Hugging Face Hub.")
@click.argument("uri")
@click.option("--out", "out", type=click.Path(), help="Copy the files here (default: only the "
              "Hugging Face cache, whose folder is printed).")
@click.option("--include", multiple=True, metavar="PATTERN",
              help="Also fetch files matching this pattern (e.g. '*.bin'); repeatable.")
@click.option("--force", is_flag=True, help="Overwrite OUT.")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@_options(*HUB_OPTIONS)
@handle_errors
def pull_cmd(uri: str, out: str | None, include: tuple[str, ...], force: bool, as_json: bool,
             token: str | None, endpoint: str | None) -> None:
    """Fetch hf://owner/name[@revision][/subfolder]: weights, configs, tokenizer, card (pickles
    and optimizer state only with --include). Prints the local folder."""
    import huggingface_hub  # noqa: F401  (which hub.pull imports when it starts)

    from . import _ui
    from .hub import pull

    ready()
    report = pull(uri, out=out, include=include, force=force, token=token, endpoint=endpoint)
    if as_json:
        _ui.print_json(report)
    else:
        _ui.info(f"{report['uri']} at commit {report['commit']}: {len(report['files'])} "
                 "file(s)")
        click.echo(report["path"])


@cli.command("push", short_help="Upload a file or folder to a Hub repo, with a model card.")
@click.argument("src", type=click.Path())
@click.argument("repo_id", metavar="OWNER/NAME")
@click.option("--private", is_flag=True,
              help="Create OWNER/NAME as a private repo when it does not exist yet.")
@_options(*PUSH_OPTIONS[2:], *HUB_OPTIONS)
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@handle_errors
def push_cmd(src: str, repo_id: str, private: bool, revision: str | None,
             commit_message: str | None, token: str | None, endpoint: str | None,
             as_json: bool) -> None:
    """Upload the file or folder SRC to the Hub repo OWNER/NAME in one commit (with a README
    model card unless SRC has one)."""
    import huggingface_hub  # noqa: F401  (which hub.push imports when it starts)

    from . import _ui
    from .hub import push

    ready()
    report = push(src, repo_id, private=private, revision=revision,
                  commit_message=commit_message, token=token, endpoint=endpoint)
    _ui.print_json(report) if as_json else _echo_pushed({"pushed": report})


@cli.command("batch", short_help="Run a file of merge/convert/validate/... jobs, resumably.")
@click.argument("jobs_file", metavar="JOBS", type=click.Path())
@click.option("--executor", type=click.Choice(["local", "ray"]), default="local",
              show_default=True, help="local: parallel processes on this machine; ray: one Ray "
              "task per job (inputs and outputs on storage every node sees; adaptertools[ray]).")
@click.option("--address", metavar="ADDR", help="With --executor ray: the cluster to join.")
@click.option("--dry-run", is_flag=True, help="Print the expanded plan; run nothing.")
@click.option("--force", is_flag=True, help="Redo every job and overwrite existing outputs.")
@click.option("--manifest", type=click.Path(),
              help="Resume records (default: JOBS.yaml.manifest.json, beside the file).")
@click.option("--workers", type=click.IntRange(min=1), help="local: at most this many jobs at "
              "once (default: the cores).")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@handle_errors
def batch_cmd(jobs_file: str, executor: str, address: str | None, dry_run: bool, force: bool,
              manifest: str | None, workers: int | None, as_json: bool) -> None:
    """Run the jobs in JOBS (YAML or JSON; see `adaptertools.batch.schema`). Exit 1 if a job
    failed, 2 for a bad jobs file (every problem listed, one line each)."""
    from . import _ui
    from .batch import JobsFileError, run_batch

    ready()
    try:
        with _ui.batch_progress() as progress:
            report = run_batch(jobs_file, executor=executor, address=address, dry_run=dry_run,
                               force=force, manifest=manifest, workers=workers,
                               progress=progress)
    except JobsFileError as exc:
        for problem in exc.problems:
            _ui.error(f"{exc.path}: {problem}")
        sys.exit(2)
    _ui.print_json(report.to_dict()) if as_json else _ui.batch_table(report)
    sys.exit(1 if report.failed else 0)


@cli.command("demo", short_help="Run every command on a tiny model built in code.")
@click.option("--workdir", type=click.Path(), help="Keep the demo files here (default: a temp dir).")
@handle_errors
def demo_cmd(workdir: str | None) -> None:
    """Build a tiny Llama-style base and adapter in code and run every command on them."""
    from .demo import run_demo

    ready()
    ok = run_demo(workdir)
    sys.exit(0 if ok else 1)


def _exit(code: int) -> None:
    """Exit with ``code`` without tearing the interpreter down when torch is loaded: Python's
    finalization then takes 0.5-0.7 s (a W1 merge: 4.5 s with it, 3.9 s without). By now every
    output is fsynced and renamed; what remains is the atexit handlers and the streams."""
    if "torch" not in sys.modules:
        sys.exit(code)
    import atexit

    atexit._run_exitfuncs()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):   # a closed pipe: nothing more can be said there
            pass
    os._exit(code)


def main() -> None:
    STARTUP.defer()      # first: Ctrl-C while torch is imported is remembered (StartupSignals)
    try:
        _main()
    except SystemExit as exc:
        if exc.code is None or isinstance(exc.code, int):
            _exit(exc.code or 0)
        raise
    except (KeyboardInterrupt, Terminated) as exc:   # while an error line was being written
        signum = signal.SIGINT if isinstance(exc, KeyboardInterrupt) else signal.SIGTERM
        os.write(2, f"error: {INTERRUPTED[signum]}\n".encode())
        _exit(EXIT_CODES[signum])


def _main(args: list[str] | None = None) -> None:
    """The command line ``args`` (default: sys.argv[1:]), every outcome turned into an exit code
    (SystemExit) and at most one ``error:`` line, whatever escapes a command's handle_errors
    (click's parsing, ``--help``, the group) included."""
    # standalone_mode=False hands us click's usage errors, so that misuse gets the same one
    # "error:" line on stderr as a failed operation (with exit code 2) instead of a usage block.
    try:
        try:
            code = cli.main(args, standalone_mode=False)
        finally:
            ready()      # e.g. a Ctrl-C during `--help`, or before click's usage error
    except NO_ARGS_IS_HELP as exc:
        exc.show()  # a bare `adaptertools`: the help text is the useful answer
        sys.exit(exc.exit_code)
    except click.ClickException as exc:
        fail(exc.format_message() + usage_hint(getattr(exc, "ctx", None)), exc.exit_code)
    except (click.Abort, KeyboardInterrupt) as exc:   # Ctrl-C outside handle_errors, e.g. parsing
        fail("interrupted (Ctrl-C)", 130, exc)
    except Terminated as exc:
        fail("terminated (SIGTERM)", 143, exc)
    except Exception as exc:  # noqa: BLE001  (the last boundary: nothing escapes)
        fail(internal_error(exc, _command_name(args)), 1, exc)
    sys.exit(code if isinstance(code, int) else 0)


def _command_name(args: list[str] | None) -> str | None:
    """The subcommand named in ``args`` (default sys.argv[1:]), if any."""
    words = sys.argv[1:] if args is None else args
    return next((w for w in words if w in cli.commands), None)


if __name__ == "__main__":
    main()
