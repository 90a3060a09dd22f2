"""The demo's synthetic shapes dataset and its tiny tokenizer (demo/synthetic_shapes.py)."""

import json
import re
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "demo"))
import synthetic_shapes  # noqa: E402

SMALL_COUNTS = {"num_train": 40, "num_validation": 10, "num_test": 10}
ENGLISH = re.compile(
    r"^a (?P<size>small|large) (?P<colour>red|green|blue|yellow|purple|orange) "
    r"(?P<shape>circle|square|triangle|star) "
    r"(?P<where>on the left|on the right|at the top|at the bottom|in the center"
    r"|in the (?:top|bottom) (?:left|right) corner)$"
)
FRENCH = re.compile(
    r"^(?:un (?:petit|grand) (?:cercle|carré|triangle) (?:rouge|vert|bleu|jaune|violet|orange)"
    r"|une (?:petite|grande) étoile (?:rouge|verte|bleue|jaune|violette|orange)) "
    r"(?:à gauche|à droite|en haut|en bas|au centre|en (?:haut|bas) à (?:gauche|droite))$"
)


def read_metadata(split_dir: Path) -> list[dict]:
    with open(split_dir / "metadata.jsonl", encoding="utf-8") as metadata:
        return [json.loads(line) for line in metadata]


@pytest.fixture(scope="module")
def small_splits(tmp_path_factory) -> dict:
    return synthetic_shapes.make_splits(tmp_path_factory.mktemp("shapes"), seed=0, **SMALL_COUNTS)


def test_splits_have_the_requested_sizes_files_and_both_captions(small_splits):
    for name, split in small_splits["splits"].items():
        records = read_metadata(split["path"])
        assert len(records) == split["count"] == SMALL_COUNTS[f"num_{name}"]
        assert len(list(split["path"].glob("*.png"))) == split["count"]
        for record in records:
            assert set(record) == {"file_name", "caption_en", "caption_fr"}
            assert ENGLISH.match(record["caption_en"]) and FRENCH.match(record["caption_fr"])
            image = Image.open(split["path"] / record["file_name"])
            assert image.size == (64, 64) and image.mode == "RGB"


def test_splits_are_different_renders(small_splits):
    pixels = {name: {(split["path"] / record["file_name"]).read_bytes() for record in read_metadata(split["path"])}
              for name, split in small_splits["splits"].items()}
    assert not pixels["train"] & pixels["validation"]
    assert not pixels["train"] & pixels["test"]
    assert not pixels["validation"] & pixels["test"]


def test_every_combination_is_drawn_once_before_any_is_drawn_twice(tmp_path):
    records = synthetic_shapes.write_split(tmp_path, 432 + 10, np.random.default_rng(0))
    first_round = [record["caption_en"] for record in records[:432]]
    assert sorted(first_round) == sorted(synthetic_shapes.all_captions("en"))


def test_same_seed_gives_identical_files(small_splits, tmp_path):
    again = synthetic_shapes.make_splits(tmp_path / "again", seed=0, **SMALL_COUNTS)
    for name, split in small_splits["splits"].items():
        first, second = split["path"], again["splits"][name]["path"]
        assert (first / "metadata.jsonl").read_bytes() == (second / "metadata.jsonl").read_bytes()
        for record in read_metadata(first):
            assert (first / record["file_name"]).read_bytes() == (second / record["file_name"]).read_bytes()

    other_seed = synthetic_shapes.make_splits(tmp_path / "other", seed=1, **SMALL_COUNTS)
    first_image = small_splits["splits"]["train"]["path"] / "00000.png"
    assert first_image.read_bytes() != (other_seed["splits"]["train"]["path"] / "00000.png").read_bytes()


def test_cache_hit_keeps_files_and_changed_params_regenerate(tmp_path):
    root = tmp_path / "shapes"
    first = synthetic_shapes.make_splits(root, seed=3, num_train=20, num_validation=4, num_test=4)
    assert not first["cached"]
    assert json.loads((root / "DONE").read_text())["num_train"] == 20
    watched = [root / "train" / "00000.png", root / "train" / "metadata.jsonl", root / "test" / "00000.png"]
    mtimes = [path.stat().st_mtime_ns for path in watched]

    second = synthetic_shapes.make_splits(root, seed=3, num_train=20, num_validation=4, num_test=4)
    assert second["cached"]
    assert [path.stat().st_mtime_ns for path in watched] == mtimes

    changed = synthetic_shapes.make_splits(root, seed=3, num_train=12, num_validation=4, num_test=4)
    assert not changed["cached"]
    assert len(read_metadata(root / "train")) == 12
    assert len(list((root / "train").glob("*.png"))) == 12  # stale files of the old run are gone
    assert json.loads((root / "DONE").read_text())["num_train"] == 12


def test_captions_follow_the_template_in_both_languages():
    describe = synthetic_shapes.describe
    assert describe("circle", "red", "small", "left") == "a small red circle on the left"
    assert describe("star", "blue", "large", "center") == "a large blue star in the center"
    assert describe("square", "green", "small", "top right") == "a small green square in the top right corner"
    assert describe("circle", "red", "small", "left", "fr") == "un petit cercle rouge à gauche"
    # étoile is feminine: article, size and colour agree; French has no word for the corner
    assert describe("star", "purple", "large", "top right", "fr") == "une grande étoile violette en haut à droite"
    assert describe("square", "green", "small", "bottom", "fr") == "un petit carré vert en bas"
    for language, pattern in (("en", ENGLISH), ("fr", FRENCH)):
        captions = synthetic_shapes.all_captions(language)
        assert len(captions) == len(set(captions)) == 4 * 6 * 2 * 9
        assert all(pattern.match(caption) for caption in captions)
        assert {len(caption.split()) for caption in captions} == ({7, 9} if language == "en" else {6, 8})
    words = {word for language in ("en", "fr") for caption in synthetic_shapes.all_captions(language)
             for word in caption.split()}
    assert words == set(synthetic_shapes.caption_words())
    with pytest.raises(ValueError):
        describe("hexagon", "red", "small", "left")
    with pytest.raises(ValueError):
        describe("circle", "red", "small", "left", "de")


def test_render_is_a_pure_function_of_the_generator():
    first = synthetic_shapes.render("star", "purple", "large", "top", np.random.default_rng(7))
    second = synthetic_shapes.render("star", "purple", "large", "top", np.random.default_rng(7))
    assert first.size == (64, 64) and first.mode == "RGB"
    assert np.array_equal(np.asarray(first), np.asarray(second))
    # The shape is there: many pixels far from grey, with a strong red and blue (purple) and weak green.
    pixels = np.asarray(first).astype(int)
    saturated = pixels.max(axis=-1) - pixels.min(axis=-1) > 60
    assert saturated.sum() > 200
    red, green, blue = pixels[saturated].mean(axis=0)
    assert red > green + 40 and blue > green + 40


def test_tokenizer_round_trips_every_caption_one_token_per_word(tmp_path):
    tokenizer = synthetic_shapes.build_tokenizer(tmp_path / "tokenizer")
    assert (tokenizer.pad_token_id, tokenizer.eos_token_id, tokenizer.unk_token_id) == (0, 1, 2)
    for caption in synthetic_shapes.all_captions("en") + synthetic_shapes.all_captions("fr"):
        ids = tokenizer(caption).input_ids
        assert len(ids) == len(caption.split()) + 1 and ids[-1] == tokenizer.eos_token_id
        assert tokenizer.unk_token_id not in ids
        assert tokenizer.decode(ids, skip_special_tokens=True) == caption

    from transformers import AutoTokenizer

    reloaded = AutoTokenizer.from_pretrained(tmp_path / "tokenizer")
    for caption in ("a large blue star in the center", "une grande étoile bleue en haut à gauche"):
        assert reloaded(caption).input_ids == tokenizer(caption).input_ids
    # Words outside the vocabulary fall back to single characters instead of <unk>.
    assert reloaded.decode(reloaded("a dog").input_ids, skip_special_tokens=True) == "a dog"


def test_imagefolder_loads_the_splits(small_splits, tmp_path):
    datasets = pytest.importorskip("datasets")
    cache_dir = str(tmp_path / "hf_cache")
    test_split = datasets.load_dataset(
        "imagefolder", data_dir=str(small_splits["splits"]["test"]["path"]), split="train", cache_dir=cache_dir
    )
    assert set(test_split.column_names) == {"image", "caption_en", "caption_fr"}
    assert test_split.num_rows == SMALL_COUNTS["num_test"]
    assert isinstance(test_split[0]["image"], Image.Image)
    first = read_metadata(small_splits["splits"]["test"]["path"])[0]
    assert (test_split[0]["caption_en"], test_split[0]["caption_fr"]) == (first["caption_en"], first["caption_fr"])

    all_splits = datasets.load_dataset("imagefolder", data_dir=str(small_splits["root"]), cache_dir=cache_dir)
    assert {name: split.num_rows for name, split in all_splits.items()} == {
        "train": SMALL_COUNTS["num_train"],
        "validation": SMALL_COUNTS["num_validation"],
        "test": SMALL_COUNTS["num_test"],
    }
