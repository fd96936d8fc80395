"""Every tensor of an adapter file accounted for, and its config and weights in agreement.

A reader must never exit 0 having dropped or misread tensors. These checks run on what it parsed:

- ``check_accounted``: each tensor of a PEFT-style state dict is a LoRA factor, a DoRA magnitude,
  a lora_bias, a saved copy of a layer (PEFT's ``base_layer`` copies and saved embedding layers),
  a trained bias (``bias`` "all" / "lora_only"), or a full tensor of a module the config lists in
  ``modules_to_save``. Anything else is refused, naming the first such keys and the format they
  look like (``foreign.py``).
- ``check_factors``: factors are floating point, and no delta is too large for any use.
- ``warn_disagreements``: where config and weights say different things (DoRA magnitudes without
  ``use_dora`` and the reverse, stored tensors ``target_modules`` does not cover), one warning
  each, saying which reading adaptertools uses and what PEFT would compute.
"""

from __future__ import annotations

import math
import re
import warnings

from ..adapter import Adapter, LoraWeight
from ..errors import AdapterToolsWarning, FormatError, UnsupportedError
from . import foreign

# The largest Frobenius norm whose square float32 holds: a delta beyond it cannot be used in
# fp32 arithmetic (a DoRA norm, an RMSNorm of the layer's outputs, our own SQNR all square it).
MAX_DELTA_NORM = math.sqrt((2 - 2 ** -23) * 2.0 ** 127)   # float32's largest; ~1.8e19


def _saved_copy(stem: str, module: str) -> bool:
    """A copy of a layer's own weights PEFT saves beside the adapter: a targeted layer's
    ``base_layer`` tensors, or an embedding layer saved whole (``save_embedding_layers``)."""
    from .peft_keys import SAVED_EMBEDDING_LAYERS

    return "base_layer" in stem.split(".") or module.rsplit(".", 1)[-1] in SAVED_EMBEDDING_LAYERS


def _in_modules_to_save(module: str, saved) -> bool:
    """PEFT's own test (tuners_utils.check_target_module_exists): ``(^|.*\\.)m($|\\..*)``."""
    for m in saved or ():
        try:
            if re.match(rf"(^|.*\.){m}($|\..*)", module):
                return True
        except re.error:
            if module == m or module.endswith("." + m):
                return True
    return False


def check_accounted(state_dict: dict, config: dict | None, where) -> None:
    """Refuse tensors of a PEFT-style state dict that are none of the kinds listed above.
    ``config`` None: a bare file, whose full tensors nothing lists in modules_to_save."""
    from .peft_keys import KEY_PREFIX, split_key

    config = config or {}
    lora_modules, nested, unknown = set(), [], []
    for key in state_dict:
        module, part, param = split_key(key)
        stem = key[len(KEY_PREFIX):] if key.startswith(KEY_PREFIX) else key
        if part is not None:
            if "base_layer" in module.split("."):
                nested.append((key, module))       # a LoRA inside another LoRA's base layer
            else:
                lora_modules.add(module)
            continue
        owner = module.rsplit(".", 1)[0]
        trained_bias = module.endswith(".bias") and config.get("bias") in ("all", "lora_only")
        if not (_saved_copy(stem, owner) or trained_bias
                or _in_modules_to_save(owner, config.get("modules_to_save"))):
            unknown.append(key)
    for key, module in nested:
        outer, _, inner = module.partition(".base_layer.")
        if inner == "out_proj" and outer in lora_modules:
            # peft/tuners/lora/layer.py MultiheadAttention: in_proj's factors on the module,
            # out_proj's on base_layer.out_proj (formats/peft_mha.py places them)
            continue
        unknown.append(key)
    if unknown:
        why = ("neither LoRA tensors nor full tensors of modules listed in modules_to_save"
               if config else "not LoRA tensors, and a bare file has no config listing "
                              "modules_to_save (pass the PEFT folder instead)")
        raise foreign.unknown_keys(where, unknown, why=why)


# ----------------------------------------------------------------------------- factors

def check_factors(name: str, w: LoraWeight, where) -> None:
    """Floating-point factors (an int32 "factor" is no LoRA), and a delta some model can use."""
    for part, tensor in (("lora_A", w.a), ("lora_B", w.b), ("DoRA magnitude", w.magnitude),
                         ("lora bias", w.bias)):
        if tensor is not None and not tensor.is_floating_point():
            raise FormatError(f"{where}: {name}: {part} is {str(tensor.dtype).removeprefix('torch.')}"
                              ", not a floating-point tensor; LoRA factors are floats: the file "
                              "is damaged or not a LoRA adapter")
    norm = delta_norm(w)
    if not norm <= MAX_DELTA_NORM:            # (NaN factors are the NaN checks' to name)
        if math.isnan(norm):
            return
        raise FormatError(f"{where}: {name}: the delta (scale {w.scale:g} x B @ A) has norm "
                          f"{norm:.3g}, beyond {MAX_DELTA_NORM:.3g}, the largest whose square "
                          "float32 holds: no model can use it; check lora_alpha / r (or --scale)")


def delta_norm(w: LoraWeight) -> float:
    """``||scale * b @ a||_F`` from (r, r) Gram matrices: trace((a a^T)(b^T b)), in float64."""
    a, b = w.a.double(), w.b.double()
    squared = float(((a @ a.T) * (b.T @ b)).sum())
    return abs(w.scale) * math.sqrt(max(squared, 0.0)) if math.isfinite(squared) else squared


def check_adapter(adapter: Adapter, where) -> None:
    for name, w in adapter.weights.items():
        check_factors(name, w, where)


# ----------------------------------------------------------------------------- config vs weights

def peft_targets(config: dict, module: str) -> bool:
    """Would PEFT put a LoRA on ``module``? tuners_utils.check_target_module_exists (0.21.2):
    exclude_modules and modules_to_save first, then target_modules, layers_to_transform."""
    exclude = config.get("exclude_modules")
    if isinstance(exclude, str):
        if re.fullmatch(exclude, module):
            return False
    elif exclude and (module in exclude or any(module.endswith("." + e) for e in exclude)):
        return False
    if _in_modules_to_save(module, config.get("modules_to_save")):
        return False
    targets = config.get("target_modules")
    if isinstance(targets, str):
        return re.fullmatch(targets, module) is not None
    if module in targets:
        return True
    if not any(module.endswith("." + t) for t in targets):
        return False
    layers = config.get("layers_to_transform")
    if layers is None or layers == []:
        return True
    patterns = config.get("layers_pattern") or None
    match = None
    if patterns is None:
        match = re.match(r".*?\.[^.]*\.(?P<idx>\d+)\.", module)
    else:
        for pattern in [patterns] if isinstance(patterns, str) else patterns:
            match = re.match(rf"(?:^|.*?\.){pattern}\.(?P<idx>\d+)\.", module)
            if match:
                break
    if match is None:
        return False
    index = int(match.group("idx"))
    return index == layers if isinstance(layers, int) else index in layers


def _examples(names: list[str]) -> str:
    return ", ".join(names[:3]) + (f" and {len(names) - 3} more" if len(names) > 3 else "")


def _targeted_as(module: str, attention: set[str]) -> str:
    owner = module.removesuffix(".out_proj")
    return owner if owner != module and owner in attention else module


def warn_disagreements(adapter: Adapter, config: dict, where) -> None:
    """One AdapterToolsWarning for each way ``config`` and the weights disagree."""
    from ..adapter import module_name

    from .peft_mha import METADATA

    # an attention layer's out_proj is targeted through the attention module (peft_mha.py)
    attention = set(adapter.metadata.get(METADATA) or ())
    modules = {_targeted_as(module_name(n), attention): w for n, w in adapter.weights.items()}
    with_magnitude = [m for m, w in modules.items() if w.magnitude is not None]
    without = [m for m, w in modules.items() if w.magnitude is None]
    if with_magnitude and not config.get("use_dora"):
        warnings.warn(f"{where}: the weights hold DoRA magnitudes (lora_magnitude_vector, e.g. "
                      f"{with_magnitude[0]}) but `use_dora` is not set: adaptertools reads them as "
                      "DoRA, as the weights say (torchtune exports DoRA so); PEFT would ignore "
                      "them and compute plain LoRA. Set \"use_dora\": true if it is DoRA",
                      AdapterToolsWarning, stacklevel=3)
    if config.get("use_dora") and without:
        warnings.warn(f"{where}: `use_dora` is true but {len(without)} module(s) have no "
                      f"lora_magnitude_vector ({_examples(without)}): adaptertools reads those as "
                      "plain LoRA; PEFT would apply DoRA with its initial magnitudes (the base "
                      "weight's own norms) instead. Save the adapter again, or set \"use_dora\": "
                      "false if it is plain LoRA", AdapterToolsWarning, stacklevel=3)
    targets = config.get("target_modules")
    if targets is None or targets == "all-linear":
        return                     # PEFT chose the modules itself (architecture defaults)
    try:
        ignored = sorted(m for m in modules if not peft_targets(config, m))
    except (re.error, TypeError, RecursionError):   # fields PEFT itself could not use either
        return
    if ignored:
        warnings.warn(f"{where}: target_modules (with exclude_modules, layers_to_transform, "
                      f"modules_to_save) does not cover {len(ignored)} module(s) the weights "
                      f"adapt ({_examples(ignored)}): PEFT ignores their tensors, adaptertools "
                      "applies them. Add them to target_modules if they were trained, or drop "
                      "their tensors", AdapterToolsWarning, stacklevel=3)


def invocation_tokens(adapter: Adapter) -> list[int] | None:
    """An activated LoRA's invocation tokens (PEFT's ``alora_invocation_tokens``, GGUF's
    ``adapter.alora.invocation_tokens``), or None for an adapter that applies everywhere."""
    config = adapter.metadata.get("peft_config")
    tokens = (config if isinstance(config, dict) else {}).get("alora_invocation_tokens")
    return tokens or adapter.metadata.get("alora_invocation_tokens") or None
