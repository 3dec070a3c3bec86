"""Opening user images safely: any path, bytes, file object or PIL image becomes an upright RGB image.

Handles EXIF rotation, palette/alpha/16-bit/float/CMYK/grayscale modes and animated
files (first frame). Every entry point (CLI, caption-dir, evaluate, finetune, the API,
the UI and the torch-free runtime) opens images here. `open_image` reads the header
only and, before a single pixel is decoded, refuses
- a format outside PHOTO_FORMATS (Pillow's rarer plugins, EPS's Ghostscript above all,
  are attack surface no photo needs);
- an image of more than max_pixels (width x height);
- an image that *resizing* would blow up: every encoder scales the shorter side up to its
  input size, so a 201-byte 40000x1 PNG would become 8,960,000x224 (2 GB of RGB). The
  size after resizing the shorter side to RESIZE_BOUND must fit max_pixels (at least MIN_RESIZED_LIMIT).
Pillow's own DecompressionBombError stays as a backstop for images opened elsewhere.
"""
from __future__ import annotations

import io
from pathlib import Path

import numpy as np
from PIL import ExifTags, Image, ImageOps

MAX_PIXELS = 40_000_000  # width x height of one image; a 40-Mpx RGB image takes 120 MB decoded
# The largest shorter side any encoder resizes to (VGG16 256, EfficientNet-Lite0..2 224-260), with room:
# checking against the largest keeps the loader independent of the model.
RESIZE_BOUND = 320
# A small max_pixels (a thumbnail-only deployment) must still admit ordinary aspect ratios once resized:
# the resized image may always take 64 squares of RESIZE_BOUND (20 MB of RGB), e.g. a 64:1 strip.
MIN_RESIZED_LIMIT = 64 * RESIZE_BOUND * RESIZE_BOUND
# The formats photos come in. MPO is how Pillow reads many cameras' JPEGs; AVIF and HEIF only when a
# plugin registers them (Pillow's own AVIF build, pillow-heif).
PHOTO_FORMATS = ("JPEG", "MPO", "PNG", "WEBP", "GIF", "BMP", "TIFF", "AVIF", "HEIF")
# Peak bytes per pixel of turning a decoded mode into RGB (source + the copies _to_rgb makes), for budgets.
_PEAK_BYTES = {"RGB": 3, "RGBA": 8, "LA": 7, "PA": 7, "I;16": 7, "I;16B": 7, "I;16L": 7, "I": 11, "F": 11,
               "CMYK": 7, "YCbCr": 6}


class ImageError(ValueError):
    """The input is not an image captioner can read; the message says why."""


class ImageTooLarge(ImageError):
    """The image has more pixels than allowed, or would after resizing; refused from its header, before decoding."""


class UnsupportedFormat(ImageError):
    """The file is an image in a format captioner does not open (not one of PHOTO_FORMATS)."""


def accepted_formats() -> tuple[str, ...]:
    """PHOTO_FORMATS that this Pillow can open (AVIF and HEIF depend on plugins)."""
    Image.init()
    return tuple(f for f in PHOTO_FORMATS if f in Image.OPEN)


def resized_pixels(width: int, height: int, short_side: int = RESIZE_BOUND) -> int:
    """Pixels of the image once its shorter side is scaled to short_side (as torchvision's Resize(int) does)."""
    short, long = sorted((max(width, 1), max(height, 1)))
    return short_side * int(short_side * long / short)


def decode_cost(width: int, height: int, mode: str = "RGB") -> int:
    """What decoding an image to upright RGB and resizing it can hold at once, in RGB pixels (3 bytes).

    The unit of the service's pixel budget: the decoded pixels with the copies a mode conversion
    makes, plus the resized image."""
    return (width * height * _PEAK_BYTES.get(mode, 6) + 2) // 3 + resized_pixels(width, height)


def check_size(width: int, height: int, max_pixels: int = MAX_PIXELS, *, decoded: bool = False) -> None:
    """Raise ImageTooLarge if decoding or resizing an image of this size needs more than max_pixels
    (decoded: its pixels are already in memory, so only the resizing is checked)."""
    if not decoded and width * height > max_pixels:
        raise ImageTooLarge(f"image is {width}x{height} = {width * height} pixels, over the limit of {max_pixels}")
    resized_limit = max(max_pixels, MIN_RESIZED_LIMIT)
    if resized_pixels(width, height) > resized_limit:
        raise ImageTooLarge(f"image is {width}x{height}: too narrow for its length (aspect ratio "
                            f"{max(width, height) / max(min(width, height), 1):.0f}:1); resizing its shorter side "
                            f"to {RESIZE_BOUND} would make {resized_pixels(width, height)} pixels, over the limit of "
                            f"{resized_limit}")


def _palette_on_white(img: Image.Image) -> Image.Image:
    """A palette image with transparency, composited on white in its palette: 1 byte a pixel, not an RGBA copy."""
    alpha = img.info["transparency"]
    colours = img.getpalette("RGB") or []
    n = len(colours) // 3
    if isinstance(alpha, int):  # one fully transparent index
        alpha = bytes(255 if i != alpha else 0 for i in range(n))
    alpha = bytes(alpha) + bytes([255]) * max(0, n - len(alpha))
    blended = [round(c * alpha[i // 3] / 255 + 255 * (1 - alpha[i // 3] / 255)) for i, c in enumerate(colours)]
    img = img.copy()
    img.info.pop("transparency", None)
    img.putpalette(blended, "RGB")
    return img.convert("RGB")


def _gray_to_8bit(img: Image.Image) -> Image.Image:
    """16-bit, 32-bit and float grayscale to 8 bits: scale by the type's range, not clip at 255."""
    values = np.asarray(img)
    if img.mode.startswith("I;16"):
        out = (values >> 8).astype(np.uint8)
    else:
        lo, hi = float(np.nanmin(values)), float(np.nanmax(values))
        if img.mode == "F" and 0.0 <= lo and hi <= 1.0:  # a float image in [0, 1], the usual convention
            lo, hi = 0.0, 1.0
        elif img.mode == "I" and 0 <= lo and hi <= 65535:  # a 16-bit image that Pillow widened to 32 bits
            lo, hi = 0.0, 65535.0
        scale = 255.0 / (hi - lo) if hi > lo else 0.0
        out = np.nan_to_num((values - lo) * scale, nan=0.0).clip(0, 255).astype(np.uint8)
    return Image.fromarray(out, "L")


def _to_rgb(img: Image.Image) -> Image.Image:
    if img.mode == "RGB":  # convert() would copy it: 108 MB for a 36-Mpx photo
        return img
    if img.mode == "P" and "transparency" in img.info:
        return _palette_on_white(img)
    if img.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        alpha = img.getchannel("A")
        rgb = img.convert("RGB")
        img.close()
        rgb.paste((255, 255, 255), mask=alpha.point(lambda v: 255 - v))  # transparent areas read as white
        return rgb
    if img.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        img = _gray_to_8bit(img)
    return img.convert("RGB")


def open_image(src, max_pixels: int = MAX_PIXELS) -> Image.Image:
    """Open `src` lazily (only its header is read), check its format and size (check_size).

    A PIL image is returned as it is if resizing cannot blow it up: whoever decoded it chose
    its pixel count. The pixels are decoded by load_image; callers that budget memory (the
    service) read decode_cost from the returned image's size and mode first.
    """
    if isinstance(src, Image.Image):
        check_size(*src.size, max_pixels=max_pixels, decoded=True)
        return src
    if isinstance(src, (bytes, bytearray, memoryview)):
        if len(src) == 0:
            raise ImageError("empty file (0 bytes)")
        fp, name = io.BytesIO(src), "<bytes>"
    elif hasattr(src, "read"):
        fp, name = src, getattr(src, "name", "<file>")
    else:
        fp, name = Path(src), str(src)
        if fp.is_file() and fp.stat().st_size == 0:
            raise ImageError("empty file (0 bytes)")
    formats = accepted_formats()
    try:
        img = Image.open(fp, formats=formats)
    except Image.DecompressionBombError as e:
        raise ImageTooLarge(f"image too large (decompression bomb guard): {e}") from None
    except FileNotFoundError:
        raise ImageError(f"no such file: {name}") from None
    except IsADirectoryError:
        raise ImageError(f"is a directory: {name}") from None
    except Image.UnidentifiedImageError:
        raise UnsupportedFormat(f"not an image file, or not one in an accepted format ({', '.join(formats)})") from None
    except (OSError, SyntaxError, ValueError) as e:
        raise ImageError(f"cannot decode image: {e}") from None
    try:
        check_size(*img.size, max_pixels=max_pixels)
    except ImageTooLarge:
        img.close()
        raise
    return img


def load_image(src, draft_size: int | None = None, max_pixels: int = MAX_PIXELS) -> Image.Image:
    """Return an upright RGB image of `src`: a path, bytes, a binary file object or a PIL image.

    draft_size lets JPEG decode at a reduced scale (still >= that size), which is
    much faster for large photos that will be resized anyway.
    """
    img = open_image(src, max_pixels)
    try:
        if draft_size and img.format == "JPEG":
            img.draft("RGB", (draft_size, draft_size))  # a no-op once the image is loaded
        img.load()
        if img.tell():
            img.seek(0)  # animated GIF/PNG/WebP: caption the first frame
        # exif_transpose copies even an upright image: only call it when there is a turn to make.
        if img.getexif().get(ExifTags.Base.Orientation, 1) != 1:
            img = ImageOps.exif_transpose(img)
        return _to_rgb(img)
    except MemoryError:
        raise
    except Exception as e:  # a corrupt file can make any decoder fail in its own way: all are bad input
        raise ImageError(f"cannot decode image: {e}") from None
