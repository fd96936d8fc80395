"""``--max-shard-size``: the merge's output regrouped into new shards, as ``save_pretrained``
writes them. The plan only; no tensor data is read here.

The grouping and the names are huggingface_hub's own (``split_state_dict_into_shards_factory``,
which ``split_torch_state_dict_into_shards`` and transformers' ``save_pretrained`` call), over the
output tensors in the order transformers 5's ``save_pretrained`` hands them to it (sorted by
``dot_natural_key``: layer 2 before layer 10), so the files and index are those a
``save_pretrained(max_shard_size=...)`` of the merged model writes. A shard closes when the next
tensor would take it past the limit; a tensor larger than the limit gets a shard of its own, ahead
of the one being filled. Several shards are named ``model-00001-of-0000N.safetensors`` and listed
in a new ``model.safetensors.index.json``; a single one is ``model.safetensors`` with no index.

Inside each new file the tensors lie in the base's order (its files by name, each in data order),
so that reads go forward and untouched neighbours stay one kernel-side copy; a new file may take
its tensors from several base files (run.py reads each from where it lies).
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from dataclasses import replace

from ..errors import OptionError
from .jobs import Job, OutputFile

FILENAME_PATTERN = "model{suffix}.safetensors"      # save_pretrained's, for safetensors weights
# save_pretrained's units are powers of 1000 (huggingface_hub parse_size_to_int); GiB and its
# kin, powers of 1024, are accepted too
UNITS = {"KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
         "KIB": 1 << 10, "MIB": 1 << 20, "GIB": 1 << 30, "TIB": 1 << 40}
SIZE = re.compile(r"\s*([0-9]+(?:\.[0-9]*)?|\.[0-9]+)\s*([a-z]*)\s*", re.IGNORECASE)
EXAMPLES = "5GB, 500MB (powers of 1000, as save_pretrained reads them), 2GiB, or bytes"


def parse_size(value: int | str) -> int:
    """Bytes for ``--max-shard-size``: an int of bytes, digits, or a number with a unit of
    ``UNITS`` (any case: "5GB", "500mb", "2GiB", "1.5GB"). Anything else, and sizes under one
    byte, raise OptionError."""
    if isinstance(value, int) and not isinstance(value, bool):
        size = value
    else:
        match = SIZE.fullmatch(value) if isinstance(value, str) else None
        unit = match.group(2).upper() if match else None
        if match is None or (unit and unit not in UNITS) or (not unit and "." in match.group(1)):
            raise OptionError(f"--max-shard-size {value!r}: not a size; give one like {EXAMPLES}")
        size = int(float(match.group(1)) * UNITS[unit]) if unit else int(match.group(1))
    if size < 1:
        raise OptionError(f"--max-shard-size {value!r}: a shard must hold at least one byte; give "
                          f"a size like {EXAMPLES}")
    return size


def natural_key(name: str) -> list[tuple]:
    """transformers' ``core_model_loading.dot_natural_key``, the order its ``save_pretrained``
    sorts a state dict in before sharding it: dotted parts, digits as numbers (also a part's
    trailing digits), numbers before words. (transformers is not a dependency.)"""
    parts: list[tuple] = []
    for part in name.split("."):
        if part.isascii() and part.isdigit():      # (int() refuses some non-ASCII digits)
            parts.append((0, int(part)))
            continue
        text = part.rstrip("0123456789")
        parts.append((1, text, int(part[len(text):])) if text != part else (1, text))
    return parts


def regroup(files: list[OutputFile], max_bytes: int,
            header_for: Callable[[tuple[Job, ...]], bytes]) -> list[OutputFile]:
    """``files`` (the base's layout) as new output files of at most ``max_bytes`` each (a tensor
    larger than that alone in its own). A new file holding exactly one old file's jobs keeps
    that file's header; the others get ``header_for(jobs)``."""
    from huggingface_hub import split_state_dict_into_shards_factory

    ordered = sorted(files, key=lambda f: f.name)
    position = {j.name: (i, k) for i, f in enumerate(ordered) for k, j in enumerate(f.jobs)}
    jobs = {j.name: j for j in sorted((j for f in files for j in f.jobs),
                                      key=lambda j: natural_key(j.name))}
    split = split_state_dict_into_shards_factory(jobs, get_storage_size=lambda job: job.nbytes,
                                                 filename_pattern=FILENAME_PATTERN,
                                                 max_shard_size=max_bytes)
    out = []
    for name, names in split.filename_to_tensors.items():
        group = tuple(jobs[n] for n in sorted(names, key=position.__getitem__))
        header = next((f.header for f in files if _same_jobs(f.jobs, group)), None) or \
            header_for(tuple(map(_as_stored, group)))
        out.append(OutputFile(name, group, header, len(header) + sum(j.nbytes for j in group)))
    return out


def _as_stored(job: Job) -> Job:
    """``job`` as its header entry describes it: an encoded weight kept encoded is planned in
    its unencoded shape (encoded.py), but stored packed."""
    stored = job.group.members[job.name] if job.group is not None else None
    if stored is not None and job.out_dtype == stored.dtype:
        return replace(job, source=stored)
    return job


def _same_jobs(a: tuple[Job, ...], b: tuple[Job, ...]) -> bool:
    # by identity: a Job holds tensors, which do not compare as a whole with ==
    return len(a) == len(b) and all(x is y for x, y in zip(a, b))


def resharded_index(base_index: dict | None, files: list[OutputFile]) -> dict | None:
    """model.safetensors.index.json for ``files``, or None for a single file (as
    ``save_pretrained`` writes it: no index). Other fields of the base's index are kept."""
    if len(files) == 1:
        return None
    index = json.loads(json.dumps(base_index)) if base_index else {}
    metadata = index.get("metadata")
    index["metadata"] = dict(metadata if isinstance(metadata, dict) else {},
                             total_size=sum(j.nbytes for f in files for j in f.jobs))
    index["weight_map"] = {j.name: f.name for f in files for j in f.jobs}
    return index
