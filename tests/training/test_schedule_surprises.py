"""Step counts that leave part of the recipe unreached are said once, at the start of the run (earlier left alone:
warm-up past max_steps was silent; the LDM preset's disc_start 50001 over a 1000-step run built a critic that never
trained, without a word)."""
from __future__ import annotations

import pytest

from klvae.training.config import load_config, surprises

BASE = ["data.train=x", "model.preset=tiny", "data.resolution=32"]


@pytest.mark.parametrize(("start", "steps", "said"), [(50001, 1000, True), (1000, 1000, True), (999, 1000, False)])
def test_a_critic_that_never_starts_is_said(start: int, steps: int, said: bool) -> None:
    cfg = load_config(None, [*BASE, f"loss.disc_start={start}", f"train.max_steps={steps}"])
    assert any("never trains" in w for w in surprises(cfg)) is said


def test_no_critic_no_word_about_its_start() -> None:
    for off in ("loss.disc_weight=0", "loss.disc_factor=0", "loss.preset=mse"):
        assert surprises(load_config(None, [*BASE, "train.max_steps=10", off])) == []


@pytest.mark.parametrize(("warmup", "said"), [(11, True), (10, False), (0, False)])
def test_a_warm_up_longer_than_the_run_is_said(warmup: int, said: bool) -> None:
    cfg = load_config(None, [*BASE, "loss.preset=mse", "train.max_steps=10", f"optim.warmup_steps={warmup}"])
    found = [w for w in surprises(cfg) if "warmup_steps" in w]
    assert bool(found) is said
    if said:
        assert "0.909 of it" in found[0]


def test_a_mapping_override_merges_into_the_files_section(tmp_path) -> None:
    # Earlier left alone: `--set 'train={seed: 1}'` replaced the file's whole train section, silently dropping
    # its out_dir and max_steps for the defaults.
    f = tmp_path / "run.yaml"
    f.write_text("train: {out_dir: runs/mine, max_steps: 7}\nloss: {preset: mse, kl_weight: 0.5}\n")
    cfg = load_config(f, [*BASE, "train={seed: 1}", "loss={kl_weight: 0.25}", "model.overrides={scaling_factor: 0.5}"])
    assert (cfg.train.out_dir, cfg.train.max_steps, cfg.train.seed) == ("runs/mine", 7, 1)
    assert cfg.loss == {"preset": "mse", "kl_weight": 0.25}
    assert cfg.model.overrides == {"scaling_factor": 0.5}


def test_a_resolution_under_lpips_minimum_is_refused_with_the_perceptual_term_only() -> None:
    # The loss hunt's follow-up: LPIPS's VGG needs 16 px a side; below, the first step failed inside its pooling.
    from klvae.errors import KlvaeError

    tiny = ["data.train=x", "model.preset=tiny", "data.resolution=8", "loss.disc_weight=0"]
    with pytest.raises(KlvaeError, match=r"^data.resolution 8 is too small for the LPIPS term"):
        load_config(None, [*tiny, "loss.perceptual_weight=0.1"])
    assert load_config(None, [*tiny, "loss.perceptual_weight=0"]).data.resolution == 8


def test_explicit_lpips_files_are_no_random_vgg() -> None:
    # The "random VGG" surprise fired though both files given are loaded whatever lpips_pretrained says.
    both = [*BASE, "loss.disc_weight=0", "loss.lpips_pretrained=false", "loss.lpips_vgg_path=v.pth",
            "loss.lpips_lin_path=l.pth"]
    assert not [w for w in surprises(load_config(None, both)) if "random VGG" in w]
    assert [w for w in surprises(load_config(None, both[:-1])) if "random VGG" in w]
