"""The LDM loss against a transcription of LDM's `LPIPSWithDiscriminator.forward`
(ldm/modules/losses/contperceptual.py): the generator and critic losses, the adaptive GAN weight under fp16, and
LPIPS' VGG backward over the reconstructions only."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from klvae.training.losses import adaptive_weight


def _fp16_pair() -> tuple[nn.Conv2d, torch.Tensor, torch.Tensor]:
    # A last layer whose L1 gradient, a sum over 192 x 192 pixels of coherent sign, exceeds fp16's 65504.
    torch.manual_seed(0)
    conv = nn.Conv2d(2, 3, 1)
    h = torch.rand(1, 2, 192, 192) * 0.5 + 2.0
    x = torch.full((1, 3, 192, 192), 10.0)
    return conv, h, x


@pytest.mark.parametrize("autocast", [True, False], ids=["fp16-autocast", "fp16-weights"])
def test_adaptive_weight_under_fp16_when_the_nll_gradient_passes_fp16_range(autocast: bool) -> None:
    conv, h, x = _fp16_pair()

    def weight(dtype: torch.dtype | None) -> torch.Tensor:
        layer = conv if dtype is None or autocast else conv.to(dtype)
        inp = h if dtype is None or autocast else h.to(dtype)
        with torch.autocast("cpu", dtype=torch.float16, enabled=dtype is not None and autocast):
            rec = layer(inp)
            nll = (x - rec.float()).abs().sum()
            g = -100.0 * rec.float().mean()
            return adaptive_weight(nll, g, layer.weight)

    ref = weight(None)
    assert 1.0 < ref.item() < 1e4  # not at the clamp in fp32
    got = weight(torch.float16)
    # Before: the unscaled fp16 gradient overflowed to inf and the clamp turned it into 1e4 without a word.
    torch.testing.assert_close(got.float(), ref, rtol=2e-2, atol=0.0)


# ---- LDM's LPIPSWithDiscriminator.forward, transcribed --------------------------------------------------------


def _ldm_forward(m, inputs, reconstructions, posteriors, optimizer_idx, global_step, last_layer, weights=None):
    """ldm/modules/losses/contperceptual.py at CompVis/latent-diffusion main, with its attribute names mapped."""
    cfg = m.config
    rec_loss = torch.abs(inputs.contiguous() - reconstructions.contiguous())
    if cfg.perceptual_weight > 0:
        p_loss = m.perceptual(inputs.contiguous(), reconstructions.contiguous())
        rec_loss = rec_loss + cfg.perceptual_weight * p_loss
    nll_loss = rec_loss / torch.exp(m.logvar) + m.logvar
    weighted_nll_loss = nll_loss
    if weights is not None:
        weighted_nll_loss = weights * nll_loss
    weighted_nll_loss = torch.sum(weighted_nll_loss) / weighted_nll_loss.shape[0]
    nll_loss = torch.sum(nll_loss) / nll_loss.shape[0]
    kl_loss = posteriors.kl()
    kl_loss = torch.sum(kl_loss) / kl_loss.shape[0]
    disc_factor = cfg.disc_factor if global_step >= cfg.disc_start else 0.0  # adopt_weight
    if optimizer_idx == 0:
        logits_fake = m.discriminator(reconstructions.contiguous())
        g_loss = -torch.mean(logits_fake)
        nll_grads = torch.autograd.grad(nll_loss, last_layer, retain_graph=True)[0]
        g_grads = torch.autograd.grad(g_loss, last_layer, retain_graph=True)[0]
        d_weight = torch.norm(nll_grads) / (torch.norm(g_grads) + 1e-4)
        d_weight = torch.clamp(d_weight, 0.0, 1e4).detach() * cfg.disc_weight
        loss = weighted_nll_loss + cfg.kl_weight * kl_loss + d_weight * disc_factor * g_loss
        return loss, {"total": loss, "logvar": m.logvar, "kl": kl_loss, "nll": nll_loss, "rec": rec_loss.mean(),
                      "d_weight": d_weight, "disc_factor": torch.tensor(disc_factor), "g_loss": g_loss}
    logits_real = m.discriminator(inputs.contiguous().detach())
    logits_fake = m.discriminator(reconstructions.contiguous().detach())
    hinge = 0.5 * (torch.mean(torch.relu(1.0 - logits_real)) + torch.mean(torch.relu(1.0 + logits_fake)))
    d_loss = disc_factor * hinge
    return d_loss, {"d_loss": d_loss, "logits_real": logits_real.mean(), "logits_fake": logits_fake.mean()}


def test_generator_and_critic_losses_match_ldm_transcription() -> None:
    import copy

    from klvae.posterior import DiagonalGaussian
    from klvae.training.losses import AutoencoderLoss, LossConfig

    torch.manual_seed(0)
    cfg = LossConfig(lpips_pretrained=False, perceptual_weight=0.7, kl_weight=0.3, logvar_init=0.4, disc_start=2,
                     disc_weight=0.6, disc_factor=0.8, disc_ndf=8)
    ours = AutoencoderLoss(cfg)
    ldm = copy.deepcopy(ours)  # the same critic and LPIPS (BatchNorm statistics move alike in both)
    conv = nn.Conv2d(4, 3, 3, padding=1)
    x, h = torch.rand(2, 3, 32, 32) * 2 - 1, torch.randn(2, 4, 32, 32)
    post = DiagonalGaussian(torch.randn(2, 8, 4, 4))
    weights = torch.rand(2, 1, 32, 32)
    ours.discriminator_requires_grad(False)
    ldm.discriminator_requires_grad(False)
    got, got_logs = ours.generator_loss(x, conv(h), post, 3, last_layer=conv.weight, weights=weights)
    ref, ref_logs = _ldm_forward(ldm, x, conv(h), post, 0, 3, conv.weight, weights=weights)
    torch.testing.assert_close(got, ref)
    for k, v in ref_logs.items():
        torch.testing.assert_close(got_logs[k].float(), v.detach().float(), msg=k)
    ours.discriminator_requires_grad(True)
    ldm.discriminator_requires_grad(True)
    d_got, d_logs = ours.discriminator_loss(x, conv(h), 3)
    d_ref, d_ref_logs = _ldm_forward(ldm, x, conv(h), post, 1, 3, conv.weight)
    torch.testing.assert_close(d_got, d_ref)
    for k, v in d_ref_logs.items():
        torch.testing.assert_close(d_logs[k], v.detach(), msg=k)
    d_got.backward()
    d_ref.backward()
    for a, b in zip(ours.discriminator.parameters(), ldm.discriminator.parameters(), strict=True):
        torch.testing.assert_close(a.grad, b.grad)


# ---- LPIPS as a training loss ------------------------------------------------------------------------------


def test_lpips_runs_the_vgg_backward_over_the_reconstructions_only() -> None:
    """The targets need no gradient: one VGG pass over both batches would run the backward over both (twice the
    VGG backward and twice its saved activations); the value stays the same."""
    from klvae.nets.lpips import LPIPS

    torch.manual_seed(0)
    lp = LPIPS(pretrained=False)
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    y = (x + 0.1 * torch.randn_like(x)).requires_grad_(True)
    seen: list[tuple[int, bool]] = []
    hook = lp.net.features[0].register_forward_hook(lambda m, i, o: seen.append((o.shape[0], o.requires_grad)))
    try:
        d = lp(x, y)
        with torch.no_grad():
            ref = lp(x, y.detach())  # the metric's path
    finally:
        hook.remove()
    assert all(n == 2 for n, needs_grad in seen if needs_grad), seen
    torch.testing.assert_close(d.detach(), ref, rtol=0, atol=0)
    (grad,) = torch.autograd.grad(d.sum(), y)
    assert grad.abs().sum() > 0


def test_adaptive_weight_under_fp16_when_the_nll_gradient_passes_fp16_range_a_thousandfold() -> None:
    # The nll gradient ~1e8: 2**-8 is not enough to bring it under fp16's 65504; the later, smaller scales are needed.
    conv, h, x = _fp16_pair()

    def weight(dtype: torch.dtype | None) -> torch.Tensor:
        with torch.autocast("cpu", dtype=torch.float16, enabled=dtype is not None):
            rec = conv(h)
            nll = 1000.0 * (x - rec.float()).abs().sum()
            g = -1e5 * rec.float().mean()
            return adaptive_weight(nll, g, conv.weight)

    ref = weight(None)
    assert 1.0 < ref.item() < 1e4
    torch.testing.assert_close(weight(torch.float16).float(), ref, rtol=2e-2, atol=0.0)
