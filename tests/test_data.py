"""One dataset interface over three formats; the config files."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from captioner.config import load_config
from captioner.data import load_coco, load_flickr8k, load_karpathy, load_split

ROOT = Path(__file__).resolve().parents[1]


def _write_karpathy(flickr: Path, out: Path) -> Path:
    images = []
    for split, name in (("train", "train"), ("val", "dev")):
        for ex in load_flickr8k(flickr, name):
            images.append({"filename": ex.image_id, "split": split, "sentences": [{"raw": c} for c in ex.captions]})
    out.write_text(json.dumps({"dataset": "flickr8k", "images": images}))
    return out


def _write_coco(flickr: Path, split: str, out: Path) -> Path:
    exs = load_flickr8k(flickr, split)
    imgs = [{"id": 1000 + i, "file_name": ex.image_id, "width": 224, "height": 224} for i, ex in enumerate(exs)]
    anns = [{"id": 10 * (1000 + i) + j, "image_id": 1000 + i, "caption": c}
            for i, ex in enumerate(exs) for j, c in enumerate(ex.captions)]
    out.write_text(json.dumps({"images": imgs, "annotations": anns, "info": {}, "licenses": []}))
    return out


def _key(examples):
    return sorted((ex.path.name, tuple(ex.captions)) for ex in examples)


def test_three_formats_load_to_the_same_examples(tiny_data, tmp_path):
    images = tiny_data / "Flicker8k_Dataset"
    karpathy = _write_karpathy(tiny_data, tmp_path / "dataset_flickr8k.json")
    for split in ("train", "dev"):
        flickr = load_flickr8k(tiny_data, split)
        assert len(flickr) == {"train": 24, "dev": 8}[split] and all(len(ex.captions) == 5 for ex in flickr)
        assert all(ex.path.is_file() for ex in flickr)
        kp = load_karpathy(karpathy, images, split)
        coco = load_coco(_write_coco(tiny_data, split, tmp_path / f"captions_{split}.json"), images)
        assert _key(flickr) == _key(kp) == _key(coco)
        assert {ex.path for ex in flickr} == {ex.path for ex in kp} == {ex.path for ex in coco}


def test_crlf_split_files_have_no_stray_carriage_returns(tiny_data):
    assert b"\r\n" in (tiny_data / "Flickr_8k.trainImages.txt").read_bytes()
    assert all("\r" not in ex.image_id for ex in load_flickr8k(tiny_data, "train"))


def test_missing_split_file_is_reported_clearly(tiny_data):
    with pytest.raises(FileNotFoundError, match="Flickr_8k.testImages.txt"):
        load_flickr8k(tiny_data, "test")


def test_load_split_dispatches_on_config(tiny_data, tmp_path):
    cfg = load_config(None, [f"data.root={tiny_data}"])
    assert _key(load_split(cfg.data, "dev")) == _key(load_flickr8k(tiny_data, "dev"))
    kp = _write_karpathy(tiny_data, tmp_path / "k.json")
    cfg = load_config(None, ["data.format=karpathy", f"data.root={kp}", f"data.images={tiny_data / 'Flicker8k_Dataset'}"])
    assert _key(load_split(cfg.data, "dev")) == _key(load_flickr8k(tiny_data, "dev"))


def test_config_rejects_unknown_keys_and_parses_overrides():
    cfg = load_config(ROOT / "configs" / "flickr8k_lite0.yaml", ["train.lr=0.5", "model.cell=gru"])
    assert cfg.train.lr == 0.5 and cfg.model.cell == "gru" and cfg.model.encoder == "efficientnet_lite0"
    with pytest.raises(ValueError, match="unknown key"):
        load_config(None, ["train.lr_typo=1"])
    with pytest.raises(ValueError, match="section.key=value"):
        load_config(None, ["lr=1"])
    # YAML 1.1 reads 5e-3 as a string; float fields take it as a number, or say what is wrong.
    assert load_config(None, ["train.lr=5e-3"]).train.lr == 0.005
    with pytest.raises(ValueError, match="train.lr must be a number"):
        load_config(None, ["train.lr=fast"])


def test_coco_vgg16_config_loads_and_fails_only_for_missing_weights_and_data(monkeypatch, tmp_path, capsys):
    from captioner.cli import main

    cfg = load_config(ROOT / "configs" / "coco_vgg16.yaml")
    assert cfg.model.encoder == "vgg16" and cfg.data.format == "karpathy"
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    monkeypatch.chdir(tmp_path)
    assert main(["extract-features", "--config", str(ROOT / "configs" / "coco_vgg16.yaml")]) == 2
    assert "vgg16-397923af.pth" in capsys.readouterr().err
    # With the weights question out of the way (random init), the missing data is what stops it.
    assert main(["extract-features", "--config", str(ROOT / "configs" / "coco_vgg16.yaml"),
                 "model.pretrained=false"]) == 2
    assert "dataset_coco.json" in capsys.readouterr().err


def test_length_batches_cover_every_caption_once_with_little_padding():
    import random

    from captioner.data import LengthBatches

    lengths = [random.Random(i).randint(5, 30) for i in range(1000)]
    one = LengthBatches(lengths, 32, seed=3)
    one.set_epoch(1)
    batches = list(one)
    assert len(batches) == len(one)
    assert sorted(i for b in batches for i in b) == list(range(1000))
    waste = sum(max(lengths[i] for i in b) * len(b) for b in batches) / sum(lengths)
    assert waste < 1.1  # random batches of this data pad ~1.6x
    assert list(one) == batches  # the order depends on (seed, epoch) only
    one.set_epoch(2)
    assert list(one) != batches
    ranks = [LengthBatches(lengths, 32, seed=3, rank=r, world_size=2) for r in (0, 1)]
    b0, b1 = (list(r) for r in ranks)
    assert len(b0) == len(b1) == len(ranks[0])  # every rank steps the same number of times
    assert not {i for b in b0 for i in b} & {i for b in b1 for i in b}
