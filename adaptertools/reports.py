"""What the public functions return (api.py, adapter_io.py): one frozen dataclass per result.

A report's fields are the keys of the dict the function returned before reports were typed, in
that dict's order, and ``to_dict()`` gives that dict back, key for key: it is what ``--json``
prints. Keys a result has only sometimes (``hub_inputs`` for Hub inputs, ``pushed`` after a
push, ...) are fields that default to None and are left out of ``to_dict()`` while None.
Nested sections (per-tensor rows, survival, e2e) stay the plain dicts and lists they were.

Kept for dict-era callers: a report is also a read-only ``dict`` holding ``to_dict()``'s items,
so ``report["passed"]``, ``"e2e" in report``, ``report.get(...)``, ``json.dumps(report)`` and
``report == {...}`` work as before (a dict subclass, because ``json.dumps`` takes no other
mapping); assigning a key raises TypeError, ``to_dict()`` is the copy to change.
"""

from __future__ import annotations

import copy
import inspect
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from typing import Any

from .options import CombineMethod, MergeDtype, MergeMode, SvdChoice

Row = dict[str, Any]     # one row of a nested table (a tensor, a shard, a Hub input), as before


# field metadata: a key the result has only sometimes (the field is None, and then not in
# ``to_dict()``); a key that is no Python name (``from``)
SOMETIMES = {"optional": True}
FROM = {"key": "from"}


def _key(f) -> str:
    return f.metadata.get("key") or f.name


def _rebuild(cls, values: dict):
    return cls(**values)


class Report(dict):
    """Base of the reports: a frozen dataclass whose dict items are ``to_dict()``'s."""

    def __init_subclass__(cls, **kwargs) -> None:
        super().__init_subclass__(**kwargs)
        # an instance attribute named like a dict method would hide it (report.items())
        clash = set(inspect.get_annotations(cls)) & set(dir(dict))
        if clash:
            raise TypeError(f"{cls.__name__}: field(s) {sorted(clash)} hide dict methods")

    def __post_init__(self) -> None:
        dict.update(self, self._items())     # the base's own update: ours refuses

    def _items(self):
        for f in fields(self):
            value = getattr(self, f.name)
            if not (value is None and f.metadata.get("optional")):
                yield _key(f), value

    def to_dict(self) -> dict[str, Any]:
        """The plain dict the function returned before reports were typed: the same keys in
        the same order, the same values (a deep copy, free to change)."""
        return copy.deepcopy(dict(self))

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]):
        """The report of ``data``, a dict in ``to_dict()``'s shape (what the library builds)."""
        names = {_key(f): f.name for f in fields(cls)}
        unknown = [k for k in data if k not in names]
        if unknown:      # a new key needs a field here, else --json would lose it
            raise TypeError(f"{cls.__name__} has no field for {', '.join(map(repr, unknown))}")
        return cls(**{names[k]: v for k, v in data.items()})

    def _read_only(self, *args, **kwargs):
        raise TypeError(f"{type(self).__name__} is read-only; change a copy: report.to_dict()")

    __setitem__ = __delitem__ = __ior__ = clear = pop = popitem = setdefault = update = _read_only

    def __reduce__(self):    # pickle and copy through __init__, not dict item assignment
        return _rebuild, (type(self), {f.name: getattr(self, f.name) for f in fields(self)})


REPORT = {"frozen": True, "kw_only": True, "eq": False}   # eq=False: compared as the dicts they are


@dataclass(**REPORT)
class InspectReport(Report):
    """``inspect``: what an adapter holds (inspection.py ``adapter_report``)."""

    path: str
    format: str
    base_model: str | None
    size_bytes: int
    adapted_tensors: int
    replaced_tensors: list[str]        # full tensors it replaces (modules_to_save)
    saved_base_copies: list[str]       # PEFT's saved copies of the training base's tensors
    parameters: int
    dtypes: list[str]
    ranks: dict[str, int]              # rank (as a string) -> how many tensors, most first
    scales: dict[str, int]
    rslora: bool
    target_modules: list[str]
    layer_kinds: dict[str, int]
    dora: bool
    lora_bias: bool
    total_delta_norm: float | None     # None when a factor holds NaN or Inf
    problems: list[str]
    # LoHa / LoKr adapters: {kind: tensors} (absent for LoRA-only adapters)
    delta_kinds: dict[str, int] | None = field(default=None, metadata=SOMETIMES)
    kinds: dict[str, int] = field(default_factory=dict)   # LoRA / LoCon / LoHa / LoKr (+DoRA)
    # PEFT trainable tokens: base tensor -> token ids (absent without them)
    trained_token_rows: dict[str, list[int]] | None = field(default=None, metadata=SOMETIMES)
    # with layers=True: one row per tensor
    layers: list[Row] | None = field(default=None, metadata=SOMETIMES)
    # facts only the format knows (GGUF types)
    storage: dict[str, Any] | None = field(default=None, metadata=SOMETIMES)
    hub_inputs: list[Row] | None = field(default=None, metadata=SOMETIMES)


@dataclass(**REPORT)
class ConvertReport(Report):
    """``convert``: the formats and what was written."""

    src: str
    dst: str
    from_format: str = field(metadata=FROM)
    to: str
    dtype: str
    adapted_tensors: int
    replaced_tensors: int
    # GGUF: full tensors it cannot store
    dropped_tensors: int | None = field(default=None, metadata=SOMETIMES)
    # the base the adapter named, when used
    base: str | None = field(default=None, metadata=SOMETIMES)
    notes: list[str] | None = field(default=None, metadata=SOMETIMES)
    base_model: str | None = field(default=None, metadata=SOMETIMES)
    hub_inputs: list[Row] | None = field(default=None, metadata=SOMETIMES)
    # with push_to: the commit (hub.push)
    pushed: dict[str, Any] | None = field(default=None, metadata=SOMETIMES)


@dataclass(**REPORT)
class MergePlanReport(Report):
    """``merge(dry_run=True)``: the plan, nothing written."""

    base: str
    out: str | None
    format: str                        # the base's kind: safetensors (HF) or gguf
    adapters: list[str]
    weights: list[float]
    mode: MergeMode
    dtype: MergeDtype
    tensors: int
    output_bytes: int
    changed: list[Row]                 # name, shape, dtype, adapters, replaced, added
    warnings: list[str]
    # with max_shard_size: bytes, and the files
    max_shard_size: int | None = field(default=None, metadata=SOMETIMES)
    shards: list[Row] | None = field(default=None, metadata=SOMETIMES)
    base_model: str | None             # the base's Hub id, for a model card
    # a diffusers pipeline folder: {component: {merged, tensors} or {copied: files}}
    components: dict[str, Any] | None = field(default=None, metadata=SOMETIMES)
    hub_inputs: list[Row] | None = field(default=None, metadata=SOMETIMES)


@dataclass(**REPORT)
class MergeReport(MergePlanReport):
    """``merge``: the plan and what the run did."""

    wall_s: float
    device: str
    kernels: str                       # the ones that ran: torch or triton
    copied_files: list[str]
    survival: dict[str, Any] | None    # quantized outputs: how much of the adapter each kept
    # validate=True: the verdict, failures
    validation: dict[str, Any] | None = field(default=None, metadata=SOMETIMES)
    pushed: dict[str, Any] | None = field(default=None, metadata=SOMETIMES)
    # executor="ray": {"total", "ran", "already_done", "executor"}: the pieces (parallel.py)
    pieces: dict[str, Any] | None = field(default=None, metadata=SOMETIMES)


@dataclass(**REPORT)
class ValidationReport(Report):
    """``validate``: the merged checkpoint against the base and adapters, tensor by tensor."""

    passed: bool
    failed: int
    checked: int
    adapted: int
    untouched: int
    worst_margin_db: float | None
    probes: int
    seed: int
    tolerance_db: float
    wall_s: float
    tensors: list[Row]                 # worst first
    merged: str
    base: str
    adapters: list[str]
    weights: list[float]
    mode: MergeMode
    # e2e=True: logits, merged vs unmerged
    e2e: dict[str, Any] | None = field(default=None, metadata=SOMETIMES)
    hub_inputs: list[Row] | None = field(default=None, metadata=SOMETIMES)


@dataclass(**REPORT)
class ComparisonReport(Report):
    """``validate_against``: two adapters' deltas, tensor by tensor."""

    passed: bool
    tensors: list[Row]                 # worst first
    failed: int
    adapter: str
    against: str
    hub_inputs: list[Row] | None = field(default=None, metadata=SOMETIMES)


@dataclass(**REPORT)
class CombineReport(Report):
    """``combine``: per tensor and in total, the share of the target delta kept."""

    command: str = "combine"
    method: CombineMethod
    inputs: list[str]
    weights: list[float]
    rank: int | None
    energy: float | None
    density: float | None
    seed: int
    out: str
    format: str
    replaced: list[str]
    warnings: list[str]
    tensors: list[Row]                 # name, shape, rank, note, delta_norm, energy_kept, ...
    total: dict[str, float]            # energy_kept, relative_error
    wall_s: float


@dataclass(**REPORT)
class ExtractReport(Report):
    """``extract``: per tensor and in total, the share of the fine-tune's delta kept."""

    command: str = "extract"
    base: str
    finetuned: str
    out: str
    format: str
    rank: int | None
    energy: float | None
    svd: SvdChoice
    seed: int
    replaced: list[str]
    warnings: list[str]
    tensors: list[Row]
    total: dict[str, float]
    wall_s: float


@dataclass(**REPORT)
class PushReport(Report):
    """``push`` (and a report's ``pushed`` section): the commit made on the Hub."""

    repo_id: str
    revision: str
    commit: str
    url: str                           # redacted: never a token
    private: bool
    endpoint: str
    files: list[str]


@dataclass(**REPORT)
class PullReport(Report):
    """``pull``: the Hub input fetched (its provenance) and where it now lies."""

    role: str = "pull"
    uri: str
    repo_id: str
    revision: str
    commit: str
    repo_path: str
    endpoint: str
    files: list[str]                   # below the URI's folder
    path: str
    bytes: int
