"""The benchmark's reference decoder computes exactly what captioner's Decoder computes."""
from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

from captioner.config import ModelConfig
from captioner.decoder import Decoder

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))
from benchmark import LoopDecoder, n_params  # noqa: E402


@pytest.mark.parametrize("feature_proj", [0, 8])
def test_loop_decoder_is_the_same_math_as_decoder(feature_proj):
    torch.manual_seed(0)
    dec = Decoder(ModelConfig(embed_dim=16, hidden_dim=24, feature_proj=feature_proj), vocab_size=30,
                  feature_dim=12).eval()
    ref = LoopDecoder.like(dec).eval()
    assert n_params(ref) == n_params(dec)
    feats, tokens = torch.randn(4, 12), torch.randint(0, 30, (4, 7))
    torch.testing.assert_close(ref(feats, tokens), dec(feats, tokens))
    # Same weights, not shared ones: training one must not move the other.
    assert all(a.data_ptr() != b.data_ptr() for a, b in zip(ref.parameters(), dec.parameters()))
