"""Tiny safetensors checkpoints: a bf16 Llama base in three shards with an index, and one stored
tensor read or overwritten in place (a corrupted merge), by the entry the base reader finds."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from adaptertools.dtypes import TORCH_DTYPES
from adaptertools.merging.bases import open_base
from adaptertools.tiny import TinyLlama, make_base

SPEC = TinyLlama()                                              # hidden 64, 2 layers
INDEX = "model.safetensors.index.json"
SHARDS = [f"model-{i:05d}-of-00003.safetensors" for i in (1, 2, 3)]


def make_sharded_base(folder: Path, spec: TinyLlama = SPEC) -> Path:
    """``make_base`` re-saved as three shards with an index, as ``save_pretrained`` writes them."""
    make_base(folder, spec, dtype=torch.bfloat16)
    tensors = load_file(folder / "model.safetensors")
    (folder / "model.safetensors").unlink()
    names = list(spec.shapes())                         # checkpoint order
    per = -(-len(names) // len(SHARDS))
    weight_map = {}
    for i, shard in enumerate(SHARDS):
        part = {n: tensors[n] for n in names[i * per:(i + 1) * per]}
        save_file(part, folder / shard, metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(part, shard))
    total = sum(t.numel() * t.element_size() for t in tensors.values())
    (folder / INDEX).write_text(json.dumps({"metadata": {"total_size": total},
                                            "weight_map": weight_map}, indent=2))
    return folder


def read(checkpoint: Path, name: str) -> torch.Tensor:
    entry = open_base(checkpoint).entries()[name]
    path = checkpoint if checkpoint.is_file() else checkpoint / entry.file
    with open(path, "rb") as fh:
        fh.seek(entry.offset)
        data = bytearray(fh.read(entry.nbytes))
    return torch.frombuffer(data, dtype=TORCH_DTYPES[entry.dtype]).reshape(entry.shape).clone()


def rewrite(checkpoint: Path, name: str, tensor: torch.Tensor) -> None:
    """Overwrite one stored tensor in place (same dtype and shape): a corrupted merge."""
    entry = open_base(checkpoint).entries()[name]
    data = tensor.to(TORCH_DTYPES[entry.dtype]).contiguous().reshape(-1).view(torch.uint8)
    assert data.numel() == entry.nbytes
    path = checkpoint if checkpoint.is_file() else checkpoint / entry.file
    with open(path, "r+b") as fh:
        fh.seek(entry.offset)
        fh.write(data.numpy().tobytes())
