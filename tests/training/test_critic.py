"""LDM's PatchGAN critic: its layer layout, ActNorm's data-dependent init (also agreed across DDP ranks) and the
DCGAN weight init's statistics."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
from torch import nn

from klvae.training.losses import ActNorm, NLayerDiscriminator, weights_init


def test_patchgan_shapes_and_layout() -> None:
    d = NLayerDiscriminator(input_nc=3, ndf=8, n_layers=3)
    assert d(torch.randn(2, 3, 64, 64)).shape == (2, 1, 6, 6)
    assert d.main[2].bias is None and isinstance(d.main[3], nn.BatchNorm2d)
    assert [m.out_channels for m in d.main if isinstance(m, nn.Conv2d)] == [8, 16, 32, 64, 1]
    assert {m.negative_slope for m in d.main if isinstance(m, nn.LeakyReLU)} == {0.2}  # LDM's PatchGAN
    a = NLayerDiscriminator(ndf=8, use_actnorm=True)
    assert a(torch.randn(2, 3, 64, 64)).shape == (2, 1, 6, 6)
    assert isinstance(a.main[3], ActNorm) and a.main[2].bias is not None


_ACTNORM_RANKS = """
import sys, torch, torch.distributed as dist
from klvae.training.losses import ActNorm
dist.init_process_group("gloo")
r = dist.get_rank()
x = torch.randn(4, 3, 5, 5, generator=torch.Generator().manual_seed(r)) * (r + 1) + 10 * r
norm = ActNorm(3)
norm(x)
torch.save({"x": x, "loc": norm.loc.detach(), "scale": norm.scale.detach()}, f"{sys.argv[1]}/rank{r}.pt")
dist.destroy_process_group()
"""


def test_actnorm_under_ddp_takes_the_ranks_average(tmp_path: Path) -> None:
    # DDP broadcasts parameters only when it wraps the model: a data-dependent init must agree across ranks.
    import subprocess

    script = tmp_path / "actnorm.py"
    script.write_text(_ACTNORM_RANKS)
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                        str(script), str(tmp_path)], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    ranks = [torch.load(tmp_path / f"rank{i}.pt") for i in (0, 1)]
    stats = [(d["x"].transpose(0, 1).reshape(3, -1).mean(1), d["x"].transpose(0, 1).reshape(3, -1).std(1))
             for d in ranks]
    mean, std = (stats[0][0] + stats[1][0]) / 2, (stats[0][1] + stats[1][1]) / 2
    for d in ranks:
        torch.testing.assert_close(d["loc"].flatten(), -mean)
        torch.testing.assert_close(d["scale"].flatten(), 1 / (std + 1e-6))


def test_actnorm_data_dependent_init() -> None:
    torch.manual_seed(0)
    norm = ActNorm(4)
    x = torch.randn(8, 4, 5, 5) * torch.tensor([1.0, 3.0, 0.5, 2.0]).view(1, 4, 1, 1) + 7.0
    y = norm(x)
    assert torch.allclose(y.mean(dim=(0, 2, 3)), torch.zeros(4), atol=1e-5)
    assert torch.allclose(y.std(dim=(0, 2, 3)), torch.ones(4), atol=1e-4)
    loc = norm.loc.detach().clone()
    norm(x * 5)
    assert torch.equal(norm.loc, loc) and norm.initialized.item() == 1  # initialised once only
    fresh = ActNorm(4).eval()
    assert torch.equal(fresh(x), x)  # eval mode never initialises


def test_weights_init_statistics() -> None:
    torch.manual_seed(0)
    d = NLayerDiscriminator(ndf=64).apply(weights_init)
    conv = torch.cat([m.weight.flatten() for m in d.modules() if isinstance(m, nn.Conv2d)])
    assert abs(conv.mean().item()) < 1e-3 and conv.std().item() == pytest.approx(0.02, rel=0.02)
    bns = [m for m in d.modules() if isinstance(m, nn.BatchNorm2d)]
    w = torch.cat([m.weight.flatten() for m in bns])
    assert w.mean().item() == pytest.approx(1.0, abs=0.005) and w.std().item() == pytest.approx(0.02, rel=0.2)
    assert all(torch.count_nonzero(m.bias) == 0 for m in bns)
