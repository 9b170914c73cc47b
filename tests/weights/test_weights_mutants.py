"""Pins what a mutation audit of klvae.weights (read, identify, infer, convert, load, stored_dtype) found the other
tests let through: which tensors a file's reader returns (the VAE's only, EMA weights of a training checkpoint,
edm extras of a pickled full checkpoint, the byte budget in bytes), the exact message for each kind of non-VAE file,
inferred config fields, file-name family hints, strict loading's WeightsError lines and the stored-dtype counts.
Each test names the mutant(s) it kills; weights come from random-init tiny models saved in the real formats."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

import klvae
from helpers import perturbed_vae
from klvae.errors import WeightsError
from klvae.model.config import MAX_LAYERS, PRESETS
from klvae.weights import detect_layout, diffusers_to_ldm, to_diffusers
from klvae.weights.infer import guess_family, infer_architecture, infer_config, with_edm_stats
from klvae.weights.read import CONFIG_METADATA, read_weights
from klvae.weights.stored_dtype import main_dtype, stored_values

StateDict = dict[str, torch.Tensor]


@pytest.fixture(scope="module")
def vae() -> klvae.AutoencoderKL:
    return perturbed_vae("tiny")


@pytest.fixture(scope="module")
def ldm(vae: klvae.AutoencoderKL) -> StateDict:
    """The tiny VAE's weights in LDM layout, as SD's and FLUX's files spell them."""
    return {k: v.contiguous() for k, v in diffusers_to_ldm(vae.state_dict()).items()}


def _same_weights(a: klvae.AutoencoderKL, b: klvae.AutoencoderKL) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        assert torch.equal(sa[k], sb[k]), k


def _full_checkpoint(ldm: StateDict, **more: torch.Tensor) -> StateDict:
    """An SD-style full checkpoint: the VAE under first_stage_model. beside a UNet and a text encoder."""
    return {"model.diffusion_model.input_blocks.0.0.weight": torch.ones(8, 4, 3, 3),
            "cond_stage_model.transformer.text_model.final_layer_norm.weight": torch.ones(8), **more,
            **{f"first_stage_model.{k}": v for k, v in ldm.items()}}


# ---- read.py -----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("suffix", [".safetensors", ".ckpt"])
def test_a_full_checkpoint_reads_only_its_vae_tensors(ldm: StateDict, tmp_path: Path, suffix: str) -> None:
    """R02: every tensor of a multi-GB checkpoint was read when only the VAE's were needed."""
    full = _full_checkpoint(ldm)
    path = tmp_path / f"full{suffix}"
    save_file(full, str(path)) if suffix == ".safetensors" else torch.save({"state_dict": full}, path)
    raw = read_weights(path)
    assert sorted(raw.tensors) == sorted(f"first_stage_model.{k}" for k in ldm)
    assert all(torch.equal(raw.tensors[f"first_stage_model.{k}"], v) for k, v in ldm.items())
    assert set(raw.keys) == set(full)


def test_the_byte_budget_counts_bytes_not_elements(tmp_path: Path) -> None:
    """R05: an fp32 tensor expanded to more elements than the file has bytes/4 (yet fewer than its bytes)."""
    path = tmp_path / "v.pt"
    torch.save({"encoder.w": torch.zeros(1), "decoder.w": torch.zeros(1)}, path)
    n = path.stat().st_size // 2
    torch.save({"encoder.w": torch.zeros(1).expand(n), "decoder.w": torch.zeros(1)}, path)
    assert n + 1 < path.stat().st_size < 4 * n  # elements fit the file's size, their bytes do not
    with pytest.raises(WeightsError, match=rf"encoder\.w and before\) declare more data than the file's "
                                           rf"{path.stat().st_size} bytes"):
        read_weights(path)


@pytest.mark.parametrize(("make", "what"), [
    (lambda t: torch.empty(t.shape, device="meta"), "a meta tensor (a shape without values)"),
    (lambda t: t.to_sparse(), "a sparse_coo tensor"),
], ids=["meta", "sparse"])
def test_a_pickled_meta_or_sparse_weight_is_refused(vae: klvae.AutoencoderKL, tmp_path: Path, make: object,
                                                    what: str) -> None:
    """Bug fix: weights_only rebuilds both; a meta bias loaded and decoded from uninitialised memory (a silently wrong
    image), a sparse one loaded and failed inside the first convolution."""
    sd = dict(vae.state_dict())
    sd["decoder.conv_in.bias"] = make(sd["decoder.conv_in.bias"])  # type: ignore[operator]
    torch.save(sd, tmp_path / "vae.pt")
    with pytest.raises(WeightsError) as e:
        klvae.AutoencoderKL.from_pretrained(tmp_path / "vae.pt", config="tiny")
    assert str(e.value) == (f"{tmp_path / 'vae.pt'}: decoder.conv_in.bias is {what}, not a stored weight: a file saved "
                            "from a model without its weights, or a damaged one")


def _training_checkpoint(vae: klvae.AutoencoderKL, ema: StateDict, **more: object) -> dict[str, object]:
    """klvae's Trainer.state_dict(): the model's weights, the optimiser's, the step and the EMA (AveragedModel)."""
    return {"vae": vae.state_dict(), "opt_ae": {}, "step": 7,
            "ema": {"n_averaged": torch.tensor(3), **{f"module.{k}": v for k, v in ema.items()}}, **more}


@pytest.mark.parametrize("config", [None, '{"train": {}}'])
def test_a_training_checkpoint_without_export_ema_gives_the_ema_weights(vae: klvae.AutoencoderKL, tmp_path: Path,
                                                                        config: str | None) -> None:
    """R08 (export_ema's default) and R09 (n_averaged among the weights): the EMA's keys only, the EMA's values."""
    ema = {k: v + 1 for k, v in vae.state_dict().items()}
    more = {} if config is None else {"config": config}
    torch.save(_training_checkpoint(vae, ema, **more), tmp_path / "step.pt")
    raw = read_weights(tmp_path / "step.pt")
    assert raw.tensors.keys() == ema.keys()
    assert all(torch.equal(raw.tensors[k], v) for k, v in ema.items())


def test_a_training_checkpoint_exporting_the_raw_weights_gives_them(vae: klvae.AutoencoderKL, tmp_path: Path) -> None:
    ema = {k: v + 1 for k, v in vae.state_dict().items()}
    torch.save(_training_checkpoint(vae, ema, config='{"train": {"export_ema": false}}'), tmp_path / "step.pt")
    raw = read_weights(tmp_path / "step.pt")
    assert all(torch.equal(raw.tensors[k], v) for k, v in vae.state_dict().items())


def test_non_tensor_values_beside_a_pickled_vae_are_ignored(vae: klvae.AutoencoderKL, ldm: StateDict,
                                                            tmp_path: Path) -> None:
    """R12: an int or a string in a lone .pt went to the tensor copies (a TypeError, not a load)."""
    torch.save({**ldm, "epoch": 3, "note": "fine-tuned"}, tmp_path / "vae.pt")
    raw = read_weights(tmp_path / "vae.pt")
    assert sorted(raw.tensors) == sorted(ldm) and {"epoch", "note"} <= set(raw.keys)
    _same_weights(klvae.AutoencoderKL.from_pretrained(tmp_path / "vae.pt", config="tiny"), vae)


def test_a_pickled_playground_checkpoint_gets_its_edm_statistics(ldm: StateDict, tmp_path: Path) -> None:
    """R13: edm_mean/edm_std beside a .ckpt's VAE (the safetensors case has its own test)."""
    mean, std = torch.tensor([-1.5, 1.75, -1.25, 2.5]), torch.tensor([8.5, 6.0, 6.5, 5.25])
    full = _full_checkpoint(ldm, edm_mean=mean.view(1, 4, 1, 1), edm_std=std.view(1, 4, 1, 1))
    full["conditioner.embedders.0.x"] = torch.zeros(1)
    torch.save({"state_dict": full}, tmp_path / "playground.ckpt")
    cfg = klvae.AutoencoderKL.from_pretrained(tmp_path / "playground.ckpt").config
    assert (cfg.scaling_factor, cfg.shift_factor) == (0.5, None)
    assert cfg.latents_mean == tuple(mean.tolist()) and cfg.latents_std == tuple(std.tolist())


@pytest.mark.parametrize("name", ["empty.safetensors", "empty.pt"])
def test_a_file_without_tensors_says_so(tmp_path: Path, name: str) -> None:
    """R15: it read as "holds no VAE weights: none of its keys start with encoder." instead."""
    path = tmp_path / name
    save_file({}, str(path)) if name.endswith(".safetensors") else torch.save({"epoch": 1}, path)
    with pytest.raises(WeightsError) as e:
        klvae.AutoencoderKL.from_pretrained(path)
    assert str(e.value) == f"{path} holds no tensors"


# ---- convert.py --------------------------------------------------------------------------------------------------
class _DataParallelLike(torch.nn.Module):
    """DistributedDataParallel's naming (the model as .module) without a process group."""

    def __init__(self, module: torch.nn.Module) -> None:
        super().__init__()
        self.module = module


@pytest.mark.parametrize("order", ["compile(ddp(model))", "ddp(compile(model))"])
def test_weights_saved_from_a_compiled_ddp_model_load_in_either_wrapping_order(vae: klvae.AutoencoderKL,
                                                                               tmp_path: Path, order: str) -> None:
    """Bug fix: _orig_mod.module.* (torch.compile of a DDP model, the order PyTorch's DDP notes show) kept its
    module. prefix and read as "holds no VAE weights"; only module._orig_mod.* loaded."""
    wrapped = (torch.compile(_DataParallelLike(vae)) if order.startswith("compile")
               else _DataParallelLike(torch.compile(vae)))
    sd = wrapped.state_dict()
    assert next(iter(sd)).startswith("_orig_mod.module." if order.startswith("compile") else "module._orig_mod.")
    save_file({k: v.contiguous() for k, v in sd.items()}, str(tmp_path / "trained.safetensors"))
    _same_weights(klvae.AutoencoderKL.from_pretrained(tmp_path / "trained.safetensors", config="tiny"), vae)


def test_a_stray_wrapper_named_key_is_named_as_stored_not_a_prefix_to_strip(vae: klvae.AutoencoderKL,
                                                                          tmp_path: Path) -> None:
    """C05: one module.* key among the VAE's is no DDP wrapper: stripping 7 characters off every key made the file
    "hold no VAE weights" instead of strict loading naming the stray key."""
    sd = {**vae.state_dict(), "module.head.weight": torch.zeros(2)}
    save_file({k: v.contiguous() for k, v in sd.items()}, str(tmp_path / "w.safetensors"))
    with pytest.raises(WeightsError, match=r": 1 unexpected keys: module\.head\.weight$"):
        klvae.AutoencoderKL.from_pretrained(tmp_path / "w.safetensors", config="tiny")


@pytest.mark.parametrize("half", ["encoder.", "decoder."])
def test_one_ldm_half_is_detected_and_renamed_as_ldm(ldm: StateDict, half: str) -> None:
    """C01: the public converters on an LDM encoder or decoder alone (the LDM signature looked at the encoder's)."""
    sd = {k: v for k, v in ldm.items() if k.startswith(half)}
    assert detect_layout(sd) == "ldm"
    out = to_diffusers(sd)
    want = "decoder.up_blocks.1.resnets.0.conv1.weight" if half == "decoder." else "encoder.conv_norm_out.weight"
    src = "decoder.up.0.block.0.conv1.weight" if half == "decoder." else "encoder.norm_out.weight"
    assert torch.equal(out[want], sd[src])


@pytest.mark.parametrize("name", ["query", "key", "value", "proj_attn"])
def test_each_legacy_attention_name_marks_the_legacy_layout(vae: klvae.AutoencoderKL, name: str) -> None:
    """C02: diffusers < 0.14's names, each one enough to tell the layout (and renamed by it)."""
    sd = {k: v for k, v in vae.state_dict().items() if ".attentions." not in k}
    sd[f"encoder.mid_block.attentions.0.{name}.weight"] = torch.ones(64, 64, 1, 1)
    assert detect_layout(sd) == "diffusers_legacy"
    new = {"query": "to_q", "key": "to_k", "value": "to_v", "proj_attn": "to_out.0"}[name]
    assert to_diffusers(sd)[f"encoder.mid_block.attentions.0.{new}.weight"].shape == (64, 64)


# ---- identify.py -------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("key", ["model.diffusion_model.out.0.weight", "time_embedding.linear_1.weight",
                                 "time_embed.0.weight", "double_blocks.0.img_attn.qkv.weight",
                                 "joint_blocks.0.x_block.attn.qkv.weight", "transformer_blocks.0.attn.to_q.weight",
                                 "input_blocks.0.0.weight"])
def test_each_diffusion_model_key_names_the_file_a_diffusion_model(key: str, tmp_path: Path) -> None:
    """I01: each hint alone (a diffusers transformer has only transformer_blocks.*, a bare UNet input_blocks.*)."""
    save_file({key: torch.zeros(2, 2), "proj_out.weight": torch.zeros(2, 2)}, str(tmp_path / "m.safetensors"))
    with pytest.raises(WeightsError, match=r"m\.safetensors holds a diffusion model \(UNet or transformer: .*"
                                           r"and no VAE: load the VAE's own file"):
        klvae.AutoencoderKL.from_pretrained(tmp_path / "m.safetensors")


@pytest.mark.parametrize("half", ["decoder", "encoder"])
def test_one_half_of_taesd_is_named_taesd(half: str, tmp_path: Path) -> None:
    """I02: diffusers' AutoencoderTiny split in two (taesd_decoder as encoder/decoder.layers.N): a TAESD file, not
    "only a VAE decoder"."""
    keys = {f"{half}.layers.0.weight": torch.zeros(8, 4, 3, 3), f"{half}.layers.2.conv.0.weight": torch.zeros(8, 8)}
    save_file(keys, str(tmp_path / "taesd_half.safetensors"))
    with pytest.raises(WeightsError, match=r"taesd_half\.safetensors is a TAESD \(tiny autoencoder\) file"):
        klvae.AutoencoderKL.from_pretrained(tmp_path / "taesd_half.safetensors")


def test_a_partly_numbered_network_is_no_vae_not_a_bare_numbered_one(tmp_path: Path) -> None:
    """I03: one numbered key (an nn.Sequential inside some other model) does not make the file TAESD-like."""
    save_file({"0.weight": torch.zeros(2), "head.weight": torch.zeros(2)}, str(tmp_path / "clf.safetensors"))
    with pytest.raises(WeightsError) as e:
        klvae.AutoencoderKL.from_pretrained(tmp_path / "clf.safetensors")
    assert str(e.value) == (f"{tmp_path / 'clf.safetensors'} holds no VAE weights: none of its keys start with "
                            "encoder. or decoder. (first keys: 0.weight, head.weight)")


@pytest.mark.parametrize("half", ["decoder.", "encoder."])
def test_a_lone_half_counts_its_own_quant_conv(ldm: StateDict, tmp_path: Path, half: str) -> None:
    """I04: a lone decoder's count takes in post_quant_conv.*, a lone encoder's quant_conv.*, not the other's."""
    conv = "post_quant_conv." if half == "decoder." else "quant_conv."
    sd = {k: v for k, v in ldm.items() if k.startswith((half, conv))}
    n = len(sd)
    assert n > sum(k.startswith(half) for k in sd)
    save_file(sd, str(tmp_path / "half.safetensors"))
    with pytest.raises(WeightsError, match=rf"holds only a VAE {half[:-1]} \({n} tensors under {half}\*, none of"):
        klvae.AutoencoderKL.from_pretrained(tmp_path / "half.safetensors")


# ---- infer.py ----------------------------------------------------------------------------------------------------
def _meta_state_dict(**changes: object) -> StateDict:
    """The tiny preset's (with `changes`) tensors on the meta device: shapes only, no memory."""
    with torch.device("meta"):
        return klvae.AutoencoderKL(PRESETS["tiny"].replace(**changes)).state_dict()


@pytest.mark.parametrize(("quant", "post_quant"), [(True, False), (False, True)])
def test_each_quant_conv_is_inferred_from_its_own_weight(quant: bool, post_quant: bool) -> None:
    """N06: use_post_quant_conv was read off quant_conv.weight (every preset has both or neither)."""
    cfg = infer_config(_meta_state_dict(use_quant_conv=quant, use_post_quant_conv=post_quant))
    assert (cfg.use_quant_conv, cfg.use_post_quant_conv) == (quant, post_quant)


def test_the_most_blocks_a_config_allows_are_inferred() -> None:
    """N10: MAX_LAYERS ResNet blocks per level (MAX_LAYERS + 1 in the decoder) are allowed, one more is not."""
    sd = _meta_state_dict(layers_per_block=MAX_LAYERS)
    assert infer_architecture(sd)["layers_per_block"] == MAX_LAYERS
    sd[f"encoder.down_blocks.0.resnets.{MAX_LAYERS}.conv1.weight"] = torch.zeros(1)
    with pytest.raises(WeightsError, match=rf"{MAX_LAYERS + 1} encoder\.down_blocks\.0\.resnets\.\* in the weights, "
                                           rf"more than any VAE has \(at most {MAX_LAYERS}\)"):
        infer_architecture(sd)


def test_a_decoder_with_other_blocks_or_attention_than_the_encoder_is_refused() -> None:
    """N04, N05: the decoder's block count (layers + 1) and attention are checked against the encoder's."""
    sd = _meta_state_dict()
    more = {**sd, "decoder.up_blocks.0.resnets.2.conv1.weight": torch.zeros(1)}
    with pytest.raises(WeightsError, match=r"^unsupported weights: 1 ResNet blocks per encoder level but 3 per "
                                           r"decoder level \(expected 2\)$"):
        infer_architecture(more)
    no_attn = {k: v for k, v in sd.items() if not k.startswith("decoder.mid_block.attentions.")}
    with pytest.raises(WeightsError, match=r"^unsupported weights: encoder attention 'vanilla', decoder 'none'$"):
        infer_architecture(no_attn)


def test_a_name_hint_whose_latent_channels_do_not_fit_is_ignored(tmp_path: Path) -> None:
    """N11: a 16-channel VAE named sdxl_vae got SDXL's 0.13025; its channels say FLUX.1's factors instead."""
    v = perturbed_vae("tiny", latent_channels=16, use_quant_conv=False, use_post_quant_conv=False)
    save_file({k: t.contiguous() for k, t in diffusers_to_ldm(v.state_dict()).items()},
              str(tmp_path / "sdxl_vae.safetensors"))
    cfg = klvae.AutoencoderKL.from_pretrained(tmp_path / "sdxl_vae.safetensors").config
    assert (cfg.scaling_factor, cfg.shift_factor) == (0.3611, 0.1159)


def test_a_bundle_with_bare_flux_transformer_keys_is_flux(ldm: StateDict, tmp_path: Path,
                                                         caplog: pytest.LogCaptureFixture) -> None:
    """N18: double_blocks.* without model.diffusion_model. names FLUX: its factors are no guess (no warning)."""
    assert guess_family(["double_blocks.0.img_attn.qkv.weight", "vae.encoder.conv_in.weight"]) == "flux"
    v = perturbed_vae("tiny", latent_channels=16, use_quant_conv=False, use_post_quant_conv=False)
    sd = {f"vae.{k}": t.contiguous() for k, t in diffusers_to_ldm(v.state_dict()).items()}
    save_file({**sd, "double_blocks.0.img_attn.qkv.weight": torch.zeros(2)}, str(tmp_path / "bundle.safetensors"))
    with caplog.at_level("WARNING"):
        cfg = klvae.AutoencoderKL.from_pretrained(tmp_path / "bundle.safetensors").config
    assert (cfg.scaling_factor, cfg.shift_factor) == (0.3611, 0.1159)
    assert "guessed" not in caplog.text


def test_a_config_without_the_weights_post_quant_conv_is_named_as_that_field(vae: klvae.AutoencoderKL,
                                                                             tmp_path: Path) -> None:
    """N19: every ARCH_FIELDS difference is named by check_fits, not left to strict loading's key list."""
    save_file({k: v.contiguous() for k, v in vae.state_dict().items()}, str(tmp_path / "w.safetensors"))
    with pytest.raises(WeightsError) as e:
        klvae.AutoencoderKL.from_pretrained(tmp_path / "w.safetensors",
                                            config=PRESETS["tiny"].replace(use_post_quant_conv=False))
    assert str(e.value) == ("the weights do not fit config (the one passed): use_post_quant_conv True in the weights "
                            "vs False in the config")


def test_edm_statistics_of_unequal_lengths_are_ignored_with_a_warning(caplog: pytest.LogCaptureFixture) -> None:
    """N20: an edm_std shorter than edm_mean (which fits the latent channels) is no statistic to build from."""
    cfg = PRESETS["tiny"]
    extras = {"edm_mean": torch.zeros(1, 4, 1, 1), "edm_std": torch.ones(1, 3, 1, 1)}
    with caplog.at_level("WARNING"):
        assert with_edm_stats(cfg, extras, "p.ckpt") is cfg
    assert "p.ckpt: edm_mean/edm_std have 4/3 entries, not one per latent channel (4): ignored" in caplog.text


# ---- load.py -----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(("hint", "factors"), [("conditioner.embedders.0.x", (0.13025, None)),
                                               ("model.diffusion_model.joint_blocks.0.x", (1.5305, 0.0609))])
def test_a_full_checkpoints_other_keys_name_the_family_whatever_the_files_name(
    hint: str, factors: tuple[float, float | None], tmp_path: Path
) -> None:
    """L06: the family comes from the keys beside the VAE (all of the file's), not the VAE's own nor the name."""
    channels = 16 if "joint" in hint else 4
    v = perturbed_vae("tiny", latent_channels=channels, use_quant_conv=channels == 4,
                      use_post_quant_conv=channels == 4)
    full = {hint: torch.zeros(1), **{f"first_stage_model.{k}": t.contiguous()
                                     for k, t in diffusers_to_ldm(v.state_dict()).items()}}
    save_file(full, str(tmp_path / "model.safetensors"))
    cfg = klvae.AutoencoderKL.from_pretrained(tmp_path / "model.safetensors").config
    assert (cfg.scaling_factor, cfg.shift_factor) == factors


def test_a_config_in_the_header_that_does_not_fit_names_the_field(ldm: StateDict, tmp_path: Path) -> None:
    """L08: klvae's own header config is checked against the shapes like any other config."""
    wrong = PRESETS["tiny"].replace(block_out_channels=(32, 32))
    save_file(ldm, str(tmp_path / "w.safetensors"), metadata={CONFIG_METADATA: json.dumps(wrong.to_dict())})
    with pytest.raises(WeightsError) as e:
        klvae.AutoencoderKL.from_pretrained(tmp_path / "w.safetensors")
    assert str(e.value) == ("the weights do not fit config stored in w.safetensors: block_out_channels "
                            "[32, 64] in the weights vs [32, 32] in the config")


# ---- stored_dtype.py ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["vae.safetensors", "vae.pt"])
def test_integer_tensors_are_no_stored_weight_dtype(ldm: StateDict, tmp_path: Path, name: str) -> None:
    """S02, S03: an int64 buffer (a BatchNorm's counter, position ids) is counted in neither format, however large."""
    half = {k: v.half() for k, v in ldm.items()}
    n = sum(v.numel() for v in half.values())
    sd = {**half, "encoder.position_ids": torch.arange(2 * n)}
    save_file(sd, str(tmp_path / name)) if name.endswith(".safetensors") else torch.save(sd, tmp_path / name)
    assert stored_values(tmp_path / name) == Counter({"fp16": n})
    assert main_dtype(tmp_path / name) == "fp16"
