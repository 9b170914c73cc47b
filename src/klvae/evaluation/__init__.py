"""Evaluation: per-image metrics (PSNR, SSIM), rFID, and the `klvae eval` run with its report."""

from __future__ import annotations

from typing import Any

from klvae.evaluation.metrics import MetricAccumulator, psnr, ssim

__all__ = ["EvalOptions", "MetricAccumulator", "MetricNets", "build_metric_nets", "psnr", "run_evaluation", "ssim"]

# The run's API, imported on first use: `from klvae.evaluation import psnr` stays as light as the metrics module.
_RUN = ("EvalOptions", "MetricNets", "build_metric_nets", "run_evaluation")


def __getattr__(name: str) -> Any:
    """EvalOptions, MetricNets, build_metric_nets and run_evaluation from klvae.evaluation.evaluate."""
    if name in _RUN:
        from klvae.evaluation import evaluate

        return getattr(evaluate, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
