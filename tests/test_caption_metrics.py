"""Tests for the local `evaluate` module loracaptioner/caption_metrics.

The scores are checked against pycocoevalcap's scorers (`Cider`, `Bleu(4)`,
`Rouge`) fed with the output of our pure-Python COCO tokeniser, so Java is not
needed.  If Java is available, the tokeniser itself is also compared with the
Stanford PTBTokenizer jar shipped in pycocoevalcap.
"""

import contextlib
import importlib.util
import io
import math
import os
import shutil
import subprocess
from pathlib import Path

import pytest


from loracaptioner.caption_metrics import CAPTION_METRICS_PATH as METRIC_DIR

METRIC_SCRIPT = METRIC_DIR / "caption_metrics.py"
KEYS = ["cider", "bleu_1", "bleu_2", "bleu_3", "bleu_4", "rouge_l"]
ATOL = 1e-6


def _load_module():
    spec = importlib.util.spec_from_file_location("caption_metrics_under_test", METRIC_SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


cm = _load_module()


# ~15 images, 1-5 references each: varied lengths, repeated words, punctuation,
# a prediction identical to a reference, one with zero overlap, an empty one,
# duplicated references, a single-token prediction.
PREDICTIONS = [
    "A man riding a wave on top of a surfboard.",
    "Two dogs playing with a frisbee in the grass",
    "A plate of food with broccoli and rice.",
    "zebra zebra zebra",
    "The quick brown fox.",
    "",
    "A cat doesn't like the man's dog (really).",
    "a black-and-white photo of a street",
    "A giraffe",
    "A very very very long caption that goes on and on about a small red bus parked on the "
    "side of the road near a tree",
    "Is this a bus? Yes!",
    "A clock tower at 3 o'clock on St. Mark's square",
    "a TV on a stand",
    "Two people skiing down a snowy hill.",
    "Dog.",
    "A dog",
]
REFERENCES = [
    [
        "A man riding a wave on top of a surfboard.",
        "A surfer rides a large wave in the ocean.",
        "A person on a surfboard riding a wave!",
        "Man surfing on a big, blue wave.",
        "A surfer is riding the waves.",
    ],
    [
        "Two dogs are playing with a red frisbee on the grass.",
        "A pair of dogs chase a frisbee.",
        "Dogs playing in a field.",
    ],
    ["A plate with broccoli, rice and chicken.", "Food on a white plate: broccoli & rice."],
    [
        "Three zebras standing in a field.",
        "A group of zebras grazing on the grass.",
        "Zebras in the wild",
    ],
    ["A kitchen with a stove, a sink and a refrigerator."],
    ["A cat sitting on a laptop keyboard.", "A cat laying on a computer."],
    ["The cat doesn't like the dog.", "A cat and a dog that don't get along..."],
    [
        "A black-and-white photo of a busy city street.",
        "An old black and white photograph of a street with cars.",
        "A street scene in black & white.",
        "Black-and-white picture of people walking down a street.",
    ],
    [
        "A tall giraffe standing next to a tree and eating leaves from its branches on a sunny "
        "day in the zoo."
    ],
    ["A red bus parked on the side of the road.", "A small red bus.", "Red bus near a tree"],
    ["A bus is driving down the street?", "yes, a bus."],
    ["A clock tower in a square.", "The clock on the tower reads 3:00."],
    ["A television on a wooden stand.", "A TV sitting on a TV stand.", "Flat-screen TV."],
    [
        "Two people skiing down a snowy hill.",
        "Two people skiing down a snowy hill.",
        "Skiers on a slope.",
    ],
    ["A dog sitting.", "dog"],
    ["A dog"],
]


def _pycoco_scores(predictions, references):
    """pycocoevalcap scores on already tokenised strings (no Java involved)."""
    pytest.importorskip("pycocoevalcap")
    from pycocoevalcap.bleu.bleu import Bleu
    from pycocoevalcap.cider.cider import Cider
    from pycocoevalcap.rouge.rouge import Rouge

    gts = {i: list(refs) for i, refs in enumerate(references)}
    res = {i: [pred] for i, pred in enumerate(predictions)}
    with contextlib.redirect_stdout(io.StringIO()):  # Bleu prints its statistics
        cider, cider_per_image = Cider().compute_score(gts, res)
        bleu, _ = Bleu(4).compute_score(gts, res, verbose=0)
        rouge, rouge_per_image = Rouge().compute_score(gts, res)
    scores = {"cider": cider, "rouge_l": rouge}
    scores.update({f"bleu_{n + 1}": value for n, value in enumerate(bleu)})
    return scores, list(cider_per_image), list(rouge_per_image)


def _tokenised_corpus():
    predictions = [cm.coco_tokenize(p) for p in PREDICTIONS]
    references = [[cm.coco_tokenize(r) for r in refs] for refs in REFERENCES]
    return predictions, references


def _assert_scores_equal(ours, expected):
    assert sorted(ours) == sorted(KEYS)
    for key in KEYS:
        assert isinstance(ours[key], float)
        assert ours[key] == pytest.approx(float(expected[key]), abs=ATOL, rel=0), key


# --------------------------------------------------------------------------- #
# Tokeniser                                                                   #
# --------------------------------------------------------------------------- #

# All expected strings were checked against Stanford CoreNLP 3.4.1's
# PTBTokenizer (-preserveLines -lowerCase) + pycocoevalcap's punctuation filter.
TOKENIZER_CASES = [
    ("A man riding a wave on top of a surfboard.", "a man riding a wave on top of a surfboard"),
    ("Don't do that, it's the man's dog!", "do n't do that it 's the man 's dog"),
    ("I CAN'T believe they'll WIN", "i ca n't believe they 'll win"),
    (
        'A black-and-white photo of a grey cat (sleeping) on a "rug".',
        "a black-and-white photo of a grey cat -lrb- sleeping -rrb- on a rug",
    ),
    ("He cannot go; we're fine... Really?!", "he can not go we 're fine really ?!"),
    ("Mr. Smith lives on Main St. in the U.S.", "mr. smith lives on main st. in the u.s."),
    (
        "Two dogs' toys at 10:30 a.m. cost $5, i.e. 50% off.",
        "two dogs toys at 10:30 a.m. cost $ 5 i.e. 50 % off",
    ),
    ("  Multiple   spaces\tand\nnewlines  ", "multiple spaces and newlines"),
    ("It\u2019s a \u201cquoted\u201d word \u2014 really\u2026", "it 's a quoted word really"),
    ("A 2-year-old boy with a T-shirt -- and a hat - on", "a 2-year-old boy with a t-shirt and a hat on"),
    ("o'clock, rock'n'roll & AT&T", "o'clock rock 'n' roll & at&t"),
    ("", ""),
    ("Wait...!? Yes", "wait !? yes"),
]


@pytest.mark.parametrize("text,expected", TOKENIZER_CASES)
def test_coco_tokenize(text, expected):
    assert cm.coco_tokenize(text) == expected


def test_tokenizer_lowercases_and_drops_punctuation():
    tokens = cm.coco_tokenize("A DOG, A Cat; and: a BIRD!").split()
    assert tokens == ["a", "dog", "a", "cat", "and", "a", "bird"]
    assert not set(tokens) & cm.PUNCTUATIONS


def test_ptb_tokenize_keeps_punctuation():
    assert cm.ptb_tokenize("Don't stop, please.") == ["do", "n't", "stop", ",", "please", "."]


@pytest.mark.skipif(shutil.which("java") is None, reason="Java not available")
def test_tokenizer_matches_stanford_ptb_tokenizer(tmp_path):
    """Optional: compare with the real Stanford tokenizer used by pycocoevalcap."""
    pycocoevalcap = pytest.importorskip("pycocoevalcap")
    jar = Path(list(pycocoevalcap.__path__)[0]) / "tokenizer" / "stanford-corenlp-3.4.1.jar"
    if not jar.exists():
        pytest.skip("Stanford CoreNLP jar not found")
    captions = PREDICTIONS + [r for refs in REFERENCES for r in refs] + [t for t, _ in TOKENIZER_CASES]
    captions = [c.replace("\n", " ") for c in captions]
    source = tmp_path / "captions.txt"
    source.write_text("\n".join(captions), encoding="utf-8")
    try:
        out = subprocess.run(
            ["java", "-cp", str(jar), "edu.stanford.nlp.process.PTBTokenizer",
             "-preserveLines", "-lowerCase", str(source)],
            capture_output=True, check=True, timeout=60,
        ).stdout.decode("utf-8")
    except (subprocess.SubprocessError, OSError) as err:  # broken/odd Java install
        pytest.skip(f"could not run the Stanford tokenizer: {err}")
    lines = out.split("\n")
    for caption, line in zip(captions, lines):
        expected = " ".join(w for w in line.rstrip().split(" ") if w not in cm.PUNCTUATIONS)
        assert cm.coco_tokenize(caption) == expected, caption


# --------------------------------------------------------------------------- #
# Scores vs pycocoevalcap                                                     #
# --------------------------------------------------------------------------- #


def test_scores_match_pycocoevalcap():
    predictions, references = _tokenised_corpus()
    expected, cider_per_image, rouge_per_image = _pycoco_scores(predictions, references)

    ours = cm.compute_caption_metrics(PREDICTIONS, REFERENCES)
    _assert_scores_equal(ours, expected)

    hyp = [p.split() for p in predictions]
    refs = [[r.split() for r in rs] for rs in references]
    _, our_cider_per_image = cm.cider_d(hyp, refs)
    _, our_rouge_per_image = cm.rouge_l(hyp, refs)
    assert our_cider_per_image == pytest.approx(cider_per_image, abs=ATOL, rel=0)
    assert our_rouge_per_image == pytest.approx(rouge_per_image, abs=ATOL, rel=0)
    # sanity: the scores are not degenerate on this corpus
    assert 0.1 < ours["cider"] < 10 and 0 < ours["bleu_4"] < ours["bleu_1"] < 1


def test_scores_match_pycocoevalcap_on_subsets():
    """Single image, identical caption, zero overlap, empty prediction, ..."""
    for indices in ([0], [0, 4], [4], [3, 13], [5, 14, 15], [1, 2, 6, 8, 9, 12], list(range(0, 16, 3))):
        predictions = [PREDICTIONS[i] for i in indices]
        references = [REFERENCES[i] for i in indices]
        tok_preds = [cm.coco_tokenize(p) for p in predictions]
        tok_refs = [[cm.coco_tokenize(r) for r in refs] for refs in references]
        expected, _, _ = _pycoco_scores(tok_preds, tok_refs)
        _assert_scores_equal(cm.compute_caption_metrics(predictions, references), expected)


def test_pretokenized_inputs():
    predictions, references = _tokenised_corpus()
    expected, _, _ = _pycoco_scores(predictions, references)
    ours = cm.compute_caption_metrics(predictions, references, tokenize=False)
    _assert_scores_equal(ours, expected)
    # with tokenize=False nothing is lower-cased or split off
    upper = cm.compute_caption_metrics(["A Dog."], [["a dog"]], tokenize=False)
    assert upper["bleu_1"] < 1e-6
    assert cm.compute_caption_metrics(["A Dog."], [["a dog"]])["bleu_1"] == pytest.approx(1.0)


def test_identical_and_disjoint_captions():
    same = cm.compute_caption_metrics(["a cat on a mat", "a dog"], [["a cat on a mat"], ["a dog"]])
    assert same["bleu_1"] == pytest.approx(1.0) and same["rouge_l"] == pytest.approx(1.0)
    disjoint = cm.compute_caption_metrics(["the quick brown fox"], [["a kitchen with a sink"]])
    assert disjoint["cider"] == 0.0 and disjoint["rouge_l"] == 0.0 and disjoint["bleu_1"] < 1e-6


def test_empty_prediction_is_scored():
    scores = cm.compute_caption_metrics(["", "a dog runs"], [["a cat sleeps"], ["a dog runs fast"]])
    assert all(math.isfinite(v) for v in scores.values())
    _, per_image = cm.rouge_l([[], ["a"]], [[["b"]], [["a"]]])
    assert per_image[0] == 0.0


@pytest.mark.parametrize(
    "predictions,references,message",
    [
        ([], [], "empty corpus"),
        (["a dog"], [["a dog"], ["a cat"]], "1 predictions but 2"),
        (["a dog", "a cat"], [["a dog"]], "2 predictions but 1"),
        (["a dog"], [[]], "no reference"),
    ],
)
def test_invalid_inputs(predictions, references, message):
    with pytest.raises(ValueError, match=message):
        cm.compute_caption_metrics(predictions, references)


# --------------------------------------------------------------------------- #
# evaluate.load                                                               #
# --------------------------------------------------------------------------- #


@pytest.fixture(scope="module")
def metric():
    evaluate = pytest.importorskip("evaluate")
    return evaluate.load(str(METRIC_DIR))


def test_evaluate_load_matches_pycocoevalcap(metric):
    predictions, references = _tokenised_corpus()
    expected, _, _ = _pycoco_scores(predictions, references)
    _assert_scores_equal(metric.compute(predictions=PREDICTIONS, references=REFERENCES), expected)

    # incremental use and pre-tokenised inputs
    for pred, refs in zip(PREDICTIONS, REFERENCES):
        metric.add_batch(predictions=[pred], references=[refs])
    _assert_scores_equal(metric.compute(), expected)
    _assert_scores_equal(
        metric.compute(predictions=predictions, references=references, tokenize=False), expected
    )


def test_evaluate_single_reference_strings(metric):
    predictions = ["A dog runs on the grass.", "Two cats sleep."]
    references = ["A dog is running on the grass.", "Two cats are sleeping on a couch."]
    assert metric.compute(predictions=predictions, references=references) == pytest.approx(
        cm.compute_caption_metrics(predictions, [[r] for r in references]), abs=1e-12
    )


def test_evaluate_invalid_inputs(metric):
    with pytest.raises(ValueError, match="empty corpus"):
        metric.compute(predictions=[], references=[])
    with pytest.raises(ValueError):
        metric.compute(predictions=["a dog"], references=[["a dog"], ["a cat"]])


def test_module_is_self_contained():
    """evaluate copies only this script: it must not import project or test-only code."""
    source = METRIC_SCRIPT.read_text(encoding="utf-8")
    assert "pycocoevalcap" not in "\n".join(
        line for line in source.splitlines() if line.lstrip().startswith(("import ", "from "))
    )
    assert os.path.basename(METRIC_DIR) + ".py" == METRIC_SCRIPT.name
