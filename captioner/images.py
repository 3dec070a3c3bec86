"""Opening user images safely: any path, bytes or PIL image becomes an upright RGB image.

Handles EXIF rotation, palette/alpha/16-bit/CMYK/grayscale modes and animated
files (first frame), and turns Pillow's decompression-bomb warning into an error
so a hostile file cannot exhaust memory.
"""
from __future__ import annotations

import io
import warnings
from pathlib import Path

from PIL import Image, ImageOps

ImageInput = "str | Path | bytes | Image.Image"


class ImageError(ValueError):
    """The input is not an image captioner can read; the message says why."""


def _to_rgb(img: Image.Image) -> Image.Image:
    if img.mode in ("RGBA", "LA", "PA") or (img.mode == "P" and "transparency" in img.info):
        img = img.convert("RGBA")
        background = Image.new("RGB", img.size, (255, 255, 255))  # transparent areas read as white
        background.paste(img, mask=img.getchannel("A"))
        return background
    if img.mode in ("I;16", "I;16B", "I;16L", "I"):
        # 16/32-bit grayscale: scale to 8 bits instead of clipping everything above 255 to white.
        img = img.point(lambda v: v / 256).convert("L")
    return img.convert("RGB")


def load_image(src, draft_size: int | None = None) -> Image.Image:
    """Return an upright RGB copy of `src`, a path, bytes or a PIL image.

    draft_size lets JPEG decode at a reduced scale (still >= that size), which is
    much faster for large photos that will be resized anyway.
    """
    if isinstance(src, Image.Image):
        img = src
    else:
        if isinstance(src, (bytes, bytearray, memoryview)):
            if len(src) == 0:
                raise ImageError("empty file (0 bytes)")
            fp, name = io.BytesIO(src), "<bytes>"
        else:
            fp, name = Path(src), str(src)
            if fp.is_file() and fp.stat().st_size == 0:
                raise ImageError("empty file (0 bytes)")
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("error", Image.DecompressionBombWarning)
                img = Image.open(fp)
                if draft_size and img.format == "JPEG":
                    img.draft("RGB", (draft_size, draft_size))
                img.load()
        except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
            raise ImageError(f"image too large (decompression bomb guard): {e}") from None
        except FileNotFoundError:
            raise ImageError(f"no such file: {name}") from None
        except IsADirectoryError:
            raise ImageError(f"is a directory: {name}") from None
        except Image.UnidentifiedImageError:
            raise ImageError("not an image file (unrecognised format)") from None
        except (OSError, SyntaxError, ValueError) as e:
            raise ImageError(f"cannot decode image: {e}") from None
    try:
        img.seek(0)  # animated GIF/PNG/WebP: caption the first frame
    except (AttributeError, EOFError):
        pass
    try:
        img = ImageOps.exif_transpose(img)
        return _to_rgb(img)
    except (OSError, ValueError, SyntaxError) as e:
        raise ImageError(f"cannot decode image: {e}") from None
