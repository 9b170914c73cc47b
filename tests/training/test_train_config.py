"""The training config's checks: every field typed and in range, named in one line, without building a model."""

from pathlib import Path

import pytest

from klvae.cli.main import main
from klvae.errors import KlvaeError
from klvae.training.config import MAX_RESOLUTION, TrainConfig, load_config

BASE = ["data.train=somewhere", "model.preset=tiny", "data.resolution=32"]


def _load(*overrides: str) -> TrainConfig:
    return load_config(None, [*BASE, *overrides])


@pytest.mark.parametrize(
    ("override", "message"),
    [
        # Division by zero in the loop.
        ("train.log_every=0", r"train\.log_every must be at least 1, got 0"),
        ("train.ckpt_every=0", r"train\.ckpt_every must be at least 1, got 0"),
        ("train.val_every=0", r"train\.val_every must be at least 1, got 0"),
        # Betas: float() of each character, of an int, or a one-element tuple for AdamW.
        ("optim.betas=abc", r"optim\.betas must be a list of 2 numbers, got 'abc'"),
        ("optim.betas=5", r"optim\.betas must be a list of 2 numbers, got 5"),
        ("optim.betas=[0.9]", r"optim\.betas must be a list of 2 numbers, got \[0\.9\]"),
        ("optim.betas=[0.9, 1.0]", r"optim\.betas must be two numbers in \[0, 1\)"),
        ("optim.lr=-1", r"optim\.lr must be at least 0, got -1\.0"),
        ("optim.lr=.nan", r"optim\.lr must be a finite number"),
        ("optim.weight_decay=-0.1", r"optim\.weight_decay must be at least 0"),
        ("optim.warmup_steps=-5", r"optim\.warmup_steps must be at least 0, got -5"),
        ("optim.grad_clip=-1", r"optim\.grad_clip must be at least 0 \(0 disables clipping\)"),
        ("train.ema_decay=2", r"train\.ema_decay must be in \[0, 1\)"),
        ("train.ema_decay=1", r"train\.ema_decay must be in \[0, 1\)"),
        ("train.max_nonfinite=-1", r"train\.max_nonfinite must be at least 1, got -1"),
        ("train.seed=-1", r"train\.seed must be in \[0, 2\*\*32\)"),
        ("data.num_workers=-1", r"data\.num_workers must be at least 0"),
        ("data.flip=2", r"data\.flip must be a probability in \[0, 1\]"),
        ("data.crop=middle", r"data\.crop must be one of center, random, got 'middle'"),
        # A bool is an int to Python: `max_steps: true` ran one step.
        ("train.max_steps=true", r"train\.max_steps must be int, got True"),
        ("data.batch_size=false", r"data\.batch_size must be int, got False"),
        ("optim.lr=true", r"optim\.lr must be float, got True"),
        # OOM-killed at 100000; the model needs multiples of its downsample factor (2 for tiny).
        ("data.resolution=100000", rf"data\.resolution must be between 1 and {MAX_RESOLUTION}"),
        ("data.resolution=0", r"data\.resolution must be between 1 and"),
        ("data.resolution=33", r"data\.resolution must be a multiple of 2 \(the model's downsample factor\)"),
        ("model.preset=foo", r"model\.preset must be one of sd15, .*tiny-f8, got 'foo'"),
        ("model.overrides=5", r"model\.overrides must be a mapping .*got 5"),
        ("model.overrides.foo=1", r"unknown model\.overrides field\(s\) foo; known: in_channels"),
        ("model.overrides.block_out_channels=abc", r"model\.overrides: block_out_channels must be a list"),
        ("model.overrides.norm_num_groups=0", r"model\.overrides: norm_num_groups must be a positive integer"),
        ("loss=ldm", r"config field loss must be a mapping \(set its keys as loss\.KEY=VALUE\), got 'ldm'"),
        ("loss.preset=[ldm]", r"loss\.preset must be one of ldm, ft-mse, mse"),
        ("loss.preset=foo", r"unknown loss preset 'foo'"),
        ("loss.kl_wieght=1", r"unknown loss field\(s\) loss\.kl_wieght"),
        ("loss.learn_logvar=maybe", r"loss\.learn_logvar must be true or false"),
        # A nan weight made every step non-finite; 1e400 overflowed int(); 1.5 steps were cut to 1.
        ("loss.kl_weight=.nan", r"loss\.kl_weight must be a finite number, got nan"),
        ("loss.disc_weight=.inf", r"loss\.disc_weight must be a finite number, got inf"),
        ("loss.disc_start=1e400", r"loss\.disc_start must be a finite number, got '1e400'"),
        ("loss.disc_start=1.5", r"loss\.disc_start must be a whole number, got 1\.5"),
        ("loss.lpips_vgg_path=5", r"config field loss\.lpips_vgg_path must be str, got 5"),
        ("train.x=[", r"override 'train\.x=\[': cannot parse the value"),
    ],
)
def test_bad_values_are_named_with_their_range(override: str, message: str) -> None:
    with pytest.raises(KlvaeError, match=message) as e:
        _load(override)
    assert "\n" not in str(e.value)


def test_edge_values_that_mean_something_are_accepted() -> None:
    cfg = _load("optim.grad_clip=0", "train.ema_decay=0", "data.num_workers=0", "optim.lr=0", "optim.betas=[0, 0.999]",
                "train.max_steps=5.0", f"data.resolution={MAX_RESOLUTION - 1}", "model.overrides.layers_per_block=2")
    assert (cfg.optim.grad_clip, cfg.optim.betas, cfg.train.max_steps) == (0.0, (0.0, 0.999), 5)


def test_pretrained_weights_keep_their_own_architecture() -> None:
    # Their downsample factor is unknown until they are read: the trainer checks the resolution then.
    cfg = load_config(None, ["data.train=x", "model.pretrained=some/folder", "data.resolution=36"])
    assert cfg.model.pretrained == "some/folder"
    with pytest.raises(KlvaeError, match=r"model\.preset must be one of"):
        load_config(None, ["data.train=x", "model.pretrained=some/folder", "model.preset=nope"])


@pytest.mark.parametrize("override", ["train.log_every=0", "optim.betas=abc", "model.overrides.norm_num_groups=0",
                                      "loss=ldm", "data.resolution=100000", "loss.disc_start=1e400"])
def test_the_train_command_reports_one_line(override: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    args = ["train", "--print-config", *[a for o in (*BASE, override) for a in ("--set", o)]]
    assert main(args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("klvae: error: "), err


@pytest.mark.parametrize("device", ["meta", "cuda:99", "nonsense"])
def test_a_device_that_cannot_train_is_one_line(device: str, tmp_path: Path,
                                                 capsys: pytest.CaptureFixture[str]) -> None:
    sets = [a for o in (*BASE, f"train.device={device}", f"train.out_dir={tmp_path / 'run'}") for a in ("--set", o)]
    assert main(["train", *sets]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("klvae: error: train.device "), err
    assert not (tmp_path / "run").exists()


def test_an_out_dir_that_is_a_file_is_one_line_before_the_work(tmp_path: Path,
                                                               capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "run").write_text("mine")
    sets = [a for o in (*BASE, f"train.out_dir={tmp_path / 'run'}") for a in ("--set", o)]
    assert main(["train", *sets]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"klvae: error: train.out_dir {tmp_path / 'run'} is a file, not a folder"], err  # was [Errno 17]
    assert (tmp_path / "run").read_text() == "mine"


def test_a_top_level_list_with_overrides_is_refused(tmp_path: Path) -> None:
    f = tmp_path / "list.yaml"
    f.write_text("- a\n- b\n")
    with pytest.raises(KlvaeError, match="top level must be a mapping"):
        load_config(f, ["train.max_steps=3"])


def test_print_config_spells_out_the_loss_and_loads_back(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    import yaml

    sets = [a for o in (*BASE, "loss.preset=ft-mse", "loss.kl_weight=1e-5") for a in ("--set", o)]
    assert main(["train", "--print-config", *sets]) == 0
    printed = yaml.safe_load(capsys.readouterr().out)
    loss = printed["loss"]
    assert loss["preset"] == "ft-mse" and loss["kl_weight"] == 1e-5
    assert {"pixel_loss", "disc_weight", "disc_start", "perceptual_weight"} <= loss.keys()  # the preset's fields too
    path = tmp_path / "printed.yaml"
    path.write_text(yaml.safe_dump(printed))
    assert yaml.safe_load(yaml.safe_dump(load_config(path, []).resolved_dict())) == printed
