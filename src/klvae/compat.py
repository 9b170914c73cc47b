"""diffusers' AutoencoderKL interface over klvae's model: `as_diffusers(vae)` is a drop-in `vae=` for diffusers
pipelines and for code written against `diffusers.AutoencoderKL` (or `AutoencoderKLFlux2` for FLUX.2).

Supported, as diffusers has them: `encode(x).latent_dist` (sample(generator or a list of generators), mode(), mean,
std, var, logvar, kl(), nll()), `decode(z).sample`, `forward`, `return_dict=False` tuples, `config` with diffusers'
keys (attributes and items), `dtype`, `device`, `to()`, `enable_tiling()`/`enable_slicing()` and their `disable_*`,
`use_tiling`/`use_slicing`, `enable_gradient_checkpointing()`, `save_pretrained` / `from_pretrained`, accelerate's
offload hooks on encode/decode (`enable_model_cpu_offload`), the modules `encoder`, `decoder`, `quant_conv` and
`post_quant_conv` under diffusers' state_dict keys (SDXL's fp16 upcast path reads `post_quant_conv`), and FLUX.2's
`bn.running_mean`/`bn.running_var` (derived from the config's latent statistics). The network is klvae's own.

Where it differs from diffusers: tiling is klvae's exact tiling (the result equals the untiled one, no seams).
Half-precision weights run as klvae's inference runs them when no gradient is recorded: under autocast (GroupNorm
and softmax in fp32), and a pass that overflows is rerun in fp32 where diffusers returns NaN; with autograd on they
run as diffusers'. Inputs of another dtype or device are moved to the weights'. kl()/nll() of a deterministic
posterior give zeros per image rather than one zero.

Pipelines take it through their constructor or by assignment (`pipe.vae = vae`); `Pipeline.from_pretrained(...,
vae=vae)` refuses it (diffusers checks for its own ModelMixin there): load with `vae=None`, then assign.
Unsupported: attention processors (set_attn_processor, fuse_qkv_projections, xformers), diffusers' tile-size
attributes (tile_sample_min_size, tile_overlap_factor: see enable_tiling), register_to_config, PEFT/LoRA adapters,
gradients through tiled passes, and `pipe.save_pretrained`, which skips classes not its own: save the VAE itself
with `save_pretrained` (diffusers' format).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, cast, overload

import torch
from torch import Tensor, nn

from klvae.errors import KlvaeError, WeightsError
from klvae.inference.api import check_float
from klvae.inference.precision import pass_modules, run_guarded, warn_if_slow
from klvae.inference.tiling import TileOptions, make_streamer, run_maybe_tiled, tiled_decode, tiled_encode_moments
from klvae.model.autoencoder import AutoencoderKL, check_batch
from klvae.model.config import AutoencoderKLConfig
from klvae.posterior import DiagonalGaussian
from klvae.weights.diffusers_config import config_to_diffusers
from klvae.weights.latent_bn import BFL_EPS, latent_bn_tensors, with_latent_stats

__all__ = ["AutoencoderKLOutput", "DecoderOutput", "DiagonalGaussianDistribution", "DiffusersVAE", "FrozenConfig",
           "as_diffusers"]

# enable_tiling()'s default device memory budget: a pass whose untiled estimate exceeds it runs tiled (SDXL's
# 1024x1024 decode in half precision does), as diffusers tiles images above its sample_size.
DEFAULT_TILE_BUDGET = 2 * 2**30
_HALF = (torch.float16, torch.bfloat16)


class DiagonalGaussianDistribution(DiagonalGaussian):
    """klvae's posterior under diffusers' name (its sample() takes a list of generators too, as randn_tensor)."""


class _Output:
    """diffusers' BaseOutput access: attributes, out["name"], out[0], `in`, keys() and to_tuple() (the fields that
    are set, as BaseOutput, an OrderedDict of them, gives them)."""

    def keys(self) -> list[str]:
        """The names of the fields that are set, in order."""
        return [f.name for f in dataclasses.fields(cast(Any, self)) if getattr(self, f.name) is not None]

    def to_tuple(self) -> tuple[Any, ...]:
        """The fields that are not None, in order."""
        return tuple(getattr(self, k) for k in self.keys())

    def __contains__(self, key: object) -> bool:
        return key in self.keys()

    def __getitem__(self, key: int | slice | str) -> Any:
        if isinstance(key, str):
            if key not in self.keys():
                raise KeyError(key)
            return getattr(self, key)
        return self.to_tuple()[key]


@dataclass
class AutoencoderKLOutput(_Output):
    """What encode() returns: the posterior as .latent_dist."""

    latent_dist: DiagonalGaussianDistribution


@dataclass
class DecoderOutput(_Output):
    """What decode() and forward() return: the images as .sample."""

    sample: Tensor
    commit_loss: Tensor | None = None  # diffusers' field (VQ models); always None here


class FrozenConfig(dict):
    """A read-only dict whose keys also read as attributes, as diffusers' model configs (FrozenDict)."""

    def __getattr__(self, name: str) -> Any:
        try:
            return self[name]
        except KeyError:
            raise AttributeError(f"the config has no {name!r}") from None

    def _read_only(self, *args: Any, **kwargs: Any) -> None:
        # Pipelines read the config; a write would change no computation here, so it is refused, not ignored.
        raise TypeError("the config is read-only; change the klvae model's config and call as_diffusers again")

    __setattr__ = __setitem__ = __delattr__ = __delitem__ = __ior__ = _read_only  # type: ignore[assignment]
    clear = pop = popitem = setdefault = update = _read_only  # type: ignore[assignment]

    def __reduce__(self) -> tuple[type, tuple[dict[str, Any]]]:
        # copy/deepcopy/pickle would otherwise rebuild it item by item through the refused __setitem__.
        return FrozenConfig, (dict(self),)


def diffusers_config(cfg: AutoencoderKLConfig) -> FrozenConfig:
    """diffusers' config for `cfg` (AutoencoderKLFlux2's keys for FLUX.2), or klvae's names where it has none."""
    try:
        d = config_to_diffusers(cfg)
    except WeightsError:
        # Linear attention, another GroupNorm eps, or a decoder of its own width without FLUX.2's patches: no
        # diffusers class describes these, but pipelines read only the common keys, which klvae names alike.
        d = {**cfg.to_dict(), "mid_block_add_attention": cfg.attention != "none"}
    if d.get("_class_name") == "AutoencoderKLFlux2":
        d.setdefault("decoder_block_out_channels", None)  # diffusers' config lists it, None or not
    # The statistics' float64 copies that klvae's files carry beside the bn.* buffers: file format, not config.
    return FrozenConfig({k: v for k, v in d.items() if not k.startswith("_klvae_latents")})


def _latent_bn(cfg: AutoencoderKLConfig, eps: float) -> nn.BatchNorm2d:
    """FLUX.2's latent BatchNorm whose statistics are the config's (the buffers its pipelines read)."""
    with torch.device("cpu"):  # figures from the config, even while a model is built on the meta device
        stats = latent_bn_tensors(cfg, eps)
        bn = nn.BatchNorm2d(len(stats["bn.running_mean"]), eps=eps, affine=False, track_running_stats=True)
        mean, var = _running_stats(bn)
        with torch.no_grad():
            mean.copy_(stats["bn.running_mean"])
            var.copy_(stats["bn.running_var"])
    return bn.eval()


def _running_stats(bn: nn.BatchNorm2d) -> tuple[Tensor, Tensor]:
    """A BatchNorm's running mean and variance (there: it tracks running statistics)."""
    mean, var = bn.running_mean, bn.running_var
    assert mean is not None and var is not None
    return mean, var


def _adopt_bn_stats(module: DiffusersVAE, incompatible_keys: Any) -> None:
    """After load_state_dict: statistics loaded into bn.* become the klvae model's latents_mean/latents_std, so
    that its latent scaling and save_pretrained carry them (the buffers are only derived from the config)."""
    vae, bn = module._klvae, module.bn
    now = latent_bn_tensors(vae.config, bn.eps)
    mean, var = _running_stats(bn)
    if all(torch.equal(b.cpu(), now[k].to(b.dtype)) for k, b in (("bn.running_mean", mean), ("bn.running_var", var))):
        return  # the config's own (in half precision too): its exact figures stay
    cfg = with_latent_stats(vae.config, (mean, var), bn.eps, "the model")
    if cfg is not vae.config:
        vae.config = cfg
        module.config = diffusers_config(cfg)


def _in_dtype(out: Tensor, dtype: torch.dtype) -> Tensor:
    # diffusers returns the weights' dtype; a result that only fp32 holds (an fp32 rerun's) stays fp32.
    if out.dtype == dtype:
        return out
    cast = out.to(dtype)
    # Non-finite already in fp32 (NaN images in): the cast loses nothing.
    return cast if torch.isfinite(cast).all() or not torch.isfinite(out).all() else out


class DiffusersVAE(nn.Module):
    """A klvae AutoencoderKL behind diffusers' AutoencoderKL API (see the module docstring for what is covered)."""

    def __init__(self, vae: AutoencoderKL) -> None:
        if not isinstance(vae, AutoencoderKL):  # else an AttributeError from deep inside (a diffusers model's)
            raise TypeError(f"DiffusersVAE wraps a klvae.AutoencoderKL, not a {type(vae).__name__}")
        super().__init__()
        # The klvae model's own modules, registered here too: diffusers' state_dict keys and attributes, and to(),
        # half() or eval() on this wrapper act on the very modules the klvae model runs. The model itself is kept
        # unregistered, else every weight would appear twice (as encoder.* and as vae.encoder.*).
        object.__setattr__(self, "_klvae", vae)
        self.encoder, self.decoder = vae.encoder, vae.decoder
        self.quant_conv, self.post_quant_conv = vae.quant_conv, vae.post_quant_conv
        self.config = diffusers_config(vae.config)
        if self.config.get("_class_name") == "AutoencoderKLFlux2":
            self.bn = _latent_bn(vae.config, self.config.get("batch_norm_eps", BFL_EPS)).to(vae.device)
            self.register_load_state_dict_post_hook(_adopt_bn_stats)
        self.use_tiling = False
        self.use_slicing = False
        self.tiling = TileOptions(max_memory=DEFAULT_TILE_BUDGET)
        self.train(vae.training)

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            # diffusers' ModelMixin reads config keys as attributes too (deprecated there; older code relies on it).
            config = self.__dict__.get("config")
            if config is not None and not name.startswith("_") and name in config:
                return config[name]
            raise

    @property
    def klvae_model(self) -> AutoencoderKL:
        """The klvae AutoencoderKL that computes (sharing these weights), for klvae's own API."""
        return self._klvae

    @property
    def device(self) -> torch.device:
        """Where the parameters live."""
        return self._klvae.device

    @property
    def dtype(self) -> torch.dtype:
        """The parameters' dtype."""
        return self._klvae.dtype

    # ---- loading and saving ------------------------------------------------------------------------------
    @classmethod
    def from_pretrained(
        cls,
        pretrained_model_name_or_path: str | Path,
        subfolder: str | None = None,
        torch_dtype: torch.dtype | None = None,
        revision: str | None = None,
        device: str | torch.device | None = None,
        config: AutoencoderKLConfig | str | None = None,
        variant: str | None = None,
        use_safetensors: bool | None = None,
        local_files_only: bool = False,
    ) -> DiffusersVAE:
        """Load as klvae's AutoencoderKL.from_pretrained does (diffusers folders, single files, hub ids) and wrap."""
        vae = AutoencoderKL.from_pretrained(pretrained_model_name_or_path, subfolder=subfolder, config=config,
                                            dtype=torch_dtype, device=device, revision=revision, variant=variant,
                                            use_safetensors=use_safetensors, local_files_only=local_files_only)
        return cls(vae)

    @classmethod
    def from_single_file(
        cls,
        pretrained_model_link_or_path: str | Path,
        config: AutoencoderKLConfig | str | None = None,
        torch_dtype: torch.dtype | None = None,
        device: str | torch.device | None = None,
        local_files_only: bool = False,
    ) -> DiffusersVAE:
        """One weights file, as klvae's AutoencoderKL.from_single_file loads it, wrapped (no hub config needed)."""
        return cls(AutoencoderKL.from_single_file(pretrained_model_link_or_path, config=config, dtype=torch_dtype,
                                                  device=device, local_files_only=local_files_only))

    def save_pretrained(self, save_directory: str | Path, safe_serialization: bool = True) -> Path:
        """Write a diffusers folder (config.json + weights) that diffusers and klvae both load."""
        from klvae.weights.save import save_pretrained

        return save_pretrained(self._klvae, save_directory, safe_serialization=safe_serialization)

    # ---- the switches ------------------------------------------------------------------------------------
    def enable_tiling(self, tile_size: int | None = None, max_memory: int | None = None) -> None:
        """klvae's exact tiling: when a pass would exceed `max_memory` bytes (default 2 GiB) or runs out of GPU
        memory; `tile_size` (strip height in pixels) tiles every pass."""
        self.tiling = TileOptions(tile_size=tile_size,
                                  max_memory=DEFAULT_TILE_BUDGET if max_memory is None else max_memory)
        self.use_tiling = True

    def disable_tiling(self) -> None:
        """Untiled passes, as diffusers runs them."""
        self.use_tiling = False

    def enable_slicing(self) -> None:
        """Encode and decode a batch one image at a time."""
        self.use_slicing = True

    def disable_slicing(self) -> None:
        """Encode and decode a batch at once."""
        self.use_slicing = False

    def enable_gradient_checkpointing(self) -> None:
        """Recompute block activations in backward (training)."""
        self._klvae.enable_gradient_checkpointing(True)

    def disable_gradient_checkpointing(self) -> None:
        """Keep block activations for backward."""
        self._klvae.enable_gradient_checkpointing(False)

    # ---- diffusers' inference API ------------------------------------------------------------------------
    # Overloads: a checker then knows that encode(x).latent_dist and decode(z).sample exist, as pipelines use them.
    @overload
    def encode(self, x: Tensor, return_dict: Literal[True] = True) -> AutoencoderKLOutput: ...
    @overload
    def encode(self, x: Tensor, return_dict: Literal[False]) -> tuple[DiagonalGaussianDistribution]: ...
    @overload
    def encode(self, x: Tensor, return_dict: bool) -> AutoencoderKLOutput | tuple[DiagonalGaussianDistribution]: ...

    def encode(self, x: Tensor, return_dict: bool = True) -> AutoencoderKLOutput | tuple[DiagonalGaussianDistribution]:
        """Images [B, C, H, W] in [-1, 1] -> the posterior, as `.latent_dist` (or a 1-tuple)."""
        self._offload_hook()
        posterior = DiagonalGaussianDistribution(self._run("encode", x))
        return AutoencoderKLOutput(latent_dist=posterior) if return_dict else (posterior,)

    @overload
    def decode(self, z: Tensor, return_dict: Literal[True] = True,
               generator: torch.Generator | None = None) -> DecoderOutput: ...
    @overload
    def decode(self, z: Tensor, return_dict: Literal[False],
               generator: torch.Generator | None = None) -> tuple[Tensor]: ...
    @overload
    def decode(self, z: Tensor, return_dict: bool,
               generator: torch.Generator | None = None) -> DecoderOutput | tuple[Tensor]: ...

    def decode(
        self, z: Tensor, return_dict: bool = True, generator: torch.Generator | None = None
    ) -> DecoderOutput | tuple[Tensor]:
        """Unscaled latents -> images, as `.sample` (or a 1-tuple); `generator` is unused, as in diffusers."""
        self._offload_hook()
        images = self._run("decode", z)
        return DecoderOutput(sample=images) if return_dict else (images,)

    def forward(
        self,
        sample: Tensor,
        sample_posterior: bool = False,
        return_dict: bool = True,
        generator: torch.Generator | None = None,
    ) -> DecoderOutput | tuple[Tensor]:
        """Reconstruct `sample` through the posterior's mode, or a sample of it (diffusers' forward)."""
        posterior = self.encode(sample).latent_dist
        z = posterior.sample(generator=generator) if sample_posterior else posterior.mode()
        images = self.decode(z).sample
        return DecoderOutput(sample=images) if return_dict else (images,)

    # ---- the computation ---------------------------------------------------------------------------------
    def _offload_hook(self) -> None:
        # diffusers' @apply_forward_hook: with enable_model_cpu_offload, accelerate moves the model to the GPU in
        # this hook, which it attaches to forward only; pipelines call encode and decode instead.
        hook = getattr(self, "_hf_hook", None)
        if hook is not None and hasattr(hook, "pre_forward"):
            hook.pre_forward(self)

    def _run(self, op: str, x: Tensor) -> Tensor:
        """Encoder moments ("encode") or decoded images ("decode") of a batch, sliced and tiled as enabled."""
        check_float(x, op)  # cast below, 0..255 would pass for [-1, 1] values; diffusers fails on such a dtype
        # Checked whole (slices would name another shape), and for the tiled path, which would fail in its strips.
        c = self._klvae.config.in_channels if op == "encode" else self._klvae.config.latent_channels
        check_batch(x, c, "image" if op == "encode" else "latent")
        if self.use_slicing and x.shape[0] > 1:
            return torch.cat([self._run_batch(op, part) for part in x.split(1)])
        return self._run_batch(op, x)

    def _run_batch(self, op: str, x: Tensor) -> Tensor:
        vae, part = self._klvae, self._part(op)
        # The dtype and device of the half that runs: a pipeline may keep the encoder elsewhere, or in another
        # dtype, than the decoder. An input of another dtype or device is taken as diffusers' pipelines mean it
        # (they cast it themselves); diffusers would fail on it.
        ref = next(part.parameters())
        dtype = ref.dtype
        x = x.to(ref.device, dtype)
        if not self.use_tiling or x.shape[0] == 0:  # an empty batch has no strips: the plain pass gives its shape
            return _in_dtype(self._plain(op, x), dtype)
        if x.requires_grad and torch.is_grad_enabled():
            raise KlvaeError("klvae's tiled passes record no gradients: disable_tiling() to backpropagate through "
                             "the VAE")
        out = run_maybe_tiled(vae, op, x, dtype, plain=lambda t, _: self._plain(op, t),
                              tiled=lambda t, dt: run_guarded(part, self._tiled_fn(op), t, dt, f"tiled {op}"),
                              opts=self.tiling)
        # klvae leaves a tiled result over the budget in host memory; diffusers' callers expect it on the device.
        return _in_dtype(out.to(ref.device), dtype)

    def _part(self, op: str) -> nn.Module:
        """The modules an encode or a decode runs (their weights' dtype and device are the pass's)."""
        return pass_modules(self._klvae, op)

    def train(self, mode: bool = True) -> DiffusersVAE:
        """Training or eval mode, for the klvae model too (unregistered here, its modules are this wrapper's)."""
        super().train(mode)
        object.__setattr__(self._klvae, "training", mode)
        return self

    def _plain(self, op: str, x: Tensor) -> Tensor:
        """The untiled pass: diffusers' own computation, with klvae's fp32 rerun of a half-precision overflow."""
        vae = self._klvae
        fn = vae.encode_moments if op == "encode" else vae.decode
        recording = torch.is_grad_enabled() and (x.requires_grad or any(p.requires_grad for p in vae.parameters()))
        if recording or x.dtype not in _HALF:
            # The rerun swaps the weights' dtype, which a recorded graph could not backpropagate through; fp32 and
            # fp64 have nothing higher to rerun in. fp16 on the CPU is as slow here as under run_guarded.
            warn_if_slow(x.device, x.dtype)
            return fn(x)
        return run_guarded(self._part(op), lambda u, _: fn(u), x, x.dtype, op)

    def _tiled_fn(self, op: str) -> Callable[[Tensor, torch.dtype], Tensor]:
        """klvae's exact tiled encode (moments) or decode, streaming strips within the tiling budget."""
        vae = self._klvae

        def tiled(x: Tensor, dtype: torch.dtype) -> Tensor:
            rows = x.shape[2] * (vae.downsample_factor if op == "decode" else 1)
            streamer = make_streamer(vae, self.tiling, dtype, rows)
            return (tiled_decode if op == "decode" else tiled_encode_moments)(vae, x, streamer)

        return tiled


def as_diffusers(vae: AutoencoderKL | DiffusersVAE) -> DiffusersVAE:
    """`vae` behind diffusers' AutoencoderKL API, sharing its weights (a DiffusersVAE is returned as it is)."""
    if isinstance(vae, DiffusersVAE):
        return vae
    if not isinstance(vae, AutoencoderKL):
        raise TypeError(f"as_diffusers wraps a klvae.AutoencoderKL, not a {type(vae).__name__}")
    return DiffusersVAE(vae)
