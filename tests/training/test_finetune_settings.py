"""Settings of a fine-tune with `klvae train` (decoder-only, from pretrained weights): model.overrides applied to the
weights' own config, a config file given after --resume, YAML parse errors with their place, a section set to a
value, surprising settings said, validation without LPIPS, and a resume with a changed config."""

import json
import logging
from pathlib import Path

import pytest
import torch

import klvae
from helpers import noise_folder
from klvae.cli.main import main
from klvae.errors import KlvaeError
from klvae.training import validate as validate_mod
from klvae.training.config import load_config
from klvae.training.loop import fit
from klvae.training.trainer import Trainer, build_model

SDXL_SCALE = 0.13025


@pytest.fixture(scope="module")
def images(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Four small random images as an image folder."""
    return noise_folder(tmp_path_factory.mktemp("images"), 4, hw=(40, 40))


@pytest.fixture(scope="module")
def sdxl_like(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Tiny weights whose own config has SDXL's scaling factor (not any preset's default for their shape)."""
    torch.manual_seed(0)
    out = tmp_path_factory.mktemp("weights") / "vae"
    klvae.AutoencoderKL(klvae.get_preset("tiny").replace(scaling_factor=SDXL_SCALE)).save_pretrained(out)
    return out


def _sets(tmp: Path, data: Path, *overrides: str) -> list[str]:
    return ["model.preset=tiny", f"data.train={data}", "data.resolution=32", "data.batch_size=2",
            "data.num_workers=0", "train.log_every=1", "train.val_every=1000", "train.ckpt_every=1000",
            "train.max_steps=1", f"train.out_dir={tmp / 'run'}", "train.device=cpu", "optim.lr=1e-3",
            "loss.preset=mse", *overrides]


def _one_error_line(capsys: pytest.CaptureFixture[str]) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("klvae: error: "), err
    return err[0]


# ---- 1: model.overrides apply to the pretrained weights' own config ----------------------------------------------
def test_overrides_change_the_pretrained_config_not_a_preset(tmp_path: Path, images: Path, sdxl_like: Path) -> None:
    # The preset is left at its default (sd15): it used to be the base of the overrides, which the weights do not fit.
    cfg = load_config(None, [*_sets(tmp_path, images, f"model.pretrained={sdxl_like}", "model.decoder_only=true",
                                    "model.overrides.force_upcast=false")[1:]])
    assert cfg.model.preset == "sd15"
    tr = Trainer(cfg)
    assert tr.vae.config.scaling_factor == SDXL_SCALE and tr.vae.config.force_upcast is False
    saved = klvae.AutoencoderKL.from_pretrained(sdxl_like)
    assert all(torch.equal(a, b) for a, b in zip(tr.vae.state_dict().values(), saved.state_dict().values(),
                                                  strict=True))
    fit(tr)
    final = json.loads((tmp_path / "run" / "final" / "config.json").read_text())
    assert final["scaling_factor"] == SDXL_SCALE and final["force_upcast"] is False
    # What a checkpoint stores as the model's config (for `--model step_*.pt` and resume) says the same.
    model_config = json.loads(tr.state_dict()["model_config"])
    assert model_config["scaling_factor"] == SDXL_SCALE and model_config["force_upcast"] is False


def test_an_override_the_weights_do_not_fit_is_one_line_naming_model_overrides(tmp_path: Path, images: Path,
                                                                                sdxl_like: Path) -> None:
    cfg = load_config(None, _sets(tmp_path, images, f"model.pretrained={sdxl_like}",
                                  "model.overrides.latent_channels=8"))
    with pytest.raises(KlvaeError, match=r"model\.overrides latent_channels do not fit model\.pretrained") as e:
        build_model(cfg)
    assert "\n" not in str(e.value)


def test_print_config_leaves_out_the_preset_a_pretrained_run_does_not_use(capsys: pytest.CaptureFixture[str],
                                                                          caplog: pytest.LogCaptureFixture) -> None:
    import yaml

    assert main(["train", "--print-config", "--set", "data.train=x", "--set", "model.pretrained=some/vae"]) == 0
    printed = yaml.safe_load(capsys.readouterr().out)
    assert "preset" not in printed["model"] and printed["model"]["pretrained"] == "some/vae"
    with caplog.at_level(logging.WARNING):
        load_config(None, ["data.train=x", "model.pretrained=some/vae", "model.preset=sdxl"])
    assert any("model.preset 'sdxl' is unused with model.pretrained" in r.getMessage() for r in caplog.records)


# ---- 2: a config given to --resume --------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["ft.yaml", "ft.YML", "ft.toml"])
def test_a_config_after_resume_says_to_put_it_first(name: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["train", "--resume", name]) == 2
    line = _one_error_line(capsys)
    assert "is a config file" in line and "klvae train CONFIG --resume [CHECKPOINT]" in line, line


# ---- 3: parse errors keep their place -----------------------------------------------------------------------------
def test_a_yaml_syntax_error_names_its_line_and_column(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("data:\n  train: x\ntrain: max_steps: 5\n")
    with pytest.raises(KlvaeError, match=r"mapping values are not allowed here \(line 3, column 17\)"):
        load_config(bad)
    toml = tmp_path / "bad.toml"
    toml.write_text("[data]\ntrain = \n")
    with pytest.raises(KlvaeError, match=r"line 2, column 9"):
        load_config(toml)


# ---- 4: a section set to a value ----------------------------------------------------------------------------------
@pytest.mark.parametrize("sets", [["train=5"], ["train=5", "train.out_dir=x"]])
def test_a_section_set_to_a_value_is_named_as_a_section(sets: list[str]) -> None:
    with pytest.raises(KlvaeError, match=r"train is a section and cannot be set to a value \(got 5\)") as e:
        load_config(None, ["data.train=x", *sets])
    assert "train. must" not in str(e.value)  # the section's name without a stray dot
    assert "out_dir" not in str(e.value)  # the valid override is not blamed


def test_a_section_given_a_value_in_the_file_does_not_blame_a_later_override(tmp_path: Path) -> None:
    f = tmp_path / "c.yaml"
    f.write_text("data:\n  train: x\ntrain: 5\n")
    for sets in ([], ["train.out_dir=x"]):
        with pytest.raises(KlvaeError, match=r"^train is a section and cannot be set to a value \(got 5\)"):
            load_config(f, sets)


# ---- 5: surprising settings are said ------------------------------------------------------------------------------
def test_decoder_only_from_scratch_warns(tmp_path: Path, images: Path, caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING):
        Trainer(load_config(None, _sets(tmp_path, images, "model.decoder_only=true")))
    assert any("randomly initialised encoder" in r.getMessage() for r in caplog.records)


def test_a_random_vgg_for_the_perceptual_loss_is_said() -> None:
    from klvae.training.config import surprises

    cfg = load_config(None, ["data.train=x", "model.preset=tiny", "data.resolution=32",
                             "loss.lpips_pretrained=false", "loss.perceptual_weight=0.5"])
    assert any("random VGG" in w for w in surprises(cfg))
    quiet = load_config(None, ["data.train=x", "model.preset=tiny", "data.resolution=32",
                               "loss.lpips_pretrained=false", "loss.perceptual_weight=0", "loss.disc_start=0"])
    assert surprises(quiet) == []


# ---- 6: validation without LPIPS ---------------------------------------------------------------------------------
def test_val_lpips_false_validates_without_fetching_vgg(tmp_path: Path, images: Path,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    def no_fetch(*args: object) -> None:
        raise AssertionError("validation fetched the LPIPS weights")

    monkeypatch.setattr(validate_mod, "_pretrained_lpips", no_fetch)
    tr = Trainer(load_config(None, _sets(tmp_path, images, f"data.val={images}", "train.val_every=1",
                                         "train.val_lpips=false")))
    assert tr.lpips_files() is None
    fit(tr)
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    val = [r for r in rows if r["split"] == "val"]
    assert val and "psnr" in val[0] and "lpips" not in val[0]


# ---- 7: resuming with a changed config ----------------------------------------------------------------------------
def test_resume_with_a_changed_config_warns_once_listing_the_changes(tmp_path: Path, images: Path,
                                                                     caplog: pytest.LogCaptureFixture) -> None:
    fit(Trainer(load_config(None, _sets(tmp_path, images, "train.ckpt_every=1"))))
    changed = _sets(tmp_path, images, "train.max_steps=2", "train.ckpt_every=5", "optim.lr=2e-3",
                    "data.batch_size=1", "loss.pixel_weight=2")
    with caplog.at_level(logging.WARNING):
        assert Trainer(load_config(None, changed)).resume()
    warnings = [r.getMessage() for r in caplog.records if "differs from the checkpoint" in r.getMessage()]
    assert len(warnings) == 1, warnings
    assert "optim.lr 0.001 → 0.002" in warnings[0] and "data.batch_size 2 → 1" in warnings[0]
    assert "loss.pixel_weight 1.0 → 2.0" in warnings[0]
    assert "max_steps" not in warnings[0] and "ckpt_every" not in warnings[0]
    caplog.clear()
    with caplog.at_level(logging.WARNING):  # the same config, its loss spelled out differently: no warning
        assert Trainer(load_config(None, _sets(tmp_path, images, "train.max_steps=3", "loss.pixel_weight=1"))).resume()
    assert not [r for r in caplog.records if "differs from the checkpoint" in r.getMessage()]


def test_a_checkpoint_without_a_stored_config_resumes_without_a_warning() -> None:
    from klvae.training.trainer import config_changes

    cfg = load_config(None, ["data.train=x", "model.preset=tiny", "data.resolution=32"])
    assert config_changes(None, cfg) == [] and config_changes("not json", cfg) == []
    old = cfg.to_dict()
    del old["train"]["seed"]  # a field added since: not a change
    old["optim"]["lr"] = 1.0
    assert config_changes(json.dumps(old), cfg) == [f"optim.lr 1.0 → {cfg.optim.lr}"]
