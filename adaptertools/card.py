"""README model cards for pushed outputs: YAML front matter and a provenance section.

Built from the report ``convert`` or ``merge`` returns (inputs with their resolved Hub commits,
weights, mode, dtype, validation), or, for a plain folder, from the files it holds. Local input
paths are shown by their last component only, so a public card does not reveal home folders.
"""

from __future__ import annotations

import json
import re
from pathlib import PurePath

from . import __version__
from ._io import human_size

_HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[A-Za-z0-9][\w.-]*")


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
    if isinstance(base, str) and _HUB_ID.fullmatch(base):   # the Hub checks it names a repo
        meta["base_model"] = base
    meta.update(library_name=library, tags=tags)
    return meta


def _yaml(meta: dict) -> str:
    """Flat YAML: JSON-quoted scalars (valid YAML), lists as block sequences."""
    lines = ["---"]
    for key, value in meta.items():
        if isinstance(value, list):
            lines.append(f"{key}:")
            lines.extend(f"- {json.dumps(item)}" for item in value)
        else:
            lines.append(f"{key}: {json.dumps(value)}")
    return "\n".join(lines + ["---"]) + "\n"


def _md(text) -> str:
    """A table cell: no pipes or newlines."""
    return str(text).replace("|", "\\|").replace("\n", " ")


def _source(uri: str, hub: dict | None) -> tuple[str, str, str]:
    """(input, revision, commit) cells for one input."""
    if hub is None:
        return f"local `{_md(PurePath(uri).name)}`", "-", "-"
    return f"`{_md(hub['uri'])}`", f"`{_md(hub['revision'])}`", f"`{hub['commit']}`"


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
    return f"requantized to {dtype}"


def _validation(report: dict) -> list[str]:
    validation = report.get("validation")
    if not isinstance(validation, dict):
        return []
    verdict = {True: "passed", False: "FAILED"}.get(validation.get("passed"), "run")
    # scalars only, and no local paths (e.g. where validation.json was written)
    details = ", ".join(f"{k} {v}" for k, v in validation.items()
                        if k not in ("passed", "report", "path")
                        and isinstance(v, (int, float, str, bool)) and "/" not in str(v))
    return [f"- Validation: {verdict}" + (f" ({_md(details)})" if details else "")]


def _provenance(report: dict) -> list[str]:
    operation = _operation(report)
    made = f"Made with adaptertools {__version__} (`adaptertools {operation}`)."
    lines = ["## Provenance", "", made, ""] + _inputs_table(report) + [""]
    if operation == "merge":
        lines.append(f"- Mode: `{report['mode']}`; weights: "
                     f"{', '.join(format(w, 'g') for w in report['weights'])}")
        lines.append(f"- Output: {report['format']}, {report['tensors']} tensors, "
                     f"{len(report.get('changed', []))} changed, "
                     f"{human_size(report.get('output_bytes', 0))}")
    else:
        lines.append(f"- Conversion: `{report['from']}` -> `{report['to']}`; "
                     f"{report.get('adapted_tensors', 0)} adapted tensors, "
                     f"{report.get('replaced_tensors', 0)} replaced")
    lines.append(f"- Requantization: {_requantization(report)}")
    return lines + _validation(report)


def model_card(report: dict | None, *, repo_id: str, files: list[str]) -> str:
    """The README.md of a pushed output."""
    what = {"merge": "A model with LoRA adapters merged into its weights",
            "convert": "A LoRA adapter converted"}.get(_operation(report), "LoRA files")
    body = [f"# {repo_id.split('/')[-1]}", "", f"{what} by adaptertools {__version__}.", ""]
    if report is not None and _operation(report) != "folder":
        body += _provenance(report) + [""]
    body += ["## Files", ""] + [f"- `{_md(f)}`" for f in sorted(files)]
    return _yaml(front_matter(report, files)) + "\n" + "\n".join(body) + "\n"


def default_commit_message(report: dict | None, src) -> str:
    operation = _operation(report)
    if operation == "merge":
        return (f"adaptertools merge: {len(report['adapters'])} adapter(s) into "
                f"{PurePath(report['base']).name}")
    if operation == "convert":
        return f"adaptertools convert: {report['from']} -> {report['to']}"
    return f"Upload {PurePath(str(src)).name} with adaptertools"
