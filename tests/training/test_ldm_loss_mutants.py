"""Pins what a mutation audit of klvae.training.losses.ldm and klvae.training.losses.discriminator found untested:
the loss config's number checks (bools, nan/inf, None, an int past float's range, whole numbers, logvar_init,
negative disc_start, the >= 1 sizes, disc_in_channels) and their messages; every field of the three presets and the
unknown preset's list; no critic with disc_factor 0, and a loss without one never active; the critic built from
disc_in_channels / disc_num_layers with the DCGAN init; LPIPS from the files the config names; the state-dict hooks
under a parent module, with a checkpoint's own LPIPS keys, and without LPIPS; a zero GAN weight (not an autograd
error) when either loss has no graph; the reconstruction keeping the inputs' dtype; the fp16 adaptive weight down
to its smallest scale; the no-critic and last-layer messages; and in the critic, the 8x width cap, awaits_init
after the init, ActNorm's `initialized` saved with the weights and its statistics taken in fp32."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from torch import nn

from helpers import one_line
from klvae.errors import KlvaeError
from klvae.nets.lpips import TAP_CHANNELS, VGG16Features
from klvae.training.losses import (
    LOSS_PRESETS,
    ActNorm,
    AutoencoderLoss,
    LossConfig,
    NLayerDiscriminator,
    adaptive_weight,
    get_loss_preset,
)


def _no_lpips(**changes: object) -> LossConfig:
    return LossConfig(perceptual_weight=0.0, **changes)


# ---- LossConfig: number checks and messages ---------------------------------------------------------------


@pytest.mark.parametrize(("field", "value", "message"), [
    ("kl_weight", True, "loss.kl_weight must be a finite number, got True"),
    ("disc_start", False, "loss.disc_start must be a finite number, got False"),
    ("kl_weight", math.nan, "loss.kl_weight must be a finite number, got nan"),
    ("disc_weight", math.inf, "loss.disc_weight must be a finite number, got inf"),
    ("logvar_init", math.nan, "loss.logvar_init must be a finite number, got nan"),
    ("logvar_init", "-inf", "loss.logvar_init must be a finite number, got '-inf'"),
    ("disc_start", 1.5, "loss.disc_start must be a whole number, got 1.5"),
    ("disc_ndf", "8.5", "loss.disc_ndf must be a whole number, got '8.5'"),
    ("disc_ndf", None, "loss.disc_ndf must be a finite number, got None"),  # float(None): a TypeError
    ("disc_start", 10**400, "loss.disc_start must be a finite number, got 1000000"),  # an OverflowError
], ids=["true", "false", "nan", "inf", "logvar-nan", "logvar-str-inf", "half-step", "str-half", "none", "huge-int"])
def test_numbers_that_are_not_finite_or_not_whole_are_refused(field: str, value: object, message: str) -> None:
    with pytest.raises(KlvaeError) as e:
        LossConfig(**{field: value})
    assert one_line(e).startswith(message)


@pytest.mark.parametrize("field", ["pixel_weight", "perceptual_weight", "kl_weight", "disc_weight", "disc_factor",
                                   "disc_start"])
def test_each_weight_and_disc_start_must_not_be_negative(field: str) -> None:
    with pytest.raises(KlvaeError) as e:
        LossConfig(**{field: -1})
    assert one_line(e) == f"loss.{field} must be >= 0, got {-1 if field == 'disc_start' else -1.0}"
    assert getattr(LossConfig(**{field: 0}), field) == 0  # 0 is allowed


@pytest.mark.parametrize("field", ["disc_num_layers", "disc_in_channels", "disc_ndf"])
def test_critic_sizes_must_be_at_least_one(field: str) -> None:
    # Refused in the config, before any critic is built (NLayerDiscriminator alone checks only the layers).
    with pytest.raises(KlvaeError) as e:
        LossConfig(**{field: 0})
    assert one_line(e) == f"loss.{field} must be >= 1, got 0"
    assert getattr(LossConfig(**{field: 1}), field) == 1


def test_strings_from_yaml_become_numbers_of_the_field_kind() -> None:
    cfg = LossConfig(logvar_init="0.5", disc_start="100", disc_ndf="8.0")
    assert cfg.logvar_init == 0.5 and type(cfg.logvar_init) is float
    assert cfg.disc_start == 100 and type(cfg.disc_start) is int
    assert cfg.disc_ndf == 8 and type(cfg.disc_ndf) is int


def test_choice_and_preset_messages() -> None:
    with pytest.raises(KlvaeError) as e:
        LossConfig(pixel_loss="l3")
    assert one_line(e) == "loss.pixel_loss must be 'l1' or 'l2', got 'l3'"
    with pytest.raises(KlvaeError) as e:
        LossConfig(disc_loss="wgan")
    assert one_line(e) == "loss.disc_loss must be one of ['hinge', 'vanilla'], got 'wgan'"
    with pytest.raises(KlvaeError) as e:
        get_loss_preset("nope")
    assert one_line(e) == "unknown loss preset 'nope'; choose one of ldm, ft-mse, mse"


def test_every_field_of_the_presets() -> None:
    common = dict(pixel_weight=1.0, lpips_pretrained=True, lpips_vgg_path=None, lpips_lin_path=None, logvar_init=0.0,
                  learn_logvar=False, disc_start=50001, disc_factor=1.0, disc_loss="hinge", disc_num_layers=3,
                  disc_in_channels=3, disc_ndf=64, disc_use_actnorm=False)
    want = {
        "ldm": dict(common, pixel_loss="l1", perceptual_weight=1.0, kl_weight=1e-6, disc_weight=0.5),
        "ft-mse": dict(common, pixel_loss="l2", perceptual_weight=0.1, kl_weight=0.0, disc_weight=0.0),
        "mse": dict(common, pixel_loss="l2", perceptual_weight=0.0, kl_weight=0.0, disc_weight=0.0),
    }
    assert list(LOSS_PRESETS) == list(want)
    for name, fields in want.items():
        cfg = get_loss_preset(name)
        assert {k: getattr(cfg, k) for k in fields} == fields, name
        assert {f.name for f in cfg.__dataclass_fields__.values()} == set(fields)  # nothing left unpinned
    assert LossConfig() == LOSS_PRESETS["ldm"]


# ---- which critic is built, and when it counts -----------------------------------------------------------


def test_disc_factor_zero_builds_no_critic() -> None:
    cfg = _no_lpips(disc_factor=0.0)
    assert cfg.disc_weight > 0 and not cfg.uses_discriminator
    loss_fn = AutoencoderLoss(cfg)
    assert loss_fn.discriminator is None and not list(loss_fn.discriminator_parameters())


def test_a_loss_without_critic_is_never_active() -> None:
    # disc_factor 1 and a step long past disc_start: still no GAN term, so the trainer never calls the critic.
    loss_fn = AutoencoderLoss(get_loss_preset("mse").replace(disc_start=0))
    assert loss_fn.discriminator_factor(10**9) == 0.0 and not loss_fn.discriminator_active(10**9)
    x, y = torch.zeros(1, 3, 8, 8), torch.ones(1, 3, 8, 8)
    loss, logs = loss_fn.generator_loss(x, y, None, 10**9)
    assert logs["disc_factor"].item() == 0.0 and loss.item() == pytest.approx(3 * 8 * 8)
    with pytest.raises(KlvaeError) as e:
        loss_fn.discriminator_loss(x, y, 10**9)
    assert one_line(e) == "this loss has no discriminator (disc_weight or disc_factor is 0)"


def test_the_critic_follows_the_config_and_gets_the_dcgan_init() -> None:
    torch.manual_seed(0)
    loss_fn = AutoencoderLoss(_no_lpips(disc_in_channels=1, disc_num_layers=2, disc_ndf=32))
    d = loss_fn.discriminator
    convs = [m for m in d.modules() if isinstance(m, nn.Conv2d)]
    assert [(m.in_channels, m.out_channels) for m in convs] == [(1, 32), (32, 64), (64, 128), (128, 1)]
    assert d(torch.randn(2, 1, 32, 32)).shape == (2, 1, 6, 6)
    # weights_init: N(0, 0.02) where PyTorch's default would give std 1/sqrt(3 fan_in) (0.14 and 0.013 here).
    for conv in (convs[0], convs[-1]):
        assert conv.weight.std().item() == pytest.approx(0.02, rel=0.25)
    bn = [m.weight for m in d.modules() if isinstance(m, nn.BatchNorm2d)]
    assert all(not torch.all(w == 1.0) for w in bn)  # N(1, 0.02), not BatchNorm's constant 1


def test_the_lpips_files_the_config_names_are_the_ones_loaded(tmp_path: Path) -> None:
    torch.manual_seed(0)
    vgg = {k: torch.randn_like(v) for k, v in VGG16Features().state_dict().items()}  # torchvision layout
    lin = {f"lin{i}.model.1.weight": torch.rand(1, c, 1, 1) for i, c in enumerate(TAP_CHANNELS)}
    torch.save(vgg, tmp_path / "vgg16.pth")
    torch.save(lin, tmp_path / "lin.pth")
    cfg = LossConfig(lpips_vgg_path=str(tmp_path / "vgg16.pth"), lpips_lin_path=str(tmp_path / "lin.pth"),
                     disc_weight=0.0)  # lpips_pretrained stays True: the named files, not a download
    lp = AutoencoderLoss(cfg).perceptual
    assert torch.equal(lp.net.features[0].weight, vgg["features.0.weight"])
    assert torch.equal(lp.lin.lin4.model[1].weight, lin["lin4.model.1.weight"])


# ---- state-dict hooks --------------------------------------------------------------------------------------


class _Parent(nn.Module):
    def __init__(self, cfg: LossConfig) -> None:
        super().__init__()
        self.loss = AutoencoderLoss(cfg)


def test_lpips_is_left_out_and_filled_in_under_a_parent_module() -> None:
    torch.manual_seed(0)
    parent = _Parent(LossConfig(lpips_pretrained=False, disc_ndf=8))
    sd = parent.state_dict()
    assert "loss.logvar" in sd and not any(".perceptual." in k or k.startswith("perceptual.") for k in sd)
    parent.load_state_dict(sd, strict=True)  # the LPIPS keys come from the module itself
    # A checkpoint that does carry LPIPS keys (saved before they were left out) keeps its own values.
    lin = "loss.perceptual.lin.lin0.model.1.weight"
    full = {**sd, **{f"loss.perceptual.{k}": v.clone() for k, v in parent.loss.perceptual.state_dict().items()}}
    full[lin] = torch.full_like(full[lin], 0.25)
    parent.load_state_dict(full, strict=True)
    assert torch.all(parent.loss.perceptual.lin.lin0.model[1].weight == 0.25)


def test_a_loss_without_lpips_loads_its_own_state_dict() -> None:
    loss_fn = AutoencoderLoss(_no_lpips(disc_ndf=8, learn_logvar=True))
    sd = {k: v.clone() for k, v in loss_fn.state_dict().items()}
    sd["logvar"].fill_(0.5)
    loss_fn.load_state_dict(sd, strict=True)
    assert loss_fn.logvar.item() == 0.5


# ---- the generator loss ------------------------------------------------------------------------------------


def test_no_gan_weight_when_either_loss_has_no_graph_to_the_last_layer() -> None:
    torch.manual_seed(0)
    last = nn.Parameter(torch.randn(3, 4, 1, 1))
    x, y = torch.rand(2, 3, 32, 32), torch.rand(2, 3, 32, 32)  # reconstructions given as plain tensors
    # The critic trains, so g_loss has a graph; the nll has none.
    loss_fn = AutoencoderLoss(_no_lpips(disc_start=0, disc_ndf=8))
    _, logs = loss_fn.generator_loss(x, y, None, 0, last_layer=last)
    assert logs["d_weight"].item() == 0.0 and logs["g_loss"].item() != 0.0
    # A learned logvar gives the nll a graph; the frozen critic leaves g_loss without one.
    loss_fn = AutoencoderLoss(_no_lpips(disc_start=0, disc_ndf=8, learn_logvar=True))
    loss_fn.discriminator_requires_grad(False)
    loss, logs = loss_fn.generator_loss(x, y, None, 0, last_layer=last)
    assert logs["d_weight"].item() == 0.0 and loss.requires_grad


def test_the_reconstruction_term_keeps_the_inputs_dtype() -> None:
    torch.manual_seed(0)
    loss_fn = AutoencoderLoss(LossConfig(lpips_pretrained=False, disc_weight=0.0))
    x, y = (torch.rand(1, 3, 32, 32) * 2 - 1).bfloat16(), (torch.rand(1, 3, 32, 32) * 2 - 1).bfloat16()
    rec = loss_fn.reconstruction(x, y)
    assert rec.dtype == torch.bfloat16  # LPIPS returns fp32; cast back, not promoting the per-pixel term
    torch.testing.assert_close(rec, (x - y).abs() + loss_fn.perceptual(x, y).bfloat16())


def test_last_layer_message_names_what_to_pass() -> None:
    w = nn.Parameter(torch.ones(2))
    other = torch.ones((), requires_grad=True) * 2
    with pytest.raises(ValueError) as e:
        adaptive_weight(other, (w * 2).sum(), w)
    assert one_line(e) == "last_layer is not in the graph of the loss (pass the decoder's final conv weight)"


def test_fp16_adaptive_weight_when_the_nll_gradient_needs_the_smallest_scale() -> None:
    # An nll gradient ~1e11: past fp16's 65504 until the loss is scaled by 2**-24, the fourth and last try.
    torch.manual_seed(0)
    conv = nn.Conv2d(2, 3, 1)
    h = torch.rand(1, 2, 192, 192) * 0.5 + 2.0
    x = torch.full((1, 3, 192, 192), 10.0)

    def weight(fp16: bool) -> torch.Tensor:
        with torch.autocast("cpu", dtype=torch.float16, enabled=fp16):
            rec = conv(h)
            nll = 1e6 * (x - rec.float()).abs().sum()
            g = -1e8 * rec.float().mean()
            return adaptive_weight(nll, g, conv.weight)

    ref = weight(False)
    assert 1.0 < ref.item() < 1e4
    torch.testing.assert_close(weight(True).float(), ref, rtol=2e-2, atol=0.0)


# ---- the critic ----------------------------------------------------------------------------------------------


def test_patchgan_width_stops_at_eight_times_ndf() -> None:
    d = NLayerDiscriminator(input_nc=3, ndf=4, n_layers=5)
    assert [m.out_channels for m in d.main if isinstance(m, nn.Conv2d)] == [4, 8, 16, 32, 32, 32, 1]


def test_awaits_init_turns_false_after_the_first_generator_pass() -> None:
    torch.manual_seed(0)
    loss_fn = AutoencoderLoss(_no_lpips(disc_start=5, disc_ndf=8, disc_use_actnorm=True))
    assert loss_fn.discriminator.awaits_init()
    calls: list[int] = []
    loss_fn.discriminator.register_forward_hook(lambda *a: calls.append(1))
    x = torch.rand(2, 3, 32, 32)
    loss_fn.generator_loss(x, x.flip(-1), None, 0)
    assert not loss_fn.discriminator.awaits_init() and len(calls) == 1
    loss_fn.generator_loss(x, x.flip(-1), None, 1)
    assert len(calls) == 1  # before disc_start, once initialised, the critic is not run again


def test_actnorm_initialized_is_saved_and_a_resumed_norm_keeps_its_values() -> None:
    torch.manual_seed(0)
    norm = ActNorm(3)
    norm(torch.randn(4, 3, 5, 5) * 3 + 1)
    sd = norm.state_dict()
    assert sd["initialized"].item() == 1
    resumed = ActNorm(3)
    resumed.load_state_dict(sd)
    resumed(torch.randn(4, 3, 5, 5) * 10)
    torch.testing.assert_close(resumed.loc, norm.loc)
    torch.testing.assert_close(resumed.scale, norm.scale)


def test_actnorm_takes_its_statistics_in_fp32_from_fp16_features() -> None:
    torch.manual_seed(0)
    x = (torch.randn(4, 2, 64, 64) * 50 + 400).half()  # fp16 sums over 16k values lose the mean's digits
    norm = ActNorm(2)
    norm(x)
    flat = x.float().transpose(0, 1).reshape(2, -1)
    torch.testing.assert_close(norm.loc.detach().flatten(), -flat.mean(1))
    torch.testing.assert_close(norm.scale.detach().flatten(), 1 / (flat.std(1) + 1e-6))
    assert norm.loc.dtype == torch.float32
