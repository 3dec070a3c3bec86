"""The Gradio UI mounted at / by the service: its API via gradio_client, and the page in a real headless browser."""
from __future__ import annotations

import os
import shutil
import time
from pathlib import Path
from urllib.parse import urlparse

import pytest
from live_server import live_server
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
ARTIFACTS = ROOT / "test-artifacts"
CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]


@pytest.fixture(scope="module")
def base_url(captioner):
    from captioner.service import create_app

    with live_server(create_app(captioner)) as url:
        yield url


@pytest.fixture(scope="module")
def client(base_url, tmp_path_factory):
    from gradio_client import Client

    return Client(base_url + "/", verbose=False, analytics_enabled=False,
                  download_files=str(tmp_path_factory.mktemp("gradio_downloads")))


def test_every_demo_example_has_a_stated_licence():
    from captioner.ui import example_images

    examples = [Path(p).name for p in example_images()]
    licences = (ROOT / "demo" / "examples" / "LICENSES.md").read_text()
    assert "grace_hopper.jpg" in examples and len(examples) >= 5
    assert [name for name in examples if f"| `{name}` |" not in licences] == []


def test_ui_api_captions_one_image_with_n_best(client, captioner, tiny_data):
    from gradio_client import handle_file

    photo = next((tiny_data / "Flicker8k_Dataset").glob("1*.jpg"))
    best, tags, table = client.predict(handle_file(str(photo)), 4, 3, 10, api_name="/caption")
    expected = captioner.caption(photo, beam_size=4, n_best=3, max_len=10)
    assert best == expected[0]["caption"]
    assert tags == ", ".join(f"{t['tag']} {t['prob']:.2f}" for t in expected[0]["tags"])
    assert [row[0] for row in table["data"]] == [e["caption"] for e in expected]


def test_ui_api_captions_several_and_reports_bad_files(client, captioner, tiny_data, tmp_path):
    from gradio_client import handle_file

    photos = sorted((tiny_data / "Flicker8k_Dataset").glob("*.jpg"))[:3]
    junk = tmp_path / "junk.jpg"
    junk.write_bytes(b"definitely not a jpeg")
    files = [handle_file(str(p)) for p in [*photos, junk]]
    gallery, table = client.predict(files, 3, 12, api_name="/caption_many")
    rows = table["data"]
    assert [r[0] for r in rows] == [p.name for p in photos] + ["junk.jpg"]
    assert [r[1] for r in rows[:3]] == [captioner.caption(p, beam_size=3, max_len=12)["caption"] for p in photos]
    assert rows[3][1].startswith("error:")
    assert len(gallery) == 3


def browser_or_reason():
    """Launchable browser setup, or why not. Under CI (CI=true) a missing browser fails the test."""
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError:
        return "python package playwright is not installed (pip install playwright)"
    if not shutil.which(CHROMIUM):
        return f"{CHROMIUM} not found (apt-get install -y chromium)"
    return None


def test_browser_uploads_a_photo_and_sees_its_caption_offline(base_url, captioner):
    reason = browser_or_reason()
    if reason:
        if os.environ.get("CI") == "true":
            pytest.fail(f"browser test cannot run under CI: {reason}")
        pytest.skip(reason)
    from playwright.sync_api import expect, sync_playwright

    photo = ROOT / "demo" / "examples" / "camera.jpg"
    expected = captioner.caption(photo)["caption"]
    outside = []  # any request leaving loopback: the page must work offline
    ARTIFACTS.mkdir(exist_ok=True)
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            page = browser.new_page(viewport={"width": 1280, "height": 900})
            page.on("request", lambda req: urlparse(req.url).hostname not in ("127.0.0.1", None)
                    and req.url.startswith("http") and outside.append(req.url))
            page.goto(base_url + "/", wait_until="networkidle")
            page.locator("#photo input[type=file]").set_input_files(str(photo))
            caption = page.locator("#caption textarea")
            expect(caption).to_have_value(expected, timeout=60_000)
            page.screenshot(path=str(ARTIFACTS / "ui_caption.png"), full_page=True)
            page.goto(base_url + "/docs", wait_until="networkidle")  # the API docs, served offline too
            expect(page.get_by_text("/v1/captions")).to_be_visible(timeout=30_000)
            page.screenshot(path=str(ARTIFACTS / "api_docs.png"))
        finally:
            browser.close()
    assert outside == []


def caption_via_ui(url: str, image, download_dir):
    from gradio_client import Client, handle_file

    client = Client(url, verbose=False, analytics_enabled=False, download_files=str(download_dir))
    return client.predict(handle_file(str(image)), 2, 1, 10, api_name="/caption")


@pytest.fixture
def photo_200x100(tmp_path):
    Image.new("RGB", (200, 100), (30, 140, 60)).save(tmp_path / "wide.png")
    return tmp_path / "wide.png"


def test_ui_in_the_service_applies_its_pixel_limit(captioner, photo_200x100, tmp_path):
    from gradio_client.exceptions import AppError

    from captioner.service import Limits, create_app

    with live_server(create_app(captioner, Limits(max_pixels=19_999))) as url:
        with pytest.raises(AppError, match="200x100 = 20000 pixels"):
            caption_via_ui(url + "/", photo_200x100, tmp_path)
    with live_server(create_app(captioner, Limits(max_pixels=20_000))) as url:
        best, tags, _ = caption_via_ui(url + "/", photo_200x100, tmp_path)
        expected = captioner.caption(photo_200x100, beam_size=2, max_len=10)
        assert best == expected["caption"]
        assert tags == ", ".join(f"{t['tag']} {t['prob']:.2f}" for t in expected["tags"])


def test_demo_runs_the_model_from_one_queue_and_applies_its_pixel_limit(captioner, photo_200x100, tmp_path):
    """`captioner demo`: every event that runs the model waits in one queue of one, so none runs concurrently."""
    from gradio_client.exceptions import AppError

    from captioner.limits import Limits
    from captioner.ui import MODEL_QUEUE, build_ui, launch_options

    limits = Limits(max_pixels=19_999, max_upload_mb=0.05)
    ui = build_ui(captioner, examples=[], limits=limits)
    assert {(f.concurrency_id, f.concurrency_limit) for f in ui.fns.values()} == {(MODEL_QUEUE, 1)}
    ui.launch(server_name="127.0.0.1", prevent_thread_lock=True, quiet=True, **launch_options(limits))
    try:
        with pytest.raises(AppError, match="200x100 = 20000 pixels"):
            caption_via_ui(ui.local_url, photo_200x100, tmp_path)
        noise = tmp_path / "noise.png"  # 100 KB that does not compress: over the 50 KB upload limit
        Image.frombytes("L", (320, 320), os.urandom(320 * 320)).save(noise)
        with pytest.raises(Exception, match="(?i)file size|too large|exceed"):
            caption_via_ui(ui.local_url, noise, tmp_path)
    finally:
        ui.close()


def test_ui_in_the_service_shares_its_limits(captioner, photo_200x100, tmp_path):
    """Files per event and the answer deadline are the service's; its events run ui_workers at once."""
    from gradio_client import Client, handle_file
    from gradio_client.exceptions import AppError

    from captioner.service import Limits, create_app
    from captioner.ui import MODEL_QUEUE

    app = create_app(captioner, Limits(max_files=2, ui_workers=3))
    with live_server(app) as url:
        client = Client(url + "/", verbose=False, analytics_enabled=False, download_files=str(tmp_path))
        files = [handle_file(str(photo_200x100))] * 3
        with pytest.raises(AppError, match="Too many files: 3, the limit is 2 at once"):
            client.predict(files, 2, 10, api_name="/caption_many")
        _, table = client.predict(files[:2], 2, 10, api_name="/caption_many")
        assert len(table["data"]) == 2
    blocks = next(r.app.blocks for r in app.routes if hasattr(getattr(r, "app", None), "blocks"))
    model_events = [f.concurrency_limit for f in blocks.fns.values() if f.concurrency_id == MODEL_QUEUE]
    assert model_events == [3, 3, 3]
    with live_server(create_app(captioner, Limits(max_answer_s=1e-4))) as url:
        with pytest.raises(AppError, match="busy"):
            caption_via_ui(url + "/", photo_200x100, tmp_path)


def test_ui_deletes_uploads_after_their_age(captioner, photo_200x100, tmp_path):
    from captioner.limits import Limits
    from captioner.ui import build_ui

    ui = build_ui(captioner, examples=[], limits=Limits(cache_age_s=1))
    ui.launch(server_name="127.0.0.1", prevent_thread_lock=True, quiet=True)
    try:
        caption_via_ui(ui.local_url, photo_200x100, tmp_path)
        uploads = [p for p in Path(ui.GRADIO_CACHE).rglob("wide.png")]
        assert uploads, "the upload should be in Gradio's cache while it is young"
        deadline = time.monotonic() + 15
        while any(p.exists() for p in uploads) and time.monotonic() < deadline:
            time.sleep(0.25)
        assert not any(p.exists() for p in uploads)
    finally:
        ui.close()


def test_the_photo_input_hands_over_the_upload_unopened_and_refuses_inline_images(captioner):
    import gradio as gr
    from gradio.data_classes import ImageData

    from captioner.ui import build_ui

    photo = next(b for b in build_ui(captioner, examples=[]).blocks.values() if getattr(b, "elem_id", "") == "photo")
    assert photo.preprocess(ImageData(path="/uploads/not_even_there.eps")) == "/uploads/not_even_there.eps"
    assert photo.preprocess(None) is None
    with pytest.raises(gr.Error, match="base64"):
        photo.preprocess(ImageData(url="data:image/png;base64,iVBORw0KGgo="))
