"""Validation during training: PSNR, SSIM (and LPIPS when its weights can be had) plus a PNG grid."""

from __future__ import annotations

import logging
from functools import cache
from pathlib import Path

import torch
from torch import Tensor, nn

from klvae.errors import KlvaeError
from klvae.evaluation.metrics import SSIM_RADIUS, psnr, ssim
from klvae.images import save_image_atomic, tensor_to_pil
from klvae.model.autoencoder import AutoencoderKL
from klvae.nets.lpips import LPIPS_MIN_SIDE

log = logging.getLogger(__name__)

GRID_IMAGES = 8  # held-out images in the samples grid: gathered across batches, not the first batch's alone


@cache
def _pretrained_lpips(device: str, vgg_path: str | None, lin_path: str | None) -> nn.Module | None:
    # Only real LPIPS weights give a meaningful figure; without them validation reports PSNR/SSIM only. The
    # files the loss config names serve here too, so an offline run that has them measures LPIPS as well.
    from klvae.nets.lpips import LPIPS

    try:
        return LPIPS(pretrained=True, vgg_path=vgg_path, lin_path=lin_path).to(device).eval()
    except KlvaeError as e:
        log.warning("validation without LPIPS: %s", e)
        return None


def make_grid(top: Tensor, bottom: Tensor, n: int = 8) -> Tensor:
    """Originals over reconstructions: [3, 2H, n*W] from two [B, 3, H, W] batches in [-1, 1]."""
    top, bottom = top[:n], bottom[:n]
    rows = [torch.cat(list(t), dim=-1) for t in (top, bottom)]
    return torch.cat(rows, dim=-2)


@torch.no_grad()
def validate(
    vae: AutoencoderKL, batches: list[Tensor], device: torch.device, grid_path: Path | None,
    lpips_files: tuple[str | None, str | None] | None = (None, None),
) -> dict[str, float]:
    """Reconstruct the held-out batches through the posterior mean; mean metrics, and a grid image.
    `lpips_files` (VGG16, LPIPS heads) name local weights for the LPIPS metric; else the cache or a download;
    None: no LPIPS (train.val_lpips false)."""
    was_training = vae.training
    vae.eval()
    # SSIM's 11x11 window and LPIPS's VGG (four 2x poolings before its last tap) need images at least that
    # large: smaller ones (a run at data.resolution 8) are measured by what can measure them.
    side = min(batches[0].shape[-2:]) if batches else LPIPS_MIN_SIDE
    with_ssim = side >= 2 * SSIM_RADIUS + 1
    lp = _pretrained_lpips(str(device), *lpips_files) if lpips_files is not None and side >= LPIPS_MIN_SIDE else None
    sums: dict[str, float] = {"psnr": 0.0, **({"ssim": 0.0} if with_ssim else {}),
                              **({"lpips": 0.0} if lp is not None else {})}
    n, shown = 0, []
    for x in batches:
        x = x.to(device)
        y = vae(x, sample_posterior=False)[0].clamp(-1, 1)
        sums["psnr"] += psnr(x, y, data_range=2.0).sum().item()
        if with_ssim:
            sums["ssim"] += ssim(x, y, data_range=2.0).sum().item()
        if lp is not None:
            sums["lpips"] += lp(x, y).sum().item()
        if n < GRID_IMAGES:  # only the few shown are copied to the CPU
            shown.append((x[: GRID_IMAGES - n].cpu(), y[: GRID_IMAGES - n].cpu()))
        n += x.shape[0]
    vae.train(was_training)
    if grid_path is not None and shown:
        grid_path.parent.mkdir(parents=True, exist_ok=True)
        top, bottom = (torch.cat(parts) for parts in zip(*shown, strict=True))
        save_image_atomic(tensor_to_pil(make_grid(top, bottom, GRID_IMAGES)), grid_path)
    return {k: v / max(n, 1) for k, v in sums.items()}
