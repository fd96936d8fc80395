"""Saved copies of the training base (``adaptertools/copies.py``) against the base checkpoint's
stored tensors: ``copy_matches_base`` reads the one tensor and compares (``same_weight``, or
``same_as_quantized`` for a GGUF block type); ``copy_note`` words the merge's warning.
"""

from __future__ import annotations

from pathlib import Path

import torch

from ..copies import same_weight
from ..tensor_index import entry_rows, read_entry

COMPARE_BYTES = 4 << 20           # base bytes read and compared at a time


def copy_matches_base(copy: torch.Tensor, checkpoint, entry) -> bool | None:
    """``same_weight(copy, the stored tensor of entry)``, reading that one tensor of the base
    (an HF checkpoint or a GGUF model); for a block-quantized GGUF tensor
    ``same_as_quantized``. None when the two cannot be compared (a packed bitsandbytes weight,
    a GGUF type adaptertools cannot write)."""
    from ..dtypes import TORCH_DTYPES

    path = Path(checkpoint.path) if checkpoint.kind == "gguf" else \
        Path(checkpoint.folder) / entry.file
    if tuple(copy.shape) != tuple(entry.shape):
        return False
    if entry.dtype in TORCH_DTYPES:      # row blocks: memory stays at a few MB per block
        rows = entry_rows(entry)
        row_bytes = entry.nbytes // max(rows, 1)
        step = max(1, COMPARE_BYTES // max(row_bytes, 1))
        flat = copy.reshape(rows, -1)
        for start in range(0, rows, step):
            stop = min(rows, start + step)
            stored = read_entry(path, entry, start=start, stop=stop)   # (stop - start, ...)
            if not same_weight(flat[start:stop], stored.reshape(stop - start, -1)):
                return False
        return True
    if checkpoint.kind != "gguf" or len(entry.shape) != 2 or not copy.is_floating_point():
        return None
    from ..kernels.quant.types import resolve

    kind = resolve(entry.dtype)
    if not kind.requantizable or entry.shape[-1] % kind.block:
        return None
    return same_as_quantized(copy, read_entry(path, entry), entry.dtype, kind.block)


def same_as_quantized(copy: torch.Tensor, raw: torch.Tensor, type_name: str, block: int) -> bool:
    """The GGUF form of ``same_weight``, for a base stored in a block type (rows, cols): the
    copy quantized to that type gives the base's bytes; or, since a 16-bit copy and the base
    are two roundings of one weight in different codecs, every element of the base lies within
    twice the largest error storing the copy's block in that type makes, plus one step of the
    copy's dtype (changed rows or tokens move elements by far more than one quantization step)."""
    from ..kernels.quant.codec import dequantize, quantize

    x = copy.to(torch.float32)
    encoded = quantize(x, type_name)
    if encoded.numel() * encoded.element_size() == raw.numel() and \
            torch.equal(encoded.contiguous().reshape(-1).view(torch.uint8), raw.reshape(-1)):
        return True
    rows, cols = x.shape
    stored = dequantize(raw.reshape(rows, -1), type_name, (rows, cols))
    error = (dequantize(encoded, type_name, (rows, cols)) - x).abs()
    largest = error.reshape(rows, cols // block, block).amax(dim=-1, keepdim=True)
    step = torch.finfo(copy.dtype).eps * x.abs().reshape(rows, cols // block, block)
    return bool(((stored - x).abs().reshape(rows, cols // block, block)
                 <= 2 * largest + step).all())


def copy_note(name: str, adapter_name: str, copy: torch.Tensor, entry, same: bool | None) -> str:
    """The warning for a saved copy that the merge folds into instead of the base's tensor."""
    dtype = str(copy.dtype).removeprefix("torch.")
    if tuple(copy.shape) != tuple(entry.shape):
        why = ("a resized vocabulary: the merged model takes the adapter's rows, and config.json "
               "its vocab_size (pass the resized base to merge into that instead)")
    elif same is None:
        why = f"adaptertools cannot compare it with the base's {entry.dtype} values"
    else:
        why = ("different values (new tokens or a trained embedding), not the same weight in "
               "another dtype")
    return (f"{name}: adapter {adapter_name} carries its own copy of this tensor, shape "
            f"{tuple(copy.shape)} {dtype}, and the base's is {tuple(entry.shape)} {entry.dtype}: "
            f"{why}; the merge uses the adapter's copy, as PEFT does when it loads the adapter")


