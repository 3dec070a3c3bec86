"""Decoding: greedy, beam search and sampling, all batched over images.

Beam search keeps B×k rows in one tensor and steps them together. A beam that has
emitted <end> stays in the beam, frozen (its only continuation is free padding),
and competes with the live beams for the k places; with k=1 this is exactly greedy.
The length penalty ranks hypotheses of different lengths: "none" (sum of log-probs),
"avg" (divided by length) or "wu" (((5+len)/6)**alpha, Wu et al. 2016).
"""
from __future__ import annotations

from typing import Callable, NamedTuple

import torch

from .decoder import Decoder, Ensemble, reorder_state

PENALTIES = ("none", "avg", "wu")


class Hypothesis(NamedTuple):
    tokens: list[int]  # word ids, without <start>/<end>
    score: float  # log-probability, divided by the length penalty when one is used


def penalty(lengths: torch.Tensor, kind: str = "none", alpha: float = 0.7) -> torch.Tensor:
    lengths = lengths.float().clamp(min=1)
    if kind == "none":
        return torch.ones_like(lengths)
    if kind == "avg":
        return lengths
    if kind == "wu":
        return ((5 + lengths) / 6) ** alpha
    raise ValueError(f"unknown length penalty {kind!r}; choose from {PENALTIES}")


def _ban(logp: torch.Tensor, banned: tuple[int, ...]) -> torch.Tensor:
    """Words a caption may never contain (<pad>, <start>, and <unk> by default)."""
    if banned:
        logp[:, list(banned)] = float("-inf")
    return logp


def _strip(seq: list[int], end: int) -> list[int]:
    return seq[: seq.index(end)] if end in seq else seq


@torch.inference_mode()
def _one_by_one(decoder: Decoder | Ensemble, feats: torch.Tensor, pick: Callable, start: int, end: int, max_len: int, banned):
    """Decode one token per step for every image at once; `pick(logp)` chooses the tokens."""
    v = decoder.features(feats)
    state, ctx = decoder.initial_state(v), decoder.step_context(v)
    B = feats.shape[0]
    tokens = torch.full((B,), start, dtype=torch.long, device=feats.device)
    done = torch.zeros(B, dtype=torch.bool, device=feats.device)
    scores = torch.zeros(B, device=feats.device)
    steps = []
    for _ in range(max_len):
        logp, state = decoder.step(ctx, tokens, state)
        tokens = pick(_ban(logp, banned))
        scores += torch.where(done, 0.0, logp.gather(1, tokens[:, None]).squeeze(1))
        steps.append(tokens)
        done |= tokens == end
        if done.all():
            break
    seqs = torch.stack(steps, 1).tolist()
    return [[Hypothesis(_strip(s, end), sc)] for s, sc in zip(seqs, scores.tolist())]


def greedy(decoder, feats, *, start, end, max_len=20, banned=(0,)):
    return _one_by_one(decoder, feats, lambda logp: logp.argmax(-1), start, end, max_len, banned)


def sample(decoder, feats, *, start, end, max_len=20, temperature=1.0, top_k=0, generator=None, banned=(0,)):
    """Temperature sampling (top_k > 0 keeps only the k likeliest words). Scores are model log-probs."""
    if temperature <= 0:
        raise ValueError("temperature must be > 0 (use greedy for temperature 0)")

    def pick(logp):
        logits = logp / temperature
        if top_k:
            kth = logits.topk(top_k, dim=-1).values[:, -1:]
            logits = logits.masked_fill(logits < kth, float("-inf"))
        return torch.multinomial(logits.softmax(-1), 1, generator=generator).squeeze(1)

    return _one_by_one(decoder, feats, pick, start, end, max_len, banned)


@torch.inference_mode()
def beam_search(decoder, feats, *, start, end, beam_size=3, max_len=20, length_penalty="none", alpha=0.7, n_best=1,
                banned=(0,)):
    """Returns, per image, the n_best hypotheses, best first.

    An image whose k beams have all finished leaves the batch: the images still
    searching do not pay for it in the later steps.
    """
    if not 1 <= n_best <= beam_size:
        raise ValueError(f"n_best must be between 1 and beam_size ({beam_size}), got {n_best}")
    penalty(torch.ones(1), length_penalty, alpha)  # reject an unknown penalty before any work
    B, k, dev = feats.shape[0], beam_size, feats.device
    v = decoder.features(feats)  # per image; rows are expanded to beams below, not recomputed
    rows = torch.arange(B, device=dev).repeat_interleave(k)  # row b*k + j is beam j of image b
    state = reorder_state(decoder.initial_state(v), rows)
    ctx = decoder.step_context(v).index_select(0, rows)
    tokens = torch.full((B * k,), start, dtype=torch.long, device=dev)
    scores = torch.full((B, k), float("-inf"), device=dev)
    scores[:, 0] = 0.0  # all beams start identical: keep one, or the top-k would be k copies
    lengths = torch.zeros(B, k, dtype=torch.long, device=dev)
    finished = torch.zeros(B, k, dtype=torch.bool, device=dev)
    seqs = torch.zeros(B, k, 0, dtype=torch.long, device=dev)
    images = torch.arange(B, device=dev)  # which input image each active row block is
    V = decoder.vocab_size
    frozen = torch.full((V,), float("-inf"), device=dev)
    frozen[0] = 0.0  # a finished beam continues only with padding, at no cost
    results: list[list[Hypothesis]] = [[] for _ in range(B)]

    def emit(sel):  # write out the hypotheses of the active images `sel` (a bool mask)
        final = scores[sel] / penalty(lengths[sel], length_penalty, alpha)
        order = final.argsort(dim=1, descending=True, stable=True)[:, :n_best]
        best = seqs[sel].gather(1, order[..., None].expand(-1, -1, seqs.shape[2])).tolist()
        for b, img_seqs, img_scores in zip(images[sel].tolist(), best, final.gather(1, order).tolist()):
            results[b] = [Hypothesis(_strip(s, end), sc) for s, sc in zip(img_seqs, img_scores)
                          if sc != float("-inf")]

    for t in range(max_len):
        n = images.shape[0]
        logp, state = decoder.step(ctx, tokens, state)
        logp = _ban(logp, banned).view(n, k, V)
        logp = torch.where(finished[..., None], frozen, logp)
        cand = scores[..., None] + logp
        cand_len = lengths + (~finished).long()
        rank = cand / penalty(cand_len, length_penalty, alpha)[..., None]
        idx = rank.view(n, -1).topk(k, dim=1).indices
        beam, tok = idx // V, idx % V
        scores = cand.view(n, -1).gather(1, idx)
        lengths = cand_len.gather(1, beam)
        finished = finished.gather(1, beam) | (tok == end)
        seqs = torch.cat([seqs.gather(1, beam[..., None].expand(-1, -1, t)), tok[..., None]], dim=2)
        state = reorder_state(state, (beam + torch.arange(n, device=dev)[:, None] * k).view(-1))
        tokens = tok.view(-1)
        done = finished.all(dim=1)
        if done.any():
            emit(done)
            keep = ~done
            if not keep.any():
                break
            keep_rows = keep.repeat_interleave(k).nonzero().squeeze(1)
            images, scores, lengths, finished, seqs = (x[keep] for x in (images, scores, lengths, finished, seqs))
            state, ctx, tokens = reorder_state(state, keep_rows), ctx[keep_rows], tokens[keep_rows]
    else:
        emit(torch.ones_like(images, dtype=torch.bool))
    return results
