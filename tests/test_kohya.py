"""kohya (sd-scripts) LoRA files (formats/kohya.py, kohya_names.py) against the field's tools,
on tiny models built in code (helpers/kohya_files.py):

- diffusers' ``convert_state_dict_to_kohya`` of a PEFT LoRA (UNet incl. a 3 x 3 conv and 1 x 1
  proj_in, CLIP text encoder) merged into the component folders, the pipeline folder's reading,
  and a single-file checkpoint in the original naming: bit-identical to diffusers' ``fuse_lora``
  / PEFT's merge of the same LoRA;
- a file by hand from sd-scripts' rules (alpha != rank, missing alpha, alpha 0, conv, fp16)
  merged as lycoris-lora merges it (its LoConModule, ``merge_to``);
- our written kohya file (PEFT -> kohya) loaded by diffusers' own kohya converter gives PEFT's
  merged weights; kohya -> ours -> kohya is bit-exact;
- bad input: an SDXL (SGM-named) file into an SD1.5-shaped base, a key that maps nowhere, shapes
  of another model, two modules with one underscore form, no --base.
"""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from helpers import kohya_files as kf
from helpers.cli import assert_cli_error, assert_nothing_written, run_cli
from safetensors import safe_open
from safetensors.torch import load_file, save_file

import adaptertools as at
from adaptertools.errors import FormatError, OptionError, UnsupportedError
from adaptertools.registry import detect_format


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("kohya")
    bases = kf.bases(root)
    unet = kf.with_lora(kf.unet(), kf.UNET_TARGETS)
    te = kf.with_lora(kf.text_encoder(), kf.TE_TARGETS, seed=4)
    both = kf.kohya_file(unet, te, root / "both.safetensors")
    tensors = load_file(str(both))
    for name, keep in (("unet_only", "lora_unet_"), ("te_only", "lora_te")):
        save_file({k: v for k, v in tensors.items() if k.startswith(keep)},
                  str(root / f"{name}.safetensors"))
    return {"root": root, **bases, "both": both, "unet_only": root / "unet_only.safetensors",
            "te_only": root / "te_only.safetensors",
            "fused_unet": kf.fused(unet), "fused_te": kf.fused(te)}


def merged(base, adapter, out) -> dict[str, torch.Tensor]:
    at.merge(base, [str(adapter)], out)
    return {k: v for f in sorted(out.rglob("*.safetensors")) for k, v in load_file(str(f)).items()}


def assert_same(ours: dict, ref: dict, prefix: str = "") -> int:
    """Every tensor of ``ref`` bit-identical in ``ours`` (under ``prefix``); how many differ
    from the base is not checked here. Returns the tensor count."""
    for name, tensor in ref.items():
        got = ours[prefix + name]
        assert got.dtype == tensor.dtype and torch.equal(got, tensor), \
            (name, float((got - tensor).abs().max()))
    return len(ref)


# ----------------------------------------------------------------------------- read + merge

def test_sniffed_before_our_safetensors(world, tmp_path):
    assert detect_format(world["both"]).name == "kohya"
    at.save(at.load(world["unet_only"], base=world["unet"]), tmp_path / "ours.safetensors",
            format="safetensors")
    assert detect_format(tmp_path / "ours.safetensors").name == "safetensors"
    report = at.inspect(world["both"], base=world["pipe"])
    assert report.format == "kohya" and report.adapted_tensors == 54
    assert report.storage == {"prefixes": ["lora_te1_", "lora_unet_"], "modules": 54,
                              "ranks": [4], "network_module": None}


def test_diffusers_kohya_file_merges_as_fuse_lora(world, tmp_path):
    """UNet (Linear, 1 x 1 proj_in, 3 x 3 conv1) and text encoder, each into its component
    folder: every tensor bit-identical to diffusers' fuse_lora / PEFT's merge."""
    unet = merged(world["unet"], world["unet_only"], tmp_path / "u")
    assert assert_same(unet, world["fused_unet"]) == len(unet)
    te = merged(world["text_encoder"], world["te_only"], tmp_path / "t")
    assert assert_same(te, world["fused_te"]) == len(te)
    adapted = at.load(world["unet_only"], base=world["unet"]).weights
    conv = adapted["down_blocks.0.resnets.0.conv1.weight"]
    assert conv.layer == "conv" and conv.weight_shape == (32, 32, 3, 3) and conv.a.shape == (4, 288)
    assert not torch.equal(unet["down_blocks.0.resnets.0.conv1.weight"],
                           kf.unet().state_dict()["down_blocks.0.resnets.0.conv1.weight"])


def test_pipeline_folder_keys_and_single_file_checkpoint(world, tmp_path):
    """One file with UNet and text encoder modules: against the pipeline folder its keys are
    ``unet.`` / ``text_encoder.`` prefixed (the shared convention); merged into a single-file
    checkpoint in the original naming it equals fuse_lora under the original prefixes."""
    pipe = at.load(world["both"], base=world["pipe"])
    unet = at.load(world["unet_only"], base=world["unet"])
    te = at.load(world["te_only"], base=world["text_encoder"])
    assert set(pipe.weights) == {f"unet.{k}" for k in unet.weights} | \
        {f"text_encoder.{k}" for k in te.weights}
    assert torch.equal(pipe.weights["unet.down_blocks.0.resnets.0.conv1.weight"].a,
                       unet.weights["down_blocks.0.resnets.0.conv1.weight"].a)
    with pytest.raises(UnsupportedError, match="holds text_encoder, unet.*--to diffusers"):
        at.convert(world["both"], tmp_path / "peft", to="peft", base=world["pipe"])
    at.convert(world["unet_only"], tmp_path / "peft", to="peft", base=world["pipe"])
    assert at.load(tmp_path / "peft").weights.keys() == unet.weights.keys()   # prefix dropped
    single = merged(world["single"], world["both"], tmp_path / "s")
    n = assert_same(single, world["fused_unet"], kf.UNET_PREFIX)
    n += assert_same(single, world["fused_te"], kf.TE_PREFIX)
    assert n == len(single)


def test_hand_file_merges_as_lycoris_kohya_network(world, tmp_path):
    """sd-scripts' rules by hand (alpha 8 at rank 4, no alpha, alpha 0, conv 3 x 3 with alpha 2,
    1 x 1 proj_in): our merge vs lycoris-lora's own merge_to. The two compute the same
    delta in another order (lycoris: ``(up @ down) * scale`` in fp32, then added; ours:
    ``scale * up @ down`` added in fp32): each element of the delta is a sum of r <= 4 products,
    so they differ by a few fp32 roundings of the delta and one of the sum:
    bound = 8 * eps32 * (|W| + |delta|) elementwise."""
    file = kf.hand_file(kf.unet(), tmp_path / "hand.safetensors")
    ours = merged(world["unet"], file, tmp_path / "u")
    ref = kf.lycoris_merged(kf.unet(), file)
    base = kf.unet().state_dict()
    eps = torch.finfo(torch.float32).eps
    changed = 0
    for name, tensor in ref.items():
        delta = (tensor - base[name]).abs()
        bound = 8 * eps * (base[name].abs() + delta)
        assert ((ours[name] - tensor).abs() <= bound).all(), name
        changed += not torch.equal(tensor, base[name])
    assert changed == 5
    adapter = at.load(file, base=world["unet"]).weights
    scales = {k.rsplit(".", 2)[-2]: w.scale for k, w in adapter.items()}
    assert scales == {"to_q": 2.0, "to_k": 1.0, "2": 1.0, "conv1": 2 / 3, "proj_in": 0.5}


def test_pipeline_folder_merge(world, tmp_path):
    """The UNet + text encoder file into the pipeline folder (merging/pipeline.py): each
    component as fuse_lora / PEFT's merge, bit for bit (through the CLI)."""
    run_cli("merge", str(world["pipe"]), str(world["both"]), "--out", str(tmp_path / "p"),
            expect=0)
    for component, ref in (("unet", world["fused_unet"]), ("text_encoder", world["fused_te"])):
        got = {k: v for f in (tmp_path / "p" / component).glob("*.safetensors")
               for k, v in load_file(str(f)).items()}
        assert assert_same(got, ref) == len(got)
    assert (tmp_path / "p" / "model_index.json").read_bytes() == \
        (world["pipe"] / "model_index.json").read_bytes()


def test_lycoris_locon_dora_file_merges_as_lycoris(world, tmp_path):
    """lycoris-lora's own LoCon with DoRA (create_lycoris algo lora, dora_wd: Linear and conv
    modules, dora_scale (out, 1, ...)) under its ``lycoris_`` prefix, into the UNet folder, vs
    its merge_to. lycoris divides by ``||V|| + eps32`` (functional/general.py
    _weight_decompose), PEFT's rule (ours) by ``||V||``: with row norms ~0.5 here that moves the
    factor by ~2 eps relative, plus a few roundings of each side's sums:
    bound 8 * eps32 * |W'| elementwise."""
    model, file = kf.unet(), tmp_path / "locon.safetensors"
    network = kf.lycoris_file(model, file, part="lora_up", seed=3, linear_dim=4,
                              linear_alpha=2.0, conv_dim=3, conv_alpha=3.0, algo="lora",
                              dora_wd=True)
    ours = merged(world["unet"], file, tmp_path / "u")
    network.restore()
    network.merge_to(1.0)
    eps, base = torch.finfo(torch.float32).eps, kf.unet().state_dict()
    changed = 0
    for name, tensor in model.state_dict().items():
        assert ((ours[name] - tensor).abs() <= 8 * eps * tensor.abs()).all(), name
        changed += not torch.equal(tensor, base[name])
    assert changed > 40
    conv = at.load(file, base=world["unet"]).weights["conv_in.weight"]
    assert conv.magnitude.shape == (32,) and conv.a.shape == (3, 36)


@pytest.mark.filterwarnings("ignore:While injecting the PEFT adapters:RuntimeWarning")
def test_flux_transformer_names(tmp_path):
    """Flux: ``lora_transformer_`` (diffusers' names) into a FluxTransformer2DModel folder,
    alpha 8 at rank 4: bit-identical to diffusers' own kohya loader + fuse_lora (it scales
    lora_A by the power of two 2, exact); BFL's original names (``lora_unet_double_blocks_``)
    resolve against a BFL-named single file, bare or under ``model.diffusion_model.``."""
    model = kf.flux()
    model.save_pretrained(tmp_path / "transformer")
    file = kf.flux_file(model, tmp_path / "flux.safetensors")
    ours = merged(tmp_path / "transformer", file, tmp_path / "out")
    ref = kf.diffusers_flux_loaded(model, file)
    assert assert_same(ours, ref) == len(ours)
    base = model.state_dict()
    assert sum(not torch.equal(ref[k], base[k]) for k in ref) == len(kf.FLUX_MODULES)
    stem = "lora_unet_double_blocks_0_img_attn_qkv"
    lora = _file(tmp_path / "bfl.safetensors", {f"{stem}.lora_down.weight": torch.ones(2, 8),
                                                 f"{stem}.lora_up.weight": torch.ones(24, 2)})
    for prefix in ("", "model.diffusion_model."):
        bfl = _file(tmp_path / "bfl_base.safetensors", {
            f"{prefix}double_blocks.0.img_attn.qkv.weight": torch.zeros(24, 8),
            f"{prefix}double_blocks.0.img_attn.qkv.bias": torch.zeros(24)})
        weights = at.load(lora, base=bfl).weights
        assert list(weights) == [f"{prefix}double_blocks.0.img_attn.qkv.weight"]


def test_sdxl_te2_into_original_checkpoint(tmp_path):
    """SDXL's second text encoder is OpenCLIP's in the original checkpoint (q/k/v fused into
    in_proj_weight), while kohya files name it by the HF CLIPTextModelWithProjection: a PEFT
    LoRA on q/k/v/out/fc1/fc2 through diffusers' kohya export (lora_te2_) merged into the
    checkpoint, read back by diffusers' own convert_open_clip_checkpoint, equals PEFT's merge
    of the HF model. q, k and v go in as one LoRA whose B is block-diagonal by rows (exact
    zeros elsewhere); each row's delta is then summed over 3r products instead of r, the extra
    ones exact zeros, which can regroup the fp32 sum: bound 4 * eps32 * (|W| + |delta|)."""
    from diffusers.utils import convert_state_dict_to_kohya
    from peft.utils import get_peft_model_state_dict

    model = kf.text_encoder_2()
    base = {k: v.detach().clone() for k, v in model.state_dict().items()}
    checkpoint = kf.openclip_state(base)
    assert kf.from_openclip(model, checkpoint).keys() == base.keys()      # our layout = theirs
    (tmp_path / "ckpt").mkdir()       # the output may not lie in a single file's folder
    save_file(checkpoint, str(tmp_path / "ckpt" / "sdxl.safetensors"))
    lora = kf.with_lora(model, kf.TE_TARGETS + ["fc2"], seed=5)
    state = {f"text_encoder_2.{k}": v for k, v in get_peft_model_state_dict(lora).items()}
    file = _file(tmp_path / "te2.safetensors", convert_state_dict_to_kohya(state))
    out = merged(tmp_path / "ckpt" / "sdxl.safetensors", file, tmp_path / "out")
    ours, ref = kf.from_openclip(model, out), kf.fused(lora)
    eps = torch.finfo(torch.float32).eps
    changed = 0
    for name, tensor in ref.items():
        delta = (tensor - base[name]).abs()
        assert ((ours[name] - tensor).abs() <= 4 * eps * (base[name].abs() + delta)).all(), name
        changed += not torch.equal(tensor, base[name])
    assert changed == 12                    # 6 modules x 2 layers
    with pytest.raises(UnsupportedError, match="in_proj_weight.*fused q/k/v"):
        at.convert(file, tmp_path / "back.safetensors", to="kohya",
                   base=tmp_path / "ckpt" / "sdxl.safetensors")


def test_lycoris_loha_modules_go_to_formats_lycoris(world, tmp_path):
    """A LoHa file (lycoris-lora create_lycoris algo loha, alpha = dim so that its merge_to,
    which squares the scale otherwise, is its forward) on the UNet's Linear and conv modules:
    the kohya reader hands each module to formats/lycoris.py; merged as merge_to bit for bit."""
    model, file = kf.unet(), tmp_path / "loha.safetensors"
    network = kf.lycoris_file(model, file, part="hada_w2_a", seed=4, linear_dim=2,
                              linear_alpha=2.0, conv_dim=2, conv_alpha=2.0, algo="loha")
    ours = merged(world["unet"], file, tmp_path / "u")
    network.restore()
    network.merge_to(1.0)
    base, changed = kf.unet().state_dict(), 0
    for name, tensor in model.state_dict().items():
        assert torch.equal(ours[name], tensor), name
        changed += not torch.equal(tensor, base[name])
    assert changed > 40


def test_sdxl_pipeline_text_encoders(world, tmp_path):
    """A pipeline with text_encoder and text_encoder_2 (SDXL's layout): lora_te1_ goes to the
    first, lora_te2_ to the second; the source's own names survive our safetensors file, and
    without them the base's names are written (text_encoder as lora_te1_, as sd-scripts names
    SDXL's, with text_model_)."""
    from diffusers.utils import convert_state_dict_to_kohya
    from peft.utils import get_peft_model_state_dict

    pipe = tmp_path / "sdxl"
    shutil.copytree(world["pipe"], pipe)
    kf.text_encoder_2().save_pretrained(pipe / "text_encoder_2")
    index = json.loads((pipe / "model_index.json").read_text())
    index["text_encoder_2"] = ["transformers", "CLIPTextModelWithProjection"]
    (pipe / "model_index.json").write_text(json.dumps(index))
    te, te2 = (kf.with_lora(m, kf.TE_TARGETS, seed=s)
               for m, s in ((kf.text_encoder(), 4), (kf.text_encoder_2(), 5)))
    state = {f"text_encoder.{k}": v for k, v in get_peft_model_state_dict(te).items()}
    state |= {f"text_encoder_2.{k}": v for k, v in get_peft_model_state_dict(te2).items()}
    file = _file(tmp_path / "te.safetensors", convert_state_dict_to_kohya(state))
    adapter = at.load(file, base=pipe)
    assert {k.split(".")[0] for k in adapter.weights} == {"text_encoder", "text_encoder_2"}
    assert "text_encoder_2.text_model.encoder.layers.1.mlp.fc1.weight" in adapter.weights
    at.convert(file, tmp_path / "ours.safetensors", to="safetensors", base=pipe)
    at.convert(tmp_path / "ours.safetensors", tmp_path / "k.safetensors", to="kohya", base=pipe)
    assert load_file(str(tmp_path / "k.safetensors")).keys() == load_file(file).keys()
    adapter.metadata.clear()
    at.save(adapter, tmp_path / "named.safetensors", format="kohya", base=pipe)
    keys = load_file(str(tmp_path / "named.safetensors")).keys()
    assert "lora_te1_text_model_encoder_layers_0_mlp_fc1.lora_down.weight" in keys
    assert "lora_te2_text_model_encoder_layers_0_mlp_fc1.lora_down.weight" in keys


# ----------------------------------------------------------------------------- write

def test_written_file_loads_in_diffusers_as_peft_merge(world, tmp_path):
    """PEFT folder (r 4, alpha 8) -> kohya --base unet/ -> diffusers' own kohya loader + fuse:
    PEFT's merge_and_unload weights bit for bit; alpha written float32 0-d."""
    from peft import LoraConfig, get_peft_model

    model = get_peft_model(kf.unet(), LoraConfig(r=4, lora_alpha=8,
                                                 target_modules=kf.UNET_TARGETS))
    kf.perturb(model, "lora_B", seed=7)
    model.save_pretrained(tmp_path / "peft")
    reference = {k: v.detach().clone() for k, v in model.merge_and_unload().state_dict().items()}
    out = tmp_path / "k.safetensors"
    report = at.convert(tmp_path / "peft", out, to="kohya", base=world["unet"])
    assert report.to == "kohya"
    written = load_file(str(out))
    alpha = written["lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q.alpha"]
    assert alpha.dtype == torch.float32 and alpha.dim() == 0 and float(alpha) == 8.0
    with safe_open(str(out), "pt") as fh:
        assert fh.metadata()["ss_network_dim"] == "4"
    loaded = kf.diffusers_loaded(kf.unet(), out)
    assert assert_same(loaded, reference) == len(loaded)


@pytest.mark.parametrize("which", ["hand", "both"])
def test_round_trip_bit_exact(world, tmp_path, which):
    """kohya -> ours -> kohya: the same tensors (names, dtypes, bits), alpha dtype included
    (float16 by hand, int64 from diffusers' converter), no alpha where there was none."""
    if which == "hand":
        src = kf.hand_file(kf.unet(), tmp_path / "hand.safetensors", dtype=torch.float16)
        base = world["unet"]
    else:
        src, base = world["both"], world["pipe"]
    adapter = at.load(src, base=base)
    at.save(adapter, tmp_path / "back.safetensors", format="kohya")
    before, after = load_file(str(src)), load_file(str(tmp_path / "back.safetensors"))
    assert before.keys() == after.keys()
    for key, tensor in before.items():
        assert after[key].dtype == tensor.dtype and torch.equal(after[key], tensor), key


def test_pipeline_keys_written_without_a_base(world, tmp_path):
    """An adapter keyed by pipeline components (here through our diffusers file) is written
    without --base in sd-scripts' names (lora_unet_, lora_te1_ + text_model_ as transformers 4
    named CLIP's modules) and reads back against the pipeline folder as the same adapter."""
    from adaptertools.adapter import first_difference

    original = at.load(world["both"], base=world["pipe"])
    at.convert(world["both"], tmp_path / "d.safetensors", to="diffusers", base=world["pipe"])
    at.convert(tmp_path / "d.safetensors", tmp_path / "k.safetensors", to="kohya")
    keys = load_file(str(tmp_path / "k.safetensors")).keys()
    assert "lora_te1_text_model_encoder_layers_0_mlp_fc1.lora_down.weight" in keys
    assert "lora_unet_down_blocks_0_resnets_0_conv1.alpha" in keys
    assert first_difference(at.load(tmp_path / "k.safetensors", base=world["pipe"]),
                            original) is None


# ----------------------------------------------------------------------------- bad input

def _file(path, tensors: dict) -> str:
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(path))
    return str(path)


def test_sdxl_file_into_sd15_base_is_refused_by_name(world, tmp_path):
    """sd-scripts' SDXL UNet names (SGM) into a diffusers SD1.5-shaped UNet: the names do not
    map; the error names the key and what it looks made for (diffusers#9291 drops them)."""
    stem = "lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q"
    sdxl = _file(tmp_path / "sdxl.safetensors", {
        f"{stem}.lora_down.weight": torch.ones(4, 32), f"{stem}.lora_up.weight": torch.ones(32, 4),
        f"{stem}.alpha": torch.tensor(4.0)})
    with pytest.raises(FormatError, match=f"{stem} maps to no weight.*SGM.*the names do not "
                       "map.*merge into the original single-file checkpoint"):
        at.load(sdxl, base=world["unet"])
    ldm = _file(tmp_path / "v1-5.safetensors", {  # an SD1.5 checkpoint's own (ldm) names
        "model.diffusion_model.input_blocks.1.1.proj_in.weight": torch.zeros(32, 32, 1, 1)})
    with pytest.raises(FormatError, match="lora_unet_(down|mid|up)_block.* maps to no weight.*"
                       "diffusers-style.*merge into that model's diffusers UNet folder"):
        at.load(world["unet_only"], base=ldm)
    out = tmp_path / "m"
    assert_cli_error(run_cli("merge", str(world["unet"]), sdxl, "--out", str(out)),
                     [stem, "the names do not map"])
    assert_nothing_written(out)


def test_unmapped_foreign_mismatched_and_colliding_keys(world, tmp_path):
    good = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q"
    typo = _file(tmp_path / "typo.safetensors", {
        "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_z.lora_down.weight":
            torch.ones(4, 32),
        "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_z.lora_up.weight":
            torch.ones(32, 4)})
    with pytest.raises(FormatError, match="attn1_to_z maps to no weight.*trained on another"):
        at.load(typo, base=world["unet"])
    foreign = _file(tmp_path / "foreign.safetensors", {
        f"{good}.lora_down.weight": torch.ones(4, 32), f"{good}.lora_up.weight": torch.ones(32, 4),
        "extra.weight": torch.ones(2)})
    with pytest.raises(FormatError, match="extra.weight"):
        at.load(foreign, base=world["unet"])
    wrong = _file(tmp_path / "wrong.safetensors", {
        f"{good}.lora_down.weight": torch.ones(4, 64), f"{good}.lora_up.weight": torch.ones(64, 4)})
    with pytest.raises(FormatError, match=f"{good}.*do not fit this weight.*another model"):
        at.load(wrong, base=world["unet"])
    missing = _file(tmp_path / "missing.safetensors", {f"{good}.lora_down.weight":
                                                       torch.ones(4, 32)})
    with pytest.raises(FormatError, match=f"{good}.lora_up.weight is missing"):
        at.load(missing, base=world["unet"])
    tucker = _file(tmp_path / "tucker.safetensors", {
        f"{good}.lora_down.weight": torch.ones(4, 32), f"{good}.lora_up.weight": torch.ones(32, 4),
        f"{good}.lora_mid.weight": torch.ones(4, 4, 3, 3)})
    with pytest.raises(UnsupportedError, match=f"{good}.*lora_mid.*not supported"):
        at.load(tucker, base=world["unet"])
    clash_base = _file(tmp_path / "clash_base.safetensors", {
        "a.b_c.weight": torch.ones(2, 2), "a_b.c.weight": torch.ones(2, 2)})
    clash = _file(tmp_path / "clash.safetensors", {
        "lora_unet_a_b_c.lora_down.weight": torch.ones(1, 2),
        "lora_unet_a_b_c.lora_up.weight": torch.ones(2, 1)})
    with pytest.raises(FormatError, match="lora_unet_a_b_c names two modules.*a.b_c and a_b.c"):
        at.load(clash, base=clash_base)
    with pytest.raises(FormatError, match="lora_te1_.*takes lora_unet_"):
        at.load(world["both"], base=world["unet"])


def test_no_base_is_refused(world, tmp_path):
    with pytest.raises(OptionError, match="pass --base"):
        at.load(world["both"])
    out = tmp_path / "p"
    assert_cli_error(run_cli("convert", str(world["both"]), "--to", "peft", str(out)),
                     ["pass --base <the model it was trained on>"], code=2)
    assert_nothing_written(out)
