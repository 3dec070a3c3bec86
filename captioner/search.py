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
from .constraints import Machine, machine
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


class _Guide:
    """A batch's constraint machines as tensors (constraints.py): per image S states of k beams.

    words (n, L): each image's constraint words (padded with <pad>, which is banned); leads
    (n, S_to, S_from, L): which word moves which state to which; blocked (n, S, V): -inf where a
    word would leave the state (such candidates are scored by the state they lead to);
    reachable (n, S): the states an image's machine has. With no constraint in the batch (S = 1)
    there is nothing to block or move, and the search is plain beam search at its own cost.
    cwords (n, C, W) and bonus (n, C): each image's constraints' words and what naming each adds to a
    caption's rank."""

    FIELDS = ("words", "leads", "blocked", "reachable", "cwords", "bonus")

    def __init__(self, machines: list[Machine], vocab_size: int, dev, constraints, bonus):
        n, S = len(machines), max(m.states for m in machines)
        C = max([1, *map(len, constraints)])
        W = max([1] + [len(ids) for c in constraints for ids in c])
        self.cwords = torch.full((n, C, W), -1, dtype=torch.long)  # each image's constraints' words (-1: none)
        self.bonus = torch.zeros(n, C, dtype=torch.float64)
        for b, (c, w) in enumerate(zip(constraints, bonus)):
            for i, ids in enumerate(c):
                self.cwords[b, i, :len(ids)] = torch.tensor(ids, dtype=torch.long)
                self.bonus[b, i] = w[i]
        vocab = [sorted({w for _, w in m.moves}) for m in machines]
        L = max(1, *map(len, vocab))  # at least one (padding) word keeps the shapes simple
        self.S, self.words = S, torch.zeros(n, L, dtype=torch.long)
        to = torch.arange(S).view(1, S, 1).repeat(n, 1, L)  # the state each word leads to from each state
        for b, (m, ws) in enumerate(zip(machines, vocab)):
            self.words[b, :len(ws)] = torch.tensor(ws, dtype=torch.long)
            for (state, w), target in m.moves.items():
                to[b, state, ws.index(w)] = target
        states = torch.arange(S)
        moves = to != states.view(1, S, 1)
        self.leads = (to[:, None] == states.view(1, S, 1, 1)) & moves[:, None]
        self.blocked = torch.zeros(n, S, vocab_size).scatter_(
            2, self.words[:, None, :].expand(-1, S, -1), torch.where(moves, float("-inf"), 0.0))
        self.reachable = states[None] < torch.tensor([m.states for m in machines])[:, None]
        for name in self.FIELDS:
            setattr(self, name, getattr(self, name).to(dev))

    def keep(self, keep: torch.Tensor) -> None:
        for name in self.FIELDS:
            setattr(self, name, getattr(self, name)[keep])

    def candidates(self, cand: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """cand (n, S, k, V) prefix + word scores -> per state it leads to, the best 2k:
        (scores, source rows in the n*S*k live rows, words), each (n*S, 2k)."""
        n, S, _, V = cand.shape
        L = self.words.shape[1]
        pool = cand.view(n, S, k * V)
        if S > 1:  # a candidate counts in the state its word leads to: blocked where it stays, moved in there
            moved = cand.gather(3, self.words[:, None, None, :].expand(-1, S, k, -1))  # (n, S_from, k, L)
            into = torch.where(self.leads[:, :, :, None, :], moved[:, None], float("-inf")).view(n, S, S * k * L)
            pool = torch.cat([(cand + self.blocked[:, :, None, :]).view(n, S, k * V), into], 2)
        top, idx = pool.topk(min(2 * k, k * V), dim=2)
        from_state, beam, word = torch.arange(S, device=cand.device).view(1, S, 1), idx // V, idx % V
        if S > 1:
            came, m = idx >= k * V, (idx - k * V).clamp(min=0)
            from_state = torch.where(came, m // (k * L), from_state)
            beam = torch.where(came, (m // L) % k, beam)
            word = torch.where(came, self.words.gather(1, (m % L).view(n, -1)).view(n, S, -1), word)
        rows = (torch.arange(n, device=cand.device).view(n, 1, 1) * S + from_state) * k + beam
        return top.view(n * S, -1), rows.view(n * S, -1), word.view(n * S, -1)

    def finished(self, pool, pool_seqs, scores, pen, n_best: int) -> torch.Tensor:
        """(n,) the images done: in each state, k finished captions that no live prefix able to reach it
        (its own, or one of an earlier state) would beat, or, past state 0, no live prefix there that
        could rank among the image's n_best even naming every constraint. State 0's prefixes feed the
        later states until the end: stopping them once state 0 alone is done (as plain beam search
        stops) cost COCO mini BLEU-4 1.1 and CIDEr 1.1. Without constraints this is plain beam search."""
        n, S = self.reachable.shape
        reach = (scores.view(n, S, -1)[..., 0] / pen).cummax(1).values
        converged = pool.view(n, S, -1)[..., -1] >= reach
        nth = self.rank(pool, pool_seqs).topk(n_best, dim=1).values[:, -1:]
        hopeless = reach.double() + self.bonus.sum(1, keepdim=True) < nth
        hopeless[:, 0] = False
        return (converged | hopeless | ~self.reachable).all(1)

    def rank(self, final: torch.Tensor, final_seqs: torch.Tensor) -> torch.Tensor:
        """final (n*S, K) scores, final_seqs (n*S, K, T) -> (n, S*K): each finished caption's score plus
        the bonus of every constraint it names, the order its image's captions are read in."""
        n = self.reachable.shape[0]
        seqs = final_seqs.view(n, -1, final_seqs.shape[-1])
        named = (seqs[:, :, :, None, None] == self.cwords[:, None, None]).any(-1).any(2)  # (n, S*K, C)
        # float64: an infinite bonus (a large one) must not swallow the scores' differences
        return final.view(n, -1).double() + (named * self.bonus[:, None]).sum(-1)


@torch.inference_mode()
def beam_search(decoder, feats, *, start, end, beam_size=3, max_len=20, length_penalty="none", alpha=0.7, n_best=1,
                banned=(0,), constraints: list[list[tuple[int, ...]]] | None = None, required: int = 2,
                bonus: list[list[float]] | None = None):
    """Returns, per image, the n_best hypotheses, best first.

    Each image keeps k live prefixes and, apart from them, its k best finished captions, per state of its constraint
    machine (constraints.py; without constraints one state: plain beam search). constraints: per image, disjunctive
    word-id sets; its machine's accepting state holds captions that name `required` of them. bonus: per image and
    constraint, what naming it adds to a caption's rank (None: so large that a caption naming more constraints
    always wins). The captions of every state are ranked together by score plus bonus (state 0's, which name no
    constraint, among them), and each keeps its own score. An image leaves the batch once no live prefix can improve
    its captions: the images still searching do not pay for it in the later steps.
    """
    if not 1 <= n_best <= beam_size:
        raise ValueError(f"n_best must be between 1 and beam_size ({beam_size}), got {n_best}")
    penalty(torch.ones(1), length_penalty, alpha)  # reject an unknown penalty before any work
    B, k, dev, V = feats.shape[0], beam_size, feats.device, decoder.vocab_size
    constraints = constraints or [[]] * B
    bonus = bonus or [[1e6] * len(c) for c in constraints]
    guide = _Guide([machine(c, required) for c in constraints], V, dev, constraints, bonus)
    S = guide.S
    v = decoder.features(feats)  # per image; rows are expanded to beams below, not recomputed
    rows = torch.arange(B, device=dev).repeat_interleave(S * k)  # row (b*S + s)*k + j: beam j of state s of image b
    state = reorder_state(decoder.initial_state(v), rows)
    ctx = decoder.step_context(v).index_select(0, rows)
    tokens = torch.full((B * S * k,), start, dtype=torch.long, device=dev)
    scores = torch.full((B, S, k), float("-inf"), device=dev)  # the live prefixes' log-probs, best first
    scores[:, 0, 0] = 0.0  # every caption starts in state 0 (one beam: k alike would be k copies)
    search = _Beams(scores.view(B * S, k), max_len, end, dev)
    images = torch.arange(B, device=dev)  # which input image each active row block is
    results: list[list[Hypothesis]] = [[] for _ in range(B)]

    def emit(sel, final, final_seqs):  # write out the best hypotheses of the active images `sel` (a bool mask)
        rank = guide.rank(final, final_seqs)[sel]
        final, final_seqs = (x.view(-1, S * x.shape[1], *x.shape[2:])[sel] for x in (final, final_seqs))
        for b, hyps in zip(images[sel].tolist(), _best(rank, final, final_seqs, n_best, end)):
            results[b] = hyps

    for t in range(max_len):
        n = images.shape[0]
        logp, state = _step_live(decoder, ctx, tokens, state, search.scores.view(-1) > float("-inf") if t else None)
        cand = search.scores.view(n, S, k, 1) + _ban(logp, banned).view(n, S, k, V)
        pen = penalty(torch.tensor(t + 1), length_penalty, alpha)
        src, tokens = search.advance(*guide.candidates(cand, k), t, pen)
        state = reorder_state(state, src)
        done = guide.finished(search.pool, search.pool_seqs, search.scores, pen, n_best)
        if done.any():
            emit(done, search.pool, search.pool_seqs)
            keep = ~done
            if not keep.any():
                break
            keep_rows = keep.repeat_interleave(S * k).nonzero().squeeze(1)
            images = images[keep]
            guide.keep(keep)
            search.keep(keep.repeat_interleave(S))
            state, ctx, tokens = reorder_state(state, keep_rows), ctx[keep_rows], tokens[keep_rows]
    else:  # max_len reached: the unfinished prefixes are captions too
        final = torch.cat([search.pool, search.scores / penalty(torch.tensor(max_len), length_penalty, alpha)], 1)
        emit(torch.ones_like(images, dtype=torch.bool), final, torch.cat([search.pool_seqs, search.seqs], 1))
    return results


def _step_live(decoder, ctx, tokens, state, live: torch.Tensor):
    """decoder.step on the rows whose prefix is alive; the others get -inf log-probs and keep their
    state, which no finite score will ever read. Most rows of a guided batch are dead: the states an
    image's machine lacks (the batch has as many as its image with the most tags) or has not reached.
    live None: every row (the first step, whose state may be None: the decoder makes it)."""
    if live is None or bool(live.all()):
        return decoder.step(ctx, tokens, state)
    idx = live.nonzero().squeeze(1)
    logp, sub = decoder.step(ctx.index_select(0, idx), tokens[idx], reorder_state(state, idx))
    full = logp.new_full((live.shape[0], logp.shape[1]), float("-inf")).index_copy_(0, idx, logp)
    return full, _put_state(state, idx, sub)


def _put_state(state, idx: torch.Tensor, sub):
    """The recurrent state with rows idx (dim 1) replaced by sub's, for a tensor or a tuple of them."""
    if isinstance(state, torch.Tensor):
        return state.index_copy(1, idx, sub)
    return tuple(_put_state(s, idx, u) for s, u in zip(state, sub))


def _best(rank: torch.Tensor, final: torch.Tensor, final_seqs: torch.Tensor, n_best: int, end: int
          ) -> list[list[Hypothesis]]:
    """Per row of finished captions' ranks and scores (n, K) and sequences (n, K, T), its n_best best
    rank first. A caption is in one state only (a word that would leave a state moves it on)."""
    order = rank.argsort(dim=1, descending=True, stable=True)[:, :n_best]
    best = final_seqs.gather(1, order[..., None].expand(-1, -1, final_seqs.shape[2])).tolist()
    return [[Hypothesis(_strip(s, end), sc) for s, sc in zip(seqs, scores) if sc != float("-inf")]
            for seqs, scores in zip(best, final.gather(1, order).tolist())]


class _Beams:
    """Per group (an image's state) its k live prefixes and its k best finished captions."""

    def __init__(self, scores: torch.Tensor, max_len: int, end: int, dev):
        G, k = scores.shape
        self.scores, self.max_len, self.end = scores, max_len, end
        self.seqs = torch.zeros(G, k, 0, dtype=torch.long, device=dev)
        self.pool = torch.full((G, k), float("-inf"), device=dev)  # finished captions' final scores, best first
        self.pool_seqs = torch.zeros(G, k, max_len, dtype=torch.long, device=dev)  # each ends with <end>, then padding

    def keep(self, keep: torch.Tensor) -> None:
        self.scores, self.seqs, self.pool, self.pool_seqs = (
            x[keep] for x in (self.scores, self.seqs, self.pool, self.pool_seqs))

    def advance(self, top, src, tok, t: int, pen) -> tuple[torch.Tensor, torch.Tensor]:
        """Take one step's best 2k candidates per group (scores, source rows, words), best first:
        finished ones join the pool, the best k others live on. Returns (source rows, words) of the
        new live rows."""
        G, k, dev = self.scores.shape[0], self.scores.shape[1], top.device
        is_end = tok == self.end
        # Every candidate of this step has t+1 tokens, so raw log-probs rank them. Each beam has
        # one <end> candidate, so the best 2k hold the best k that are not <end>.
        # An <end> among the step's k best candidates finishes a caption (as in fairseq and
        # Hugging Face); it joins the finished ones and never competes with live prefixes again.
        prefixes = self.seqs.view(G * k, t)
        ends = torch.where(is_end[:, :k], top[:, :k], float("-inf")) / pen
        end_seqs = torch.cat([prefixes[src[:, :k]], torch.full((G, k, 1), self.end, dtype=torch.long, device=dev),
                              torch.zeros(G, k, self.max_len - t - 1, dtype=torch.long, device=dev)], dim=2)
        merged, merged_seqs = torch.cat([self.pool, ends], 1), torch.cat([self.pool_seqs, end_seqs], 1)
        order = merged.argsort(dim=1, descending=True, stable=True)[:, :k]  # ties: the earlier caption stays
        self.pool = merged.gather(1, order)
        self.pool_seqs = merged_seqs.gather(1, order[..., None].expand(-1, -1, self.max_len))
        # The live prefixes: the best k candidates that are not <end>, in rank order.
        live = is_end.to(torch.uint8).argsort(dim=1, stable=True)[:, :k]
        self.scores = torch.where(is_end, float("-inf"), top).gather(1, live)
        src, tok = src.gather(1, live), tok.gather(1, live)
        self.seqs = torch.cat([prefixes[src], tok[..., None]], dim=2)
        return src.view(-1), tok.view(-1)
