"""DiagonalGaussian against the closed forms."""

import math

import pytest
import torch

from klvae.posterior import DiagonalGaussian


def _moments(seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(2, 8, 3, 5, generator=g, dtype=torch.float64)


def test_split_clamp_std_var() -> None:
    m = _moments()
    m[:, 4:] = m[:, 4:] * 30  # push logvar past both bounds
    d = DiagonalGaussian(m)
    torch.testing.assert_close(d.mean, m[:, :4])
    assert d.logvar.min() >= -30 and d.logvar.max() <= 20
    torch.testing.assert_close(d.var, torch.exp(m[:, 4:].clamp(-30, 20)))
    torch.testing.assert_close(d.std, torch.exp(0.5 * m[:, 4:].clamp(-30, 20)))
    assert torch.equal(d.mode(), d.mean)


def test_sample_is_reparameterised_and_seeded() -> None:
    d = DiagonalGaussian(_moments())
    g1, g2 = torch.Generator().manual_seed(7), torch.Generator().manual_seed(7)
    s1, s2 = d.sample(g1), d.sample(g2)
    assert torch.equal(s1, s2)
    eps = torch.randn(d.mean.shape, generator=torch.Generator().manual_seed(7), dtype=d.mean.dtype)
    torch.testing.assert_close(s1, d.mean + d.std * eps)
    m = _moments().requires_grad_()
    DiagonalGaussian(m).sample().sum().backward()
    assert (m.grad[:, :4] == 1).all() and m.grad[:, 4:].abs().sum() > 0


def test_sample_draws_on_the_generators_device(device: torch.device, monkeypatch: pytest.MonkeyPatch) -> None:
    # A CPU generator must serve moments on any device (torch.randn refuses a generator of another device) and
    # give the same noise there; on a CPU-only run the moments sit on the meta device to see the routing.
    cpu = DiagonalGaussian(_moments())
    expected = cpu.sample(torch.Generator().manual_seed(3))
    where = device if device.type != "cpu" else torch.device("meta")
    d = DiagonalGaussian(_moments().to(where))
    seen = []
    randn = torch.randn
    monkeypatch.setattr(torch, "randn", lambda *a, **k: seen.append(k["device"]) or randn(*a, **k))
    z = d.sample(torch.Generator().manual_seed(3))
    assert seen == [torch.device("cpu")] and z.device.type == where.type
    if where.type != "meta":
        torch.testing.assert_close(z.cpu(), expected)


def test_sample_statistics() -> None:
    m = torch.zeros(1, 2, 200, 200, dtype=torch.float64)
    m[:, 0] = 1.5
    m[:, 1] = math.log(0.25)
    s = DiagonalGaussian(m).sample(torch.Generator().manual_seed(0))
    assert abs(s.mean().item() - 1.5) < 0.01
    assert abs(s.std().item() - 0.5) < 0.01


def test_kl_against_standard_normal_closed_form() -> None:
    d = DiagonalGaussian(_moments())
    mu, lv = d.mean, d.logvar
    ref = 0.5 * (mu**2 + lv.exp() - 1 - lv).sum(dim=(1, 2, 3))
    torch.testing.assert_close(d.kl(), ref)
    assert torch.allclose(DiagonalGaussian(torch.zeros(1, 8, 2, 2)).kl(), torch.zeros(1))


def test_kl_between_two_gaussians_closed_form() -> None:
    p, q = DiagonalGaussian(_moments(0)), DiagonalGaussian(_moments(1))
    ref = (q.logvar - p.logvar) / 2 + (p.var + (p.mean - q.mean) ** 2) / (2 * q.var) - 0.5
    torch.testing.assert_close(p.kl(q), ref.sum(dim=(1, 2, 3)))
    torch.testing.assert_close(p.kl(p), torch.zeros(2, dtype=torch.float64))


def test_nll_closed_form_and_against_torch_distributions() -> None:
    d = DiagonalGaussian(_moments())
    x = torch.randn_like(d.mean)
    ref = -torch.distributions.Normal(d.mean, d.std).log_prob(x).sum(dim=(1, 2, 3))
    torch.testing.assert_close(d.nll(x), ref)


def test_deterministic_variant() -> None:
    d = DiagonalGaussian(_moments()).to_deterministic()
    assert torch.equal(d.sample(), d.mean)
    assert torch.equal(d.kl(), torch.zeros(2, dtype=torch.float64))
    assert torch.equal(d.nll(d.mean), torch.zeros(2, dtype=torch.float64))


def test_odd_channel_count_is_refused() -> None:
    with pytest.raises(ValueError, match="even"):
        DiagonalGaussian(torch.zeros(1, 3, 2, 2))
