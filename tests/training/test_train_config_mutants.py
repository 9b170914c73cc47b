"""Pins what a mutation audit of the training config and the `klvae train` command found untested: the loss preset
that resolved_dict and build_loss_config assume when the loss section names none, unknown fields named with their
section and listed as five "and N more", bool fields of the sections, a list as a loss string, the betas' elements,
overrides with spaces, a whole section set as a mapping, a field under a string, a value nested too deeply, a folder
or an empty file as the config, the unused-preset warning and the decoder-only surprise left out when they do not
apply, the size limits' exact boundaries, the data.train and precision messages, the edges of the resolution, flip,
scale, val_images, betas, disc_lr, max_nonfinite and disc_ndf ranges and the critic's message at the deepest layer
count; and the command's default world size, its " data.train=" without a config, the summary printed only on rank
0, and the process group shut down when training fails."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

from helpers import one_error_line
from klvae.cli.main import main
from klvae.distributed import DistInfo
from klvae.errors import KlvaeError
from klvae.training.config import (
    MAX_CONFIG_DEPTH,
    MAX_CONFIG_VALUES,
    MAX_RESOLUTION,
    TrainConfig,
    load_config,
    surprises,
)

BASE = ["data.train=x", "model.preset=tiny", "data.resolution=32"]
# Pretrained weights bring their own downsample factor and mse has no critic: every resolution in range is allowed.
NO_ARCH = ["data.train=x", "model.pretrained=some/vae", "loss.preset=mse"]


def _load(*overrides: str) -> TrainConfig:
    return load_config(None, [*BASE, *overrides])


def _refused(*overrides: str) -> str:
    with pytest.raises(KlvaeError) as e:
        _load(*overrides)
    return str(e.value)


# ---- the loss section --------------------------------------------------------------------------------------------
def test_a_loss_section_without_a_preset_is_the_ldm_preset(tmp_path: Path) -> None:
    f = tmp_path / "c.yaml"
    f.write_text("loss:\n  kl_weight: 1.0e-5\n")
    implicit = load_config(f, BASE).resolved_dict()["loss"]
    explicit = _load("loss.preset=ldm", "loss.kl_weight=1e-5").resolved_dict()["loss"]
    assert implicit == explicit and implicit["preset"] == "ldm"


# ---- fields and their types --------------------------------------------------------------------------------------
def test_an_unknown_field_is_named_with_its_section() -> None:
    assert _refused("train.max_step=7") == "unknown config field(s) train.max_step"


def test_unknown_fields_are_listed_five_then_counted() -> None:
    five = [f"data.f{i}=1" for i in range(5)]
    assert _refused(*five) == "unknown config field(s) data.f0, data.f1, data.f2, data.f3, data.f4"
    assert _refused(*five, "data.f5=1", "data.f6=1").endswith("data.f3, data.f4 and 2 more")


def test_a_list_for_a_loss_string_field_is_named_as_not_a_str() -> None:
    assert _refused("loss.disc_loss=[hinge]") == "config field loss.disc_loss must be str, got ['hinge']"


def test_a_bool_field_of_a_section_takes_only_true_or_false() -> None:
    assert _refused("model.decoder_only=maybe") == "config field model.decoder_only must be true or false, got 'maybe'"
    assert _load("model.decoder_only=true").model.decoder_only is True


def test_each_beta_must_be_a_number() -> None:
    assert _refused("optim.betas=[true, 0.9]") == "config field optim.betas must be float, got True"
    assert _refused("optim.betas=[a, 0.9]") == "config field optim.betas must be float, got 'a'"


def test_a_whole_number_for_a_float_field_becomes_a_float() -> None:
    cfg = _load("optim.lr=1", "train.ema_decay=0")
    assert type(cfg.optim.lr) is float and type(cfg.train.ema_decay) is float
    assert "lr: 1.0\n" in yaml.safe_dump(cfg.resolved_dict())


# ---- overrides ---------------------------------------------------------------------------------------------------
def test_spaces_around_an_override_key_are_ignored() -> None:
    assert _load(" train.max_steps = 3").train.max_steps == 3


def test_a_section_may_be_set_as_a_mapping() -> None:
    cfg = _load("train={max_steps: 3, seed: 5}")
    assert (cfg.train.max_steps, cfg.train.seed, cfg.train.log_every) == (3, 5, 10)


def test_a_section_set_to_a_value_is_named_without_the_keys_spaces() -> None:
    assert _refused(" train=5") == (
        "override ' train=5': train is a section and cannot be set to a value (got 5): "
        "set its fields, as train.FIELD=VALUE"
    )


def test_a_field_under_a_field_names_the_field_that_is_no_section() -> None:
    assert _refused("data.train.sub=1") == "override 'data.train.sub=1': train is not a section"


def test_an_override_without_an_equals_sign_says_the_form() -> None:
    assert _refused("train.max_steps") == "override 'train.max_steps' is not of the form section.field=value"


def test_a_value_nested_too_deeply_is_said_so() -> None:
    assert _refused("train.x=" + "[" * 3000).endswith(": cannot parse the value: nested too deeply")


# ---- the config file ---------------------------------------------------------------------------------------------
def test_a_folder_is_no_config_file(tmp_path: Path) -> None:
    with pytest.raises(KlvaeError, match=r"is a folder, FIFO or device, not a config file$"):
        load_config(tmp_path, BASE)


def test_an_empty_config_file_is_an_empty_config(tmp_path: Path) -> None:
    f = tmp_path / "empty.yaml"
    f.write_text("# nothing yet\n")
    assert load_config(f, BASE).train.max_steps == 1000


def test_pretrained_weights_without_a_preset_do_not_warn_about_it(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.DEBUG):
        load_config(None, ["data.train=x", "model.pretrained=some/vae"])
    assert not [r for r in caplog.records if "unused" in r.getMessage()]


def test_decoder_only_on_pretrained_weights_is_no_surprise() -> None:
    assert surprises(load_config(None, [*NO_ARCH, "model.decoder_only=true"])) == []


# ---- the size limits ---------------------------------------------------------------------------------------------
def _nested(levels: int) -> str:
    return "[" * levels + "x" + "]" * levels


def test_the_size_limit_counts_keys_and_values_up_to_its_exact_maximum() -> None:
    # data.train's list: top mapping 1 + "data" and its mapping 2 + "train" and the list 2 + the items.
    n = MAX_CONFIG_VALUES - 5
    for items, message in ((n, "data.train must be str"), (n + 1, "expands to more than")):
        with pytest.raises(KlvaeError, match=message):
            load_config(None, [f"data.train=[{', '.join(['x'] * items)}]"])


def test_the_depth_limit_is_exact() -> None:
    # The top mapping is level 0, "data" and its mapping level 1, data.train's outermost list level 2.
    levels = MAX_CONFIG_DEPTH - 2
    assert "data.train must be str" in _refused(f"data.train={_nested(levels)}")
    assert "expands to more than" in _refused(f"data.train={_nested(levels + 1)}")


# ---- checks and ranges -------------------------------------------------------------------------------------------
def test_a_config_without_data_train_says_what_to_name() -> None:
    with pytest.raises(KlvaeError) as e:
        load_config(None, [])
    assert str(e.value) == "data.train is not set: name an image folder, dataset or shards"


def test_a_bad_precision_is_named_with_all_three_choices() -> None:
    assert _refused("train.precision=fp64") == "train.precision must be one of fp32, bf16, fp16, got 'fp64'"


@pytest.mark.parametrize("resolution", [1, MAX_RESOLUTION])
def test_the_resolution_range_includes_both_ends(resolution: int) -> None:
    assert load_config(None, [*NO_ARCH, f"data.resolution={resolution}"]).data.resolution == resolution


@pytest.mark.parametrize(
    "sets",
    [
        ["data.flip=0"],
        ["data.val_images=1"],
        ["train.max_nonfinite=1"],
        ["data.scale_min=0.5", "data.scale_max=0.5"],
        ["loss.disc_ndf=1024"],
    ],
)
def test_the_edges_of_the_ranges_are_accepted(sets: list[str]) -> None:
    _load(*sets, "data.resolution=32")


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("data.scale_min=0", "data.scale_min must be in (0, 1], got 0.0"),
        ("data.scale_max=1.5", "data.scale_max must be in [data.scale_min, 1], got 1.5"),
        ("optim.disc_lr=-1", "optim.disc_lr must be at least 0, got -1.0"),
        ("optim.betas=[-0.1, 0.9]", "optim.betas must be two numbers in [0, 1), got [-0.1, 0.9]"),
    ],
)
def test_values_just_outside_the_ranges_are_refused(override: str, message: str) -> None:
    assert _refused(override) == message


def test_the_deepest_critic_still_gets_a_resolution_to_reach() -> None:
    n = MAX_RESOLUTION.bit_length()
    assert f"i.e. a resolution at least {3 * 2**n};" in _refused(f"loss.disc_num_layers={n}")
    assert f"i.e. a resolution above {MAX_RESOLUTION};" in _refused(f"loss.disc_num_layers={n + 1}")


# ---- the train command -------------------------------------------------------------------------------------------
def test_without_torchrun_the_data_check_counts_one_process(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    monkeypatch.delenv("RANK", raising=False)
    data = tmp_path / "few"
    data.mkdir()
    for i in range(3):
        Image.fromarray(np.full((16, 16, 3), i * 40, dtype=np.uint8)).save(data / f"{i}.png")
    sets = [
        *BASE[1:],
        f"data.train={data}",
        "data.resolution=16",
        "data.batch_size=4",
        "data.num_workers=0",
        "loss.preset=mse",
        "train.device=cpu",
        f"train.out_dir={tmp_path / 'run'}",
    ]
    assert main(["train", *(a for s in sets for a in ("--set", s))]) == 2
    assert "(data.batch_size 4 x 1 process(es)): set data.batch_size to 3 or less" in one_error_line(
        capsys.readouterr().err
    )


def test_data_train_with_spaces_before_it_is_enough_without_a_config(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["train", "--print-config", "--set", " data.train=x"]) == 0
    assert yaml.safe_load(capsys.readouterr().out)["data"]["train"] == "x"


class _FakeTrainer:
    main_rank = True

    def __init__(self, cfg: Any, resumed: object = None) -> None:
        self.step = 3
        # One process whose rank says main or not: no collective runs (the run lock's included).
        self.dist = DistInfo(rank=0 if self.main_rank else 1, world=1)
        self.out, self.device = Path(cfg.train.out_dir), torch.device("cpu")


def _fake_run(monkeypatch: pytest.MonkeyPatch, fit: object, main_rank: bool) -> list[object]:
    """Stand-ins for the trainer, fit and shutdown; returns the list shutdown appends to."""
    import klvae.distributed
    import klvae.training.loop
    import klvae.training.trainer
    from klvae.cli import train as train_cli

    shut: list[object] = []
    monkeypatch.setattr(train_cli, "check_inputs", lambda cfg, resume: None)
    monkeypatch.setattr(_FakeTrainer, "main_rank", main_rank)
    monkeypatch.setattr(klvae.training.trainer, "Trainer", _FakeTrainer)
    monkeypatch.setattr(klvae.training.loop, "fit", fit)
    monkeypatch.setattr(klvae.distributed, "shutdown", shut.append)
    return shut


def test_only_rank_0_prints_the_summary(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    shut = _fake_run(monkeypatch, lambda trainer: {"loss": 0.5}, main_rank=False)
    assert main(["train", "--set", "data.train=x", "--set", f"train.out_dir={tmp_path / 'run'}"]) == 0
    assert capsys.readouterr().out == "" and len(shut) == 1


def test_a_failed_run_still_shuts_the_process_group_down(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    def fail(trainer: object) -> dict[str, float]:
        raise KlvaeError("the data went away")

    shut = _fake_run(monkeypatch, fail, main_rank=True)
    assert main(["train", "--set", "data.train=x", "--set", f"train.out_dir={tmp_path / 'run'}"]) == 2
    assert one_error_line(capsys.readouterr().err) == "klvae: error: the data went away"
    assert len(shut) == 1
