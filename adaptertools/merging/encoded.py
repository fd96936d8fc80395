"""Merging into checkpoints whose weights a codec of the registry encodes (codecs/), the same
way for every codec: the engine's side of the base-side seam.

Plan time (``layout_for``): the codec named by config.json's ``quantization_config`` describes
every encoded weight from the headers (no weight data); each becomes a ``Group`` (the weight and
the stored tensors it owns), and the weight's job gets the logical shape, so adapters are matched
as for any float checkpoint. At run time the weight's job (``jobs.Job.group``) is folded here: the
stored members are decoded (companions read with ``pread``), folded in fp32 and either

- encoded back (``--requantize keep``): same names, dtypes, shapes and byte sizes, so the header
  and layout stay. The weight is returned to the writer; the companions that change are copied
  with the untouched tensors and then patched at their output offsets (``Patch``) once the writer
  has passed them: safetensors stores small float companions of the whole file before the packed
  weights, so holding them back for their turn would buffer the model. Or
- written as a plain float tensor (``--requantize bf16|fp16|fp32``): the companions are dropped,
  the header is rebuilt at plan time and ``quantization_config`` leaves config.json.

Every adapted weight is scored like a GGUF one (``quantized.survival``): the cosine between the
intended change and ``decode(new) - decode(old)``.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field, replace
from pathlib import Path
from types import ModuleType

import torch

from ..codecs import Encoding
from ..dtypes import REQUANTIZE_NAMES, STORED_TORCH_DTYPES
from ..errors import FormatError, OptionError, UnsupportedError
from ..kernels.survival import Survival
from ..tensor_index import read_entry
from .bases import HFBase, TensorEntry


@dataclass(frozen=True)
class Patch:
    """Bytes for a stored tensor of an output file that the writer copies first and overwrites
    later (a companion of an encoded weight)."""

    file: str
    offset: int                 # absolute, in the output file
    data: torch.Tensor          # contiguous, CPU


@dataclass(frozen=True)
class Folded:
    """What folding one encoded weight gives: the weight's output bytes, the companions to
    overwrite (keep), its survival score (adapted weights)."""

    tensor: torch.Tensor
    patches: tuple[Patch, ...] = ()
    survival: Survival | None = None


@dataclass(eq=False)
class Group:
    """One encoded weight and every stored tensor that describes it."""

    encoding: Encoding
    codec: ModuleType
    members: dict[str, TensorEntry]            # every stored tensor of the group, weight included
    folder: Path
    out_dtype: str | None                      # None: keep the encoding; else "BF16" | ...
    placed: dict[str, tuple[str, int]] = field(default_factory=dict)   # companion -> (file, offset)

    @property
    def name(self) -> str:                     # the stored weight, e.g. "...q_proj.weight"
        return self.encoding.name

    @property
    def logical(self) -> str:                  # its name in a float checkpoint (and adapters)
        name_of = getattr(self.codec, "logical_name", None)
        return name_of(self.encoding) if name_of is not None else self.encoding.name

    @property
    def shape(self) -> tuple[int, ...]:        # the unencoded weight's shape
        return self.encoding.shape

    @property
    def type(self) -> str:                     # the codec's type: what reports call it
        return self.encoding.type

    def read(self) -> dict[str, torch.Tensor]:
        """The companions' data (small), read from the base."""
        return {name: read_entry(self.folder / entry.file, entry)
                for name, entry in self.members.items() if name != self.name}

    def dequantized(self, raw: torch.Tensor):
        """(fp32 weight in its unencoded shape, the codec's state) from the weight's stored
        bytes ``raw`` and the companions in ``folder``."""
        tensors = self.read()
        entry = self.members[self.name]
        tensors[self.name] = raw.reshape(-1).view(STORED_TORCH_DTYPES[entry.dtype]).reshape(entry.shape)
        try:
            return self.codec.decode(self.encoding, tensors)
        except FormatError as e:
            raise FormatError(f"{entry.file}: {e}; {self.codec.DAMAGED}") from None

    def roundtrip(self, x: torch.Tensor, state) -> torch.Tensor:
        """What this weight's encoding (the base's ``state``) keeps of fp32 ``x``, as fp32."""
        return self.codec.encode(self.encoding, x, state)[1]

    def fold(self, job, raw: torch.Tensor, mode: str) -> Folded:
        """The output of the weight's job from its stored bytes ``raw``: the weight, the changed
        companions (keep) and the survival score (adapted weights)."""
        from .quantized import check_finite, fold_fp32
        from .quantized import survival as score

        weight, state = self.dequantized(raw)
        merged = fold_fp32(job, weight, mode)   # fp32 (rows, cols)
        if job.changed:                          # before it is encoded (scales are fp32)
            check_finite(job, merged, base=weight)
        if self.out_dtype is not None:           # a plain float tensor
            out = merged.to(STORED_TORCH_DTYPES[self.out_dtype]).contiguous()
            scored = None
            if job.changed:
                old = weight.to(out.dtype).to(torch.float32)
                scored = score(self.name, self.out_dtype, merged - weight,
                               out.to(torch.float32) - old)
            return Folded(out, (), scored)
        changed, realized = self.codec.encode(self.encoding, merged, state)
        patches = []
        for name, data in changed.items():
            entry = self.members[name]
            data = data.to("cpu", STORED_TORCH_DTYPES[entry.dtype]).contiguous()
            if data.numel() * data.element_size() != entry.nbytes:
                raise AssertionError(f"{name}: encoded to {data.numel()} values, stored "
                                     f"{entry.nbytes} bytes")
            if name == self.name:
                out = data
            else:
                patches.append(Patch(*self.placed[name], data))
        scored = changes_survival(self.name, self.type, merged, realized, weight) \
            if job.changed else None
        return Folded(out, tuple(patches), scored)


SCORE_ROWS = 256      # rows per step of changes_survival: 2 MB of fp32 temporaries at 2048 cols


def changes_survival(name: str, type_name: str, merged: torch.Tensor, realized: torch.Tensor,
                     weight: torch.Tensor) -> Survival:
    """``quantized.survival`` of the intended change ``merged - weight`` against the realized one
    ``realized - weight`` (all fp32, the same shape), SCORE_ROWS rows at a time: the two
    differences never exist at full size (2 x 46 MB for a 5632 x 2048 weight). Sums of the
    per-step fp32 reductions in float64; the score equals the one-shot one to about 1e-6."""
    from .quantized import from_sums

    flat = [t.reshape(-1, t.shape[-1]) if t.dim() > 1 else t.reshape(1, -1)
            for t in (merged, realized, weight)]
    dot = ii = rr = dd = 0.0
    for start in range(0, flat[0].shape[0], SCORE_ROWS):
        m, r, w = (t[start:start + SCORE_ROWS] for t in flat)
        i = (m - w).reshape(-1)
        d = (r - w).reshape(-1)
        dot += float(torch.dot(i, d))
        ii += float(torch.dot(i, i))
        rr += float(torch.dot(d, d))
        d.sub_(i)                                  # realized - intended
        dd += float(torch.dot(d, d))
    return from_sums(name, type_name, dot, math.sqrt(ii), math.sqrt(rr), math.sqrt(dd))


# ----------------------------------------------------------------------------- plan

@dataclass
class Layout:
    """The encoded weights of a checkpoint, and what the merge does with them."""

    folder: Path
    groups: dict[str, Group]                 # by weight name
    member_of: dict[str, Group]              # every member's name -> its group
    out_dtype: str | None                    # None: keep

    def logical(self, entries: dict[str, TensorEntry]) -> dict[str, TensorEntry]:
        """``entries`` with each encoded weight in its unencoded shape (adapters match it), and
        a weight stored under another name than its float one (compressed-tensors'
        ``X.weight_packed`` for ``X.weight``) also under the float name, which adapters use;
        the planner maps it back with ``target_name``."""
        out = {name: replace(e, shape=self.groups[name].shape) if name in self.groups else e
               for name, e in entries.items()}
        out.update({g.logical: replace(out[g.name], name=g.logical)
                    for g in self.groups.values() if g.logical != g.name})
        return out

    def target_name(self, stored: str) -> str:
        """The name adapters give the stored tensor ``stored`` (``X.weight_packed`` ->
        ``X.weight``); other tensors keep theirs."""
        group = self.groups.get(stored)
        return group.logical if group is not None else stored

    def jobs(self, jobs: list) -> list:
        """One file's jobs: adapted weights (every weight for a float output) get their group;
        companions are dropped for a float output."""
        out = []
        for job in jobs:
            group = self.member_of.get(job.name)
            if group is None:
                out.append(job)
            elif job.name != group.name:
                if self.out_dtype is None:
                    out.append(job)            # copied; patched after its weight when adapted
            elif self.out_dtype is not None or job.changed:
                source = replace(job.source, shape=group.shape)
                # a float output stores the weight under its float name (X.weight_packed ->
                # X.weight)
                name = job.name if self.out_dtype is None else group.logical
                out.append(replace(job, name=name, source=source,
                                   out_dtype=self.out_dtype or job.source.dtype, group=group))
            else:
                out.append(job)
        return out

    def place(self, files) -> None:
        """Where the companions of adapted weights land in the output files (keep)."""
        if self.out_dtype is not None:
            return
        adapted = {j.group.name for f in files for j in f.jobs if j.group is not None}
        for f in files:
            offset = len(f.header)
            for job in f.jobs:
                group = self.member_of.get(job.name)
                if group is not None and group.name in adapted and job.name != group.name:
                    group.placed[job.name] = (f.name, offset)
                offset += job.nbytes

    def config(self, config: dict | None, base_config: dict) -> dict | None:
        """config.json for the output: a float output is a plain model."""
        if self.out_dtype is None:
            return config
        config = json.loads(json.dumps(config if config is not None else base_config))
        config.pop("quantization_config", None)
        return config

    def index(self, index: dict | None, files) -> dict | None:
        if index is None or self.out_dtype is None:
            return index
        kept = {j.name for f in files for j in f.jobs}
        renamed = {g.name: g.logical for g in self.groups.values()}
        index["weight_map"] = {renamed.get(k, k): v for k, v in index["weight_map"].items()
                               if renamed.get(k, k) in kept}
        return index


def layout_for(base: HFBase, requantize: str = "keep") -> Layout | None:
    """The encoded weights of ``base`` as its quantization_config's codec describes them
    (validated from headers and small states), or None for a plain checkpoint."""
    from ..codecs import for_quant_method, quant_methods

    # mlx-lm writes its own ``quantization`` (older versions only that one) as well
    qc = (base.config or {}).get("quantization_config") or (base.config or {}).get("quantization")
    if requantize != "keep" and requantize not in REQUANTIZE_NAMES:
        raise OptionError(f"--requantize {requantize}: a quantized checkpoint is kept in "
                          "its quantization (keep) or written as bf16, fp16 or fp32")
    if not qc:
        if requantize != "keep":
            raise OptionError(f"{base.folder}: --requantize applies to GGUF bases and "
                              "quantized HF checkpoints; for this HF checkpoint use --dtype")
        return None
    where = f"{base.folder}/config.json quantization_config"
    if not isinstance(qc, dict):
        raise FormatError(f"{where} is not an object; fix config.json")
    method = qc.get("quant_method")
    codec = for_quant_method(method) if isinstance(method, str) else None
    if codec is None and method is None and {"bits", "group_size"} <= qc.keys():
        # mlx-lm 0.32 (mlx_lm.convert -q): uint32 weights with .scales / .biases per group
        mode = "" if qc.get("mode", "affine") == "affine" else f", mode={qc['mode']}"
        raise UnsupportedError(f"{where}: an MLX-quantized base (bits={qc['bits']}, group_size="
                               f"{qc['group_size']}{mode}): merge into the unquantized model "
                               "(the original checkpoint, or mlx_lm.convert --dequantize) and "
                               "quantize the result with mlx_lm.convert -q")
    if codec is None:
        raise UnsupportedError(f"{where}: quant_method {method!r} is not supported for merging "
                               f"({', '.join(quant_methods())} are); merge into the unquantized "
                               "model and quantize the result")
    entries = base.entries()
    folder = Path(base.folder)
    out_dtype = None if requantize == "keep" else REQUANTIZE_NAMES[requantize]
    groups: dict[str, Group] = {}
    for encoding in codec.describe(entries, qc, lambda e: read_entry(folder / e.file, e), where):
        members = {m: entries[m] for m in encoding.members}
        groups[encoding.name] = Group(encoding, codec, members, folder, out_dtype)
    member_of = {m: g for g in groups.values() for m in g.members}
    return Layout(folder, groups, member_of, out_dtype)


# ----------------------------------------------------------------------------- run

def due(patches: list[Patch], file: str, end: int) -> list[Patch]:
    """The patches of ``file`` that lie wholly before ``end``, taken out of ``patches``."""
    ready = [p for p in patches if p.file == file and p.offset + p.data.numel() * p.data.element_size() <= end]
    if ready:
        patches[:] = [p for p in patches if not any(p is r for r in ready)]
    return ready


def apply_left(patches: list[Patch], folder: Path) -> None:
    """Patches for output files already written (a quant state in an earlier shard than its
    weight): written in place, then synced."""
    by_file: dict[str, list[Patch]] = {}
    for p in patches:
        by_file.setdefault(p.file, []).append(p)
    for name, items in by_file.items():
        fd = os.open(folder / name, os.O_WRONLY)
        try:
            for p in items:
                view = memoryview(p.data.reshape(-1).view(torch.uint8).numpy())
                done = 0
                while done < len(view):
                    done += os.pwrite(fd, view[done:], p.offset + done)
            os.fsync(fd)
        finally:
            os.close(fd)
    patches.clear()
