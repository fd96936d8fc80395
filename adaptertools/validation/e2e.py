"""End to end: the merged model's logits against the unmerged base + adapters, on fixed token ids.

HF bases run through transformers (merged folder) and PEFT (base + adapters, unmerged, each
adapter's layer scales multiplied by its weight); GGUF bases through llama.cpp (llama-cpp-python,
in a child process with its extra buffer types off: ``adaptertools.llamacpp``): the base with the
adapter applied at run time (converted to a GGUF adapter first if needed) against the merged file,
with an F32 KV cache so that the cache adds no noise of its own.

Thresholds, from the dtypes. Let u be the unit roundoff of the coarsest float dtype the merged
model stores (fp32 2^-24, fp16 2^-11, bf16 2^-8; never finer than fp32, the compute precision of
both sides). A forward pass through L blocks runs n = 7L + 1 matmuls whose weights a merge rounds
(q, k, v, o, gate, up, down, and the head), each to a relative error of RMS u/sqrt(3);
independent roundings add in quadrature, so the logits move by about sqrt(n) u / sqrt(3) relative,
times the network's amplification kappa, and the unmerged model, computed in the same dtypes,
carries noise of the same size. With kappa up to 8 and both sides counted:

    relative L2 of logits  <= tau = 32 sqrt(n) u          (tiny fp32 Llama, L = 2: 7.4e-6;
                                                           measured ~1e-6; bf16 0.48, measured 1e-2)
    max |logit difference| <= 8 tau rms(reference logits) (a Gaussian's maximum over ~10^4 draws
                                                           stays below 4.5 sigma; 8 leaves room)
    mean KL(ref || merged) <= (8 tau rms)^2 / 2           (KL ~ Var_p(delta) / 2 <= max|delta|^2 / 2)
    top-1 agreement        at every position whose reference top-2 gap exceeds twice the
                           max-abs threshold (elsewhere noise may legitimately swap them)

Real mistakes are far outside: one tensor's delta missing moves tiny-model logits by 1e-2 to
1e-1 relative. At bf16 this check is coarse by nature; the per-tensor check is the sharp one.
"""

from __future__ import annotations

import contextlib
import importlib.util
import logging
import math
import os
import sys
import tempfile
import warnings
from pathlib import Path

import torch

from ..dtypes import UNIT_ROUNDOFF
from ..errors import AdapterToolsWarning, UnsupportedError

KAPPA_TIMES_TWO = 32          # 8 (amplification) x 2 (both sides) x 2 (sqrt(3) rounded up)
MAX_SIGMAS = 8
SEQUENCES, LENGTH, SEED = 2, 16, 0


def _require(kind: str) -> None:
    needed = {"safetensors": (("transformers", "peft"), "e2e"), "gguf": (("llama_cpp",), "llama")}
    modules, extra = needed[kind]
    missing = [m for m in modules if importlib.util.find_spec(m) is None]
    if missing:
        raise UnsupportedError(f"--e2e on a{' GGUF' if kind == 'gguf' else 'n HF'} base needs "
                               f"{', '.join(m.replace('_', '-') for m in missing)}: "
                               f"pip install 'adaptertools[{extra}]'")


def thresholds(dtypes, n_blocks: int) -> dict:
    u = max([UNIT_ROUNDOFF.get(d, 0.0) for d in dtypes] + [UNIT_ROUNDOFF["F32"]])
    return {"unit_roundoff": u, "matmuls": 7 * n_blocks + 1,
            "relative_l2": KAPPA_TIMES_TWO * math.sqrt(7 * n_blocks + 1) * u}


def compare_logits(reference: torch.Tensor, merged: torch.Tensor, limits: dict) -> dict:
    """Metrics of (positions, vocab) logits against their thresholds."""
    ref, got = reference.double().reshape(-1, reference.shape[-1]), \
        merged.double().reshape(-1, merged.shape[-1])
    diff = got - ref
    tau = limits["relative_l2"]
    rms = float(ref.square().mean().sqrt())
    max_abs = MAX_SIGMAS * tau * rms
    p_log, q_log = torch.log_softmax(ref, -1), torch.log_softmax(got, -1)
    kl = float((p_log.exp() * (p_log - q_log)).sum(-1).mean())
    top2 = ref.topk(2, dim=-1).values
    decided = (top2[:, 0] - top2[:, 1]) > 2 * max_abs
    agree = ref.argmax(-1) == got.argmax(-1)
    metrics = {
        "relative_l2": (float(diff.norm() / ref.norm()), tau),
        "max_abs": (float(diff.abs().max()), max_abs),
        "mean_kl": (max(kl, 0.0), max_abs ** 2 / 2),
        "top1_agreement": (float(agree.double().mean()), float(decided.double().mean())),
    }
    out = {name: {"value": v, "threshold": t,
                  "passed": v >= t if name == "top1_agreement" else v <= t}
           for name, (v, t) in metrics.items()}
    out["top1_agreement"]["passed"] = bool(agree[decided].all())
    return out


def token_ids(vocab: int) -> torch.Tensor:
    return torch.randint(0, vocab, (SEQUENCES, LENGTH), generator=torch.Generator().manual_seed(SEED))


# ----------------------------------------------------------------------------- HF + PEFT

def _debugging() -> bool:
    """``--debug`` (when the CLI runs) or ADAPTERTOOLS_DEBUG=1."""
    boundary = sys.modules.get("adaptertools._boundary")
    if boundary is not None:
        return boundary.debugging()
    return os.environ.get("ADAPTERTOOLS_DEBUG", "").strip().lower() not in ("", "0", "false",
                                                                           "no", "off")


@contextlib.contextmanager
def quiet_oracles():
    """transformers, PEFT, huggingface_hub and bitsandbytes silent while they serve as the
    oracle: their log lines (bitsandbytes' "Failed to load CPU gemm_4bit_forward from
    kernels-community" at import, the kernels package's offline notice), loading bars and
    warnings (deprecations) are not ours to show. All of it back as it was afterwards;
    nothing silenced with --debug."""
    if _debugging():
        yield
        return
    import huggingface_hub.utils as hub_utils
    from transformers.utils import logging as hf_logging

    loggers = [logging.getLogger(name) for name in ("bitsandbytes", "kernels", "peft",
                                                    "accelerate")]
    levels = [logger.level for logger in loggers]
    verbosity, bars = hf_logging.get_verbosity(), hf_logging.is_progress_bar_enabled()
    hub_bars_off = hub_utils.are_progress_bars_disabled()
    try:
        for logger in loggers:
            logger.setLevel(logging.ERROR)
        hf_logging.set_verbosity_error()
        hf_logging.disable_progress_bar()          # (huggingface_hub's bars too)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        for logger, level in zip(loggers, levels):
            logger.setLevel(level)
        hf_logging.set_verbosity(verbosity)
        if bars:
            hf_logging.enable_progress_bar()
        if hub_bars_off:
            hub_utils.disable_progress_bars()
        elif hub_utils.are_progress_bars_disabled():
            hub_utils.enable_progress_bars()


@quiet_oracles()
def hf_logits(base, adapters: list, merged, weights: list[float], mode: str):
    from peft import PeftModel
    from peft.tuners.lora import LoraLayer
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(base).eval()
    names = [f"adapter{i}" for i in range(len(adapters))]
    unmerged = PeftModel.from_pretrained(model, adapters[0], adapter_name=names[0])
    for name, path in zip(names[1:], adapters[1:]):
        unmerged.load_adapter(path, adapter_name=name)
    unmerged.base_model.set_adapter(names)
    dora = {}
    for module in unmerged.modules():
        if isinstance(module, LoraLayer):
            for name, weight in zip(names, weights):
                if name in module.scaling:
                    module.set_scale(name, weight)
                    dora[name] = dora.get(name, False) or bool(module.use_dora.get(name))
    if mode == "stacked" and len(names) > 1 and any(dora.values()):
        raise UnsupportedError("--e2e has no unmerged reference for stacked DoRA adapters (PEFT "
                               "takes every DoRA norm on the unmerged base); check per tensor only")
    unmerged.eval()
    notes = oracle_notes(unmerged, names, adapters)
    vocab = model.config.get_text_config().vocab_size
    ids = token_ids(vocab)
    with torch.no_grad():
        reference = unmerged(ids).logits
        del unmerged, model
        result = AutoModelForCausalLM.from_pretrained(merged).eval()(ids).logits
    return reference, result, _hf_blocks(merged), notes


def oracle_notes(unmerged, names: list[str], adapters: list) -> list[str]:
    """Where PEFT, the oracle, reads an adapter otherwise than adaptertools (which merged it):
    tensors it ignores (modules target_modules does not cover), DoRA magnitudes it drops
    (``use_dora`` unset) or makes up (``use_dora`` without magnitudes). One line per adapter."""
    from peft.tuners.lora import LoraLayer

    from ..adapter import module_name
    from ..adapter_io import load

    peft_view: list[dict[str, bool]] = [{} for _ in names]     # module -> applies DoRA
    for path, module in unmerged.base_model.model.named_modules():
        if isinstance(module, LoraLayer):
            for i, name in enumerate(names):
                if name in module.lora_A or name in module.lora_embedding_A:
                    peft_view[i][path] = bool(module.use_dora.get(name))
    notes = []
    for path, view in zip(adapters, peft_view):
        ours = {module_name(n): w.magnitude is not None for n, w in load(path).weights.items()}
        ignored = sorted(set(ours) - set(view))
        dropped = sorted(m for m in ours if ours[m] and m in view and not view[m])
        made_up = sorted(m for m in ours if not ours[m] and view.get(m))
        parts = [f"{what} ({len(found)} module(s), e.g. {found[0]})" for what, found in (
            ("ignores the tensors of modules its target_modules does not cover", ignored),
            ("drops the DoRA magnitudes (use_dora is not set)", dropped),
            ("applies DoRA with initial magnitudes where the file has none", made_up)) if found]
        if parts:
            notes.append(f"{path}: the oracle (PEFT) reads this adapter otherwise than "
                         f"adaptertools, which merged it: it {'; it '.join(parts)}. A failure "
                         "of the end-to-end check may be the oracle's reading, not the merge")
    return notes


def _hf_blocks(folder) -> int:
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(folder).get_text_config()
    return int(getattr(config, "num_hidden_layers", 1))


# ----------------------------------------------------------------------------- llama.cpp

def llama_logits(model_path, sequences, lora_path=None, scale: float = 1.0) -> torch.Tensor:
    """(sequences, length, vocab) float64 logits of the GGUF model at ``model_path`` (with the
    GGUF adapter ``lora_path`` at run time), one llama.cpp load in a child process."""
    import numpy as np

    from ..llamacpp import LlamaCppError, logits

    try:
        rows = logits(model_path, sequences, lora=lora_path, scale=scale)
    except LlamaCppError as exc:
        raise LlamaCppError(f"{exc}; validate without --e2e still checks the merge per "
                            f"tensor") from None
    return torch.from_numpy(np.stack(rows).astype(np.float64))


def gguf_logits(base, adapters: list, merged, weights: list[float]):
    from ..adapter_io import convert as convert_adapter
    from ..formats.names import load_base_info
    from ..registry import detect_format

    if len(adapters) != 1:
        raise UnsupportedError("--e2e on a GGUF base compares one adapter (llama-cpp-python "
                               "applies one runtime LoRA); check several per tensor only")
    info = load_base_info(base)
    with tempfile.TemporaryDirectory(prefix="adaptertools-e2e-") as tmp:
        lora = Path(adapters[0])
        if detect_format(lora).name != "gguf":
            convert_adapter(lora, Path(tmp) / "adapter.gguf", to="gguf", base=base)
            lora = Path(tmp) / "adapter.gguf"
        sequences = token_ids(_gguf_vocab(base)).tolist()
        reference = llama_logits(base, sequences, lora, weights[0])
    return reference, llama_logits(merged, sequences), info.n_blocks


def _gguf_vocab(path) -> int:
    from ..formats.names import field_value, open_gguf

    tokens = field_value(open_gguf(Path(path)), "tokenizer.ggml.tokens")
    return len(tokens) if tokens else 32


def end_to_end(base, adapters, merged, *, weights: list[float], mode: str, kind: str,
               dtypes=("F32",)) -> dict:
    _require(kind)
    from ..inputs import adapter_list

    adapters = adapter_list(adapters)
    notes: list[str] = []
    if kind == "safetensors":
        reference, result, n_blocks, notes = hf_logits(base, adapters, merged, weights, mode)
        runtime = "transformers + PEFT (unmerged) vs transformers (merged)"
    else:
        reference, result, n_blocks = gguf_logits(base, adapters, merged, weights)
        runtime = "llama.cpp runtime LoRA vs llama.cpp merged file"
    limits = thresholds(dtypes, n_blocks)
    metrics = compare_logits(reference, result, limits)
    for note in notes:           # (the CLI shows warnings on stderr; the report keeps them)
        warnings.warn(note, AdapterToolsWarning, stacklevel=2)
    report = {"passed": all(m["passed"] for m in metrics.values()), "runtime": runtime,
              "tokens": SEQUENCES * LENGTH, "blocks": n_blocks, "dtypes": sorted(set(dtypes)),
              "unit_roundoff": limits["unit_roundoff"], "metrics": metrics}
    if notes:
        report["oracle_notes"] = notes
    return report
