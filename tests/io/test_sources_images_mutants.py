"""Pins of the flow-matching noising, the data-source readers and the image readers that a mutation audit found
unpinned by the other tests.

Pinned here: sigmas shaped [B, 1, ..., 1] only, integer timesteps on a FLUX (mu-shifted) table, timesteps below 1
all on the table, logit_std 0 and both ends of the mode scale range; empty and FIFO data specs, a dataset clone
with a preview image, images beside parquet in a sub-folder, hidden folders of parquet, split folders, the table
signature's row counts, undecoded save_to_disk cells, unreadable parquet files and row groups, shards named with
braces and dangling links; a FIFO swapped in after the check, PNG EXIF after the pixels and after IEND, bytearray
cells, one file named twice, integer pixels, reflect padding of one short side, and saves that replace or exceed
WebP's side limit.
"""

from __future__ import annotations

import io
import math
import os
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import ExifTags, Image

from helpers import noise_png
from klvae.datasources import DataSpec, TableRows, expand_shards, parquet_files, resolve_spec
from klvae.errors import ImageError, KlvaeError
from klvae.flow import (
    MODE_SCALE_RANGE,
    FlowSchedule,
    compute_density_for_timestep_sampling,
    noisy,
)
from klvae.images import (
    find_images,
    image_from_cell,
    image_size,
    load_image,
    pad_to_multiple,
    save_image_atomic,
    tensor_to_pil,
)

# ---- flow ----


@pytest.mark.parametrize("shape", [(2, 1, 3, 3), (2, 4, 1, 1), (2, 1, 1, 3)])
def test_a_sigma_with_a_size_other_than_one_after_the_batch_is_refused(shape: tuple[int, ...]) -> None:
    """A per-pixel or per-channel sigma ([B, 1, H, W]) would broadcast into a noising no schedule defines."""
    x = torch.zeros(2, 4, 3, 3)
    with pytest.raises(ValueError, match=r"sigma must be a number, \[B\] or \[B, 1, \.\.\., 1\]"):
        noisy(x, x, torch.full(shape, 0.5))


@pytest.mark.parametrize("timestep", [500, torch.tensor([500, 10])])
def test_integer_timesteps_on_a_flux_shifted_table_are_refused(timestep: int | torch.Tensor) -> None:
    """A table position given to a mu-shifted (FLUX) table would noise at the unshifted sigma t / T, silently."""
    s, x = FlowSchedule(1000, mu=1.0), torch.zeros(2, 4, 2, 2)
    with pytest.raises(TypeError, match="integer timesteps on a shifted table"):
        s.scale_noise(x, timestep, x)


def test_timesteps_below_1_are_refused_unless_every_one_is_on_the_table() -> None:
    """A sigma passed beside a table timestep below 1 would noise next to nothing instead of being refused."""
    s, x = FlowSchedule(1000, shift=0.1), torch.zeros(2, 4, 2, 2)  # its clean end has timesteps below 1
    assert s.scale_noise(x, s.timesteps[-2:], x).shape == x.shape
    with pytest.raises(ValueError, match=r"timesteps all lie in \(0, 1\): sigmas\?"):
        s.add_noise(x, x, torch.stack([s.timesteps[-1], torch.tensor(0.5, dtype=torch.float64)]))


def test_a_logit_std_of_0_draws_the_mean_every_time() -> None:
    """logit_std=0 (every draw at sigmoid(logit_mean)) is a valid degenerate normal and must not be refused."""
    u = compute_density_for_timestep_sampling("logit_normal", 3, generator=torch.Generator().manual_seed(0),
                                              logit_mean=1.0, logit_std=0.0)
    assert torch.equal(u, torch.sigmoid(torch.ones(3)))


@pytest.mark.parametrize("scale", MODE_SCALE_RANGE)
def test_the_mode_sampler_takes_both_ends_of_its_scale_range(scale: float) -> None:
    """The SD3 paper's range [-1, 2 / (pi - 2)] includes its ends; refusing them would refuse valid configs."""
    u = compute_density_for_timestep_sampling("mode", 4, generator=torch.Generator().manual_seed(0), mode_scale=scale)
    r = torch.rand(4, generator=torch.Generator().manual_seed(0))
    assert torch.equal(u, 1 - r - scale * (torch.cos(math.pi * r / 2) ** 2 - 1 + r))


# ---- data sources ----


def test_an_empty_data_spec_is_refused_not_read_as_the_working_folder() -> None:
    """An empty --data would otherwise read every image under the working folder."""
    with pytest.raises(KlvaeError, match="no data named: the path is empty"):
        resolve_spec("")


def test_a_hub_dataset_clone_with_a_preview_image_is_a_table(tmp_path: Path) -> None:
    """A dataset repo's data/*.parquet is the data even beside a preview picture, which alone is no dataset."""
    repo = tmp_path / "repo"
    (repo / "data").mkdir(parents=True)
    (repo / "data" / "train-00000-of-00001.parquet").write_bytes(b"PAR1")
    (repo / "preview.png").write_bytes(noise_png(0))
    assert resolve_spec(repo) == DataSpec("table", (repo,))


def test_an_image_folder_with_parquet_files_in_a_sub_folder_is_an_image_folder(tmp_path: Path) -> None:
    """Images beside a sub-folder of parquet metadata (captions, embeddings) are the data, not the parquet."""
    root = tmp_path / "photos"
    (root / "meta").mkdir(parents=True)
    (root / "meta" / "captions.parquet").write_bytes(b"PAR1")
    (root / "a.png").write_bytes(noise_png(0))
    assert resolve_spec(root) == DataSpec("folder", (root,))


def test_parquet_files_in_a_hidden_folder_are_not_part_of_the_table(tmp_path: Path) -> None:
    """A notebook's .ipynb_checkpoints copy of a parquet file would add its rows to the data a second time."""
    for f in ("data/train.parquet", ".ipynb_checkpoints/train-checkpoint.parquet", "data/.old/train.parquet"):
        (tmp_path / f).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / f).write_bytes(b"PAR1")
    assert parquet_files(tmp_path, None) == [tmp_path / "data" / "train.parquet"]


def test_a_split_laid_out_as_a_folder_is_its_files(tmp_path: Path) -> None:
    """Splits kept as folders (train/0000.parquet, test/0000.parquet) would find no file for split "train"."""
    for split in ("train", "test"):
        (tmp_path / split).mkdir()
        (tmp_path / split / "0000.parquet").write_bytes(b"PAR1")
    assert parquet_files(tmp_path, "train") == [tmp_path / "train" / "0000.parquet"]
    assert parquet_files(tmp_path, "test") == [tmp_path / "test" / "0000.parquet"]


def test_the_table_signature_changes_with_a_files_row_count(tmp_path: Path) -> None:
    """A parquet file rewritten with other rows under its old name would keep its cached row ids pointing at them."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    f = tmp_path / "train.parquet"
    pq.write_table(pa.table({"image": [noise_png(0), noise_png(1)]}), f)
    before = TableRows(f).signature()
    pq.write_table(pa.table({"image": [noise_png(0), noise_png(1), noise_png(2)]}), f)
    assert TableRows(f).signature() != before


def test_save_to_disk_cells_stay_undecoded_until_the_size_guard(tmp_path: Path) -> None:
    """datasets would decode every image on access, a decompression bomb included, before klvae's size check."""
    import datasets

    ds = datasets.Dataset.from_dict({"image": [Image.open(io.BytesIO(noise_png(0)))], "text": ["a"]})
    ds.cast_column("image", datasets.Image()).save_to_disk(str(tmp_path / "disk"))
    cell = TableRows(tmp_path / "disk").cell(0)
    assert isinstance(cell, dict) and cell["bytes"]
    assert image_from_cell(cell, "row0").size == (24, 16)


def test_a_shard_whose_name_holds_braces_is_taken_as_named(tmp_path: Path) -> None:
    """An existing shard named "part{1,2}.tar" would be expanded into part1.tar, part2.tar: "no shards"."""
    shard = tmp_path / "part{1,2}.tar"
    shard.write_bytes(b"")
    assert expand_shards(shard) == [shard]
    assert resolve_spec(str(shard)) == DataSpec("tar", (shard,))


def test_a_file_named_parquet_that_is_not_parquet_is_one_klvae_error(tmp_path: Path) -> None:
    """pyarrow's own ArrowInvalid (a ValueError) would reach the user as a traceback, not a one-line error."""
    f = tmp_path / "train.parquet"
    f.write_bytes(b"not a parquet file")
    with pytest.raises(KlvaeError, match=r"cannot read parquet file .*train\.parquet: Parquet magic bytes"):
        TableRows(f)


def test_an_unreadable_row_group_is_a_bad_item_and_the_others_still_read(tmp_path: Path) -> None:
    """A corrupt row group must be skipped as bad images (ImageError), not stop the whole job."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    f = tmp_path / "train.parquet"
    pq.write_table(pa.table({"image": [noise_png(k) for k in range(4)]}), f, row_group_size=2, compression="none")
    data = bytearray(f.read_bytes())
    start = pq.ParquetFile(f).metadata.row_group(1).column(0).data_page_offset
    data[start:start + 20] = b"\xff" * 20  # the second group's page header
    f.write_bytes(bytes(data))
    rows = TableRows(f)
    assert len(rows) == 4 and rows.cell(1) == noise_png(1)
    with pytest.raises(ImageError, match="row group 1 cannot be read"):
        rows.cell(2)


def test_a_dangling_symlink_named_as_a_shard_is_no_shard(tmp_path: Path) -> None:
    """A link to a deleted shard would be listed and fail (or count as unreadable) only once the job ran."""
    (tmp_path / "s.tar").symlink_to(tmp_path / "gone.tar")
    with pytest.raises(KlvaeError, match="no shards at"):
        expand_shards(tmp_path / "s.tar")


def test_a_fifo_named_as_the_data_is_refused_before_it_is_read(tmp_path: Path) -> None:
    """A FIFO taken for a shard would block its reader forever once the job opened it."""
    fifo = tmp_path / "data.tar"
    os.mkfifo(fifo)
    with pytest.raises(ImageError, match="not a regular file"):
        resolve_spec(fifo)


# ---- images ----


def test_a_fifo_that_replaced_a_checked_image_is_refused_by_its_open_handle(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A FIFO swapped in after the path was checked must be caught on the opened file, not read as an image."""
    (tmp_path / "real.png").write_bytes(noise_png(0))
    fifo = tmp_path / "a.png"
    os.mkfifo(fifo)
    regular, path_stat = (tmp_path / "real.png").stat(), Path.stat
    # The path check sees the regular file that was there; the file then opened is the FIFO.
    monkeypatch.setattr(Path, "stat", lambda self, **kw: regular if self == fifo else path_stat(self, **kw))
    with pytest.raises(ImageError, match="not a regular file"):
        load_image(fifo)


def _png_with_late_exif(orientation: int) -> bytes:
    """A PNG whose eXIf chunk comes after its pixels (IDAT), as some tools write it."""
    exif = Image.Exif()
    exif[ExifTags.Base.Orientation] = orientation
    buf = io.BytesIO()
    Image.open(io.BytesIO(noise_png(0))).save(buf, format="PNG", exif=exif.tobytes())  # 24x16
    data, pos, chunks = buf.getvalue(), 8, []
    while pos < len(data):
        end = pos + 12 + int.from_bytes(data[pos:pos + 4], "big")
        chunks.append(data[pos:end])
        pos = end
    late = [c for c in chunks if c[4:8] == b"eXIf"]
    rest = [c for c in chunks if c[4:8] != b"eXIf"]
    assert len(late) == 1 and rest[-1][4:8] == b"IEND" and rest[-2][4:8] == b"IDAT"
    return data[:8] + b"".join(rest[:-1] + late + rest[-1:])


def test_image_size_finds_an_exif_orientation_stored_after_a_pngs_pixels(tmp_path: Path) -> None:
    """image_size would report the unturned size of a PNG whose late EXIF turns it, unlike load_image."""
    (tmp_path / "late.png").write_bytes(_png_with_late_exif(6))
    loaded = load_image(tmp_path / "late.png")
    assert loaded.size == (16, 24)
    assert image_size(tmp_path / "late.png") == (24, 16) == (loaded.height, loaded.width)


@pytest.mark.parametrize("wrap", [bytearray, memoryview])
def test_a_cell_of_bytearray_or_memoryview_is_read_as_encoded_bytes(wrap: type) -> None:
    """A table handing out a bytearray or memoryview would see every row refused as "not an image"."""
    img = image_from_cell(wrap(noise_png(3)), "row0")
    assert img.mode == "RGB" and np.array_equal(np.asarray(img), np.asarray(Image.open(io.BytesIO(noise_png(3)))))


def test_one_image_named_by_two_spellings_is_listed_once(tmp_path: Path) -> None:
    """a.png and sub/../a.png are one file: listing it twice would encode (and train on) it twice."""
    (tmp_path / "sub").mkdir()
    (tmp_path / "a.png").write_bytes(noise_png(0))
    assert find_images([tmp_path / "a.png", tmp_path / "sub" / ".." / "a.png"]) == [tmp_path / "a.png"]


def test_integer_pixels_are_refused_not_shown_white() -> None:
    """uint8 pixels 0..255 (torchvision's read_image) read as [-1, 1] would save as an all-white picture."""
    with pytest.raises(ValueError, match=r"expected floating-point pixels in \[-1, 1\], got torch\.uint8"):
        tensor_to_pil(torch.zeros(3, 2, 2, dtype=torch.uint8))


def test_image_size_ignores_an_exif_chunk_after_the_end_of_a_png(tmp_path: Path) -> None:
    """Bytes appended after IEND are no part of the PNG: load_image leaves them, and so must image_size."""
    late = _png_with_late_exif(6)
    i = late.index(b"eXIf") - 4
    n = 12 + int.from_bytes(late[i:i + 4], "big")
    (tmp_path / "tail.png").write_bytes(late[:i] + late[i + n:] + late[i:i + n])  # eXIf moved past IEND
    loaded = load_image(tmp_path / "tail.png")
    assert loaded.size == (24, 16)
    assert image_size(tmp_path / "tail.png") == (16, 24)


def test_reflect_padding_replicates_when_only_one_side_is_too_short() -> None:
    """A short side beside a long one would make torch's reflect pad fail instead of falling back to replicate."""
    x = torch.arange(3 * 16, dtype=torch.float32).reshape(1, 1, 3, 16)
    padded, size = pad_to_multiple(x, 8, "reflect")
    assert size == (3, 16)
    assert torch.equal(padded, F.pad(x, (0, 0, 0, 5), mode="replicate"))


def test_saving_over_an_existing_image_replaces_it_by_default(tmp_path: Path) -> None:
    """A second save to one name would be refused (KlvaeError) unless replace=False was asked for."""
    out = tmp_path / "a.png"
    save_image_atomic(Image.new("RGB", (2, 2), (255, 0, 0)), out)
    save_image_atomic(Image.new("RGB", (2, 2), (0, 0, 255)), out)
    assert Image.open(out).getpixel((0, 0)) == (0, 0, 255)


def test_an_image_too_wide_for_webp_is_refused_before_writing(tmp_path: Path) -> None:
    """Pillow's own encoder error would come instead of the one-line error that names the limit and .png."""
    with pytest.raises(ImageError, match=r"WEBP stores at most 16383 pixels a side.*write \.png instead"):
        save_image_atomic(Image.new("RGB", (16384, 1)), tmp_path / "wide.webp")
    assert list(tmp_path.iterdir()) == []
