"""Captioning without torch: an exported bundle (`captioner export`) run by onnxruntime, numpy and Pillow.

A bundle folder holds three ONNX graphs and bundle.json (docs/deploy.md lists every input
and output). This module imports only numpy, onnxruntime, Pillow, the standard library and
captioner's own torch-free modules (images, vocab, ort, output), so it runs where torch is not
installed. It gives what `Captioner.caption` gives, computed the same way: the same
preprocessing (torchvision's Resize on a PIL image is PIL's bilinear resize with the same
output size), greedy decoding and the same beam search (finished captions kept apart from
the k live prefixes; length penalty none, avg or wu; <pad>, <start> and <unk> banned).

    rt = Runtime("bundle/")
    rt.caption("dog.jpg")                      # {'caption': 'a brown dog runs ...', 'score': -0.9}

    python -m captioner.runtime bundle/ dog.jpg cat.png
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
from PIL import Image

from .files import file_sha256
from .images import load_image
from .ort import session
from .vocab import Vocab

FORMAT = "captioner-bundle"
FORMAT_VERSION = 1
MANIFEST = "bundle.json"
GRAPHS = ("encoder", "decoder_init", "decoder_step")
PENALTIES = ("none", "avg", "wu")
SECTIONS = ("files", "vocab", "preprocess", "decode", "decoder")  # what Runtime reads from the manifest


class BundleError(ValueError):
    """The folder is not a bundle this runtime can run; the message says why."""


def bundle_path(folder: str | Path, relative) -> Path:
    """A path the manifest gives, inside `folder`: an absolute one or one with `..` could read any file."""
    parts = Path(relative).parts if isinstance(relative, str) and relative else ()
    if not parts or Path(relative).is_absolute() or ".." in parts:
        raise BundleError(f"{Path(folder) / MANIFEST} lists the file {relative!r}: "
                          "a bundle's files are relative paths inside its folder")
    return Path(folder) / relative


def read_manifest(folder: str | Path) -> dict:
    """bundle.json of `folder`, its format version and every file's SHA-256 checked."""
    folder = Path(folder)
    try:
        manifest = json.loads((folder / MANIFEST).read_text())
    except FileNotFoundError:
        raise BundleError(f"{folder} is not a captioner bundle: {MANIFEST} is missing "
                          "(make one with `captioner export --out DIR`)") from None
    except (OSError, ValueError) as e:
        raise BundleError(f"cannot read {folder / MANIFEST}: {e}") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise BundleError(f"{folder / MANIFEST} is not a captioner bundle manifest")
    if manifest.get("format_version") != FORMAT_VERSION:
        raise BundleError(f"bundle format version {manifest.get('format_version')!r} is not supported by this "
                          f"runtime (it reads version {FORMAT_VERSION}); export the model again with this version")
    missing = [key for key in SECTIONS if not isinstance(manifest.get(key), dict)]
    if missing:
        raise BundleError(f"{folder / MANIFEST} is malformed: no {', '.join(missing)} section")
    for name in GRAPHS:
        entry = manifest["files"].get(name)
        if not isinstance(entry, dict) or not isinstance(entry.get("sha256"), str):
            raise BundleError(f"{folder / MANIFEST} is malformed: files.{name} needs a path and a sha256")
        path = bundle_path(folder, entry.get("path"))
        if not path.is_file():
            raise BundleError(f"bundle file missing: {path}")
        if file_sha256(path) != entry["sha256"]:
            raise BundleError(f"bundle file {path} does not match its SHA-256 in {MANIFEST} "
                              "(corrupt or changed): export the bundle again")
    return manifest


def penalty(length: int, kind: str, alpha: float) -> np.float32:
    """search.penalty for one length, in float32 as torch computes it."""
    length = np.float32(max(length, 1))
    if kind == "none":
        return np.float32(1)
    if kind == "avg":
        return length
    if kind == "wu":
        return np.float32(((np.float32(5) + length) / np.float32(6)) ** np.float32(alpha))
    raise ValueError(f"unknown length penalty {kind!r}; choose from {PENALTIES}")


def _strip(seq: list[int], end: int) -> list[int]:
    return seq[: seq.index(end)] if end in seq else seq


def _top(values: np.ndarray, n: int) -> np.ndarray:
    """Indices of the n largest values, largest first (ties: the lower index first)."""
    n = min(n, values.size)
    part = np.argpartition(-values, n - 1)[:n] if n < values.size else np.arange(values.size)
    return part[np.lexsort((part, -values[part]))]


class Runtime:
    def __init__(self, folder: str | Path, threads: int | None = None):
        folder = Path(folder)
        self.manifest = read_manifest(folder)
        try:
            self.vocab = Vocab.from_dict(self.manifest["vocab"])
            self.prep, self.defaults = self.manifest["preprocess"], self.manifest["decode"]
            self.banned = self.defaults["banned"]  # <pad>, <start>, <unk>: never in a caption
            self.state_names = self.manifest["decoder"]["state"]  # ["h", "c"] for an LSTM, ["h"] for a GRU/RNN
            self._mean = np.asarray(self.prep["mean"], np.float32)[:, None, None]
            self._std = np.asarray(self.prep["std"], np.float32)[:, None, None]
        except (KeyError, TypeError, ValueError) as e:
            raise BundleError(f"{folder / MANIFEST} is malformed: {type(e).__name__}: {e}") from None
        files = self.manifest["files"]
        # The decoder's products are small (k rows): one thread each, no pool to wake.
        self.encoder = session(bundle_path(folder, files["encoder"]["path"]), threads)
        self.init, self.step = (session(bundle_path(folder, files[g]["path"]), 1) for g in GRAPHS[1:])

    # -- the three stages, as Captioner has them ------------------------------------------
    def preprocess(self, image) -> np.ndarray:
        """Any path / bytes / PIL image -> the encoder's input (3, crop, crop), float32 (raises images.ImageError)."""
        img = load_image(image, draft_size=self.prep["draft_size"])
        # torchvision's Resize(int): the shorter side becomes `resize`, the longer one int(resize * long / short).
        w, h = img.size
        size = self.prep["resize"]
        new_w, new_h = (size, int(size * h / w)) if w <= h else (int(size * w / h), size)
        if (new_w, new_h) != (w, h):
            img = img.resize((new_w, new_h), Image.Resampling.BILINEAR)
        crop = self.prep["crop"]
        top, left = int(round((new_h - crop) / 2.0)), int(round((new_w - crop) / 2.0))
        pixels = np.asarray(img.crop((left, top, left + crop, top + crop)), dtype=np.uint8)
        pixels = pixels.transpose(2, 0, 1).astype(np.float32) / np.float32(255)
        return (pixels - self._mean) / self._std

    def encode(self, pixels: np.ndarray) -> np.ndarray:
        """Pixels (B, 3, H, W) -> features (B, width)."""
        return self.encoder.run(None, {"pixels": np.ascontiguousarray(pixels, np.float32)})[0]

    def decode(self, feats: np.ndarray, *, beam_size: int | None = None, max_len: int | None = None,
               n_best: int = 1, length_penalty: str | None = None, alpha: float | None = None,
               method: str = "beam") -> list[list[tuple[list[int], float]]]:
        """Features (B, width) -> per image, its n_best (tokens, score), best first. Defaults: the bundle's."""
        d = self.defaults
        max_len = max_len or d["max_len"]
        if method == "beam":
            beam_size = beam_size or d["beam_size"]
            length_penalty = length_penalty or d["length_penalty"]
            alpha = d["alpha"] if alpha is None else alpha
            if not 1 <= n_best <= beam_size:
                raise ValueError(f"n_best must be between 1 and beam_size ({beam_size}), got {n_best}")
            penalty(1, length_penalty, alpha)  # reject an unknown penalty before any work
        elif method == "greedy":
            if n_best != 1:
                raise ValueError(f"n_best > 1 needs method='beam' (got method={method!r})")
        else:
            raise ValueError(f"unknown decoding method {method!r}; the runtime decodes with beam or greedy")
        outputs = self.init.run(None, {"features": np.ascontiguousarray(feats, np.float32)})
        ctx, states = outputs[0], outputs[1:]  # states batch on dim 1
        results = []
        for i in range(len(ctx)):
            c, s = ctx[i:i + 1], [x[:, i:i + 1] for x in states]
            if method == "greedy":
                results.append([self._greedy(c, s, max_len)])
            else:
                results.append(self._beam(c, s, beam_size, max_len, length_penalty, alpha, n_best))
        return results

    def format(self, hyps: list[tuple[list[int], float]]) -> list[dict]:
        """One image's hypotheses -> [{"caption", "score"}, ...], best first (as Captioner.format)."""
        return [{"caption": self.vocab.decode(tokens), "score": round(score, 4)} for tokens, score in hyps]

    def caption(self, images, *, n_best: int = 1, batch_size: int = 32, **decode_options):
        """Caption one image or a list of them (paths, bytes or PIL images), as Captioner.caption does.

        Returns {"caption", "score"} per image, or a list of n_best of those when n_best > 1;
        a single input gives a single result. Options: beam_size, max_len, length_penalty,
        alpha, method (beam | greedy).
        """
        single = not isinstance(images, (list, tuple))
        images = [images] if single else list(images)
        results = []
        for i in range(0, len(images), batch_size):
            pixels = np.stack([self.preprocess(im) for im in images[i:i + batch_size]])
            results += [self.format(h) for h in self.decode(self.encode(pixels), n_best=n_best, **decode_options)]
        if n_best == 1:
            results = [r[0] for r in results]
        return results[0] if single else results

    # -- decoding one image -------------------------------------------------------------
    def _step(self, ctx: np.ndarray, tokens: np.ndarray, state: list[np.ndarray]):
        feed = {"tokens": tokens.astype(np.int64), "context": ctx, **dict(zip(self.state_names, state))}
        logp, *state = self.step.run(None, feed)
        logp[:, self.banned] = -np.inf
        return logp, state

    def _greedy(self, ctx, state, max_len: int) -> tuple[list[int], float]:
        end, token, score, seq = self.vocab.end, self.vocab.start, np.float32(0), []
        for _ in range(max_len):
            logp, state = self._step(ctx, np.array([token]), state)
            token = int(logp[0].argmax())
            score += logp[0, token]
            seq.append(token)
            if token == end:
                break
        return _strip(seq, end), float(score)

    def _beam(self, ctx, state, k: int, max_len: int, kind: str, alpha: float, n_best: int):
        """search.beam_search for one image: k live prefixes, and apart from them the k best finished captions."""
        end = self.vocab.end
        ctx, state = np.repeat(ctx, k, axis=0), [np.repeat(x, k, axis=1) for x in state]
        tokens = np.full(k, self.vocab.start)
        scores = np.full(k, -np.inf, np.float32)
        scores[0] = 0  # all beams start identical: keep one, or the top-k would be k copies
        seqs = [[] for _ in range(k)]
        pool, pool_seqs = np.full(k, -np.inf, np.float32), [[] for _ in range(k)]  # finished, best first
        for t in range(max_len):
            logp, state = self._step(ctx, tokens, state)
            V = logp.shape[1]
            cand = (scores[:, None] + logp).reshape(-1)
            # Every candidate has t+1 tokens, so raw log-probs rank them; each beam has one <end>
            # candidate, so the best 2k hold the best k that are not <end>.
            idx = _top(cand, 2 * k)
            top, beam, tok = cand[idx], idx // V, idx % V
            is_end = tok == end
            pen = penalty(t + 1, kind, alpha)
            ends = np.where(is_end[:k], top[:k], -np.inf).astype(np.float32) / pen
            merged = np.concatenate([pool, ends])
            merged_seqs = pool_seqs + [seqs[b] + [end] for b in beam[:k]]
            order = np.argsort(-merged, kind="stable")[:k]  # ties: the earlier caption stays
            pool, pool_seqs = merged[order], [merged_seqs[j] for j in order]
            live = np.argsort(is_end, kind="stable")[:k]
            scores = np.where(is_end, -np.inf, top).astype(np.float32)[live]
            beam, tok = beam[live], tok[live]
            seqs = [seqs[b] + [int(w)] for b, w in zip(beam, tok)]
            state = [x[:, beam] for x in state]
            tokens = tok
            if pool[-1] >= scores[0] / pen:
                final, final_seqs = pool, pool_seqs
                break
        else:  # max_len reached: the unfinished prefixes are captions too
            final = np.concatenate([pool, scores / penalty(max_len, kind, alpha)])
            final_seqs = pool_seqs + seqs
        order = np.argsort(-final, kind="stable")[:n_best]
        return [(_strip(final_seqs[j], end), float(final[j])) for j in order if final[j] != -np.inf]


def main(argv=None) -> int:
    from .output import decode_args, decode_options, print_captions

    p = argparse.ArgumentParser(prog="python -m captioner.runtime",
                                description="Caption images with an exported bundle, without torch.")
    p.add_argument("bundle", help="bundle folder written by `captioner export`")
    p.add_argument("images", nargs="+", help="image files")
    decode_args(p)
    p.add_argument("--n-best", type=int, default=1, help="print the N best captions per image")
    p.add_argument("--json", action="store_true", help='JSON lines: {"image", "caption", "score"}')
    p.add_argument("--threads", type=int, default=None, help="onnxruntime threads (default: one per physical core)")
    args = p.parse_args(argv)
    try:
        runtime = Runtime(args.bundle, threads=args.threads)
        return print_captions(runtime.caption, args.images, n_best=args.n_best, as_json=args.json,
                              **decode_options(args))
    except ValueError as e:  # BundleError, bad options
        print(f"captioner.runtime: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
