"""The autoencoder's typed configuration and the named presets of the VAEs that latent diffusion uses."""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import logging
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any, Literal

from klvae.checks import is_integer
from klvae.model.latent_norm import NORM_FIELDS, LatentNorm, finite

AttentionType = Literal["vanilla", "linear", "none"]

log = logging.getLogger(__name__)

# True while weights.infer builds a config from guessed values: advice to "use norm_num_groups <= 8" would then blame
# the user for a value they never chose, so the guesser words its own warning instead.
_INFERRING: contextvars.ContextVar[bool] = contextvars.ContextVar("klvae_config_inferring", default=False)


@contextlib.contextmanager
def inferring() -> Iterator[None]:
    """Within it, configs skip the warnings about values a user chooses (guessed by weights.infer, or warned of)."""
    token = _INFERRING.set(True)
    try:
        yield
    finally:
        _INFERRING.reset(token)


@dataclass(frozen=True)
class AutoencoderKLConfig:
    """Architecture and latent statistics of one KL autoencoder (diffusers' config names where they exist)."""

    # RGB in and out; other values serve e.g. depth or RGBA autoencoders.
    in_channels: int = 3
    out_channels: int = 3
    # One entry per resolution level; the image is downsampled len-1 times (4 levels -> factor 8).
    block_out_channels: tuple[int, ...] = (128, 256, 512, 512)
    # The decoder's widths, one per level as above, where they differ from the encoder's (FLUX.2's small decoder:
    # 96/192/384/384, a faster drop-in for the same latents); None: the same as the encoder's.
    decoder_block_out_channels: tuple[int, ...] | None = None
    # ResNet blocks per encoder level; the decoder uses one more per level (LDM's num_res_blocks + 1).
    layers_per_block: int = 2
    # Channels of z; the encoder emits twice this many (mean and log-variance).
    latent_channels: int = 4
    # GroupNorm groups; every channel width must be divisible by it.
    norm_num_groups: int = 32
    # LDM and diffusers both use 1e-6; kept as a field so exotic checkpoints can be described.
    norm_eps: float = 1e-6
    # 1x1 convs around the latent (SD 1.x/2.x/XL have them; SD3 and FLUX dropped them).
    use_quant_conv: bool = True
    use_post_quant_conv: bool = True
    # Mid-block attention: "vanilla" single-head softmax (all released VAEs), LDM's "linear", or "none".
    attention: AttentionType = "vanilla"
    # The training resolution: the natural tile size for tiled inference.
    sample_size: int = 512
    # Latent normalisation for the diffusion model: z_diffusion = (z - shift_factor) * scaling_factor.
    scaling_factor: float = 0.18215
    shift_factor: float | None = None
    # Per-channel statistics instead of the shift (diffusers' names; Playground v2.5 has them):
    # z_diffusion = (z - latents_mean[c]) * scaling_factor / latents_std[c]. See model.latent_norm.
    latents_mean: tuple[float, ...] | None = None
    latents_std: tuple[float, ...] | None = None
    # FLUX.2's diffusion latent is z in 2x2 patches (latent_channels*4 channels at half the size), normalised per
    # channel by its latent BatchNorm's statistics, which loading turns into latents_mean/latents_std.
    latent_patch_size: int = 1
    # diffusers' flag that the VAE overflows in fp16 (SD 1.x, SDXL), on which its pipelines run the VAE in fp32.
    # Kept for round trips only: klvae checks every half-precision pass and reruns one that overflowed in fp32
    # whatever the flag says (inference.precision.run_guarded), so fp16 runs where it works.
    force_upcast: bool = True

    def __post_init__(self) -> None:
        _check_types(self)
        if not self.block_out_channels:
            raise ValueError("block_out_channels must name at least one level")
        dec = self.decoder_block_out_channels
        if dec is not None and len(dec) != len(self.block_out_channels):
            raise ValueError(f"decoder_block_out_channels has {len(dec)} levels but block_out_channels "
                             f"{len(self.block_out_channels)}: the decoder must undo every downsampling")
        for c in (*self.block_out_channels, *self.decoder_widths):
            if c % self.norm_num_groups:
                raise ValueError(f"channel width {c} is not divisible by norm_num_groups={self.norm_num_groups}")
        if (w := single_channel_groups(self)) is not None and not _INFERRING.get():
            log.warning("one channel per GroupNorm group at width %d: use norm_num_groups <= %d", w, w // 2)
        _check_size(self)
        if self.attention not in ("vanilla", "linear", "none"):
            raise ValueError(f"attention must be 'vanilla', 'linear' or 'none', got {self.attention!r}")

    @property
    def latent_norm(self) -> LatentNorm:
        """The map between this VAE's latents and the diffusion model's (scale, shift or per-channel)."""
        return LatentNorm(self.scaling_factor, self.shift_factor, self.latents_mean, self.latents_std,
                          self.latent_patch_size)

    @property
    def decoder_widths(self) -> tuple[int, ...]:
        """The decoder's widths per level, in the encoder's order (its last level is the first the decoder runs)."""
        return self.decoder_block_out_channels or self.block_out_channels

    @property
    def downsample_factor(self) -> int:
        """Pixels per latent cell along one side (8 for four levels)."""
        return 2 ** (len(self.block_out_channels) - 1)

    @property
    def size_multiple(self) -> int:
        """Pixels per cell of the diffusion latent along one side: the downsample factor times the latent patch
        (16 for FLUX.2), so image sides that are multiples of it give whole diffusion latents."""
        return self.downsample_factor * self.latent_patch_size

    def replace(self, **changes: Any) -> AutoencoderKLConfig:
        """A copy with some fields changed."""
        if _GROUP_FIELDS.isdisjoint(changes):
            # Widths and groups stay this config's, whose warning about them was given (or, for weights.infer's
            # guess, worded as one) when it was built: the copy (FLUX.2's statistics added on load, say) repeats
            # none, least of all one that tells the user to change a value that the guesser chose.
            with inferring():
                return dataclasses.replace(self, **changes)
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        """Plain-JSON form of the fields."""
        d = dataclasses.asdict(self)
        d["block_out_channels"] = list(self.block_out_channels)
        if self.decoder_block_out_channels is not None:
            d["decoder_block_out_channels"] = list(self.decoder_block_out_channels)
        d.update(self.latent_norm.to_dict())
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> AutoencoderKLConfig:
        """Build from a dict of our field names; unknown names are an error."""
        if not isinstance(d, dict):
            raise ValueError(f"a config is a mapping of field names to values, not a {type(d).__name__}")
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(map(str, set(d) - names))
        if unknown:
            raise ValueError(f"unknown config fields: {', '.join(unknown)}")
        return cls(**d)


# The fields that single_channel_groups reads.
_GROUP_FIELDS = frozenset({"block_out_channels", "decoder_block_out_channels", "norm_num_groups"})


def single_channel_groups(cfg: AutoencoderKLConfig) -> int | None:
    """The narrowest width if its GroupNorms have one channel per group there, else None."""
    w = min(cfg.block_out_channels[0], cfg.decoder_widths[0])
    # GroupNorm then normalises each channel alone; before the decoder's conv_out that erases every image's mean
    # colour, and a model trained so reconstructs in grey.
    return w if w // cfg.norm_num_groups < 2 else None


# Typed as declared and checked here: a config comes from JSON, YAML overrides or checkpoints, where 0 groups
# would divide by zero deep in the model, "abc" would read as three channel widths and "no" as true.
_POSITIVE_INTS = ("in_channels", "out_channels", "layers_per_block", "latent_channels", "norm_num_groups",
                  "sample_size")
_BOOLS = ("use_quant_conv", "use_post_quant_conv", "force_upcast")


def _positive_int(value: Any, name: str) -> int:
    if not is_integer(value) or value < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")
    return int(value)


def _widths(widths: Any, name: str) -> tuple[int, ...]:
    if isinstance(widths, str | bytes) or not isinstance(widths, Sequence):
        raise ValueError(f"{name} must be a list of positive integers, got {widths!r}")
    return tuple(_positive_int(c, f"every {name} entry") for c in widths)


def check_field(name: str, value: Any) -> Any:
    """`value` checked alone as config field `name` (its type and range, not how it fits the other fields), as
    normalised; ValueError otherwise. For changes to a config not known yet (overrides of pretrained weights)."""
    if name in _POSITIVE_INTS:
        return _positive_int(value, name)
    if name in _BOOLS:
        if not isinstance(value, bool):
            raise ValueError(f"{name} must be true or false, got {value!r}")
        return value
    if name in ("block_out_channels", "decoder_block_out_channels"):
        return None if value is None and name.startswith("decoder") else _widths(value, name)
    if name in ("norm_eps", "scaling_factor"):
        return finite(value, name, positive=True)
    if name == "shift_factor":
        return None if value is None else finite(value, name)
    return value


def _check_types(cfg: AutoencoderKLConfig) -> None:
    """ValueError for a field of the wrong type or out of range; normalises numbers to int/float/tuple."""
    def put(name: str, value: Any) -> None:
        object.__setattr__(cfg, name, value)

    for name in ("block_out_channels", "decoder_block_out_channels", *_POSITIVE_INTS, *_BOOLS, "norm_eps"):
        put(name, check_field(name, getattr(cfg, name)))
    # One spelling of "the same as the encoder's", so that equal configs compare equal.
    if cfg.decoder_block_out_channels == cfg.block_out_channels:
        put("decoder_block_out_channels", None)
    norm = LatentNorm(cfg.scaling_factor, cfg.shift_factor, cfg.latents_mean, cfg.latents_std,
                      cfg.latent_patch_size)
    for name in NORM_FIELDS:
        put(name, getattr(norm, name))
    channels = cfg.latent_channels * norm.latent_patch_size**2
    if norm.channels not in (None, channels):
        patches = f" in {norm.latent_patch_size}x{norm.latent_patch_size} patches" if norm.latent_patch_size > 1 else ""
        raise ValueError(f"latents_mean/latents_std have {norm.channels} entries for {channels} latent "
                         f"channels{patches}")


# Far beyond any released VAE (4 levels, 2 blocks, 84M parameters): more is a crafted config.json or weights
# file, whose model would take minutes and gigabytes to build before anything could refuse it.
MAX_LEVELS = 16
MAX_LAYERS = 64
MAX_PARAMETERS = 2**32


def approx_parameters(cfg: AutoencoderKLConfig) -> int:
    """Parameters of the 3x3 convolutions (nearly all of them), counted from the config alone."""
    # Per level: the encoder's blocks and the decoder's one more, two convs each; each mid block's two convs.
    enc = sum(cfg.layers_per_block * 2 * 9 * c * c for c in cfg.block_out_channels)
    dec = sum((cfg.layers_per_block + 1) * 2 * 9 * c * c for c in cfg.decoder_widths)
    mids = 2 * 9 * (cfg.block_out_channels[-1] ** 2 + cfg.decoder_widths[-1] ** 2)
    # The convs in and out, where the image and latent channels count: a huge channel count is as big a model.
    z, first, dec_out = cfg.latent_channels, cfg.block_out_channels[0], cfg.decoder_widths[0]
    ends = 9 * (cfg.in_channels * first + cfg.block_out_channels[-1] * 2 * z + z * cfg.decoder_widths[-1]
                + dec_out * cfg.out_channels) + 5 * z * z
    return enc + dec + mids + ends


def _check_size(cfg: AutoencoderKLConfig) -> None:
    if len(cfg.block_out_channels) > MAX_LEVELS or cfg.layers_per_block > MAX_LAYERS:
        raise ValueError(f"{len(cfg.block_out_channels)} levels of {cfg.layers_per_block} blocks is not a VAE "
                         f"klvae builds (at most {MAX_LEVELS} levels of {MAX_LAYERS})")
    n = approx_parameters(cfg)
    if n > MAX_PARAMETERS:
        raise ValueError(f"block_out_channels {list(cfg.block_out_channels)} (with {cfg.in_channels} image and "
                         f"{cfg.latent_channels} latent channels) make about {n / 1e9:.3g} billion parameters: not "
                         f"a VAE klvae builds (at most {MAX_PARAMETERS / 1e9:.3g} billion)")


_SD = AutoencoderKLConfig()

PRESETS: dict[str, AutoencoderKLConfig] = {
    # SD 1.x / 2.x kl-f8 (also sd-vae-ft-mse / ft-ema); LDM's scale_by_std figure.
    "sd15": _SD,
    "sd2": _SD.replace(sample_size=768),
    "sdxl": _SD.replace(sample_size=1024, scaling_factor=0.13025),
    # SD3 and FLUX: 16 latent channels, no quant convs, and a shift.
    "sd3": _SD.replace(
        latent_channels=16, use_quant_conv=False, use_post_quant_conv=False,
        sample_size=1024, scaling_factor=1.5305, shift_factor=0.0609,
    ),
    "flux": _SD.replace(
        latent_channels=16, use_quant_conv=False, use_post_quant_conv=False,
        sample_size=1024, scaling_factor=0.3611, shift_factor=0.1159,
    ),
    # Playground v2.5: SDXL's network, its latents normalised per channel (its vae/config.json's figures).
    "playground25": _SD.replace(
        sample_size=1024, scaling_factor=0.5,
        latents_mean=(-1.6574, 1.886, -1.383, 2.5155), latents_std=(8.4927, 5.9022, 6.5498, 5.2299),
    ),
    # FLUX.2: 32 latent channels with the quant convs, normalised in 2x2 patches by statistics that come with the
    # weights (its latent BatchNorm's), so none here: the preset alone only patchifies.
    "flux2": _SD.replace(latent_channels=32, sample_size=1024, scaling_factor=1.0, latent_patch_size=2),
    # FLUX.2's distilled small decoder (BFL's FLUX.2-small-decoder, full_encoder_small_decoder.safetensors): the
    # same encoder and latents, a decoder of 3/4 the width.
    "flux2-small-decoder": _SD.replace(latent_channels=32, sample_size=1024, scaling_factor=1.0, latent_patch_size=2,
                                       decoder_block_out_channels=(96, 192, 384, 384)),
    # Small configs for tests and experiments: the full topology at a fraction of the width.
    "tiny": AutoencoderKLConfig(
        block_out_channels=(32, 64), layers_per_block=1, norm_num_groups=8, sample_size=64,
        force_upcast=False,
    ),
    "tiny-f8": AutoencoderKLConfig(
        block_out_channels=(32, 32, 64, 64), layers_per_block=1, norm_num_groups=8, sample_size=64,
        force_upcast=False,
    ),
}

# Hub ids of the released weights, so `--model sdxl` reaches the real VAE where the hub can be reached.
PRESET_HUB_IDS: dict[str, tuple[str, str | None]] = {
    "sd15": ("stabilityai/sd-vae-ft-mse", None),
    "sd2": ("stabilityai/stable-diffusion-2-1", "vae"),
    "sdxl": ("stabilityai/sdxl-vae", None),
    "sd3": ("stabilityai/stable-diffusion-3-medium-diffusers", "vae"),
    "flux": ("black-forest-labs/FLUX.1-dev", "vae"),
    "flux2": ("black-forest-labs/FLUX.2-dev", "vae"),
    "playground25": ("playgroundai/playground-v2.5-1024px-aesthetic", "vae"),
}
# Presets whose released weights are one file in BFL's layout rather than a diffusers folder.
PRESET_HUB_FILES: dict[str, tuple[str, str]] = {
    "flux2-small-decoder": ("black-forest-labs/FLUX.2-small-decoder", "full_encoder_small_decoder.safetensors"),
}


def get_preset(name: str) -> AutoencoderKLConfig:
    """The preset config called `name` (see PRESETS)."""
    try:
        return PRESETS[name]
    except KeyError:
        raise ValueError(f"unknown preset {name!r}; known: {', '.join(PRESETS)}") from None
