"""Review of the latent cache from a dataset engineer's trial: tar members are read at the offsets listed when the
shard was opened (not found by walking every header before them, once per image); a cache copied without its
manifests is refused by a rerun instead of having every shard deleted and encoded again; OptionError pickles."""

from __future__ import annotations

import copy
import io
import pickle
import tarfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from helpers import cache_images, noise_png, perturbed_vae
from klvae.errors import ImageError, KlvaeError
from klvae.latents import build_cache
from klvae.latents.dataset import LatentDataset
from klvae.latents.options import CacheOptions, OptionError
from klvae.latents.sources import open_source

LONG = "a-folder-name-long-enough-that-the-member-needs-an-extended-header/" * 2  # over tar's 100-byte name field


def _shard(path: Path, n: int) -> dict[str, bytes]:
    # n samples in WebDataset's layout (an image and a caption each); the last image's name needs a pax header.
    images = {}
    with tarfile.open(path, "w:gz" if path.name.endswith(".gz") else "w") as tf:
        for k in range(n):
            name = f"{LONG if k == n - 1 else ''}{k:05d}.png"
            images[name] = noise_png(k, (8 + k % 5, 8))
            for member, data in ((name, images[name]), (f"{k:05d}.txt", b"a caption")):
                info = tarfile.TarInfo(member)
                info.size = len(data)
                tf.addfile(info, io.BytesIO(data))
    return images


@pytest.mark.parametrize("name", ["s.tar", "s.tar.gz"])
def test_a_tar_member_is_read_at_its_offset_not_found_by_walking_the_shard(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, name: str
) -> None:
    images = _shard(tmp_path / name, 80)
    source = open_source(str(tmp_path / name))
    assert len(source.ids) == 80
    real, headers = tarfile.TarInfo.fromtarfile.__func__, []

    def counted(cls: type[tarfile.TarInfo], tf: tarfile.TarFile) -> tarfile.TarInfo:
        headers.append(1)
        return real(cls, tf)

    monkeypatch.setattr(tarfile.TarInfo, "fromtarfile", classmethod(counted))
    last = source.ids[-3:]  # the last one's name is in a pax header
    for item in last:
        want = np.asarray(Image.open(io.BytesIO(images[item.split(":", 1)[1]])).convert("RGB"))
        assert np.array_equal(np.asarray(source.load(item)), want)
    # One header a read (two for the pax one), and the first header at the open (tried once per compression
    # tarfile knows): at most 8. Walking the shard read all 160 headers before each image: 472 or more.
    assert len(headers) <= 8, len(headers)


def test_a_tar_shard_replaced_since_it_was_listed_is_a_one_line_image_error(tmp_path: Path) -> None:
    _shard(tmp_path / "s.tar", 4)
    source = open_source(str(tmp_path / "s.tar"))
    with tarfile.open(tmp_path / "s.tar", "w") as tf:  # other members where the listed ones were
        info = tarfile.TarInfo("other.png")
        info.size = len(data := noise_png(9))
        tf.addfile(info, io.BytesIO(data))
    with pytest.raises(ImageError, match=r"^s\.tar:00000\.png: no longer in .*s\.tar$"):
        source.load("s.tar:00000.png")
    (tmp_path / "s.tar").write_bytes(b"")
    with pytest.raises(ImageError, match=r"^s\.tar:00001\.png: cannot read from .*s\.tar: "):
        source.load("s.tar:00001.png")


def test_a_cache_copied_without_its_manifests_is_refused_with_its_shards_kept(tmp_path: Path) -> None:
    (tmp_path / "data").mkdir()
    data = cache_images(tmp_path / "data")
    vae, out = perturbed_vae("tiny"), tmp_path / "cache"
    options = {"resolution": 32, "shard_size": 3, "batch_size": 4, "num_workers": 0}
    build_cache(vae, data, out, **options)
    for manifest in out.glob("manifest-rank*.jsonl"):  # copied elsewhere as index.json and shards alone
        manifest.unlink()
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    with pytest.raises(KlvaeError, match=r"index\.json lists 3 shard\(s\).*no manifest-rank000\.jsonl line records"):
        build_cache(vae, data, out, **options)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before  # before: every shard deleted, all encoded
    assert len(LatentDataset(out)) == 8


def test_option_error_pickles_and_copies_with_both_namings() -> None:
    with pytest.raises(OptionError) as caught:
        CacheOptions(shard_size=0)
    for again in (pickle.loads(pickle.dumps(caught.value)), copy.copy(caught.value), copy.deepcopy(caught.value)):
        assert type(again) is OptionError
        assert (str(again), again.flags()) == ("shard_size must be at least 1, got 0",
                                               "--shard-size must be at least 1, got 0")
