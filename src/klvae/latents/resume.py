"""Why a resume of a latent cache is refused: a recorded option or model fingerprint that differs from this run's.

An option's refusal is an OptionError: `str()` names it as `build_cache`'s keyword (`resolution=256`), `flags()`
as `klvae cache`'s flag (`--resolution 256`), which the CLI prints.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from klvae.errors import KlvaeError, Namer, OptionError

_AGAIN = "or write to another folder"


def refusal(out: Path, key: str, record: dict[str, Any], value: Any) -> KlvaeError | None:
    """The error refusing to resume the cache in `out`, whose `record` (a manifest line's options, or the index's)
    holds another `key` than this run's `value`; None for the whole model's fingerprint where the record has the
    encoder's too (that one decides, and is compared too)."""
    old = record[key]
    if key == "model_fingerprint" and "encoder_fingerprint" in record:
        return None
    if key == "model_fingerprint":
        # Paths may differ between runs (a copy, a hub cache), so the weights decide, not the --model text.
        return KlvaeError(f"{out} holds a cache made with another model (fingerprint {old[:12]}, this one's "
                          f"{value[:12]}; begun before klvae recorded the encoder's fingerprint, it takes the same "
                          f"whole model): resume it with the model it was begun with, {_AGAIN}")
    if key == "encoder_fingerprint":
        return KlvaeError(f"{out} holds a cache made with another model, whose encoder differs (encoder fingerprint "
                          f"{old[:12]}, this one's {value[:12]}): resume it with the model it was begun with (or a "
                          f"fine-tune of its decoder alone), {_AGAIN}")
    if key == "factors_fingerprint":
        return KlvaeError(f"{out} holds latents scaled with another model's factors (scaling_factor, shift_factor, "
                          f"latents_mean/std or latent patch): resume it with the factors it was begun with, {_AGAIN}")
    if key == "data_fingerprint":
        return KlvaeError(f"{out} holds a cache of other table data (its parquet files, or their rows, changed): rows "
                          f"are numbered across the files, so a resume would take other images for the ones done; "
                          f"resume it with the data it was begun with, {_AGAIN}")
    if key == "world_size":  # no option of either API: the number of processes torchrun starts
        return KlvaeError(f"{out} holds a cache made by {old} processes, not {value}: resume it with the same number "
                          f"of processes (torchrun --nproc-per-node), {_AGAIN}")

    def message(n: Namer) -> str:
        return (f"{out} holds a cache made with {n(key, old)} (this run: {n(key, value)}): resume it with the same "
                f"options, {_AGAIN}")

    return OptionError(message)
