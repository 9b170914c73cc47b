"""What every fixed pretrained network here shares: freezing, strict loading, and finding its checkpoint.

Checkpoints are read with `torch.load(weights_only=True)`, so no arbitrary object is ever unpickled, and
loaded with a key-and-shape check that fails in one line instead of printing and going on. A checkpoint found
automatically (torch hub cache, download) must also have its pinned SHA-256; a file the user names need not.
"""

from __future__ import annotations

import logging
import os
import re
import uuid
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from klvae.checksum import file_sha256
from klvae.errors import KlvaeError, WeightsError, first_line, load_failure, quote

log = logging.getLogger(__name__)


class FrozenNet(nn.Module):
    """A fixed pretrained network (a metric or a loss term): no gradients, and always in eval mode, so that
    dropout stays off and BatchNorm keeps the checkpoint's statistics whatever its parent's mode."""

    def freeze(self) -> None:
        """Call at the end of __init__, once the weights are in."""
        self.requires_grad_(False)
        self.eval()

    def train(self, mode: bool = True) -> FrozenNet:
        """Ignores `mode`."""
        return super().train(False)


def odd_tensor(t: Tensor) -> str | None:
    """What makes `t` no stored weight (meta: a shape without values; sparse or nested), or None for a dense one."""
    # torch.load(weights_only=True) rebuilds all three: meta ones read as uninitialised memory, no convolution
    # takes sparse ones, and nested ones have no size to check.
    if t.is_meta:
        return "a meta tensor (a shape without values)"
    if t.is_nested or t.layout != torch.strided:
        return f"a {'nested' if t.is_nested else str(t.layout).removeprefix('torch.')} tensor"
    return None


def load_strict(module: nn.Module, state_dict: Mapping[str, Any], what: str) -> None:
    """load_state_dict with a one-line WeightsError naming missing, unexpected, mis-shaped and odd tensors."""
    odd = next(((k, why) for k, v in state_dict.items() if isinstance(v, Tensor) and (why := odd_tensor(v))), None)
    if odd:
        raise WeightsError(f"{what} do not fit: {_shown_key(odd[0])} is {odd[1]}, not a stored weight")
    expected = module.state_dict()
    missing = sorted(expected.keys() - state_dict.keys())
    unexpected = sorted(map(_shown_key, state_dict.keys() - expected.keys()))
    bad = sorted(
        f"{k} {tuple(getattr(state_dict[k], 'shape', ()))} != {tuple(expected[k].shape)}"
        for k in expected.keys() & state_dict.keys()
        if not isinstance(state_dict[k], Tensor) or state_dict[k].shape != expected[k].shape
    )
    if missing or unexpected or bad:
        parts = [f"{name}: {', '.join(keys[:4])}{' ...' if len(keys) > 4 else ''}"
                 for name, keys in (("missing", missing), ("unexpected", unexpected), ("wrong shape", bad)) if keys]
        raise WeightsError(f"{what} do not fit: " + "; ".join(parts))
    module.load_state_dict(dict(state_dict), strict=True)


def _shown_key(key: object) -> str:
    # A user's file may hold any key: a number (which join() refuses), a newline (which breaks the one line),
    # or a megabyte of text; those are shown quoted and cut.
    return key if isinstance(key, str) and key.isprintable() and len(key) <= 80 else quote(key)


def read_weights(path: str | Path, what: str) -> dict[str, Any]:
    """torch.load(weights_only=True) on CPU, with failures as one-line WeightsErrors."""
    p = Path(path).expanduser()
    if not p.is_file():
        raise WeightsError(f"{what} file not found: {p}")
    try:
        return torch_state_dict(p)
    except ValueError as e:
        raise WeightsError(f"{what} file {p} {e}") from None


def torch_state_dict(path: Path) -> dict[str, Any]:
    """The state dict in the PyTorch file `path` (torch.load, weights_only, on CPU); else a ValueError whose one
    line ends a sentence about the file: "is empty", "cannot be read: ...", "is not a PyTorch weights file (...)"
    or "holds a list, not a state dict"."""
    if path.stat().st_size == 0:
        raise ValueError("is empty")
    try:
        with torch.sparse.check_sparse_tensor_invariants():  # sparse indices out of their shape: refused
            sd = torch.load(path, map_location="cpu", weights_only=True)
    except OSError as e:  # the disk's failure (permissions, I/O), not the file's content
        raise ValueError(f"cannot be read: {load_failure(e)}") from None
    except Exception as e:  # unpickling and zip errors have many types; all mean "not a weights file"
        raise ValueError(f"is not a PyTorch weights file ({load_failure(e)})") from None
    if not isinstance(sd, Mapping):
        raise ValueError(f"holds a {type(sd).__name__}, not a state dict")
    return dict(sd)


def hub_checkpoint(file_name: str) -> Path:
    """Where torch.hub caches `file_name` (TORCH_HOME/hub/checkpoints unless torch.hub.set_dir moved it)."""
    return Path(torch.hub.get_dir()) / "checkpoints" / file_name


def hash_prefix(file_name: str) -> str:
    """The hex digits after the last "-" of a torchvision-style file name: the start of the file's SHA-256."""
    m = re.search(r"-([a-f0-9]+)\.[^-]*$", file_name)
    if m is None:
        raise ValueError(f"{file_name} carries no SHA-256 prefix")
    return m[1]


def check_sha256(path: Path, sha256: str, label: str, fix: str) -> None:
    """One-line WeightsError, naming `label` and saying `fix`, unless the file's SHA-256 begins with `sha256`
    (a full hash, or torch.hub's prefix)."""
    try:
        found = file_sha256(path)
    except OSError as e:  # unreadable (permissions, I/O error): as read_weights would say, in one line
        raise WeightsError(f"{label} cannot be read: {type(e).__name__}: {first_line(e)}") from None
    if not found.startswith(sha256):
        n = min(len(sha256), 16)
        raise WeightsError(f"{label} is damaged or not the pinned file: its SHA-256 begins {found[:n]}, "
                           f"expected {sha256[:n]}; {fix}")


def download(url: str, file_name: str, sha256: str) -> dict[str, Any]:
    """Download into the torch hub cache, check its SHA-256, then read it (weights_only); tests replace this to
    keep off the network.

    torch.hub's own loader prints a line to stderr that no log level hides; its file download does not. The
    file goes to a hidden temporary name beside the target and is renamed only once its hash is right, so a
    failed, cut or wrong download leaves nothing in the cache. No fsync: a cache file that a crash leaves
    damaged fails the hash check on its next use.
    """
    dst = hub_checkpoint(file_name)
    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = dst.with_name(f".{dst.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp")
    try:
        torch.hub.download_url_to_file(url, str(tmp), progress=False)
        check_sha256(tmp, sha256, f"the download from {url}", "nothing was kept")
        os.replace(tmp, dst)
    finally:
        tmp.unlink(missing_ok=True)
    return read_weights(dst, file_name)


def fetch(url: str, file_names: tuple[str, ...], what: str, hint: str, sha256: str) -> dict[str, Any]:
    """A checkpoint from the torch hub cache under any of `file_names`, else downloaded there as the first; either
    way its SHA-256 must begin with `sha256`.

    Failure is one KlvaeError that says what to pass instead (`hint`) and where a copied file would be found.
    """
    for name in file_names:
        cached = hub_checkpoint(name)
        if cached.is_file():
            # Hashed on every use, not once with a stamp beside it: 528 MB (VGG16) hash in 0.35-0.7 s on one
            # core, about what torch.load of it takes, and a stamp keyed by size and mtime would miss damage in
            # place, go stale, and need a writable cache.
            check_sha256(cached, sha256, f"{what} file {cached}", f"delete it to download it again, or {hint}")
            return read_weights(cached, what)
    log.info("downloading the %s weights from %s", what, url)
    try:
        return download(url, file_names[0], sha256)
    except Exception as e:  # URLError, HTTPError, OSError, hash mismatch: all mean "not available here"
        why = first_line(e) if isinstance(e, WeightsError) else f"{type(e).__name__}: {first_line(e)}"
        raise KlvaeError(f"{what} weights unavailable ({why}); {hint} or save {url} as {hub_checkpoint(file_names[0])}"
                         ) from None
