"""README model cards for pushed outputs: YAML front matter and a provenance section.

Built from the report ``convert`` or ``merge`` returns (inputs with their resolved Hub commits,
weights, mode, dtype, validation), or, for a plain folder, from the files it holds. Local input
paths are shown by their last component only, so a public card does not reveal home folders.
Everything that comes from the user (names, paths, URIs, figures) is escaped for where it goes:
a code span is fenced by more backticks than it holds, a table cell has its pipes escaped, plain
text has Markdown and HTML punctuation backslash-escaped, and YAML values are double-quoted with
every non-ASCII character escaped. Figures are rounded (3 significant digits; seconds under one
as ms).
"""

from __future__ import annotations

import json
import math
import re
from pathlib import PurePath

from . import __version__
from ._io import human_size
from .hub_files import name_problem, redact

# control characters and line breaks (a newline would end a table row or a list item)
_BREAKS = re.compile(r"[\x00-\x1f\x7f-\x9f\u2028\u2029]")
# ASCII punctuation that Markdown, GFM or HTML may read (CommonMark lets any of it be
# backslash-escaped); '_' only where it could open or close emphasis (not inside a word)
_MARKUP = re.compile(r"[\\`*{}\[\]()<>#+!|~&$]|(?<![A-Za-z0-9])_|_(?![A-Za-z0-9])")
# a UTF-16 surrogate pair as json.dumps writes it: YAML wants \UXXXXXXXX instead
_SURROGATES = re.compile(r"\\u(d[89ab][0-9a-f]{2})\\u(d[c-f][0-9a-f]{2})")


def _operation(report: dict | None) -> str:
    if report is None:
        return "folder"
    if "mode" in report and "adapters" in report:
        return "merge"
    if "to" in report and "from" in report:
        return "convert"
    return "folder"


def _library_and_tags(report: dict | None, files: list[str]) -> tuple[str, list[str]]:
    """``library_name`` and tags: a merged HF folder loads with transformers, a PEFT adapter
    with peft, anything else (GGUF, raw safetensors adapters) is adaptertools' own."""
    operation = _operation(report)
    gguf = any(f.endswith(".gguf") for f in files)
    tags = ["adaptertools", "lora"]
    if operation == "merge":
        tags.append("merge")
        library = "adaptertools" if gguf else "transformers"
    elif "adapter_config.json" in files:
        library = "peft"
        tags.append("peft")
    elif "config.json" in files and any(f.endswith(".safetensors") for f in files):
        library = "transformers"
    else:
        library = "adaptertools"
    if gguf:
        tags.append("gguf")
    return library, tags


def front_matter(report: dict | None, files: list[str]) -> dict:
    library, tags = _library_and_tags(report, files)
    meta = {}
    base = (report or {}).get("base_model")
    if _is_repo_id(base):                # the Hub checks that it names a repo
        meta["base_model"] = base
    meta.update(library_name=library, tags=tags)
    return meta


def _is_repo_id(text) -> bool:
    parts = text.split("/") if isinstance(text, str) else []
    return len(parts) == 2 and not any(name_problem(p) for p in parts)


def _quoted(value) -> str:
    """A YAML double-quoted scalar: JSON's escapes (all valid YAML), ASCII only, so no quote,
    line break, control or format character stays raw; characters beyond the BMP as \\U."""
    text = json.dumps(value, ensure_ascii=True)
    return _SURROGATES.sub(lambda m: "\\U%08x" % (0x10000 + ((int(m[1], 16) - 0xD800) << 10)
                                                    + int(m[2], 16) - 0xDC00), text)


def _yaml(meta: dict) -> str:
    """Flat YAML: double-quoted scalars, lists as block sequences (keys are ours)."""
    lines = ["---"]
    for key, value in meta.items():
        if isinstance(value, list):
            lines.append(f"{key}:")
            lines.extend(f"- {_quoted(item)}" for item in value)
        else:
            lines.append(f"{key}: {_quoted(value)}")
    return "\n".join(lines + ["---"]) + "\n"


def _one_line(value) -> str:
    return _BREAKS.sub(" ", redact(str(value)))


def _text(value) -> str:
    """Plain Markdown text showing ``value`` literally, on one line: Markdown and HTML
    punctuation backslash-escaped (``\\|`` is also GFM's pipe inside a table cell)."""
    return _MARKUP.sub(lambda m: "\\" + m.group(), _one_line(value))


def _code(value, *, cell: bool = False) -> str:
    """A Markdown code span showing ``value`` literally, on one line: fenced by one backtick
    more than its longest run of them, padded with a space that CommonMark strips again when it
    starts or ends with a backtick (or with spaces at both ends). In a table ``cell`` its pipes
    are escaped: GFM splits cells before it reads code spans, and unescapes ``\\|`` in them."""
    text = _one_line(value) or " "
    fence = "`" * (max(map(len, re.findall("`+", text)), default=0) + 1)
    pad = " " if text.strip(" ") and (text[0] == "`" or text[-1] == "`"
                                      or text[0] == text[-1] == " ") else ""
    if cell:
        text = text.replace("|", "\\|")
    return f"{fence}{pad}{text}{pad}{fence}"


def _source(uri: str, hub: dict | None) -> tuple[str, str, str]:
    """(input, revision, commit) cells for one input."""
    if hub is None:
        return f"local {_code(PurePath(uri).name, cell=True)}", "-", "-"
    return tuple(_code(hub[k], cell=True) for k in ("uri", "revision", "commit"))


def _inputs_table(report: dict) -> list[str]:
    hub = {h["uri"]: h for h in report.get("hub_inputs", [])}
    by_role = {h["role"]: h for h in report.get("hub_inputs", [])}
    rows = []
    if _operation(report) == "merge":
        rows.append(("base", report["base"], hub.get(report["base"])))
        for name, weight in zip(report["adapters"], report["weights"]):
            rows.append((f"adapter (weight {weight:g})", name, hub.get(name)))
    else:
        rows.append(("adapter", report["src"], hub.get(report["src"])))
        if "base" in by_role:
            rows.append(("base (names)", by_role["base"]["uri"], by_role["base"]))
    lines = ["| role | input | revision | commit |", "| --- | --- | --- | --- |"]
    for role, uri, source in rows:
        lines.append("| {} | {} | {} | {} |".format(role, *_source(uri, source)))
    return lines


def _requantization(report: dict) -> str:
    dtype = report.get("dtype", "keep")
    if dtype == "keep":
        return "none (stored dtypes kept)"
    if dtype in ("fp32", "fp16", "bf16"):
        return f"cast to {dtype}"
    return f"requantized to {_text(dtype)}"


def _validation(report: dict) -> list[str]:
    validation = report.get("validation")
    if not isinstance(validation, dict):
        return []
    verdict = {True: "passed", False: "FAILED"}.get(validation.get("passed"), "run")
    # scalars only, and no local paths (e.g. where validation.json was written)
    details = ", ".join(f"{k} {_figure(k, v)}" for k, v in validation.items()
                        if k not in ("passed", "report", "path")
                        and isinstance(v, (int, float, str, bool)) and "/" not in str(v))
    return [f"- Validation: {verdict}" + (f" ({_text(details)})" if details else "")]


def _figure(key: str, value) -> str:
    """A report value as the card shows it: floats to 3 significant digits (whole numbers from
    1000 up), seconds (keys ending ``_s``) as ``human_seconds`` writes them."""
    if not isinstance(value, float) or not math.isfinite(value):
        return str(value)
    return human_seconds(value) if key.endswith("_s") else _round3(value)


def _round3(value: float) -> str:
    return f"{value:.3g}" if abs(value) < 1000 else f"{value:.0f}"


def human_seconds(seconds: float) -> str:
    """``0.004389`` -> ``"4.39 ms"``, ``61.44`` -> ``"61.4 s"``: 3 significant digits (whole
    seconds from 1000 up), ms under one second. The CLI writes durations the same way."""
    if not math.isfinite(seconds):
        return f"{seconds} s"
    return f"{_round3(seconds * 1e3)} ms" if abs(seconds) < 1 else f"{_round3(seconds)} s"


def _provenance(report: dict) -> list[str]:
    operation = _operation(report)
    made = f"Made with adaptertools {__version__} (`adaptertools {operation}`)."
    lines = ["## Provenance", "", made, ""] + _inputs_table(report) + [""]
    if operation == "merge":
        lines.append(f"- Mode: {_code(report['mode'])}; weights: "
                     f"{', '.join(format(w, 'g') for w in report['weights'])}")
        lines.append(f"- Output: {_text(report['format'])}, {report['tensors']} tensors, "
                     f"{len(report.get('changed', []))} changed, "
                     f"{human_size(report.get('output_bytes', 0))}")
    else:
        lines.append(f"- Conversion: {_code(report['from'])} -> {_code(report['to'])}; "
                     f"{report.get('adapted_tensors', 0)} adapted tensors, "
                     f"{report.get('replaced_tensors', 0)} replaced")
    lines.append(f"- Requantization: {_requantization(report)}")
    return lines + _validation(report)


def model_card(report: dict | None, *, repo_id: str, files: list[str]) -> str:
    """The README.md of a pushed output."""
    what = {"merge": "A model with LoRA adapters merged into its weights",
            "convert": "A LoRA adapter converted"}.get(_operation(report), "LoRA files")
    body = [f"# {_text(repo_id.split('/')[-1])}", "", f"{what} by adaptertools {__version__}.",
            ""]
    if report is not None and _operation(report) != "folder":
        body += _provenance(report) + [""]
    body += ["## Files", ""] + [f"- {_code(f)}" for f in sorted(files)]
    return _yaml(front_matter(report, files)) + "\n" + "\n".join(body) + "\n"


def default_commit_message(report: dict | None, src) -> str:
    operation = _operation(report)
    if operation == "merge":
        return (f"adaptertools merge: {len(report['adapters'])} adapter(s) into "
                f"{_one_line(PurePath(report['base']).name)}")
    if operation == "convert":
        return f"adaptertools convert: {_one_line(report['from'])} -> {_one_line(report['to'])}"
    return f"Upload {_one_line(PurePath(str(src)).name)} with adaptertools"
