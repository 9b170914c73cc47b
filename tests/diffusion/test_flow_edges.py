"""Edge cases of klvae.flow and `klvae noise --schedule flow`: tiny and huge shifts keep sigmas in range and finite,
integer timesteps off the shifted table are not silently unshifted, a refused mode scale leaves the generator
untouched, the sheet's labels do not round a noisy tile to pure noise, and the README names the table diffusers'
FLUX scripts train on (the unshifted one)."""

from __future__ import annotations

import math
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from helpers import one_error_line, perturbed_vae
from klvae import flow
from klvae.cli.main import main
from klvae.flow import FlowSchedule

README = Path(__file__).resolve().parents[2] / "README.md"


def _x(shape: tuple[int, ...] = (4, 4, 6, 6), seed: int = 0) -> torch.Tensor:
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed))


@pytest.fixture(scope="module")
def sd_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return perturbed_vae("tiny").save_pretrained(tmp_path_factory.mktemp("flow_review") / "sd")


@pytest.fixture()
def image(tmp_path: Path) -> Path:
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 255, (16, 24, 3)).astype(np.uint8)).save(tmp_path / "img.png")
    return tmp_path / "img.png"


# ---- shifts at the edges of their domain ----

def test_tiny_shift_keeps_sigmas_in_the_unit_interval() -> None:
    """shift_sigmas computes s σ / (1 + (s - 1) σ): for s below float64's epsilon s - 1 rounds to -1, so at σ = 1
    the denominator is 0 and σ' = inf (FlowSchedule(shift=1e-17).sigmas[0] = inf, sigma_at(T) = inf), out of the
    [0, 1] every other function refuses. s σ / (s σ + 1 - σ) is the same map, exact at both ends."""
    out = flow.shift_sigmas(torch.tensor([0.0, 0.5, 1.0], dtype=torch.float64), 1e-17)
    assert bool(((out >= 0) & (out <= 1)).all()), out
    assert out[-1].item() == 1.0
    s = FlowSchedule(10, shift=1e-17)
    assert s.sigmas[0].item() == 1.0 and s.sigma_at(10).item() == 1.0


def test_noise_flow_tiny_shift_is_no_internal_error(tmp_path: Path, image: Path, sd_model: Path,
                                                    capsys: pytest.CaptureFixture[str]) -> None:
    """`--shift 1e-17` (any positive number below ~1.1e-16, 1e-320 too) passes _check_shift, then the table's
    σ = inf reaches noisy(), whose ValueError comes out as `klvae: internal error: ValueError: sigma must lie in
    [0, 1]`: a crash, not a one-line error (nor a sheet)."""
    rc = main(["noise", str(image), "-o", str(tmp_path / "s.png"), "--schedule", "flow", "--shift", "1e-17",
               "--steps", "1000", "--model", str(sd_model)])
    if rc != 0:
        one_error_line(capsys.readouterr().err)


def test_time_shift_of_a_large_mu_stays_finite_and_in_range() -> None:
    """time_shift computes e^mu / (e^mu + (1/t - 1)^σ) with math.exp: mu > 709 raises OverflowError (not the
    ValueError of every other bad argument; FlowSchedule.flux2((128, 2100, 2100)) gets there), and
    mu < -745 makes e^mu = 0, so σ' = 0/0 = nan at t = 1. 1 / (1 + e^-mu (1/t - 1)^σ), or
    sigmoid(mu - σ log(1/t - 1)), is the same map without either."""
    for mu in (-800.0, 800.0):
        out = flow.time_shift(mu, 1.0, torch.tensor([0.0, 0.5, 1.0], dtype=torch.float64))
        assert not bool(out.isnan().any()) and out[0].item() == 0.0 and out[-1].item() == 1.0, (mu, out)


# ---- the forward process: what an integer timestep means ----

def test_python_floats_are_shifted_in_double_precision() -> None:
    """A list of Python floats used to go through float32 (torch.as_tensor's default) and came back rounded."""
    ts = [0.1, 1 / 3, 0.7]
    got = flow.shift_sigmas(ts, 3.0)
    assert got.dtype == torch.float64
    assert got.tolist() == [3 * t / (3 * t + (1 - t)) for t in ts]
    mu = 0.8
    got = flow.time_shift(mu, 1.0, ts)
    assert got.dtype == torch.float64
    assert got.tolist() == pytest.approx([math.exp(mu) / (math.exp(mu) + (1 / t - 1)) for t in ts], rel=1e-15)
    assert flow.time_shift(mu, 1.0, 1 / 3).dtype == torch.float64
    # A typed array keeps its dtype, as a tensor does.
    assert flow.shift_sigmas(np.array(ts, dtype=np.float32), 3.0).dtype == torch.float32


def test_integer_timesteps_off_the_shifted_table_are_not_silently_unshifted() -> None:
    """On a shifted table an integer t means two things in klvae: sigma_at(501) is position 501 shifted (0.7507 on
    SD3's table, and NoiseSchedule.add_noise(x0, noise, t) reads an integer t as a table row too), while
    FlowSchedule.add_noise / scale_noise take it as σ T, σ = 0.501 unshifted. diffusers' scale_noise looks the
    timestep up in its table and raises for 501 (not in SD3's table); klvae silently noises at the unshifted σ, so
    DDPM-style code (`t = torch.randint(...)`; `add_noise(x0, noise, t)`) trains at the wrong noise levels."""
    s = FlowSchedule.sd3()
    x0, eps = _x(), _x(seed=1)
    t = torch.full((4,), 501)
    try:
        out = s.add_noise(x0, eps, t)
    except (TypeError, ValueError):
        return  # refused, as diffusers does
    torch.testing.assert_close(out, flow.noisy(x0, eps, s.sigma_at(t)))


# ---- sampling: reproducible from the generator's state ----

def test_a_refused_mode_scale_leaves_the_generator_untouched() -> None:
    """compute_density_for_timestep_sampling draws torch.rand before it checks mode_scale, so a call it refuses has
    already advanced the generator: after a caught ValueError every later draw differs from the run without it
    (logit_std, the scheme, batch_size and the generator are all checked before the draw)."""
    g = torch.Generator().manual_seed(5)
    with pytest.raises(ValueError, match="mode_scale"):
        flow.compute_density_for_timestep_sampling("mode", 8, generator=g, mode_scale=5.0)
    after = flow.compute_density_for_timestep_sampling("uniform", 8, generator=g)
    fresh = flow.compute_density_for_timestep_sampling("uniform", 8, generator=torch.Generator().manual_seed(5))
    assert torch.equal(after, fresh)


# ---- the sheet's labels ----

def test_noise_flow_labels_do_not_round_a_noisy_tile_to_pure_noise(
    tmp_path: Path, image: Path, sd_model: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The tiles' labels print σ with :.3g, so t = 999 at shift 3 (σ = 0.99967) reads `sigma=1`, the label of the
    pure-noise tile t = 1000 beside it (the summary's :.4g has the same fault at t = 99999 of 100000). Near 1
    the label needs the digits of 1 - σ (say :.4g with 1 - σ, or enough digits that σ < 1 never prints 1)."""
    from klvae.cli import noise as noise_cli

    labels: list[str] = []
    real = noise_cli._sheet

    def spy(tiles: list[tuple[str, Image.Image]]) -> Image.Image:
        labels.extend(label for label, _ in tiles)
        return real(tiles)

    monkeypatch.setattr(noise_cli, "_sheet", spy)
    assert main(["noise", str(image), "-o", str(tmp_path / "s.png"), "--schedule", "flow", "--shift", "3",
                 "--steps", "999", "1000", "--model", str(sd_model)]) == 0
    sigma_999 = float(re.search(r"sigma=(\S+)", labels[0]).group(1))  # type: ignore[union-attr]
    assert sigma_999 < 1.0, labels
    assert sigma_999 == pytest.approx(FlowSchedule.sd3().sigma_at(999).item(), abs=5e-5)


# ---- the README ----

def _flow_bullet() -> str:
    text = README.read_text(encoding="utf-8")
    start = text.index("trained with rectified flow")
    return text[start:text.index("\n\n", start)]


def test_readme_says_which_table_diffusers_flux_scripts_train_on() -> None:
    """The README's rectified-flow bullet calls `FlowSchedule(mu=...)` FLUX's resolution-dependent shift and then
    says `sample_timesteps` draws "as diffusers' SD3/FLUX scripts do"; but those scripts load FLUX's scheduler with
    use_dynamic_shifting=True, whose training table is unshifted, so FlowSchedule.flux(latent).sample_timesteps
    draws other sigmas than they do (the module docstring says so, the README does not): FLUX's scripts are
    FlowSchedule() (shift 1)."""
    bullet = _flow_bullet()
    assert any(w in bullet for w in ("unshifted", "use_dynamic_shifting", "FlowSchedule()", "shift 1")), bullet


def test_flux_scripts_table_is_the_unshifted_one() -> None:
    """(Not a bug: the fact the README test above rests on.) diffusers' FLUX config, use_dynamic_shifting=True,
    leaves the training table unshifted: FlowSchedule() is it, FlowSchedule.flux(...) is not."""
    import diffusers

    ref = diffusers.FlowMatchEulerDiscreteScheduler(shift=3.0, use_dynamic_shifting=True)
    torch.testing.assert_close(FlowSchedule().sigmas, ref.sigmas.double(), rtol=0, atol=2e-7)
    assert (FlowSchedule.flux((16, 128, 128)).sigmas - ref.sigmas.double()).abs().max() > 0.1
    assert math.isclose(FlowSchedule.flux((16, 128, 128)).mu, 1.15, abs_tol=1e-12)
