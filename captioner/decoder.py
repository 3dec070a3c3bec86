"""Recurrent caption decoder: embedding -> LSTM/GRU/RNN -> linear over the vocabulary.

With inject="every" the image feature v enters every step's gates through its own
input weights: the cell's input at step t is [x_t; v], so the fused input matrix
W_ih·[x_t; v] = W_x·x_t + W_iv·v, and the whole sequence is one nn.LSTM call (no
Python loop over time). W_iv is the last `feat_dim` columns of `rnn.weight_ih_l0`.
With inject="init" (Show and Tell / cs231n) v only sets the initial state.

Decoding steps one token at a time, so there W_iv·v + biases is computed once per
search (`step_context`) and each step multiplies only x_t and h (one LSTM layer).
`Ensemble` decodes with several decoders at once through the same four methods, and
`AttentionDecoder` (model.attention) adds soft attention over the image's regions.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from .config import ModelConfig

CELLS = {"lstm": nn.LSTM, "gru": nn.GRU, "rnn": nn.RNN}


class RandDropout(nn.Dropout):
    """nn.Dropout, its mask drawn with torch.rand on CPU: the bernoulli kernel nn.Dropout
    uses there takes twice as long for the same mask (14 vs 7 ms on a training batch's
    embeddings, ~10% of a bf16 training step). Other devices keep the fused kernel."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.p == 0 or self.p == 1 or x.device.type != "cpu":
            return super().forward(x)
        return x * torch.rand_like(x).ge_(self.p).mul_(1 / (1 - self.p))


def _projection(cfg: ModelConfig, feature_dim: int) -> tuple[nn.Module, int]:
    """v's (or each region's) optional Linear+ReLU projection, and the size it gives."""
    if cfg.feature_proj:
        return nn.Sequential(nn.Linear(feature_dim, cfg.feature_proj), nn.ReLU()), cfg.feature_proj
    return nn.Identity(), feature_dim


class Decoder(nn.Module):
    def __init__(self, cfg: ModelConfig, vocab_size: int, feature_dim: int):
        super().__init__()
        if cfg.cell not in CELLS:
            raise ValueError(f"unknown cell {cfg.cell!r}; choose from {sorted(CELLS)}")
        if cfg.inject not in ("every", "init"):
            raise ValueError(f"unknown inject {cfg.inject!r}; choose 'every' or 'init'")
        self.cell, self.inject, self.num_layers = cfg.cell, cfg.inject, cfg.num_layers
        self.proj, self.feat_dim = _projection(cfg, feature_dim)
        self.feature_dropout = RandDropout(cfg.feature_dropout)
        self.embed = nn.Embedding(vocab_size, cfg.embed_dim, padding_idx=0)
        rnn_in = cfg.embed_dim + (self.feat_dim if cfg.inject == "every" else 0)
        self.rnn = CELLS[cfg.cell](rnn_in, cfg.hidden_dim, cfg.num_layers, batch_first=True,
                                   dropout=cfg.dropout if cfg.num_layers > 1 else 0.0)
        if cfg.inject == "init":
            n_states = 2 if cfg.cell == "lstm" else 1
            self.init_state = nn.Linear(self.feat_dim, n_states * cfg.num_layers * cfg.hidden_dim)
        self.dropout = RandDropout(cfg.dropout)
        self.out = nn.Linear(cfg.hidden_dim, vocab_size)
        # A single-token nn.LSTM call would redo W_iv·v at every step (and on CPU pays
        # oneDNN's per-call setup): decoding runs this cell by hand instead.
        self._step_by_hand = cfg.cell == "lstm" and cfg.inject == "every" and cfg.num_layers == 1

    @property
    def vocab_size(self) -> int:
        return self.out.out_features

    def features(self, feats: torch.Tensor) -> torch.Tensor:
        """v as the cell sees it (dropout and the optional projection applied), in the weights' precision."""
        return self.proj(self.feature_dropout(feats.to(self.embed.weight.dtype)))

    def initial_state(self, v: torch.Tensor):
        if self.inject == "every":
            return None  # zeros: the image arrives through W_iv at every step
        B, L, H = v.shape[0], self.num_layers, self.rnn.hidden_size
        s = torch.tanh(self.init_state(v)).view(B, -1, L, H).permute(1, 2, 0, 3).contiguous()
        return (s[0], s[1]) if self.cell == "lstm" else s[0]

    def _run(self, v: torch.Tensor, tokens: torch.Tensor, state):
        x = self.dropout(self.embed(tokens))
        if self.inject == "every":
            x = torch.cat([x, v.unsqueeze(1).expand(-1, x.shape[1], -1)], dim=2)
        h, state = self.rnn(x, state)
        return self.out(self.dropout(h)), state

    def forward(self, feats: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        """Teacher forcing: tokens (B, T) start with <start>; returns logits (B, T, V) for the next words."""
        v = self.features(feats)
        logits, _ = self._run(v, tokens, self.initial_state(v))
        return logits

    def step_context(self, v: torch.Tensor) -> torch.Tensor:
        """What decoding steps need of the image, once per search: v (from `features`),
        or for the hand-run LSTM cell v's constant share of the gates, W_iv·v + biases (fp32)."""
        if not self._step_by_hand:
            return v
        w_iv = self.rnn.weight_ih_l0[:, self.embed.embedding_dim:]
        return torch.addmm(self.rnn.bias_ih_l0 + self.rnn.bias_hh_l0, v, w_iv.t()).float()

    def _word_gates(self) -> torch.Tensor:
        """W_x·x for every word of the vocabulary (V, 4H), fp32: a decoding step gathers its rows instead of
        reading all of W_x for a few beams (the step is bound by memory traffic, not arithmetic).
        Rebuilt when the weights change (an optimizer step or load_state_dict bumps their version)."""
        embed, w_ih = self.embed.weight, self.rnn.weight_ih_l0
        if torch.compiler.is_exporting():  # traced weights have no storage to key the cache on; in the
            return F.linear(embed, w_ih[:, :embed.shape[1]]).float()  # graph it is a constant onnxruntime folds
        key = (embed._version, w_ih._version, embed.data_ptr(), w_ih.data_ptr(), w_ih.dtype, w_ih.device)
        if getattr(self, "_word_gates_key", None) != key:
            with torch.no_grad():
                self._word_gates_table = F.linear(embed, w_ih[:, :embed.shape[1]]).float()
            self._word_gates_key = key
        return self._word_gates_table

    def step(self, ctx: torch.Tensor, tokens: torch.Tensor, state):
        """One decoding step for search: ctx from `step_context`; tokens (N,). Returns fp32 log-probs, state.

        With bf16 weights (decode.precision=bf16) or under bf16 autocast, only the matrix
        products run in bf16: gates, cell state and log-probs stay fp32.
        """
        if not self._step_by_hand:
            logits, state = self._run(ctx, tokens.unsqueeze(1), state)
            return logits.squeeze(1).float().log_softmax(-1), state
        w_ih, w_hh = self.rnn.weight_ih_l0, self.rnn.weight_hh_l0
        if self.training or torch.is_grad_enabled():  # dropout on x, or gradients through it (scst)
            gates = ctx + F.linear(self.dropout(self.embed(tokens)), w_ih[:, :self.embed.embedding_dim]).float()
        else:
            gates = ctx + self._word_gates()[tokens]
        if state is not None:
            gates += F.linear(state[0][0].to(w_hh.dtype), w_hh).float()
        i, f, g, o = gates.chunk(4, dim=1)  # nn.LSTM's gate order
        c = i.sigmoid() * g.tanh()
        if state is not None:
            c = c + f.sigmoid() * state[1][0]
        h = o.sigmoid() * c.tanh()
        return self.out(self.dropout(h.to(w_hh.dtype))).float().log_softmax(-1), (h[None], c[None])


class AttentionDecoder(nn.Module):
    """LSTM with v in every step plus soft attention over the encoder's R regions
    (Xu et al. 2015, "Show, Attend and Tell"): the cell's input at step t is [x_t; v; z_t],
    z_t = Σ_i α_ti a_i, α_t = softmax_i(w·tanh(W_a a_i + W_h h_{t-1})), with a_i the projected
    regions and v their mean. Each step depends on the previous h, so teacher forcing
    loops over time (an LSTMCell) instead of one fused nn.LSTM call.
    """

    def __init__(self, cfg: ModelConfig, vocab_size: int, feature_dim: int):
        super().__init__()
        if cfg.cell != "lstm" or cfg.inject != "every" or cfg.num_layers != 1:
            raise ValueError("model.attention needs cell: lstm, inject: every and num_layers: 1")
        self.proj, self.feat_dim = _projection(cfg, feature_dim)
        self.hidden_dim, self.region_dim = cfg.hidden_dim, feature_dim
        self.feature_dropout = RandDropout(cfg.feature_dropout)
        self.att_a = nn.Linear(self.feat_dim, self.feat_dim)
        self.att_h = nn.Linear(cfg.hidden_dim, self.feat_dim, bias=False)
        self.att_w = nn.Linear(self.feat_dim, 1)
        self.embed = nn.Embedding(vocab_size, cfg.embed_dim, padding_idx=0)
        self.cell = nn.LSTMCell(cfg.embed_dim + 2 * self.feat_dim, cfg.hidden_dim)
        self.dropout = RandDropout(cfg.dropout)
        self.out = nn.Linear(cfg.hidden_dim, vocab_size)

    @property
    def vocab_size(self) -> int:
        return self.out.out_features

    def features(self, feats: torch.Tensor) -> torch.Tensor:
        """Rows of R regions (B, R·D) -> the projected regions a (B, R, feat_dim)."""
        regions = feats.view(feats.shape[0], -1, self.region_dim).to(self.embed.weight.dtype)
        return self.proj(self.feature_dropout(regions))

    def initial_state(self, a: torch.Tensor):
        return None  # zeros

    def step_context(self, a: torch.Tensor) -> torch.Tensor:
        """The regions and their attention keys W_a a, once per search, packed in one tensor
        so that search can select its rows."""
        return torch.cat([a, self.att_a(a)], dim=2)

    def _cell(self, a, keys, v, x, h, c):
        e = self.att_w(torch.tanh(keys + self.att_h(h)[:, None])).squeeze(2)
        z = (e.float().softmax(1).to(a.dtype)[..., None] * a).sum(1)
        return self.cell(torch.cat([x, v, z], 1), (h, c))

    def step(self, ctx: torch.Tensor, tokens: torch.Tensor, state):
        a, keys = ctx.split(self.feat_dim, dim=2)
        h, c = (a.new_zeros(a.shape[0], self.hidden_dim),) * 2 if state is None else (state[0][0], state[1][0])
        h, c = self._cell(a, keys, a.mean(1), self.dropout(self.embed(tokens)), h, c)
        return self.out(self.dropout(h)).float().log_softmax(-1), (h[None], c[None])  # states batch on dim 1

    def forward(self, feats: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        a = self.features(feats)
        keys, v, x = self.att_a(a), a.mean(1), self.dropout(self.embed(tokens))
        h = c = a.new_zeros(a.shape[0], self.hidden_dim)
        hs = []
        for t in range(tokens.shape[1]):
            h, c = self._cell(a, keys, v, x[:, t], h, c)
            hs.append(h)
        return self.out(self.dropout(torch.stack(hs, 1)))


def build_decoder(cfg: ModelConfig, vocab_size: int, feature_dim: int) -> Decoder | AttentionDecoder:
    return (AttentionDecoder if cfg.attention else Decoder)(cfg, vocab_size, feature_dim)


class Ensemble(nn.Module):
    """Decoders trained apart (other seeds, same vocabulary and sizes) decoding as one:
    each step's word distribution is the mean of theirs. Inference only.

    It offers search what a Decoder offers: the members' v and contexts are stacked on
    dim 1 (so search can select rows of them), states are tuples of the members' states.
    """

    def __init__(self, members: list[Decoder]):
        super().__init__()
        if len({m.vocab_size for m in members}) != 1:
            raise ValueError("ensemble members must share one vocabulary")
        self.members = nn.ModuleList(members)

    @property
    def vocab_size(self) -> int:
        return self.members[0].vocab_size

    def features(self, feats: torch.Tensor) -> torch.Tensor:
        return torch.stack([m.features(feats) for m in self.members], dim=1)

    def initial_state(self, v: torch.Tensor):
        return tuple(m.initial_state(x) for m, x in zip(self.members, v.unbind(1)))

    def step_context(self, v: torch.Tensor) -> torch.Tensor:
        return torch.stack([m.step_context(x) for m, x in zip(self.members, v.unbind(1))], dim=1)

    def step(self, ctx: torch.Tensor, tokens: torch.Tensor, state):
        steps = [m.step(c, tokens, s) for m, c, s in zip(self.members, ctx.unbind(1), state)]
        logp = torch.stack([lp for lp, _ in steps]).logsumexp(0) - math.log(len(steps))
        return logp, tuple(s for _, s in steps)


def reorder_state(state, index: torch.Tensor):
    """Pick rows of a recurrent state, or of a tuple of them (beam search bookkeeping); batch is dim 1."""
    if state is None:
        return None
    if isinstance(state, torch.Tensor):
        return state.index_select(1, index)
    return tuple(reorder_state(s, index) for s in state)


def caption_loss(logits: torch.Tensor, targets: torch.Tensor, label_smoothing: float = 0.0) -> torch.Tensor:
    """Cross-entropy over real words only: padding (id 0) is ignored."""
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1),
                           ignore_index=0, label_smoothing=label_smoothing)
