"""torchtune's own LoRA / DoRA checkpoints (checked against torchtune 0.6.1).

- Files (``training/checkpointing/_checkpointer.py``, FullModelHFCheckpointer.save_checkpoint):
  ``epoch_N/adapter_model.pt`` is ``torch.save`` of the adapter state dict as the model holds it
  (older releases: ``adapter_N.pt``); beside it a PEFT-form export, ``adapter_config.json`` +
  ``adapter_model.safetensors`` (read by formats/peft.py; ``peft_export_fix`` below repairs it).
  A ``.safetensors`` file holding the native keys is read the same way.
- Keys (``modules/peft/lora.py`` LoRALinear, ``dora.py`` DoRALinear): ``layers.N.attn.q_proj.
  lora_a.weight`` (r, in), ``.lora_b.weight`` (out, r), DoRA ``.magnitude`` (out,); module names
  are torchtune's, mapped to the HF base's by ``TUNE_TO_HF``.
- Delta (``modules/peft/_utils.py`` get_merged_lora_ckpt): ``W + (alpha / rank) * B @ A``; DoRA
  ``V = W + (alpha / rank) * B @ A``, ``W' = (magnitude / ||V||_row) * V`` (PEFT's rule).
  ``alpha`` and ``rank`` come from the recipe config; the checkpoint holds neither, only the
  exported adapter_config.json beside it (``r``, ``lora_alpha``) does.
- RoPE rows: for most model types the HF checkpointer loads q/k weights row-permuted
  (``convert_weights.hf_to_tune`` ``_permute``: per head, HF's two contiguous RoPE halves
  interleaved), so a q/k ``lora_b`` (and DoRA magnitude) is in that order; Qwen2's loader does
  not permute. ``TUNE_PERMUTES_QK`` says which, by the base's architecture.
- Write: the same adapter_model.pt (``torch.save`` of a plain dict of tensors, torchtune names,
  q/k rows permuted back) and the adapter_config.json torchtune writes beside it; one rank and
  one scale for all modules (a recipe's lora_rank / lora_alpha), Linear factors only.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import TYPE_CHECKING

from .._io import read_json, write_json
from ..adapter import Adapter, LoraWeight, check_weight, module_name
from ..errors import FormatError, OptionError, UnsupportedError
from . import accounting, foreign
from .names import BaseInfo, load_base_info, permute_rows, unpermute_rows
from .torchtune_export import (  # noqa: F401 (re-exported: the export's fix)
    MODEL_TYPE_ARCH,
    TUNE_PERMUTES_QK,
    is_torchtune_export,
    peft_export_fix,
)

if TYPE_CHECKING:      # imported where used: sniffing a .safetensors needs no torch
    import torch

DESCRIPTION = "torchtune LoRA/DoRA checkpoint (adapter_model.pt; alpha from adapter_config.json)"
SNIFF_ORDER = 40

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.pt"
OLD_WEIGHTS = re.compile(r"^adapter_\d+\.pt$")          # torchtune < 0.3: adapter_{epoch}.pt
# module path + leaf; the leaves of LoRALinear / DoRALinear's adapter_params()
KEY = re.compile(r"^(?P<module>[\w.]+)\.(?P<leaf>lora_a\.weight|lora_b\.weight|magnitude)$")

# torchtune module -> HF module: the rows of torchtune/models/convert_weights.py ``_FROM_HF``
# (0.6.1) whose torchtune module can carry a LoRA (LoRALinear: attention projections, MLP,
# output), read right to left; qwen2/_convert_weights.py and gemma2's have the same rows for
# them. ``{}`` is the block index, as in its ``get_mapped_key``.
TUNE_TO_HF = {
    "layers.{}.attn.q_proj": "model.layers.{}.self_attn.q_proj",
    "layers.{}.attn.k_proj": "model.layers.{}.self_attn.k_proj",
    "layers.{}.attn.v_proj": "model.layers.{}.self_attn.v_proj",
    "layers.{}.attn.output_proj": "model.layers.{}.self_attn.o_proj",
    "layers.{}.mlp.w1": "model.layers.{}.mlp.gate_proj",
    "layers.{}.mlp.w3": "model.layers.{}.mlp.up_proj",
    "layers.{}.mlp.w2": "model.layers.{}.mlp.down_proj",
    "output": "lm_head",
}
# torchtune's Phi-3/Phi-4 LoRA sits on q/k/v split out of HF's fused qkv_proj, and its
# checkpointer exports no PEFT form for them (phi3_hf_to_tune)
SPLIT_FUSED = {"phi3": "Phi-3 / Phi-4"}
ROPE = ("attn.q_proj", "attn.k_proj")


# ----------------------------------------------------------------------------- locating

def locate(path: Path) -> Path | None:
    """The torchtune checkpoint file ``path`` designates: the file, or in a folder
    adapter_model.pt (else a single adapter_N.pt)."""
    path = Path(path)
    if path.is_file():
        return path if path.suffix in (".pt", ".safetensors") else None
    if not path.is_dir():
        return None
    if (path / WEIGHTS_NAME).is_file():
        return path / WEIGHTS_NAME
    old = sorted(p for p in path.iterdir() if OLD_WEIGHTS.match(p.name) and p.is_file())
    return old[0] if len(old) == 1 else None


def _keys(file: Path) -> list[str] | None:
    """The tensor names of ``file`` without reading its tensors where the format allows."""
    try:
        if file.suffix == ".safetensors":
            from safetensors import safe_open

            with safe_open(str(file), framework="numpy") as fh:   # names only: no torch
                return list(fh.keys())
        import torch

        state = torch.load(file, map_location="cpu", weights_only=True, mmap=True)
    except Exception:  # noqa: BLE001  (sniffing: anything unreadable is simply not ours)
        return None
    return list(state) if isinstance(state, dict) else None


def sniff(path: Path) -> bool:
    file = locate(path)
    if file is None:
        return False
    keys = _keys(file)
    return bool(keys) and all(isinstance(k, str) and KEY.match(k) for k in keys)


# ----------------------------------------------------------------------------- read

def read(path: Path, *, scale: float | None = None, base: BaseInfo | None = None) -> Adapter:
    file = locate(Path(path))
    if file is None:
        raise FormatError(f"{path}: no torchtune adapter checkpoint here ({WEIGHTS_NAME}, or "
                          "one adapter_N.pt); pass the file the checkpointer wrote")
    tensors = _load(file)
    config_path = file.parent / CONFIG_NAME
    config = read_json(config_path) if config_path.is_file() else None
    modules = _group(tensors, file)
    rank = _rank(modules, file)
    scale = _scale(config, config_path, rank, scale, file)
    needs_base = any(m.endswith(ROPE) for m in modules)
    if needs_base and base is None:
        base = _base_from_config(config, config_path)
    # a given base is checked whatever the targets: its names must be the ones TUNE_TO_HF gives
    permuted = _permutes(base, file) if needs_base or base is not None else False
    weights = {}
    for module, parts in modules.items():
        hf = hf_module(module, file)
        weights[hf + ".weight"] = _weight(module, hf, parts, scale, base, permuted, file)
    model = (config or {}).get("base_model_name_or_path")
    metadata = {"source_format": "torchtune", "torchtune_file": file.name,
                "qk_unpermuted": bool(permuted)}
    if config is not None:
        metadata["torchtune_config"] = config
    return Adapter(weights=weights, base_model=model if isinstance(model, str) else None,
                   metadata=metadata)


def _load(file: Path) -> dict[str, torch.Tensor]:
    """The flat {name: tensor} dict, loaded without unpickling anything else."""
    if file.suffix == ".safetensors":
        from .._io import load_safetensors

        return load_safetensors(file)[0]
    import torch

    try:
        state = torch.load(file, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001  (weights_only refuses code objects: say so)
        raise FormatError(f"{file}: not loadable as plain tensors (torch.load weights_only): "
                          f"{str(exc).splitlines()[0][:200]}; pass the adapter_model.pt "
                          "torchtune's checkpointer wrote") from None
    bad = [k for k, v in state.items() if not isinstance(v, torch.Tensor)] \
        if isinstance(state, dict) else ["(not a dict)"]
    if bad or not state:
        raise FormatError(f"{file}: not a flat dict of tensors as torchtune's checkpointer saves "
                          f"adapters ({'empty' if not bad else bad[0]}); pass its "
                          f"{WEIGHTS_NAME}, not a recipe state")
    return state


def _group(tensors: dict, file: Path) -> dict[str, dict[str, torch.Tensor]]:
    """{torchtune module: {lora_a | lora_b | magnitude: tensor}}; anything else is refused."""
    modules: dict[str, dict[str, torch.Tensor]] = {}
    unknown = []
    for key, tensor in tensors.items():
        found = KEY.match(key)
        if found is None:
            unknown.append(key)
            continue
        modules.setdefault(found["module"], {})[found["leaf"].split(".")[0]] = tensor
    if unknown:
        raise foreign.unknown_keys(file, unknown, why="not torchtune LoRA/DoRA tensors "
                                   "(lora_a.weight, lora_b.weight, magnitude)")
    for module, parts in modules.items():
        for leaf, partner in (("lora_a", "lora_b"), ("lora_b", "lora_a")):
            if leaf not in parts:
                raise FormatError(f"{file}: {module}.{leaf}.weight is missing (its partner "
                                  f"{module}.{partner} is there); the checkpoint is incomplete")
    return modules


def hf_module(module: str, where) -> str:
    """torchtune module name -> the HF base's (``TUNE_TO_HF``, as get_mapped_key looks up)."""
    abstract = re.sub(r"\.\d+", ".{}", module)
    index = re.search(r"\.(\d+)(\.|$)", module)
    target = TUNE_TO_HF.get(abstract)
    if target is None:
        raise UnsupportedError(f"{where}: {module}: no HF name for this torchtune module "
                               f"(known: {', '.join(TUNE_TO_HF)}); not supported yet")
    return target.format(index[1]) if index else target


def _rank(modules: dict, file: Path) -> int:
    """The one rank of all modules (torchtune's recipes have a single lora_rank)."""
    ranks = {int(p["lora_a"].shape[0]) for p in modules.values() if p["lora_a"].dim() == 2}
    if len(ranks) != 1:
        raise FormatError(f"{file}: LoRA ranks {sorted(ranks)} differ across modules, but a "
                          "torchtune recipe has one lora_rank; the checkpoint is damaged")
    return ranks.pop()


def _scale(config: dict | None, config_path: Path, rank: int, scale: float | None,
           file: Path) -> float:
    """alpha / r from the exported config (as get_merged_lora_ckpt), else --scale."""
    if config is None or "lora_alpha" not in config:
        if scale is None:
            where = f"{config_path} has no lora_alpha" if config is not None else \
                f"no {CONFIG_NAME} beside it"
            raise FormatError(f"{file}: lora_alpha is unknown ({where}): pass --scale "
                              f"(lora_alpha / lora_rank of the recipe config, rank {rank} here)")
        return float(scale)
    if scale is not None:
        raise OptionError(f"{file}: {config_path.name} gives lora_alpha "
                          f"{config['lora_alpha']}; drop --scale")
    alpha, r = config["lora_alpha"], config.get("r", rank)
    if not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in (alpha, r)):
        raise FormatError(f"{config_path}: r {r!r} / lora_alpha {alpha!r} are not numbers; "
                          "fix the config")
    if r != rank:
        raise FormatError(f"{config_path}: r is {r} but the tensors of {file.name} have rank "
                          f"{rank}; the config belongs to another run, fix r")
    return float(alpha) / r


def _base_from_config(config: dict | None, config_path: Path) -> BaseInfo | None:
    """The base named by the exported config, when it is a local model folder."""
    named = (config or {}).get("base_model_name_or_path")
    if isinstance(named, str) and (Path(named) / "config.json").is_file():
        return load_base_info(named)
    return None


def _permutes(base: BaseInfo | None, file) -> bool:
    """Are this base's q/k rows permuted in torchtune's checkpoints (``TUNE_PERMUTES_QK``)?"""
    if base is None:
        raise FormatError(f"{file}: q_proj/k_proj LoRA rows are in torchtune's RoPE order for "
                          "Llama-family models and not for Qwen2, so the base's model type is "
                          "needed: pass --base (the HF model folder or its config.json)")
    if base.arch in SPLIT_FUSED:
        raise UnsupportedError(f"{file}: torchtune's {SPLIT_FUSED[base.arch]} LoRA is on q/k/v "
                               "split out of the fused qkv_proj of the HF base: not supported")
    if base.arch not in TUNE_PERMUTES_QK:
        raise UnsupportedError(f"{file}: base architecture {base.arch!r} ({base.source}) has no "
                               f"torchtune 0.6.1 HF checkpointer rule; supported: "
                               f"{', '.join(TUNE_PERMUTES_QK)}")
    return TUNE_PERMUTES_QK[base.arch]


def _weight(module: str, hf: str, parts: dict, scale: float, base: BaseInfo | None,
            permuted: bool, file: Path) -> LoraWeight:
    """One module's factors in the HF weight's layout: q/k rows back in HF order."""
    a, b, m = parts["lora_a"], parts["lora_b"], parts.get("magnitude")   # (r, in) (out, r) (out,)
    heads = _heads(module, base) if permuted else None
    if heads is not None:         # tune rows = permute_rows(HF rows): undo on B and magnitude
        b = unpermute_rows(b, heads)
        m = None if m is None else unpermute_rows(m, heads)
    weight = LoraWeight(a=a.contiguous(), b=b.contiguous(), scale=scale, magnitude=m)
    check_weight(hf, weight, where=str(file))
    accounting.check_factors(hf, weight, file)
    if base is not None:
        from .gguf import check_base_shape

        check_base_shape(str(file), hf + ".weight", weight, base)
    return weight


def _heads(module: str, base: BaseInfo) -> int | None:
    if module.endswith(ROPE[0]):
        return base.n_head
    if module.endswith(ROPE[1]):
        return base.n_head_kv
    return None


def describe(path: Path) -> dict:
    """Storage facts for ``inspect``: the file and the alpha source."""
    file = locate(Path(path))
    config_path = file.parent / CONFIG_NAME
    config = read_json(config_path) if config_path.is_file() else {}
    return {"file": file.name, "r": config.get("r"), "lora_alpha": config.get("lora_alpha"),
            "dora": any(k.endswith(".magnitude") for k in _keys(file) or ())}


# ----------------------------------------------------------------------------- write

OUTPUT_IS_DIR = True
# the HF modules torchtune's LoRA models can adapt: convert_weights._TO_PEFT_TARGET_MODULES's
# values (its export writes these HF names into target_modules, and so does write())
HF_TARGETS = {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj",
              "lm_head"}


def tune_module(hf: str, where) -> str:
    """HF module name -> torchtune's (``TUNE_TO_HF`` read left to right)."""
    abstract = re.sub(r"\.\d+", ".{}", hf)
    index = re.search(r"\.(\d+)(\.|$)", hf)
    for tune, target in TUNE_TO_HF.items():
        if target == abstract:
            return tune.format(index[1]) if index else tune
    raise UnsupportedError(f"{where}: torchtune's LoRA models adapt only "
                           f"{', '.join(sorted(HF_TARGETS))}; refusing to write it as a "
                           "torchtune checkpoint (convert it to PEFT, or merge it)")


def _one_value(adapter: Adapter, field: str):
    values = {getattr(w, field) for w in adapter.weights.values()}
    if len(values) != 1:
        raise UnsupportedError(f"the adapter has {field}s {sorted(values)}, but a torchtune recipe "
                               f"has one lora_rank and one lora_alpha for all modules; refusing "
                               "to write it as a torchtune checkpoint (convert it to PEFT)")
    return values.pop()


def tensors_for(adapter: Adapter, base: BaseInfo | None) -> dict[str, torch.Tensor]:
    """adapter_model.pt's dict: torchtune names, q/k lora_b and magnitude rows permuted as its
    HF checkpointer permutes the base's (``permute_rows``, the exact inverse of the read)."""
    from ..copies import saved_copies

    trained = sorted(set(adapter.replacements) - saved_copies(adapter)) + sorted(adapter.token_rows)
    if trained:        # PEFT's saved copies of the training base are not trained: left out
        name = trained[0]
        raise UnsupportedError(f"{name}: full tensors / trained token rows beside the LoRA; a "
                               "torchtune adapter checkpoint holds LoRA/DoRA factors only")
    modules = {module_name(n): w for n, w in adapter.weights.items()}
    permuted = _permutes(base, "writing a torchtune checkpoint") if any(m.endswith(("q_proj", "k_proj"))
                                                        for m in modules) else False
    out = {}
    for hf, w in modules.items():
        if w.layer != "linear" or w.bias is not None or w.norm_dim != 1:
            what = "a lora_bias" if w.bias is not None else f"a {w.layer} LoRA"
            raise UnsupportedError(f"{hf}: {what}; torchtune's LoRALinear / DoRALinear hold "
                                   "plain Linear factors only: convert it to PEFT, or merge it")
        tune = tune_module(hf, hf)
        b, m = w.b, w.magnitude
        heads = _heads(tune, base) if permuted else None
        if heads is not None:
            b = permute_rows(b, heads)
            m = None if m is None else permute_rows(m, heads)
        out[f"{tune}.lora_a.weight"], out[f"{tune}.lora_b.weight"] = w.a, b
        if m is not None:
            out[f"{tune}.magnitude"] = m
    return {k: t.contiguous().clone() for k, t in out.items()}


def write(adapter: Adapter, path: Path, *, base: BaseInfo | None = None) -> None:
    """Fill the folder ``path`` with adapter_model.pt (torch.save of a plain dict of tensors) and
    the adapter_config.json torchtune's checkpointer writes beside it (r, lora_alpha)."""
    rank, scale = _one_value(adapter, "rank"), _one_value(adapter, "scale")
    tensors = tensors_for(adapter, base)          # refuses first: nothing is written then
    targets = sorted({module_name(n).rsplit(".", 1)[-1] for n in adapter.weights})
    config = {"r": rank, "lora_alpha": scale * rank, "target_modules": targets,
              "peft_type": "LORA"}
    if adapter.base_model:
        config["base_model_name_or_path"] = adapter.base_model
    import torch

    torch.save(tensors, Path(path) / WEIGHTS_NAME)
    write_json(Path(path) / CONFIG_NAME, config)
