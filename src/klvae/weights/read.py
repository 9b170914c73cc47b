"""Reading one weights file: safetensors (by content, whatever its name: `.sft` too) or a PyTorch pickle (`.ckpt`,
`.pt`, `.pth`, `.bin`) unpickled with weights_only, and the VAE's tensors out of a full checkpoint."""

from __future__ import annotations

import contextlib
import json
import logging
import pickle
import struct
import warnings
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from klvae.errors import WeightsError, first_line
from klvae.nets.pretrained import odd_tensor
from klvae.weights.convert import VAE_PREFIXES, StateDict
from klvae.weights.identify import may_be_vae_key

log = logging.getLogger(__name__)

SAFETENSORS_SUFFIXES = (".safetensors", ".sft")  # .sft: BFL's first name for FLUX.1's ae, which ComfyUI reads
PICKLE_SUFFIXES = (".ckpt", ".pt", ".pth", ".bin")
WEIGHTS_SUFFIXES = (*SAFETENSORS_SUFFIXES, *PICKLE_SUFFIXES)
SHARD_INDEX_SUFFIXES = (".safetensors.index.json", ".bin.index.json")
# The .safetensors header key under which klvae stores the model's config (JSON of AutoencoderKLConfig.to_dict):
# a lone LDM-layout file then reloads as the same model, where shapes alone cannot tell e.g. norm_num_groups.
CONFIG_METADATA = "klvae_config"
# Top-level tensors of a full checkpoint that say something about its VAE's latents: Playground v2.5's (diffusers'
# single-file loader reads them as the VAE's latents_mean/latents_std).
EXTRA_KEYS = ("edm_mean", "edm_std")


@dataclass
class RawWeights:
    """What a weights file holds: the VAE's tensors as stored (prefix and all), every key name, the safetensors
    header's metadata and the EXTRA_KEYS found beside the VAE."""

    tensors: StateDict
    keys: list[str]
    metadata: dict[str, str] = field(default_factory=dict)
    extras: StateDict = field(default_factory=dict)


def sniff_format(path: Path) -> str | None:
    """'safetensors' or 'torch' by the file's first bytes, None when it is neither (or too short to tell)."""
    with open(path, "rb") as f:
        head = f.read(9)
    # safetensors: a little-endian u64 header length, then its JSON. First, as that length may begin with the
    # bytes of a torch file's signature (a header of 384 bytes starts 0x80).
    if len(head) == 9 and head[8:9] == b"{" and 0 < struct.unpack("<Q", head[:8])[0] <= path.stat().st_size - 8:
        return "safetensors"
    if head.startswith((b"PK", b"\x80")):  # torch.save's zip archive, or a pre-1.6 pickle
        return "torch"
    return None


def _safetensors_problem(path: Path, e: Exception) -> str:
    text = first_line(e)
    if "incomplete" in text.lower():
        return f"{text} (truncated: an incomplete download or copy?)"
    if path.stat().st_size == 0:
        return "it is empty (0 bytes)"
    if "header" in text.lower():  # "header too large/too small", "invalid header": the first bytes are no header
        return f"it is not a safetensors file ({text})"
    return text


def header_keys(path: Path) -> list[str] | None:
    """The tensor names of a safetensors file, from its header alone; None for another file or an unreadable one
    (read_weights then says why)."""
    from safetensors import safe_open

    try:
        if not path.is_file() or sniff_format(path) != "safetensors":
            return None
        with safe_open(str(path), framework="pt", device="cpu") as f:
            return list(f.keys())
    except Exception:  # safetensors raises its own SafetensorError besides OSError
        return None


def _read_safetensors(path: Path) -> RawWeights:
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            keys = list(f.keys())
            # A full SD checkpoint is gigabytes: read only the VAE's tensors when they sit under a prefix.
            prefix = next((p for p in VAE_PREFIXES if any(k.startswith(p) for k in keys)), "")
            tensors = {k: f.get_tensor(k) for k in keys if k.startswith(prefix)}
            extras = {k: f.get_tensor(k) for k in EXTRA_KEYS if prefix and k in keys}
            return RawWeights(tensors, keys, f.metadata() or {}, extras)
    except Exception as e:  # safetensors raises its own SafetensorError besides OSError
        raise WeightsError(f"cannot read {path}: {_safetensors_problem(path, e)}") from None


class _Inert:
    """Stands in for the classes and functions of training metadata in LDM-era checkpoints (Lightning's
    ModelCheckpoint callback, numpy scalars): built from whatever the pickle gives, it holds and runs nothing."""

    def __init__(self, *args: object, **kwargs: object) -> None:
        pass

    def __setstate__(self, state: object) -> None:
        pass


# The globals that real SD .ckpt files hold besides tensors (ComfyUI and A1111 allow the same), mapped to _Inert:
# weights_only still refuses every other class or function, so nothing of the file's choosing runs.
_INERT_GLOBALS = (
    "pytorch_lightning.callbacks.model_checkpoint.ModelCheckpoint",
    "numpy.core.multiarray.scalar", "numpy._core.multiarray.scalar",
    "numpy.dtype", "numpy.dtypes.Float64DType", "_codecs.encode",
)


@contextlib.contextmanager
def _inert_training_metadata() -> Iterator[None]:
    with torch.serialization.safe_globals([(_Inert, name) for name in _INERT_GLOBALS]):
        yield


def _torch_load(path: Path) -> Any:
    # Sparse tensors' indices are checked as they load (out of their shape, reading them writes out of bounds).
    with warnings.catch_warnings(), _inert_training_metadata(), torch.sparse.check_sparse_tensor_invariants():
        # torch warns (two lines) about a raw protocol-4 pickle just before weights_only refuses it anyway.
        warnings.filterwarnings("ignore", message="Detected pickle protocol", category=UserWarning)
        if str(path).endswith(".safetensors"):
            # torch.load hands a path of that name to safetensors whatever it holds: a file object it reads itself.
            with open(path, "rb") as f:
                return torch.load(f, map_location="cpu", weights_only=True)
        try:
            # mmap keeps a multi-GB full checkpoint out of RAM; files older than torch's zip format cannot be mapped.
            return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError as e:
            if "mmap" not in str(e):
                raise
            return torch.load(path, map_location="cpu", weights_only=True)


def torch_file_problem(path: Path, e: Exception) -> str:
    """Why torch.load failed on a file, for a person (torch itself says e.g. `101` or `EOFError`)."""
    with open(path, "rb") as f:
        head = f.read(4)
    if not head:
        return "it is empty (0 bytes)"
    # torch.save writes a zip archive (PK..) or, before torch 1.6, a pickle (protocol 2+ starts with 0x80).
    if not head.startswith((b"PK", b"\x80")):
        return "it is not a PyTorch file (neither a zip archive nor a pickle)"
    # torch's first sentence says it; the rest of its message is advice on how checkpoints get damaged.
    return f"a damaged or truncated file ({first_line(e).split('. ')[0]})"


def _unsafe_globals(path: Path) -> str:
    """The classes and functions a zip checkpoint would make the unpickler run, read without running them."""
    try:
        names = [n for n in torch.serialization.get_unsafe_globals_in_checkpoint(path) if n not in _INERT_GLOBALS]
    except Exception:  # a pre-1.6 pickle, or one too damaged to list: the refusal alone then
        return ""
    return f": {', '.join(names[:3])}{', ...' if len(names) > 3 else ''}" if names else ""


def _load_pickle(path: Path) -> Any:
    try:
        return _torch_load(path)
    except pickle.UnpicklingError as e:
        problem = torch_file_problem(path, e)
        if problem.startswith("it is not a PyTorch file"):  # random bytes fail as unpickling too
            raise WeightsError(f"cannot read {path}: {problem}") from None
        raise WeightsError(
            f"refusing to unpickle {path}: it holds objects other than tensors{_unsafe_globals(path)} "
            "(torch.load weights_only=True); convert it to .safetensors where you trust its source"
        ) from None
    except OSError as e:
        raise WeightsError(f"cannot read {path}: {first_line(e)}") from None
    except Exception as e:
        raise WeightsError(f"cannot read {path}: {torch_file_problem(path, e)}") from None


def _read_pickle(path: Path) -> RawWeights:
    obj = _plain_dict(_load_pickle(path))
    meta: dict[str, str] = {}
    if isinstance(obj, dict) and _is_training_checkpoint(obj):
        obj, meta = _training_checkpoint_weights(obj, path)
    if isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict):
        obj = _plain_dict(obj["state_dict"])  # LDM / Lightning checkpoints nest the weights
    elif isinstance(obj, dict) and not any(isinstance(v, Tensor) for v in obj.values()):
        obj = _nested_weights(obj, path)
    if not isinstance(obj, dict):
        raise WeightsError(f"{path} holds a {type(obj).__name__}, not a state dict")
    keys = [k for k in obj if isinstance(k, str)]
    prefix = next((p for p in VAE_PREFIXES if any(k.startswith(p) for k in keys)), "")
    vae = [k for k in keys if k.startswith(prefix) and isinstance(obj[k], Tensor)]
    extra = [k for k in EXTRA_KEYS if prefix and isinstance(obj.get(k), Tensor)]
    copies = _copies({k: obj[k] for k in vae + extra}, path)
    return RawWeights({k: copies[k] for k in vae}, keys, meta, {k: copies[k] for k in extra})


def _nested_weights(obj: dict[Any, Any], path: Path) -> dict[Any, Any]:
    """The one entry of a checkpoint without top-level tensors that holds a VAE's ({"model": sd, "epoch": 3}, as
    many training scripts save); WeightsError naming them when several do (which one is the user's to say)."""
    def vae_like(v: Any) -> bool:
        return isinstance(v, dict) and any(may_be_vae_key(k) and isinstance(t, Tensor) for k, t in v.items())

    found = [k for k, v in obj.items() if vae_like(v)]
    if len(found) > 1:
        raise WeightsError(f"{path} holds VAE weights under {len(found)} entries ({', '.join(map(repr, found[:4]))}) "
                           f"and none at its top level: save the one to load alone, e.g. "
                           f"torch.save(ckpt[{found[0]!r}], 'vae.pt')")
    if found:
        log.info("%s: loading the weights under its %r entry", path.name, found[0])
        return _plain_dict(obj[found[0]])
    return obj


def _copies(tensors: dict[str, Tensor], path: Path) -> StateDict:
    """Plain copies of the tensors a pickle gave, so that the model owns its memory rather than mapped pages;
    WeightsError where they would hold more bytes than the file does, or are no dense tensors with values."""
    budget = path.stat().st_size
    out: StateDict = {}
    for k, v in tensors.items():
        # Tensor's own methods, not the object's: weights_only still lets a pickle set attributes on a tensor
        # (_rebuild_from_type_v2's state), so v.clone could be any allowed callable, and its result no tensor.
        t = Tensor.detach(v)
        if what := odd_tensor(t):
            raise WeightsError(f"{path}: {k} is {what}, not a stored weight: a file saved from a model without "
                               "its weights, or a damaged one")
        # A view's elements may outnumber its storage's (stride 0, keys sharing one storage): a file of a few KB
        # could declare terabytes, which clone() would allocate. Real weights are each stored in the file.
        budget -= t.numel() * t.element_size()
        if budget < 0:
            raise WeightsError(f"{path}: its tensors ({k} and before) declare more data than the file's "
                               f"{path.stat().st_size} bytes (expanded or shared storages): a damaged or crafted file")
        if type(t) is not Tensor:  # weights_only builds no other kind; a subclass's methods are its own
            raise WeightsError(f"{path}: {k} is a {type(t).__name__}, not a plain tensor")
        out[k] = t.clone()
    return out


def _plain_dict(obj: Any) -> Any:
    # A dict of the pickle's making as a plain one: BUILD may give an OrderedDict attributes (weights_only allows
    # it), which would shadow its methods (.get, .items) with callables of the file's choosing.
    return dict(obj) if isinstance(obj, dict) else obj


def _is_training_checkpoint(obj: dict[Any, Any]) -> bool:
    # The signature of klvae's Trainer.state_dict(): the model's weights beside the optimiser's and the step.
    return isinstance(obj.get("vae"), dict) and isinstance(obj.get("opt_ae"), dict) and isinstance(obj.get("step"), int)


def exports_ema(obj: dict[str, Any]) -> bool:
    """Whether a klvae training checkpoint's run exports its EMA: it kept one, and train.export_ema is not off."""
    try:
        export_ema = json.loads(obj.get("config") or "{}").get("train", {}).get("export_ema", True)
    except (ValueError, TypeError, AttributeError, RecursionError):  # a config that is no JSON text of a dict
        export_ema = True
    return obj.get("ema") is not None and export_ema is not False


def _training_checkpoint_weights(obj: dict[str, Any], path: Path) -> tuple[dict[str, Any], dict[str, str]]:
    """The weights that the run's final/ export would hold (the EMA's where the run exports it) and the model's
    config (newer checkpoints carry it), from a klvae training checkpoint."""
    weights, which = _plain_dict(obj["vae"]), "the model's weights"
    ema = _plain_dict(obj.get("ema"))
    if exports_ema(obj) and isinstance(ema, dict):
        # AveragedModel's state_dict: the model's keys under module., and its update count.
        weights = {k.removeprefix("module."): v for k, v in ema.items()
                   if isinstance(k, str) and k.startswith("module.")}
        which = "the EMA weights"
    log.info("%s is a klvae training checkpoint (step %d): loading %s", path.name, obj["step"], which)
    config = obj.get("model_config")
    return weights, {CONFIG_METADATA: config} if isinstance(config, str) else {}


def is_shard_index(path: Path) -> bool:
    """Whether `path` names the index of sharded weights (diffusers' save_pretrained(max_shard_size=...))."""
    return path.name.endswith(SHARD_INDEX_SUFFIXES)


_MAX_INDEX_BYTES = 16 * 2**20


def shard_files(index: Path) -> list[Path]:
    """The shard files a sharded-weights index names, each checked to be there; WeightsError naming the first that
    is not (an interrupted download or copy), or an index that is no such file."""
    names = shard_names(index)
    if missing := next((n for n in names if not (index.parent / n).is_file()), None):
        raise WeightsError(f"{index.parent / missing}, a shard that {index.name} names, is missing (an "
                           f"interrupted download or copy?)")
    return [index.parent / n for n in names]


def shard_names(index: Path) -> list[str]:
    """The file names (in the index's folder) that a sharded-weights index names; WeightsError for an index that
    is no such file."""
    try:
        # A real index is kilobytes (the _MAX_INDEX_BYTES check keeps a huge file from being read whole).
        weight_map = (json.loads(index.read_text()).get("weight_map") if index.stat().st_size <= _MAX_INDEX_BYTES
                      else None)
    except (OSError, ValueError, AttributeError, RecursionError):
        weight_map = None
    names = sorted(set(weight_map.values())) if isinstance(weight_map, dict) else []
    if not names or not all(isinstance(n, str) and n and Path(n).name == n for n in names):
        raise WeightsError(f"{index} is not an index of sharded weights (a weight_map of file names)")
    return names


def _read_shards(index: Path) -> RawWeights:
    parts = [read_weights(f) for f in shard_files(index)]
    return RawWeights({k: v for p in parts for k, v in p.tensors.items()}, [k for p in parts for k in p.keys],
                      {k: v for p in parts for k, v in p.metadata.items()}, {})


def read_weights(path: Path) -> RawWeights:
    """The tensors, key names, header metadata and extras of one weights file, read by its content (a file named
    .ckpt that holds safetensors is read as such), else by its suffix; of every shard, given a shard index."""
    if is_shard_index(path) and path.is_file():
        return _read_shards(path)
    if not path.is_file():
        raise WeightsError(f"{path} is not a regular file" if path.exists() else f"no such file: {path}")
    kind = sniff_format(path)
    suffix = path.suffix.lower()
    if kind == "safetensors" or (kind is None and suffix in SAFETENSORS_SUFFIXES):
        raw = _read_safetensors(path)
    elif kind == "torch" or suffix in PICKLE_SUFFIXES:
        raw = _read_pickle(path)
    else:
        raise WeightsError(f"{path}: unsupported weights file (expected safetensors, or a PyTorch "
                           f"{', '.join(PICKLE_SUFFIXES)} file)")
    if not raw.tensors:
        raise WeightsError(f"{path} holds no tensors")
    return raw


def read_state_dict(path: str | Path) -> StateDict:
    """The tensors of one weights file (.safetensors, or a pickle read with weights_only), keys as stored."""
    return read_weights(Path(path)).tensors
