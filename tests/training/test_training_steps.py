"""Per-step state of training: the weights' EMA (LDM's and diffusers' decay warm-up) and the posterior noise seeds."""

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from klvae.training.config import load_config
from klvae.training.ema import ema_decay_at, make_ema
from klvae.training.trainer import Trainer


def test_decay_warms_up_as_ldm_and_diffusers_do() -> None:
    assert ema_decay_at(0.9999, 1, True) == pytest.approx(2 / 11)  # diffusers' EMAModel at its second step
    assert ema_decay_at(0.9999, 90, True) == pytest.approx(91 / 100)
    assert ema_decay_at(0.99, 10_000, True) == 0.99
    assert ema_decay_at(0.9999, 1, False) == 0.9999


@pytest.mark.parametrize("warmup", [True, False])
def test_ema_follows_the_recursion_by_hand(warmup: bool) -> None:
    net = torch.nn.Linear(3, 2)
    ema = make_ema(net, 0.95, warmup)
    want = None
    for n in range(6):
        with torch.no_grad():
            net.weight.add_(torch.randn_like(net.weight))
        w = net.weight.detach().clone()
        # The first update copies; the n-th after it moves by 1 - decay(n).
        d = ema_decay_at(0.95, n, warmup)
        want = w if want is None else d * want + (1 - d) * w
        ema.update_parameters(net)
        torch.testing.assert_close(ema.module.weight, want, rtol=1e-6, atol=1e-6)


def test_the_trainer_warms_its_ema_up(tmp_path: Path) -> None:
    data = tmp_path / "images"
    data.mkdir()
    rng = np.random.default_rng(0)
    for i in range(2):
        Image.fromarray(rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)).save(data / f"{i}.png")
    sets = ["model.preset=tiny", f"data.train={data}", "data.resolution=16", "data.batch_size=2",
            "data.num_workers=0", "loss.preset=mse", "train.device=cpu", f"train.out_dir={tmp_path / 'run'}",
            "train.ema_decay=0.999", "optim.lr=0.01"]
    tr = Trainer(load_config(None, sets))
    batch = torch.rand(2, 3, 16, 16) * 2 - 1
    seen = []
    for _ in range(3):
        tr.train_step([batch])
        seen.append([p.detach().clone() for p in tr.vae.parameters()])
    # Steps 1, 2, 3: a copy of w1, then decays 2/11 and 3/12 (0.999 from the start would keep w1 almost whole).
    for got, w1, w2, w3 in zip(tr.ema.module.parameters(), *seen, strict=True):
        want = (2 / 11 * w1 + 9 / 11 * w2) * 3 / 12 + 9 / 12 * w3
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("accum", [1, 4, 150])
def test_posterior_noise_seeds_differ_for_every_micro_batch(tmp_path: Path, accum: int) -> None:
    sets = ["model.preset=tiny", "data.train=x", "data.resolution=16", "loss.preset=mse", "train.device=cpu",
            f"optim.grad_accum={accum}", f"train.out_dir={tmp_path / 'run'}"]
    tr = Trainer(load_config(None, sets))
    seeds = [tr.noise_seed(step, micro) for step in range(3) for micro in range(accum)]
    assert len(set(seeds)) == len(seeds)  # grad_accum 150 reused step 1's seeds in step 0's micro-batches
    assert tr.noise_seed(1, 0) - tr.noise_seed(0, 0) == max(101, accum)  # up to 101: the noise it always had


def test_posterior_noise_seeds_follow_train_seed(tmp_path: Path) -> None:
    # Another train.seed must draw other posterior noise: the seed is part of every micro-batch's noise seed.
    sets = ["model.preset=tiny", "data.train=x", "data.resolution=16", "loss.preset=mse", "train.device=cpu",
            "train.seed=7", f"train.out_dir={tmp_path / 'run'}"]
    tr = Trainer(load_config(None, sets))
    assert tr.noise_seed(2, 3) == 7 * 1_000_003 + 2 * 101 + 3
    mine = {tr.noise_seed(step, micro) for step in range(3) for micro in range(4)}
    tr.cfg.train.seed = 8
    assert mine.isdisjoint(tr.noise_seed(step, micro) for step in range(3) for micro in range(4))
