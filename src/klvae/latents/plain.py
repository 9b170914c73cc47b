"""Plain tensor files of latents, as diffusers users keep them: one [B, C, h, w] tensor written by
safetensors' `save_file`, `torch.save` or `numpy.save`, with no record of how it was scaled.

A diffusers pipeline run with `output_type="latent"` returns the diffusion model's latents (the VAE's scaled by
scaling_factor and shift_factor); `vae.encode(x).latent_dist` gives the VAE's own. The file cannot tell which it
holds, so the reader takes a tensor only; whoever decodes it says how it was scaled.
"""

from __future__ import annotations

import math
import zipfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file
from torch import Tensor

from klvae.errors import LatentsError, cut, load_failure, quote
from klvae.latents.file import FORMAT, check_filled_float

_NUMPY_MAGIC = b"\x93NUMPY"


def plain_kind(path: str | Path) -> str | None:
    """'safetensors', 'torch' or 'numpy' when `path` is a plain tensor file in that format; None for anything else
    (klvae's own latents files, images, missing files), which the latents file reader then names."""
    p = Path(path)
    if not p.is_file():
        return None
    try:
        with p.open("rb") as f:
            head = f.read(len(_NUMPY_MAGIC))
        if head == _NUMPY_MAGIC:
            return "numpy"
        if zipfile.is_zipfile(p):  # torch.save's container (and numpy.savez's)
            return "numpy" if _is_npz(p) else "torch"
        with safe_open(str(p), framework="pt") as st:
            fmt = (st.metadata() or {}).get("format", "")
    except (SafetensorError, OSError, ValueError):
        return None
    # safetensors' save_file writes no format, diffusers' and transformers' "pt"; klvae's own say "klvae.*".
    return None if fmt == FORMAT or fmt.startswith("klvae") else "safetensors"


def _is_npz(path: Path) -> bool:
    # An empty zip too: numpy.savez() of nothing writes one, and it is then refused as holding no tensor.
    with zipfile.ZipFile(path) as z:
        return all(n.endswith(".npy") for n in z.namelist())


# A zip member may inflate to this much whatever it was packed from; past it, at most _MAX_INFLATION times its
# packed size. Latents (floats) barely compress: more is a compression bomb, refused before it is inflated.
_FREE_INFLATION = 256 * 2**20
_MAX_INFLATION = 64


def _check_declared_sizes(path: Path) -> None:
    """LatentsError for a zip member that would inflate absurdly, or an .npy array whose header declares more
    bytes than the file (or member) holds: numpy and torch allocate what they declare before reading it."""
    if not zipfile.is_zipfile(path):
        with path.open("rb") as f:
            if f.read(len(_NUMPY_MAGIC)) == _NUMPY_MAGIC:
                f.seek(0)
                _check_npy_header(f, path.stat().st_size, str(path))
        return
    with zipfile.ZipFile(path) as z:
        for info in z.infolist():
            if info.file_size > max(_FREE_INFLATION, _MAX_INFLATION * info.compress_size):
                raise LatentsError(f"{path}: {quote(info.filename)} would inflate {info.compress_size:,} bytes to "
                                   f"{info.file_size:,}: a compression bomb, not latents")
            if info.filename.endswith(".npy"):
                with z.open(info) as f:
                    _check_npy_header(f, info.file_size, f"{path}: {quote(info.filename)}")


def _check_npy_header(f: Any, size: int, label: str) -> None:
    try:
        version = np.lib.format.read_magic(f)
        shape, _, dtype = (np.lib.format.read_array_header_1_0(f) if version == (1, 0)
                           else np.lib.format.read_array_header_2_0(f))
    except (ValueError, OSError):
        return  # np.load names what is wrong with it
    declared = math.prod(shape) * dtype.itemsize
    if declared > size:
        raise LatentsError(f"{label}: an array of shape {list(shape)} ({declared:,} bytes) in {size:,} bytes: the "
                           "file is damaged or crafted, not latents")


def _tensors(path: Path, kind: str) -> dict[str, Any]:
    """Every tensor (or array) the file holds, by name; reading failures as one-line LatentsErrors."""
    if kind != "safetensors":  # safetensors checks its own offsets against the file
        _check_declared_sizes(path)
    try:
        if kind == "safetensors":
            return dict(load_file(str(path), device="cpu"))
        if kind == "numpy":
            loaded = np.load(path, allow_pickle=False)  # no pickled objects: arrays only
            if isinstance(loaded, np.ndarray):
                return {"array": loaded}
            with loaded:  # an .npz archive, open until closed
                return {k: loaded[k] for k in loaded.files}
        # A handle: torch.load would judge a path by its suffix, not its content. Sparse tensors' indices are
        # checked as they load: out of their shape, densifying them would write outside the dense tensor.
        with path.open("rb") as f, torch.sparse.check_sparse_tensor_invariants():
            obj = torch.load(f, map_location="cpu", weights_only=True)
    except Exception as e:  # unpickling, zip and numpy errors have many types; all mean "not a tensor file"
        raise LatentsError(f"{path} cannot be read as a {kind} file: {load_failure(e)}") from None
    if isinstance(obj, Tensor):
        return {"tensor": obj}
    if isinstance(obj, Mapping):
        return dict(obj)
    raise LatentsError(f"{path} holds an object of type {type(obj).__name__}, not a tensor of latents")


def load_plain_latents(path: str | Path) -> Tensor:
    """The one latents tensor of a plain file, [B, C, h, w] or [C, h, w] (see plain_batch), in its dtype; anything
    else is a one-line LatentsError."""
    p = Path(path)
    kind = plain_kind(p)
    if kind is None:
        raise LatentsError(f"{p} is not a safetensors, torch or numpy file of latents")
    held = _tensors(p, kind)
    if len(held) != 1:
        names = ", ".join(sorted(map(str, held))[:5]) + (", ..." if len(held) > 5 else "")
        why = f"{len(held)} tensors ({cut(names, 80)})" if held else "no tensor"
        hint = ": model weights? those go to --model" if len(held) > 1 else ""
        raise LatentsError(f"{p} holds {why}; a plain latents file holds one [B, C, h, w] tensor{hint}")
    ((name, t),) = held.items()
    if isinstance(t, np.ndarray):
        t = _from_numpy(t, p)
    if not isinstance(t, Tensor):
        raise LatentsError(f"{p}: {quote(name)} is an object of type {type(t).__name__}, not a tensor of latents")
    return _checked(t, p)


def _from_numpy(a: np.ndarray, path: Path) -> Tensor:
    # Compared in native byte order: a big-endian float32 (">f4", numpy.save on such a machine) is still float32.
    native = a.dtype.newbyteorder("=")
    if native not in (np.float16, np.float32, np.float64):
        raise LatentsError(f"{path}: latents of dtype {a.dtype}; expected float16, float32 or float64")
    return torch.from_numpy(np.ascontiguousarray(a, dtype=native))


def _checked(t: Tensor, path: Path) -> Tensor:
    if t.is_meta:  # torch.save of a meta tensor stores a shape and no values
        raise LatentsError(f"{path}: a tensor with no values (device meta), not latents")
    if t.is_nested:
        raise LatentsError(f"{path}: a nested tensor (tensors of several sizes), not one [B, C, h, w] tensor of "
                           "latents")
    _check_stored_values(t, path)
    if t.layout != torch.strided:  # sparse latents are rare but valid: their values, densely
        t = t.to_dense()
    if t.ndim not in (3, 4):
        raise LatentsError(f"{path}: latents of shape {list(t.shape)}; expected [batch, channels, height, width] or "
                           "[channels, height, width]")
    check_filled_float(t, str(path))
    return t


def _check_stored_values(t: Tensor, path: Path) -> None:
    """LatentsError for a tensor whose values are mostly not stored (stride-0 expansion, overlapping strides, a
    nearly empty sparse tensor): a file of kilobytes would become gigabytes of dense latents."""
    values = t.numel()
    if t.layout == torch.strided:
        stored = t.untyped_storage().nbytes() // max(t.element_size(), 1)
    elif t.layout == torch.sparse_coo:
        stored = t._nnz()
    else:  # CSR and the others: their values tensor
        stored = t.values().numel()
    dense = values * t.element_size()
    if values > stored and dense > max(_FREE_INFLATION, _MAX_INFLATION * stored * t.element_size()):
        raise LatentsError(f"{path}: a tensor of shape {list(t.shape)} ({dense:,} bytes dense) from {stored:,} "
                           "stored values (expanded, overlapping or sparse): save the latents dense "
                           "(z.contiguous())")


def plain_batch(t: Tensor, channels: int, path: str | Path) -> Tensor:
    """A plain file's tensor as [B, C, h, w] for a model whose latents have `channels`: a [C, h, w] one gains its
    batch; a 3-D one with other channels is most likely a pipeline's packed token sequence, and refused so."""
    if t.ndim == 4:
        return t
    if t.shape[0] != channels:
        raise LatentsError(f"{path}: latents of shape {list(t.shape)} are not [channels, height, width] with this "
                           f"model's {channels} channels; a pipeline's packed [batch, tokens, features] sequence? "
                           "unpack it to [batch, channels, height, width] first")
    return t[None]
