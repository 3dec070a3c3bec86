"""Decoding: greedy, beam search and sampling, all batched over images.

Beam search keeps B×k live rows in one tensor and steps them together. A caption that
emits <end> leaves the live beams for the image's pool of k finished captions, so
it is never pushed out by live prefixes that later finish worse (the standard
algorithm, as in fairseq); with k=1 this is exactly greedy. The length penalty ranks
finished captions of different lengths: "none" (sum of log-probs), "avg" (divided by
length, <end> included) or "wu" (((5+len)/6)**alpha, Wu et al. 2016).
"""
from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import torch

from .config import LENGTH_PENALTIES
from .decoder import Decoder, Ensemble, reorder_state


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
    raise ValueError(f"unknown length penalty {kind!r}; choose from {LENGTH_PENALTIES}")


def _ban(logp: torch.Tensor, banned: tuple[int, ...]) -> torch.Tensor:
    """Words a caption may never contain (<pad>, <start>, and <unk> by default)."""
    if banned:
        logp[:, list(banned)] = float("-inf")
    return logp


def _strip(seq: list[int], end: int) -> list[int]:
    return seq[: seq.index(end)] if end in seq else seq


@torch.inference_mode()
def _one_by_one(decoder: Decoder | Ensemble, feats: torch.Tensor, pick: Callable, start: int, end: int, max_len: int,
                banned):
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

    Each image keeps k live prefixes and, apart from them, its k best finished captions.
    An image leaves the batch once it has k finished captions and none of its live
    prefixes ranks above the worst of them: the images still searching do not pay for
    it in the later steps.
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
    scores = torch.full((B, k), float("-inf"), device=dev)  # the live prefixes' log-probs, best first
    scores[:, 0] = 0.0  # all beams start identical: keep one, or the top-k would be k copies
    seqs = torch.zeros(B, k, 0, dtype=torch.long, device=dev)
    pool = torch.full((B, k), float("-inf"), device=dev)  # finished captions' final scores, best first
    pool_seqs = torch.zeros(B, k, max_len, dtype=torch.long, device=dev)  # each ends with <end>, then padding
    images = torch.arange(B, device=dev)  # which input image each active row block is
    V = decoder.vocab_size
    results: list[list[Hypothesis]] = [[] for _ in range(B)]

    def emit(sel, final, final_seqs):  # write out the best hypotheses of the active images `sel` (a bool mask)
        order = final.argsort(dim=1, descending=True, stable=True)[:, :n_best]
        best = final_seqs.gather(1, order[..., None].expand(-1, -1, final_seqs.shape[2])).tolist()
        for b, img_seqs, img_scores in zip(images[sel].tolist(), best, final.gather(1, order).tolist()):
            results[b] = [Hypothesis(_strip(s, end), sc) for s, sc in zip(img_seqs, img_scores)
                          if sc != float("-inf")]

    for t in range(max_len):
        n = images.shape[0]
        logp, state = decoder.step(ctx, tokens, state)
        cand = (scores[..., None] + _ban(logp, banned).view(n, k, V)).view(n, -1)
        # Every candidate of this step has t+1 tokens, so raw log-probs rank them. Each beam has
        # one <end> candidate, so the best 2k hold the best k that are not <end>.
        top, idx = cand.topk(min(2 * k, cand.shape[1]), dim=1)
        beam, tok = idx // V, idx % V
        is_end = tok == end
        # An <end> among the step's k best candidates finishes a caption (as in fairseq and
        # Hugging Face); it joins the finished ones and never competes with live prefixes again.
        pen = penalty(torch.tensor(t + 1), length_penalty, alpha)
        ends = torch.where(is_end[:, :k], top[:, :k], float("-inf")) / pen
        end_seqs = torch.cat([seqs.gather(1, beam[:, :k, None].expand(-1, -1, t)),
                              torch.full((n, k, 1), end, dtype=torch.long, device=dev),
                              torch.zeros(n, k, max_len - t - 1, dtype=torch.long, device=dev)], dim=2)
        merged, merged_seqs = torch.cat([pool, ends], 1), torch.cat([pool_seqs, end_seqs], 1)
        order = merged.argsort(dim=1, descending=True, stable=True)[:, :k]  # ties: the earlier caption stays
        pool = merged.gather(1, order)
        pool_seqs = merged_seqs.gather(1, order[..., None].expand(-1, -1, max_len))
        # The live prefixes: the best k candidates that are not <end>, in rank order.
        live = is_end.to(torch.uint8).argsort(dim=1, stable=True)[:, :k]
        scores = torch.where(is_end, float("-inf"), top).gather(1, live)
        beam, tok = beam.gather(1, live), tok.gather(1, live)
        seqs = torch.cat([seqs.gather(1, beam[..., None].expand(-1, -1, t)), tok[..., None]], dim=2)
        state = reorder_state(state, (beam + torch.arange(n, device=dev)[:, None] * k).view(-1))
        tokens = tok.view(-1)
        done = pool[:, -1] >= scores[:, 0] / pen
        if done.any():
            emit(done, pool[done], pool_seqs[done])
            keep = ~done
            if not keep.any():
                break
            keep_rows = keep.repeat_interleave(k).nonzero().squeeze(1)
            images, scores, seqs, pool, pool_seqs = (x[keep] for x in (images, scores, seqs, pool, pool_seqs))
            state, ctx, tokens = reorder_state(state, keep_rows), ctx[keep_rows], tokens[keep_rows]
    else:  # max_len reached: the unfinished prefixes are captions too
        final = torch.cat([pool, scores / penalty(torch.tensor(max_len), length_penalty, alpha)], 1)
        emit(torch.ones_like(images, dtype=torch.bool), final, torch.cat([pool_seqs, seqs], 1))
    return results
