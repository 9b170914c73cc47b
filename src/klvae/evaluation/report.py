"""The evaluation report: metrics.csv, summary.json and index.html with example triplets, written atomically."""

from __future__ import annotations

import csv
import functools
import html
import io
import json
import math
import re
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image
from torch import Tensor

from klvae.atomic import atomic_write_all, shown_bytes, text_writer
from klvae.evaluation.evaluate import EvalResult
from klvae.evaluation.fid import FEATURE_DIM
from klvae.images import tensor_to_pil, write_image

# An inferno-like ramp: dark for no error, yellow-white at the full-scale error.
_RAMP = np.array([(0, 0, 4), (40, 11, 84), (101, 21, 110), (159, 42, 99), (212, 72, 66), (245, 125, 21),
                  (250, 193, 39), (252, 255, 164)], dtype=np.float64)
# One fixed scale for every map, so heat maps compare across images and models.
ERROR_FULL_SCALE = 32  # mean absolute error over RGB, in 8-bit levels
MODEL_COLOURS = ("#4e79a7", "#f28e2b", "#59a14f", "#e15759", "#b07aa1", "#76b7b2")
LABELS = {"psnr": "PSNR (dB) ↑", "ssim": "SSIM ↑", "lpips": "LPIPS ↓", "rfid": "rFID ↓"}

# The files the report writes into its folder, and the name of an example PNG in its images/ (the CLI refuses to
# mix a new report with an earlier one's, and a rerun removes the earlier examples it does not write again).
REPORT_FILES = ("index.html", "summary.json", "metrics.csv")
EXAMPLE_PNG = re.compile(r"\d{5}_(original|m\d+_(recon|error))\.png")


def json_safe(value: Any) -> Any:
    """Non-finite floats -> None (JSON has no inf/nan), and the undecodable bytes of file names -> \\xNN text (a
    lone surrogate is no Unicode, which strict JSON readers refuse), recursively."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, str):
        return shown_bytes(value)
    if isinstance(value, Mapping):
        return {shown_bytes(str(k)): json_safe(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [json_safe(v) for v in value]
    return value


def metrics_csv(res: EvalResult) -> str:
    """metrics.csv text: id, model and each per-image metric the run has."""
    cols = ["id", "model", *[k for k in res.metrics if k != "rfid"]]
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=cols, lineterminator="\n")
    w.writeheader()
    for row in res.rows():
        w.writerow({k: (f"{v:.8g}" if isinstance(v, float) else v) for k, v in row.items()})
    return buf.getvalue()


def error_heatmap(original: Tensor, reconstruction: Tensor) -> Image.Image:
    """|original - reconstruction| averaged over RGB, coloured on a fixed 0..ERROR_FULL_SCALE (8-bit) ramp."""
    err = (original.float() - reconstruction.float()).abs().mean(0).cpu().numpy() * 127.5
    t = np.clip(err / ERROR_FULL_SCALE, 0.0, 1.0) * (len(_RAMP) - 1)
    lo = np.floor(t).astype(int).clip(max=len(_RAMP) - 2)
    frac = (t - lo)[..., None]
    rgb = _RAMP[lo] * (1 - frac) + _RAMP[lo + 1] * frac
    return Image.fromarray(rgb.round().astype(np.uint8), mode="RGB")


def histogram_svg(values: Mapping[str, Sequence[float]], bins: int = 24, width: int = 680, height: int = 240) -> str:
    """Overlaid PSNR histograms of each model as an inline SVG (shared bins, one colour per model)."""
    finite = {m: [v for v in vs if math.isfinite(v)] for m, vs in values.items()}
    every = [v for vs in finite.values() for v in vs]
    if not every:
        return "<p>no finite PSNR values</p>"
    lo, hi = math.floor(min(every)), math.ceil(max(every))
    hi = max(hi, lo + 1)
    step = (hi - lo) / bins
    counts = {m: np.histogram(vs, bins=bins, range=(lo, hi))[0] for m, vs in finite.items()}
    top = max(int(c.max()) for c in counts.values()) or 1
    left, bottom, plot_w, plot_h = 40, 40, width - 70, height - 55
    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" class="hist" '
             f'role="img" aria-label="PSNR histogram">']
    bw = plot_w / bins
    for j, (m, c) in enumerate(counts.items()):
        colour = MODEL_COLOURS[j % len(MODEL_COLOURS)]
        for b, n in enumerate(c):
            if n:
                h = plot_h * n / top
                parts.append(f'<rect x="{left + b * bw:.1f}" y="{height - bottom - h:.1f}" width="{bw - 1:.1f}" '
                             f'height="{h:.1f}" fill="{colour}" fill-opacity="0.6">'
                             f'<title>{html.escape(m)}: {n} image(s), {lo + b * step:.2f}–{lo + (b + 1) * step:.2f} dB'
                             f'</title></rect>')
    y0 = height - bottom
    for j, vs in enumerate(finite.values()):
        if vs:  # each model's mean as a dashed line in its colour
            x = left + plot_w * (sum(vs) / len(vs) - lo) / (hi - lo)
            parts.append(f'<line x1="{x:.1f}" y1="{y0}" x2="{x:.1f}" y2="{y0 - plot_h}" stroke-dasharray="4 3" '
                         f'stroke="{MODEL_COLOURS[j % len(MODEL_COLOURS)]}" stroke-width="2"/>')
    parts.append(f'<line x1="{left}" y1="{y0}" x2="{left + plot_w}" y2="{y0}" stroke="#888"/>')
    for t in range(5):
        v = lo + (hi - lo) * t / 4
        x = left + plot_w * t / 4
        parts.append(f'<text x="{x:.1f}" y="{y0 + 16}" text-anchor="middle">{v:.1f}</text>')
    parts.append(f'<text x="{left - 6}" y="{y0 - plot_h + 4:.1f}" text-anchor="end">{top}</text>')
    parts.append(f'<text x="{left - 6}" y="{y0}" text-anchor="end">0</text>')
    parts.append(f'<text x="{left + plot_w / 2:.1f}" y="{height - 4}" text-anchor="middle">PSNR (dB)</text>')
    parts.append(f'<text x="12" y="{y0 - plot_h / 2:.1f}" text-anchor="middle" '
                 f'transform="rotate(-90 12 {y0 - plot_h / 2:.1f})">images</text>')
    parts.append("</svg>")
    return "".join(parts)


def rfid_sample_note(stats: Mapping[str, Any]) -> str:
    """"n=N", or "n=N < 2048: unreliable" for an rFID from fewer images than Inception feature dimensions."""
    # Summaries written before "reliable" existed count as reliable: their n is still shown.
    if stats.get("reliable", True):
        return f"n={stats['n']}"
    return f"n={stats['n']} < {FEATURE_DIM}: unreliable"


def failure_note(model: str, stats: Mapping[str, Any], evaluated: int) -> str:
    """One line on the images a model failed on (NaN or infinite output): how many, the first ones, and why."""
    items = stats.get("failed_items", [])
    shown = "; ".join(f"{it['id']}: {it['error']}" for it in items[:3]) + ("; ..." if stats["failed"] > 3 else "")
    return (f"{model} failed on {stats['failed']} of {evaluated} images ({shown}); its scores are over the "
            f"other {stats['n']}")


def _fmt(metric: str, stats: Any) -> str:
    if stats is None:
        return "—"
    if metric == "rfid":
        v = stats.get("value")
        return "—" if v is None else f"{v:.3f} <small>({html.escape(rfid_sample_note(stats))})</small>"
    mean = stats.get("mean")
    if stats.get("n") == 0:  # a model that failed on every image scored nothing (its mean is None too)
        return "—"
    # Not finite: a PSNR of identical images is +inf (None once through json_safe, inf in the run's own summary).
    if mean is None or not math.isfinite(mean):
        return "∞" if metric == "psnr" and (mean is None or mean > 0) else "—"
    digits = 2 if metric == "psnr" else 4
    std = "—" if stats.get("std") is None else f"{stats['std']:.{digits}f}"
    return f"{stats['mean']:.{digits}f} ± {std}"


def summary_table(summary: Mapping[str, Any]) -> str:
    """The per-model summary as an HTML table: one row per metric, one column per model."""
    models = summary["models"]
    head = "".join(f'<th><span class="dot" style="background:{MODEL_COLOURS[j % len(MODEL_COLOURS)]}"></span>'
                   f"{html.escape(m)}</th>" for j, m in enumerate(models))
    rows = [f"<tr><th>metric</th>{head}</tr>"]
    for k in summary["metrics"]:
        cells = "".join(f"<td>{_fmt(k, models[m].get(k))}</td>" for m in models)
        rows.append(f"<tr><th>{LABELS.get(k, k)}</th>{cells}</tr>")
    cells = "".join(f"<td>{models[m]['n']}</td>" for m in models)
    rows.append(f"<tr><th>images</th>{cells}</tr>")
    return f'<table class="summary">{"".join(rows)}</table>'


def _caption(res: EvalResult, model: str, i: int) -> str:
    v = res.values[model]
    bits = [f"{v['psnr'][i]:.2f} dB", f"SSIM {v['ssim'][i]:.3f}"]
    if "lpips" in v:
        bits.append(f"LPIPS {v['lpips'][i]:.3f}")
    return " · ".join(bits)


def _figure(src: str, caption: str, alt: str, outline: str | None = None) -> str:
    style = f' style="outline:3px solid {outline}"' if outline else ""
    return (f'<figure><a href="{html.escape(src)}"><img src="{html.escape(src)}" loading="lazy" '
            f'alt="{html.escape(alt)}"{style}></a><figcaption>{caption}</figcaption></figure>')


def example_rows(res: EvalResult, ranked_by: str, indices: Sequence[int], files: Mapping[int, dict[str, str]]) -> str:
    """One row per image: the original, then each model's reconstruction and error map side by side."""
    rows = []
    for i in (i for i in indices if i in files):
        f = files[i]
        cells = [_figure(f["original"], "original", "original")]
        for j, m in enumerate(res.models):
            # With several models, outline the one this section ranks by, in its histogram colour.
            outline = MODEL_COLOURS[j % len(MODEL_COLOURS)] if m == ranked_by and len(res.models) > 1 else None
            name = html.escape(m)
            if f"recon{j}" not in f:  # this model failed on this image
                cells.append(f"<figure><figcaption><b>{name}</b><br>failed on this image</figcaption></figure>")
                continue
            cells.append(_figure(f[f"recon{j}"], f"<b>{name}</b><br>{_caption(res, m, i)}", f"{m} reconstruction",
                                 outline))
            cells.append(_figure(f[f"error{j}"], f"|error| · {name}", f"{m} error map"))
        rows.append(f'<div class="row"><div class="id">{html.escape(res.ids[i])}</div>{"".join(cells)}</div>')
    return "".join(rows)


def example_files(res: EvalResult, examples: Mapping[str, tuple[Tensor, Mapping[str, Tensor]]]
                  ) -> tuple[dict[int, dict[str, str]], list[tuple[str, Image.Image | Callable[[], Image.Image]]]]:
    """The example PNG triplets: per index into res.ids the relative file names, and (name, image) to write, an
    error map as a function that draws it when it is written."""
    files: dict[int, dict[str, str]] = {}
    images: list[tuple[str, Image.Image | Callable[[], Image.Image]]] = []
    index = {item_id: i for i, item_id in enumerate(res.ids)}
    for item_id, (original, recs) in examples.items():
        i = index[item_id]
        names = {"original": f"images/{i:05d}_original.png"}
        images.append((names["original"], tensor_to_pil(original)))
        for j, m in enumerate(res.models):
            if m not in recs:
                continue
            names[f"recon{j}"] = f"images/{i:05d}_m{j}_recon.png"
            names[f"error{j}"] = f"images/{i:05d}_m{j}_error.png"
            images.append((names[f"recon{j}"], tensor_to_pil(recs[m])))
            images.append((names[f"error{j}"], functools.partial(error_heatmap, original, recs[m])))
        files[i] = names
    return files, images


def _png(img: Image.Image | Callable[[], Image.Image]) -> Callable[[Path], None]:
    return lambda tmp: write_image(img if isinstance(img, Image.Image) else img(), tmp, "PNG")


_CSS = """
body{font:14px/1.4 system-ui,sans-serif;margin:24px;color:#222;background:#fafafa}
h1{font-size:22px;margin:0 0 4px} h2{font-size:17px;margin:28px 0 8px;border-bottom:1px solid #ddd}
.meta{color:#555} .note{color:#8a5a00} table.summary{border-collapse:collapse;background:#fff}
table.summary td,table.summary th{border:1px solid #ddd;padding:4px 10px;text-align:right}
table.summary th:first-child{text-align:left} .dot{display:inline-block;width:10px;height:10px;margin-right:5px}
.row{display:flex;flex-wrap:wrap;gap:8px;align-items:flex-start;margin:10px 0;padding:8px;background:#fff;
border:1px solid #e4e4e4} .id{width:100%;font-family:monospace;color:#444}
figure{margin:0;width:220px} figure img{width:220px;display:block;image-rendering:auto}
figcaption{font-size:12px;color:#333}
.ramp{display:inline-block;width:160px;height:10px;vertical-align:middle;background:linear-gradient(to right,RAMP)}
svg.hist text{font-size:11px;fill:#444} .legend span{margin-right:14px}
"""


def render_html(summary: Mapping[str, Any], res: EvalResult, picks: Mapping[str, Mapping[str, list[int]]],
                files: Mapping[int, dict[str, str]]) -> str:
    """index.html: settings, summary table, PSNR histogram, then each model's worst and best images."""
    ramp = ",".join(f"rgb({r:.0f},{g:.0f},{b:.0f})" for r, g, b in _RAMP)
    imgs = summary["images"]
    e = html.escape
    out = ["<!doctype html><html><head><meta charset='utf-8'><title>klvae eval</title>",
           f"<style>{_CSS.replace('RAMP', ramp)}</style></head><body>",
           f"<h1>klvae eval: {e(', '.join(res.models))}</h1>",
           f"<p class='meta'>data <code>{e(str(summary['data']))}</code> · {imgs['evaluated']} images evaluated"
           f" of {imgs['found']} · crop {e(summary['crop'])}"
           + (f" at {summary['resolution']}²" if summary["resolution"] else " (full images)")
           + f" · {e(summary['device'])} {e(summary['dtype'])} · klvae {e(summary['versions']['klvae'])}"
           f" · torch {e(summary['versions']['torch'])} · {e(summary['created'])}</p>"]
    if imgs["skipped"]:
        out.append(f"<p class='note'>{imgs['skipped']} unreadable image(s) skipped: "
                   + ", ".join(e(s["id"]) for s in imgs["skipped_items"][:10]) + "</p>")
    out += ["<h2>Summary</h2>", summary_table(summary)]
    out += [f"<p class='note'>{e(failure_note(m, stats, imgs['evaluated']))}</p>"
            for m, stats in summary["models"].items() if stats.get("failed")]
    for k, why in summary["left_out"].items():
        out.append(f"<p class='note'>{LABELS.get(k, k).split()[0]} left out: {e(why)}</p>")
    if "rfid" in summary["metrics"]:
        out.append(f"<p class='meta'>rFID over {imgs['evaluated']} images: {e(summary['notes']['rfid'])}.</p>")
    legend = "".join(f"<span><span class='dot' style='background:{MODEL_COLOURS[j % len(MODEL_COLOURS)]}'></span>"
                     f"{e(m)}</span>" for j, m in enumerate(res.models))
    out += ["<h2>PSNR per image</h2>", f"<div class='legend'>{legend} <small>(dashed: mean)</small></div>",
            histogram_svg({m: res.values[m]["psnr"] for m in res.models})]
    out.append(f"<p class='meta'>Error maps: mean |error| over RGB, <span class='ramp'></span> 0 to "
               f"≥{ERROR_FULL_SCALE}/255, the same scale on every map.</p>")
    for m in res.models:
        for which in ("worst", "best"):
            idx = picks.get(m, {}).get(which, [])
            if idx:
                out.append(f"<h2>{e(m)}: {which} {len(idx)} by PSNR</h2>")
                out.append(example_rows(res, m, idx, files))
    out.append("</body></html>\n")
    return "\n".join(out)


def write_report(out_dir: Path, res: EvalResult, summary: Mapping[str, Any],
                 picks: Mapping[str, Mapping[str, list[int]]],
                 examples: Mapping[str, tuple[Tensor, Mapping[str, Tensor]]]) -> None:
    """metrics.csv, summary.json, the example PNGs and index.html, written together: a failure in any (a full
    disk) leaves the folder as it was, never a new table beside an old page."""
    files, images = example_files(res, examples)
    atomic_write_all([
        (out_dir / "metrics.csv", text_writer(metrics_csv(res))),
        (out_dir / "summary.json", text_writer(json.dumps(json_safe(summary), indent=2, allow_nan=False) + "\n")),
        *((out_dir / name, _png(img)) for name, img in images),
        (out_dir / "index.html", text_writer(render_html(summary, res, picks, files))),
    ])
    _remove_stale_examples(out_dir, {name for names in files.values() for name in names.values()})


def _remove_stale_examples(out_dir: Path, current: set[str]) -> None:
    # A rerun into the same folder (other data, fewer models) would leave the earlier run's pictures beside the
    # new report; only names this module writes are touched, never a user's own files.
    for p in (out_dir / "images").glob("*.png"):
        if EXAMPLE_PNG.fullmatch(p.name) and f"images/{p.name}" not in current:
            p.unlink(missing_ok=True)
