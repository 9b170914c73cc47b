"""Prepare the demo model's training data from packages a fresh machine can install.

Sources: Debian's `plasma-workspace-wallpapers` and `gnome-backgrounds` (fetched with `apt-get download`
and unpacked with `dpkg -x`, no root install needed; so Debian or Ubuntu with its package mirror reachable)
and scikit-image's bundled sample images (pip install scikit-image). Without apt-get the set is
scikit-image's samples alone, with a warning. Every image
is scaled so its shorter side is at most --max-side, written as PNG, and its licence recorded in
licences.json. A fixed, name-ordered subset (every --val-every-th image) is held out for validation.

    python recipes/demo/prepare_data.py --out data/demo
"""

from __future__ import annotations

import argparse
import json
import logging
import subprocess
import tempfile
from collections.abc import Callable
from pathlib import Path

import numpy as np
from PIL import Image

log = logging.getLogger("prepare_data")

PACKAGES = ("plasma-workspace-wallpapers", "gnome-backgrounds")
SKIMAGE = ("astronaut", "chelsea", "coffee", "rocket", "hubble_deep_field", "immunohistochemistry", "brick",
           "grass", "gravel", "camera", "moon", "coins", "text", "page", "clock", "retina", "cell")
GNOME_LICENCE = "CC-BY-SA-3.0 (debian/copyright of gnome-backgrounds)"


def fetch_packages(work: Path) -> Path | None:
    """apt-get download + dpkg -x of the wallpaper packages into work/root; None where that cannot run (not
    Debian/Ubuntu, or no network), with a warning: the set is then scikit-image's samples alone."""
    root = work / "root"
    root.mkdir(parents=True, exist_ok=True)
    try:
        for pkg in PACKAGES:
            subprocess.run(["apt-get", "download", pkg], cwd=work, check=True, capture_output=True)
        for deb in sorted(work.glob("*.deb")):
            subprocess.run(["dpkg", "-x", str(deb), str(root)], check=True, capture_output=True)
    except (OSError, subprocess.CalledProcessError) as e:
        why = e.stderr.decode(errors="replace").strip().splitlines()[-1:] if getattr(e, "stderr", None) else [str(e)]
        log.warning("the Debian wallpaper packages cannot be fetched (%s): using scikit-image's %d samples only, "
                    "a much smaller set than docs/demo-model.md describes", "; ".join(why), len(SKIMAGE))
        return None
    return root


def plasma_images(root: Path) -> list[tuple[str, Path, str]]:
    """(name, file, licence) for the largest variant of each Plasma wallpaper (light and dark)."""
    out = []
    for meta in sorted((root / "usr/share/wallpapers").glob("*/metadata.json")):
        info = json.loads(meta.read_text()).get("KPlugin", {})
        authors = ", ".join(a.get("Name", "") for a in info.get("Authors", []))
        licence = f"{info.get('License', 'GPL-2+ (debian/copyright)')}, by {authors or 'KDE'}"
        for variant in ("images", "images_dark"):
            files = list((meta.parent / "contents" / variant).glob("*.*"))
            if files:
                best = max(files, key=lambda p: p.stat().st_size)
                out.append((f"plasma_{meta.parent.name}_{variant}", best, licence))
    return out


def gnome_images(root: Path) -> list[tuple[str, Path, str]]:
    """(name, file, licence) for every GNOME background."""
    exts = (".webp", ".jpg", ".png")
    files = sorted(p for p in (root / "usr/share/backgrounds").rglob("*") if p.suffix.lower() in exts)
    return [(f"gnome_{p.stem}", p, GNOME_LICENCE) for p in files]


def skimage_images() -> list[tuple[str, Image.Image, str]]:
    """(name, image, licence) for scikit-image's bundled samples (those that need no download)."""
    try:
        import skimage.data
    except ImportError:
        raise SystemExit("prepare_data: scikit-image is needed: pip install scikit-image "
                         "(the test extra, pip install -e '.[test]', has it)") from None

    out = []
    for name in SKIMAGE:
        try:
            a = getattr(skimage.data, name)()
        except Exception as e:  # some samples are fetched on demand; offline they are skipped
            log.info("skimage %s unavailable: %s", name, e)
            continue
        a = np.asarray(a).astype(np.float64) if np.asarray(a).dtype != np.uint8 else np.asarray(a)
        if a.dtype != np.uint8:
            a = (255 * (a - a.min()) / max(float(np.ptp(a)), 1e-9)).astype(np.uint8)
        img = Image.fromarray(a).convert("RGB")
        out.append((f"skimage_{name}", img, "scikit-image sample data (see skimage/data/README.txt)"))
    return out


def shrink(img: Image.Image, max_side: int) -> Image.Image:
    """Scale so the shorter side is at most max_side."""
    s = max_side / min(img.size)
    if s < 1:
        img = img.resize((round(img.width * s), round(img.height * s)), Image.Resampling.LANCZOS)
    return img.convert("RGB")


def at_least(low: int) -> Callable[[str], int]:
    """An argparse type: a whole number of at least `low` (else argparse's one-line error and exit status 2)."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"not a whole number: {text!r}") from None
        if value < low:
            raise argparse.ArgumentTypeError(f"must be at least {low}, got {value}")
        return value

    return parse


def main() -> None:
    """Fetch, convert, split, and write the licences."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="data/demo")
    ap.add_argument("--max-side", type=at_least(16), default=768)
    ap.add_argument("--val-every", type=at_least(2), default=6, help="every N-th image is held out (N >= 2)")
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    out = Path(args.out)
    for split in ("train", "val"):
        (out / split).mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as work:
        samples = skimage_images()  # first: a missing scikit-image stops the script before any download
        root = fetch_packages(Path(work))
        found = plasma_images(root) + gnome_images(root) if root is not None else []
        items = [(n, Image.open(p), lic) for n, p, lic in found] + samples
        items.sort(key=lambda t: t[0])
        licences = {}
        for i, (name, img, lic) in enumerate(items):
            split = "val" if i % args.val_every == args.val_every // 2 else "train"
            dest = out / split / f"{name}.png"
            shrink(img, args.max_side).save(dest)
            licences[f"{split}/{dest.name}"] = lic
    (out / "licences.json").write_text(json.dumps(licences, indent=1, sort_keys=True))
    n_val = sum(k.startswith("val/") for k in licences)
    log.info("wrote %d training and %d validation images to %s", len(licences) - n_val, n_val, out)


if __name__ == "__main__":
    main()
