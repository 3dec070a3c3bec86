"""Give the shipped model the tag mapping's novel nouns: DCC's direct transfer (Hendricks et al. 2016).

    apt-get install -y wordnet-base                       # WordNet 3.0 in /usr/share/wordnet
    python scripts/transfer_novel_nouns.py --out runs/novel/flickr8k_lite0_novel.pt

The novel nouns are the nouns of captioner/assets/imagenet_nouns.tsv that the model's vocabulary
lacks (zebra, banana, vase, ...): the tags can name them, but no caption can say them. Each word of
such a noun's word set (zebra, zebras) is appended to the vocabulary with the embedding, output row
and bias of its nearest known word (`finetune.grow_vocabulary`'s `like`): the known noun of the
mapping (dog, horse, cup, ...) at the shortest WordNet hypernym path from it (path similarity; a
tie goes to the word the training captions use most), in the same number (the plural takes the
plural's rows where the vocabulary has it). Each noun's senses are the synsets of the ImageNet
classes it tags, so "lion" is the big cat, not the zodiac sign. Known words and every other weight
stay bit for bit, so captions that no constraint asks for stay the known word's.

WordNet's data.noun is read as scripts/make_imagenet_nouns.py reads it (nltk's WordNet reader
needs a lexnames file the Debian package lacks).
"""
from __future__ import annotations

import argparse
from pathlib import Path

from make_imagenet_nouns import CHECKPOINT, WNIDS, WORDNET, ancestors, read_noun_synsets

from captioner import checkpoint
from captioner.finetune import grow_vocabulary
from captioner.tags import read_mapping
from captioner.vocab import Vocab


def path_length(a: list[int], b: list[int], synsets) -> float:
    """The shortest path between any sense of a and any of b through a shared hypernym."""
    best = float("inf")
    for x in a:
        ax = ancestors(x, synsets)
        for y in b:
            by = ancestors(y, synsets)
            best = min([best, *(ax[h] + by[h] for h in ax.keys() & by.keys())])
    return best


def nearest_known(folder: Path, vocab: Vocab) -> dict[str, tuple[str, float]]:
    """Novel noun -> (its nearest known noun of the mapping, their WordNet path length)."""
    synsets = read_noun_synsets(folder)
    classes: dict[str, list[int]] = {}  # noun -> the synsets of the ImageNet classes it tags: the senses it has here
    for (noun, _), wnid in zip(read_mapping(), WNIDS.read_text().split()):
        if noun:
            classes.setdefault(noun, []).append(int(wnid[1:]))
    known = [n for n in classes if n in vocab.stoi]
    out = {}
    for noun in sorted(n for n in classes if n not in vocab.stoi and " " not in n):  # a phrase's words are known
        lengths = {k: path_length(classes[noun], classes[k], synsets) for k in known}
        out[noun] = min(known, key=lambda k: (lengths[k], vocab.stoi[k])), min(lengths.values())
    return out


def transfer_table(folder: Path, vocab: Vocab) -> dict[str, str]:
    """Every word of each novel noun's word set -> the known word whose rows it takes."""
    words = {noun: ws for noun, ws in read_mapping() if noun}
    like = {}
    for noun, (source, _) in nearest_known(folder, vocab).items():
        plural = [w for w in words[source] if w != source and w in vocab.stoi]
        for w in (w for w in words[noun] if w not in vocab.stoi):
            like[w] = plural[0] if w != noun and plural else source
    return like


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", type=Path, default=CHECKPOINT)
    p.add_argument("--wordnet", type=Path, default=WORDNET)
    p.add_argument("--out", type=Path, required=True)
    args = p.parse_args()
    base = checkpoint.load(args.checkpoint)
    old = Vocab.from_dict(base["vocab"])
    for noun, (source, length) in nearest_known(args.wordnet, old).items():
        print(f"{noun}\t{source}\t{length:g}")
    like = transfer_table(args.wordnet, old)
    new = Vocab(old.itos + list(like))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    # fp16 like the shipped model: its weights were fp16 already, so nothing is lost.
    checkpoint.save(args.out, config=base["config"], vocab=new.to_dict(), encoder=base.get("encoder"),
                    decoder=grow_vocabulary(base["decoder"], old, new, like), half=True)
    print(f"wrote {args.out}: {len(new) - len(old)} words added to {len(old)}")


if __name__ == "__main__":
    main()
