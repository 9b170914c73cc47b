"""Where images come from, shared by training, caching and evaluation: what a data spec names, and tables.

A spec is an image folder or file, a `datasets.save_to_disk` folder, parquet file(s), or WebDataset .tar
shards (a file, a folder of them, a glob or a brace range). `resolve_spec` decides which, once, for everyone.
"""

from __future__ import annotations

import bisect
import glob
import hashlib
import importlib
import json
import logging
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from klvae.errors import ImageError, KlvaeError
from klvae.images import check_regular_file, find_images

log = logging.getLogger(__name__)

TAR_SUFFIXES = (".tar", ".tar.gz", ".tgz")
# What datasets.load_from_disk looks for: a Dataset's info and state (both), or a DatasetDict's index.
DATASET_FILES = ("dataset_info.json", "state.json")
DATASET_DICT_FILE = "dataset_dict.json"


def is_tar_name(name: str) -> bool:
    """Whether a file name ends like a tar shard's, in any case (as image names are matched)."""
    return name.lower().endswith(TAR_SUFFIXES)


@dataclass(frozen=True)
class DataSpec:
    """What a spec names: kind "folder" (an image folder or one image), "table" or "tar", and its path(s)."""

    kind: str
    paths: tuple[Path, ...]


def resolve_spec(spec: str | Path, recursive: bool = True) -> DataSpec:
    """Classify a data spec; KlvaeError if it names nothing."""
    s = str(spec)
    if not s.strip():  # Path("") is the working folder
        raise KlvaeError("no data named: the path is empty")
    if not Path(s).exists() and any(c in s for c in "{*?["):
        return _pattern_spec(s)
    p = Path(s)
    if not p.exists():
        # A config file's `~/imgs` reaches klvae as written: only a shell expands `~`.
        home = f" (a ~ is not expanded here: write {p.expanduser()})" if s.startswith("~") and \
            p.expanduser().exists() else ""
        raise KlvaeError(f"no such data: {s}{home}")
    if not p.is_dir():
        check_regular_file(p)  # a FIFO named as the data would block its reader forever
    if is_tar_name(p.name):
        return DataSpec("tar", (p,))
    if p.suffix.lower() == ".parquet" or is_disk(p) or _visible(p, "*.parquet", "data/*.parquet"):
        return DataSpec("table", (p,))
    if p.is_dir() and _shards_in(p):
        if not find_images([p], recursive):
            return DataSpec("tar", tuple(expand_shards(p)))
        log.warning("%s holds images and tar shards: reading the images; name the shards (%s/*.tar) to read them "
                    "instead", p, p)
    # A dataset pushed with a config name keeps its parquet files a level or two down (sharp/train-0.parquet).
    if p.is_dir() and _visible(p, "*/*.parquet", "*/*/*.parquet") and not find_images([p], recursive):
        return DataSpec("table", (p,))
    return DataSpec("folder", (p,))


def _visible(folder: Path, *patterns: str) -> bool:
    """Whether a pattern matches a file of `folder` outside hidden files and folders."""
    return any(_not_hidden(f, folder) for pattern in patterns for f in folder.glob(pattern))


def _not_hidden(f: Path, folder: Path) -> bool:
    return not any(n.startswith(".") for n in f.relative_to(folder).parts)


def _pattern_spec(s: str) -> DataSpec:
    # A glob or brace range: parquet files (all of them), else tar shards.
    files = expand_shards(s)
    if all(f.suffix.lower() == ".parquet" for f in files):
        return DataSpec("table", tuple(files))
    if not any(is_tar_name(f.name) for f in files):
        # Read as shards, images would fail only once the job had started. Beside tars, another file is skipped
        # and counted as an unreadable shard.
        raise KlvaeError(f"{s} names no tar shard ({files[0].name}, ...) and not only parquet files: a glob or "
                         f"brace range names shards; give an image folder by its path")
    return DataSpec("tar", tuple(files))


def _import(module: str, package: str) -> Any:
    try:
        return importlib.import_module(module)
    except ImportError:
        raise KlvaeError(f"reading this data needs `pip install {package}`") from None


class ParquetRows:
    """Random access to one column of parquet files through pyarrow, one row group in memory at a time."""

    def __init__(self, files: list[Path], column: str) -> None:
        pq = _import("pyarrow.parquet", "pyarrow")
        self.files, self.column = files, column
        self.groups: list[tuple[int, int, int]] = []  # (first row, file index, row group)
        self.file_rows: list[int] = []
        n = 0
        for fi, f in enumerate(files):
            try:
                meta = pq.ParquetFile(f).metadata
            except (OSError, ValueError) as e:  # pyarrow's ArrowInvalid (not parquet, cut short) is a ValueError
                # An error, not a skip: row ids number the rows of all files, so leaving one out would shift them.
                reason = (str(e).splitlines() or [type(e).__name__])[0]
                raise KlvaeError(f"cannot read parquet file {f}: {reason}") from None
            names = meta.schema.to_arrow_schema().names
            if column not in names:
                raise KlvaeError(f"{f} has no column {column!r} (columns: {', '.join(names)})")
            for g in range(meta.num_row_groups):
                self.groups.append((n, fi, g))
                n += meta.row_group(g).num_rows
            self.file_rows.append(meta.num_rows)
        self.n = n
        self._cache: tuple[int, list[Any]] | None = None

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> Any:
        k = bisect.bisect_right(self.groups, (i, len(self.files), 0)) - 1
        first, fi, g = self.groups[k]
        if self._cache is None or self._cache[0] != k:
            pq = _import("pyarrow.parquet", "pyarrow")
            try:
                table = pq.ParquetFile(self.files[fi]).read_row_group(g, columns=[self.column])
            except (OSError, ValueError) as e:  # pyarrow's errors subclass these; a bad group skips its rows
                raise ImageError(f"{self.files[fi]}: row group {g} cannot be read: {e}") from None
            self._cache = (k, table.column(self.column).to_pylist())
        return self._cache[1][i - first]

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_cache": None}  # workers read their own row groups


def parquet_files(path: Path, split: str | None) -> list[Path]:
    """The parquet files of a file or folder, one split only (`split`, else train, else the first)."""
    files = sorted(f for f in path.rglob("*.parquet") if _not_hidden(f, path)) if path.is_dir() else [path]
    if split is not None:
        files = [f for f in files if f.name.startswith(f"{split}-") or split in f.relative_to(path).parts[:-1]]
    else:
        # The Hub lays splits side by side (data/train-00000-of-00002.parquet, data/test-...): never mix them.
        splits = {m.group(1) for f in files if (m := re.match(r"(\w+?)-\d+-of-\d+", f.name))}
        if len(splits) > 1:
            split = "train" if "train" in splits else sorted(splits)[0]
            log.warning("%s holds splits %s; using %r", path, ", ".join(sorted(splits)), split)
            return parquet_files(path, split)
    if not files:
        raise KlvaeError(f"no parquet files in {path}" + (f" for split {split!r}" if split else ""))
    return files


def is_disk(p: Path) -> bool:
    """Whether p is a `datasets.save_to_disk` folder, judged as datasets.load_from_disk judges it."""
    # One of a Dataset's two files alone is some other tool's (a labelling tool's state.json in an image folder).
    return p.is_dir() and (all((p / f).is_file() for f in DATASET_FILES) or (p / DATASET_DICT_FILE).is_file())


def load_from_disk(path: Path, column: str, split: str | None) -> Any:
    """One split of a save_to_disk folder, reduced to its image column, images left undecoded."""
    datasets = _import("datasets", "datasets")
    ds = datasets.load_from_disk(str(path))
    if isinstance(ds, datasets.DatasetDict):
        name = split or ("train" if "train" in ds else next(iter(ds)))
        if name not in ds:
            raise KlvaeError(f"{path} has no split {name!r} (splits: {', '.join(ds)})")
        ds = ds[name]
    if column not in ds.column_names:
        raise KlvaeError(f"{path} has no column {column!r} (columns: {', '.join(ds.column_names)})")
    ds = ds.select_columns([column])  # rows then carry only the image, not captions and embeddings
    if isinstance(ds.features[column], datasets.Image):
        ds = ds.cast_column(column, datasets.Image(decode=False))  # decode here, behind the size guard
    return ds




class TableRows:
    """The image column of a `save_to_disk` folder (needs `datasets`) or of parquet file(s) (needs `pyarrow`):
    `cell(i)` is row i's raw value (encoded bytes or a path), decoded later behind the size guard."""

    def __init__(self, path: str | Path | Sequence[str | Path], column: str = "image",
                 split: str | None = None) -> None:
        self.column = column
        if isinstance(path, str | Path):
            self.path, self.disk = Path(path), is_disk(Path(path))
            files = [] if self.disk else parquet_files(self.path, split)
        else:
            files, self.disk = [Path(p) for p in path], False
            self.path = files[0].parent
        self.rows = load_from_disk(self.path, column, split) if self.disk else ParquetRows(files, column)

    @classmethod
    def from_spec(cls, found: DataSpec, column: str = "image", split: str | None = None) -> TableRows:
        """The table a resolved "table" spec names: a folder is read whole (its splits sorted out), files as listed."""
        return cls(found.paths[0] if found.paths[0].is_dir() else list(found.paths), column, split)

    def __len__(self) -> int:
        return len(self.rows)

    def cell(self, i: int) -> Any:
        """Row i's image value."""
        return self.rows[i][self.column] if self.disk else self.rows[i]

    def signature(self) -> str:
        """A digest of what numbers the rows (the files and their row counts; a `datasets` folder's fingerprint):
        row ids are positions across the files, so another file list makes the same id another image."""
        if self.disk:
            parts: list[Any] = [len(self.rows), getattr(self.rows, "_fingerprint", None)]
        else:
            parts = [[f.name, n] for f, n in zip(self.rows.files, self.rows.file_rows, strict=True)]
        return hashlib.sha256(json.dumps(parts).encode()).hexdigest()


# Far beyond any real dataset's shard count; more is a typo ({0..999999999}) that would fill memory with names.
MAX_SHARD_NAMES = 1_000_000


def _brace_count(s: str) -> int:
    """How many names the braces of `s` expand to, counted without expanding them."""
    n = 1
    for m in re.finditer(r"\{([^{}]*)\}", s):
        r = re.fullmatch(r"(\d+)\.\.(\d+)", m.group(1))
        n *= max(0, int(r.group(2)) - int(r.group(1)) + 1) if r else len(m.group(1).split(","))
    return n


def _expand_braces(s: str) -> list[str]:
    """WebDataset brace notation: shard-{000..099}.tar (zero-padded ranges) and {a,b} alternatives."""
    n = _brace_count(s)
    if n > MAX_SHARD_NAMES:
        raise KlvaeError(f"{s[:200]} names {n:,} shards; at most {MAX_SHARD_NAMES:,} are taken (a typo in a range?)")
    m = re.search(r"\{([^{}]*)\}", s)
    if m is None:
        return [s]
    r = re.fullmatch(r"(\d+)\.\.(\d+)", m.group(1))
    opts = ([str(i).zfill(len(r.group(1))) for i in range(int(r.group(1)), int(r.group(2)) + 1)]
            if r else m.group(1).split(","))
    return [x for o in opts for x in _expand_braces(s[: m.start()] + o + s[m.end() :])]


def _shards_in(folder: Path) -> list[Path]:
    """A folder's tar shards; hidden files are left out, as everywhere (macOS's ._NAME.tar copies beside them)."""
    return sorted(q for q in folder.iterdir() if is_tar_name(q.name) and not q.name.startswith("."))


def expand_shards(spec: str | Path | Sequence[str | Path]) -> list[Path]:
    """Shard files from paths, folders (their tars), globs and brace ranges, in the order given."""
    specs = [spec] if isinstance(spec, str | Path) else list(spec)
    out: list[Path] = []
    for sp in specs:
        # A path that exists is taken as it is named: brackets and braces in a folder's or shard's name are no
        # pattern ("shards [v2]", "part[0].tar").
        names = [str(sp)] if Path(sp).exists() else _expand_braces(str(sp))
        if not names:  # a range that runs backwards, {10..1}, names nothing
            raise KlvaeError(f"no shards at {sp}: its brace range names none")
        for s in names:
            p = Path(s)
            if p.is_dir():
                hits = _shards_in(p)
            elif p.exists() or not any(c in s for c in "*?["):
                hits = [p] if p.is_file() else []
            else:
                hits = [Path(h) for h in sorted(glob.glob(s))]
            if not hits:
                raise KlvaeError(f"no shards at {s}")
            out.extend(hits)
    return list(dict.fromkeys(out))
