"""Bounded load tests of the HTTP API on loopback: steady load, bursts of large or long images, a mixed soak.

Each starts `captioner serve` on a free 127.0.0.1 port (or targets --url) and
prints requests by HTTP status, hangs (requests without an answer within
--timeout), latency percentiles and, for a server it started, the server's peak
resident memory (VmHWM from /proc), which must stay within --rss-budget-mb.

    # steady: 16 clients x 25 requests, one photo per request
    python scripts/load_test.py --clients 16 --requests 25
    # burst: 48 clients at once, each uploading one legal 6000x6000 PNG; every answer must be 200 or 503
    python scripts/load_test.py --burst 48
    # aspect burst: 16 clients at once, each uploading a 40000x1 PNG of 200 bytes; every answer 200, 4xx or 503
    python scripts/load_test.py --aspect-burst 16
    # soak: 64 clients for 60 s: good photos, hostile files, large photos, uploads cut off midway
    python scripts/load_test.py --soak 60 --images '../shared/data/flickr8k/Flicker8k_Dataset/*.jpg'
    python scripts/load_test.py --url http://127.0.0.1:8000
"""
from __future__ import annotations

import argparse
import asyncio
import glob
import io
import random
import shlex
import socket
import statistics
import struct
import subprocess
import sys
import tempfile
import time
import zlib
from collections import Counter, defaultdict
from pathlib import Path

import httpx
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
LARGE_SIDE = 6000  # a 36-Mpx PNG: under the service's default 40-Mpx and 20-MB limits
RSS_BUDGET_MB = 3072  # the service's memory budget: its peak resident memory under any of these loads


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(checkpoint: str | None, serve_args: list[str], startup_timeout: float = 180.0):
    port = free_port()
    cmd = [sys.executable, "-m", "captioner.cli", "serve", "--host", "127.0.0.1", "--port", str(port), *serve_args]
    if checkpoint:
        cmd += ["--checkpoint", checkpoint]
    proc = subprocess.Popen(cmd)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + startup_timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"the server exited with code {proc.returncode}")
        try:
            if httpx.get(url + "/healthz", timeout=2).status_code == 200:
                return proc, url
        except httpx.TransportError:
            pass
        time.sleep(0.5)
    proc.terminate()
    raise SystemExit(f"the server did not answer /healthz within {startup_timeout:.0f} s")


def memory_mb(pid: int) -> dict[str, float]:
    """The process's resident memory now (VmRSS) and at its peak so far (VmHWM), in MB."""
    fields = dict(line.split(":", 1) for line in Path(f"/proc/{pid}/status").read_text().splitlines() if ":" in line)
    return {k: int(fields[k].split()[0]) / 1024 for k in ("VmRSS", "VmHWM")}


# -- what the clients upload ---------------------------------------------------------

def large_png(photo: Path, cache: Path) -> bytes:
    """A photo scaled up to 6000x6000 and saved as PNG (about 14 MB): legal, and 108 MB once decoded."""
    path = cache / f"large_{photo.stem}_{LARGE_SIDE}.png"
    if not path.is_file():
        Image.open(photo).convert("RGB").resize((LARGE_SIDE, LARGE_SIDE), Image.BICUBIC).save(path, "PNG")
    return path.read_bytes()


def large_jpeg(photo: Path) -> bytes:
    buf = io.BytesIO()
    Image.open(photo).convert("RGB").resize((LARGE_SIDE, 4000), Image.BICUBIC).save(buf, "JPEG", quality=85)
    return buf.getvalue()


def long_png(length: int) -> bytes:
    """A length x 1 PNG of a few hundred bytes: scaling its short side up to 224 would make length * 224 x 224."""
    buf = io.BytesIO()
    Image.new("RGB", (length, 1), (20, 120, 40)).save(buf, "PNG")
    return buf.getvalue()


def png_bomb(side: int, rows: int | None = None) -> bytes:
    """A PNG of side x side black pixels, small on disk, side^2 * 3 bytes decoded; rows=0: a header and no data."""
    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    row = b"\0" * (1 + side * 3)
    compressor = zlib.compressobj(9)
    idat = b"".join(compressor.compress(row) for _ in range(side if rows is None else rows)) + compressor.flush()
    ihdr = struct.pack(">IIBBBBB", side, side, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")


def soak_payloads(photos: list[Path], cache: Path) -> dict[str, tuple[float, list[tuple[str, bytes]], set[int]]]:
    """kind -> (share of requests, files to pick from, the statuses a correct server answers)."""
    good = [(p.name, p.read_bytes()) for p in photos[:200]]
    first = good[0][1]
    return {
        "good photo": (0.55, good, {200, 503}),
        "large photo": (0.08, [("large.png", large_png(photos[0], cache)), ("large.jpg", large_jpeg(photos[1]))],
                        {200, 503}),
        "zero-byte": (0.06, [("empty.jpg", b"")], {422}),
        "truncated": (0.06, [("cut.jpg", first[:len(first) // 2])], {415}),
        "text-as-jpg": (0.06, [("notes.jpg", b"this is not a picture\n" * 40)], {415}),
        "bomb": (0.07, [("bomb_10k.png", png_bomb(10_000)), ("bomb_30k.png", png_bomb(30_000, rows=0))], {413}),
        "cut-off upload": (0.12, good[:5] + [("large.png", large_png(photos[0], cache))],
                           set()),  # the client hangs up: no answer expected
    }


# -- clients ---------------------------------------------------------------------------

class Tally:
    def __init__(self):
        self.by_kind: dict[str, Counter] = defaultdict(Counter)
        self.latencies: dict[str, list[float]] = defaultdict(list)
        self.examples: dict[tuple, str] = {}

    def add(self, kind: str, outcome, seconds: float | None = None, text: str = ""):
        self.by_kind[kind][outcome] += 1
        if seconds is not None:
            self.latencies[kind].append(seconds)
        self.examples.setdefault((kind, outcome), text[:160])


async def post(http: httpx.AsyncClient, tally: Tally, kind: str, name: str, body: bytes, data: dict):
    t0 = time.perf_counter()
    try:
        r = await http.post("/v1/captions", files=[("images", (name, body))], data=data)
    except httpx.TimeoutException:
        tally.add(kind, "hang", time.perf_counter() - t0)
    except httpx.HTTPError as e:
        tally.add(kind, type(e).__name__, time.perf_counter() - t0, str(e))
    else:
        tally.add(kind, r.status_code, time.perf_counter() - t0, r.text)
        if r.status_code == 503 and "retry-after" not in r.headers:
            tally.add(kind, "503 without Retry-After")
        if r.headers.get("content-type") != "application/json":
            tally.add(kind, "body not JSON", text=r.text)


async def cut_off_upload(url: str, tally: Tally, name: str, body: bytes, rng: random.Random):
    """Declare the whole multipart body, send a part of it, hang up."""
    host, port = url.removeprefix("http://").split(":")
    head = (f'--b\r\nContent-Disposition: form-data; name="images"; filename="{name}"\r\n'
            "Content-Type: application/octet-stream\r\n\r\n").encode()
    full = head + body + b"\r\n--b--\r\n"
    sent = full[:rng.randint(len(head), len(full) - 1)]
    reader, writer = await asyncio.open_connection(host, int(port))
    writer.write(f"POST /v1/captions HTTP/1.1\r\nHost: {host}\r\nContent-Type: multipart/form-data; boundary=b\r\n"
                 f"Content-Length: {len(full)}\r\n\r\n".encode() + sent)
    await writer.drain()
    writer.close()
    await writer.wait_closed()
    tally.add("cut-off upload", "hung up")


async def soak(url: str, payloads, clients: int, seconds: float, timeout: float, seed: int) -> Tally:
    tally = Tally()
    kinds = list(payloads)
    weights = [payloads[k][0] for k in kinds]
    deadline = time.monotonic() + seconds

    async def client(i: int, http: httpx.AsyncClient):
        rng = random.Random(seed * 1000 + i)
        while time.monotonic() < deadline:
            kind = rng.choices(kinds, weights)[0]
            name, body = rng.choice(payloads[kind][1])
            if kind == "cut-off upload":
                await cut_off_upload(url, tally, name, body, rng)
            else:
                await post(http, tally, kind, name, body, {})

    limits = httpx.Limits(max_connections=clients)
    async with httpx.AsyncClient(base_url=url, timeout=timeout, limits=limits) as http:
        await asyncio.gather(*(client(i, http) for i in range(clients)))
    return tally


async def burst(url: str, kind: str, name: str, body: bytes, clients: int, timeout: float) -> Tally:
    """`clients` requests at once, each uploading `body`."""
    tally = Tally()
    async with httpx.AsyncClient(base_url=url, timeout=timeout, limits=httpx.Limits(max_connections=clients)) as http:
        await asyncio.gather(*(post(http, tally, kind, name, body, {}) for _ in range(clients)))
    return tally


async def steady(url: str, images: list[Path], clients: int, requests: int, beam_size: int | None,
                 timeout: float) -> Tally:
    payloads = [(p.name, p.read_bytes()) for p in images]
    data = {"beam_size": str(beam_size)} if beam_size else {}
    tally = Tally()

    async def client(i: int, http: httpx.AsyncClient):
        for j in range(requests):
            name, body = payloads[(i * requests + j) % len(payloads)]
            await post(http, tally, "photo", name, body, data)

    async with httpx.AsyncClient(base_url=url, timeout=timeout, limits=httpx.Limits(max_connections=clients)) as http:
        await asyncio.gather(*(client(i, http) for i in range(clients)))
    return tally


# -- report ----------------------------------------------------------------------------

def percentile(sorted_values: list[float], q: float) -> float:
    return sorted_values[min(len(sorted_values) - 1, round(q / 100 * (len(sorted_values) - 1)))]


def latency_line(values: list[float]) -> str:
    lat = sorted(values)
    if not lat:
        return "no answers"
    return (f"p50 {percentile(lat, 50) * 1000:.0f} ms  p90 {percentile(lat, 90) * 1000:.0f} ms  "
            f"p99 {percentile(lat, 99) * 1000:.0f} ms  max {lat[-1] * 1000:.0f} ms  "
            f"mean {statistics.mean(lat) * 1000:.0f} ms")


def report(tally: Tally, wall: float, expected: dict[str, set]) -> int:
    """Print the tally; return the number of wrong outcomes (hangs, unexpected statuses, bodies not JSON)."""
    total = sum(sum(c.values()) for c in tally.by_kind.values())
    print(f"{total} requests in {wall:.1f} s ({total / wall:.1f}/s)")
    wrong = 0
    for kind, counts in sorted(tally.by_kind.items()):
        bad = {o: n for o, n in counts.items() if o not in expected[kind] and o != "hung up"}
        wrong += sum(bad.values())
        print(f"  {kind:15s} {dict(sorted(counts.items(), key=str))}" + (f"   WRONG: {bad}" if bad else ""))
        for o in bad:
            print(f"      e.g. {o}: {tally.examples[(kind, o)]}")
    hangs = sum(c["hang"] for c in tally.by_kind.values())
    print(f"hangs: {hangs}")
    print(f"latency, every answer: {latency_line([x for v in tally.latencies.values() for x in v])}")
    for kind in ("good photo", "photo"):
        if kind in tally.latencies:
            print(f"latency, {kind}: {latency_line(tally.latencies[kind])}")
    return wrong


def check_afterwards(url: str, photo: Path, before: dict | None) -> bool:
    """After the load: /healthz is ok and a photo gets the same caption as before it."""
    health = httpx.get(url + "/healthz", timeout=30)
    r = httpx.post(url + "/v1/captions", files=[("images", (photo.name, photo.read_bytes()))], timeout=120)
    after = r.json()["results"][0] if r.status_code == 200 else None
    ok = health.status_code == 200 and after is not None and (before is None or after == before)
    print(f"afterwards: /healthz {health.status_code}, {photo.name} -> HTTP {r.status_code} {after}"
          + ("" if before is None else f" (before the load: {before})") + ("  OK" if ok else "  FAILED"))
    return ok


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    target = ap.add_mutually_exclusive_group()
    target.add_argument("--url", help="a running server (default: start one here)")
    target.add_argument("--checkpoint", help="model for the server started here (default: the shipped one)")
    ap.add_argument("--serve-args", default="",
                    help="more flags for the server started here, e.g. '--pixels-in-flight 40000000'")
    mode = ap.add_mutually_exclusive_group()
    mode.add_argument("--burst", type=int, metavar="CLIENTS", help="this many clients at once, one 6000x6000 PNG each")
    mode.add_argument("--aspect-burst", type=int, metavar="CLIENTS",
                      help="this many clients at once, one --aspect-length x 1 PNG each")
    mode.add_argument("--soak", type=float, metavar="SECONDS", help="64 clients (--clients) of mixed traffic")
    ap.add_argument("--aspect-length", type=int, default=40_000, help="the long side of --aspect-burst's PNG")
    ap.add_argument("--rss-budget-mb", type=float, default=RSS_BUDGET_MB,
                    help="the most resident memory the server started here may reach (its VmHWM)")
    ap.add_argument("--clients", type=int, default=None, help="default: 16, or 64 for --soak")
    ap.add_argument("--requests", type=int, default=25, help="requests per client (steady load)")
    ap.add_argument("--images", default=str(ROOT / "demo" / "examples" / "*.jpg"), help="glob of photos to post")
    ap.add_argument("--beam", type=int, default=None, help="beam size (default: the model's)")
    ap.add_argument("--timeout", type=float, default=120.0, help="seconds without an answer that count as a hang")
    ap.add_argument("--cache", default=str(Path(tempfile.gettempdir()) / "captioner_load_test"),
                    help="where the generated large PNG is kept between runs")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    clients = args.burst or args.aspect_burst or args.clients or (64 if args.soak else 16)
    if (not 1 <= clients <= 64 or not 1 <= args.requests <= 1000 or not 0 < (args.soak or 1) <= 600
            or not 1 <= args.aspect_length <= 10_000_000):
        ap.error("keep it bounded: 1-64 clients, 1-1000 requests each, a soak of at most 600 s, "
                 "an --aspect-length of at most 10 million")
    photos = sorted(Path(p) for p in glob.glob(args.images))
    if not photos:
        ap.error(f"no images match {args.images}")
    cache = Path(args.cache)
    cache.mkdir(parents=True, exist_ok=True)
    if args.soak:
        payloads = soak_payloads(photos, cache)
    elif args.burst:
        large = large_png(photos[0], cache)
        print(f"each client uploads {photos[0].name} scaled to {LARGE_SIDE}x{LARGE_SIDE} PNG, "
              f"{len(large) / 1e6:.1f} MB")
    elif args.aspect_burst:
        strip = long_png(args.aspect_length)
        print(f"each client uploads a {args.aspect_length}x1 PNG of {len(strip)} bytes")

    proc, url = (None, args.url) if args.url else start_server(args.checkpoint, shlex.split(args.serve_args))
    try:
        first = httpx.post(url + "/v1/captions", files=[("images", (photos[0].name, photos[0].read_bytes()))],
                           timeout=120).json()["results"][0]
        if proc:
            print(f"server memory before the load: {memory_mb(proc.pid)['VmRSS']:.0f} MB")
        t0 = time.perf_counter()
        if args.soak:
            tally = asyncio.run(soak(url, payloads, clients, args.soak, args.timeout, args.seed))
            expected = {k: v[2] for k, v in payloads.items()}
        elif args.burst:
            tally = asyncio.run(burst(url, "large photo", "large.png", large, clients, args.timeout))
            expected = {"large photo": {200, 503}}
        elif args.aspect_burst:
            tally = asyncio.run(burst(url, "long strip", "strip.png", strip, clients, args.timeout))
            expected = {"long strip": {200, 503, *range(400, 500)}}
        else:
            tally = asyncio.run(steady(url, photos, clients, args.requests, args.beam, args.timeout))
            expected = {"photo": {200}}
        wall = time.perf_counter() - t0
        print(f"{clients} clients" + (f", {args.soak:g} s soak" if args.soak else ""))
        wrong = report(tally, wall, expected)
        ok = True
        if proc:
            mem = memory_mb(proc.pid)
            ok = mem["VmHWM"] <= args.rss_budget_mb
            print(f"server memory: peak {mem['VmHWM']:.0f} MB (VmHWM), now {mem['VmRSS']:.0f} MB; budget "
                  f"{args.rss_budget_mb:.0f} MB" + ("" if ok else "  OVER BUDGET"))
        ok = check_afterwards(url, photos[0], first) and ok
    finally:
        if proc:
            proc.terminate()
            proc.wait(30)
    return 0 if ok and not wrong else 1


if __name__ == "__main__":
    sys.exit(main())
