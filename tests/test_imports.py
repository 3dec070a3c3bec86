"""The package's import graph: no circle of modules, and commands load only what they use."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import httpx
import pytest
from live_server import server_process

from captioner.files import DEFAULT_CHECKPOINT

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))
from import_graph import cycles, graph  # noqa: E402

# Run in a child where torch and torchvision cannot be imported, then say whether anything tried.
NO_TORCH = """
import sys
for m in ("torch", "torchvision"):
    sys.modules[m] = None  # `import torch` now raises ImportError
from captioner.cli import main
try:
    code = main(sys.argv[1:])
except SystemExit as e:
    code = e.code
sys.exit(code)
"""
NO_GRADIO = "import sys\nsys.modules['gradio'] = None  # a plain install: no ui extra\n" + NO_TORCH


def captioner_without_torch(*args: str, cache: Path | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, **({"CAPTIONER_CACHE": str(cache)} if cache else {})}
    return subprocess.run([sys.executable, "-c", NO_TORCH, *args], capture_output=True, text=True, cwd=ROOT,
                          timeout=120, env=env)


def test_no_import_cycle_counting_imports_inside_functions():
    edges = graph(ROOT / "captioner", inner=True)
    assert "output" in edges["runtime"] and "features" in edges["cli"]  # inner imports were read
    assert cycles(edges) == []


def test_cycles_finds_a_circle():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_help_and_argument_errors_do_not_import_torch():
    r = captioner_without_torch("--help")
    assert r.returncode == 0 and "caption-dir" in r.stdout, r.stderr
    for command in ("caption", "caption-dir", "serve", "train", "evaluate", "export"):
        r = captioner_without_torch(command, "--help")
        assert r.returncode == 0 and "usage: captioner" in r.stdout, (command, r.stderr)
    for bad in (["caption"], ["caption", "x.jpg", "--beam", "three"], ["no-such-command"]):
        r = captioner_without_torch(*bad)
        assert r.returncode == 2 and "usage: captioner" in r.stderr and "Traceback" not in r.stderr, (bad, r.stderr)


@pytest.mark.parametrize("args", [
    ["train", "--config", "configs/tiny.yaml"], ["extract-features", "--config", "configs/tiny.yaml"],
    ["export", "--out", "{tmp}/bundle"], ["finetune", "--data", "{tmp}/captions.csv", "--out", "{tmp}/run"],
    ["evaluate", "--data", "{tmp}", "--split", "dev"],
    ["evaluate", "--data", "{tmp}", "--split", "dev", "--engine", "torch"],
    ["caption", "demo/examples/cat.jpg", "--engine", "torch"],
    ["caption", "demo/examples/cat.jpg", "-c", "{tmp}/mine.pt"],  # a checkpoint of one's own: its bundle is exported
], ids=lambda args: " ".join(a for a in args if "{tmp}" not in a))
def test_a_command_that_needs_the_training_extra_says_so_in_one_line(tmp_path, args):
    shutil.copyfile(DEFAULT_CHECKPOINT, tmp_path / "mine.pt")
    r = captioner_without_torch(*(a.format(tmp=tmp_path) for a in args), cache=tmp_path / "cache")
    assert (r.returncode, r.stdout) == (2, "")
    assert r.stderr.splitlines() == [f"captioner {args[0]}: this needs torch, which comes with the training extra: "
                                     "pip install 'captioner[train]'"]


def test_serve_without_gradio_serves_the_api_alone_and_says_so_in_one_line(tmp_path):
    from captioner import bundles

    cat = ROOT / "demo" / "examples" / "cat.jpg"
    with server_process([sys.executable, "-c", NO_GRADIO, "serve"], cwd=ROOT, text=True, stderr=subprocess.PIPE,
                        env={**os.environ, "CAPTIONER_CACHE": str(tmp_path)}) as (url, server):
        assert httpx.get(url + "/healthz").json() == {"status": "ok", "device": "cpu"}
        r = httpx.post(url + "/v1/captions", files=[("images", (cat.name, cat.read_bytes(), "image/jpeg"))], timeout=60)
        assert r.status_code == 200, r.text
        assert r.json()["results"] == [{"filename": cat.name, **bundles.load(device="cpu").caption(cat)}]
        assert httpx.get(url + "/").status_code == 404  # no demo page
    stderr = server.stderr.read()
    assert "Traceback" not in stderr and [line for line in stderr.splitlines() if "captioner" in line] == [
        "captioner serve: serving the API alone: the demo page at / needs gradio, which comes with the ui extra: "
        "pip install 'captioner[ui]'"]


def test_demo_without_gradio_says_so_in_one_line(tmp_path):
    r = subprocess.run([sys.executable, "-c", NO_GRADIO, "demo", "--port", "0"], capture_output=True, text=True,
                       cwd=ROOT, timeout=120, env={**os.environ, "CAPTIONER_CACHE": str(tmp_path)})
    assert (r.returncode, r.stdout) == (2, "")
    assert r.stderr.splitlines() == ["captioner demo: the demo needs gradio, which comes with the ui extra: "
                                     "pip install 'captioner[ui]'"]
