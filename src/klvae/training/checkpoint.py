"""Training checkpoints: atomic writes, the newest complete one found on resume, tensors-only loading."""

from __future__ import annotations

import logging
import pickle
import random
import re
from pathlib import Path
from typing import Any

import numpy as np
import torch

from klvae.atomic import atomic_write
from klvae.errors import KlvaeError
from klvae.weights.load import torch_file_problem

log = logging.getLogger(__name__)

_NAME = re.compile(r"^step_(\d{8})\.pt$")


def rng_state() -> dict[str, Any]:
    """Every RNG the run touches, in a form torch.load(weights_only=True) accepts."""
    np_state = np.random.get_state()
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

    # A kill mid-write leaves only a hidden .tmp, never a torn step_*.pt that a resume would pick.
    final = atomic_write(directory / f"step_{step:08d}.pt", write)
    for old in list_checkpoints(directory)[:-keep] if keep > 0 else []:
        old.unlink(missing_ok=True)
    return final


def list_checkpoints(directory: str | Path) -> list[Path]:
    """Complete checkpoints in step order."""
    d = Path(directory)
    if not d.is_dir():
        return []
    return sorted(p for p in d.iterdir() if _NAME.match(p.name))


def latest_checkpoint(directory: str | Path) -> Path | None:
    """The newest complete checkpoint, or None."""
    found = list_checkpoints(directory)
    return found[-1] if found else None


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    """Read a checkpoint with weights_only=True (no arbitrary objects are unpickled)."""
    path = Path(path)
    try:
        f = path.open("rb")
    except OSError as e:
        raise KlvaeError(f"cannot read checkpoint {path}: {e.strerror or e}") from None
    with f:
        try:
            state = torch.load(f, map_location="cpu", weights_only=True)
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


def load_training_state(path: str | Path) -> dict[str, Any]:
    """A checkpoint that Trainer.state_dict() wrote; KlvaeError naming what a foreign or torn file lacks."""
    state = load_checkpoint(path)
    missing = [k for k in (*_COUNTERS, *_MAPPINGS) if k not in state]
    if missing:
        shown = ", ".join(map(str, list(state)[:5])) or "nothing"
        raise KlvaeError(f"{path} is not a klvae training checkpoint: it has no {', '.join(missing)} "
                         f"(it holds {shown}{', ...' if len(state) > 5 else ''})")
    bad = [k for k in _COUNTERS if isinstance(state[k], bool) or not isinstance(state[k], int) or state[k] < 0]
    bad += [k for k in _MAPPINGS if not isinstance(state[k], dict)]
    bad += [k for k in _OPTIONAL_MAPPINGS if state.get(k) is not None and not isinstance(state[k], dict)]
    bad += [k for k in ("vae", "loss", "ema") if isinstance(state.get(k), dict)
            and not all(isinstance(v, torch.Tensor) for v in state[k].values())]
    if bad:
        raise KlvaeError(f"{path} is not a complete klvae checkpoint: malformed {', '.join(bad)}")
    return state
