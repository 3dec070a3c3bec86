from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))
from fixtures import make_flickr8k  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
FLICKR8K = ROOT.parent / "shared" / "data" / "flickr8k"


def tiny_config(data_root: Path, work: Path, *overrides: str):
    from captioner.config import load_config

    return load_config(ROOT / "configs" / "tiny.yaml", [
        f"data.root={data_root}", f"data.feature_cache={work / 'cache'}", f"train.out_dir={work / 'run'}", *overrides])


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory) -> Path:
    """A generated Flickr8k-layout dataset: 4 classes of shapes, 6 train + 2 dev images each."""
    return make_flickr8k(tmp_path_factory.mktemp("tiny_flickr8k"))


@pytest.fixture(scope="session")
def tiny_run(tiny_data, tmp_path_factory):
    """Features extracted and a tiny model trained for a few epochs: (config, checkpoint path)."""
    from captioner.features import extract_all
    from captioner.train import train

    work = tmp_path_factory.mktemp("tiny_run")
    cfg = tiny_config(tiny_data, work, "train.epochs=8")
    torch.manual_seed(0)
    extract_all(cfg, batch_size=16, num_workers=0)
    train(cfg)
    return cfg, Path(cfg.train.out_dir) / "best.pt"


@pytest.fixture(scope="session")
def tiny_checkpoint(tiny_run) -> Path:
    return tiny_run[1]


@pytest.fixture(scope="session")
def captioner(tiny_checkpoint):
    from captioner import Captioner

    return Captioner.load(tiny_checkpoint, device="cpu")


def requires_flickr8k():
    return pytest.mark.skipif(not (FLICKR8K / "Flickr8k.token.txt").is_file(),
                              reason=f"real Flickr8k data not found at {FLICKR8K}")
