"""Self-critical sequence training (Rennie et al. 2017): fine-tune a trained captioner on a caption metric itself.

Teacher forcing never lets the model see its own captions, and cross-entropy is not
BLEU. Here, for every image the model samples k captions; each earns a reward against
the image's references (`train.scst_reward`: sentence BLEU-4, `metrics.sentence_bleu4`,
or CIDEr-D, `metrics.CiderD`), and the mean reward of the image's other k-1 samples is its
baseline (no greedy pass needed). The loss raises the log-probability of samples
that beat their baseline and lowers the others'.

Sampling and scoring use the same policy: the caller puts the model in eval mode
(no dropout) for these steps.
"""
from __future__ import annotations

from collections.abc import Callable

import torch
from torch.utils.data import Dataset

from .data import image_input
from .metrics import CiderD, sentence_bleu4
from .search import sample
from .vocab import Vocab


class IndexedImages(Dataset):
    """One item per image: (its input, its index), for drawing image batches."""

    def __init__(self, source):
        self.source = source

    def __len__(self):
        return len(self.source)

    def __getitem__(self, i):
        return image_input(self.source, i), i


# (sampled captions' words, each one's image index) -> (a reward per caption, the batch's score to log)
Reward = Callable[[list[list[str]], list[int]], tuple[list[float], float]]


def _per_caption(score: Callable[[list[str], int], float]) -> Reward:
    def reward(captions, images):
        r = [score(words, i) for words, i in zip(captions, images)]
        return r, sum(r) / len(r)
    return reward


def reward_function(kind: str, references: list[list[list[str]]]) -> Reward:
    """The rewards of a batch of sampled captions; references[i] are training image i's tokenized captions."""
    if kind == "bleu4":
        return _per_caption(lambda words, i: sentence_bleu4(words, references[i]))
    if kind == "cider":
        return _per_caption(CiderD(references).score)
    raise ValueError(f"unknown scst reward {kind!r}; choose bleu4 or cider")


def self_critical_loss(model, inputs: torch.Tensor, images: list[int], reward: Reward, vocab: Vocab,
                       samples: int, max_len: int, references: list[list[list[int]]] | None = None,
                       xe_weight: float = 0.0) -> tuple[torch.Tensor, float]:
    """Policy-gradient loss for a batch of images, and the reward's score of its samples.

    `model(inputs, tokens)` gives teacher-forced logits (a train.Trainable, DDP-wrapped or not);
    `images[b]` is input b's index for `reward` and for `references` (token ids, `<start>`..`<end>`).
    With `xe_weight` > 0 the loss adds that much of the cross-entropy of the images' reference
    captions: a BLEU reward alone lets the captions shorten (see docs/results.md), the
    references' likelihood holds their length and language.
    """
    if samples < 2:
        raise ValueError("self-critical training needs at least 2 samples per image (their mean is the baseline)")
    core = getattr(model, "module", model)  # the Trainable inside DistributedDataParallel
    with torch.no_grad():  # once per image; the samples share it
        feats = core.encoder(inputs) if core.encoder is not None else inputs
    per_image, inputs = inputs, inputs.repeat_interleave(samples, 0)
    hyps = sample(core.decoder, feats.repeat_interleave(samples, 0), start=vocab.start, end=vocab.end, max_len=max_len,
                  banned=vocab.banned)
    seqs = [h[0].tokens for h in hyps]
    words = [[vocab.itos[t] for t in s] for s in seqs]
    rewards, score = reward(words, [images[i // samples] for i in range(len(seqs))])
    r = torch.tensor(rewards, device=inputs.device).view(-1, samples)
    advantage = (r - (r.sum(1, keepdim=True) - r) / (samples - 1)).view(-1, 1)
    # A sample cut off at max_len never chose <end>, so <end> is not part of what is scored.
    rows = [[vocab.start, *s] + ([vocab.end] if len(s) < max_len else []) for s in seqs]
    if xe_weight:  # the references ride in the same forward pass (one DDP forward per backward)
        owner = torch.tensor([b for b, i in enumerate(images) for _ in references[i]], device=inputs.device)
        rows += [ids for i in images for ids in references[i]]
        inputs = torch.cat([inputs, per_image[owner]])
    ids = torch.nn.utils.rnn.pad_sequence([torch.tensor(row) for row in rows], batch_first=True).to(inputs.device)
    tokens, targets = ids[:, :-1], ids[:, 1:]
    logp = model(inputs, tokens).log_softmax(-1).gather(2, targets.unsqueeze(2)).squeeze(2)
    mask = targets != 0
    n = len(seqs)
    loss = -(advantage * logp[:n])[mask[:n]].sum() / mask[:n].sum()
    if xe_weight:
        loss = loss - xe_weight * logp[n:][mask[n:]].mean()
    return loss, score
