"""Fine-tuning a trained captioner on a user's own captioned photos, new words included.

    captioner finetune --data my_captions.csv --images my_photos/ --out runs/mine

The steps, each done by the module that owns it:
  1. load the captions (any of `data.FORMATS`); images that are missing or unreadable are
     skipped, counted and named in the report;
  2. split off a validation part by image (deterministic: the images whose names hash
     lowest), unless a validation file is given; both parts are written to OUT as JSONL, so
     OUT/config.yaml reruns the training with `captioner train`;
  3. extend the starting model's vocabulary with the new words (`grow_vocabulary`) and save
     that model as OUT/start.pt;
  4. cache both parts' features (`features.extract_all`), then `train.train`: teacher forcing
     from OUT/start.pt, early stop on validation BLEU-4, optionally a share of the starting
     model's own training data in the batches (`train.replay`), optionally self-critical
     epochs after;
  5. report the validation scores before and after (and the starting model's own dev
     split before and after, when its features are cached: what was forgotten).
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import torch
import yaml

from . import checkpoint
from .config import Config, DataConfig, TrainConfig
from .data import FORMATS, Example, detect_format, load_split
from .evaluate import MISSING_FILE, NO_REFERENCES, SHOW_SKIPPED, UNREADABLE, decode_features
from .features import StaleCache, extract_all, open_features
from .images import ImageError, load_image
from .inference import DEFAULT_CHECKPOINT, Captioner
from .metrics import CiderD, bleu
from .train import train
from .vocab import Vocab, tokenize


@dataclass
class Settings:
    """What `captioner finetune` takes besides the data; the defaults suit a few hundred photos."""

    start: str | None = None  # checkpoint to start from (None: the shipped model)
    epochs: int = 15
    patience: int = 4  # epochs without a validation BLEU-4 gain before stopping
    lr: float = 5e-4
    batch_size: int = 32
    min_count: int | None = None  # None: the starting model's data.min_count
    replay: float = 0.0  # share of the training captions drawn from the starting model's own training data
    self_critical: int = 0  # >0: this many self-critical (CIDEr-D) epochs after teacher forcing
    val_fraction: float = 0.2
    device: str = "auto"
    seed: int = 0
    workers: int = 2  # image-decoding processes for feature extraction


@dataclass
class Report:
    skipped: dict[str, list] = field(default_factory=dict)  # reason -> image ids
    train_images: int = 0
    val_images: int = 0
    new_words: list[str] = field(default_factory=list)
    before: dict[str, float] = field(default_factory=dict)
    after: dict[str, float] = field(default_factory=dict)
    base_dev: dict[str, dict[str, float]] | str = "not measured"  # the starting model's dev split: before, after
    chosen: str = "teacher forcing"  # which stage gave OUT/best.pt


# -- data ---------------------------------------------------------------------------------
def load_captions(data: str | Path, fmt: str = "auto",
                  images: str | Path | None = None) -> tuple[DataConfig, list[Example]]:
    """A caption file or folder of any format, as (the config that reads it, its examples). Multi-split
    datasets (Flickr8k, Karpathy) give their train split."""
    fmt = detect_format(data) if fmt == "auto" else fmt
    if fmt not in FORMATS:
        raise ValueError(f"unknown data format {fmt!r}; choose auto or one of {', '.join(FORMATS)}")
    if fmt == "flickr8k":
        images = Path(data) / "Flicker8k_Dataset"
    elif images is None:
        raise ValueError(f"{data} is a {fmt} file: give --images, the folder its image paths are relative to")
    cfg = DataConfig(format=fmt, root=str(data), images=str(images))
    return cfg, load_split(cfg, "train")


def usable(examples: list[Example], skipped: dict[str, list]) -> list[Example]:
    """The examples whose image opens and that have captions; the others are recorded in `skipped`."""
    out = []
    for ex in examples:
        reason = NO_REFERENCES if not ex.captions else MISSING_FILE if not ex.path.is_file() else None
        if reason is None:
            try:
                load_image(ex.path, draft_size=64)
            except ImageError:
                reason = UNREADABLE
        if reason:
            skipped.setdefault(reason, []).append(ex.image_id)
        else:
            out.append(ex)
    return out


def split_by_image(examples: list[Example], val_fraction: float) -> tuple[list[Example], list[Example]]:
    """(train, val): the images whose names hash lowest go to validation, so the split depends only
    on the names, not on file order, and adding photos moves none of the others."""
    if not 0 < val_fraction < 1:
        raise ValueError(f"--val-fraction must be between 0 and 1, got {val_fraction}")
    if len(examples) < 2:
        raise ValueError(f"{len(examples)} usable image(s): at least 2 are needed to split off a validation part")
    n_val = min(len(examples) - 1, max(1, round(val_fraction * len(examples))))
    rank = sorted(range(len(examples)), key=lambda i: hashlib.sha1(str(examples[i].image_id).encode()).hexdigest())
    val = set(rank[:n_val])
    return [ex for i, ex in enumerate(examples) if i not in val], [ex for i, ex in enumerate(examples) if i in val]


def write_jsonl(examples: list[Example], images: str | Path, path: Path) -> None:
    with open(path, "w", encoding="utf-8") as f:
        for ex in examples:
            f.write(json.dumps({"image": os.path.relpath(ex.path, images), "captions": ex.captions}) + "\n")


# -- the model ------------------------------------------------------------------------------
def grow_vocabulary(decoder: dict[str, torch.Tensor], old: Vocab, new: Vocab,
                    like: dict[str, str] | None = None) -> dict[str, torch.Tensor]:
    """The decoder's weights for `new`, which is `old` with k words appended (`Vocab.extend`).

    Every old row stays as it was, bit for bit. A new word's embedding and output rows start as
    copies of <unk>'s: the starting model saw these words as <unk> in training, so <unk>'s rows
    are what it already knows of them (random rows would be noise, and the mean of all rows an
    average of unrelated words). Its output bias starts at <unk>'s minus log k, so the k new words
    together start with the probability the model gives <unk>, and the old words keep their order.

    like: new word -> an old word whose rows it takes instead (DCC's direct transfer, Hendricks et
    al. 2016: "zebra" is used like "horse"), bias minus log 2, so the old word stays ahead of it and
    a caption no constraint asks for keeps the old word.
    """
    if new.itos[:len(old)] != old.itos:
        raise ValueError("the new vocabulary must start with the old one (see Vocab.extend)")
    like = like or {}
    unknown = sorted(w for w, src in like.items() if w not in new.stoi or new.stoi[w] < len(old) or src not in old.stoi)
    if unknown:
        raise ValueError(f"transfer needs new words taking the rows of old ones: {unknown} are not")
    added = new.itos[len(old):]
    if not added:
        return dict(decoder)
    k = len(added) - len(like)
    source = torch.tensor([old.stoi[like[w]] if w in like else old.unk for w in added], dtype=torch.long)
    grown = dict(decoder)
    for name in ("embed.weight", "out.weight"):
        grown[name] = torch.cat([decoder[name], decoder[name][source]])
    b = decoder["out.bias"]
    offset = torch.tensor([math.log(2) if w in like else math.log(k) for w in added], dtype=b.dtype)
    grown["out.bias"] = torch.cat([b, b[source] - offset])
    return grown


def scores(captioner: Captioner, feats, examples: list[Example]) -> dict[str, float]:
    """BLEU-4 (`metrics.bleu`) and CIDEr-D (`metrics.CiderD`, idf from these references; 0-100
    like coco-caption's) of the model's captions of cached features. No Java needed."""
    hyps = decode_features(captioner, feats)
    refs = [ex.captions for ex in examples]
    cider = CiderD([[tokenize(r) for r in rs] for rs in refs])
    return {"bleu4": bleu(hyps, refs)["bleu4"],
            "cider": 100 * float(np.mean([cider.score(tokenize(h), i) for i, h in enumerate(hyps)]))}


# -- the flow -----------------------------------------------------------------------------
def finetune(data: str | Path, out: str | Path, *, fmt: str = "auto", images: str | Path | None = None,
             val: str | Path | None = None, settings: Settings | None = None) -> Report:
    """Fine-tune on a captioned photo collection; writes OUT/best.pt (and OUT/report.json)."""
    s, out = settings or Settings(), Path(out)
    if (out / "best.pt").exists():
        raise ValueError(f"{out} already holds a fine-tuned model (best.pt): choose another --out")
    report = Report()
    data_cfg, train_ex = load_captions(data, fmt, images)
    train_ex = usable(train_ex, report.skipped)
    if val is not None:
        _, val_ex = load_captions(val, fmt, images)
        val_ex = usable(val_ex, report.skipped)
        if not train_ex or not val_ex:
            raise ValueError(f"no usable images left in {data if not train_ex else val}; skipped: {_counts(report)}")
    else:
        train_ex, val_ex = split_by_image(train_ex, s.val_fraction)
    report.train_images, report.val_images = len(train_ex), len(val_ex)
    out.mkdir(parents=True, exist_ok=True)
    image_dir = data_cfg.images
    write_jsonl(train_ex, image_dir, out / "train.jsonl")
    write_jsonl(val_ex, image_dir, out / "val.jsonl")

    base = checkpoint.load(s.start or DEFAULT_CHECKPOINT)
    if isinstance(base["decoder"], list):
        raise ValueError("fine-tuning starts from a single model, not an ensemble")
    base_cfg = Config.from_dict(base["config"])
    # Its encoder stays frozen here, whichever way it was trained.
    base_cfg.model = replace(base_cfg.model, finetune_encoder=False)
    base_cfg.train = replace(base_cfg.train, encoder_top_blocks=0, device=s.device)
    if "encoder" in base:
        # A fine-tuned encoder (the shipped model's): the features cached for the starting model's own
        # data (replay, and the forgetting report) must be its own, not the pretrained encoder's.
        base_cfg.data.feature_cache = str(out / "base_features")
    old = Vocab.from_dict(base["vocab"])
    min_count = base_cfg.data.min_count if s.min_count is None else s.min_count
    vocab = old.extend((c for ex in train_ex for c in ex.captions), min_count)
    report.new_words = vocab.itos[len(old):]
    start = out / "start.pt"
    checkpoint.save(start, config=base_cfg.to_dict(), vocab=vocab.to_dict(),
                    decoder=grow_vocabulary(base["decoder"], old, vocab), encoder=base.get("encoder"))
    if "encoder" in base:
        d = base_cfg.data
        try:
            extract_all(replace(base_cfg, train=replace(base_cfg.train, init_from=str(start))), num_workers=s.workers,
                        splits=[d.dev_split, *([d.train_split] if s.replay else [])])
        except (FileNotFoundError, ValueError, StaleCache) as e:  # not here: replay says so, the report skips it
            print(f"the starting model's own data was not cached ({str(e).splitlines()[0]})")

    cfg = Config(model=base_cfg.model, decode=base_cfg.decode,
                 data=DataConfig(format="jsonl", root=str(out / "train.jsonl"), images=image_dir,
                                 dev_split="val", dev_annotations=str(out / "val.jsonl"), min_count=min_count,
                                 max_caption_len=base_cfg.data.max_caption_len,
                                 feature_cache=str(out / "features"), feature_dtype=base_cfg.data.feature_dtype),
                 train=TrainConfig(out_dir=str(out), init_from=str(start), epochs=s.epochs, patience=s.patience,
                                   lr=s.lr, batch_size=s.batch_size, schedule="constant", replay=s.replay,
                                   seed=s.seed, device=s.device, log_every=1))
    (out / "config.yaml").write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))
    extract_all(cfg, num_workers=s.workers)
    val_ex = load_split(cfg.data, "val")  # as training reads it: ids are the paths in OUT/val.jsonl
    before = Captioner.from_payload(base, device=s.device)
    val_feats = open_features(cfg.data.feature_cache, "val", val_ex, before.encoder)
    report.before = scores(before, val_feats, val_ex)

    torch.manual_seed(s.seed)
    train(cfg)
    if s.self_critical:
        report.chosen = _self_critical(cfg, out, s)
    after = Captioner.load(out / "best.pt", device=s.device)
    report.after = scores(after, val_feats, val_ex)
    report.base_dev = _base_dev(base_cfg, before, after)
    (out / "report.json").write_text(json.dumps(report.__dict__, indent=1, default=str) + "\n")
    return report


def _self_critical(cfg: Config, out: Path, s: Settings) -> str:
    """Self-critical epochs (CIDEr-D reward) from the teacher-forced best; the better of the two on
    validation BLEU-4 becomes OUT/best.pt. Returns which one."""
    scst_out = out / "self_critical"
    scst_cfg = replace(cfg, train=replace(cfg.train, objective="scst", scst_reward="cider",
                                          init_from=str(out / "teacher_forcing.pt"), out_dir=str(scst_out),
                                          epochs=s.self_critical, lr=s.lr / 10, batch_size=max(1, s.batch_size // 2),
                                          patience=2))
    shutil.copyfile(out / "best.pt", out / "teacher_forcing.pt")
    train(scst_cfg)
    if _best_bleu4(scst_out) > _best_bleu4(out):
        shutil.copyfile(scst_out / "best.pt", out / "best.pt")
        return "self-critical"
    return "teacher forcing"


def _best_bleu4(run: Path) -> float:
    return max(json.loads(line)["bleu4"] for line in (run / "metrics.jsonl").read_text().splitlines())


def _base_dev(base_cfg: Config, before: Captioner, after: Captioner):
    """The starting model's own dev split, before and after: what fine-tuning made it forget."""
    d = base_cfg.data
    try:
        dev = load_split(d, d.dev_split)
        feats = open_features(d.feature_cache, d.dev_split, dev, before.encoder)
    except (StaleCache, FileNotFoundError, ValueError) as e:
        return f"not measured: {str(e).splitlines()[0]}"
    return {"data": f"{d.root} {d.dev_split}", "before": scores(before, feats, dev), "after": scores(after, feats, dev)}


def _counts(report: Report) -> str:
    return ", ".join(f"{len(ids)} {reason}" for reason, ids in report.skipped.items()) or "none"


def format_report(r: Report, out: str | Path) -> str:
    lines = [f"fine-tuned on {r.train_images} images, validated on {r.val_images}; best model: {out}/best.pt "
             f"({r.chosen})"]
    for reason, ids in r.skipped.items():
        names = ", ".join(str(i) for i in ids[:SHOW_SKIPPED]) + (", ..." if len(ids) > SHOW_SKIPPED else "")
        lines.append(f"  {len(ids)} image{'s' * (len(ids) != 1)} skipped: {reason} ({names})")
    lines.append(f"new words ({len(r.new_words)}): {' '.join(r.new_words) or 'none'}")
    lines.append(f"validation  BLEU-4 {r.before['bleu4']:.2f} -> {r.after['bleu4']:.2f}   "
                 f"CIDEr-D {r.before['cider']:.2f} -> {r.after['cider']:.2f}")
    if isinstance(r.base_dev, dict):
        b, a = r.base_dev["before"], r.base_dev["after"]
        lines.append(f"starting model's dev ({r.base_dev['data']})  BLEU-4 {b['bleu4']:.2f} -> {a['bleu4']:.2f}   "
                     f"CIDEr-D {b['cider']:.2f} -> {a['cider']:.2f}")
    else:
        lines.append(f"starting model's dev split {r.base_dev}")
    return "\n".join(lines)
