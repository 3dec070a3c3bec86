"""What the captioning commands share: the decoding-option flags, the caption lines they print and
the text cells of their CSV files.

Torch-free (the standard library; images only when printing), so both `captioner caption` (captioner.cli)
and `python -m captioner.runtime` use it.
"""
from __future__ import annotations

import argparse
import json
import sys


class Deprecated(argparse.Action):
    """An old spelling of a flag that still works for one release, with a warning on stderr."""

    def __init__(self, *args, new: str, **kw):
        super().__init__(*args, **kw)
        self.new = new

    def __call__(self, parser, namespace, values, option_string=None):
        print(f"warning: {option_string} is deprecated and will be removed; use {self.new}", file=sys.stderr)
        setattr(namespace, self.dest, values)


# A spreadsheet runs a cell that starts like a formula; a leading apostrophe makes it text (OWASP's
# advice for CSV injection). Cells that already start with one get another, so csv_text_value undoes
# exactly what csv_text did.
_FORMULA_START = ("=", "+", "-", "@", "\t", "\r", "'")


def csv_text(value: str) -> str:
    """A text cell for a CSV file that spreadsheets open: never read as a formula."""
    return "'" + value if value.startswith(_FORMULA_START) else value


def csv_text_value(cell: str) -> str:
    """The text csv_text wrote."""
    return cell[1:] if cell.startswith("'") and cell[1:].startswith(_FORMULA_START) else cell


def decode_args(p) -> None:
    """The decoding flags on an argparse parser; decode_options reads them back."""
    p.add_argument("--method", choices=["beam", "greedy"], default=None,
                   help="beam search or greedy decoding (default: the model's, beam)")
    p.add_argument("--beam-size", type=int, default=None, help="beam size (1 = greedy; default: the model's)")
    p.add_argument("--beam", dest="beam_size", type=int, action=Deprecated, new="--beam-size",
                   help=argparse.SUPPRESS)
    p.add_argument("--max-len", type=int, default=None, help="longest caption in words")
    p.add_argument("--length-penalty", choices=["none", "avg", "wu"], default=None)
    p.add_argument("--alpha", type=float, default=None,
                   help="the wu length penalty's exponent (default: the model's)")
    p.add_argument("--guide", choices=["on", "off"], default=None,
                   help="beam search guided by the encoder's ImageNet tags, so the caption names what they see "
                        "(default: the model's, on)")


def decode_options(args) -> dict:
    """The parsed decoding flags as Captioner / Runtime options (None: the model's setting)."""
    return dict(method=args.method, beam_size=args.beam_size, max_len=args.max_len,
                length_penalty=args.length_penalty, alpha=args.alpha, guide=args.guide)


def print_captions(caption, paths: list[str], *, n_best: int, as_json: bool, **options) -> int:
    """`image<TAB>caption` lines (or JSON lines) from `caption` (Captioner.caption or Runtime.caption);
    an image that cannot be read is reported and skipped. Returns the exit status: 1 if any failed."""
    from .images import ImageError

    failed = 0
    for path in paths:
        try:
            result = caption(path, n_best=n_best, **options)
        except ImageError as e:
            failed += 1
            print(json.dumps({"image": path, "error": str(e)}) if as_json else f"{path}\terror: {e}",
                  file=sys.stdout if as_json else sys.stderr)
            continue
        for r in result if isinstance(result, list) else [result]:
            print(json.dumps({"image": path, **r}) if as_json else f"{path}\t{r['caption']}")
    return 1 if failed else 0
