"""The ImageNet class -> caption noun mapping, and the tags made from it."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
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


def test_a_two_word_name_is_a_tag_and_guides_only_through_the_words_the_decoder_can_write():
    from captioner.tags import Tagger, read_mapping

    mapping = dict((noun, words) for noun, words in read_mapping() if noun)
    assert mapping["tennis ball"] == ["tennis_ball", "tennis_balls"] and "teddy" in mapping["teddy bear"]
    classes = [noun for noun, _ in read_mapping()]
    weight = np.zeros((len(classes), 2), np.float32)
    weight[classes.index("tennis ball"), 0] = weight[classes.index("teddy bear"), 1] = 20.0
    tagger = Tagger.from_mapping(weight, np.zeros(len(classes)))
    feats = np.array([[1.0, 0.0], [0.0, 1.0]], np.float32)
    assert [t[0]["tag"] for t in tagger(feats)] == ["tennis ball", "teddy bear"]
    stoi = {"tennis": 1, "ball": 2, "balls": 3, "teddy": 4, "bear": 5}
    found = tagger.constraints(feats, stoi, threshold=0.2, most=2)
    # A constraint is a set of single words: the ball's phrase is no word, the bear has "teddy".
    assert found[0] == [] and [ids for ids, _ in found[1]] == [(4,)]


def test_two_tags_of_one_kind_are_one_constraint_with_both_words_and_their_probability():
    from captioner.constraints import choose
    from captioner.tags import read_kin

    kin = read_kin()
    assert "boat" in kin["ship"] and "ship" in kin["boat"] and "cat" not in kin["dog"]
    nouns, probs = ["ship", "boat", "dog", "cat"], np.array([0.5, 0.25, 0.21, 0.01])
    words = {n: [n, n + "s"] for n in nouns}
    stoi = {w: i for i, w in enumerate(w for n in nouns for w in words[n])}
    got = choose(probs, nouns, words, stoi, threshold=0.2, most=2, kin=kin)
    # ship and boat: one constraint (either names it, for 0.75); dog the second; cat below the threshold
    assert [(ids, round(p, 2)) for ids, p in got] == [((0, 1, 2, 3), 0.75), ((4, 5), 0.21)]
    # kin joins a chosen constraint even when `most` are chosen; without kin, two constraints
    assert [ids for ids, _ in choose(probs, nouns, words, stoi, threshold=0.2, most=1, kin=kin)] == [(0, 1, 2, 3)]
    assert [ids for ids, _ in choose(probs, nouns, words, stoi, threshold=0.2, most=2)] == [(0, 1), (2, 3)]

