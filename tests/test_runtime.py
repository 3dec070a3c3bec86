"""The exported bundle and the torch-free runtime: same pixels, same captions, same scores as the torch Captioner."""
from __future__ import annotations

import json
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch
from conftest import FLICKR8K, ROOT, requires_flickr8k

from captioner import cli
from captioner.config import ModelConfig
from captioner.decoder import AttentionDecoder, Decoder, Ensemble
from captioner.export import ExportError, export, export_bundle
from captioner.inference import Captioner
from captioner.runtime import BundleError, Runtime

# Imports in the child fail for torch and everything built on it: the runtime must not need them.
NO_TORCH = "import sys\nfor m in ('torch', 'torchvision', 'nltk'): sys.modules[m] = None\n"
DEMO = sorted(str(p) for p in (ROOT / "demo" / "examples").glob("*.jpg"))


def dev_photos(n: int) -> list[str]:
    names = (FLICKR8K / "Flickr_8k.devImages.txt").read_text().split()[:n]
    return [str(FLICKR8K / "Flicker8k_Dataset" / name) for name in names]


@pytest.fixture(scope="module")
def shipped():
    return Captioner.load(device="cpu")


@pytest.fixture(scope="module")
def bundle(tmp_path_factory):
    return export(None, tmp_path_factory.mktemp("export") / "bundle")


@pytest.fixture(scope="module")
def runtime(bundle):
    return Runtime(bundle)


def run_without_torch(code: str, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", NO_TORCH + code, *args], capture_output=True, text=True,
                          cwd=ROOT, timeout=300)


def test_import_captioner_does_not_import_torch():
    probe = "import captioner, captioner.runtime, captioner.images, captioner.vocab; print('ok')"
    r = subprocess.run([sys.executable, "-c", probe + "; import sys; assert 'torch' not in sys.modules"],
                       capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert r.returncode == 0 and r.stdout.strip() == "ok", r.stderr
    r = run_without_torch(probe)
    assert r.returncode == 0, r.stderr


@requires_flickr8k()
def test_runtime_without_torch_captions_as_the_captioner(shipped, bundle):
    photos = dev_photos(6) + DEMO[:2]
    runner = "import runpy; runpy.run_module('captioner.runtime', run_name='__main__')"
    r = run_without_torch(runner, str(bundle), *photos, "--json")
    assert r.returncode == 0, r.stderr
    got = [json.loads(line) for line in r.stdout.splitlines()]
    want = shipped.caption(photos)
    assert [g["image"] for g in got] == photos
    assert [g["caption"] for g in got] == [w["caption"] for w in want]
    assert all(abs(g["score"] - w["score"]) < 1e-3 for g, w in zip(got, want))
    # The plain output is `captioner caption`'s: image<TAB>caption.
    r = run_without_torch(runner, str(bundle), *photos[:2])
    assert r.stdout.splitlines() == [f"{p}\t{w['caption']}" for p, w in zip(photos[:2], want[:2])]


def test_the_runtime_cli_reports_bad_images_and_bad_bundles(bundle, tmp_path):
    (tmp_path / "broken.jpg").write_bytes(b"not a jpeg")
    runner = "from captioner.runtime import main; sys.exit(main(sys.argv[1:]))"
    r = run_without_torch(runner, str(bundle), str(tmp_path / "broken.jpg"), DEMO[0])
    assert r.returncode == 1
    assert r.stdout.startswith(f"{DEMO[0]}\t") and len(r.stdout.splitlines()) == 1
    assert f"{tmp_path / 'broken.jpg'}\terror: not an image file" in r.stderr
    r = run_without_torch(runner, str(tmp_path), DEMO[0])
    assert r.returncode == 2 and "bundle.json is missing" in r.stderr


@requires_flickr8k()
def test_pixels_are_the_captioners(shipped, runtime):
    # Flickr8k photos and demo photos of other sizes and aspect ratios (portrait, landscape, square).
    for photo in dev_photos(4) + DEMO:
        assert np.array_equal(runtime.preprocess(photo), shipped.preprocess(photo).numpy()), photo


@requires_flickr8k()
@pytest.mark.parametrize("options", [
    dict(method="greedy"), dict(beam_size=3, length_penalty="avg"), dict(beam_size=4, length_penalty="none", max_len=6),
    dict(n_best=3), dict(guide="on", guide_threshold=0.2),
    dict(guide="on", guide_threshold=0.05, guide_max=3, guide_weight=10.0, n_best=2, length_penalty="avg")])
def test_decoding_options_match_the_captioner(shipped, runtime, options):
    # The demo photos have confident tags, so the guided rows decode with constraint states.
    photos = dev_photos(6) + DEMO
    want, got = shipped.caption(photos, **options), runtime.caption(photos, **options)
    flat = (lambda rs: [r for group in rs for r in group]) if options.get("n_best") else (lambda rs: rs)
    assert [r["caption"] for r in flat(got)] == [r["caption"] for r in flat(want)]
    assert all(abs(g["score"] - w["score"]) < 1e-3 for g, w in zip(flat(got), flat(want)))


def test_bytes_and_pil_images_caption_as_the_captioner(shipped, runtime):
    from PIL import Image

    by_path = runtime.caption(DEMO[0])
    assert runtime.caption(open(DEMO[0], "rb").read()) == by_path
    assert set(by_path) == {"caption", "score", "tags"} and by_path["caption"]
    # An opened PIL image is decoded at full size (a path or bytes may use JPEG's reduced-scale decoding).
    got, want = runtime.caption(Image.open(DEMO[0])), shipped.caption(Image.open(DEMO[0]))
    assert got["caption"] == want["caption"] and abs(got["score"] - want["score"]) < 1e-3


@pytest.mark.parametrize("cell, inject, layers", [("gru", "every", 1), ("lstm", "init", 2), ("rnn", "init", 1)])
def test_other_recurrent_decoders_export_exactly(shipped, tmp_path, cell, inject, layers):
    torch.manual_seed(0)
    cfg = ModelConfig(cell=cell, inject=inject, num_layers=layers, embed_dim=32, hidden_dim=48, feature_proj=64)
    cap = Captioner(shipped.encoder, Decoder(cfg, len(shipped.vocab), shipped.encoder.width), shipped.vocab,
                    shipped.config, device="cpu")
    rt = Runtime(export_bundle(cap, tmp_path / "bundle"))
    feats = torch.randn(3, shipped.encoder.width).abs()
    for options in (dict(method="greedy"), dict(beam_size=3, n_best=2)):
        want = [cap.format(hyps) for hyps in cap.decode(feats, cap.options(**options))]
        got = [rt.format(hyps) for hyps in rt.decode(feats.numpy(), rt.options(**options))]
        assert [[r["caption"] for r in g] for g in got] == [[r["caption"] for r in w] for w in want]
        assert np.allclose([[r["score"] for r in g] for g in got], [[r["score"] for r in w] for w in want],
                           atol=1e-3)


def test_the_int8_step_is_smaller_and_still_decodes(shipped, tmp_path):
    torch.manual_seed(0)
    cap = Captioner(shipped.encoder, Decoder(ModelConfig(embed_dim=32, hidden_dim=48), len(shipped.vocab),
                                             shipped.encoder.width), shipped.vocab, shipped.config, device="cpu")
    fp32, int8 = (export_bundle(cap, tmp_path / name, int8_decoder=name == "int8") for name in ("fp32", "int8"))
    assert json.loads((int8 / "bundle.json").read_text())["decoder"]["int8_step"] is True
    import onnx

    ops = {n.op_type for n in onnx.load(int8 / "decoder_step.onnx").graph.node}
    assert "MatMulInteger" in ops and "MatMulInteger" not in {n.op_type for n in onnx.load(fp32 / "decoder_step.onnx")
                                                              .graph.node}
    assert (int8 / "decoder_step.onnx").stat().st_size < (fp32 / "decoder_step.onnx").stat().st_size
    feats = torch.randn(2, shipped.encoder.width).abs().numpy()
    want, got = (rt.decode(feats, rt.options(beam_size=3)) for rt in (Runtime(fp32), Runtime(int8)))
    assert len(got) == 2 and all(len(h) == 1 and h[0][1] < 0 for h in got)
    assert np.allclose([h[0][1] for h in got], [h[0][1] for h in want], atol=0.5)


def test_export_refuses_what_it_cannot_represent(shipped, tmp_path, capsys):
    ensemble = Captioner(shipped.encoder, Ensemble([shipped.decoder, shipped.decoder]), shipped.vocab,
                         shipped.config, device="cpu")
    with pytest.raises(ExportError, match="ensemble of 2 decoders"):
        export_bundle(ensemble, tmp_path / "e")
    attention = Captioner(shipped.encoder, AttentionDecoder(ModelConfig(attention=True), len(shipped.vocab), 1280),
                          shipped.vocab, shipped.config, device="cpu")
    with pytest.raises(ExportError, match="attention decoder"):
        export_bundle(attention, tmp_path / "a")
    assert not any(tmp_path.iterdir())  # refused before writing anything
    # From the command line: an ensemble checkpoint is refused with the reason, exit status 2.
    from captioner import checkpoint

    payload = checkpoint.load(ROOT / "captioner" / "assets" / "flickr8k_lite0.pt")
    checkpoint.save(tmp_path / "ens.pt", config=payload["config"], vocab=payload["vocab"],
                    decoder=[payload["decoder"], payload["decoder"]])
    assert cli.main(["export", "--checkpoint", str(tmp_path / "ens.pt"), "--out", str(tmp_path / "b")]) == 2
    assert "cannot export: an ensemble of 2 decoders" in capsys.readouterr().err
    assert not (tmp_path / "b").exists()


def test_a_changed_or_foreign_bundle_is_refused(bundle, tmp_path):
    copy = shutil.copytree(bundle, tmp_path / "bundle")
    step = copy / "decoder_step.onnx"
    data = bytearray(step.read_bytes())
    data[len(data) // 2] ^= 0xFF
    step.write_bytes(bytes(data))
    with pytest.raises(BundleError, match="decoder_step.onnx does not match its SHA-256"):
        Runtime(copy)
    manifest = json.loads((bundle / "bundle.json").read_text())
    shutil.copy(bundle / "decoder_step.onnx", step)
    (copy / "bundle.json").write_text(json.dumps({**manifest, "format_version": 99}))
    with pytest.raises(BundleError, match="format version 99 is not supported"):
        Runtime(copy)
    (copy / "encoder.onnx").unlink()
    (copy / "bundle.json").write_text(json.dumps(manifest))
    with pytest.raises(BundleError, match="bundle file missing"):
        Runtime(copy)


def test_export_does_not_overwrite_a_folder_that_is_not_a_bundle(shipped, tmp_path):
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(ExportError, match="not a bundle"):
        export_bundle(shipped, tmp_path)
    assert (tmp_path / "notes.txt").read_text() == "mine"


def test_export_into_a_bundle_folder_replaces_only_the_bundles_files(shipped, bundle, tmp_path, capsys):
    out = shutil.copytree(bundle, tmp_path / "bundle")
    (out / "notes.txt").write_text("mine")
    (out / "photos").mkdir()
    (out / "photos" / "dog.jpg").write_bytes(b"jpeg")
    export_bundle(shipped, out)
    assert (out / "notes.txt").read_text() == "mine" and (out / "photos" / "dog.jpg").read_bytes() == b"jpeg"
    assert sorted(p.name for p in out.iterdir()) == sorted(["bundle.json", "decoder_init.onnx", "decoder_step.onnx",
                                                            "encoder.onnx", "imagenet_nouns.tsv", "tagger.npz",
                                                            "notes.txt", "photos"])
    Runtime(out)
    plain = tmp_path / "plain"
    plain.write_text("a file")
    assert cli.main(["export", "--out", str(plain)]) == 2
    assert "is a file, not a folder" in capsys.readouterr().err and plain.read_text() == "a file"


@pytest.mark.parametrize("path", ["/etc/passwd", "../encoder.onnx", "sub/../../x.onnx", "", 7])
def test_a_manifest_path_outside_the_bundle_is_refused(bundle, tmp_path, path):
    copy = shutil.copytree(bundle, tmp_path / "bundle")
    manifest = json.loads((copy / "bundle.json").read_text())
    manifest["files"]["decoder_step"]["path"] = path
    (copy / "bundle.json").write_text(json.dumps(manifest))
    with pytest.raises(BundleError, match="relative paths inside its folder"):
        Runtime(copy)


@pytest.mark.parametrize("damage", ["no files", "no graph entry", "entry not a dict", "no vocab", "no state"])
def test_a_malformed_manifest_is_a_bundle_error(bundle, tmp_path, damage):
    copy = shutil.copytree(bundle, tmp_path / "bundle")
    m = json.loads((copy / "bundle.json").read_text())
    if damage == "no files":
        del m["files"]
    elif damage == "no graph entry":
        del m["files"]["encoder"]
    elif damage == "entry not a dict":
        m["files"]["encoder"] = "encoder.onnx"
    elif damage == "no vocab":
        del m["vocab"]
    else:
        del m["decoder"]["state"]
    (copy / "bundle.json").write_text(json.dumps(m))
    with pytest.raises(BundleError, match="malformed"):
        Runtime(copy)


def test_features_do_not_depend_on_the_images_run_beside_them(runtime):
    pixels = np.stack([runtime.preprocess(p) for p in DEMO[:5]] * 2)  # runs of ort.ENCODER_CHUNK and a remainder
    alone = np.concatenate([runtime.encode(pixels[i:i + 1]) for i in range(len(pixels))])
    assert np.array_equal(runtime.encode(pixels), alone)
    assert np.array_equal(runtime.encoder.run(None, {"pixels": pixels})[0], alone)  # all ten in one run


def test_the_runtime_tags_as_the_captioner(shipped, runtime):
    want, got = shipped.tags(DEMO), runtime.tags(DEMO)
    assert [[t["tag"] for t in g] for g in got] == [[t["tag"] for t in w] for w in want]
    assert np.allclose([t["prob"] for g in got for t in g], [t["prob"] for w in want for t in w], atol=1e-3)
    assert runtime.caption(DEMO[0], guide="on")["tags"] == got[0]


def test_the_manifest_describes_the_model(bundle, shipped):
    m = json.loads((bundle / "bundle.json").read_text())
    assert m["tags"] == {"regions": 1} and {"tagger", "tag_mapping"} <= set(m["files"])
    assert m["decode"]["guide"] == shipped.config.decode.guide
    assert m["vocab"]["itos"] == shipped.vocab.itos
    assert m["preprocess"]["resize"] == m["preprocess"]["crop"] == 224
    assert m["preprocess"]["mean"] == m["preprocess"]["std"] == [0.5, 0.5, 0.5]
    assert m["decode"]["beam_size"] == shipped.config.decode.beam_size
    assert m["decoder"]["state"] == ["h", "c"]
    assert m["model"]["cell"] == "lstm"
