"""The network itself: every preset builds and runs, sizes, scaling helpers (and the latent shapes they refuse),
attention variants, checkpointing, the config's checks, and its advice on norm_num_groups (for the user's own
choice, not for a count inferred from the weights)."""

from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

import klvae
from helpers import one_line
from klvae.model.config import PRESETS, AutoencoderKLConfig
from klvae.weights.convert import diffusers_to_ldm

# Published parameter counts of the released VAEs (diffusers' AutoencoderKL with these configs).
EXPECTED_PARAMS = {"sd15": 83_653_863, "sd2": 83_653_863, "sdxl": 83_653_863, "sd3": 83_819_683, "flux": 83_819_683}


@pytest.mark.parametrize("name", list(PRESETS))
def test_every_preset_builds_and_runs(name: str) -> None:
    torch.manual_seed(0)
    cfg = PRESETS[name]
    vae = klvae.AutoencoderKL(name).eval()
    f = cfg.downsample_factor
    x = torch.rand(1, 3, 2 * f, 3 * f) * 2 - 1
    with torch.no_grad():
        post = vae.encode(x)
        assert post.mean.shape == (1, cfg.latent_channels, 2, 3)
        y = vae.decode(post.mode())
    assert y.shape == x.shape
    assert torch.isfinite(y).all()
    if name in EXPECTED_PARAMS:
        assert vae.num_parameters()["total"] == EXPECTED_PARAMS[name]


def test_presets_carry_the_published_factors() -> None:
    assert PRESETS["sd15"].scaling_factor == 0.18215 and PRESETS["sd15"].shift_factor is None
    assert PRESETS["sdxl"].scaling_factor == 0.13025
    assert (PRESETS["sd3"].scaling_factor, PRESETS["sd3"].shift_factor) == (1.5305, 0.0609)
    assert (PRESETS["flux"].scaling_factor, PRESETS["flux"].shift_factor) == (0.3611, 0.1159)
    assert not PRESETS["flux"].use_quant_conv and PRESETS["flux"].latent_channels == 16


def test_scale_and_unscale_are_inverse_and_match_the_formula() -> None:
    vae = klvae.AutoencoderKL(PRESETS["tiny"].replace(scaling_factor=0.3611, shift_factor=0.1159))
    z = torch.randn(2, 4, 3, 5)
    s = vae.scale_latents(z)
    torch.testing.assert_close(s, (z - 0.1159) * 0.3611)
    torch.testing.assert_close(vae.unscale_latents(s), z)


@pytest.mark.parametrize("method", ["scale_latents", "unscale_latents"])
def test_scaling_latents_of_the_wrong_channel_count_is_an_error(method: str) -> None:
    """An SD-style model (4 channels, one scale) scaled a 16-channel FLUX latent elementwise without a word."""
    vae = klvae.AutoencoderKL(PRESETS["tiny"])
    with pytest.raises(ValueError) as e:
        getattr(vae, method)(torch.randn(1, 16, 8, 8))
    text = one_line(e)
    assert "(1, 16, 8, 8)" in text and "[B, 4, h, w]" in text, text


@pytest.mark.parametrize("attention", ["vanilla", "linear", "none"])
def test_attention_variants(attention: str) -> None:
    torch.manual_seed(0)
    vae = klvae.AutoencoderKL(PRESETS["tiny"].replace(attention=attention)).eval()
    keys = [k for k in vae.state_dict() if "attentions" in k]
    expected = {"vanilla": 20, "linear": 6, "none": 0}[attention]
    assert len(keys) == expected
    y, _ = vae(torch.randn(1, 3, 16, 24), sample_posterior=False)
    assert y.shape == (1, 3, 16, 24) and torch.isfinite(y).all()


def test_linear_attention_matches_its_formula() -> None:
    from klvae.model.blocks import LinearAttention

    torch.manual_seed(0)
    m = LinearAttention(8)
    x = torch.randn(2, 8, 3, 4)
    qkv = torch.nn.functional.conv2d(x, m.to_qkv.weight).reshape(2, 3, 8, 12)
    q, k, v = qkv[:, 0], qkv[:, 1], qkv[:, 2]
    ctx = k.softmax(-1) @ v.transpose(1, 2)  # [B, d, e]
    out = (ctx.transpose(1, 2) @ q).reshape(2, 8, 3, 4)
    torch.testing.assert_close(m(x), m.to_out(out))


def test_vanilla_attention_matches_the_seed_computation() -> None:
    from klvae.model.blocks import Attention

    torch.manual_seed(0)
    m = Attention(32, 8, 1e-6)
    x = torch.randn(1, 32, 4, 5)
    t = m.group_norm(x).flatten(2).transpose(1, 2)
    a = torch.softmax(m.to_q(t) @ m.to_k(t).transpose(1, 2) / 32**0.5, dim=-1) @ m.to_v(t)
    ref = m.to_out[0](a).transpose(1, 2).reshape(1, 32, 4, 5) + x
    torch.testing.assert_close(m(x), ref, atol=1e-5, rtol=1e-5)


def test_downsample_pads_right_and_bottom_only() -> None:
    from klvae.model.blocks import Downsample

    m = Downsample(1)
    torch.nn.init.zeros_(m.conv.bias)
    m.conv.weight.data.zero_()
    m.conv.weight.data[0, 0, 0, 0] = 1.0  # picks the top-left tap of each 3x3 stride-2 window
    x = torch.arange(16.0).reshape(1, 1, 4, 4)
    torch.testing.assert_close(m(x), x[..., ::2, ::2])


def test_gradient_checkpointing_gives_the_same_gradients() -> None:
    torch.manual_seed(0)
    vae = klvae.AutoencoderKL("tiny")
    x = torch.randn(1, 3, 16, 16)

    def grads() -> list[torch.Tensor]:
        vae.zero_grad()
        y, post = vae(x, sample_posterior=False)
        (y.square().mean() + post.kl().mean()).backward()
        return [p.grad.clone() for p in vae.parameters()]

    plain = grads()
    vae.enable_gradient_checkpointing()
    for a, b in zip(plain, grads(), strict=True):
        torch.testing.assert_close(a, b)


def test_config_validation_and_dict_round_trip() -> None:
    with pytest.raises(ValueError, match="divisible"):
        AutoencoderKLConfig(block_out_channels=(30, 64))
    with pytest.raises(ValueError, match="attention"):
        AutoencoderKLConfig(attention="flash")
    with pytest.raises(ValueError, match="unknown preset"):
        klvae.get_preset("sd9")
    cfg = PRESETS["flux"]
    assert AutoencoderKLConfig.from_dict(cfg.to_dict()) == cfg
    with pytest.raises(ValueError, match="unknown config fields"):
        AutoencoderKLConfig.from_dict({"block_out_chanels": [1]})
    with pytest.raises(ValueError, match="a config is a mapping of field names to values, not a list"):
        AutoencoderKLConfig.from_dict([1])  # type: ignore[arg-type]  # a JSON header may hold anything


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"norm_num_groups": 0}, "norm_num_groups must be a positive integer"),  # was a ZeroDivisionError
        ({"block_out_channels": "abc"}, "block_out_channels must be a list of positive integers"),
        ({"block_out_channels": (64, 0)}, "block_out_channels entry must be a positive integer"),
        ({"layers_per_block": True}, "layers_per_block must be a positive integer"),
        ({"latent_channels": 4.5}, "latent_channels must be a positive integer"),
        ({"force_upcast": "no"}, "force_upcast must be true or false"),  # "no" is truthy
        ({"use_quant_conv": 1}, "use_quant_conv must be true or false"),
        ({"scaling_factor": float("nan")}, "scaling_factor must be a finite positive number"),
        ({"shift_factor": "x"}, "shift_factor must be a finite number"),
        ({"norm_eps": 0.0}, "norm_eps must be a finite positive number"),
        # a crafted config.json would otherwise build for minutes and take all memory
        ({"layers_per_block": 100_000}, r"2 levels of 100000 blocks is not a VAE klvae builds \(at most 16 levels"),
        ({"block_out_channels": (32,) * 17}, "17 levels of 1 blocks is not a VAE"),
        ({"block_out_channels": (65536, 65536)}, "make about 618 billion parameters: not a VAE klvae builds"),
    ],
)
def test_config_refuses_wrong_types_and_ranges(change: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        PRESETS["tiny"].replace(**change)


def test_config_normalises_integral_numbers() -> None:
    import numpy as np

    cfg = PRESETS["tiny"].replace(block_out_channels=[np.int64(32), 64], latent_channels=np.int64(8))
    assert cfg.block_out_channels == (32, 64) and type(cfg.latent_channels) is int


def test_inferred_group_count_warning_does_not_blame_the_user(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A metadata-less LDM file of width 16: norm_num_groups 16 is guessed, and the config's warning told the
    user to "use norm_num_groups <= 8", a value they never set."""
    cfg = AutoencoderKLConfig(block_out_channels=(16, 32), layers_per_block=1, norm_num_groups=8, sample_size=32)
    model = klvae.AutoencoderKL(cfg)
    path = tmp_path / "vae.safetensors"
    save_file(diffusers_to_ldm({k: v.contiguous() for k, v in model.state_dict().items()}), str(path))
    with caplog.at_level("WARNING"):
        back = klvae.AutoencoderKL.from_pretrained(path)
    assert back.config.norm_num_groups == 16
    text = " ".join(r.getMessage() for r in caplog.records)
    assert "use norm_num_groups <=" not in text, text
    assert "guess" in text and "one channel per GroupNorm group at width 16" in text, text


def test_a_chosen_group_count_still_gets_the_advice(caplog: pytest.LogCaptureFixture) -> None:
    """(Not a bug) The user's own norm_num_groups 16 at width 16 still gets the advice."""
    with caplog.at_level("WARNING"):
        AutoencoderKLConfig(block_out_channels=(16, 32), norm_num_groups=16)
    assert "use norm_num_groups <= 8" in caplog.text


def test_flux2_statistics_added_on_load_do_not_repeat_the_advice(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A metadata-less FLUX.2 file of width 16: loading adds the bn statistics with a config.replace outside the
    guesser's guard, which rebuilt the guessed config and told the user to "use norm_num_groups <= 8"."""
    from klvae.weights.latent_bn import latent_bn_tensors

    cfg = PRESETS["flux2"].replace(block_out_channels=(16, 32), layers_per_block=1, norm_num_groups=8,
                                   sample_size=32, latents_mean=(0.1,) * 128, latents_std=(1.5,) * 128)
    sd = {k: v.contiguous() for k, v in klvae.AutoencoderKL(cfg).state_dict().items()}
    path = tmp_path / "vae.safetensors"
    save_file({**sd, **latent_bn_tensors(cfg)}, str(path))
    with caplog.at_level("WARNING"):
        back = klvae.AutoencoderKL.from_pretrained(path)
        back.config.replace(scaling_factor=1.0)  # as `klvae latents` sets a file's factors on the loaded model
    assert back.config.norm_num_groups == 16 and back.config.latents_std[0] == pytest.approx(1.5)
    text = " ".join(r.getMessage() for r in caplog.records)
    assert "use norm_num_groups <=" not in text, text
    assert "guess" in text and "one channel per GroupNorm group at width 16" in text, text


def test_replacing_the_group_count_still_gets_the_advice(caplog: pytest.LogCaptureFixture) -> None:
    """(Not a bug) A replace that sets the widths or the group count is the user's choice: advised as before."""
    base = AutoencoderKLConfig(block_out_channels=(16, 32), norm_num_groups=8)
    with caplog.at_level("WARNING"):
        base.replace(norm_num_groups=16)
    assert "use norm_num_groups <= 8" in caplog.text
