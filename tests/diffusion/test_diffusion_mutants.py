"""Pins of the DDPM and rectified-flow details that the other diffusion tests leave loose: the dtype of the noise
that q_sample draws; the last table row for a draw of u = 1; the refusal of negative timesteps and of a
linear time shift by mu <= 0 and of a FLUX shift line through one point."""

from __future__ import annotations

import pytest
import torch

from klvae.diffusion import NoiseSchedule
from klvae.flow import FlowSchedule, calculate_shift, time_shift


def test_q_sample_draws_float64_noise_for_float64_latents() -> None:
    # The drawn noise is the generator's float64 draw, so that a caller can redraw the same eps as its target.
    s = NoiseSchedule.sd()
    x0 = torch.randn(2, 4, 3, 3, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    t = torch.tensor([10, 700])
    eps = torch.randn(x0.shape, generator=torch.Generator().manual_seed(9), dtype=torch.float64)
    drawn = s.q_sample(x0, t, generator=torch.Generator().manual_seed(9))
    assert torch.equal(drawn, s.q_sample(x0, t, eps))


def test_a_draw_of_u_equal_to_1_takes_the_tables_last_row() -> None:
    # sigmoid of a large logit-normal draw rounds to exactly 1.0 in float32: `(u * T).long()` is T, one past the end.
    s = FlowSchedule(1000)
    t, sigma = s.sample_timesteps(3, "logit_normal", generator=torch.Generator().manual_seed(0), logit_mean=40.0)
    assert torch.equal(sigma, torch.full((3,), 0.001, dtype=torch.float32))
    assert torch.equal(t, torch.full((3,), 1.0, dtype=torch.float32))


def test_a_negative_timestep_is_refused_as_a_timestep() -> None:
    s, x = FlowSchedule(1000), torch.zeros(2, 4, 2, 2)
    for call in (lambda: s.scale_noise(x, torch.tensor([-1.0, 5.0]), x), lambda: s.add_noise(x, x, -0.5)):
        with pytest.raises(ValueError, match=r"timesteps must lie in \[0, 1000\]"):
            call()


@pytest.mark.parametrize("mu", [0.0, -0.5])
def test_the_linear_time_shift_refuses_a_mu_that_is_no_positive_shift(mu: float) -> None:
    # mu / (mu + 1/t - 1) is 0 everywhere at mu = 0 and leaves [0, 1] below it.
    with pytest.raises(ValueError, match="mu > 0"):
        time_shift(mu, 1.0, [0.25, 0.5], kind="linear")
    half = torch.tensor([0.5], dtype=torch.float64)
    assert time_shift(2.0, 1.0, half, kind="linear").item() == pytest.approx(2 / 3, abs=1e-15)


def test_a_shift_line_needs_two_distinct_sequence_lengths() -> None:
    with pytest.raises(ValueError, match="must differ"):
        calculate_shift(100, base_seq_len=256, max_seq_len=256)
