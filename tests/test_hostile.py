"""Hostile images through every entry point: each ends in a caption or a clear error, never a crash or a 500.

The corpus is generated here (no binaries in the repository): extreme aspect ratios, truncated files,
decompression bombs, every mode Pillow writes, animations, EXIF rotations and formats captioner refuses.
Each entry point takes the whole corpus once, with one shipped model for the module: the HTTP API, the
UI's events (served and in the demo), caption-dir, evaluate, finetune's loader and the torch-free
runtime; and caption-dir once more in a process whose address space is capped.
"""
from __future__ import annotations

import csv
import io
import json
import mimetypes
import os
import struct
import subprocess
import sys
from dataclasses import dataclass

import numpy as np
import pytest
from conftest import ROOT
from fixtures import png_header_only
from live_server import live_server
from PIL import Image
from starlette.testclient import TestClient

from captioner.images import (
    MAX_PIXELS,
    RESIZE_BOUND,
    ImageError,
    ImageTooLarge,
    UnsupportedFormat,
    accepted_formats,
    load_image,
)

CAPTION, TOO_LARGE, UNSUPPORTED, UNREADABLE = "caption", "too large", "unsupported", "unreadable"
# outcome -> (what the loader raises, the API's status)
ERRORS = {TOO_LARGE: (ImageTooLarge, 413), UNSUPPORTED: (UnsupportedFormat, 415), UNREADABLE: (ImageError, 415)}
REFUSED_FORMAT = "not an image file, or not one in an accepted format"


@dataclass(frozen=True)
class Case:
    data: bytes
    outcomes: frozenset  # what a correct entry point may end in; one outcome but for a known Pillow bug
    words: str = ""  # in the error message
    size: tuple[int, int] | None = None  # the upright image's size, where it differs from the file's


def encoded(img: Image.Image, fmt: str, **params) -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt, **params)
    return buf.getvalue()


def photo(size=(96, 64)) -> Image.Image:
    """A small RGB image with structure: gradients across and down, a blue block in the middle."""
    w, h = size
    a = np.zeros((h, w, 3), np.uint8)
    a[..., 0] = np.linspace(0, 255, w)[None, :]
    a[..., 1] = np.linspace(0, 255, h)[:, None]
    a[h // 4:3 * h // 4, w // 4:3 * w // 4, 2] = 220
    return Image.fromarray(a, "RGB")


def psd(width: int = 8, height: int = 8) -> bytes:
    """A minimal Photoshop file (Pillow reads PSD but cannot write it): 3 channels of 8 bits, raw."""
    header = b"8BPS" + struct.pack(">H6xHIIHH", 1, 3, height, width, 8, 3)
    return header + struct.pack(">III", 0, 0, 0) + struct.pack(">H", 0) + bytes(3 * width * height)


def modes(p: Image.Image) -> dict[str, bytes]:
    """Every mode Pillow writes, in the formats that keep it."""
    gray16 = np.asarray(p.convert("L"), np.uint16) * 257  # the full 16-bit range
    palette = p.convert("P")
    alpha = bytes(range(0, 256, 16))  # palette entries from transparent to nearly opaque
    return {
        "mode_1.png": encoded(p.convert("1"), "PNG"),
        "mode_L.png": encoded(p.convert("L"), "PNG"),
        "mode_LA.png": encoded(p.convert("LA"), "PNG"),
        "mode_P_transparent_index.gif": encoded(palette, "GIF", transparency=0),
        "mode_P_alpha.png": encoded(palette, "PNG", transparency=alpha),
        "mode_PA.tif": encoded(p.convert("RGBA").convert("PA"), "TIFF"),
        "mode_I.tif": encoded(Image.fromarray(gray16.astype(np.int32), "I"), "TIFF"),
        "mode_I16.png": encoded(Image.frombytes("I;16", p.size, gray16.astype("<u2").tobytes()), "PNG"),
        "mode_I16.tif": encoded(Image.frombytes("I;16", p.size, gray16.astype("<u2").tobytes()), "TIFF"),
        "mode_I16B.tif": encoded(Image.frombytes("I;16B", p.size, gray16.astype(">u2").tobytes()), "TIFF"),
        "mode_F.tif": encoded(Image.fromarray(gray16.astype(np.float32) / 65535, "F"), "TIFF"),
        "mode_CMYK.jpg": encoded(p.convert("CMYK"), "JPEG"),
        "mode_CMYK.tif": encoded(p.convert("CMYK"), "TIFF"),
        "mode_YCbCr.jpg": encoded(p.convert("YCbCr"), "JPEG"),
        "mode_YCbCr_jpeg.tif": encoded(p.convert("YCbCr"), "TIFF", compression="jpeg"),
        "mode_LAB.tif": encoded(p.convert("LAB"), "TIFF"),
        "mode_RGBA.png": encoded(p.convert("RGBA"), "PNG"),
        "mode_RGBA.webp": encoded(p.convert("RGBA"), "WEBP"),
    }


def strip(length: int) -> Image.Image:
    return Image.fromarray(np.linspace(0, 255, 3 * length).astype(np.uint8).reshape(1, length, 3), "RGB")


def corpus() -> dict[str, Case]:
    p = photo()
    widest = MAX_PIXELS // RESIZE_BOUND**2  # the longest strip that the default limit admits once resized: 390:1
    jpeg, png = encoded(p, "JPEG"), encoded(p, "PNG")

    def more(fmt: str, **params) -> bytes:
        """p and two more frames (new ones each time: saving leaves a format's settings on the frames)."""
        frames = [p.rotate(180), p.transpose(Image.Transpose.FLIP_LEFT_RIGHT)]
        return encoded(p, fmt, save_all=True, append_images=frames, **params)

    rotated = {}
    for orientation in (6, 8):  # 90 degrees each way: the upright image is 64x96
        exif = Image.Exif()
        exif[0x0112] = orientation
        rotated[f"exif_orientation_{orientation}.jpg"] = Case(encoded(p, "JPEG", exif=exif), frozenset({CAPTION}),
                                                              size=(64, 96))
    return {
        # A few hundred bytes that Resize would make gigabytes of (8,960,000x224 for 40000x1).
        "wide_40000x1.png": Case(encoded(Image.new("L", (40000, 1)), "PNG"), frozenset({TOO_LARGE}), "aspect ratio"),
        "tall_1x40000.png": Case(encoded(Image.new("L", (1, 40000)), "PNG"), frozenset({TOO_LARGE}), "aspect ratio"),
        "wide_200000x1.png": Case(encoded(Image.new("L", (200000, 1)), "PNG"), frozenset({TOO_LARGE}),
                                  "aspect ratio"),
        f"strip_{widest}x1.png": Case(encoded(strip(widest), "PNG"), frozenset({CAPTION}), size=(widest, 1)),
        f"strip_{widest + 1}x1.png": Case(encoded(strip(widest + 1), "PNG"), frozenset({TOO_LARGE}), "aspect ratio"),
        "tiny_1x1.png": Case(encoded(Image.new("RGB", (1, 1), (200, 30, 30)), "PNG"), frozenset({CAPTION}),
                             size=(1, 1)),
        "truncated.jpg": Case(jpeg[:len(jpeg) // 2], frozenset({UNREADABLE}), "cannot decode"),
        "truncated.png": Case(png[:len(png) // 2], frozenset({UNREADABLE}), "truncated"),
        "bomb_7000x6000.png": Case(png_header_only(7000, 6000), frozenset({TOO_LARGE}), "over the limit"),
        "bomb_30000x30000.png": Case(png_header_only(30000, 30000), frozenset({TOO_LARGE}), "too large"),
        **{name: Case(data, frozenset({CAPTION})) for name, data in modes(p).items()},
        # Pillow reads back its own uncompressed YCbCr TIFF as 4 bytes a pixel and fails
        # (python-pillow/Pillow#9770): a clear error until a Pillow with the fix.
        "mode_YCbCr_raw.tif": Case(encoded(p.convert("YCbCr"), "TIFF"), frozenset({CAPTION, UNREADABLE})),
        "animated.gif": Case(more("GIF", duration=40), frozenset({CAPTION})),
        "animated.webp": Case(more("WEBP", duration=40), frozenset({CAPTION})),
        **rotated,
        "camera_mpo.jpg": Case(more("MPO"), frozenset({CAPTION})),  # how many cameras write their JPEGs
        "multipage.tif": Case(more("TIFF"), frozenset({CAPTION})),
        "mode_P.bmp": Case(encoded(p.convert("P"), "BMP"), frozenset({CAPTION})),
        **({"photo.avif": Case(encoded(p, "AVIF"), frozenset({CAPTION}))} if "AVIF" in accepted_formats() else {}),
        "vector.eps": Case(encoded(p, "EPS"), frozenset({UNSUPPORTED}), REFUSED_FORMAT),
        "layers.psd": Case(psd(), frozenset({UNSUPPORTED}), REFUSED_FORMAT),
        "icon.ico": Case(encoded(p, "ICO"), frozenset({UNSUPPORTED}), REFUSED_FORMAT),
        "eps_named_as.jpg": Case(encoded(p, "EPS"), frozenset({UNSUPPORTED}), REFUSED_FORMAT),  # by content
    }


CORPUS = corpus()
EXTENSIONS = sorted({name.rsplit(".", 1)[1] for name in CORPUS})


def outcome_of(error: str | None) -> str:
    """The outcome an entry point's error message (None: a caption) stands for."""
    if error is None:
        return CAPTION
    if REFUSED_FORMAT in error:
        return UNSUPPORTED
    return TOO_LARGE if "over the limit" in error or "too large" in error else UNREADABLE


def check(name: str, error: str | None) -> None:
    case = CORPUS[name]
    assert outcome_of(error) in case.outcomes, (name, error)
    if error is not None:
        assert case.words in error, (name, error)


@pytest.fixture(scope="module")
def shipped():
    from captioner import Captioner

    return Captioner.load(device="cpu")


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    """The corpus as files, and captions.csv naming each with a caption (for evaluate and finetune)."""
    root = tmp_path_factory.mktemp("hostile")
    images = root / "images"
    images.mkdir()
    for name, case in CORPUS.items():
        (images / name).write_bytes(case.data)
    with open(root / "captions.csv", "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["image", "caption"])
        writer.writerows((name, "a small picture with a blue square") for name in CORPUS)
    return root


def captioned(rows: dict[str, str | None]) -> None:
    """Every case has a row, and each row (name -> its error, None for a caption) is right for its case."""
    assert sorted(rows) == sorted(CORPUS)
    for name, error in rows.items():
        check(name, error)


def kept_the_readable(kept: set[str]) -> None:
    """`kept` (the cases an entry point used, the others it set aside) holds those that caption."""
    assert kept <= set(CORPUS)
    for name, case in CORPUS.items():
        if case.outcomes == {CAPTION}:
            assert name in kept, name
        elif CAPTION not in case.outcomes:
            assert name not in kept, name


# -- the loader itself ------------------------------------------------------------------

@pytest.mark.parametrize("name", CORPUS)
def test_the_loader_gives_an_upright_rgb_image_or_a_clear_error(name):
    case = CORPUS[name]
    try:
        img = load_image(case.data)
    except ImageError as e:
        check(name, str(e))
        assert isinstance(e, ERRORS[outcome_of(str(e))][0])
    else:
        check(name, None)
        assert img.mode == "RGB"
        assert img.size == (case.size or (96, 64))
        assert img.size == (1, 1) or 0 < np.asarray(img).std()  # not a blank frame: the modes keep their content


# -- the entry points -------------------------------------------------------------------

def test_the_api_answers_each_with_a_caption_or_a_4xx(shipped):
    from captioner.service import create_app

    with TestClient(create_app(shipped, ui=False)) as client:
        for name, case in CORPUS.items():
            r = client.post("/v1/captions", files=[("images", (name, case.data, "application/octet-stream"))])
            assert r.headers["content-type"] == "application/json"
            if r.status_code == 200:
                assert r.json()["results"][0]["caption"], name
                check(name, None)
            else:
                detail = r.json()["detail"]
                assert detail.startswith(f"{name}: "), detail
                check(name, detail.removeprefix(f"{name}: "))
                assert r.status_code == ERRORS[outcome_of(detail)][1], (name, r.status_code, detail)
        assert client.get("/healthz").json()["status"] == "ok"


def test_the_served_ui_answers_each_with_a_caption_or_a_clear_error(shipped, folder, tmp_path):
    """Through the real components: the photo tab one by one, the several-images tab in batches."""
    from gradio_client import Client, handle_file
    from gradio_client.exceptions import AppError

    from captioner.service import create_app

    with live_server(create_app(shipped)) as url:
        client = Client(url + "/", verbose=False, analytics_enabled=False, download_files=str(tmp_path))
        rows = {}
        for name in CORPUS:
            try:
                best, _, _ = client.predict(handle_file(str(folder / "images" / name)), 2, 1, 12, api_name="/caption")
                assert best, name
                rows[name] = None
            except AppError as e:
                assert str(e).startswith("Cannot read this image: "), (name, str(e))
                rows[name] = str(e)
        captioned(rows)

        # The file picker takes images by their type: an .eps is refused whole, before any is opened.
        images = [n for n in CORPUS if (mimetypes.guess_type(n)[0] or "").startswith("image/")]
        assert "vector.eps" not in images
        with pytest.raises(AppError, match="Invalid file type"):
            client.predict([handle_file(str(folder / "images" / "vector.eps"))], 2, 12, api_name="/caption_many")
        rows = {}
        for i in range(0, len(images), 16):  # the service's files per event
            batch = images[i:i + 16]
            _, table = client.predict([handle_file(str(folder / "images" / n)) for n in batch], 2, 12,
                                      api_name="/caption_many")
            for name, caption, score, _ in table["data"]:
                rows[name] = None if score is not None else caption.removeprefix("error: ")
        captioned(rows | {"vector.eps": REFUSED_FORMAT})


def test_the_demos_functions_answer_each_with_a_caption_or_a_clear_error(shipped, folder):
    """`captioner demo`'s own caption path (no service): its event functions called as Gradio calls them."""
    import gradio as gr

    from captioner.ui import build_ui

    events = {f.api_name: f.fn for f in build_ui(shipped, examples=[]).fns.values() if f.api_name}
    paths = [str(folder / "images" / n) for n in CORPUS]
    rows = {}
    for path, name in zip(paths, CORPUS):
        try:
            rows[name] = None if events["caption"](path, 2, 1, 12)[0] else "empty caption"
        except gr.Error as e:
            rows[name] = e.message.removeprefix("Cannot read this image: ")
    captioned(rows)
    rows = {}
    for i in range(0, len(paths), 16):  # the files one event takes
        gallery, table = events["caption_many"](paths[i:i + 16], 2, 12)
        assert len(gallery) == sum(score is not None for _, _, score, _ in table)
        rows |= {name: None if score is not None else caption.removeprefix("error: ")
                 for name, caption, score, _ in table}
    captioned(rows)


def test_caption_dir_writes_a_caption_or_an_error_row_for_each(shipped, folder, tmp_path):
    from captioner.folder import caption_dir

    out = tmp_path / "captions.jsonl"
    summary = caption_dir(shipped, folder / "images", out, exts=EXTENSIONS, workers=2, progress=False)
    rows = {r["image"]: r for r in map(json.loads, out.read_text().splitlines())}
    captioned({name: r.get("error") for name, r in rows.items()})
    assert all(r["caption"] for r in rows.values() if "error" not in r)
    assert summary.total == len(CORPUS) and summary.errors == sum("error" in r for r in rows.values())


def test_evaluate_scores_the_readable_and_counts_the_rest(folder, tmp_path):
    from captioner.evaluate import UNREADABLE as SKIPPED
    from captioner.evaluate import evaluate

    report = evaluate(folder / "captions.csv", images=folder / "images", coco=False, progress=False,
                      out=tmp_path / "ev")
    with open(tmp_path / "ev" / "per_image.csv", newline="") as f:
        scored = {r["image_id"] for r in csv.DictReader(f)}
    kept_the_readable(scored)
    assert report["n_images"] == len(scored) and report["skipped"] == {SKIPPED: len(CORPUS) - len(scored)}


def test_finetunes_loader_keeps_the_readable_and_caches_their_features(shipped, folder, tmp_path):
    """finetune reads its captions, drops what usable() cannot open, and caches features of the rest."""
    from captioner.evaluate import UNREADABLE as SKIPPED
    from captioner.features import extract
    from captioner.finetune import load_captions, usable

    _, examples = load_captions(folder / "captions.csv", "csv", folder / "images")
    skipped = {}
    kept = usable(examples, skipped)
    kept_the_readable({ex.image_id for ex in kept})
    assert list(skipped) == [SKIPPED] and len(kept) + len(skipped[SKIPPED]) == len(CORPUS)
    feats = extract(shipped.encoder, kept, tmp_path / "cache", "train", num_workers=2)
    assert feats.shape == (len(kept), shipped.encoder.width) and np.isfinite(feats).all()


def test_the_runtime_captions_each_or_reports_it(folder, tmp_path, capsys):
    from captioner.export import export
    from captioner.runtime import main

    bundle = export(None, tmp_path / "bundle")
    paths = [str(folder / "images" / n) for n in CORPUS]
    assert main([str(bundle), *paths, "--json"]) == 1  # some could not be read
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [r["image"] for r in rows] == paths
    captioned({name: r.get("error") for name, r in zip(CORPUS, rows)})


# -- memory -----------------------------------------------------------------------------

# caption-dir with its 2 decoding workers on the corpus reserves at most 4.3 GB of address space in the
# main process (VmPeak: torch alone maps 3.3 GB) and 3.7 GB in each worker, and needs 1 GB resident.
# Resizing the 40000x1 PNG without the loader's check took a server from 0.8 to 8.5 GB resident; under
# this cap that resize fails instead, and its row says MemoryError, not why the image was refused.
ADDRESS_SPACE = 6 * 2**30
CAPPED = ("import resource, runpy\n"
          f"resource.setrlimit(resource.RLIMIT_AS, ({ADDRESS_SPACE}, {ADDRESS_SPACE}))\n"
          "runpy.run_module('captioner.cli', run_name='__main__', alter_sys=True)")


def test_caption_dir_of_the_corpus_fits_in_a_capped_address_space(folder, tmp_path):
    out = tmp_path / "captions.jsonl"
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "PYTHONPATH": str(ROOT)}
    # The cap is set in the child itself (preexec_fn is unsafe in a parent with threads); forked workers inherit it.
    r = subprocess.run([sys.executable, "-c", CAPPED, "caption-dir", str(folder / "images"), "--out", str(out),
                        "--ext", ",".join(EXTENSIONS), "--workers", "2", "--device", "cpu"],
                       env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    rows = {row["image"]: row.get("error") for row in map(json.loads, out.read_text().splitlines())}
    captioned(rows)
    assert not any("memory" in (e or "").lower() for e in rows.values())
