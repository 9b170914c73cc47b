"""What every fixed pretrained network here shares: freezing, strict loading, and finding its checkpoint.

Checkpoints are read with `torch.load(weights_only=True)`, so no arbitrary object is ever unpickled, and
loaded with a key-and-shape check that fails in one line instead of printing and going on.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from klvae.errors import KlvaeError, WeightsError, first_line

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


def load_strict(module: nn.Module, state_dict: Mapping[str, Any], what: str) -> None:
    """load_state_dict with a one-line WeightsError naming missing, unexpected and mis-shaped keys."""
    expected = module.state_dict()
    missing = sorted(expected.keys() - state_dict.keys())
    unexpected = sorted(state_dict.keys() - expected.keys())
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


def read_weights(path: str | Path, what: str) -> dict[str, Any]:
    """torch.load(weights_only=True) on CPU, with failures as one-line WeightsErrors."""
    p = Path(path).expanduser()
    if not p.is_file():
        raise WeightsError(f"{what} file not found: {p}")
    try:
        sd = torch.load(p, map_location="cpu", weights_only=True)
    except Exception as e:  # unpickling and zip errors have many types; all mean "not a weights file"
        raise WeightsError(f"{what} file {p} cannot be read: {type(e).__name__}: {e}") from None
    if not isinstance(sd, Mapping):
        raise WeightsError(f"{what} file {p} holds a {type(sd).__name__}, not a state dict")
    return dict(sd)


def hub_checkpoint(file_name: str) -> Path:
    """Where torch.hub caches `file_name` (TORCH_HOME/hub/checkpoints unless torch.hub.set_dir moved it)."""
    return Path(torch.hub.get_dir()) / "checkpoints" / file_name


def download(url: str, file_name: str, check_hash: bool) -> dict[str, Any]:
    """Download into the torch hub cache, then read it (weights_only); tests replace this to keep off the network.

    torch.hub's own loader prints a line to stderr that no log level hides; its file download does not. It
    writes a temporary file and renames it, so a failed download leaves nothing in the cache.
    """
    dst = hub_checkpoint(file_name)
    dst.parent.mkdir(parents=True, exist_ok=True)
    # As torch.hub checks: the hex digits after the last "-" of the file name begin the file's SHA-256.
    m = re.search(r"-([a-f0-9]+)\.", file_name) if check_hash else None
    torch.hub.download_url_to_file(url, str(dst), hash_prefix=m[1] if m else None, progress=False)
    return read_weights(dst, file_name)


def fetch(url: str, file_names: tuple[str, ...], what: str, hint: str, check_hash: bool) -> dict[str, Any]:
    """A checkpoint from the torch hub cache under any of `file_names`, else downloaded there as the first.

    Failure is one KlvaeError that says what to pass instead (`hint`) and where a copied file would be found.
    """
    for name in file_names:
        cached = hub_checkpoint(name)
        if cached.is_file():
            return read_weights(cached, what)
    log.info("downloading the %s weights from %s", what, url)
    try:
        return download(url, file_names[0], check_hash)
    except Exception as e:  # URLError, HTTPError, OSError, hash mismatch: all mean "not available here"
        why = f"{type(e).__name__}: {first_line(e)}"
        if isinstance(e, RuntimeError) and "invalid hash value" in str(e):  # torch.hub's check_hash, nothing kept
            why = f"the download is corrupt or not the pinned file, its SHA-256 does not match: {first_line(e)}"
        raise KlvaeError(f"{what} weights unavailable ({why}); {hint} or save {url} as {hub_checkpoint(file_names[0])}"
                         ) from None
