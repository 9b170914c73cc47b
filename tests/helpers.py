"""Shared by the tests: tiny models whose weights all differ from their (near-trivial) initialisation, and the
CLI's one-line errors."""

import contextlib
import os
import re
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

import klvae


def perturbed_vae(preset: str = "tiny", seed: int = 0, device: torch.device | str | None = None,
                  **changes: object) -> klvae.AutoencoderKL:
    """A preset (with config `changes`) in eval mode; default init leaves biases tiny and GroupNorm affine
    trivial, so every weight gets noise and a broken norm or bias shows up in the outputs."""
    torch.manual_seed(seed)
    vae = klvae.AutoencoderKL(klvae.get_preset(preset).replace(**changes)).eval().to(device or "cpu")
    with torch.no_grad():
        for p in vae.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return vae


def fake_hub_cache(
    root: Path, repo_id: str, model: klvae.AutoencoderKL, subfolder: str | None, bin_only: bool = False
) -> Path:
    """The layout huggingface_hub's cache has: models--org--name/refs/main + snapshots/<commit>/...; returns the
    folder the model was saved in."""
    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = root / f"models--{repo_id.replace('/', '--')}"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    snap = repo / "snapshots" / commit
    return model.save_pretrained(snap / subfolder if subfolder else snap, safe_serialization=not bin_only)


def one_error_line(err: str) -> str:
    """The CLI's error from its stderr, asserting that besides log lines (INFO/WARNING/DEBUG: ...) and progress
    bars it is all there is: one `klvae: error:` line, no traceback, no second message."""
    logs = ("INFO: ", "WARNING: ", "DEBUG: ")
    bar = re.compile(r"[\w ]+: +\d+%\|")
    rest = [ln for ln in err.strip().splitlines() if ln.strip() and not ln.startswith(logs) and not bar.match(ln)]
    assert len(rest) == 1 and rest[0].startswith("klvae: error: "), rest
    assert "internal error" not in rest[0], rest
    return rest[0]


def counting_tiled_calls(monkeypatch: pytest.MonkeyPatch) -> dict[str, int]:
    """Counts of the tiled encode and decode paths that inference takes from here on."""
    from klvae.inference import api

    calls = {"encode": 0, "decode": 0}
    for name, key in (("tiled_encode_moments", "encode"), ("tiled_decode", "decode")):
        real = getattr(api, name)

        def counted(*args: object, _real=real, _key=key, **kwargs: object) -> object:
            calls[_key] += 1
            return _real(*args, **kwargs)

        monkeypatch.setattr(api, name, counted)
    return calls


@contextlib.contextmanager
def fifo_watchdog(path: Path, after: float = 10.0) -> Iterator[dict[str, bool]]:
    """Make a FIFO at `path`; should a reader still block on it `after` seconds on, open and close its write end,
    so that the reader sees an empty file instead of hanging the test run. Yields {"fired": ...}, which says so."""
    os.mkfifo(path)
    state = {"fired": False}
    done = threading.Event()

    def watch() -> None:
        while not done.wait(0.2):
            if time.monotonic() - start < after:
                continue
            try:  # succeeds only while a reader has it open
                os.close(os.open(path, os.O_WRONLY | os.O_NONBLOCK))
                state["fired"] = True
            except OSError:
                pass

    start = time.monotonic()
    thread = threading.Thread(target=watch, daemon=True)
    thread.start()
    try:
        yield state
    finally:
        done.set()
        thread.join()
