"""Atomic file writes: the data goes to a temporary name beside the target, then one rename puts it in place.

Every file klvae writes (weights, latents, cache shards and index, checkpoints, images, reports) goes through
here, so a reader or a resumed job never sees half a file, and a kill leaves at most a hidden `.NAME.*.tmp`.
"""

from __future__ import annotations

import contextlib
import errno
import os
import re
import signal
import threading
import uuid
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

from safetensors import SafetensorError
from safetensors.torch import save_file
from torch import Tensor

from klvae.errors import KlvaeError, raised_within

_SMUGGLED_BYTE = re.compile("[\udc80-\udcff]")


def temp_path(path: Path) -> Path:
    """The hidden temporary name beside `path` that a write goes to before its rename (unique per process and call)."""
    return path.with_name(f".{path.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp")


def atomic_write(path: str | Path, write: Callable[[Path], object], replace: bool = True) -> Path:
    """Run write(tmp) on a temporary name beside `path`, flush it to disk, then rename it onto `path` and flush the
    folder (so the rename survives a power cut); a failed write (OSError, or safetensors' own error) is an OSError
    that names `path`. With replace=False a file at `path` is kept: KlvaeError (see atomic_write_all)."""
    atomic_write_all([(path, write)], replace)
    return Path(path)


def atomic_write_all(files: Sequence[tuple[str | Path, Callable[[Path], object]]], replace: bool = True) -> None:
    """Several files that belong together (weights and their config.json): every one is written and flushed
    under its temporary name before the first rename, so a failure in any leaves all the old files in place
    (and removes the folders it made for them, when still empty). With replace=False none replaces a file (one
    that another process wrote since the caller looked): KlvaeError, and none of the set lands."""
    for path, _ in files:
        if Path(path).is_dir():  # else the rename's own error names the temporary file, not this one
            raise IsADirectoryError(errno.EISDIR, "a folder is there, not a file", str(path))
    done: list[tuple[Path, Path]] = []
    made: list[Path] = []
    try:
        for path, write in files:
            path = Path(path)
            made += make_folders(path.parent)
            tmp = temp_path(path)
            done.append((tmp, path))
            _write_flushed(path, tmp, write)
        # The set lands whole or not at all: a Ctrl-C between two renames would leave some files new and some old.
        with signals_held():
            if replace:
                for tmp, path in done:
                    os.replace(tmp, path)
            else:
                _place_new(done)
    except BaseException:
        for tmp, _ in done:
            tmp.unlink(missing_ok=True)
        remove_made_folders(made)
        raise
    for folder in dict.fromkeys(path.parent for _, path in done):
        _fsync_folder(folder)


def _place_new(done: list[tuple[Path, Path]]) -> None:
    """Give each temporary its name where no file has it (a hard link fails on one that is there), all or none."""
    placed: list[Path] = []

    def kept(path: Path) -> KlvaeError:
        return KlvaeError(f"{path} appeared while this run worked (another run's?): it is kept; --overwrite "
                          "replaces it")

    try:
        for tmp, path in done:
            try:
                os.link(tmp, path)
            except FileExistsError:
                raise kept(path) from None
            except OSError:  # a file system without hard links: a last look, then the rename
                if path.exists():
                    raise kept(path) from None
                os.replace(tmp, path)
            placed.append(path)
            tmp.unlink(missing_ok=True)
    except BaseException:
        for path in placed:
            path.unlink(missing_ok=True)
        raise


def _fsync_folder(folder: Path) -> None:
    # A rename lives in the folder's entry, not the file: until the folder reaches the disk, a power cut can bring
    # back the old file (or none) even though the new data was flushed. Best effort: some filesystems (and Windows)
    # cannot open or sync a folder, and the file is in place either way.
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _write_flushed(path: Path, tmp: Path, write: Callable[[Path], object]) -> None:
    try:
        write(tmp)
        # The mode a plain open() would give: some writers (safetensors, mkstemp) create 0600 files, and a
        # rename keeps the mode, so a cache or checkpoint shared by a team would be unreadable to the rest.
        os.chmod(tmp, 0o666 & ~_umask())
        # The rename must not reach the disk before the data does, or a crash could leave an empty file.
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
    except (OSError, SafetensorError, RuntimeError) as e:
        # A full disk or a read-only folder: an OSError from write() names the temporary file or nothing,
        # safetensors raises its own type, and torch.save's zip writer buries the OSError under a RuntimeError
        # ("unexpected pos"), all of which callers would take for a bug. Each becomes one named OSError.
        cause = raised_within(e, OSError) if isinstance(e, RuntimeError) else e
        if cause is None:
            raise
        reason = " ".join(str(cause).split()) or type(cause).__name__
        raise OSError(f"cannot write {path}: {reason}") from None


def append_text(path: Path, text: str, sync: bool = False) -> None:
    """Append `text` to a log-like file (a manifest, metrics.jsonl); a full disk is an OSError that names `path`,
    not errno's bare words."""
    try:
        with path.open("a") as f:
            f.write(text)
            if sync:
                f.flush()
                os.fsync(f.fileno())
    except OSError as e:
        raise OSError(f"cannot write {path}: {e.strerror or e}") from None


def remove_made_folders(made: list[Path]) -> None:
    """Remove the folders make_folders made, innermost first, while they are empty: one that something else has
    filled meanwhile stays, and so do those around it."""
    for folder in reversed(made):
        try:
            folder.rmdir()
        except FileNotFoundError:  # removed already (a failed cache clears its own folder)
            continue
        except OSError:
            break


def make_folders(folder: Path) -> list[Path]:
    """Create `folder` and its missing parents; returns those created, outermost first."""
    missing: list[Path] = []
    p = folder
    while not p.exists() and p.parent != p:
        if p.name not in ("", ".", ".."):  # new/.. is no folder made: `new` is (and its removal would fail)
            missing.append(p)
        p = p.parent
    folder.mkdir(parents=True, exist_ok=True)
    return missing[::-1]


def shown_bytes(text: str) -> str:
    """`text` with the bytes a file name that is not valid UTF-8 smuggles in (lone surrogates U+DC80..U+DCFF, as
    Python decodes them) written as the text \\xNN, as Python shows them: valid Unicode for any reader."""
    return _SMUGGLED_BYTE.sub(lambda m: f"\\x{ord(m.group()) - 0xDC00:02x}", text)


def text_writer(text: str) -> Callable[[Path], None]:
    """A writer for atomic_write/atomic_write_all that writes `text` as UTF-8, newlines as given."""
    # A report quoting a file name that is not valid UTF-8 must not fail at its very end for that: its bytes are
    # written as \xNN (shown_bytes), and any other lone surrogate as \uNNNN.
    data = shown_bytes(text).encode("utf-8", errors="backslashreplace")

    def write(tmp: Path) -> None:
        with open(tmp, "wb") as f:
            f.write(data)

    return write


def atomic_write_text(path: str | Path, text: str) -> Path:
    """Write `text` as UTF-8 (newlines as given) atomically."""
    return atomic_write(path, text_writer(text))


def atomic_save_file(path: str | Path, tensors: dict[str, Tensor], metadata: dict[str, str] | None = None,
                     replace: bool = True) -> Path:
    """safetensors' save_file, atomically; a failed write (full disk, read-only folder) is an OSError naming path."""
    return atomic_write(path, lambda tmp: save_file(tensors, str(tmp), metadata=metadata), replace)


def _umask() -> int:
    # Linux reports the umask without changing it; os.umask can only read it by setting it, which races with
    # other threads creating files.
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except OSError:
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def held_by_another(folder: Path, job: str) -> KlvaeError:
    """The error of a `job` refused because another holds `folder`'s lock (folder_lock)."""
    return KlvaeError(f"another `{job}` is writing into {folder}: wait for it to end, or name another folder")


@contextlib.contextmanager
def folder_lock(folder: Path, job: str) -> Iterator[None]:
    """Hold an exclusive lock on `folder` (which must exist) while the block runs; KlvaeError when another process
    (another `job`) holds it. Where the file system has no such locks (or no fcntl), the block runs unlocked."""
    try:
        import fcntl
    except ImportError:  # Windows
        yield
        return
    fd = os.open(folder, os.O_RDONLY)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise held_by_another(folder, job) from None
        except OSError:  # a file system without flock (some network ones): as before there were locks
            pass
        yield
    finally:
        os.close(fd)  # which releases the lock


_HELD = (signal.SIGINT, signal.SIGTERM)


@contextlib.contextmanager
def signals_held() -> Iterator[None]:
    """Hold SIGINT and SIGTERM until the block ends, then deliver the first one caught to the usual handler."""
    # A Ctrl-C raised inside torch.save is buried under the RuntimeError its zip writer raises on the way out
    # ("unexpected pos"), so the CLI reported an internal error; held, the write completes and the interrupt
    # follows. Handlers can only be set in the main thread, and one not set from Python (None) cannot be restored.
    # Nested, the outer block holds for both: an inner one would hand its signals to the outer's hold anyway.
    handlers = [signal.getsignal(s) for s in _HELD] if threading.current_thread() is threading.main_thread() else [None]
    if None in handlers or any(getattr(h, "klvae_hold", False) for h in handlers):
        yield
        return
    caught: list[int] = []
    previous: dict[int, Any] = {}

    def hold(signum: int, frame: object) -> None:
        # A second Ctrl-C is the user insisting (a save stuck on a network disk): it stops the write. SIGTERM
        # stays held: a scheduler or torchrun follows it with SIGKILL after a grace period anyway.
        if signum == signal.SIGINT and signal.SIGINT in caught:
            caught.clear()  # delivered now, not again when the block ends
            _restore(previous)
            signal.raise_signal(signum)
            return
        caught.append(signum)

    hold.klvae_hold = True  # type: ignore[attr-defined]
    previous.update({s: signal.signal(s, hold) for s in _HELD})
    try:
        yield
    finally:
        _restore(previous)
        if caught:
            signal.raise_signal(caught[0])  # runs the restored handler here: KeyboardInterrupt, or the default


def _restore(previous: dict[int, Any]) -> None:
    """Put back the handlers that signals_held replaced."""
    for s, handler in previous.items():
        signal.signal(s, handler)


def inside(path: Path, folder: Path) -> bool:
    """Whether `path` is `folder` or lies below it, by its path as given or by where its links lead."""
    places = {Path(os.path.abspath(path))}
    with contextlib.suppress(OSError, RuntimeError):  # a symlink loop: no folder lies behind it
        places.add(path.resolve())
    return any(a.exists() and os.path.samefile(a, folder) for p in places for a in (p, *p.parents))


def check_not_in_data(out: str | Path, flag: str, data: str, data_flag: str = "--data") -> None:
    """KlvaeError when the output folder `out` is the data folder (`data_flag`) or lies inside it: what a command
    writes there would become part of the data (a rerun of eval would score its own report's PNGs)."""
    folder, out = Path(data), Path(out)
    if not folder.is_dir() or not inside(out, folder):
        return  # a glob, a parquet or tar file: only the files it names are read
    where = "is" if out.exists() and os.path.samefile(out, folder) else "is inside"
    raise KlvaeError(f"{flag} {out} {where} the input folder ({data_flag} {data}); name a folder outside it")
