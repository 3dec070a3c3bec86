"""Write captioner/assets/imagenet_nouns.tsv: each ImageNet-1k class -> the everyday noun captions use.

    apt-get install -y wordnet-base          # WordNet 3.0 in /usr/share/wordnet
    python scripts/make_imagenet_nouns.py    # rewrites the file and the shipped bundle's copy; --check only compares

ImageNet-1k class ids are WordNet 3.0 noun offsets (scripts/imagenet_wnids.txt, in class-index
order: the sorted wnids). For each class, in order:
  1. the phrase table below (a two-word name the captions use, "tennis ball"), then the override
     table, where the hypernym walk picks a wrong or too rare word;
  2. every dog breed (below WordNet's dog synset) -> dog;
  3. else a breadth-first walk up WordNet's hypernyms (and instance hypernyms) from the class
     synset itself: at the first level holding a one-word lemma that is in the shipped model's
     vocabulary (a word its Flickr8k training captions use at least 5 times) or in NOVEL, and not
     in GENERIC, the most frequent such word;
  4. else no noun (an empty cell): the class is dropped.
Each noun gets its disjunctive word set for constrained decoding: its singular and plural forms
that the vocabulary has (WordNet's irregular plurals, else the English suffix rules); a novel noun
gets both forms, a phrase both as "tennis_ball tennis_balls". And its kin (kin() below): the nouns of
the same kind, which guidance asks for as one constraint.
The shipped bundle carries a copy (the torch-free runtime tags with it), written with its SHA-256.
docs/guidance.md describes the method and where it fails.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import sys
from collections import deque
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
WORDNET = Path("/usr/share/wordnet")
WNIDS = ROOT / "scripts" / "imagenet_wnids.txt"
OUTPUT = ROOT / "captioner" / "assets" / "imagenet_nouns.tsv"
CHECKPOINT = ROOT / "captioner" / "assets" / "flickr8k_lite0.pt"
BUNDLE = ROOT / "captioner" / "assets" / "flickr8k_lite0.bundle"
HEADER = ("index", "wnid", "name", "noun", "words", "kin")

# Nouns too generic to say what a photo shows, or whose caption sense is another ("wind" for a
# wind instrument, "good" for a commodity): the walk goes past them, and a class reaching only these
# is dropped.
GENERIC = {
    "entity", "object", "thing", "whole", "unit", "part", "piece", "artifact", "matter", "substance",
    "material", "organism", "being", "life", "device", "structure", "system", "equipment", "instrument",
    "implement", "tool", "article", "item", "covering", "cover", "container", "commodity", "product",
    "good", "goods", "creation", "construction", "area", "place", "location", "region", "way", "line",
    "surface", "top", "body", "form", "shape", "group", "set", "kind", "type", "stuff", "support",
    "protection", "means", "facility", "furniture", "decoration", "design", "work", "works", "animal",
    "creature", "vertebrate", "invertebrate", "mammal", "placental", "carnivore", "ungulate", "primate", "rodent",
    "reptile", "amphibian", "arthropod", "insect", "bug", "mollusk", "crustacean", "plant", "vegetable",
    "fruit", "food", "dish", "course", "produce", "clothing", "garment", "wear", "vehicle", "conveyance",
    "craft", "watercraft", "machine", "mechanism", "display", "game", "sport", "ball", "building", "room",
    "fungus", "natural", "formation", "wind", "wood", "string", "control", "gear", "outfit", "site",
}

# Everyday nouns that Flickr8k's captions never use (so the shipped vocabulary lacks them) but that
# name ImageNet classes plainly: the walk takes them like vocabulary words, so the tags say "zebra",
# not "horse" or nothing. Guidance can use such a noun only once novel-word transfer gives the
# decoder the word.
NOVEL = {
    "lion", "leopard", "cheetah", "zebra", "wolf", "fox", "pig", "panda", "gorilla", "whale", "shark",
    "turtle", "lizard", "spider", "crab", "lobster", "butterfly", "beetle", "snail", "owl", "eagle",
    "parrot", "penguin", "goose", "clock", "lamp", "television", "trumpet", "saxophone", "cello", "banjo",
    "harp", "vase", "toaster", "microwave", "oven", "castle", "lemon", "banana", "strawberry", "broccoli",
    "mushroom", "cabbage", "cucumber", "pineapple", "cauliflower", "pepper", "artichoke", "pomegranate",
    "sandwich", "hotdog", "burger", "cheeseburger", "tea", "teapot", "keyboard", "spoon", "hammer",
    "radio", "printer", "sock", "hippopotamus", "kangaroo", "koala", "squash", "zucchini",
}

# Kin (below) meet at a hypernym at least this many links below WordNet's root: its distance from
# the farthest of its own hypernyms (along each one's shortest hypernym path).
KIN_DEPTH = 8

# Classes whose everyday name is their own two-word lemma, where the one-word walk loses the thing
# (a tennis ball reaches only the generic "ball", ice cream only "course") or misnames it ("teddy"
# alone, "racer", "fence" for a stone wall, "light", "paper"). Each phrase is one that Flickr8k's
# training captions use (tennis ball 185 times, soccer ball 184, race car 73, ice cream 31, stone wall
# 29, toilet paper 8, teddy bear 6, golf ball 5, traffic light 1), so the decoder can write it; its
# word set holds "teddy_bear" forms, which a caption names with the two words in a row, and the
# walk's one-word noun where that is the class's own name too ("teddy", "racer").
PHRASES = {
    "n04399382": "teddy bear", "n07614500": "ice cream", "n04409515": "tennis ball", "n04254680": "soccer ball",
    "n03445777": "golf ball", "n06874185": "traffic light", "n15075141": "toilet paper", "n04037443": "race car",
    "n04326547": "stone wall",
}

# Where the walk is wrong: a vocabulary word whose caption sense is another ("kite" the bird, "board"
# for a dining table), a plural lemma, or a rare word captions name by a plainer noun. "" drops it.
OVERRIDES = {
    "n01608432": "bird",  # kite (the bird)
    "n02012849": "bird",  # crane (the bird)
    "n01514668": "chicken",  # cock
    "n01514859": "chicken",  # hen
    "n01695060": "lizard",  # Komodo dragon (a monitor lizard: "monitor" is the screen in captions)
    "n01742172": "snake",  # boa constrictor
    "n01744401": "snake",  # rock python
    "n02018207": "bird",  # American coot ("rail")
    "n02071294": "whale",  # killer whale
    "n01871265": "elephant",  # tusker
    "n02403003": "cow",  # ox (the lemma is "cows")
    "n02229544": "",  # cricket (the insect; captions mean the sport)
    "n02687172": "ship",  # aircraft carrier
    "n02786058": "",  # Band Aid ("patch")
    "n02804610": "",  # bassoon
    "n03838899": "",  # oboe
    "n02892201": "",  # brass (a memorial plaque)
    "n02895154": "",  # breastplate ("plate")
    "n03032252": "",  # cinema ("house")
    "n03529860": "",  # home theater ("house")
    "n03781244": "",  # monastery ("house")
    "n03877845": "castle",  # palace
    "n03026506": "sock",  # Christmas stocking ("hose")
    "n04254777": "sock",  # sock ("hose")
    "n03042490": "",  # cliff dwelling ("home")
    "n04613696": "tent",  # yurt
    "n04277352": "",  # spindle ("stick")
    "n03355925": "pole",  # flagpole
    "n03201208": "table",  # dining table ("board")
    "n03492542": "",  # hard disc
    "n03637318": "lamp",  # lampshade ("shade")
    "n03666591": "",  # lighter ("light")
    "n04456115": "",  # torch ("light")
    "n03770439": "skirt",  # miniskirt ("mini")
    "n03825788": "",  # nipple ("cap")
    "n03832673": "laptop",  # notebook
    "n04238763": "",  # slide rule ("computer")
    "n03837869": "monument",  # obelisk
    "n04458633": "pole",  # totem pole
    "n03733131": "pole",  # maypole ("post")
    "n03895866": "train",  # passenger car ("carriage")
    "n03977966": "van",  # police van ("wagon")
    "n04049303": "barrel",  # rain barrel ("pool")
    "n04116512": "",  # rubber eraser
    "n04147183": "boat",  # schooner
    "n04125021": "",  # safe ("box")
    "n04264628": "",  # space bar
    "n04286575": "light",  # spotlight ("spot")
    "n04423845": "",  # thimble ("cap")
    "n04562935": "",  # water tower ("tank")
    "n06596364": "book",  # comic book
    "n07248320": "book",  # book jacket ("jacket")
    "n07693725": "bread",  # bagel ("roll")
    "n07871810": "",  # meat loaf ("bread")
    "n07754684": "",  # jackfruit ("jack")
    "n09256479": "",  # coral reef ("ridge")
    "n09399592": "cliff",  # promontory ("head")
    "n09332890": "lake",  # lakeside
    "n13133613": "corn",  # ear (of corn)
    "n07920052": "coffee",  # espresso
    "n03954731": "",  # plane (the carpenter's tool)
    "n04552348": "plane",  # warplane
    "n03929660": "",  # pick (a plectrum)
    "n04447861": "toilet",  # toilet seat
    "n03935335": "",  # piggy bank ("bank")
    "n03944341": "",  # pinwheel ("wheel")
    "n03594734": "jeans",  # jean ("denim")
    "n02877765": "",  # bottlecap
    "n03657121": "",  # lens cap
    "n04548362": "",  # wallet ("case")
    "n03347037": "",  # fire screen
    "n03788365": "",  # mosquito net
    "n04589890": "",  # window screen
    "n04590129": "",  # window shade
    "n04201297": "",  # shoji
    "n02128757": "leopard",  # snow leopard ("cat")
    "n02128925": "leopard",  # jaguar ("cat")
    "n03494278": "",  # harmonica ("harp")
    "n06359193": "",  # web site ("computer")
    "n03590841": "",  # jack-o'-lantern ("lamp")
    "n09421951": "beach",  # sandbar ("bar")
    "n09193705": "mountain",  # alp
    "n09428293": "beach",  # seashore
    "n03947888": "ship",  # pirate ship ("pirate", the costume in captions)
    "n03459775": "car",  # grille (a car's front; "barrier")
    "n03773504": "rocket",  # missile
    "n04008634": "rocket",  # projectile
}


def read_noun_synsets(folder: Path) -> dict[int, tuple[list[str], list[int]]]:
    """offset -> (lemmas, hypernym offsets) from WordNet's data.noun (format: wndb(5)).

    Read directly: the Debian package lacks the lexnames file nltk's WordNet reader opens, and no
    other part of WordNet is needed."""
    synsets = {}
    with open(folder / "data.noun", encoding="utf-8") as f:
        for line in f:
            if line.startswith(" "):  # the licence header
                continue
            fields = line.split(" | ", 1)[0].split()
            offset, n_words = int(fields[0]), int(fields[3], 16)
            lemmas = [fields[4 + 2 * i] for i in range(n_words)]
            at = 4 + 2 * n_words
            n_pointers = int(fields[at])
            pointers = [fields[at + 1 + 4 * i: at + 5 + 4 * i] for i in range(n_pointers)]
            hypernyms = [int(p[1]) for p in pointers if p[0] in ("@", "@i") and p[2] == "n"]
            synsets[offset] = (lemmas, hypernyms)
    return synsets


def irregular_plurals(folder: Path) -> dict[str, list[str]]:
    plurals: dict[str, list[str]] = {}
    with open(folder / "noun.exc", encoding="utf-8") as f:
        for line in f:
            plural, *singulars = line.split()
            for s in singulars:
                plurals.setdefault(s, []).append(plural)
    return plurals


def forms(noun: str, irregular: dict[str, list[str]]) -> list[str]:
    """Singular and plural; a phrase's as word_word, its last word inflected."""
    if " " in noun:
        first, last = noun.rsplit(" ", 1)
        return [f"{first}_{w}".replace(" ", "_") for w in forms(last, irregular)]
    if noun in irregular:
        return [noun, *irregular[noun]]
    if noun.endswith(("s", "x", "z", "ch", "sh")):
        return [noun, noun + "es"]
    if noun.endswith("y") and noun[-2:-1] not in "aeiou":
        return [noun, noun[:-1] + "ies"]
    return [noun, noun + "s"]


def walk(offset: int, synsets, rank: dict[str, int]) -> str:
    """The most frequent vocabulary lemma at the nearest hypernym level that has one."""
    level, seen = [offset], {offset}
    while level:
        words = {w.lower() for o in level for w in synsets[o][0] if "_" not in w and "-" not in w}
        found = [w for w in words if w in rank and w not in GENERIC]
        if found:
            return min(found, key=rank.__getitem__)
        level = [h for o in level for h in synsets[o][1] if h not in seen]
        seen.update(level)
    return ""


def ancestors(offset: int, synsets) -> dict[int, int]:
    """Every hypernym of a synset (itself included) -> its distance in hypernym links."""
    dist, level, d = {offset: 0}, [offset], 0
    while level:
        d += 1
        level = [h for o in level for h in synsets[o][1] if h not in dist]
        for h in level:
            dist.setdefault(h, d)
    return dist


def kin(nouns: dict[int, str], synsets) -> dict[str, list[str]]:
    """Noun -> the nouns of the mapping within two hypernym links of it ("boat" -> canoe, sailboat,
    ship) through a specific hypernym: one at least KIN_DEPTH links below WordNet's root (vessel,
    canine, big cat, seat), not a broad one (container, device, covering, garment: a bag and a spoon
    are not one thing). A noun's senses are, per class it tags, the nearest synset up from the class that has
    the noun as a lemma (the class itself where none has: "car" for a grille)."""
    senses: dict[str, set[int]] = {}
    for offset, noun in nouns.items():
        up, name = ancestors(offset, synsets), noun.replace(" ", "_")
        named = [(d, o) for o, d in up.items() if name in {w.lower() for w in synsets[o][0]}]
        senses.setdefault(noun, set()).add(min(named)[1] if named else offset)
    near: dict[str, dict[int, int]] = {noun: {} for noun in senses}  # its senses' specific hypernyms, 2 links
    for noun, offsets in senses.items():
        for o in offsets:
            for h, d in ancestors(o, synsets).items():
                if d <= 2 and max(ancestors(h, synsets).values()) >= KIN_DEPTH:
                    near[noun][h] = min(d, near[noun].get(h, d))
    return {a: sorted(b for b in near if b != a and any(d + near[b].get(h, 3) <= 2 for h, d in near[a].items()))
            for a in near}


def is_dog(offset: int, synsets) -> bool:
    todo = deque([offset])
    while todo:
        o = todo.popleft()
        if o == 2084071:  # dog, domestic_dog, Canis_familiaris
            return True
        todo.extend(synsets[o][1])
    return False


def build(folder: Path, wnids: list[str], vocab: list[str]) -> list[tuple[str, ...]]:
    synsets = read_noun_synsets(folder)
    irregular = irregular_plurals(folder)
    # Vocabulary words by frequency, then the novel nouns: a level with both takes the vocabulary's.
    rank = {w: i for i, w in enumerate([*vocab, *sorted(NOVEL - set(vocab))])}
    known = set(vocab)
    rows = []
    for index, wnid in enumerate(wnids):
        offset = int(wnid[1:])
        also = []  # a phrase's one-word alternative: the walk's noun where it is the class's own name ("teddy")
        if wnid in PHRASES:
            noun, own = PHRASES[wnid], walk(offset, synsets, rank)
            if own in {w.lower() for w in synsets[offset][0]}:
                also = forms(own, irregular)
        elif wnid in OVERRIDES:
            noun = OVERRIDES[wnid]
        elif is_dog(offset, synsets):
            noun = "dog"
        else:
            noun = walk(offset, synsets, rank)
        # The single words the vocabulary has (a novel noun's all, for a vocabulary that transfer extends);
        # a phrase's forms all: they only count mentions, a constraint never asks for one.
        candidates = forms(noun, irregular) + also if noun else []
        words = [w for w in candidates if "_" in w or w in known] or candidates
        name = synsets[offset][0][0].replace("_", " ")
        rows.append([str(index), wnid, name, noun, " ".join(words)])
    kinds = kin({int(r[1][1:]): r[3] for r in rows if r[3]}, synsets)
    return [(*r, ",".join(kinds[r[3]]) if r[3] else "") for r in rows]


def render(rows) -> str:
    return "".join("\t".join(r) + "\n" for r in [HEADER, *rows])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--wordnet", type=Path, default=WORDNET, help="WordNet 3.0 database folder")
    p.add_argument("--output", type=Path, default=OUTPUT)
    p.add_argument("--check", action="store_true", help="only compare with --output; exit 1 if it differs")
    args = p.parse_args()
    import torch  # the vocabulary is the shipped checkpoint's

    vocab = torch.load(CHECKPOINT, weights_only=True, map_location="cpu")["vocab"]["itos"]
    text = render(build(args.wordnet, WNIDS.read_text().split(), vocab))
    manifest = json.loads((BUNDLE / "bundle.json").read_text())
    entry, sha = manifest["files"]["tag_mapping"], hashlib.sha256(text.encode()).hexdigest()
    copy = BUNDLE / entry["path"]
    if args.check:
        for path in (args.output, copy):
            same = path.exists() and path.read_text(encoding="utf-8") == text
            print(f"{path}: {'up to date' if same else 'differs from what WordNet gives'}")
            if not same:
                sys.exit(1)
        if entry["sha256"] != sha:
            sys.exit(f"{BUNDLE / 'bundle.json'}: the mapping's SHA-256 differs")
        return
    args.output.write_text(text, encoding="utf-8")
    copy.write_text(text, encoding="utf-8")
    entry["sha256"] = sha
    (BUNDLE / "bundle.json").write_text(json.dumps(manifest, indent=1))  # as `captioner export` writes it
    mapped = sum(1 for line in text.splitlines()[1:] if line.split("\t")[3])
    print(f"wrote {args.output}: {mapped} of {len(text.splitlines()) - 1} classes mapped")


if __name__ == "__main__":
    main()
