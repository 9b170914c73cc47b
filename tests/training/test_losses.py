"""The training losses: each term against a hand computation, LPIPS loading and offline failure (the critic:
test_critic.py)."""

from __future__ import annotations

import math
import sys
import urllib.error
from pathlib import Path

import pytest
import torch
from torch import nn

from klvae.errors import KlvaeError, WeightsError
from klvae.nets import lpips as lpips_mod
from klvae.nets import pretrained as pretrained_mod
from klvae.nets.lpips import TAP_CHANNELS, VGG16Features
from klvae.posterior import DiagonalGaussian
from klvae.training.losses import (
    LPIPS,
    ActNorm,
    AutoencoderLoss,
    LossConfig,
    adaptive_weight,
    adopt_weight,
    gaussian_nll,
    generator_adversarial_loss,
    get_loss_preset,
    hinge_d_loss,
    kl_loss,
    pixel_loss,
    vanilla_d_loss,
)

# Kept before the autouse fixture stubs them out, for the tests that exercise the real lookup and download.
_real_installed_lpips_lin = lpips_mod.installed_lpips_lin
_real_download = pretrained_mod.download


@pytest.fixture(autouse=True)
def offline(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """No test may reach the network or a real hub cache."""

    def refuse(*args: object, **kwargs: object) -> None:
        raise urllib.error.URLError("network disabled in tests")

    monkeypatch.setattr(pretrained_mod, "download", refuse)
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch_home"))
    monkeypatch.setattr(lpips_mod, "installed_lpips_lin", lambda: None)


@pytest.fixture(scope="module")
def lp() -> LPIPS:
    torch.manual_seed(0)
    return LPIPS(pretrained=False)


def torchvision_vgg_state() -> dict[str, torch.Tensor]:
    """Random tensors in the layout of torchvision's vgg16-397923af.pth, classifier included."""
    sd = {k: torch.randn_like(v) for k, v in VGG16Features().state_dict().items()}  # keys: features.N.*
    sd["classifier.0.weight"] = torch.randn(8, 4)  # real shape is 4096x25088; only the name matters
    sd["classifier.0.bias"] = torch.randn(8)
    return sd


def lin_state() -> dict[str, torch.Tensor]:
    return {f"lin{i}.model.1.weight": torch.rand(1, c, 1, 1) for i, c in enumerate(TAP_CHANNELS)}


def no_lpips(**changes: object) -> LossConfig:
    return LossConfig(perceptual_weight=0.0, **changes)


# ---- single terms ------------------------------------------------------------------------------------------


def test_pixel_losses_by_hand() -> None:
    x, y = torch.tensor([1.0, -0.5, 0.25]), torch.tensor([0.5, 0.5, 0.25])
    assert torch.equal(pixel_loss(x, y, "l1"), torch.tensor([0.5, 1.0, 0.0]))
    assert torch.equal(pixel_loss(x, y, "l2"), torch.tensor([0.25, 1.0, 0.0]))


def test_gaussian_nll_with_given_logvar() -> None:
    nll = gaussian_nll(torch.tensor([2.0, 4.0]), torch.tensor(math.log(2.0)))
    assert torch.allclose(nll, torch.tensor([1.0, 2.0]) + math.log(2.0))


def test_kl_matches_closed_form() -> None:
    mean = torch.tensor([0.5, -1.0, 0.0, 2.0]).view(2, 2, 1, 1)
    logvar = torch.tensor([0.0, math.log(4.0), -1.0, 1.0]).view(2, 2, 1, 1)
    post = DiagonalGaussian(torch.cat([mean, logvar], dim=1))
    hand = 0.5 * (mean**2 + logvar.exp() - 1.0 - logvar).sum() / 2
    assert torch.allclose(kl_loss(post), hand)


def test_hinge_and_vanilla_by_hand() -> None:
    real, fake = torch.tensor([2.0, 0.5]), torch.tensor([-2.0, 0.5])
    # hinge: real -> relu(1-2)=0, relu(0.5)=0.5; fake -> relu(-1)=0, relu(1.5)=1.5
    assert hinge_d_loss(real, fake).item() == pytest.approx(0.5 * (0.25 + 0.75))
    sp = lambda v: math.log1p(math.exp(v))  # noqa: E731
    hand = 0.5 * ((sp(-2.0) + sp(-0.5)) / 2 + (sp(-2.0) + sp(0.5)) / 2)
    assert vanilla_d_loss(real, fake).item() == pytest.approx(hand)
    assert generator_adversarial_loss(torch.tensor([1.0, -3.0])).item() == pytest.approx(1.0)


def test_adopt_weight_switches_at_threshold() -> None:
    assert adopt_weight(1.0, 9, threshold=10) == 0.0
    assert adopt_weight(1.0, 10, threshold=10) == 1.0


def test_adaptive_weight_by_hand() -> None:
    torch.manual_seed(0)
    w = nn.Parameter(torch.randn(4))
    out = w * torch.randn(4)
    nll, g = out.pow(2).sum(), -(out * torch.randn(4)).mean()
    gn = torch.autograd.grad(nll, w, retain_graph=True)[0].norm()
    gg = torch.autograd.grad(g, w, retain_graph=True)[0].norm()
    got = adaptive_weight(nll, g, w)
    assert torch.allclose(got, gn / (gg + 1e-4))
    assert not got.requires_grad
    # A critic whose gradient vanishes: VQGAN's clamp holds the weight at 1e4.
    tiny = (w * 1e-12).sum()
    assert adaptive_weight(nll, tiny, w).item() == 1e4
    # Either loss outside the last layer's graph is refused, not divided by None.
    other = torch.ones((), requires_grad=True) * 2
    for a, b in ((nll, other), (other, g)):
        with pytest.raises(ValueError, match="not in the graph"):
            adaptive_weight(a, b, w)


# ---- the combined generator loss ----------------------------------------------------------------------------


def test_generator_loss_without_gan_by_hand() -> None:
    torch.manual_seed(0)
    cfg = no_lpips(kl_weight=0.1, logvar_init=0.5, disc_weight=0.0)
    loss_fn = AutoencoderLoss(cfg)
    x, y = torch.randn(2, 3, 4, 4), torch.randn(2, 3, 4, 4)
    post = DiagonalGaussian(torch.randn(2, 4, 2, 2))
    loss, logs = loss_fn.generator_loss(x, y, post, global_step=0)
    nll = ((x - y).abs() / math.exp(0.5) + 0.5).sum() / 2
    assert torch.allclose(logs["nll"], nll)
    assert torch.allclose(loss, nll + 0.1 * post.kl().sum() / 2)
    assert logs["rec"].item() == pytest.approx((x - y).abs().mean().item())
    assert logs["g_loss"].item() == 0.0 and logs["d_weight"].item() == 0.0
    assert {"total", "nll", "rec", "kl", "d_weight", "disc_factor", "g_loss", "logvar"} <= logs.keys()


def test_per_pixel_weights_change_only_the_weighted_nll() -> None:
    loss_fn = AutoencoderLoss(no_lpips(pixel_loss="l2", kl_weight=0.0, disc_weight=0.0))
    x, y = torch.zeros(1, 3, 2, 2), torch.ones(1, 3, 2, 2)
    weights = torch.zeros(1, 1, 2, 2)
    weights[..., 0, 0] = 2.0
    loss, logs = loss_fn.generator_loss(x, y, None, 0, weights=weights)
    assert loss.item() == pytest.approx(2.0 * 3)  # only the weighted pixel counts, on 3 channels
    assert logs["nll"].item() == pytest.approx(12.0)


def test_perceptual_term_is_added_per_pixel() -> None:
    torch.manual_seed(0)
    loss_fn = AutoencoderLoss(LossConfig(lpips_pretrained=False, perceptual_weight=0.5, kl_weight=0.0, disc_weight=0.0))
    x, y = torch.rand(2, 3, 32, 32) * 2 - 1, torch.rand(2, 3, 32, 32) * 2 - 1
    _, logs = loss_fn.generator_loss(x, y, None, 0)
    p = loss_fn.perceptual(x, y)
    assert torch.allclose(logs["rec"], ((x - y).abs() + 0.5 * p).mean())


class TinyDecoder(nn.Module):
    """A decoder whose last layer is `conv_out.weight`, as the trainer passes it."""

    def __init__(self) -> None:
        super().__init__()
        self.conv_out = nn.Conv2d(4, 3, 1)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return self.conv_out(h)


def test_generator_loss_with_gan_matches_hand_adaptive_weight() -> None:
    torch.manual_seed(0)
    cfg = no_lpips(disc_start=3, disc_weight=0.5, disc_ndf=8, kl_weight=0.0)
    loss_fn, dec = AutoencoderLoss(cfg), TinyDecoder()
    x, h = torch.rand(2, 3, 32, 32), torch.randn(2, 4, 32, 32)
    loss, logs = loss_fn.generator_loss(x, dec(h), None, 3, last_layer=dec.conv_out.weight)
    # The same quantities by hand on a fresh graph.
    y = dec(h)
    nll = (x - y).abs().sum() / 2
    g = -loss_fn.discriminator(y).mean()
    w = dec.conv_out.weight
    gn = torch.autograd.grad(nll, w, retain_graph=True)[0].norm()
    gg = torch.autograd.grad(g, w, retain_graph=True)[0].norm()
    d_weight = 0.5 * gn / (gg + 1e-4)
    assert torch.allclose(logs["d_weight"], d_weight, rtol=1e-4)
    assert torch.allclose(logs["g_loss"], g.detach())
    assert torch.allclose(loss, nll + d_weight * g, rtol=1e-5)
    loss.backward()  # the graph is still whole after the adaptive-weight grads
    assert dec.conv_out.weight.grad is not None


def test_disc_factor_scales_both_gan_terms() -> None:
    # LDM: loss = nll + kl + d_weight * disc_factor * g_loss, and d_loss = disc_factor * hinge(D(x), D(x̂)).
    torch.manual_seed(0)
    loss_fn, dec = AutoencoderLoss(no_lpips(disc_start=0, disc_weight=0.5, disc_factor=0.5, disc_ndf=8,
                                            kl_weight=0.0)), TinyDecoder()
    x, h = torch.rand(2, 3, 32, 32), torch.randn(2, 4, 32, 32)
    loss, logs = loss_fn.generator_loss(x, dec(h), None, 0, last_layer=dec.conv_out.weight)
    assert logs["disc_factor"].item() == 0.5 and logs["g_loss"].item() != 0.0
    torch.testing.assert_close(loss, logs["nll"] + logs["d_weight"] * 0.5 * logs["g_loss"])
    real, fake = loss_fn.discriminator(x), loss_fn.discriminator(dec(h).detach())
    d_loss, _ = loss_fn.discriminator_loss(x, dec(h), 0)
    # The critic's hinge is not symmetric in its arguments: swapped, it would learn backwards.
    assert not torch.allclose(hinge_d_loss(real, fake), hinge_d_loss(fake, real))
    torch.testing.assert_close(d_loss, 0.5 * hinge_d_loss(real, fake))


def test_discriminator_off_before_disc_start_on_from_it() -> None:
    torch.manual_seed(0)
    loss_fn, dec = AutoencoderLoss(no_lpips(disc_start=5, disc_ndf=8)), TinyDecoder()
    calls: list[int] = []
    loss_fn.discriminator.register_forward_hook(lambda *a: calls.append(1))
    x, h = torch.rand(2, 3, 32, 32), torch.randn(2, 4, 32, 32)
    post = DiagonalGaussian(torch.randn(2, 8, 4, 4))
    before, logs = loss_fn.generator_loss(x, dec(h), post, 4, last_layer=dec.conv_out.weight)
    assert logs["disc_factor"].item() == 0.0 and logs["g_loss"].item() == 0.0 and not calls
    assert torch.allclose(before, logs["nll"] + 1e-6 * logs["kl"])
    assert not loss_fn.discriminator_active(4) and loss_fn.discriminator_active(5)
    assert loss_fn.discriminator_loss(x, dec(h), 4)[0].item() == 0.0
    _, logs = loss_fn.generator_loss(x, dec(h), post, 5, last_layer=dec.conv_out.weight)
    assert logs["disc_factor"].item() == 1.0 and logs["g_loss"].item() != 0.0 and calls
    assert logs["d_weight"].item() > 0.0


def test_actnorm_takes_its_init_from_the_first_generator_pass_as_in_ldm() -> None:
    """LDM's generator pass runs the critic at every step, so ActNorm initialises at step 0, not at disc_start."""
    torch.manual_seed(0)
    loss_fn, dec = AutoencoderLoss(no_lpips(disc_start=5, disc_ndf=8, disc_use_actnorm=True)), TinyDecoder()
    norms = [m for m in loss_fn.discriminator.modules() if isinstance(m, ActNorm)]
    x, h = torch.rand(2, 3, 32, 32), torch.randn(2, 4, 32, 32)
    post = DiagonalGaussian(torch.randn(2, 8, 4, 4))
    rec = dec(h)
    first = ActNorm(norms[0].loc.shape[1])  # the first ActNorm on the same features, by hand
    features = loss_fn.discriminator.main[:3](rec.detach())
    first(features)
    loss, logs = loss_fn.generator_loss(x, rec, post, 0, last_layer=dec.conv_out.weight)
    assert all(m.initialized.item() == 1 for m in norms) and logs["g_loss"].item() == 0.0
    torch.testing.assert_close(norms[0].loc, first.loc)
    torch.testing.assert_close(norms[0].scale, first.scale)
    loss.backward()
    assert all(p.grad is None for p in loss_fn.discriminator.parameters())  # the init pass trains nothing
    loc = norms[-1].loc.detach().clone()
    loss_fn.generator_loss(x, dec(h) * 3, post, 5, last_layer=dec.conv_out.weight)
    assert torch.equal(norms[-1].loc, loc)  # initialised once only


def test_no_last_layer_or_no_grad_gives_zero_gan_weight() -> None:
    loss_fn, dec = AutoencoderLoss(no_lpips(disc_start=0, disc_ndf=8)), TinyDecoder()
    x, h = torch.rand(1, 3, 32, 32), torch.randn(1, 4, 32, 32)
    assert loss_fn.generator_loss(x, dec(h), None, 0)[1]["d_weight"].item() == 0.0
    with torch.no_grad():
        logs = loss_fn.generator_loss(x, dec(h), None, 0, last_layer=dec.conv_out.weight)[1]
    assert logs["d_weight"].item() == 0.0


def test_discriminator_loss_uses_detached_inputs() -> None:
    torch.manual_seed(0)
    loss_fn = AutoencoderLoss(no_lpips(disc_start=0, disc_ndf=8, disc_loss="vanilla"))
    x, y = torch.rand(2, 3, 32, 32), torch.rand(2, 3, 32, 32, requires_grad=True)
    d_loss, logs = loss_fn.discriminator_loss(x, y, 0)
    d_loss.backward()
    assert y.grad is None
    assert all(p.grad is not None for p in loss_fn.discriminator_parameters())
    assert {"d_loss", "logits_real", "logits_fake"} == logs.keys()


def test_trainer_hooks_and_state_dict() -> None:
    loss_fn = AutoencoderLoss(LossConfig(lpips_pretrained=False, learn_logvar=True, disc_ndf=8))
    assert list(loss_fn.autoencoder_parameters()) == [loss_fn.logvar]
    loss_fn.discriminator_requires_grad(False)
    assert not any(p.requires_grad for p in loss_fn.discriminator_parameters())
    sd = loss_fn.state_dict()
    assert "logvar" in sd and "discriminator.main.0.weight" in sd
    assert not any(k.startswith("perceptual.") for k in sd)  # LPIPS is reloaded from its source, not saved
    loss_fn.load_state_dict(sd, strict=True)
    loss_fn.train()
    assert not loss_fn.perceptual.training
    off = AutoencoderLoss(get_loss_preset("mse"))
    assert off.discriminator is None and off.perceptual is None
    assert not list(off.discriminator_parameters()) and not list(off.autoencoder_parameters())
    with pytest.raises(KlvaeError):
        off.discriminator_loss(torch.zeros(1, 3, 8, 8), torch.zeros(1, 3, 8, 8), 0)


# ---- config ----------------------------------------------------------------------------------------------


def test_presets_and_validation() -> None:
    ldm = get_loss_preset("ldm")
    assert (ldm.pixel_loss, ldm.perceptual_weight, ldm.kl_weight) == ("l1", 1.0, 1e-6)
    assert (ldm.disc_start, ldm.disc_weight, ldm.disc_loss, ldm.disc_num_layers) == (50001, 0.5, "hinge", 3)
    ft = get_loss_preset("ft-mse")
    assert ft.pixel_loss == "l2" and ft.perceptual_weight == 0.1 and not ft.uses_discriminator
    mse = get_loss_preset("mse")
    assert mse.perceptual_weight == 0.0 and mse.kl_weight == 0.0 and not mse.uses_discriminator
    with pytest.raises(KlvaeError, match="unknown loss preset"):
        get_loss_preset("nope")
    with pytest.raises(TypeError):
        ldm.replace(no_such_field=1)
    assert ldm.replace(kl_weight="1e-6").kl_weight == 1e-6  # YAML 1.1 reads 1e-6 as a string
    for bad in ({"pixel_loss": "l3"}, {"disc_loss": "wgan"}, {"kl_weight": -1.0}, {"disc_ndf": "x"}):
        with pytest.raises(KlvaeError):
            ldm.replace(**bad)


# ---- LPIPS ----------------------------------------------------------------------------------------------


def test_lpips_is_a_distance(lp: LPIPS) -> None:
    torch.manual_seed(1)
    x, y = torch.rand(2, 3, 32, 32) * 2 - 1, torch.rand(2, 3, 32, 32) * 2 - 1
    d = lp(x, y)
    assert d.shape == (2, 1, 1, 1)
    assert torch.all(d > 0)
    assert torch.allclose(lp(x, x), torch.zeros(2, 1, 1, 1))
    assert torch.allclose(d, lp(y, x))


def test_lpips_gradient_reaches_input_but_not_weights(lp: LPIPS) -> None:
    x = torch.rand(1, 3, 32, 32) * 2 - 1
    y = (x + 0.1 * torch.randn_like(x)).requires_grad_(True)
    lp(x, y).sum().backward()
    assert y.grad is not None and y.grad.abs().sum() > 0
    assert not any(p.requires_grad for p in lp.parameters())
    assert all(p.grad is None for p in lp.parameters())
    lp.train()
    assert not lp.training and not any(m.training for m in lp.modules())


def test_lpips_rejects_mismatched_shapes(lp: LPIPS) -> None:
    with pytest.raises(ValueError):
        lp(torch.zeros(1, 3, 32, 32), torch.zeros(1, 3, 16, 16))


def test_lpips_loads_torchvision_and_lpips_layout_files(tmp_path: Path) -> None:
    vgg, lin = torchvision_vgg_state(), lin_state()
    torch.save(vgg, tmp_path / "vgg16.pth")
    torch.save(lin, tmp_path / "lin.pth")
    m = LPIPS(pretrained=False, vgg_path=tmp_path / "vgg16.pth", lin_path=tmp_path / "lin.pth")
    assert torch.equal(m.net.features[28].weight, vgg["features.28.weight"])
    assert torch.equal(m.lin.lin4.model[1].weight, lin["lin4.model.1.weight"])


@pytest.mark.parametrize(
    ("which", "mutate", "match"),
    [
        ("vgg", lambda sd: sd.update({"features.1.weight": torch.zeros(1)}), "unexpected: features.1.weight"),
        ("vgg", lambda sd: sd.pop("features.0.bias"), "missing: features.0.bias"),
        ("lin", lambda sd: sd.update({"lin0.model.1.weight": torch.zeros(1, 3, 1, 1)}), "wrong shape"),
    ],
)
def test_lpips_loading_is_strict(tmp_path: Path, which: str, mutate: object, match: str) -> None:
    sd = torchvision_vgg_state() if which == "vgg" else lin_state()
    mutate(sd)  # type: ignore[operator]
    torch.save(sd, tmp_path / "w.pth")
    with pytest.raises(WeightsError, match=match):
        LPIPS(pretrained=False, **{f"{which}_path": tmp_path / "w.pth"})


def test_lpips_missing_file_and_garbage_file(tmp_path: Path) -> None:
    with pytest.raises(WeightsError, match="not found"):
        LPIPS(pretrained=False, vgg_path=tmp_path / "absent.pth")
    (tmp_path / "junk.pth").write_bytes(b"not a checkpoint")
    with pytest.raises(WeightsError, match=r"junk\.pth is not a PyTorch weights file"):
        LPIPS(pretrained=False, lin_path=tmp_path / "junk.pth")


def test_lpips_offline_without_weights_raises_one_line() -> None:
    with pytest.raises(KlvaeError, match="vgg_path") as err:
        LPIPS(pretrained=True)
    assert "\n" not in str(err.value)


def test_lpips_pretrained_from_hub_cache_and_installed_package(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import hashlib

    fake = tmp_path / "vgg16.pth"
    torch.save(torchvision_vgg_state(), fake)
    # Found automatically, a file must be the pinned one: these fakes are, under names and pins of their own.
    monkeypatch.setattr(lpips_mod, "VGG16_FILE", f"vgg16-{hashlib.sha256(fake.read_bytes()).hexdigest()[:8]}.pth")
    cached = pretrained_mod.hub_checkpoint(lpips_mod.VGG16_FILE)
    cached.parent.mkdir(parents=True)
    fake.rename(cached)
    with pytest.raises(KlvaeError, match="lin_path"):  # VGG found in the cache, heads not anywhere
        LPIPS(pretrained=True)
    # A stand-in `lpips` package whose import would fail: the heads must be found without importing it.
    pkg = tmp_path / "site" / "lpips"
    (pkg / "weights" / "v0.1").mkdir(parents=True)
    (pkg / "__init__.py").write_text("raise ImportError('lpips must not be imported')\n")
    lin = lin_state()
    torch.save(lin, pkg / "weights" / "v0.1" / "vgg.pth")
    monkeypatch.setattr(lpips_mod, "LIN_SHA256", hashlib.sha256((pkg / "weights" / "v0.1" / "vgg.pth").read_bytes()
                                                                ).hexdigest())
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    monkeypatch.setattr(lpips_mod, "installed_lpips_lin", _real_installed_lpips_lin)
    m = LPIPS(pretrained=True)
    assert torch.equal(m.lin.lin2.model[1].weight, lin["lin2.model.1.weight"])
    assert "lpips" not in sys.modules


def test_a_download_lands_whole_in_the_hub_cache_checked_and_silent(
    tmp_path: Path, capfd: pytest.CaptureFixture[str]
) -> None:
    import hashlib

    src = tmp_path / "served.pth"
    torch.save(lin_state(), src)
    digest = hashlib.sha256(src.read_bytes()).hexdigest()
    url = src.as_uri()  # urllib serves file:// as it would https://
    good, bad = "lin-good.pth", "lin-bad.pth"
    sd = _real_download(url, good, sha256=digest)
    assert torch.equal(sd["lin0.model.1.weight"], torch.load(src)["lin0.model.1.weight"])
    assert pretrained_mod.hub_checkpoint(good).is_file()
    with pytest.raises(WeightsError, match="SHA-256"):
        _real_download(url, bad, sha256="0" * 64)
    assert sorted(p.name for p in pretrained_mod.hub_checkpoint(good).parent.iterdir()) == [good]  # no partial file
    out = capfd.readouterr()
    assert out.out == "" and out.err == ""  # torch.hub's "Downloading: ..." line is not printed


def test_validation_measures_lpips_with_the_files_the_loss_config_names(tmp_path: Path) -> None:
    from klvae import AutoencoderKL
    from klvae.training.validate import validate

    torch.save(torchvision_vgg_state(), tmp_path / "vgg.pth")
    torch.save(lin_state(), tmp_path / "lin.pth")
    vae = AutoencoderKL("tiny").eval()
    batches = [torch.rand(2, 3, 16, 16) * 2 - 1]
    assert "lpips" not in validate(vae, batches, torch.device("cpu"), None)  # offline and nothing named
    named = validate(vae, batches, torch.device("cpu"), None, (str(tmp_path / "vgg.pth"), str(tmp_path / "lin.pth")))
    assert named["lpips"] > 0
