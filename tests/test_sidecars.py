"""Sidecars, embedded XMP and alt text, read back by exiftool: the client photo managers rely on."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from test_folder import ROOT, caption_dir_command, parent_killed_mid_run, photo_folder, read_jsonl

from captioner import cli
from captioner.folder import caption_dir
from captioner.results_file import OutputFile
from captioner.sidecars import (
    NS,
    EmbedError,
    Sidecars,
    embed,
    merge_xmp,
    parse_xmp,
    tag_names,
    write_txt,
    write_xmp,
)

EXAMPLES = ROOT / "demo" / "examples"
needs_exiftool = pytest.mark.skipif(shutil.which("exiftool") is None, reason="exiftool is not installed "
                                    "(Debian: libimage-exiftool-perl)")


def exiftool(*args) -> list[dict]:
    """exiftool's JSON for the files, lists kept lists (-struct), every value as text."""
    out = subprocess.run(["exiftool", "-j", "-G1", "-struct", "-api", "NoPDFList", *map(str, args)],
                         capture_output=True, text=True, check=True).stdout
    return json.loads(out)


def as_list(value) -> list:
    return value if isinstance(value, list) else [value]


def photos(folder: Path) -> Path:
    folder.mkdir(parents=True)
    for name in ("cat.jpg", "coffee.jpg", "rocket.jpg"):
        shutil.copy(EXAMPLES / name, folder / name)
    Image.open(EXAMPLES / "camera.jpg").save(folder / "camera.png")
    return folder


@needs_exiftool
def test_exiftool_reads_caption_keywords_and_model_from_the_xmp_sidecars(captioner, tmp_path):
    folder = photos(tmp_path / "photos")
    sidecars = Sidecars(kinds=("xmp", "txt"), model="tiny.pt sha256:0123")
    caption_dir(captioner, folder, tmp_path / "out.jsonl", workers=0, progress=False, sidecars=sidecars)
    rows = {r["image"]: r for r in read_jsonl(tmp_path / "out.jsonl")}
    assert any(r["tags"] for r in rows.values())  # the demo photos do get keywords
    for info in exiftool(*sorted(folder.glob("*.xmp"))):
        row = rows[Path(info["SourceFile"]).name.removesuffix(".xmp")]
        assert info["XMP-dc:Description"] == row["caption"]
        assert as_list(info.get("XMP-dc:Subject", [])) == [t["tag"] for t in row["tags"]]
        assert info["XMP-captioner:Model"] == "tiny.pt sha256:0123"
    assert len(list(folder.glob("*.xmp"))) == len(rows) == 4
    for name, row in rows.items():
        assert (folder / name).with_suffix(".txt").read_text() == row["caption"] + "\n"


def exiftool_sidecar(path: Path) -> None:
    """A sidecar as another tool leaves it: creator, rating, a Lightroom and a Photoshop field, a description."""
    subprocess.run(["exiftool", "-q", "-o", str(path), "-XMP-dc:Creator=Ann Smith", "-XMP-xmp:Rating=4",
                    "-XMP-lr:HierarchicalSubject=places|beach", "-XMP-photoshop:City=Lisbon",
                    "-XMP-dc:Subject=holiday", "-XMP-dc:Description=Ann's own words"], check=True)


def without(data: bytes, *spans: tuple[int, int]) -> bytes:
    for start, end in sorted(spans, reverse=True):
        data = data[:start] + data[end:]
    return data


def owned_spans(data: bytes) -> list[tuple[int, int]]:
    """The byte spans captioner may change: dc:description, dc:subject, and a Description of its own
    (whole lines), which holds only the project's fields."""
    rdf = parse_xmp(data).find("http://www.w3.org/1999/02/22-rdf-syntax-ns#", "RDF")
    spans = []
    for desc in rdf.children:
        if desc.children and all(p.uri == NS for p in desc.children):
            spans.append((data.rfind(b"\n", 0, desc.start) + 1, data.index(b"\n", desc.end) + 1))
            continue
        spans += [(p.start, p.end) for p in desc.children if (p.uri, p.local) in (
            ("http://purl.org/dc/elements/1.1/", "description"), ("http://purl.org/dc/elements/1.1/", "subject"))]
    return spans


@needs_exiftool
@pytest.mark.parametrize("overwrite", [False, True])
def test_a_sidecar_another_tool_wrote_is_merged_and_its_fields_come_back_byte_for_byte(tmp_path, overwrite):
    sidecar = tmp_path / "photo.jpg.xmp"
    exiftool_sidecar(sidecar)
    original = sidecar.read_bytes()
    assert b"photoshop:City" in original and b"lr:hierarchicalSubject" in original
    before = exiftool(sidecar)[0]

    new, kept = merge_xmp(original, "a dog runs on the beach", ["dog", "holiday"], "m.pt", overwrite=overwrite)
    assert kept is not overwrite
    assert without(new, *owned_spans(new)) == without(original, *owned_spans(original))
    sidecar.write_bytes(new)
    after = exiftool(sidecar)[0]
    for field in ("XMP-dc:Creator", "XMP-xmp:Rating", "XMP-lr:HierarchicalSubject", "XMP-photoshop:City",
                  "XMP-x:XMPToolkit"):
        assert after[field] == before[field]
    assert after["XMP-dc:Description"] == ("a dog runs on the beach" if overwrite else "Ann's own words")
    assert as_list(after["XMP-dc:Subject"]) == ["holiday", "dog"]  # the user's keyword first, kept
    assert after["XMP-captioner:Caption"] == "a dog runs on the beach"

    # Captioned again with other tags: the keyword captioner added goes, the user's stays, even the one
    # captioner also found; the description it wrote (overwrite) is its own now and follows the caption.
    again, kept = merge_xmp(new, "a cat on the sand", ["cat"], "m.pt")
    assert kept is not overwrite
    sidecar.write_bytes(again)
    final = exiftool(sidecar)[0]
    assert as_list(final["XMP-dc:Subject"]) == ["holiday", "cat"]
    assert final["XMP-dc:Description"] == ("a cat on the sand" if overwrite else "Ann's own words")
    assert without(again, *owned_spans(again)) == without(original, *owned_spans(original))
    assert merge_xmp(again, "a cat on the sand", ["cat"], "m.pt")[0] == again  # nothing to do: the same bytes


@needs_exiftool
def test_fields_a_tool_rewrote_as_attributes_are_found_and_kept_single(tmp_path):
    """exiv2 (digiKam) writes simple properties as attributes of one rdf:Description."""
    packet = ("<x:xmpmeta xmlns:x='adobe:ns:meta/'><rdf:RDF xmlns:rdf='http://www.w3.org/1999/02/22-rdf-syntax-ns#'>"
              f"<rdf:Description rdf:about='' xmlns:xmp='http://ns.adobe.com/xap/1.0/' xmlns:cap='{NS}' "
              "xmp:Rating='5' cap:Caption='a dog' cap:Model='old.pt'/></rdf:RDF></x:xmpmeta>").encode()
    new, kept = merge_xmp(packet, "a dog on grass", ["dog"], "new.pt")
    assert not kept and b"xmp:Rating='5'" in new and b"cap:Caption=" not in new
    (tmp_path / "p.xmp").write_bytes(new)
    info = exiftool(tmp_path / "p.xmp")[0]
    # exiftool names a namespace's group by the first prefix it meets it under
    assert (info["XMP-xmp:Rating"], info["XMP-cap:Caption"], info["XMP-cap:Model"]) == (5, "a dog on grass", "new.pt")
    assert info["XMP-dc:Description"] == "a dog on grass"


def test_an_existing_txt_with_other_words_is_kept_unless_overwrite(tmp_path):
    txt = tmp_path / "photo.txt"
    txt.write_text("my own caption, by hand\n")
    assert write_txt(txt, "a dog") == "kept" and txt.read_text() == "my own caption, by hand\n"
    assert write_txt(txt, "a dog", overwrite=True) == "written" and txt.read_text() == "a dog\n"
    inode = txt.stat().st_ino
    assert write_txt(txt, "a dog") == "unchanged" and txt.stat().st_ino == inode  # not written again


def test_sidecar_dir_mirrors_the_folder_tree_and_leaves_the_photos_alone(captioner, tmp_path):
    folder = photos(tmp_path / "photos")
    (folder / "sub").mkdir()
    shutil.move(folder / "cat.jpg", folder / "sub" / "cat.jpg")
    listing = sorted(p.relative_to(folder) for p in folder.rglob("*"))
    mirror = tmp_path / "captions"
    sidecars = Sidecars(kinds=("txt", "xmp"), folder=mirror)
    caption_dir(captioner, folder, tmp_path / "out.csv", recursive=True, workers=0, progress=False, sidecars=sidecars)
    assert sorted(p.relative_to(folder) for p in folder.rglob("*")) == listing
    assert (mirror / "sub" / "cat.txt").is_file() and (mirror / "sub" / "cat.jpg.xmp").is_file()
    assert len(list(mirror.rglob("*.txt"))) == len(list(mirror.rglob("*.xmp"))) == 4


def jpeg_with_exif(path: Path) -> None:
    exif = Image.Exif()
    exif[0x010F], exif[0x0110] = "Acme", "Camera 1"  # Make, Model
    Image.open(EXAMPLES / "cat.jpg").save(path, quality=92, exif=exif)


def pixels(path: Path) -> np.ndarray:
    with Image.open(path) as im:
        return np.asarray(im)


@needs_exiftool
def test_embedded_xmp_reads_back_in_exiftool_and_the_pixels_are_identical(tmp_path):
    jpg, png = tmp_path / "cat.jpg", tmp_path / "camera.png"
    jpeg_with_exif(jpg)
    Image.open(EXAMPLES / "camera.jpg").save(png)
    before = {p: pixels(p) for p in (jpg, png)}
    for path in (jpg, png):
        assert embed(path, "a cat sits on a sofa", ["cat", "sofa"], "m.pt") == "written"
        assert np.array_equal(pixels(path), before[path])
        inode = path.stat().st_ino
        assert embed(path, "a cat sits on a sofa", ["cat", "sofa"], "m.pt") == "unchanged"
        assert path.stat().st_ino == inode
    for info in exiftool(jpg, png):
        assert info["XMP-dc:Description"] == "a cat sits on a sofa"
        assert as_list(info["XMP-dc:Subject"]) == ["cat", "sofa"]
        assert "Warning" not in info and "Error" not in info
    assert exiftool(jpg)[0]["IFD0:Make"] == "Acme"  # the Exif segment stays


@needs_exiftool
def test_embedding_merges_into_the_xmp_another_tool_put_in_the_file(tmp_path):
    jpg = tmp_path / "cat.jpg"
    jpeg_with_exif(jpg)
    subprocess.run(["exiftool", "-q", "-overwrite_original", "-XMP-dc:Description=Ann's cat", "-XMP-xmp:Rating=3",
                    str(jpg)], check=True)
    before = pixels(jpg)
    assert embed(jpg, "a cat sits on a sofa", ["cat"], "m.pt") == "kept"
    info = exiftool(jpg)[0]
    assert (info["XMP-dc:Description"], info["XMP-xmp:Rating"]) == ("Ann's cat", 3)
    assert as_list(info["XMP-dc:Subject"]) == ["cat"]
    assert embed(jpg, "a cat sits on a sofa", ["cat"], "m.pt", overwrite=True) == "written"
    assert exiftool(jpg)[0]["XMP-dc:Description"] == "a cat sits on a sofa"
    assert np.array_equal(pixels(jpg), before)


def mpo_with_xmp_after_mpf(path: Path) -> None:
    """A two-picture MPO (as cameras write) that Pillow gives an XMP segment after its MP index: making
    that segment longer moves the second picture away from where the index says it is."""
    left, right = Image.open(EXAMPLES / "cat.jpg"), Image.open(EXAMPLES / "coffee.jpg")
    left.save(path, "MPO", save_all=True, append_images=[right], xmp=merge_xmp(None, "x", [], "m")[0])


def test_an_embed_that_would_change_the_pixels_puts_the_original_back_and_is_an_error_row(captioner, tmp_path):
    folder = tmp_path / "photos"
    folder.mkdir()
    mpo_with_xmp_after_mpf(folder / "pair.jpg")
    with Image.open(folder / "pair.jpg") as im:
        assert im.n_frames == 2
    original = (folder / "pair.jpg").read_bytes()
    with pytest.raises(EmbedError, match="original is back"):
        embed(folder / "pair.jpg", "a long caption that needs more room than before", ["cat"], "m.pt")
    assert (folder / "pair.jpg").read_bytes() == original
    out = tmp_path / "out.jsonl"
    summary = caption_dir(captioner, folder, out, workers=0, progress=False, sidecars=Sidecars(embed=True))
    [row] = read_jsonl(out)
    assert row["caption"] and row["error"].startswith("embed: ") and summary.errors == 1
    assert (folder / "pair.jpg").read_bytes() == original


def test_a_killed_run_resumed_leaves_exactly_one_correct_sidecar_per_photo(tiny_checkpoint, tmp_path):
    folder = photo_folder(tmp_path / "photos", 48)
    out = tmp_path / "out.jsonl"
    cmd = caption_dir_command(folder, out, tiny_checkpoint, workers=1) + ["--sidecar", "xmp"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    with parent_killed_mid_run(cmd, out, env):
        pass
    done = {r["image"] for r in read_jsonl(out)}
    assert 8 <= len(done) < 48
    assert all((folder / f"{name}.xmp").is_file() for name in done)  # written before its row
    inodes = {p.name: p.stat().st_ino for p in folder.glob("*.xmp")}
    rerun = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert rerun.returncode == 0, rerun.stderr
    rows = read_jsonl(out)
    photos_ = sorted(p.name for p in folder.glob("*.jpg"))
    assert sorted(os.listdir(folder)) == sorted(photos_ + [f"{p}.xmp" for p in photos_])  # no leftovers
    assert sorted(r["image"] for r in rows) == photos_
    for row in rows:
        packet = (folder / f"{row['image']}.xmp").read_bytes()
        assert merge_xmp(packet, row["caption"], [t["tag"] for t in row["tags"]],
                         cli._sidecars(cli.build_parser().parse_args(
                             ["caption-dir", "x", "--out", "o.jsonl", "--sidecar", "xmp", "-c",
                              str(tiny_checkpoint)])).model)[0] == packet  # already says exactly this
    # What the killed run wrote was not written again.
    assert {n: (folder / n).stat().st_ino for n in inodes} == inodes


PAGE = """<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>Trip — café</title></head>
<body>
<!-- <img src="images/cat.jpg"> a comment, not an image -->
<p title="an alt=here in text">Photos</p>
<img src="images/cat.jpg">
<IMG SRC='images/coffee.jpg' ALT="" class=wide />
<img
   src=images/rocket.jpg alt="Launch day">
<img alt src="images/sub%20dir/camera.jpg" width=100>
<img src="images/astronaut.jpg" alt="Our astronaut">
<img src="https://example.com/remote.jpg">
<script>document.write('<img src="images/cat.jpg">')</script>
</body></html>
"""


def test_alt_text_fills_the_three_empty_ones_and_leaves_every_other_byte(tiny_checkpoint, tmp_path, capsysbinary):
    from captioner import Captioner

    site = tmp_path / "site"
    (site / "images" / "sub dir").mkdir(parents=True)
    for name in ("cat.jpg", "coffee.jpg", "rocket.jpg", "astronaut.jpg"):
        shutil.copy(EXAMPLES / name, site / "images" / name)
    shutil.copy(EXAMPLES / "camera.jpg", site / "images" / "sub dir" / "camera.jpg")
    page = site / "index.html"
    page.write_bytes(PAGE.encode() + b"<!-- \xff not UTF-8 -->\n")
    original = page.read_bytes()
    cap = Captioner.load(tiny_checkpoint, device="cpu", engine="torch")
    said = {n: cap.caption(site / "images" / n)["caption"] for n in ("cat.jpg", "coffee.jpg", "sub dir/camera.jpg")}
    fills = {b'<img src="images/cat.jpg">\n': f'<img alt="{said["cat.jpg"]}" src="images/cat.jpg">\n',
             b'ALT=""': f'alt="{said["coffee.jpg"]}"', b"<img alt src": f'<img alt="{said["sub dir/camera.jpg"]}" src'}
    expected = original
    for old, new in fills.items():
        assert original.count(old) == 1
        expected = expected.replace(old, new.encode())

    args = ["alt-text", str(page), "-c", str(tiny_checkpoint), "--device", "cpu", "--engine", "torch"]
    assert cli.main(args) == 0
    printed = capsysbinary.readouterr()
    assert printed.out == expected and page.read_bytes() == original
    assert b"3 filled, 2 already had alt text, 1 not local files" in printed.err
    assert cli.main([*args, "--in-place"]) == 0
    assert page.read_bytes() == expected
    assert cli.main([*args, "--in-place"]) == 0 and page.read_bytes() == expected  # nothing left to fill
    assert b"0 filled, 5 already had alt text" in capsysbinary.readouterr().err


def test_sidecars_asked_for_later_come_from_the_table_without_captioning_again(captioner, tmp_path, capsys):
    folder = photos(tmp_path / "photos")
    out = tmp_path / "out.csv"
    caption_dir(captioner, folder, out, workers=0, progress=False)
    (folder / "cat.jpg.xmp").write_text("<x:xmpmeta>not closed")  # someone's broken file: left as it is
    Image.open(EXAMPLES / "cat.jpg").save(folder / "cat.png")  # cat.jpg and cat.png would share cat.txt
    sidecars = Sidecars(kinds=("xmp", "txt"), model="m.pt")
    summary = caption_dir(captioner, folder, out, workers=0, progress=False, sidecars=sidecars)
    assert summary.captioned == 1 and summary.skipped == 4  # only the new cat.png
    assert (folder / "cat.jpg.xmp").read_text() == "<x:xmpmeta>not closed"
    assert not (folder / "cat.txt").exists() and (folder / "coffee.txt").is_file()
    err = capsys.readouterr().err
    assert "cat.jpg.xmp: the XMP packet is not well-formed" in err and "would share" in err
    assert sidecars.counts["xmp failed"] == 1 and sidecars.counts["xmp written"] == 4
    rows = {r["image"]: r for r in OutputFile(out).rows()}
    packet = merge_xmp((folder / "coffee.jpg.xmp").read_bytes(), rows["coffee.jpg"]["caption"],
                       tag_names(rows["coffee.jpg"]["tags"]), "m.pt")
    assert packet == ((folder / "coffee.jpg.xmp").read_bytes(), False)  # the CSV's caption and tags, exactly


def test_a_two_word_tag_comes_back_whole_from_a_csv_table(tmp_path):
    from captioner.results_file import OutputFile

    out = OutputFile(tmp_path / "out.csv")
    tags = [{"tag": "tennis ball", "prob": 0.8}, {"tag": "dog", "prob": 1e-05}]
    out.append([{"image": "a.jpg", "caption": "a dog with a ball", "score": -1.0, "tags": tags}])
    assert tag_names(out.rows()[0]["tags"]) == ["tennis ball", "dog"] == tag_names(tags)


@pytest.mark.skipif(shutil.which("exiv2") is None, reason="exiv2 is not installed (Debian: exiv2)")
def test_a_sidecar_exiv2_rewrote_still_reads_and_its_caption_is_still_captioners(tmp_path):
    """exiv2 (digiKam's library) reads the sidecar, and rewriting it folds everything into one
    rdf:Description with simple fields as attributes; the next caption still replaces captioner's own."""
    sidecar = tmp_path / "photo.jpg.xmp"
    assert write_xmp(sidecar, "a small white cat", ["cat"], "m.pt") == "written"
    subprocess.run(["exiv2", "-M", "set Xmp.xmp.Rating 4", "-M", "set Xmp.dc.creator Ann", str(sidecar)], check=True)
    assert b'captioner:Caption="a small white cat"' in sidecar.read_bytes()  # now an attribute
    assert write_xmp(sidecar, "a black cat on a sofa", ["cat", "sofa"], "m2.pt") == "written"
    assert write_xmp(sidecar, "a black cat on a sofa", ["cat", "sofa"], "m2.pt") == "unchanged"
    printed = subprocess.run(["exiv2", "-px", str(sidecar)], capture_output=True, text=True, check=True).stdout
    fields = {line.split()[0]: line.split(None, 3)[3] for line in printed.splitlines()}
    assert fields["Xmp.dc.description"] == 'lang="x-default" a black cat on a sofa'
    assert (fields["Xmp.dc.subject"], fields["Xmp.xmp.Rating"], fields["Xmp.dc.creator"]) == ("cat, sofa", "4", "Ann")
    assert (fields["Xmp.captioner.Caption"], fields["Xmp.captioner.Model"]) == ("a black cat on a sofa", "m2.pt")
    assert printed.count("Xmp.captioner.Caption") == 1
