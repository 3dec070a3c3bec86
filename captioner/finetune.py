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
  5. choose the model to keep on the line between OUT/start.pt and the fine-tuned model
     (OUT/finetuned.pt), WiSE-FT style (`interpolation`): the best validation CIDEr-D whose
     loss on the starting model's own dev split stays within the forgetting budget; without
     that dev split, a fixed point (`UNMEASURED_ALPHA`);
  6. report both sides before and after: validation and the starting model's dev split.
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
from tqdm import tqdm

from . import checkpoint
from .config import Config, DataConfig, TrainConfig
from .data import FORMATS, Example, detect_format, load_split
from .evaluate import MISSING_FILE, NO_REFERENCES, SHOW_SKIPPED, UNREADABLE, decode_features
from .features import StaleCache, extract_all, open_features
from .images import ImageError, load_image
from .inference import DEFAULT_CHECKPOINT, Captioner
from .interpolation import ALPHAS, CIDER_PER_BLEU, Point, choose, forgetting, interpolate
from .metrics import CiderD, bleu
from .train import train
from .vocab import Vocab, tokenize

# The point kept when the starting model's dev data is absent (so forgetting cannot be measured):
# on coco_mini_train the budget of 1.0 chose alpha 0.3 both from the shipped model (Flickr8k dev BLEU-4
# -0.74, CIDEr-D -2.21) and from its file before the transferred nouns (-0.73, -1.55).
UNMEASURED_ALPHA = 0.3


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
    # BLEU-4 points the starting model's own dev split may lose (CIDEr-D: CIDER_PER_BLEU times as many);
    # inf: the best new-domain point, whatever it forgets
    forget_budget: float = 1.0


@dataclass
class Report:
    skipped: dict[str, list] = field(default_factory=dict)  # reason -> image ids
    train_images: int = 0
    val_images: int = 0
    new_words: list[str] = field(default_factory=list)
    before: dict[str, float] = field(default_factory=dict)
    after: dict[str, float] = field(default_factory=dict)  # the chosen point (OUT/best.pt)
    finetuned: dict[str, float] = field(default_factory=dict)  # the fine-tuned model alone (OUT/finetuned.pt)
    # the starting model's dev split: before, after, finetuned; or why it was not measured
    base_dev: dict | str = "not measured"
    chosen: str = "teacher forcing"  # which training stage gave OUT/finetuned.pt
    alpha: float = 1.0  # the chosen point: 0 the starting model, 1 the fine-tuned one
    why: str = ""
    # the standard error of the chosen point's validation CIDEr-D change (gain_error); None: no point was
    # kept, or one validation photo
    gain_error: float | None = None
    points: list[dict] = field(default_factory=list)  # every point tried: alpha, new (and old) scores


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
    val = set(hash_order(examples)[:n_val])
    return [ex for i, ex in enumerate(examples) if i not in val], [ex for i, ex in enumerate(examples) if i in val]


def hash_order(examples: list[Example]) -> list[int]:
    """The examples' indices by the SHA-1 of their image names: an order that depends on the names alone."""
    return sorted(range(len(examples)), key=lambda i: hashlib.sha1(str(examples[i].image_id).encode()).hexdigest())


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
    return score_captions(decode_features(captioner, feats), [ex.captions for ex in examples])


def score_captions(hyps: list[str], refs: list[list[str]]) -> dict[str, float]:
    """`scores` of captions already written: corpus BLEU-4 and mean CIDEr-D (`ciders`), 0-100."""
    return {"bleu4": bleu(hyps, refs)["bleu4"], "cider": float(ciders(hyps, refs).mean())}


def ciders(hyps: list[str], refs: list[list[str]]) -> np.ndarray:
    """Each caption's CIDEr-D (0-100), the idf from all these references."""
    cider = CiderD([[tokenize(r) for r in rs] for rs in refs])
    return 100 * np.array([cider.score(tokenize(h), i) for i, h in enumerate(hyps)])


def gain_error(before: Captioner, after: Captioner, feats, examples: list[Example]) -> float | None:
    """The standard error of the validation CIDEr-D change from `before` to `after`, paired by photo: on a
    few dozen photos one caption moves the mean by points, and the report says how far to trust it."""
    refs = [ex.captions for ex in examples]
    return paired_error(ciders(decode_features(after, feats), refs), ciders(decode_features(before, feats), refs))


def paired_error(after: np.ndarray, before: np.ndarray) -> float | None:
    """The standard error of the mean of after - before, photo by photo (None for fewer than 2 photos)."""
    change = np.asarray(after) - np.asarray(before)
    return float(change.std(ddof=1) / math.sqrt(len(change))) if len(change) > 1 else None


# -- the flow -----------------------------------------------------------------------------
def finetune(data: str | Path, out: str | Path, *, fmt: str = "auto", images: str | Path | None = None,
             val: str | Path | None = None, settings: Settings | None = None) -> Report:
    """Fine-tune on a captioned photo collection; writes OUT/best.pt (the chosen point between the
    starting and the fine-tuned model), OUT/finetuned.pt and OUT/report.json."""
    s, out = settings or Settings(), Path(out)
    if (out / "best.pt").exists():
        raise ValueError(f"{out} already holds a fine-tuned model (best.pt): choose another --out")
    report = Report()
    data_cfg, train_ex, val_ex = _examples(data, fmt, images, val, s.val_fraction, report)
    out.mkdir(parents=True, exist_ok=True)
    write_jsonl(train_ex, data_cfg.images, out / "train.jsonl")
    write_jsonl(val_ex, data_cfg.images, out / "val.jsonl")
    base, base_cfg, min_count = _start_model(train_ex, out, s, report)
    cfg = _run_config(base_cfg, data_cfg.images, out, min_count, s)
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
    (out / "best.pt").replace(out / "finetuned.pt")
    _choose_point(out, base_cfg, before, (val_feats, val_ex), s, report)
    (out / "report.json").write_text(json.dumps(report.__dict__, indent=1, default=str) + "\n")
    return report


def _examples(data, fmt, images, val, val_fraction: float,
              report: Report) -> tuple[DataConfig, list[Example], list[Example]]:
    """(the data's config, the usable training examples, the validation ones)."""
    data_cfg, train_ex = load_captions(data, fmt, images)
    train_ex = usable(train_ex, report.skipped)
    if val is not None:
        _, val_ex = load_captions(val, fmt, images)
        val_ex = usable(val_ex, report.skipped)
        if not train_ex or not val_ex:
            raise ValueError(f"no usable images left in {data if not train_ex else val}; skipped: {_counts(report)}")
    else:
        train_ex, val_ex = split_by_image(train_ex, val_fraction)
    report.train_images, report.val_images = len(train_ex), len(val_ex)
    return data_cfg, train_ex, val_ex


def _start_model(train_ex: list[Example], out: Path, s: Settings, report: Report) -> tuple[dict, Config, int]:
    """The starting model with the new words (saved as OUT/start.pt; the new words go into `report`)
    and its own data's features cached: (its payload, its config, the new words' min_count)."""
    base = checkpoint.load(s.start or DEFAULT_CHECKPOINT)
    if isinstance(base["decoder"], list):
        raise ValueError("fine-tuning starts from a single model, not an ensemble")
    base_cfg = Config.from_dict(base["config"])
    # Its encoder stays frozen here, whichever way it was trained.
    base_cfg.model = replace(base_cfg.model, finetune_encoder=False)
    base_cfg.train = replace(base_cfg.train, encoder_top_blocks=0, device=s.device)
    if "encoder" in base:
        # A fine-tuned encoder (the shipped model's): the features cached for the starting model's own
        # data (replay, and the forgetting check) must be its own, not the pretrained encoder's.
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
    return base, base_cfg, min_count


def _run_config(base_cfg: Config, image_dir: str, out: Path, min_count: int, s: Settings) -> Config:
    """The training run's config: the starting model's model and decoding, the user's data."""
    return Config(model=base_cfg.model, decode=base_cfg.decode,
                  data=DataConfig(format="jsonl", root=str(out / "train.jsonl"), images=image_dir,
                                  dev_split="val", dev_annotations=str(out / "val.jsonl"), min_count=min_count,
                                  max_caption_len=base_cfg.data.max_caption_len,
                                  feature_cache=str(out / "features"), feature_dtype=base_cfg.data.feature_dtype),
                  train=TrainConfig(out_dir=str(out), init_from=str(out / "start.pt"), epochs=s.epochs,
                                    patience=s.patience, lr=s.lr, batch_size=s.batch_size, schedule="constant",
                                    replay=s.replay, seed=s.seed, device=s.device, log_every=1))


def _choose_point(out: Path, base_cfg: Config, before: Captioner, new_data, s: Settings, report: Report) -> None:
    """Scores the points between OUT/start.pt and OUT/finetuned.pt, chooses one by the forgetting
    budget (`interpolation.choose`), writes it as OUT/best.pt and records all of it in `report`."""
    start, tuned = checkpoint.load(out / "start.pt"), checkpoint.load(out / "finetuned.pt")
    n_old = len(start["vocab"]["itos"]) - len(report.new_words)
    cap = Captioner.from_payload(tuned, device=s.device)  # one model; each point loads its weights into it

    def at(alpha: float) -> Captioner:
        cap.decoder.load_state_dict(interpolate(start["decoder"], tuned["decoder"], alpha, n_old))
        return cap

    points = [Point(a, scores(at(a), *new_data)) for a in tqdm(ALPHAS, desc="points on validation", unit="point")]
    old_data = _base_dev(base_cfg, before)
    if isinstance(old_data, str):
        report.base_dev = old_data
        chosen = (max(points, key=lambda p: p.new["cider"]) if math.isinf(s.forget_budget)
                  else next(p for p in points if p.alpha == UNMEASURED_ALPHA))
    else:
        def score_old(alpha: float) -> dict[str, float]:
            print(f"scoring alpha {alpha:.1f} on the starting model's dev ({report.base_dev['data']})")
            return scores(at(alpha), *old_data)

        report.base_dev = {"data": f"{base_cfg.data.root} {base_cfg.data.dev_split}",
                           "before": scores(before, *old_data)}
        chosen = choose(points, score_old, report.base_dev["before"], s.forget_budget)
        points[-1].old = points[-1].old or score_old(1.0)  # the fine-tuned model alone, for the report
    report.alpha, report.why = _why(chosen, report, s.forget_budget)
    if chosen is None:  # nothing within the budget: the starting model itself, new words at <unk>'s share
        shutil.copyfile(out / "start.pt", out / "best.pt")
        report.after = report.before
    else:
        checkpoint.save(out / "best.pt", config=tuned["config"], vocab=tuned["vocab"], encoder=tuned.get("encoder"),
                        decoder=interpolate(start["decoder"], tuned["decoder"], chosen.alpha, n_old))
        report.after = chosen.new
        report.gain_error = gain_error(before, at(chosen.alpha), *new_data)
    if isinstance(report.base_dev, dict):
        report.base_dev["after"] = report.base_dev["before"] if chosen is None else chosen.old
        report.base_dev["finetuned"] = points[-1].old
    report.finetuned = points[-1].new
    report.points = [p.__dict__ for p in points]


def _why(chosen: Point | None, report: Report, budget: float) -> tuple[float, str]:
    """(the chosen alpha, the reason in words)."""
    if math.isinf(budget):
        return chosen.alpha, "the best validation CIDEr-D (--forget-budget inf: the old data is not weighed)"
    if isinstance(report.base_dev, str):
        return chosen.alpha, (f"fixed: the starting model's dev data is not here, so what it forgets cannot be "
                              f"measured; alpha {UNMEASURED_ALPHA} is the point measured to keep the old world on "
                              f"COCO-MINI from the shipped model (docs/finetune.md)")
    limits = f"BLEU-4 drop within --forget-budget {budget:g} and CIDEr-D drop within {budget * CIDER_PER_BLEU:g}"
    if chosen is None:
        return 0.0, f"the starting model: no point tried kept the starting model's dev {limits}"
    bleu_drop, cider_drop = forgetting(chosen.old, report.base_dev["before"])
    return chosen.alpha, (f"the best validation CIDEr-D of the {len(ALPHAS)} points whose starting model's dev "
                          f"{limits} (drops here: BLEU-4 {bleu_drop:.2f}, CIDEr-D {cider_drop:.2f})")


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


def _base_dev(base_cfg: Config, before: Captioner):
    """The starting model's own dev split as (features, examples), where it can be read; else why not."""
    d = base_cfg.data
    try:
        dev = load_split(d, d.dev_split)
        return open_features(d.feature_cache, d.dev_split, dev, before.encoder), dev
    except (StaleCache, FileNotFoundError, ValueError) as e:
        return f"not measured: {str(e).splitlines()[0]}"


def _counts(report: Report) -> str:
    return ", ".join(f"{len(ids)} {reason}" for reason, ids in report.skipped.items()) or "none"


def format_report(r: Report, out: str | Path) -> str:
    lines = [f"fine-tuned on {r.train_images} images, validated on {r.val_images}; best model: {out}/best.pt"]
    for reason, ids in r.skipped.items():
        names = ", ".join(str(i) for i in ids[:SHOW_SKIPPED]) + (", ..." if len(ids) > SHOW_SKIPPED else "")
        lines.append(f"  {len(ids)} image{'s' * (len(ids) != 1)} skipped: {reason} ({names})")
    lines.append(f"new words ({len(r.new_words)}): {' '.join(r.new_words) or 'none'}")
    dev = r.base_dev if isinstance(r.base_dev, dict) else {}
    rows = [("starting model", r.before, dev.get("before")),
            (f"fine-tuned ({r.chosen}, {out}/finetuned.pt)", r.finetuned, dev.get("finetuned")),
            (f"chosen: alpha {r.alpha:.1f} ({out}/best.pt)", r.after, dev.get("after"))]
    width = max(len(name) for name, _, _ in rows)
    old_name = f"starting model's dev ({dev['data']})" if dev else "starting model's dev"
    lines.append(f"{'':{width}}  validation       {old_name}")
    lines.append(f"{'':{width}}  BLEU-4  CIDEr-D  BLEU-4  CIDEr-D")
    for name, new, old in rows:
        old_cols = f"{old['bleu4']:6.2f}  {old['cider']:7.2f}" if old else "     -        -"
        lines.append(f"{name:{width}}  {new['bleu4']:6.2f}  {new['cider']:7.2f}  {old_cols}")
    if not dev:
        lines.append(f"starting model's dev split {r.base_dev}")
    if r.gain_error is not None:
        lines.append(f"validation CIDEr-D change {r.after['cider'] - r.before['cider']:+.2f} ± {r.gain_error:.2f} "
                     f"(standard error over the {r.val_images} validation photos: a change within about twice it "
                     f"may be noise)")
    lines.append(f"alpha {r.alpha:.1f} (0: the starting model, 1: the fine-tuned one): {r.why}")
    return "\n".join(lines)
