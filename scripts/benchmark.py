"""Side-by-side speed figures of captioner, measured in one run.

  The inference paths (scripts/bench_pipeline.py, run first in a child process): caption-dir and
  extract-features images/s with the default encoder engine (onnxruntime on a CPU) ÷ with
  --engine torch, single-image latency at the model's own decode settings, and caption-dir
  against the best its stages allow.
  train_gemm_efficiency
                 a decoder training step's achieved GFLOP/s ÷ the GFLOP/s of the same matrix
                 products run alone as plain fp32 GEMMs (forward and both backward products):
                 how close a step comes to this machine's limit for its shapes.
  train_speedup  (information) decoder training tokens/s of `captioner.decoder.Decoder` (one fused
                 nn.LSTM call, its CPU dropout, the fused Adam of `train.make_optimizer`) ÷
                 `LoopDecoder` below: the same math the tutorial way, an nn.LSTMCell stepped in a
                 Python loop with [x_t; v] as each step's input, nn.Dropout and torch.optim.Adam.
                 Same sizes, batch, tokens, parameter count and weights. _bf16: captioner's side
                 under bf16 autocast (train.precision=bf16) against the loop in fp32.
  beam_speedup   (information) `search.beam_search` on N images' features in one call ÷ the same
                 function called image by image; the captions must be identical. _bf16: both
                 sides with decode.precision=bf16.

  cold start     each command's wall time as a subprocess, as a user waits for it: `captioner --help`,
                 `captioner caption PHOTO` and `captioner serve` until /healthz answers; medians of
                 the repeats after one warm-up run that fills the caches (the model's bundle).

Both sides of a comparison run in the same process and thread count, in fp32 unless said,
their repeats interleaved (so load from other processes hits both alike); each figure
is a median over repeats after a warm-up.

    python scripts/benchmark.py [--quick] [--json] [--threads N] [--checkpoint C]
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn

from captioner import checkpoint as ckpt
from captioner.config import Config, load_config
from captioner.decoder import Decoder, caption_loss
from captioner.inference import DEFAULT_CHECKPOINT, Captioner
from captioner.search import beam_search
from captioner.train import make_optimizer
from captioner.vocab import Vocab

ROOT = Path(__file__).resolve().parents[1]
CONFIG = ROOT / "configs" / "flickr8k_lite0.yaml"
RUN_CHECKPOINT = ROOT / "runs" / "flickr8k_lite0" / "best.pt"


class LoopDecoder(nn.Module):
    """The tutorial decoder: LSTMCell in a Python loop, v concatenated to each step's input, then a Linear.

    v is first projected (Linear+ReLU) when the config asks for it, once per image as in Decoder.

    The Linear runs once on the stacked hidden states (as in Decoder), not once per step,
    so the two sides do the same floating-point work and differ only in how time is looped.
    """

    def __init__(self, vocab_size: int, embed_dim: int, hidden_dim: int, feature_dim: int, dropout: float,
                 feature_proj: int = 0, feature_dropout: float = 0.0):
        super().__init__()
        self.feature_dropout = nn.Dropout(feature_dropout)
        self.proj = nn.Sequential(nn.Linear(feature_dim, feature_proj), nn.ReLU()) if feature_proj else nn.Identity()
        feature_dim = feature_proj or feature_dim
        self.embed = nn.Embedding(vocab_size, embed_dim, padding_idx=0)
        self.cell = nn.LSTMCell(embed_dim + feature_dim, hidden_dim)
        self.dropout = nn.Dropout(dropout)
        self.out = nn.Linear(hidden_dim, vocab_size)

    @classmethod
    def like(cls, decoder: Decoder) -> LoopDecoder:
        """A LoopDecoder holding a copy of `decoder`'s weights (a 1-layer LSTM with inject="every")."""
        if (decoder.cell, decoder.inject, decoder.num_layers) != ("lstm", "every", 1):
            raise ValueError("LoopDecoder mirrors only a 1-layer LSTM decoder with inject='every'")
        proj = decoder.proj[0] if isinstance(decoder.proj, nn.Sequential) else None
        ref = cls(decoder.embed.num_embeddings, decoder.embed.embedding_dim, decoder.rnn.hidden_size,
                  proj.in_features if proj else decoder.feat_dim, decoder.dropout.p,
                  proj.out_features if proj else 0, decoder.feature_dropout.p)
        rnn = decoder.rnn
        with torch.no_grad():
            ref.proj.load_state_dict(decoder.proj.state_dict())
            ref.embed.weight.copy_(decoder.embed.weight)
            for name in ("weight_ih", "weight_hh", "bias_ih", "bias_hh"):
                getattr(ref.cell, name).copy_(getattr(rnn, name + "_l0"))
            ref.out.load_state_dict(decoder.out.state_dict())
        return ref

    def forward(self, feats: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        v = self.proj(self.feature_dropout(feats))
        x = self.dropout(self.embed(tokens))
        h = c = feats.new_zeros(tokens.shape[0], self.cell.hidden_size)
        hs = []
        for t in range(tokens.shape[1]):
            h, c = self.cell(torch.cat([x[:, t], v], dim=1), (h, c))
            hs.append(h)
        return self.out(self.dropout(torch.stack(hs, dim=1)))


def n_params(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def interleaved(fns: dict, repeats: int, warmup: int = 1) -> dict[str, float]:
    """Median seconds per call of each fn; their repeats alternate so background load hits all alike."""
    for _ in range(warmup):
        for f in fns.values():
            f()
    times = {name: [] for name in fns}
    for _ in range(repeats):
        for name, f in fns.items():
            start = time.perf_counter()
            f()
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(t) for name, t in times.items()}


def bench_train(cfg: Config, vocab_size: int, feature_dim: int, batch: int, seq_len: int, repeats: int) -> dict:
    torch.manual_seed(0)
    decoder = Decoder(cfg.model, vocab_size, feature_dim).train()
    ref = LoopDecoder.like(decoder).train()
    assert n_params(decoder) == n_params(ref), (n_params(decoder), n_params(ref))
    feats = torch.randn(batch, feature_dim)
    # Realistic padding: caption lengths vary within the batch, both sides get the same tokens.
    lengths = torch.randint(seq_len - 4, seq_len + 1, (batch,))
    ids = torch.randint(4, vocab_size, (batch, seq_len + 1))
    ids[torch.arange(seq_len + 1)[None, :] > lengths[:, None]] = 0
    tokens, targets = ids[:, :-1], ids[:, 1:]

    def step_fn(model, bf16=False):
        # Each side's own optimizer: captioner's is train.make_optimizer's (fused Adam), the tutorial's plain Adam.
        opt = make_optimizer(model.parameters(), cfg.train) if isinstance(model, Decoder) else \
            torch.optim.Adam(model.parameters(), lr=cfg.train.lr)

        def step():
            with torch.autocast("cpu", torch.bfloat16, enabled=bf16):  # what train.precision=bf16 does
                loss = caption_loss(model(feats, tokens), targets)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        return step

    # The step's matrix products alone, as plain fp32 GEMMs of the same shapes: forward, and backward's
    # two (grad of input, grad of weight). A step cannot beat this time; the ratio says how close it is.
    E, H, V, T = cfg.model.embed_dim, cfg.model.hidden_dim, vocab_size, seq_len
    F_ = cfg.model.feature_proj or feature_dim
    shapes = [(batch * T, E + F_, 4 * H)] + [(batch, H, 4 * H)] * T + [(batch * T, H, V)]
    if cfg.model.feature_proj:
        shapes.append((batch, feature_dim, F_))
    mats = [(torch.randn(m, k), torch.randn(k, n), torch.randn(m, n)) for m, k, n in shapes]

    def gemms():
        for a, w, g in mats:
            a @ w, g @ w.T, a.T @ g

    sec = interleaved({"captioner": step_fn(decoder), "loop": step_fn(ref),
                       "captioner_bf16": step_fn(copy.deepcopy(decoder), bf16=True), "gemms": gemms}, repeats)
    flops = sum(3 * 2 * m * k * n for m, k, n in shapes)
    n_tokens = int((targets != 0).sum())
    proj = f" -> {cfg.model.feature_proj}" if cfg.model.feature_proj else ""
    return {"train_tokens_per_s": round(n_tokens / sec["captioner"]),
            "train_tokens_per_s_loop": round(n_tokens / sec["loop"]),
            "train_speedup": round(sec["loop"] / sec["captioner"], 2),
            "train_tokens_per_s_bf16": round(n_tokens / sec["captioner_bf16"]),
            "train_speedup_bf16": round(sec["loop"] / sec["captioner_bf16"], 2),
            "train_gflops": round(flops / sec["captioner"] / 1e9, 1),
            "gemm_gflops": round(flops / sec["gemms"] / 1e9, 1),
            "train_gemm_efficiency": round(sec["gemms"] / sec["captioner"], 2),
            "train_sizes": f"batch {batch}, {seq_len} steps, embed {cfg.model.embed_dim}, hidden "
                           f"{cfg.model.hidden_dim}, feature {feature_dim}{proj}, vocab {vocab_size}, "
                           f"{n_params(decoder) / 1e6:.1f}M params"}


def quick_trained(cfg: Config, steps: int) -> tuple[Path, str]:
    """Train the shipped config for a few steps on the cached features (no trained model exists yet).

    Kept in runs/benchmark_quick/ and reused by later runs: training is the slow part.
    """
    from captioner.config import apply_overrides
    from captioner.train import train

    out = ROOT / "runs" / "benchmark_quick"
    what = f"quickly trained by this script ({steps} Adam steps on the cached Flickr8k features)"
    if (out / "best.pt").is_file():
        return out / "best.pt", what
    quick = Config.from_dict(apply_overrides(cfg.to_dict(), [
        f"train.out_dir={out}", "train.epochs=1", f"train.max_steps={steps}", "train.dev_images=50",
        "train.lr=3.0e-3", "train.log_every=1000", "train.num_workers=0",
        f"data.root={ROOT / cfg.data.root}", f"data.feature_cache={ROOT / cfg.data.feature_cache}"]))
    train(quick)
    return out / "best.pt", what


def pick_model(explicit: str | None, cfg: Config, train_steps: int) -> tuple[Path, str]:
    """The checkpoint to decode with, and what it is."""
    if explicit:
        return Path(explicit), f"checkpoint {explicit}"
    if DEFAULT_CHECKPOINT.is_file():
        return DEFAULT_CHECKPOINT, f"shipped model {DEFAULT_CHECKPOINT.name}"
    if RUN_CHECKPOINT.is_file():
        # The training run rewrites it every epoch: use a private copy.
        copy = Path(tempfile.mkdtemp(prefix="bench_ckpt_")) / "best.pt"
        shutil.copy(RUN_CHECKPOINT, copy)
        return copy, f"training run's {RUN_CHECKPOINT.relative_to(ROOT)} (mid-training copy)"
    return quick_trained(cfg, train_steps)


def dev_features(cfg: Config, n: int) -> tuple[torch.Tensor, str]:
    """The first n cached dev-image features (real encoder output), or random ones if there is no cache."""
    cache = Path(cfg.data.feature_cache)
    cache = cache if cache.is_absolute() else ROOT / cache
    path = cache / f"{cfg.data.dev_split}.npy"
    if path.is_file():
        done = json.loads(path.with_suffix(".json").read_text())["done"]
        if done >= n:
            feats = torch.from_numpy(np.load(path, mmap_mode="r")[:n].astype(np.float32))
            return feats, f"cached dev features ({path.name})"
    return torch.rand(n, 1280) * 2, "random features (no feature cache found)"


def bench_beam(payload: dict, feats: torch.Tensor, beam: int, repeats: int) -> dict:
    """Batched vs image-by-image beam search, in fp32 and with decode.precision=bf16 (both sides alike)."""
    caps = {p: Captioner.from_payload(payload, device="cpu", precision=p) for p in ("fp32", "bf16")}
    config, vocab = caps["fp32"].config, caps["fp32"].vocab  # decoder: one Decoder, or an Ensemble
    kw = dict(start=vocab.start, end=vocab.end, beam_size=beam, max_len=config.decode.max_len,
              banned=vocab.banned)
    out = {}

    def search(key, decoder, one_by_one):  # a timed call that keeps its captions in out[key]
        def run():
            out[key] = ([beam_search(decoder, f[None], **kw)[0] for f in feats] if one_by_one
                        else beam_search(decoder, feats, **kw))
        return run

    sec = interleaved({f"{kind}_{p}": search(f"{kind}_{p}", cap.decoder, kind == "single")
                       for p, cap in caps.items() for kind in ("batched", "single")}, repeats)
    # bf16 products are rounded to 8 mantissa bits, and the batch's shape changes how oneDNN blocks
    # the sums, so a score may move by a few bf16 roundings (4.8e-3 seen on 100 images).
    for p, atol in (("fp32", 1e-3), ("bf16", 2e-2)):
        for a, b in zip(out[f"batched_{p}"], out[f"single_{p}"]):
            assert [h.tokens for h in a] == [h.tokens for h in b], f"batched beam search changed a caption ({p})"
            assert np.allclose([h.score for h in a], [h.score for h in b], atol=atol), \
                f"batched beam scores differ ({p})"
    captions = {p: [vocab.decode(h[0].tokens) for h in out[f"batched_{p}"]] for p in caps}
    r = {"beam_sizes": f"{len(feats)} images, beam {beam}, max_len {kw['max_len']}",
         "distinct_captions": len(set(captions["fp32"])), "example_caption": captions["fp32"][0],
         "bf16_same_captions": sum(a == b for a, b in zip(captions["fp32"], captions["bf16"]))}
    for p, suffix in (("fp32", ""), ("bf16", "_bf16")):
        r |= {f"beam_images_per_s{suffix}": round(len(feats) / sec[f"batched_{p}"], 1),
              f"beam_images_per_s_one_by_one{suffix}": round(len(feats) / sec[f"single_{p}"], 1),
              f"beam_speedup{suffix}": round(sec[f"single_{p}"] / sec[f"batched_{p}"], 2)}
    return r


def bench_pipeline(checkpoint: Path, quick: bool, repeats: int) -> dict:
    """scripts/bench_pipeline.py's figures (the engines side by side), measured in a fresh process
    before anything else here has grown this one; a note when it fails."""
    cmd = [sys.executable, str(ROOT / "scripts" / "bench_pipeline.py"), "--json", "--checkpoint", str(checkpoint),
           "--images", "64" if quick else "200", "--repeats", str(repeats), "--latency-images", "20" if quick else "50"]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        last = (proc.stderr.strip().splitlines() or ["no output"])[-1]
        return {"pipeline_note": f"scripts/bench_pipeline.py not measured: {last}"}
    return json.loads(proc.stdout)


def captioner_command() -> list[str]:
    """The `captioner` console script of this Python's environment, else `python -m captioner.cli`."""
    script = shutil.which("captioner", path=str(Path(sys.executable).parent))
    return [script] if script else [sys.executable, "-m", "captioner.cli"]


def serve_ready_s(port: int, *args: str) -> float:
    """Seconds from starting `captioner serve *args` to its first answer on /healthz."""
    import urllib.request

    start = time.perf_counter()
    proc = subprocess.Popen([*captioner_command(), "serve", "--port", str(port), *args], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    try:
        while time.perf_counter() - start < 300:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=1):
                    return time.perf_counter() - start
            except OSError:
                if proc.poll() is not None:
                    raise RuntimeError(f"captioner serve exited with {proc.returncode}") from None
                time.sleep(0.02)
        raise RuntimeError("captioner serve did not answer /healthz within 300 s")
    finally:
        proc.terminate()
        proc.wait(30)


def bench_cold_start(repeats: int) -> dict:
    """Wall seconds of --help, caption and serve-until-ready as subprocesses: medians after one warm-up each;
    caption and serve also with --engine torch (the torch Captioner), serve also with --no-ui."""
    photo = str(ROOT / "demo" / "examples" / "grace_hopper.jpg")

    def wall(args: list[str]) -> float:
        start = time.perf_counter()
        subprocess.run([*captioner_command(), *args], check=True, capture_output=True)
        return time.perf_counter() - start

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    runs = {"help": lambda: wall(["--help"]), "caption": lambda: wall(["caption", photo]),
            "caption_torch": lambda: wall(["caption", photo, "--engine", "torch"]),
            "serve_ready": lambda: serve_ready_s(port),
            "serve_ready_torch": lambda: serve_ready_s(port, "--engine", "torch"),
            "serve_api_ready": lambda: serve_ready_s(port, "--no-ui")}
    r = {}
    for name, run in runs.items():
        run()  # warm-up: fills the caches
        r[f"cold_{name}_s"] = round(statistics.median(run() for _ in range(repeats)), 2)
    return r


def cpu_model() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines() if Path("/proc/cpuinfo").is_file() else []:
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def cpu_flags_that_matter() -> str:
    from captioner.hardware import BF16_CPU_FLAGS, cpu_flags

    shown = [f for f in ("avx2", "avx512f", "avx512_vnni", *BF16_CPU_FLAGS) if f in cpu_flags()]
    return ", ".join(shown) + ("" if "amx_bf16" in cpu_flags() else "; no AMX")


def table(r: dict) -> str:
    """The figures as a markdown table, then how they were measured."""
    rows = ["| figure | value | goal |", "|---|---:|---|"]
    if "caption_dir_speedup" in r:
        rows += [
            f"| caption-dir images/s, {r['engine']} ÷ torch engine ({r['caption_dir_images_per_s_default']} ÷ "
            f"{r['caption_dir_images_per_s_torch']}) | **{r['caption_dir_speedup']}×** | ≥ 3× |",
            f"| extract-features images/s, {r['engine']} ÷ torch ({r['extract_images_per_s_default']} ÷ "
            f"{r['extract_images_per_s_torch']}) | **{r['extract_speedup']}×** | ≥ 4× |",
            f"| caption-dir images/s, guided ÷ `--guide off` ({r['caption_dir_images_per_s_default']} ÷ "
            f"{r['caption_dir_images_per_s_unguided']}) | **{r['guide_caption_dir_ratio']}×** | ≥ 0.8× |",
            f"| single-image latency p50, guided ÷ `--guide off` ({r['latency_p50_ms']} ÷ "
            f"{r['latency_p50_ms_unguided']} ms) | **{r['guide_latency_ratio']}×** | ≤ 1.3× |",
            f"| single-image `Captioner.caption` latency p50 / p95 ({r['decode']}; torch engine p50 "
            f"{r['latency_p50_ms_torch']} ms) | **{r['latency_p50_ms']} / {r['latency_p95_ms']} ms** | information |",
            f"| single-image latency p50, what the CLI, demo and service run on a CPU (`bundles.load()`: "
            f"{r['runtime']}), guided / `--guide off` | **{r['latency_p50_ms_runtime']} / "
            f"{r['latency_p50_ms_runtime_unguided']} ms** | guided ≤ 15 ms |",
            f"| caption-dir ÷ the best its stages allow, what the command line runs ({r['runtime']}; per photo: load "
            f"{r['stage_ms_load_runtime']} + encoder {r['stage_ms_encoder_runtime']} + search "
            f"{r['stage_ms_search_runtime']} ms) | **{r['pipeline_efficiency_runtime']}** | ≥ 0.85 |",
            f"| the same in process with the torch Captioner (load {r['stage_ms_load']} + encoder "
            f"{r['stage_ms_encoder']} + search {r['stage_ms_search']} ms) | {r['pipeline_efficiency']} | information |",
        ]
    if "cold_help_s" in r:
        rows += [f"| `captioner --help`, wall time as a subprocess | **{r['cold_help_s']} s** | ≤ 0.5 s |",
                 f"| `captioner caption photo.jpg`, wall time (`--engine torch`: {r['cold_caption_torch_s']} s) "
                 f"| **{r['cold_caption_s']} s** | ≤ 1.0 s |",
                 f"| `captioner serve` until /healthz answers (`--engine torch`: {r['cold_serve_ready_torch_s']} s) "
                 f"| **{r['cold_serve_ready_s']} s** | ≤ 2.5 s |",
                 f"| `captioner serve --no-ui` (the API alone) until /healthz answers "
                 f"| **{r['cold_serve_api_ready_s']} s** | information |"]
    rows += [
        f"| decoder training step, achieved GFLOP/s ÷ the same GEMMs alone ({r['train_gflops']} ÷ "
        f"{r['gemm_gflops']} GFLOP/s) | **{r['train_gemm_efficiency']}** | (the limit) |",
        f"| decoder training tokens/s, captioner ÷ LSTMCell loop ({r['train_tokens_per_s']:,} ÷ "
        f"{r['train_tokens_per_s_loop']:,}) | {r['train_speedup']}× | information |",
        f"| the same with `train.precision=bf16` (loop in fp32) | {r['train_speedup_bf16']}× | information |",
        f"| beam search images/s, batched ÷ image by image ({r['beam_images_per_s']} ÷ "
        f"{r['beam_images_per_s_one_by_one']}) | {r['beam_speedup']}× | information |",
        f"| the same, both sides `decode.precision=bf16` ({r['beam_images_per_s_bf16']} ÷ "
        f"{r['beam_images_per_s_one_by_one_bf16']}) | {r['beam_speedup_bf16']}× | information |",
    ]
    notes = [
        f"- {r['cpu']} ({r['cpu_flags']}), {r['cores']} cores, torch {r['torch']}, {r['threads']} threads, "
        f"medians of {r['repeats']} interleaved repeats after a warm-up",
        f"- training: {r['train_sizes']}; forward + loss + backward + Adam step",
        f"- beam search: {r['beam_sizes']}, captions identical batched and one by one "
        f"({r['distinct_captions']} distinct); model: {r['beam_model']}; {r['beam_features']}; "
        f"bf16 gives the fp32 caption for {r['bf16_same_captions']} of them",
    ]
    if "caption_dir_speedup" in r:
        notes.insert(1, f"- inference paths: {r['n_images']} Flickr8k photos, batch {r['batch_size']}, "
                        f"{r['workers']} decode workers, latency over {r['latency_images']} photos")
    if "pipeline_note" in r:
        notes.append(f"- {r['pipeline_note']}")
    return "\n".join(rows + [""] + notes)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="smaller runs (about a minute): 5 repeats, 20 images")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of the table")
    p.add_argument("--threads", type=int, default=0, help="torch threads for every measurement (default: torch's)")
    p.add_argument("--checkpoint", "-c", default=None,
                   help="model for beam search and the pipeline (default: shipped model, else the training run's "
                        "best.pt, else one trained here for a few steps)")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--images", type=int, default=None, help="images for beam search (default 100, quick 20)")
    p.add_argument("--batch", type=int, default=None, help="training batch (default: the config's)")
    p.add_argument("--seq-len", type=int, default=16, help="padded caption length in training steps")
    p.add_argument("--no-pipeline", action="store_true", help="skip scripts/bench_pipeline.py")
    p.add_argument("--no-cold-start", action="store_true", help="skip the commands' cold-start wall times")
    args = p.parse_args(argv)
    if args.repeats < 5:
        p.error("--repeats must be at least 5")
    if args.threads:
        torch.set_num_threads(args.threads)
    cfg = load_config(CONFIG)
    n_images = args.images or (20 if args.quick else 100)

    model_path, model = pick_model(args.checkpoint, cfg, train_steps=60)
    payload = ckpt.load(model_path)
    feats, feats_src = dev_features(Config.from_dict(payload["config"]), n_images)
    r = {"torch": torch.__version__, "threads": torch.get_num_threads(), "cpu": cpu_model(),
         "cpu_flags": cpu_flags_that_matter(),
         "cores": len(os.sched_getaffinity(0)), "repeats": args.repeats}
    if not args.no_pipeline:  # first, while this process is still small (see bench_pipeline)
        r |= bench_pipeline(model_path, args.quick, args.repeats)
    if not args.no_cold_start:
        r |= bench_cold_start(args.repeats)
    r |= bench_train(cfg, len(Vocab.from_dict(payload["vocab"])), feats.shape[1], args.batch or cfg.train.batch_size,
                     args.seq_len, args.repeats)
    r |= bench_beam(payload, feats, cfg.decode.beam_size, args.repeats)
    r |= {"beam_model": model, "beam_features": feats_src}
    print(json.dumps(r) if args.json else table(r))
    return 0


if __name__ == "__main__":
    sys.exit(main())
