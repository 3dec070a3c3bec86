"""Bounded load test of the HTTP API on loopback: N clients x M requests, then latency percentiles.

Starts `captioner serve` on a free 127.0.0.1 port (or targets --url), has every
client post one image per request, one request at a time, and prints p50/p90/p99
latency, throughput and the error count (anything but HTTP 200 is an error).

    python scripts/load_test.py --checkpoint /tmp/best.pt --clients 16 --requests 25
    python scripts/load_test.py --url http://127.0.0.1:8000
"""
from __future__ import annotations

import argparse
import asyncio
import glob
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(checkpoint: str | None, startup_timeout: float = 180.0) -> tuple[subprocess.Popen, str]:
    port = free_port()
    cmd = [sys.executable, "-m", "captioner.cli", "serve", "--host", "127.0.0.1", "--port", str(port)]
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


async def run_clients(url: str, images: list[Path], clients: int, requests: int, beam_size: int | None):
    payloads = [(p.name, p.read_bytes()) for p in images]
    data = {"beam_size": str(beam_size)} if beam_size else {}
    latencies, errors = [], []

    async def client(i: int, http: httpx.AsyncClient):
        for j in range(requests):
            name, body = payloads[(i * requests + j) % len(payloads)]
            t0 = time.perf_counter()
            try:
                r = await http.post("/v1/captions", files=[("images", (name, body))], data=data)
                if r.status_code != 200:
                    errors.append(f"HTTP {r.status_code}: {r.text[:200]}")
            except httpx.HTTPError as e:
                errors.append(f"{type(e).__name__}: {e}")
            latencies.append(time.perf_counter() - t0)

    limits = httpx.Limits(max_connections=clients)
    async with httpx.AsyncClient(base_url=url, timeout=300, limits=limits) as http:
        t0 = time.perf_counter()
        await asyncio.gather(*(client(i, http) for i in range(clients)))
        wall = time.perf_counter() - t0
    return latencies, errors, wall


def percentile(sorted_values: list[float], q: float) -> float:
    return sorted_values[min(len(sorted_values) - 1, round(q / 100 * (len(sorted_values) - 1)))]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    target = ap.add_mutually_exclusive_group()
    target.add_argument("--url", help="a running server (default: start one here)")
    target.add_argument("--checkpoint", help="model for the server started here (default: the shipped one)")
    ap.add_argument("--clients", type=int, default=16)
    ap.add_argument("--requests", type=int, default=25, help="requests per client")
    ap.add_argument("--images", default=str(ROOT / "demo" / "examples" / "*.jpg"), help="glob of images to post")
    ap.add_argument("--beam", type=int, default=None, help="beam size (default: the model's)")
    args = ap.parse_args(argv)
    if not 1 <= args.clients <= 64 or not 1 <= args.requests <= 1000:
        ap.error("keep it bounded: 1-64 clients, 1-1000 requests each")
    images = sorted(Path(p) for p in glob.glob(args.images))
    if not images:
        ap.error(f"no images match {args.images}")

    proc, url = (None, args.url) if args.url else start_server(args.checkpoint)
    try:
        latencies, errors, wall = asyncio.run(run_clients(url, images, args.clients, args.requests, args.beam))
    finally:
        if proc:
            proc.terminate()
            proc.wait(30)
    lat = sorted(latencies)
    print(f"{len(lat)} requests ({args.clients} clients x {args.requests}), {len(images)} distinct images, "
          f"{wall:.1f} s: {len(lat) / wall:.1f} req/s")
    print(f"latency p50 {percentile(lat, 50) * 1000:.0f} ms  p90 {percentile(lat, 90) * 1000:.0f} ms  "
          f"p99 {percentile(lat, 99) * 1000:.0f} ms  max {lat[-1] * 1000:.0f} ms  "
          f"mean {statistics.mean(lat) * 1000:.0f} ms")
    print(f"errors: {len(errors)}")
    for e in sorted(set(errors))[:5]:
        print("  ", e)
    return 1 if errors else 0


if __name__ == "__main__":
    sys.exit(main())
