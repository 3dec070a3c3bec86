"""Training's random generators: per-rank seeds under DDP, and a state that round-trips for --resume."""
from __future__ import annotations

import random

import numpy as np
import pytest
import torch

from captioner.decoder import RandDropout
from captioner.train import rank_seed, rng_state, seed_everything, set_rng_state


def draws() -> tuple:
    return torch.rand(3).tolist(), np.random.rand(3).tolist(), [random.random() for _ in range(3)]


def test_ranks_get_their_own_seeds_and_dropout_masks():
    seeds = [rank_seed(42, rank) for rank in range(8)]
    assert seeds[0] == 42  # one process draws what it always did
    assert len(set(seeds)) == 8 and seeds == [rank_seed(42, rank) for rank in range(8)]  # distinct, reproducible
    assert rank_seed(43, 1) != seeds[1]
    masks = []
    for rank in range(2):
        seed_everything(rank_seed(42, rank))
        masks.append(RandDropout(0.5).train()(torch.ones(64)))
    assert not torch.equal(*masks)


def test_generator_state_round_trips_through_a_weights_only_file(tmp_path):
    seed_everything(7)
    torch.save({"rng": [rng_state(torch.device("cpu"))]}, tmp_path / "last.pt")
    expected = draws()
    seed_everything(8)
    set_rng_state(torch.load(tmp_path / "last.pt", weights_only=True)["rng"][0], torch.device("cpu"))
    assert draws() == expected


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_generator_state_round_trips():
    device = torch.device("cuda", 0)
    seed_everything(7)
    state = rng_state(device)
    assert "cuda" in state
    expected = torch.rand(5, device=device)
    torch.cuda.manual_seed(8)
    set_rng_state(state, device)
    assert torch.equal(torch.rand(5, device=device), expected)
