"""`captioner evaluate`: BLEU that matches its references, bad data counted, three caption sources."""
from __future__ import annotations

import csv
import json
import math
import shutil
import warnings

import pytest
from nltk.translate.bleu_score import corpus_bleu
from pycocoevalcap.bleu.bleu import Bleu
from test_data import _write_coco, _write_karpathy

from captioner import metrics
from captioner.cli import main
from captioner.data import Example, load_flickr8k
from captioner.evaluate import leave_one_out, load_examples
from captioner.vocab import tokenize

HYPS = ["a dog runs through the green grass", "two children play on a red slide in the park",
        "a man rides a bike down the street", "a black dog jumps over a log"]
REFS = [["a brown dog is running through the grass", "a dog runs across a green field", "the dog runs on grass"],
        ["two kids are playing on a slide", "children play on the red slide at a park", "two children on a slide"],
        ["a man is riding a bicycle on the street", "a cyclist rides down a street", "a man rides his bike"],
        ["a black dog jumps over a fallen log", "a dog leaping over a log in the woods", "the dog jumps"]]


def coco_bleu(hyps: list[str], refs: list[list[str]]) -> list[float]:
    """pycocoevalcap's corpus BLEU-1..4 (0-100) on our tokens, so only the formulas differ."""
    res = {i: [" ".join(tokenize(h))] for i, h in enumerate(hyps)}
    gts = {i: [" ".join(tokenize(r)) for r in rs] for i, rs in enumerate(refs)}
    return [100 * s for s in Bleu(4).compute_score(gts, res, verbose=0)[0]]


def nltk_bleu(hyps, refs) -> list[float]:
    with warnings.catch_warnings():  # zero n-gram overlap warnings
        warnings.simplefilter("ignore", UserWarning)
        scores = corpus_bleu([[tokenize(r) for r in rs] for rs in refs], [tokenize(h) for h in hyps],
                             weights=metrics.BLEU_WEIGHTS)
    return [100 * s for s in scores]


# -- the BLEU itself --------------------------------------------------------------------

def test_bleu_is_nltk_corpus_bleu_and_matches_pycocoevalcap_on_ordinary_captions():
    ours = metrics.bleu(HYPS, REFS)
    assert [ours[f"bleu{n}"] for n in range(1, 5)] == nltk_bleu(HYPS, REFS)
    assert 10 < ours["bleu4"] < ours["bleu1"] < 100
    # Every hypothesis has >= 4 words and every n-gram order some match: the formulas coincide.
    assert [ours[f"bleu{n}"] for n in range(1, 5)] == pytest.approx(coco_bleu(HYPS, REFS), abs=1e-6)


def test_cider_d_is_pycocoevalcaps_when_its_corpus_is_the_scored_images():
    from pycocoevalcap.cider.cider import Cider

    refs = [[tokenize(r) for r in rs] for rs in REFS]
    hyps = [tokenize(h) for h in HYPS] + [[], ["dog"]]  # and an empty and a one-word caption
    refs += refs[:2]
    ours = metrics.CiderD(refs)
    theirs = Cider().compute_score({i: [" ".join(r) for r in rs] for i, rs in enumerate(refs)},
                                   {i: [" ".join(h)] for i, h in enumerate(hyps)})[1]
    assert [ours.score(h, i) for i, h in enumerate(hyps)] == pytest.approx(list(theirs), abs=1e-12)
    assert ours.score(refs[0][0], 0) > ours.score(refs[1][0], 0) > 0  # its own reference beats another image's
    # The idf is the corpus's, not the scored batch's: scoring alone gives the corpus score.
    assert metrics.CiderD(refs[:1]).score(hyps[0], 0) != pytest.approx(ours.score(hyps[0], 0))


def test_closest_reference_length_ties_go_to_the_shorter_reference_in_both():
    # 5 words, references of 4 and 6: both libraries take 4, so no brevity penalty.
    hyp, refs = "a dog runs on grass", ["a dog runs fast", "a dog runs on the lawn"]
    p = [4 / 5, 3 / 4, 2 / 3, 1 / 2]
    expected = [100 * math.prod(p[:n]) ** (1 / n) for n in (1, 2, 3, 4)]
    ours = metrics.bleu([hyp], [refs])
    assert [ours[f"bleu{n}"] for n in (1, 2, 3, 4)] == pytest.approx(expected, abs=1e-9)
    assert coco_bleu([hyp], [refs]) == pytest.approx(expected, abs=1e-6)
    assert expected[0] * math.exp(1 - 6 / 5) < expected[0] - 10  # taking 6 would show


def test_pinned_difference_no_ngram_match_is_0_in_nltk_and_epsilon_in_pycocoevalcap():
    # No 4-gram in common. bleu_scorer.py multiplies (correct + 1e-15) / (guess + 1e-9) for each order,
    # so the 4-gram factor becomes 1e-15 / 3 instead of nltk's (practically) 0.
    hyp, ref = "a dog runs past the tree", "a dog runs by the tree"
    p = [5 / 6, 3 / 5, 1 / 4]
    assert metrics.bleu([hyp], [[ref]])["bleu4"] < 1e-70  # nltk puts sys.float_info.min for the 0
    assert coco_bleu([hyp], [[ref]])[3] == pytest.approx(100 * (math.prod(p) * 1e-15 / 3) ** 0.25, rel=1e-6)
    assert 0.005 < coco_bleu([hyp], [[ref]])[3] < 0.01  # visible on the 0-100 scale, below 1e-3 on 0-1


def test_pinned_difference_hypothesis_shorter_than_n_adds_one_ngram_in_nltk_only():
    # nltk's modified_precision counts max(1, #4-grams) = 1 for a 3-word hypothesis; bleu_scorer.py
    # counts max(0, 3 - 4 + 1) = 0. So nltk's 4-gram precision is 2/4 here and pycocoevalcap's 2/3.
    hyps, refs = ["a dog runs past the tree", "a red ball"], [["a dog runs past the big tree"], ["a red ball"]]
    bp = math.exp(1 - 10 / 9)  # 9 hypothesis words, closest reference lengths 7 + 3
    p = [9 / 9, 6 / 7, 4 / 5]
    ours, coco = metrics.bleu(hyps, refs), coco_bleu(hyps, refs)
    assert ours["bleu4"] == pytest.approx(100 * bp * (math.prod(p) * 2 / 4) ** 0.25, abs=1e-9)
    assert coco[3] == pytest.approx(100 * bp * (math.prod(p) * 2 / 3) ** 0.25, rel=1e-6)
    assert [ours[f"bleu{n}"] for n in (1, 2, 3)] == pytest.approx(coco[:3], abs=1e-6)


def test_diversity_counts_words_distinct_and_copied_captions():
    hyps = ["A dog runs.", "a dog runs", "a cat sleeps on a mat", ""]
    r = metrics.diversity(hyps, training_captions=["a dog runs", "a bird flies"])
    assert r["vocab_used"] == 7  # a dog runs cat sleeps on mat
    assert r["distinct_pct"] == 75.0  # the first two are the same caption once tokenized
    assert r["verbatim_train_pct"] == 50.0
    assert r["mean_length"] == (3 + 3 + 6 + 0) / 4
    assert "verbatim_train_pct" not in metrics.diversity(hyps)


def test_empty_hypothesis_scores_without_error():
    # The empty one adds its shortest reference to the brevity penalty's length.
    assert 0 < metrics.bleu(["", HYPS[0]], [REFS[1], REFS[0]])["bleu1"] < metrics.bleu([HYPS[0]], [REFS[0]])["bleu1"]
    assert metrics.sentence_bleu("", REFS[0])["bleu1"] == 0


def test_object_mentions_count_nouns_two_references_name_against_the_captions_nouns():
    hyps = ["a dog chases two cats and a dog", "a man rides a bike", "a horse in a field", "a woman smiles"]
    refs = [["a dog chases a cat", "two cats and a dog", "a dog runs"],  # gold dog, cat: both named
            ["a man on a bicycle", "a man rides his bike", "a cyclist"],  # bike in 1 reference: not gold
            ["a zebra grazing", "two zebras in a field", "a horse"],  # gold zebra (its plural counts), missed
            ["a woman smiles", "a smiling woman", "a lady"]]  # no objects: counts nothing
    r = metrics.object_mentions(hyps, refs)
    # predicted: dog, cat | bike | horse; gold: dog, cat | - | zebra
    assert (r["mention_hits"], r["mention_predicted"], r["mention_gold"]) == (2, 4, 3)
    assert r["mention_precision"] == 50.0 and r["mention_recall"] == pytest.approx(200 / 3)
    assert r["mention_f1"] == pytest.approx(2 * 50 * 200 / 3 / (50 + 200 / 3))
    counts = metrics.mention_counts(hyps, refs, metrics.object_nouns())
    assert counts["zebra"] == {"hit": 0, "predicted": 0, "gold": 1} and counts["bike"]["predicted"] == 1
    # Another noun list and threshold: "bicycle" joins bike, one reference is enough.
    r1 = metrics.object_mentions(hyps, refs, {"bike": {"bike", "bicycle"}, "dog": {"dog"}}, min_refs=1)
    assert (r1["mention_hits"], r1["mention_predicted"], r1["mention_gold"]) == (2, 2, 2)
    assert metrics.object_mentions(["a woman"], [["a woman"]])["mention_f1"] == 0.0  # nothing to name: no error
    assert "ride" not in metrics.object_nouns()  # "rides" (the carousel's noun) is a verb in captions


def test_a_two_word_name_is_mentioned_by_its_words_in_a_row():
    hyps = ["a dog with a tennis ball", "a ball on the tennis court", "a boy holds a teddy"]
    refs = [["a dog chases a tennis ball", "a dog and its tennis ball"],
            ["a tennis ball on a court", "tennis balls by the net"],
            ["a boy and his teddy bear", "a child hugs a teddy bear"]]
    counts = metrics.mention_counts(hyps, refs, metrics.object_nouns())
    assert counts["tennis ball"] == {"hit": 1, "predicted": 1, "gold": 2}  # "ball ... tennis" is not one
    assert counts["teddy bear"] == {"hit": 1, "predicted": 1, "gold": 1}  # its own one-word name counts too
    assert "bear" not in counts  # a teddy bear is no bear


# -- the human ceiling --------------------------------------------------------------------

def test_human_ceiling_is_one_corpus_of_each_reference_against_the_others():
    exs = [Example("x.jpg", None, REFS[0]), Example("y.jpg", None, REFS[1][:2]), Example("z.jpg", None, ["one"])]
    c = leave_one_out(exs)
    assert c.ids == ["x.jpg#0", "x.jpg#1", "x.jpg#2", "y.jpg#0", "y.jpg#1"]
    assert c.hypotheses[1] == REFS[0][1] and c.references[1] == [REFS[0][0], REFS[0][2]]
    assert c.references[3] == [REFS[1][1]]
    assert c.skipped == {"fewer than 2 references": ["z.jpg"]}
    assert metrics.bleu(c.hypotheses, c.references)["bleu4"] == nltk_bleu(c.hypotheses, c.references)[3]


# -- the split ----------------------------------------------------------------------------

def test_karpathy_and_coco_files_are_recognised_and_need_the_right_split_arguments(tiny_data, tmp_path):
    images = tiny_data / "Flicker8k_Dataset"
    dev = {ex.image_id: ex.captions for ex in load_flickr8k(tiny_data, "dev")}
    kp = _write_karpathy(tiny_data, tmp_path / "dataset_flickr8k.json")
    coco = _write_coco(tiny_data, "dev", tmp_path / "captions_dev.json")
    fmt, exs = load_examples(kp, "dev", images)
    assert fmt == "karpathy" and {ex.image_id: ex.captions for ex in exs} == dev
    fmt, exs = load_examples(coco, None, images)
    assert fmt == "coco" and sorted(ex.captions for ex in exs) == sorted(dev.values())
    with pytest.raises(ValueError, match="leave out --split"):
        load_examples(coco, "dev", images)
    with pytest.raises(ValueError, match="give --split"):
        load_examples(kp, None, images)
    with pytest.raises(ValueError, match="give --images"):
        load_examples(kp, "dev")
    (tmp_path / "results.json").write_text("[]")
    with pytest.raises(ValueError, match="neither a COCO captions file"):
        load_examples(tmp_path / "results.json")


@pytest.fixture(scope="module")
def broken_test_split(tiny_data, tmp_path_factory):
    """A Flickr8k folder holding only a test split (the dev images), with one image missing,
    one with no captions and one unreadable file."""
    root = tmp_path_factory.mktemp("only_test")
    shutil.copytree(tiny_data / "Flicker8k_Dataset", root / "Flicker8k_Dataset")
    shutil.copy(tiny_data / "Flickr8k.token.txt", root)
    names = [ex.image_id for ex in load_flickr8k(tiny_data, "dev")]
    (root / "Flicker8k_Dataset" / names[0]).unlink()
    (root / "Flicker8k_Dataset" / names[1]).write_bytes(b"not a jpeg")
    (root / "Flicker8k_Dataset" / "uncaptioned.jpg").write_bytes((tiny_data / "Flicker8k_Dataset" / names[2])
                                                                  .read_bytes())
    (root / "Flickr_8k.testImages.txt").write_text("\n".join(names + ["uncaptioned.jpg"]) + "\n")
    return root, names


def run_cli(capsys, *args) -> tuple[int, str, str]:
    rc = main(["evaluate", *args])
    out, err = capsys.readouterr()
    return rc, out, err


def test_model_evaluation_skips_bad_images_counts_them_and_writes_results(broken_test_split, tiny_checkpoint,
                                                                          tmp_path, capsys):
    root, names = broken_test_split
    rc, out, _ = run_cli(capsys, "--data", str(root), "--split", "test", "--checkpoint", str(tiny_checkpoint),
                         "--beam", "2", "--workers", "0", "--no-coco", "--json", "--out", str(tmp_path / "ev"))
    assert rc == 0
    report = json.loads(out)
    assert report["n_images"] == len(names) - 2
    assert report["skipped"] == {"no references": 1, "missing file": 1, "unreadable image": 1}
    assert report["skipped_examples"]["missing file"] == [names[0]]
    assert report["decode"]["beam_size"] == 2
    results = json.loads((tmp_path / "ev" / "results.json").read_text())
    assert [r["image_id"] for r in results] == names[2:]
    assert all(r["caption"] for r in results)
    with open(tmp_path / "ev" / "per_image.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert [r["image_id"] for r in rows] == names[2:]
    captions = {ex.image_id: ex.captions for ex in load_flickr8k(root, "test")}
    assert all(json.loads(r["references"]) == captions[r["image_id"]] for r in rows)
    hyps, refs = [r["caption"] for r in results], [captions[r["image_id"]] for r in results]
    assert {k: report[k] for k in ("bleu1", "bleu2", "bleu3", "bleu4")} == metrics.bleu(hyps, refs)
    assert report["bleu1"] > 50  # the tiny model learned its colours and shapes
    diversity = {k: report[k] for k in ("vocab_used", "distinct_pct", "mean_length")}
    assert diversity == pytest.approx(metrics.diversity(hyps))
    assert "verbatim_train_pct" not in report  # this folder has no train split to compare with
    mentions = {k: report[k] for k in ("mention_precision", "mention_recall", "mention_f1")}
    assert mentions == pytest.approx({k: v for k, v in metrics.object_mentions(hyps, refs).items() if k in mentions})

    # The same captions scored from the results file, with no model: a missing checkpoint is never opened.
    rc, out, _ = run_cli(capsys, "--data", str(root), "--split", "test", "--results",
                         str(tmp_path / "ev" / "results.json"), "--checkpoint", "/nonexistent.pt", "--no-coco")
    assert rc == 0
    assert f"BLEU-4 {report['bleu4']:.2f}" in out
    assert "2 images skipped: no caption in the results file" in out  # the missing and the unreadable one
    assert "1 image skipped: no references" in out


def test_results_file_errors_are_clear(tiny_data, tmp_path, capsys):
    name = load_flickr8k(tiny_data, "dev")[0].image_id
    bad = tmp_path / "r.json"
    for content, message in [([{"image_id": name, "caption": "a"}] * 2, "more than one caption"),
                             ({"image_id": name}, "must be a JSON list"),
                             ([{"image_id": name, "caption": None}], "entry 0")]:
        bad.write_text(json.dumps(content))
        rc, _, err = run_cli(capsys, "--data", str(tiny_data), "--split", "dev", "--results", str(bad), "--no-coco")
        assert rc == 2 and message in err
    bad.write_text(json.dumps([{"image_id": "elsewhere.jpg", "caption": "a red square"}]))
    rc, _, err = run_cli(capsys, "--data", str(tiny_data), "--split", "dev", "--results", str(bad), "--no-coco")
    assert rc == 2 and "no images left to score" in err


@pytest.mark.skipif(not metrics.java_available(), reason="coco-caption metrics need Java")
def test_coco_caption_metrics_on_a_results_file_with_an_empty_caption(tiny_data, tmp_path, capsys):
    # The one test that starts Java (PTBTokenizer, METEOR): seconds each.
    dev = load_flickr8k(tiny_data, "dev")
    results = [{"image_id": ex.image_id, "caption": ex.captions[1]} for ex in dev[1:]]
    results += [{"image_id": dev[0].image_id, "caption": ""}, {"image_id": "other.jpg", "caption": "a dog"}]
    (tmp_path / "r.json").write_text(json.dumps(results))
    rc, out, _ = run_cli(capsys, "--data", str(tiny_data), "--split", "dev", "--results", str(tmp_path / "r.json"),
                         "--json")
    assert rc == 0
    r = json.loads(out)
    assert r["n_images"] == len(dev) and r["empty_hypotheses"] == 1 and r["results_not_in_split"] == 1
    assert set(metrics.COCO_KEYS) <= set(r) and "SPICE skipped" in r["spice"]
    # Both tokenizers give the same tokens here. Each hypothesis is one of its references, so every
    # n-gram matches, but nltk counts one n-gram of each order for the empty hypothesis (see above).
    lengths = [len(tokenize(x["caption"])) for x in results[:len(dev) - 1]]
    c = sum(lengths)
    bp = math.exp(1 - (c + min(len(tokenize(ref)) for ref in dev[0].captions)) / c)  # empty: shortest ref
    assert [r[f"coco_bleu{n}"] for n in (1, 2, 3, 4)] == pytest.approx([100 * bp] * 4, abs=1e-6)
    ngrams = [sum(length - k for length in lengths) for k in range(4)]  # of order k + 1, all matched
    nltk = [100 * bp * math.prod(g / (g + 1) for g in ngrams[:n]) ** (1 / n) for n in (1, 2, 3, 4)]
    assert [r[f"bleu{n}"] for n in (1, 2, 3, 4)] == pytest.approx(nltk, abs=1e-9)
    assert all(0 < r[k] <= 100 for k in ("meteor", "rouge_l")) and r["cider"] > 0


def test_model_evaluation_on_a_csv_dataset(tiny_data, tiny_checkpoint, tmp_path, capsys):
    """A CSV is one split: no --split, no training split to compare with, and the engine asked for is reported."""
    examples = load_flickr8k(tiny_data, "dev")
    data = tmp_path / "dev.csv"
    with open(data, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["image", "caption"])
        writer.writerows((ex.path.name, c) for ex in examples for c in ex.captions)
    rc, out, _ = run_cli(capsys, "--data", str(data), "--images", str(tiny_data / "Flicker8k_Dataset"),
                         "--checkpoint", str(tiny_checkpoint), "--engine", "torch", "--workers", "0", "--no-coco",
                         "--json")
    assert rc == 0
    report = json.loads(out)
    assert report["n_images"] == len(examples)
    assert "verbatim_train_pct" not in report and report["vocab_used"] > 0
    assert report["decode"]["engine"] == "torch"
