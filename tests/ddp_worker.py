"""Run by tests/test_train.py under torchrun: train, then save this rank's parameters."""
import os
import sys
from pathlib import Path

import torch

from captioner.config import load_config
from captioner.train import train

config, out, *overrides = sys.argv[1:]
model = train(load_config(config, overrides))
torch.save(model.decoder.state_dict(), Path(out) / f"rank{os.environ['RANK']}.pt")
(Path(out) / f"seed{os.environ['RANK']}").write_text(str(torch.initial_seed()))
