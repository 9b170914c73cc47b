"""Review of the weight readers and the tar reader: a pickle's tensors are copied with Tensor's own methods and
within the file's size; file names give a family only as whole words; tar shards are read through one file per
thread, a shard turned into a FIFO is an error, not a hang, and GNU sparse members are no images."""

from __future__ import annotations

import collections
import io
import os
import sys
import tarfile
import threading
import types
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from helpers import noise_png
from klvae.errors import ImageError, WeightsError
from klvae.latents.sources import open_source
from klvae.weights.infer import family_from_name
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


@pytest.mark.parametrize(("name", "family"), [
    ("ssd1b_vae.safetensors", None),  # SSD-1B's VAE is SDXL's: "sd1" inside "ssd1b" is no SD 1.x
    ("SSD-1B.safetensors", None),
    ("playground-v2-1024px-aesthetic.fp16.safetensors", None),  # SDXL's factors, not v2.5's EDM statistics
    ("influx_vae.safetensors", None),
    ("playground-v2.5-1024px-aesthetic.fp16.safetensors", "playground25"),
    ("sd_xl_base_1.0.safetensors", "sdxl"), ("my_sdxl_vae.safetensors", "sdxl"), ("sd3.5_large.safetensors", "sd3"),
    ("FLUX.2-dev.safetensors", "flux2"), ("flux1-dev.sft", "flux"), ("vae-ft-mse-840000-ema-pruned.ckpt", "sd15"),
    ("sd_1.5.pt", "sd15"), ("sd21_vae.bin", "sd2"), ("sd3_to_sdxl.safetensors", None),
])
def test_a_family_is_named_by_whole_words_only(name: str, family: str | None) -> None:
    assert family_from_name(name) == family


def _tar(path: Path, n: int) -> dict[str, bytes]:
    images = {f"{k:04d}.png": noise_png(k, (8 + k % 7, 8)) for k in range(n)}
    with tarfile.open(path, "w") as tf:
        for name, data in images.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
    return images


def test_threads_taking_turns_keep_their_own_open_shard(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # One slot for all threads: each turn of another thread reopened the shard (a .tar.gz then decompressed
    # again from its start), and a thread could take or close the file another had just opened.
    images = _tar(tmp_path / "s.tar", 12)
    source = open_source(str(tmp_path / "s.tar"))
    real_open, opened = tarfile.open, []
    monkeypatch.setattr(tarfile, "open", lambda *a, **k: opened.append(1) or real_open(*a, **k))
    turns = [threading.Semaphore(0), threading.Semaphore(0)]
    wrong: list[str] = []

    def work(me: int) -> None:
        for item in source.ids[me::2]:
            turns[me].acquire()
            if source._tars.read(*source._paths[item], item) != images[item.split(":", 1)[1]]:
                wrong.append(item)
            turns[1 - me].release()

    threads = [threading.Thread(target=work, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    turns[0].release()
    for t in threads:
        t.join(30)
    assert not wrong and not any(t.is_alive() for t in threads)
    assert len(opened) == 2, len(opened)  # once per thread, not once per turn (12)


def test_a_shard_turned_into_a_fifo_since_it_was_listed_is_an_error_not_a_hang(tmp_path: Path) -> None:
    _tar(tmp_path / "s.tar", 2)
    source = open_source(str(tmp_path / "s.tar"))
    os.remove(tmp_path / "s.tar")
    os.mkfifo(tmp_path / "s.tar")
    errors: list[Exception] = []

    def load() -> None:
        try:
            source.load("s.tar:0000.png")
        except Exception as e:  # any failure: checked below
            errors.append(e)

    reader = threading.Thread(target=load, daemon=True)
    reader.start()
    reader.join(10)
    hung = reader.is_alive()
    if hung:  # let the blocked open return, so that no thread outlives the test
        os.close(os.open(tmp_path / "s.tar", os.O_WRONLY | os.O_NONBLOCK))
        reader.join(10)
    assert not hung, "reading a shard that became a FIFO blocked"
    assert len(errors) == 1 and isinstance(errors[0], ImageError), errors
    assert "no longer a regular file" in str(errors[0])


def _sparse_header(name: str, stored: int, real_size: int) -> bytes:
    # An old-GNU sparse member ('S'): one data piece of `stored` bytes, the rest of `real_size` a hole.
    info = tarfile.TarInfo(name)
    info.size = stored
    buf = bytearray(info.tobuf(format=tarfile.GNU_FORMAT))
    buf[156:157] = b"S"
    buf[386:410] = b"%011o\0%011o\0" % (0, stored)
    buf[482] = 0
    buf[483:495] = b"%011o\0" % real_size
    buf[148:156] = b" " * 8
    buf[148:156] = b"%06o\0 " % sum(buf)
    return bytes(buf)


def test_gnu_sparse_members_are_not_listed_as_images(tmp_path: Path) -> None:
    png = noise_png(1)
    with open(tmp_path / "s.tar", "wb") as f:
        f.write(_sparse_header("holes.png", 1, 2**26) + b"\x89" + bytes(511))
        info = tarfile.TarInfo("a.png")
        info.size = len(png)
        f.write(info.tobuf(format=tarfile.GNU_FORMAT) + png + bytes(-len(png) % 512) + bytes(1024))
    with tarfile.open(tmp_path / "s.tar") as tf:  # the crafted member is one tarfile reads as sparse
        assert [(m.name, m.issparse(), m.size) for m in tf] == [("holes.png", True, 2**26), ("a.png", False, len(png))]
    source = open_source(str(tmp_path / "s.tar"))
    assert source.ids == ["s.tar:a.png"]
    assert np.array_equal(np.asarray(source.load("s.tar:a.png")),
                          np.asarray(Image.open(io.BytesIO(png)).convert("RGB")))
