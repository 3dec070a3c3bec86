"""caption-dir: one row per file whatever the file holds, resumable after a crash, shardable."""
from __future__ import annotations

import contextlib
import csv
import io
import json
import os
import signal
import struct
import subprocess
import sys
import textwrap
import time
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from fixtures import draw
from PIL import Image

from captioner import cli
from captioner.folder import caption_dir, list_images
from captioner.images import load_image
from captioner.results_file import OutputError, OutputFile, OutputLocked, exclusive
from captioner.shards import parse_shard, resolve_shard, shard

ROOT = Path(__file__).resolve().parents[1]


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def bomb_png(width: int = 30000, height: int = 30000) -> bytes:
    """A real decompression bomb: ~110 kB on disk, 900 Mpixels (1-bit rows of zeros, streamed into zlib)."""
    row, z = b"\x00" * (1 + (width + 7) // 8), zlib.compressobj(9)
    idat = b"".join(z.compress(row) for _ in range(height)) + z.flush()
    ihdr = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)  # bit depth 1, grayscale
    return b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", ihdr) + _png_chunk(b"IDAT", idat) + _png_chunk(b"IEND", b"")


def asymmetric(size=(300, 200)) -> Image.Image:
    """Red left half, blue bottom-right quarter: every rotation looks different."""
    a = np.zeros((size[1], size[0], 3), np.uint8)
    a[:, : size[0] // 2] = (220, 30, 30)
    a[size[1] // 2:, size[0] // 2:] = (30, 60, 220)
    return Image.fromarray(a)


def exif_rotated_jpeg(path: Path) -> None:
    exif = Image.Exif()
    exif[0x0112] = 6  # Orientation: the stored pixels must be turned 90° clockwise to show upright
    asymmetric().save(path, quality=95, exif=exif)


def animated_gif(path: Path) -> None:
    frames = [Image.new("RGB", (64, 64), c) for c in ((255, 0, 0), (0, 0, 255), (0, 255, 0))]
    frames[0].save(path, save_all=True, append_images=frames[1:], duration=100, loop=0)


def make_corpus(folder: Path) -> tuple[set[str], set[str]]:
    """Every awkward kind of file; returns (names that must caption, names that must be error rows)."""
    folder.mkdir(parents=True, exist_ok=True)
    photo = io.BytesIO()
    draw((220, 30, 30), "circle", seed=1).save(photo, "JPEG", quality=90)
    jpeg = photo.getvalue()

    (folder / "empty.jpg").write_bytes(b"")
    (folder / "truncated.jpg").write_bytes(jpeg[: len(jpeg) // 2])
    (folder / "notes.jpg").write_text("this is not a picture\n")
    (folder / "bomb.png").write_bytes(bomb_png())
    os.symlink(folder / "gone.jpg", folder / "dangling.jpg")

    (folder / "photo.jpg").write_bytes(jpeg)
    draw((30, 60, 220), "square", seed=2).convert("CMYK").save(folder / "cmyk.jpg")
    Image.fromarray((np.arange(64 * 64).reshape(64, 64) * 16).astype(np.uint16)).save(folder / "deep16.png")
    palette = draw((30, 180, 60), "triangle", seed=3).convert("P", palette=Image.Palette.ADAPTIVE)
    palette.save(folder / "palette_alpha.png", transparency=0)
    draw((240, 220, 30), "square", seed=4).convert("RGBA").save(folder / "rgba.png")
    draw((240, 220, 30), "circle", seed=5).convert("L").save(folder / "gray.jpg")
    animated_gif(folder / "anim.gif")
    exif_rotated_jpeg(folder / "rotated.jpg")
    Image.new("RGB", (6000, 4000), (90, 140, 200)).save(folder / "large.jpg", quality=80)
    (folder / "café 日本語 ñ.jpg").write_bytes(jpeg)
    (folder / "sub").mkdir()
    (folder / "sub" / "inner.png").write_bytes((folder / "rgba.png").read_bytes())
    os.symlink("..", folder / "sub" / "loop")  # a link back up: a naive walk never ends
    os.symlink("sub", folder / "sub_again")  # the same folder reachable twice
    (folder / "readme.txt").write_text("not an image extension: not listed\n")
    bad = {"empty.jpg", "truncated.jpg", "notes.jpg", "bomb.png", "dangling.jpg"}
    good = {"photo.jpg", "cmyk.jpg", "deep16.png", "palette_alpha.png", "rgba.png", "gray.jpg", "anim.gif",
            "rotated.jpg", "large.jpg", "café 日本語 ñ.jpg", "sub/inner.png"}
    return good, bad


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    folder = tmp_path_factory.mktemp("corpus")
    good, bad = make_corpus(folder)
    return folder, good, bad


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_every_file_gets_exactly_one_row(captioner, corpus, tmp_path):
    folder, good, bad = corpus
    out = tmp_path / "out.jsonl"
    summary = caption_dir(captioner, folder, out, recursive=True, batch_size=4, workers=2, progress=False)
    rows = read_jsonl(out)
    names = [r["image"] for r in rows]
    assert sorted(names) == sorted(good | bad)  # no duplicates through the link loop, nothing missing
    by_name = {r["image"]: r for r in rows}
    for name in good:
        assert by_name[name]["caption"] and isinstance(by_name[name]["score"], float), by_name[name]
    for name in bad:
        assert set(by_name[name]) == {"image", "error"} and by_name[name]["error"], by_name[name]
    assert "decompression bomb" in by_name["bomb.png"]["error"]
    assert "empty" in by_name["empty.jpg"]["error"]
    assert summary.total == len(rows) and summary.errors == len(bad) and summary.captioned == len(good)
    # A rerun finds everything done, errors included: no row is written twice.
    again = caption_dir(captioner, folder, out, recursive=True, batch_size=4, workers=0, progress=False)
    assert again.skipped == len(rows) and again.captioned == again.errors == 0
    assert len(read_jsonl(out)) == len(rows)


def test_listing_follows_links_once_and_filters_extensions(corpus):
    folder, good, bad = corpus
    listed = list_images(folder, recursive=True)
    assert sorted(listed) == sorted(good | bad) and len(listed) == len(set(listed))
    assert "sub/inner.png" not in list_images(folder)  # not recursive: top level only
    assert list_images(folder, recursive=True, exts=["PNG"]) == ["bomb.png", "deep16.png", "palette_alpha.png",
                                                                 "rgba.png", "sub/inner.png"]


def test_exif_rotation_is_applied(captioner, tmp_path):
    exif_rotated_jpeg(tmp_path / "rotated.jpg")
    with Image.open(tmp_path / "rotated.jpg") as stored:
        unrotated = Image.fromarray(np.asarray(stored.convert("RGB")))  # the stored pixels, without the EXIF tag
    upright = unrotated.transpose(Image.Transpose.ROTATE_270)  # 90° clockwise, by hand
    pixels = captioner.preprocess(tmp_path / "rotated.jpg")
    assert torch.equal(pixels, captioner.preprocess(upright))
    assert not torch.allclose(pixels, captioner.preprocess(unrotated), atol=0.1)


def test_animated_gif_uses_first_frame(captioner, tmp_path):
    animated_gif(tmp_path / "anim.gif")
    pixels = captioner.preprocess(tmp_path / "anim.gif")
    assert torch.equal(pixels, captioner.preprocess(Image.new("RGB", (64, 64), (255, 0, 0))))


def test_16_bit_png_is_scaled_not_clipped(tmp_path):
    ramp = (np.arange(256 * 256).reshape(256, 256)).astype(np.uint16)  # 0 .. 65535
    Image.fromarray(ramp).save(tmp_path / "ramp.png")
    gray = np.asarray(load_image(tmp_path / "ramp.png"))[..., 0].astype(float)
    assert gray.min() == 0 and gray.max() == 255 and 120 < gray.mean() < 135


def test_decompression_bomb_is_refused_in_bounded_memory(tmp_path):
    (tmp_path / "bomb.png").write_bytes(bomb_png())
    assert (tmp_path / "bomb.png").stat().st_size < 200_000  # small on disk, 900 Mpixels when decoded
    # A fresh process, so its peak memory (ru_maxrss, KiB on Linux) shows what the load cost;
    # it runs images.py alone (Pillow only) to skip importing torch.
    script = textwrap.dedent(f"""
        import resource, runpy, sys
        images = runpy.run_path({str(ROOT / "captioner" / "images.py")!r})
        before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        try:
            images["load_image"]({str(tmp_path / "bomb.png")!r})
            sys.exit("the bomb was decoded")
        except images["ImageError"] as e:
            print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before, e)
    """)
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    grown_kib, message = done.stdout.split(" ", 1)
    assert "decompression bomb" in message
    assert int(grown_kib) < 64 * 1024


def test_torn_last_line_is_cut_and_foreign_files_are_left_alone(tmp_path):
    out = OutputFile(tmp_path / "out.jsonl")
    out.append([{"image": "a.jpg", "caption": "a dog", "score": -1.0}, {"image": "b.jpg", "error": "empty"}])
    whole = out.path.read_bytes()
    with open(out.path, "ab") as f:
        f.write(b'{"image": "c.jpg", "capt')  # a crash in the middle of a write
    assert set(out.last_rows()) == {"a.jpg", "b.jpg"}
    assert out.path.read_bytes() == whole

    foreign = tmp_path / "notes.jsonl"
    foreign.write_bytes(b'{"image": "a.jpg"}\nsomething else')
    with pytest.raises(OutputError):
        OutputFile(foreign).rows()
    assert foreign.read_bytes() == b'{"image": "a.jpg"}\nsomething else'

    table = OutputFile(tmp_path / "out.csv")
    table.append([{"image": "x, \"quoted\".jpg", "caption": "a cat", "score": -2.5}])
    table.append([{"image": "y.jpg", "error": "not an image"}])
    whole = table.path.read_bytes()
    with open(table.path, "ab") as f:
        f.write(b'z.jpg,a ca')
    assert set(table.last_rows()) == {'x, "quoted".jpg', "y.jpg"}
    assert table.path.read_bytes() == whole
    with pytest.raises(ValueError):
        OutputFile(tmp_path / "out.txt")


def test_shards_partition_the_folder(captioner, tiny_data, tmp_path):
    folder = tiny_data / "Flicker8k_Dataset"
    rows = []
    for i in range(3):
        caption_dir(captioner, folder, tmp_path / f"shard{i}.csv", batch_size=8, workers=0, shard_spec=(i, 3),
                    progress=False)
        with open(tmp_path / f"shard{i}.csv", newline="") as f:
            rows += [r["image"] for r in csv.DictReader(f)]
    assert len(rows) == len(set(rows)) and sorted(rows) == list_images(folder)
    assert parse_shard("2/3") == (2, 3)
    for bad in ("3/3", "1", "a/b", "-1/2"):
        with pytest.raises(ValueError):
            parse_shard(bad)


def photo_folder(folder: Path, n: int) -> Path:
    folder.mkdir()
    for i in range(n):
        draw((220, 30, 30) if i % 2 else (30, 60, 220), "square" if i % 3 else "circle", seed=i).save(
            folder / f"img{i:03d}.jpg", quality=85)
    return folder


def caption_dir_command(folder: Path, out: Path, checkpoint: Path, workers: int) -> list[str]:
    return [sys.executable, "-m", "captioner.cli", "caption-dir", str(folder), "--out", str(out), "--checkpoint",
            str(checkpoint), "--device", "cpu", "--batch-size", "4", "--workers", str(workers)]


def wait_for_rows(out: Path, proc: subprocess.Popen, rows: int) -> None:
    deadline = time.monotonic() + 120
    while not (out.exists() and out.read_bytes().count(b"\n") >= rows):
        assert proc.poll() is None and time.monotonic() < deadline, "caption-dir ended before it was caught running"
        time.sleep(0.02)


@contextlib.contextmanager
def parent_killed_mid_run(cmd: list[str], out: Path, env: dict, rows: int = 8):
    """Runs caption-dir and kill -9s the parent only once `rows` rows are written (its DataLoader
    workers live on for seconds); the whole process group is killed on leaving."""
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    try:
        wait_for_rows(out, proc, rows)
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
        yield
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)


def test_sigkill_mid_run_then_rerun_completes_without_duplicates(tiny_checkpoint, tmp_path):
    folder = photo_folder(tmp_path / "photos", 64)
    out = tmp_path / "out.jsonl"
    cmd = caption_dir_command(folder, out, tiny_checkpoint, workers=1)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    with parent_killed_mid_run(cmd, out, env):
        pass
    partial = read_jsonl(out)  # every line whole: parses
    assert 8 <= len(partial) < 64
    with open(out, "ab") as f:  # and as if power failed mid-write as well: a torn last line
        f.write(b'{"image": "img1')
    rerun = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert rerun.returncode == 0, rerun.stderr
    names = [r["image"] for r in read_jsonl(out)]
    assert sorted(names) == [f"img{i:03d}.jpg" for i in range(64)]  # none missing, none twice
    assert f"{len(partial)} already in" in rerun.stderr


def test_a_run_killed_with_live_workers_never_blocks_its_immediate_resume(tiny_checkpoint, tmp_path):
    folder = photo_folder(tmp_path / "photos", 64)
    out = tmp_path / "out.jsonl"
    cmd = caption_dir_command(folder, out, tiny_checkpoint, workers=2)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    with parent_killed_mid_run(cmd, out, env):  # resumed while its workers still live
        rerun = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert rerun.returncode == 0, rerun.stderr
    names = [r["image"] for r in read_jsonl(out)]
    assert sorted(names) == [f"img{i:03d}.jpg" for i in range(64)]  # none missing, none twice


def test_a_symlinked_lock_file_is_refused_and_its_target_untouched(tmp_path):
    target = tmp_path / "precious.txt"
    target.write_text("mine")
    (tmp_path / "out.jsonl.lock").symlink_to(target)
    with pytest.raises(OutputError, match="symbolic link"):
        with exclusive(tmp_path / "out.jsonl"):
            pass
    assert target.read_text() == "mine"


def test_compaction_writes_through_a_symlinked_output_and_keeps_its_mode(tmp_path):
    real = tmp_path / "store" / "captions.jsonl"
    real.parent.mkdir()
    link = tmp_path / "out.jsonl"
    link.symlink_to(real)
    table = OutputFile(link)
    table.append([{"image": "a.jpg", "error": "empty"}, {"image": "a.jpg", "caption": "a dog", "score": -1.0}])
    real.chmod(0o600)
    assert table.compact() == 1
    assert link.is_symlink() and [r["caption"] for r in read_jsonl(real)] == ["a dog"]
    assert real.stat().st_mode & 0o777 == 0o600


def test_a_full_disk_is_one_line_and_the_rows_written_stay(tiny_checkpoint, tiny_data, tmp_path, monkeypatch, capsys):
    import errno

    from captioner import results_file

    out = tmp_path / "out.jsonl"
    args = ["caption-dir", str(tiny_data / "Flicker8k_Dataset"), "--out", str(out), "--checkpoint",
            str(tiny_checkpoint), "--device", "cpu", "--workers", "0", "--batch-size", "4"]
    appended = results_file._append
    calls = []

    def fills_up(path, data):
        calls.append(path)
        if len(calls) > 1:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        appended(path, data)

    monkeypatch.setattr(results_file, "_append", fills_up)
    assert cli.main(args) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    assert err.strip().splitlines()[-1].startswith("captioner caption-dir: error: No space left on device")
    assert len(read_jsonl(out)) == 4  # the batch written before the disk filled
    monkeypatch.setattr(results_file, "_append", appended)
    assert cli.main(args) == 0  # space freed: it resumes
    assert sorted(r["image"] for r in read_jsonl(out)) == list_images(tiny_data / "Flicker8k_Dataset")


def test_csv_torn_row_with_a_newline_inside_a_quoted_name_resumes(tmp_path):
    table = OutputFile(tmp_path / "out.csv")
    table.append([{"image": "two\nlines.jpg", "caption": "a dog", "score": -1.5}, {"image": "b.jpg", "error": "empty"}])
    whole = table.path.read_bytes()
    with open(table.path, "ab") as f:
        f.write(b'"torn\nname.jpg",a ca')  # a crash inside the row of a name with a newline in it
    assert list(table.last_rows()) == ["two\nlines.jpg", "b.jpg"]
    assert table.path.read_bytes() == whole
    table.append([{"image": "c.jpg", "caption": "a cat", "score": -2.0}])  # the run goes on from there
    with open(table.path, newline="") as f:
        assert [r["image"] for r in csv.DictReader(f)] == ["two\nlines.jpg", "b.jpg", "c.jpg"]


def test_a_file_keeps_its_shard_when_the_folder_differs_between_machines():
    here = [f"img{i:03d}.jpg" for i in range(200)]
    there = sorted(set(here[::3]) | {f"extra{i}.jpg" for i in range(50)})  # fewer files, and others
    for i in range(4):
        assert set(shard(here, i, 4)) & set(there) == set(shard(there, i, 4)) & set(here)
    parts = [shard(there, i, 4) for i in range(4)]
    assert sorted(sum(parts, [])) == there and all(len(p) > 20 for p in parts)  # disjoint, complete, balanced


def test_shard_comes_from_the_scheduler_when_not_given():
    assert resolve_shard("1/3", {"RANK": "0", "WORLD_SIZE": "2"}) == (1, 3, "--shard")
    assert resolve_shard(None, {"RANK": "1", "WORLD_SIZE": "2", "LOCAL_RANK": "1"}) == (1, 2, "RANK/WORLD_SIZE")
    slurm = {"SLURM_ARRAY_TASK_ID": "7", "SLURM_ARRAY_TASK_COUNT": "4", "SLURM_ARRAY_TASK_MIN": "5"}
    assert resolve_shard(None, slurm) == (2, 4, "SLURM_ARRAY_TASK_ID/SLURM_ARRAY_TASK_COUNT")
    stepped = {**slurm, "SLURM_ARRAY_TASK_ID": "35", "SLURM_ARRAY_TASK_MIN": "5", "SLURM_ARRAY_TASK_STEP": "10"}
    assert resolve_shard(None, stepped)[:2] == (3, 4)  # --array=5-35:10
    assert resolve_shard(None, {"SLURM_JOB_ID": "12"}) == (0, 1, "no shard")
    with pytest.raises(ValueError, match="RANK/WORLD_SIZE"):
        resolve_shard(None, {"RANK": "2", "WORLD_SIZE": "2"})


def test_caption_dir_under_torchrun_takes_its_shard_and_says_so(tiny_checkpoint, tiny_data, tmp_path, monkeypatch,
                                                               capsys):
    folder = tiny_data / "Flicker8k_Dataset"
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert cli.main(["caption-dir", str(folder), "--out", str(tmp_path / "out.{shard}.jsonl"), "--checkpoint",
                     str(tiny_checkpoint), "--device", "cpu", "--workers", "0"]) == 0
    assert "shard 1/2 (from RANK/WORLD_SIZE)" in capsys.readouterr().err
    names = [r["image"] for r in read_jsonl(tmp_path / "out.1-of-2.jsonl")]
    assert names == shard(list_images(folder), 1, 2) and 0 < len(names) < len(list_images(folder))


def test_a_second_run_on_the_same_output_refuses_naming_the_first(captioner, tiny_data, tmp_path):
    out = tmp_path / "out.jsonl"
    with exclusive(out):  # another run, as far as caption_dir can tell: the lock is taken through a new open file
        with pytest.raises(OutputLocked, match=f"pid {os.getpid()} on "):
            caption_dir(captioner, tiny_data / "Flicker8k_Dataset", out, workers=0, progress=False)
    assert not out.exists()  # it refused before writing anything
    caption_dir(captioner, tiny_data / "Flicker8k_Dataset", out, workers=0, progress=False)  # free again


def test_two_runs_on_one_output_write_each_row_once(tiny_checkpoint, tmp_path):
    folder = photo_folder(tmp_path / "photos", 48)
    out = tmp_path / "out.jsonl"
    cmd = caption_dir_command(folder, out, tiny_checkpoint, workers=0)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    first = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    waiting = None
    try:
        wait_for_rows(out, first, 4)  # the first run is writing
        os.kill(first.pid, signal.SIGSTOP)  # paused mid-run, holding the output, however fast the others start
        refused = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
        assert refused.returncode == 2 and f"pid {first.pid} on " in refused.stderr, refused.stderr
        waiting = subprocess.Popen(cmd + ["--wait"], cwd=ROOT, env=env, stdout=subprocess.DEVNULL,
                                   stderr=subprocess.PIPE, text=True)
        said = ""
        while "waiting for the run" not in said and waiting.poll() is None:
            said += waiting.stderr.readline()
        assert f"pid {first.pid} on " in said, said
        os.kill(first.pid, signal.SIGCONT)
        assert first.wait(timeout=300) == 0
        said += waiting.stderr.read()
        assert waiting.wait(timeout=300) == 0 and "48 already in" in said, said  # it found the work done
    finally:
        for proc in (first, waiting):
            if proc:
                proc.kill()
                proc.wait()
    names = [r["image"] for r in read_jsonl(out)]
    assert sorted(names) == [f"img{i:03d}.jpg" for i in range(48)]  # none twice


@pytest.mark.parametrize("suffix", [".jsonl", ".csv"])
def test_retry_errors_captions_error_rows_again_and_keeps_one_row_per_image(captioner, tmp_path, suffix):
    folder = tmp_path / "photos"
    folder.mkdir()
    for i in range(3):
        draw((30, 60, 220), "circle", seed=i).save(folder / f"ok{i}.jpg")
    (folder / "late.jpg").write_bytes(b"")  # still being copied when the first run read it
    out = OutputFile(tmp_path / f"out{suffix}")
    first = caption_dir(captioner, folder, out.path, workers=0, progress=False)
    assert first.errors == 1 and out.last_rows()["late.jpg"]["error"]
    draw((220, 30, 30), "square", seed=9).save(folder / "late.jpg")  # the copy has finished
    assert caption_dir(captioner, folder, out.path, workers=0, progress=False).skipped == 4  # error rows stay
    again = caption_dir(captioner, folder, out.path, workers=0, progress=False, retry_errors=True)
    assert (again.retried, again.captioned, again.errors, again.skipped) == (1, 1, 0, 3)
    rows = out.rows()
    assert [r["image"] for r in rows] == ["late.jpg", "ok0.jpg", "ok1.jpg", "ok2.jpg"]  # one row each, in place
    assert rows[0]["caption"] and not rows[0].get("error")


def test_a_retry_cut_short_resumes_from_each_images_last_row(captioner, tmp_path):
    folder = tmp_path / "photos"
    folder.mkdir()
    for name in ("a.jpg", "b.jpg"):
        draw((30, 60, 220), "circle", seed=1).save(folder / name)
    out = OutputFile(tmp_path / "out.jsonl")
    # A retry run killed after appending a's new row, before rewriting the file: two rows for a.jpg.
    out.append([{"image": "a.jpg", "error": "empty"}, {"image": "b.jpg", "error": "empty"}])
    out.append([{"image": "a.jpg", "caption": "a blue circle", "score": -1.0}])
    assert out.last_rows()["a.jpg"]["caption"] == "a blue circle"
    summary = caption_dir(captioner, folder, out.path, workers=0, progress=False, retry_errors=True)
    assert (summary.retried, summary.captioned) == (1, 1)  # only b.jpg: a.jpg's last row is a caption
    rows = out.rows()
    assert [r["image"] for r in rows] == ["a.jpg", "b.jpg"] and all("caption" in r for r in rows)
    assert rows[0]["caption"] == "a blue circle"


def test_csv_cells_open_as_text_in_a_spreadsheet_and_resume_by_their_real_names(captioner, tmp_path):
    photos = tmp_path / "photos"
    photos.mkdir()
    for name in ("=HYPERLINK(1).jpg", "+1.jpg", "-2.jpg", "@SUM(A1).jpg", "'quoted.jpg", "plain.jpg"):
        asymmetric().save(photos / name)
    (photos / "=thin.png").write_bytes(bomb_png(40000, 1))  # 201 bytes; far too long once resized
    out = tmp_path / "out.csv"
    caption_dir(captioner, photos, out, workers=0, progress=False)
    with open(out, newline="") as f:
        rows = list(csv.DictReader(f))
    assert sorted(r["image"] for r in rows) == sorted(
        ["'=HYPERLINK(1).jpg", "'+1.jpg", "'-2.jpg", "'@SUM(A1).jpg", "''quoted.jpg", "plain.jpg", "'=thin.png"])
    assert all(float(r["score"]) < 0 for r in rows if not r["error"])  # numbers stay numbers
    (thin,) = [r for r in rows if r["error"]]
    assert thin["image"] == "'=thin.png" and "aspect ratio" in thin["error"]
    # The resume reads the names back as they are on disk: nothing is captioned twice.
    summary = caption_dir(captioner, photos, out, workers=0, progress=False)
    assert summary.skipped == 7 and summary.captioned == 0


def _die_on_poison(path):
    if path.name == "poison.png":
        os.kill(os.getpid(), signal.SIGKILL)  # as the OOM killer ends a process
    return path.name.upper()


def test_a_reader_killed_by_one_file_makes_that_files_error_row_and_the_run_goes_on(tmp_path):
    from captioner.folder import Readers

    names = ["a.png", "b.png", "poison.png", "c.png", "d.png", "e.png", "f.png"]
    jobs = [[(tmp_path / n, n) for n in names[i:i + 2]] for i in range(0, len(names), 2)]
    items = [it for batch in Readers(_die_on_poison, workers=2)(jobs) for it in batch]
    assert [it.name for it in items] == names
    assert [it.pixels for it in items if it.name != "poison.png"] == [n.upper() for n in names if n != "poison.png"]
    poisoned = next(it for it in items if it.name == "poison.png")
    assert poisoned.pixels is None and "the process reading it died" in poisoned.error
