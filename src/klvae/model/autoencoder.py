"""The KL autoencoder: encoder, decoder, and the module that joins them through a diagonal Gaussian."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from klvae.model.blocks import DownBlock, MidBlock, UpBlock, group_norm
from klvae.model.config import AutoencoderKLConfig, get_preset
from klvae.posterior import DiagonalGaussian


class Encoder(nn.Module):
    """Image [B, in, H, W] -> moments [B, 2*latent, H/f, W/f] (before quant_conv)."""

    def __init__(self, cfg: AutoencoderKLConfig) -> None:
        super().__init__()
        ch, g, eps = cfg.block_out_channels, cfg.norm_num_groups, cfg.norm_eps
        self.conv_in = nn.Conv2d(cfg.in_channels, ch[0], 3, padding=1)
        self.down_blocks = nn.ModuleList(
            DownBlock(ch[max(i - 1, 0)], ch[i], cfg.layers_per_block, g, eps, down=i < len(ch) - 1)
            for i in range(len(ch))
        )
        self.mid_block = MidBlock(ch[-1], g, eps, cfg.attention)
        self.conv_norm_out = group_norm(ch[-1], g, eps)
        self.conv_out = nn.Conv2d(ch[-1], 2 * cfg.latent_channels, 3, padding=1)
        self.gradient_checkpointing = False

    def stages(self) -> Iterator[nn.Module]:
        """The blocks in execution order, for gradient checkpointing and streamed execution."""
        yield from self.down_blocks
        yield self.mid_block

    def forward(self, x: Tensor) -> Tensor:
        """Image [B, in, H, W] (H, W multiples of the downsample factor) -> moments [B, 2*latent, H/f, W/f]."""
        h = self.conv_in(x)
        for stage in self.stages():
            h = _run(stage, h, self.gradient_checkpointing)
        return self.conv_out(self.conv_norm_out(h, silu=True))


class Decoder(nn.Module):
    """Latent [B, latent, h, w] (after post_quant_conv) -> image [B, out, h*f, w*f]."""

    def __init__(self, cfg: AutoencoderKLConfig) -> None:
        super().__init__()
        ch, g, eps = tuple(reversed(cfg.decoder_widths)), cfg.norm_num_groups, cfg.norm_eps
        self.conv_in = nn.Conv2d(cfg.latent_channels, ch[0], 3, padding=1)
        self.mid_block = MidBlock(ch[0], g, eps, cfg.attention)
        self.up_blocks = nn.ModuleList(
            UpBlock(ch[max(i - 1, 0)], ch[i], cfg.layers_per_block + 1, g, eps, up=i < len(ch) - 1)
            for i in range(len(ch))
        )
        self.conv_norm_out = group_norm(ch[-1], g, eps)
        self.conv_out = nn.Conv2d(ch[-1], cfg.out_channels, 3, padding=1)
        self.gradient_checkpointing = False

    def stages(self) -> Iterator[nn.Module]:
        """The blocks in execution order, for gradient checkpointing and streamed execution."""
        yield self.mid_block
        yield from self.up_blocks

    def forward(self, z: Tensor) -> Tensor:
        """Latent [B, latent, h, w] -> image [B, out, h*f, w*f]."""
        h = self.conv_in(z)
        for stage in self.stages():
            h = _run(stage, h, self.gradient_checkpointing)
        return self.conv_out(self.conv_norm_out(h, silu=True))


def _run(stage: nn.Module, h: Tensor, checkpoint: bool) -> Tensor:
    if checkpoint and torch.is_grad_enabled():
        return torch.utils.checkpoint.checkpoint(stage, h, use_reentrant=False)
    return stage(h)


def check_batch(t: Tensor, channels: int, what: str) -> None:
    """ValueError unless `t` is a batch [B, channels, H, W] of `what`s (images, latents) with pixels."""
    # Else torch's error names a GroupNorm's or conv's internal shapes (a 3-D image fails in the first GroupNorm).
    if t.ndim != 4 or t.shape[1] != channels or 0 in t.shape[2:]:
        raise ValueError(f"expected a batch of {what}s [B, {channels}, H, W], got shape {list(t.shape)}")


class AutoencoderKL(nn.Module):
    """The KL-regularised autoencoder of latent diffusion, numerically the same network as diffusers'."""

    def __init__(self, config: AutoencoderKLConfig | str | dict[str, Any] | None = None) -> None:
        super().__init__()
        if config is None:
            config = AutoencoderKLConfig()
        elif isinstance(config, str):
            config = get_preset(config)
        elif isinstance(config, dict):  # AutoencoderKLConfig.to_dict()'s form (diffusers' is config_from_diffusers's)
            config = AutoencoderKLConfig.from_dict(config)
        elif not isinstance(config, AutoencoderKLConfig):
            raise TypeError(f"config must be an AutoencoderKLConfig, a preset name or a dict of its fields, got a "
                            f"{type(config).__name__}")
        self.config = config
        c = config.latent_channels
        self.encoder = Encoder(config)
        self.decoder = Decoder(config)
        self.quant_conv = nn.Conv2d(2 * c, 2 * c, 1) if config.use_quant_conv else None
        self.post_quant_conv = nn.Conv2d(c, c, 1) if config.use_post_quant_conv else None

    # ---- core computation -------------------------------------------------------------------------
    def encode_moments(self, x: Tensor) -> Tensor:
        """Image [B, C, H, W] in [-1, 1] -> posterior moments [B, 2*latent, H/f, W/f] (mean, logvar)."""
        self.check_encodable(x)
        h = self.encoder(x)
        return self.quant_conv(h) if self.quant_conv is not None else h

    def check_encodable(self, x: Tensor) -> None:
        """ValueError unless x is a batch of images [B, C, H, W] of at least one latent cell each way."""
        check_batch(x, self.config.in_channels, "image")
        f = self.config.downsample_factor
        if min(x.shape[2:]) < f:  # else torch's error about a conv's kernel and its padded input, deep inside
            raise ValueError(f"images of {x.shape[2]}x{x.shape[3]} pixels are smaller than one latent cell "
                             f"({f}x{f}): pad them first (klvae.inference.encode does)")

    def encode(self, x: Tensor) -> DiagonalGaussian:
        """Image [B, C, H, W] in [-1, 1] -> the diagonal Gaussian posterior q(z | x)."""
        return DiagonalGaussian(self.encode_moments(x))

    def decode(self, z: Tensor) -> Tensor:
        """Unscaled latent [B, latent, h, w] -> image [B, C, h*f, w*f], roughly in [-1, 1]."""
        check_batch(z, self.config.latent_channels, "latent")
        if self.post_quant_conv is not None:
            z = self.post_quant_conv(z)
        return self.decoder(z)

    def forward(
        self, x: Tensor, sample_posterior: bool = True, generator: torch.Generator | None = None
    ) -> tuple[Tensor, DiagonalGaussian]:
        """Reconstruct x through a posterior sample (or its mode); returns (reconstruction, posterior).

        This is LDM's forward, sampling by default as training wants; diffusers' `vae(x)` decodes the mode, which
        is `vae(x, sample_posterior=False)` here.
        """
        posterior = self.encode(x)
        z = posterior.sample(generator) if sample_posterior else posterior.mode()
        return self.decode(z), posterior

    # ---- latent scaling ---------------------------------------------------------------------------
    def scale_latents(self, z: Tensor) -> Tensor:
        """VAE latent -> the diffusion model's latent: (z - shift) * scale, per channel where the config says."""
        return self.config.latent_norm.scale(z, self.config.latent_channels)

    def unscale_latents(self, z: Tensor) -> Tensor:
        """The diffusion model's latent -> VAE latent: z / scale + shift."""
        return self.config.latent_norm.unscale(z, self.config.latent_channels)

    # ---- conveniences -----------------------------------------------------------------------------
    @property
    def downsample_factor(self) -> int:
        """Pixels per latent cell along one side."""
        return self.config.downsample_factor

    @property
    def device(self) -> torch.device:
        """Where the parameters live."""
        return next(self.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        """The parameters' dtype."""
        return next(self.parameters()).dtype

    def enable_gradient_checkpointing(self, enabled: bool = True) -> None:
        """Recompute block activations in backward to save memory during training."""
        self.encoder.gradient_checkpointing = enabled
        self.decoder.gradient_checkpointing = enabled

    def num_parameters(self) -> dict[str, int]:
        """Parameter counts of the encoder side, the decoder side and the whole."""
        def count(*mods: nn.Module | None) -> int:
            return sum(p.numel() for m in mods if m is not None for p in m.parameters())

        enc, dec = count(self.encoder, self.quant_conv), count(self.decoder, self.post_quant_conv)
        return {"encoder": enc, "decoder": dec, "total": enc + dec}

    # ---- weights (the formats live in klvae.weights; imported lazily to keep the model free of IO) ----
    @classmethod
    def from_pretrained(
        cls,
        path_or_id: str | Path,
        subfolder: str | None = None,
        config: AutoencoderKLConfig | str | dict[str, Any] | None = None,
        dtype: torch.dtype | None = None,
        device: str | torch.device | None = None,
        revision: str | None = None,
        variant: str | None = None,
        use_safetensors: bool | None = None,
        local_files_only: bool = False,
    ) -> AutoencoderKL:
        """Load a diffusers folder, a single LDM/diffusers file, a hub id, or a preset name's hub weights; a hub
        id or preset at a branch, tag or commit with `revision` (or as "org/name@revision"); a folder's or hub
        repo's `variant` ("fp16": diffusion_pytorch_model.fp16.safetensors) where given. As in diffusers,
        `use_safetensors=True` reads safetensors only, False pickled .bin only, and `local_files_only` never
        asks the network (the hub cache only)."""
        from klvae.weights.load import load_pretrained

        return load_pretrained(cls, path_or_id, subfolder=subfolder, config=config, dtype=dtype, device=device,
                               revision=revision, variant=variant, use_safetensors=use_safetensors,
                               local_files_only=local_files_only)

    @classmethod
    def from_single_file(
        cls,
        path: str | Path,
        config: AutoencoderKLConfig | str | dict[str, Any] | None = None,
        dtype: torch.dtype | None = None,
        device: str | torch.device | None = None,
        local_files_only: bool = False,
    ) -> AutoencoderKL:
        """One weights file (an LDM or FLUX VAE file, a full SD checkpoint's VAE): diffusers' name for loading it."""
        if Path(path).is_dir():
            raise ValueError(f"{path} is a folder: from_single_file takes one weights file (from_pretrained takes "
                             "folders)")
        return cls.from_pretrained(path, config=config, dtype=dtype, device=device, local_files_only=local_files_only)

    def save_pretrained(self, directory: str | Path, **kwargs: Any) -> Path:
        """Write config.json + diffusion_pytorch_model.safetensors, loadable by diffusers too."""
        from klvae.weights.save import save_pretrained

        return save_pretrained(self, directory, **kwargs)
