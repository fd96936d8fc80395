"""bitsandbytes checkpoints as a codec: HF safetensors folders whose config.json carries a
bitsandbytes ``quantization_config`` (4-bit NF4/FP4, with or without double quantization, any
blocksize; 8-bit LLM.int8 with ``SCB``).

A quantized weight is the packed weight and its quant state (layout: ``kernels/quant/
bnb_state.py``): ``absmax``, ``quant_map``, ``nested_*``, the JSON ``quant_state.bitsandbytes__*``;
or ``SCB`` and ``weight_format`` for int8. ``describe`` validates every weight from the headers and
the small JSON states (no weight data). Requantizing keeps the quant type, blocksize, codes and the
double quantization's offset (a free parameter), so the JSON state stays byte for byte; only the
weight and ``absmax`` / ``nested_absmax`` / ``SCB`` change.
"""

from __future__ import annotations

from dataclasses import replace

import torch

from ..dtypes import STORED_TORCH_DTYPES
from ..errors import FormatError, UnsupportedError
from . import Encoding

NAME = "bitsandbytes"
QUANT_METHODS = ("bitsandbytes",)
QUANT_STATE = ".quant_state.bitsandbytes__"
COMPANIONS_4BIT = (".absmax", ".quant_map", ".nested_absmax", ".nested_quant_map")
DAMAGED = ("the checkpoint is damaged: download it again, or quantize and save it again with "
           "bitsandbytes (transformers' save_pretrained)")


# ----------------------------------------------------------------------------- plan time

def describe(entries, config: dict, read, where: str) -> list[Encoding]:
    """Every 4-bit and int8 weight of the checkpoint (orphaned quant states included, so that
    they are reported rather than ignored)."""
    four, eight = _check_config(config, where)
    found: dict[str, Encoding] = {}
    for name in sorted(_weights_4bit(entries, four)):
        found[name] = _encoding_4bit(entries, name, read)
    for name in sorted(_weights_int8(entries, eight)):
        if name in found:
            raise FormatError(f"{entries[name].file}: {name} has both a 4-bit quant state and an "
                              f"int8 SCB; {DAMAGED}")
        found[name] = _encoding_int8(entries, name, read)
    return list(found.values())


def _check_config(qc: dict, where: str) -> tuple[bool, bool]:
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


def _weights_4bit(entries, four: bool) -> set[str]:
    names = set()
    for name, entry in entries.items():
        if QUANT_STATE in name:
            names.add(name.split(QUANT_STATE)[0])
        elif name.endswith(COMPANIONS_4BIT):
            names.add(name[: name.rfind(".")])
        elif four and entry.dtype == "U8" and name.endswith(".weight"):
            names.add(name)
    return names


def _weights_int8(entries, eight: bool) -> set[str]:
    names = set()
    for name, entry in entries.items():
        if name.endswith(".SCB"):
            names.add(name[: -len("SCB")] + "weight")
        elif eight and entry.dtype == "I8" and name.endswith(".weight"):
            names.add(name)
    return names


def _meta(entry) -> torch.Tensor:
    return torch.empty(entry.shape, dtype=STORED_TORCH_DTYPES.get(entry.dtype, torch.uint8), device="meta")


def _module(name: str) -> str:
    return name.removesuffix("weight")


def _encoding_4bit(entries, name: str, read) -> Encoding:
    from ..kernels.quant import bnb as codec

    keys = [name, *(name + s for s in COMPANIONS_4BIT),
            *(f"{name}{QUANT_STATE}{t}" for t in ("nf4", "fp4"))]
    members = {k: entries[k] for k in keys if k in entries}
    file = entries[name].file if name in entries else next(iter(members.values())).file
    if name in entries and entries[name].dtype != "U8":
        raise UnsupportedError(f"{file}: {name} is a bitsandbytes 4-bit weight stored as "
                               f"{entries[name].dtype}; only uint8 storage is supported")
    tensors = {k: read(e) if QUANT_STATE in k else _meta(e) for k, e in members.items()}
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
    return Encoding(NAME, state.quant_type.upper(), name, tuple(state.shape), tuple(members))


def _encoding_int8(entries, name: str, read) -> Encoding:
    from ..kernels.quant import bnb as codec

    module = _module(name)
    keys = [name, module + "SCB", module + "weight_format"]
    members = {k: entries[k] for k in keys if k in entries}
    file = next(iter(members.values())).file
    tensors = {k: read(e) if k.endswith("weight_format") else _meta(e)
               for k, e in members.items()}
    try:
        codec.int8_from_tensors(tensors, name)
    except FormatError as e:
        raise FormatError(f"{file}: {e}; {DAMAGED}") from None
    return Encoding(NAME, "INT8", name, tuple(entries[name].shape), tuple(members))


# ----------------------------------------------------------------------------- run time

def decode(encoding: Encoding, tensors) -> tuple[torch.Tensor, object]:
    """(fp32 weight (rows, cols), the 4-bit quant state or None for int8)."""
    from ..kernels.quant import bnb as codec

    if encoding.type == "INT8":
        cb, scb = codec.int8_from_tensors(tensors, encoding.name)
        return codec.dequantize_int8(cb, scb), None
    packed, state = codec.state_from_tensors(tensors, encoding.name)
    _check_codes(state, encoding.name)
    return codec.dequantize_4bit(packed, state), state


def encode(encoding: Encoding, values: torch.Tensor, state) -> tuple[dict, torch.Tensor]:
    """(the changed tensors: weight and absmax / nested_absmax / SCB, their realized values)."""
    from ..kernels.quant import bnb as codec

    if encoding.type == "INT8":
        cb, scb = codec.quantize_int8(values)
        return {encoding.name: cb, _module(encoding.name) + "SCB": scb}, \
            codec.dequantize_int8(cb, scb)
    packed, new_state = _quantize_4bit(values, state)
    changed = {encoding.name: packed, f"{encoding.name}.absmax": new_state.absmax}
    if state.nested:
        changed[f"{encoding.name}.nested_absmax"] = new_state.nested_absmax
    return changed, codec.dequantize_4bit(packed, new_state)


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
