"""The ImageNet class -> caption noun mapping, and the tags made from it."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.skipif(not Path("/usr/share/wordnet/data.noun").exists(),
                    reason="WordNet 3.0 is not installed (Debian package wordnet-base)")
def test_mapping_regenerates_identically():
    done = subprocess.run([sys.executable, str(ROOT / "scripts" / "make_imagenet_nouns.py"), "--check"],
                          capture_output=True, text=True)
    assert done.returncode == 0, done.stdout + done.stderr


def test_captioner_tags_name_the_demo_cat_and_match_the_captions_tags():
    from captioner import Captioner

    cap = Captioner.load(device="cpu")
    photos = [ROOT / "demo" / "examples" / name for name in ("cat.jpg", "coffee.jpg")]
    tags = cap.tags(photos)
    assert [t[0]["tag"] for t in tags] == ["cat", "coffee"]
    assert cap.tags(photos[0]) == tags[0]  # one image in, one list out
    assert [r["tags"] for r in cap.caption(photos)] == tags
