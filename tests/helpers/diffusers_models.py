"""diffusers as producer and consumer of its own LoRA files, on the CPU (tests/test_diffusers.py).

Tiny components built in code (a UNet2DConditionModel with block_out_channels (32, 64), a
CLIPTextModel of two layers, a FluxTransformer2DModel of one double and one single block), a
pipeline folder laid out by hand as ``DiffusionPipeline.save_pretrained`` lays it out
(model_index.json + one subfolder per component; no tokenizer is needed, none is built).
Adapters are made the way diffusers' training scripts make them (``model.add_adapter(LoraConfig)``
or PEFT's ``get_peft_model`` for the text encoder, lora_B perturbed away from its zero init) and
saved with the pipeline class's own ``save_lora_weights`` (metadata included), so the file is
diffusers' own.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

UNET_TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "proj_in", "conv1"]
TE_TARGETS = ["q_proj", "k_proj", "v_proj", "out_proj"]
FLUX_TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "proj_mlp"]


def tiny_unet(seed: int = 0):
    from diffusers import UNet2DConditionModel

    torch.manual_seed(seed)
    return UNet2DConditionModel(block_out_channels=(32, 64), layers_per_block=1, sample_size=8,
                                in_channels=4, out_channels=4, cross_attention_dim=32,
                                down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                                up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
                                norm_num_groups=8, attention_head_dim=4).eval()


def tiny_text_encoder(seed: int = 1):
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(seed)
    config = CLIPTextConfig(vocab_size=64, hidden_size=32, intermediate_size=37,
                            num_hidden_layers=2, num_attention_heads=4, max_position_embeddings=16,
                            projection_dim=32)
    return CLIPTextModel(config).eval()


def tiny_flux(seed: int = 2):
    from diffusers import FluxTransformer2DModel

    torch.manual_seed(seed)
    return FluxTransformer2DModel(patch_size=1, in_channels=4, num_layers=1,
                                  num_single_layers=1, attention_head_dim=8,
                                  num_attention_heads=2, joint_attention_dim=16,
                                  pooled_projection_dim=16, axes_dims_rope=(2, 2, 4)).eval()


def unet_inputs(seed: int = 5) -> dict:
    gen = torch.Generator().manual_seed(seed)
    return {"sample": torch.randn(1, 4, 8, 8, generator=gen), "timestep": torch.tensor([3]),
            "encoder_hidden_states": torch.randn(1, 5, 32, generator=gen)}


def te_inputs() -> dict:
    return {"input_ids": torch.tensor([[1, 5, 9, 33, 2]])}


def flux_inputs(seed: int = 6) -> dict:
    gen = torch.Generator().manual_seed(seed)
    return {"hidden_states": torch.randn(1, 4, 4, generator=gen),
            "encoder_hidden_states": torch.randn(1, 3, 16, generator=gen),
            "pooled_projections": torch.randn(1, 16, generator=gen),
            "timestep": torch.tensor([0.5]), "img_ids": torch.zeros(4, 3),
            "txt_ids": torch.zeros(3, 3)}


def output_of(model, inputs: dict) -> torch.Tensor:
    with torch.no_grad():
        out = model(**inputs)
    if hasattr(out, "sample"):
        return out.sample
    return out[0] if isinstance(out, tuple) else out.last_hidden_state


def perturb(model, seed: int, *, magnitude: bool = True) -> None:
    """lora_B away from zero (and DoRA magnitudes away from the base norms), so the adapter acts."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in sorted(model.named_parameters()):
            if "lora_B" in name:          # lora_B.weight and (lora_bias) lora_B.bias
                p.copy_(torch.randn(p.shape, generator=gen) * 0.2)
            elif magnitude and "lora_magnitude_vector" in name:
                p.mul_(1 + 0.1 * torch.rand(p.shape, generator=gen))


def lora_config(targets, **extra):
    from peft import LoraConfig

    return LoraConfig(r=extra.pop("r", 4), lora_alpha=extra.pop("lora_alpha", 8),
                      target_modules=targets,
                      init_lora_weights=extra.pop("init_lora_weights", "gaussian"), **extra)


def add_unet_lora(unet, seed: int = 11, targets=UNET_TARGETS, **extra):
    unet.add_adapter(lora_config(targets, **extra))
    perturb(unet, seed)
    return unet


def add_te_lora(te, seed: int = 12, **extra):
    """PEFT's get_peft_model (transformers 5.25's add_adapter asks for PEFT >= 0.22): the same
    LoRA layers diffusers' fuse_text_encoder_lora merges (BaseTunerLayer.merge)."""
    from peft import get_peft_model

    model = get_peft_model(te, lora_config(TE_TARGETS, **extra))
    perturb(model, seed)
    return model


def add_flux_lora(flux, seed: int = 13, **extra):
    flux.add_adapter(lora_config(FLUX_TARGETS, **extra))
    perturb(flux, seed)
    return flux


def lora_layers(model) -> dict[str, torch.Tensor]:
    from peft.utils import get_peft_model_state_dict

    # a get_peft_model wrapper's keys start base_model.model.; add_adapter's do not
    return {k.removeprefix("base_model.model."): v
            for k, v in get_peft_model_state_dict(model).items()}


def adapter_metadata(model) -> dict:
    """The LoraConfig as diffusers' training scripts pass it to save_lora_weights."""
    config = model.peft_config["default"]
    return config.to_dict()


def save_sd_lora(folder: Path, unet=None, text_encoder=None, *, metadata: bool = True) -> Path:
    """StableDiffusionPipeline.save_lora_weights into ``folder``; the file's path."""
    from diffusers import StableDiffusionPipeline

    kwargs = {}
    if unet is not None:
        kwargs["unet_lora_layers"] = lora_layers(unet)
        if metadata:
            kwargs["unet_lora_adapter_metadata"] = adapter_metadata(unet)
    if text_encoder is not None:
        kwargs["text_encoder_lora_layers"] = lora_layers(text_encoder)
        if metadata:
            kwargs["text_encoder_lora_adapter_metadata"] = adapter_metadata(text_encoder)
    StableDiffusionPipeline.save_lora_weights(folder, **kwargs)
    return folder / "pytorch_lora_weights.safetensors"


def save_flux_lora(folder: Path, transformer, *, metadata: bool = True) -> Path:
    from diffusers import FluxPipeline

    kwargs = {"transformer_lora_layers": lora_layers(transformer)}
    if metadata:
        kwargs["transformer_lora_adapter_metadata"] = adapter_metadata(transformer)
    FluxPipeline.save_lora_weights(folder, **kwargs)
    return folder / "pytorch_lora_weights.safetensors"


def save_pipeline(folder: Path, components: dict, *, extra_files: dict | None = None,
                  max_shard_size: str | None = None) -> Path:
    """A pipeline folder as DiffusionPipeline.save_pretrained lays it out: model_index.json
    naming each component's (library, class), each model saved with its own save_pretrained,
    plus plain side folders (``extra_files``: {relative path: text}, e.g. a scheduler config)."""
    folder.mkdir(parents=True)
    index = {"_class_name": "StableDiffusionPipeline", "_diffusers_version": "0.42.1"}
    for name, model in components.items():
        library = "transformers" if type(model).__module__.startswith("transformers") \
            else "diffusers"
        index[name] = [library, type(model).__name__]
        if max_shard_size is None:
            model.save_pretrained(folder / name)
        else:
            model.save_pretrained(folder / name, max_shard_size=max_shard_size)
    for rel, text in (extra_files or {}).items():
        (folder / rel).parent.mkdir(parents=True, exist_ok=True)
        (folder / rel).write_text(text)
        top = rel.split("/", 1)[0]
        if "/" in rel and top not in index:
            index[top] = ["diffusers", "DDIMScheduler"]
    (folder / "model_index.json").write_text(json.dumps(index, indent=2))
    return folder


SCHEDULER = {"scheduler/scheduler_config.json": json.dumps(
    {"_class_name": "DDIMScheduler", "num_train_timesteps": 1000})}


def fused_by_diffusers(model, lora: Path, prefix: str | None) -> dict[str, torch.Tensor]:
    """diffusers' own merge: ``load_lora_adapter`` of the file's folder (with ``weight_name``:
    given a file path, 0.42 drops the metadata's alpha), ``fuse_lora``, ``unload_lora``; the
    fused model's state dict."""
    model.load_lora_adapter(str(lora.parent), weight_name=lora.name, prefix=prefix,
                            adapter_name="x")
    model.fuse_lora(adapter_names=["x"])
    model.unload_lora()
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def fused_text_encoder(peft_model) -> dict[str, torch.Tensor]:
    """diffusers' ``fuse_text_encoder_lora`` (BaseTunerLayer.merge on every LoRA layer) on the
    PEFT-wrapped text encoder, then the LoRA layers removed: the fused weights."""
    import copy

    from diffusers.loaders.lora_base import fuse_text_encoder_lora

    model = copy.deepcopy(peft_model)
    fuse_text_encoder_lora(model)
    return {k: v.detach().clone() for k, v in model.unload().state_dict().items()}


def loaded_by_diffusers(model, lora: Path, prefix: str | None):
    """``model`` with the LoRA file loaded by diffusers (load_lora_adapter, not fused)."""
    model.load_lora_adapter(str(lora.parent), weight_name=lora.name, prefix=prefix,
                            adapter_name="x")
    return model


def load_lora_weights(unet, folder: Path):
    """StableDiffusionPipeline's own ``load_lora_weights`` (its LoRA loader mixin: the pipeline
    level key handling and metadata, then load_lora_into_unet) on an object holding only the
    unet: a whole pipeline needs a tokenizer and a VAE, and its text encoder loader needs PEFT
    >= 0.22 under transformers 5 (so the file must hold no text_encoder keys)."""
    from diffusers.loaders import StableDiffusionLoraLoaderMixin

    class UnetOnly(StableDiffusionLoraLoaderMixin):
        hf_device_map = None

        def __init__(self, unet):
            self.unet, self.text_encoder = unet, None

        @property
        def components(self):
            return {"unet": self.unet}

    holder = UnetOnly(unet)
    holder.load_lora_weights(str(folder), adapter_name="x")
    return holder.unet
