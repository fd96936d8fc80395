"""Per-expert 2-D LoRAs merged into a fused expert tensor (the unsloth-zoo#885 case): an adapter
trained where each expert was its own Linear (transformers 4: ``mlp.experts.{e}.gate_proj`` /
``up_proj`` / ``down_proj``, Mixtral's ``block_sparse_moe.experts.{e}.w1`` / ``w3`` / ``w2``),
merged into a transformers-5 checkpoint that stores the experts fused.

The fused layout is transformers 5's own conversion (transformers/conversion_mapping.py,
qwen2_moe / qwen3_moe / mixtral ...): ``MergeModulelist(dim=0)`` stacks the experts and
``Concatenate(dim=1)`` puts gate before up, so
  gate_up_proj (E, 2*inter, hidden): [e, :inter] = expert e's gate_proj (w1), [e, inter:] its
  up_proj (w3); down_proj (E, hidden, inter): [e] = expert e's down_proj (w2).
Each LoRA thus changes its own rows of one expert (kernels/param_lora.py ``ExpertSlices``), and
the merge of those rows is the Linear merge PEFT made of that module.
"""

from __future__ import annotations

import re
from dataclasses import replace

from ..errors import FormatError, UnsupportedError

PER_EXPERT = re.compile(r"^(?P<stem>.*\.experts)\.(?P<e>\d+)\.(?P<proj>gate_proj|up_proj|"
                        r"down_proj|w1|w3|w2)\.weight$")
# per-expert module -> (fused parameter, which half of its rows: 0 first, 1 second, None all)
FUSED = {"gate_proj": ("gate_up_proj", 0), "w1": ("gate_up_proj", 0),
         "up_proj": ("gate_up_proj", 1), "w3": ("gate_up_proj", 1),
         "down_proj": ("down_proj", None), "w2": ("down_proj", None)}
RENAMED = (("block_sparse_moe.", "mlp."),)     # transformers 5's Mixtral module rename
SAVED_RENAMES = tuple((new, old) for old, new in RENAMED)    # ... and back, as it saves them
# the per-expert names a saved checkpoint may hold for each fused parameter (transformers 5
# saves the transformers-4 layout back: mlp.experts.{e}.gate_proj, Mixtral's w1/w3/w2)
SAVED_NAMES = {"gate_up_proj": (("gate_proj", "up_proj"), ("w1", "w3")),
              "gate_proj": (("gate_proj",), ("w1",)), "up_proj": (("up_proj",), ("w3",)),
              "down_proj": (("down_proj",), ("w2",))}


def _fused_name(stem: str, param: str, known) -> str | None:
    for old, new in ((None, None), *RENAMED):
        name = f"{stem.replace(old, new) if old else stem}.{param}"
        if name in known and len(known[name].shape) == 3:
            return name
    return None


def fold_per_expert(adapter, known: dict, adapter_name: str):
    """``adapter`` with its per-expert 2-D LoRAs that have no base tensor of their own gathered
    into one ``ExpertSlices`` per fused base tensor; itself when it has none. A fused
    target_parameters LoRA on a base saved per expert goes the other way first (split_fused)."""
    from ..adapter import LoraWeight
    from ..kernels.param_lora import ExpertSlices

    adapter = split_fused(adapter, known, adapter_name)
    groups: dict[str, list] = {}
    kept = {}
    for name, w in adapter.weights.items():
        match = PER_EXPERT.match(name)
        fused = None if match is None or name in known else \
            _fused_name(match["stem"], FUSED[match["proj"]][0], known)
        if fused is None:
            kept[name] = w
            continue
        if not isinstance(w, LoraWeight) or w.layer != "linear" or w.magnitude is not None \
                or w.bias is not None:
            raise UnsupportedError(f"{name} (adapter {adapter_name}): only a plain LoRA of one "
                                   f"expert folds into the fused {fused}; this is a "
                                   f"{getattr(w, 'layer', type(w).__name__)} delta"
                                   f"{' with DoRA' if w.magnitude is not None else ''}; merge "
                                   "it into a checkpoint with separate expert modules")
        groups.setdefault(fused, []).append((int(match["e"]), match["proj"], name, w))
    if not groups:
        return adapter
    for fused, members in groups.items():
        kept[fused] = ExpertSlices(tuple(_piece(fused, known[fused].shape, m, adapter_name)
                                         for m in sorted(members)), tuple(known[fused].shape))
        _check_experts(fused, known[fused].shape[0], members, adapter_name)
    return replace(adapter, weights=kept)


def _piece(fused: str, shape, member, adapter_name: str):
    expert, proj, name, w = member
    half = FUSED[proj][1]
    rows = shape[1] if half is None else shape[1] // 2
    if tuple(w.shape) != (rows, shape[2]) or (half is not None and shape[1] % 2):
        raise FormatError(f"{name} (adapter {adapter_name}): LoRA delta {tuple(w.shape)} does "
                          f"not fit {'a half of ' if half is not None else ''}expert {expert} "
                          f"of the fused {fused} {tuple(shape)}; is the adapter for another "
                          "model?")
    return expert, 0 if half is None else half * rows, w


def _check_experts(fused: str, experts: int, members, adapter_name: str) -> None:
    """Every per-expert module the adapter has must cover the base's experts exactly."""
    by_proj: dict[str, set[int]] = {}
    for expert, proj, _, _ in members:
        by_proj.setdefault(proj, set()).add(expert)
    for proj, seen in by_proj.items():
        if seen != set(range(experts)):
            raise FormatError(f"{fused}: the adapter {adapter_name} has {proj} LoRAs for "
                              f"{len(seen)} expert(s) (0..{max(seen)}) but the base fuses "
                              f"{experts}; the adapter is for a model with another expert "
                              "count")


# -- the other way: a fused target_parameters LoRA onto a checkpoint saved per expert --------------

def split_fused(adapter, known: dict, adapter_name: str):
    """``adapter`` with each target_parameters LoRA on a fused expert tensor the base does not
    store, but stores per expert (transformers 5's save_pretrained writes the transformers-4
    layout back: ``mlp.experts.{e}.gate_proj`` / Mixtral's ``block_sparse_moe.experts.{e}.w1``),
    split into one 2-D target_parameters LoRA per expert and projection: expert e's delta is
    B3[rows, :, e] @ A3[e] with A3 = A (E, r, in) and B3 = B (out, r, E) (kernels/param_lora.py),
    the rows of gate_up_proj split gate first, as transformers 5's conversion concatenates them."""
    weights, changed = {}, False
    for name, w in adapter.weights.items():
        if name in known or getattr(w, "layer", None) != "param" or w.transposed:
            weights[name] = w
            continue
        saved = [name.replace(old, new) for old, new in SAVED_RENAMES if old in name]
        if w.num_experts == 1 and saved and saved[0] in known:    # Mixtral's router, as saved
            weights[saved[0]], changed = w, True
            continue
        stack = per_expert_stack(name, known) if w.num_experts > 1 else None
        if stack is None:
            weights[name] = w
            continue
        changed = True
        if len(stack) != w.num_experts:
            raise FormatError(f"{name} (adapter {adapter_name}): a LoRA for {w.num_experts} "
                              f"experts, but the base stores {len(stack)} per-expert tensors; "
                              "the adapter is for a model with another expert count")
        weights.update(_per_expert_loras(name, w, stack, known, adapter_name))
    return replace(adapter, weights=weights) if changed else adapter


def _per_expert_loras(name: str, w, stack: list[list[str]], known: dict, adapter_name: str):
    from ..kernels.param_lora import ParamLoraWeight

    e = w.num_experts
    a3 = w.a.reshape(e, -1, w.a.shape[-1])                               # (E, r, in)
    b3 = w.b.reshape(w.b.shape[0], -1, e)                                # (out, r, E)
    rows = [int(known[n].shape[0]) for n in stack[0]]
    if sum(rows) != b3.shape[0] or any(tuple(known[n].shape)[1:] != (a3.shape[-1],)
                                       for n in stack[0]):
        raise FormatError(f"{name} (adapter {adapter_name}): LoRA delta {tuple(w.stored_shape)} "
                          f"does not fit the base's per-expert {', '.join(stack[0])} "
                          f"({', '.join(str(tuple(known[n].shape)) for n in stack[0])}); is the "
                          "adapter for another model?")
    out = {}
    for expert, names in enumerate(stack):
        start = 0
        for part, count in zip(names, rows):
            out[part] = ParamLoraWeight(a=a3[expert].contiguous(),
                                        b=b3[start:start + count, :, expert].contiguous(),
                                        scale=w.scale, num_experts=1)
            start += count
    return out


def expert_names(owner: str, names: tuple[str, ...], shapes: dict) -> list[list[str]]:
    """``[[owner.{e}.{name}.weight for name in names] for e]`` while every one is in shapes."""
    stack: list[list[str]] = []
    while all(f"{owner}.{len(stack)}.{n}.weight" in shapes for n in names):
        stack.append([f"{owner}.{len(stack)}.{n}.weight" for n in names])
    return stack


def per_expert_stack(name: str, shapes: dict) -> list[list[str]] | None:
    """For the fused expert parameter ``name`` (``...mlp.experts.gate_up_proj``): the names of
    the per-expert tensors a saved checkpoint holds for it, per expert in row order (gate, up),
    or None when ``shapes`` has none."""
    for candidate in [name] + [name.replace(old, new) for old, new in SAVED_RENAMES if old in name]:
        owner, _, param = candidate.rpartition(".")
        for names in SAVED_NAMES.get(param, ()):
            stack = expert_names(owner, names, shapes)
            if stack:
                return stack
    return None
