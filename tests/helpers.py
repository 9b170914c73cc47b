"""Shared by the tests: tiny models whose weights all differ from their (near-trivial) initialisation, and the
CLI's one-line errors."""

from __future__ import annotations

import contextlib
import importlib.util
import os
import re
import shutil
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING

import pytest
import torch

import klvae
from klvae.cli.main import main

if TYPE_CHECKING:
    from klvae.training.config import TrainConfig


def perturbed_vae(preset: str = "tiny", seed: int = 0, device: torch.device | str | None = None,
                  **changes: object) -> klvae.AutoencoderKL:
    """A preset (with config `changes`) in eval mode; default init leaves biases tiny and GroupNorm affine
    trivial, so every weight gets noise and a broken norm or bias shows up in the outputs."""
    torch.manual_seed(seed)
    vae = klvae.AutoencoderKL(klvae.get_preset(preset).replace(**changes)).eval().to(device or "cpu")
    with torch.no_grad():
        for p in vae.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return vae



def assert_same_weights(a: torch.nn.Module, b: torch.nn.Module) -> None:
    """The same keys and the same values (compared in fp32, so a half-precision copy of fp16-exact weights passes)."""
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        assert torch.equal(sa[k].float(), sb[k].float()), k

def fake_hub_cache(
    root: Path, repo_id: str, model: klvae.AutoencoderKL, subfolder: str | None, bin_only: bool = False
) -> Path:
    """The layout huggingface_hub's cache has: models--org--name/refs/main + snapshots/<commit>/...; returns the
    folder the model was saved in."""
    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = root / f"models--{repo_id.replace('/', '--')}"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    snap = repo / "snapshots" / commit
    return model.save_pretrained(snap / subfolder if subfolder else snap, safe_serialization=not bin_only)


def one_line(e: pytest.ExceptionInfo[BaseException]) -> str:
    """The message of a raised error, asserting that it is one line."""
    text = str(e.value)
    assert "\n" not in text.strip(), text
    return text


def one_error_line(err: str) -> str:
    """The CLI's error from its stderr, asserting that besides log lines (INFO/WARNING/DEBUG: ...) and progress
    bars it is all there is: one `klvae: error:` line, no traceback, no second message."""
    logs = ("INFO: ", "WARNING: ", "DEBUG: ")
    bar = re.compile(r"[\w ]+: +\d+%\|")
    rest = [ln for ln in err.strip().splitlines() if ln.strip() and not ln.startswith(logs) and not bar.match(ln)]
    assert len(rest) == 1 and rest[0].startswith("klvae: error: "), rest
    assert "internal error" not in rest[0], rest
    return rest[0]


def counting_tiled_calls(monkeypatch: pytest.MonkeyPatch) -> dict[str, int]:
    """Counts of the tiled encode and decode paths that inference takes from here on."""
    from klvae.inference import api

    calls = {"encode": 0, "decode": 0}
    for name, key in (("tiled_encode_moments", "encode"), ("tiled_decode", "decode")):
        real = getattr(api, name)

        def counted(*args: object, _real=real, _key=key, **kwargs: object) -> object:
            calls[_key] += 1
            return _real(*args, **kwargs)

        monkeypatch.setattr(api, name, counted)
    return calls


@contextlib.contextmanager
def fifo_watchdog(path: Path, after: float = 10.0) -> Iterator[dict[str, bool]]:
    """Make a FIFO at `path`; should a reader still block on it `after` seconds on, open and close its write end,
    so that the reader sees an empty file instead of hanging the test run. Yields {"fired": ...}, which says so."""
    os.mkfifo(path)
    state = {"fired": False}
    done = threading.Event()

    def watch() -> None:
        while not done.wait(0.2):
            if time.monotonic() - start < after:
                continue
            try:  # succeeds only while a reader has it open
                os.close(os.open(path, os.O_WRONLY | os.O_NONBLOCK))
                state["fired"] = True
            except OSError:
                pass

    start = time.monotonic()
    thread = threading.Thread(target=watch, daemon=True)
    thread.start()
    try:
        yield state
    finally:
        done.set()
        thread.join()


def block_metric_downloads(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """No download of LPIPS/Inception weights and no real torch hub cache; the Inception runs at its smallest
    input to stay fast."""
    import urllib.error

    from klvae.nets import inception, lpips, pretrained

    def refuse(*args: object, **kwargs: object) -> None:
        raise urllib.error.URLError("network disabled in tests")

    monkeypatch.setattr(pretrained, "download", refuse)
    monkeypatch.setattr(lpips, "installed_lpips_lin", lambda: None)
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch_home"))
    monkeypatch.setattr(inception, "INPUT_SIZE", 75)


def noise_png(seed: int, size: tuple[int, int] = (24, 16)) -> bytes:
    """A PNG of uniform RGB noise, `size` = (width, height)."""
    import io

    import numpy as np
    from PIL import Image

    buf = io.BytesIO()
    rng = np.random.default_rng(seed)
    Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


def rgb_image(path: Path, w: int = 16, h: int = 16, seed: int = 0) -> Path:
    """A w x h PNG of uniform noise (noise_png's) at `path`, its folders made."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(noise_png(seed, (w, h)))
    return path


def handmade_latents(path: Path, items: object, tensors: dict | None = None, meta: dict | None = None) -> Path:
    """A klvae latents file written by hand (the demo model's factors), so that its metadata can be anything."""
    import json

    from safetensors.torch import save_file

    from klvae.latents.file import FORMAT

    if tensors is None:
        tensors = {d["key"]: torch.zeros(4, 2, 2) for d in items if isinstance(d, dict) and isinstance(d["key"], str)}
    fields = {"format": FORMAT, "model": "demo", "scaling_factor": "0.18215", "shift_factor": "null",
              "items": json.dumps(items), **(meta or {})}
    save_file(tensors or {"unused": torch.zeros(4, 2, 2)}, str(path), metadata=fields)
    return path


def files_under(root: Path) -> list[str]:
    """Every file below root, as sorted relative POSIX paths: what a command left behind."""
    return sorted(p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file())


def noise_images_and_a_broken_one(root: Path) -> Path:
    """`root` holding four small noise images and one unreadable file (training's skip-and-count cases)."""
    root.mkdir()
    for i in range(4):
        (root / f"img{i}.png").write_bytes(noise_png(i))
    (root / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 truncated")
    return root


def saved_tiny_model(d: Path, **changes: object) -> Path:
    """The `tiny` preset (with config `changes`) at seed 0, saved as a diffusers folder in `d`."""
    torch.manual_seed(0)
    klvae.AutoencoderKL(klvae.get_preset("tiny").replace(**changes)).save_pretrained(d)
    return d


CACHE_ROWS = [f"img{i}.png" for i in range(8)]


def noise_folder(root: Path, n: int, hw: tuple[int, int] = (40, 48), pattern: str = "img{i}.png") -> Path:
    """`root` (made if missing) holding n RGB noise PNGs of `hw` pixels, named by `pattern`; seed 0, so the first
    k images are the same whatever n."""
    import numpy as np
    from PIL import Image

    root.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for i in range(n):
        Image.fromarray(rng.integers(0, 255, (*hw, 3), dtype=np.uint8)).save(root / pattern.format(i=i))
    return root



# A small cache built in this process: 32 px crops, encoded two at a time into shards of two rows.
SMALL_CACHE = {"resolution": 32, "shard_size": 2, "batch_size": 2, "num_workers": 0}


def cache_vae() -> klvae.AutoencoderKL:
    """The tiny model with factors that are not the identity, so that a cache's scaling shows in its rows."""
    return perturbed_vae("tiny", scaling_factor=0.5, shift_factor=0.1)


def small_cache(root: Path, n: int, vae: klvae.AutoencoderKL) -> Path:
    """A finished moments cache (SMALL_CACHE) of n 32x32 noise images in root/out, their folder in root/data."""
    from klvae.latents import build_cache

    build_cache(vae, noise_folder(root / "data", n, hw=(32, 32)), root / "out", **SMALL_CACHE)
    return root / "out"


def read_index(out: Path) -> dict:
    """A cache's index.json."""
    import json

    return json.loads((out / "index.json").read_text())

def cache_images(root: Path) -> Path:
    """`root` holding CACHE_ROWS: 48x40 noise images, seed 0 (the cache integrity tests' data)."""
    return noise_folder(root, len(CACHE_ROWS))


def cache_args(data: Path, out: Path, model: Path, *extra: str) -> list[str]:
    """`klvae -q cache` of `data` into `out` at 32 px, shards of 3 rows, in this process on the CPU."""
    return ["-q", "cache", "--data", str(data), "-o", str(out), "--model", str(model), "--resolution", "32",
            "--shard-size", "3", "--num-workers", "0", "--device", "cpu", *extra]


# A pickle payload for the weights_only tests: unpickling it would call _record, an arbitrary function call.
RAN: list[str] = []


def _record(what: str) -> None:
    RAN.append(what)


class Payload:
    """Unpickling this calls _record (it appends to RAN), which weights_only must refuse."""

    def __reduce__(self) -> tuple:
        return (_record, ("payload ran",))


def finished_cache(factory: pytest.TempPathFactory, model: Path, data: Path) -> Path:
    """A finished cache of the CACHE_ROWS images: eight rows in shards of 3, 3 and 2 (tests damage copies)."""
    out = factory.mktemp("finished") / "latents"
    assert main(cache_args(data, out, model)) == 0
    return out


def copy_cache(finished: Path, tmp_path: Path) -> Path:
    """A copy of a cache to damage, in tmp_path/latents."""
    out = tmp_path / "latents"
    shutil.copytree(finished, out)
    return out


# A PatchGAN that runs at 16 px (16 / 2**2 - 2 = 2 patches a side), narrow to stay fast.
CRITIC = ("loss.preset=ldm", "loss.perceptual_weight=0", "loss.disc_num_layers=2", "loss.disc_ndf=8",
          "loss.disc_weight=0.5")


def _tiny_run(tmp: Path) -> list[str]:
    """`tiny` MSE on tmp/images at 16 px, batches of 2, into tmp/run, in this process on the CPU."""
    return ["model.preset=tiny", f"data.train={tmp / 'images'}", "data.resolution=16", "data.batch_size=2",
            "data.num_workers=0", "train.device=cpu", f"train.out_dir={tmp / 'run'}", "loss.preset=mse"]


def tiny_train_config(tmp: Path, *sets: str) -> TrainConfig:
    """A `tiny` MSE run on tmp/images at 16 px, batches of 2, in this process on the CPU; `sets` override it."""
    from klvae.training.config import load_config

    return load_config(None, [*_tiny_run(tmp), "optim.grad_clip=0", "train.sample_posterior=false", "optim.lr=1e-3",
                              *sets])


def tiny_train_cli(tmp: Path, *sets: str) -> list[str]:
    """`klvae -q train` arguments of the same tiny run, without validation's LPIPS; `sets` override it."""
    return ["-q", "train", *(a for s in [*_tiny_run(tmp), "train.val_lpips=false", *sets] for a in ("--set", s))]


def tiny_batch(seed: int = 0) -> torch.Tensor:
    """Two 16 px images in [-1, 1], as tiny_train_config's loader gives them."""
    return torch.rand(2, 3, 16, 16, generator=torch.Generator().manual_seed(seed)) * 2 - 1


def benchmark_script(name: str) -> ModuleType:
    """A fresh copy of benchmarks/NAME.py (a script, not a package): a test may change its classes."""
    spec = importlib.util.spec_from_file_location(f"{name}_under_test", Path(__file__).resolve().parents[1]
                                                  / "benchmarks" / f"{name}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# Tiny models whose latent normalisation is FLUX.1's (16 channels, its factors) or FLUX.2's (2x2 patches, per-channel
# statistics): what `klvae noise --shift auto` tells the families by.
_FLUX_LIKE = {"latent_channels": 16, "scaling_factor": 0.3611, "shift_factor": 0.1159}
_FLUX2_LIKE = {"latent_patch_size": 2, "scaling_factor": 1.0, "latents_mean": tuple(0.1 * i for i in range(16)),
               "latents_std": tuple(1 + 0.05 * i for i in range(16))}


def flux_like_models(root: Path) -> dict[str, Path]:
    """{"flux": folder, "flux2": folder}: tiny FLUX.1-like and FLUX.2-like models saved under `root`."""
    return {name: perturbed_vae("tiny", **kw).save_pretrained(root / name)
            for name, kw in (("flux", _FLUX_LIKE), ("flux2", _FLUX2_LIKE))}


def noise_shards(root: Path, counts: tuple[int, ...], side: int = 24) -> str:
    """WebDataset shards root/sh-0.tar ... of `counts` noise PNGs each (side x side), as a brace spec."""
    import io
    import tarfile

    root.mkdir(parents=True, exist_ok=True)
    for s, n in enumerate(counts):
        with tarfile.open(root / f"sh-{s}.tar", "w") as tf:
            for i in range(n):
                data = noise_png(10 * s + i, (side, side))
                info = tarfile.TarInfo(f"s{s}_{i}.png")
                info.size = len(data)
                tf.addfile(info, io.BytesIO(data))
    return f"{root}/sh-{{0..{len(counts) - 1}}}.tar"
