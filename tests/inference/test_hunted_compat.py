"""Pins bugs a hunt of klvae.compat (as_diffusers / DiffusersVAE against diffusers.AutoencoderKL) found:

- decode() moves the latents to the dtype and device of the model's *first* parameter, which is the encoder's:
  with a bf16 decoder beside an fp32 encoder, bf16 latents (which diffusers decodes) fail with torch's "Input type
  (float) and bias type (c10::BFloat16)" RuntimeError; with an fp32 decoder beside a bf16 encoder, fp32 latents are
  rounded to bf16 and decoded under bf16 autocast (bf16 images, off by ~3e-2, where diffusers gives the exact fp32
  ones); with the encoder on another device (meta here; on a GPU machine: an encoder left on the CPU while the
  decoder runs on cuda), the latents are sent to the encoder's device and decode fails with a device RuntimeError;
- train() / eval() on the wrapper switch the shared encoder and decoder, but not the klvae model it wraps:
  `as_diffusers(vae).train()` leaves `vae.training` False (and klvae code that saves and restores `vae.training`,
  such as training.validate, then puts the modules back in eval mode);
- the read-only config is writable in place with `|=` (dict.__ior__ bypasses the refused update()): the write is
  accepted and changes what pipelines read, while the model and save_pretrained keep the old value;
- DiffusersVAE(...) (a public, exported class) given a diffusers AutoencoderKL, a module or a string fails with a
  bare AttributeError from deep inside ("'FrozenDict' object has no attribute 'attention'"), where as_diffusers
  gives a TypeError naming what it refuses;
- with enable_slicing(), a batch of the wrong rank (a latent without a batch dimension, a 5-D video batch) is
  reported with the shape of its first slice ("got shape [1, 8, 8]" for a [4, 8, 8] input), not the shape given.
"""

from __future__ import annotations

import pytest
import torch
from torch import Tensor, nn

from helpers import perturbed_vae
from klvae.compat import DiffusersVAE, as_diffusers
from klvae.model.config import PRESETS
from oracles import TOL, diffusers_vae


def _pair() -> tuple[nn.Module, DiffusersVAE]:
    """diffusers' AutoencoderKL and the wrapper with the same (random) tiny weights, both in eval mode."""
    theirs = diffusers_vae(PRESETS["tiny"], 0).eval()
    ours = as_diffusers(perturbed_vae("tiny"))
    ours.load_state_dict(theirs.state_dict())
    return theirs, ours.eval()


def _latents() -> Tensor:
    return torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0))


# ---- decode's dtype and device are the encoder's, not the decoder's ------------------------------------------

@torch.no_grad()
def test_a_bf16_decoder_beside_an_fp32_encoder_decodes_bf16_latents_as_diffusers_does() -> None:
    # Now: RuntimeError "Input type (float) and bias type (c10::BFloat16) should be the same": the bf16 latents are
    # cast to the encoder's fp32 before the bf16 post_quant_conv.
    theirs, ours = _pair()
    for m in (theirs, ours):
        m.post_quant_conv.to(torch.bfloat16)
        m.decoder.to(torch.bfloat16)
    z = _latents().bfloat16()
    expected = theirs.decode(z).sample
    got = ours.decode(z).sample
    assert got.dtype == expected.dtype == torch.bfloat16
    torch.testing.assert_close(got.float(), expected.float(), atol=5e-2, rtol=5e-2)


@torch.no_grad()
def test_an_fp32_decoder_beside_a_bf16_encoder_decodes_fp32_latents_in_fp32() -> None:
    # Now: the fp32 latents are rounded to bf16 (the encoder's dtype) and decoded under bf16 autocast: bf16 images,
    # about 3e-2 off diffusers' exact fp32 ones.
    theirs, ours = _pair()
    for m in (theirs, ours):
        m.encoder.to(torch.bfloat16)
        m.quant_conv.to(torch.bfloat16)
    z = _latents()
    expected = theirs.decode(z).sample
    got = ours.decode(z).sample
    assert expected.dtype == torch.float32
    assert got.dtype == torch.float32
    assert (got - expected).abs().max().item() <= TOL


@torch.no_grad()
def test_decode_runs_where_the_decoder_is_not_where_the_encoder_is() -> None:
    # Now: the latents are moved to the encoder's device (meta here; the CPU for an encoder kept off the GPU) and
    # the decoder fails with "Tensor on device cpu is not on the expected device meta!".
    theirs, ours = _pair()
    for m in (theirs, ours):
        m.encoder.to("meta")
        m.quant_conv.to("meta")
    z = _latents()
    expected = theirs.decode(z).sample
    got = ours.decode(z).sample
    assert got.device == expected.device == torch.device("cpu")
    assert (got - expected).abs().max().item() <= TOL


# ---- train() / eval() ---------------------------------------------------------------------------------------

def test_train_and_eval_on_the_wrapper_reach_the_klvae_model() -> None:
    vae = perturbed_vae("tiny")  # eval mode
    ours = as_diffusers(vae)
    ours.train()
    assert ours.encoder.training and ours.decoder.training  # the shared modules follow...
    assert vae.training  # ...and so must the model they belong to (now it still says eval mode)
    ours.eval()
    assert not vae.training and not ours.encoder.training


def test_klvae_code_that_restores_the_models_mode_keeps_the_wrappers_training_mode() -> None:
    # training.validate saves vae.training, evaluates, then calls vae.train(saved): with the wrapper in train mode
    # and the wrapped model reporting eval mode, it leaves every shared module in eval mode.
    from klvae.training.validate import validate

    ours = as_diffusers(perturbed_vae("tiny")).train()
    validate(ours.klvae_model, [torch.rand(1, 3, 16, 16) * 2 - 1], torch.device("cpu"), None, lpips_files=None)
    assert ours.encoder.training and ours.decoder.training


# ---- the read-only config -----------------------------------------------------------------------------------

def test_the_config_refuses_an_in_place_union() -> None:
    _, ours = _pair()
    config = ours.config
    with pytest.raises(TypeError, match="read-only"):
        config |= {"scaling_factor": 1.0}
    assert ours.config["scaling_factor"] == ours.klvae_model.config.scaling_factor == PRESETS["tiny"].scaling_factor


# ---- the constructor ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("what", ["diffusers", "module", "preset name"])
def test_the_diffusersvae_constructor_names_what_it_refuses(what: str) -> None:
    # Now: AttributeError "'FrozenDict' object has no attribute 'attention'" (a diffusers AutoencoderKL) or
    # "'Linear' object has no attribute 'encoder'".
    arg: object = {"diffusers": diffusers_vae(PRESETS["tiny"], 0), "module": nn.Linear(2, 2),
                   "preset name": "tiny"}[what]
    with pytest.raises(TypeError, match="AutoencoderKL"):
        DiffusersVAE(arg)  # type: ignore[arg-type]


# ---- slicing and shape errors -------------------------------------------------------------------------------

@pytest.mark.parametrize(("op", "shape"), [("decode", (4, 8, 8)), ("encode", (2, 3, 2, 16, 16))])
def test_with_slicing_a_batch_of_the_wrong_rank_is_named_by_the_shape_given(op: str, shape: tuple[int, ...]) -> None:
    # Now: "expected a batch of latents [B, 4, H, W], got shape [1, 8, 8]" for a [4, 8, 8] input (the input was
    # split along its first axis before the check).
    ours = as_diffusers(perturbed_vae("tiny"))
    ours.enable_slicing()
    given = "[" + ", ".join(map(str, shape)) + "]"
    with torch.no_grad(), pytest.raises(ValueError) as e:
        getattr(ours, op)(torch.rand(*shape))
    assert given in str(e.value), str(e.value)


def test_outputs_answer_in_and_keys_as_diffusers_outputs_do() -> None:
    """A doubtful item, then fixed: `"latent_dist" in vae.encode(x)` was False (diffusers' BaseOutput is an
    OrderedDict of the fields that are set), and keys() was missing."""
    theirs, ours = _pair()
    x = torch.rand(1, 3, 16, 16) * 2 - 1
    for a, b in ((theirs.encode(x), ours.encode(x)), (theirs.decode(torch.zeros(1, 4, 4, 4)),
                                                     ours.decode(torch.zeros(1, 4, 4, 4)))):
        assert list(b.keys()) == list(a.keys())
        assert all(k in b for k in a) and "commit_loss" not in b
