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

import re
from dataclasses import dataclass, field
from xml.parsers import expat
from xml.sax.saxutils import escape, quoteattr

RDF = "http://www.w3.org/1999/02/22-rdf-syntax-ns#"
DC = "http://purl.org/dc/elements/1.1/"
NS = "https://captioner.invalid/ns/xmp/1.0/"  # the project's own fields (.invalid: a name, never fetched)
XML_LANG = "http://www.w3.org/XML/1998/namespace lang"
KINDS = ("xmp", "txt")
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


def _prefix(raw: bytes) -> bytes:
    return raw.partition(b":")[0] + b":" if b":" in raw else b""


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
             items: list[bytes] = (), declare: bytes = b"") -> bytes:
    """<qname>text</qname>, or <qname><rdf:Container> items </rdf:Container></qname>, indented."""
    if text is not None:
        return b"<" + qname + declare + b">" + escape(text).encode() + b"</" + qname + b">"
    inner, box = indent + b" ", rdf + container
    lines = b"".join(b"\n" + inner + b" " + item for item in items)
    return (b"<" + qname + declare + b">\n" + inner + b"<" + box + b">" + lines + b"\n" + inner + b"</" + box
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
