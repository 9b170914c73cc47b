"""Weight formats without diffusers: strict-load errors, config inference, config.json, pickles (the hub cache:
test_hub_offline.py)."""

from __future__ import annotations

import errno
import json
from pathlib import Path
from typing import BinaryIO

import pytest
import torch
from safetensors.torch import save_file

from helpers import RAN, Payload, assert_same_weights
from klvae import AutoencoderKL, WeightsError
from klvae.model.config import PRESETS, AutoencoderKLConfig
from klvae.weights import (
    config_from_diffusers,
    config_to_diffusers,
    detect_layout,
    diffusers_to_ldm,
    drop_training_keys,
    export_ldm,
    infer_config,
    read_config_json,
    read_state_dict,
    strip_prefix,
    to_diffusers,
)
from klvae.weights.infer import ARCH_FIELDS

TINY = PRESETS["tiny"]


def tiny_model(cfg: AutoencoderKLConfig = TINY, seed: int = 0) -> AutoencoderKL:
    torch.manual_seed(seed)
    model = AutoencoderKL(cfg).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    return model


def write_file(sd: dict[str, torch.Tensor], path: Path) -> Path:
    save_file({k: v.contiguous() for k, v in sd.items()}, str(path))
    return path


# ---- strict loading ---------------------------------------------------------------------------------------------
def test_missing_key_is_named(tmp_path: Path) -> None:
    sd = tiny_model().state_dict()
    del sd["decoder.conv_in.bias"]
    with pytest.raises(WeightsError, match=r"1 missing keys: decoder\.conv_in\.bias"):
        AutoencoderKL.from_pretrained(write_file(sd, tmp_path / "w.safetensors"), config="tiny")


def test_unexpected_key_is_named(tmp_path: Path) -> None:
    sd = tiny_model().state_dict()
    sd["encoder.extra_head.weight"] = torch.zeros(3)
    with pytest.raises(WeightsError, match=r"1 unexpected keys: encoder\.extra_head\.weight"):
        AutoencoderKL.from_pretrained(write_file(sd, tmp_path / "w.safetensors"), config="tiny")


def test_shape_mismatch_is_named(tmp_path: Path) -> None:
    sd = tiny_model().state_dict()
    sd["encoder.mid_block.attentions.0.to_q.weight"] = torch.zeros(64, 32)
    with pytest.raises(WeightsError, match=r"encoder\.mid_block\.attentions\.0\.to_q\.weight \[64, 32\] vs \[64, 64\]"):
        AutoencoderKL.from_pretrained(write_file(sd, tmp_path / "w.safetensors"), config="tiny")


def test_non_floating_tensor_is_named(tmp_path: Path) -> None:
    sd = tiny_model().state_dict()
    sd["decoder.conv_in.bias"] = sd["decoder.conv_in.bias"].to(torch.int32)
    with pytest.raises(WeightsError, match=r"wrong type .*decoder\.conv_in\.bias torch\.int32 vs torch\.float32") as e:
        AutoencoderKL.from_pretrained(write_file(sd, tmp_path / "w.safetensors"))
    assert "\n" not in str(e.value)


def test_many_missing_keys_are_counted(tmp_path: Path) -> None:
    sd = {k: v for k, v in tiny_model().state_dict().items() if not k.startswith("decoder.up_blocks.1.")}
    with pytest.raises(WeightsError, match=r"missing keys: .*\.\.\. \(\d+ in all\)") as e:
        AutoencoderKL.from_pretrained(write_file(sd, tmp_path / "w.safetensors"), config="tiny")
    assert "\n" not in str(e.value)


def test_preset_mismatch_names_the_fields(tmp_path: Path) -> None:
    path = write_file(tiny_model().state_dict(), tmp_path / "w.safetensors")
    with pytest.raises(WeightsError, match=r"config 'sd15'.*block_out_channels \[32, 64\] in the weights"):
        AutoencoderKL.from_pretrained(path, config="sd15")
    flux_like = TINY.replace(latent_channels=16, use_quant_conv=False, use_post_quant_conv=False)
    path = write_file(tiny_model(flux_like).state_dict(), tmp_path / "f.safetensors")
    with pytest.raises(WeightsError, match=r"latent_channels 16 in the weights vs 4.*use_quant_conv False"):
        AutoencoderKL.from_pretrained(path, config="tiny")
    with pytest.raises(WeightsError, match="unknown preset 'nope'"):
        AutoencoderKL.from_pretrained(path, config="nope")


# ---- config inference -------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", list(PRESETS))
@pytest.mark.parametrize("attention", ["vanilla", "linear", "none"])
def test_config_inferred_from_shapes(name: str, attention: str) -> None:
    cfg = PRESETS[name].replace(attention=attention)
    with torch.device("meta"):  # shapes only: no memory, no init
        sd = AutoencoderKL(cfg).state_dict()
    inferred = infer_config(sd)
    for field in ARCH_FIELDS:
        assert getattr(inferred, field) == getattr(cfg, field), field
    # norm_num_groups leaves no trace in the shapes: 32 is assumed whenever it divides every width.
    assert inferred.norm_num_groups == 32
    # Equally, the factors are a guess by latent channels, in both layouts.
    assert inferred.scaling_factor == {4: 0.18215, 16: 0.3611, 32: 1.0}[cfg.latent_channels]
    assert inferred.latent_patch_size == (2 if cfg.latent_channels == 32 else 1)
    assert infer_config(to_diffusers(diffusers_to_ldm(sd))) == inferred


def test_inferred_factors_warn(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    path = write_file(tiny_model().state_dict(), tmp_path / "w.safetensors")
    with caplog.at_level("WARNING"):
        AutoencoderKL.from_pretrained(path)
    assert "config='sdxl'" in caplog.text


def test_detect_layout() -> None:
    sd = tiny_model().state_dict()
    assert detect_layout(sd) == "diffusers"
    assert detect_layout(diffusers_to_ldm(sd)) == "ldm"
    legacy = {k.replace(".to_q.", ".query."): v for k, v in sd.items()}
    assert detect_layout(legacy) == "diffusers_legacy"
    with pytest.raises(WeightsError, match=r"not a KL autoencoder.*model\.diffusion_model\.x"):
        detect_layout({"model.diffusion_model.x": torch.zeros(1)})


def test_strip_prefix_and_training_keys() -> None:
    w = torch.zeros(1)
    assert strip_prefix({"vae.encoder.a": w, "text_encoder.b": w}) == {"encoder.a": w}
    assert strip_prefix({"module._orig_mod.encoder.a": w}) == {"encoder.a": w}
    full = {"first_stage_model.decoder.a": w, "model.diffusion_model.b": w, "cond_stage_model.c": w}
    assert strip_prefix(full) == {"decoder.a": w}
    assert drop_training_keys({"encoder.a": w, "loss.logvar": w, "model_ema.decay": w}) == {"encoder.a": w}


def test_conv_shaped_attention_weights_in_modern_names_are_squeezed() -> None:
    sd = tiny_model().state_dict()
    conv_shaped = {k: v[:, :, None, None] if k.endswith(("to_q.weight", "to_out.0.weight")) else v
                   for k, v in sd.items()}
    converted = to_diffusers(conv_shaped)
    assert all(converted[k].shape == v.shape for k, v in sd.items())


@pytest.mark.parametrize(("extra", "message"), [
    # A gap: one tiny key far out would have made the loader build 30000 blocks per level.
    ({"encoder.down_blocks.0.resnets.29999.x": 1, "decoder.up_blocks.0.resnets.30000.x": 1},
     r"the weights have encoder\.down_blocks\.0\.resnets\.29999\.\* but no encoder\.down_blocks\.0\.resnets\.1\.\*"),
    ({"encoder.down_blocks.7.x": 1},
     r"the weights have encoder\.down_blocks\.7\.\* but no encoder\.down_blocks\.2\.\*"),
    # No gap, but more blocks than any VAE: as costly to build.
    ({**{f"encoder.down_blocks.0.resnets.{i}.x": 1 for i in range(1, 100)},
      **{f"decoder.up_blocks.0.resnets.{i}.x": 1 for i in range(2, 101)}},
     r"100 encoder\.down_blocks\.0\.resnets\.\* in the weights, more than any VAE has \(at most 64\)"),
], ids=["block-gap", "level-gap", "too-many-blocks"])
def test_crafted_block_indices_are_refused_before_any_model_is_built(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, extra: dict[str, int], message: str
) -> None:
    sd = {**tiny_model(TINY.replace(layers_per_block=1)).state_dict(), **{k: torch.zeros(n) for k, n in extra.items()}}
    path = write_file(sd, tmp_path / "w.safetensors")

    def built(*args: object, **kwargs: object) -> None:
        raise AssertionError("a model was built")

    monkeypatch.setattr(AutoencoderKL, "__init__", built)
    with pytest.raises(WeightsError, match=f"^cannot infer the config: {message}"):
        AutoencoderKL.from_pretrained(path)


# ---- config.json ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", list(PRESETS))
def test_config_json_round_trip(name: str) -> None:
    cfg = PRESETS[name]
    d = json.loads(json.dumps(config_to_diffusers(cfg)))
    assert config_from_diffusers(d) == cfg
    assert d["_class_name"] == ("AutoencoderKLFlux2" if cfg.latent_patch_size > 1 else "AutoencoderKL")
    assert d["down_block_types"] == ["DownEncoderBlock2D"] * len(
        cfg.block_out_channels
    )


def test_config_json_reads_diffusers_files(tmp_path: Path) -> None:
    d = {
        "_class_name": "AutoencoderKL", "_diffusers_version": "0.20.0", "act_fn": "silu",
        "block_out_channels": [128, 256, 512, 512], "down_block_types": ["DownEncoderBlock2D"] * 4,
        "up_block_types": ["UpDecoderBlock2D"] * 4, "in_channels": 3, "latent_channels": 4,
        "layers_per_block": 2, "norm_num_groups": 32, "out_channels": 3, "sample_size": 768,
        "latents_mean": None, "latents_std": None,
    }
    (tmp_path / "config.json").write_text(json.dumps(d))
    assert read_config_json(tmp_path / "config.json") == PRESETS["sd2"]


def test_deeply_nested_json_is_one_line_not_a_recursion_error(tmp_path: Path) -> None:
    model = tiny_model()
    model.save_pretrained(tmp_path / "m")
    (tmp_path / "m" / "config.json").write_text("[" * 100000)
    with pytest.raises(WeightsError, match=r"config\.json: its JSON is nested too deeply"):
        AutoencoderKL.from_pretrained(tmp_path / "m")
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(tmp_path / "w.safetensors"),
              metadata={"klvae_config": "[" * 100000})
    with pytest.raises(WeightsError, match="the klvae config in its header is nested too deeply"):
        AutoencoderKL.from_pretrained(tmp_path / "w.safetensors")


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"down_block_types": ["AttnDownEncoderBlock2D"]}, "down_block_types"),
        ({"up_block_types": ["UpDecoderBlock2D"] * 2}, "up_block_types has 2 entries"),
        ({"act_fn": "relu"}, "act_fn 'relu'"),
        ({"_class_name": "AutoencoderTiny"}, "AutoencoderTiny"),
        ({"norm_num_groups": 7}, "divisible"),
        ({"norm_num_groups": 0}, "norm_num_groups must be a positive integer"),  # was a ZeroDivisionError
        ({"block_out_channels": "abc"}, "block_out_channels must be a non-empty list of integers"),
        ({"block_out_channels": ["a"]}, "every block_out_channels entry must be an integer"),
        ({"force_upcast": "no"}, "force_upcast must be true or false"),  # bool("no") is True
        ({"mid_block_add_attention": 0}, "mid_block_add_attention must be true or false"),
        ({"layers_per_block": 1.5}, "layers_per_block must be an integer"),  # int() would truncate it
        ({"scaling_factor": None}, "scaling_factor must be a finite positive number"),
        ({"sample_size": "big"}, "sample_size must be an integer"),
    ],
)
def test_config_json_rejects_what_cannot_be_built(change: dict, message: str) -> None:
    d = {**config_to_diffusers(PRESETS["sd15"]), "block_out_channels": [64], "down_block_types": ["DownEncoderBlock2D"],
         "up_block_types": ["UpDecoderBlock2D"], **change}
    with pytest.raises(WeightsError, match=message):
        config_from_diffusers(d)


def test_linear_attention_cannot_be_saved_for_diffusers_but_exports_to_ldm(tmp_path: Path) -> None:
    model = tiny_model(TINY.replace(attention="linear"))
    with pytest.raises(WeightsError, match="linear"):
        model.save_pretrained(tmp_path / "out")
    assert not (tmp_path / "out").exists()
    path = export_ldm(model, tmp_path / "lin.safetensors")
    assert_same_weights(AutoencoderKL.from_pretrained(path, config=model.config), model)


def test_an_exported_ldm_file_reloads_as_the_same_model(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    # 4 groups and odd factors: nothing a guess from the shapes would give back.
    cfg = TINY.replace(norm_num_groups=4, scaling_factor=0.7, shift_factor=-0.2)
    model = tiny_model(cfg)
    path = export_ldm(model, tmp_path / "vae.safetensors")
    assert infer_config(to_diffusers(read_state_dict(path))).norm_num_groups != 4  # shapes alone would lose it
    caplog.clear()
    with caplog.at_level("WARNING"):
        back = AutoencoderKL.from_pretrained(path)
    assert back.config == cfg and not caplog.records  # no "config inferred" warning
    assert_same_weights(back, model)
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:  # other loaders see plain LDM keys and ignore the header
        assert "encoder.down.0.block.0.conv1.weight" in list(f.keys())
        c = cfg.block_out_channels[-1]
        for part in ("encoder", "decoder"):  # LDM's attention projections are 1x1 convs, as its loaders expect
            for proj in ("q", "k", "v", "proj_out"):
                assert f.get_slice(f"{part}.mid.attn_1.{proj}.weight").get_shape() == [c, c, 1, 1]
    # An explicit config still wins, and a damaged header is one WeightsError.
    assert AutoencoderKL.from_pretrained(path, config=cfg.replace(scaling_factor=1.0)).config.scaling_factor == 1.0
    sd = read_state_dict(path)
    save_file(sd, str(tmp_path / "bad.safetensors"), metadata={"klvae_config": "{not json"})
    with pytest.raises(WeightsError, match="config in its header"):
        AutoencoderKL.from_pretrained(tmp_path / "bad.safetensors")


def test_save_pretrained_round_trip_leaves_no_temp_files(tmp_path: Path) -> None:
    model = tiny_model(TINY.replace(scaling_factor=0.5, shift_factor=0.1, attention="none"))
    out = model.save_pretrained(tmp_path / "out")
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "diffusion_pytorch_model.safetensors"]
    back = AutoencoderKL.from_pretrained(out)
    assert back.config == model.config and not back.training
    assert_same_weights(back, model)


def test_dtype_and_fp16_variant(tmp_path: Path) -> None:
    model = tiny_model()
    model.save_pretrained(tmp_path)
    (tmp_path / "diffusion_pytorch_model.safetensors").rename(tmp_path / "diffusion_pytorch_model.fp16.safetensors")
    back = AutoencoderKL.from_pretrained(tmp_path, dtype=torch.float16, device="cpu")
    assert back.dtype == torch.float16
    assert_same_weights(back, model.half())
    # Half-precision weights without a dtype load in fp32, as every path computes by default.
    AutoencoderKL.from_pretrained(tmp_path, dtype=torch.float16).save_pretrained(tmp_path / "half")
    back = AutoencoderKL.from_pretrained(tmp_path / "half")
    assert back.dtype == torch.float32
    assert_same_weights(back, model.half().float())


def test_pipeline_folder_and_subfolder(tmp_path: Path) -> None:
    model = tiny_model()
    model.save_pretrained(tmp_path / "pipe" / "vae")
    (tmp_path / "pipe" / "model_index.json").write_text("{}")
    assert_same_weights(AutoencoderKL.from_pretrained(tmp_path / "pipe", subfolder="vae"), model)
    assert_same_weights(AutoencoderKL.from_pretrained(tmp_path / "pipe"), model)
    with pytest.raises(WeightsError, match="no such folder"):
        AutoencoderKL.from_pretrained(tmp_path / "pipe", subfolder="unet")


def test_bad_device_dtype_and_subfolder_are_refused_up_front(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from helpers import one_error_line
    from klvae import KlvaeError
    from klvae.cli.main import main

    with pytest.raises(KlvaeError, match="'banana' is not a device"):
        AutoencoderKL.from_pretrained("demo", device="banana")
    with pytest.raises(WeightsError, match=r"dtype torch\.int8 is not a floating-point torch\.dtype"):
        AutoencoderKL.from_pretrained("demo", dtype=torch.int8)
    path = tiny_model().save_pretrained(tmp_path / "pipe" / "vae")
    for model, sub, message in [
        ("demo", "../..", "must be a path inside the model folder"),
        (tmp_path / "pipe", "../pipe/vae", "must be a path inside the model folder"),
        (tmp_path / "pipe", str(path), "must be a path inside the model folder"),  # absolute
        ("demo", "vae", "'demo' is klvae's built-in model, not a folder or hub repo"),
        ("sdxl", "unet", "'sdxl' is a preset, not a folder or hub repo"),  # refused before any download
        (path / "diffusion_pytorch_model.safetensors", "vae", "is a file, not a folder"),
    ]:
        with pytest.raises(WeightsError, match=message):
            AutoencoderKL.from_pretrained(model, subfolder=sub)
    capsys.readouterr()
    assert main(["info", "--model", "demo", "--subfolder", "vae"]) == 2
    assert "built-in model" in one_error_line(capsys.readouterr().err)


def test_a_failed_bin_write_names_the_file_and_leaves_no_folder(tmp_path: Path,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    def full(obj: object, f: BinaryIO, *args: object, **kwargs: object) -> None:
        f.write(b"\0" * 10)  # torch.save into a file object meets a full disk as the file's OSError
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(torch, "save", full)
    bin_file = tmp_path / "a" / "b" / "diffusion_pytorch_model.bin"
    with pytest.raises(OSError, match=f"^cannot write {bin_file}: .*No space left on device"):
        tiny_model().save_pretrained(tmp_path / "a" / "b", safe_serialization=False)
    assert list(tmp_path.iterdir()) == []


# ---- pickles ----------------------------------------------------------------------------------------------------
def test_bin_files_load(tmp_path: Path) -> None:
    model = tiny_model()
    out = model.save_pretrained(tmp_path / "folder", safe_serialization=False)
    assert (out / "diffusion_pytorch_model.bin").is_file()
    assert_same_weights(AutoencoderKL.from_pretrained(out), model)
    torch.save(model.state_dict(), tmp_path / "single.bin")
    assert_same_weights(AutoencoderKL.from_pretrained(tmp_path / "single.bin", config="tiny"), model)




def test_pickled_objects_are_refused(tmp_path: Path) -> None:
    sd = tiny_model().state_dict()
    torch.save({"state_dict": sd, "callback": Payload()}, tmp_path / "evil.ckpt")
    with pytest.raises(WeightsError, match="refusing to unpickle"):
        AutoencoderKL.from_pretrained(tmp_path / "evil.ckpt", config="tiny")
    assert RAN == []


def test_files_that_are_no_checkpoint_say_what_they_are(tmp_path: Path, recwarn: pytest.WarningsRecorder) -> None:
    import pickle

    (tmp_path / "notes.bin").write_text("hello world\n")
    with pytest.raises(WeightsError, match=r"notes\.bin: it is not a PyTorch file"):  # was "cannot read ...: 101"
        AutoencoderKL.from_pretrained(tmp_path / "notes.bin")
    (tmp_path / "noise.ckpt").write_bytes(b"C\x8e" + bytes(range(256)) * 4)  # bytes an unpickler stops at
    with pytest.raises(WeightsError, match=r"noise\.ckpt: it is not a PyTorch file"):  # was "refusing to unpickle"
        AutoencoderKL.from_pretrained(tmp_path / "noise.ckpt")
    (tmp_path / "empty.ckpt").write_bytes(b"")
    with pytest.raises(WeightsError, match=r"cannot read .*empty\.ckpt: it is empty \(0 bytes\)"):  # was EOFError
        AutoencoderKL.from_pretrained(tmp_path / "empty.ckpt")
    (tmp_path / "cut.ckpt").write_bytes(b"PK\x03\x04" + b"\0" * 60)
    with pytest.raises(WeightsError, match=r"cut\.ckpt: a damaged or truncated file \(PytorchStreamReader"):
        AutoencoderKL.from_pretrained(tmp_path / "cut.ckpt")
    with open(tmp_path / "raw.ckpt", "wb") as f:
        pickle.dump({"a": 1}, f, protocol=4)
    recwarn.clear()
    with pytest.raises(WeightsError, match="refusing to unpickle"):
        AutoencoderKL.from_pretrained(tmp_path / "raw.ckpt")
    assert not [str(w.message) for w in recwarn], "torch's pickle-protocol warning reached the user"


def test_unreadable_and_unknown_sources(tmp_path: Path) -> None:
    (tmp_path / "broken.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json")
    with pytest.raises(WeightsError, match="cannot read"):
        read_state_dict(tmp_path / "broken.safetensors")
    (tmp_path / "w.onnx").write_bytes(b"x")
    with pytest.raises(WeightsError, match="unsupported weights file"):
        AutoencoderKL.from_pretrained(tmp_path / "w.onnx")
    with pytest.raises(WeightsError, match="no such file or folder"):
        AutoencoderKL.from_pretrained(tmp_path / "missing.safetensors")
    with pytest.raises(WeightsError, match="no released weights"):
        AutoencoderKL.from_pretrained("tiny")
