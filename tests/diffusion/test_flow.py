"""Rectified flow's forward side (SD3, FLUX.1, FLUX.2) against diffusers: the training table, scale_noise, the
dynamic (resolution-dependent) shift, FLUX.2's empirical mu, training-time timestep sampling and loss weighting;
the velocity and its inverses; dtypes; argument errors; and `klvae noise --schedule flow`."""

from __future__ import annotations

import ast
import math
from collections.abc import Callable
from pathlib import Path

import diffusers
import numpy as np
import pytest
import torch
from diffusers.training_utils import compute_density_for_timestep_sampling as their_density
from diffusers.training_utils import compute_loss_weighting_for_sd3 as their_weighting
from PIL import Image

import klvae
from helpers import one_error_line, perturbed_vae
from klvae import flow, inference
from klvae.cli.main import main
from klvae.flow import FlowSchedule
from klvae.images import load_image, pil_to_tensor, tensor_to_uint8
from klvae.model.config import PRESETS

T = 1000


def _diffusers_function(module: str, name: str) -> Callable[..., float]:
    """A module-level function of a diffusers pipeline, compiled from its source: the pipeline modules import
    transformers (not a dependency here), so they cannot be imported."""
    src = Path(diffusers.__file__).parent / "pipelines" / module
    tree = ast.parse(src.read_text(encoding="utf-8"))
    fn = next(n for n in tree.body if isinstance(n, ast.FunctionDef) and n.name == name)
    namespace: dict[str, object] = {}
    exec(compile(ast.Module(body=[fn], type_ignores=[]), str(src), "exec"), namespace)
    return namespace[name]  # type: ignore[return-value]


their_calculate_shift = _diffusers_function("flux/pipeline_flux.py", "calculate_shift")
their_empirical_mu = _diffusers_function("flux2/pipeline_flux2.py", "compute_empirical_mu")


def _x(shape: tuple[int, ...] = (6, 4, 8, 8), dtype: torch.dtype = torch.float64, seed: int = 0) -> torch.Tensor:
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed), dtype=dtype)


# ---- the training table and scale_noise ----

@pytest.mark.parametrize("shift", [1.0, 3.0, 0.5])
def test_training_table_matches_diffusers(shift: float) -> None:
    ref = diffusers.FlowMatchEulerDiscreteScheduler(num_train_timesteps=T, shift=shift)
    s = FlowSchedule(T, shift=shift)
    assert s.sigmas.dtype == torch.float64 and s.sigmas.shape == (T,)
    # diffusers' table is float32: the gaps are its rounding (max 1.3e-7 in sigma, 1.5e-4 in timestep)
    torch.testing.assert_close(s.sigmas, ref.sigmas.double(), rtol=0, atol=2e-7)
    torch.testing.assert_close(s.timesteps, ref.timesteps.double(), rtol=0, atol=2e-4)
    assert s.sigmas[0].item() == 1.0 and s.sigmas[-1].item() == pytest.approx(shift / (T + shift - 1), rel=1e-12)


def test_sd3_table_and_sigma_at() -> None:
    s = FlowSchedule.sd3()
    assert (s.num_train_timesteps, s.shift, s.mu) == (T, 3.0, None)
    assert s.sigma_at(500).item() == pytest.approx(0.75, abs=1e-15)  # 3 * 0.5 / (1 + 2 * 0.5)
    t = torch.tensor([1, 10, 500, 999, 1000])
    torch.testing.assert_close(s.sigma_at(t), flow.shift_sigmas(t.double() / T, 3.0), rtol=0, atol=1e-15)
    assert s.sigma_at(T).item() == 1.0
    assert repr(s) == "FlowSchedule(num_train_timesteps=1000, shift=3)"


@pytest.mark.parametrize("shift", [1.0, 3.0])
def test_scale_noise_matches_diffusers(shift: float) -> None:
    ref = diffusers.FlowMatchEulerDiscreteScheduler(num_train_timesteps=T, shift=shift)
    s = FlowSchedule(T, shift=shift)
    x0, eps = _x(dtype=torch.float32), _x(dtype=torch.float32, seed=1)
    t = ref.timesteps[torch.tensor([0, 1, 10, 500, 998, 999])]  # a batch of diffusers' own (float32) timesteps
    ours, theirs = s.scale_noise(x0, t, eps), ref.scale_noise(x0, t, eps)
    assert ours.dtype == theirs.dtype == torch.float32
    torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-6)
    torch.testing.assert_close(s.add_noise(x0, eps, t), ours, rtol=0, atol=0)
    # one timestep in a [1] tensor serves the whole batch, as in diffusers
    one = ref.timesteps[[250]]
    torch.testing.assert_close(s.scale_noise(x0, one, eps), ref.scale_noise(x0, one, eps), rtol=0, atol=1e-6)
    # the same latents from the sigma form
    sig = (t.double() / T)
    torch.testing.assert_close(flow.noisy(x0, eps, sig), ours, rtol=0, atol=0)


def test_noisy_closed_form_and_shapes_of_sigma() -> None:
    x0, eps = _x(), _x(seed=1)
    sig = torch.tensor([0.0, 0.1, 0.25, 0.5, 0.9, 1.0], dtype=torch.float64)
    want = (1 - sig.view(-1, 1, 1, 1)) * x0 + sig.view(-1, 1, 1, 1) * eps
    torch.testing.assert_close(flow.noisy(x0, eps, sig), want, rtol=0, atol=1e-15)
    torch.testing.assert_close(flow.noisy(x0, eps, sig.view(-1, 1, 1, 1)), want, rtol=0, atol=0)
    torch.testing.assert_close(flow.noisy(x0, eps, 0.25), 0.75 * x0 + 0.25 * eps, rtol=0, atol=1e-15)
    torch.testing.assert_close(flow.noisy(x0, eps, torch.full((1, 1, 1, 1), 0.25)), 0.75 * x0 + 0.25 * eps,
                               rtol=0, atol=1e-15)
    assert torch.equal(flow.noisy(x0, eps, 0.0), x0) and torch.equal(flow.noisy(x0, eps, 1.0), eps)


# ---- shifts: fixed, exponential (FLUX), mu from the token count ----

@pytest.mark.parametrize("seq_len", [256, 1024, 4096, 6144])
def test_dynamic_shift_matches_diffusers_set_timesteps(seq_len: int) -> None:
    mu = flow.calculate_shift(seq_len)
    assert mu == their_calculate_shift(seq_len)  # the same float arithmetic: bit for bit
    ref = diffusers.FlowMatchEulerDiscreteScheduler(num_train_timesteps=T, shift=3.0, use_dynamic_shifting=True)
    ref.set_timesteps(num_inference_steps=T, mu=mu)  # the training positions T/T .. 1/T, shifted by mu
    ours = FlowSchedule(T, mu=mu)
    torch.testing.assert_close(ours.sigmas, ref.sigmas[:-1].double(), rtol=0, atol=1e-6)
    torch.testing.assert_close(ours.timesteps, ref.timesteps.double(), rtol=0, atol=1e-3)
    # FLUX.1's pipeline: 28 steps from sigma 1 to 1/28, shifted
    n = 28
    ref.set_timesteps(sigmas=np.linspace(1.0, 1 / n, n), mu=mu)
    ours28 = flow.time_shift(mu, 1.0, torch.linspace(1.0, 1 / n, n, dtype=torch.float64))
    torch.testing.assert_close(ours28, ref.sigmas[:-1].double(), rtol=0, atol=1e-6)


def test_calculate_shift_anchors_and_fixed_shift_is_exponential_with_log() -> None:
    assert flow.calculate_shift(256) == pytest.approx(0.5, abs=1e-12)
    assert flow.calculate_shift(4096) == pytest.approx(1.15, abs=1e-12)
    t = torch.linspace(0, 1, 101, dtype=torch.float64)
    for s in (0.5, 3.0, math.e):
        torch.testing.assert_close(flow.time_shift(math.log(s), 1.0, t), flow.shift_sigmas(t, s), rtol=0, atol=1e-15)
    assert flow.time_shift(0.7, 1.0, t)[0].item() == 0.0 and flow.time_shift(0.7, 1.0, t)[-1].item() == 1.0
    lin = flow.time_shift(2.0, 1.5, t[1:], kind="linear")
    torch.testing.assert_close(lin, 2.0 / (2.0 + (1 / t[1:] - 1) ** 1.5), rtol=0, atol=1e-15)
    assert flow.shift_sigmas(torch.tensor([0.5], dtype=torch.float32), 3.0).dtype == torch.float32


def test_compute_empirical_mu_matches_flux2_pipeline() -> None:
    for seq_len in (1, 256, 1024, 4096, 4300, 4301, 16384):
        for steps in (1, 4, 28, 50, 200):
            assert flow.compute_empirical_mu(seq_len, steps) == their_empirical_mu(seq_len, steps)
    # a hand-computed value: 4096 tokens (a 1024² image), 50 steps
    m200, m10 = 0.00016927 * 4096 + 0.45666666, 8.73809524e-05 * 4096 + 1.89833333
    a = (m200 - m10) / 190
    assert flow.compute_empirical_mu(4096, 50) == pytest.approx(a * 50 + m200 - 200 * a, abs=1e-12)


def test_image_seq_len_of_flux_and_flux2_latents() -> None:
    # a 1024² image: FLUX.1's latent is 16x128x128 packed in 2x2 patches, FLUX.2's patchified 128x64x64
    assert flow.flux_image_seq_len((1, 16, 128, 128)) == 4096 == flow.flux2_image_seq_len(torch.zeros(1, 128, 64, 64))
    assert flow.flux_image_seq_len((16, 75, 133)) == 37 * 66  # odd sides: the pipeline's floor
    assert flow.flux_mu((16, 128, 128)) == pytest.approx(1.15, abs=1e-12)
    assert flow.flux2_mu((128, 64, 64)) == flow.compute_empirical_mu(4096, 50)
    assert FlowSchedule.flux((16, 64, 64)).mu == flow.calculate_shift(1024)
    assert FlowSchedule.flux2((128, 32, 32), num_inference_steps=28).mu == flow.compute_empirical_mu(1024, 28)


# ---- training-time sampling and loss weighting ----

@pytest.mark.parametrize("scheme", ["logit_normal", "mode", "uniform", "none", "sigma_sqrt", "cosmap"])
def test_density_sampling_draws_what_diffusers_draws(scheme: str) -> None:
    kw = {"logit_mean": 0.3, "logit_std": 1.2, "mode_scale": 1.29}
    ours = flow.compute_density_for_timestep_sampling(scheme, 512, generator=torch.Generator().manual_seed(7),
                                                      **kw)  # type: ignore[arg-type]
    theirs = their_density(scheme, 512, generator=torch.Generator().manual_seed(7), **kw)
    assert torch.equal(ours, theirs) and ours.dtype == torch.float32
    assert bool(((ours >= 0) & (ours <= 1)).all())
    again = flow.compute_density_for_timestep_sampling(scheme, 512, generator=torch.Generator().manual_seed(7),
                                                       **kw)  # type: ignore[arg-type]
    assert torch.equal(ours, again)


@pytest.mark.parametrize("scheme", ["logit_normal", "mode"])
def test_sample_timesteps_follows_the_training_scripts(scheme: str) -> None:
    ref = diffusers.FlowMatchEulerDiscreteScheduler(num_train_timesteps=T, shift=3.0)
    s = FlowSchedule.sd3()
    t, sig = s.sample_timesteps(256, scheme, generator=torch.Generator().manual_seed(3))  # type: ignore[arg-type]
    # the scripts: u -> indices = (u * T).long() -> scheduler.timesteps[indices] and the sigmas at those timesteps
    u = their_density(scheme, 256, logit_mean=0.0, logit_std=1.0, mode_scale=1.29,
                      generator=torch.Generator().manual_seed(3))
    idx = (u * T).long()
    torch.testing.assert_close(t, ref.timesteps[idx], rtol=0, atol=2e-4)
    torch.testing.assert_close(sig, ref.sigmas[idx], rtol=0, atol=2e-7)
    assert t.dtype == sig.dtype == torch.float32 and t.shape == (256,)  # float32, as the scripts hold them
    torch.testing.assert_close(t, sig * T, rtol=0, atol=1e-12)


def test_loss_weighting_matches_diffusers() -> None:
    sig = FlowSchedule.sd3().sigmas[::7].float()
    for scheme in ("sigma_sqrt", "cosmap", "none", "logit_normal"):
        ours = flow.compute_loss_weighting_for_sd3(scheme, sig)  # type: ignore[arg-type]
        theirs = their_weighting(scheme, sig)
        assert ours.dtype == torch.float32
        torch.testing.assert_close(ours, theirs, rtol=1e-6, atol=0)
    w = flow.compute_loss_weighting_for_sd3("cosmap", torch.tensor([0.5], dtype=torch.float64))
    assert w.item() == pytest.approx(4 / math.pi, abs=1e-15)  # cosmap peaks at sigma = 1/2


@pytest.mark.parametrize("schedule", [FlowSchedule(), FlowSchedule.sd3()], ids=["shift1", "sd3"])
def test_sampled_sigmas_keep_fp32_latents_fp32(schedule: FlowSchedule) -> None:
    """The float64 sigmas of sample_timesteps promoted a script's `(1 - s) z + s n` to float64, which the float32
    model refused; diffusers' scripts hold timesteps and sigmas in float32 (the scheduler's table and get_sigmas)."""
    t, sig = schedule.sample_timesteps(4, "logit_normal", generator=torch.Generator().manual_seed(0))
    assert t.dtype == sig.dtype == torch.float32
    vae = klvae.AutoencoderKL(PRESETS["tiny"]).eval()
    z, n = torch.randn(4, 4, 4, 4), torch.randn(4, 4, 4, 4)
    s = sig.view(-1, 1, 1, 1)
    noisy = (1 - s) * z + s * n
    assert noisy.dtype == torch.float32
    with torch.no_grad():
        assert vae.decode(noisy).shape == (4, 3, 8, 8)


def test_sampled_timesteps_are_diffusers_values() -> None:
    """Same rows as diffusers' table after `(u * T).long()`: the unshifted table bit for bit, SD3's within a few
    float32 steps (klvae rounds the float64 value once; diffusers computes the shift in float32)."""
    u = torch.sigmoid(torch.normal(0.0, 1.0, (64,), generator=torch.Generator().manual_seed(1)))
    idx = (u * 1000).long()
    for ours, shift in ((FlowSchedule(), 1.0), (FlowSchedule.sd3(), 3.0)):
        ref = diffusers.FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=shift)
        t, sig = ours.sample_timesteps(64, "logit_normal", generator=torch.Generator().manual_seed(1))
        torch.testing.assert_close(sig, ref.sigmas[idx], rtol=0, atol=0 if shift == 1 else 2e-7)
        torch.testing.assert_close(t, ref.timesteps[idx], rtol=0, atol=0 if shift == 1 else 2e-4)


# ---- velocity, its inverses, dtypes ----

def test_velocity_round_trip_and_the_euler_step_of_diffusers() -> None:
    x0, eps = _x(), _x(seed=1)
    sig = torch.tensor([0.001, 0.1, 0.25, 0.5, 0.9, 1.0], dtype=torch.float64)
    x_t, v = flow.noisy(x0, eps, sig), flow.get_velocity(x0, eps)
    torch.testing.assert_close(v, eps - x0, rtol=0, atol=0)
    torch.testing.assert_close(flow.predict_start_from_velocity(x_t, v, sig), x0, rtol=0, atol=1e-14)
    torch.testing.assert_close(flow.predict_noise_from_velocity(x_t, v, sig), eps, rtol=0, atol=1e-14)
    # the true velocity makes diffusers' Euler step land on the noisier-to-cleaner line exactly
    ref = diffusers.FlowMatchEulerDiscreteScheduler(num_train_timesteps=T, shift=3.0)
    ref.set_timesteps(10)
    x32, e32 = x0[:1].float(), eps[:1].float()
    sample = flow.noisy(x32, e32, ref.sigmas[3].item())
    prev = ref.step(flow.get_velocity(x32, e32), ref.timesteps[3], sample, return_dict=False)[0]
    ref._step_index = None
    torch.testing.assert_close(prev, flow.noisy(x32, e32, ref.sigmas[4].item()), rtol=0, atol=1e-6)


def test_bf16_in_bf16_out_rounded_once() -> None:
    s = FlowSchedule.sd3()
    x0, eps = _x(dtype=torch.bfloat16), _x(dtype=torch.bfloat16, seed=1)
    sig = s.sigma_at(torch.tensor([1, 100, 250, 500, 750, 1000]))
    exact = (1 - sig.view(-1, 1, 1, 1)) * x0.double() + sig.view(-1, 1, 1, 1) * eps.double()
    out = flow.noisy(x0, eps, sig)
    assert out.dtype == torch.bfloat16 and torch.equal(out, exact.to(torch.bfloat16))
    assert torch.equal(s.scale_noise(x0, sig * T, eps), out)
    assert flow.get_velocity(x0, eps).dtype == torch.bfloat16
    assert torch.equal(flow.get_velocity(x0, eps), (eps.double() - x0.double()).to(torch.bfloat16))
    assert flow.predict_start_from_velocity(out, eps, sig).dtype == torch.bfloat16
    assert flow.compute_loss_weighting_for_sd3("cosmap", sig.to(torch.bfloat16)).dtype == torch.bfloat16


# ---- argument errors ----

@pytest.mark.parametrize(("kwargs", "match"), [
    ({"shift": 0.0}, "shift must be > 0"), ({"shift": -3.0}, "shift must be > 0"),
    ({"shift": float("nan")}, "shift must be a finite"), ({"num_train_timesteps": 0}, "num_train_timesteps"),
    ({"num_train_timesteps": 10.0}, "num_train_timesteps"), ({"shift": 3.0, "mu": 1.0}, "shift or mu, not both"),
    ({"mu": float("inf")}, "mu must be a finite"),
])
def test_bad_schedules(kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        FlowSchedule(**kwargs)


def test_bad_timesteps_sigmas_and_shapes() -> None:
    s, x, eps = FlowSchedule.sd3(), _x(dtype=torch.float32), _x(dtype=torch.float32, seed=1)
    with pytest.raises(ValueError, match=r"lie in \[0, 1000\]"):
        s.scale_noise(x, torch.full((6,), 1000.5), eps)
    with pytest.raises(ValueError, match=r"lie in \[0, 1000\]"):
        s.scale_noise(x, torch.tensor(float("nan")), eps)
    with pytest.raises(TypeError, match=r"argument order: scale_noise\(sample, timestep, noise\)"):
        s.scale_noise(x, eps, torch.full((6,), 500.0))  # type: ignore[arg-type]  # add_noise's habit
    with pytest.raises(ValueError, match=r"\[B\] with B = 6"):
        s.scale_noise(x, torch.full((5,), 500.0), eps)
    with pytest.raises(ValueError, match="noise shape"):
        s.add_noise(x, eps[:1], 500.0)
    with pytest.raises(TypeError, match=r"argument order: add_noise\(x0, noise, timesteps\)"):
        s.add_noise(x, 500.0, eps)  # type: ignore[arg-type]  # scale_noise's habit
    with pytest.raises(ValueError, match=r"sigma must lie in \[0, 1\]"):
        flow.noisy(x, eps, 1.5)
    with pytest.raises(TypeError, match=r"argument order: noisy\(x0, noise, sigma\)"):
        flow.noisy(x, 0.5, eps)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="integers"):
        s.sigma_at(torch.tensor(0.5))
    for bad in (0, T + 1):
        with pytest.raises(ValueError, match=r"lie in \[1, 1000\]"):
            s.sigma_at(bad)
    with pytest.raises(ValueError, match=r"t must lie in \[0, 1\]"):
        flow.time_shift(1.0, 1.0, torch.tensor([1.5]))
    with pytest.raises(ValueError, match="image_seq_len"):
        flow.calculate_shift(0)
    with pytest.raises(ValueError, match="no 2x2 patch"):
        flow.flux_image_seq_len((16, 1, 8))


def test_bad_sampling_and_weighting_arguments() -> None:
    g = torch.Generator().manual_seed(0)
    with pytest.raises(ValueError, match="unknown weighting_scheme 'logit-normal'"):
        flow.compute_density_for_timestep_sampling("logit-normal", 4, generator=g)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match=r"torch\.Generator"):
        flow.compute_density_for_timestep_sampling("uniform", 4, generator=None)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="mode_scale must lie in"):
        flow.compute_density_for_timestep_sampling("mode", 4, generator=g, mode_scale=2.0)
    with pytest.raises(ValueError, match="logit_std must be >= 0"):
        flow.compute_density_for_timestep_sampling("logit_normal", 4, generator=g, logit_std=-1.0)
    with pytest.raises(ValueError, match="batch_size"):
        FlowSchedule().sample_timesteps(0, "uniform", generator=g)
    with pytest.raises(ValueError, match="infinite at sigma = 0"):
        flow.compute_loss_weighting_for_sd3("sigma_sqrt", torch.tensor([0.0, 0.5]))
    with pytest.raises(ValueError, match="unknown weighting_scheme"):
        flow.compute_loss_weighting_for_sd3("sqrt", torch.tensor([0.5]))  # type: ignore[arg-type]


# ---- klvae noise --schedule flow ----

FLUX_LIKE = {"latent_channels": 16, "scaling_factor": 0.3611, "shift_factor": 0.1159}
SD3_LIKE = {"latent_channels": 16, "scaling_factor": 1.5305, "shift_factor": 0.0609}


@pytest.fixture(scope="module")
def flow_models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("flow_models")
    # FLUX.2's formats hold its latent BatchNorm's statistics: one mean and std per patched channel (4 x 2x2)
    stats = {"latents_mean": tuple(0.1 * i for i in range(16)), "latents_std": tuple(1 + 0.05 * i for i in range(16))}
    flux2 = {"latent_patch_size": 2, "scaling_factor": 1.0, **stats}
    changes = {"flux": FLUX_LIKE, "sd3": SD3_LIKE, "flux2": flux2, "sd": {}}
    return {name: perturbed_vae("tiny", **kw).save_pretrained(root / name) for name, kw in changes.items()}


@pytest.fixture()
def image(tmp_path: Path) -> Path:
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[0:40, 0:56]
    arr = np.stack([xx * 4, yy * 6, (xx + yy) * 2], -1) + rng.integers(0, 30, (40, 56, 3))
    Image.fromarray(arr.clip(0, 255).astype(np.uint8)).save(tmp_path / "img.png")
    return tmp_path / "img.png"


def _tile(model: Path, image: Path, sigma: float) -> np.ndarray:
    """What the CLI's tile at sigma must show: decode((1 - sigma) z0 + sigma eps), recomputed by hand in float64."""
    from klvae import AutoencoderKL
    vae = AutoencoderKL.from_pretrained(model)
    x = pil_to_tensor(load_image(image))[None]
    z0 = vae.scale_latents(inference.encode(vae, x).mode())
    eps = torch.randn(z0.shape, generator=torch.Generator().manual_seed(0))
    zt = ((1 - sigma) * z0.double() + sigma * eps.double()).float()
    return tensor_to_uint8(inference.decode(vae, vae.unscale_latents(zt), size=tuple(x.shape[-2:]))[0])


def test_noise_flow_sheet_tiles_are_decoded_flow_latents(
    tmp_path: Path, image: Path, flow_models: dict[str, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "sheet.png"
    assert main(["noise", str(image), "-o", str(out), "--schedule", "flow", "--shift", "3", "--steps", "1", "500",
                 "1000", "--model", str(flow_models["sd"])]) == 0
    assert "t = 1, 500, 1000 (flow schedule, shift 3; sigma = 0.002994, 0.75, 1)" in capsys.readouterr().out
    sheet = np.asarray(Image.open(out), dtype=np.int16)
    top = sheet.shape[0] - 40
    assert sheet.shape[1:] == (3 * 56, 3) and top >= 18
    tiles = sheet[top:]
    # t = 500 at shift 3: sigma = 3 * 0.5 / (1 + 2 * 0.5) = 0.75
    mid = _tile(flow_models["sd"], image, 0.75).astype(np.int16)
    assert np.abs(tiles[:, 56:112] - mid).max() <= 1
    # the clean end is near the reconstruction, the noisy end far from it
    clean = _tile(flow_models["sd"], image, 0.0).astype(np.int16)
    assert np.abs(tiles[:, :56] - clean).mean() < 0.5 * np.abs(tiles[:, 112:] - clean).mean()


def test_noise_flow_default_steps_and_shift(tmp_path: Path, image: Path, flow_models: dict[str, Path],
                                            capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "sheet.png"
    assert main(["noise", str(image), "-o", str(out), "--schedule", "flow", "--model", str(flow_models["sd"])]) == 0
    assert ("t = 1, 100, 250, 500, 750, 1000 (flow schedule, shift 1; sigma = 0.001, 0.1, 0.25, 0.5, 0.75, 1)"
            in capsys.readouterr().out)
    assert main(["noise", str(image), "-o", str(out), "--schedule", "flow", "--num-steps", "50", "--overwrite",
                 "--model", str(flow_models["sd"])]) == 0
    assert "t = 1, 5, 12, 25, 38, 50 (flow schedule, shift 1;" in capsys.readouterr().out


@pytest.mark.parametrize(("family", "words"), [
    ("sd3", "SD3's shift 3;"),
    # the tiny model halves each side: a 40x56 image is a 20x28 latent, 10x14 = 140 FLUX.1 tokens
    ("flux", f"FLUX.1 mu {flow.calculate_shift(140):.4g} for 140 tokens;"),
    # FLUX.2's patched latent: 10x14 = 140 tokens, at its pipeline's 50 steps
    ("flux2", f"FLUX.2 (50 steps) mu {flow.compute_empirical_mu(140, 50):.4g} for 140 tokens;"),
])
def test_noise_flow_shift_auto_follows_the_family(family: str, words: str, tmp_path: Path, image: Path,
                                                  flow_models: dict[str, Path],
                                                  capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "sheet.png"
    assert main(["noise", str(image), "-o", str(out), "--schedule", "flow", "--shift", "auto", "--steps", "500",
                 "--model", str(flow_models[family])]) == 0
    printed = capsys.readouterr().out
    assert words in printed
    mu = {"sd3": math.log(3.0), "flux": flow.calculate_shift(140), "flux2": flow.compute_empirical_mu(140, 50)}
    sigma = math.exp(mu[family]) / (math.exp(mu[family]) + 1)  # position 1/2 shifted
    assert f"sigma = {sigma:.4g})" in printed
    expected = _tile(flow_models[family], image, sigma).astype(np.int16)
    tile = np.asarray(Image.open(out), dtype=np.int16)[-expected.shape[0]:]  # below the label strip
    assert np.abs(tile - expected).max() <= 1


@pytest.mark.parametrize(("argv", "words"), [
    (["--schedule", "flow", "--shift", "0"], "--shift must be a number > 0 or auto, got 0"),
    (["--schedule", "flow", "--shift", "-2"], "--shift must be a number > 0 or auto, got -2"),
    (["--schedule", "flow", "--shift", "nan"], "--shift must be a number > 0 or auto"),
    (["--schedule", "flow", "--shift", "big"], "--shift must be a number > 0 or auto, got big"),
    (["--shift", "3"], "--shift shifts the flow schedule, not scaled_linear; add --schedule flow"),
    (["--schedule", "flow", "--steps", "0"], "--steps must lie in [1, 1000] on the flow schedule"),
    (["--schedule", "flow", "--steps", "1001"], "got 1001"),
    (["--schedule", "flow", "--num-steps", "10", "--steps", "11"], "--steps must lie in [1, 10]"),
    (["--schedule", "flow", "--beta-start", "0.001"], "--beta-start sets the range of a linear or scaled_linear "
                                                      "schedule, not of flow"),
])
def test_noise_flow_bad_options_are_one_line_errors_before_any_work(
    argv: list[str], words: str, tmp_path: Path, image: Path, monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    def no_model(_args: object) -> None:
        raise AssertionError("the model was loaded before the options were checked")

    monkeypatch.setattr("klvae.cli.noise.load_model", no_model)
    assert main(["noise", str(image), "-o", str(tmp_path / "s.png"), *argv]) == 2
    assert words in one_error_line(capsys.readouterr().err)
    assert not (tmp_path / "s.png").exists()


def test_noise_flow_shift_auto_refuses_other_vaes(tmp_path: Path, image: Path, flow_models: dict[str, Path],
                                                  capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "s.png"
    assert main(["noise", str(image), "-o", str(out), "--schedule", "flow", "--shift", "auto",
                 "--model", str(flow_models["sd"])]) == 2
    assert "--shift auto knows the VAEs of SD3, FLUX.1 and FLUX.2" in one_error_line(capsys.readouterr().err)
    assert not out.exists()
