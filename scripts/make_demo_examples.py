"""Draw the demo's example scenes (demo/examples/*.jpg) with Pillow: our own work, CC0.

Flickr8k photos may not be redistributed, so the demo ships drawn scenes plus one
public-domain photo (see demo/examples/README.md). Deterministic: rerunning gives
the same files.

    python scripts/make_demo_examples.py
"""
from __future__ import annotations

import random
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

OUT = Path(__file__).resolve().parents[1] / "demo" / "examples"
W, H = 480, 360


def backdrop(bands, seed: int) -> tuple[Image.Image, ImageDraw.ImageDraw]:
    """Horizontal bands [(from_y, top_rgb, bottom_rgb), ...] of vertical gradients (sky, sea, ground),
    with film-like grain and a slight blur so the scene reads as a photo rather than flat vector art."""
    canvas = np.zeros((H, W, 3))
    edges = [y for y, _, _ in bands[1:]] + [H]
    for (y0, top, bottom), y1 in zip(bands, edges):
        t = np.linspace(0, 1, y1 - y0)[:, None, None]
        canvas[y0:y1] = np.array(top) * (1 - t) + np.array(bottom) * t
    canvas += np.random.default_rng(seed).normal(0, 6, canvas.shape)
    img = Image.fromarray(np.clip(canvas, 0, 255).astype(np.uint8)).filter(ImageFilter.GaussianBlur(0.8))
    return img, ImageDraw.Draw(img)


def beach() -> Image.Image:
    img, d = backdrop([(0, (90, 150, 220), (190, 220, 245)), (170, (20, 90, 150), (60, 140, 180)),
                       (240, (225, 200, 150), (200, 170, 120))], seed=1)
    d.ellipse([300, 280, 340, 320], fill=(220, 40, 40))  # a red ball on the sand
    for x in range(0, W, 40):
        d.arc([x, 232, x + 40, 248], 200, 340, fill=(240, 245, 250), width=2)  # breaking waves
    return img


def snow_trees() -> Image.Image:
    img, d = backdrop([(0, (170, 180, 195), (215, 220, 228)), (220, (240, 243, 250), (205, 215, 235))], seed=2)
    rnd = random.Random(2)
    for _ in range(9):
        x, h = rnd.randint(0, W), rnd.randint(80, 150)
        d.polygon([(x - h // 4, 230), (x + h // 4, 230), (x, 230 - h)], fill=(25, 60, 40))
    return img


def dog_on_grass() -> Image.Image:
    img, d = backdrop([(0, (120, 170, 230), (200, 225, 240)), (150, (70, 140, 50), (40, 100, 30))], seed=3)
    brown, dark = (140, 90, 45), (90, 55, 25)
    d.ellipse([170, 200, 310, 260], fill=brown)  # body
    d.ellipse([285, 170, 345, 225], fill=brown)  # head
    d.ellipse([325, 190, 360, 215], fill=dark)  # muzzle
    d.polygon([(290, 175), (300, 150), (312, 178)], fill=dark)  # ear
    for x in (185, 210, 265, 290):
        d.rectangle([x, 245, x + 12, 300], fill=brown)  # legs
    d.line([(172, 215), (135, 185)], fill=brown, width=9)  # tail
    return img


def city_street() -> Image.Image:
    img, d = backdrop([(0, (30, 40, 80), (220, 130, 80)), (280, (60, 60, 65), (40, 40, 45))], seed=4)
    rnd = random.Random(4)
    x = 0
    while x < W:
        w, h = rnd.randint(50, 90), rnd.randint(120, 240)
        d.rectangle([x, 280 - h, x + w - 4, 280], fill=(35, 35, 45))
        for wy in range(280 - h + 10, 270, 18):
            for wx in range(x + 6, x + w - 12, 14):
                if rnd.random() < 0.5:
                    d.rectangle([wx, wy, wx + 6, wy + 9], fill=(250, 210, 120))  # lit windows
        x += w
    d.line([(0, 320), (W, 320)], fill=(230, 230, 230), width=3)
    return img


if __name__ == "__main__":
    OUT.mkdir(parents=True, exist_ok=True)
    for make in (beach, snow_trees, dog_on_grass, city_street):
        make().save(OUT / f"{make.__name__}.jpg", quality=88)
        print(OUT / f"{make.__name__}.jpg")
