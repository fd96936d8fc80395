"""Hugging Face PEFT LoRA folders: ``adapter_config.json`` + ``adapter_model.safetensors``.

Facts this module encodes (FORMATS.md, checked against PEFT 0.21.2):

- keys ``base_model.model.<module>.lora_A.weight`` (r, in) / ``lora_B.weight`` (out, r);
  embeddings ``lora_embedding_A`` (r, vocab) / ``lora_embedding_B`` (dim, r), delta ``(B @ A).T``;
  GPT-2 Conv1D (``fan_in_fan_out``) stores its weight (in, out), delta ``(B @ A).T``;
  ConvNd ``lora_A`` (r, in, *k), ``lora_B`` (out, r, 1, ...);
  DoRA ``lora_magnitude_vector`` ((out,), or (1, out, 1, ...) for conv); ``lora_B.bias``;
  full tensors (modules_to_save, a targeted embedding's ``base_layer.weight``) under their names.
- scale ``lora_alpha / r`` or ``lora_alpha / sqrt(r)`` (rsLoRA); r and alpha per module from
  ``rank_pattern`` / ``alpha_pattern`` matched as ``(.*\\.)?(pattern)$``, first match wins.
"""

from __future__ import annotations

import json
import math
import re
import warnings
from collections import Counter
from pathlib import Path
from typing import TYPE_CHECKING

from .._io import load_safetensors, read_json, write_json
from ..adapter import Adapter, LoraWeight, check_weight, module_name
from ..errors import AdapterToolsError, AdapterToolsWarning, FormatError, UnsupportedError
from . import (accounting, foreign, peft_bdlora, peft_lycoris, peft_mha, peft_params,
               peft_tokens, peft_training_only)
from .peft_keys import KEY_PREFIX, SAVED_EMBEDDING_LAYERS, split_key

if TYPE_CHECKING:    # read(light=True) holds light.arrays.Stored tensors instead
    import torch

DESCRIPTION = "Hugging Face PEFT LoRA folder (adapter_config.json + adapter_model.safetensors)"
SNIFF_ORDER = 10
OUTPUT_IS_DIR = True
WRITES_TOKEN_ROWS = True       # trainable tokens (peft_tokens.py)

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
LEGACY_WEIGHTS_NAME = "adapter_model.bin"
# init_lora_weights values whose adapter only fits a base that PEFT modified at init time.
BASE_MODIFYING_INITS = ("pissa", "olora", "corda", "lora_ga", "loftq")
# Config switches that change what the factors mean; reading them as plain LoRA would be wrong.
UNSUPPORTED_SWITCHES = ("use_qalora", "layer_replication")
# LoRA variants whose tensors or forward differ from LoRA's, by the config field that turns each
# on (peft/tuners/lora/config.py 0.21.2): refused by name until they are read.
# (VeLoRA and MonteCLoRA are plain LoRA once trained: peft_training_only.py), with why each is not
UNSUPPORTED_VARIANTS = {"kasa_config": ("KaSA", "PEFT replaces each targeted base weight by its "
                                                "SVD truncation when it loads the adapter "
                                                "(KasaLinearVariant._truncate_base_weight), which "
                                                "a merge into the original base would have to "
                                                "reproduce; merge it with PEFT")}


# ----------------------------------------------------------------------------- locating

def locate(path: Path) -> Path | None:
    """The folder holding ``adapter_config.json`` that ``path`` designates, or None.

    Accepts the folder, its config or weights file, or a parent whose only adapter sits in a
    named subfolder (PEFT saves adapters not named ``default`` that way).
    """
    path = Path(path)
    if path.is_file():
        is_ours = path.name in (CONFIG_NAME, WEIGHTS_NAME, LEGACY_WEIGHTS_NAME)
        return path.parent if is_ours and (path.parent / CONFIG_NAME).is_file() else None
    if not path.is_dir():
        return None
    if (path / CONFIG_NAME).is_file():
        return path
    subfolders = sorted(p for p in path.iterdir() if (p / CONFIG_NAME).is_file())
    if len(subfolders) > 1:
        names = ", ".join(p.name for p in subfolders)
        raise FormatError(f"{path}: holds several PEFT adapters ({names}); pass one of them, "
                          f"e.g. {subfolders[0]}")
    return subfolders[0] if subfolders else None


def sniff(path: Path) -> bool:
    try:
        return locate(path) is not None
    except FormatError:
        return True  # it is PEFT; read() raises the helpful error


# ----------------------------------------------------------------------------- config maths

def pattern_value(patterns: dict, module: str, default):
    """PEFT's ``get_pattern_key``: first pattern matching a dotted suffix of ``module`` wins."""
    for key, value in (patterns or {}).items():
        if re.match(rf"(.*\.)?({key})$", module):
            return value
    return default


def resolve_rank_alpha(config: dict, module: str) -> tuple[int, float]:
    rank = pattern_value(config.get("rank_pattern"), module, config["r"])
    alpha = pattern_value(config.get("alpha_pattern"), module, config["lora_alpha"])
    return int(rank), alpha


def scale_of(alpha: float, rank: int, use_rslora: bool) -> float:
    return alpha / math.sqrt(rank) if use_rslora else alpha / rank


def alpha_for(scale: float, rank: int, use_rslora: bool) -> float:
    """An alpha for which PEFT's ``alpha / r`` (or ``/ sqrt(r)``) gives back ``scale`` exactly.

    ``scale * r / r`` is not always ``scale`` in float64, so step a few ulps around the product.
    """
    denominator = math.sqrt(rank) if use_rslora else rank
    guess = scale * denominator
    candidates = [guess]
    for direction in (math.inf, -math.inf):
        value = guess
        for _ in range(4):
            value = math.nextafter(value, direction)
            candidates.append(value)
    for alpha in candidates:
        if scale_of(alpha, rank, use_rslora) == scale:
            return int(alpha) if alpha.is_integer() and abs(alpha) < 2**53 else alpha
    return guess  # within one ulp; cannot be closer in float64


def targets_cover(target_modules, module: str) -> bool:
    """PEFT's target matching: a string is a full regex; a list matches names or dotted suffixes."""
    if isinstance(target_modules, str):
        return re.fullmatch(target_modules, module) is not None
    return any(module == t or module.endswith("." + t) for t in (target_modules or []))


# ----------------------------------------------------------------------------- config schema

def _number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _whole(v) -> bool:
    return _number(v) and float(v).is_integer() and v >= 1


def _regex(v) -> bool:
    if not isinstance(v, str):
        return False
    try:
        re.compile(rf"(.*\.)?({v})$")     # as pattern_value and targets_cover use it
    except (re.error, RecursionError, OverflowError):
        return False
    return True


def _strings(v) -> bool:
    return isinstance(v, list) and all(isinstance(t, str) for t in v)


# The fields of adapter_config.json that this module reads (or carries into a PEFT config it
# writes), each with the type PEFT's LoraConfig declares for it (peft/tuners/lora/config.py,
# 0.21.2) as (check, what is expected). JSON null is accepted wherever LoraConfig allows None.
# ``rank_pattern`` / ``alpha_pattern`` are checked key by key (PATTERN_FIELDS).
CONFIG_FIELDS = {
    "peft_type": (lambda v: isinstance(v, str), 'a string such as "LORA"'),
    "r": (_whole, "a whole number >= 1 (the rank)"),
    "lora_alpha": (lambda v: _number(v) and v > 0, "a positive number"),
    "use_rslora": (lambda v: v is None or isinstance(v, bool), "true or false"),
    "use_dora": (lambda v: v is None or isinstance(v, bool), "true or false"),
    "fan_in_fan_out": (lambda v: v is None or isinstance(v, bool), "true or false"),
    "lora_bias": (lambda v: v is None or isinstance(v, bool), "true or false"),
    "target_modules": (lambda v: v is None or _strings(v) or _regex(v),
                       "a list of module names or one valid regular expression"),
    "target_parameters": (lambda v: v is None or _strings(v),
                          "a list of parameter names (peft_params.py)"),
    "modules_to_save": (lambda v: v is None or _strings(v), "a list of module names, or null"),
    "init_lora_weights": (lambda v: v is None or isinstance(v, (bool, str)),
                          'true, false or a method name such as "gaussian"'),
    "base_model_name_or_path": (lambda v: v is None or isinstance(v, str), "a string, or null"),
    "task_type": (lambda v: v is None or isinstance(v, str), 'a string such as "CAUSAL_LM"'),
    "alora_invocation_tokens": (lambda v: v is None or (isinstance(v, list) and all(
        isinstance(t, int) and not isinstance(t, bool) and t >= 0 for t in v)),
        "a list of token ids"),
}
PATTERN_FIELDS = {"rank_pattern": (_whole, "a whole number >= 1 (a rank)"),
                  "alpha_pattern": (lambda v: _number(v) and v > 0, "a number > 0 (an alpha)")}


def _shown(value) -> str:
    """A JSON value as a user wrote it: its JSON type and, briefly, the value."""
    kind = {bool: "a boolean", int: "a number", float: "a number", str: "a string",
            list: "a list", dict: "an object", type(None): "null"}.get(type(value), "a value")
    if value is None:
        return kind
    text = json.dumps(value, default=str)
    return f"{kind} ({text[:40]}{'...' if len(text) > 40 else ''})"


def check_types(config: dict, where: Path | str) -> None:
    """A FormatError naming ``where``, the field and the expected type for the first field of
    ``config`` (if present) that does not have the type PEFT gives it."""
    def refuse(field: str, value, expected: str) -> FormatError:
        return FormatError(f"{where}: `{field}` is {_shown(value)}, expected {expected}; fix "
                           "the config")

    for field, (ok, expected) in CONFIG_FIELDS.items():
        if field in config and not ok(config[field]):
            raise refuse(field, config[field], expected)
    for field, (ok, expected) in PATTERN_FIELDS.items():
        patterns = config.get(field)
        if patterns is None:
            continue
        if not isinstance(patterns, dict):
            raise refuse(field, patterns, f"an object mapping module patterns to {expected}")
        for key, value in patterns.items():
            if not _regex(key):
                raise FormatError(f"{where}: `{field}` key {key!r} is not a valid regular "
                                  "expression (PEFT matches each key as one); fix the config")
            if not ok(value):
                raise refuse(f"{field}[{key!r}]", value, expected)


def check_metadata(metadata, where: str) -> None:
    """The metadata our own files carry (``Adapter.metadata``): an object whose ``peft_config``,
    when present, has PEFT's types, and whose GGUF base facts are complete."""
    if not isinstance(metadata, dict):
        raise FormatError(f"{where}: `metadata` is {_shown(metadata)}, expected an object; the "
                          "file was damaged, write it again")
    config = metadata.get("peft_config")
    if config is not None and not isinstance(config, dict):
        raise FormatError(f"{where}: `peft_config` is {_shown(config)}, expected an object; the "
                          "file was damaged, write it again")
    check_types(config or {}, f"{where}: peft_config")
    check_types({k: v for k, v in metadata.items() if k == "alora_invocation_tokens"}, where)
    if metadata.get("gguf_base") is not None:
        from .names import BaseInfo

        BaseInfo.from_json(metadata["gguf_base"], where)


def check_config(config: dict, where: Path) -> None:
    """The adapter_config.json of a LoRA adapter: a PEFT type read here, r and lora_alpha set,
    every field it has of the type PEFT gives it (``check_types``)."""
    check_types({k: v for k, v in config.items() if k == "peft_type"}, where)
    if foreign.mlx_config(config):
        raise UnsupportedError(f"{where}: {foreign.MLX} (fine_tune_type, lora_parameters), not a "
                               "PEFT adapter: read it with --from mlx, or without --from")
    peft_type = config.get("peft_type", "LORA").upper()
    if peft_type != "LORA":
        raise UnsupportedError(f"{where}: not supported yet: {peft_type} (LoRA, DoRA, LoHa "
                               "and LoKr adapters are read)")
    for key in ("r", "lora_alpha"):
        if config.get(key) is None:
            raise FormatError(f"{where}: `{key}` is missing; set it to the value used in training")
    check_types(config, where)
    for switch in UNSUPPORTED_SWITCHES:
        if config.get(switch):
            raise UnsupportedError(f"{where}: not supported yet: {switch}={config[switch]!r}")
    for field, (variant, why) in UNSUPPORTED_VARIANTS.items():
        if config.get(field) is not None:
            raise UnsupportedError(f"{where}: a {variant} adapter ({field} is set): not supported "
                                   f"yet: {why}")
    init = base_modifying_init(config)
    if init is not None:       # inspect and convert warn; merge refuses (merging/plan.py)
        warnings.warn(f"{where}: init_lora_weights={init!r} means this "
                      "adapter only fits a base that PEFT modified at init time; merging it into "
                      "the original base gives WRONG weights unless it was converted to plain LoRA "
                      "(PEFT's path_initial_model_for_weight_conversion)",
                      AdapterToolsWarning, stacklevel=3)


def base_modifying_init(config: dict | None) -> str | None:
    """``init_lora_weights`` when it names a method that modifies the base at initialisation
    (pissa, olora, corda, lora_ga, loftq, or a value starting so, e.g. "pissa_niter_4"), else
    None. PEFT's ``save_pretrained(path_initial_model_for_weight_conversion=...)`` converts such
    an adapter to plain LoRA and sets the value back to True: one still naming the method was
    saved unconverted and only fits the modified base."""
    init = (config or {}).get("init_lora_weights", True) if isinstance(config, dict) else True
    return init if isinstance(init, str) and init.lower().startswith(BASE_MODIFYING_INITS) \
        else None


def saved_base_copies(state_dict: dict[str, torch.Tensor], config: dict) -> list[str]:
    """Base tensor names of the saved copies of the training base in a PEFT state dict (kept in
    ``Adapter.metadata["saved_base_copies"]``; the planner folds into the base's own tensor
    where a copy is the same weight, copies.py)."""
    trained_biases = config.get("bias") in ("all", "lora_only")
    saved = config.get("modules_to_save") or []
    copies = set()
    for key in state_dict:
        name, part, _ = split_key(key)
        if part is not None or (trained_biases and name.endswith(".bias")):
            continue
        module = module_name(name)
        listed = isinstance(saved, list) and any(module == m or module.endswith("." + m)
                                                 for m in saved)
        tokens = key.split(".")
        if "base_layer" in tokens or (module.rsplit(".", 1)[-1] in SAVED_EMBEDDING_LAYERS
                                      and "modules_to_save" not in tokens and not listed):
            copies.add(name)
    return sorted(copies)


# ----------------------------------------------------------------------------- state dict -> Adapter


def group_state_dict(state_dict: dict[str, torch.Tensor]):
    """Split a PEFT state dict into {module: {part/param: tensor}} and full replacement tensors."""
    modules: dict[str, dict[str, torch.Tensor]] = {}
    replacements: dict[str, torch.Tensor] = {}
    for key, tensor in state_dict.items():
        module, part, param = split_key(key)
        if part is None:
            replacements[module] = tensor
        else:
            slot = "lora_B.bias" if (part, param) == ("lora_B", "bias") else part
            modules.setdefault(module, {})[slot] = tensor
    return modules, replacements


def build_weight(module: str, parts: dict[str, torch.Tensor], scale: float,
                 fan_in_fan_out: bool, where: Path) -> LoraWeight:
    """One module's PEFT tensors -> a LoraWeight in the stored-weight layout."""
    if "lora_embedding_A" in parts or "lora_embedding_B" in parts:
        first, second, layer = "lora_embedding_A", "lora_embedding_B", "embedding"
    else:
        first, second, layer = "lora_A", "lora_B", "linear"
    for have, need in ((first, second), (second, first)):
        if have in parts and need not in parts:
            raise FormatError(f"{where}: {module}.{have} has no matching {need}; the adapter "
                              "file is incomplete, save it again")
    if first not in parts:
        raise FormatError(f"{where}: {module} has {', '.join(parts)} but no LoRA factors")
    A, B = parts[first], parts[second]  # PEFT layout: A (r, in, ...), B (out, r, ...)
    if A.dim() > 2 and B.dim() > 2 and 0 < B.shape[1] < A.shape[0] and A.shape[0] % B.shape[1] == 0:
        # PEFT's conv LoRA on a grouped base: lora_B is a grouped conv, (out, r / groups, 1, ...)
        raise UnsupportedError(f"{where}: {module}: a LoRA on a grouped convolution (groups = "
                               f"{A.shape[0] // B.shape[1]}): not supported yet (PEFT cannot "
                               "merge it either)")
    if A.shape[0] != B.shape[1]:
        raise FormatError(f"{where}: {module}: {first} has rank {A.shape[0]} but {second} has "
                          f"rank {B.shape[1]}; the factors come from different adapters")
    weight_shape = None
    if layer == "embedding":
        a, b = B.T, A.T                      # stored (vocab, dim): a (r, dim), b (vocab, r)
    elif A.dim() > 2:
        layer = "conv"
        weight_shape = (int(B.shape[0]),) + tuple(int(s) for s in A.shape[1:])
        a, b = A.reshape(A.shape[0], -1), B.reshape(B.shape[0], B.shape[1])
    elif fan_in_fan_out:
        layer = "conv1d"
        a, b = B.T, A.T                      # stored (in, out): a (r, out), b (in, r)
    else:
        a, b = A, B
    magnitude = parts.get("lora_magnitude_vector")
    weight = LoraWeight(a=a.contiguous(), b=b.contiguous(), scale=scale, layer=layer,
                        magnitude=None if magnitude is None else magnitude.reshape(-1),
                        bias=parts.get("lora_B.bias"), weight_shape=weight_shape)
    check_weight(module, weight, where=str(where))
    accounting.check_factors(module, weight, where)
    return weight


def adapter_from_state_dict(state_dict: dict[str, torch.Tensor], scale_for, *,
                            fan_in_fan_out: bool, where: Path, config: dict | None = None) -> Adapter:
    """``scale_for(module, rank) -> float`` resolves each module's effective scale; ``config``
    (adapter_config.json) for the variants stored in other shapes (BD-LoRA)."""
    modules, full = group_state_dict(state_dict)
    if config and config.get(peft_bdlora.CONFIG_FIELD):
        modules = {m: peft_bdlora.expand(config, m, parts, where) for m, parts in modules.items()}
    attention = peft_mha.attention_modules(modules)      # nn.MultiheadAttention layers
    weights = {}
    for module, parts in modules.items():
        rank_tensor = parts.get("lora_A", parts.get("lora_embedding_A"))
        rank = int(rank_tensor.shape[0]) if rank_tensor is not None else 0
        name, times = peft_mha.base_tensor(module, attention)
        # out_proj of an attention layer: its own r and alpha (PEFT's rank_pattern keys are
        # the outer module's), twice (peft_mha.py)
        owner = module.removesuffix(peft_mha.OUT_PROJ) if times != 1.0 else module
        weights[name] = build_weight(module, parts, scale_for(owner, rank) * times,
                                     fan_in_fan_out, where)
    adapter = Adapter(weights=weights, replacements=full)
    if attention:
        warnings.warn(f"{where}: {', '.join(sorted(attention))}: {peft_mha.DOUBLED}",
                      AdapterToolsWarning, stacklevel=4)
        adapter.metadata[peft_mha.METADATA] = sorted(attention)
    return adapter


def read_state_dict(folder: Path, *, light: bool = False) -> dict[str, torch.Tensor]:
    """The weights file's tensors; ``light``: as numpy (light.arrays.Stored), no torch."""
    weights = folder / WEIGHTS_NAME
    if weights.is_file():
        if light:
            from ..light.arrays import load_safetensors as load_light

            return load_light(weights)[0]
        return load_safetensors(weights)[0]
    legacy = folder / LEGACY_WEIGHTS_NAME
    if legacy.is_file():
        if light:                  # a pickle: only torch's weights-only unpickler reads it
            from ..light.arrays import NeedsTorch

            raise NeedsTorch(f"{legacy}: pickled")
        return load_legacy_bin(legacy)
    if (folder / "adapter_model.pt").is_file():
        raise UnsupportedError(f"{folder}: has {CONFIG_NAME} and torchtune's adapter_model.pt "
                               f"but no {WEIGHTS_NAME}: read it with --from torchtune")
    raise FormatError(f"{folder}: has {CONFIG_NAME} but neither {WEIGHTS_NAME} nor "
                      f"{LEGACY_WEIGHTS_NAME}; copy the weights file next to the config")


# What torch's weights-only unpickler says of a global it refuses (torch 2.6-2.13):
# "Trying to load unsupported GLOBAL posix.system whose module posix is blocked" and
# "Unsupported global: GLOBAL builtins.exec was not an allowed global by default".
REFUSED_GLOBAL = re.compile(r"GLOBAL ([\w.]+)")
CONVERT_HINT = ("if you trust its source, convert it to adapter_model.safetensors with trusted "
                "tools (PEFT's save_pretrained(safe_serialization=True)) and pass that folder")


def _unpickling_refusal(path: Path, exc: BaseException) -> FormatError:
    """torch.load's refusal in our words: never its hint to retry with ``weights_only=False``."""
    found = REFUSED_GLOBAL.search(str(exc))
    if found:
        return FormatError(f"{path}: refused: loading it would run code (the pickle calls "
                           f"{found.group(1)}), and adaptertools loads only plain tensors from "
                           f".bin files; {CONVERT_HINT}")
    # the line that says what is wrong, without torch's advice around it
    advice = ("Weights only load failed", "Please file an issue", "Check the documentation")
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()
             and "weights_only" not in line and not line.strip().startswith(advice)]
    detail = lines[0] if lines else type(exc).__name__
    return FormatError(f"{path}: not a plain tensor state dict, refusing to unpickle it "
                       f"({detail[:120]}); {CONVERT_HINT}")


def load_legacy_bin(path: Path) -> dict[str, torch.Tensor]:
    """A pickled state dict, loaded with ``weights_only=True`` so no code in it can run."""
    import torch

    try:
        with warnings.catch_warnings():      # its notes on pickle protocols are not ours to show
            warnings.simplefilter("ignore")
            data = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # an untrusted file: the unpickler raises many kinds (pickle,
        raise _unpickling_refusal(path, exc) from None   # zip, struct, EOF, Unicode errors...)
    if not isinstance(data, dict):
        raise FormatError(f"{path}: expected a dict of tensors, got {type(data).__name__}; this is "
                          "not a PEFT adapter_model.bin")
    for key, value in data.items():
        if not isinstance(key, str) or not isinstance(value, torch.Tensor):
            raise FormatError(f"{path}: entry {key!r} is a {type(value).__name__}, not a tensor; "
                              "this is not a PEFT adapter_model.bin")
    return data


# the reader takes --base as given (a path or a GGUF base's BaseInfo) and resolves it only for a
# torchtune export, so a PEFT adapter never needs a base the GGUF name maps know
BASE_AS_PATH = True


def uses_base(path: Path) -> bool:
    """Whether ``--base`` means anything for this adapter (convert's misuse check): only for
    torchtune's PEFT-form export, which the base repairs."""
    from .torchtune_export import is_torchtune_export

    folder = locate(Path(path))
    try:
        return folder is not None and is_torchtune_export(read_json(folder / CONFIG_NAME))
    except AdapterToolsError:
        return False


def _torchtune_export(config: dict, state_dict: dict, base, where: Path) -> dict:
    """torchtune 0.6.1's PEFT-form export (formats/torchtune_export.py) with its
    q/k bugs repaired when the base says which rule applies; a warning either way."""
    from .torchtune_export import is_torchtune_export, peft_export_fix
    from .names import BaseInfo, load_base_info

    if not is_torchtune_export(config):
        return state_dict
    qk = any(".q_proj." in k or ".k_proj." in k for k in state_dict)
    info = None
    if base is not None and qk:
        try:
            info = base if isinstance(base, BaseInfo) else load_base_info(base)
        except AdapterToolsError:
            info = None
    if info is None:
        if qk:
            warnings.warn(f"{where}: torchtune's PEFT-form export (its adapter_config.json): "
                          "torchtune 0.6.1 writes Qwen2's q/k lora_B and Llama's q/k DoRA "
                          "magnitudes in the wrong row order; pass --base (the HF model) to "
                          "repair them, or read its adapter_model.pt with --from torchtune",
                          AdapterToolsWarning, stacklevel=4)
        return state_dict
    try:
        fixed, notes = peft_export_fix(config, state_dict, info)
    except UnsupportedError:
        return state_dict            # an architecture torchtune 0.6.1 has no rule for
    for note in notes:
        warnings.warn(f"{where}: {note}", AdapterToolsWarning, stacklevel=4)
    return fixed


def read(path: Path, *, base=None, light: bool = False) -> Adapter:
    """``light``: the tensors as light.arrays.Stored (numpy, no torch); what the light path
    does not read raises light.arrays.NeedsTorch (the caller takes the torch path)."""
    folder = locate(Path(path))
    if folder is None:
        raise FormatError(f"{path}: no {CONFIG_NAME} here; pass the PEFT adapter folder")
    config_path = folder / CONFIG_NAME
    config = read_json(config_path)
    check_types({k: v for k, v in config.items() if k == "peft_type"}, config_path)
    peft_type = str(config.get("peft_type", "LORA")).upper()
    if peft_type in peft_lycoris.KINDS or peft_type == peft_tokens.TRAINABLE_TOKENS:
        _needs_torch(light, folder, peft_type)
        return _read_other_kind(folder, config, peft_type)
    check_config(config, config_path)
    use_rslora = bool(config.get("use_rslora", False))

    def scale_for(module: str, rank: int) -> float:
        expected_rank, alpha = resolve_rank_alpha(config, module)
        if rank and rank != expected_rank:
            raise FormatError(f"{folder}: {module} has rank {rank} but {CONFIG_NAME} says "
                              f"{expected_rank} (r / rank_pattern); fix the config")
        return scale_of(alpha, expected_rank, use_rslora)

    if config.get(peft_params.CONFIG_FIELD) or config.get(peft_bdlora.CONFIG_FIELD) or \
            config.get("trainable_token_indices") or uses_base(folder):
        _needs_torch(light, folder, "expert slices, block-diagonal A, token rows or torchtune")
    state_dict = _torchtune_export(config, read_state_dict(folder, light=light), base, folder)
    state_dict, note = peft_training_only.set_aside(state_dict, config)
    if note is not None:
        warnings.warn(f"{folder}: {note}", AdapterToolsWarning, stacklevel=3)
    state_dict, token_rows = peft_tokens.split(state_dict, config, folder)
    params = {}
    if config.get(peft_params.CONFIG_FIELD):
        state_dict, params = peft_params.split(
            state_dict, config, folder, lambda name: resolve_rank_alpha(config, name),
            lambda alpha, r: scale_of(alpha, r, use_rslora),
            lambda module: targets_cover(config.get("target_modules"), module))
    accounting.check_accounted(state_dict, config, folder)
    adapter = adapter_from_state_dict(state_dict, scale_for,
                                      fan_in_fan_out=bool(config.get("fan_in_fan_out")),
                                      where=folder, config=config)
    adapter.token_rows = token_rows
    if not adapter.weights and not adapter.replacements and not token_rows and not params:
        raise FormatError(f"{folder}: the weights file holds no LoRA tensors")
    accounting.warn_disagreements(adapter, config, config_path)
    adapter.weights.update(params)
    adapter.base_model = config.get("base_model_name_or_path")
    adapter.metadata = {"source_format": "peft", "peft_config": config, **adapter.metadata}
    copies = saved_base_copies(state_dict, config)
    if copies:
        from ..copies import SAVED_COPIES

        adapter.metadata[SAVED_COPIES] = copies
    return adapter


def _needs_torch(light: bool, folder: Path, what: str) -> None:
    """In the light path, what it does not read goes to the torch path."""
    if light:
        from ..light.arrays import NeedsTorch

        raise NeedsTorch(f"{folder}: {what}")


def _read_other_kind(folder: Path, config: dict, peft_type: str) -> Adapter:
    """A LoHa / LoKr (peft_lycoris.py) or TRAINABLE_TOKENS (peft_tokens.py) folder."""
    state_dict = read_state_dict(folder)
    if peft_type == peft_tokens.TRAINABLE_TOKENS:
        rest, rows = peft_tokens.split(state_dict, config, folder)
        if rest or not rows:
            raise foreign.unknown_keys(folder, sorted(rest) or ["(none)"],
                                       why="not trainable token rows (trainable_tokens_delta)")
        adapter = Adapter(token_rows=rows)
    else:
        adapter = peft_lycoris.read(folder, config, state_dict, pattern_value)
    adapter.base_model = config.get("base_model_name_or_path")
    adapter.metadata = {"source_format": "peft", "peft_config": config}
    return adapter


# ----------------------------------------------------------------------------- Adapter -> folder

DEFAULT_CONFIG = {
    "peft_type": "LORA", "task_type": None, "bias": "none", "lora_dropout": 0.0,
    "inference_mode": True, "init_lora_weights": True, "use_rslora": False,
    "fan_in_fan_out": False, "use_dora": False, "lora_bias": False, "modules_to_save": None,
    "rank_pattern": {}, "alpha_pattern": {}, "layers_to_transform": None, "layers_pattern": None,
}


# The layers fan_in_fan_out applies to: PEFT's Embedding and ConvNd ignore it (an embedding's
# delta is always transposed), so an embedding LoRA beside GPT-2 Conv1D ones is what PEFT writes.
FAN_IN_LAYERS = ("linear", "conv1d")


def _uniform_flag(adapter: Adapter, flag: str, has, among: tuple[str, ...] | None = None) -> bool:
    """PEFT has one config-wide switch for DoRA, lora_bias and fan_in_fan_out (that one only for
    the layer kinds ``among``)."""
    values = {name: has(w) for name, w in adapter.weights.items()
              if among is None or w.layer in among}
    if len(set(values.values())) > 1:
        example = next(name for name, value in values.items() if value)
        raise UnsupportedError(f"PEFT cannot express an adapter where only some tensors have "
                               f"{flag} (e.g. {example}): it is one switch for the whole adapter; "
                               "split the adapter")
    return any(values.values())


def _scales_reproduced(config: dict, adapter: Adapter) -> bool:
    try:
        resolved = {n: resolve_rank_alpha(config, _pattern_key(n, w))
                    for n, w in adapter.weights.items()}
    except (KeyError, TypeError, ValueError, re.error):
        return False
    rslora = bool(config.get("use_rslora"))
    return all(r == w.rank and scale_of(alpha, r, rslora) == w.scale
               for (r, alpha), w in zip(resolved.values(), adapter.weights.values()))


def _pattern_key(name: str, w) -> str:
    """What PEFT matches rank_pattern / alpha_pattern against: the module, or for a
    target_parameters LoRA the parameter's full name (peft_params.py)."""
    return name if peft_params.is_param(w) else module_name(name)


def _derive_rank_alpha(config: dict, adapter: Adapter) -> None:
    """Set r, lora_alpha and the patterns so that PEFT resolves every module's scale exactly."""
    rslora = bool(config.get("use_rslora"))
    ranks = {_pattern_key(n, w): w.rank for n, w in adapter.weights.items()}
    alphas = {_pattern_key(n, w): alpha_for(w.scale, w.rank, rslora)
              for n, w in adapter.weights.items()}
    common_rank = Counter(ranks.values()).most_common(1)[0][0]
    common_alpha = Counter(alphas.values()).most_common(1)[0][0]
    config["r"], config["lora_alpha"] = common_rank, common_alpha
    # full module names as patterns: they match exactly one module each
    config["rank_pattern"] = {m: r for m, r in sorted(ranks.items()) if r != common_rank}
    config["alpha_pattern"] = {m: a for m, a in sorted(alphas.items()) if a != common_alpha}


def _token_fields(config: dict, adapter: Adapter) -> None:
    """The config's token ids for ``adapter.token_rows``: the original's when they still say
    the same, else PEFT's per-module form."""
    saved = peft_tokens.state_dict_entries(adapter.token_rows,
                                           standalone=_standalone_tokens(adapter))
    try:
        read_back = peft_tokens.split(saved, config, "adapter_config.json")[1]
    except FormatError:
        read_back = {}
    if {n: r.indices for n, r in read_back.items()} != \
            {n: r.indices for n, r in adapter.token_rows.items()}:
        config.update(peft_tokens.config_fields(adapter.token_rows))


def config_for(adapter: Adapter) -> dict:
    """The adapter_config.json that makes PEFT rebuild exactly ``adapter``."""
    original = adapter.metadata.get("peft_config")
    config = dict(original) if isinstance(original, dict) else dict(DEFAULT_CONFIG)
    if _standalone_tokens(adapter):
        config.setdefault("target_modules", sorted(n.removesuffix(".weight")
                                                   for n in adapter.token_rows))
        _token_fields(config, adapter)
        return config
    config["peft_type"] = "LORA"
    if config.get(peft_bdlora.CONFIG_FIELD):       # its factors were made whole: plain LoRA
        config[peft_bdlora.CONFIG_FIELD] = None
    peft_training_only.clear(config)
    config["base_model_name_or_path"] = adapter.base_model
    config["use_dora"] = _uniform_flag(adapter, "DoRA magnitudes", lambda w: w.magnitude is not None)
    config["lora_bias"] = _uniform_flag(adapter, "lora_bias", lambda w: w.bias is not None)
    config["fan_in_fan_out"] = _uniform_flag(adapter, "a GPT-2 Conv1D layout",
                                             lambda w: w.layer == "conv1d", among=FAN_IN_LAYERS)
    modules = sorted(module_name(n) for n, w in adapter.weights.items()
                     if not peft_params.is_param(w))
    peft_params.config_fields(config, adapter.weights)
    if adapter.weights and not _scales_reproduced(config, adapter):
        _derive_rank_alpha(config, adapter)
    if not all(targets_cover(config.get("target_modules"), m) for m in modules):
        config.update(target_modules=modules, exclude_modules=None, layers_to_transform=None,
                      layers_pattern=None)
    if not adapter.weights:
        config.setdefault("r", 8)
        config.setdefault("lora_alpha", 8)
        config.setdefault("target_modules", [])
    from ..copies import saved_copies

    lora_modules = set(modules)
    # modules_to_save: modules with a full tensor other than a bias. Biases alone (bias "all" /
    # "lora_only") and saved copies of the base load by key: PEFT's ModulesToSaveWrapper would
    # look for the module's weight among the saved tensors (KeyError)
    full = [n for n in adapter.replacements if n not in saved_copies(adapter)]
    saved = list(dict.fromkeys(module_name(n) for n in full if not n.endswith(".bias")
                               and module_name(n) not in lora_modules))
    missing = [m for m in saved if not targets_cover(config.get("modules_to_save"), m)]
    if missing:
        config["modules_to_save"] = list(config.get("modules_to_save") or []) + missing
    biases = [n for n in full if n.endswith(".bias") and module_name(n) not in saved]
    if biases and config.get("bias", "none") == "none":
        config["bias"] = "lora_only" if all(module_name(n) in lora_modules for n in biases) \
            else "all"
    if adapter.token_rows:
        _token_fields(config, adapter)
    elif config.get("trainable_token_indices"):      # the rows were dropped: so are their ids
        config["trainable_token_indices"] = None
    return config


def _standalone_tokens(adapter: Adapter) -> bool:
    """An adapter of trainable tokens only, read from a TRAINABLE_TOKENS folder."""
    original = adapter.metadata.get("peft_config")
    return bool(adapter.token_rows) and not adapter.weights and not adapter.replacements and \
        isinstance(original, dict) and \
        str(original.get("peft_type", "")).upper() == peft_tokens.TRAINABLE_TOKENS


def state_dict_for(adapter: Adapter) -> dict[str, torch.Tensor]:
    """The adapter as PEFT's saved state dict (adapter name stripped, PEFT's factor layouts)."""
    out: dict[str, torch.Tensor] = {}
    out.update(peft_params.state_dict_entries(adapter.weights))
    for name, w in adapter.weights.items():
        stem = KEY_PREFIX + module_name(name)
        if peft_params.is_param(w):
            continue
        if w.layer == "embedding":
            out[f"{stem}.lora_embedding_A"] = w.b.T.contiguous()   # (r, vocab)
            out[f"{stem}.lora_embedding_B"] = w.a.T.contiguous()   # (dim, r)
        elif w.layer == "conv1d":
            out[f"{stem}.lora_A.weight"] = w.b.T.contiguous()      # (r, in)
            out[f"{stem}.lora_B.weight"] = w.a.T.contiguous()      # (out, r)
        elif w.layer == "conv":
            kernel = w.weight_shape[1:]
            out[f"{stem}.lora_A.weight"] = w.a.reshape((w.rank, *kernel)).contiguous()
            out[f"{stem}.lora_B.weight"] = w.b.reshape(
                (w.shape[0], w.rank) + (1,) * (len(kernel) - 1)).contiguous()
        else:
            out[f"{stem}.lora_A.weight"] = w.a.contiguous()
            out[f"{stem}.lora_B.weight"] = w.b.contiguous()
        if w.bias is not None:
            out[f"{stem}.lora_B.bias"] = w.bias.contiguous()
        if w.magnitude is not None:
            magnitude = w.magnitude
            if w.layer == "conv":  # PEFT keeps it broadcastable: (1, out, 1, ...)
                magnitude = magnitude.reshape((1, -1) + (1,) * (len(w.weight_shape) - 2))
            out[f"{stem}.lora_magnitude_vector"] = magnitude.contiguous()
    lora_modules = {module_name(n) for n in adapter.weights}
    for name, tensor in adapter.replacements.items():
        module, param = module_name(name), name.rsplit(".", 1)[-1]
        key = f"{module}.base_layer.{param}" if module in lora_modules else name
        out[KEY_PREFIX + key] = tensor.contiguous()
    out.update(peft_tokens.state_dict_entries(adapter.token_rows,
                                              standalone=_standalone_tokens(adapter)))
    return out


def write(adapter: Adapter, path: Path) -> None:
    """Fill the folder ``path`` (it exists and is empty) with a PEFT adapter."""
    from ..light.arrays import save_file     # torch's, or the light path's Stored tensors

    path = Path(path)
    config = config_for(adapter)
    save_file(state_dict_for(adapter), str(path / WEIGHTS_NAME), metadata={"format": "pt"})
    write_json(path / CONFIG_NAME, config)
