"""MoE expert LoRAs in llama.cpp's GGUF adapters: PEFT ``target_parameters`` LoRAs on the fused
3-D expert tensors of transformers-5 models (kernels/param_lora.py), and on 2-D parameters such
as the router, re-laid as the tensors llama.cpp applies them to.

Facts (llama.cpp vendored by llama-cpp-python 0.3.36):
  * llama.cpp applies a LoRA to an expert matmul in ``build_lora_mm_id`` (src/llama-graph.cpp
    1555-1595): ``mul_mat_id(lora_b, mul_mat_id(lora_a, x, ids), ids) * alpha / rank``, rank =
    ``lora_b->ne[0]``. ``ggml_mul_mat_id`` (ggml/src/ggml.c 3401) takes one matrix per expert,
    so both factors are 3-D: ``lora_a`` ne (in, r, E) = numpy (E, r, in), ``lora_b`` ne
    (r, out, E) = numpy (E, out, r), for the base ``ffn_{gate,up,down}_exps`` ne (in, out, E).
  * the loader (src/llama-adapter.cpp 359-371) checks only ne[0] and ne[1] (base in == a's,
    base out == b's, a's r == b's r), not the expert count, so a wrong E is refused here.
  * qwen2moe, qwen3moe, olmoe and Mixtral (arch llama) store gate and up separately
    (src/models/qwen2moe.cpp 47-49, qwen3moe.cpp 52-54, olmoe.cpp 43-45, llama.cpp 80-82), and
    llama.cpp's converter splits transformers-5's ``gate_up_proj`` (E, 2*inter, hidden) rows at
    ``inter``, gate first (conversion/qwen.py Qwen2MoeModel.modify_tensors), or stacks the
    per-expert gate/up/down (w1/w3/w2) weights of a saved checkpoint (OlmoeModel, LlamaModel):
    the gate rows of B go to ``ffn_gate_exps``, the up rows to ``ffn_up_exps``, A to both.
  * a router LoRA (``mlp.gate.weight``, a 2-D parameter) is an ordinary 2-D LoRA on
    ``ffn_gate_inp`` (``build_lora_mm`` on gate_inp in ``build_moe_ffn``).

PEFT's factors (kernels/param_lora.py): A (r*E, in) expert-major, B (out, r*E) rank-major, so
expert e's A is ``A.reshape(E, r, in)[e]`` and its B ``B.reshape(out, r, E)[:, :, e]``.
"""

from __future__ import annotations

from dataclasses import replace

from ..errors import FormatError, UnsupportedError
from ..merging.expert_slices import PER_EXPERT as PER_EXPERT_NAME
from ..merging.expert_slices import SAVED_NAMES
from ..merging.expert_slices import SAVED_RENAMES as RENAMED
from ..merging.expert_slices import expert_names as _expert_names

# llama.cpp architectures whose routed experts take a LoRA (names.HF_ARCHITECTURES), with the
# converter class whose expert layout the split below follows
EXPERT_ARCHS = {
    "qwen2moe": "qwen.py Qwen2MoeModel (gate_up_proj rows split at inter)",
    "qwen3moe": "qwen.py Qwen3MoeModel(Qwen2MoeModel)",
    "olmoe": "olmo.py OlmoeModel (experts.{e}.gate_proj/up_proj/down_proj stacked)",
    "llama": "llama.py LlamaModel (Mixtral block_sparse_moe.experts.{e}.w1/w3/w2 stacked)",
    "deepseek2": "deepseek.py DeepseekV2Model (mlp.experts.{e}.gate_proj/up_proj/down_proj "
                 "stacked; src/models/deepseek2.cpp takes ffn_gate_up_exps or, as here, the two)",
    "glm4moe": "glm.py Glm4MoeModel (mlp.experts.{e}.gate_proj/up_proj/down_proj stacked)",
    "dots1": "dots1.py Dots1Model(Qwen2MoeModel) (mlp.experts.{e}.gate_proj/up_proj/down_proj "
             "stacked)",
    "ernie4_5-moe": "ernie.py Ernie4_5MoeModel (mlp.experts.{e}.gate_proj/up_proj/down_proj "
                    "stacked)",
}
# fused expert parameter -> the parameters gguf-py maps to llama.cpp's tensors, each with
# (part, parts): its share of the fused rows
SPLITS = {"gate_up_proj": (("gate_proj", 0, 2), ("up_proj", 1, 2)),
          "gate_proj": (("gate_proj", 0, 1),), "up_proj": (("up_proj", 0, 1),),
          "down_proj": (("down_proj", 0, 1),)}
# architectures whose converter splits kv_b_proj per head into attn_k_b / attn_v_b (split_kv_b);
# minicpm3 (minicpm.py MiniCPM3Model) stores it whole, as attn_kv_b
KV_B_SPLIT = frozenset({"deepseek2"})
# the per-expert HF names a GGUF expert tensor maps back to when no base weights say which
# (llama.cpp's converter stacks these: LlamaModel Mixtral's, the others' mlp.experts.{e})
PER_EXPERT_NAMING = {"llama": r"model\.layers\.\d+\.block_sparse_moe\.experts\.w[123]"}
DEFAULT_PER_EXPERT_NAMING = r"model\.layers\.\d+\.mlp\.experts\.(gate|up|down)_proj"


def is_param(w) -> bool:
    return getattr(w, "layer", None) == "param"


def gguf_view(weights: dict, base, shapes: dict | None = None) -> tuple[dict, dict[str, dict]]:
    """``weights`` with every target_parameters LoRA re-expressed on llama.cpp's tensors, and
    for each re-expressed name what our GGUF entry records to undo it. ``shapes`` (a GGUF
    base's tensor shapes, for merges): a DeepSeek kv_b_proj LoRA is re-laid on the attn_k_b /
    attn_v_b the base holds instead (split_kv_b).

    A 3-D LoRA (E, out, in) becomes one ParamLoraWeight per GGUF tensor, under the HF name
    gguf-py maps to it (``...experts.gate_proj.weight``), with B's rows of that part; a 2-D one
    (the router) becomes a plain linear LoraWeight of the same delta (``B @ A * scale``)."""
    from ..adapter import LoraWeight

    view, origin = {}, {}
    stacks: dict[tuple[str, str], dict[int, tuple[str, object]]] = {}
    for name, w in weights.items():
        match = PER_EXPERT_NAME.match(name)
        if match is not None and isinstance(w, LoraWeight) and w.layer == "linear":
            stacks.setdefault((match["stem"], match["proj"]), {})[int(match["e"])] = (name, w)
            continue
        if name.endswith("kv_b_proj.weight") and shapes is not None and \
                base.arch in KV_B_SPLIT and _kv_b_names(name, base)[0] in shapes:
            view.update(split_kv_b(name, w, base, shapes))
            continue
        if not is_param(w):
            view[name] = w
            continue
        if w.num_experts == 1:
            view[name] = LoraWeight(a=w.a, b=w.b, scale=w.scale, layer="linear")
            origin[name] = {"param": True}
            continue
        owner, _, param = name.rpartition(".")
        if base.arch not in EXPERT_ARCHS or param not in SPLITS or w.transposed:
            raise UnsupportedError(
                f"{name}: llama.cpp's {base.arch!r} has no expert LoRA layout for this "
                f"{'(E, in, out) ' if w.transposed else ''}expert tensor (GGUF expert LoRAs: "
                f"{', '.join(f'{p} of {a}' for a in sorted(EXPERT_ARCHS) for p in SPLITS)}); "
                "merge it into its base (adaptertools merge), or keep the PEFT folder")
        rows = int(w.b.shape[0])
        parts = SPLITS[param]
        if rows % len(parts):
            raise FormatError(f"{name}: {rows} rows of lora_B cannot be split into gate and up "
                              "halves; the adapter is damaged or not for this model")
        size = rows // len(parts)
        for target, part, _ in parts:
            piece = f"{owner}.{target}.weight"
            view[piece] = replace(w, b=w.b[part * size:(part + 1) * size])
            origin[piece] = {"name": name, "experts": w.num_experts,
                             "rows": [part * size, (part + 1) * size]}
    for (stem, proj), members in stacks.items():
        piece = f"{stem}.{proj}.weight"
        view[piece] = _stacked_lora(piece, members, base)
        origin[piece] = {"per_expert": [members[e][0] for e in sorted(members)]}
    return view, origin


def _stacked_lora(piece: str, members: dict[int, tuple[str, object]], base):
    """Per-expert 2-D LoRAs of one projection (``experts.{e}.gate_proj``, a transformers-4
    layout adapter) as the one 3-D LoRA llama.cpp applies: A (r*E, in) expert-major, B
    (out, r*E) rank-major, as PEFT lays a target_parameters LoRA (stacking per expert is what
    llama.cpp's convert_lora_to_gguf.py does with them, LoraTorchTensor's torch.stack)."""
    import torch

    from ..kernels.param_lora import ParamLoraWeight

    experts = sorted(members)
    names = [members[e][0] for e in experts]
    loras = [members[e][1] for e in experts]
    expected = _saved_count(names[0], base)
    if experts != list(range(len(experts))) or (expected is not None and expected != len(experts)):
        raise UnsupportedError(f"{piece}: the adapter has LoRAs for experts "
                               f"{', '.join(map(str, experts))} of {expected or 'its'} experts; "
                               "llama.cpp applies one 3-D LoRA to all of a layer's experts, so a "
                               "GGUF adapter needs one for each; merge it into its base instead")
    if len({(w.rank, w.scale) for w in loras}) > 1:
        raise UnsupportedError(f"{piece}: its per-expert LoRAs differ in rank or scale "
                               f"({', '.join(f'{w.rank}/{w.scale:g}' for w in loras)}), which one "
                               "stacked GGUF tensor cannot hold; merge it into its base instead")
    a = torch.cat([w.a for w in loras])                                 # (E*r, in)
    b = torch.stack([w.b for w in loras], dim=-1)                       # (out, r, E)
    return ParamLoraWeight(a=a, b=b.reshape(b.shape[0], -1), scale=loras[0].scale,
                           num_experts=len(loras))


def _saved_count(name: str, base) -> int | None:
    """How many experts the base's saved checkpoint has beside the per-expert tensor ``name``."""
    if base.hf_shapes is None:
        return None
    match = PER_EXPERT_NAME.match(name)
    count = 0
    while f"{match['stem']}.{count}.{match['proj']}.weight" in base.hf_shapes:
        count += 1
    return count


def per_expert_names(gguf_name: str, base, experts: int) -> list[str]:
    """The per-expert HF names a foreign 3-D GGUF expert LoRA (llama.cpp's converter stacks a
    transformers-4 layout adapter) maps back to: the base's own where its weights are at hand,
    else the architecture's (PER_EXPERT_NAMING)."""
    import re

    from .names import _hf_aliases

    owners = _hf_aliases(base.arch, base.n_blocks).get(gguf_name.removesuffix(".weight"), [])
    options = [[f"{o.rpartition('.')[0]}.{e}.{o.rpartition('.')[2]}.weight"
                for e in range(experts)] for o in owners]
    if base.hf_shapes is not None:
        found = [names for names in options if all(n in base.hf_shapes for n in names)]
    else:
        naming = re.compile(PER_EXPERT_NAMING.get(base.arch, DEFAULT_PER_EXPERT_NAMING))
        found = [names for names, o in zip(options, owners) if naming.fullmatch(o)]
    if not found:
        raise UnsupportedError(f"{gguf_name}: no per-expert HF tensors of architecture "
                               f"{base.arch!r} map to it ({experts} experts); the adapter does "
                               "not fit this base")
    return found[0]


def to_gguf_expert_factors(w) -> tuple:
    """(lora_a (E, r, in), lora_b (E, out, r)), numpy order, of a 3-D ParamLoraWeight piece."""
    e = w.num_experts
    a = w.a.reshape(e, -1, w.a.shape[-1])                                   # (E, r, in)
    b = w.b.reshape(w.b.shape[0], -1, e).permute(2, 0, 1)                   # (E, out, r)
    return a.contiguous(), b.contiguous()


def from_gguf_expert_factors(lora_a, lora_b) -> tuple:
    """The exact inverse: PEFT's A (r*E, in) and B (out, r*E)."""
    e, r, inp = (int(s) for s in lora_a.shape)
    return lora_a.reshape(e * r, inp), lora_b.permute(1, 2, 0).reshape(lora_b.shape[1], r * e)


def check_param_shape(name: str, w, base) -> None:
    """A target_parameters LoRA must fit its base tensor: the fused one, or the stack of the
    per-expert tensors a saved transformers-5 checkpoint holds (the expert count included)."""
    shapes = base.hf_shapes
    if shapes is None:
        return
    expected = _base_shape(name, shapes, w.num_experts > 1)
    if expected is None:
        raise FormatError(f"{name} is not a tensor of the base ({base.source}); this adapter is "
                          "for another model")
    if tuple(w.stored_shape) != expected:
        raise FormatError(f"{name}: the adapter's delta is {tuple(w.stored_shape)} but the base "
                          f"({base.source}) stores {expected}; this adapter is for another model "
                          "(another expert count or size)")


def _base_shape(name: str, shapes: dict, experts: bool) -> tuple[int, ...] | None:
    owners = [name] + [name.replace(old, new) for old, new in RENAMED if old in name]
    for candidate in owners:
        if candidate in shapes:
            return tuple(shapes[candidate])
    if not experts:
        return None
    for candidate in owners:
        owner, _, param = candidate.rpartition(".")
        for names in SAVED_NAMES.get(param, ()):
            stack = _stacked(owner, names, shapes)
            if stack is not None:
                return stack
    return None


def _stacked(owner: str, names: tuple[str, ...], shapes: dict) -> tuple[int, ...] | None:
    """(E, sum of rows, cols) of ``owner.{e}.{name}.weight`` for every expert, or None."""
    stack = _expert_names(owner, names, shapes)
    if not stack:
        return None
    first = [tuple(shapes[n]) for n in stack[0]]
    return (len(stack), sum(s[0] for s in first), first[0][1])


def regroup(pieces: dict[str, list], where) -> dict:
    """Our own file's expert pieces back into PEFT's ParamLoraWeights: ``pieces`` maps the HF
    name to [(rows start, lora_a (E, r, in), lora_b (E, out, r), scale)], one per GGUF tensor;
    the parts share A (written once per part), and B's rows are concatenated in order."""
    import torch

    from ..kernels.param_lora import ParamLoraWeight, check

    weights = {}
    for name, parts in pieces.items():
        parts = sorted(parts, key=lambda p: p[0])
        first_a, scale = parts[0][1], parts[0][3]
        if any(not torch.equal(p[1], first_a) or p[3] != scale for p in parts[1:]):
            raise FormatError(f"{where}: {name}: its gate and up parts carry different lora_a or "
                              "scales, which one target_parameters LoRA cannot hold; the file "
                              "was damaged, convert it again")
        a, _ = from_gguf_expert_factors(first_a, parts[0][2])
        b = torch.cat([from_gguf_expert_factors(p[1], p[2])[1] for p in parts])
        w = ParamLoraWeight(a=a.contiguous(), b=b.contiguous(), scale=scale,
                            num_experts=int(first_a.shape[0]))
        check(name, w, str(where))
        weights[name] = w
    return weights


def param_weight(w):
    """A router-like 2-D target_parameters LoRA back from its plain LoraWeight."""
    from ..kernels.param_lora import ParamLoraWeight

    return ParamLoraWeight(a=w.a, b=w.b, scale=w.scale, num_experts=1)


def _kv_b_names(name: str, base) -> tuple[str, str]:
    from .names import hf_to_gguf_name

    return tuple(hf_to_gguf_name(name.replace("kv_b_proj", part), base)
                 for part in ("k_b_proj", "v_b_proj"))


def split_kv_b(name: str, w, base, shapes: dict) -> dict:
    """A LoRA on DeepSeek's kv_b_proj (n_head * (nope + v), kv_lora_rank) laid on the two
    tensors llama.cpp's DeepseekV2Model splits it into (conversion/deepseek.py: kv_b viewed
    (n_head, nope + v, kv_lora_rank), split at nope, the k part transposed):
      attn_v_b (n_head, v, kv_lora_rank): head h's delta B_v[h] @ A, a 3-D LoRA with A shared;
      attn_k_b (n_head, kv_lora_rank, nope): (B_k[h] @ A).T = A.T @ B_k[h].T, a 3-D LoRA whose
      per-head A is B_k[h].T (r, nope) and whose B is A.T (kv_lora_rank, r) for every head.
    Both as ParamLoraWeights (E = n_head) under the HF names gguf-py maps to those tensors."""
    import torch

    from ..adapter import LoraWeight
    from ..kernels.param_lora import ParamLoraWeight

    k_name, v_name = _kv_b_names(name, base)
    heads, _, nope = (int(x) for x in shapes[k_name])
    v = int(shapes[v_name][1]) if v_name in shapes else -1
    if not isinstance(w, LoraWeight) or w.layer != "linear" or w.magnitude is not None or \
            w.bias is not None:
        raise UnsupportedError(f"{name}: llama.cpp stores kv_b_proj split per head into "
                               "attn_k_b (transposed) and attn_v_b; only a plain LoRA is re-laid "
                               "there (not DoRA, lora_bias or other deltas); merge it into the "
                               "HF checkpoint, then convert that with llama.cpp")
    if w.b.shape[0] != heads * (nope + v):
        raise FormatError(f"{name}: {w.b.shape[0]} rows do not split into {heads} heads of "
                          f"{nope} + {v} (the base's attn_k_b / attn_v_b); the adapter is for "
                          "another model")
    b = w.b.reshape(heads, nope + v, -1)                       # (heads, nope + v, r)
    b_k, b_v = b[:, :nope], b[:, nope:]                        # (heads, nope, r), (heads, v, r)
    r = int(w.a.shape[0])
    v_lora = ParamLoraWeight(a=w.a.repeat(heads, 1),                          # (heads*r, rank)
                             b=b_v.permute(1, 2, 0).reshape(v, r * heads),    # (v, r*heads)
                             scale=w.scale, num_experts=heads)
    k_lora = ParamLoraWeight(a=b_k.transpose(1, 2).reshape(heads * r, nope),  # (heads*r, nope)
                             b=torch.stack([w.a.T] * heads, dim=-1).reshape(w.a.shape[1], -1),
                             scale=w.scale, num_experts=heads)
    stem = name.removesuffix("kv_b_proj.weight")
    return {f"{stem}k_b_proj.weight": k_lora, f"{stem}v_b_proj.weight": v_lora}
