"""Shared by the tests: tiny models whose weights all differ from their (near-trivial) initialisation."""

import torch

import klvae


def perturbed_vae(preset: str = "tiny", seed: int = 0, device: torch.device | str | None = None,
                  **changes: object) -> klvae.AutoencoderKL:
    """A preset (with config `changes`) in eval mode; default init leaves biases tiny and GroupNorm affine
    trivial, so every weight gets noise and a broken norm or bias shows up in the outputs."""
    torch.manual_seed(seed)
    vae = klvae.AutoencoderKL(klvae.get_preset(preset).replace(**changes)).eval().to(device or "cpu")
    with torch.no_grad():
        for p in vae.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return vae
