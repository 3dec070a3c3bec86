"""The encoder engines: onnxruntime computes what torch computes, from a cached export it can trust."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
from conftest import FLICKR8K, ROOT, requires_flickr8k

from captioner import encoder_engine, ort
from captioner.encoders import build_encoder
from captioner.files import file_sha256
from captioner.inference import Captioner


@pytest.fixture(scope="module")
def shipped():
    return Captioner.load(device="cpu")


def dev_photos(n: int) -> list:
    names = (FLICKR8K / "Flickr_8k.devImages.txt").read_text().split()[:n]
    return [FLICKR8K / "Flicker8k_Dataset" / name for name in names]


@requires_flickr8k()
def test_onnxruntime_and_torch_encoders_agree_on_real_photos(shipped):
    pixels = torch.stack([shipped.preprocess(p) for p in dev_photos(16)])
    ort_feats = encoder_engine.encoder_runner(shipped.encoder, "onnxruntime")(pixels)
    torch_feats = encoder_engine.encoder_runner(shipped.encoder, "torch")(pixels)
    assert ort_feats.shape == torch_feats.shape == (16, shipped.encoder.width)
    assert (ort_feats - torch_feats).abs().max().item() <= 1e-4


@requires_flickr8k()
def test_both_engines_caption_real_photos_alike(shipped):
    photos = dev_photos(8)
    by_torch = Captioner.load(device="cpu", engine="torch").caption(photos)
    by_ort = shipped.caption(photos)
    assert shipped.engine == "auto" and encoder_engine.resolve_engine(shipped.engine, shipped.device) == "onnxruntime"
    assert [r["caption"] for r in by_ort] == [r["caption"] for r in by_torch]
    assert all(abs(a["score"] - b["score"]) < 1e-3 for a, b in zip(by_ort, by_torch))


def test_the_export_is_reused_and_a_corrupt_one_is_exported_again(tmp_path):
    encoder = build_encoder("efficientnet_lite0", pretrained=False)
    path = encoder_engine.encoder_onnx(encoder, tmp_path)
    first = path.stat()
    assert encoder_engine.encoder_onnx(encoder, tmp_path) == path
    assert path.stat().st_mtime_ns == first.st_mtime_ns  # reused, not written again

    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF  # one flipped byte in the weights: still loads, silently wrong
    path.write_bytes(data)
    assert encoder_engine.encoder_onnx(encoder, tmp_path) == path
    assert path.read_bytes() != bytes(data)
    assert json.loads(path.with_suffix(".json").read_text())["sha256"] == file_sha256(path)

    path.write_bytes(path.read_bytes()[:1000])  # torn
    session = ort.session(encoder_engine.encoder_onnx(encoder, tmp_path))
    pixels = torch.randn(2, 3, 224, 224)
    torch.testing.assert_close(torch.from_numpy(session.run(None, {"pixels": pixels.numpy()})[0]),
                               encoder_engine.encoder_runner(encoder, "torch")(pixels), atol=1e-4, rtol=1e-4)


def test_other_weights_get_their_own_file(tmp_path):
    a = build_encoder("efficientnet_lite0", pretrained=False)
    b = build_encoder("efficientnet_lite0", pretrained=False)
    with torch.no_grad():
        next(b.parameters()).add_(1.0)
    assert encoder_engine.encoder_onnx(a, tmp_path) != encoder_engine.encoder_onnx(b, tmp_path)


def test_auto_falls_back_to_torch_where_onnxruntime_cannot_run(tmp_path, monkeypatch):
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    monkeypatch.setenv("CAPTIONER_CACHE", str(blocker / "cache"))  # a cache that cannot be made
    encoder = build_encoder("efficientnet_lite0", pretrained=False)
    pixels = torch.randn(1, 3, 224, 224)
    with pytest.warns(UserWarning, match="onnxruntime encoder engine is unavailable"):
        run = encoder_engine.encoder_runner(encoder, "auto")
    torch.testing.assert_close(run(pixels), encoder_engine.encoder_runner(encoder, "torch")(pixels))
    with pytest.raises(OSError):
        encoder_engine.encoder_runner(encoder, "onnxruntime")


def test_engine_names_are_checked():
    with pytest.raises(ValueError, match="unknown engine"):
        encoder_engine.resolve_engine("tensorrt", torch.device("cpu"))
    with pytest.raises(encoder_engine.EngineError, match="--engine torch"):
        encoder_engine.resolve_engine("onnxruntime", torch.device("cuda"))
    assert encoder_engine.resolve_engine("auto", torch.device("cuda")) == "torch"


def test_the_cli_takes_engine_torch():
    out = subprocess.run([sys.executable, "-m", "captioner.cli", "caption", "--engine", "torch",
                          str(ROOT / "demo/examples/grace_hopper.jpg")], capture_output=True, text=True, check=True)
    name, caption = out.stdout.strip().split("\t")
    assert name.endswith("grace_hopper.jpg") and len(caption.split()) >= 3


def test_bf16_is_called_slow_only_where_it_is():
    from captioner import hardware

    assert not hardware.fast_bf16(torch.device("cpu"), frozenset({"avx2", "avx512f"}))  # Ice Lake
    assert hardware.fast_bf16(torch.device("cpu"), frozenset({"avx512f", "avx512_bf16"}))
    assert hardware.fast_bf16(torch.device("cpu"), frozenset({"amx_bf16", "amx_tile"}))
    assert hardware.fast_bf16(torch.device("cuda"), frozenset())
    if not hardware.fast_bf16(torch.device("cpu")):
        hardware._warn_once.cache_clear()
        with pytest.warns(UserWarning, match="neither AMX nor AVX512-BF16"):
            Captioner.load(device="cpu", precision="bf16")


def test_a_bad_input_raises_what_the_torch_engine_raises():
    encoder = build_encoder("efficientnet_lite0", pretrained=False)
    for name in ("onnxruntime", "torch"):
        with pytest.raises(RuntimeError):
            encoder_engine.encoder_runner(encoder, name)(torch.zeros(1, 1, 224, 224))
