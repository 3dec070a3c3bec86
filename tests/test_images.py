"""The one image loader: every entry point refuses an image over the pixel limit from its header, before decoding."""
from __future__ import annotations

import io
import json

import pytest
from fixtures import png_header_only
from PIL import Image

from captioner.images import MAX_PIXELS, ImageTooLarge, load_image, open_image

OVER_THE_DEFAULT = (7000, 6000)  # 42 Mpx: over the 40-Mpx default, under Pillow's own bomb warning (89 Mpx)


def png(width: int, height: int) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (width, height), (20, 120, 40)).save(buf, "PNG")
    return buf.getvalue()


def test_the_limit_is_read_from_the_header_before_decoding():
    width, height = OVER_THE_DEFAULT
    assert width * height > MAX_PIXELS
    with pytest.raises(ImageTooLarge, match=f"{width}x{height} = {width * height} pixels"):
        load_image(png_header_only(width, height))  # no pixel data to decode: refused from the header alone
    with pytest.raises(ImageTooLarge, match="200x100"):
        open_image(png(200, 100), max_pixels=19_999)
    assert open_image(png(200, 100), max_pixels=20_000).size == (200, 100)
    assert load_image(io.BytesIO(png(200, 100)), max_pixels=20_000).size == (200, 100)  # a file object too


def test_cli_caption_and_caption_dir_refuse_an_image_over_the_limit(tiny_checkpoint, tmp_path, capsys):
    from captioner.cli import main

    folder = tmp_path / "photos"
    folder.mkdir()
    (folder / "huge.png").write_bytes(png_header_only(*OVER_THE_DEFAULT))
    (folder / "small.png").write_bytes(png(64, 64))

    assert main(["caption", str(folder / "huge.png"), "--checkpoint", str(tiny_checkpoint)]) == 1
    assert "over the limit" in capsys.readouterr().err

    out = tmp_path / "captions.jsonl"
    main(["caption-dir", str(folder), "--out", str(out), "--workers", "0", "--checkpoint", str(tiny_checkpoint)])
    rows = {r["image"]: r for r in map(json.loads, out.read_text().splitlines())}
    assert "over the limit" in rows["huge.png"]["error"]
    assert rows["small.png"]["caption"]


def encoded(img: Image.Image, fmt: str = "PNG", **params) -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt, **params)
    return buf.getvalue()


@pytest.mark.parametrize("size", [(40000, 1), (1, 40000), (200000, 1), (3000, 7)])
def test_an_image_that_resizing_would_blow_up_is_refused_from_its_header(size):
    data = encoded(Image.new("L", size))
    assert len(data) < 1000  # a few hundred bytes of upload...
    with pytest.raises(ImageTooLarge, match="aspect ratio"):  # ...that Resize would make gigabytes of
        load_image(data)
    with pytest.raises(ImageTooLarge, match="aspect ratio"):
        open_image(Image.new("L", size))  # a decoded PIL image too: the resize is what blows up


def test_a_panorama_is_still_captioned():
    assert load_image(encoded(Image.new("RGB", (4000, 200), (10, 20, 30)))).size == (4000, 200)


def test_formats_outside_the_photo_formats_are_refused_unopened():
    from captioner.images import UnsupportedFormat

    eps = b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 8 8\nshowpage\n"  # Pillow would run Ghostscript on it
    for data in (eps, encoded(Image.new("RGB", (16, 16)), "ICO"), encoded(Image.new("RGB", (8, 8)), "PPM")):
        with pytest.raises(UnsupportedFormat, match="accepted format.*JPEG, PNG"):
            load_image(data)
    for fmt in ("JPEG", "PNG", "WEBP", "GIF", "BMP", "TIFF"):
        assert load_image(encoded(Image.new("RGB", (8, 8), (200, 10, 10)), fmt)).getpixel((4, 4))[0] > 150


def test_every_mode_becomes_rgb_with_its_brightness():
    import numpy as np

    gray16 = Image.frombytes("I;16B", (8, 8), np.full((8, 8), 40000, ">u2").tobytes())
    floats = Image.fromarray(np.full((8, 8), 0.5, np.float32), "F")
    for img, level in [(gray16, 156), (floats, 127), (Image.new("I;16", (8, 8), 40000), 156),
                       (Image.new("CMYK", (8, 8), (0, 0, 0, 0)), 255), (Image.new("1", (8, 8), 1), 255),
                       (Image.new("LA", (8, 8), (0, 0)), 255)]:  # fully transparent reads as white
        rgb = load_image(img)
        assert rgb.mode == "RGB" and abs(rgb.getpixel((3, 3))[0] - level) <= 1, (img.mode, rgb.getpixel((3, 3)))


def test_palette_transparency_is_composited_on_white():
    img = Image.new("P", (4, 4), 1)
    img.putpalette([0, 0, 0, 10, 20, 30] + [0, 0, 0] * 254)
    img.info["transparency"] = bytes([255, 128])  # index 1 half transparent
    assert load_image(encoded(img)).getpixel((0, 0)) == (132, 137, 142)
    img.info["transparency"] = 1  # index 1 fully transparent
    assert load_image(encoded(img)).getpixel((0, 0)) == (255, 255, 255)
