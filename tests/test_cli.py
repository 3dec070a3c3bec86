"""The README's main command, `captioner caption IMG`, through the installed entry point."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

from captioner import Captioner

ROOT = Path(__file__).resolve().parents[1]


def captioner_command() -> list[str]:
    """The `captioner` console script of this Python's environment, else `python -m captioner.cli`."""
    script = shutil.which("captioner", path=str(Path(sys.executable).parent))
    return [script] if script else [sys.executable, "-m", "captioner.cli"]


def test_caption_prints_image_tab_caption_for_a_real_photo():
    photo = ROOT / "demo" / "examples" / "grace_hopper.jpg"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    done = subprocess.run([*captioner_command(), "caption", str(photo)], env=env, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert len(lines) == 1, done.stdout
    image, caption = lines[0].split("\t")
    assert image == str(photo)
    assert len(caption.split()) >= 3 and caption == caption.strip()
    assert caption == Captioner.load().caption(photo)["caption"]  # the shipped model, through the one door
