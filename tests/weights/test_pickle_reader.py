"""The pickle reader of weight files (.ckpt, .pt): a tensor's pickled attributes cannot stand in for its own methods,
tensors may not declare more data than the file holds, and views into one storage within the file still load."""

from __future__ import annotations

import collections
import sys
import types
from pathlib import Path

import pytest
import torch

from klvae.errors import WeightsError
from klvae.weights.read import read_weights


def _hijacked(value: torch.Tensor, attribute_value: object) -> torch.Tensor:
    # torch.save pickles a tensor's attributes as _rebuild_from_type_v2's state, which weights_only sets again.
    value.clone = attribute_value  # type: ignore[method-assign]
    return value


def test_a_pickled_tensor_attribute_cannot_stand_in_for_its_clone(tmp_path: Path,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    # Lightning's ModelCheckpoint is read as klvae's inert stand-in: as a tensor's `clone` it was called, and
    # its result (no tensor) went into the state dict; so did an OrderedDict.
    lightning = types.ModuleType("pytorch_lightning.callbacks.model_checkpoint")
    checkpoint_cls = type("ModelCheckpoint", (), {"__module__": lightning.__name__})
    lightning.ModelCheckpoint = checkpoint_cls  # type: ignore[attr-defined]
    for name in ("pytorch_lightning", "pytorch_lightning.callbacks", lightning.__name__):
        monkeypatch.setitem(sys.modules, name, lightning if name == lightning.__name__ else types.ModuleType(name))
    sd = {"first_stage_model.encoder.w": _hijacked(torch.arange(3.0), checkpoint_cls),
          "first_stage_model.decoder.w": _hijacked(torch.ones(2), collections.OrderedDict),
          "model.diffusion_model.x": torch.zeros(1)}
    torch.save({"state_dict": sd}, tmp_path / "v.ckpt")
    raw = read_weights(tmp_path / "v.ckpt")
    assert all(type(t) is torch.Tensor for t in raw.tensors.values()), raw.tensors
    assert torch.equal(raw.tensors["first_stage_model.encoder.w"], torch.arange(3.0))
    assert not any(t.requires_grad for t in raw.tensors.values())


@pytest.mark.parametrize("kind", ["expanded", "shared"])
def test_tensors_declaring_more_data_than_the_file_holds_are_refused(tmp_path: Path, kind: str) -> None:
    # A few KB that clone() made 8 MB of (a crafted file's sizes go to terabytes).
    if kind == "expanded":
        sd = {"encoder.w": torch.zeros(1).expand(2 * 10**6), "decoder.w": torch.zeros(1)}
    else:
        one = torch.zeros(25_000)
        sd = {**{f"encoder.w{i}": one for i in range(80)}, "decoder.w": torch.zeros(1)}
    torch.save(sd, tmp_path / "v.pt")
    with pytest.raises(WeightsError, match=r"declare more data than the file's \d+ bytes"):
        read_weights(tmp_path / "v.pt")


def test_views_into_one_storage_within_the_file_still_load(tmp_path: Path) -> None:
    whole = torch.randn(1000)
    torch.save({"encoder.w": whole[:600].view(20, 30), "decoder.w": whole[600:], "edm_mean": whole[:4]},
               tmp_path / "v.pt")
    raw = read_weights(tmp_path / "v.pt")
    assert torch.equal(raw.tensors["encoder.w"], whole[:600].view(20, 30))
    assert torch.equal(raw.tensors["decoder.w"], whole[600:])
