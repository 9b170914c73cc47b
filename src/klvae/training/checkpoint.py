"""Training checkpoints: atomic writes, the newest complete one found on resume, tensors-only loading."""

from __future__ import annotations

import contextlib
import json
import logging
import math
import pickle
import random
import re
import stat
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch

from klvae.atomic import atomic_write, signals_held
from klvae.distributed import DistInfo, job_lock
from klvae.errors import KlvaeError, quote
from klvae.images import not_a_file
from klvae.model.config import AutoencoderKLConfig
from klvae.weights.load import torch_file_problem

log = logging.getLogger(__name__)

_NAME = re.compile(r"^step_(\d{8}|[1-9]\d{8,})\.pt$")  # {:08d}: past 10**8 steps the names grow, unpadded


def rng_state() -> dict[str, Any]:
    """Every RNG the run touches, in a form torch.load(weights_only=True) accepts."""
    np_state = np.random.get_state(legacy=True)
    assert isinstance(np_state, tuple)  # ("MT19937", keys, pos, has_gauss, gauss): the legacy form is a tuple
    state: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "python": random.getstate(),
        "numpy": [np_state[0], torch.from_numpy(np_state[1].astype(np.int64)), *np_state[2:]],
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore what rng_state() captured."""
    torch.set_rng_state(state["torch"])
    random.setstate(tuple(x if not isinstance(x, list) else tuple(x) for x in state["python"]))
    n = state["numpy"]
    np.random.set_state((n[0], n[1].numpy().astype(np.uint32), *n[2:]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_checkpoint(state: dict[str, Any], directory: str | Path, step: int, keep: int = 2) -> Path:
    """Write step_XXXXXXXX.pt through a temporary file and a rename; prune all but the newest `keep`."""
    directory = Path(directory)

    def write(tmp: Path) -> None:
        with open(tmp, "wb") as f:
            torch.save(state, f)

    # A kill mid-write leaves only a hidden .tmp, never a torn step_*.pt that a resume would pick; an interrupt
    # waits for the write, the rename and the pruning.
    with signals_held():
        final = atomic_write(directory / f"step_{step:08d}.pt", write)
        for old in list_checkpoints(directory)[:-keep] if keep > 0 else []:
            old.unlink(missing_ok=True)
    return final


def list_checkpoints(directory: str | Path) -> list[Path]:
    """Complete checkpoints in step order."""
    d = Path(directory)
    if not d.is_dir():
        return []
    return sorted((p for p in d.iterdir() if _NAME.match(p.name)), key=checkpoint_step)


def checkpoint_step(path: Path) -> int:
    """The step a checkpoint's name gives (step_XXXXXXXX.pt)."""
    m = _NAME.match(path.name)
    if m is None:
        raise ValueError(f"{path.name} is not named like a checkpoint (step_XXXXXXXX.pt)")
    return int(m[1])


def set_aside_later(directory: str | Path, step: int) -> list[Path]:
    """Rename the checkpoints past `step` to *.superseded: a run resumed from an earlier one goes another way, and
    its next resume (the newest checkpoint) and pruning must be of its own, not the abandoned run's. Kept, not
    deleted: they may be wanted."""
    later = [p for p in list_checkpoints(directory) if checkpoint_step(p) > step]
    for p in later:
        # A second try from the same checkpoint sets its own aside beside the first try's, not over them.
        target, n = p.with_name(p.name + ".superseded"), 0
        while target.exists():
            n += 1
            target = p.with_name(f"{p.name}.superseded.{n}")
        p.rename(target)
    return later


def latest_checkpoint(directory: str | Path) -> Path | None:
    """The newest complete checkpoint, or None."""
    found = list_checkpoints(directory)
    return found[-1] if found else None


def load_checkpoint(path: str | Path, mmap: bool = False) -> dict[str, Any]:
    """Read a checkpoint with weights_only=True (no arbitrary objects are unpickled); `mmap` maps the tensors'
    bytes instead of reading them (a check of the file's structure, not of each byte)."""
    if not str(path):  # Path("") is the working folder
        raise KlvaeError("no checkpoint named: the path is empty")
    path = Path(path)
    if path.is_dir():
        raise KlvaeError(f"checkpoint {path} is a folder: name one of its checkpoint files")
    with contextlib.suppress(OSError):  # a missing file is said below, by open()
        if not stat.S_ISREG(mode := path.stat().st_mode):  # opening a FIFO would wait for a writer forever
            raise KlvaeError(f"checkpoint {path}: {not_a_file(mode)}")
    try:
        f = path.open("rb")
    except OSError as e:
        raise KlvaeError(f"cannot read checkpoint {path}: {e.strerror or e}") from None
    with f:
        try:
            state = _torch_load(path, f, mmap)
        except pickle.UnpicklingError:
            # Not torch's zip format (a PNG, random bytes), or pickled objects that weights_only refuses.
            raise KlvaeError(f"{path} is not a klvae checkpoint: torch.load(weights_only=True) cannot read it") \
                from None
        except Exception as e:  # torch raises RuntimeError, OSError, EOFError ... for a torn file or another kind
            raise KlvaeError(f"{path} is not a klvae checkpoint: {torch_file_problem(path, e)}") from None
    if not isinstance(state, dict):
        raise KlvaeError(f"{path} is not a klvae checkpoint: it holds a {type(state).__name__}, not a dict")
    return state


# What Trainer.state_dict() writes, with the type each entry must have for Trainer.load_state_dict().
_COUNTERS = ("step", "batches_done", "nonfinite_run")
_MAPPINGS = ("vae", "loss", "opt_ae", "scaler", "d_scaler", "rng")
_OPTIONAL_MAPPINGS = ("ema", "opt_d")


def _torch_load(path: Path, f: Any, mmap: bool) -> Any:
    with torch.sparse.check_sparse_tensor_invariants():  # a sparse tensor's indices out of its shape: refused
        return _torch_load_checked(path, f, mmap)


def _torch_load_checked(path: Path, f: Any, mmap: bool) -> Any:
    if mmap:
        try:
            return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError as e:
            if "mmap" not in str(e):  # torch's word for a file it cannot map: not a zip (a PNG, an old format)
                raise
    return torch.load(f, map_location="cpu", weights_only=True)


def _is_counter(value: Any) -> bool:
    """A run's counter: an int in [0, 2**63)."""
    # int64's range too: the step goes into tensors and TensorBoard's purge_step, which refuse larger ones.
    return isinstance(value, int) and not isinstance(value, bool) and 0 <= value < 2**63


def load_training_state(path: str | Path, mmap: bool = False) -> dict[str, Any]:
    """A checkpoint that Trainer.state_dict() wrote; KlvaeError naming what a foreign or torn file lacks (`mmap`:
    see load_checkpoint)."""
    state = load_checkpoint(path, mmap)
    missing = [k for k in (*_COUNTERS, *_MAPPINGS) if k not in state]
    if missing:
        shown = ", ".join(map(str, list(state)[:5])) or "nothing"
        raise KlvaeError(f"{path} is not a klvae training checkpoint: it has no {', '.join(missing)} "
                         f"(it holds {shown}{', ...' if len(state) > 5 else ''})")
    bad = [k for k in _COUNTERS if not _is_counter(state[k])]
    bad += [k for k in ("bad_images",) if state.get(k) is not None and not _is_counter(state[k])]  # older: none
    bad += [k for k in _MAPPINGS if not isinstance(state[k], dict)]
    bad += [k for k in _OPTIONAL_MAPPINGS if state.get(k) is not None and not isinstance(state[k], dict)]
    bad += [k for k in ("vae", "loss", "ema") if isinstance(state.get(k), dict)
            and not all(isinstance(v, torch.Tensor) for v in state[k].values())]
    if bad:
        raise KlvaeError(f"{path} is not a complete klvae checkpoint: malformed {', '.join(bad)}")
    return state


def saved_model_config(path: str | Path | None) -> AutoencoderKLConfig | None:
    """The architecture a checkpoint records (Trainer.state_dict's model_config), or None where it has none."""
    if path is None:
        return None
    try:
        return AutoencoderKLConfig.from_dict(json.loads(load_checkpoint(path, mmap=True)["model_config"]))
    except (KlvaeError, KeyError, TypeError, ValueError, RecursionError):  # what the resume itself then names
        return None


def non_finite_tensor(state: dict[str, Any]) -> str | None:
    """The name of the first floating-point tensor of `state` that holds NaN or inf, or None."""
    return next((k for k, v in state.items() if isinstance(v, torch.Tensor) and v.is_floating_point()
                 and not bool(torch.isfinite(v).all())), None)


# ---- optimiser state: torch's load_state_dict checks only the number of parameters per group, so a moment of
# the wrong shape or a one-element betas would load, and fail in the first step after the resume.
_MOMENTS = ("exp_avg", "exp_avg_sq")


def optimizer_state_problem(opt: torch.optim.Optimizer, saved: Any) -> str | None:
    """What makes `saved` unusable by `opt` (Adam or AdamW, as the trainer builds), or None.

    None too when the groups hold other numbers of parameters: load_state_dict reports that as a config change."""
    if not isinstance(saved, dict) or not isinstance(saved.get("state"), dict) \
            or not isinstance(saved.get("param_groups"), list):
        return "it is not a mapping of state and param_groups"
    groups = saved["param_groups"]
    if not all(isinstance(g, dict) and isinstance(g.get("params"), list) for g in groups):
        return "a param_groups entry is not a mapping with a params list"
    if [len(g["params"]) for g in groups] != [len(g["params"]) for g in opt.param_groups]:
        return None
    for i, (mine, theirs) in enumerate(zip(opt.param_groups, groups, strict=True)):
        problem = _group_problem(mine, theirs)
        if problem:
            return f"param_groups[{i}] {problem}"
    ids = [k for g in groups for k in g["params"]]
    if not all(type(k) is int for k in ids) or len(set(ids)) != len(ids):
        return "param_groups name their parameters other than by distinct integers"
    params = dict(zip(ids, (p for g in opt.param_groups for p in g["params"]), strict=True))
    amsgrad = {k: bool(g.get("amsgrad")) for g in groups for k in g["params"]}
    for key, st in saved["state"].items():
        if key not in params:
            return f"state has an entry {quote(key)} for no parameter"
        problem = _param_state_problem(st, params[key], amsgrad[key])
        if problem:
            return f"state[{key}] {problem}"
    return None


def _group_problem(mine: dict[str, Any], theirs: dict[str, Any]) -> str | None:
    for k, want in mine.items():
        if k == "params":
            continue
        if k not in theirs:
            if isinstance(want, bool) or want is None:
                continue  # a switch that a checkpoint of an older torch lacks: the optimiser fills in its default
            return f"lacks {k}"
        got = theirs[k]
        if not _same_kind(want, got):
            return f"{k} is {quote(got)}, not like this optimiser's {quote(want)}"
        if k == "betas" and not all(b < 1 for b in got):
            return f"betas are {quote(got)}, not in [0, 1)"
    return None


def _same_kind(want: Any, got: Any) -> bool:
    """Whether `got` can stand in for the hyper-parameter `want`: a switch, a number >= 0, or a tuple of them."""
    if isinstance(want, bool) or want is None:
        return got is None or isinstance(got, bool)
    if isinstance(want, int | float):
        return _is_count(got)
    if isinstance(want, tuple | list):
        return isinstance(got, tuple | list) and len(got) == len(want) and all(map(_same_kind, want, got))
    return type(got) is type(want)


def _is_count(v: Any) -> bool:
    """A finite number >= 0, plain or as a one-element tensor (Adam's hyper-parameters and step counts)."""
    if isinstance(v, torch.Tensor):
        if v.numel() != 1 or v.is_complex():
            return False
        v = v.item()
    return not isinstance(v, bool) and isinstance(v, int | float) and math.isfinite(v) and v >= 0


def _param_state_problem(st: Any, param: torch.Tensor, amsgrad: bool) -> str | None:
    if not isinstance(st, dict):
        return f"is a {type(st).__name__}, not a mapping"
    need = ("step", *_MOMENTS, *(("max_exp_avg_sq",) if amsgrad else ()))
    missing = [k for k in need if k not in st]
    if missing:
        return f"lacks {', '.join(missing)}"
    for k, v in st.items():
        if k == "step":
            if not _is_count(v):
                return f"step is {quote(v)}, not a count"
        elif not isinstance(v, torch.Tensor):
            return f"{quote(k)} is a {type(v).__name__}, not a tensor"
        elif v.shape != param.shape:
            return f"{quote(k)} has shape {list(v.shape)} for a parameter of shape {list(param.shape)}"
        elif v.is_floating_point() and not bool(torch.isfinite(v).all()):
            # Adam would turn every update of this parameter to NaN: the run's steps all skipped.
            return f"{quote(k)} holds NaN or inf"
        elif k.endswith("exp_avg_sq") and bool((v < 0).any()):
            return f"{quote(k)} holds negative values (a mean of squares: its square root is NaN)"
    return None


# The hidden name atomic.temp_path gives a file before its rename: .NAME.PID.HEX8.tmp
_TEMPORARY = re.compile(r"\..+\.\d+\.[0-9a-f]{8}\.tmp")


@contextlib.contextmanager
def run_lock(out: Path, dist: DistInfo, device: torch.device) -> Iterator[None]:
    """Rank 0 holds `out`'s lock while the block runs, so that a second `klvae train` there (a resume started
    while the run trains, say) is refused on every rank instead of pruning, exporting and logging over this one;
    under the lock, the temporaries of a run killed mid-save are removed from checkpoints/ and final/."""
    if dist.is_main:
        out.mkdir(parents=True, exist_ok=True)
    with job_lock(out, "klvae train", dist, device):
        if dist.is_main:
            for p in [*(out / "checkpoints").glob(".*.tmp"), *(out / "final").glob(".*.tmp")]:
                if _TEMPORARY.fullmatch(p.name) and p.is_file():
                    log.info("removing %s, left by a run killed while it saved", p)
                    p.unlink(missing_ok=True)
        yield
