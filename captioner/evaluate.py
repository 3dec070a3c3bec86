"""Scoring a whole split: where the captions come from, which images count, one report.

The captions to score come from one of three places:
  - a model: every usable image of the split is captioned through `Captioner` (training's dev
    score decodes its cached features instead, `evaluate_bleu`, and scores them the same way);
  - a results file made elsewhere (COCO results format, `[{"image_id", "caption"}]`);
  - the references themselves (`human=True`), the human ceiling: each reference in turn
    is the hypothesis and the image's *other* references are its references. All
    (image, held-out reference) pairs form one corpus, so the BLEU reported is one
    corpus BLEU over N_images x N_refs hypotheses (images with fewer than 2 references
    are skipped). Humans are scored against one reference fewer than a model (4 vs 5
    on Flickr8k), which lowers their BLEU a little: it is a ceiling, not an exact match.

Images are skipped, counted and named in the report, never silently dropped: a missing
file, an image with no references, an unreadable image, an image the results file has
no caption for. Empty hypotheses are kept (they score no matches) and counted.

The report holds the project's BLEU (`metrics.bleu`) and, when Java is found, the
coco-caption metrics (`metrics.coco_caption`). With `out`, it is written next to a COCO
results file and a per-image CSV.
"""
from __future__ import annotations

import csv
import io
import json
import sys
from dataclasses import dataclass, field
from pathlib import Path

from . import metrics
from .config import DataConfig
from .data import ONE_SPLIT_FORMATS, Example, detect_format, load_split
from .files import write_atomic
from .output import csv_text
from .vocab import tokenize

MISSING_FILE = "missing file"
NO_REFERENCES = "no references"
UNREADABLE = "unreadable image"
NO_RESULT = "no caption in the results file"
ONE_REFERENCE = "fewer than 2 references"
SHOW_SKIPPED = 5  # names listed per skip reason


@dataclass
class Captions:
    """What gets scored: one hypothesis and its references per row, plus what was left out."""

    ids: list = field(default_factory=list)
    hypotheses: list[str] = field(default_factory=list)
    references: list[list[str]] = field(default_factory=list)
    skipped: dict[str, list] = field(default_factory=dict)  # reason -> image ids

    def add(self, image_id, hypothesis: str, references: list[str]):
        self.ids.append(image_id)
        self.hypotheses.append(hypothesis)
        self.references.append(references)

    def skip(self, reason: str, image_id):
        self.skipped.setdefault(reason, []).append(image_id)


# -- the split ---------------------------------------------------------------------------
def load_examples(data: str | Path, split: str | None = None, images: str | Path | None = None,
                  need_images: bool = True) -> tuple[str, list[Example]]:
    """(format, examples) of one split. COCO, CSV and JSONL files are one split each, the others need `split`."""
    fmt = detect_format(data)
    if fmt in ONE_SPLIT_FORMATS and split:
        raise ValueError(f"{data} is a {fmt} captions file, which holds one split by itself: leave out --split")
    if fmt not in ONE_SPLIT_FORMATS and not split:
        raise ValueError(f"{data} is a {fmt} dataset with several splits: give --split (e.g. dev or test)")
    if fmt != "flickr8k" and images is None:
        if need_images:
            raise ValueError(f"a {fmt} dataset names images but does not hold them: give --images (the image folder)")
        images = "."  # image paths are never opened when scoring given captions
    cfg = DataConfig(format=fmt, root=str(data), images=None if images is None else str(images))
    return fmt, load_split(cfg, split)


def training_captions(data, fmt: str, split: str | None) -> list[str] | None:
    """The training split's captions of the same dataset; None for a one-split file (COCO, CSV,
    JSONL) or a dataset without a train split."""
    if fmt in ONE_SPLIT_FORMATS or split == "train":
        return None
    try:
        return [c for ex in load_examples(data, "train", need_images=False)[1] for c in ex.captions]
    except FileNotFoundError:
        return None


# -- the sources of captions ------------------------------------------------------------
def caption_split(captioner, examples: list[Example], batch_size: int = 32, workers: int = 0,
                  progress: bool = True, options=None) -> Captions:
    """Caption every image that exists and has references through `captioner` (options: its
    `Captioner.options(...)`, None for the model's own), on caption-dir's pipeline."""
    from tqdm import tqdm

    from .folder import caption_files

    out = Captions()
    usable: list[Example] = []
    for ex in examples:
        if not ex.captions:
            out.skip(NO_REFERENCES, ex.image_id)
        elif not ex.path.is_file():
            out.skip(MISSING_FILE, ex.image_id)
        else:
            usable.append(ex)
    batches = caption_files(captioner, Path("."), [str(ex.path) for ex in usable], options, batch_size=batch_size,
                            workers=workers)
    done = 0
    for batch in tqdm(batches, desc="captioning", unit="batch", disable=not progress, file=sys.stderr,
                      total=-(-len(usable) // batch_size)):
        for ex, (_, results, _error) in zip(usable[done:], batch):
            if results is None:
                out.skip(UNREADABLE, ex.image_id)
            else:
                out.add(ex.image_id, results[0]["caption"], ex.captions)
        done += len(batch)
    return out


def decode_features(captioner, feats, batch_size: int = 500, options=None) -> list[str]:
    """Captions of cached features (options: `Captioner.options(...)`; None: the model's own settings).
    feats: an (N, D) array (a memmapped cache or in memory), one row per image."""
    import numpy as np
    import torch

    hyps = []
    for i in range(0, len(feats), batch_size):
        batch = torch.as_tensor(np.array(feats[i:i + batch_size], dtype=np.float32))
        hyps += [captioner.vocab.decode(h[0].tokens) for h in captioner.decode(batch, options)]
    return hyps


def evaluate_bleu(captioner, feats, examples, batch_size: int = 500) -> dict[str, float]:
    """BLEU of the captions decoded from cached features (training's dev score); feats: one row per example."""
    hyps = decode_features(captioner, feats[:len(examples)], batch_size)
    return metrics.bleu(hyps, [ex.captions for ex in examples])


def read_results(path: str | Path, examples: list[Example]) -> tuple[Captions, list]:
    """Captions from a COCO results file, matched to the split by image_id.

    Returns (captions, ids in the file but not in the split). An id matches as text, so
    "123" and 123 are the same image; Flickr8k and Karpathy ids are the file names.
    """
    path = Path(path)
    try:
        entries = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise FileNotFoundError(f"results file not found: {path}") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"results file {path} is not JSON: {e}") from None
    if not isinstance(entries, list):
        raise ValueError(f"results file {path} must be a JSON list of {{\"image_id\", \"caption\"}} objects")
    given: dict[str, str] = {}
    for n, entry in enumerate(entries):
        if not (isinstance(entry, dict) and "image_id" in entry and isinstance(entry.get("caption"), str)):
            raise ValueError(f"results file {path}, entry {n}: expected {{\"image_id\": ..., \"caption\": \"...\"}}, "
                             f"got {json.dumps(entry)[:200]}")
        key = str(entry["image_id"])
        if key in given:
            raise ValueError(f"results file {path}: image_id {entry['image_id']!r} has more than one caption")
        given[key] = entry["caption"]
    out = Captions()
    for ex in examples:
        if not ex.captions:
            out.skip(NO_REFERENCES, ex.image_id)
        elif str(ex.image_id) not in given:
            out.skip(NO_RESULT, ex.image_id)
        else:
            out.add(ex.image_id, given[str(ex.image_id)], ex.captions)
    in_split = {str(ex.image_id) for ex in examples}
    return out, [k for k in given if k not in in_split]


def leave_one_out(examples: list[Example]) -> Captions:
    """The human ceiling's corpus: each reference as hypothesis against the image's others."""
    out = Captions()
    for ex in examples:
        if len(ex.captions) < 2:
            out.skip(NO_REFERENCES if not ex.captions else ONE_REFERENCE, ex.image_id)
            continue
        for j, held_out in enumerate(ex.captions):
            out.add(f"{ex.image_id}#{j}", held_out, ex.captions[:j] + ex.captions[j + 1:])
    return out


# -- scoring and the report -------------------------------------------------------------
def evaluate(data, split=None, images=None, *, checkpoint=None, device="auto", precision=None, engine=None,
             results=None,
             human=False, coco: bool | None = None, out=None, batch_size: int = 32, workers: int = 0,
             progress: bool = True,
             **decode_options) -> dict:
    """Score one split and return the report (see `format_report`); writes files into `out` if given.

    coco=None computes the coco-caption metrics when Java is found; True requires them.
    """
    if results and human:
        raise ValueError("choose one of results (score a results file) and human (the human ceiling)")
    fmt, examples = load_examples(data, split, images, need_images=not (results or human))
    report = {"mode": "human" if human else "results" if results else "model", "data": str(data),
              "format": fmt, "split": split}
    if human:
        captions = leave_one_out(examples)
    elif results:
        captions, unknown = read_results(results, examples)
        report["results"] = str(results)
        if unknown:
            report["results_not_in_split"] = len(unknown)
    else:
        from .inference import Captioner

        captioner = Captioner.load(checkpoint, device=device, precision=precision, engine=engine)
        options = captioner.options(**decode_options)
        report["checkpoint"] = str(checkpoint) if checkpoint else "default model"
        report["decode"] = {**{k: getattr(options, k) for k in ("method", "beam_size", "max_len", "length_penalty",
                                                                "alpha", "precision")}, "engine": captioner.engine}
        captions = caption_split(captioner, examples, batch_size, workers, progress, options)

    skipped = {reason: len(ids) for reason, ids in captions.skipped.items()}
    if not captions.ids:
        raise ValueError(f"no images left to score in {data} (split {split}); skipped: {skipped or 'none'}")
    report["n_images"] = len(examples) - sum(skipped.values())
    if human:
        report["n_hypotheses"] = len(captions.ids)
    report["skipped"] = skipped
    report["skipped_examples"] = {r: [str(i) for i in ids[:SHOW_SKIPPED]] for r, ids in captions.skipped.items()}
    report["empty_hypotheses"] = sum(not tokenize(h) for h in captions.hypotheses)
    report |= metrics.bleu(captions.hypotheses, captions.references)
    report["bleu_method"] = metrics.BLEU_METHOD
    report |= metrics.object_mentions(captions.hypotheses, captions.references)
    report["mention_method"] = metrics.MENTION_METHOD
    report |= metrics.diversity(captions.hypotheses, training_captions(data, fmt, split))

    if coco is None:
        coco = metrics.java_available()
        if not coco:
            report["coco_caption"] = "skipped: Java not found (the `java` command is needed)"
    if coco:
        report |= metrics.coco_caption(captions.hypotheses, captions.references)
        report["coco_method"] = metrics.COCO_METHOD
        report["spice"] = metrics.SPICE_NOTE
    if out:
        report["files"] = write_outputs(out, captions, report, with_results=not human)
    return report


def write_outputs(out: str | Path, captions: Captions, report: dict, with_results: bool = True) -> dict:
    """results.json (COCO results), per_image.csv and scores.json in `out`; returns their paths."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    files = {}
    if with_results:
        rows = [{"image_id": i, "caption": h} for i, h in zip(captions.ids, captions.hypotheses)]
        files["results"] = _write(out / "results.json", json.dumps(rows, indent=1) + "\n")
    buf = io.StringIO()
    writer = csv.writer(buf)
    writer.writerow(["image_id", "hypothesis", "references", "bleu1", "bleu2", "bleu3", "bleu4"])
    for i, h, refs in zip(captions.ids, captions.hypotheses, captions.references):
        s = metrics.sentence_bleu(h, refs)
        # References as a JSON list: any caption text survives the round trip.
        writer.writerow([i, csv_text(h), json.dumps(refs), *(f"{s[f'bleu{n}']:.2f}" for n in range(1, 5))])
    files["per_image"] = _write(out / "per_image.csv", buf.getvalue())
    files["scores"] = str(out / "scores.json")
    _write(out / "scores.json", json.dumps({**report, "files": files, "per_image_bleu": metrics.SENTENCE_BLEU_METHOD},
                                           indent=1) + "\n")
    return files


def _write(path: Path, text: str) -> str:
    return str(write_atomic(path, text))  # an interrupted run never leaves half a file over a previous one


LABELS = {"bleu1": "BLEU-1", "bleu2": "BLEU-2", "bleu3": "BLEU-3", "bleu4": "BLEU-4", "coco_bleu1": "BLEU-1",
          "coco_bleu2": "BLEU-2", "coco_bleu3": "BLEU-3", "coco_bleu4": "BLEU-4", "meteor": "METEOR",
          "rouge_l": "ROUGE-L", "cider": "CIDEr"}


def format_report(r: dict) -> str:
    where = f"{r['format']} {r['split'] or ''} ({r['data']})".replace("  ", " ")
    what = {"model": "captioned by the model", "results": f"captions from {r.get('results')}",
            "human": "human ceiling: each reference vs the image's other references"}[r["mode"]]
    lines = [f"{where}: {r['n_images']} images scored, {what}"]
    if r["mode"] == "human":
        lines.append(f"  {r['n_hypotheses']} (image, held-out reference) pairs scored as one corpus")
    if "decode" in r:
        lines.append(f"  model: {r['checkpoint']}; " + ", ".join(f"{k} {v}" for k, v in r["decode"].items()))
    for reason, n in r["skipped"].items():
        names = ", ".join(r["skipped_examples"][reason]) + (", ..." if n > SHOW_SKIPPED else "")
        lines.append(f"  {n} image{'s' * (n != 1)} skipped: {reason} ({names})")
    if r.get("results_not_in_split"):
        lines.append(f"  {r['results_not_in_split']} captions in the results file are for images not in this "
                     "split: ignored")
    if r["empty_hypotheses"]:
        lines.append(f"  {r['empty_hypotheses']} empty hypotheses (kept: they match nothing)")
    lines += ["", f"BLEU ({r['bleu_method']}):", "  " + _row(r, ["bleu1", "bleu2", "bleu3", "bleu4"])]
    lines.append(f"object mentions ({r['mention_method']}):")
    lines.append(f"  precision {r['mention_precision']:.2f}  recall {r['mention_recall']:.2f}  "
                 f"F1 {r['mention_f1']:.2f}  ({r['mention_hits']} named of {r['mention_gold']} objects in "
                 f"the references; {r['mention_predicted']} named in all)")
    verbatim = (f", {r['verbatim_train_pct']:.1f}% verbatim in the training captions"
                if "verbatim_train_pct" in r else "")
    lines.append(f"diversity: {r['vocab_used']} words used, {r['distinct_pct']:.1f}% distinct captions{verbatim}, "
                 f"mean length {r['mean_length']:.1f} words")
    if "coco_method" in r:
        lines += [f"coco-caption ({r['coco_method']}):", "  " + _row(r, metrics.COCO_KEYS), f"  {r['spice']}"]
    elif "coco_caption" in r:
        lines.append(f"coco-caption metrics {r['coco_caption']}")
    if "files" in r:
        lines.append("wrote " + ", ".join(r["files"].values()))
    return "\n".join(lines)


def _row(r: dict, keys: list[str]) -> str:
    return "  ".join(f"{LABELS[k]} {r[k]:.2f}" for k in keys)
