"""PEFT ``target_parameters`` adapters: LoRA on ``nn.Parameter``s (``lora.ParamWrapper``), 2-D or
the fused 3-D expert tensors of transformers-5 MoE models (kernels/param_lora.py has the delta).

Facts (PEFT 0.21.2, peft/tuners/tuners_utils.py ``_inject_parameters``):
  * the LoRA of parameter ``m.p`` is saved under module ``m``: ``m.lora_A.weight`` (r*E, in),
    ``m.lora_B.weight`` (out, r*E); the base tensor is ``m.p`` (no ``.weight`` suffix for experts:
    ``mlp.experts.gate_up_proj``).
  * several targeted parameters of one module nest: PEFT walks the module's own parameters in
    registration order and wraps the wrapper, so the FIRST registered is the innermost:
    ``experts.base_layer.lora_A.weight`` is ``gate_up_proj``'s, ``experts.lora_A.weight``
    ``down_proj``'s (every transformers-5 experts module registers gate_up_proj, then
    down_proj: REGISTRATION_ORDER). The adapter alone cannot say the order of other names, so
    those are refused.
  * r and alpha come from rank_pattern / alpha_pattern matched against ``m.p``.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from ..errors import FormatError, UnsupportedError
from .peft_keys import KEY_PREFIX, split_key

if TYPE_CHECKING:      # the light path's tensors are numpy (light.arrays.Stored)
    import torch

CONFIG_FIELD = "target_parameters"
BASE_LAYER = ".base_layer"
# parameter names of transformers-5 experts modules, in the order they are registered
REGISTRATION_ORDER = ("gate_up_proj", "gate_proj", "up_proj", "down_proj")
REFUSED_BY_OTHER_FORMATS = ("a LoRA on a fused MoE expert tensor or an nn.Parameter (PEFT "
                            "target_parameters), which only PEFT expresses (llama.cpp's "
                            "converter refuses it too); merge it into its base (adaptertools "
                            "merge), or keep the PEFT folder")


def _candidates(owner: str, targets: list[str], levels: int | None = None) -> list[str]:
    """The parameter names of ``owner`` that ``target_parameters`` matches, as PEFT matches
    them (the key ``owner.p`` equals a target or ends with ``.target``). A bare name
    (``down_proj``, as PEFT's "all-linear" writes it) matches any module, so where the module
    has fewer nesting ``levels`` than matches, the names that also name the module
    (``gate.weight``) are the ones, if they are as many as the levels."""
    found, specific = [], []
    for target in targets:
        param = target.rpartition(".")[2]
        key = f"{owner}.{param}"
        if (key == target or key.endswith("." + target)) and param not in found:
            found.append(param)
            if "." in target:
                specific.append(param)
    if levels is not None and len(found) > levels and len(specific) == levels:
        return specific
    return found


def wrap_order(owner: str, params: list[str], where) -> list[str]:
    """``params`` innermost wrapper first (PEFT's nesting), or an UnsupportedError."""
    if len(params) <= 1:
        return list(params)
    unknown = [p for p in params if p not in REGISTRATION_ORDER]
    if unknown:
        raise UnsupportedError(f"{where}: {owner}: target_parameters {', '.join(params)} nest on "
                               "one module in its parameters' registration order, which the "
                               f"adapter does not record for {', '.join(unknown)}; merge it "
                               "with PEFT")
    return sorted(params, key=REGISTRATION_ORDER.index)


def split(state_dict: dict[str, torch.Tensor], config: dict, where: Path, rank_alpha, scale_of,
          module_target):
    """(the state dict less the target_parameters LoRAs, {base tensor name: ParamLoraWeight}).

    ``rank_alpha(name) -> (r, alpha)`` and ``scale_of(alpha, r)`` are peft.py's rules;
    ``module_target(module)``: whether ``target_modules`` covers it (its LoRA is then a
    module's, kept in the state dict)."""
    from ..kernels.param_lora import ParamLoraWeight, check

    targets = config.get(CONFIG_FIELD) or []
    if isinstance(targets, str):
        targets = [targets]
    levels: dict[str, dict[int, dict[str, torch.Tensor]]] = {}
    rest = {}
    for key, tensor in state_dict.items():
        module, part, param = split_key(key)
        owner, depth = module, 0
        while owner.endswith(BASE_LAYER):
            owner, depth = owner[: -len(BASE_LAYER)], depth + 1
        if part not in ("lora_A", "lora_B") or param != "weight" or \
                (depth == 0 and module_target(owner)) or not _candidates(owner, targets):
            rest[key] = tensor
            continue
        levels.setdefault(owner, {}).setdefault(depth, {})[part] = tensor
    weights = {}
    for owner, by_depth in levels.items():
        params = wrap_order(owner, _candidates(owner, targets, len(by_depth)), where)
        if sorted(by_depth) != list(range(len(params))):
            raise FormatError(f"{where}: {owner}: LoRA factors at {len(by_depth)} nesting "
                              f"level(s) but target_parameters names {len(params)} of its "
                              f"parameters ({', '.join(params)}); fix the config")
        for depth, parts in by_depth.items():
            name = f"{owner}.{params[len(params) - 1 - depth]}"
            if set(parts) != {"lora_A", "lora_B"}:
                raise FormatError(f"{where}: {name}: only {', '.join(parts)} saved; the adapter "
                                  "file is incomplete, save it again")
            r, alpha = rank_alpha(name)
            a, b = parts["lora_A"], parts["lora_B"]
            experts = int(a.shape[0]) // r if a.dim() == 2 and a.shape[0] % r == 0 else 0
            if experts < 1:
                raise FormatError(f"{where}: {name}: lora_A {tuple(a.shape)} is not (r*E, in) "
                                  f"for r = {r} (r / rank_pattern); fix the config")
            w = ParamLoraWeight(a=a, b=b, scale=scale_of(alpha, r), num_experts=experts)
            check(name, w, str(where))
            weights[name] = w
    return rest, weights


def is_param(w) -> bool:
    return getattr(w, "layer", None) == "param"


def state_dict_entries(weights: dict) -> dict[str, torch.Tensor]:
    """PEFT's saved keys for the target_parameters LoRAs among ``weights`` (nested as PEFT
    nests them)."""
    owners: dict[str, list[str]] = {}
    for name, w in weights.items():
        if is_param(w):
            owner, _, param = name.rpartition(".")
            owners.setdefault(owner, []).append(param)
    out = {}
    for owner, params in owners.items():
        ordered = wrap_order(owner, params, owner)
        for i, param in enumerate(ordered):
            w = weights[f"{owner}.{param}"]
            stem = KEY_PREFIX + owner + BASE_LAYER * (len(ordered) - 1 - i)
            out[f"{stem}.lora_A.weight"] = w.a.contiguous()
            out[f"{stem}.lora_B.weight"] = w.b.contiguous()
    return out


def config_fields(config: dict, weights: dict) -> None:
    """``target_parameters`` in ``config`` covering every target_parameters LoRA of
    ``weights`` (their full names where the config's did not match them)."""
    names = sorted(n for n, w in weights.items() if is_param(w))
    if not names:
        return
    targets = config.get(CONFIG_FIELD) or []
    owner_of = {n: n.rpartition(".")[0] for n in names}
    if not all(n.rpartition(".")[2] in _candidates(owner_of[n], targets) for n in names):
        config[CONFIG_FIELD] = names
