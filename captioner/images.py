"""Opening user images safely: any path, bytes, file object or PIL image becomes an upright RGB image.

Handles EXIF rotation, palette/alpha/16-bit/CMYK/grayscale modes and animated
files (first frame). Every entry point (CLI, caption-dir, evaluate, the API and
the UI) opens images here: `open_image` reads the header only and refuses an
image of more than max_pixels (width x height) before a single pixel is
decoded, so a hostile file cannot exhaust memory. Pillow's own
DecompressionBombError stays as a backstop for images opened elsewhere.
"""
from __future__ import annotations

import io
from pathlib import Path

from PIL import ExifTags, Image, ImageOps

MAX_PIXELS = 40_000_000  # width x height of one image; a 40-Mpx RGB image takes 120 MB decoded


class ImageError(ValueError):
    """The input is not an image captioner can read; the message says why."""


class ImageTooLarge(ImageError):
    """The image has more pixels than allowed; refused from its header, before decoding."""


def _to_rgb(img: Image.Image) -> Image.Image:
    if img.mode == "RGB":  # convert() would copy it: 108 MB for a 36-Mpx photo
        return img
    if img.mode in ("RGBA", "LA", "PA") or (img.mode == "P" and "transparency" in img.info):
        img = img.convert("RGBA")
        background = Image.new("RGB", img.size, (255, 255, 255))  # transparent areas read as white
        background.paste(img, mask=img.getchannel("A"))
        return background
    if img.mode in ("I;16", "I;16B", "I;16L", "I"):
        # 16/32-bit grayscale: scale to 8 bits instead of clipping everything above 255 to white.
        img = img.point(lambda v: v / 256).convert("L")
    return img.convert("RGB")


def open_image(src, max_pixels: int = MAX_PIXELS) -> Image.Image:
    """Open `src` lazily (only its header is read) and check width x height against max_pixels.

    A PIL image is returned as it is: whoever opened it chose its size. The pixels
    are decoded by load_image; callers that budget memory (the service) read the
    size from the returned image first.
    """
    if isinstance(src, Image.Image):
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
    try:
        img = Image.open(fp)
    except Image.DecompressionBombError as e:
        raise ImageTooLarge(f"image too large (decompression bomb guard): {e}") from None
    except FileNotFoundError:
        raise ImageError(f"no such file: {name}") from None
    except IsADirectoryError:
        raise ImageError(f"is a directory: {name}") from None
    except Image.UnidentifiedImageError:
        raise ImageError("not an image file (unrecognised format)") from None
    except (OSError, SyntaxError, ValueError) as e:
        raise ImageError(f"cannot decode image: {e}") from None
    width, height = img.size
    if width * height > max_pixels:
        img.close()
        raise ImageTooLarge(f"image is {width}x{height} = {width * height} pixels, over the limit of {max_pixels}")
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
