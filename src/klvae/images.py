"""Image files in and out: guarded loading, folder walking, PIL <-> tensor, padding to the latent grid, atomic saves.

Conventions: an image tensor is float32 [3, H, W] (or [B, 3, H, W]) in [-1, 1]; a loaded image is always an
8-bit RGB PIL image with its EXIF orientation applied. Colour profiles (ICC) are not applied: pixels are taken
as sRGB, as in the training data pipelines of SD and its successors.
"""

from __future__ import annotations

import contextlib
import functools
import io
import logging
import math
import os
import re
import stat
import tarfile
import warnings
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np
import torch
import torch.nn.functional as F
from PIL import ExifTags, Image, ImageOps, TiffImagePlugin
from torch import Tensor

from klvae.atomic import atomic_write
from klvae.checks import is_integer
from klvae.errors import ImageError, ImageTooLarge, KlvaeError

log = logging.getLogger(__name__)

IMAGE_EXTENSIONS: frozenset[str] = frozenset({".jpg", ".jpeg", ".png", ".webp", ".bmp", ".tif", ".tiff"})

# Decompression-bomb guard: the most pixels (width x height, read from the header before decoding) an image
# may have. This is PIL's own hard limit (2 x Image.MAX_IMAGE_PIXELS, about 13377² px, ~540 MB as RGB): it
# admits 100-megapixel photos and panoramas, which the tiled encoder handles, and refuses crafted headers.
# A larger max_pixels also needs Image.MAX_IMAGE_PIXELS raised, as PIL refuses beyond that itself.
MAX_PIXELS: int = 2 * 89_478_485
# The largest square side an image may have under MAX_PIXELS: the bound of every --resolution (13377).
MAX_RESOLUTION: int = math.isqrt(MAX_PIXELS)
# The most bytes an encoded image read into memory (a tar member) may have, checked before reading: a crafted
# or corrupt header could otherwise claim any size. Uncompressed 16-bit RGBA at MAX_PIXELS is 1.4 GB.
MAX_ENCODED_BYTES: int = 2 * 2**30

# The only formats an image file or cell is opened as, whatever its name: raster formats with Pillow's own
# decoders. Left to itself Pillow tries every plugin, and one (EPS) hands the file to Ghostscript.
READ_FORMATS: tuple[str, ...] = ("PNG", "JPEG", "WEBP", "BMP", "TIFF", "GIF", "PPM")

# Output extensions and their formats: those that hold 8-bit RGB as given (Pillow's XBM, GRIB, BUFR and others
# cannot, and would fail only once the work is done).
WRITE_FORMATS: dict[str, str] = {".png": "PNG", ".jpg": "JPEG", ".jpeg": "JPEG", ".webp": "WEBP", ".bmp": "BMP",
                                 ".tif": "TIFF", ".tiff": "TIFF"}

PAD_MODES = ("replicate", "reflect", "constant")

# Background for transparent pixels: white, as images with alpha are shown on web pages and documents.
_BACKGROUND = (255, 255, 255)


def _check_size(img: Image.Image, name: str, max_pixels: int | None) -> None:
    w, h = img.size
    if w < 1 or h < 1:
        raise ImageError(f"{name}: empty image ({w}x{h})")
    if max_pixels is not None and w * h > max_pixels:
        raise ImageTooLarge(f"{name}: {w}x{h} is {w * h:,} pixels, over the limit of {max_pixels:,} "
                            "(a decompression bomb, or raise max_pixels)")


def to_rgb(img: Image.Image) -> Image.Image:
    """8-bit RGB; alpha (and palette transparency) composited on white, 16-bit and float scaled to 8 bits."""
    if img.mode.startswith("I") or img.mode == "F":
        # NaN (a float TIFF or PFM may hold them) becomes black, not numpy's invalid-cast warning.
        a = np.nan_to_num(np.asarray(img, dtype=np.float64), nan=0.0)
        # 16-bit greyscale (PNG, TIFF) arrives as I;16 (surely 16-bit) or I (judged by its values).
        if img.mode == "I" and a.max(initial=0) > 65535:
            # No convention says what 32-bit integer values mean; scaling as 16-bit would give a white picture.
            raise ImageError(f"32-bit integer image (values up to {int(a.max()):,}): save it as 8- or 16-bit first")
        # A PNG's transparent grey (tRNS) is a raw 16-bit value: matched before the reduction, which would lose it.
        key = img.info.get("transparency")
        clear = a == key if isinstance(key, int) and not isinstance(key, bool) else None
        if img.mode.startswith("I;16") or (img.mode == "I" and a.max(initial=0) > 255):
            a = a * (255.0 / 65535.0)
        elif img.mode == "F" and a.max(initial=0) <= 1.0:  # float images are mostly stored in [0, 1]
            a = a * 255.0
        img = Image.fromarray(np.clip(np.rint(a), 0, 255).astype(np.uint8), "L")
        if clear is not None:
            img = Image.merge("LA", (img, Image.fromarray(np.where(clear, 0, 255).astype(np.uint8), "L")))
    if img.mode == "La":  # premultiplied, which Pillow converts to LA only, not on to RGBA
        img = img.convert("LA")
    # Pillow puts the alpha of an RGBA image it quantises (convert("P")) in the palette, with no transparency info.
    rgba_palette = img.mode == "P" and img.palette is not None and img.palette.mode == "RGBA"
    if img.mode in ("RGBA", "LA", "PA", "RGBa") or "transparency" in img.info or rgba_palette:
        rgba = img.convert("RGBA")
        bg = Image.new("RGBA", rgba.size, (*_BACKGROUND, 255))
        return Image.alpha_composite(bg, rgba).convert("RGB")
    return img if img.mode == "RGB" else img.convert("RGB")


@functools.cache
def _read_formats() -> tuple[str, ...]:
    # Pillow builds without libwebp lack WEBP, and Image.open fails on a format it has no plugin for.
    Image.init()
    return tuple(f for f in READ_FORMATS if f in Image.OPEN)


def _check_limit(max_pixels: object) -> None:
    # Checked before the file is opened: inside, a bad limit's TypeError read as "cannot decode" the image.
    if max_pixels is not None and (not is_integer(max_pixels) or max_pixels < 1):
        raise ValueError(f"max_pixels must be None or an integer >= 1, got {max_pixels!r}")


def _open(src: str | Path | BinaryIO, name: str, max_pixels: int | None) -> Image.Image:
    """Image.open in klvae's formats, within the size limit: the header is read, the pixels are not yet."""
    with warnings.catch_warnings():
        # PIL warns from 89 MP on; the size check below is the limit that applies.
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        img = Image.open(src, formats=_read_formats())
    try:
        _check_size(img, name, max_pixels)
    except ImageError:
        img.close()
        raise
    return img


@contextlib.contextmanager
def _image_errors(name: str) -> Iterator[None]:
    """Any failure to read an image, as one ImageError line that names it."""
    try:
        yield
    except ImageError:
        raise
    except FileNotFoundError:
        raise ImageError(f"{name}: no such file") from None
    except Image.DecompressionBombError as e:
        # Pillow refuses beyond twice its MAX_IMAGE_PIXELS before klvae sees the size; say it in klvae's words.
        m = re.search(r"\((\d+) pixels\)", str(e))
        size = f"{int(m[1]):,} pixels" if m else "too many pixels"
        assert Image.MAX_IMAGE_PIXELS is not None  # Pillow raises this error only under a limit
        raise ImageTooLarge(f"{name}: {size}, over Pillow's limit of {2 * Image.MAX_IMAGE_PIXELS:,} "
                            "(its guard against decompression bombs)") from None
    except Image.UnidentifiedImageError:
        raise ImageError(f"{name}: not an image, or not one of {', '.join(_read_formats())}") from None
    except Exception as e:  # PIL's format plugins raise many types (OSError, SyntaxError, ValueError, ...)
        raise ImageError(f"{name}: cannot decode: {type(e).__name__}: {e}") from None


def _decode(src: str | Path | BinaryIO, name: str, max_pixels: int | None) -> Image.Image:
    with _image_errors(name), _open(src, name, max_pixels) as img:
        low_bits = _low_bit_grey(img)
        img.load()  # a truncated or corrupt file fails here, not later in a worker's transform
        if low_bits and isinstance(key := img.info.get("transparency"), int) and not isinstance(key, bool):
            # Pillow scales 2- and 4-bit grey samples to 8 bits but leaves the tRNS grey as the raw sample.
            img.info["transparency"] = key * (255 // (2**low_bits - 1))
        try:
            out = ImageOps.exif_transpose(img)
        except Exception as e:  # broken EXIF blocks are common; the pixels are still good
            log.debug("%s: EXIF orientation ignored: %s", name, e)
            out = img.copy()
        try:
            return to_rgb(out)
        except ImageError as e:
            raise ImageError(f"{name}: {e}") from None


def _low_bit_grey(img: Image.Image) -> int:
    """The bits per sample of a 2- or 4-bit greyscale PNG (known from its raw mode before loading), else 0."""
    tile = getattr(img, "tile", None) or []  # an ImageFile's, before load()
    raw = tile[0][3] if img.format == "PNG" and img.mode == "L" and len(tile) == 1 else None
    return {"L;2": 2, "L;4": 4}.get(raw, 0) if isinstance(raw, str) else 0


@contextlib.contextmanager
def _open_file(p: Path) -> Iterator[BinaryIO]:
    """The regular file at p, opened for reading; ImageError for a folder, a FIFO or a missing file."""
    if p.is_dir():
        raise ImageError(f"{p}: is a folder, not an image")
    try:
        check_regular_file(p)
        # O_NONBLOCK: should a FIFO take the file's place after the check, opening it must not wait for a writer.
        f = os.fdopen(os.open(p, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0)), "rb")
    except FileNotFoundError:
        raise ImageError(f"{p}: no such file") from None
    except OSError as e:
        raise ImageError(f"{p}: cannot open: {e.strerror or e}") from None
    with f:
        check_regular_file(p, os.fstat(f.fileno()))
        yield f


def load_image(path: str | Path, max_pixels: int | None = MAX_PIXELS) -> Image.Image:
    """Fully decoded 8-bit RGB image, EXIF-rotated; ImageError (naming the file) if it cannot be read."""
    _check_limit(max_pixels)
    p = Path(path)
    with _open_file(p) as f:
        return _decode(f, str(p), max_pixels)


def image_size(path: str | Path, max_pixels: int | None = MAX_PIXELS) -> tuple[int, int]:
    """(height, width) of the image load_image would return, from the header and the EXIF orientation; the pixels
    are not decoded, so a truncated file passes here (and fails in load_image)."""
    _check_limit(max_pixels)
    p = Path(path)
    with _open_file(p) as f, _image_errors(str(p)), _open(f, str(p), max_pixels) as img:
        w, h = img.size
        return (w, h) if _orientation(img) in (5, 6, 7, 8) else (h, w)  # a quarter turn swaps the sides


def _orientation(img: Image.Image) -> int:
    # A PNG may keep its EXIF after the pixels, where Pillow finds it only by decoding them all: its chunks'
    # headers are walked instead, so the size is the one load_image gives.
    # ImageMagick 6 keeps a PNG's EXIF in a "Raw profile type exif" text chunk, which getexif() reads as well.
    if img.format == "PNG" and "exif" not in img.info and "Raw profile type exif" not in img.info:
        late = _late_png_exif(getattr(img, "fp", None))
        if late is None:
            return 1
        exif = Image.Exif()
        try:
            exif.load(late)
            return int(exif.get(ExifTags.Base.Orientation, 1))
        except Exception:  # a broken EXIF block: _decode leaves such an image as it is
            return 1
    # Pillow turns a TIFF by its orientation tag itself, on load, and from Pillow 11 already reports the turned
    # size on open (its header's ImageWidth/ImageLength are the stored ones): that size needs no second turn.
    if isinstance(img, TiffImagePlugin.TiffImageFile) and img.size != (img.tag_v2.get(256), img.tag_v2.get(257)):
        return 1
    try:
        return int(img.getexif().get(ExifTags.Base.Orientation, 1))
    except Exception:  # a broken EXIF block: _decode leaves such an image as it is
        return 1


def _late_png_exif(f: Any) -> bytes | None:
    """The eXIf chunk's data of an open PNG, read by skipping from chunk header to chunk header; the file's
    position is kept."""
    try:
        start = f.tell()
    except (AttributeError, OSError):  # None (no file kept open), or a stream that cannot seek
        return None
    try:
        f.seek(8)  # past the signature
        while len(head := f.read(8)) == 8:
            length, kind = int.from_bytes(head[:4], "big"), head[4:]
            if kind == b"eXIf":
                data = f.read(length)
                return b"Exif\x00\x00" + data if len(data) == length else None
            if kind == b"IEND":
                return None
            f.seek(length + 4, os.SEEK_CUR)  # the data and its CRC
        return None
    except (OSError, ValueError):
        return None
    finally:
        f.seek(start)


def check_regular_file(path: Path, st: os.stat_result | None = None) -> None:
    """ImageError for a FIFO, socket or device: reading one can block forever or never end (`st`: its fstat)."""
    mode = (st or path.stat()).st_mode
    if not stat.S_ISREG(mode):
        raise ImageError(f"{path}: {not_a_file(mode)}, so not an image")


def not_a_file(mode: int) -> str:
    """What a file of `mode` (stat's st_mode) is that is no regular file, in words."""
    return "a folder, not a file" if stat.S_ISDIR(mode) else "not a regular file (a FIFO, socket or device)"


def open_image_bytes(data: bytes, name: str, max_pixels: int | None = MAX_PIXELS) -> Image.Image:
    """Like load_image, for encoded image bytes (a tar member, a parquet cell); `name` appears in errors."""
    if not data:
        raise ImageError(f"{name}: empty image data")
    return _decode(io.BytesIO(data), name, max_pixels)


def read_tar_member(tf: tarfile.TarFile, member: tarfile.TarInfo, name: str) -> bytes:
    """The bytes of one tar member; ImageError, before reading, for one over MAX_ENCODED_BYTES."""
    if member.size > MAX_ENCODED_BYTES:
        raise ImageError(f"{name}: {member.size} bytes, more than the {MAX_ENCODED_BYTES} an encoded image may have")
    f = tf.extractfile(member)
    return f.read() if f is not None else b""


def image_from_cell(value: Any, name: str, max_pixels: int | None = MAX_PIXELS) -> Image.Image:
    """A table cell as an RGB image: {"bytes", "path"} (datasets' Image storage), bytes, a path, or PIL."""
    if isinstance(value, Image.Image):
        _check_size(value, name, max_pixels)
        return to_rgb(value)
    if isinstance(value, dict) and value.get("bytes"):
        return open_image_bytes(value["bytes"], name, max_pixels)
    if isinstance(value, dict) and value.get("path"):
        return load_image(value["path"], max_pixels)
    if isinstance(value, bytes | bytearray | memoryview):
        return open_image_bytes(bytes(value), name, max_pixels)
    if isinstance(value, str):
        return load_image(value, max_pixels)
    raise ImageError(f"{name}: the image column holds {type(value).__name__}, not an image")


def _walk(root: Path, recursive: bool, seen: set[str], unreadable: list[str]) -> list[Path]:
    out: list[Path] = []

    # followlinks: datasets are often assembled from symlinked folders; `seen` stops symlink loops, and a folder
    # named twice (by two spellings, or through a link) is walked once.
    def cannot_list(e: OSError) -> None:
        # os.walk skips a folder it cannot list without a word; its images would vanish from the job unseen.
        log.warning("cannot read folder %s (%s): its images are left out", e.filename, e.strerror or e)
        unreadable.append(str(e.filename))

    for dirpath, dirnames, filenames in os.walk(root, followlinks=True, onerror=cannot_list):
        real = os.path.realpath(dirpath)
        if real in seen:
            dirnames[:] = []
            continue
        seen.add(real)
        # Hidden entries are tool debris (.ipynb_checkpoints, macOS ._ resource forks), never training data.
        # Sorted: the walk is depth-first in this order, so when two symlinks reach one folder, the name its
        # images are found under (their item ids, output names) is the same on every filesystem.
        dirnames[:] = [] if not recursive else sorted(d for d in dirnames if not d.startswith("."))
        out.extend(Path(dirpath) / f for f in filenames if _is_image_name(f))
    return out


def _is_image_name(name: str) -> bool:
    return not name.startswith(".") and Path(name).suffix.lower() in IMAGE_EXTENSIONS


def find_images(paths: Iterable[str | Path], recursive: bool = True,
                unreadable: list[str] | None = None) -> list[Path]:
    """Image files named directly or found in the named folders: sorted, without duplicates (a folder or file
    named twice, by two spellings or through a link, counts once). Folders that cannot be listed are warned
    about and added to `unreadable`, when given (a job counts them as skipped)."""
    if isinstance(paths, str | Path):
        paths = [paths]
    found: set[Path] = set()
    seen: set[str] = set()  # the real paths of the folders walked
    files: dict[str, Path] = {}  # the files named, by real path
    for item in paths:
        p = Path(item)
        if p.is_dir():
            found.update(_walk(p, recursive, seen, unreadable if unreadable is not None else []))
        elif p.is_file():
            files.setdefault(os.path.realpath(p), p)  # taken whatever its extension; load_image judges it
        elif p.exists():
            check_regular_file(p)
        else:
            raise ImageError(f"{p}: no such file or folder")
    # A file named and also found in a folder walked (its images) is that one.
    found.update(p for real, p in files.items() if not (os.path.dirname(real) in seen and _is_image_name(p.name)))
    return sorted(found, key=lambda q: q.as_posix())


def uint8_to_tensor(arr: np.ndarray) -> Tensor:
    """uint8 [H, W, 3] (or [B, H, W, 3]) -> float32 [3, H, W] (or [B, 3, H, W]) in [-1, 1]."""
    a = np.asarray(arr)
    if a.dtype != np.uint8 or a.ndim not in (3, 4) or a.shape[-1] != 3:
        raise ValueError(f"expected uint8 [H, W, 3] or [B, H, W, 3], got {a.dtype} {a.shape}")
    t = torch.from_numpy(np.array(a, copy=True)).movedim(-1, -3)  # PIL's arrays are read-only
    return t.to(torch.float32) / 127.5 - 1.0


def tensor_to_uint8(t: Tensor) -> np.ndarray:
    """[3, H, W] (or [B, 3, H, W]) in [-1, 1] -> uint8 [H, W, 3] (or [B, H, W, 3]); clamped and rounded."""
    if t.ndim not in (3, 4) or t.shape[-3] != 3:
        raise ValueError(f"expected [3, H, W] or [B, 3, H, W], got {tuple(t.shape)}")
    if not t.is_floating_point():  # torchvision's read_image gives uint8 0..255, which [-1, 1] would show white
        raise ValueError(f"expected floating-point pixels in [-1, 1], got {t.dtype} (uint8 pixels: x / 127.5 - 1)")
    x = torch.nan_to_num(t.detach().to("cpu", torch.float32), nan=0.0)  # NaN shows as mid-grey, not garbage
    x = ((x + 1.0) * 127.5).round().clamp(0, 255).to(torch.uint8)
    return x.movedim(-3, -1).contiguous().numpy()


def pil_to_tensor(img: Image.Image) -> Tensor:
    """PIL image -> float32 [3, H, W] in [-1, 1] (non-RGB modes are converted as load_image does)."""
    return uint8_to_tensor(np.asarray(to_rgb(img)))


def tensor_to_pil(t: Tensor) -> Image.Image:
    """[3, H, W] or [1, 3, H, W] in [-1, 1] -> RGB PIL image (clamped, rounded to 8 bits)."""
    if t.ndim == 4:
        if t.shape[0] != 1:
            raise ValueError(f"tensor_to_pil takes one image, got a batch of {t.shape[0]}")
        t = t[0]
    return Image.fromarray(tensor_to_uint8(t), "RGB")


def pad_to_multiple(x: Tensor, multiple: int = 8, mode: str = "replicate") -> tuple[Tensor, tuple[int, int]]:
    """Pad right and bottom so H and W are multiples of `multiple`; returns the padded tensor and the old (H, W)."""
    if mode not in PAD_MODES:
        raise ValueError(f"pad mode must be one of {', '.join(PAD_MODES)}, got {mode!r}")
    if not is_integer(multiple) or multiple < 1:
        raise ValueError(f"multiple must be an integer >= 1, got {multiple!r}")
    h, w = x.shape[-2:]
    ph, pw = -h % multiple, -w % multiple
    if ph == 0 and pw == 0:
        return x, (h, w)
    # reflect needs the pad to be smaller than the side; tiny images fall back to replicate.
    if mode == "reflect" and (ph >= h or pw >= w):
        mode = "replicate"
    return F.pad(x, (0, pw, 0, ph), mode=mode), (h, w)


def crop_to_size(x: Tensor, size: tuple[int, int]) -> Tensor:
    """The top-left (H, W) of x: undoes pad_to_multiple (for a decoder output, after upsampling back)."""
    h, w = size
    if not (is_integer(h) and is_integer(w) and h >= 1 and w >= 1):  # a negative side would slice from the end
        raise ValueError(f"size must be (height, width) of integers >= 1, got {size!r}")
    if h > x.shape[-2] or w > x.shape[-1]:
        raise ValueError(f"cannot crop {tuple(x.shape[-2:])} to the larger {(h, w)}")
    return x[..., :h, :w]


def image_format_for(path: str | Path) -> str:
    """The Pillow format an output image's extension names; KlvaeError (naming the path) unless it holds 8-bit RGB."""
    p = Path(path)
    fmt = WRITE_FORMATS.get(p.suffix.lower())
    Image.init()
    if fmt is None or fmt not in Image.SAVE:  # SAVE: a Pillow built without libwebp cannot write WEBP
        known = ", ".join(e for e, f in WRITE_FORMATS.items() if f in Image.SAVE)
        what = f"the extension {p.suffix!r}" if p.suffix else "a name without an extension"
        raise KlvaeError(f"{p}: cannot write an RGB image with {what}; end the name in {known}")
    return fmt


def write_image(img: Image.Image, path: str | Path, fmt: str, **save_kwargs: Any) -> None:
    """Write img to path in the Pillow format `fmt`, in place (atomic_write's writers use this on the temporary)."""
    with open(path, "wb") as f:
        _save(img, f, fmt, **save_kwargs)


def _save(img: Image.Image, f: BinaryIO, fmt: str, **save_kwargs: Any) -> None:
    if fmt == "JPEG" and img.mode not in ("RGB", "L"):
        img = to_rgb(img)
    img.save(f, format=fmt, **save_kwargs)


def as_written(img: Image.Image, path: str | Path) -> Image.Image:
    """`img` as a file named `path` would hold it (JPEG and lossy WebP lose detail): encoded and read back in
    memory, so that what is measured is what is written."""
    buf = io.BytesIO()
    _save(img, buf, image_format_for(Path(path)))
    return open_image_bytes(buf.getvalue(), str(path), max_pixels=None)  # its size was checked as it was made


# The formats' own ceilings on a side (libwebp's 14-bit sizes, libjpeg's JPEG_MAX_DIMENSION); PNG, BMP and TIFF
# reach past MAX_PIXELS.
FORMAT_MAX_SIDE = {"WEBP": 16383, "JPEG": 65500}


def check_format_size(path: str | Path, width: int, height: int) -> None:
    """ImageError when an image of width x height cannot be stored in the format `path` names: checked before
    the work that makes it, not after."""
    fmt = image_format_for(Path(path))
    limit = FORMAT_MAX_SIDE.get(fmt)
    if limit is not None and max(width, height) > limit:
        raise ImageError(f"{path}: {fmt} stores at most {limit} pixels a side, and this image would be "
                         f"{width}x{height}; write .png instead")


def save_image_atomic(img: Image.Image, path: str | Path, replace: bool = True, **save_kwargs: Any) -> Path:
    """Write img to path via a temporary file and os.replace, so a reader never sees half a file (with
    replace=False, a file at `path` is kept: KlvaeError)."""
    p = Path(path)
    fmt = image_format_for(p)
    check_format_size(p, *img.size)
    return atomic_write(p, lambda tmp: write_image(img, tmp, fmt, **save_kwargs), replace)
