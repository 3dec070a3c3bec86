"""The HTTP API on a real uvicorn server with the tiny model: round trips, concurrency, every bad input."""
from __future__ import annotations

import io
import socket
import struct
import subprocess
import sys
import time
import zlib
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
from PIL import Image

from live_server import live_server

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


def png_header_only(width: int, height: int) -> bytes:
    """A PNG that declares width x height but holds almost no data: a decompression bomb's header."""
    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")


def test_round_trip_matches_the_captioner(client, captioner, photos):
    r = client.post("/v1/captions", files=upload(photos[0], photos[9]), data={"beam_size": "3"})
    assert r.status_code == 200, r.text
    results = r.json()["results"]
    assert [x["filename"] for x in results] == [photos[0].name, photos[9].name]
    for x, path in zip(results, (photos[0], photos[9])):
        assert x == {"filename": path.name, **captioner.caption(path, beam_size=3)}
        assert "captions" not in x


def test_n_best_lists_captions_best_first(client, captioner, photos):
    r = client.post("/v1/captions", files=upload(photos[3]), data={"beam_size": "4", "n_best": "3", "max_len": "8"})
    assert r.status_code == 200, r.text
    (x,) = r.json()["results"]
    expected = captioner.caption(photos[3], beam_size=4, n_best=3, max_len=8)
    assert x["captions"] == expected
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
        bad = batcher.submit(pixels, method="telepathy")
        good = batcher.submit(pixels, beam_size=2)
        with pytest.raises(ValueError, match="telepathy"):
            bad.result(timeout=60)
        assert good.result(timeout=60) == [captioner.caption(photos[0], beam_size=2)]
    finally:
        batcher.close()
    with pytest.raises(RuntimeError, match="closed"):
        batcher.submit(pixels)


def test_cli_serve_answers_on_the_given_port(tiny_checkpoint, photos):
    """`captioner serve` end to end: the real entry point, its flags, the UI mounted at /."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen([sys.executable, "-m", "captioner.cli", "serve", "--checkpoint", str(tiny_checkpoint),
                             "--host", "127.0.0.1", "--port", str(port), "--max-files", "1"])
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 90
        while True:
            assert proc.poll() is None, "captioner serve exited"
            assert time.monotonic() < deadline, "captioner serve did not come up"
            try:
                if httpx.get(url + "/healthz").status_code == 200:
                    break
            except httpx.TransportError:
                time.sleep(0.3)
        assert httpx.post(url + "/v1/captions", files=upload(photos[0]), timeout=60).status_code == 200
        assert httpx.post(url + "/v1/captions", files=upload(*photos[:2]), timeout=60).status_code == 413
        assert "gradio" in httpx.get(url + "/").text.lower()
    finally:
        proc.terminate()
        proc.wait(30)
