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
