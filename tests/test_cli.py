"""The README's main command, `captioner caption IMG`, through the installed entry point."""
from __future__ import annotations

import json
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


def run_main(capsys, *argv) -> tuple[int, str, str]:
    from captioner.cli import main

    status = main(list(argv))
    out = capsys.readouterr()
    return status, out.out, out.err


def test_old_flag_spellings_still_work_with_a_deprecation_warning(capsys):
    from captioner.cli import build_parser

    args = build_parser().parse_args(["caption", "x.jpg", "--beam", "2"])
    assert args.beam_size == 2
    assert "--beam is deprecated" in capsys.readouterr().err
    args = build_parser().parse_args(["finetune", "--data", "d.csv", "--out", "run", "--from", "start.pt"])
    assert args.start == "start.pt"
    assert "--from is deprecated" in capsys.readouterr().err
    assert build_parser().parse_args(["caption", "x.jpg", "--beam-size", "2"]).beam_size == 2
    assert capsys.readouterr().err == ""


def test_method_and_alpha_flags_reach_the_decoder(capsys):
    photo = str(ROOT / "demo" / "examples" / "grace_hopper.jpg")
    status, greedy, _ = run_main(capsys, "caption", photo, "--method", "greedy")
    assert status == 0
    assert greedy.split("\t")[1].strip() == Captioner.load().caption(photo, method="greedy")["caption"]
    assert greedy == run_main(capsys, "caption", photo, "--beam-size", "1", "--guide", "off")[1]  # beam 1 is greedy

    def score(*flags) -> float:
        status, out, _ = run_main(capsys, "caption", photo, "--json", "--guide", "off", *flags)
        assert status == 0
        return json.loads(out)["score"]

    # Wu's penalty is ((5 + length) / 6) ** alpha: at alpha 0 it divides by 1, as no penalty does.
    assert score("--length-penalty", "wu", "--alpha", "0") == score("--length-penalty", "none")
    assert score("--length-penalty", "wu", "--alpha", "1") != score("--length-penalty", "none")
