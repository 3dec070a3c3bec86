"""Training: teacher forcing on cached features (or images, when fine-tuning the encoder).

With `train.encoder_top_blocks: N` the encoder's last N blocks and head train too, from
the maps entering them, cached once per image like features (`Encoder.split`): a step
runs only those blocks and the decoder, never the whole CNN.

    captioner train --config configs/flickr8k_lite0.yaml [section.key=value ...]
    torchrun --nproc_per_node 2 -m captioner.cli train --config ...     # DistributedDataParallel

Each epoch: masked cross-entropy (or, with `train.objective: scst`, self-critical
BLEU from a trained checkpoint: captioner.scst) with Adam, gradient clipping and a
per-step LR schedule; then dev BLEU-4 on decoded captions (beam search, not teacher forcing)
decides `best.pt` and early stopping. `last.pt` carries optimizer, scheduler, every rank's
random generators (CUDA's too) and epoch so `--resume` continues exactly where the run
stopped. Under DDP each rank seeds its own generators (`rank_seed`), so ranks draw
different dropout masks.
"""
from __future__ import annotations

import json
import math
import os
import random
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from torch import nn
from torch.utils.data import DataLoader
from tqdm import tqdm

from . import checkpoint
from .config import Config, TrainConfig
from .data import CaptionDataset, ImageFiles, LengthBatches, collate, image_input, load_split, with_replay
from .decoder import Decoder, build_decoder, caption_loss
from .evaluate import evaluate_bleu
from .features import build_start_encoder, cached_part, open_features
from .hardware import check_bf16
from .inference import Captioner, resolve_device
from .scst import IndexedImages, reward_function, self_critical_loss
from .vocab import Vocab, tokenize


class Trainable(nn.Module):
    """What the optimizer sees: the decoder, plus the encoder when it is fine-tuned (or its top,
    which then reads cached maps instead of images)."""

    def __init__(self, decoder: Decoder, encoder: nn.Module | None):
        super().__init__()
        self.decoder, self.encoder = decoder, encoder

    def forward(self, inputs, tokens):
        feats = self.encoder(inputs) if self.encoder is not None else inputs
        return self.decoder(feats, tokens)


def lr_lambda(cfg, total_steps: int):
    t = cfg.train

    def f(step):
        if step < t.warmup_steps:
            return (step + 1) / t.warmup_steps
        if t.schedule == "cosine":
            progress = (step - t.warmup_steps) / max(1, total_steps - t.warmup_steps)
            return 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))
        if t.schedule == "step":
            return t.gamma ** (step // (t.step_size * max(1, total_steps // max(1, t.epochs))))
        if t.schedule == "constant":
            return 1.0
        raise ValueError(f"unknown schedule {t.schedule!r}; choose cosine, step or constant")

    return f


def rank_seed(seed: int, rank: int) -> int:
    """Each DDP rank's seed, so that ranks draw different dropout masks (DDP makes their
    initial weights equal anyway). Rank 0 keeps `seed`: a one-process run draws as before."""
    return seed if rank == 0 else int(np.random.SeedSequence([seed, rank]).generate_state(1)[0])


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)  # CUDA's generators too


def rng_state(device: torch.device) -> dict:
    """This process's random generators: Python, NumPy, torch's CPU one and, when training on CUDA, the device's."""
    state = {"torch": torch.get_rng_state(), "python": list(random.getstate()[1]),
             "numpy": torch.from_numpy(np.random.get_state()[1].astype(np.int64))}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def set_rng_state(s: dict, device: torch.device) -> None:
    torch.set_rng_state(s["torch"])
    random.setstate((3, tuple(s["python"]), None))
    np.random.set_state(("MT19937", s["numpy"].numpy().astype(np.uint32), 624, 0, 0.0))
    if device.type == "cuda" and "cuda" in s:
        torch.cuda.set_rng_state(s["cuda"], device)


def _all_rng_states(device: torch.device, distributed: bool) -> list[dict]:
    """Every rank's generators, rank by rank (a collective: all ranks call it)."""
    if not distributed:
        return [rng_state(device)]
    states = [None] * dist.get_world_size()
    dist.all_gather_object(states, rng_state(device))
    return states


def make_optimizer(params, t: TrainConfig, encoder_params=()) -> torch.optim.Adam:
    """Adam over the trainable weights, the encoder's at train.encoder_lr. The fused kernel updates
    them all in one pass: on CPU 5x faster than the per-tensor loop (4 vs 18 ms a step for the shipped decoder)."""
    groups = [{"params": [p for p in params if p.requires_grad]}]
    encoder_params = list(encoder_params)
    if encoder_params:
        groups.append({"params": encoder_params, "lr": t.encoder_lr})
    fused = groups[0]["params"][0].device.type in ("cpu", "cuda")
    return torch.optim.Adam(groups, lr=t.lr, weight_decay=t.weight_decay, fused=fused)


def _plot(history: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    epochs = [h["epoch"] for h in history]
    fig, ax1 = plt.subplots(figsize=(6, 3.5))
    if "train_loss" in history[0]:  # scst epochs log a reward instead
        ax1.plot(epochs, [h["train_loss"] for h in history], "o-", label="train loss")
    ax1.plot(epochs, [h["dev_loss"] for h in history], "s-", label="dev loss")
    ax1.set_xlabel("epoch")
    ax1.set_ylabel("cross-entropy")
    ax2 = ax1.twinx()
    ax2.plot(epochs, [h["bleu4"] for h in history], "^-", color="tab:green", label="dev BLEU-4")
    ax2.set_ylabel("dev BLEU-4")
    fig.legend(loc="upper center", ncol=3, fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def train(cfg: Config, resume: bool = False) -> Trainable:
    """Train, score dev BLEU-4 after every epoch, keep best.pt and last.pt; returns the trained model.

    Reads top to bottom: set up (devices, data, model, optimizer), restore a stopped run,
    then per epoch train, evaluate and log (rank 0), save, and stop early together."""
    t = cfg.train
    run = _setup(cfg, resume)
    progress = _restore(run)
    writer = _tensorboard(run.out) if run.main else None
    if run.main:
        run.out.mkdir(parents=True, exist_ok=True)
        print(f"train ({t.objective}): {len(run.train_ex)} images, {len(run.train_set)} items; dev: "
              f"{len(run.dev_ex)} images; vocab {len(run.vocab)}; decoder "
              f"{sum(p.numel() for p in run.decoder.parameters()) / 1e6:.2f}M params")
    for epoch in range(progress.epoch + 1, t.epochs + 1):
        if progress.bad_epochs >= t.patience or (t.max_steps and progress.step >= t.max_steps):
            break
        record = _train_epoch(run, epoch, progress)
        improved = False
        if run.main:
            record |= _evaluate_dev(run)
            improved = record["bleu4"] > progress.best
            progress.best, progress.bad_epochs = ((record["bleu4"], 0) if improved
                                                  else (progress.best, progress.bad_epochs + 1))
            _log(run, record, progress, writer)
        progress.epoch = epoch
        _save(run, progress, improved)
        if run.distributed:  # every rank follows rank 0's early-stopping decision
            flag = torch.tensor([progress.bad_epochs], device=run.device)
            dist.broadcast(flag, 0)
            progress.bad_epochs = int(flag.item())
    if writer:
        writer.close()
    if run.distributed:
        dist.destroy_process_group()
    return run.model


@dataclass
class _Run:
    """Everything a run sets up once: where it runs, its data, model and optimizer."""
    cfg: Config
    device: torch.device
    rank: int
    world: int
    state: dict | None  # last.pt's contents when resuming
    vocab: Vocab
    encoder: nn.Module
    decoder: nn.Module
    model: Trainable
    ddp_model: nn.Module
    train_ex: list
    dev_ex: list
    dev_src: object  # cached dev features, or the dev images when fine-tuning the encoder
    train_set: object
    batches: LengthBatches
    loader: DataLoader
    dev_loader: DataLoader
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LambdaLR
    reward: object = None  # scst: the reward function
    references: list | None = None  # scst with scst_xe_weight: the training captions as ids
    store_encoder: bool = False  # the encoder trains, or the run started from one fine-tuned before

    @property
    def main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world > 1

    @property
    def out(self) -> Path:
        return Path(self.cfg.train.out_dir)


@dataclass
class _Progress:
    epoch: int = 0  # the last finished epoch
    best: float = -1.0  # best dev BLEU-4 so far
    bad_epochs: int = 0  # epochs since it last improved
    step: int = 0
    history: list = field(default_factory=list)  # one record per epoch (metrics.jsonl)


def _check(cfg: Config) -> None:
    """The settings that contradict each other or name nothing, before anything is loaded."""
    t = cfg.train
    if t.objective not in ("xe", "scst"):
        raise ValueError(f"unknown objective {t.objective!r}; choose xe or scst")
    if t.precision not in ("fp32", "bf16"):
        raise ValueError(f"unknown precision {t.precision!r}; choose fp32 or bf16")
    if t.objective == "scst" and not t.init_from:
        raise ValueError("objective scst fine-tunes a trained model: set train.init_from to its checkpoint")
    if cfg.model.finetune_encoder and t.encoder_top_blocks:
        raise ValueError("model.finetune_encoder trains the whole encoder on images, train.encoder_top_blocks its "
                         "top on cached maps: choose one")


def _init_distributed(t: TrainConfig) -> tuple[torch.device, int, int]:
    """(device, rank, world size); under torchrun, the process group is started here."""
    device = resolve_device(t.device)
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return device, 0, 1
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    if device.type == "cuda":
        device = torch.device("cuda", int(os.environ["LOCAL_RANK"]))
        torch.cuda.set_device(device)  # where all_gather_object puts its buffers
    return device, dist.get_rank(), dist.get_world_size()


def _setup(cfg: Config, resume: bool) -> _Run:
    """In torchvision's order: the devices, the data (_load_data), the model, the loaders, the optimizer."""
    t = cfg.train
    _check(cfg)
    device, rank, world = _init_distributed(t)
    seed_everything(rank_seed(t.seed, rank))
    check_bf16(t.precision, device, "train.precision")
    state = checkpoint.load(Path(t.out_dir) / "last.pt") if resume else None
    init = checkpoint.load(t.init_from) if t.init_from and not state else None
    if init and isinstance(init["decoder"], list):
        raise ValueError(f"train.init_from={t.init_from} is an ensemble; start from one of its members' checkpoints")
    start = state or init
    data = _load_data(cfg, start, init)
    decoder = build_decoder(cfg.model, len(data.vocab), data.encoder.dim)
    model = Trainable(decoder, data.trained).to(device)
    if start:
        decoder.load_state_dict(start["decoder"])
    # The whole Lite net, fine-tuned, holds a classifier (_fc) that v never passes through: no gradient.
    ddp_model = (nn.parallel.DistributedDataParallel(model, find_unused_parameters=cfg.model.finetune_encoder)
                 if world > 1 else model)
    train_set, batches, loader, reward, references = _train_loader(cfg, data, rank, world)
    dev_loader = DataLoader(CaptionDataset(data.dev_ex, data.vocab, data.dev_src, cfg.data.max_caption_len),
                            batch_size=512, collate_fn=collate)
    trained = data.trained
    optimizer = make_optimizer(decoder.parameters(), t, trained.parameters() if trained is not None else ())
    total_steps = t.epochs * len(loader)  # max_steps only cuts a run short; the schedule stays the same
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(cfg, total_steps))
    return _Run(cfg=cfg, device=device, rank=rank, world=world, state=state, vocab=data.vocab, encoder=data.encoder,
                decoder=decoder, model=model, ddp_model=ddp_model, train_ex=data.train_ex, dev_ex=data.dev_ex,
                dev_src=data.dev_src, train_set=train_set, batches=batches, loader=loader, dev_loader=dev_loader,
                optimizer=optimizer, scheduler=scheduler, reward=reward, references=references,
                store_encoder=trained is not None or "encoder" in (start or {}))


@dataclass
class _Data:
    """What a run reads: the examples, their vocabulary, the encoder and what it gives the decoder."""
    vocab: Vocab
    encoder: nn.Module
    trained: nn.Module | None  # the part of the encoder that trains: all of it, its top, or None
    train_ex: list
    dev_ex: list
    train_src: object  # cached features (or maps below the top), or the images when the whole encoder trains
    dev_src: object


def _load_data(cfg: Config, start: dict | None, init: dict | None) -> _Data:
    """The splits, the vocabulary (the starting model's, else built from the training captions), the
    encoder, and each split's source; with train.replay, the starting model's own data mixed in."""
    t = cfg.train
    train_ex = load_split(cfg.data, cfg.data.train_split)
    dev_all = load_split(cfg.data, cfg.data.dev_split)
    dev_ex = dev_all[: t.dev_images] if t.dev_images else dev_all
    vocab = Vocab.from_dict(start["vocab"]) if start else Vocab.build(
        (c for ex in train_ex for c in ex.captions), cfg.data.min_count)
    encoder = build_start_encoder(cfg, start)
    if cfg.model.finetune_encoder:
        trained = encoder
        train_src, dev_src = (ImageFiles([ex.path for ex in exs], encoder.preprocess) for exs in (train_ex, dev_ex))
    else:
        cached, trained, cache = cached_part(cfg, encoder)
        train_src = open_features(cache, cfg.data.train_split, train_ex, cached)
        dev_src = open_features(cache, cfg.data.dev_split, dev_all, cached)[: len(dev_ex)]
    if trained is not None:
        trained.requires_grad_(True)
    if t.replay:
        if trained is not None or not t.init_from:
            raise ValueError("train.replay mixes in the cached features of train.init_from's own training data: "
                             "it needs init_from and a frozen encoder")
        base = Config.from_dict((init or checkpoint.load(t.init_from))["config"]).data
        replay_ex = load_split(base, base.train_split)
        replay_src = open_features(base.feature_cache, base.train_split, replay_ex, encoder)
        train_ex, train_src = with_replay(train_ex, train_src, replay_ex, replay_src, t.replay, t.seed)
    return _Data(vocab, encoder, trained, train_ex, dev_ex, train_src, dev_src)


def _train_loader(cfg: Config, data: _Data, rank: int, world: int):
    """(dataset, sampler, loader, reward, references): (features, caption) items for cross-entropy; for scst
    (input, index) items, whose reward (and, with scst_xe_weight, reference ids) is looked up by index."""
    t = cfg.train
    reward = references = None
    if t.objective == "scst":  # all "lengths" equal, so LengthBatches just shuffles (and shards)
        train_set, train_collate = IndexedImages(data.train_src), None
        lengths = [1] * len(train_set)
        reward = reward_function(t.scst_reward, [[tokenize(c) for c in ex.captions] for ex in data.train_ex])
        references = ([[data.vocab.encode(c, cfg.data.max_caption_len) for c in ex.captions] for ex in data.train_ex]
                      if t.scst_xe_weight else None)
    else:
        train_set = CaptionDataset(data.train_ex, data.vocab, data.train_src, cfg.data.max_caption_len)
        train_collate = collate
        lengths = [len(ids) for _, ids in train_set.pairs]
    batches = LengthBatches(lengths, t.batch_size, t.seed, rank, world)
    loader = DataLoader(train_set, batch_sampler=batches, collate_fn=train_collate, num_workers=t.num_workers)
    return train_set, batches, loader, reward, references


def _restore(run: _Run) -> _Progress:
    """Where a resumed run stopped (optimizer, schedule, random generators, counters); a new run's start."""
    if not run.state:
        return _Progress()
    ts = run.state["train_state"]
    run.optimizer.load_state_dict(ts["optimizer"])
    run.scheduler.load_state_dict(ts["scheduler"])
    states = ts["rng"] if isinstance(ts["rng"], list) else [ts["rng"]]  # a dict: saved by one process
    if len(states) == run.world:
        set_rng_state(states[run.rank], run.device)
    elif run.main:
        print(f"resume: last.pt holds the random state of {len(states)} processes, this run has {run.world}: "
              "it goes on from the seeds it started with, not exactly where the run stopped")
    return _Progress(ts["epoch"], ts["best"], ts["bad_epochs"], ts["step"], json.loads(ts["history"]))


def _train_epoch(run: _Run, epoch: int, progress: _Progress) -> dict:
    """One pass over the training batches (or up to max_steps); returns the epoch's record so far."""
    t, scst = run.cfg.train, run.cfg.train.objective == "scst"

    def step_loss(batch):  # (loss, the reward's score of the samples for scst, else None)
        if scst:
            inputs, idx = batch
            return self_critical_loss(run.ddp_model, inputs.to(run.device), idx.tolist(), run.reward, run.vocab,
                                      t.scst_samples, run.cfg.decode.max_len, run.references, t.scst_xe_weight)
        inputs, tokens, targets = batch
        return caption_loss(run.ddp_model(inputs.to(run.device), tokens.to(run.device)), targets.to(run.device),
                            t.label_smoothing), None

    # A frozen encoder is not part of `model`, so it stays in eval mode (a trained top always is).
    # scst samples and scores with one policy: no dropout.
    run.model.train(not scst)
    run.batches.set_epoch(epoch)
    tic, total, count = time.time(), 0.0, 0
    bar = tqdm(run.loader, desc=f"epoch {epoch}", disable=not run.main, leave=False)
    for batch in bar:
        # Weights and Adam stay fp32; bf16 only for the forward's matmuls (and the LSTM).
        with torch.autocast(run.device.type, torch.bfloat16, enabled=t.precision == "bf16"):
            loss, r = step_loss(batch)
        run.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if run.model.encoder is not None and epoch < t.unfreeze_epoch:
            # Not yet unfrozen: its gradients (all ranks have the same, after DDP's reduction) are dropped, so
            # they neither scale the decoder's clipping nor move the encoder or its Adam moments.
            for p in run.model.encoder.parameters():
                p.grad = None
        nn.utils.clip_grad_norm_(run.model.parameters(), t.grad_clip)
        run.optimizer.step()
        run.scheduler.step()
        progress.step += 1
        total, count = total + (r if scst else loss.item()), count + 1
        if progress.step % t.log_every == 0:
            bar.set_postfix({"reward" if scst else "loss": f"{total / count:.3f}",
                             "lr": f"{run.scheduler.get_last_lr()[0]:.2e}"})
        if t.max_steps and progress.step >= t.max_steps:
            break
    return {"epoch": epoch, "step": progress.step, "train_reward" if scst else "train_loss": total / max(1, count),
            "lr": run.scheduler.get_last_lr()[0], "epoch_seconds": round(time.time() - tic, 1)}


def _evaluate_dev(run: _Run) -> dict:
    """Dev loss (teacher forcing) and dev BLEU of decoded captions, through a Captioner as inference does."""
    run.model.eval()
    device = run.device
    with torch.inference_mode():
        dev_losses = [caption_loss(run.model(x.to(device), y.to(device)), z.to(device)).item()
                      for x, y, z in run.dev_loader]
    captioner = Captioner(run.encoder, run.decoder, run.vocab, run.cfg, device, engine="torch")  # weights change
    if run.model.encoder is not None:  # images, or the cached maps below the cut -> v
        with torch.inference_mode():
            batches = DataLoader(range(len(run.dev_src)), batch_size=64,
                                 collate_fn=lambda idx: torch.stack([image_input(run.dev_src, i) for i in idx]))
            dev_feats = torch.cat([run.model.encoder(x.to(device)).float() for x in batches]).cpu().numpy()
    else:
        dev_feats = run.dev_src
    return {"dev_loss": float(np.mean(dev_losses)), **evaluate_bleu(captioner, dev_feats, run.dev_ex)}


def _log(run: _Run, record: dict, progress: _Progress, writer) -> None:
    progress.history.append(record)
    print(json.dumps({k: round(v, 4) if isinstance(v, float) else v for k, v in record.items()}))
    with open(run.out / "metrics.jsonl", "a") as f:
        f.write(json.dumps(record) + "\n")
    if writer:
        for k, v in record.items():
            writer.add_scalar(k, v, record["epoch"])
    _plot(progress.history, run.out / "curve.png")


def _save(run: _Run, progress: _Progress, improved: bool) -> None:
    """best.pt when dev BLEU improved, and last.pt with what --resume needs (rank 0 writes)."""
    rngs = _all_rng_states(run.device, run.distributed)  # after rank 0's evaluation, which draws from them too
    if not run.main:
        return
    # A trained top's layers are the encoder's own: the whole encoder is stored, as when fine-tuning all of it.
    payload = dict(config=run.cfg.to_dict(), vocab=run.vocab.to_dict(), decoder=run.decoder.state_dict(),
                   encoder=run.encoder.state_dict() if run.store_encoder else None)
    if improved:
        checkpoint.save(run.out / "best.pt", **payload)
    train_state = {"optimizer": run.optimizer.state_dict(), "scheduler": run.scheduler.state_dict(),
                   "rng": rngs, "epoch": progress.epoch, "best": progress.best, "bad_epochs": progress.bad_epochs,
                   "step": progress.step, "history": json.dumps(progress.history)}
    checkpoint.save(run.out / "last.pt", **payload, train_state=train_state)


def _tensorboard(out: Path):
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:  # tensorboard is optional
        return None
    return SummaryWriter(str(out / "tb"))
