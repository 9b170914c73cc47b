"""Evaluation: per-image metrics (PSNR, SSIM), rFID, and the `klvae eval` run with its report."""

from klvae.evaluation.metrics import MetricAccumulator, psnr, ssim

__all__ = ["MetricAccumulator", "psnr", "ssim"]
