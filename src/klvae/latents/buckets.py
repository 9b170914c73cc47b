"""Aspect-ratio buckets of (nearly) equal pixel count, as SDXL-style training batches images."""

from __future__ import annotations

import math

from PIL import Image

from klvae.errors import ImageError
from klvae.images import MAX_PIXELS


def make_buckets(resolution: int, step: int = 64, max_ratio: float = 4.0) -> list[tuple[int, int]]:
    """(height, width) pairs, multiples of `step`, with area close to resolution**2 and ratio <= max_ratio; no side
    is below `step`, so where resolution is a small multiple of it the long buckets exceed that area."""
    area = resolution * resolution
    buckets = set()
    w = step
    while w <= resolution * max_ratio:
        h = max(step, (area // w) // step * step)
        if max(h / w, w / h) <= max_ratio:
            buckets.add((h, w))
            buckets.add((w, h))
        w += step
    return sorted(buckets, key=lambda hw: hw[1] / hw[0])


def nearest_bucket(height: int, width: int, buckets: list[tuple[int, int]]) -> tuple[int, int]:
    """The bucket whose aspect ratio is closest (in log space) to the image's."""
    r = math.log(width / height)
    return min(buckets, key=lambda hw: abs(math.log(hw[1] / hw[0]) - r))


def cover_size(height: int, width: int, size: tuple[int, int]) -> tuple[int, int]:
    """The (height, width) an image is scaled to so that it covers `size` (height, width), aspect kept."""
    th, tw = size
    s = max(th / height, tw / width)
    return max(th, round(height * s)), max(tw, round(width * s))


def resize_crop(img: Image.Image, size: tuple[int, int]) -> tuple[Image.Image, tuple[int, int, int, int]]:
    """Scale to cover (height, width), centre-crop to it; returns the image and (top, left, height, width) of the
    crop in scaled pixels (SDXL's crop conditioning takes top and left)."""
    th, tw = size
    nh, nw = cover_size(img.height, img.width, size)
    if nh * nw > MAX_PIXELS:  # a 1x200000 strip covering 256x256 would be scaled to 256x51200000
        raise ImageError(f"a {img.width}x{img.height} image is too elongated to cover {tw}x{th}: scaled to "
                         f"{nw}x{nh} it would exceed the limit of {MAX_PIXELS:,} pixels")
    img = img.resize((nw, nh), Image.Resampling.LANCZOS)
    top, left = (nh - th) // 2, (nw - tw) // 2
    box = (left, top, left + tw, top + th)
    return img.crop(box), (top, left, th, tw)
