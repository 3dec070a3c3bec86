"""`captioner caption` on a CPU: served from the checkpoint's bundle (the shipped one, else the cached export)
without torch, with torch's captions."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
from conftest import FLICKR8K, ROOT, requires_flickr8k
from live_server import server_process

from captioner import bundles
from captioner.files import DEFAULT_CHECKPOINT, file_sha256
from captioner.runtime import OPTIONS, ROUTE, Runtime, read_manifest
from captioner.tags import MAPPING

# The child cannot import torch or torchvision: a caption served from the bundle must not need them.
NO_TORCH = "import sys\nfor m in ('torch', 'torchvision'): sys.modules[m] = None\n"
# Nor reach a network (local sockets still work: a reader process hands over pixels through one).
OFFLINE = """import socket
def connect(sock, address, connect=socket.socket.connect):
    if sock.family in (socket.AF_INET, socket.AF_INET6):
        raise OSError("no network in this test")
    return connect(sock, address)
socket.socket.connect = connect
"""
RUN_CLI = "from captioner.cli import main\nsys.exit(main(sys.argv[1:]))\n"
DEMO = sorted(str(p) for p in (ROOT / "demo" / "examples").glob("*.jpg"))


def captioner(cache, *args: str, torch: bool = True) -> subprocess.CompletedProcess:
    code = ("import sys\n" if torch else NO_TORCH) + OFFLINE + RUN_CLI
    env = {**os.environ, "CAPTIONER_CACHE": str(cache)}
    return subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, cwd=ROOT, env=env,
                          timeout=600)


def test_first_use_prepares_the_bundle_offline_then_captions_without_torch(tiny_run, tmp_path):
    _, model = tiny_run
    photos = DEMO[:3]
    torch_run = captioner(tmp_path, "caption", *photos, "-c", str(model), "--engine", "torch", "--json")
    assert torch_run.returncode == 0 and torch_run.stderr == "", torch_run.stderr
    assert not (tmp_path / "bundles").exists()  # --engine torch makes no bundle

    first = captioner(tmp_path, "caption", *photos, "-c", str(model), "--json")
    assert first.returncode == 0, first.stderr
    note = first.stderr.strip().splitlines()
    assert len(note) == 1 and note[0].startswith(f"captioner: preparing {model.name} for onnxruntime"), first.stderr

    again = captioner(tmp_path, "caption", *photos, "-c", str(model), "--json", torch=False)
    assert again.returncode == 0 and again.stderr == "", again.stderr
    rows = [json.loads(line) for line in again.stdout.splitlines()]
    assert [r["caption"] for r in rows] == [json.loads(line)["caption"] for line in torch_run.stdout.splitlines()]
    assert first.stdout == again.stdout


def test_without_torch_and_without_a_bundle_the_advice_is_one_line(tiny_run, tmp_path):
    _, model = tiny_run
    r = captioner(tmp_path, "caption", DEMO[0], "-c", str(model), torch=False)
    assert r.returncode == 2 and r.stdout == ""
    assert r.stderr.splitlines() == ["captioner caption: this needs torch, which comes with the training extra: "
                                     "pip install 'captioner[train]'"]


def test_a_cache_others_can_write_is_refused_not_run(tiny_run, tmp_path):
    _, model = tiny_run
    assert captioner(tmp_path, "caption", DEMO[0], "-c", str(model)).returncode == 0
    assert [oct(p.stat().st_mode & 0o777) for p in (tmp_path, tmp_path / "bundles")] == ["0o700", "0o700"]
    (tmp_path / "bundles").chmod(0o777)  # a shared cache anyone could have planted a bundle in
    r = captioner(tmp_path, "caption", DEMO[0], "-c", str(model), torch=False)
    assert r.returncode == 2 and r.stdout == "" and "Traceback" not in r.stderr
    assert r.stderr.strip().splitlines() == [
        "captioner caption: error: the cache folder is not yours alone (another owner, or group or others may "
        f"write to it); set CAPTIONER_CACHE to a folder only you can write: {tmp_path / 'bundles'} (check the "
        "permissions, or write to another place)"]


def test_bad_options_fail_before_any_model_loads(tmp_path):
    r = captioner(tmp_path, "caption", DEMO[0], "--beam", "0", torch=False)
    assert r.returncode == 2 and "beam_size must be an integer >= 1" in r.stderr, r.stderr


def test_the_shipped_bundle_is_the_shipped_checkpoints():
    """Regenerate it with `captioner export --out captioner/assets/flickr8k_lite0.bundle` when this fails."""
    from captioner.inference import Captioner

    manifest = read_manifest(bundles.SHIPPED)  # every file's SHA-256 checked
    assert manifest["made_by"]["checkpoint_sha256"] == file_sha256(DEFAULT_CHECKPOINT)
    assert (bundles.SHIPPED / manifest["files"]["tag_mapping"]["path"]).read_bytes() == MAPPING.read_bytes()
    by_torch = Captioner.load(device="cpu")
    assert manifest["vocab"] == by_torch.vocab.to_dict()
    assert {k: manifest["decode"][k] for k in OPTIONS + ROUTE} == {k: getattr(by_torch.config.decode, k)
                                                                   for k in OPTIONS + ROUTE}
    want, got = by_torch.caption(DEMO, n_best=2), Runtime(bundles.SHIPPED).caption(DEMO, n_best=2)
    assert [[h["caption"] for h in hyps] for hyps in got] == [[h["caption"] for h in hyps] for hyps in want]
    assert [hyps[0]["tags"] for hyps in got] == [hyps[0]["tags"] for hyps in want]
    assert all(abs(g["score"] - w["score"]) < 1e-3 for gs, ws in zip(got, want) for g, w in zip(gs, ws))
    # The checkpoint's fp16 decoder and classifier weights stay fp16 in the graphs (cast back when they load).
    assert sum(f.stat().st_size for f in bundles.SHIPPED.iterdir()) < 35e6


@requires_flickr8k()
def test_the_shipped_model_captions_at_first_use_offline_as_torch_does(tmp_path):
    """An empty cache, no torch, no network: the shipped bundle serves at once, with nothing to prepare."""
    names = (FLICKR8K / "Flickr_8k.devImages.txt").read_text().split()[:40]
    photos = [str(FLICKR8K / "Flicker8k_Dataset" / n) for n in names] + DEMO
    by_torch = captioner(tmp_path / "torch", "caption", *photos, "--engine", "torch")
    assert by_torch.returncode == 0, by_torch.stderr
    served = captioner(tmp_path / "empty", "caption", *photos, torch=False)
    assert served.returncode == 0 and served.stderr == "", served.stderr
    assert served.stdout == by_torch.stdout and len(served.stdout.splitlines()) == len(photos)
    assert not (tmp_path / "empty" / "bundles").exists()  # nothing exported


def test_a_shipped_bundle_of_another_checkpoint_is_never_used(tiny_run, tmp_path, monkeypatch, capsys):
    _, model = tiny_run
    monkeypatch.setenv("CAPTIONER_CACHE", str(tmp_path))
    monkeypatch.setattr(bundles, "DEFAULT_CHECKPOINT", model)  # a replaced shipped checkpoint, its bundle not
    served = bundles.load(device="cpu")
    assert served.manifest["made_by"]["checkpoint_sha256"] == file_sha256(model)  # exported, not the shipped one
    assert capsys.readouterr().err.startswith(f"captioner: preparing {model.name} for onnxruntime")


@pytest.mark.parametrize("args", [["--engine", "torch"], ["--precision", "bf16"]])
def test_what_only_torch_runs_is_served_by_torch(tiny_run, tmp_path, args):
    _, model = tiny_run
    r = captioner(tmp_path, "caption", DEMO[0], "-c", str(model), *args, torch=False)
    assert r.returncode == 2 and "pip install 'captioner[train]'" in r.stderr  # it asked for torch


@pytest.mark.parametrize("ui", [True, False])
def test_serve_runs_the_bundle_without_torch_with_torch_captions(tiny_run, tmp_path, ui):
    """`captioner serve` on a CPU: the API and the UI answer from the cached bundle in a process without torch;
    with --no-ui, without gradio either."""
    import httpx

    from captioner.inference import Captioner

    _, model = tiny_run
    assert captioner(tmp_path, "caption", DEMO[0], "-c", str(model)).returncode == 0  # prepares the bundle
    code = NO_TORCH + ("" if ui else "sys.modules['gradio'] = None\n") + RUN_CLI
    args = ["serve", "-c", str(model), *([] if ui else ["--no-ui"])]
    with server_process([sys.executable, "-c", code, *args], cwd=ROOT, stderr=subprocess.PIPE, text=True,
                        env={**os.environ, "CAPTIONER_CACHE": str(tmp_path)}) as (url, _):
        assert httpx.get(url + "/healthz").json() == {"status": "ok", "device": "cpu"}
        files = [("images", (os.path.basename(p), open(p, "rb").read(), "image/jpeg")) for p in DEMO[:3]]
        r = httpx.post(url + "/v1/captions", files=files, data={"n_best": "2"}, timeout=120)
        assert r.status_code == 200, r.text
        by_torch = Captioner.load(model, device="cpu").caption(DEMO[:3], n_best=2)
        rows = r.json()["results"]  # tags once per photo, beside its n-best list
        assert [row["captions"] for row in rows] == [[{"caption": h["caption"], "score": h["score"]} for h in hyps]
                                                     for hyps in by_torch]
        assert [row["tags"] for row in rows] == [hyps[0]["tags"] for hyps in by_torch]
        page = httpx.get(url + "/")
        assert "gradio" in page.text.lower() if ui else page.status_code == 404


def test_caption_dir_runs_the_bundle_without_torch_with_torch_captions(tiny_run, tmp_path):
    _, model = tiny_run
    photos = tmp_path / "photos"
    photos.mkdir()
    for p in DEMO:
        (photos / os.path.basename(p)).write_bytes(open(p, "rb").read())
    (photos / "broken.jpg").write_bytes(b"not a photo")
    args = ["caption-dir", str(photos), "-c", str(model), "--workers", "2"]
    by_torch = captioner(tmp_path, *args, "--out", str(tmp_path / "torch.jsonl"), "--engine", "torch")
    assert by_torch.returncode == 0, by_torch.stderr
    captioner(tmp_path, "caption", DEMO[0], "-c", str(model))  # prepares the bundle
    served = captioner(tmp_path, *args, "--out", str(tmp_path / "bundle.jsonl"), torch=False)
    assert served.returncode == 0, served.stderr
    rows = (tmp_path / "bundle.jsonl").read_text().splitlines()
    assert rows == (tmp_path / "torch.jsonl").read_text().splitlines() and len(rows) == len(DEMO) + 1
    assert '"error"' in next(r for r in rows if "broken.jpg" in r)
