"""The one door to a trained captioner: load a checkpoint, caption images.

The CLI, evaluation, batch captioning, the Gradio demo and the HTTP service all go
through `Captioner`; none of them builds a model by itself.

    >>> from captioner import Captioner
    >>> cap = Captioner.load()                 # the shipped default model
    >>> cap.caption("dog.jpg")
    {'caption': 'a brown dog runs through the grass', 'score': -4.1}
"""
from __future__ import annotations

import copy
from pathlib import Path

import torch

from . import checkpoint
from .config import Config, DecodeConfig
from .decoder import Decoder, Ensemble, build_decoder
from .encoder_engine import ENGINES, encoder_runner
from .encoders import Encoder, build_encoder
from .files import DEFAULT_CHECKPOINT
from .hardware import check_bf16
from .search import Hypothesis, beam_search, greedy, sample
from .tags import Tagger
from .vocab import Vocab

TRAIN_HINT = (
    "Train one with:\n"
    "  captioner extract-features --config configs/flickr8k_lite0.yaml\n"
    "  captioner train --config configs/flickr8k_lite0.yaml\n"
    "then pass --checkpoint runs/flickr8k_lite0/best.pt (or copy it to {default})."
)


PRECISIONS = {"fp32": torch.float32, "bf16": torch.bfloat16}


class ModelNotFound(checkpoint.CheckpointError):
    pass


def resolve_device(device: str | torch.device = "auto") -> torch.device:
    if str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


class Captioner:
    def __init__(self, encoder: Encoder, decoder: Decoder | Ensemble, vocab: Vocab, config: Config, device="auto",
                 engine: str | None = None):
        """engine (auto | onnxruntime | torch) runs the frozen encoder; None: the config's decode.engine."""
        self.device = resolve_device(device)
        self.encoder = encoder.eval().to(self.device)
        self.engine = engine or config.decode.engine
        if self.engine not in ENGINES:
            raise ValueError(f"unknown engine {self.engine!r}; choose from {', '.join(ENGINES)}")
        self._run_encoder = None  # built at the first encode: an ONNX export must not slow down training's Captioners
        precision = config.decode.precision
        if precision not in PRECISIONS:
            raise ValueError(f"unknown decode.precision {precision!r}; choose from {sorted(PRECISIONS)}")
        check_bf16(precision, self.device, "decode.precision")
        if precision != "fp32":  # a copy: the caller's decoder (a model in training, say) stays as it is
            decoder = copy.deepcopy(decoder).to(PRECISIONS[precision])
        self.decoder = decoder.eval().to(self.device)
        self.vocab, self.config = vocab, config
        self.tagger = imagenet_tagger(self.encoder)

    @classmethod
    def load(cls, path: str | Path | None = None, device="auto", precision: str | None = None,
             engine: str | None = None) -> Captioner:
        """Load a checkpoint; path=None loads the default model shipped with the package.
        precision (fp32 | bf16) and engine (auto | onnxruntime | torch) override the checkpoint's decode settings."""
        if path is None:
            if not DEFAULT_CHECKPOINT.is_file():
                raise ModelNotFound(f"The default model is not installed ({DEFAULT_CHECKPOINT} is missing).\n"
                                    + TRAIN_HINT.format(default=DEFAULT_CHECKPOINT))
            path = DEFAULT_CHECKPOINT
        payload = checkpoint.load(path)
        return cls.from_payload(payload, device, precision, engine)

    @classmethod
    def from_payload(cls, payload: dict, device="auto", precision: str | None = None,
                     engine: str | None = None) -> Captioner:
        config = Config.from_dict(payload["config"])
        if precision is not None:
            config.decode.precision = precision
        vocab = Vocab.from_dict(payload["vocab"])
        encoder = build_encoder(config.model.encoder, config.model.pretrained, regions=config.model.attention,
                                state=payload.get("encoder"))
        decoders = []
        for state in payload["decoder"] if isinstance(payload["decoder"], list) else [payload["decoder"]]:
            decoders.append(build_decoder(config.model, len(vocab), encoder.dim))
            decoders[-1].load_state_dict(state)
        return cls(encoder, decoders[0] if len(decoders) == 1 else Ensemble(decoders), vocab, config, device, engine)

    # -- the three stages, public so batch captioning can pipeline them ----------------
    def preprocess(self, image) -> torch.Tensor:
        """Any path / bytes / PIL image -> the encoder's input tensor (raises images.ImageError)."""
        return self.encoder.preprocess(image)

    @staticmethod
    def stack(pixels: list[torch.Tensor]) -> torch.Tensor:
        """Preprocessed images -> the batch `encode` takes."""
        return torch.stack(pixels)

    def encode(self, pixels: torch.Tensor) -> torch.Tensor:
        """Pixels (B, 3, H, W) -> features (B, width), run by this Captioner's engine."""
        if self._run_encoder is None:
            self._run_encoder = encoder_runner(self.encoder, self.engine, self.device)
        return self._run_encoder(pixels)

    def options(self, **overrides) -> DecodeConfig:
        """The model's decoding settings with per-call overrides (None keeps a setting), checked now.

        Options: method (beam | greedy | sample), beam_size, n_best, max_len, length_penalty,
        alpha, temperature, top_k, guide (on | off: beam search guided by the tags), guide_threshold,
        guide_max, guide_weight. Precision and engine are chosen when loading."""
        at_load = sorted(k for k in ("precision", "engine") if overrides.get(k) is not None)
        if at_load:
            raise TypeError(f"{', '.join(at_load)}: chosen when loading, Captioner.load(..., {at_load[0]}=...)")
        return self.config.decode.replace(**overrides)

    def decode(self, feats: torch.Tensor, options: DecodeConfig | None = None,
               generator: torch.Generator | None = None) -> list[list[Hypothesis]]:
        """Feature vectors (B, D) -> per image, its n_best hypotheses (options: from `options()`;
        None: the model's own settings). generator seeds sampling."""
        o = options or self.config.decode
        feats = feats.to(self.device, torch.float32)
        common = dict(start=self.vocab.start, end=self.vocab.end, max_len=o.max_len, banned=self.vocab.banned)
        if o.method == "beam":
            return beam_search(self.decoder, feats, beam_size=o.beam_size, n_best=o.n_best,
                               length_penalty=o.length_penalty, alpha=o.alpha, **self._guidance(feats, o), **common)
        if o.method == "greedy":
            return greedy(self.decoder, feats, **common)
        return sample(self.decoder, feats, temperature=o.temperature, top_k=o.top_k, generator=generator, **common)

    def _guidance(self, feats: torch.Tensor, o: DecodeConfig) -> dict:
        """beam_search's constraint arguments from the encoder's tags (none when guide is off)."""
        if o.guide == "off" or self.tagger is None or o.guide_max == 0:
            return {}
        found = self.tagger.constraints(feats.float().cpu().numpy(), self.vocab.stoi,
                                        threshold=o.guide_threshold, most=o.guide_max)
        return {"constraints": [[ids for ids, _ in c] for c in found], "required": o.guide_max,
                "bonus": [[o.guide_weight * p for _, p in c] for c in found]}

    def format(self, hyps: list[Hypothesis], tags: list[dict] | None = None) -> list[dict]:
        """One image's hypotheses -> [{"caption", "score", "tags"}, ...], best first ("tags": the
        image's, in each; left out when the encoder has no ImageNet classifier)."""
        extra = {} if tags is None else {"tags": tags}
        return [{"caption": self.vocab.decode(h.tokens), "score": round(h.score, 4), **extra} for h in hyps]

    def tag_features(self, feats: torch.Tensor) -> list[list[dict]] | list[None]:
        """Features -> per image [{"tag", "prob"}, ...] (see captioner.tags); None each without a classifier."""
        if self.tagger is None:
            return [None] * len(feats)
        return self.tagger(feats.float().cpu().numpy())

    def describe(self, feats: torch.Tensor, options: DecodeConfig | None = None,
                 generator: torch.Generator | None = None) -> list[list[dict]]:
        """Features -> per image its formatted hypotheses with its tags: what every caller shows."""
        return [self.format(h, t) for h, t in zip(self.decode(feats, options, generator), self.tag_features(feats))]

    def tags(self, images, *, batch_size: int = 32) -> list[list[dict]] | list[dict]:
        """Per image (paths, bytes or PIL images) [{"tag": noun, "prob": p}, ...], likeliest first: the
        encoder's ImageNet classes as everyday nouns, probabilities of one noun's classes summed."""
        if self.tagger is None:
            raise ValueError(f"encoder {self.encoder.name!r} has no ImageNet classifier to tag with")
        tags, single = self._per_image(images, batch_size, self.tag_features)
        return tags[0] if single else tags

    def caption(self, images, *, batch_size: int = 32, generator: torch.Generator | None = None, **options):
        """Caption one image or a list of them (paths, bytes or PIL images).

        Returns {"caption", "score", "tags"} per image, or with n_best > 1 a list of that many, best
        first; a single input gives a single result. Options: see `options()`.
        """
        o = self.options(**options)
        results, single = self._per_image(images, batch_size, lambda feats: self.describe(feats, o, generator))
        if o.n_best == 1:
            results = [r[0] for r in results]
        return results[0] if single else results

    def _per_image(self, images, batch_size: int, per_batch) -> tuple[list, bool]:
        """per_batch(features) over one image or a list, batch by batch: (its results per image, single)."""
        single = not isinstance(images, (list, tuple))
        images = [images] if single else list(images)
        out = []
        for i in range(0, len(images), batch_size):
            out += per_batch(self.encode(torch.stack([self.preprocess(im) for im in images[i:i + batch_size]])))
        return out, single


def imagenet_tagger(encoder: Encoder) -> Tagger | None:
    """The tagger of an EfficientNet-Lite encoder's own ImageNet classifier; None for other encoders."""
    net = getattr(encoder.backbone, "net", None)
    fc = getattr(net, "_fc", None)
    if fc is None or fc.in_features != encoder.dim:
        return None
    return Tagger.from_mapping(fc.weight.detach().float().cpu().numpy(), fc.bias.detach().float().cpu().numpy(),
                               encoder.regions)
