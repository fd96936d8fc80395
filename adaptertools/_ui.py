"""Rendering for the CLI: the only module that imports rich. Data to stdout, messages to stderr."""

from __future__ import annotations

import re
import sys

from rich.console import Console
from rich.measure import Measurement
from rich.table import Table
from rich.text import Text

from ._io import human_size, json_text
from .card import human_seconds
from .hub_files import redact

out = Console(highlight=False, soft_wrap=True)
err = Console(stderr=True, highlight=False, soft_wrap=True)


def print_json(data) -> None:
    """``data`` on stdout as strict JSON (non-finite floats as null, listed under
    ``"nonfinite"``: see ``_io.json_text``), any URL's user info (a token) written ``***@``."""
    sys.stdout.write(json_text(_redacted(data), default=str))


def _redacted(value):
    if isinstance(value, str):
        return redact(value)
    if isinstance(value, dict):
        return {key: _redacted(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_redacted(item) for item in value]
    return value


# ANSI sequences and other control characters: third-party messages quoted in ours carry them
# (torch's weights_only error embeds bold escapes), and a newline would break the one-line contract.
_ANSI = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")
_CONTROL = re.compile(r"[\x00-\x1f\x7f]+")


def plain(message: str) -> Text:
    """``message`` as literal text: paths and tensor names may hold ``[x]`` or ``:name:``, which
    rich would otherwise read as markup or emoji and silently drop or raise on. A URL's user
    info (``http://user:TOKEN@host``) is written ``***@``."""
    return Text(_CONTROL.sub(" ", _ANSI.sub("", redact(str(message)))).strip())


def _labelled(label: str, style: str, message: str) -> Text:
    return Text.assemble((label, style), " ", plain(message))


def error(message: str) -> None:
    err.print(_labelled("error:", "bold red", message))


def warning(message: str) -> None:
    err.print(_labelled("warning:", "bold yellow", message))


def info(message: str) -> None:
    err.print(plain(message))


def formats_table(rows: list[dict]) -> None:
    """One row per format; a plugin that failed to load (``available`` false, or a description
    ``unavailable: REASON``) is shown in red with its reason. Cells are literal text: a plugin's
    name or error may hold ``[x]``."""
    table = Table(title="adapter formats")
    for column in ("name", "read", "write", "package", "description"):
        table.add_column(column)
    for row in rows:
        description = row["description"]
        broken = row.get("available") is False or description.startswith("unavailable: ")
        if row.get("error") and not description.startswith("unavailable: "):
            description = f"unavailable: {row['error']}"
        table.add_row(plain(row["name"]), _yes(row["read"]), _yes(row["write"]),
                      plain(row["package"]), plain(description), style="red" if broken else None)
    out.print(table)


def print_table(table: Table) -> None:
    """``table`` on stdout. On a terminal it fits the window (long cells fold onto more lines);
    piped or redirected it is printed at its natural width, whatever COLUMNS says, so that each
    row stays one line and no tensor name is cut or split (``grep``-able, diff-able)."""
    if out.is_terminal:
        out.print(table)
        return
    wide = Console(highlight=False, soft_wrap=True, width=100_000)
    width = Measurement.get(wide, wide.options, table).maximum
    Console(highlight=False, soft_wrap=True, width=max(width, out.width)).print(table)


def _yes(flag: bool) -> str:
    return "yes" if flag else "-"


def _num(value: float | None, spec: str) -> str:
    return "n/a" if value is None else format(value, spec)


def _fmt_counts(counts: dict) -> str:
    return ", ".join(f"{k} (x{n})" for k, n in counts.items()) or "-"


def inspect_report(report: dict) -> None:
    table = Table(show_header=False, title=plain(report["path"]))
    table.add_column(style="bold")
    table.add_column()
    rows = [
        ("format", report["format"]),
        ("base model", report["base_model"] or "-"),
        ("size on disk", human_size(report["size_bytes"])),
        ("adapted tensors", str(report["adapted_tensors"])),
        ("replaced tensors", ", ".join(report["replaced_tensors"]) or "-"),
        *([("trained token rows", "; ".join(f"{n}: {len(ids)} token(s)" for n, ids in
                                            report["trained_token_rows"].items()))]
          if report.get("trained_token_rows") else []),
        ("parameters", f"{report['parameters']:,}"),
        ("dtypes", ", ".join(report["dtypes"])),
        ("ranks", _fmt_counts(report["ranks"])),
        ("effective scales", _fmt_counts({f"{float(k):.6g}": n
                                          for k, n in report["scales"].items()})),
        ("rsLoRA", _yes(report["rslora"])),
        ("target modules", ", ".join(report["target_modules"]) or "-"),
        ("kinds", _fmt_counts(report.get("kinds") or {})),
        ("layer kinds", _fmt_counts(report["layer_kinds"])),
        ("DoRA", _yes(report["dora"])),
        ("lora_bias", _yes(report["lora_bias"])),
        ("total delta norm", _num(report["total_delta_norm"], ".6g")),
    ]
    for key, value in rows:
        table.add_row(key, value)
    out.print(table)
    if "layers" in report:
        layers = Table(title="per tensor (delta = scale * B @ A, from the factors)")
        layers.add_column("tensor", overflow="fold")
        for column in ("kind", "shape", "rank", "scale", "||delta||_F", "eff. rank", "dtype",
                       "flags"):
            layers.add_column(column, justify="right" if column in ("rank", "scale") else "left")
        for row in report["layers"]:
            layers.add_row(row["name"], row["layer"], "x".join(map(str, row["shape"])),
                           str(row["rank"]), f"{row['scale']:.6g}", _num(row["delta_norm"], ".4g"),
                           _num(row["effective_rank"], ".2f"), row["dtype"],
                           ", ".join(row["flags"]) or "")
        print_table(layers)
    storage = report.get("storage")
    if storage:
        out.print(plain("storage: " + ", ".join(f"{k}={v}" for k, v in storage.items()
                                                if k != "notes")))
        for note in storage.get("notes", []):
            info(note)
    for problem in report["problems"]:
        warning(problem)


def convert_result(result: dict) -> None:
    for note in result.get("notes", []):
        info(note)
    full = f", {result['replaced_tensors']} full tensors" if result["replaced_tensors"] else ""
    dropped = result.get("dropped_tensors")
    if dropped:
        full += (f"; {dropped} full tensor(s) dropped: unchanged copies of the base (PEFT saves "
                 f"them beside an adapted embedding), which {result['to']} does not need")
    out.print(plain(f"wrote {result['dst']} ({result['to']}) from {result['src']} "
                    f"({result['from']}): {result['adapted_tensors']} LoRA tensors{full}"))


class progress_bar:
    """A byte progress bar on stderr, shown only when stderr is a terminal. ``start(total)``
    once the total is known, then call it with the bytes just written."""

    def __init__(self, label: str, *, show: bool = True) -> None:
        from rich.progress import (BarColumn, DownloadColumn, Progress, TimeRemainingColumn,
                                   TransferSpeedColumn)

        self.label = label
        self.progress = Progress("[progress.description]{task.description}", BarColumn(),
                                 DownloadColumn(), TransferSpeedColumn(), TimeRemainingColumn(),
                                 console=err, transient=True,
                                 disable=not (show and err.is_terminal))
        self.task = None

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.progress.stop()

    def start(self, total: int) -> None:
        self.task = self.progress.add_task(self.label, total=total)
        self.progress.start()

    def __call__(self, nbytes: int) -> None:
        if self.task is not None:
            self.progress.advance(self.task, nbytes)


def short_names(paths) -> list[str]:
    """Adapter paths as given, each shortened to its last component when those are all
    different (``runs/a/adapter``, ``runs/b/adapter`` stay whole)."""
    full = [str(p) for p in paths]
    last = [p.rstrip("/\\").replace("\\", "/").rsplit("/", 1)[-1] for p in full]
    return last if all(last) and len(set(last)) == len(last) else full


def _change(row: dict) -> str:
    return "replaced" if row["replaced"] else ("added" if row.get("added") else "folded")


def _pattern(name: str) -> str:
    """A tensor name with its indices as ``*``: the rows of one kind, layer after layer."""
    return ".".join("*" if part.isdigit() else part for part in name.split("."))


def merge_report(report: dict, *, dry_run: bool, verbose: bool = False,
                 quiet: bool = False) -> None:
    """The plan or merge: by default one row per kind of changed tensor (indices as ``*``),
    the worst survival and validation rows; ``verbose``: every tensor, every row; ``quiet``:
    only the warnings (errors are the caller's)."""
    if not quiet:
        names = short_names(report["adapters"])
        (changed_table if verbose else changed_summary)(report, names, dry_run=dry_run)
        adapters = ", ".join(f"{n} (x{w:g})" for n, w in zip(names, report["weights"]))
        summary = (f"{len(report['changed'])} of {report['tensors']} tensors change; mode "
                   f"{report['mode']}; adapters {adapters}; output "
                   f"{human_size(report['output_bytes'])} ({report['format']})")
        if not dry_run:
            summary += f"; {human_seconds(report['wall_s'])} on {report['device']}"
        out.print(plain(summary))
        if report.get("survival"):
            survival_table(report["survival"], rows=None if verbose else SURVIVAL_ROWS)
    for message in report["warnings"]:
        warning(message)


def _merge_title(report: dict, dry_run: bool, extra: str = "") -> Text:
    return plain(f"{'plan' if dry_run else 'merged'}: {report['out'] or '(dry run)'}{extra}")


def changed_table(report: dict, names: list[str], *, dry_run: bool) -> None:
    """``merge --verbose``: one row per changed tensor."""
    table = Table(title=_merge_title(report, dry_run))
    table.add_column("tensor", overflow="fold")     # a name is folded, never cut with "…"
    for column in ("shape", "dtype", "adapters", "change"):
        table.add_column(column)
    for row in report["changed"]:
        table.add_row(plain(row["name"]), "x".join(map(str, row["shape"])), row["dtype"],
                      plain(", ".join(names[i] for i in row["adapters"]) or "-"), _change(row))
    print_table(table)


def changed_summary(report: dict, names: list[str], *, dry_run: bool) -> None:
    """One row per kind of changed tensor: same name but for the indices, dtype, adapters and
    change; in the order they first come."""
    groups: dict[tuple, int] = {}
    for row in report["changed"]:
        key = (_pattern(row["name"]), row["dtype"], tuple(row["adapters"]), _change(row))
        groups[key] = groups.get(key, 0) + 1
    if not groups:
        return
    hint = "; --verbose lists every tensor" if len(groups) < len(report["changed"]) else ""
    table = Table(title=_merge_title(report, dry_run, hint))
    table.add_column("tensors", overflow="fold")
    table.add_column("count", justify="right")
    for column in ("dtype", "adapters", "change"):
        table.add_column(column)
    for (pattern, dtype, adapters, change), count in groups.items():
        table.add_row(plain(pattern), str(count), dtype,
                      plain(", ".join(names[i] for i in adapters) or "-"), change)
    print_table(table)


SURVIVAL_ROWS = 5      # the worst rows a summary shows (survival, validation failures)


def survival_table(survival: dict, rows: int | None = SURVIVAL_ROWS) -> None:
    """How much of the adapter each requantized tensor kept, worst first (``rows`` of them,
    None: all)."""
    shown = survival["rows"] if rows is None else survival["rows"][:rows]
    worst = "" if len(shown) == len(survival["rows"]) else f" (worst {len(shown)})"
    table = Table(title=plain(f"adapter survival in quantized tensors{worst}"))
    for column in ("tensor", "type", "cosine", "relative error"):
        table.add_column(column, overflow="fold")
    for row in shown:
        table.add_row(plain(row["name"]), row["type"], f"{row['cosine']:.3f}",
                      f"{row['rel_error']:.3f}")
    print_table(table)
    out.print(plain(f"survival over {survival['tensors']} tensors: median cosine "
                    f"{survival['median_cosine']:.3f} (min {survival['min_cosine']:.3f}), median "
                    f"relative error {survival['median_rel_error']:.3f}; scores in "
                    f"{survival.get('report', 'the report')}"))


def failures_table(validation: dict, rows: int | None = SURVIVAL_ROWS) -> None:
    """``merge --validate``: the tensors that failed (``rows`` of them, None: all)."""
    failures = validation.get("failures") or []
    if not failures:
        return
    shown = failures if rows is None else failures[:rows]
    more = "" if len(shown) == len(failures) else f" (worst {len(shown)} of {len(failures)})"
    table = Table(title=plain(f"validation failures{more}"))
    for column in ("tensor", "problem"):
        table.add_column(column, overflow="fold")
    for row in shown:
        table.add_row(plain(row["name"]), plain(row["problem"]))
    print_table(table)


def validation_table(report: dict) -> None:
    table = Table(title=plain(f"{report['adapter']} vs {report['against']}"))
    for column in ("tensor", "relative error", "tolerance", "result"):
        table.add_column(column, overflow="fold")
    for row in report["tensors"]:
        table.add_row(plain(row["name"]), _num(row["relative_error"], ".3g"),
                      _num(row["tolerance"], ".3g"),
                      "pass" if row["passed"] else f"FAIL: {row['problem']}")
    print_table(table)
    verdict = "all tensors give the same delta" if report["passed"] else \
        f"{report['failed']} of {len(report['tensors'])} tensors differ"
    (info if report["passed"] else error)(verdict)


def _db(value) -> str:
    return "exact" if value is None else f"{value:.2f}"


def merged_validation_table(report: dict) -> None:
    """``validate BASE ADAPTER... --merged M``: adapted tensors and any failure, worst first;
    untouched tensors that are byte-identical are only counted."""
    table = Table(title=plain(f"{report['merged']}: per tensor, SQNR vs its dtype's floor (dB)"))
    table.add_column("tensor", overflow="fold")
    for column in ("kind", "dtype", "SQNR", "floor", "margin", "result"):
        table.add_column(column, justify="right" if column in ("SQNR", "floor", "margin") else
                         "left", overflow="fold")
    for row in report["tensors"]:
        if row["kind"] == "untouched" and row["passed"]:
            continue
        table.add_row(plain(row["name"]), row["kind"], row.get("dtype", ""),
                      _db(row.get("sqnr_db")) if "sqnr_db" in row else "",
                      _db(row.get("floor_db")) if "floor_db" in row else "",
                      f"{row['margin_db']:+.2f}" if row.get("margin_db") is not None else "",
                      "pass" if row["passed"] else plain(f"FAIL: {row['problem']}"))
    print_table(table)
    if "e2e" in report:
        e2e_table(report["e2e"])
    validation_summary(report)


def e2e_table(e2e: dict) -> None:
    table = Table(title=plain(f"end to end ({e2e['runtime']}): merged vs unmerged logits on "
                              f"{e2e['tokens']} fixed token ids"))
    for column in ("metric", "value", "threshold", "result"):
        table.add_column(column)
    for name, metric in e2e["metrics"].items():
        table.add_row(name, f"{metric['value']:.4g}", f"{metric['threshold']:.4g}",
                      "pass" if metric["passed"] else "FAIL")
    print_table(table)


def merge_validation(validation: dict, *, verbose: bool = False, quiet: bool = False) -> None:
    """``merge --validate``: the worst failures (``verbose``: all), then the verdict (``quiet``:
    only a failed one)."""
    if not quiet:
        failures_table(validation, rows=None if verbose else SURVIVAL_ROWS)
    if not (quiet and validation["passed"]):
        validation_summary(validation)


def validation_summary(report: dict) -> None:
    """One line: the verdict, counts and the worst margin (also after ``merge --validate``)."""
    worst = report.get("worst_margin_db")
    e2e = report.get("e2e")
    end_to_end = "" if not e2e else \
        f"; end-to-end: {'passed' if e2e['passed'] else 'FAILED'}"
    if report["passed"]:
        info(f"validation passed: {report['adapted']} adapted tensors within "
             f"{report['tolerance_db']:g} dB of their floor (worst margin "
             f"{_db(worst) if worst is not None else 'n/a'} dB), {report['untouched']} "
             f"untouched tensors byte-identical{end_to_end}; {human_seconds(report['wall_s'])}")
        return
    failed = ("all passed" if not report["failed"] else
              f"{report['failed']} failed")
    error(f"validation FAILED: {report['checked']} tensors checked, {failed}{end_to_end}; see "
          "the table" + (f" and {report['report']}" if report.get("report") else ""))


def algebra_report(report: dict) -> None:
    """combine / extract: per tensor and in total, the delta energy kept and the relative error."""
    table = Table(title=plain(f"{report['command']}: {report['out']} ({report['format']})"))
    table.add_column("tensor", overflow="fold")
    for column in ("shape", "rank", "energy kept", "rel. error", "note"):
        table.add_column(column, justify="left" if column == "note" else "right")
    for row in report["tensors"]:
        rank = "full" if row["rank"] is None else str(row["rank"])
        table.add_row(plain(row["name"]), "x".join(map(str, row["shape"])), rank,
                      f"{row['energy_kept']:.6f}", f"{row['relative_error']:.3g}", row["note"])
    print_table(table)
    total = report["total"]
    out.print(plain(f"total: {total['energy_kept']:.6f} of the delta energy kept, relative error "
                    f"{total['relative_error']:.3g} over {len(report['tensors'])} tensors; "
                    f"{human_seconds(report['wall_s'])}"))
    for message in report["warnings"]:
        warning(message)


def shards_table(report: dict) -> None:
    """``merge --max-shard-size``: the new weight files, their tensors and sizes."""
    shards = report["shards"]
    table = Table(title=plain(f"{len(shards)} shard(s) of at most "
                              f"{human_size(report['max_shard_size'])}"))
    table.add_column("file", overflow="fold")
    for column in ("tensors", "size"):
        table.add_column(column, justify="right")
    for shard in shards:
        table.add_row(plain(shard["file"]), str(shard["tensors"]), human_size(shard["bytes"]))
    print_table(table)


def batch_table(report: dict) -> None:
    """``batch``: one row per job (status, wall, peak memory, error), then the counts."""
    table = Table(title=plain(f"{report['jobs_file']} ({report['executor']}"
                              f"{', dry run' if report['dry_run'] else ''})"))
    for column in ("#", "job", "kind", "target", "status", "wall", "peak mem", "error"):
        table.add_column(column, overflow="fold")
    for row in report["jobs"]:
        status = row["status"] + (" (up to date)" if row.get("up_to_date") else "")
        table.add_row(str(row["index"]), plain(row["name"] or row["source"]), row["kind"],
                      plain(row["key"].split(" ", 1)[1]), status,
                      human_seconds(row["wall_s"]) if row["wall_s"] is not None else "-",
                      human_size(row["peak_rss_bytes"]) if row["peak_rss_bytes"] else "-",
                      plain(row["error"] or ""),
                      style="red" if row["status"] in ("failed", "skipped") else None)
    print_table(table)
    counts = ", ".join(f"{n} {s}" for s, n in report["counts"].items())
    (error if report["failed"] else info)(f"{len(report['jobs'])} jobs: {counts}; "
                                          f"{human_seconds(report['wall_s'])}")


class batch_progress:
    """One line per running job on stderr, shown only when stderr is a terminal."""

    def __init__(self) -> None:
        from rich.progress import Progress, SpinnerColumn, TimeElapsedColumn

        self.progress = Progress(SpinnerColumn(), "{task.description}", TimeElapsedColumn(),
                                 console=err, transient=True, disable=not err.is_terminal)
        self.tasks: dict[int, object] = {}

    def __enter__(self):
        self.progress.start()
        return self

    def __exit__(self, *exc) -> None:
        self.progress.stop()

    def started(self, row: dict) -> None:
        self.tasks[row["index"]] = self.progress.add_task(
            plain(f"{row['kind']} {row['key'].split(' ', 1)[1]}").plain, total=None)

    def finished(self, row: dict) -> None:
        task = self.tasks.pop(row["index"], None)
        if task is not None:
            self.progress.remove_task(task)
