"""SHA-256 of files: cache shards (klvae.latents) and pinned metric weights (klvae.nets) are checked with it."""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from pathlib import Path

_CHUNK = 4 << 20  # bytes per read while hashing


def file_sha256(path: Path, progress: Callable[[int], object] | None = None) -> str:
    """The SHA-256 (hex) of a file, read in chunks; `progress` is told each chunk's length."""
    h = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(_CHUNK):
            h.update(chunk)  # hashlib lets go of the GIL for large updates
            if progress:
                progress(len(chunk))
    return h.hexdigest()
