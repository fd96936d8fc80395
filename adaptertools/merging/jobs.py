"""The plan's plain data: ``Job`` (one output tensor), ``OutputFile``, ``Plan``. No
engine code: plan.py builds these, run.py, encoded.py, quantized.py and the validators read them.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from ..dtypes import SAFETENSORS_SIZES
from ..kernels.reference import Contribution
from .bases import GGUFBase, HFBase, TensorEntry


@dataclass(frozen=True)
class Job:
    """One output tensor: its source bytes, and what the adapters do to it."""

    name: str
    source: TensorEntry
    out_dtype: str
    contributions: tuple[Contribution, ...] = ()
    bias_contributions: tuple[Contribution, ...] = ()   # lora_bias terms for a bias tensor
    replacement: torch.Tensor | None = None              # modules_to_save: replaces the source
    group: object | None = None     # an encoded weight's group of stored tensors (encoded.py)
    # the replacement's shape where it differs from the source's (a resized vocabulary)
    out_shape: tuple[int, ...] | None = None
    # trained token rows: (adapter.TokenRows, the adapter's weight, its index) (kernels/token_rows.py)
    token_rows: tuple = ()

    @property
    def changed(self) -> bool:
        return bool(self.contributions or self.bias_contributions or self.token_rows) or \
            self.replacement is not None

    @property
    def shape(self) -> tuple[int, ...]:
        """The source tensor's shape (what is read from the base)."""
        return self.source.shape

    @property
    def output_shape(self) -> tuple[int, ...]:
        """The shape written: the source's, or a resized replacement's."""
        return self.out_shape or self.source.shape

    @property
    def nbytes(self) -> int:
        shape = self.output_shape
        if self.out_dtype == self.source.dtype and self.out_shape is None:
            return self.source.nbytes
        if self.out_dtype in SAFETENSORS_SIZES:
            return SAFETENSORS_SIZES[self.out_dtype] * _numel(shape)
        from ..kernels.quant.types import resolve  # a GGUF block type

        return _numel(shape[:-1]) * resolve(self.out_dtype).row_bytes(shape[-1])


@dataclass(frozen=True)
class OutputFile:
    name: str
    jobs: tuple[Job, ...]
    header: bytes          # written first, byte for byte
    size: int              # header plus data


@dataclass(frozen=True)
class Plan:
    base: HFBase | GGUFBase
    files: tuple[OutputFile, ...]
    mode: str
    factors: tuple[float, ...]
    adapter_names: tuple[str, ...]
    config: dict | None = None        # config.json to write (None: copy the base's as is)
    index: dict | None = None         # model.safetensors.index.json to write, when the base has one
    max_shard_size: int | None = None  # --max-shard-size: files regrouped as HF does (shards.py)
    warnings: tuple[str, ...] = field(default_factory=tuple)

    @property
    def jobs(self) -> list[Job]:
        return [j for f in self.files for j in f.jobs]

    @property
    def size(self) -> int:
        return sum(f.size for f in self.files)


def _numel(shape) -> int:
    n = 1
    for s in shape:
        n *= s
    return n
