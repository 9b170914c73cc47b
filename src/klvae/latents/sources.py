"""Where `klvae cache` and `klvae eval` read images: stable item ids plus a loader for each."""

from __future__ import annotations

import tarfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from PIL import Image

from klvae.errors import ImageError, KlvaeError
from klvae.images import IMAGE_EXTENSIONS, find_images, load_image, open_image_bytes


@dataclass
class ItemSource:
    """A fixed, ordered list of item ids; `load(id)` returns the RGB image or raises ImageError."""

    kind: str
    ids: list[str]
    _paths: dict[str, Any] = field(default_factory=dict, repr=False)
    _table: Any = field(default=None, repr=False)
    _column: str = "image"

    def load(self, item_id: str) -> Image.Image:
        """The image of one item."""
        if self.kind == "folder":
            return load_image(self._paths[item_id])
        if self.kind == "tar":
            tar_path, member = self._paths[item_id]
            try:
                with tarfile.open(tar_path) as tf:
                    f = tf.extractfile(member)
                    data = f.read() if f is not None else b""
            except (OSError, tarfile.TarError) as e:
                raise ImageError(f"{item_id}: cannot read from {tar_path}: {e}") from None
            return open_image_bytes(data, item_id)
        row = self._table[int(item_id.removeprefix("row"))][self._column]
        return _table_image(row, item_id)


def _table_image(value: Any, name: str) -> Image.Image:
    if isinstance(value, Image.Image):
        return value.convert("RGB")
    if isinstance(value, dict) and value.get("bytes"):
        return open_image_bytes(value["bytes"], name)
    if isinstance(value, dict) and value.get("path"):
        return load_image(value["path"])
    if isinstance(value, bytes | bytearray):
        return open_image_bytes(bytes(value), name)
    raise ImageError(f"{name}: the image column holds {type(value).__name__}, not an image")


def _folder(root: Path) -> ItemSource:
    paths = find_images([root])
    ids = {str(p.relative_to(root)) if p != root else p.name: p for p in paths}
    return ItemSource("folder", list(ids), ids)


def _tars(paths: list[Path]) -> ItemSource:
    ids: dict[str, tuple[Path, str]] = {}
    for t in paths:
        try:
            with tarfile.open(t) as tf:
                for m in tf.getmembers():
                    if m.isfile() and Path(m.name).suffix.lower() in IMAGE_EXTENSIONS:
                        ids[f"{t.name}:{m.name}"] = (t, m.name)
        except (OSError, tarfile.TarError) as e:
            raise KlvaeError(f"cannot read tar shard {t}: {e}") from None
    return ItemSource("tar", list(ids), ids)


def _table(path: Path, column: str) -> ItemSource:
    try:
        import datasets
    except ImportError:
        raise KlvaeError("reading Hugging Face datasets or parquet needs `pip install datasets`") from None
    if path.is_dir() and not list(path.glob("*.parquet")):
        ds = datasets.load_from_disk(str(path))
        if isinstance(ds, datasets.DatasetDict):
            ds = ds["train"] if "train" in ds else next(iter(ds.values()))
    else:
        files = sorted(path.glob("*.parquet")) if path.is_dir() else [path]
        ds = datasets.load_dataset("parquet", data_files=[str(f) for f in files], split="train")
    if column not in ds.column_names:
        raise KlvaeError(f"{path} has no column {column!r} (columns: {', '.join(ds.column_names)})")
    if isinstance(ds.features[column], datasets.Image):
        ds = ds.cast_column(column, datasets.Image(decode=False))  # decode ourselves, with the size guard
    return ItemSource("table", [f"row{i}" for i in range(len(ds))], _table=ds, _column=column)


def open_source(spec: str, image_column: str = "image") -> ItemSource:
    """An image folder, `save_to_disk` folder, parquet file(s), or .tar shards (a file, folder or glob)."""
    p = Path(spec)
    if any(ch in spec for ch in "*?["):
        matches = sorted(Path().glob(spec)) if not p.is_absolute() else sorted(p.parent.glob(p.name))
        if not matches:
            raise KlvaeError(f"nothing matches {spec}")
        return _tars(matches)
    if not p.exists():
        raise KlvaeError(f"no such data: {spec}")
    if p.suffix == ".tar":
        return _tars([p])
    if p.suffix == ".parquet" or (p.is_dir() and ((p / "dataset_info.json").exists() or (p / "state.json").exists()
                                                   or (p / "dataset_dict.json").exists() or list(p.glob("*.parquet")))):
        return _table(p, image_column)
    if p.is_dir() and list(p.glob("*.tar")) and not find_images([p]):
        return _tars(sorted(p.glob("*.tar")))
    return _folder(p) if p.is_dir() else ItemSource("folder", [p.name], {p.name: p})
