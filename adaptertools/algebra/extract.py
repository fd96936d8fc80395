"""LoRA extraction: ``FINETUNED - BASE`` factored tensor by tensor (``adaptertools extract``).

Both HF safetensors checkpoints are indexed from their headers (bases.py) and read one tensor at
a time into fresh buffers (no memory maps), so resident memory is a few tensors, not a model.
Per tensor:

- identical bytes: skipped;
- a LoRA target (by default every 2-D weight but the embeddings; ``targets`` chooses modules
  PEFT-style, by name or dotted suffix): ``delta = tuned - base`` in fp32, truncated by an exact
  or seeded randomized SVD (kernels/lowrank.py) to ``rank`` or to the fewest ranks keeping
  ``energy`` of ``||delta||^2``; the error is measured on the factors as stored;
- any other tensor that differs (norms, biases, embeddings, conv kernels, tensors only the
  fine-tune has) is kept whole, as modules_to_save; a 2-D weight left out of an explicit
  ``targets`` is dropped, with a warning, and counted as lost in the totals.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path

import torch

from ..adapter import Adapter, LoraWeight, module_name
from ..errors import FormatError, UnsupportedError
from ..kernels.fold import all_finite, count_nonfinite
from ..kernels.lowrank import truncate_matrix
from ..merging.bases import HFBase, TensorEntry, open_base
from ..tensor_index import read_entry
from .common import TensorResult, check_factors, tensor_generator

# last component of the module name of input/position embeddings (HF Llama, GPT-2, BLOOM, NeoX, T5)
EMBEDDING_MODULES = ("embed_tokens", "wte", "wpe", "word_embeddings", "embed_in",
                     "embed_positions", "position_embeddings", "shared")
# transformers models whose Linear-like layers are GPT-2 Conv1D, weight stored (in, out)
CONV1D_MODEL_TYPES = ("gpt2",)


@dataclass(frozen=True)
class ExtractOptions:
    rank: int | None = None
    energy: float | None = None
    targets: tuple[str, ...] | None = None   # module names or dotted suffixes; None: default
    svd: str = "auto"
    seed: int = 0
    dtype: torch.dtype = torch.float32       # of the factors


@dataclass(frozen=True)
class Pair:
    """One tensor of the fine-tune and its base counterpart (None: only the fine-tune has it)."""

    name: str
    tuned: TensorEntry
    base: TensorEntry | None
    role: str              # "lora" | "full" | "drop"
    layer: str = "linear"


# ----------------------------------------------------------------------------- reading

def read_float(folder: Path, entry: TensorEntry) -> torch.Tensor:
    """A float tensor of an HF checkpoint in ``folder``, into fresh memory
    (tensor_index.read_entry); other dtypes are refused (extract and DoRA's --materialize
    only do float arithmetic)."""
    return as_float(entry, read_entry(folder / entry.file, entry))


def as_float(entry: TensorEntry, value: torch.Tensor) -> torch.Tensor:
    """``value`` (read_entry's tensor of ``entry``), refused unless a float type."""
    from ..dtypes import TORCH_DTYPES

    if entry.dtype not in TORCH_DTYPES:
        raise UnsupportedError(f"{entry.name}: dtype {entry.dtype} is not a float type read here")
    return value


def same_bytes(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Two stored tensors hold the same bytes (any dtypes and shapes). Compared as 8-byte words
    where the length allows: torch.equal on uint8 takes about 8x as long (46 MB: 8 ms against
    1 ms, which is what the memcmp of two bytearrays took before)."""
    x, y = a.reshape(-1).view(torch.uint8), b.reshape(-1).view(torch.uint8)
    if x.numel() != y.numel():
        return False
    if x.numel() % 8 == 0 and x.storage_offset() % 8 == 0 and y.storage_offset() % 8 == 0:
        x, y = x.view(torch.int64), y.view(torch.int64)
    return torch.equal(x, y)


def check_stored(checkpoint: HFBase, entry: TensorEntry, value: torch.Tensor) -> None:
    """A tensor extract would factor or keep must be finite in the checkpoint it comes from."""
    if not all_finite(value):
        raise FormatError(f"{checkpoint.folder / entry.file}: {entry.name} holds "
                          f"{count_nonfinite(value)} NaN/Inf value(s); the checkpoint is damaged "
                          "(a diverged fine-tune?): save or download it again")


# ----------------------------------------------------------------------------- planning

def is_embedding(name: str) -> bool:
    return module_name(name).rsplit(".", 1)[-1] in EMBEDDING_MODULES


def targeted(name: str, targets: tuple[str, ...]) -> bool:
    module = module_name(name)
    return any(module == t or module.endswith("." + t) for t in targets)


def role_of(name: str, shape: tuple[int, ...], targets: tuple[str, ...] | None) -> str:
    """lora, full (modules_to_save) or drop, from the name and shape alone."""
    factorable = len(shape) == 2 and name.endswith(".weight")
    if targets is None:
        return "lora" if factorable and not is_embedding(name) else "full"
    if factorable and targeted(name, targets):
        return "lora"
    return "drop" if factorable and not is_embedding(name) else "full"


def pair_tensors(base: HFBase, tuned: HFBase, targets: tuple[str, ...] | None) -> list[Pair]:
    """Every tensor of the fine-tune, in its file order, with its role; shapes checked."""
    base_entries = base.entries()
    conv1d = tuned.config.get("model_type") in CONV1D_MODEL_TYPES
    pairs = []
    for file in tuned.files:
        for entry in file.tensors:
            other = base_entries.get(entry.name)
            if other is not None and tuple(other.shape) != tuple(entry.shape):
                raise UnsupportedError(
                    f"{entry.name}: shape {tuple(entry.shape)} in {tuned.folder} but "
                    f"{tuple(other.shape)} in {base.folder}; extract needs two checkpoints of "
                    "one architecture (a resized vocabulary cannot be a LoRA)")
            role = role_of(entry.name, tuple(entry.shape), targets)
            if other is None:
                role = "full"
            layer = "embedding" if is_embedding(entry.name) else \
                ("conv1d" if conv1d else "linear")
            pairs.append(Pair(entry.name, entry, other, role, layer))
    if targets is not None and not any(p.role == "lora" for p in pairs):
        names = sorted({module_name(p.name).rsplit(".", 1)[-1] for p in pairs
                        if len(p.tuned.shape) == 2})
        raise UnsupportedError(f"--targets {','.join(targets)} matches no 2-D weight of "
                               f"{tuned.folder}; its 2-D weights belong to modules named "
                               f"{', '.join(names[:12])}")
    return pairs


# ----------------------------------------------------------------------------- extracting

def factor_delta(pair: Pair, delta: torch.Tensor, options: ExtractOptions):
    """LoraWeight (scale 1) for ``delta`` (rows, cols) fp32, and its TensorResult.
    ``delta`` is overwritten with the residual."""
    wide = truncate_matrix(delta, rank=options.rank, energy=options.energy, svd=options.svd,
                           generator=tensor_generator(options.seed, pair.name))
    b, a = wide[0].to(options.dtype), wide[1].to(options.dtype)
    check_factors(pair.name, b, a, wide, cause="the fine-tune's change is too large for it")
    norm = float(torch.linalg.vector_norm(delta))
    delta.addmm_(b.to(delta.dtype), a.to(delta.dtype), alpha=-1)      # the residual, in place
    error = float(torch.linalg.vector_norm(delta))
    lora = LoraWeight(a=a, b=b, scale=1.0, layer=pair.layer)
    return lora, TensorResult(pair.name, tuple(pair.tuned.shape), lora.rank, norm, error)


def extract_pair(base: HFBase, tuned: HFBase, pair: Pair, options: ExtractOptions):
    """(kind, value, result) for one tensor: kind lora | full | drop | same."""
    raw = read_entry(tuned.folder / pair.tuned.file, pair.tuned)
    if pair.base is None:
        value = as_float(pair.tuned, raw)
        check_stored(tuned, pair.tuned, value)
        norm = float(torch.linalg.vector_norm(value, dtype=torch.float64))
        note = "only in the fine-tune: kept whole (modules_to_save)"
        return "full", value, TensorResult(pair.name, tuple(pair.tuned.shape), None, norm, 0.0,
                                           note)
    old = read_entry(base.folder / pair.base.file, pair.base)
    if pair.base.dtype == pair.tuned.dtype and same_bytes(old, raw):
        return "same", None, None
    value = as_float(pair.tuned, raw)
    wide = torch.float64 if value.dtype == torch.float64 else torch.float32
    delta = value.to(wide, copy=True).sub_(as_float(pair.base, old))
    if pair.role != "drop" and not all_finite(delta):    # an SVD of NaN fails to converge
        check_stored(tuned, pair.tuned, value)
        check_stored(base, pair.base, old)
        raise UnsupportedError(f"{pair.name}: the difference between {tuned.folder} and "
                               f"{base.folder} overflows {wide}; these are not two checkpoints "
                               "of one model")
    del old
    shape = tuple(pair.tuned.shape)
    if pair.role == "lora":
        lora, result = factor_delta(pair, delta, options)
        return "lora", lora, result
    norm = float(torch.linalg.vector_norm(delta))
    if pair.role == "drop":
        return "drop", None, TensorResult(pair.name, shape, 0, norm, norm,
                                          "not in --targets: left out")
    return "full", value, TensorResult(pair.name, shape, None, norm, 0.0,
                                       "kept whole (modules_to_save)")


def extract_checkpoints(base_path: str | os.PathLike, tuned_path: str | os.PathLike,
                        options: ExtractOptions, *, progress=None):
    """(Adapter, results, warnings): the LoRA of ``tuned - base``, streamed tensor by tensor."""
    base, tuned = open_base(base_path), open_base(tuned_path)
    for path, checkpoint in ((base_path, base), (tuned_path, tuned)):
        if checkpoint.kind != "safetensors":
            raise UnsupportedError(f"{path}: extract reads HF safetensors checkpoints; convert "
                                   "this GGUF model to HF first")
    pairs = pair_tensors(base, tuned, options.targets)
    if callable(getattr(progress, "start", None)):
        progress.start(sum(p.tuned.nbytes + (p.base.nbytes if p.base else 0) for p in pairs))
    weights, replacements, results, dropped = {}, {}, [], 0
    for pair in pairs:
        kind, value, result = extract_pair(base, tuned, pair, options)
        if callable(progress):
            progress(pair.tuned.nbytes + (pair.base.nbytes if pair.base else 0))
        if kind == "same":
            continue
        results.append(result)
        if kind == "lora":
            weights[pair.name] = value
        elif kind == "full":
            replacements[pair.name] = value
        else:
            dropped += 1
    if not results:
        raise UnsupportedError(f"{tuned_path}: every tensor equals the base's; there is nothing "
                               "to extract")
    warnings = [f"{dropped} differing 2-D weight(s) are not in --targets and were left out"] \
        if dropped else []
    missing = sorted(base.entries().keys() - {p.name for p in pairs})
    if missing:
        warnings.append(f"{len(missing)} tensor(s) of the base are not in the fine-tune (e.g. "
                        f"{missing[0]}); an adapter cannot remove them")
    name = base_name(base_path, base.config)
    metadata = {"source_format": "adaptertools.extract", "peft_config": _peft_config(tuned)}
    return Adapter(weights, replacements, name, metadata), results, warnings


HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")


def base_name(path: str | os.PathLike, config: dict) -> str:
    """The extracted adapter's base (PEFT's base_model_name_or_path), usable from anywhere: the
    Hub id of a Hub snapshot (the Hugging Face cache's ``models--OWNER--NAME/snapshots/COMMIT``),
    else the Hub id the config names (``_name_or_path``), else the absolute path."""
    resolved = Path(os.path.abspath(Path(path).expanduser()))   # a snapshot's files are links
    parts = resolved.parts
    for i, part in enumerate(parts[:-2]):
        if part.startswith("models--") and parts[i + 1] == "snapshots" and part[8:]:
            return part[len("models--"):].replace("--", "/", 1)    # (ids never hold "--")
    named = config.get("_name_or_path")
    if isinstance(named, str) and HUB_ID.fullmatch(named) and not os.path.exists(named):
        return named
    return str(resolved)


def _peft_config(tuned: HFBase) -> dict:
    from ..formats.peft import DEFAULT_CONFIG

    causal = any(str(a).endswith("ForCausalLM") for a in tuned.config.get("architectures") or [])
    return dict(DEFAULT_CONFIG, task_type="CAUSAL_LM" if causal else None)
