"""Captions where photo tools and training pipelines look: XMP and txt sidecars beside the photos,
and XMP inside JPEG and PNG files.

XMP (`photo.jpg.xmp`, read by digiKam, darktable, exiftool, exiv2) holds the caption as
dc:description (x-default) and the tags as dc:subject keywords; fields in the project's own
namespace (NS, prefix `captioner`) record the model, the caption it wrote and the keywords it added.
An existing packet is merged, never rewritten: it is parsed with expat (a DOCTYPE is refused, so
no entity is ever expanded), and only the byte ranges of the owned elements are replaced; every
other byte stays as it was. A description that is not the one captioner last wrote belongs to
someone else and is kept unless `overwrite`; keywords the user gave stay, and only the ones
captioner added itself are ever taken away again.

`photo.txt` holds the caption alone, for training folders. An existing txt that says something
else is kept unless `overwrite`. Every write is atomic (files.atomic_path) and skipped when the
bytes would not change, so writing again after a crash or on a resumed run is harmless.

Embedding edits segments and chunks, never pixels: the JPEG APP1 XMP segment and the PNG iTXt
`XML:com.adobe.xmp` chunk are inserted or replaced in the file's bytes. The decoded pixels are
compared before and after; if they differ the original bytes are written back (EmbedError).
"""
from __future__ import annotations

import hashlib
import io
import os
import re
import struct
import sys
import zlib
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from xml.parsers import expat
from xml.sax.saxutils import escape, quoteattr

from PIL import Image, ImageSequence

from .files import write_atomic

RDF = "http://www.w3.org/1999/02/22-rdf-syntax-ns#"
DC = "http://purl.org/dc/elements/1.1/"
NS = "https://captioner.invalid/ns/xmp/1.0/"  # the project's own fields (.invalid: a name, never fetched)
XML_LANG = "http://www.w3.org/XML/1998/namespace lang"
SKELETON = (b'<?xpacket begin="\xef\xbb\xbf" id="W5M0MpCehiHzreSzNTczkc9d"?>\n'
            b'<x:xmpmeta xmlns:x="adobe:ns:meta/">\n <rdf:RDF xmlns:rdf="' + RDF.encode() + b'">\n'
            b' </rdf:RDF>\n</x:xmpmeta>\n<?xpacket end="w"?>\n')
_START_TAG = re.compile(rb'<([^\s/>]+)(?:\s+[^\s=/>]+\s*=\s*(?:"[^"]*"|\'[^\']*\'))*\s*/?>')
_ATTR = re.compile(rb'\s+([^\s=/>]+)\s*=\s*(?:"[^"]*"|\'[^\']*\')')


class SidecarError(ValueError):
    """An existing XMP packet captioner will not edit (not well-formed, not UTF-8, a DOCTYPE); it is left untouched."""


class EmbedError(ValueError):
    """The caption could not be embedded; the image file is as it was."""


@dataclass
class Node:
    """An element of a parsed packet with its byte span: [start, open_end) is the start tag,
    [close_start, end) the end tag (empty for <a/>)."""
    uri: str
    local: str
    attrs: dict
    start: int
    open_end: int
    scope: dict  # prefix -> namespace in force at this element
    raw: bytes  # the tag's name as written, with its prefix
    close_start: int = 0
    end: int = 0
    text: str = ""
    children: list[Node] = field(default_factory=list)

    def find(self, uri: str, local: str) -> Node | None:
        for child in self.children:
            if (child.uri, child.local) == (uri, local):
                return child
            found = child.find(uri, local)
            if found:
                return found
        return None

    def items(self) -> list[Node] | None:
        """The rdf:li children of this property's container (rdf:Alt, rdf:Bag or rdf:Seq); None without one."""
        container = next((c for c in self.children if c.uri == RDF and c.local in ("Alt", "Bag", "Seq")), None)
        return [li for li in container.children if (li.uri, li.local) == (RDF, "li")] if container else None


def parse_xmp(data: bytes) -> Node:
    """The packet's element tree with byte offsets (the document itself is the root Node)."""
    if data.startswith((b"\xfe\xff", b"\xff\xfe", b"\x00\x00")):
        raise SidecarError("the XMP packet is not UTF-8")
    parser = expat.ParserCreate("utf-8", namespace_separator=" ")
    root = Node("", "", {}, 0, 0, {}, b"", len(data), len(data))
    stack, pending = [root], {}

    def start(name, attrs):
        pos = parser.CurrentByteIndex
        tag = _START_TAG.match(data, pos)
        uri, _, local = name.rpartition(" ")
        node = Node(uri, local, attrs, pos, tag.end(), {**stack[-1].scope, **pending}, tag.group(1))
        pending.clear()
        stack[-1].children.append(node)
        stack.append(node)

    def end(_name):
        node = stack.pop()
        if data[node.open_end - 2:node.open_end] == b"/>":
            node.close_start = node.end = node.open_end
        else:
            node.close_start = parser.CurrentByteIndex
            node.end = data.index(b">", node.close_start) + 1

    def refuse_doctype(*_):
        raise SidecarError("the XMP packet has a DOCTYPE, which XMP does not allow")

    parser.StartNamespaceDeclHandler = lambda prefix, uri: pending.__setitem__(prefix or "", uri)
    parser.StartElementHandler, parser.EndElementHandler = start, end
    parser.CharacterDataHandler = lambda text: setattr(stack[-1], "text", stack[-1].text + text)
    parser.StartDoctypeDeclHandler = refuse_doctype
    try:
        parser.Parse(data, True)
    except expat.ExpatError as e:
        raise SidecarError(f"the XMP packet is not well-formed XML: {e}") from None
    return root


def _indent(data: bytes, pos: int) -> bytes:
    line = data[data.rfind(b"\n", 0, pos) + 1:pos]
    return line if not line.strip() else b" "


def _cut(data: bytes, node: Node) -> tuple[int, int, bytes]:
    """The edit that removes an element and the white space before it."""
    start = node.start
    while start > 0 and data[start - 1:start] in (b" ", b"\t", b"\r", b"\n"):
        start -= 1
    return start, node.end, b""


def _element(qname: bytes, rdf: bytes, indent: bytes, *, text: str | None = None, container: bytes = b"",
             items: list[bytes] = ()) -> bytes:
    """<qname>text</qname>, or <qname><rdf:Container> items </rdf:Container></qname>, indented."""
    if text is not None:
        return b"<" + qname + b">" + escape(text).encode() + b"</" + qname + b">"
    inner, box = indent + b" ", rdf + container
    lines = b"".join(b"\n" + inner + b" " + item for item in items)
    return (b"<" + qname + b">\n" + inner + b"<" + box + b">" + lines + b"\n" + inner + b"</" + box
            + b">\n" + indent + b"</" + qname + b">")


def _li(rdf: bytes, text: str, lang: bool = False) -> bytes:
    attr = b' xml:lang="x-default"' if lang else b""
    return b"<" + rdf + b"li" + attr + b">" + escape(text).encode() + b"</" + rdf + b"li>"


def _rdf_prefix(node: Node) -> bytes:
    """How rdf's elements are written where `node` is (b"" where rdf is the default namespace)."""
    prefix = next((p for p, uri in node.scope.items() if uri == RDF), None)
    if prefix is None:
        raise SidecarError("the XMP packet binds no prefix to the RDF namespace")
    return prefix.encode() + b":" if prefix else b""


class _Merge:
    """Edits to one XMP packet: (start, end, new bytes) replacements, applied together at the end,
    and the new elements that go into a Description of their own."""

    def __init__(self, data: bytes):
        self.data = data
        self.rdf = parse_xmp(data).find(RDF, "RDF")
        if self.rdf is None:
            raise SidecarError("the XMP packet has no rdf:RDF")
        self.descriptions = [c for c in self.rdf.children if (c.uri, c.local) == (RDF, "Description")]
        self.edits: list[tuple[int, int, bytes]] = []
        self.home = []  # builders of the new elements: (rdf prefix, indent) -> bytes

    def props(self, uri: str, local: str) -> list[Node]:
        return [p for d in self.descriptions for p in d.children if (p.uri, p.local) == (uri, local)]

    def attrs(self, uri: str, local: str) -> list[tuple[Node, str]]:
        """The property in attribute form (xmp:Rating="5" on rdf:Description), as exiv2 writes simple ones."""
        return [(d, d.attrs[f"{uri} {local}"]) for d in self.descriptions if f"{uri} {local}" in d.attrs]

    def value(self, uri: str, local: str) -> str | list[str] | None:
        for node in self.props(uri, local):
            items = node.items()
            return [li.text for li in items] if items is not None else node.text
        return next((v for _, v in self.attrs(uri, local)), None)

    def drop_attr(self, desc: Node, uri: str, local: str) -> None:
        for m in _ATTR.finditer(self.data, desc.start + 1 + len(desc.raw), desc.open_end):
            prefix, _, name = m.group(1).decode().rpartition(":")
            if name == local and desc.scope.get(prefix) == uri:
                self.edits.append((m.start(), m.end(), b""))

    def replace(self, node: Node, **content) -> None:
        rdf = _rdf_prefix(node)
        self.edits.append((node.start, node.end, _element(node.raw, rdf, _indent(self.data, node.start), **content)))

    def description(self, caption: str, previous: str | None, overwrite: bool) -> bool:
        """dc:description's x-default becomes the caption unless someone else's words are there
        (then it stays, and True says so); its other languages stay as they are."""
        elements, attrs = self.props(DC, "description"), self.attrs(DC, "description")
        node = elements[0] if elements else None
        items = (node.items() or []) if node else []
        default = next((li for li in items if li.attrs.get(XML_LANG) == "x-default"), None)
        if node is not None:
            first = default or (items[0] if items else None)
            current = first.text if first is not None else node.text
        else:
            current = attrs[0][1] if attrs else ""
        if current.strip() and current not in (previous, caption) and not overwrite:
            return True
        if default is not None and current == caption:
            return False
        if node is not None:
            rdf = _rdf_prefix(node)
            others = [self.data[li.start:li.end] for li in items if li is not default]
            self.replace(node, container=b"Alt", items=[_li(rdf, caption, lang=True), *others])
            return False
        for desc, _ in attrs:
            self.drop_attr(desc, DC, "description")
        self.home.append(lambda rdf, indent: _element(b"dc:description", rdf, indent, container=b"Alt",
                                                      items=[_li(rdf, caption, lang=True)]))
        return False

    def subject(self, tags: list[str], previous: list[str]) -> list[str]:
        """dc:subject keeps every keyword but the ones captioner added before and no longer finds,
        and gains the new tags; returns the keywords captioner has added, now."""
        node = (self.props(DC, "subject") or [None])[0]
        items = node.items() if node is not None else []
        if items is None:  # a keyword written as plain text: someone else's, left alone
            return []
        have = [li.text for li in items]
        keep = [li for li in items if li.text not in previous or li.text in tags]
        new = [t for t in tags if t not in have]
        if node is None and new:
            self.home.append(lambda rdf, indent: _element(b"dc:subject", rdf, indent, container=b"Bag",
                                                          items=[_li(rdf, t) for t in new]))
        elif node is not None and (new or len(keep) < len(items)):
            rdf = _rdf_prefix(node)
            self.replace(node, container=b"Bag", items=[self.data[li.start:li.end] for li in keep]
                         + [_li(rdf, t) for t in new])
        return [t for t in tags if t not in have or t in previous]

    def own(self, local: str, value: str | list[str]) -> None:
        """A field of the project's namespace: one element, whatever form it was found in."""
        elements = self.props(NS, local)
        for desc, _ in self.attrs(NS, local):
            self.drop_attr(desc, NS, local)
        for extra in elements[1:]:
            self.edits.append(_cut(self.data, extra))
        bag = isinstance(value, list)
        content = lambda rdf: dict(container=b"Bag", items=[_li(rdf, v) for v in value]) if bag else dict(text=value)
        if not elements:
            qname = b"captioner:" + local.encode()
            self.home.append(lambda rdf, indent: _element(qname, rdf, indent, **content(rdf)))
        elif self.value(NS, local) != value:
            self.replace(elements[0], **content(_rdf_prefix(elements[0])))

    def result(self) -> bytes:
        data, edits = self.data, list(self.edits)
        if self.home:
            edits.append(self._new_description())
        for start, end, new in sorted(edits, reverse=True):
            data = data[:start] + new + data[end:]
        return data

    def _new_description(self) -> tuple[int, int, bytes]:
        first = self.descriptions[0] if self.descriptions else None
        about = first.attrs.get(f"{RDF} about", "") if first else ""
        indent = _indent(self.data, first.start) if first else _indent(self.data, self.rdf.start) + b" "
        inner = indent + b" "
        declare = b"".join(b" xmlns:%s=%s" % (p, quoteattr(u).encode()) for p, u in
                           ((b"rdf", RDF), (b"dc", DC), (b"captioner", NS)))
        block = (indent + b"<rdf:Description rdf:about=" + quoteattr(about).encode() + declare + b">"
                 + b"".join(b"\n" + inner + build(b"rdf:", inner) for build in self.home)
                 + b"\n" + indent + b"</rdf:Description>\n")
        if self.rdf.close_start == self.rdf.open_end:  # <rdf:RDF .../>: opened up to hold the block
            return self.rdf.open_end - 2, self.rdf.open_end, b">\n" + block + b"</" + self.rdf.raw + b">"
        line = self.data.rfind(b"\n", 0, self.rdf.close_start) + 1
        if self.data[line:self.rdf.close_start].strip():
            return self.rdf.close_start, self.rdf.close_start, b"\n" + block
        return line, line, block


def merge_xmp(existing: bytes | None, caption: str, tags: list[str], model: str,
              overwrite: bool = False) -> tuple[bytes, bool]:
    """The packet `existing` (None: a new one) with the caption, tags and model in the fields
    captioner owns, every other byte unchanged; and whether a description someone else wrote was kept."""
    m = _Merge(existing if existing and existing.strip() else SKELETON)
    previous_caption, previous_tags = m.value(NS, "Caption"), m.value(NS, "Tags")
    kept = m.description(caption, previous_caption if isinstance(previous_caption, str) else None, overwrite)
    added = m.subject(tags, previous_tags if isinstance(previous_tags, list) else [])
    m.own("Model", model)
    m.own("Caption", caption)
    m.own("Tags", added)
    return m.result(), kept


def _read(path: Path) -> bytes | None:
    try:
        return path.read_bytes()
    except FileNotFoundError:
        return None


def write_xmp(path: str | Path, caption: str, tags: list[str], model: str, overwrite: bool = False) -> str:
    """Merge into the sidecar `path` (made if missing): 'written', 'unchanged', or 'kept' (someone else's
    description stayed; the other owned fields may have changed)."""
    path = Path(os.path.realpath(path))  # through a symlinked sidecar to its target: the link stays a link
    old = _read(path)
    new, kept = merge_xmp(old, caption, tags, model, overwrite)
    if new != old:
        write_atomic(path, new)
    return "kept" if kept else "written" if new != old else "unchanged"


def write_txt(path: str | Path, caption: str, overwrite: bool = False) -> str:
    """The caption as the text file `path`: 'written', 'unchanged', or 'kept' (it says something else)."""
    path = Path(os.path.realpath(path))
    old = _read(path)
    if old is not None and old.decode("utf-8", errors="replace").strip() == caption:
        return "unchanged"
    if old is not None and old.strip() and not overwrite:
        return "kept"
    write_atomic(path, caption + "\n")
    return "written"


JPEG_XMP = b"http://ns.adobe.com/xap/1.0/\x00"  # what starts an APP1 segment that holds XMP
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
PNG_XMP = b"XML:com.adobe.xmp\x00"  # the keyword of the iTXt chunk that holds XMP


def _jpeg_segments(data: bytes) -> list[tuple[int, int, int]]:
    """(marker, start, end) of each segment before the image data (the SOS segment)."""
    pos, found = 2, []
    while pos + 4 <= len(data):
        if data[pos] != 0xFF:
            raise EmbedError(f"not a JPEG marker at byte {pos}")
        marker = data[pos + 1]
        if marker == 0xFF:  # fill byte
            pos += 1
            continue
        if marker == 0xDA:
            return found
        end = pos + 2 + struct.unpack(">H", data[pos + 2:pos + 4])[0]
        found.append((marker, pos, end))
        pos = end
    raise EmbedError("the JPEG ends before its image data")


def _embed_jpeg(data: bytes, merge) -> tuple[bytes, bool]:
    segments = _jpeg_segments(data)
    xmp = next(((s, e) for m, s, e in segments if m == 0xE1 and data[s + 4:e].startswith(JPEG_XMP)), None)
    old = data[xmp[0] + 4 + len(JPEG_XMP):xmp[1]] if xmp else None
    packet, kept = merge(old)
    if packet == old:
        return data, kept
    body = JPEG_XMP + packet
    if len(body) + 2 > 0xFFFF:
        raise EmbedError("the XMP packet is larger than one JPEG segment holds (64 kB)")
    segment = b"\xff\xe1" + struct.pack(">H", len(body) + 2) + body
    if xmp is None:  # after the leading APP0 (JFIF) and APP1 (Exif) segments, where readers look first
        at = next((s for m, s, _ in segments if m not in (0xE0, 0xE1)), segments[-1][2] if segments else 2)
        xmp = (at, at)
    return data[:xmp[0]] + segment + data[xmp[1]:], kept


def _png_chunks(data: bytes) -> list[tuple[bytes, int, int]]:
    """(type, start, end) of each chunk up to IEND."""
    pos, found = len(PNG_SIGNATURE), []
    while pos + 12 <= len(data):
        length, kind = struct.unpack(">I4s", data[pos:pos + 8])
        found.append((kind, pos, pos + 12 + length))
        pos += 12 + length
        if kind == b"IEND":
            return found
    raise EmbedError("the PNG ends before its IEND chunk")


def _itxt_text(body: bytes) -> bytes:
    """The text of an iTXt chunk's data: keyword, compression flag and method, language, translated keyword."""
    try:
        flag, rest = body[len(PNG_XMP)], body[len(PNG_XMP) + 2:]
        text = rest.split(b"\x00", 2)[2]
        return zlib.decompress(text) if flag else text
    except (IndexError, zlib.error) as e:
        raise EmbedError(f"the PNG's XMP chunk is damaged ({e})") from None


def _embed_png(data: bytes, merge) -> tuple[bytes, bool]:
    chunks = _png_chunks(data)
    xmp = next(((s, e) for k, s, e in chunks if k == b"iTXt" and data[s + 8:e - 4].startswith(PNG_XMP)), None)
    old = _itxt_text(data[xmp[0] + 8:xmp[1] - 4]) if xmp else None
    packet, kept = merge(old)
    if packet == old:
        return data, kept
    body = PNG_XMP + b"\x00\x00\x00\x00" + packet  # uncompressed, no language, no translated keyword
    chunk = struct.pack(">I", len(body)) + b"iTXt" + body + struct.pack(">I", zlib.crc32(b"iTXt" + body))
    if xmp is None:  # before the image data, where readers that stop at IDAT still find it
        at = next(s for k, s, _ in chunks if k in (b"IDAT", b"IEND"))
        xmp = (at, at)
    return data[:xmp[0]] + chunk + data[xmp[1]:], kept


def _pixel_digest(data: bytes) -> str:
    """A digest of every frame's decoded pixels (a multi-picture JPEG has several)."""
    digest = hashlib.sha256()
    with Image.open(io.BytesIO(data)) as im:
        for frame in ImageSequence.Iterator(im):
            digest.update(f"{frame.mode} {frame.size}".encode())
            digest.update(frame.tobytes())
    return digest.hexdigest()


def embed(path: str | Path, caption: str, tags: list[str], model: str, overwrite: bool = False) -> str:
    """Merge the caption into the XMP inside a JPEG or PNG file, its pixels untouched: 'written',
    'unchanged', 'kept' (as write_xmp) or 'unsupported' (another format). Raises EmbedError, the file as it was."""
    path = Path(os.path.realpath(path))
    data = path.read_bytes()
    edit = _embed_jpeg if data.startswith(b"\xff\xd8\xff") else _embed_png if data.startswith(PNG_SIGNATURE) else None
    if edit is None:
        return "unsupported"
    new, kept = edit(data, lambda old: merge_xmp(old, caption, tags, model, overwrite))
    if new == data:
        return "kept" if kept else "unchanged"
    try:
        before = _pixel_digest(data)
    except (OSError, ValueError, SyntaxError) as e:
        raise EmbedError(f"cannot decode the image to check its pixels: {e}") from None
    write_atomic(path, new)
    try:
        same = _pixel_digest(path.read_bytes()) == before
    except (OSError, ValueError, SyntaxError):
        same = False
    if not same:
        write_atomic(path, data)
        raise EmbedError("the edited file decoded to other pixels; the original is back")
    return "kept" if kept else "written"


def tag_names(tags) -> list[str]:
    """A row's keywords: its tags as JSONL holds them ([{"tag", "prob"}]) or as a CSV cell
    ("tennis ball:0.8 dog:0.1": a tag may hold a space, so a pair ends at its number)."""
    if isinstance(tags, list):
        return [t["tag"] for t in tags]
    return _CSV_TAG.findall(tags or "")


_CSV_TAG = re.compile(r"(\S.*?):[-+.\deE]+(?=\s|$)")


# atomic_path's temporary files: the target's name, a dot, mkstemp's 8 characters, ".tmp".
_LEFTOVER = re.compile(r"(.+)\.[a-z0-9_]{8}\.tmp")


@dataclass
class Sidecars:
    """What caption-dir writes besides its table, for each captioned row: sidecar files of `kinds`
    (xmp: photo.jpg.xmp, txt: photo.txt) beside the photos or in `folder`, a mirror of their tree,
    and with `embed` the XMP inside the JPEG and PNG files themselves."""
    kinds: tuple[str, ...] = ()
    folder: Path | None = None
    overwrite: bool = False
    embed: bool = False
    model: str = ""  # recorded in each packet: which model made the caption
    counts: Counter = field(default_factory=Counter)
    clashes: set[Path] = field(default_factory=set)  # txt files two photos would share: left unwritten

    def paths(self, root: Path, name: str) -> dict[str, Path]:
        base = Path(self.folder or root) / name
        return {k: base.with_name(base.name + ".xmp") if k == "xmp" else base.with_suffix(".txt") for k in self.kinds}

    def prepare(self, root: Path, names: list[str]) -> None:
        """Before a run: find the txt files two photos would share (photo.jpg and photo.png), and remove the
        temporary files a killed run left beside the files it writes."""
        owners: dict[Path, str] = {}
        mine: dict[Path, set[str]] = {}
        for name in names:
            paths = list(self.paths(root, name).values()) + ([root / name] if self.embed else [])
            for path in paths:
                mine.setdefault(path.parent, set()).add(path.name)
                if path.suffix == ".txt" and owners.setdefault(path, name) != name:
                    self.clashes.add(path)
                    _warn(f"{owners[path]} and {name} would share {path}: neither gets it (rename one)")
        for folder, files in mine.items():
            for entry in os.listdir(folder) if folder.is_dir() else []:
                match = _LEFTOVER.fullmatch(entry)
                if match and match.group(1) in files:
                    (folder / entry).unlink(missing_ok=True)

    def write(self, root: Path, row: dict, done: bool = False) -> dict:
        """The sidecars of one row, and its caption embedded; returns the row, with an error where embedding
        failed (for a row of an earlier run, `done`, the failure is only reported)."""
        if not row.get("caption"):
            return row
        caption, tags = row["caption"], tag_names(row.get("tags"))
        for kind, path in self.paths(root, row["image"]).items():
            if path in self.clashes:
                continue
            try:
                status = (write_xmp(path, caption, tags, self.model, self.overwrite) if kind == "xmp"
                          else write_txt(path, caption, self.overwrite))
            except (SidecarError, OSError) as e:
                status = "failed"
                _warn(f"cannot write {path}: {e}")
            self.counts[f"{kind} {status}"] += 1
            if status == "kept":
                _warn(f"{path} keeps the words someone else wrote there (--overwrite replaces them)")
        if self.embed and not (done and row.get("error")):
            try:
                self.counts[f"embedded {embed(root / row['image'], caption, tags, self.model, self.overwrite)}"] += 1
            except (EmbedError, SidecarError, OSError) as e:
                self.counts["embedded failed"] += 1
                if not done:
                    return {**row, "error": f"embed: {e}"}
                _warn(f"cannot embed the caption in {row['image']}: {e}")
        return row

    def report(self) -> str:
        return ", ".join(f"{kind}: {n}" for kind, n in sorted(self.counts.items()))


def _warn(message: str) -> None:
    print(f"caption-dir: {message}", file=sys.stderr)
