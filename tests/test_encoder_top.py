"""Training the encoder's top blocks on cached maps (train.encoder_top_blocks): the cached path
computes what the whole encoder computes, the top trains (from train.unfreeze_epoch on), and the
result is a checkpoint like any other: loaded by Captioner, run by onnxruntime, exported."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import tiny_config

from captioner import Captioner, checkpoint
from captioner.data import CaptionDataset, collate, load_split
from captioner.decoder import caption_loss
from captioner.encoders import build_encoder
from captioner.export import export_bundle
from captioner.features import StaleCache, extract, extract_all, open_features
from captioner.runtime import Runtime
from captioner.train import train


@pytest.mark.parametrize("top_blocks", [1, 5])
def test_cached_top_gives_the_whole_encoders_features_and_loss(captioner, tmp_path, top_blocks):
    examples = load_split(captioner.config.data, "dev")
    pixels = torch.stack([captioner.preprocess(ex.path) for ex in examples])
    encoder = build_encoder("efficientnet_lite0")
    below, top = encoder.split(top_blocks)
    with torch.no_grad():
        whole = encoder(pixels)
        torch.testing.assert_close(top(below(pixels)), whole, atol=0, rtol=0)  # the same layers, in order
        # As training reads them: fp16 maps, cached by the onnxruntime engine.
        maps = extract(below, examples, tmp_path, "dev", batch_size=4, num_workers=0, engine="onnxruntime")
        cached = top(torch.from_numpy(np.array(maps)).float())
    assert maps.dtype == np.float16 and maps.shape == (len(examples), below.width)
    torch.testing.assert_close(cached, whole, atol=2e-3, rtol=1e-2)  # fp16 rounding of the maps

    dataset = CaptionDataset(examples, captioner.vocab, whole.numpy())
    _, tokens, targets = collate([dataset[i] for i in range(len(dataset))])
    index = torch.tensor([i for i, _ in dataset.pairs])
    with torch.no_grad():
        losses = [caption_loss(captioner.decoder(v[index], tokens), targets).item() for v in (whole, cached)]
    assert losses[1] == pytest.approx(losses[0], rel=1e-3)


def _state(module) -> dict:
    return {k: v.clone() for k, v in module.state_dict().items()}


def test_training_the_top_on_cached_maps(tiny_data, tiny_run, tmp_path):
    cfg = tiny_config(tiny_data, tmp_path, "train.encoder_top_blocks=1", "train.epochs=1", "train.encoder_lr=1e-2")
    extract_all(cfg, batch_size=16, num_workers=0)
    assert (tmp_path / "cache/efficientnet_lite0_below15/train.npy").is_file()
    pretrained = _state(build_encoder("efficientnet_lite0"))
    top_keys = [k for k in pretrained if k.startswith(("backbone.net._blocks.15.", "backbone.net._conv_head",
                                                         "backbone.net._bn1"))]

    # Frozen until epoch 2: a one-epoch run trains the decoder only and stores the encoder unchanged.
    train(tiny_config(tiny_data, tmp_path / "frozen", "train.encoder_top_blocks=1", "train.epochs=1",
                      "train.unfreeze_epoch=2", f"data.feature_cache={tmp_path / 'cache'}"))
    frozen = checkpoint.load(tmp_path / "frozen/run/best.pt")["encoder"]
    assert all(torch.equal(frozen[k], v.float() if v.is_floating_point() else v) for k, v in pretrained.items())

    train(cfg)
    best = Path(cfg.train.out_dir) / "best.pt"
    stored = checkpoint.load(best)["encoder"]
    changed = {k for k in pretrained if pretrained[k].is_floating_point() and not torch.equal(stored[k], pretrained[k])}
    assert changed and changed <= set(top_keys)  # the top trained, nothing below the cut moved
    assert not any("running" in k for k in changed)  # BatchNorm keeps ImageNet's statistics

    cap = Captioner.load(best, device="cpu")  # onnxruntime, exported from the fine-tuned weights
    dev = load_split(cfg.data, "dev")
    pixels = torch.stack([cap.preprocess(ex.path) for ex in dev])
    below, top = cap.encoder.split(1)
    with torch.no_grad():
        trained_v = top(below(pixels))
    torch.testing.assert_close(cap.encode(pixels), trained_v, atol=1e-4, rtol=1e-4)
    captions = [r["caption"] for r in cap.caption([ex.path for ex in dev])]
    assert captions == [cap.format(h)[0]["caption"] for h in cap.decode(trained_v)]
    bundle = Runtime(export_bundle(cap, tmp_path / "bundle"))  # the torch-free export carries the trained top
    assert [r["caption"] for r in bundle.caption([str(ex.path) for ex in dev])] == captions
    # Features cached by the pretrained encoder are not this model's: refused, not silently used.
    with pytest.raises(StaleCache, match="other weights"):
        open_features(tiny_run[0].data.feature_cache, "dev", dev, cap.encoder)
    with pytest.raises(StaleCache, match="other weights"):  # nor overwritten by them
        extract(cap.encoder, dev, tiny_run[0].data.feature_cache, "dev", num_workers=0)
