"""Generated test data: small photos-like images with captions, in the Flickr8k layout."""
from __future__ import annotations

import random
import struct
import zlib
from pathlib import Path

from PIL import Image, ImageDraw

# (colour name, RGB, shape) -> the captions of each image class.
CLASSES = [
    ("red", (220, 30, 30), "square"),
    ("blue", (30, 60, 220), "circle"),
    ("green", (30, 180, 60), "triangle"),
    ("yellow", (240, 220, 30), "square"),
]


def draw(colour, shape, seed: int, size: int = 224) -> Image.Image:
    rnd = random.Random(seed)
    img = Image.new("RGB", (size, size), (rnd.randint(200, 255),) * 3)
    d = ImageDraw.Draw(img)
    x0, y0 = rnd.randint(10, 60), rnd.randint(10, 60)
    x1, y1 = x0 + rnd.randint(100, 150), y0 + rnd.randint(100, 150)
    if shape == "square":
        d.rectangle([x0, y0, x1, y1], fill=colour)
    elif shape == "circle":
        d.ellipse([x0, y0, x1, y1], fill=colour)
    else:
        d.polygon([(x0, y1), (x1, y1), ((x0 + x1) // 2, y0)], fill=colour)
    return img


def captions_for(name: str, shape: str) -> list[str]:
    return [f"A {name} {shape} on a white background .", f"a big {name} {shape} in the middle",
            f"The {name} {shape} in the picture .", f"a {name} {shape} on white",
            f"one {name} {shape} on a grey background ."]


def make_flickr8k(root: Path, per_class: int = 6, dev_per_class: int = 2) -> Path:
    """Write a tiny dataset in the original Flickr8k layout (CRLF split files, as published)."""
    images = root / "Flicker8k_Dataset"
    images.mkdir(parents=True, exist_ok=True)
    tokens, train, dev = [], [], []
    for c, (name, rgb, shape) in enumerate(CLASSES):
        for i in range(per_class + dev_per_class):
            fname = f"{c}{i:03d}_{name}_{shape}.jpg"
            draw(rgb, shape, seed=100 * c + i).save(images / fname, quality=90)
            tokens += [f"{fname}#{j}\t{cap}" for j, cap in enumerate(captions_for(name, shape))]
            (train if i < per_class else dev).append(fname)
    (root / "Flickr8k.token.txt").write_text("\n".join(tokens) + "\n")
    (root / "Flickr_8k.trainImages.txt").write_bytes(("\r\n".join(train) + "\r\n").encode())
    (root / "Flickr_8k.devImages.txt").write_bytes(("\r\n".join(dev) + "\r\n").encode())
    return root


def png_header_only(width: int, height: int) -> bytes:
    """A PNG that declares width x height but holds almost no data: a decompression bomb's header."""
    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    idat = zlib.compress(b"\0" * 64)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")
