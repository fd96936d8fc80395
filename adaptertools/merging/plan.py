"""Base checkpoint + adapters + weights -> the list of per-tensor jobs. No tensor data is read.

The plan fixes everything the run needs: which tensors change and by whom, each output file's
exact header and size, the updated config.json and index. ``--dry-run`` prints it and stops.
"""

from __future__ import annotations

import json
import math
import struct
from dataclasses import dataclass, field, replace

import torch

from ..adapter import Adapter, LoraWeight
from ..copies import saved_copies
from ..dtypes import CONFIG_DTYPES, DTYPE_NAMES, FLOAT_DTYPES, TORCH_DTYPES
from ..errors import FormatError, OptionError, UnsupportedError
from ..kernels.reference import Contribution
from .bases import GGUFBase, HFBase, TensorEntry
from .copies import copy_matches_base, copy_note
from ..formats.peft_keys import base_layer_layout
from .jobs import Job, OutputFile, Plan

MODES = ("weighted", "stacked")
# input-embedding names, most specific first (HF LlamaForCausalLM, GPT-2, BLOOM, GPT-NeoX, ...)
EMBEDDING_NAMES = ("model.embed_tokens.weight", "transformer.wte.weight",
                   "model.decoder.embed_tokens.weight", "transformer.word_embeddings.weight",
                   "gpt_neox.embed_in.weight", "embed_tokens.weight")
LM_HEAD = "lm_head.weight"
MISMATCHES_SHOWN = 5


# ----------------------------------------------------------------------------- targets

@dataclass
class _Targets:
    """What the adapters ask of each base tensor, collected before jobs are made."""

    weights: dict[str, list[Contribution]] = field(default_factory=dict)
    biases: dict[str, list[Contribution]] = field(default_factory=dict)
    replacements: dict[str, tuple[int, torch.Tensor]] = field(default_factory=dict)
    # trained token rows: (TokenRows, the adapter's weight, its index) (kernels/token_rows.py)
    token_rows: dict[str, list[tuple]] = field(default_factory=dict)
    mismatches: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)


def _same(x: torch.Tensor, y: torch.Tensor) -> bool:
    # PEFT saves a targeted embedding's base weight with every adapter (save_embedding_layers
    # "auto"): two adapters carrying the same copy agree, only different copies conflict
    return x.dtype == y.dtype and x.shape == y.shape and torch.equal(x, y)


def _resizes(base_name: str, shape: tuple[int, ...], entry: TensorEntry, resizable) -> bool:
    """A full tensor with other rows than the base's, where that means a resized vocabulary."""
    return base_name in resizable and len(shape) == 2 == len(entry.shape) and \
        shape[1:] == tuple(entry.shape[1:])


def _collect_full(targets: _Targets, i: int, adapter: Adapter, names: list[str],
                  entries: dict[str, TensorEntry], resolve, compare, resizable) -> None:
    """Adapter ``i``'s full tensors: replacements (modules_to_save, trained biases), and saved
    copies of its training base (copies.py), which are folded into only where they are not
    the same weight as the base's tensor (``compare(base name, copy) -> bool | None``)."""
    copies = saved_copies(adapter)
    for name, tensor in adapter.replacements.items():
        found = resolve(name, None)
        if found is None:
            targets.mismatches.append(f"{name} (adapter {names[i]}): full tensor has no base "
                                      "tensor to replace")
            continue
        base_name = found[0]
        entry, shape = entries[base_name], tuple(tensor.shape)
        resized = shape != tuple(entry.shape)
        if resized and not _resizes(base_name, shape, entry, resizable):
            targets.mismatches.append(f"{name} (adapter {names[i]}): full tensor "
                                      f"{shape}, base {entry.shape}")
            continue
        if name in copies or resized:
            same = None if resized else compare(base_name, tensor)
            if same:
                continue           # the base's own weight: fold into it (PEFT's roundings)
            targets.warnings.append(copy_note(base_name, names[i], tensor, entry, same))
        if base_name in targets.replacements and not _same(targets.replacements[base_name][1],
                                                           tensor):
            other = names[targets.replacements[base_name][0]]
            raise UnsupportedError(f"{base_name}: replaced by both {other} and {names[i]} "
                                   "(modules_to_save); merge them separately or drop one")
        targets.replacements.setdefault(base_name, (i, tensor))


def _collect(adapters: list[Adapter], names: list[str], factors: list[float],
             entries: dict[str, TensorEntry], resolve, *, compare=lambda name, copy: None,
             resizable=()) -> _Targets:
    """``resolve(name, w) -> (base name, LoraWeight in that tensor's stored layout) | None``;
    ``compare`` and ``resizable`` (names whose rows a replacement may change): ``_collect_full``."""
    targets = _Targets()
    for i, adapter in enumerate(adapters):
        _collect_full(targets, i, adapter, names, entries, resolve, compare, resizable)
    for i, (adapter, factor) in enumerate(zip(adapters, factors)):
        for name, w in adapter.weights.items():
            found = resolve(name, w)
            if found is None:
                targets.mismatches.append(f"{name} (adapter {names[i]}): no such base tensor")
                continue
            base_name, w = found
            entry = entries[base_name]
            w = _dense_on_base(w, entry.shape)
            # a LoRA on a resized tensor has the replacement's shape
            replaced = targets.replacements.get(base_name)
            expected = tuple(replaced[1].shape) if replaced is not None else entry.shape
            if w.stored_shape != expected:
                targets.mismatches.append(f"{name} (adapter {names[i]}): adapter delta "
                                          f"{w.stored_shape}, base {expected}")
                continue
            contribution = Contribution(w, factor, i)
            targets.weights.setdefault(base_name, []).append(contribution)
            if w.bias is not None:
                bias_name = base_name[: -len("weight")] + "bias"
                if not base_name.endswith("weight") or bias_name not in entries:
                    raise UnsupportedError(f"{name} (adapter {names[i]}): has a lora_bias but the "
                                           "base layer has no bias to merge it into")
                targets.biases.setdefault(bias_name, []).append(contribution)
    for i, (adapter, factor) in enumerate(zip(adapters, factors)):
        _collect_token_rows(targets, i, adapter, names[i], factor, entries, resolve)
    if targets.mismatches:
        shown = "; ".join(targets.mismatches[:MISMATCHES_SHOWN])
        more = len(targets.mismatches) - MISMATCHES_SHOWN
        raise FormatError(f"{len(targets.mismatches)} adapter tensor(s) do not fit the base: "
                          f"{shown}{f'; and {more} more' if more > 0 else ''}. Is the adapter "
                          "for another model?")
    return targets


def _collect_token_rows(targets: _Targets, index: int, adapter: Adapter, name_of: str,
                        factor: float, entries: dict[str, TensorEntry], resolve) -> None:
    """An adapter's trained token rows, each on a 2-D base tensor with room for its rows, and
    nothing else on that tensor: PEFT refuses a LoRA or modules_to_save on a layer with
    trainable tokens, so no order between them is defined."""
    for name, rows in adapter.token_rows.items():
        found = resolve(name, None)
        if found is None:
            targets.mismatches.append(f"{name} (adapter {name_of}): trainable tokens have no "
                                      "such base tensor")
            continue
        base_name = found[0]
        shape = tuple(entries[base_name].shape)
        if len(shape) != 2 or rows.values.shape[1:] != shape[1:]:
            targets.mismatches.append(f"{name} (adapter {name_of}): trainable token rows "
                                      f"{tuple(rows.values.shape)}, base {shape}")
            continue
        if max(rows.indices) >= shape[0] or min(rows.indices) < 0:
            targets.mismatches.append(f"{name} (adapter {name_of}): token index "
                                      f"{max(rows.indices)} outside the base's {shape[0]} rows "
                                      "(resize the vocabulary first: the adapter was trained "
                                      "on a model with more tokens)")
            continue
        if base_name in targets.weights or base_name in targets.replacements:
            raise UnsupportedError(f"{base_name}: has trainable tokens (adapter {name_of}) and "
                                   "also a LoRA or a full tensor from an adapter; PEFT allows "
                                   "only one of them on a layer: merge them separately")
        targets.token_rows.setdefault(base_name, []).append((rows, factor, index))


def _without_tied_token_rows(adapter: Adapter, embedding: str, name_of: str) -> Adapter:
    """A TRAINABLE_TOKENS adapter of a tied model saves lm_head's rows too, the same tensor
    as the embedding's (PEFT's tied layer shares it): the tied base stores one, so one is
    merged. Rows that differ cannot stay tied and are refused."""
    head, rows = adapter.token_rows.get(LM_HEAD), adapter.token_rows.get(embedding)
    if head is None:
        return adapter
    if rows is None or head.indices != rows.indices or not _same(head.values, rows.values):
        raise UnsupportedError(f"{LM_HEAD} (adapter {name_of}): trainable token rows of their "
                               f"own, but the base ties lm_head to {embedding}; merge into an "
                               "untied copy of the base (tie_word_embeddings=false)")
    return replace(adapter, token_rows={n: r for n, r in adapter.token_rows.items()
                                        if n != LM_HEAD})


def _dense_on_base(w, shape: tuple[int, ...]):
    """A LoHa/LoKr delta read without its base's kernel shape (a flattened conv factor, or a
    Conv1d's (out, in, k, 1) CP core) laid onto the base tensor's own shape: the same row-major
    values, as PEFT reshapes its delta to the base weight's shape."""
    if hasattr(w, "laid_on"):       # a target_parameters LoRA: (E, out, in) or (E, in, out)
        return w.laid_on(shape)
    if isinstance(w, LoraWeight) or w is None or tuple(w.stored_shape) == tuple(shape) or \
            len(shape) < 2 or w.shape != (shape[0], math.prod(shape[1:])):
        return w
    return replace(w, weight_shape=tuple(shape))


def _check_modes(targets: _Targets, mode: str, names: list[str]) -> None:
    if mode != "weighted":
        return
    for name, contributions in targets.weights.items():
        if len(contributions) > 1 and any(c.weight.magnitude is not None for c in contributions):
            raise UnsupportedError(f"{name}: DoRA adapters do not add up (each rescales the whole "
                                   "weight); merge them with --mode stacked")


# ----------------------------------------------------------------------------- HF safetensors

def _tied(base: HFBase) -> bool:
    from ..formats.names import TIED_BY_DEFAULT

    config = base.config.get("text_config") or base.config
    default = TIED_BY_DEFAULT.get(base.config.get("model_type", ""), True)
    return bool(config.get("tie_word_embeddings", base.config.get("tie_word_embeddings", default)))


def _embedding_name(entries: dict[str, TensorEntry]) -> str | None:
    return next((n for n in EMBEDDING_NAMES if n in entries), None)


def _out_dtype(entry: TensorEntry, dtype: str) -> str:
    if dtype == "keep" or entry.dtype not in FLOAT_DTYPES:
        return entry.dtype
    return DTYPE_NAMES[dtype]


def _header(metadata: dict, jobs: list[Job]) -> bytes:
    """A safetensors header for ``jobs`` laid out back to back in order, padded to 8 bytes."""
    header: dict = {"__metadata__": metadata} if metadata else {}
    offset = 0
    for job in jobs:
        header[job.name] = {"dtype": job.out_dtype, "shape": list(job.output_shape),
                            "data_offsets": [offset, offset + job.nbytes]}
        offset += job.nbytes
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    return struct.pack("<Q", len(raw)) + raw


def plan_for(base: HFBase | GGUFBase, adapters: list[Adapter], names: list[str],
             factors: list[float], *, mode: str, dtype: str, requantize: str = "keep",
             quantize_like: GGUFBase | None = None, max_shard_size: int | None = None,
             allow_modified_base: bool = False) -> Plan:
    """``plan_hf`` or ``plan_gguf``, by the kind of ``base``; adapters that only fit a base PEFT
    modified at initialisation are refused unless ``allow_modified_base`` (``base`` is then
    that modified base)."""
    if not allow_modified_base:
        _refuse_modified_base(adapters, names)
    if base.kind == "safetensors":     # --requantize: quantized checkpoints (encoded.py)
        if quantize_like is not None:
            raise OptionError("--quantize-like applies to GGUF bases; for an HF checkpoint "
                              "use --dtype")
        return plan_hf(base, adapters, names, factors, mode=mode, dtype=dtype,
                       requantize=requantize, max_shard_size=max_shard_size)
    if max_shard_size is not None:
        raise OptionError(f"{base.path}: --max-shard-size applies to HF safetensors "
                          "checkpoints; split a GGUF model with llama.cpp's `llama-gguf-split "
                          "--split --split-max-size 5G MERGED.gguf PREFIX` after the merge")
    return plan_gguf(base, adapters, names, factors, mode=mode, dtype=dtype,
                     requantize=requantize, quantize_like=quantize_like)


def _refuse_modified_base(adapters: list[Adapter], names: list[str]) -> None:
    """PiSSA, OLoRA, CorDA, LoRA-GA and LoftQ start by changing the base weights (W - the
    initial adapter's delta, or a quantized residual); an adapter saved without PEFT's
    conversion to plain LoRA still names its method in ``init_lora_weights`` and only fits that
    modified base. Merged into the original base it gives another model."""
    from ..formats.peft import base_modifying_init

    for name, adapter in zip(names, adapters):
        init = base_modifying_init((adapter.metadata or {}).get("peft_config"))
        if init is not None:
            raise UnsupportedError(
                f"{name}: init_lora_weights={init!r}: this adapter was saved without conversion, "
                "so it only fits the base as PEFT modified it when the adapter was initialised; "
                "merged into the original base it would give a different model. Convert it to "
                "plain LoRA with PEFT (save_pretrained(..., path_initial_model_for_weight_"
                "conversion=<the initial adapter, saved before training>)) and merge that, or "
                "merge into the modified base and pass --allow-modified-base "
                "(allow_modified_base=True)")


def plan_hf(base: HFBase, adapters: list[Adapter], names: list[str], factors: list[float], *,
            mode: str, dtype: str, requantize: str = "keep",
            max_shard_size: int | None = None) -> Plan:
    from .encoded import layout_for

    entries = base.entries()
    encoded = layout_for(base, requantize)     # None unless a quantized checkpoint (codecs/)
    warnings: list[str] = []
    embedding = _embedding_name(entries)
    if embedding is not None and _tied(base):
        adapters = [_without_tied_token_rows(a, embedding, n) for a, n in zip(adapters, names)]
    # Changing one of two tied tensors unties them. The config must say so even when the base
    # stores lm_head anyway: transformers would otherwise tie it back to the merged embedding.
    untie = embedding is not None and _tied(base) and any(
        LM_HEAD in a.weights or LM_HEAD in a.replacements or embedding in a.weights
        or embedding in a.replacements for a in adapters)
    # an lm_head the base does not store starts as a copy of the embedding: same bytes, own name
    add_lm_head = untie and LM_HEAD not in entries
    lm_head_entry = replace(entries[embedding], name=LM_HEAD) if add_lm_head else None
    known = dict(entries, **({LM_HEAD: lm_head_entry} if add_lm_head else {}))
    if encoded is not None:         # encoded weights in their unencoded shapes and float names
        known = encoded.logical(known)
    from .expert_slices import fold_per_expert     # per-expert LoRAs onto fused experts

    adapters = [fold_per_expert(a, known, n) for a, n in zip(adapters, names)]

    relaid: list[str] = []

    def resolve(name: str, w: LoraWeight | None):
        if name not in known:
            return None
        if w is None:                       # a replacement: nothing to lay out
            return name, w
        laid = base_layer_layout(name, w, base.config.get("model_type", ""))      # PEFT's rule
        if hasattr(laid, "for_model"):      # a target_parameters LoRA: the experts' layout
            return name, laid.for_model(base.config.get("model_type", ""))
        if laid is not w:
            relaid.append(name)
        return name, laid

    targets = _collect(adapters, names, factors, known, resolve,
                       compare=lambda name, copy: copy_matches_base(copy, base, known[name]),
                       resizable=(embedding, LM_HEAD) if encoded is None else ())
    vocab = _resized_vocab(targets, known, embedding, add_lm_head)
    warnings += targets.warnings
    if relaid:
        warnings.append(f"{len(relaid)} tensor(s) (e.g. {relaid[0]}) read in the layout of the "
                        "base's own layer, as PEFT does: adapter_config.json's fan_in_fan_out "
                        "says otherwise (PEFT sets it per layer: on for GPT-2 Conv1D, off for "
                        "Linear, and saves whichever it set last)")
    _check_modes(targets, mode, names)
    if untie:
        # PEFT's merge_and_unload changes the shared tensor in place, so its merged lm_head
        # follows the embedding: its outputs then differ from the unmerged model's; ours do not
        warnings.append(f"the base ties lm_head to {embedding} and an adapter changes one of "
                        "them: the merged model gets its own lm_head.weight and "
                        "tie_word_embeddings=false, so that it computes what the unmerged "
                        "model computes (PEFT's merge_and_unload changes both instead)")

    def job_for(entry: TensorEntry) -> Job:
        # what adapters call the stored tensor (compressed-tensors' X.weight_packed: X.weight)
        key = encoded.target_name(entry.name) if encoded is not None else entry.name
        replacement = targets.replacements.get(key)
        tensor = replacement[1] if replacement else None
        resized = tensor is not None and tuple(tensor.shape) != tuple(entry.shape)
        if tensor is not None and key in targets.weights and entry.dtype in TORCH_DTYPES:
            # a copy the adapter is folded into is first stored in the base's dtype, as PEFT's
            # load_state_dict does, so the fold rounds as PEFT's merge does
            tensor = tensor.to(TORCH_DTYPES[entry.dtype])
        return Job(entry.name, entry, _out_dtype(entry, dtype),
                   tuple(targets.weights.get(key, ())),
                   tuple(targets.biases.get(key, ())), tensor,
                   out_shape=tuple(tensor.shape) if resized else None,
                   token_rows=tuple(targets.token_rows.get(key, ())))

    files = []
    for f in base.files:
        jobs = [job_for(e) for e in f.tensors]
        if encoded is not None:
            jobs = encoded.jobs(jobs)
        for job in jobs:
            _check_foldable(job, base)
        added = add_lm_head and any(e.name == embedding for e in f.tensors)
        if added:
            jobs.append(job_for(lm_head_entry))
        same_layout = not added and len(jobs) == len(f.tensors) and \
            all(j.out_dtype == j.source.dtype and j.out_shape is None for j in jobs)
        header = f.header if same_layout else _header(f.metadata, jobs)
        files.append(OutputFile(f.name, tuple(jobs), header,
                                len(header) + sum(j.nbytes for j in jobs)))
    config = _updated_config(base, dtype, untie, vocab)
    index = _updated_index(base, files, add_lm_head)
    if max_shard_size is not None:      # new shards, grouped and named as save_pretrained does
        from .shards import regroup, resharded_index

        files = regroup(files, max_shard_size, lambda jobs: _header(base.files[0].metadata, jobs))
        index = resharded_index(base.index, files)
    if encoded is not None:
        encoded.place(files)
        config, index = encoded.config(config, base.config), encoded.index(index, files)
    return Plan(base, tuple(files), mode, tuple(factors), tuple(names), config=config,
                index=index, max_shard_size=max_shard_size, warnings=tuple(warnings))


# what each stored dtype an adapter cannot be folded into is, for the refusal
STORED_KINDS = {"I8": "int8", "U8": "uint8", "F8_E4M3": "float8_e4m3fn", "F8_E5M2": "float8_e5m2",
                "F64": "float64", "I16": "int16", "I32": "int32", "I64": "int64", "U16": "uint16",
                "U32": "uint32", "U64": "uint64", "BOOL": "bool"}


def _check_foldable(job: Job, base: HFBase) -> None:
    """An adapted tensor of an HF checkpoint must be F32/F16/BF16 or a weight a codec encodes."""
    from ..codecs import quant_methods

    dtype = job.source.dtype
    if not job.changed or job.group is not None or dtype in FLOAT_DTYPES:
        return
    where = f"{base.folder / job.source.file}: {job.name} is {dtype} ({STORED_KINDS.get(dtype, dtype)})"
    supported = ("adapters are merged into F32, F16 and BF16 tensors, and into quantized "
                 "checkpoints whose config.json quantization_config has quant_method "
                 f"{' or '.join(quant_methods())}")
    if dtype.startswith("F8"):
        hint = ("if this is an FP8 checkpoint, restore the quantization_config of its "
                "config.json (block FP8: quant_method fp8 with weight_block_size and "
                "weight_scale_inv tensors); otherwise merge into the BF16/F16 model")
    elif dtype in ("I8", "U8"):
        hint = ("if this is a quantized checkpoint, restore the quantization_config of its "
                "config.json; otherwise merge into the unquantized model")
    else:
        hint = "merge into a checkpoint whose adapted weights are F32, F16 or BF16"
    raise UnsupportedError(f"{where} and an adapter changes it; {supported}; {hint}")


def _resized_vocab(targets: _Targets, known: dict[str, TensorEntry], embedding: str | None,
                   add_lm_head: bool) -> int | None:
    """The new vocabulary size when the adapters' copies of the embedding and lm_head have other
    rows than the base's (a vocabulary resized before training), else None; both must then
    come resized (an added lm_head of a tied base takes the embedding's copy)."""
    rows = {name: int(tensor.shape[0]) for name, (_, tensor) in targets.replacements.items()
            if tuple(tensor.shape) != tuple(known[name].shape)}
    if not rows:
        return None
    if len(set(rows.values())) > 1:
        raise UnsupportedError("the adapters resize the vocabulary differently ("
                               + ", ".join(f"{n}: {r} rows" for n, r in rows.items())
                               + "); merge them into the resized base they were trained on")
    first, size = next(iter(rows.items()))
    old = known[first].shape[0]
    if add_lm_head and embedding in rows and LM_HEAD not in rows:
        targets.replacements[LM_HEAD] = targets.replacements[embedding]   # tied: the embedding
        rows[LM_HEAD] = size
    for other in (embedding, LM_HEAD):
        if other is not None and other in known and other not in rows and \
                known[other].shape[0] == old:
            raise UnsupportedError(
                f"{first}: the adapter resizes the vocabulary from {old} to {size} rows but "
                f"carries no {other} of {size} rows, so the merged model would not fit together; "
                "merge into the resized base (the model saved after resize_token_embeddings)")
    return size


def _updated_config(base: HFBase, dtype: str, untie: bool, vocab: int | None = None) -> dict | None:
    if not base.config or (dtype == "keep" and not untie and vocab is None):
        return None
    config = json.loads(json.dumps(base.config))
    if vocab is not None:              # a resized vocabulary (_resized_vocab)
        for section in (config, config.get("text_config")):
            if isinstance(section, dict) and "vocab_size" in section:
                section["vocab_size"] = vocab
    if untie:
        config["tie_word_embeddings"] = False
        if isinstance(config.get("text_config"), dict) and \
                "tie_word_embeddings" in config["text_config"]:
            config["text_config"]["tie_word_embeddings"] = False
    if dtype != "keep":
        name = CONFIG_DTYPES[DTYPE_NAMES[dtype]]
        keys = [k for k in ("torch_dtype", "dtype") if k in config] or ["torch_dtype"]
        for key in keys:
            config[key] = name
    return config


def _updated_index(base: HFBase, files: list[OutputFile], add_lm_head: bool) -> dict | None:
    """The new index, or None when the base's can be copied byte for byte (same tensors, same
    sizes: a merge in the base's own dtypes)."""
    if base.index is None:
        return None
    same = all(j.nbytes == j.source.nbytes for f in files for j in f.jobs)
    if same and not add_lm_head:
        return None
    index = json.loads(json.dumps(base.index))
    index.setdefault("metadata", {})["total_size"] = sum(j.nbytes for f in files for j in f.jobs)
    if add_lm_head:
        owner = next(f.name for f in files if any(j.name == LM_HEAD for j in f.jobs))
        index["weight_map"][LM_HEAD] = owner
    return index


# ----------------------------------------------------------------------------- GGUF models

def plan_gguf(base: GGUFBase, adapters: list[Adapter], names: list[str], factors: list[float], *,
              mode: str, dtype: str, requantize: str = "keep",
              quantize_like: GGUFBase | None = None) -> Plan:
    """GGUF jobs. Adapted tensors keep their type (``requantize="keep"``: quantized ones are
    dequantized, folded in fp32 and quantized back to the same type), or take the type
    ``requantize`` names; with ``quantize_like`` every tensor takes the type it has in that
    reference file (the base must then be F32/F16/BF16). When any type changes, the file is
    laid out anew (gguf_layout.py); otherwise it keeps the base's header and offsets."""
    if dtype != "keep":
        raise OptionError(f"{base.path}: --dtype {dtype} does not apply to a GGUF base; use "
                          f"--requantize {DTYPE_NAMES.get(dtype, dtype).lower()}")
    info = base.info                     # parsed once, from the header open_base read
    entries = base.entries()
    # target_parameters LoRAs (MoE experts) re-laid on GGUF's tensors (formats/gguf_experts.py)
    from ..formats.gguf_experts import gguf_view

    shapes = {name: tuple(e.shape) for name, e in entries.items()}
    adapters = [replace(a, weights=gguf_view(a.weights, info, shapes)[0]) for a in adapters]
    targets = _collect(adapters, names, factors, entries, lambda n, w: gguf_target(n, w, info, entries),
                       compare=lambda name, copy: copy_matches_base(copy, base, entries[name]))
    _check_modes(targets, mode, names)
    like = quantize_like.entries() if quantize_like is not None else None
    jobs = []
    for entry in base.tensors:
        replacement = targets.replacements.get(entry.name)
        job = Job(entry.name, entry, entry.dtype, tuple(targets.weights.get(entry.name, ())),
                  tuple(targets.biases.get(entry.name, ())), replacement[1] if replacement else None,
                  token_rows=tuple(targets.token_rows.get(entry.name, ())))
        out_type = (_like_type(entry, like, quantize_like.path) if like is not None
                    else _requantized_type(entry, job.changed, requantize, base.path))
        jobs.append(replace(job, out_dtype=out_type))
    if all(j.out_dtype == j.source.dtype for j in jobs):
        output = OutputFile(base.path.name, tuple(jobs), b"", base.data_end)   # same layout
    else:
        from .gguf_layout import LaidOutTensor, file_size, header_bytes

        laid = [LaidOutTensor(j.name, j.shape, j.out_dtype, j.nbytes) for j in jobs]
        header = header_bytes(base.header, laid)
        output = OutputFile(base.path.name, tuple(jobs), header,
                            file_size(header, laid, base.header.alignment))
    return Plan(base, (output,), mode, tuple(factors), tuple(names),
                warnings=tuple(targets.warnings))


def _fits_blocks(entry: TensorEntry, type_name: str, where: str) -> str:
    from ..kernels.quant.types import resolve

    t = resolve(type_name)
    if entry.shape and entry.shape[-1] % t.block:
        raise UnsupportedError(f"{where}: {entry.name} has rows of {entry.shape[-1]} values, not a "
                               f"multiple of {t.name}'s blocks of {t.block}; choose another type "
                               "for it (--requantize f16 or q8_0)")
    return t.name


def _requantized_type(entry: TensorEntry, changed: bool, requantize: str, path) -> str:
    """The output type of one tensor of a GGUF merge: untouched tensors keep theirs."""
    from ..kernels.quant.types import resolve

    if not changed:
        return entry.dtype
    if requantize == "keep":
        if not resolve(entry.dtype).requantizable:
            raise UnsupportedError(
                f"{path}: {entry.name} is {entry.dtype}, which adaptertools can read but not write "
                "back; pass --requantize q8_0 (near-lossless) or --requantize f16 for the adapted "
                "tensors")
        return entry.dtype
    target = resolve(requantize)
    if not target.requantizable:
        raise OptionError(f"--requantize {requantize}: adaptertools cannot write {target.name}; "
                          "choose f32, f16, bf16, q8_0, q4_0, q4_1, q5_0, q5_1 or q2_k..q6_k")
    return _fits_blocks(entry, target.name, str(path))


def _like_type(entry: TensorEntry, like: dict[str, TensorEntry], ref_path) -> str:
    """--quantize-like: the type the reference file gives this tensor."""
    ref = like.get(entry.name)
    if ref is None or tuple(ref.shape) != tuple(entry.shape):
        found = "missing" if ref is None else f"shaped {tuple(ref.shape)}"
        raise UnsupportedError(f"{ref_path}: {entry.name} is {found} there but {tuple(entry.shape)} "
                               "in the base; --quantize-like needs a quantized copy of the same model")
    if ref.dtype != entry.dtype and entry.dtype not in FLOAT_DTYPES:
        raise UnsupportedError(f"--quantize-like: the base's {entry.name} is {entry.dtype}; merge "
                               "into the F32/F16/BF16 base and quantize from there")
    if ref.dtype == entry.dtype:
        return ref.dtype
    return _fits_blocks(entry, ref.dtype, str(ref_path))


def gguf_target(name: str, w: LoraWeight | None, info, entries) -> tuple[str, LoraWeight] | None:
    """An HF-named LoraWeight re-expressed in the layout of the GGUF model's tensor."""
    from ..formats.gguf import to_gguf_factors
    from ..formats.names import hf_to_gguf_name, to_gguf_rows

    if info.tied_embeddings and name == LM_HEAD:
        raise UnsupportedError(f"{name}: the GGUF base ties lm_head to token_embd; untying a GGUF "
                               "model is not supported yet, merge into the HF checkpoint instead")
    try:
        gguf_name = hf_to_gguf_name(name, info)
    except UnsupportedError:
        return None
    if gguf_name not in entries:
        return None
    if w is None or getattr(w, "layer", None) == "param":   # an expert tensor's part, (E, out, in)
        return gguf_name, w
    if not isinstance(w, LoraWeight):
        from ..kernels.deltas import kind

        raise UnsupportedError(f"{name}: {kind(w).name} deltas are not merged into GGUF bases yet "
                               "(only LoRA factors are re-laid out for GGUF's tensors); merge "
                               "into the HF checkpoint, then convert it to GGUF with llama.cpp")
    if w.layer == "embedding":          # token_embd is stored (vocab, dim) in both
        return gguf_name, w
    a, b = to_gguf_factors(name, w, info)   # delta = b @ a in GGUF's (out, in)
    # rows moved (RoPE permutation, fused q/k/v regrouped): their norms and biases move too
    magnitude = to_gguf_rows(name, info, w.magnitude) if w.magnitude is not None else None
    bias = to_gguf_rows(name, info, w.bias) if w.bias is not None else None
    # llama.cpp's quantizer writes a (1, n) tensor (Qwen2-MoE's ffn_gate_inp_shexp) as (n,):
    # the same values, so the (1, n) delta folds onto it (the fold reshapes to (rows, cols))
    stored = tuple(entries[gguf_name].shape)
    squeezed = stored if len(stored) == 1 and int(b.shape[0]) * int(a.shape[1]) == stored[0] \
        and 1 in (int(b.shape[0]), int(a.shape[1])) else None
    return gguf_name, LoraWeight(a=a, b=b, scale=w.scale, layer="linear", magnitude=magnitude,
                                 bias=bias, weight_shape=squeezed)
