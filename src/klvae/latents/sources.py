"""Where `klvae cache` and `klvae eval` read images: stable item ids plus a loader for each."""

from __future__ import annotations

import io
import logging
import os
import tarfile
import threading
from collections import Counter
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
    not_a_file,
    open_image_bytes,
    read_tar_member,
)

log = logging.getLogger(__name__)


class _TarReader:
    """Reads tar members at the offsets listed when the shard was opened, through one open shard per process
    and thread.

    Finding a member by walking the headers from the start made each read cost the members before it: 0.35 s
    for the last of a 5,000-image shard, and in a .tar.gz the decompression of everything before it.
    """

    def __init__(self) -> None:
        # Thread-local: threads sharing one slot could take each other's file between the check and its use
        # (seek and read interleaved: another member's bytes), or close it under the other's read.
        self._local = threading.local()

    def read(self, tar_path: Path, member: str, offset: int, item_id: str) -> bytes:
        """The bytes of `member`, whose header starts at `offset`; ImageError when it is not there (any more)."""
        try:
            tf = self._shard(tar_path)
            tf.fileobj.seek(offset)  # forward in a compressed shard read in order: no decompression repeated
            info = tarfile.TarInfo.fromtarfile(tf)  # the header there, long names and pax records included
        except (OSError, EOFError, tarfile.TarError) as e:
            self.close()
            raise ImageError(f"{item_id}: cannot read from {tar_path}: {tar_reason(e)}") from None
        if info.name != member or not _is_image_member(info):  # the shard was replaced since it was listed
            raise ImageError(f"{item_id}: no longer in {tar_path}")
        try:
            return read_tar_member(tf, info, item_id)
        except (OSError, EOFError, tarfile.TarError) as e:
            self.close()
            raise ImageError(f"{item_id}: cannot read from {tar_path}: {tar_reason(e)}") from None

    def _shard(self, tar_path: Path) -> tarfile.TarFile:
        # Per process too: a handle inherited through fork shares its position with the parent.
        held = getattr(self._local, "open", None)
        if held is not None and held[:2] == (os.getpid(), tar_path):
            return held[2]
        self.close()
        if not tar_path.is_file():  # replaced by a FIFO since it was listed: tarfile would block on it forever
            raise OSError(f"{tar_path.name} is no longer a regular file")
        tf = tarfile.open(tar_path)  # noqa: SIM115 (held open for the next reads; close() closes it)
        self._local.open = (os.getpid(), tar_path, tf)
        return tf

    def close(self) -> None:
        """Close this thread's open shard, if any (one inherited from another process is left to it)."""
        held = getattr(self._local, "open", None)
        if held is not None and held[0] == os.getpid():
            held[2].close()
        self._local.open = None

    def __getstate__(self) -> dict[str, Any]:
        return {}  # a spawned DataLoader worker opens its own

    def __setstate__(self, state: dict[str, Any]) -> None:
        self._local = threading.local()


@dataclass
class ItemSource:
    """A fixed, ordered list of item ids; `load(id)` returns the RGB image or raises ImageError.

    `unreadable` lists the parts of the data (tar shards) that were skipped, wholly or from some point on,
    as (path, reason): a job counts them as skipped and finishes the rest.
    """

    kind: str
    ids: list[str]
    _paths: dict[str, Any] = field(default_factory=dict, repr=False)
    _table: TableRows | None = field(default=None, repr=False)
    unreadable: list[tuple[str, str]] = field(default_factory=list)
    _tars: _TarReader = field(default_factory=_TarReader, repr=False, compare=False)

    def fingerprints(self) -> dict[str, str]:
        """What a cache records of the data beside the model's fingerprints: a table's row numbering, which a
        resume must find unchanged (folder and tar ids are names, the same whatever else the data holds)."""
        return {"data_fingerprint": self._table.signature()} if self._table is not None else {}

    def load(self, item_id: str) -> Image.Image:
        """The image of one item."""
        if self.kind == "folder":
            return load_image(self._paths[item_id])
        if self.kind == "tar":
            tar_path, member, offset = self._paths[item_id]
            return open_image_bytes(self._tars.read(tar_path, member, offset, item_id), item_id)
        assert self._table is not None
        return image_from_cell(self._table.cell(int(item_id.removeprefix("row"))), item_id)


def item_error(item_id: str, e: Exception) -> str:
    """Why an item is skipped, in one line: an ImageError's own message, else the item and the error's type."""
    if isinstance(e, ImageError):
        text = str(e) if item_id in str(e) else f"{item_id}: {e}"
    else:
        text = f"{item_id}: {type(e).__name__}: {e}"
    return (text.splitlines() or [text])[0]


def _folder(root: Path) -> ItemSource:
    if not root.is_dir():
        return ItemSource("folder", [root.name], {root.name: root})
    unlisted: list[str] = []
    ids = {str(p.relative_to(root)): p for p in find_images([root], unreadable=unlisted)}
    # A folder that cannot be listed is a skipped part of the data, counted as a tar shard that cannot be read is.
    return ItemSource("folder", list(ids), ids, unreadable=[(f, "cannot be listed") for f in unlisted])


def tar_reason(e: BaseException) -> str:
    """A tarfile error in one line (tarfile.open lists every compression it tried, one per line)."""
    lines = str(e).splitlines()
    if len(lines) > 1:
        return "not a tar file (nor a gzip, bz2 or xz compressed one)"
    return lines[0] if lines else type(e).__name__


def _tar_members(t: Path, ids: dict[str, tuple[Path, str, int]], label: str) -> str | None:
    # Adds the shard's image members to `ids` as "label:member"; returns why the shard (or its rest) cannot be
    # read, if so.
    n, files = 0, {}
    if not t.is_file():  # a FIFO among the shards would block tarfile forever
        try:
            return not_a_file(t.stat().st_mode)
        except OSError as e:  # a link to nothing
            return f"cannot be read: {e.strerror or e}"
    try:
        with tarfile.open(t) as tf:
            for m in tf:
                if _is_image_member(m):
                    ids[f"{label}:{m.name}"] = files[m.name] = (t, m.name, m.offset)
                    n += 1
                elif m.islnk() and _is_image_name(m.name) and m.linkname in files:
                    # `tar -c` stores a second name of a file as a hard link: the image is the earlier member's.
                    ids[f"{label}:{m.name}"] = files[m.linkname]
                    n += 1
            ended = _end_of_members(tf)
    except (OSError, EOFError, tarfile.TarError) as e:
        return f"cut short after {n} image(s): {tar_reason(e)}" if n else tar_reason(e)
    return None if ended is None else f"cut short after {n} image(s): {ended}"


def _is_image_member(m: tarfile.TarInfo) -> bool:
    # A regular file, not a GNU sparse one: a few bytes of sparse map declare up to MAX_ENCODED_BYTES of zeros,
    # which tarfile writes out (piece by piece, each piece copying all before it) for every read of the member.
    # Hidden names (macOS's ._x.png resource forks) are skipped, as folder walks and training shards skip them.
    return m.isfile() and not m.issparse() and _is_image_name(m.name)


def _is_image_name(member: str) -> bool:
    name = member.rpartition("/")[2]
    return not name.startswith(".") and Path(name).suffix.lower() in IMAGE_EXTENSIONS


def _end_of_members(tf: tarfile.TarFile) -> str | None:
    # Why the member list tarfile gave (read to its end) may be incomplete. tarfile raises for a cut inside a
    # member's data, but quietly ends the list at a header cut short, at a file cut between two members, and at
    # a block past the first that is no header: only a list that ends at a whole block of zeros is complete.
    f, at, size = tf.fileobj, tf.offset, tarfile.BLOCKSIZE
    if isinstance(f, io.BufferedReader):  # uncompressed: look at the block the list ended at
        f.seek(at)
        block = f.read(size)
    else:
        # Compressed: seeking back would decompress the shard again from its start. The read that ended the
        # list (the position is past it) gives the block's length, which tells a cut; its bytes go unchecked.
        block = bytes(min(f.tell() - at, size))
    if len(block) < size:
        return f"the archive ends at byte {at + len(block)}, inside a member's header or before its end marker"
    if block.count(0) < size:
        return f"no tar header at byte {at}"
    return None


def _tars(paths: tuple[Path, ...]) -> ItemSource:
    ids: dict[str, tuple[Path, str, int]] = {}
    unreadable = []
    # Ids name a shard by its file name, unless shards in other folders share it (two img2dataset outputs both
    # have 00000.tar, with the same member names): then by its path, or one shard's images would replace the other's.
    names = Counter(t.name for t in paths)
    for t in paths:
        reason = _tar_members(t, ids, t.name if names[t.name] == 1 else str(t))
        if reason is not None:
            unreadable.append((str(t), reason))
    if len(unreadable) == len(paths) and not ids:
        others = f" (nor any of the other {len(paths) - 1} shards)" if len(paths) > 1 else ""
        raise KlvaeError(f"cannot read tar shard {unreadable[0][0]}: {unreadable[0][1]}{others}")
    for path, reason in unreadable:
        # One bad shard among many is skipped and counted, as a bad image is; the job finishes the rest.
        log.warning("skipping tar shard %s: %s", path, reason)
    return ItemSource("tar", list(ids), ids, unreadable=unreadable)


def open_source(spec: str, image_column: str = "image") -> ItemSource:
    """An image folder, `save_to_disk` folder, parquet file(s), or .tar shards (a file, folder, glob or braces)."""
    found = resolve_spec(spec)
    if found.kind == "tar":
        return _tars(found.paths)
    if found.kind == "table":
        table = TableRows.from_spec(found, image_column)
        return ItemSource("table", [f"row{i}" for i in range(len(table))], _table=table)
    return _folder(found.paths[0])
