"""The training loop: autoencoder and discriminator steps, accumulation, precision, EMA, checkpoints, DDP."""

from __future__ import annotations

import contextlib
import json
import logging
import math
from collections import defaultdict
from pathlib import Path
from typing import Any, cast

import torch
from torch import Tensor, nn
from torch.nn.parallel import DistributedDataParallel

from klvae.checks import is_integer
from klvae.datasources import resolve_spec
from klvae.distributed import (
    DistInfo,
    all_mean,
    all_ranks,
    all_sum,
    average_gradients,
    barrier,
    init_distributed,
    rank_device,
)
from klvae.errors import KlvaeError, WeightsError, quote
from klvae.inference.precision import usable_device
from klvae.model.autoencoder import AutoencoderKL
from klvae.model.config import AutoencoderKLConfig
from klvae.posterior import DiagonalGaussian
from klvae.training import checkpoint as ckpt
from klvae.training.config import TrainConfig, build_loss_config, surprises
from klvae.training.ema import make_ema
from klvae.training.losses import AutoencoderLoss
from klvae.training.model_setup import build_model
from klvae.training.resume import (
    config_changes,
    resumed_batch,
    saved_data_field,
    saved_global_batch,
)
from klvae.weights import check_state_dict, config_to_diffusers
from klvae.weights.read import exports_ema

log = logging.getLogger(__name__)


def _saved_model_section(s: dict[str, Any]) -> dict[str, Any] | None:
    """The model section of the config a checkpoint was written with, when it can be read."""
    try:
        saved = json.loads(s.get("config", ""))["model"]
    except (TypeError, ValueError, KeyError):
        return None
    return saved if isinstance(saved, dict) else None


def _describe(m: dict[str, Any]) -> str:
    # A checkpoint's saved config is a file's text: cut what it holds.
    return ", ".join(f"model.{k} {quote(m[k], 100)}" for k in ("preset", "pretrained", "overrides") if m.get(k))


def lr_factor(step: int, warmup: int, schedule: str, max_steps: int) -> float:
    """Linear warm-up, then constant or cosine decay to zero at max_steps."""
    if warmup > 0 and step < warmup:
        return (step + 1) / warmup
    if schedule == "cosine":
        progress = (step - warmup) / max(1, max_steps - warmup)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))
    return 1.0


# Below float32's smallest normal number, 1 / scale (which unscales the gradients) overflows to inf.
_MIN_SCALE = torch.finfo(torch.float32).tiny


def _scaled_step(scaler: torch.amp.GradScaler, opt: torch.optim.Optimizer, what: str) -> bool:
    """scaler.step and update; whether the optimiser stepped (on inf/NaN gradients the scaler skips the step and
    lowers its scale, the one outward sign of it, as accelerate also reads it)."""
    if not scaler.is_enabled():
        scaler.step(opt)
        return True
    before = scaler.get_scale()
    if before < _MIN_SCALE:
        # Reached by about 140 overflows in a row from 65536. The scaler checks the gradients for inf/NaN before
        # it multiplies them by 1 / scale = inf: the step would write inf/NaN into the weights (and at 0 the scale
        # never grows back). Raised before the optimiser runs, so the weights and the EMA stay whole.
        raise KlvaeError(f"train.precision fp16: the {what}'s gradients overflowed at every loss scale the gradient "
                         f"scaler tried, down to {before:.3g}, below which they cannot be unscaled; train in bf16 "
                         "or fp32")
    scaler.step(opt)
    scaler.update()
    return scaler.get_scale() >= before


class Reconstruct(nn.Module):
    """The training forward in one module (so DDP sees it): encode, z = mean + std * noise, decode."""

    def __init__(self, vae: AutoencoderKL, decoder_only: bool) -> None:
        super().__init__()
        self.vae, self.decoder_only = vae, decoder_only

    def forward(self, x: Tensor, noise: Tensor | None) -> tuple[Tensor, Tensor]:
        """Returns (reconstruction, posterior moments); noise None decodes the posterior mean."""
        with torch.no_grad() if self.decoder_only else contextlib.nullcontext():
            moments = self.vae.encode_moments(x)
        post = DiagonalGaussian(moments)
        z = post.mode() if noise is None else post.mean + post.std * noise
        return self.vae.decode(z), moments


class Trainer:
    """Runs `klvae train`: one instance per process (torchrun starts one per GPU)."""

    def __init__(self, cfg: TrainConfig, resumed: AutoencoderKLConfig | None = None) -> None:
        """`resumed`: the architecture of the checkpoint to be resumed (checkpoint.saved_model_config), which
        stands in for model.pretrained when those weights cannot be read."""
        self.cfg = cfg
        device = usable_device(cfg.train.device, "train.device")
        self.dist: DistInfo = init_distributed(device.type)
        self.device = rank_device(device, self.dist)
        self.out = Path(cfg.train.out_dir)
        torch.manual_seed(cfg.train.seed)  # the same initial weights on every rank
        if self.dist.is_main:
            for warning in surprises(cfg):
                log.warning("%s", warning)
        self.vae = build_model(cfg, resumed).to(self.device)  # cuda:LOCAL_RANK under torchrun, whatever index was set
        if cfg.data.resolution % self.vae.downsample_factor:
            raise KlvaeError(f"data.resolution must be a multiple of {self.vae.downsample_factor}")
        try:  # what export writes at the end: refused now, not after the last step
            config_to_diffusers(self.vae.config)
        except WeightsError as e:
            raise KlvaeError(f"the trained model could not be exported: {e}") from None
        self.loss = AutoencoderLoss(build_loss_config(cfg.loss)).to(self.device)
        self._build_optimisers()
        decay = cfg.train.ema_decay
        self.ema = make_ema(self.vae, decay, cfg.train.ema_warmup) if decay > 0 else None
        self.amp_dtype = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}[cfg.train.precision]
        fp16 = cfg.train.precision == "fp16"
        self.scaler = torch.amp.GradScaler(device.type, enabled=fp16)
        self.d_scaler = torch.amp.GradScaler(device.type, enabled=fp16)
        net = Reconstruct(self.vae, cfg.model.decoder_only)
        ids = [self.device] if self.device.type == "cuda" else None
        self.net: DistributedDataParallel | Reconstruct = (
            DistributedDataParallel(net, device_ids=ids) if self.dist.enabled else net)
        self.step, self.batches_done, self.nonfinite_run = 0, 0, 0
        # Unreadable reads met by this process; rank 0's also holds the all-ranks count saved before a resume,
        # so that the logged sum over ranks goes on from where it stopped, whatever the process count.
        self.bad_images = 0
        self._bad_images_total: int | None = None  # the sum over ranks at the last save()
        # Items of random-access training data: the epochs' orders depend on the count (None: streamed shards).
        self.data_items: int | None = None
        self.export_stale = False  # set by a resume that superseded later checkpoints: export at the end
        self._saved_data_items: int | None = None
        self._saved_global_batch: int | None = None  # images per global batch of the run resumed

    def _build_optimisers(self) -> None:
        o = self.cfg.optim
        self.loss_ae_params = list(self.loss.autoencoder_parameters())  # logvar when learned: not under DDP
        ae = [p for p in self.vae.parameters() if p.requires_grad] + self.loss_ae_params
        self.opt_ae = torch.optim.AdamW(ae, lr=o.lr, betas=o.betas, weight_decay=o.weight_decay)
        self.disc_params = list(self.loss.discriminator_parameters())
        self.opt_d = (torch.optim.AdamW(self.disc_params, lr=o.disc_lr, betas=o.betas, weight_decay=o.weight_decay)
                      if self.disc_params else None)

    # ---- state ------------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """Everything an exact resume needs."""
        return {
            "step": self.step, "batches_done": self.batches_done, "nonfinite_run": self.nonfinite_run,
            # Under DDP the sum over ranks that save() takes just before (this rank's own count outside it).
            "bad_images": self._bad_images_total if self.dist.enabled and self._bad_images_total is not None
            else self.bad_images,
            "vae": self.vae.state_dict(), "loss": self.loss.state_dict(),
            "ema": self.ema.state_dict() if self.ema is not None else None,
            "opt_ae": self.opt_ae.state_dict(), "opt_d": self.opt_d.state_dict() if self.opt_d else None,
            "scaler": self.scaler.state_dict(), "d_scaler": self.d_scaler.state_dict(),
            "rng": ckpt.rng_state(), "config": json.dumps(self.cfg.to_dict()), "world": self.dist.world,
            # The model's own config, so the checkpoint loads as a model anywhere (`--model step_*.pt`).
            "model_config": json.dumps(self.vae.config.to_dict()),
            "data_items": self.data_items if self.data_items is not None else self._saved_data_items,
        }

    def load_state_dict(self, s: dict[str, Any]) -> None:
        """Restore a state_dict(); the world size may differ (the data position is global)."""
        self._check_fits(s)
        self.vae.load_state_dict(s["vae"])
        self.loss.load_state_dict(s["loss"])
        if self.ema is not None and s.get("ema") is not None:
            self.ema.load_state_dict(s["ema"])
        elif self.ema is not None:
            # EMA switched on at this resume: it starts from the resumed weights, not the fresh init it copied
            # (an export or validation before its first update would give those).
            self.ema.module.load_state_dict(self.vae.state_dict())
        try:
            self.opt_ae.load_state_dict(s["opt_ae"])
            if self.opt_d is not None and s.get("opt_d") is not None:
                self.opt_d.load_state_dict(s["opt_d"])
        except (KeyError, TypeError, ValueError) as e:
            raise KlvaeError(f"the optimiser state does not fit this config (model.decoder_only or "
                             f"loss.learn_logvar changed?): {e}") from None
        # load_state_dict brings back the saved hyper-parameters too; this config's are the ones to train with
        # (lr is set every step). A resume that changes them is warned about before this.
        for opt in (self.opt_ae, self.opt_d):
            for group in opt.param_groups if opt is not None else ():
                group["betas"], group["weight_decay"] = tuple(self.cfg.optim.betas), self.cfg.optim.weight_decay
        # A run switched to fp16 starts its scalers afresh: an fp32 run saved them empty (disabled).
        for scaler, saved in ((self.scaler, s["scaler"]), (self.d_scaler, s["d_scaler"])):
            if saved:
                scaler.load_state_dict(saved)
        self.step, self.batches_done, self.nonfinite_run = s["step"], s["batches_done"], s["nonfinite_run"]
        self._saved_data_items = s.get("data_items") if is_integer(s.get("data_items")) else None  # older: none
        self._saved_global_batch = saved_global_batch(s)
        # One rank carries the saved sum (older checkpoints have none: 0); the others count afresh.
        self.bad_images = int(s.get("bad_images") or 0) if self.dist.is_main else 0
        try:
            ckpt.set_rng_state(s["rng"])
        except (KeyError, TypeError, ValueError, IndexError, RuntimeError) as e:
            raise KlvaeError(f"bad random-generator state: {type(e).__name__}: {e}") from None

    def _check_fits(self, s: dict[str, Any]) -> None:
        # torch's own load_state_dict reports every mismatched tensor on a line of its own: name them in one.
        mine, saved = _describe(vars(self.cfg.model)), _saved_model_section(s)
        theirs = _describe(saved) if saved is not None else mine
        what = f"this config's model ({mine}" + (f"; the checkpoint's was {theirs})" if theirs != mine else ")")
        check_state_dict(self.vae, s["vae"], what, shown=1)
        check_state_dict(self.loss, s["loss"], "this config's loss (loss.* settings)", shown=1)
        if self.ema is not None and s.get("ema") is not None:
            check_state_dict(self.ema, s["ema"], "this config's EMA model", shown=1)
        for part in ("vae", "loss", "ema"):
            # Training skips non-finite steps, so a whole run never saves these: a damaged file would train on
            # NaN (every step skipped) or, in a short run, export weights that no loader takes.
            if isinstance(s.get(part), dict) and (key := ckpt.non_finite_tensor(s[part])) is not None:
                raise KlvaeError(f"its {part} tensors hold NaN or inf ({quote(key)}): a damaged checkpoint; resume "
                                 "from an earlier one")
        for name, opt in (("opt_ae", self.opt_ae), ("opt_d", self.opt_d)):
            if opt is None or s.get(name) is None:
                continue  # no critic (one added or dropped since is refused above, by the loss's state dict)
            problem = ckpt.optimizer_state_problem(opt, s[name])
            if problem:
                raise KlvaeError(f"malformed optimiser state {name}: {problem}")

    def resume(self, path: str | Path | None = None) -> bool:
        """Load `path`, or the newest checkpoint of the run folder; False when there is none."""
        found = Path(path) if path else ckpt.latest_checkpoint(self.out / "checkpoints")
        if found is None:
            return False
        try:
            state = ckpt.load_training_state(found)
        except KlvaeError as e:
            older = ckpt.list_checkpoints(found.parent)[:-1] if path is None else []
            if older:  # e.g. a file torn outside klvae's atomic writes: the one before may be whole
                raise KlvaeError(f"{e}; move it away to resume from {older[-1].name}") from None
            raise
        try:
            self.load_state_dict(state)
        except KlvaeError as e:
            raise type(e)(f"cannot resume from {found}: {e}") from None
        log.info("resumed from %s at step %d", found, self.step)
        if self.dist.is_main and (later := ckpt.set_aside_later(self.out / "checkpoints", self.step)):
            self.export_stale = True  # final/ may hold the superseded steps' export, however new it is
            log.warning("%d checkpoint(s) of this run are past step %d (%s ...): renamed to *.superseded, so that "
                        "this run's own are the ones resumed and pruned", len(later), self.step, later[0].name)
        if exports_ema(state) != (self.exported_model() is not self.vae):
            self.export_stale = True  # train.export_ema (or the EMA) changed: final/ holds the other weights
        self._warn_if_streams_reshard(state)
        self._warn_if_config_changed(state)
        return True

    def _warn_if_config_changed(self, state: dict[str, Any]) -> None:
        # A resumed run with another batch size, lr or resolution is a different run from step N on: allowed (a
        # longer run, a lower lr to finish), but said, so that one edited by mistake does not pass unnoticed.
        changes = config_changes(state.get("config"), self.cfg)
        saved_g, g = self._saved_global_batch, self.global_batch
        if saved_g == g:  # N processes x B/N: the same trajectory, as documented
            changes = [c for c in changes if not c.startswith("data.batch_size ")]
        elif saved_g is not None and self.dist.is_main:
            log.warning("resuming with a global batch of %d images (%d process(es) x data.batch_size %d), %d when the "
                        "checkpoint was written: a different run from here on (random-access data go on from the "
                        "same place in the same epoch)", g, self.dist.world, self.cfg.data.batch_size, saved_g)
        if changes and self.dist.is_main:
            log.warning("resuming with a config that differs from the checkpoint's: %s", "; ".join(changes))

    def _warn_if_streams_reshard(self, state: dict[str, Any]) -> None:
        # Other sources keep one global order whatever the process or worker count; shards are split among the
        # processes and their loader workers, so with other counts each reads other shards and skips its own
        # count of consumed batches.
        saved_world, now_world = state.get("world"), self.dist.world
        saved_workers = saved_data_field(state, "num_workers")
        # 0 workers (the main process reads) split the shards as 1 does.
        workers = [max(1, n) if is_integer(n) else None for n in (saved_workers, self.cfg.data.num_workers)]
        changed = saved_world not in (None, now_world) or (None not in workers and workers[0] != workers[1])
        if not changed or resolve_spec(self.cfg.data.train).kind != "tar":
            return
        log.warning("resuming a run over .tar shards saved with %s process(es) and data.num_workers %s, now %d and "
                    "%d: the shards are shared out anew, so the data from here on is not what the interrupted run "
                    "would have read", saved_world, saved_workers, now_world, self.cfg.data.num_workers)

    @property
    def global_batch(self) -> int:
        """Images per optimiser micro-step over all processes (data.batch_size x processes)."""
        return self.cfg.data.batch_size * self.dist.world

    def start_batch(self, n: int) -> int:
        """The global batch to read first from random-access data of `n` items; says what a resume changed."""
        saved_items, saved_g, g = self._saved_data_items, self._saved_global_batch, self.global_batch
        self.data_items, main = n, self.dist.is_main
        if saved_g is not None and saved_g != g:
            # batches_done counts the saved run's global batches: read as this run's, they would point elsewhere
            # in the epoch (images read twice, others skipped). Converted to the same place in the same epoch.
            before = self.batches_done
            self.batches_done = resumed_batch(before, saved_g, g, saved_items or n, n)
            if main:
                log.info("the data position, %d global batches of %d images, goes on at %d of %d", before, saved_g,
                         self.batches_done, g)
        if saved_items not in (None, n) and main:
            # Global batch k of an epoch is a slice of that epoch's permutation of all items: with another count
            # the permutations are others, and the resumed position falls elsewhere in them.
            log.warning("data.train holds %d item(s), %d when the checkpoint was written: the epochs' orders are "
                        "drawn anew for %d, so until the next epoch starts some images are seen twice and others "
                        "not at all", n, saved_items, n)
        return self.batches_done

    def save(self) -> Path | None:
        """Rank 0 writes a checkpoint; every rank waits for it."""
        path = None
        # Each rank counts its own unreadable reads: the sum is saved (a collective, so on every rank).
        self._bad_images_total = int(all_sum(torch.tensor(self.bad_images, device=self.device), self.dist).item())
        if self.dist.is_main:
            path = ckpt.save_checkpoint(self.state_dict(), self.out / "checkpoints", self.step)
            log.info("checkpoint %s", path)
        barrier(self.dist)
        return path

    def exported_model(self) -> AutoencoderKL:
        """The weights that export writes: the EMA when kept and asked for, else the trained ones."""
        return cast(AutoencoderKL, self.ema.module) if self.ema is not None and self.cfg.train.export_ema else self.vae

    def lpips_files(self) -> tuple[str | None, str | None] | None:
        """The VGG16 and LPIPS-head files the loss config names (also used by validation's LPIPS); None when
        train.val_lpips turns validation's LPIPS off."""
        if not self.cfg.train.val_lpips:
            return None
        return self.loss.config.lpips_vgg_path, self.loss.config.lpips_lin_path

    def export(self) -> Path:
        """Write exported_model() with save_pretrained to out_dir/final."""
        return self.exported_model().save_pretrained(self.out / "final")

    # ---- one optimiser step -----------------------------------------------------------------------
    def _noise(self, x: Tensor, micro: int) -> Tensor | None:
        # Posterior noise for the whole global batch from (seed, step, micro), sliced to this rank: the
        # same numbers whatever the world size or a resume, so 1 and N processes follow one trajectory.
        if not self.cfg.train.sample_posterior:
            return None
        f, c = self.vae.downsample_factor, self.vae.config.latent_channels
        b = x.shape[0]
        g = torch.Generator().manual_seed(self.noise_seed(self.step, micro))
        full = torch.randn((b * self.dist.world, c, x.shape[2] // f, x.shape[3] // f), generator=g)
        return full[self.dist.rank * b : (self.dist.rank + 1) * b].to(self.device)

    def noise_seed(self, step: int, micro: int) -> int:
        """The seed of step `step`'s micro-batch `micro`: distinct for every (step, micro) of a run."""
        # Steps 101 apart, as ever (the same noise as before for up to 101 micro-batches a step), or
        # grad_accum apart where that is more, so that a step's last micro-batches never reuse the next one's.
        stride = max(101, self.cfg.optim.grad_accum)
        return self.cfg.train.seed * 1_000_003 + step * stride + micro

    def _autocast(self) -> contextlib.AbstractContextManager:
        if self.amp_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.amp_dtype)

    def _all_finite(self, *values: Tensor) -> bool:
        ok = all(bool(torch.isfinite(v).all()) for v in values)
        return all_ranks(ok, self.dist, self.device)  # every rank decides alike, so none hangs

    def _micro_step(self, x: Tensor, i: int, accum: int, disc_on: bool, logs: dict[str, float]) -> bool:
        last = i == accum - 1
        sync = self.net.no_sync() if isinstance(self.net, DistributedDataParallel) and not last \
            else contextlib.nullcontext()
        with sync:
            self.loss.discriminator_requires_grad(False)  # the generator pass must not train the critic
            with self._autocast():
                rec, moments = self.net(x, self._noise(x, i))
                loss, g_logs = self.loss.generator_loss(
                    x, rec, DiagonalGaussian(moments.float()), self.step,
                    last_layer=self.vae.decoder.conv_out.weight,
                )
            if not self._all_finite(loss):
                return False
            self.scaler.scale(loss / accum).backward()
        d_logs: dict[str, Tensor] = {}
        if disc_on:
            self.loss.discriminator_requires_grad(True)
            with self._autocast():
                d_loss, d_logs = self.loss.discriminator_loss(x, rec.detach(), self.step)
            if not self._all_finite(d_loss):
                return False
            self.d_scaler.scale(d_loss / accum).backward()
        for k, v in {**g_logs, **d_logs}.items():
            logs[k] += float(v) / accum
        return True

    def _apply_gradients(self, disc_on: bool) -> bool:
        """Step the optimisers and the EMA; False when fp16's gradient scaler skipped the autoencoder's step."""
        clip = self.cfg.optim.grad_clip
        # DDP averaged the autoencoder's gradients but not logvar's; average it too (before clipping, whose norm
        # includes it), or each rank's logvar drifts apart and only rank 0's reaches the checkpoint.
        average_gradients(self.loss_ae_params, self.dist)
        self.scaler.unscale_(self.opt_ae)
        if clip > 0:
            torch.nn.utils.clip_grad_norm_([p for g in self.opt_ae.param_groups for p in g["params"]], clip)
        stepped = _scaled_step(self.scaler, self.opt_ae, "autoencoder")
        if disc_on and self.opt_d is not None:
            average_gradients(self.disc_params, self.dist)
            self.d_scaler.unscale_(self.opt_d)
            if clip > 0:
                torch.nn.utils.clip_grad_norm_(self.disc_params, clip)
            _scaled_step(self.d_scaler, self.opt_d, "discriminator")
        # The EMA follows the optimiser: a skipped step leaves the weights as they were, so averaging them again
        # would only advance the EMA's update count (its decay warm-up) and pull it towards the current weights.
        if self.ema is not None and stepped:
            self.ema.update_parameters(self.vae)
        return stepped

    def train_step(self, micro_batches: list[Tensor]) -> dict[str, float]:
        """Accumulate over micro-batches, step both optimisers; a non-finite loss skips the whole step."""
        o = self.cfg.optim
        for opt, base in ((self.opt_ae, o.lr), (self.opt_d, o.disc_lr)):
            for group in opt.param_groups if opt is not None else ():
                group["lr"] = base * lr_factor(self.step, o.warmup_steps, o.schedule, self.cfg.train.max_steps)
        self.opt_ae.zero_grad(set_to_none=True)
        if self.opt_d is not None:
            self.opt_d.zero_grad(set_to_none=True)
        disc_on = self.opt_d is not None and self.loss.discriminator_active(self.step)
        logs: dict[str, float] = defaultdict(float)
        finite = all(
            self._micro_step(x.to(self.device, non_blocking=True), i, len(micro_batches), disc_on, logs)
            for i, x in enumerate(micro_batches)
        )
        self.loss.discriminator_requires_grad(True)
        stepped = finite and self._apply_gradients(disc_on)
        if finite:
            self.nonfinite_run = 0  # an fp16 overflow that the scaler skips is routine, not a non-finite loss
        else:
            logs.clear()  # the micro-batches before the non-finite one are part of a loss, not the step's (all ranks)
            self.nonfinite_run += 1
            # Numbered as metrics.jsonl's rows and the progress bar count: the steps done, this one included.
            log.warning("step %d: non-finite loss, step skipped (%d in a row)", self.step + 1, self.nonfinite_run)
        self.step += 1  # a skipped step still consumed its data
        if self.nonfinite_run >= self.cfg.train.max_nonfinite:
            raise KlvaeError(f"{self.nonfinite_run} non-finite losses in a row; stopping (train.max_nonfinite)")
        keys = sorted(logs)
        values = all_mean(torch.tensor([logs[k] for k in keys], device=self.device), self.dist).tolist()
        out = dict(zip(keys, values, strict=True))
        out.update(lr=self.opt_ae.param_groups[0]["lr"], skipped=float(not stepped))
        return out
