"""bitsandbytes weights as stored in a Hugging Face safetensors checkpoint.

A ``Linear4bit`` weight ``W = "<module>.weight"`` is saved (``QuantState.as_dict(packed=True)``) as::

    W                                   uint8 (ceil(n/2), 1)   packed codes, high nibble first
    W.absmax                            float32 (n_blocks,)    or uint8 codes when double-quantized
    W.quant_map                         float32 (16,)          the NF4/FP4 code
    W.nested_absmax                     float32 (ceil(n_blocks/256),)   only when double-quantized
    W.nested_quant_map                  float32 (256,)                  only when double-quantized
    W.quant_state.bitsandbytes__nf4     uint8 JSON (or __fp4): {"quant_type", "blocksize", "dtype",
                                        "shape", and nested_blocksize, nested_dtype, nested_offset}

``n`` is the number of values of the unquantized weight, ``shape`` in the JSON. A ``Linear8bitLt``
weight is saved as ``W`` int8 (rows, cols), ``<module>.SCB`` float32 (rows,) (absmax per row) and
``<module>.weight_format`` uint8 scalar 0 ("row"). ``config.json`` carries ``quantization_config``.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass

import torch

from ...errors import FormatError

_NESTED_KEYS = ("nested_blocksize", "nested_dtype", "nested_offset")


@dataclass(frozen=True)
class Bnb4bitState:
    """One 4-bit weight's quantization state, as bnb's ``QuantState`` holds it."""

    quant_type: str                 # "nf4" | "fp4"
    blocksize: int                  # values per absmax
    shape: tuple[int, ...]          # the unquantized weight's shape, e.g. (out, in)
    dtype: str                      # the unquantized weight's dtype name: "bfloat16", "float16", "float32"
    absmax: torch.Tensor            # (n_blocks,) float32, or uint8 codes when nested
    quant_map: torch.Tensor         # (16,) float32, the 4-bit code
    nested_absmax: torch.Tensor | None = None     # (ceil(n_blocks / 256),) float32
    nested_quant_map: torch.Tensor | None = None  # (256,) float32, bnb's dynamic 8-bit code
    nested_blocksize: int | None = None           # 256
    nested_offset: float | None = None            # mean of the absmax values, subtracted before coding
    nested_dtype: str | None = None               # "float32"

    @property
    def nested(self) -> bool:
        return self.nested_absmax is not None


def _qs_key(tensors: Mapping[str, torch.Tensor], name: str) -> str:
    keys = [f"{name}.quant_state.bitsandbytes__{t}" for t in ("nf4", "fp4")]
    found = [k for k in keys if k in tensors]
    if len(found) != 1:
        raise FormatError(f"bitsandbytes 4-bit weight {name!r}: expected exactly one of {keys}, found "
                          f"{found or 'none'}; the checkpoint is not a bnb 4-bit one or is damaged")
    return found[0]


def _need(tensors: Mapping[str, torch.Tensor], key: str, name: str) -> torch.Tensor:
    if key not in tensors:
        raise FormatError(f"bitsandbytes 4-bit weight {name!r}: tensor {key!r} is missing")
    return tensors[key]


def state_from_tensors(tensors: Mapping[str, torch.Tensor], name: str) -> tuple[torch.Tensor, Bnb4bitState]:
    """(packed weight, state) of the 4-bit weight ``name`` from a checkpoint's tensors (checked)."""
    key = _qs_key(tensors, name)
    try:
        meta = json.loads(bytes(tensors[key].to("cpu", torch.uint8).reshape(-1).tolist()).decode("utf-8"))
        quant_type, blocksize = meta["quant_type"], int(meta["blocksize"])
        shape, dtype = tuple(int(s) for s in meta["shape"]), str(meta["dtype"])
    except (ValueError, KeyError, TypeError, RecursionError) as e:   # (JSON nested too deeply)
        raise FormatError(f"bitsandbytes 4-bit weight {name!r}: corrupted quant state {key!r} ({e})") from None
    if key.rsplit("__", 1)[1] != quant_type:
        raise FormatError(f"bitsandbytes 4-bit weight {name!r}: {key!r} says quant_type {quant_type!r}")
    packed = _need(tensors, name, name)
    absmax = _need(tensors, f"{name}.absmax", name)
    quant_map = _need(tensors, f"{name}.quant_map", name)
    nested = {}
    if f"{name}.nested_absmax" in tensors or "nested_offset" in meta:
        try:
            nested = {"nested_absmax": _need(tensors, f"{name}.nested_absmax", name),
                      "nested_quant_map": _need(tensors, f"{name}.nested_quant_map", name),
                      "nested_blocksize": int(meta["nested_blocksize"]),
                      "nested_dtype": str(meta["nested_dtype"]),
                      "nested_offset": float(meta["nested_offset"])}
        except (KeyError, ValueError, TypeError) as e:
            raise FormatError(f"bitsandbytes 4-bit weight {name!r}: corrupted nested quant state ({e})") from None
    state = Bnb4bitState(quant_type, blocksize, shape, dtype, absmax, quant_map, **nested)
    _validate(packed, state, name)
    return packed, state


def _validate(packed: torch.Tensor, s: Bnb4bitState, name: str) -> None:
    n = 1
    for d in s.shape:
        n *= d
    blocks = -(-n // s.blocksize) if s.blocksize > 0 else -1
    problems = []
    if packed.numel() * packed.element_size() != -(-n // 2):
        problems.append(f"packed weight has {packed.numel() * packed.element_size()} bytes, shape {s.shape} "
                        f"needs {-(-n // 2)}")
    if s.absmax.numel() != blocks:
        problems.append(f"absmax has {s.absmax.numel()} values, {blocks} expected for blocksize {s.blocksize}")
    if s.quant_map.numel() != 16:
        problems.append(f"quant_map has {s.quant_map.numel()} values, 16 expected")
    if s.nested:
        nb2 = -(-blocks // s.nested_blocksize) if s.nested_blocksize > 0 else -1
        if s.absmax.dtype != torch.uint8:
            problems.append(f"double-quantized absmax must be uint8, got {s.absmax.dtype}")
        if s.nested_absmax.numel() != nb2:
            problems.append(f"nested_absmax has {s.nested_absmax.numel()} values, {nb2} expected")
        if s.nested_quant_map.numel() != 256:
            problems.append(f"nested_quant_map has {s.nested_quant_map.numel()} values, 256 expected")
    if problems:
        raise FormatError(f"bitsandbytes 4-bit weight {name!r}: inconsistent quant state: " + "; ".join(problems))


def state_to_tensors(packed: torch.Tensor, state: Bnb4bitState, name: str) -> dict[str, torch.Tensor]:
    """The checkpoint tensors of one 4-bit weight, byte-identical to bnb's ``state_dict`` (JSON included)."""
    meta = {"quant_type": state.quant_type, "blocksize": state.blocksize, "dtype": state.dtype,
            "shape": list(state.shape)}
    out = {name: packed, f"{name}.absmax": state.absmax, f"{name}.quant_map": state.quant_map}
    if state.nested:
        out[f"{name}.nested_absmax"] = state.nested_absmax
        out[f"{name}.nested_quant_map"] = state.nested_quant_map
        meta.update(zip(_NESTED_KEYS, (state.nested_blocksize, state.nested_dtype, state.nested_offset)))
    blob = json.dumps(meta).encode("utf-8")
    out[f"{name}.quant_state.bitsandbytes__{state.quant_type}"] = torch.tensor(list(blob), dtype=torch.uint8)
    return out


def _module(name: str) -> str:
    return name.removesuffix("weight")


def int8_from_tensors(tensors: Mapping[str, torch.Tensor], name: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(CB int8 (rows, cols), SCB float32 (rows,)) of the LLM.int8 weight ``name`` (checked)."""
    cb = tensors.get(name)
    scb = tensors.get(_module(name) + "SCB")
    if cb is None or scb is None:
        raise FormatError(f"bitsandbytes 8-bit weight {name!r}: needs {name!r} and {_module(name) + 'SCB'!r}")
    fmt = tensors.get(_module(name) + "weight_format")
    if fmt is not None and int(fmt.reshape(-1)[0]) != 0:
        raise FormatError(f"bitsandbytes 8-bit weight {name!r}: weight_format {int(fmt.reshape(-1)[0])} is not "
                          f"row-major (0); re-save it with bitsandbytes >= 0.45")
    if cb.dtype != torch.int8 or cb.dim() != 2 or scb.numel() != cb.shape[0]:
        raise FormatError(f"bitsandbytes 8-bit weight {name!r}: expected int8 (rows, cols) and SCB (rows,), "
                          f"got {cb.dtype} {tuple(cb.shape)} and SCB {tuple(scb.shape)}")
    return cb, scb


def int8_to_tensors(cb: torch.Tensor, scb: torch.Tensor, name: str) -> dict[str, torch.Tensor]:
    """The checkpoint tensors of one LLM.int8 weight, as ``Linear8bitLt.state_dict()`` writes them."""
    return {name: cb, _module(name) + "SCB": scb, _module(name) + "weight_format": torch.tensor(0, dtype=torch.uint8)}
