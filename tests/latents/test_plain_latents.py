"""`klvae decode` of plain tensor files, as diffusers users keep latents: one [B, C, h, w] (or [C, h, w]) tensor
from safetensors' save_file, torch.save or numpy.save, read as the diffusion model's scaled latents, or with
--unscaled as the VAE's own; each decoded image equals the library's decode of the same latents, and everything
the reader cannot use is one error line with nothing written."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file
from torch import Tensor

import klvae
from helpers import one_error_line, one_line, rgb_image, saved_tiny_model
from klvae import inference
from klvae.cli.main import main
from klvae.errors import LatentsError
from klvae.images import tensor_to_pil
from klvae.latents.comfy import save_comfy_latent
from klvae.latents.plain import load_plain_latents, plain_batch, plain_kind
from oracles import klvae_flux2


@pytest.fixture(scope="module")
def model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return saved_tiny_model(tmp_path_factory.mktemp("tiny"))


def _raw(seed: int = 0, shape: tuple[int, ...] = (2, 4, 3, 5)) -> Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def _expected(vae: klvae.AutoencoderKL, raw: Tensor) -> list[np.ndarray]:
    """The PNGs' pixels: the library's decode of the VAE's own latents, as 8-bit RGB."""
    with torch.no_grad():
        img = inference.decode(vae, raw)
    return [np.asarray(tensor_to_pil(i)) for i in img]


def _pngs(out: Path, stem: str, n: int) -> list[np.ndarray]:
    assert sorted(p.name for p in out.iterdir()) == [f"{stem}_{i:02d}.png" for i in range(n)]
    return [np.asarray(Image.open(out / f"{stem}_{i:02d}.png")) for i in range(n)]


def _save_safetensors(t: Tensor, path: Path) -> None:
    save_file({"latents": t.contiguous()}, str(path))


def _save_torch(t: Tensor, path: Path) -> None:
    torch.save(t, path)


def _save_torch_dict(t: Tensor, path: Path) -> None:
    torch.save({"samples": t}, path)


def _save_numpy(t: Tensor, path: Path) -> None:
    np.save(path, t.numpy())


def _save_npz(t: Tensor, path: Path) -> None:
    np.savez(path, z=t.numpy())


def _save_sparse(t: Tensor, path: Path) -> None:
    torch.save(t.to_sparse(), path)  # once an internal error: read densely now


def _save_big_endian(t: Tensor, path: Path) -> None:
    np.save(path, t.numpy().astype(">f4"))  # float32 all the same: once refused as "dtype >f4"


WRITERS: dict[str, tuple[str, Callable[[Tensor, Path], None]]] = {
    "safetensors": ("z.safetensors", _save_safetensors), "torch": ("z.pt", _save_torch),
    "torch-dict": ("z.pth", _save_torch_dict), "numpy": ("z.npy", _save_numpy), "npz": ("z.npz", _save_npz),
    "sparse": ("z.pt", _save_sparse), "numpy-big-endian": ("z.npy", _save_big_endian),
}


@pytest.mark.parametrize("writer", list(WRITERS))
def test_scaled_latents_in_each_format_decode_to_the_librarys_images(writer: str, model: Path,
                                                                     tmp_path: Path) -> None:
    vae = klvae.AutoencoderKL.from_pretrained(model)
    raw = _raw()
    name, save = WRITERS[writer]
    save(vae.scale_latents(raw), tmp_path / name)
    assert main(["decode", str(tmp_path / name), "-o", str(tmp_path / "out"), "-m", str(model)]) == 0
    for got, want in zip(_pngs(tmp_path / "out", "z", 2), _expected(vae, raw), strict=True):
        assert got.shape == (3 * vae.downsample_factor, 5 * vae.downsample_factor, 3)
        assert np.abs(got.astype(int) - want.astype(int)).max() <= 1  # float32 rounding of scale and unscale


def test_unscaled_latents_and_a_lone_image_without_batch(model: Path, tmp_path: Path,
                                                         caplog: pytest.LogCaptureFixture) -> None:
    vae = klvae.AutoencoderKL.from_pretrained(model)
    raw = _raw(1, (1, 4, 4, 4))
    torch.save(raw[0], tmp_path / "one.pt")  # [C, h, w], as vae.encode(x[None]).latent_dist.mode()[0]
    with caplog.at_level("INFO", logger="klvae"):
        assert main(["decode", str(tmp_path / "one.pt"), "-o", str(tmp_path / "out"), "-m", str(model),
                     "--unscaled"]) == 0
    assert _pngs(tmp_path / "out", "one", 1)[0].tolist() == _expected(vae, raw)[0].tolist()
    assert "holds a plain tensor [1, 4, 4, 4], with no record of its scaling: read as the VAE's own latents" in (
        caplog.text)


def test_the_default_reading_is_scaled_and_says_so(model: Path, tmp_path: Path,
                                                   caplog: pytest.LogCaptureFixture) -> None:
    vae = klvae.AutoencoderKL.from_pretrained(model)
    z = _raw(2, (1, 4, 4, 4))
    torch.save(z, tmp_path / "z.pt")
    with caplog.at_level("INFO", logger="klvae"):
        assert main(["decode", str(tmp_path / "z.pt"), "-o", str(tmp_path / "out"), "-m", str(model)]) == 0
    assert "read as the diffusion model's latents, scaled by the model's factors (add --unscaled" in caplog.text
    got = _pngs(tmp_path / "out", "z", 1)[0].astype(int)
    assert np.abs(got - _expected(vae, vae.unscale_latents(z))[0].astype(int)).max() <= 1
    assert got.tolist() != _expected(vae, z)[0].tolist()  # the factors were applied


def test_flux2_patched_scaled_latents_and_its_unscaled_ones_give_the_same_pictures(tmp_path: Path) -> None:
    vae = klvae_flux2()
    vae.save_pretrained(tmp_path / "m")
    raw = _raw(3, (1, vae.config.latent_channels, 4, 6))
    torch.save(vae.scale_latents(raw), tmp_path / "scaled.pt")  # [1, 4C, 2, 3]: 2x2 patches, normalised
    torch.save(raw, tmp_path / "raw.pt")
    assert main(["decode", str(tmp_path / "scaled.pt"), "-o", str(tmp_path / "a"), "-m", str(tmp_path / "m")]) == 0
    assert main(["decode", str(tmp_path / "raw.pt"), "-o", str(tmp_path / "b"), "-m", str(tmp_path / "m"),
                 "--unscaled"]) == 0
    a, b = _pngs(tmp_path / "a", "scaled", 1)[0], _pngs(tmp_path / "b", "raw", 1)[0]
    assert a.shape == b.shape == (4 * vae.downsample_factor, 6 * vae.downsample_factor, 3)
    assert np.abs(a.astype(int) - b.astype(int)).max() <= 1


def _class_instance_file(path: Path) -> None:
    torch.save({"x": _Foreign()}, path / "z.pt")


class _Foreign:
    """A pickled object of a class torch's weights_only loader does not allow."""


@pytest.mark.parametrize(("make", "message"), [
    (lambda p: save_file({"a": torch.zeros(1, 4, 2, 2), "b": torch.zeros(1)}, str(p / "z.safetensors")),
     "holds 2 tensors (a, b); a plain latents file holds one [B, C, h, w] tensor: model weights? those go to --model"),
    (lambda p: torch.save({}, p / "z.safetensors"), "holds no tensor; a plain latents file holds one"),
    (lambda p: torch.save([1, 2], p / "z.safetensors"), "holds an object of type list, not a tensor of latents"),
    (lambda p: torch.save({"n": 3}, p / "z.safetensors"), "'n' is an object of type int, not a tensor of latents"),
    (lambda p: torch.save(torch.zeros(1, 1, 4, 2, 2), p / "z.safetensors"),
     "latents of shape [1, 1, 4, 2, 2]; expected [batch, channels, height, width] or [channels, height, width]"),
    (lambda p: torch.save(torch.zeros(0, 4, 2, 2), p / "z.safetensors"), "empty latents of shape [0, 4, 2, 2]"),
    (lambda p: torch.save(torch.zeros(1, 4, 2, 2, dtype=torch.int64), p / "z.safetensors"),
     "latents of dtype int64; expected float32, float16, bfloat16 or float64"),
    (lambda p: np.save(p / "z.npy", np.zeros((1, 4, 2, 2), np.int32)),
     "latents of dtype int32; expected float16, float32 or float64"),
    (lambda p: torch.save(torch.zeros(1, 4096, 64), p / "z.safetensors"),
     "latents of shape [1, 4096, 64] are not [channels, height, width] with this model's 4 channels; a pipeline's "
     "packed [batch, tokens, features] sequence?"),
    (lambda p: torch.save(torch.full((1, 4, 2, 2), float("nan")), p / "z.safetensors"),
     "item 0 ('z_00.png'): latents contain NaN or infinite values"),
    (lambda p: torch.save(torch.zeros(1, 16, 2, 2), p / "z.safetensors"),
     "its 16-channel latents do not fit this model"),
    (_class_instance_file, "cannot be read as a torch file: UnpicklingError"),
    (lambda p: torch.save(torch.empty(1, 4, 2, 2, device="meta"), p / "z.pt"),
     "z.pt: a tensor with no values (device meta), not latents"),
    (lambda p: np.savez(p / "z.npz"), "z.npz holds no tensor; a plain latents file holds one"),
])
def test_unusable_plain_files_are_one_line_and_write_nothing(make: Callable[[Path], None], message: str,
                                                             model: Path, tmp_path: Path,
                                                             capsys: pytest.CaptureFixture[str]) -> None:
    make(tmp_path)
    src = next(p for p in tmp_path.iterdir() if p.name.startswith("z"))
    assert main(["decode", str(src), "-o", str(tmp_path / "out"), "-m", str(model)]) == 2
    line = one_error_line(capsys.readouterr().err)
    assert message in line, line
    assert not (tmp_path / "out").exists()


def test_unscaled_is_refused_for_files_that_record_their_scaling(model: Path, tmp_path: Path,
                                                                 capsys: pytest.CaptureFixture[str]) -> None:
    img = rgb_image(tmp_path / "a.png", 16, 16)
    assert main(["encode", str(img), "-o", str(tmp_path / "z.safetensors"), "-m", str(model)]) == 0
    save_comfy_latent(tmp_path / "c.latent", torch.zeros(1, 4, 2, 2))
    for f in ("z.safetensors", "c.latent"):
        assert main(["decode", str(tmp_path / f), "-o", str(tmp_path / "out"), "-m", str(model), "--unscaled"]) == 2
        line = one_error_line(capsys.readouterr().err)
        assert line == (f"klvae: error: --unscaled is for plain tensor files, which do not record their scaling; "
                        f"{tmp_path / f} does")
    assert not (tmp_path / "out").exists()


def test_plain_kind_tells_plain_files_from_klvaes_own_images_and_missing_ones(model: Path, tmp_path: Path) -> None:
    img = rgb_image(tmp_path / "a.png", 16, 16)
    assert main(["encode", str(img), "-o", str(tmp_path / "k.safetensors"), "-m", str(model)]) == 0
    save_file({"z": torch.zeros(1)}, str(tmp_path / "pt.safetensors"), metadata={"format": "pt"})
    save_file({"z": torch.zeros(1)}, str(tmp_path / "future.safetensors"), metadata={"format": "klvae.latents/9"})
    torch.save(torch.zeros(1), tmp_path / "t.bin")
    np.save(tmp_path / "n.npy", np.zeros(1))
    kinds = {n: plain_kind(tmp_path / n) for n in ("k.safetensors", "pt.safetensors", "future.safetensors",
                                                   "t.bin", "n.npy", "a.png", "missing.pt")}
    assert kinds == {"k.safetensors": None, "pt.safetensors": "safetensors", "future.safetensors": None,
                     "t.bin": "torch", "n.npy": "numpy", "a.png": None, "missing.pt": None}
    with pytest.raises(LatentsError) as e:
        load_plain_latents(tmp_path / "k.safetensors")
    assert one_line(e).endswith("is not a safetensors, torch or numpy file of latents")


def test_load_plain_latents_keeps_the_dtype_and_plain_batch_adds_the_batch(tmp_path: Path) -> None:
    torch.save(torch.ones(4, 2, 3, dtype=torch.bfloat16), tmp_path / "z.pt")
    t = load_plain_latents(tmp_path / "z.pt")
    assert t.dtype == torch.bfloat16 and t.shape == (4, 2, 3)
    assert plain_batch(t, 4, "z.pt").shape == (1, 4, 2, 3)
    assert plain_batch(torch.ones(2, 3, 2, 3), 4, "z.pt").shape == (2, 3, 2, 3)  # 4-D: the model's checks judge it
