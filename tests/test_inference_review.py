"""Inference review: the out-of-memory fall-back frees the failed pass first; non-finite images are refused."""

import logging
import weakref

import pytest
import torch

import klvae
from helpers import perturbed_vae
from klvae import inference
from klvae.inference import api


def test_out_of_memory_fall_back_runs_after_the_failed_pass_is_freed(monkeypatch: pytest.MonkeyPatch,
                                                                      device: torch.device) -> None:
    # An exception's traceback holds the frames it passed through, and with them the activations of the pass that
    # ran out of memory: the tiled retry, and empty_cache before it, must come once the exception is gone.
    vae = perturbed_vae("tiny", device=device)
    z = torch.randn(1, 4, 8, 8, device=device)
    expected = inference.decode(vae, z)
    activation: list[weakref.ref] = []
    freed: dict[str, bool] = {}

    def oom(t: torch.Tensor) -> None:
        h = torch.empty(1024, device=t.device)  # what a real pass holds when its next allocation fails
        activation.append(weakref.ref(h))
        raise torch.cuda.OutOfMemoryError("CUDA out of memory (simulated)")

    def tiled(*args: object, _real=api.tiled_decode, **kwargs: object) -> torch.Tensor:
        freed["tiled"] = activation[0]() is None
        return _real(*args, **kwargs)

    monkeypatch.setattr(vae, "decode", oom)
    monkeypatch.setattr(api, "tiled_decode", tiled)
    monkeypatch.setattr(torch.cuda, "empty_cache", lambda: freed.setdefault("empty_cache", activation[0]() is None))
    out = inference.decode(vae, z)
    torch.testing.assert_close(out, expected, atol=1e-4, rtol=0)
    assert freed == {"empty_cache": True, "tiled": True}


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_images_are_refused_before_any_pass(bad: float, monkeypatch: pytest.MonkeyPatch,
                                                       caplog: pytest.LogCaptureFixture) -> None:
    # As non-finite latents are: otherwise a bf16 pass "overflows", is rerun in fp32 with a warning that blames
    # the precision, and returns NaN moments anyway.
    vae = perturbed_vae("tiny")
    passes = []
    real = vae.encode_moments
    monkeypatch.setattr(vae, "encode_moments", lambda t: passes.append(1) or real(t))
    x = torch.rand(1, 3, 16, 16) * 2 - 1
    x[0, 1, 3, 5] = bad
    with caplog.at_level(logging.WARNING), pytest.raises(klvae.ImageError, match="NaN or infinite"):
        inference.encode_moments(vae, x, torch.bfloat16)
    assert passes == [] and "rerunning" not in caplog.text
