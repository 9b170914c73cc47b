"""Pins bugs a hunt of `klvae cache | scale` and the latent-cache library found:

- a cache made by several ranks, rerun after its data folder grew (or shrank), encodes images again that another
  rank's manifest records (the ranks' shares are by position), and every write_index after fails for good with
  "appears twice in the cache manifests";
- an `index.json` in the output folder that is some other tool's JSON object (no klvae format) is overwritten
  without a word, where a JSON list there is refused as "not a cache index";
- `estimate_factors` takes a `pathlib.Path` as an ItemSource ('PosixPath' object has no attribute 'ids'), though
  `build_cache` takes one; a seed past 2**64 or a float limit fail inside torch and slicing, naming no argument;
- `klvae cache --verify` (and `LatentDataset(verify=True)`) checks only the shards the manifests record: a shard
  that index.json lists, and the reader reads, but a manifest lost the line of, goes unread, damage and all;
- a hard link member of a tar shard (how `tar` stores a second name of one file) is left out of the cache without
  being counted or warned of: the tar of a folder caches fewer images than the folder, and exits 0.
"""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

import pytest
import torch

import klvae
from helpers import SMALL_CACHE, cache_vae, noise_folder, noise_png, read_index, rgb_image, small_cache
from klvae.cli.main import main
from klvae.errors import KlvaeError, OptionError
from klvae.latents import build_cache, verify_cache
from klvae.latents.cache import cache_rank, write_index
from klvae.latents.options import CacheOptions
from klvae.latents.scale import estimate_factors


@pytest.fixture(scope="module")
def vae() -> klvae.AutoencoderKL:
    return cache_vae()


# -- several ranks, data grown between runs ---------------------------------------------------------------------

def _two_ranks(vae: klvae.AutoencoderKL, data: Path, out: Path) -> list[dict[str, int]]:
    # What `torchrun --nproc-per-node 2 klvae cache` does, one rank after the other in this process.
    opts = CacheOptions(**SMALL_CACHE)
    counts = [cache_rank(vae, str(data), out, opts, torch.float32, rank, 2) for rank in range(2)]
    write_index(vae, "m", out, opts, 2)
    return counts


def test_a_two_rank_cache_rerun_after_the_data_grew_encodes_only_the_new_image(
    tmp_path: Path, vae: klvae.AutoencoderKL
) -> None:
    data, out = noise_folder(tmp_path / "data", 4, hw=(32, 32)), tmp_path / "cache"
    _two_ranks(vae, data, out)
    rgb_image(data / "img0a.png", 32, 32, seed=7)  # sorts second: every later image moves to the other rank
    counts = _two_ranks(vae, data, out)  # now: KlvaeError "img1.png appears twice in the cache manifests"
    assert sum(c["encoded"] for c in counts) == 1
    sources = sorted(it["source"] for it in read_index(out)["items"])
    assert sources == sorted(p.name for p in data.iterdir())


# -- a foreign index.json in the output folder -------------------------------------------------------------------

def test_another_tools_index_json_in_the_output_folder_is_refused_not_overwritten(
    tmp_path: Path, vae: klvae.AutoencoderKL
) -> None:
    data, out = noise_folder(tmp_path / "data", 2, hw=(32, 32)), tmp_path / "site"
    out.mkdir()
    theirs = json.dumps({"pages": ["home", "about"], "version": 3})
    (out / "index.json").write_text(theirs)
    with pytest.raises(KlvaeError, match="index"):  # as a JSON list there is: "is not a cache index"
        build_cache(vae, data, out, **SMALL_CACHE)
    assert (out / "index.json").read_text() == theirs


# -- estimate_factors' arguments ---------------------------------------------------------------------------------

def test_estimate_factors_takes_a_path_as_build_cache_does(tmp_path: Path, vae: klvae.AutoencoderKL) -> None:
    data = noise_folder(tmp_path / "data", 2, hw=(32, 32))
    by_str = estimate_factors(vae, str(data), resolution=32)
    by_path = estimate_factors(vae, data, resolution=32)  # now: AttributeError: 'PosixPath' ... 'ids'
    assert by_path == by_str


@pytest.mark.parametrize(("kwargs", "name"), [({"seed": 2**64}, "seed"), ({"limit": 2.5}, "limit"),
                                              ({"batch_size": 1.5}, "batch_size")])
def test_estimate_factors_names_an_argument_of_the_wrong_type_or_range(
    tmp_path: Path, vae: klvae.AutoencoderKL, kwargs: dict[str, object], name: str
) -> None:
    data = str(noise_folder(tmp_path / "data", 2, hw=(32, 32)))
    # now: "Overflow when unpacking long long", "slice indices must be integers...", "Stop argument for islice()"
    with pytest.raises(OptionError, match=f"^{name} must be "):
        estimate_factors(vae, data, resolution=32, **kwargs)


# -- verify and the shards index.json lists ----------------------------------------------------------------------

def test_verify_reads_every_shard_the_index_lists_not_only_those_the_manifests_record(
    tmp_path: Path, vae: klvae.AutoencoderKL, capsys: pytest.CaptureFixture[str]
) -> None:
    from klvae.errors import LatentsError
    from klvae.latents.dataset import LatentDataset

    out = small_cache(tmp_path, 4, vae)  # two shards of two rows
    manifest = out / "manifest-rank000.jsonl"
    manifest.write_text(manifest.read_text().splitlines(keepends=True)[0])  # the second shard's line lost
    shard = out / "rank000-00001.safetensors"
    raw = bytearray(shard.read_bytes())
    raw[-5] ^= 0xFF  # inside the tensor data: the header stays whole
    shard.write_bytes(bytes(raw))
    assert shard.name in {it["shard"] for it in read_index(out)["items"]}  # the reader reads it
    report = verify_cache(out)  # now: "1 shard ok"
    assert not report.ok, report.summary()
    assert main(["-q", "cache", "--verify", "-o", str(out)]) == 1
    capsys.readouterr()
    with pytest.raises(LatentsError):
        LatentDataset(out, verify=True)


# -- a hard link member of a tar shard ---------------------------------------------------------------------------

def test_a_hard_link_member_of_a_tar_shard_is_cached_or_counted_not_dropped_unseen(
    tmp_path: Path, vae: klvae.AutoencoderKL
) -> None:
    # `tar -c` of a folder where b.png is a hard link to a.png stores b.png as a link member (type "1").
    shard = tmp_path / "shard.tar"
    with tarfile.open(shard, "w") as tf:
        for name, seed in (("a.png", 0), ("c.png", 1)):
            data = noise_png(seed, (32, 32))
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
        link = tarfile.TarInfo("b.png")
        link.type, link.linkname = tarfile.LNKTYPE, "a.png"
        tf.addfile(link)
    summary = build_cache(vae, shard, tmp_path / "cache", **SMALL_CACHE)
    # now: 2 rows, "skipped 0 unreadable", ok: b.png is in neither the cache nor any count
    assert summary.rows == 3 or not summary.ok, summary.summary()
