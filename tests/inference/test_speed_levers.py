"""The inference levers: each keeps the output (exactly, or within the half dtype's noise) and the weights' keys."""

import math
from pathlib import Path

import pytest
import torch
from PIL import Image

import klvae
from helpers import perturbed_vae
from klvae import inference
from klvae.cli import common
from klvae.cli.main import main
from klvae.errors import KlvaeError
from klvae.inference import SpeedOptions, TileOptions, optimize_for_inference
from klvae.model.blocks import Upsample, fold_upsample_kernel


def _psnr(a: torch.Tensor, b: torch.Tensor) -> float:
    mse = (a.float() - b.float()).pow(2).mean().item()
    return math.inf if mse == 0 else 10 * math.log10(4.0 / mse)


def _codec(vae: klvae.AutoencoderKL, x: torch.Tensor, dtype: torch.dtype,
           tiling: TileOptions | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    m = inference.encode_moments(vae, x, dtype, tiling=tiling)
    return m, inference.decode(vae, m[:, : vae.config.latent_channels], dtype, tiling=tiling)


def test_cpu_defaults_keep_the_weights_in_channels_last_and_fold_the_upsamplers() -> None:
    vae = perturbed_vae()
    before = {k: v.clone() for k, v in vae.state_dict().items()}
    optimize_for_inference(vae, torch.float32)
    after = vae.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert all(v.is_contiguous(memory_format=torch.channels_last) for v in after.values() if v.dim() == 4)
    ups = [m for m in vae.modules() if isinstance(m, Upsample)]
    assert ups and all(m.fold for m in ups)
    optimize_for_inference(vae, torch.float32, SpeedOptions(fold_upsample=False))
    assert not any(m.fold for m in ups)


@pytest.mark.parametrize("shape", [(1, 5, 4, 4), (2, 8, 7, 3)])
def test_folded_kernel_equals_nearest_upsampling_then_conv(shape: tuple[int, ...], device: torch.device) -> None:
    torch.manual_seed(0)
    up = Upsample(shape[1]).to(device)
    x = torch.randn(shape, device=device)
    ref = up(x)
    up.fold = True
    out = up(x)
    assert out.shape == ref.shape == (shape[0], shape[1], 2 * shape[2], 2 * shape[3])
    assert (out - ref).abs().max() < 1e-5
    with torch.autocast(device.type, dtype=torch.bfloat16):  # the kernel is folded in fp32 even under autocast
        assert fold_upsample_kernel(up.conv.weight).dtype == torch.float32
    w16 = up.conv.weight.detach().to(torch.bfloat16)
    m = torch.tensor([[0, 0, 1], [0, 1, 1], [1, 1, 0], [1, 0, 0]], dtype=torch.float64, device=device)
    once = torch.einsum("pa,qb,oiab->iopq", m, m, w16.double()).to(torch.bfloat16)  # summed exactly, rounded once
    assert torch.equal(fold_upsample_kernel(w16), once)


def test_folded_upsampling_matches_whole_and_in_strips(device: torch.device) -> None:
    x = (torch.rand(1, 3, 40, 56) * 2 - 1).to(device)
    m_ref, d_ref = _codec(perturbed_vae(device=device), x, torch.float32)
    folded = optimize_for_inference(perturbed_vae(device=device), torch.float32, SpeedOptions(fold_upsample=True))
    for tiling in (None, TileOptions(tile_size=8), TileOptions(tile_size=6), TileOptions(tile_size=3)):
        m, d = _codec(folded, x, torch.float32, tiling)
        assert torch.equal(m, m_ref) or (m - m_ref).abs().max() < 1e-4  # the encoder has no upsampler
        assert (d - d_ref).abs().max() < 1e-4, tiling


def test_channels_last_is_exact(device: torch.device) -> None:
    x = (torch.rand(2, 3, 40, 56) * 2 - 1).to(device)
    m_ref, d_ref = _codec(perturbed_vae(device=device), x, torch.float32)
    fast = optimize_for_inference(perturbed_vae(device=device), torch.float32, SpeedOptions(channels_last=True))
    assert fast.encoder.conv_in.weight.is_contiguous(memory_format=torch.channels_last)
    for tiling in (None, TileOptions(tile_size=8)):
        m, d = _codec(fast, x, torch.float32, tiling)
        assert (m - m_ref).abs().max() < 1e-4 and (d - d_ref).abs().max() < 1e-4


def test_tiled_maps_on_the_cpu_follow_the_weights_layout() -> None:
    """A channels_last model (the commands' CPU default) streams channels_last maps, so that no strip is
    converted; an NCHW one keeps NCHW maps."""
    from klvae.inference.tiling import make_streamer

    opts = TileOptions(tile_size=8)
    nchw = optimize_for_inference(perturbed_vae(), torch.float32, SpeedOptions(channels_last=False))
    nhwc = optimize_for_inference(perturbed_vae(), torch.float32)
    assert not make_streamer(nchw, opts, torch.float32, 32).channels_last
    st = make_streamer(nhwc, opts, torch.float32, 32)
    assert st.channels_last and st.new_map(1, 4, 6, 5)[0].is_contiguous(memory_format=torch.channels_last)
    x = torch.rand(1, 3, 40, 24) * 2 - 1
    m_ref, d_ref = _codec(nchw, x, torch.float32)
    m, d = _codec(nhwc, x, torch.float32, opts)
    assert (m - m_ref).abs().max() < 1e-4 and (d - d_ref).abs().max() < 1e-4


def test_half_weights_stay_within_bf16_noise_and_keep_their_keys(device: torch.device) -> None:
    x = (torch.rand(1, 3, 32, 32) * 2 - 1).to(device)
    _, d_ref = _codec(perturbed_vae(device=device), x, torch.float32)
    fast = optimize_for_inference(perturbed_vae(device=device), torch.bfloat16,
                                  SpeedOptions(cast_weights=True, channels_last=True))
    assert {p.dtype for p in fast.parameters()} == {torch.bfloat16}
    assert set(fast.state_dict()) == set(perturbed_vae().state_dict())
    for tiling in (None, TileOptions(tile_size=8)):
        _, d = _codec(fast, x, torch.bfloat16, tiling)
        assert d.dtype == torch.float32 and 38.0 < _psnr(d, d_ref) < math.inf  # 44.6 dB measured on the CPU


def test_compiled_model_matches_eager_and_saves_the_same_keys(tmp_path: Path, device: torch.device) -> None:
    x = (torch.rand(1, 3, 32, 32) * 2 - 1).to(device)
    m_ref, d_ref = _codec(perturbed_vae(device=device), x, torch.float32)
    compiled = optimize_for_inference(perturbed_vae(device=device), torch.float32, SpeedOptions(compile=True))
    m, d = _codec(compiled, x, torch.float32)
    assert (m - m_ref).abs().max() < 1e-4 and (d - d_ref).abs().max() < 1e-4
    compiled.save_pretrained(tmp_path)
    again = klvae.AutoencoderKL.from_pretrained(str(tmp_path))
    plain = perturbed_vae(device=device).state_dict()
    assert list(again.state_dict()) == list(plain)
    assert all(torch.equal(v, plain[k].cpu()) for k, v in again.state_dict().items())


def test_bad_compile_mode_is_named() -> None:
    with pytest.raises(KlvaeError, match="compile mode"):
        optimize_for_inference(perturbed_vae(), torch.float32, SpeedOptions(compile=True, compile_mode="fastest"))


def test_cli_speed_flags_reach_the_levers(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    seen: list[SpeedOptions] = []

    def record(vae: klvae.AutoencoderKL, dtype: torch.dtype, opts: SpeedOptions) -> klvae.AutoencoderKL:
        seen.append(opts)
        return vae

    monkeypatch.setattr(common, "optimize_for_inference", record)
    monkeypatch.setattr(inference, "optimize_for_inference", record)  # eval imports it from there
    data = tmp_path / "data"
    data.mkdir()
    img = data / "a.png"
    Image.new("RGB", (16, 16), (90, 140, 30)).save(img)
    for flag in ([], ["--compile"], ["--no-fused-norm"]):
        assert main(["reconstruct", str(img), "-o", str(tmp_path / f"r{len(seen)}.png"), *flag]) == 0
        assert main(["eval", "--data", str(data), "-o", str(tmp_path / f"rep{len(seen)}"), "--resolution", "16",
                     "--no-lpips", "--no-fid", *flag]) == 0
    assert [(o.compile, o.fused_norm) for o in seen] == [(False, None)] * 2 + [(True, None)] * 2 + [(False, False)] * 2
    assert main(["info", "--json"]) == 0  # info describes a model: it has no speed levers to take
    with pytest.raises(SystemExit):
        main(["info", "--compile"])
