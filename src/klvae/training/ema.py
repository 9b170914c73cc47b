"""The exponential moving average of the autoencoder's weights, with diffusers' (and LDM's) decay warm-up."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor, nn
from torch.optim.swa_utils import AveragedModel

Tensors = tuple[Tensor, ...] | list[Tensor]
AvgFn = Callable[[Tensors, Tensors, Tensor | int], None]


def ema_decay_at(decay: float, updates: int, warmup: bool) -> float:
    """The decay of an EMA update after `updates` earlier ones: min(decay, (1 + n) / (10 + n)) with warm-up."""
    # diffusers' EMAModel warm-up (LDM's LitEma applies it from its first update, where this one and EMAModel copy
    # the weights): early on the average follows the weights instead of staying near their random initialisation
    # (at 0.9999 without it, the initial weights would still hold 37 % after 10,000 steps).
    return min(decay, (1 + updates) / (10 + updates)) if warmup else decay


def _ema_update(decay: float, warmup: bool) -> AvgFn:
    @torch.no_grad()
    def update(averaged: Tensors, current: Tensors, num_averaged: Tensor | int) -> None:
        # Parameters only (AveragedModel copies the buffers), all floating point: ema += (1 - d) * (w - ema).
        torch._foreach_lerp_(averaged, current, 1.0 - ema_decay_at(decay, int(num_averaged), warmup))

    return update


def make_ema(model: nn.Module, decay: float, warmup: bool = True) -> AveragedModel:
    """An EMA copy of `model`; `update_parameters(model)` after each optimiser step (the first update copies)."""
    return AveragedModel(model, multi_avg_fn=_ema_update(decay, warmup))
