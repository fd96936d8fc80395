"""llama.cpp LoRA adapters (``general.type = adapter``), read and written through gguf-py.

Layout llama.cpp expects (src/llama-adapter.cpp, FORMATS.md):
- ``<gguf name>.lora_a`` (r, in) and ``.lora_b`` (out, r), numpy order, for the base tensor
  ``<gguf name>`` of shape (out, in); ``token_embd.weight.lora_a`` is (vocab, r) and its
  ``lora_b`` (dim, r) (see ``llm_build_inp_embd``).
- one ``adapter.lora.alpha`` (float32) for the file; llama.cpp scales each tensor by
  ``alpha / rank`` with rank = ``lora_b.shape[1]``.

Scale fidelity: the file's alpha is the most common ``scale * rank`` over the tensors; every
tensor whose own ``scale * rank`` differs gets the ratio folded into B, so llama.cpp computes
each tensor's exact scale (rsLoRA, rank_pattern and alpha_pattern included). The exact float64
scales, the folds, the HF names and the base's head counts are also stored under the
``adaptertools.lora`` key, so reading our own files back is exact and needs no ``--base``.
"""

from __future__ import annotations

import json
import math
from collections import Counter
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from .. import dtypes
from .._io import check_fits_in_memory
from ..adapter import Adapter, LoraWeight, check_cast, check_weight
from ..errors import FormatError, OptionError, UnsupportedError
from .accounting import check_factors, invocation_tokens
from .gguf_experts import (
    check_param_shape,
    gguf_view,
    is_param,
    param_weight,
    per_expert_names,
    regroup,
    to_gguf_expert_factors,
)
from .names import (
    TRANSPOSED_ARCHS,
    BaseInfo,
    check_runtime_lora,
    field_value,
    from_gguf_rows,
    gguf_to_hf_name,
    hf_to_gguf_name,
    open_gguf,
    read_base_tensor,
    to_gguf_rows,
)
from .peft_keys import base_layer_layout

if TYPE_CHECKING:     # imported where used: the light path (light/) reads and writes without it
    import torch

DESCRIPTION = "llama.cpp GGUF LoRA adapter (needs --base for foreign files and for writing)"
SNIFF_ORDER = 20
OUTPUT_IS_DIR = False
META_KEY = "adaptertools.lora"
TOKEN_EMBD = "token_embd.weight"
DTYPES = ("keep", "fp32", "fp16", "bf16", "q8_0")
MERGE_INSTEAD = "merge it into the base model instead (`adaptertools merge`)"


def sniff(path: Path) -> bool:
    path = Path(path)
    if not path.is_file():
        return False
    with open(path, "rb") as fh:
        return fh.read(4) == b"GGUF"


# ----------------------------------------------------------------------------- write

def _check_expressible(adapter: Adapter, base: BaseInfo) -> None:
    for name, w in adapter.weights.items():
        if w.magnitude is not None:
            raise UnsupportedError(f"{name}: DoRA cannot be expressed in a GGUF LoRA (llama.cpp "
                                   f"has no magnitude vectors); {MERGE_INSTEAD}")
        if w.bias is not None:
            raise UnsupportedError(f"{name}: lora_bias cannot be expressed in a GGUF LoRA; "
                                   f"{MERGE_INSTEAD}")
        if w.layer == "conv":
            raise UnsupportedError(f"{name}: convolution LoRA has no GGUF form")
        if base.tied_embeddings and (name == "lm_head.weight" or w.layer == "embedding"):
            # llama.cpp stores the tied matrix once, as token_embd, and looks LoRAs up by name:
            # an lm_head LoRA is dropped silently, an embedding LoRA is applied to the output
            # projection too (and aborts llama.cpp, its A being stored transposed there)
            raise UnsupportedError(f"{name}: the base ties lm_head to the token embedding, which "
                                   "llama.cpp stores once as token_embd; a LoRA on either side "
                                   f"cannot be expressed there; {MERGE_INSTEAD} (it unties them)")
    from ..copies import same_weight

    for name, tensor in adapter.replacements.items():
        _torch_folds(tensor, name)      # (copies.same_weight compares in torch)
        # PEFT saves a targeted embedding's untouched base weights too (save_embedding_layers);
        # a copy that is the base's own weight (in any float dtype: copies.same_weight)
        # changes nothing and is dropped, anything else is refused
        original = read_base_tensor(base, name)
        if original is not None and same_weight(tensor, original):
            continue
        hint = "" if base.weights_folder else " (or pass --base with the model's weights if it " \
                                             "is an unchanged copy of the base tensor)"
        raise UnsupportedError(f"{name}: full replacement tensors (modules_to_save) cannot be "
                               f"stored in a GGUF LoRA; {MERGE_INSTEAD}{hint}")


def to_gguf_factors(name: str, w: LoraWeight, base: BaseInfo) -> tuple[torch.Tensor, torch.Tensor]:
    """(lora_a, lora_b) in llama.cpp's orientation, from the stored-HF-layout factors."""
    if w.layer == "embedding":
        return w.b, w.a.T                       # (vocab, r), (dim, r)
    if w.layer == "conv1d":                     # HF (in, out) -> GGUF (out, in): transpose delta
        a, b = w.b.T, w.a.T                     # (r, in), (out, r)
    else:
        a, b = w.a, w.b
    # rows of the delta are rows of B: RoPE permutation, fused q/k/v regrouped
    return a, to_gguf_rows(name, base, b)


def from_gguf_factors(hf_name: str, gguf_name: str, lora_a: torch.Tensor, lora_b: torch.Tensor,
                      base: BaseInfo) -> tuple[torch.Tensor, torch.Tensor, str]:
    """The exact inverse of to_gguf_factors: (a, b, layer kind) in the stored-HF layout."""
    if gguf_name == TOKEN_EMBD:
        return lora_b.T, lora_a, "embedding"
    lora_b = from_gguf_rows(hf_name, base, lora_b)
    if base.arch == "gpt2" and not hf_name.endswith(("wte.weight", "lm_head.weight")):
        return lora_b.T, lora_a.T, "conv1d"
    return lora_a, lora_b, "linear"


def unfold(folded: torch.Tensor, fold: float) -> torch.Tensor:
    return (folded.double() / fold).to(folded.dtype)


def restore_list(original: torch.Tensor, folded: torch.Tensor, fold: float) -> list[list[int]]:
    """[flat index, bit pattern] of the few values that ``unfold(fold(x))`` does not give back.

    Dividing a rounded product by the same factor recovers x in all but a few elements; storing
    those few bit patterns makes GGUF -> PEFT bit-exact even for folded tensors.
    """
    import torch

    bits = dtypes.SAME_WIDTH_INTS[original.dtype]
    back = unfold(folded, fold).reshape(-1).view(bits)
    want = original.reshape(-1).view(bits)
    wrong = torch.nonzero(back != want).reshape(-1)
    return [[int(i), int(want[i])] for i in wrong]


def apply_restore(tensor: torch.Tensor, restore: list[list[int]], where: str = "") -> torch.Tensor:
    import torch

    SAME_WIDTH_INTS = dtypes.SAME_WIDTH_INTS
    if not restore or tensor.dtype not in SAME_WIDTH_INTS:
        return tensor
    flat = tensor.contiguous().reshape(-1).clone()
    info = torch.iinfo(SAME_WIDTH_INTS[tensor.dtype])
    if not all(0 <= i < flat.numel() and info.min <= b <= info.max for i, b in restore):
        raise FormatError(f"{where}a `restore` entry of `{META_KEY}` lies outside its tensor "
                          f"({flat.numel()} values of {tensor.dtype}); the file was damaged, "
                          "convert it again")
    index = torch.tensor([i for i, _ in restore], dtype=torch.long)
    ints = SAME_WIDTH_INTS[tensor.dtype]
    flat.view(ints)[index] = torch.tensor([b for _, b in restore], dtype=ints)
    return flat.reshape(tensor.shape)


def _torch_folds(tensor, name: str) -> None:
    """A fold rounds (float64 product to the stored dtype, Tensor.to's rounding): torch's."""
    from ..light.arrays import NeedsTorch, is_stored

    if is_stored(tensor):
        raise NeedsTorch(f"{name}: a fold")


def _file_alpha(adapter: Adapter) -> float:
    products = Counter(w.scale * w.rank for w in adapter.weights.values())
    return products.most_common(1)[0][0] if products else 1.0


# the GGML type of each float dtype a factor is stored in (torch's names); others (float64): F32
GGML_FLOATS = {"float32": "F32", "float16": "F16", "bfloat16": "BF16"}


def _tensor_type(dtype: str, source: str, row: int):
    """The GGML type of a factor of the float dtype ``source`` (torch's name) at ``--dtype``."""
    import gguf

    T = gguf.GGMLQuantizationType
    if dtype == "q8_0":
        block = gguf.GGML_QUANT_SIZES[T.Q8_0][0]
        return T.Q8_0 if row % block == 0 else T.F16
    wanted = (dtypes.CONFIG_DTYPES[dtypes.DTYPE_NAMES[dtype]] if dtype in dtypes.DTYPE_NAMES
              else source)
    return T[GGML_FLOATS.get(wanted, "F32")]


def _add_tensor(writer, name: str, tensor: torch.Tensor, dtype: str) -> str:
    """Add one factor, a torch tensor or the light path's Stored (light/arrays.py casts as
    Tensor.to rounds; Q8_0 is gguf-py's numpy code for both)."""
    import gguf

    from ..light.arrays import FLOAT_MAX, Stored, cast, float32_values, is_stored

    T = gguf.GGMLQuantizationType
    kind = _tensor_type(dtype, str(tensor.dtype).removeprefix("torch."), int(tensor.shape[-1]))
    tensor = tensor.contiguous()
    light = is_stored(tensor)
    if kind == T.Q8_0:
        with np.errstate(over="ignore", invalid="ignore"):     # check_cast below says it
            data = gguf.quants.quantize(float32_values(tensor) if light
                                        else tensor.float().numpy(), T.Q8_0)
            values = gguf.quants.dequantize(data, T.Q8_0)     # fp16 scales
        if light:
            stored = Stored(values, "float32")
        else:
            import torch

            stored = torch.from_numpy(values)
    elif light:
        stored = cast(tensor, {v: k for k, v in GGML_FLOATS.items()}[kind.name])
        data = stored.words                                   # bf16: the raw 16-bit words
    else:
        import torch

        if kind == T.BF16:
            stored = tensor.to(torch.bfloat16)
            data = stored.view(torch.int16).numpy().view(np.uint16)
        else:
            stored = tensor.to(torch.float32 if kind == T.F32 else torch.float16)
            data = stored.numpy()
    # Q8_0: 8-bit codes times an fp16 scale per block of 32
    check_cast(name, tensor, stored, kind.name,
               most=127 * FLOAT_MAX["float16"] if kind == T.Q8_0 else None)
    writer.add_tensor(name, data, raw_dtype=kind)
    return kind.name


def write(adapter: Adapter, path: Path, *, base: BaseInfo | None = None, dtype: str = "keep") -> None:
    import gguf

    base = base or _base_from_metadata(adapter.metadata)
    if base is None:
        raise FormatError("writing a GGUF adapter needs the base model's architecture and head "
                          "counts: pass --base (the HF model folder, its config.json, or a GGUF "
                          "model file)")
    if dtype not in DTYPES:
        raise OptionError(f"unknown GGUF dtype {dtype!r}; choose one of {', '.join(DTYPES)}")
    # PEFT lays each GPT-2 layer out by its type, whatever the config's fan_in_fan_out says
    adapter = replace(adapter, weights={n: base_layer_layout(n, w, base.arch)
                                        for n, w in adapter.weights.items()})
    _check_expressible(adapter, base)
    alpha = _file_alpha(adapter)
    writer = gguf.GGUFWriter(str(path), base.arch)
    writer.add_type(gguf.GGUFType.ADAPTER)
    writer.add_string(gguf.Keys.Adapter.TYPE, "lora")
    writer.add_float32(gguf.Keys.Adapter.LORA_ALPHA, alpha)
    if adapter.base_model:
        writer.add_base_model_count(1)
        writer.add_base_model_name(0, adapter.base_model)
    tokens = invocation_tokens(adapter)
    if tokens:
        writer.add_key_value(gguf.Keys.Adapter.ALORA_INVOCATION_TOKENS, [int(t) for t in tokens],
                             gguf.GGUFValueType.ARRAY, gguf.GGUFValueType.UINT32)
    entries = {}
    for name, w in adapter.weights.items():   # not `path`: that is the temporary output
        if is_param(w):
            check_param_shape(name, w, base)
        else:
            check_base_shape("", name, w, base)
    view, origin = gguf_view(adapter.weights, base)     # MoE experts: gguf_experts.py
    for name, w in view.items():
        check_runtime_lora(name, base)          # llama.cpp would load it and drop it
        gguf_name = hf_to_gguf_name(name, base)
        lora_a, lora_b = (to_gguf_expert_factors(w) if is_param(w)
                          else to_gguf_factors(name, w, base))
        fold = w.scale * w.rank / alpha
        entry = {"name": name, "scale": w.scale, "fold": fold, **origin.get(name, {})}
        if fold != 1.0:  # llama.cpp applies alpha / rank: carry the rest in B
            _torch_folds(lora_b, name)
            folded = (lora_b.double() * fold).to(lora_b.dtype)
            if dtype in ("keep", dtypes.OPTION_NAMES.get(lora_b.dtype)):
                entry["restore"] = restore_list(lora_b, folded, fold)
            lora_b = folded
        entry["types"] = [_add_tensor(writer, f"{gguf_name}.lora_a", lora_a, dtype),
                          _add_tensor(writer, f"{gguf_name}.lora_b", lora_b, dtype)]
        entries[gguf_name] = entry
    info = {"tensors": entries, "base": base.to_json(), "metadata": adapter.metadata,
            "base_model": adapter.base_model}
    writer.add_string(META_KEY, json.dumps(info, sort_keys=True))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


# ----------------------------------------------------------------------------- read

def _base_from_metadata(metadata: dict) -> BaseInfo | None:
    stored = metadata.get("gguf_base")
    return BaseInfo.from_json(stored, "adapter metadata") if isinstance(stored, dict) else None


def _tensor_data(tensor, path: Path, light: bool = False) -> torch.Tensor:
    """A GGUF tensor as torch (``light``: light.arrays.Stored), numpy order, keeping
    F32/F16/BF16 and dequantizing the rest (gguf-py's numpy code, to float32)."""
    import gguf

    T = gguf.GGMLQuantizationType
    shape = tuple(int(s) for s in reversed(tensor.shape))
    if tensor.tensor_type == T.F32:
        values, name = np.array(tensor.data, dtype=np.float32), "float32"
    elif tensor.tensor_type == T.F16:
        values, name = np.array(tensor.data, dtype=np.float16), "float16"
    elif tensor.tensor_type == T.BF16:
        values, name = np.array(tensor.data).view(np.int16), "bfloat16"   # the raw words
    else:
        try:
            values = gguf.quants.dequantize(np.array(tensor.data), tensor.tensor_type)
        except NotImplementedError:
            raise UnsupportedError(f"{path}: {tensor.name} is {tensor.tensor_type.name}, which "
                                   "gguf-py cannot dequantize") from None
        values, name = np.ascontiguousarray(values, dtype=np.float32), "float32"
    if light:
        from ..light.arrays import Stored

        words = values.view(np.uint16) if name == "bfloat16" else values
        return Stored(words.reshape(shape), name)
    import torch

    out = torch.from_numpy(values)
    return (out.view(torch.bfloat16) if name == "bfloat16" else out).reshape(shape)


def _alpha(reader, path: Path) -> float:
    alpha = field_value(reader, "adapter.lora.alpha", 0.0)
    if alpha is None or isinstance(alpha, bool) or not isinstance(alpha, (int, float)):
        raise FormatError(f"{path}: adapter.lora.alpha is {alpha!r}, not a number; the file is "
                          "corrupt, convert it again")
    return float(alpha)


# Our own `adaptertools.lora` entry, per tensor: (check, what is expected).
ENTRY_FIELDS = {
    "name": (lambda v: isinstance(v, str), "a tensor name"),
    "scale": (lambda v: isinstance(v, (int, float)) and not isinstance(v, bool), "a number"),
    "fold": (lambda v: isinstance(v, (int, float)) and not isinstance(v, bool) and v != 0
             and math.isfinite(v), "a finite non-zero number"),
    "restore": (lambda v: isinstance(v, list) and all(
        isinstance(r, list) and len(r) == 2 and all(isinstance(x, int) and not isinstance(x, bool)
                                                    for x in r) for r in v),
        "a list of [index, bits] pairs"),
}


def _own_info(reader, path: Path) -> dict:
    """The `adaptertools.lora` entry of our own files ({} for foreign ones), checked."""
    from .peft import _shown, check_metadata

    text = field_value(reader, META_KEY)
    if text is None:
        return {}
    damaged = "the file was damaged, convert it again"
    try:
        info = json.loads(text) if isinstance(text, str) else None
    except (json.JSONDecodeError, RecursionError):
        info = None
    if not isinstance(info, dict):
        raise FormatError(f"{path}: the `{META_KEY}` entry is not a JSON object; {damaged}")
    entries = info.get("tensors", {})
    if not isinstance(entries, dict):
        raise FormatError(f"{path}: `tensors` in `{META_KEY}` is {_shown(entries)}, expected an "
                          f"object; {damaged}")
    for gguf_name, entry in entries.items():
        missing = [k for k in ("name", "scale", "fold") if not isinstance(entry, dict)
                   or k not in entry]
        bad = missing or [k for k, (ok, _) in ENTRY_FIELDS.items() if k in entry
                          and not ok(entry[k])]
        if bad:
            expected = ENTRY_FIELDS[bad[0]][1]
            raise FormatError(f"{path}: `{bad[0]}` of {gguf_name} in `{META_KEY}` is missing or "
                              f"not {expected}; {damaged}")
    if not isinstance(info.get("base_model"), (str, type(None))):
        raise FormatError(f"{path}: `base_model` in `{META_KEY}` is {_shown(info['base_model'])}, "
                          f"expected a string; {damaged}")
    check_metadata(info.get("metadata") or {}, f"{path} (`{META_KEY}` metadata)")
    return info


def _pairs(reader, path: Path) -> dict[str, dict[str, object]]:
    pairs: dict[str, dict[str, object]] = {}
    for tensor in reader.tensors:
        stem, _, part = tensor.name.rpartition(".")
        if part not in ("lora_a", "lora_b"):
            raise UnsupportedError(f"{path}: tensor {tensor.name} is not a LoRA factor; only "
                                   "lora_a / lora_b tensors are supported")
        pairs.setdefault(stem, {})[part] = tensor
    for stem, pair in pairs.items():
        if len(pair) != 2:
            have, need = ("lora_a", "lora_b") if "lora_a" in pair else ("lora_b", "lora_a")
            raise FormatError(f"{path}: {stem}.{have} has no matching {stem}.{need}; the file is "
                              "incomplete, convert it again")
    return pairs


def read(path: Path, *, base: BaseInfo | None = None, light: bool = False) -> Adapter:
    """``light``: the tensors as light.arrays.Stored (numpy, no torch); what needs torch (a
    fold to undo, expert stacks) raises light.arrays.NeedsTorch."""
    path = Path(path)
    reader = open_gguf(path)
    kind, adapter_type = field_value(reader, "general.type"), field_value(reader, "adapter.type")
    if kind != "adapter" or adapter_type != "lora":
        raise FormatError(f"{path}: not a GGUF LoRA adapter (general.type={kind!r}, "
                          f"adapter.type={adapter_type!r}); a GGUF model goes to --base")
    arch = field_value(reader, "general.architecture")
    info = _own_info(reader, path)
    own_base = BaseInfo.from_json(info["base"], str(path)) if "base" in info else None
    base = base or own_base
    if base is None:
        raise FormatError(f"{path}: mapping GGUF tensor names back to HF needs the base model: "
                          "pass --base (the HF model folder, its config.json, or a GGUF model)")
    if base.arch != arch:
        raise FormatError(f"{path}: adapter is for architecture {arch!r} but --base is "
                          f"{base.arch!r} ({base.source}); pass the matching base")
    alpha = _alpha(reader, path)
    entries = info.get("tensors", {})
    # loaded whole, as float32 at most (quantized factors are dequantized)
    check_fits_in_memory(path, {t.name: int(t.n_elements) * 4 for t in reader.tensors})
    weights, experts = {}, {}
    for gguf_name, pair in _pairs(reader, path).items():
        lora_a, lora_b = (_tensor_data(pair[p], path, light) for p in ("lora_a", "lora_b"))
        entry = entries.get(gguf_name)
        if light and (lora_a.dim() != 2 or (entry and (entry["fold"] != 1.0 or "experts" in entry
                                                      or entry.get("param")))):
            _torch_folds(lora_b, gguf_name)
        if lora_a.dim() == 3 and not (entry and "experts" in entry):   # per-expert LoRAs stacked
            weights.update(_per_expert(path, gguf_name, entry, lora_a, lora_b, alpha, base))
            continue
        hf_name = entry["name"] if entry else gguf_to_hf_name(gguf_name, base)
        if entry and "experts" in entry:      # one part of a 3-D expert LoRA (gguf_experts.py)
            experts.setdefault(hf_name, []).append(_expert_part(path, gguf_name, entry, lora_a,
                                                                lora_b))
            continue
        _check_rank(path, gguf_name, lora_a, lora_b)
        rank = int(lora_b.shape[1])
        if entry:   # our own file: undo the fold, take the exact scale
            if entry["fold"] != 1.0:
                lora_b = apply_restore(unfold(lora_b, entry["fold"]), entry.get("restore"),
                                       f"{path}: {gguf_name}: ")
            scale = float(entry["scale"])
        else:       # llama.cpp's rule: alpha / rank, alpha 0 means the scale is baked in
            scale = alpha / rank if alpha else 1.0
        a, b, layer = from_gguf_factors(hf_name, gguf_name, lora_a, lora_b, base)
        weight = LoraWeight(a=a.contiguous(), b=b.contiguous(), scale=scale, layer=layer)
        if not entry:
            _check_known_transpose_bug(path, gguf_name, hf_name, weight, base)
        check_weight(hf_name, weight, where=str(path))
        check_factors(hf_name, weight, path)
        if entry and entry.get("param"):      # a 2-D target_parameters LoRA (the router)
            weight = param_weight(weight)
        else:
            check_base_shape(str(path), hf_name, weight, base)
        weights[hf_name] = weight
    if experts:       # (regroup imports torch)
        weights.update(regroup(experts, path))
    for hf_name, weight in weights.items():
        if is_param(weight):
            check_param_shape(hf_name, weight, base)
    metadata = dict(info.get("metadata") or {"source_format": "gguf"})
    metadata["gguf_base"] = base.to_json()
    tokens = field_value(reader, "adapter.alora.invocation_tokens")
    if tokens is not None:
        if not isinstance(tokens, list) or not all(isinstance(t, int) for t in tokens):
            raise FormatError(f"{path}: adapter.alora.invocation_tokens is not a list of token "
                              "ids; the file is corrupt, convert it again")
        metadata["alora_invocation_tokens"] = [int(t) for t in tokens]
    base_model = info.get("base_model") or field_value(reader, "general.base_model.0.name")
    return Adapter(weights=weights, base_model=base_model, metadata=metadata)


def _check_known_transpose_bug(path: Path, gguf_name: str, hf_name: str, w: LoraWeight,
                               base: BaseInfo) -> None:
    """llama.cpp's convert_lora_to_gguf.py (0.3.36) writes GPT-2's Conv1D LoRAs transposed the
    wrong way round: lora_a (r, out) and lora_b (in, r) where llama.cpp needs (r, in), (out, r),
    and llama.cpp aborts on the file. Recognised where a factor pair fits only that way (a
    non-square layer; a square one is indistinguishable by shape)."""
    expected = (base.hf_shapes or {}).get(hf_name)
    if base.arch not in TRANSPOSED_ARCHS or w.layer != "conv1d" or expected is None:
        return
    swapped = LoraWeight(a=w.b.T, b=w.a.T, scale=w.scale, layer="conv1d")
    if w.stored_shape != tuple(expected) and swapped.stored_shape == tuple(expected):
        raise FormatError(f"{path}: {gguf_name} has GPT-2's Conv1D LoRA factors transposed, as "
                          "llama.cpp's convert_lora_to_gguf.py writes them (a known llama.cpp bug; "
                          "llama.cpp aborts on this file); convert the PEFT adapter with "
                          "`adaptertools convert --to gguf --base MODEL` instead")


def _expert_part(path: Path, gguf_name: str, entry: dict, lora_a: torch.Tensor,
                 lora_b: torch.Tensor) -> tuple:
    """(first row, lora_a (E, r, in), lora_b (E, out, r), scale) of our own expert entry, the
    fold undone."""
    rows, e = entry.get("rows"), entry["experts"]
    if lora_a.dim() != 3 or lora_b.dim() != 3 or lora_a.shape[0] != e or \
            lora_b.shape[0] != e or lora_a.shape[1] != lora_b.shape[2] or \
            not (isinstance(rows, list) and len(rows) == 2 and all(type(x) is int for x in rows)
                 and rows[1] - rows[0] == lora_b.shape[1]):
        raise FormatError(f"{path}: {gguf_name}: lora_a {tuple(lora_a.shape)} and lora_b "
                          f"{tuple(lora_b.shape)} are not the (E, r, in) and (E, out, r) of "
                          f"{e} experts its `{META_KEY}` entry names; the file was damaged, "
                          "convert it again")
    if entry["fold"] != 1.0:
        lora_b = apply_restore(unfold(lora_b, entry["fold"]), entry.get("restore"),
                               f"{path}: {gguf_name}: ")
    return rows[0], lora_a, lora_b, float(entry["scale"])


def _per_expert(path: Path, gguf_name: str, entry: dict | None, lora_a: torch.Tensor,
                lora_b: torch.Tensor, alpha: float, base: BaseInfo) -> dict[str, LoraWeight]:
    """A 3-D expert LoRA, lora_a (E, r, in) and lora_b (E, out, r), as the per-expert 2-D LoRAs
    it stacks: ours (``per_expert`` names in our entry, the fold undone) or llama.cpp's
    converter's (names from the base, llama.cpp's scale alpha / rank)."""
    e = int(lora_a.shape[0])
    names = entry.get("per_expert") if entry else per_expert_names(gguf_name, base, e)
    if lora_b.dim() != 3 or lora_b.shape[0] != e or lora_a.shape[1] != lora_b.shape[2] or \
            not (isinstance(names, list) and len(names) == e
                 and all(isinstance(n, str) for n in names)):
        raise FormatError(f"{path}: {gguf_name}: lora_a {tuple(lora_a.shape)} and lora_b "
                          f"{tuple(lora_b.shape)} are not (E, r, in) and (E, out, r) of one "
                          "expert stack; the file is corrupt, convert it again")
    if entry:
        if entry["fold"] != 1.0:
            lora_b = apply_restore(unfold(lora_b, entry["fold"]), entry.get("restore"),
                                   f"{path}: {gguf_name}: ")
        scale = float(entry["scale"])
    else:
        scale = alpha / int(lora_b.shape[2]) if alpha else 1.0
    out = {}
    for name, a, b in zip(names, lora_a, lora_b):
        w = LoraWeight(a=a.contiguous(), b=b.contiguous(), scale=scale, layer="linear")
        check_base_shape(str(path), name, w, base)
        check_weight(name, w, where=str(path))
        check_factors(name, w, path)
        out[name] = w
    return out


def _check_rank(path: Path, name: str, lora_a: torch.Tensor, lora_b: torch.Tensor) -> None:
    # token_embd: a (vocab, r), b (dim, r); others: a (r, in), b (out, r)
    rank_a = lora_a.shape[1] if name == TOKEN_EMBD else lora_a.shape[0]
    if lora_a.dim() != 2 or lora_b.dim() != 2 or rank_a != lora_b.shape[1]:
        raise FormatError(f"{path}: {name}: lora_a {tuple(lora_a.shape)} and lora_b "
                          f"{tuple(lora_b.shape)} do not share a rank; the file is corrupt")


def check_base_shape(where: str, hf_name: str, w: LoraWeight, base: BaseInfo) -> None:
    """The delta must have the stored shape of the base tensor, when the base's shapes are known."""
    where = f"{where}: " if where else ""
    if base.hf_shapes is None:
        return
    if hf_name not in base.hf_shapes:
        raise FormatError(f"{where}{hf_name} is not a tensor of the base ({base.source}); this "
                          "adapter is for another model")
    expected = tuple(base.hf_shapes[hf_name])
    if w.stored_shape != expected:
        raise FormatError(f"{where}{hf_name}: the adapter's delta is {tuple(w.shape)} but the "
                          f"base ({base.source}) stores {expected}; this adapter is for another model")


def describe(path: Path) -> dict:
    """Storage facts for ``inspect``: architecture, alpha, tensor types, and why some differ."""
    from collections import Counter as _Counter

    import gguf

    reader = open_gguf(Path(path))
    types = {t.name: t.tensor_type.name for t in reader.tensors}
    counts = dict(_Counter(types.values()).most_common())
    notes = []
    if "Q8_0" in counts and len(counts) > 1:
        block = gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType.Q8_0][0]
        kept = sorted(n for n, t in types.items() if t != "Q8_0")
        notes.append(f"{len(kept)} tensor(s) stored as {', '.join(sorted(set(types[n] for n in kept)))}"
                     f", not Q8_0: their row length is not a multiple of {block} (e.g. {kept[0]})")
    return {"architecture": field_value(reader, "general.architecture"),
            "alpha": float(field_value(reader, "adapter.lora.alpha", 0.0) or 0.0),
            "tensor_types": counts, "notes": notes}
