"""Alt text for a web page: each <img> whose alt is missing or empty and whose src is a local file
gets the image's caption; every other byte of the page stays as it was.

The standard library's html.parser finds the tags (not <img> inside comments, scripts or
attribute values) and where each starts; only the alt attribute's text is then spliced into
the page. The page is read as UTF-8, with bytes that are not kept as they are
(surrogateescape), and a caption's non-ASCII letters are written as character references,
so a page in another ASCII-based encoding stays valid too.
"""
from __future__ import annotations

import html
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from html.parser import HTMLParser
from pathlib import Path
from urllib.parse import unquote, urlsplit

from .images import ImageError

# One attribute of a start tag, taken in order from the tag name on, so a value never passes for a name.
_ATTR = re.compile(r"""[\s/]*([^\s/>"'=][^\s/>=]*)(?:\s*=\s*("[^"]*"|'[^']*'|(?![\s"'])[^\s>]*))?""")
_TAG_NAME = re.compile(r"<[a-zA-Z][^\s/>]*")


@dataclass
class Report:
    filled: int = 0
    had_alt: int = 0
    not_local: int = 0  # remote, data: or root-relative URLs, and files that are not there
    failed: list[str] = field(default_factory=list)

    def __str__(self) -> str:
        failed = f", {len(self.failed)} unreadable ({'; '.join(self.failed)})" if self.failed else ""
        return (f"{self.filled} filled, {self.had_alt} already had alt text, "
                f"{self.not_local} not local files{failed}")


class _Images(HTMLParser):
    def __init__(self):
        super().__init__(convert_charrefs=True)
        self.found = []  # ((line, column), the start tag as written, its attributes)

    def handle_starttag(self, tag, attrs):  # <img/> comes here too
        if tag == "img":
            self.found.append((self.getpos(), self.get_starttag_text(), attrs))


def local_image(page: Path, src: str) -> Path | None:
    """The file a relative src names, relative to the page's folder; None for anything else."""
    parts = urlsplit(src.strip())
    if parts.scheme or parts.netloc or not parts.path or parts.path.startswith("/"):
        return None
    path = page.parent / unquote(parts.path)
    return path if path.is_file() else None


def _with_alt(tag: str, text: str) -> str:
    """The start tag with alt="text": the first alt attribute's text replaced, or one added after the name."""
    value = 'alt="' + "".join(c if ord(c) < 128 else f"&#{ord(c)};" for c in html.escape(text, quote=True)) + '"'
    pos = _TAG_NAME.match(tag).end()
    while (m := _ATTR.match(tag, pos)) and m.end() > pos:
        if m.group(1).lower() == "alt":
            return tag[:m.start(1)] + value + tag[m.end():]
        pos = m.end()
    name_end = _TAG_NAME.match(tag).end()
    return tag[:name_end] + " " + value + tag[name_end:]


def fill_alt_text(page: str | Path, caption: Callable[[Path], str]) -> tuple[bytes, Report]:
    """The page's bytes with the alt text filled by caption(image path), and what was done."""
    page = Path(page)
    text = page.read_bytes().decode("utf-8", errors="surrogateescape")
    parser = _Images()
    parser.feed(text)
    parser.close()
    line_starts = [0] + [m.end() for m in re.finditer("\n", text)]
    report, captions, edits = Report(), {}, []
    for (line, column), tag, attrs in parser.found:
        values = {}
        for name, value in attrs:
            values.setdefault(name, value or "")  # the first of two same-named attributes counts, as in browsers
        if values.get("alt", "").strip():
            report.had_alt += 1
            continue
        path = local_image(page, values.get("src", ""))
        if path is None:
            report.not_local += 1
            continue
        try:
            if path not in captions:
                captions[path] = caption(path)
        except ImageError as e:
            report.failed.append(f"{values['src']}: {e}")
            continue
        start = line_starts[line - 1] + column
        if text[start:start + len(tag)] != tag:
            raise ValueError(f"{page}: the <img> tag at line {line} is not where the parser says")
        edits.append((start, start + len(tag), _with_alt(tag, captions[path])))
        report.filled += 1
    for start, end, new in reversed(edits):
        text = text[:start] + new + text[end:]
    return text.encode("utf-8", errors="surrogateescape"), report
