"""Merging into bitsandbytes checkpoints: HF safetensors folders whose config.json carries a
bitsandbytes ``quantization_config`` (4-bit NF4/FP4, with or without double quantization, any
blocksize; 8-bit LLM.int8 with ``SCB``).

A quantized weight is a *group* of stored tensors (layout: ``kernels/quant/bnb_state.py``): the
packed weight and its quant state (``absmax``, ``quant_map``, ``nested_*``, the JSON
``quant_state.bitsandbytes__*``; or ``SCB`` and ``weight_format`` for int8). The plan validates
every group from the headers and the small JSON states (no weight data) and gives the weight's job
the logical shape, so adapters are matched as for any float checkpoint. At run time the weight's
job (the ``group`` field of ``jobs.Job``) is folded here: the packed weight is dequantized with its
companions (read with ``pread``), folded in fp32 with ``kernels.reference`` and either

- quantized back the same way (``--requantize keep``): same names, dtypes, shapes and byte sizes,
  so the header and layout stay. The weight is returned to the writer; the companions that change
  (``absmax``, ``nested_absmax``, ``SCB``) are copied with the untouched tensors and then patched
  at their output offsets (``Patch``) once the writer has passed them: safetensors stores the
  float32 companions of the whole file before the uint8 weights, so holding them back for their
  turn would buffer the model. The double quantization's offset (a free parameter) and the JSON
  quant state are kept byte for byte. Or
- written as a plain 16-bit (or fp32) tensor (``--requantize bf16|fp16|fp32``): the companions are
  dropped, the header is rebuilt at plan time and ``quantization_config`` leaves config.json.

Every adapted weight is scored like a GGUF one (``quantized.survival``): the cosine between the
intended change and ``deq(new) - deq(old)``.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch

from ..dtypes import BNB_STORED, REQUANTIZE_NAMES
from ..errors import FormatError, OptionError, UnsupportedError
from .bases import HFBase, TensorEntry

QUANT_STATE = ".quant_state.bitsandbytes__"
COMPANIONS_4BIT = (".absmax", ".quant_map", ".nested_absmax", ".nested_quant_map")
DAMAGED = ("the checkpoint is damaged: download it again, or quantize and save it again with "
           "bitsandbytes (transformers' save_pretrained)")


@dataclass(frozen=True)
class Patch:
    """Bytes for a stored tensor of an output file that the writer copies first and overwrites
    later (a companion of a quantized weight)."""

    file: str
    offset: int                 # absolute, in the output file
    data: torch.Tensor          # contiguous, CPU


@dataclass(eq=False)
class Group:
    """One quantized weight and every stored tensor that describes it."""

    name: str                                  # the packed weight, e.g. "...q_proj.weight"
    kind: str                                  # "nf4" | "fp4" | "int8"
    shape: tuple[int, ...]                     # the unquantized weight's shape
    members: dict[str, TensorEntry]            # every stored tensor of the group, weight included
    folder: Path
    out_dtype: str | None                      # None: keep the quantization; else "BF16" | ...
    placed: dict[str, tuple[str, int]] = field(default_factory=dict)   # companion -> (file, offset)

    def read(self) -> dict[str, torch.Tensor]:
        """The companions' data (small), read from the base."""
        out = {}
        for name, entry in self.members.items():
            if name != self.name:
                out[name] = _read(self.folder, entry)
        return out

    def dequantized(self, raw: torch.Tensor):
        """(fp32 weight in its unquantized shape, the 4-bit quant state or None for int8) from
        the weight's stored bytes ``raw`` and the companions in ``folder``."""
        from ..kernels.quant import bnb as codec

        tensors = self.read()
        entry = self.members[self.name]
        tensors[self.name] = raw.reshape(-1).view(BNB_STORED[entry.dtype]).reshape(entry.shape)
        try:
            if self.kind == "int8":
                cb, scb = codec.int8_from_tensors(tensors, self.name)
                return codec.dequantize_int8(cb, scb), None
            packed, state = codec.state_from_tensors(tensors, self.name)
            _check_codes(state, self.name)
            return codec.dequantize_4bit(packed, state), state
        except FormatError as e:
            raise FormatError(f"{entry.file}: {e}; {DAMAGED}") from None

    def roundtrip(self, x: torch.Tensor, state) -> torch.Tensor:
        """What this group's quantization (the base's ``state``) keeps of fp32 ``x``, as fp32."""
        from ..kernels.quant import bnb as codec

        if self.kind == "int8":
            return codec.dequantize_int8(*codec.quantize_int8(x))
        packed, new_state = _quantize_4bit(x, state)
        return codec.dequantize_4bit(packed, new_state)

    def fold(self, job, raw: torch.Tensor, mode: str, survival: list | None,
             patches: list | None) -> torch.Tensor:
        """The output of the weight's job from its stored bytes ``raw``; the changed companions
        go to ``patches`` (keep), the score to ``survival`` (adapted weights)."""
        from ..kernels.quant import bnb as codec
        from .quantized import check_finite, fold_fp32
        from .quantized import survival as score

        weight, state = self.dequantized(raw)
        merged = fold_fp32(job, weight, mode)   # fp32 (rows, cols)
        if job.changed:                          # before it is quantized (absmax, SCB: fp32)
            check_finite(job, merged, base=weight)
        if self.out_dtype is not None:           # a plain float tensor
            out = merged.to(BNB_STORED[self.out_dtype]).contiguous()
            if job.changed and survival is not None:
                old = weight.to(out.dtype).to(torch.float32)
                survival.append(score(self.name, self.out_dtype, merged - weight,
                                      out.to(torch.float32) - old))
            return out
        if self.kind == "int8":
            new_cb, new_scb = codec.quantize_int8(merged)
            changed = {_module(self.name) + "SCB": new_scb}
            realized = codec.dequantize_int8(new_cb, new_scb)
            out = new_cb
        else:
            out, new_state = _quantize_4bit(merged, state)
            changed = {f"{self.name}.absmax": new_state.absmax}
            if state.nested:
                changed[f"{self.name}.nested_absmax"] = new_state.nested_absmax
            realized = codec.dequantize_4bit(out, new_state)
        for name, data in changed.items():
            data = data.to("cpu", BNB_STORED[self.members[name].dtype]).contiguous()
            if data.numel() * data.element_size() != self.members[name].nbytes:
                raise AssertionError(f"{name}: requantized to {data.numel()} values, stored "
                                     f"{self.members[name].nbytes} bytes")
            if patches is not None:
                patches.append(Patch(*self.placed[name], data))
        if job.changed and survival is not None:
            survival.append(score(self.name, self.kind.upper(), merged - weight, realized - weight))
        return out.to("cpu").contiguous()


def _module(name: str) -> str:
    return name.removesuffix("weight")


def _read(folder: Path, entry: TensorEntry) -> torch.Tensor:
    with open(folder / entry.file, "rb") as fh:
        data = os.pread(fh.fileno(), entry.nbytes, entry.offset)
    if len(data) != entry.nbytes:
        raise OSError(f"{entry.file}: unexpected end of file inside {entry.name}; the file is "
                      "truncated, download it again")
    flat = torch.frombuffer(bytearray(data), dtype=torch.uint8)
    return flat.view(BNB_STORED[entry.dtype]).reshape(entry.shape) if entry.nbytes else \
        torch.empty(entry.shape, dtype=BNB_STORED[entry.dtype])


def _check_codes(state, name: str) -> None:
    """The 4-bit and nested codes must be bitsandbytes' own: they are written back unchanged."""
    from ..kernels.quant import bnb as codec

    if not torch.equal(state.quant_map.to(torch.float32), codec.code_4bit(state.quant_type)):
        raise UnsupportedError(f"{name}: its quant_map is not bitsandbytes' {state.quant_type} code; "
                               "custom 4-bit codes cannot be requantized (use --requantize bf16)")
    if state.nested and not torch.equal(state.nested_quant_map.to(torch.float32),
                                        codec.dynamic_code()):
        raise UnsupportedError(f"{name}: its nested_quant_map is not bitsandbytes' dynamic 8-bit "
                               "code; it cannot be requantized (use --requantize bf16)")


def _quantize_4bit(merged: torch.Tensor, state):
    """``merged`` in ``state``'s quantization (quant type, blocksize, codes and, when double
    quantized, the stored offset: the JSON quant state stays byte for byte)."""
    from ..kernels.quant import bnb as codec

    packed, plain = codec.quantize_4bit(merged, quant_type=state.quant_type,
                                        blocksize=state.blocksize)
    if not state.nested:
        return packed, replace(state, absmax=plain.absmax)
    offset = torch.tensor(state.nested_offset, dtype=torch.float32)
    qabs, absmax2 = codec.quantize_blockwise_8bit(plain.absmax - offset,
                                                  state.nested_quant_map.to(torch.float32),
                                                  state.nested_blocksize)
    return packed, replace(state, absmax=qabs, nested_absmax=absmax2)


# ----------------------------------------------------------------------------- plan

@dataclass
class Layout:
    """The bitsandbytes groups of a checkpoint, and what the merge does with them."""

    folder: Path
    groups: dict[str, Group]                 # by weight name
    member_of: dict[str, Group]              # every member's name -> its group
    out_dtype: str | None                    # None: keep

    def logical(self, entries: dict[str, TensorEntry]) -> dict[str, TensorEntry]:
        """``entries`` with each quantized weight in its unquantized shape (adapters match it)."""
        return {name: replace(e, shape=self.groups[name].shape) if name in self.groups else e
                for name, e in entries.items()}

    def jobs(self, jobs: list) -> list:
        """One file's jobs: adapted weights (every weight for a 16-bit output) get their group;
        companions are dropped for a 16-bit output."""
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
                out.append(replace(job, source=source, out_dtype=self.out_dtype or job.source.dtype,
                                   group=group))
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
        """config.json for the output: a 16-bit output is a plain model."""
        if self.out_dtype is None:
            return config
        config = json.loads(json.dumps(config if config is not None else base_config))
        config.pop("quantization_config", None)
        return config

    def index(self, index: dict | None, files) -> dict | None:
        if index is None or self.out_dtype is None:
            return index
        kept = {j.name for f in files for j in f.jobs}
        index["weight_map"] = {k: v for k, v in index["weight_map"].items() if k in kept}
        return index


def inspect(base: HFBase, requantize: str = "keep") -> Layout | None:
    """The bitsandbytes layout of ``base`` (validated from headers and JSON states), or None for
    a plain checkpoint."""
    qc = (base.config or {}).get("quantization_config")
    if requantize != "keep" and requantize not in REQUANTIZE_NAMES:
        raise OptionError(f"--requantize {requantize}: a bitsandbytes checkpoint is kept in "
                          "its quantization (keep) or written as bf16, fp16 or fp32")
    if not qc:
        if requantize != "keep":
            raise OptionError(f"{base.folder}: --requantize applies to GGUF bases and "
                              "bitsandbytes checkpoints; for this HF checkpoint use --dtype")
        return None
    four, eight = _check_config(base, qc)
    entries = base.entries()
    folder = Path(base.folder)
    out_dtype = None if requantize == "keep" else REQUANTIZE_NAMES[requantize]
    groups: dict[str, Group] = {}
    for name in sorted(_weights_4bit(entries, four)):
        groups[name] = _group_4bit(folder, entries, name, out_dtype)
    for name in sorted(_weights_int8(entries, eight)):
        if name in groups:
            raise FormatError(f"{entries[name].file}: {name} has both a 4-bit quant state and an "
                              f"int8 SCB; {DAMAGED}")
        groups[name] = _group_int8(folder, entries, name, out_dtype)
    member_of = {m: g for g in groups.values() for m in g.members}
    return Layout(folder, groups, member_of, out_dtype)


def _check_config(base: HFBase, qc) -> tuple[bool, bool]:
    where = f"{base.folder}/config.json quantization_config"
    if not isinstance(qc, dict):
        raise FormatError(f"{where} is not an object; fix config.json")
    method = qc.get("quant_method")
    if method != "bitsandbytes":
        raise UnsupportedError(f"{where}: quant_method {method!r} is not supported for merging "
                               "(bitsandbytes 4-bit and 8-bit are); merge into the unquantized "
                               "model and quantize the result")
    four = bool(qc.get("load_in_4bit", qc.get("_load_in_4bit")))
    eight = bool(qc.get("load_in_8bit", qc.get("_load_in_8bit")))
    if four == eight:
        raise UnsupportedError(f"{where}: expected exactly one of load_in_4bit / load_in_8bit, got "
                               f"{four} / {eight}")
    if four:
        storage = qc.get("bnb_4bit_quant_storage", "uint8") or "uint8"
        if storage != "uint8":
            raise UnsupportedError(f"{where}: bnb_4bit_quant_storage {storage!r} is not supported "
                                   "(uint8 is); quantize the model again with the default storage")
        quant_type = qc.get("bnb_4bit_quant_type", "fp4")
        if quant_type not in ("nf4", "fp4"):
            raise UnsupportedError(f"{where}: bnb_4bit_quant_type {quant_type!r} is not supported "
                                   "(nf4 and fp4 are)")
    elif qc.get("llm_int8_has_fp16_weight"):
        raise UnsupportedError(f"{where}: llm_int8_has_fp16_weight=true checkpoints are not "
                               "supported; save the model with the default (int8 weights)")
    return four, eight


def _weights_4bit(entries: dict[str, TensorEntry], four: bool) -> set[str]:
    """Every 4-bit weight any stored tensor speaks of (so orphans are reported, not ignored)."""
    names = set()
    for name, entry in entries.items():
        if QUANT_STATE in name:
            names.add(name.split(QUANT_STATE)[0])
        elif name.endswith(COMPANIONS_4BIT):
            names.add(name[: name.rfind(".")])
        elif four and entry.dtype == "U8" and name.endswith(".weight"):
            names.add(name)
    return names


def _weights_int8(entries: dict[str, TensorEntry], eight: bool) -> set[str]:
    names = set()
    for name, entry in entries.items():
        if name.endswith(".SCB"):
            names.add(name[: -len("SCB")] + "weight")
        elif eight and entry.dtype == "I8" and name.endswith(".weight"):
            names.add(name)
    return names


def _meta(entry: TensorEntry) -> torch.Tensor:
    return torch.empty(entry.shape, dtype=BNB_STORED.get(entry.dtype, torch.uint8), device="meta")


def _group_4bit(folder: Path, entries, name: str, out_dtype) -> Group:
    from ..kernels.quant import bnb as codec

    keys = [name, *(name + s for s in COMPANIONS_4BIT),
            *(f"{name}{QUANT_STATE}{t}" for t in ("nf4", "fp4"))]
    members = {k: entries[k] for k in keys if k in entries}
    file = entries[name].file if name in entries else next(iter(members.values())).file
    if name in entries and entries[name].dtype != "U8":
        raise UnsupportedError(f"{file}: {name} is a bitsandbytes 4-bit weight stored as "
                               f"{entries[name].dtype}; only uint8 storage is supported")
    tensors = {k: _read(folder, e) if QUANT_STATE in k else _meta(e) for k, e in members.items()}
    try:
        _, state = codec.state_from_tensors(tensors, name)
    except FormatError as e:
        raise FormatError(f"{file}: {e}; {DAMAGED}") from None
    if state.blocksize not in codec.BLOCKSIZES:
        raise UnsupportedError(f"{file}: {name} is quantized with blocksize {state.blocksize}; "
                               f"bitsandbytes blocksizes {codec.BLOCKSIZES} are supported")
    if state.nested and state.nested_blocksize != codec.NESTED_BLOCKSIZE:
        raise UnsupportedError(f"{file}: {name} is double-quantized with nested blocksize "
                               f"{state.nested_blocksize}; only {codec.NESTED_BLOCKSIZE} is supported")
    return Group(name, state.quant_type, state.shape, members, folder, out_dtype)


def _group_int8(folder: Path, entries, name: str, out_dtype) -> Group:
    from ..kernels.quant import bnb as codec

    module = _module(name)
    keys = [name, module + "SCB", module + "weight_format"]
    members = {k: entries[k] for k in keys if k in entries}
    file = next(iter(members.values())).file
    tensors = {k: _read(folder, e) if k.endswith("weight_format") else _meta(e)
               for k, e in members.items()}
    try:
        codec.int8_from_tensors(tensors, name)
    except FormatError as e:
        raise FormatError(f"{file}: {e}; {DAMAGED}") from None
    return Group(name, "int8", tuple(entries[name].shape), members, folder, out_dtype)


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
