"""The HTTP API on a real uvicorn server with the tiny model: round trips, concurrency, every bad input."""
from __future__ import annotations

import io
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
import torch
from fixtures import png_header_only
from live_server import live_server, server_process
from PIL import Image
from starlette.testclient import TestClient

LIMITS = dict(max_files=3, max_upload_mb=1, max_pixels=1_000_000)


@pytest.fixture(scope="module")
def base_url(captioner):
    from captioner.service import Limits, create_app

    with live_server(create_app(captioner, Limits(**LIMITS), ui=False)) as url:
        yield url


@pytest.fixture(scope="module")
def client(base_url):
    with httpx.Client(base_url=base_url, timeout=60) as c:
        yield c


@pytest.fixture(scope="module")
def photos(tiny_data):
    return sorted((tiny_data / "Flicker8k_Dataset").glob("*.jpg"))


def upload(*paths):
    return [("images", (p.name, p.read_bytes(), "image/jpeg")) for p in paths]


def test_round_trip_matches_the_captioner(client, captioner, photos):
    r = client.post("/v1/captions", files=upload(photos[0], photos[9]), data={"beam_size": "3"})
    assert r.status_code == 200, r.text
    results = r.json()["results"]
    assert [x["filename"] for x in results] == [photos[0].name, photos[9].name]
    for x, path in zip(results, (photos[0], photos[9])):
        assert x == {"filename": path.name, **captioner.caption(path, beam_size=3)}
        assert "captions" not in x


def test_guide_on_and_off_round_trip(client, captioner, photos):
    for guide in ("on", "off"):
        r = client.post("/v1/captions", files=upload(photos[2]), data={"guide": guide})
        assert r.status_code == 200, r.text
        assert r.json()["results"][0] == {"filename": photos[2].name, **captioner.caption(photos[2], guide=guide)}


def test_n_best_lists_captions_best_first(client, captioner, photos):
    r = client.post("/v1/captions", files=upload(photos[3]), data={"beam_size": "4", "n_best": "3", "max_len": "8"})
    assert r.status_code == 200, r.text
    (x,) = r.json()["results"]
    expected = captioner.caption(photos[3], beam_size=4, n_best=3, max_len=8)
    assert x["captions"] == [{"caption": c["caption"], "score": c["score"]} for c in expected]
    assert x["tags"] == expected[0]["tags"]  # once per photo, not per caption
    assert (x["caption"], x["score"]) == (expected[0]["caption"], expected[0]["score"])
    assert [c["score"] for c in x["captions"]] == sorted((c["score"] for c in x["captions"]), reverse=True)


def test_concurrent_clients_all_answered_correctly(base_url, captioner, photos):
    """Requests with mixed options arrive together; the batcher must give each its own answer."""
    jobs = [(photos[i % len(photos)], 1 + i % 3) for i in range(24)]

    def post(job):
        path, beam = job
        with httpx.Client(base_url=base_url, timeout=120) as c:
            return c.post("/v1/captions", files=upload(path), data={"beam_size": str(beam)})

    with ThreadPoolExecutor(8) as pool:
        responses = list(pool.map(post, jobs))
    for (path, beam), r in zip(jobs, responses):
        assert r.status_code == 200, r.text
        assert r.json()["results"][0]["caption"] == captioner.caption(path, beam_size=beam)["caption"]


def chunked_oversized_body():
    """A valid multipart upload streamed without Content-Length, 4 MB against the 1 MB limit."""
    yield b'--b\r\nContent-Disposition: form-data; name="images"; filename="big.jpg"\r\n\r\n'
    for _ in range(64):
        yield b"\xff" * 65536
    yield b"\r\n--b--\r\n"


def one_file(name, data, kind="image/jpeg"):
    return dict(files=[("images", (name, data, kind))])


# case -> (request arguments given the test photos, expected status, words the message must contain)
BAD_REQUESTS = {
    "not an image": (lambda ph: one_file("notes.txt", b"hello, not a picture", "text/plain"), 415, "not an image"),
    "empty file": (lambda ph: one_file("empty.jpg", b""), 422, "empty"),
    "missing field": (lambda ph: dict(data={"beam_size": "3"}), 422, "images"),
    "too many files": (lambda ph: dict(files=upload(*ph[:4])), 413, "too many files"),
    "body over limit": (lambda ph: one_file("big.jpg", b"\xff" * (2 << 20)), 413, "limit"),
    "chunked body over limit": (lambda ph: dict(content=chunked_oversized_body(),
                                                headers={"content-type": "multipart/form-data; boundary=b"}),
                                413, "limit"),
    "too many pixels": (lambda ph: one_file("wide.png", png_header_only(2000, 1000), "image/png"), 413, "pixels"),
    "decompression bomb": (lambda ph: one_file("bomb.png", png_header_only(30000, 30000), "image/png"), 413,
                           "too large"),
    "n_best over beam": (lambda ph: dict(files=upload(ph[0]), data={"beam_size": "2", "n_best": "3"}), 422, "n_best"),
    "beam not a number": (lambda ph: dict(files=upload(ph[0]), data={"beam_size": "wide"}), 422, "beam_size"),
    "guide not on or off": (lambda ph: dict(files=upload(ph[0]), data={"guide": "maybe"}), 422, "guide"),
}


@pytest.mark.parametrize("case", BAD_REQUESTS)
def test_bad_input_gets_a_json_4xx_and_the_server_lives_on(client, photos, case):
    make_request, status, words = BAD_REQUESTS[case]
    r = client.post("/v1/captions", **make_request(photos))
    assert r.status_code == status, r.text
    assert r.headers["content-type"] == "application/json"
    assert words in r.json()["detail"]
    assert client.get("/healthz").json()["status"] == "ok"
    ok = client.post("/v1/captions", files=upload(photos[1]))
    assert ok.status_code == 200 and ok.json()["results"][0]["caption"]


def test_openapi_docs_describe_the_endpoint(client):
    assert client.get("/docs").status_code == 200
    spec = client.get("/openapi.json").json()
    assert "/v1/captions" in spec["paths"] and "/healthz" in spec["paths"]
    assert "demo UI" not in spec["info"]["description"]  # this app has none (ui=False)


def test_pixel_limit_is_checked_before_decoding(client):
    """A real image just over the limit is refused; one under it is captioned."""
    def png(w, h):
        buf = io.BytesIO()
        Image.new("RGB", (w, h), (200, 30, 30)).save(buf, "PNG")
        return buf.getvalue()
    over = client.post("/v1/captions", files=[("images", ("over.png", png(1001, 1000), "image/png"))])
    under = client.post("/v1/captions", files=[("images", ("under.png", png(1000, 1000), "image/png"))])
    assert over.status_code == 413 and "1001x1000" in over.json()["detail"]
    assert under.status_code == 200, under.text


def test_batcher_fails_only_the_request_with_a_bad_option(captioner, photos):
    from captioner.microbatch import Batcher

    batcher = Batcher(captioner)
    try:
        pixels = [captioner.preprocess(photos[0])]
        with pytest.raises(ValueError, match="telepathy"):  # checked at the top, before it can reach the worker
            captioner.options(method="telepathy")
        with pytest.raises(TypeError, match="beam_width"):
            captioner.options(beam_width=2)
        good = batcher.submit(pixels, captioner.options(beam_size=2))
        assert good.result(timeout=60) == [[captioner.caption(photos[0], beam_size=2)]]
    finally:
        batcher.close()
    with pytest.raises(RuntimeError, match="closed"):
        batcher.submit(pixels)


def test_batcher_worker_survives_cancelled_and_failing_requests(captioner, photos):
    """Cancelled futures are skipped and an error reaches only its own request; later requests still get captions."""
    from captioner.microbatch import Batcher

    batcher = Batcher(captioner)
    try:
        pixels = [captioner.preprocess(p) for p in photos[:8]]
        beam2 = captioner.options(beam_size=2)
        running = batcher.submit(pixels, captioner.options(beam_size=3))  # keeps the worker busy meanwhile
        cancelled = [batcher.submit(pixels[:2], beam2) for _ in range(3)]
        assert all(f.cancel() for f in cancelled)
        wrong_shape = batcher.submit([torch.zeros(1, 224, 224)], beam2)  # queued with `good`, one batch
        good = batcher.submit(pixels[:2], beam2)
        with pytest.raises(RuntimeError):
            wrong_shape.result(timeout=60)
        expected = [[captioner.caption(p, beam_size=2)] for p in photos[:2]]
        assert good.result(timeout=60) == expected
        assert len(running.result(timeout=60)) == 8
        assert batcher.alive
        assert batcher.submit(pixels[:2], beam2).result(timeout=60) == expected
    finally:
        batcher.close()
    assert not batcher.alive


def test_batcher_queue_is_bounded(captioner, photos):
    from captioner.limits import Overloaded
    from captioner.microbatch import Batcher

    batcher = Batcher(captioner, max_queued=4)
    try:
        pixels = [captioner.preprocess(photos[0])] * 3
        futures, refused = [], 0
        for _ in range(6):  # 18 images submitted at once: the queue holds at most 4
            try:
                futures.append(batcher.submit(pixels, captioner.options(beam_size=1)))
            except Overloaded:
                refused += 1
        assert refused and futures
        assert all(len(f.result(timeout=60)) == 3 for f in futures)
    finally:
        batcher.close()


def test_batcher_refuses_a_job_bigger_than_its_queue_even_when_idle(captioner, photos):
    from captioner.microbatch import Batcher

    batcher = Batcher(captioner, max_queued=2)
    try:
        with pytest.raises(ValueError, match="3 images at once, over the queue's 2"):
            batcher.submit([captioner.preprocess(photos[0])] * 3)
        assert len(batcher.submit([captioner.preprocess(photos[0])] * 2).result(timeout=60)) == 2
    finally:
        batcher.close()


def test_a_token_guards_the_api_and_the_ui_but_not_healthz(captioner, photos, tmp_path):
    from gradio_client import Client, handle_file
    from gradio_client.exceptions import AuthenticationError

    from captioner.service import create_app

    with live_server(create_app(captioner, auth_token="s3cret")) as url, httpx.Client(base_url=url, timeout=60) as c:
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "s3cret"}):
            r = c.post("/v1/captions", files=upload(photos[0]), headers=headers)
            assert r.status_code == 401 and r.headers["www-authenticate"] == "Bearer", r.text
            assert "Authorization: Bearer" in r.json()["detail"]
        r = c.post("/v1/captions", files=upload(photos[0]), headers={"Authorization": "Bearer s3cret"})
        assert r.status_code == 200 and r.json()["results"][0] == {"filename": photos[0].name,
                                                                   **captioner.caption(photos[0])}
        assert c.get("/healthz").json()["status"] == "ok"
        with pytest.raises(AuthenticationError, match="login"):
            Client(url + "/", verbose=False, analytics_enabled=False)
        ui = Client(url + "/", auth=("anyone", "s3cret"), verbose=False, analytics_enabled=False,
                    download_files=str(tmp_path))
        best, _, _ = ui.predict(handle_file(str(photos[0])), 2, 1, 10, api_name="/caption")
        assert best == captioner.caption(photos[0], beam_size=2, max_len=10)["caption"]


def test_healthz_is_503_once_the_worker_has_stopped(captioner):
    from captioner.service import create_app

    app = create_app(captioner, ui=False)
    with TestClient(app) as c:
        assert c.get("/healthz").json()["status"] == "ok"
        app.state.batcher.close()
        r = c.get("/healthz")
        assert r.status_code == 503 and r.json()["status"] == "down"


def test_pixel_budget_admits_waits_and_refuses():
    from captioner.limits import Overloaded, PixelBudget

    budget = PixelBudget(100, max_waiting=1, max_wait_s=0.5)

    def decode(pixels):
        with budget.admit(pixels):
            pass

    def until_one_waits():
        while not budget.waiting:
            time.sleep(0.01)

    with ThreadPoolExecutor(1) as pool:
        with budget.admit(60):
            decode(40)  # fits beside the first
            waiting = pool.submit(decode, 60)  # no room: waits, then gives up
            until_one_waits()
            with pytest.raises(Overloaded, match="images waiting"):  # the wait list (1) is full
                decode(50)
            with pytest.raises(Overloaded, match="within"):
                waiting.result()
        with budget.admit(100):
            later = pool.submit(decode, 100)
            until_one_waits()
        later.result()  # the room freed while it waited: admitted
    assert budget.in_use == 0 and budget.waiting == 0


def test_overload_is_a_json_503_with_retry_after(captioner, photos):
    from captioner.service import Limits, create_app

    app = create_app(captioner, Limits(max_waiting=0), ui=False)
    budget = app.state.budget
    with TestClient(app) as c:
        with budget.admit(budget.capacity):  # every pixel of the budget is being decoded
            busy = c.post("/v1/captions", files=upload(photos[0]))
        assert busy.status_code == 503 and busy.headers["retry-after"] == "1"
        assert photos[0].name in busy.json()["detail"]
        assert c.post("/v1/captions", files=upload(photos[0])).status_code == 200


def test_unexpected_error_is_a_json_500_with_an_id_in_the_log(captioner, caplog):
    from captioner.service import create_app

    app = create_app(captioner, ui=False)

    @app.get("/v1/broken")
    def broken():
        raise ZeroDivisionError("a bug")

    with TestClient(app, raise_server_exceptions=False) as c:
        r = c.get("/v1/broken")
        assert r.status_code == 500 and r.headers["content-type"] == "application/json"
        error_id = r.json()["error_id"]
        assert error_id in r.json()["detail"] and "a bug" not in r.text
        assert any(error_id in rec.getMessage() and rec.exc_info for rec in caplog.records)
        for method, path, status in [("GET", "/v1/nothing-here", 404), ("GET", "/v1/captions", 405)]:
            r = c.request(method, path)
            assert r.status_code == status and "detail" in r.json()


def test_service_without_the_ui_never_imports_gradio(tiny_checkpoint):
    script = f"""
import sys
from captioner import Captioner
from captioner.service import create_app
create_app(Captioner.load({str(tiny_checkpoint)!r}, device="cpu"), ui=False)
assert "gradio" not in sys.modules, "gradio was imported"
"""
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr


def test_cli_serve_answers_on_the_given_port(tiny_checkpoint, photos):
    """`captioner serve` end to end: the real entry point, its flags, the UI mounted at /."""
    command = [sys.executable, "-m", "captioner.cli", "serve", "--checkpoint", str(tiny_checkpoint),
               "--host", "127.0.0.1", "--max-files", "1"]
    with server_process(command, timeout=90) as (url, _):
        assert httpx.post(url + "/v1/captions", files=upload(photos[0]), timeout=60).status_code == 200
        assert httpx.post(url + "/v1/captions", files=upload(*photos[:2]), timeout=60).status_code == 413
        assert "gradio" in httpx.get(url + "/").text.lower()
