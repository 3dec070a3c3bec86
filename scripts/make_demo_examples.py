"""Copy the demo's example photos (demo/examples/*.jpg, all but grace_hopper.jpg) out of a
scikit-image wheel, as modest JPEGs. The wheel ships them as public-domain/CC0 sample data
(sources and licences: demo/examples/LICENSES.md). scikit-image is not a dependency: only
its wheel file is read.

    pip download --no-deps scikit-image==0.26.0 -d /tmp/skimage
    python scripts/make_demo_examples.py /tmp/skimage/scikit_image-0.26.0-*.whl
"""
from __future__ import annotations

import argparse
import io
import zipfile
from pathlib import Path

from PIL import Image

OUT = Path(__file__).resolve().parents[1] / "demo" / "examples"
# file in the wheel -> name in demo/examples
PHOTOS = {
    "skimage/data/astronaut.png": "astronaut.jpg",
    "skimage/data/camera.png": "camera.jpg",
    "skimage/data/chelsea.png": "cat.jpg",
    "skimage/data/coffee.png": "coffee.jpg",
    "skimage/data/rocket.jpg": "rocket.jpg",
}
LONGEST_SIDE = 640


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("wheel", type=Path, help="a scikit-image wheel (pip download --no-deps scikit-image)")
    args = p.parse_args()
    with zipfile.ZipFile(args.wheel) as wheel:
        for member, name in PHOTOS.items():
            img = Image.open(io.BytesIO(wheel.read(member))).convert("RGB")
            img.thumbnail((LONGEST_SIDE, LONGEST_SIDE))  # only ever shrinks, keeps the aspect ratio
            img.save(OUT / name, quality=90)
            print(OUT / name, img.size)


if __name__ == "__main__":
    main()
