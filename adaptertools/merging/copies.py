"""Saved copies of the training base that adapters carry, and when one is the base's own weight.

PEFT saves a targeted embedding's (and lm_head's) weight with the adapter as
``<module>.base_layer.weight`` (``save_embedding_layers="auto"``), in the dtype the adapter was
trained on. The reader keeps it among ``Adapter.replacements`` and lists its name under
``Adapter.metadata["saved_base_copies"]`` (formats/peft.py); a full tensor that the same adapter
also has LoRA factors for is such a copy too (PEFT never trains both on one module).

A copy that is the same weight as the base's tensor (``same_weight``) is not a replacement: the
merge folds into the base's own tensor, with PEFT's roundings (an fp32 copy of a model merged
into its bf16 checkpoint, or a bf16 copy merged into the fp32 one, must not round the result
through the copy's dtype). A copy that really differs (a resized vocabulary, new tokens, a
trained embedding) is what the adapter needs: the merge folds into it, as PEFT does when it
loads the adapter, and says so.
"""

from __future__ import annotations

from pathlib import Path

import torch

from ..adapter import Adapter

SAVED_COPIES = "saved_base_copies"     # Adapter.metadata key (set by formats/peft.py read)

# mantissa bits: how finely each float dtype resolves a value; the coarser dtype has fewer
PRECISION = {torch.float64: 52, torch.float32: 23, torch.float16: 10, torch.bfloat16: 7}
FP16_SUBNORMAL_STEP = 2.0 ** -24
COMPARE_BYTES = 4 << 20           # base bytes read and compared at a time


def saved_copies(adapter: Adapter) -> set[str]:
    """Names among ``adapter.replacements`` that are saved copies of the training base, not
    trained replacements (modules_to_save, trained biases)."""
    marked = adapter.metadata.get(SAVED_COPIES) if isinstance(adapter.metadata, dict) else None
    names = {n for n in marked if isinstance(n, str)} if isinstance(marked, list) else set()
    names |= {n for n in adapter.replacements if n in adapter.weights}
    return names & adapter.replacements.keys()


def coarser(x: torch.dtype, y: torch.dtype) -> torch.dtype:
    """The float dtype of the two with fewer mantissa bits (fp16 vs bf16: bf16)."""
    return x if PRECISION.get(x, 0) <= PRECISION.get(y, 0) else y


def same_weight(copy: torch.Tensor, base: torch.Tensor) -> bool:
    """Is ``copy`` (an adapter's saved copy of its training base) the same weight as ``base``
    (the checkpoint's tensor), only stored in another float dtype?

    The definition: the same shape, and element for element equal once both are rounded (to
    nearest, ties to even, as ``Tensor.to`` does) to the coarser of the two dtypes, the one with
    fewer mantissa bits. So an fp32 copy is the same weight as a bf16 base when it rounds to
    exactly the base's values, and a bf16 copy is the same weight as an fp32 base when the base
    rounds to exactly the copy's values. fp16 and bf16 hold different sets of values (neither
    is a rounding of the other): an fp16 copy rounded to bf16 is a second rounding of the
    common weight and can land one bf16 step away from the base's own rounding; between those
    two, elements also count as equal when they differ by at most one bf16 step at their
    magnitude plus fp16's subnormal step (2^-24). A trained, resized or otherwise changed
    tensor differs by far more than that in some element."""
    if copy.shape != base.shape or not (copy.is_floating_point() and base.is_floating_point()):
        return False
    if copy.dtype not in PRECISION or base.dtype not in PRECISION:
        return False
    target = coarser(copy.dtype, base.dtype)
    c, w = copy.to(target), base.to(target)
    if torch.equal(c, w):
        return True
    if {copy.dtype, base.dtype} != {torch.float16, torch.bfloat16}:
        return False
    c64, w64 = c.double(), w.double()
    _, exponent = torch.frexp(torch.maximum(c64.abs(), w64.abs()))   # m = f * 2^e, f in [0.5, 1)
    step = torch.ldexp(torch.ones_like(c64), exponent - 8)           # bf16: 2^(floor(log2 m) - 7)
    return bool(((c64 - w64).abs() <= step + FP16_SUBNORMAL_STEP).all())


def _raw(path: Path, offset: int, nbytes: int) -> torch.Tensor:
    data = bytearray(nbytes)
    with open(path, "rb") as fh:
        fh.seek(offset)
        if fh.readinto(data) != nbytes:
            raise OSError(f"{path}: unexpected end of file; the file is truncated, download it "
                          "again")
    return torch.frombuffer(data, dtype=torch.uint8) if nbytes else torch.empty(0, dtype=torch.uint8)


def copy_matches_base(copy: torch.Tensor, checkpoint, entry) -> bool | None:
    """``same_weight(copy, the stored tensor of entry)``, reading that one tensor of the base
    (an HF checkpoint or a GGUF model); for a block-quantized GGUF tensor
    ``same_as_quantized``. None when the two cannot be compared (a packed bitsandbytes weight,
    a GGUF type adaptertools cannot write)."""
    from .jobs import TORCH_DTYPES

    path = Path(checkpoint.path) if checkpoint.kind == "gguf" else \
        Path(checkpoint.folder) / entry.file
    if tuple(copy.shape) != tuple(entry.shape):
        return False
    if entry.dtype in TORCH_DTYPES:      # row blocks: memory stays at a few MB per block
        dtype = TORCH_DTYPES[entry.dtype]
        rows = int(entry.shape[0]) if entry.shape else 1
        row_bytes = entry.nbytes // max(rows, 1)
        step = max(1, COMPARE_BYTES // max(row_bytes, 1))
        flat = copy.reshape(rows, -1)
        for start in range(0, rows, step):
            stop = min(rows, start + step)
            raw = _raw(path, entry.offset + start * row_bytes, (stop - start) * row_bytes)
            if not same_weight(flat[start:stop], raw.view(dtype).reshape(stop - start, -1)):
                return False
        return True
    if checkpoint.kind != "gguf" or len(entry.shape) != 2 or not copy.is_floating_point():
        return None
    from ..kernels.quant.types import resolve

    kind = resolve(entry.dtype)
    if not kind.requantizable or entry.shape[-1] % kind.block:
        return None
    return same_as_quantized(copy, _raw(path, entry.offset, entry.nbytes), entry.dtype,
                             kind.block)


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


