"""The evaluation run: reconstruct a data set with one or more models; per-image PSNR/SSIM/LPIPS and set rFID."""

from __future__ import annotations

import datetime
import functools
import logging
import math
import platform
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from klvae import __version__, inference
from klvae.atomic import check_not_in_data, inside
from klvae.errors import ImageError, KlvaeError, Namer, OptionError, first_line, keyword, none_read, quote
from klvae.evaluation.fid import FEATURE_DIM, FIDReference
from klvae.evaluation.metrics import MetricAccumulator, psnr, ssim
from klvae.images import MAX_PIXELS, pil_to_tensor
from klvae.inference import TileOptions
from klvae.latents.buckets import resize_crop
from klvae.latents.options import check_at_least
from klvae.latents.sources import ItemSource, item_error, open_source
from klvae.model.autoencoder import AutoencoderKL
from klvae.nets.inception import InceptionV3Features, resolve_inception_weights
from klvae.nets.pretrained import torch_state_dict
from klvae.progress import progress_bar

log = logging.getLogger(__name__)

CROPS = ("center", "none")
# SSIM's 11-pixel window and LPIPS's four poolings both need this much.
MIN_SIDE = 16


@dataclass
class EvalOptions:
    """How images are prepared and run: --resolution, --crop, --limit, batching, precision and tiling."""

    resolution: int = 256
    crop: str = "center"
    limit: int | None = None
    batch_size: int = 4
    dtype: torch.dtype = torch.float32
    tiling: TileOptions | None = None
    examples: int = 4
    image_column: str = "image"

    def check(self) -> None:
        """Raise OptionError (naming the fields; `flags()`: klvae eval's flags) on values no run can use."""
        if self.crop not in CROPS:
            raise OptionError(lambda n: f"{n('crop')} must be one of {', '.join(CROPS)}, got {self.crop!r}")
        check_at_least("resolution", self.resolution, MIN_SIDE)
        if self.resolution > math.isqrt(MAX_PIXELS):
            raise OptionError(lambda n: f"{n('resolution')} must be at most {math.isqrt(MAX_PIXELS)} (a square of at "
                                        f"most {MAX_PIXELS} pixels), got {self.resolution}")
        if self.limit is not None:
            check_at_least("limit", self.limit, 1)
        check_at_least("batch_size", self.batch_size, 1)
        check_at_least("examples", self.examples, 0)


@dataclass
class MetricNets:
    """The learned metrics of a run; None where unavailable, with the reason in `left_out`."""

    lpips: nn.Module | None = None
    inception: InceptionV3Features | None = None
    left_out: dict[str, str] = field(default_factory=dict)


@dataclass
class EvalResult:
    """Everything a report needs: per-image rows, per-model summaries, rFID and what was skipped."""

    models: list[str]
    ids: list[str] = field(default_factory=list)
    values: dict[str, dict[str, list[float]]] = field(default_factory=dict)  # model -> metric -> per id
    summaries: dict[str, dict[str, dict[str, float]]] = field(default_factory=dict)
    rfid: dict[str, float | None] = field(default_factory=dict)
    skipped: list[dict[str, str]] = field(default_factory=list)
    found: int = 0
    available: int = 0
    metrics: list[str] = field(default_factory=list)
    left_out: dict[str, str] = field(default_factory=dict)
    enlarged: list[int] = field(default_factory=list)  # smallest side of each image scaled up to cover the crop
    ok: dict[str, list[bool]] = field(default_factory=dict)  # model -> per id: reconstructed (finite)?
    failed: dict[str, list[dict[str, str]]] = field(default_factory=dict)  # model -> [{"id", "error"}]

    def rows(self) -> Iterator[dict[str, Any]]:
        """metrics.csv rows: one per (image, model), image-major so the models of an image sit together."""
        for i, item_id in enumerate(self.ids):
            for m in self.models:
                yield {"id": item_id, "model": m, **{k: self.values[m][k][i] for k in self.metrics if k != "rfid"}}

    def done(self, model: str) -> list[bool]:
        """Per id, whether `model` reconstructed it (a result built by hand, without `ok`, has it everywhere)."""
        return self.ok.get(model) or [True] * len(self.ids)


def build_metric_nets(
    device: torch.device,
    lpips: bool = True,
    lpips_vgg: str | Path | None = None,
    lpips_lin: str | Path | None = None,
    fid: bool = True,
    inception_weights: str | Path | None = None,
    *,
    names: Namer = keyword,
) -> MetricNets:
    """LPIPS and the FID Inception with pretrained weights. A weights file named here must load, else a one-line
    KlvaeError; weights looked for automatically (hub cache, download) are left out with a warning if missing.
    Messages name these arguments as `names` does: as keywords (klvae.errors.keyword), or `klvae eval`'s flags."""
    from klvae.nets.lpips import LPIPS, resolve_lin_weights, resolve_vgg_weights

    nets = MetricNets()
    if not lpips:
        nets.left_out["lpips"] = f"disabled ({names('lpips', False)})"
    else:
        net = LPIPS(pretrained=False)
        files = (("lpips_vgg", net.load_vgg, resolve_vgg_weights, lpips_vgg),
                 ("lpips_lin", net.load_lin, resolve_lin_weights, lpips_lin))
        # The named files first: a wrong one fails at once, before any download is tried.
        for option, load, _, path in files:
            if path is not None:
                load_named_weights(load, path, option, names)
        found = [(load, functools.partial(resolve, hint=f"pass {names(option, '<file>')}"))
                 for option, load, resolve, path in files if path is None]
        if _load_found(found, "LPIPS", nets.left_out, "lpips"):
            nets.lpips = net.to(device)
    if not fid:
        nets.left_out["rfid"] = f"disabled ({names('fid', False)})"
    else:
        inception = InceptionV3Features(pretrained=False)
        if inception_weights is not None:
            load_named_weights(inception.load, inception_weights, "inception_weights", names)
        resolve = functools.partial(resolve_inception_weights, hint=f"pass {names('inception_weights', '<file>')}")
        if _load_found([(inception.load, resolve)] if inception_weights is None else [], "rFID", nets.left_out,
                       "rfid"):
            nets.inception = inception.to(device)
    return nets


def _load_found(loads: Sequence[tuple[Callable[[Any], None], Callable[[], Any]]], metric: str,
                left_out: dict[str, str], key: str) -> bool:
    # Weights nobody named may be missing here (offline, no cache): the metric is left out, with one line that
    # names the option for a local file (each resolver's message carries it).
    try:
        for load, resolve in loads:
            load(resolve())
    except KlvaeError as e:
        reason = first_line(e)
        log.warning("%s left out: %s", metric, reason)
        left_out[key] = f"weights unavailable: {reason}"
        return False
    return True


def load_named_weights(load: Callable[[Any], None], path: str | Path, option: str, names: Namer = keyword) -> None:
    """Load a weights file the user named with `load`; any failure is a one-line KlvaeError naming the option (and
    the file) as `names` does."""
    p = Path(path).expanduser()
    named = names(option, p)
    if not p.is_file():
        raise KlvaeError(f"{named}: no such file")
    try:
        sd = torch_state_dict(p)
    except ValueError as e:
        raise KlvaeError(f"{named} {e}") from None
    try:
        load(sd)
    except KlvaeError as e:  # WeightsError: missing, unexpected or mis-shaped keys
        raise KlvaeError(f"{named}: {first_line(e)}") from None


def prepare(img: Any, opts: EvalOptions) -> Tensor:
    """PIL image -> [3, H, W] in [-1, 1]: centre-cropped to resolution², or the full image for crop=none."""
    if opts.crop == "center":
        img, _ = resize_crop(img, (opts.resolution, opts.resolution))
    elif min(img.size) < MIN_SIDE:
        raise ImageError(f"{img.width}x{img.height} is too small to measure; at least {MIN_SIDE} px a side")
    return pil_to_tensor(img)


def is_enlarged(img: Any, opts: EvalOptions) -> bool:
    """Whether prepare() scales `img` up: a centre crop larger than the image's shorter side."""
    return opts.crop == "center" and min(img.size) < opts.resolution


def warn_enlarged(sides: list[int], total: int, resolution: int) -> None:
    """One warning for the images scaled up to cover the crop, with a setting that avoids it."""
    if not sides:
        return
    # Upsampling smooths an image, which the autoencoder reconstructs more easily: the scores come out too good.
    smallest = min(sides)
    # Below MIN_SIDE neither a smaller --resolution (refused) nor --crop none (too small to measure) helps.
    advice = (f"pass --resolution {smallest} or less, or --crop none" if smallest >= MIN_SIDE else
              f"images under {MIN_SIDE} px a side are measured only enlarged; --resolution {MIN_SIDE} enlarges "
              f"them least")
    log.warning("%d of %d images were enlarged to cover %dx%d (smallest side %d px), which smooths them and "
                "inflates PSNR/SSIM; %s", len(sides), total, resolution, resolution, smallest, advice)


def quantise(x: Tensor) -> Tensor:
    """Round [-1, 1] pixels to the 8-bit values a saved reconstruction would hold."""
    return ((x.clamp(-1, 1) + 1) * 127.5).round() / 127.5 - 1


@torch.no_grad()
def _decoded(vae: AutoencoderKL, x: Tensor, opts: EvalOptions) -> Tensor:
    post = inference.encode(vae, x, opts.dtype, opts.tiling)
    out = inference.decode(vae, post.mode(), opts.dtype, size=tuple(x.shape[-2:]), tiling=opts.tiling)
    return out.float().to(x.device)  # a huge tiled result may stay in host memory


NON_FINITE = "the reconstruction holds NaN or infinite values"


@torch.no_grad()
def reconstruct_checked(vae: AutoencoderKL, x: Tensor, opts: EvalOptions) -> tuple[Tensor, list[str | None]]:
    """Encode to the posterior mean and decode, at the input's size; 8-bit-rounded, fp32, on x's device; and per
    image why it failed (None where it did not): a failed image comes back all NaN."""
    try:
        out = _decoded(vae, x, opts)
    except KlvaeError as e:  # non-finite latents: one image of the batch may be to blame, so try each alone
        if x.shape[0] > 1:
            parts = [reconstruct_checked(vae, x[i : i + 1], opts) for i in range(x.shape[0])]
            return torch.cat([r for r, _ in parts]), [why for _, w in parts for why in w]
        return torch.full_like(x, math.nan, dtype=torch.float32), [first_line(e)]
    # Checked before quantise, whose clamp would turn an infinity into a white or black pixel (decode leaves
    # non-finite output unclamped).
    finite = torch.isfinite(out).flatten(1).all(1)
    out = quantise(out).masked_fill(~finite.view(-1, 1, 1, 1), math.nan)
    return out, [None if f else NON_FINITE for f in finite.tolist()]


def iter_batches(
    source: ItemSource, ids: list[str], opts: EvalOptions, skipped: list[dict[str, str]],
    enlarged: list[int] | None = None,
) -> Iterator[tuple[list[str], Tensor]]:
    """Batches of prepared images of one size; unreadable items are logged, appended to `skipped` and passed over;
    the smallest side of each image scaled up is appended to `enlarged`."""
    batch_ids: list[str] = []
    batch: list[Tensor] = []
    for item_id in ids:
        try:
            img = source.load(item_id)
            t = prepare(img, opts)
        except Exception as e:  # ImageError, or a decoder's own (PIL raises many kinds): this image, not the run
            log.warning("skipping %s", item_error(item_id, e))
            skipped.append({"id": item_id, "error": item_error(item_id, e)})
            continue
        if enlarged is not None and is_enlarged(img, opts):
            enlarged.append(min(img.size))
        # crop=none gives images of many sizes; a batch holds one size, so a size change flushes it.
        if batch and (t.shape != batch[0].shape or len(batch) == opts.batch_size):
            yield batch_ids, torch.stack(batch)
            batch_ids, batch = [], []
        batch_ids.append(item_id)
        batch.append(t)
    if batch:
        yield batch_ids, torch.stack(batch)


def _per_image(nets: MetricNets, x: Tensor, r: Tensor) -> dict[str, Tensor]:
    # SSIM's luminance term is not shift-invariant: the standard value is that of [0, 1] (or 8-bit) images.
    out = {"psnr": psnr(x, r, data_range=2.0), "ssim": ssim(x, r, data_range=2.0)}
    if nets.lpips is not None:
        out["lpips"] = nets.lpips(x, r).flatten()
    return {k: v.detach().float().cpu() for k, v in out.items()}


def _measure(res: EvalResult, m: str, vae: AutoencoderKL, x: Tensor, batch_ids: list[str], opts: EvalOptions,
             nets: MetricNets, acc: MetricAccumulator, feats: list[Tensor]) -> None:
    """One model on one batch: per-image values (NaN where it failed), its running means over the images it
    reconstructed, and their Inception features."""
    x_dev = x.to(vae.device)
    r, errors = reconstruct_checked(vae, x_dev, opts)
    ok = torch.tensor([e is None for e in errors])
    for item_id, why in zip(batch_ids, errors, strict=True):
        if why is not None:
            # A model that fails on an image is the model's failure, not the run's: the others still score it.
            log.warning("%s failed on %s: %s; left out of its means and rFID", m, item_id, why)
            res.failed[m].append({"id": item_id, "error": why})
    res.ok[m].extend(ok.tolist())
    for k, v in _per_image(nets, x_dev, r).items():
        v = v.masked_fill(~ok, math.nan)
        res.values[m][k].extend(v.tolist())
        acc.update(k, v[ok])
    if nets.inception is not None and ok.any():
        feats.append(_features(nets.inception, r[ok.to(r.device)]))


@torch.no_grad()
def check_models(models: object) -> None:
    """TypeError unless `models` maps names (str) to klvae AutoencoderKLs; KlvaeError when it is empty."""
    want = "models must map names (str) to klvae AutoencoderKLs, as {'mine': vae}"
    if not isinstance(models, Mapping):
        raise TypeError(f"{want}, got {type(models).__name__}")
    if bad := next(((k, v) for k, v in models.items()
                    if not isinstance(k, str) or not isinstance(v, AutoencoderKL)), None):
        raise TypeError(f"{want}, got {quote(bad[0])}: {type(bad[1]).__name__}")
    if not models:
        raise KlvaeError("no model to evaluate")


def evaluate(
    models: Mapping[str, AutoencoderKL], source: ItemSource, opts: EvalOptions, nets: MetricNets
) -> EvalResult:
    """Reconstruct every item with every model and measure it; rFID over the whole set at the end."""
    opts.check()
    check_models(models)
    ids = source.ids[: opts.limit] if opts.limit else list(source.ids)
    if not ids:
        raise KlvaeError("the data holds no images")
    names = list(models)
    res = EvalResult(models=names, found=len(ids), available=len(source.ids), left_out=dict(nets.left_out))
    res.metrics = ["psnr", "ssim"] + (["lpips"] if nets.lpips is not None else [])
    res.values = {m: {k: [] for k in res.metrics} for m in names}
    res.ok, res.failed = {m: [] for m in names}, {m: [] for m in names}
    accs = {m: MetricAccumulator() for m in names}
    feats: dict[str, list[Tensor]] = {m: [] for m in ["", *names]}  # "" holds the originals
    with progress_bar(total=len(ids), desc="evaluating", unit="img") as bar:
        for batch_ids, x in iter_batches(source, ids, opts, res.skipped, res.enlarged):
            if nets.inception is not None:
                feats[""].append(_features(nets.inception, x))
            for m, vae in models.items():
                _measure(res, m, vae, x, batch_ids, opts, nets, accs[m], feats[m])
            res.ids.extend(batch_ids)
            bar.update(len(res.ids) + len(res.skipped) - bar.n)  # skipped items count as done too
        bar.update(len(ids) - bar.n)
    if not res.ids:
        raise KlvaeError(none_read(len(ids)))
    warn_enlarged(res.enlarged, len(res.ids), opts.resolution)
    # Tar shards that could not be read (or not to their end) are skipped parts of the data, counted as such.
    res.skipped += [{"id": path, "error": f"tar shard skipped: {why}"} for path, why in source.unreadable]
    res.summaries = {m: accs[m].summary() for m in names}
    if nets.inception is not None:
        _add_rfid(res, feats)
    return res


def _features(net: InceptionV3Features, x: Tensor) -> Tensor:
    return net(x.to(next(net.parameters()).device)).float().cpu()


def _add_rfid(res: EvalResult, feats: dict[str, list[Tensor]]) -> None:
    if len(res.ids) < 2:
        log.warning("rFID left out: it needs at least two images, got %d", len(res.ids))
        res.left_out["rfid"] = "needs at least two images"
        return
    if len(res.ids) < FEATURE_DIM:
        # A rank-deficient covariance: the value says little on its own, and -q must not hide that.
        log.warning("rFID from %d images: fewer than the %d feature dimensions, so it is unreliable (noisy and "
                    "biased upward); compare it only with rFIDs from the same images", len(res.ids), FEATURE_DIM)
    originals = torch.cat(feats[""])
    reference = FIDReference(originals)
    for m in res.models:
        ok = torch.tensor(res.done(m))
        if int(ok.sum()) < 2:
            res.rfid[m] = None  # its failures are in the summary
        elif ok.all():
            res.rfid[m] = reference.distance(torch.cat(feats[m]))
        else:  # against the originals of the images it did reconstruct, or the sets would differ by more than it
            res.rfid[m] = FIDReference(originals[ok]).distance(torch.cat(feats[m]))
    res.metrics.append("rfid")


def select_examples(res: EvalResult, n: int) -> dict[str, dict[str, list[int]]]:
    """Per model, the indices (into res.ids) of its worst and best n images by PSNR; at most half the set each."""
    out = {}
    for m in res.models:
        done = [i for i, ok in enumerate(res.done(m)) if ok]  # a failed image has no PSNR to rank by
        k = min(n, max(1, len(done) // 2)) if n > 0 else 0
        order = sorted(done, key=res.values[m]["psnr"].__getitem__)
        out[m] = {"worst": order[:k], "best": order[::-1][:k]}
    return out


@torch.no_grad()
def example_images(
    models: Mapping[str, AutoencoderKL], source: ItemSource, ids: list[str], opts: EvalOptions
) -> dict[str, tuple[Tensor, dict[str, Tensor]]]:
    """Original and every model's reconstruction (CPU, [3, H, W]) of a few items, rerun for the report."""
    out = {}
    for item_id in ids:
        try:
            x = prepare(source.load(item_id), opts).unsqueeze(0)
        except Exception as e:  # read once already, so only a changing source gets here
            log.warning("no example pictures: %s", item_error(item_id, e))
            continue
        recs = {}
        for m, vae in models.items():
            r, errors = reconstruct_checked(vae, x.to(vae.device), opts)
            if errors[0] is None:  # a model that failed on this image shows none
                recs[m] = r[0].cpu()
        out[item_id] = (x[0], recs)
    return out


def build_summary(res: EvalResult, data: str, opts: EvalOptions, device: torch.device) -> dict[str, Any]:
    """The summary.json content: the run's settings, versions, counts and per-model metrics."""
    models = {}
    for m in res.models:
        n = sum(res.done(m))  # the images this model reconstructed; its means and rFID are over these
        failed = res.failed.get(m, [])
        entry: dict[str, Any] = {"n": n, "failed": len(failed), "failed_items": failed[:100]}
        none = {"mean": None, "std": None, "n": 0}  # a model that failed on every image
        entry.update({k: res.summaries[m].get(k, none) for k in res.metrics if k != "rfid"})
        if "rfid" in res.metrics:
            entry["rfid"] = {"value": res.rfid[m], "n": n, "reliable": n >= FEATURE_DIM}
        models[m] = entry
    return {
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "data": data,
        "resolution": opts.resolution if opts.crop == "center" else None,
        "crop": opts.crop,
        "enlarged": len(res.enlarged),
        "limit": opts.limit,
        "device": str(device),
        "dtype": str(opts.dtype).removeprefix("torch."),
        "tiling": None if opts.tiling is None else {"tile_size": opts.tiling.tile_size,
                                                    "max_memory": opts.tiling.max_memory},
        "versions": {"klvae": __version__, "torch": torch.__version__, "python": platform.python_version()},
        "images": {"in_data": res.available, "found": res.found, "evaluated": len(res.ids), "skipped": len(res.skipped),
                   "skipped_items": res.skipped[:100]},
        "metrics": list(res.metrics),
        "left_out": dict(res.left_out),
        "notes": {
            "psnr": "dB over [-1, 1] pixels (8-bit rounded reconstructions); higher is better",
            "ssim": "SSIM (Gaussian 11x11, sigma 1.5) of [0, 1] images, mean over RGB; higher is better",
            "lpips": "LPIPS v0.1 (VGG); lower is better",
            "rfid": "FID between TF-Inception-v3 pool3 features of originals and reconstructions; lower is better. "
                    "Below ~10k images it is noisy and biased upward: compare only runs on the same images",
        },
        "models": models,
    }


def check_report_place(out: str | Path, data: str | Path, out_name: str, data_name: str) -> None:
    """KlvaeError when the report's folder is the data folder or lies inside it (a rerun would score the report's
    PNGs as data), or its images/ folder, where the report's pictures go, holds the data."""
    check_not_in_data(out, out_name, str(data), data_name)
    if (pictures := Path(out) / "images").is_dir() and inside(Path(data), pictures):
        # The report's pictures would land among the data, and an overwrite deletes the old ones there.
        raise KlvaeError(f"{out_name} {out}: its images/ folder, where the report's pictures go, holds the data "
                         f"({data_name} {data}); name another {out_name}")


def run_evaluation(
    models: Mapping[str, AutoencoderKL],
    data: str | Path,
    out_dir: str | Path,
    opts: EvalOptions | None = None,
    nets: MetricNets | None = None,
    device: torch.device | None = None,
    source: ItemSource | None = None,
) -> dict[str, Any]:
    """Evaluate every model on `data` (or on `source`, opened from it already), write metrics.csv, summary.json
    and index.html; returns the summary. Left out: default options, build_metric_nets() (weights from the torch
    hub cache or a download, else that metric left out), and the first model's device."""
    from klvae.evaluation.report import json_safe, write_report

    opts = opts if opts is not None else EvalOptions()
    opts.check()
    check_models(models)
    if Path(out_dir).exists() and not Path(out_dir).is_dir():  # found before the work, not by the report's mkdir
        raise KlvaeError(f"the report's folder {out_dir} is a file")
    check_report_place(out_dir, data, "out_dir", "data")
    device = device if device is not None else next(iter(models.values())).device
    nets = nets if nets is not None else build_metric_nets(device)
    data = str(data)
    source = source if source is not None else open_source(data, image_column=opts.image_column)
    res = evaluate(models, source, opts, nets)
    summary = build_summary(res, data, opts, device)
    picks = select_examples(res, opts.examples)
    wanted = sorted({i for p in picks.values() for idx in p.values() for i in idx})
    examples = example_images(models, source, [res.ids[i] for i in wanted], opts)
    write_report(Path(out_dir), res, summary, picks, examples)
    return json_safe(summary)
