"""Experiment configuration: plain dataclasses loaded from one YAML file per experiment.

The whole `Config` is saved inside every checkpoint (as a dict), so a checkpoint
always says how it was made.
"""
from __future__ import annotations

import dataclasses
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import yaml


@dataclass
class ModelConfig:
    encoder: str = "efficientnet_lite0"  # a name in captioner.encoders.ENCODERS
    pretrained: bool = True  # False: random encoder weights (tests)
    finetune_encoder: bool = False  # True: images on the fly, encoder trained too
    cell: str = "lstm"  # lstm | gru | rnn
    inject: str = "every"  # every: W_iv·v in every step's gates; init: v only sets h0/c0
    attention: bool = False  # True: also soft attention over the encoder's regions (decoder.AttentionDecoder)
    embed_dim: int = 512
    hidden_dim: int = 512
    num_layers: int = 1
    feature_proj: int = 0  # >0: v is first projected to this size (Linear+ReLU)
    dropout: float = 0.5
    feature_dropout: float = 0.0


@dataclass
class DataConfig:
    format: str = "flickr8k"  # flickr8k | karpathy | coco | csv | jsonl
    root: str = "../shared/data/flickr8k"  # Flickr8k folder, or the annotation file
    images: str | None = None  # image folder (karpathy, coco, csv, jsonl)
    train_split: str = "train"
    dev_split: str = "dev"
    dev_annotations: str | None = None  # coco, csv, jsonl: the dev split's own captions file
    min_count: int = 5  # words seen fewer times become <unk>
    max_caption_len: int = 30  # training captions are cut to this many words
    feature_cache: str = "cache/features"  # where extract-features writes v per image
    feature_dtype: str = "float16"


@dataclass
class TrainConfig:
    out_dir: str = "runs/default"
    objective: str = "xe"  # xe: teacher-forced cross-entropy | scst: self-critical training (see captioner.scst)
    # bleu4 (sentence BLEU-4) | cider (CIDEr-D, idf from the training captions)
    scst_reward: str = "bleu4"
    init_from: str | None = None  # checkpoint whose weights and vocabulary start the run (scst fine-tuning)
    scst_samples: int = 5  # captions sampled per image for scst; batch_size then counts images
    scst_xe_weight: float = 0.0  # >0: scst also minimizes this much of the references' cross-entropy
    # >0: this share of the training captions is drawn from init_from's own training data (its config's
    # data section, cached features), so fine-tuning on new data forgets less of the old
    replay: float = 0.0
    precision: str = "fp32"  # fp32 | bf16: forward and loss under bf16 autocast (fast on AMX CPUs and recent GPUs)
    seed: int = 0
    device: str = "auto"
    epochs: int = 20
    batch_size: int = 128
    lr: float = 1e-3
    # >0: the encoder's last N blocks and its head convolution train too, on the maps entering them,
    # cached once per image (efficientnet_lite; 1 cuts at a 192x7x7 map, 5 at 112x14x14). A training
    # setting: the model it makes is the same architecture, its encoder stored in the checkpoint.
    encoder_top_blocks: int = 0
    encoder_lr: float = 1e-4  # the learning rate of the trained encoder (its top, or all of it with finetune_encoder)
    unfreeze_epoch: int = 1  # the first epoch in which the trained encoder (its top, or all of it) changes
    weight_decay: float = 0.0
    label_smoothing: float = 0.0
    grad_clip: float = 5.0
    schedule: str = "cosine"  # cosine | step | constant
    warmup_steps: int = 0
    step_size: int = 5  # epochs, for schedule=step
    gamma: float = 0.5
    patience: int = 4  # epochs without a dev BLEU-4 gain before stopping
    num_workers: int = 0
    max_steps: int = 0  # >0: stop after this many optimizer steps (tests, smoke runs)
    dev_images: int = 0  # >0: early-stop on this many dev images (faster epochs)
    log_every: int = 50


@dataclass
class DecodeConfig:
    """Decoding settings: the model's defaults (saved with it), and per call a checked copy of them
    (`replace`), which is what travels from the CLI, evaluation, caption-dir and the service down
    to the search."""

    method: str = "beam"  # beam | greedy | sample
    beam_size: int = 3
    n_best: int = 1  # hypotheses per image (beam only), best first
    max_len: int = 20
    length_penalty: str = "none"  # none | avg | wu
    alpha: float = 0.7  # exponent for the Wu et al. penalty
    temperature: float = 1.0  # sample: softmax temperature
    top_k: int = 0  # sample: >0 keeps only the k likeliest words
    # fp32 | bf16: the decoder's weights and matrix products in bf16 (gates, state and scores stay
    # fp32). Fast where the CPU has AMX or AVX512-BF16, or on a GPU; slow on CPUs without them.
    precision: str = "fp32"
    # What runs the frozen encoder: auto (onnxruntime on a CPU, torch on a GPU) | onnxruntime | torch.
    engine: str = "auto"
    # Guided beam search (constraints.py): the encoder's ImageNet tags of at least guide_threshold,
    # at most guide_max of them, are words the caption should name. Captions are ranked by their
    # score plus guide_weight times the probability of each tag they name, the unguided captions
    # among them: a confident tag is named unless the caption that names it reads much worse.
    # on | off. The defaults: docs/results.md's sweep on the development photos.
    guide: str = "on"
    guide_threshold: float = 0.2
    guide_max: int = 2
    guide_weight: float = 5.0

    def replace(self, **options) -> DecodeConfig:
        """A copy with `options` set (None keeps a setting), checked: a typo or a bad value fails here,
        at the top, not inside a search."""
        known = {f.name for f in dataclasses.fields(self)}
        unknown = set(options) - known
        if unknown:
            raise TypeError(f"unknown decoding option(s) {sorted(unknown)}; known: {sorted(known)}")
        new = dataclasses.replace(self, **{k: v for k, v in options.items() if v is not None})
        new.check()
        return new

    def check(self) -> None:
        def whole(name, low):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < low:
                raise ValueError(f"decoding option {name} must be an integer >= {low}, got {value!r}")

        if self.method not in DECODE_METHODS:
            raise ValueError(f"unknown decoding method {self.method!r}; choose from {', '.join(DECODE_METHODS)}")
        if self.length_penalty not in LENGTH_PENALTIES:
            raise ValueError(f"unknown length penalty {self.length_penalty!r}; "
                             f"choose from {', '.join(LENGTH_PENALTIES)}")
        whole("beam_size", 1)
        whole("max_len", 1)
        whole("n_best", 1)
        whole("top_k", 0)
        whole("guide_max", 0)
        if isinstance(self.guide, bool):  # YAML reads a bare on/off as a boolean
            self.guide = "on" if self.guide else "off"
        if self.guide not in ("on", "off"):
            raise ValueError(f"decoding option guide must be 'on' or 'off', got {self.guide!r}")
        if not 0.0 <= self.guide_threshold <= 1.0 or not self.guide_weight >= 0.0:
            raise ValueError("guide_threshold must be in [0, 1] and guide_weight >= 0")
        if self.method == "beam" and self.n_best > self.beam_size:
            raise ValueError(f"n_best ({self.n_best}) must not exceed beam_size ({self.beam_size})")
        if self.method != "beam" and self.n_best != 1:
            raise ValueError(f"n_best > 1 needs method='beam' (got method={self.method!r})")
        if not self.temperature > 0:
            raise ValueError("temperature must be > 0 (use method='greedy' for temperature 0)")


DECODE_METHODS = ("beam", "greedy", "sample")
LENGTH_PENALTIES = ("none", "avg", "wu")


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    decode: DecodeConfig = field(default_factory=DecodeConfig)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> Config:
        d = d or {}
        unknown = set(d) - {f.name for f in dataclasses.fields(cls)}
        if unknown:
            raise ValueError(f"unknown config section(s): {sorted(unknown)}")
        return cls(**{f.name: _section(f.name, d.get(f.name) or {}) for f in dataclasses.fields(cls)})


_SECTIONS = {"model": ModelConfig, "data": DataConfig, "train": TrainConfig, "decode": DecodeConfig}


# Keys that no longer mean anything: dropped with a warning, so checkpoints and configs written with them
# still load (guide_margin: the guided search ranks by guide_weight instead).
_RETIRED = {("decode", "guide_margin"): "the guided search ranks captions by guide_weight instead"}


def _section(name: str, values: dict):
    klass = _SECTIONS[name]
    for (section, key), why in _RETIRED.items():
        if section == name and key in values:
            values = {k: v for k, v in values.items() if k != key}
            warnings.warn(f"config {name}.{key} is no longer used and is ignored: {why}", FutureWarning, stacklevel=3)
    known = {f.name for f in dataclasses.fields(klass)}
    unknown = set(values) - known
    if unknown:
        raise ValueError(f"unknown key(s) in config section '{name}': {sorted(unknown)}; known: {sorted(known)}")
    types = {f.name: f.type for f in dataclasses.fields(klass)}
    for key, value in values.items():
        # YAML reads 5e-3 (no dot) as a string; a float field takes it as the number it is.
        if types[key] == "float" and isinstance(value, (str, int)) and not isinstance(value, bool):
            try:
                values[key] = float(value)
            except ValueError:
                raise ValueError(f"config {name}.{key} must be a number, got {value!r}") from None
    return klass(**values)


def apply_overrides(d: dict, overrides: list[str]) -> dict:
    """Apply `section.key=value` overrides; values are parsed as YAML scalars."""
    for item in overrides:
        key, sep, value = item.partition("=")
        if not sep or "." not in key:
            raise ValueError(f"override {item!r} is not of the form section.key=value")
        section, name = key.split(".", 1)
        d.setdefault(section, {})[name] = yaml.safe_load(value)
    return d


def load_config(path: str | Path | None = None, overrides: list[str] = ()) -> Config:
    d = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"config file not found: {path}")
        d = yaml.safe_load(path.read_text()) or {}
    return Config.from_dict(apply_overrides(d, list(overrides)))
