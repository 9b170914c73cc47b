"""Where `klvae cache` and `klvae eval` read images: stable item ids plus a loader for each."""

from __future__ import annotations

import tarfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from PIL import Image

from klvae.datasources import TableRows, resolve_spec
from klvae.errors import ImageError, KlvaeError
from klvae.images import (
    IMAGE_EXTENSIONS,
    find_images,
    image_from_cell,
    load_image,
    open_image_bytes,
    read_tar_member,
)


@dataclass
class ItemSource:
    """A fixed, ordered list of item ids; `load(id)` returns the RGB image or raises ImageError."""

    kind: str
    ids: list[str]
    _paths: dict[str, Any] = field(default_factory=dict, repr=False)
    _table: TableRows | None = field(default=None, repr=False)

    def load(self, item_id: str) -> Image.Image:
        """The image of one item."""
        if self.kind == "folder":
            return load_image(self._paths[item_id])
        if self.kind == "tar":
            tar_path, member = self._paths[item_id]
            try:
                with tarfile.open(tar_path) as tf:
                    data = read_tar_member(tf, tf.getmember(member), item_id)
            except (OSError, tarfile.TarError) as e:
                raise ImageError(f"{item_id}: cannot read from {tar_path}: {e}") from None
            return open_image_bytes(data, item_id)
        assert self._table is not None
        return image_from_cell(self._table.cell(int(item_id.removeprefix("row"))), item_id)


def _folder(root: Path) -> ItemSource:
    if not root.is_dir():
        return ItemSource("folder", [root.name], {root.name: root})
    ids = {str(p.relative_to(root)): p for p in find_images([root])}
    return ItemSource("folder", list(ids), ids)


def _tars(paths: tuple[Path, ...]) -> ItemSource:
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


def open_source(spec: str, image_column: str = "image") -> ItemSource:
    """An image folder, `save_to_disk` folder, parquet file(s), or .tar shards (a file, folder, glob or braces)."""
    found = resolve_spec(spec)
    if found.kind == "tar":
        return _tars(found.paths)
    if found.kind == "table":
        table = TableRows.from_spec(found, image_column)
        return ItemSource("table", [f"row{i}" for i in range(len(table))], _table=table)
    return _folder(found.paths[0])
