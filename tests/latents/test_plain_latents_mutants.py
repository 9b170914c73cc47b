"""Pins what a mutation audit of latents/plain.py, cli/plain.py and the batch helpers of latents/file.py found
untested: a FIFO is no plain file and is never read; a pickled object in a .npy is refused without being
unpickled; an .npz of several arrays and a torch dict of several tensors are refused, naming the first five
sorted (", ..." past five, cut at 80 characters) with the weights hint, and an empty dict without it; float16 and
float64 arrays and tensors are read in their dtype, a Fortran-ordered array as a contiguous tensor; a zip holding
other files than .npy is read as torch's; decode of a plain file refuses to replace a PNG without --overwrite and
replaces it with it, refuses an --output that is a file, writes a hidden file's images under a plain name, decodes
with --dtype and --tile-size, takes a 3-D latent of a patched model's scaled channels, and refuses a float64 value
past float32's range as not finite; batch_item_names' digits grow past 100 items, batch_latents_file refuses a
names/latents mismatch and keeps the model, and check_filled_float names what was empty."""

from __future__ import annotations

import os
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch import Tensor

import helpers
import klvae
from helpers import Payload, one_error_line, one_line, saved_tiny_model
from klvae import inference
from klvae.cli import codec
from klvae.cli.main import main
from klvae.errors import LatentsError
from klvae.images import tensor_to_pil
from klvae.latents.file import batch_item_names, batch_latents_file, check_filled_float
from klvae.latents.plain import load_plain_latents, plain_kind
from klvae.model.latent_norm import LatentNorm

HINT = "; a plain latents file holds one [B, C, h, w] tensor: model weights? those go to --model"


@pytest.fixture(scope="module")
def model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return saved_tiny_model(tmp_path_factory.mktemp("tiny"))


def _raw(seed: int = 0, shape: tuple[int, ...] = (2, 4, 3, 5)) -> Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def _refusal(path: Path) -> str:
    with pytest.raises(LatentsError) as e:
        load_plain_latents(path)
    return one_line(e)


def _decode(latents: Path, out: Path, model: Path, *extra: str) -> int:
    return main(["decode", str(latents), "-o", str(out), "-m", str(model), *extra])


# ---------------------------------------------------------------- latents/plain.py: what is read, what is refused


def test_a_fifo_is_no_plain_file_and_is_never_read(tmp_path: Path) -> None:
    # Held open for reading and writing here, with bytes waiting, so that a reader would neither block nor hang.
    os.mkfifo(tmp_path / "z.pt")
    fd = os.open(tmp_path / "z.pt", os.O_RDWR | os.O_NONBLOCK)
    try:
        os.write(fd, bytes(4096))
        assert plain_kind(tmp_path / "z.pt") is None
        assert len(os.read(fd, 8192)) == 4096  # not a byte taken
    finally:
        os.close(fd)


def test_a_pickled_object_in_a_npy_is_refused_without_unpickling_it(tmp_path: Path) -> None:
    a = np.empty(1, dtype=object)
    a[0] = Payload()
    np.save(tmp_path / "z.npy", a, allow_pickle=True)
    ran = len(helpers.RAN)
    assert plain_kind(tmp_path / "z.npy") == "numpy"
    assert _refusal(tmp_path / "z.npy") == (f"{tmp_path / 'z.npy'} cannot be read as a numpy file: ValueError: "
                                            "Object arrays cannot be loaded when allow_pickle=False")
    assert len(helpers.RAN) == ran


def test_an_npz_of_several_arrays_is_refused_naming_them(tmp_path: Path) -> None:
    np.savez(tmp_path / "z.npz", b=np.zeros((1, 4, 2, 2), np.float32), a=np.zeros((1, 4, 2, 2), np.float32))
    assert _refusal(tmp_path / "z.npz") == f"{tmp_path / 'z.npz'} holds 2 tensors (a, b){HINT}"


@pytest.mark.parametrize(("keys", "listed"), [
    (["b", "a"], "2 tensors (a, b)"),  # sorted, not in the file's order
    ([f"t{i}" for i in range(5)], "5 tensors (t0, t1, t2, t3, t4)"),
    ([f"t{i}" for i in range(6)], "6 tensors (t0, t1, t2, t3, t4, ...)"),
    ([c * 30 for c in "xyz"], f"3 tensors ({'x' * 30}, {'y' * 30}, {'z' * 13}...)"),
    ([c * 30 for c in "xy"], f"2 tensors ({'x' * 30}, {'y' * 30})"),
])
def test_a_torch_dict_of_several_tensors_lists_five_sorted_names_cut_at_80(keys: list[str], listed: str,
                                                                             tmp_path: Path) -> None:
    torch.save({k: torch.zeros(1, 4, 2, 2) for k in keys}, tmp_path / "z.pt")
    assert _refusal(tmp_path / "z.pt") == f"{tmp_path / 'z.pt'} holds {listed}{HINT}"


def test_an_empty_dict_gets_no_model_weights_hint(tmp_path: Path) -> None:
    torch.save({}, tmp_path / "z.pt")
    assert _refusal(tmp_path / "z.pt") == (f"{tmp_path / 'z.pt'} holds no tensor; a plain latents file holds one "
                                           "[B, C, h, w] tensor")


@pytest.mark.parametrize(("np_dtype", "dtype"), [(np.dtype(np.float16), torch.float16),
                                                  (np.dtype(np.float64), torch.float64)])
def test_half_and_double_numpy_arrays_are_read_in_their_dtype(np_dtype: np.dtype, dtype: torch.dtype,
                                                              tmp_path: Path) -> None:
    a = np.arange(16, dtype=np_dtype).reshape(1, 4, 2, 2)
    np.save(tmp_path / "z.npy", a)
    t = load_plain_latents(tmp_path / "z.npy")
    assert t.dtype == dtype
    assert t.tolist() == a.tolist()


@pytest.mark.parametrize("dtype", [torch.float16, torch.float64])
def test_half_and_double_torch_tensors_are_read_in_their_dtype(dtype: torch.dtype, tmp_path: Path) -> None:
    torch.save(torch.ones(4, 2, 3, dtype=dtype), tmp_path / "z.pt")
    t = load_plain_latents(tmp_path / "z.pt")
    assert t.dtype == dtype and t.shape == (4, 2, 3)


def test_a_fortran_ordered_array_is_read_as_a_contiguous_tensor(tmp_path: Path) -> None:
    a = np.asfortranarray(np.arange(24, dtype=np.float32).reshape(1, 4, 2, 3))
    np.save(tmp_path / "z.npy", a)
    t = load_plain_latents(tmp_path / "z.npy")
    assert t.is_contiguous() and t.tolist() == a.tolist()


def test_a_zip_holding_other_files_than_npy_is_read_as_torchs(tmp_path: Path) -> None:
    with zipfile.ZipFile(tmp_path / "mixed.npz", "w") as z:
        z.writestr("a.npy", b"x")
        z.writestr("notes.txt", b"y")
    np.savez(tmp_path / "real.npz", z=np.zeros(1))
    assert plain_kind(tmp_path / "mixed.npz") == "torch"
    assert plain_kind(tmp_path / "real.npz") == "numpy"


# ---------------------------------------------------------------- cli/plain.py: `klvae decode` of a plain file


def test_decode_refuses_to_replace_a_png_without_overwrite_and_replaces_it_with(
    model: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    torch.save(_raw(), tmp_path / "z.pt")
    out = tmp_path / "out"
    out.mkdir()
    (out / "z_00.png").write_bytes(b"mine")
    assert _decode(tmp_path / "z.pt", out, model) == 2
    assert one_error_line(capsys.readouterr().err) == (
        f"klvae: error: --output {out}: z_00.png already exists (1 of the 2 PNGs would replace files there); "
        "add --overwrite to replace them")
    assert sorted(p.name for p in out.iterdir()) == ["z_00.png"] and (out / "z_00.png").read_bytes() == b"mine"
    assert _decode(tmp_path / "z.pt", out, model, "--overwrite") == 0
    assert sorted(p.name for p in out.iterdir()) == ["z_00.png", "z_01.png"]
    assert Image.open(out / "z_00.png").size == (5 * 2, 3 * 2)  # the tiny model's x2


def test_decode_refuses_an_output_that_is_a_file(model: Path, tmp_path: Path,
                                                 capsys: pytest.CaptureFixture[str]) -> None:
    torch.save(_raw(), tmp_path / "z.pt")
    (tmp_path / "out").write_bytes(b"mine")
    assert _decode(tmp_path / "z.pt", tmp_path / "out", model) == 2
    assert one_error_line(capsys.readouterr().err) == (
        f"klvae: error: --output {tmp_path / 'out'} is a file, not a folder")
    assert (tmp_path / "out").read_bytes() == b"mine"


def test_a_hidden_files_images_get_plain_names(model: Path, tmp_path: Path) -> None:
    np.save(tmp_path / ".z.npy", _raw(shape=(1, 4, 2, 2)).numpy())
    assert _decode(tmp_path / ".z.npy", tmp_path / "out", model) == 0
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["z_00.png"]


def test_decode_uses_the_dtype_and_tiling_asked_for(model: Path, tmp_path: Path,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    seen: list[tuple[torch.dtype | None, inference.TileOptions | None]] = []
    real = codec.inference.decode

    def spy(vae: klvae.AutoencoderKL, z: Tensor, dtype: torch.dtype | None = None, size: object = None,
            tiling: inference.TileOptions | None = None) -> Tensor:
        seen.append((dtype, tiling))
        return real(vae, z, dtype, size=size, tiling=tiling)  # type: ignore[arg-type]

    monkeypatch.setattr(codec.inference, "decode", spy)
    torch.save(_raw(shape=(1, 4, 4, 4)), tmp_path / "z.pt")
    assert _decode(tmp_path / "z.pt", tmp_path / "out", model, "--dtype", "bf16", "--tile-size", "4") == 0
    assert len(seen) == 1
    dtype, tiling = seen[0]
    assert dtype == torch.bfloat16 and tiling is not None and tiling.tile_size == 4


def test_a_3d_latent_of_a_patched_models_scaled_channels_gains_its_batch(tmp_path: Path) -> None:
    path = saved_tiny_model(tmp_path / "m", latent_patch_size=2, scaling_factor=1.0,
                            latents_mean=tuple(0.1 * c for c in range(16)),
                            latents_std=tuple(1.0 + 0.1 * c for c in range(16)))
    vae = klvae.AutoencoderKL.from_pretrained(path)
    raw = _raw(4, (1, 4, 4, 6))
    torch.save(vae.scale_latents(raw)[0], tmp_path / "z.pt")  # [16, 2, 3]: 2x2 patches of 4 channels
    assert _decode(tmp_path / "z.pt", tmp_path / "out", path) == 0
    got = np.asarray(Image.open(tmp_path / "out" / "z_00.png")).astype(int)
    with torch.no_grad():
        want = np.asarray(tensor_to_pil(inference.decode(vae, raw)[0])).astype(int)
    assert got.shape == want.shape == (4 * 2, 6 * 2, 3)
    assert np.abs(got - want).max() <= 1


def test_a_double_past_float32s_range_is_refused_as_not_finite(model: Path, tmp_path: Path,
                                                               capsys: pytest.CaptureFixture[str]) -> None:
    z = torch.zeros(1, 4, 2, 2, dtype=torch.float64)
    z[0, 0, 0, 0] = 1e300
    torch.save(z, tmp_path / "z.pt")
    assert _decode(tmp_path / "z.pt", tmp_path / "out", model) == 2
    assert one_error_line(capsys.readouterr().err) == (
        f"klvae: error: {tmp_path / 'z.pt'}: item 0 ('z_00.png'): latents contain NaN or infinite values")
    assert not (tmp_path / "out").exists()


# ---------------------------------------------------------------- latents/file.py: the batch helpers


def test_batch_item_names_have_two_digits_up_to_100_items_and_more_past_them() -> None:
    assert batch_item_names("d/x.npy", 1) == ["x_00.png"]
    hundred = batch_item_names("x.npy", 100)
    assert hundred[0] == "x_00.png" and hundred[-1] == "x_99.png"
    more = batch_item_names("x.npy", 101)
    assert more[0] == "x_000.png" and more[-1] == "x_100.png"


def test_batch_latents_file_refuses_a_names_mismatch_and_keeps_the_model() -> None:
    with pytest.raises(ValueError, match=r"^1 names for a batch of 2 latents$"):
        batch_latents_file(torch.zeros(2, 4, 2, 3), ["a.png"], LatentNorm(), 8)
    lf = batch_latents_file(torch.zeros(1, 4, 2, 3), ["a.png"], LatentNorm(0.5), 8, "org/vae")
    assert lf.model == "org/vae" and lf.scaling_factor == 0.5
    assert [(it.name, it.key, it.height, it.width) for it in lf.items] == [("a.png", "000000", 16, 24)]


def test_check_filled_float_names_what_was_empty() -> None:
    with pytest.raises(LatentsError) as e:
        check_filled_float(torch.zeros(0, 4, 2, 2), "f.latent", "samples")
    assert one_line(e) == "f.latent: empty samples of shape [0, 4, 2, 2]"
