"""Captioning without torch: an exported bundle (`captioner export`) run by onnxruntime, numpy and Pillow.

A bundle folder holds three ONNX graphs and bundle.json (docs/deploy.md lists every input
and output). This module imports only numpy, onnxruntime, Pillow, the standard library and
captioner's own torch-free modules (images, vocab, config, tags, constraints, ort, output), so it
runs where torch is not installed. It gives what `Captioner.caption` gives, computed the same way:
the same preprocessing (torchvision's Resize on a PIL image is PIL's bilinear resize with the same
output size), greedy decoding and the same beam search (finished captions kept apart from the k
live prefixes; length penalty none, avg or wu; <pad>, <start> and <unk> banned), guided by the
same tags when the bundle carries the encoder's ImageNet classifier (search.beam_search's
constraint states, here for one image at a time).

    rt = Runtime("bundle/")
    rt.caption("dog.jpg")          # {'caption': 'a brown dog runs ...', 'score': -0.9, 'tags': [...]}

    python -m captioner.runtime bundle/ dog.jpg cat.png
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
from PIL import Image

from .config import DecodeConfig
from .constraints import Machine, machine
from .files import file_sha256
from .images import load_image
from .ort import encode, session
from .tags import Tagger
from .vocab import Vocab

FORMAT = "captioner-bundle"
FORMAT_VERSION = 4
MANIFEST = "bundle.json"
GRAPHS = ("encoder", "decoder_init", "decoder_step")
TAGGER = ("tagger", "tag_mapping")  # the classifier (tagger.npz) and its noun mapping, when the encoder has one
PENALTIES = ("none", "avg", "wu")
SECTIONS = ("files", "vocab", "preprocess", "decode", "decoder")  # what Runtime reads from the manifest
# The decoding options a bundle's manifest sets and a call may override (as Captioner.options).
OPTIONS = ("beam_size", "max_len", "length_penalty", "alpha", "guide", "guide_threshold", "guide_max", "guide_weight")
# The checkpoint's settings the manifest records beside them, which the runtime does not follow (captioner.bundles).
ROUTE = ("method", "engine", "precision")


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
    for name in GRAPHS + (TAGGER if any(t in manifest["files"] for t in TAGGER) else ()):
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
    device = "cpu"  # onnxruntime's CPU provider; a GPU is served by the torch Captioner

    def __init__(self, folder: str | Path, threads: int | None = None):
        folder = Path(folder)
        self.manifest = read_manifest(folder)
        files = self.manifest["files"]
        try:
            self.vocab = Vocab.from_dict(self.manifest["vocab"])
            self.prep, d = self.manifest["preprocess"], self.manifest["decode"]
            self.config = DecodeConfig(**{k: d[k] for k in OPTIONS})
            self.banned = d["banned"]  # <pad>, <start>, <unk>: never in a caption
            self.state_names = self.manifest["decoder"]["state"]  # ["h", "c"] for an LSTM, ["h"] for a GRU/RNN
            self._mean = np.asarray(self.prep["mean"], np.float32)[:, None, None]
            self._std = np.asarray(self.prep["std"], np.float32)[:, None, None]
            self.tagger = _tagger(folder, self.manifest) if "tagger" in files else None
        except (KeyError, TypeError, ValueError, OSError) as e:
            raise BundleError(f"{folder / MANIFEST} is malformed: {type(e).__name__}: {e}") from None
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

    @staticmethod
    def stack(pixels: list[np.ndarray]) -> np.ndarray:
        """Preprocessed images -> the batch `encode` takes."""
        return np.stack(pixels)

    def encode(self, pixels: np.ndarray) -> np.ndarray:
        """Pixels (B, 3, H, W) -> features (B, width)."""
        return encode(self.encoder, pixels)

    def options(self, method: str | None = None, n_best: int = 1, **overrides) -> DecodeConfig:
        """The bundle's decoding settings with per-call overrides (None keeps a setting), checked now."""
        unknown = set(overrides) - set(OPTIONS)
        if unknown:
            raise TypeError(f"unknown decoding option(s) {sorted(unknown)}; the runtime knows {sorted(OPTIONS)}")
        if method not in (None, "beam", "greedy"):
            raise ValueError(f"unknown decoding method {method!r}; the runtime decodes with beam or greedy")
        return self.config.replace(method=method, n_best=n_best, **overrides)

    def decode(self, feats: np.ndarray, options: DecodeConfig | None = None) -> list[list[tuple[list[int], float]]]:
        """Features (B, width) -> per image, its n_best (tokens, score), best first (options: from `options()`)."""
        o = options or self.options()
        outputs = self.init.run(None, {"features": np.ascontiguousarray(feats, np.float32)})
        ctx, states = outputs[0], outputs[1:]  # states batch on dim 1
        found = self._constraints(feats, o)
        results = []
        for i in range(len(ctx)):
            c, s = ctx[i:i + 1], [x[:, i:i + 1] for x in states]
            if o.method == "greedy":
                results.append([self._greedy(c, s, o.max_len)])
            else:
                results.append(self._beam(c, s, o, found[i]))
        return results

    def _constraints(self, feats: np.ndarray, o: DecodeConfig) -> list[list[tuple[tuple[int, ...], float]]]:
        """Per image, its guidance constraints from the tags, as Captioner._guidance (none when guide is off)."""
        if o.method != "beam" or o.guide == "off" or self.tagger is None or o.guide_max == 0:
            return [[] for _ in feats]
        return self.tagger.constraints(feats, self.vocab.stoi, threshold=o.guide_threshold, most=o.guide_max)

    def tag_features(self, feats: np.ndarray) -> list[list[dict]] | list[None]:
        """Features -> per image [{"tag", "prob"}, ...]; None each for a bundle without a classifier."""
        return [None] * len(feats) if self.tagger is None else self.tagger(feats)

    def format(self, hyps: list[tuple[list[int], float]], tags: list[dict] | None = None) -> list[dict]:
        """One image's hypotheses -> [{"caption", "score", "tags"}, ...], best first (as Captioner.format)."""
        extra = {} if tags is None else {"tags": tags}
        return [{"caption": self.vocab.decode(tokens), "score": round(score, 4), **extra} for tokens, score in hyps]

    def describe(self, feats: np.ndarray, options: DecodeConfig | None = None) -> list[list[dict]]:
        """Features -> per image its formatted hypotheses with its tags, as Captioner.describe."""
        return [self.format(h, t) for h, t in zip(self.decode(feats, options), self.tag_features(feats))]

    def tags(self, images, *, batch_size: int = 32) -> list[list[dict]] | list[dict]:
        """Per image [{"tag": noun, "prob": p}, ...], likeliest first, as Captioner.tags."""
        if self.tagger is None:
            raise ValueError("this bundle has no ImageNet classifier to tag with")
        tags, single = self._per_image(images, batch_size, self.tag_features)
        return tags[0] if single else tags

    def caption(self, images, *, n_best: int = 1, batch_size: int = 32, method: str | None = None, **options):
        """Caption one image or a list of them (paths, bytes or PIL images), as Captioner.caption does.

        Returns {"caption", "score", "tags"} per image, or a list of n_best of those when n_best > 1;
        a single input gives a single result. Options: method (beam | greedy) and OPTIONS.
        """
        o = self.options(method, n_best, **options)
        results, single = self._per_image(images, batch_size, lambda f: self.describe(f, o))
        if n_best == 1:
            results = [r[0] for r in results]
        return results[0] if single else results

    def _per_image(self, images, batch_size: int, per_batch) -> tuple[list, bool]:
        """per_batch(features) over one image or a list, batch by batch: (its results per image, single)."""
        single = not isinstance(images, (list, tuple))
        images = [images] if single else list(images)
        out = []
        for i in range(0, len(images), batch_size):
            out += per_batch(self.encode(np.stack([self.preprocess(im) for im in images[i:i + batch_size]])))
        return out, single

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

    def _beam(self, ctx, state, o: DecodeConfig, constraints: list[tuple[tuple[int, ...], float]]):
        """search.beam_search for one image: per state of its constraint machine, k live prefixes and,
        apart from them, the k best finished captions; all ranked together by score plus tag bonus."""
        m = machine([ids for ids, _ in constraints], required=o.guide_max)
        end, k, S, kind = self.vocab.end, o.beam_size, m.states, o.length_penalty
        guide, most = _Guide(m, len(self.vocab)), sum(o.guide_weight * p for _, p in constraints)
        ctx, state = np.repeat(ctx, S * k, axis=0), [np.repeat(x, S * k, axis=1) for x in state]
        tokens = np.full(S * k, self.vocab.start)
        scores = np.full((S, k), -np.inf, np.float32)
        scores[0, 0] = 0  # every caption starts in state 0; all beams alike: keep one, or top-k is k copies
        seqs = [[] for _ in range(S * k)]
        pool, pool_seqs = np.full((S, k), -np.inf, np.float32), [[[] for _ in range(k)] for _ in range(S)]
        for t in range(o.max_len):
            logp, state = self._step(ctx, tokens, state)
            top, rows, tok = guide.candidates(scores[:, :, None] + logp.reshape(S, k, -1), k)
            is_end = tok == end
            pen = penalty(t + 1, kind, o.alpha)
            # Every candidate has t+1 tokens, so raw log-probs rank them; each beam has one <end>
            # candidate, so the best 2k hold the best k that are not <end>.
            ends = np.where(is_end[:, :k], top[:, :k], -np.inf).astype(np.float32) / pen
            merged = np.concatenate([pool, ends], 1)
            order = np.argsort(-merged, axis=1, kind="stable")[:, :k]  # ties: the earlier caption stays
            pool = np.take_along_axis(merged, order, 1)
            merged_seqs = [pool_seqs[g] + [seqs[r] + [end] for r in rows[g, :k]] for g in range(S)]
            pool_seqs = [[merged_seqs[g][j] for j in order[g]] for g in range(S)]
            live = np.argsort(is_end, axis=1, kind="stable")[:, :k]
            scores = np.take_along_axis(np.where(is_end, -np.inf, top).astype(np.float32), live, 1)
            rows, tokens = np.take_along_axis(rows, live, 1).ravel(), np.take_along_axis(tok, live, 1).ravel()
            seqs = [seqs[r] + [int(w)] for r, w in zip(rows, tokens)]
            state = [x[:, rows] for x in state]
            nth = sorted(_ranks(pool, pool_seqs, constraints, o.guide_weight, end)[1], reverse=True)[o.n_best - 1]
            if guide.finished(pool, scores, pen, nth, most):
                final, final_seqs = pool, pool_seqs
                break
        else:  # max_len reached: the unfinished prefixes are captions too
            final = np.concatenate([pool, scores / penalty(o.max_len, kind, o.alpha)], 1)
            final_seqs = [pool_seqs[g] + seqs[g * k:(g + 1) * k] for g in range(S)]
        return _ranked(final, final_seqs, constraints, o.guide_weight, o.n_best, end)


class _Guide:
    """One image's constraint machine as arrays, as search._Guide has a batch's: S states of k beams.

    A candidate counts in the state its word leads to: blocked (-inf) where it stays, moved in there."""

    def __init__(self, m: Machine, vocab_size: int):
        S = m.states
        self.words = np.array(sorted({w for _, w in m.moves}) or [0])
        to = np.repeat(np.arange(S)[:, None], len(self.words), 1)  # the state each word leads to from each state
        for (state, w), target in m.moves.items():
            to[state, np.searchsorted(self.words, w)] = target
        moves = to != np.arange(S)[:, None]
        self.leads = (to[None] == np.arange(S)[:, None, None]) & moves[None]  # (S_to, S_from, L)
        self.blocked = np.zeros((S, vocab_size), np.float32)
        for state in range(S):
            self.blocked[state, self.words[moves[state]]] = -np.inf

    def candidates(self, cand: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """cand (S, k, V) prefix + word scores -> per state, its best 2k (scores, source rows, words)."""
        S, _, V = cand.shape
        L = len(self.words)
        pool = cand.reshape(S, k * V)
        if S > 1:
            into = np.where(self.leads[:, :, None, :], cand[None, :, :, self.words], -np.inf).reshape(S, S * k * L)
            pool = np.concatenate([(cand + self.blocked[:, None, :]).reshape(S, k * V), into], 1)
        idx = np.stack([_top(row, 2 * k) for row in pool])
        from_state, beam, word = np.arange(S)[:, None], idx // V, idx % V
        if S > 1:
            came, moved = idx >= k * V, np.maximum(idx - k * V, 0)
            from_state = np.where(came, moved // (k * L), from_state)
            beam = np.where(came, (moved // L) % k, beam)
            word = np.where(came, self.words[moved % L], word)
        return np.take_along_axis(pool, idx, 1), from_state * k + beam, word

    def finished(self, pool: np.ndarray, scores: np.ndarray, pen, nth: float, most: float) -> bool:
        """As search._Guide.finished: nth is the n_best-th best rank of the finished captions, most the
        bonus of every constraint together."""
        reach = np.maximum.accumulate(scores[:, 0] / pen)
        converged = pool[:, -1] >= reach
        hopeless = reach.astype(np.float64) + most < nth
        hopeless[0] = False
        return bool((converged | hopeless).all())


def _ranks(final: np.ndarray, final_seqs: list, constraints, weight: float, end: int) -> tuple[list, list]:
    """Every state's finished captions as (score, tokens), and their ranks as search._Guide.rank: score
    plus weight times the probability of each constraint a caption names."""
    flat = [(float(sc), _strip(seq, end)) for row, seqs in zip(final, final_seqs) for sc, seq in zip(row, seqs)]
    return flat, [sc + sum(weight * p for ids, p in constraints if set(ids) & set(tokens)) for sc, tokens in flat]


def _ranked(final: np.ndarray, final_seqs: list, constraints, weight: float, n_best: int, end: int) -> list:
    """The n_best finished captions of every state, best rank first (_ranks)."""
    flat, rank = _ranks(final, final_seqs, constraints, weight, end)
    order = np.argsort(-np.array(rank, np.float64), kind="stable")[:n_best]
    return [(flat[j][1], flat[j][0]) for j in order if flat[j][0] != -np.inf]


def _tagger(folder: Path, manifest: dict) -> Tagger:
    files = manifest["files"]
    with np.load(bundle_path(folder, files["tagger"]["path"]), allow_pickle=False) as arrays:
        weight, bias = arrays["weight"], arrays["bias"]
    return Tagger.from_mapping(weight, bias, manifest["tags"]["regions"],
                               bundle_path(folder, files["tag_mapping"]["path"]))


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
