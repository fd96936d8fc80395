"""PEFT LoRA variants whose extra tensors only act in training: VeLoRA and MonteCLoRA
(peft/tuners/lora/variants.py 0.21.2). Their adapters are plain LoRA once trained:

* VeLoRA (``velora_config``): ``lora_velora_embed`` (a persistent buffer, one per layer) is the
  projection its backward compresses activations with; the forward outside training is
  ``lora_B(lora_A(x)) * scaling`` (``VeloraLinearVariant.forward``, the ``else`` branch) and the
  merge adds ``get_delta_weight`` (``merge_safe`` / ``merge_unsafe``).
* MonteCLoRA (``monteclora_config``): ``lora_monteclora_sampler.*`` are the variational
  parameters sampled only ``if module.training``; evaluation and the merge ("we ignore the MC
  sampling and just use the base LoRA weights", ``MontecloraLinearVariant.merge_safe``) are
  plain LoRA.

So the reader sets these tensors aside (named in one warning) and reads the rest as LoRA; the
writer gives back a plain LoRA config (the variant's field cleared), which PEFT merges the same.
"""

from __future__ import annotations

import re

# config field -> (the variant's name, the pattern its training-only tensors' keys match)
VARIANTS = {"velora_config": ("VeLoRA", re.compile(r"\.lora_velora_embed(\.\w+)?$")),
            "monteclora_config": ("MonteCLoRA", re.compile(r"\.lora_monteclora_sampler\."))}


def set_aside(state_dict: dict, config: dict) -> tuple[dict, str | None]:
    """(the state dict without the training-only tensors of the variant ``config`` turns on,
    a note naming them, or None when there are none)."""
    for field, (name, pattern) in VARIANTS.items():
        if config.get(field) is None:
            continue
        dropped = sorted(k for k in state_dict if pattern.search(k))
        kept = {k: v for k, v in state_dict.items() if not pattern.search(k)}
        note = (f"a {name} adapter ({field}): its {len(dropped)} training-only tensor(s) (e.g. "
                f"{dropped[0]}) are not part of what it computes once trained; read as the "
                "plain LoRA PEFT evaluates and merges") if dropped else \
            f"a {name} adapter ({field}): read as the plain LoRA PEFT evaluates and merges"
        return kept, note
    return state_dict, None


def clear(config: dict) -> None:
    """The variants' fields cleared: what is written is plain LoRA."""
    for field in VARIANTS:
        if config.get(field) is not None:
            config[field] = None
