"""The weight files a ComfyUI / A1111 user has on disk, made from random-init models in the real key layouts:
Lightning-era .ckpt files, Playground v2.5 full checkpoints, lone VAE files named after their family (a family
named by whole words only), `.sft`, misnamed files (read, and their stored dtype counted, by content), and the files
that are no whole KL autoencoder (UNet only, TAESD, a lone decoder)."""

from __future__ import annotations

import sys
import types
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

import klvae
from helpers import RAN, Payload, fake_hub_cache, one_error_line, perturbed_vae
from klvae.cli.main import main
from klvae.errors import WeightsError
from klvae.model.config import PRESETS
from klvae.weights import diffusers_to_ldm, read_state_dict
from klvae.weights.infer import family_from_name


@pytest.fixture(scope="module")
def vae() -> klvae.AutoencoderKL:
    return perturbed_vae("tiny")


@pytest.fixture(scope="module")
def ldm(vae: klvae.AutoencoderKL) -> dict[str, torch.Tensor]:
    """The tiny VAE's weights in LDM layout (keys as sdxl_vae.safetensors and ae.safetensors spell them)."""
    return {k: v.contiguous() for k, v in diffusers_to_ldm(vae.state_dict()).items()}


def _equal_weights(a: klvae.AutoencoderKL, b: klvae.AutoencoderKL) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def _lightning_ckpt(path: Path, state_dict: dict[str, torch.Tensor], monkeypatch: pytest.MonkeyPatch,
                    **more: object) -> None:
    """A .ckpt as LDM's Lightning trainer saved SD's: the weights beside a ModelCheckpoint callback (keyed by its
    class) and numpy scalars, pickled under pytorch_lightning's real module names."""
    names = ("pytorch_lightning", "pytorch_lightning.callbacks", "pytorch_lightning.callbacks.model_checkpoint")
    mods = {n: types.ModuleType(n) for n in names}
    model_checkpoint = type("ModelCheckpoint", (), {"__module__": names[2]})
    mods[names[2]].ModelCheckpoint = model_checkpoint
    for n, m in mods.items():
        monkeypatch.setitem(sys.modules, n, m)
    torch.save({"epoch": 6, "global_step": 840000, "pytorch-lightning_version": "1.4.2", "state_dict": state_dict,
                "callbacks": {model_checkpoint: {"best_model_score": np.float64(0.25), "monitor": None}}, **more},
               path)
    for n in names:
        monkeypatch.delitem(sys.modules, n)


def test_lightning_era_ckpt_loads_and_a_payload_beside_it_is_still_refused(
    vae: klvae.AutoencoderKL, ldm: dict[str, torch.Tensor], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """SD's .ckpt files hold Lightning's ModelCheckpoint and numpy scalars besides tensors (ComfyUI and A1111
    allow exactly those): weights_only refused the whole file before."""
    full = {"model.diffusion_model.x": torch.zeros(1), "cond_stage_model.transformer.x": torch.zeros(1),
            **{f"first_stage_model.{k}": v for k, v in ldm.items()}}
    _lightning_ckpt(tmp_path / "v1-5.ckpt", full, monkeypatch)
    back = klvae.AutoencoderKL.from_pretrained(tmp_path / "v1-5.ckpt", config="tiny")
    assert _equal_weights(back, vae)
    _lightning_ckpt(tmp_path / "evil.ckpt", full, monkeypatch, payload=Payload())
    with pytest.raises(WeightsError, match=r"refusing to unpickle .*evil\.ckpt: it holds objects other than "
                                           r"tensors: .*_record"):
        klvae.AutoencoderKL.from_pretrained(tmp_path / "evil.ckpt", config="tiny")
    assert RAN == []


def test_a_playground_full_checkpoint_gets_its_edm_statistics(ldm: dict[str, torch.Tensor], tmp_path: Path) -> None:
    """Playground v2.5's checkpoint is SDXL's keys plus edm_mean/edm_std, which diffusers' single-file loader
    reads as the VAE's latents_mean/latents_std with scaling 0.5; it loaded as plain SDXL (0.13025) before."""
    mean, std = torch.tensor([-1.5, 1.75, -1.25, 2.5]), torch.tensor([8.5, 6.0, 6.5, 5.25])
    full = {"conditioner.embedders.0.x": torch.zeros(1), "edm_mean": mean.view(1, 4, 1, 1),
            "edm_std": std.view(1, 4, 1, 1), **{f"first_stage_model.{k}": v for k, v in ldm.items()}}
    save_file(full, str(tmp_path / "playground-v2.5.safetensors"))
    cfg = klvae.AutoencoderKL.from_pretrained(tmp_path / "playground-v2.5.safetensors").config
    assert (cfg.scaling_factor, cfg.shift_factor) == (0.5, None)
    assert cfg.latents_mean == tuple(mean.tolist()) and cfg.latents_std == tuple(std.tolist())


def test_the_playground25_preset_fetches_its_vae_folder(vae: klvae.AutoencoderKL, offline_cache: Path,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    """The preset named its repo's vae/ folder as if it were one file: fetching a file called "vae" failed."""
    fake_hub_cache(offline_cache, "playgroundai/playground-v2.5-1024px-aesthetic", vae, "vae")
    monkeypatch.setitem(PRESETS, "playground25", vae.config.replace(scaling_factor=0.5,
                                                                    latents_mean=(0.0, 1.0, 2.0, 3.0),
                                                                    latents_std=(1.0, 2.0, 3.0, 4.0)))
    back = klvae.AutoencoderKL.from_pretrained("playground25")
    assert _equal_weights(back, vae) and back.config.latents_std == (1.0, 2.0, 3.0, 4.0)


@pytest.mark.parametrize(("name", "factors"), [
    ("sdxl_vae.safetensors", (0.13025, None)),
    ("sdxl-vae-fp16-fix.safetensors", (0.13025, None)),
    ("sd3_vae.safetensors", (1.5305, 0.0609)),
    ("flux_ae.safetensors", (0.3611, 0.1159)),
    ("ae.safetensors", (0.3611, 0.1159)),  # 16 channels and no hint: FLUX.1's, as before
    ("vae.safetensors", (0.18215, None)),  # 4 channels and no hint: SD 1.x's, as before
    ("sdxl_vae_as_sd3.safetensors", "guessed"),  # two families named: no hint (16 channels: FLUX's)
])
def test_a_lone_vae_files_name_gives_the_family_its_shapes_cannot(
    name: str, factors: tuple[float, float | None] | str, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """SDXL's VAE is SD's network and SD3's is FLUX.1's: a bare sdxl_vae.safetensors was given SD 1.x's 0.18215."""
    channels = 16 if "sd3" in name or "ae" in name.split(".")[0].split("_") else 4
    quant = channels == 4
    v = perturbed_vae("tiny", latent_channels=channels, use_quant_conv=quant, use_post_quant_conv=quant)
    save_file({k: t.contiguous() for k, t in diffusers_to_ldm(v.state_dict()).items()}, str(tmp_path / name))
    cfg = klvae.AutoencoderKL.from_pretrained(tmp_path / name).config
    if factors == "guessed":
        assert "latent factors guessed" in caplog.text
    else:
        assert (cfg.scaling_factor, cfg.shift_factor) == factors
    assert "--config" in caplog.text  # still a guess: the warning says how to overrule it


@pytest.mark.parametrize(("name", "family"), [
    ("ssd1b_vae.safetensors", None),  # SSD-1B's VAE is SDXL's: "sd1" inside "ssd1b" is no SD 1.x
    ("SSD-1B.safetensors", None),
    ("playground-v2-1024px-aesthetic.fp16.safetensors", None),  # SDXL's factors, not v2.5's EDM statistics
    ("influx_vae.safetensors", None),
    ("playground-v2.5-1024px-aesthetic.fp16.safetensors", "playground25"),
    ("sd_xl_base_1.0.safetensors", "sdxl"), ("my_sdxl_vae.safetensors", "sdxl"), ("sd3.5_large.safetensors", "sd3"),
    ("FLUX.2-dev.safetensors", "flux2"), ("flux1-dev.sft", "flux"), ("vae-ft-mse-840000-ema-pruned.ckpt", "sd15"),
    ("sd_1.5.pt", "sd15"), ("sd21_vae.bin", "sd2"), ("sd3_to_sdxl.safetensors", None),
    ("sd_1024px_vae.safetensors", None), ("flux_2024.safetensors", "flux"),  # a size and a year, no version
    ("sd3.5_large.safetensors", "sd3"), ("sd_3_5_medium.safetensors", "sd3"), ("flux.2-dev-ae.safetensors", "flux2"),
    ("sd14-vae.ckpt", "sd15"), ("sd2.1_vae.bin", "sd2"),
])
def test_a_family_is_named_by_whole_words_only(name: str, family: str | None) -> None:
    assert family_from_name(name) == family


def test_misnamed_and_sft_files_are_read_by_their_content(vae: klvae.AutoencoderKL, ldm: dict[str, torch.Tensor],
                                                          tmp_path: Path) -> None:
    """FLUX.1's ae.sft (ComfyUI reads .sft), safetensors saved as .ckpt and a torch file saved as .safetensors."""
    save_file(ldm, str(tmp_path / "ae.sft"))
    save_file(ldm, str(tmp_path / "vae.ckpt"))
    torch.save(ldm, tmp_path / "vae.safetensors")
    for name in ("ae.sft", "vae.ckpt", "vae.safetensors"):
        assert _equal_weights(klvae.AutoencoderKL.from_pretrained(tmp_path / name, config="tiny"), vae), name
    # A header length whose first byte is a pickle's 0x80 is still safetensors (judged by the JSON after it).
    one = {"encoder.conv_in.weight": torch.arange(6.0)}
    for k in range(256):
        save_file(one, str(tmp_path / "p.ckpt"), metadata={"p": "x" * k})
        with open(tmp_path / "p.ckpt", "rb") as f:
            if f.read(1) == b"\x80":
                break
    else:
        pytest.fail("no padding gave a header length starting 0x80")
    assert torch.equal(read_state_dict(tmp_path / "p.ckpt")["encoder.conv_in.weight"], one["encoder.conv_in.weight"])


def test_stored_dtype_of_a_torch_file_named_safetensors(tmp_path: Path) -> None:
    from klvae import AutoencoderKL
    from klvae.weights.stored_dtype import stored_values

    vae = AutoencoderKL("tiny")
    path = tmp_path / "vae.safetensors"  # a torch.save file under the wrong name, which loading reads by content
    torch.save({k: v.half() for k, v in vae.state_dict().items()}, path)
    loaded = AutoencoderKL.from_pretrained(path, config="tiny")
    assert torch.equal(loaded.encoder.conv_in.weight, vae.encoder.conv_in.weight.half().float())
    assert set(stored_values(path)) == {"fp16"}


def test_convert_writes_an_sft_file_comfyui_reads(vae: klvae.AutoencoderKL, tmp_path: Path) -> None:
    """`-o ae.sft` was taken for a folder's name and got a diffusers folder called ae.sft."""
    src = vae.save_pretrained(tmp_path / "src")
    assert main(["-q", "convert", "-m", str(src), "-o", str(tmp_path / "ae.sft")]) == 0
    assert (tmp_path / "ae.sft").is_file()
    assert load_file(str(tmp_path / "ae.sft")).keys() == diffusers_to_ldm(vae.state_dict()).keys()
    assert _equal_weights(klvae.AutoencoderKL.from_pretrained(tmp_path / "ae.sft"), vae)


def _taesd_keys() -> dict[str, torch.Tensor]:
    return {"decoder.layers.0.weight": torch.zeros(64, 4, 3, 3), "decoder.layers.2.conv.0.weight":
            torch.zeros(64, 64, 3, 3), "encoder.layers.0.weight": torch.zeros(64, 3, 3, 3)}


@pytest.mark.parametrize(("make", "words"), [
    (lambda ldm: {"model.diffusion_model.input_blocks.0.0.weight": torch.zeros(4, 4, 3, 3)},
     "unet.safetensors holds a diffusion model (UNet or transformer: model.diffusion_model.input_blocks"),
    (lambda ldm: {k: v for k, v in ldm.items() if k.startswith(("decoder.", "post_quant_conv."))},
     "holds only a VAE decoder"),
    (lambda ldm: {"first_stage_model." + k: v for k, v in ldm.items() if k.startswith("encoder.")},
     "holds only a VAE encoder"),
    (lambda ldm: _taesd_keys(), "is a TAESD (tiny autoencoder) file"),
    (lambda ldm: {k.removeprefix("decoder.layers."): v for k, v in _taesd_keys().items() if k[0] == "d"},
     "holds a bare numbered network (0.weight"),
])
def test_files_that_are_no_whole_vae_say_what_they_are_in_one_line(
    make: object, words: str, ldm: dict[str, torch.Tensor], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Before: "not a KL autoencoder state dict" without the file, or "cannot infer the config: the weights have
    no encoder.down_blocks.* keys" (a lone decoder, TAESD); with --config, dozens of "missing keys"."""
    path = tmp_path / "unet.safetensors"
    save_file(make(ldm), str(path))  # type: ignore[operator]
    for config in ([], ["--config", "tiny"]):
        assert main(["-q", "info", "--model", str(path), *config]) == 2
        line = one_error_line(capsys.readouterr().err)
        assert str(path) in line and words in line, line


def test_flux2s_lone_small_decoder_names_the_whole_file_to_load(tmp_path: Path) -> None:
    v = perturbed_vae("tiny", latent_channels=32)
    dec = {k: t.contiguous() for k, t in diffusers_to_ldm(v.state_dict()).items() if k.startswith("decoder.")}
    save_file(dec, str(tmp_path / "small_decoder.safetensors"))
    with pytest.raises(WeightsError, match=r"small_decoder\.safetensors holds only a VAE decoder .*"
                                           r"full_encoder_small_decoder\.safetensors.*--model flux2-small-decoder"):
        klvae.AutoencoderKL.from_pretrained(tmp_path / "small_decoder.safetensors")


@pytest.mark.parametrize(("content", "words"), [
    (b"", "it is empty (0 bytes)"),
    (b"not a weights file at all", "it is not a safetensors file (Error while deserializing header"),
])
def test_a_file_that_is_no_safetensors_says_so(content: bytes, words: str, tmp_path: Path) -> None:
    (tmp_path / "vae.safetensors").write_bytes(content)
    with pytest.raises(WeightsError) as e:
        klvae.AutoencoderKL.from_pretrained(tmp_path / "vae.safetensors")
    assert words in str(e.value), str(e.value)


@pytest.mark.parametrize("channels", [4, 16])
def test_convert_to_ldm_loads_in_diffusers_from_single_file_offline_with_config(
    channels: int, tmp_path: Path, offline_cache: Path
) -> None:
    """The README's round trip: `convert -o x.safetensors` (LDM keys, as sdxl_vae.safetensors and FLUX.1's
    ae.safetensors spell them) read by diffusers' own single-file converter, given config= the folder that
    `convert -o dir/` writes: the same weights and factors, with no hub (HF_HUB_OFFLINE)."""
    import diffusers

    quant = channels == 4
    v = perturbed_vae("tiny", latent_channels=channels, use_quant_conv=quant, use_post_quant_conv=quant,
                      scaling_factor=0.3611, shift_factor=0.1159)
    src = v.save_pretrained(tmp_path / "src")
    assert main(["-q", "convert", "-m", str(src), "-o", str(tmp_path / "vae.safetensors")]) == 0
    assert main(["-q", "convert", "-m", str(tmp_path / "vae.safetensors"), "-o", str(tmp_path / "dir")]) == 0
    theirs = diffusers.AutoencoderKL.from_single_file(str(tmp_path / "vae.safetensors"), config=str(tmp_path / "dir"))
    ours, got = v.state_dict(), theirs.state_dict()
    assert got.keys() == ours.keys() and all(torch.equal(got[k], ours[k]) for k in ours)
    assert (theirs.config.scaling_factor, theirs.config.shift_factor) == (0.3611, 0.1159)


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_weights_holding_nan_or_inf_are_refused_naming_them(bad: float, ldm: dict[str, torch.Tensor], tmp_path: Path,
                                                            capsys: pytest.CaptureFixture[str]) -> None:
    """Before: they loaded, and every decode was NaN (a black image) with no hint why."""
    sd = dict(ldm)
    sd["decoder.conv_out.bias"] = sd["decoder.conv_out.bias"].clone()
    sd["decoder.conv_out.bias"][1] = bad
    path = tmp_path / "vae.safetensors"
    save_file(sd, str(path))
    with pytest.raises(WeightsError, match=r"vae\.safetensors holds NaN or infinite values in 1 weights "
                                           r"\(decoder\.conv_out\.bias\): the file is damaged"):
        klvae.AutoencoderKL.from_pretrained(path)
    assert main(["-q", "info", "--model", str(path)]) == 2
    assert "decoder.conv_out.bias" in one_error_line(capsys.readouterr().err)


def test_weights_beyond_float16s_range_are_refused_in_float16_only(ldm: dict[str, torch.Tensor],
                                                                   tmp_path: Path) -> None:
    sd = dict(ldm)
    sd["encoder.conv_in.bias"] = sd["encoder.conv_in.bias"].clone()
    sd["encoder.conv_in.bias"][0] = 70000.0  # finite in float32 and bfloat16, inf in float16
    path = tmp_path / "vae.safetensors"
    save_file(sd, str(path))
    with pytest.raises(WeightsError, match=r"vae\.safetensors has weights beyond the range of float16, whose largest "
                                           r"value is 65504 \(encoder\.conv_in\.bias\): use float32 or bfloat16"):
        klvae.AutoencoderKL.from_pretrained(path, dtype=torch.float16)
    for dtype in (torch.float32, torch.bfloat16):
        vae = klvae.AutoencoderKL.from_pretrained(path, dtype=dtype)
        assert vae.encoder.conv_in.bias[0].item() == pytest.approx(70000.0, rel=1e-2)
