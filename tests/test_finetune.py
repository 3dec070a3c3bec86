"""Fine-tuning on a user's own captions: vocabulary extension and the whole flow on the tiny model."""
from __future__ import annotations

import csv
import math
from dataclasses import replace

import numpy as np
import pytest
import torch
from fixtures import draw

from captioner import Captioner, checkpoint
from captioner.finetune import Settings, finetune, format_report, grow_vocabulary, split_by_image
from captioner.vocab import Vocab


def test_vocab_extension_keeps_old_ids_and_rows_bit_identical(tiny_checkpoint):
    base = checkpoint.load(tiny_checkpoint)
    old = Vocab.from_dict(base["vocab"])
    new = old.extend(["a hexagon", "a hexagon .", "a purple hexagon", "an orange circle", "an orange hexagon"],
                     min_count=2)
    assert new.itos[:len(old)] == old.itos and new.stoi["red"] == old.stoi["red"]
    added = new.itos[len(old):]
    assert added == ["hexagon", "an", "orange"]  # by count, then name; purple (seen once) stays <unk>
    grown = grow_vocabulary(base["decoder"], old, new)
    for name in ("embed.weight", "out.weight", "out.bias"):
        assert torch.equal(grown[name][:len(old)], base["decoder"][name])
        assert grown[name].shape[0] == len(new)
    unk, k = old.unk, len(added)
    assert torch.equal(grown["embed.weight"][len(old):], base["decoder"]["embed.weight"][unk].expand(k, -1))
    assert torch.allclose(grown["out.bias"][len(old):], base["decoder"]["out.bias"][unk] - math.log(k))
    # The other weights are the very same tensors; the grown decoder loads into a model of the new size.
    assert all(grown[n] is t for n, t in base["decoder"].items() if n not in ("embed.weight", "out.weight", "out.bias"))
    payload = {**base, "vocab": new.to_dict(), "decoder": grown}
    cap = Captioner.from_payload(payload, device="cpu")
    # The new words share <unk>'s probability: the old words' log-probabilities move by one constant.
    before = Captioner.from_payload(base, device="cpu")
    feats, tokens = torch.randn(2, 1280), torch.tensor([[old.start, old.stoi["red"]]] * 2)
    lp_old, lp_new = (c.decoder(feats, tokens).log_softmax(-1) for c in (before, cap))
    shift = lp_new[..., :len(old)] - lp_old
    assert torch.allclose(shift, shift[..., :1].expand_as(shift), atol=1e-5)
    with pytest.raises(ValueError, match="must start with the old one"):
        grow_vocabulary(base["decoder"], new, old)


def test_transferred_words_take_their_known_words_rows_and_stay_behind_them(tiny_checkpoint):
    base = checkpoint.load(tiny_checkpoint)
    old = Vocab.from_dict(base["vocab"])
    new = Vocab(old.itos + ["hexagon", "hexagons", "purple"])
    grown = grow_vocabulary(base["decoder"], old, new, like={"hexagon": "circle", "hexagons": "circle"})
    d, circle = base["decoder"], old.stoi["circle"]
    for word in ("hexagon", "hexagons"):
        i = new.stoi[word]
        assert torch.equal(grown["embed.weight"][i], d["embed.weight"][circle])
        assert torch.equal(grown["out.weight"][i], d["out.weight"][circle])
        assert torch.isclose(grown["out.bias"][i], d["out.bias"][circle] - math.log(2))
    # The one word without a known twin gets <unk>'s rows, sharing <unk>'s probability alone.
    assert torch.equal(grown["embed.weight"][new.stoi["purple"]], d["embed.weight"][old.unk])
    assert torch.isclose(grown["out.bias"][new.stoi["purple"]], d["out.bias"][old.unk])
    with pytest.raises(ValueError, match="taking the rows of old ones"):
        grow_vocabulary(d, old, new, like={"hexagon": "nonword"})


def test_split_by_image_is_deterministic_and_independent_of_order(tiny_data):
    from captioner.data import load_flickr8k

    exs = load_flickr8k(tiny_data, "train")
    train, val = split_by_image(exs, 0.25)
    assert len(val) == 6 and len(train) == 18 and not {e.image_id for e in val} & {e.image_id for e in train}
    assert {e.image_id for e in split_by_image(exs[::-1], 0.25)[1]} == {e.image_id for e in val}
    with pytest.raises(ValueError, match="at least 2"):
        split_by_image(exs[:1], 0.2)


@pytest.fixture(scope="module")
def user_photos(tmp_path_factory):
    """A user's folder: orange circles and hexagon-named squares (new words), one listed photo
    missing and one unreadable, captions in a CSV with paths relative to the folder."""
    root = tmp_path_factory.mktemp("user_photos")
    (root / "photos").mkdir()
    rows = []
    for i in range(10):
        name = f"photos/orange_{i}.jpg"
        draw((250, 140, 20), "circle", seed=1000 + i).save(root / name)
        rows += [(name, "an orange circle on a white background"), (name, "a big orange circle")]
    rows += [("photos/gone.jpg", "an orange circle"), ("photos/broken.jpg", "an orange circle")]
    (root / "photos" / "broken.jpg").write_bytes(b"not a jpeg at all")
    with open(root / "captions.csv", "w", newline="") as f:
        csv.writer(f).writerows([("image", "caption"), *rows])
    return root


def test_finetune_writes_a_model_that_loads_like_any_other(tiny_run, user_photos, tmp_path, capsys):
    from captioner.cli import main

    _, start = tiny_run
    out = tmp_path / "mine"
    # replay: half the captions come from the tiny model's own training data (its cached features).
    assert main(["finetune", "--data", str(user_photos / "captions.csv"), "--images", str(user_photos),
                 "--from", str(start), "--out", str(out), "--epochs", "3", "--lr", "1e-2", "--replay", "0.5",
                 "--device", "cpu", "--workers", "0"]) == 0
    printed = capsys.readouterr().out
    assert "2 images skipped" not in printed
    assert "1 image skipped: missing file (photos/gone.jpg)" in printed
    assert "1 image skipped: unreadable image (photos/broken.jpg)" in printed
    assert "new words (2): orange an" in printed and "validation       starting model" in printed
    assert "starting model's dev (" in printed  # the tiny model's dev features are cached: forgetting is measured

    cap = Captioner.load(out / "best.pt", device="cpu")
    old = Vocab.from_dict(checkpoint.load(start)["vocab"])
    assert cap.vocab.itos == old.itos + ["orange", "an"]
    assert isinstance(cap.caption(user_photos / "photos" / "orange_0.jpg")["caption"], str)
    # 10 usable photos: 2 for validation, 8 for training, and as many replayed captions as own ones.
    assert len((out / "val.jsonl").read_text().splitlines()) == 2
    assert len((out / "train.jsonl").read_text().splitlines()) == 8
    assert "train (xe): 8 images, 16 items" not in printed  # replay added captions of other images
    assert "32 items" in printed

    with pytest.raises(ValueError, match="already holds a fine-tuned model"):
        finetune(user_photos / "captions.csv", out, images=user_photos, settings=Settings(start=str(start)))


def test_finetune_with_a_validation_file_and_self_critical_epochs(tiny_run, user_photos, tmp_path):
    import json

    _, start = tiny_run
    lines = (user_photos / "captions.csv").read_text().splitlines()
    (tmp_path / "val.csv").write_text("\n".join(lines[:1] + lines[-6:]) + "\n")  # orange_8, orange_9 + the 2 bad
    report = finetune(user_photos / "captions.csv", tmp_path / "run", images=user_photos, val=tmp_path / "val.csv",
                      settings=Settings(start=str(start), epochs=2, lr=1e-2, self_critical=1, device="cpu", workers=0))
    assert report.train_images == 10 and report.val_images == 2
    assert report.skipped == {"missing file": ["photos/gone.jpg", "photos/gone.jpg"],
                              "unreadable image": ["photos/broken.jpg", "photos/broken.jpg"]}
    assert report.chosen in ("teacher forcing", "self-critical")
    assert (tmp_path / "run" / "self_critical" / "best.pt").is_file()
    assert json.loads((tmp_path / "run" / "report.json").read_text())["new_words"] == ["orange", "an"]
    assert "orange" in format_report(report, tmp_path / "run")
    Captioner.load(tmp_path / "run" / "best.pt", device="cpu")


def test_finetune_from_a_model_with_a_fine_tuned_encoder(tiny_run, user_photos, tmp_path):
    """Like the shipped model: the starting checkpoint stores its encoder. Every feature the run
    reads (the new photos, the replayed and the forgetting report's own data) is that encoder's."""
    from captioner.encoders import build_encoder

    _, start = tiny_run
    payload = checkpoint.load(start)
    encoder = build_encoder("efficientnet_lite0").state_dict()
    encoder["backbone.net._conv_head.weight"] = encoder["backbone.net._conv_head.weight"] * 1.5
    checkpoint.save(tmp_path / "tuned.pt", config=payload["config"], vocab=payload["vocab"],
                    decoder=payload["decoder"], encoder=encoder)
    report = finetune(user_photos / "captions.csv", tmp_path / "run", images=user_photos,
                      settings=Settings(start=str(tmp_path / "tuned.pt"), epochs=1, replay=0.5, device="cpu",
                                        workers=0))
    assert isinstance(report.base_dev, dict)  # the starting model's dev, cached with its own encoder
    assert (tmp_path / "run" / "base_features" / "train.npy").is_file()
    stored = checkpoint.load(tmp_path / "run" / "best.pt")["encoder"]
    assert all(torch.equal(stored[k], v) for k, v in encoder.items())


def test_interpolation_keeps_old_ids_and_takes_the_new_rows_from_the_fine_tuning(tiny_checkpoint):
    from captioner.interpolation import interpolate

    base = checkpoint.load(tiny_checkpoint)
    old = Vocab.from_dict(base["vocab"])
    new = old.extend(["an orange hexagon"] * 2, min_count=2)
    start = grow_vocabulary(base["decoder"], old, new)
    torch.manual_seed(0)
    tuned = {k: t + torch.randn_like(t) if t.is_floating_point() else t for k, t in start.items()}
    n_old = len(old)
    at0, at1, half = (interpolate(start, tuned, a, n_old) for a in (0.0, 1.0, 0.5))
    for name in ("embed.weight", "out.weight", "out.bias"):
        assert torch.equal(at0[name][:n_old], base["decoder"][name])  # alpha 0: the old words as they were
        assert torch.allclose(half[name][:n_old], (start[name][:n_old] + tuned[name][:n_old]) / 2)
        for mixed in (at0, half, at1):  # the new words keep their fine-tuned rows at every point
            assert torch.equal(mixed[name][n_old:], tuned[name][n_old:])
    assert all(torch.equal(at1[k], tuned[k]) for k in tuned)
    assert all(torch.equal(at0[k], start[k]) for k in start if k not in ("embed.weight", "out.weight", "out.bias"))
    # The mixed decoder loads into the grown model: the old ids still name the old words.
    cap = Captioner.from_payload({**base, "vocab": new.to_dict(), "decoder": half}, device="cpu")
    assert cap.vocab.itos[:n_old] == old.itos and cap.vocab.stoi["red"] == old.stoi["red"]


def _old_dev_scores(tiny_cfg, model_path):
    from captioner.data import load_split
    from captioner.features import open_features
    from captioner.finetune import scores

    cap = Captioner.load(model_path, device="cpu")
    dev = load_split(tiny_cfg.data, tiny_cfg.data.dev_split)
    return scores(cap, open_features(tiny_cfg.data.feature_cache, tiny_cfg.data.dev_split, dev, cap.encoder), dev)


def test_the_chosen_model_forgets_no_more_than_the_budget(tiny_run, user_photos, tmp_path):
    from captioner.interpolation import within

    cfg, start = tiny_run
    before = _old_dev_scores(cfg, start)
    # A high learning rate on new data only: the fine-tuned model alone drifts from the old shapes.
    report = finetune(user_photos / "captions.csv", tmp_path / "run", images=user_photos,
                      settings=Settings(start=str(start), epochs=3, lr=3e-2, forget_budget=1.0, device="cpu",
                                        workers=0))
    assert isinstance(report.base_dev, dict) and report.base_dev["before"] == pytest.approx(before)
    # The rule had to act: the fine-tuned model alone forgets more than the budget allows.
    assert not within(report.base_dev["finetuned"], before, 1.0) and report.alpha < 1.0
    after = _old_dev_scores(cfg, tmp_path / "run" / "best.pt")  # scored again, from the written model
    assert before["bleu4"] - after["bleu4"] <= 1.0 and before["cider"] - after["cider"] <= 3.0
    assert after == pytest.approx(report.base_dev["after"])
    assert (tmp_path / "run" / "finetuned.pt").is_file() and len(report.points) == 10
    text = format_report(report, tmp_path / "run")
    assert f"alpha {report.alpha:.1f}" in text and "--forget-budget 1" in text
    assert report.gain_error is not None and report.gain_error >= 0.0
    assert f"± {report.gain_error:.2f} (standard error over the {report.val_images} validation photos" in text


def test_without_the_starting_model_s_data_the_run_says_what_it_skipped(tiny_run, user_photos, tmp_path):
    from captioner.finetune import UNMEASURED_ALPHA

    _, start = tiny_run
    payload = checkpoint.load(start)
    payload["config"]["data"]["root"] = str(tmp_path / "not_here")  # its training data is not on this machine
    checkpoint.save(tmp_path / "alone.pt", config=payload["config"], vocab=payload["vocab"], decoder=payload["decoder"])
    settings = Settings(start=str(tmp_path / "alone.pt"), epochs=2, lr=1e-2, device="cpu", workers=0)
    report = finetune(user_photos / "captions.csv", tmp_path / "run", images=user_photos, settings=settings)
    assert isinstance(report.base_dev, str) and report.base_dev.startswith("not measured")
    assert report.alpha == UNMEASURED_ALPHA and "cannot be measured" in report.why
    text = format_report(report, tmp_path / "run")
    assert "starting model's dev split not measured" in text and "fixed" in text
    Captioner.load(tmp_path / "run" / "best.pt", device="cpu")
    # --forget-budget inf: the best validation point, the old side unweighed.
    report = finetune(user_photos / "captions.csv", tmp_path / "inf", images=user_photos,
                      settings=replace(settings, forget_budget=math.inf))
    assert report.after["cider"] == max(p["new"]["cider"] for p in report.points)
    assert "not weighed" in report.why


def test_paired_error_is_the_standard_error_of_the_per_photo_change():
    from captioner.finetune import paired_error

    # changes 2, 3, 4: mean 3, sample standard deviation 1, over 3 photos
    assert paired_error(np.array([3.0, 5.0, 7.0]), np.array([1.0, 2.0, 3.0])) == pytest.approx(1 / np.sqrt(3))
    assert paired_error(np.array([4.0]), np.array([1.0])) is None  # one photo: no spread to measure
