"""LyCORIS (lycoris-lora 4.1.3) LoHa / LoKr modules and files made by LyCORIS itself, with random
non-zero factors (its inits zero one side), and LyCORIS's own weights for them: what its forward
uses, what its merge_to writes, what its own loader rebuilds (tests/test_lycoris.py)."""

from __future__ import annotations

import logging
from pathlib import Path

import torch
from torch import nn

# tiny layers; the LoKr splits with factor=4: 32 = 4*8, 16 = 4*4, 48 = 4*12, 64 = 4*16
LAYERS = {
    "linear": lambda: nn.Linear(64, 48, bias=False),
    "conv3x3": lambda: nn.Conv2d(16, 32, 3, bias=False),
    "conv1x1": lambda: nn.Conv2d(16, 32, 1, bias=False),
    "conv1d": lambda: nn.Conv1d(16, 32, 3, bias=False),
}

# (algo, LohaModule / LokrModule keyword arguments); alphas are exact binary fractions so that
# the saved fp32 alpha is the trained one
CASES = {
    "loha-a1": ("loha", {"lora_dim": 2, "alpha": 1.0}),
    "loha-a0": ("loha", {"lora_dim": 3, "alpha": 0}),                # alpha 0 -> rank
    "loha-cp": ("loha", {"lora_dim": 2, "alpha": 3.0, "use_tucker": True}),
    "lokr-w2lr": ("lokr", {"lora_dim": 2, "alpha": 3.0, "factor": 4}),
    "lokr-both": ("lokr", {"lora_dim": 1, "alpha": 0.5, "factor": 4, "decompose_both": True}),
    "lokr-cp": ("lokr", {"lora_dim": 2, "alpha": 5.0, "factor": 4, "use_tucker": True}),
    "lokr-cp-both": ("lokr", {"lora_dim": 1, "alpha": 2.0, "factor": 4, "use_tucker": True,
                              "decompose_both": True}),
    "lokr-full": ("lokr", {"lora_dim": 2, "alpha": 7.0, "factor": 4, "full_matrix": True}),
    "lokr-rank1": ("lokr", {"lora_dim": 1, "alpha": 1.0, "factor": 4}),  # alpha = rank: scale 1
    # rs_lora: scale alpha / sqrt(r), saved as alpha * sqrt(r)
    "loha-rs": ("loha", {"lora_dim": 4, "alpha": 1.0, "rs_lora": True}),
    "lokr-rs": ("lokr", {"lora_dim": 4, "alpha": 6.0, "factor": 2, "rs_lora": True}),
    # weight_decompose (DoHa / DoKr): dora_scale per output row, or per input column
    "loha-dora": ("loha", {"lora_dim": 2, "alpha": 1.0, "weight_decompose": True}),
    "loha-cp-dora": ("loha", {"lora_dim": 2, "alpha": 3.0, "use_tucker": True,
                              "weight_decompose": True}),
    "lokr-dora": ("lokr", {"lora_dim": 2, "alpha": 3.0, "factor": 4, "weight_decompose": True}),
    "lokr-dora-in": ("lokr", {"lora_dim": 1, "alpha": 0.5, "factor": 4, "decompose_both": True,
                              "weight_decompose": True, "wd_on_out": False}),
}
# rs_lora with both LoKr halves full: trained at scale r / sqrt(r) = 2, which the file cannot say
# (tests/test_lycoris.py test_rs_lora_full_lokr_scale_is_not_in_the_file)
EXTRA_CASES = {"lokr-full-rs": ("lokr", {"lora_dim": 4, "alpha": 1.0, "factor": 4,
                                         "full_matrix": True, "rs_lora": True})}


def quiet() -> None:
    """LyCORIS logs every module it makes (and warns on full-matrix fallbacks) at INFO/WARNING."""
    logging.getLogger("LyCORIS").setLevel(logging.ERROR)


def module_class(algo: str):
    from lycoris.modules.loha import LohaModule
    from lycoris.modules.lokr import LokrModule

    return {"loha": LohaModule, "lokr": LokrModule}[algo]


def perturb(module: nn.Module, seed: int, spread: float = 0.3) -> None:
    """Every trainable tensor of a LyCORIS module (or network) set to seeded random values."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, p in sorted(module.named_parameters()):
            p.copy_(torch.randn(p.shape, generator=gen) * spread)


def make_module(layer: str, case: str, *, seed: int = 0):
    """(the torch layer with seeded weights, LyCORIS's module around it, perturbed)."""
    quiet()
    torch.manual_seed(1000 + seed)
    base = LAYERS[layer]()
    algo, kwargs = {**CASES, **EXTRA_CASES}[case]
    module = module_class(algo)("lycoris_x", base, 1.0, **kwargs)
    perturb(module, seed=sum(map(ord, layer + case)) + seed)
    return base, module


def forward_weight(module) -> torch.Tensor:
    """The weight LyCORIS's forward computes with (multiplier 1): ``base_weight +
    get_weight(self.shape) * self.scalar``, through ``apply_weight_decompose`` with DoRA
    (LohaModule.forward, LokrModule._rebuild_forward)."""
    with torch.no_grad():
        base = module._current_weight()
        weight = base + module.get_weight(module.shape).to(base.dtype) * module.scalar
        return module.apply_weight_decompose(weight, 1.0) if module.wd else weight


def merged_weight(base: nn.Module, module) -> torch.Tensor:
    """What LyCORIS's own ``merge_to(1.0)`` writes into the layer (a copy; the layer is
    restored)."""
    before = base.weight.detach().clone()
    with torch.no_grad():
        module.merge_to(1.0)
        merged = base.weight.detach().clone()
        base.weight.copy_(before)
    return merged


def reloaded(module, base: nn.Module, state: dict[str, torch.Tensor]):
    """LyCORIS's own reader of a saved module: ``make_module_from_state_dict`` on the tensors
    ``extract_state_dict`` picks (what create_lycoris_from_weights does per module)."""
    cls = type(module)
    named = {f"lycoris_x.{k}": v for k, v in state.items()}
    with torch.no_grad():
        return cls.make_module_from_state_dict("lycoris_x", base,
                                               *cls.extract_state_dict(named, "lycoris_x"))


def llama_lycoris(tmp_path: Path, algo: str, *, dim: int, alpha: float, seed: int = 5, **kwargs):
    """A tiny transformers Llama saved as a base folder, LyCORIS's ``create_lycoris`` network on
    it (perturbed) and that network's ``save_weights`` file (``lycoris_...`` keys).

    Returns (base folder, adapter file, model, network); the network is applied (its forward is
    the model's), not merged.
    """
    from lycoris import create_lycoris

    from helpers.models import make_model
    quiet()
    model = make_model("llama")
    base = tmp_path / "base"
    model.save_pretrained(base)
    network = create_lycoris(model, 1.0, linear_dim=dim, linear_alpha=alpha, algo=algo, **kwargs)
    network.apply_to()
    perturb(network, seed=seed, spread=0.2)
    path = tmp_path / f"{algo}.safetensors"
    network.save_weights(str(path), None, {})
    assert path.is_file()
    return base, path, model, network


def unet_lycoris(tmp_path: Path, algo: str, *, seed: int = 3, **kwargs):
    """The tiny diffusers UNet of helpers/diffusers_models.py saved as a component folder, a
    ``create_lycoris`` network on it (Linear and Conv2d 3x3 / 1x1 layers; perturbed, applied)
    and its ``save_weights`` file. Returns (unet folder, adapter file, unet, network)."""
    from lycoris import create_lycoris

    from helpers.diffusers_models import tiny_unet

    quiet()
    unet = tiny_unet()
    folder = tmp_path / "unet"
    unet.save_pretrained(folder)
    network = create_lycoris(unet, 1.0, algo=algo, **kwargs)
    network.apply_to()
    perturb(network, seed=seed, spread=0.2)
    path = tmp_path / f"{algo}-unet.safetensors"
    network.save_weights(str(path), None, {})
    return folder, path, unet, network
