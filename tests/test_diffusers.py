"""diffusers LoRA files (formats/diffusers.py) and merges into diffusers folders
(merging/pipeline.py), against diffusers 0.42 itself on tiny models built in code.

The files are diffusers' own: adapters made with PEFT's LoraConfig on a tiny UNet2DConditionModel
(attention Linears and 1x1 / 3x3 Conv2d), a tiny CLIPTextModel and a tiny FluxTransformer2DModel,
saved with StableDiffusionPipeline / FluxPipeline.save_lora_weights (and ModelMixin's
save_lora_adapter). References: diffusers' load_lora_adapter + fuse_lora for the UNet and the
Flux transformer, diffusers' fuse_text_encoder_lora for the text encoder. The fold is plain torch
in fp32 on both sides (W + (B @ A) * scale, PEFT's DoRA and conv rules), so merged tensors must be
bit-identical, and a file we write, loaded by diffusers, must give bit-identical model outputs.
"""

from __future__ import annotations

import json
import math
from types import SimpleNamespace

import pytest
import torch
from helpers.cli import assert_cli_error, assert_nothing_written, run_cli
from helpers.diffusers_models import (
    SCHEDULER,
    add_flux_lora,
    add_te_lora,
    add_unet_lora,
    flux_inputs,
    fused_by_diffusers,
    fused_text_encoder,
    load_lora_weights,
    loaded_by_diffusers,
    output_of,
    save_flux_lora,
    save_pipeline,
    save_sd_lora,
    tiny_flux,
    tiny_text_encoder,
    tiny_unet,
    unet_inputs,
)
from safetensors import safe_open
from safetensors.torch import load_file, save_file

import adaptertools as at
from adaptertools.errors import AdapterToolsWarning, FormatError, OptionError
from adaptertools.formats import diffusers as fmt
from adaptertools.merging import pipeline
from adaptertools.registry import detect_format

UNET_FILE = "diffusion_pytorch_model.safetensors"


@pytest.fixture(scope="module")
def sd(tmp_path_factory):
    """A pipeline folder (unet, text_encoder, scheduler) and a unet + text_encoder LoRA saved
    by StableDiffusionPipeline.save_lora_weights, with metadata (r 4, alpha 8)."""
    root = tmp_path_factory.mktemp("sd")
    pipe = save_pipeline(root / "pipe", {"unet": tiny_unet(), "text_encoder": tiny_text_encoder()},
                         extra_files=SCHEDULER)
    unet, te = add_unet_lora(tiny_unet()), add_te_lora(tiny_text_encoder())
    lora = save_sd_lora(root / "lora", unet, te)
    return SimpleNamespace(root=root, pipe=pipe, unet=unet, te=te, lora=lora)


def _tensors(path):
    with safe_open(str(path), "pt") as fh:
        names = list(fh.keys())
        return {k: fh.get_tensor(k) for k in names}, fh.metadata()


def _assert_same(reference: dict, ours: dict) -> None:
    assert reference.keys() == ours.keys()
    differ = [k for k in reference if reference[k].dtype != ours[k].dtype
              or not torch.equal(reference[k], ours[k])]
    assert differ == [], f"{len(differ)} tensors differ, e.g. {differ[:3]}"


def _assert_same_config(ours: dict, reference: dict) -> None:
    """The same LoraConfig fields in lora_adapter_metadata; a field that is null on one side
    may be absent on the other (LoraConfig's default for it is None)."""
    def fields(metadata):
        return {k: v for k, v in json.loads(metadata[fmt.METADATA_KEY]).items() if v is not None}

    assert fields(ours) == fields(reference)


# ----------------------------------------------------------------------------- read

def test_reads_diffusers_file(sd):
    tensors, _ = _tensors(sd.lora)
    assert detect_format(sd.lora).name == "diffusers"
    assert detect_format(sd.lora.parent).name == "diffusers"
    adapter = at.load(sd.lora)
    # every tensor placed: one LoRA per lora_A key, under its component
    assert len(adapter.weights) == sum(k.endswith("lora_A.weight") for k in tensors) == 52
    assert {n.split(".", 1)[0] for n in adapter.weights} == {"unet", "text_encoder"}
    assert {w.scale for w in adapter.weights.values()} == {2.0}          # alpha 8 / r 4
    conv = adapter.weights["unet.down_blocks.0.resnets.0.conv1.weight"]
    assert conv.layer == "conv" and conv.weight_shape == (32, 32, 3, 3)
    folder = at.load(sd.lora.parent)
    assert sorted(folder.weights) == sorted(adapter.weights)
    parts = pipeline.split_by_component(adapter)
    assert sorted(parts) == ["text_encoder", "unet"]
    assert "encoder.layers.0.self_attn.q_proj.weight" in parts["text_encoder"].weights
    report = json.loads(run_cli("inspect", sd.lora, "--json", expect=0).stdout)
    assert report["format"] == "diffusers"
    assert report["storage"]["components"] == ["text_encoder", "unet"]
    assert report["storage"]["unet.r"] == 4 and report["storage"]["unet.lora_alpha"] == 8


def test_own_safetensors_file_is_not_diffusers(sd, tmp_path):
    at.convert(sd.lora, tmp_path / "own.safetensors", to="safetensors")
    assert detect_format(tmp_path / "own.safetensors").name == "safetensors"


# ----------------------------------------------------------------------------- merge

def test_merge_pipeline_bit_identical_to_fuse_lora(sd, tmp_path):
    out = tmp_path / "merged"
    report = json.loads(run_cli("merge", sd.pipe, sd.lora, "--out", out, "--json",
                                expect=0).stdout)
    assert report["components"]["unet"]["merged"] == 44
    assert report["components"]["text_encoder"]["merged"] == 8
    assert report["components"]["scheduler"] == {"copied": 1}
    assert report["components"]["model_index.json"] == {"copied": 1}
    _assert_same(fused_by_diffusers(tiny_unet(), sd.lora, "unet"),
                 load_file(out / "unet" / UNET_FILE))
    _assert_same(fused_text_encoder(sd.te), load_file(out / "text_encoder" / "model.safetensors"))
    for rel in ("model_index.json", "scheduler/scheduler_config.json", "unet/config.json",
                "text_encoder/config.json"):
        assert (out / rel).read_bytes() == (sd.pipe / rel).read_bytes(), rel
    # the validator checks each component: every tensor, merged or untouched
    checked = json.loads(run_cli("validate", sd.pipe, sd.lora, "--merged", out, "--json",
                                 expect=0).stdout)
    assert checked["passed"] and (checked["adapted"], checked["checked"]) == (52, 244)
    assert any(r["name"].startswith("text_encoder.") for r in checked["tensors"])
    tampered = load_file(out / "text_encoder" / "model.safetensors")
    name = "encoder.layers.1.self_attn.q_proj.weight"
    tampered[name] = tampered[name] * 1.01
    save_file(tampered, out / "text_encoder" / "model.safetensors")
    report = at.validate(sd.pipe, [sd.lora], out)
    assert not report.passed and [r["name"] for r in report.tensors if not r["passed"]] == \
        [f"text_encoder.{name}"]
    # --force replaces a pipeline folder (component subfolders and all)
    (out / "unet" / UNET_FILE).write_bytes(b"stale")
    run_cli("merge", sd.pipe, sd.lora, "--out", out, "--force", expect=0)
    assert load_file(out / "unet" / UNET_FILE).keys() == load_file(
        sd.pipe / "unet" / UNET_FILE).keys()


@pytest.mark.parametrize("extra", [
    {"rank_pattern": {"to_q": 2}, "alpha_pattern": {"conv1": 3}, "use_rslora": True},
    {"use_dora": True},
    {"lora_bias": True, "init_lora_weights": True, "targets": ["proj_in", "conv1", "to_out.0"]}],
    ids=["patterns-rslora", "dora", "lora-bias"])
def test_merge_scale_rules_and_dora(extra, tmp_path):
    """PEFT's per-module rank / alpha patterns and rsLoRA from the metadata, DoRA and
    lora_bias (Linear and Conv2d; lora_bias on layers that have a bias): bit-identical to
    fuse_lora."""
    pipe = save_pipeline(tmp_path / "pipe", {"unet": tiny_unet()})
    lora = save_sd_lora(tmp_path / "lora", add_unet_lora(tiny_unet(), **extra))
    scales = {w.scale for w in at.load(lora).weights.values()}
    # rsLoRA: alpha / sqrt(r): 8 / 2, to_q 8 / sqrt(2), conv1 3 / 2
    assert scales == ({4.0, 8 / math.sqrt(2), 1.5} if "use_rslora" in extra else {2.0})
    at.merge(pipe, [lora], tmp_path / "out")
    _assert_same(fused_by_diffusers(tiny_unet(), lora, "unet"),
                 load_file(tmp_path / "out" / "unet" / UNET_FILE))
    # diffusers -> our own file -> diffusers: every tensor (conv DoRA magnitudes (1, out, 1, 1),
    # lora_B.bias) bit-exact, and the same scales rebuilt from the metadata we wrote
    at.convert(lora, tmp_path / "own.safetensors", to="safetensors")
    at.convert(tmp_path / "own.safetensors", tmp_path / "back", to="diffusers")
    _assert_same(_tensors(lora)[0], _tensors(tmp_path / "back" / fmt.WEIGHTS_NAME)[0])
    assert {w.scale for w in at.load(tmp_path / "back").weights.values()} == scales


def test_two_adapters_weighted(sd, tmp_path):
    """Two LoRAs with weights 0.7 / 0.3: stacked is bit-identical to diffusers' fuse_lora of
    both after set_adapters([a, b], [0.7, 0.3]) (PEFT merges one adapter after the other);
    weighted sums both deltas in fp32 and rounds once, so it differs from that by the
    rounding of the intermediate t = fl(W + d_a) and the two final roundings (1.5 ulp of
    max(|t|, |W'|)), plus the deltas' own products summed in another order (k-term fp32 dot
    products, k = r <= 4: within r eps32 max|d|, and |d| < |W'| here): bound 4 eps32 max|W'|
    per tensor, measured 1.8e-7 (2.5 eps32 max|W'|, a 3x3 conv).
    The text encoder gets adapter a's LoRA alone, at its weight."""
    b = save_sd_lora(tmp_path / "b", add_unet_lora(tiny_unet(), seed=2, r=2, lora_alpha=3))
    for mode in ("weighted", "stacked"):
        at.merge(sd.pipe, [sd.lora, b], tmp_path / mode, weights=[0.7, 0.3], mode=mode)
    unet = tiny_unet()
    for name, lora in (("a", sd.lora), ("b", b)):
        unet.load_lora_adapter(str(lora.parent), weight_name=lora.name, prefix="unet",
                               adapter_name=name)
    unet.set_adapters(["a", "b"], [0.7, 0.3])
    unet.fuse_lora(adapter_names=["a", "b"])
    unet.unload_lora()
    reference = unet.state_dict()
    _assert_same(reference, load_file(tmp_path / "stacked" / "unet" / UNET_FILE))
    weighted = load_file(tmp_path / "weighted" / "unet" / UNET_FILE)
    eps = torch.finfo(torch.float32).eps
    for name, tensor in weighted.items():
        bound = 4 * eps * reference[name].abs().max()
        assert (tensor - reference[name]).abs().max() <= bound, name
    alone = tmp_path / "alone"
    at.merge(sd.pipe, [sd.lora], alone, weights=[0.7])
    _assert_same(load_file(alone / "text_encoder" / "model.safetensors"),
                 load_file(tmp_path / "weighted" / "text_encoder" / "model.safetensors"))


def test_weight_variants_are_left_out_with_a_warning(sd, tmp_path):
    """unet/ with diffusion_pytorch_model.fp16.safetensors beside the fp32 file: the fp32 one
    is merged; the variant (unmerged weights) is not copied, and the report says so."""
    pipe = save_pipeline(tmp_path / "pipe", {"unet": tiny_unet()})
    tiny_unet().half().save_pretrained(pipe / "unet", variant="fp16")
    lora = save_sd_lora(tmp_path / "lora", sd.unet)
    report = at.merge(pipe, [lora], tmp_path / "out")
    assert any("diffusion_pytorch_model.fp16.safetensors not merged" in w
               for w in report.warnings)
    assert sorted(p.name for p in (tmp_path / "out" / "unet").iterdir()) == \
        ["config.json", UNET_FILE]
    _assert_same(fused_by_diffusers(tiny_unet(), lora, "unet"),
                 load_file(tmp_path / "out" / "unet" / UNET_FILE))


def test_sdxl_text_encoder_2(sd, tmp_path):
    """StableDiffusionXLPipeline.save_lora_weights' text_encoder_2 part: merged into that
    component as fuse_text_encoder_lora, text_encoder/ copied byte for byte."""
    from diffusers import StableDiffusionXLPipeline
    from helpers.diffusers_models import adapter_metadata, lora_layers

    te2 = add_te_lora(tiny_text_encoder(seed=4), seed=7)
    StableDiffusionXLPipeline.save_lora_weights(
        tmp_path / "lora", text_encoder_2_lora_layers=lora_layers(te2),
        text_encoder_2_lora_adapter_metadata=adapter_metadata(te2))
    pipe = save_pipeline(tmp_path / "pipe", {"text_encoder": tiny_text_encoder(),
                                             "text_encoder_2": tiny_text_encoder(seed=4)})
    report = at.merge(pipe, [tmp_path / "lora"], tmp_path / "out")
    assert report.components["text_encoder_2"]["merged"] == 8
    assert report.components["text_encoder"] == {"copied": 2}
    _assert_same(fused_text_encoder(te2),
                 load_file(tmp_path / "out" / "text_encoder_2" / "model.safetensors"))
    assert (tmp_path / "out" / "text_encoder" / "model.safetensors").read_bytes() == \
        (pipe / "text_encoder" / "model.safetensors").read_bytes()


def test_text_model_prefix_of_older_checkpoints(sd, tmp_path):
    """A text encoder saved by transformers 4 names its tensors text_model.encoder...;
    transformers 5 (which trained this LoRA) dropped that prefix: the names still meet, and
    the merged file keeps the checkpoint's own names."""
    pipe = save_pipeline(tmp_path / "pipe", {"text_encoder": tiny_text_encoder()})
    weights = pipe / "text_encoder" / "model.safetensors"
    save_file({f"text_model.{k}": v for k, v in load_file(weights).items()}, weights,
              metadata={"format": "pt"})
    at.merge(pipe, [save_sd_lora(tmp_path / "lora", text_encoder=sd.te)], tmp_path / "out")
    fused = {f"text_model.{k}": v for k, v in fused_text_encoder(sd.te).items()}
    _assert_same(fused, load_file(tmp_path / "out" / "text_encoder" / "model.safetensors"))


def test_merge_flux_transformer_sharded(tmp_path):
    """A Flux transformer saved in shards (diffusion_pytorch_model-0000N-of-0000M.safetensors
    + diffusion_pytorch_model.safetensors.index.json, as large DiTs are): merged shard by
    shard, the index kept byte for byte, diffusers loads the result as fuse_lora's weights."""
    from diffusers import FluxTransformer2DModel

    pipe = save_pipeline(tmp_path / "pipe", {"transformer": tiny_flux()}, extra_files=SCHEDULER,
                         max_shard_size="20KB")
    index = pipe / "transformer" / "diffusion_pytorch_model.safetensors.index.json"
    assert index.is_file() and len(list(index.parent.glob("diffusion_pytorch_model-*"))) > 1
    lora = save_flux_lora(tmp_path / "lora", add_flux_lora(tiny_flux()))
    plan = at.merge(pipe, [lora], tmp_path / "out", dry_run=True)
    assert plan.components["transformer"]["merged"] == 8 and not (tmp_path / "out").exists()
    report = at.merge(pipe, [lora], tmp_path / "out")
    assert report.components == plan.components | {"scheduler": {"copied": 1},
                                                    "model_index.json": {"copied": 1}}
    out = tmp_path / "out" / "transformer"
    assert (out / index.name).read_bytes() == index.read_bytes()
    merged = FluxTransformer2DModel.from_pretrained(out)
    _assert_same(fused_by_diffusers(tiny_flux(), lora, "transformer"), merged.state_dict())
    again = at.merge(pipe, [lora], tmp_path / "checked", validate=True)
    assert again.validation["passed"] and again.validation["adapted"] == 8
    assert (tmp_path / "checked" / "validation.json").is_file()
    # a single-file transformer resharded by --max-shard-size: diffusers' index name
    single = save_pipeline(tmp_path / "single", {"transformer": tiny_flux()})
    at.merge(single, [lora], tmp_path / "resharded", max_shard_size="20KB")
    out = tmp_path / "resharded" / "transformer"
    assert (out / index.name).is_file() and not (out / UNET_FILE).exists()
    merged = FluxTransformer2DModel.from_pretrained(out)
    _assert_same(fused_by_diffusers(tiny_flux(), lora, "transformer"), merged.state_dict())


def test_merge_into_one_component_folder(sd, tmp_path):
    """A UNet-only LoRA merged into ``unet/`` itself: the ``unet.`` prefix is dropped."""
    lora = save_sd_lora(tmp_path / "lora", sd.unet)
    run_cli("merge", sd.pipe / "unet", lora, "--out", tmp_path / "unet", expect=0)
    _assert_same(fused_by_diffusers(tiny_unet(), lora, "unet"),
                 load_file(tmp_path / "unet" / UNET_FILE))
    report = at.validate(sd.pipe / "unet", [lora], tmp_path / "unet")    # names meet there too
    assert report.passed and report.adapted == 44
    # unet + text_encoder into the unet alone: refused, nothing written
    out = tmp_path / "both"
    outcome = run_cli("merge", sd.pipe / "unet", sd.lora, "--out", out)
    assert_cli_error(outcome, ["text_encoder, unet", "model_index.json"])
    assert_nothing_written(out)


def test_merge_without_metadata_as_diffusers(sd, tmp_path):
    """No lora_adapter_metadata: diffusers takes alpha = r (scale 1); so do we, with a warning
    that names the assumption; --scale sets it."""
    lora = save_sd_lora(tmp_path / "lora", sd.unet, metadata=False)
    with pytest.warns(AdapterToolsWarning, match="alpha unknown.*scale 1 assumed"):
        adapter = at.load(lora)
    assert {w.scale for w in adapter.weights.values()} == {1.0}
    assert {w.scale for w in at.load(lora, scale=2.0).weights.values()} == {2.0}
    with pytest.raises(OptionError, match="drop --scale"):
        at.load(sd.lora, scale=2.0)
    pipe = save_pipeline(tmp_path / "pipe", {"unet": tiny_unet()})
    with pytest.warns(AdapterToolsWarning, match="alpha unknown"):
        at.merge(pipe, [lora], tmp_path / "out")
    _assert_same(fused_by_diffusers(tiny_unet(), lora, "unet"),
                 load_file(tmp_path / "out" / "unet" / UNET_FILE))


def test_model_level_file(sd, tmp_path):
    """ModelMixin.save_lora_adapter's file (no prefixes, metadata unprefixed): read with the
    model's own names, merged into its folder as fuse_lora, written back the same way."""
    sd.unet.save_lora_adapter(tmp_path / "lora")
    lora = tmp_path / "lora" / fmt.WEIGHTS_NAME
    adapter = at.load(lora)
    assert "down_blocks.0.attentions.0.proj_in.weight" in adapter.weights
    at.merge(sd.pipe / "unet", [lora], tmp_path / "out")
    _assert_same(fused_by_diffusers(tiny_unet(), lora, None),
                 load_file(tmp_path / "out" / UNET_FILE))
    at.convert(lora, tmp_path / "back", to="diffusers")
    (ref, ref_meta), (ours, our_meta) = _tensors(lora), _tensors(tmp_path / "back" /
                                                                 fmt.WEIGHTS_NAME)
    _assert_same(ref, ours)
    _assert_same_config(our_meta, ref_meta)


# ----------------------------------------------------------------------------- write

def test_written_file_loaded_by_diffusers(sd, tmp_path):
    """diffusers -> our own file (no diffusers metadata left) -> diffusers: diffusers'
    load_lora_adapter gives the original LoRA model's outputs bit for bit, and every tensor of
    the original file comes back bit-exact."""
    own = tmp_path / "own.safetensors"
    at.convert(sd.lora, own, to="safetensors")
    run_cli("convert", own, tmp_path / "back", "--to", "diffusers", expect=0)
    written = tmp_path / "back" / fmt.WEIGHTS_NAME
    model = loaded_by_diffusers(tiny_unet(), written, "unet")
    reference = output_of(sd.unet, unet_inputs())
    assert (reference - output_of(tiny_unet(), unet_inputs())).abs().max() > 0.1   # it acts
    assert torch.equal(output_of(model, unet_inputs()), reference)
    ref_tensors, _ = _tensors(sd.lora)
    _assert_same(ref_tensors, _tensors(written)[0])
    # diffusers' own round trip: the metadata too
    at.convert(sd.lora, tmp_path / "again", to="diffusers")
    tensors, metadata = _tensors(tmp_path / "again" / fmt.WEIGHTS_NAME)
    _assert_same(ref_tensors, tensors)
    _assert_same_config(metadata, _tensors(sd.lora)[1])


def test_written_file_loaded_by_load_lora_weights(sd, tmp_path):
    """The pipeline-level loader (StableDiffusionLoraLoaderMixin.load_lora_weights) on a UNet
    LoRA we wrote from our own file: the original LoRA model's outputs bit for bit."""
    lora = save_sd_lora(tmp_path / "lora", sd.unet)
    at.convert(lora, tmp_path / "own.safetensors", to="safetensors")
    at.convert(tmp_path / "own.safetensors", tmp_path / "back", to="diffusers")
    unet = load_lora_weights(tiny_unet(), tmp_path / "back")
    assert torch.equal(output_of(unet, unet_inputs()), output_of(sd.unet, unet_inputs()))


def test_written_flux_file_loaded_by_diffusers(tmp_path):
    flux = add_flux_lora(tiny_flux(), rank_pattern={"proj_mlp": 2}, alpha_pattern={"to_q": 5})
    lora = save_flux_lora(tmp_path / "lora", flux)
    own = tmp_path / "own.safetensors"
    at.convert(lora, own, to="safetensors")
    at.convert(own, tmp_path / "back", to="diffusers")
    model = loaded_by_diffusers(tiny_flux(), tmp_path / "back" / fmt.WEIGHTS_NAME, "transformer")
    assert torch.equal(output_of(model, flux_inputs()), output_of(flux, flux_inputs()))


def test_peft_folder_written_under_its_component(sd, tmp_path):
    """diffusers -> PEFT: one component's LoRA, its names without the prefix (a pipeline LoRA
    of several components is refused: no PEFT folder holds them); PEFT -> diffusers: names
    without a prefix are placed by their first module (down_blocks: unet)."""
    lora = save_sd_lora(tmp_path / "lora", sd.unet)
    run_cli("convert", lora, tmp_path / "peft", "--to", "peft", expect=0)
    config = json.loads((tmp_path / "peft" / "adapter_config.json").read_text())
    assert not any(m.startswith("unet.") for m in config["target_modules"])
    outcome = run_cli("convert", sd.lora, tmp_path / "both", "--to", "peft")
    assert_cli_error(outcome, ["text_encoder, unet", "--to diffusers"])
    assert_nothing_written(tmp_path / "both")
    at.convert(tmp_path / "peft", tmp_path / "out", to="diffusers")
    written = tmp_path / "out" / fmt.WEIGHTS_NAME
    assert all(k.startswith("unet.") for k in _tensors(written)[0])
    _assert_same(_tensors(lora)[0], _tensors(written)[0])
    model = loaded_by_diffusers(tiny_unet(), written, "unet")
    assert torch.equal(output_of(model, unet_inputs()), output_of(sd.unet, unet_inputs()))


# ----------------------------------------------------------------------------- bad input

def test_unknown_component_prefix_is_refused(sd, tmp_path):
    tensors, metadata = _tensors(sd.lora)
    tensors["vae.encoder.conv_in.lora_A.weight"] = torch.zeros(4, 4, 3, 3)
    bad = tmp_path / "bad" / fmt.WEIGHTS_NAME
    bad.parent.mkdir()
    save_file(tensors, bad, metadata=metadata)
    with pytest.raises(FormatError, match=r"vae\.encoder\.conv_in\.lora_A\.weight"):
        at.load(bad)
    outcome = run_cli("merge", sd.pipe, bad, "--out", tmp_path / "out")
    assert_cli_error(outcome, ["vae.encoder.conv_in.lora_A.weight", "no pipeline component"])
    assert_nothing_written(tmp_path / "out")


def test_unet_lora_into_pipeline_without_unet(sd, tmp_path):
    pipe = save_pipeline(tmp_path / "pipe", {"transformer": tiny_flux()}, extra_files=SCHEDULER)
    lora = save_sd_lora(tmp_path / "lora", sd.unet)
    out = tmp_path / "out"
    outcome = run_cli("merge", pipe, lora, "--out", out)
    assert_cli_error(outcome, ["unet.down_blocks", "no unet/ component",
                               "lists scheduler, transformer"])
    assert_nothing_written(out)
