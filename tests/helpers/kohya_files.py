"""kohya LoRA files made by the field's own tools, and their merges, on the CPU
(tests/test_kohya.py).

- bases: a tiny diffusers UNet2DConditionModel and a tiny CLIPTextModel saved as component
  folders (``save_pretrained``), a pipeline folder laid out as diffusers lays it out
  (model_index.json + unet/ + text_encoder/), and one single-file checkpoint in the original
  naming (the components' tensors under ``model.diffusion_model.`` and
  ``cond_stage_model.transformer.``);
- LoRAs: PEFT's, added as diffusers' training scripts add them (``add_adapter(LoraConfig)``,
  lora_B perturbed away from zero), turned into kohya keys by diffusers'
  ``convert_state_dict_to_kohya``; and one file by hand from sd-scripts' naming rules;
- references: diffusers' own ``fuse_lora`` (UNet) and PEFT's ``merge`` (text encoder, as
  diffusers' ``fuse_text_encoder_lora`` does), lycoris-lora's kohya network ``merge_to`` (the
  sd-scripts rules: alpha 0 or missing = rank), diffusers' kohya loader (``lora_state_dict`` +
  ``load_lora_into_unet``).
"""

from __future__ import annotations

import copy
import json
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

UNET_TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "proj_in", "conv1"]
TE_TARGETS = ["q_proj", "k_proj", "v_proj", "out_proj", "fc1"]
UNET_PREFIX, TE_PREFIX = "model.diffusion_model.", "cond_stage_model.transformer."


def unet(seed: int = 0):
    from diffusers import UNet2DConditionModel

    torch.manual_seed(seed)
    return UNet2DConditionModel(block_out_channels=(32, 64), layers_per_block=1,
                                cross_attention_dim=32, sample_size=8,
                                down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                                up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
                                norm_num_groups=8).eval()


def text_encoder(seed: int = 1):
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(seed)
    return CLIPTextModel(CLIPTextConfig(vocab_size=64, hidden_size=32, intermediate_size=37,
                                        num_hidden_layers=2, num_attention_heads=4,
                                        max_position_embeddings=16, bos_token_id=0,
                                        eos_token_id=2, pad_token_id=1)).eval()


def bases(root: Path) -> dict[str, Path]:
    """unet/, text_encoder/ (component folders), pipe/ (pipeline folder), sd.safetensors
    (one file in the original naming) under ``root``."""
    u, te = unet(), text_encoder()
    u.save_pretrained(root / "unet")
    te.save_pretrained(root / "text_encoder")
    pipe = root / "pipe"
    u.save_pretrained(pipe / "unet")
    te.save_pretrained(pipe / "text_encoder")
    (pipe / "model_index.json").write_text(json.dumps({
        "_class_name": "StableDiffusionPipeline", "_diffusers_version": "0.42.1",
        "unet": ["diffusers", "UNet2DConditionModel"],
        "text_encoder": ["transformers", "CLIPTextModel"]}))
    single = {UNET_PREFIX + k: v for k, v in u.state_dict().items()}
    single |= {TE_PREFIX + k: v for k, v in te.state_dict().items()}
    save_file({k: v.contiguous() for k, v in single.items()}, str(root / "sd.safetensors"))
    return {"unet": root / "unet", "text_encoder": root / "text_encoder", "pipe": pipe,
            "single": root / "sd.safetensors"}


def with_lora(model, targets, *, rank: int = 4, alpha: float = 4, seed: int = 3):
    """``model`` with a PEFT LoRA as diffusers' training scripts add it, lora_B perturbed."""
    from peft import LoraConfig, inject_adapter_in_model

    config = LoraConfig(r=rank, lora_alpha=alpha, target_modules=targets)
    if hasattr(model, "fuse_lora"):          # diffusers' PeftAdapterMixin
        model.add_adapter(config)
    else:     # transformers 5.25's add_adapter wants PEFT >= 0.22; this is what it calls
        model = inject_adapter_in_model(config, model)
    perturb(model, "lora_B", seed=seed)
    return model


def perturb(model, part: str, *, seed: int, scale: float = 0.1) -> None:
    """Every parameter whose name holds ``part`` drawn from N(0, scale^2): lora_B (lora_up,
    hada_w2_a) starts at zero, which would make every merge a copy."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if part in name:
                p.copy_(torch.randn(p.shape, generator=gen) * scale)


def lycoris_file(model, path: Path, *, part: str, seed: int, **options):
    """lycoris-lora's own network on ``model`` (``create_lycoris(model, 1.0, **options)``,
    applied), ``part`` perturbed, DoRA magnitudes moved off the base norms, saved with its
    ``save_weights``: ``lycoris_<module underscored>`` names. Returns the network."""
    from lycoris import create_lycoris

    network = create_lycoris(model, 1.0, **options)
    network.apply_to()
    perturb(network, part, seed=seed)
    with torch.no_grad():
        for name, p in network.named_parameters():
            if "dora_scale" in name:
                p.mul_(1.1)
    network.save_weights(str(path), torch.float32, None)
    return network


def kohya_file(unet_lora, te_lora, path: Path) -> Path:
    """diffusers' ``convert_state_dict_to_kohya`` of both PEFT LoRAs, saved as it is."""
    from diffusers.utils import convert_state_dict_to_kohya
    from peft.utils import get_peft_model_state_dict

    state = {f"unet.{k}": v for k, v in get_peft_model_state_dict(unet_lora).items()}
    state |= {f"text_encoder.{k}": v for k, v in get_peft_model_state_dict(te_lora).items()}
    save_file({k: v.contiguous() for k, v in convert_state_dict_to_kohya(state).items()},
              str(path))
    return path


def fused(model) -> dict[str, torch.Tensor]:
    """The model's weights with its LoRA merged: diffusers' ``fuse_lora`` for a diffusers
    model, PEFT's layer ``merge`` for a transformers one (diffusers' fuse_text_encoder_lora)."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    model = copy.deepcopy(model)
    if hasattr(model, "fuse_lora"):
        model.fuse_lora()
    else:
        for module in model.modules():
            if isinstance(module, BaseTunerLayer):
                module.merge()
    return {k.replace(".base_layer.", "."): v.detach().clone()
            for k, v in model.state_dict().items() if "lora_" not in k}


# ----------------------------------------------------------------------------- by hand

def hand_file(unet_model, path: Path, *, dtype=torch.float32) -> Path:
    """A kohya file written from sd-scripts' rules (networks/lora.py): a Linear LoRA with
    alpha 8 at rank 4 (scale 2), one without alpha and one with alpha 0 (both: alpha = rank),
    a conv LoRA (3 x 3 down, 1 x 1 up) with alpha 2, and a 1 x 1 conv (proj_in)."""
    gen = torch.Generator().manual_seed(11)
    shapes = {k: tuple(v.shape) for k, v in unet_model.state_dict().items()}
    modules = {  # module -> (rank, alpha or None)
        "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q": (4, 8.0),
        "down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k": (4, None),
        "mid_block.attentions.0.transformer_blocks.0.ff.net.2": (2, 0.0),
        "down_blocks.0.resnets.0.conv1": (3, 2.0),
        "up_blocks.1.attentions.0.proj_in": (2, 1.0),
    }
    out = {}
    for module, (rank, alpha) in modules.items():
        shape = shapes[module + ".weight"]
        stem = "lora_unet_" + module.replace(".", "_")
        down = (rank, shape[1], *shape[2:])            # k x k down
        up = (shape[0], rank, 1, 1) if len(shape) == 4 else (shape[0], rank)   # 1 x 1 up
        out[f"{stem}.lora_down.weight"] = (torch.randn(down, generator=gen) * 0.2).to(dtype)
        out[f"{stem}.lora_up.weight"] = (torch.randn(up, generator=gen) * 0.2).to(dtype)
        if alpha is not None:
            out[f"{stem}.alpha"] = torch.tensor(alpha, dtype=dtype)
    save_file(out, str(path), metadata={"ss_network_module": "networks.lora",
                                        "ss_network_dim": "4", "ss_network_alpha": "8.0"})
    return path


def lycoris_merged(model, path: Path, prefix: str = "lora_unet_") -> dict[str, torch.Tensor]:
    """lycoris-lora's own reading of the file's ``prefix`` modules merged into a copy of
    ``model``: its LoConModule (the kohya LoRA module: alpha 0 or missing = rank, scale alpha /
    rank) through ``create_lycoris_from_weights`` and ``merge_to``, which name modules
    ``lycoris_<module path underscored>`` (so the names are renamed to that prefix)."""
    from lycoris import create_lycoris_from_weights

    model = copy.deepcopy(model)
    weights = {"lycoris_" + k.removeprefix(prefix): v for k, v in load_file(str(path)).items()
               if k.startswith(prefix)}
    # lycoris' state-dict loader fails on a module without alpha (float(None)); sd-scripts'
    # create_network_from_weights gives such a module alpha = its rank, as we read it
    for key in [k for k in weights if k.endswith(".lora_down.weight")]:
        weights.setdefault(key.split(".")[0] + ".alpha", torch.tensor(float(weights[key].shape[0])))
    network, _ = create_lycoris_from_weights(1.0, "", model, weights_sd=weights)
    network.merge_to(1.0)
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def diffusers_loaded(unet_model, path: Path) -> dict[str, torch.Tensor]:
    """A kohya file through diffusers' own kohya converter into a copy of the UNet, fused."""
    from diffusers.loaders import StableDiffusionLoraLoaderMixin as Loader

    u = copy.deepcopy(unet_model)
    state, alphas = Loader.lora_state_dict(str(path))
    Loader.load_lora_into_unet(state, alphas, unet=u, adapter_name="kohya")
    u.fuse_lora()
    u.unload_lora()
    return {k: v.detach().clone() for k, v in u.state_dict().items()}


# ----------------------------------------------------------------------------- Flux

# diffusers' "mixture" kohya reading (lora_conversion_utils._convert_mixture_state_dict_to_
# diffusers) maps attention modules and a few top-level ones; it turns
# ``single_transformer_blocks_0_proj_mlp`` into the block itself (and fails), so none here
FLUX_MODULES = ("transformer_blocks.0.attn.to_q", "transformer_blocks.0.attn.to_out.0",
                "transformer_blocks.0.attn.add_k_proj", "single_transformer_blocks.0.attn.to_v",
                "proj_out")


def flux(seed: int = 2):
    """diffusers_models' tiny Flux transformer (the same model the diffusers tests use)."""
    from helpers.diffusers_models import tiny_flux

    return tiny_flux(seed)


def flux_file(model, path: Path, *, rank: int = 4, alpha: float = 8.0) -> Path:
    """``lora_transformer_<diffusers module underscored>`` modules, as diffusers' kohya-style
    Flux files (its "mixture" format) name them."""
    gen = torch.Generator().manual_seed(9)
    shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    out = {}
    for module in FLUX_MODULES:
        rows, cols = shapes[module + ".weight"]
        stem = "lora_transformer_" + module.replace(".", "_")
        out[f"{stem}.lora_down.weight"] = torch.randn(rank, cols, generator=gen) * 0.2
        out[f"{stem}.lora_up.weight"] = torch.randn(rows, rank, generator=gen) * 0.2
        out[f"{stem}.alpha"] = torch.tensor(alpha)
    save_file(out, str(path))
    return path


def diffusers_flux_loaded(model, path: Path) -> dict[str, torch.Tensor]:
    """The file through FluxLoraLoaderMixin's kohya conversion into a copy, fused."""
    from diffusers.loaders import FluxLoraLoaderMixin as Loader

    model = copy.deepcopy(model)
    Loader.load_lora_into_transformer(Loader.lora_state_dict(str(path)), None,
                                      transformer=model, adapter_name="kohya")
    model.fuse_lora()
    model.unload_lora()
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


# ----------------------------------------------------------------------------- SDXL te2

OPENCLIP_PREFIX = "conditioner.embedders.1.model."      # SDXL's sd_xl_base.yaml


def text_encoder_2(seed: int = 8):
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection

    torch.manual_seed(seed)
    return CLIPTextModelWithProjection(CLIPTextConfig(
        vocab_size=64, hidden_size=32, intermediate_size=37, num_hidden_layers=2,
        num_attention_heads=4, max_position_embeddings=16, projection_dim=32, bos_token_id=0,
        eos_token_id=2, pad_token_id=1)).eval()


def openclip_state(hf: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """An HF CLIPTextModelWithProjection state dict laid out as SDXL's original checkpoint
    holds OpenCLIP's text tower (the inverse of diffusers' convert_open_clip_checkpoint, which
    the tests run on it): q/k/v stacked by rows into in_proj_weight / in_proj_bias."""
    out = {"positional_embedding": hf["text_model.embeddings.position_embedding.weight"],
           "token_embedding.weight": hf["text_model.embeddings.token_embedding.weight"],
           "ln_final.weight": hf["text_model.final_layer_norm.weight"],
           "ln_final.bias": hf["text_model.final_layer_norm.bias"],
           "text_projection": hf["text_projection.weight"].T}
    layers = {int(k.split(".")[3]) for k in hf if k.startswith("text_model.encoder.layers.")}
    for n in sorted(layers):
        hf_layer, block = f"text_model.encoder.layers.{n}.", f"transformer.resblocks.{n}."
        for kind in ("weight", "bias"):
            out[f"{block}attn.in_proj_{kind}"] = torch.cat(
                [hf[f"{hf_layer}self_attn.{p}_proj.{kind}"] for p in "qkv"])
            for theirs, ours in (("attn.out_proj", "self_attn.out_proj"), ("ln_1", "layer_norm1"),
                                 ("ln_2", "layer_norm2"), ("mlp.c_fc", "mlp.fc1"),
                                 ("mlp.c_proj", "mlp.fc2")):
                out[f"{block}{theirs}.{kind}"] = hf[f"{hf_layer}{ours}.{kind}"]
    return {OPENCLIP_PREFIX + k: v.contiguous() for k, v in out.items()}


def from_openclip(model, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """diffusers' own reading of an original checkpoint's OpenCLIP text tower (HF names)."""
    from diffusers.loaders.single_file_utils import convert_open_clip_checkpoint

    return convert_open_clip_checkpoint(model, state, prefix=OPENCLIP_PREFIX)
