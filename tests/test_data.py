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
    images = tiny_data / "Flicker8k_Dataset"
    cfg = load_config(None, ["data.format=karpathy", f"data.root={kp}", f"data.images={images}"])
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
    # A retired key (checkpoints written with it) loads with a warning, and changes nothing.
    with pytest.warns(FutureWarning, match="guide_margin is no longer used"):
        assert load_config(None, ["decode.guide_margin=2.0"]).decode == load_config(None, []).decode


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


def _write_csv(examples, images: Path, out: Path) -> Path:
    import csv

    with out.open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["image", "caption"])
        w.writerows([ex.path.relative_to(images).as_posix(), c] for ex in examples for c in ex.captions)
    return out


def _write_jsonl(examples, images: Path, out: Path) -> Path:
    # Both row shapes: all captions in one line, or one line per caption.
    lines = []
    for i, ex in enumerate(examples):
        name = ex.path.relative_to(images).as_posix()
        lines += ([json.dumps({"image": name, "captions": ex.captions})] if i % 2 else
                  [json.dumps({"image": name, "caption": c}) for c in ex.captions])
    out.write_text("\n".join(lines) + "\n")
    return out


def test_csv_and_jsonl_load_to_the_same_examples_as_the_other_formats(tiny_data, tmp_path):
    from captioner.data import detect_format, load_csv, load_jsonl

    images = tiny_data / "Flicker8k_Dataset"
    for split in ("train", "dev"):
        flickr = load_flickr8k(tiny_data, split)
        coco = load_coco(_write_coco(tiny_data, split, tmp_path / f"captions_{split}.json"), images)
        csv_file = _write_csv(flickr, images, tmp_path / f"{split}.csv")
        jsonl_file = _write_jsonl(flickr, images, tmp_path / f"{split}.jsonl")
        from_csv, from_jsonl = load_csv(csv_file, images), load_jsonl(jsonl_file, images)
        assert _key(flickr) == _key(coco) == _key(from_csv) == _key(from_jsonl)
        assert [ex.path for ex in flickr] == [ex.path for ex in from_csv] == [ex.path for ex in from_jsonl]
        assert detect_format(csv_file) == "csv" and detect_format(jsonl_file) == "jsonl"
        cfg = load_config(None, ["data.format=jsonl", f"data.root={jsonl_file}", f"data.images={images}"])
        assert _key(load_split(cfg.data, "train")) == _key(flickr)
    # Content decides when the name does not: a JSONL file named .txt, a CSV named .txt.
    (tmp_path / "j.txt").write_text(jsonl_file.read_text())
    (tmp_path / "c.txt").write_text(csv_file.read_text())
    assert detect_format(tmp_path / "j.txt") == "jsonl" and detect_format(tmp_path / "c.txt") == "csv"
    assert detect_format(tiny_data) == "flickr8k"
    assert detect_format(tmp_path / "captions_dev.json") == "coco"


@pytest.mark.parametrize("text, message", [
    ("image,caption\na.jpg,a dog\nb.jpg,\n", r"bad\.csv, line 3: caption must be non-empty"),
    ("image,caption\na.jpg,a dog\nb.jpg,a cat,extra\n", r"bad\.csv, line 3: expected 2 fields"),
    ("image,caption\na.jpg\n", r"bad\.csv, line 2: expected 2 fields"),
    ("file,text\na.jpg,a dog\n", r"bad\.csv, line 1: the header must name the columns image and caption"),
    # A caption spanning lines (quoted) is fine; the error after it names the line it is on.
    ('image,caption\na.jpg,"a dog,\nrunning"\n,a cat\n', r"bad\.csv, line 4: image must be non-empty"),
])
def test_bad_csv_rows_name_file_and_line(tmp_path, text, message):
    from captioner.data import DataError, load_csv

    (tmp_path / "bad.csv").write_text(text)
    with pytest.raises(DataError, match=message):
        load_csv(tmp_path / "bad.csv", tmp_path)


@pytest.mark.parametrize("line, message", [
    ('{"image": "b.jpg", "caption": "a cat"', "not JSON"),
    ('{"img": "b.jpg", "caption": "a cat"}', 'expected {"image"'),
    ('{"image": "b.jpg", "caption": "a", "captions": ["b"]}', 'expected {"image"'),
    ('{"image": "b.jpg", "captions": "a cat"}', "captions must be a non-empty list"),
    ('{"image": "b.jpg", "captions": ["a cat", 3]}', "caption must be non-empty text, got 3"),
    ('{"image": "", "caption": "a cat"}', "image must be non-empty"),
    ('["b.jpg", "a cat"]', 'expected {"image"'),
])
def test_bad_jsonl_rows_name_file_and_line(tmp_path, line, message):
    from captioner.data import DataError, load_jsonl

    # Line 3: blank lines are skipped but still counted.
    (tmp_path / "bad.jsonl").write_text('{"image": "a.jpg", "caption": "a dog"}\n\n' + line + "\n")
    with pytest.raises(DataError, match=r"bad\.jsonl, line 3: " + message.replace("{", r"\{").replace("[", r"\[")):
        load_jsonl(tmp_path / "bad.jsonl", tmp_path)


def test_replay_mixes_in_the_asked_share_of_captions(tiny_data):
    import numpy as np

    from captioner.data import with_replay

    own, other = load_flickr8k(tiny_data, "dev"), load_flickr8k(tiny_data, "train")  # 8 and 24 images
    own_src, other_src = np.zeros((8, 3), np.float16), np.arange(72, dtype=np.float16).reshape(24, 3)
    mixed, src = with_replay(own, own_src, other, other_src, 0.5, seed=1)
    assert mixed[:8] == own and src.shape == (len(mixed), 3) and not src[:8].any()
    assert sum(len(ex.captions) for ex in mixed[8:]) == 40  # as many as the 40 own captions
    by_id = {ex.image_id: (i, ex) for i, ex in enumerate(other)}
    for row, ex in zip(src[8:], mixed[8:]):
        i, source = by_id[ex.image_id]
        assert (row == other_src[i]).all() and set(ex.captions) <= set(source.captions)
    assert with_replay(own, own_src, other, other_src, 0.5, seed=1)[0] == mixed  # the seed decides
    assert with_replay(own, own_src, other, other_src, 0.0)[0] == own
