"""A procedurally generated captioned image dataset, in two languages, and a tiny T5 tokenizer for its words.

Every image is 64x64 RGB: a light grey, slightly noisy background with ONE coloured shape on it: 4 shapes x 6 colours
x 2 sizes x 9 positions (432 combinations). Each image has two captions that say the same thing::

    caption_en: "a small red circle on the left"           "a large purple star in the top right corner"
    caption_fr: "un petit cercle rouge à gauche"           "une grande étoile violette en haut à droite"

French puts the colour after the shape, makes the article, the size and the colour agree with the shape's gender
(étoile is feminine) and has no word for "corner", so the two are not a word-for-word substitution. Captions have 7
or 9 English words, 6 or 8 French ones (corners are longer).

Splits are written in the ``datasets`` "imagefolder" layout (PNG files plus ``metadata.jsonl`` with ``file_name``,
``caption_en`` and ``caption_fr``). Each split has its own random stream, so no image is in two splits::

    python demo/synthetic_shapes.py --root outputs/shapes --tokenizer-dir outputs/shapes_tokenizer
"""

from __future__ import annotations

import argparse
import itertools
import json
import shutil
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw
from transformers import T5Tokenizer

# Bump when rendering, sampling or captions change, so cached splits written by an older version are regenerated.
GENERATOR_VERSION = 2

IMAGE_SIZE = 64
SUPERSAMPLING = 4  # shapes are drawn at 4x and downsampled, for smooth edges

SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "star")
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "green": (40, 170, 60),
    "blue": (40, 80, 220),
    "yellow": (240, 215, 30),
    "purple": (140, 50, 180),
    "orange": (245, 135, 20),
}
# Circumradius range (pixels) of the shape for each size word. Small shapes were 8-10 px until a base trained from
# scratch kept confusing small circles and squares (validation exact match 0.90 vs 0.95 at 10-12 px, 12 epochs).
SIZE_RADII: dict[str, tuple[float, float]] = {"small": (10.0, 12.0), "large": (18.0, 22.0)}
# Centre of each position's region, as fractions of the image side (x, y).
POSITION_CENTRES: dict[str, tuple[float, float]] = {
    "left": (0.25, 0.5),
    "right": (0.75, 0.5),
    "top": (0.5, 0.25),
    "bottom": (0.5, 0.75),
    "center": (0.5, 0.5),
    "top left": (0.25, 0.25),
    "top right": (0.75, 0.25),
    "bottom left": (0.25, 0.75),
    "bottom right": (0.75, 0.75),
}
COLOUR_JITTER = 15  # per channel, +-
POSITION_JITTER = 3  # pixels, +-
EDGE_MARGIN = 1  # pixels kept free between the shape and the image border
BACKGROUND_SHADES = (195, 225)  # light grey, one shade per image
BACKGROUND_NOISE = 4  # per pixel and channel, +-

LANGUAGES: tuple[str, ...] = ("en", "fr")
CAPTION_COLUMNS: dict[str, str] = {language: f"caption_{language}" for language in LANGUAGES}

# French: (masculine, feminine) forms; the shape decides which (étoile is feminine, the others masculine).
FRENCH_SHAPES: dict[str, tuple[str, bool]] = {
    "circle": ("cercle", False), "square": ("carré", False), "triangle": ("triangle", False),
    "star": ("étoile", True),
}  # fmt: skip
FRENCH_SIZES: dict[str, tuple[str, str]] = {"small": ("petit", "petite"), "large": ("grand", "grande")}
FRENCH_COLOURS: dict[str, tuple[str, str]] = {
    "red": ("rouge", "rouge"), "green": ("vert", "verte"), "blue": ("bleu", "bleue"),
    "yellow": ("jaune", "jaune"), "purple": ("violet", "violette"), "orange": ("orange", "orange"),
}  # fmt: skip
FRENCH_POSITIONS: dict[str, str] = {
    "left": "à gauche", "right": "à droite", "top": "en haut", "bottom": "en bas", "center": "au centre",
    "top left": "en haut à gauche", "top right": "en haut à droite",
    "bottom left": "en bas à gauche", "bottom right": "en bas à droite",
}  # fmt: skip

SPLIT_NAMES: tuple[str, ...] = ("train", "validation", "test")
DONE_FILE = "DONE"
METADATA_FILE = "metadata.jsonl"
EXTRA_TOKENIZER_WORDS: tuple[str, ...] = (
    "an", "photo", "picture", "image", "of", "with", "and", "le", "la", "de", "et",
)  # fmt: skip
FALLBACK_CHARACTERS = "abcdefghijklmnopqrstuvwxyzàâçéèêëîïôûùü0123456789.,'-!?"

Combination = tuple[str, str, str, str]  # (shape, colour, size, position)


def describe(shape: str, colour: str, size: str, position: str, language: str = "en") -> str:
    """The caption of an image in ``language``: ``"a {size} {colour} {shape} {where}"`` in English,
    ``"{un|une} {size} {shape} {colour} {where}"`` in French, with the French words agreeing with the shape."""
    for value, allowed in ((shape, SHAPES), (colour, COLOURS), (size, SIZE_RADII), (position, POSITION_CENTRES),
                           (language, LANGUAGES)):
        if value not in allowed:
            raise ValueError(f"unknown attribute {value!r}; expected one of {list(allowed)}")
    if language == "fr":
        noun, feminine = FRENCH_SHAPES[shape]
        article = "une" if feminine else "un"
        return f"{article} {FRENCH_SIZES[size][feminine]} {noun} {FRENCH_COLOURS[colour][feminine]} " \
               f"{FRENCH_POSITIONS[position]}"
    if " " in position:
        where = f"in the {position} corner"
    else:
        where = {"center": "in the center", "top": "at the top", "bottom": "at the bottom"}.get(
            position, f"on the {position}")
    return f"a {size} {colour} {shape} {where}"


def all_combinations() -> list[Combination]:
    """Every (shape, colour, size, position): 4 x 6 x 2 x 9 = 432."""
    return list(itertools.product(SHAPES, COLOURS, SIZE_RADII, POSITION_CENTRES))


def all_captions(language: str = "en") -> list[str]:
    """Every caption the generator can write in ``language`` (432, all different)."""
    return [describe(*combination, language=language) for combination in all_combinations()]


def caption_words() -> list[str]:
    """All words any caption in any language can contain, each once, in first-seen order."""
    words: dict[str, None] = {}
    for language in LANGUAGES:
        for caption in all_captions(language):
            words.update(dict.fromkeys(caption.split()))
    return list(words)


def _shape_polygon(shape: str, centre_x: float, centre_y: float, radius: float) -> list[tuple[float, float]]:
    """Vertices of a polygonal shape with the given circumradius (square, upward triangle, 5-point star)."""
    if shape == "square":
        half_side = 0.85 * radius  # a bit bigger than inscribed, so a square has about a circle's visual weight
        return [
            (centre_x - half_side, centre_y - half_side),
            (centre_x + half_side, centre_y - half_side),
            (centre_x + half_side, centre_y + half_side),
            (centre_x - half_side, centre_y + half_side),
        ]
    if shape == "triangle":
        # Equilateral, pointing up, its bounding box centred on the centre point. Its own circumradius is 1.15x,
        # so it is about as wide as the circle (half base ~ radius) and still inside the radius-sized box.
        triangle_radius = 1.15 * radius
        half_height = 0.75 * triangle_radius
        half_base = 0.866 * triangle_radius
        return [
            (centre_x, centre_y - half_height),
            (centre_x + half_base, centre_y + half_height),
            (centre_x - half_base, centre_y + half_height),
        ]
    if shape == "star":
        inner_radius = 0.42 * radius
        vertices = []
        for point in range(10):
            angle = -np.pi / 2 + point * np.pi / 5
            point_radius = radius if point % 2 == 0 else inner_radius
            vertices.append((centre_x + point_radius * np.cos(angle), centre_y + point_radius * np.sin(angle)))
        return vertices
    raise ValueError(f"not a polygonal shape: {shape!r}")


def _shape_mask(shape: str, centre_x: float, centre_y: float, radius: float) -> np.ndarray:
    """Coverage (0..1, float32, IMAGE_SIZE x IMAGE_SIZE) of the shape, anti-aliased by supersampling."""
    scale = SUPERSAMPLING
    canvas = Image.new("L", (IMAGE_SIZE * scale, IMAGE_SIZE * scale), 0)
    draw = ImageDraw.Draw(canvas)
    cx, cy, r = centre_x * scale, centre_y * scale, radius * scale
    if shape == "circle":
        draw.ellipse((cx - r, cy - r, cx + r, cy + r), fill=255)
    else:
        draw.polygon(_shape_polygon(shape, cx, cy, r), fill=255)
    small = canvas.resize((IMAGE_SIZE, IMAGE_SIZE), Image.Resampling.BOX)
    return np.asarray(small, dtype=np.float32) / 255.0


def render(shape: str, colour: str, size: str, position: str, rng: np.random.Generator) -> Image.Image:
    """Draw one image: a single ``shape`` in ``colour`` on a noisy light grey background.

    The randomness (background shade and noise, exact radius, colour jitter of +-15 per channel, a few pixels of
    position jitter) all comes from ``rng``, so the same generator state gives the same pixels. Large shapes near an
    edge are moved inwards until they fit (a large shape "on the left" has its centre about 21 px from the left).
    """
    describe(shape, colour, size, position)  # validates the attributes

    shade = rng.integers(BACKGROUND_SHADES[0], BACKGROUND_SHADES[1] + 1)
    noise = rng.integers(-BACKGROUND_NOISE, BACKGROUND_NOISE + 1, size=(IMAGE_SIZE, IMAGE_SIZE, 3))
    background = (shade + noise).astype(np.float32)

    radius = float(rng.uniform(*SIZE_RADII[size]))
    fraction_x, fraction_y = POSITION_CENTRES[position]
    jitter_x, jitter_y = rng.integers(-POSITION_JITTER, POSITION_JITTER + 1, size=2)
    # Keep the whole shape inside the image: large shapes at the sides sit a bit closer to the centre.
    lowest, highest = radius + EDGE_MARGIN, IMAGE_SIZE - radius - EDGE_MARGIN
    centre_x = float(np.clip(fraction_x * IMAGE_SIZE + jitter_x, lowest, highest))
    centre_y = float(np.clip(fraction_y * IMAGE_SIZE + jitter_y, lowest, highest))

    jitter = rng.integers(-COLOUR_JITTER, COLOUR_JITTER + 1, size=3)
    fill = np.clip(np.asarray(COLOURS[colour]) + jitter, 0, 255).astype(np.float32)

    coverage = _shape_mask(shape, centre_x, centre_y, radius)[..., None]
    pixels = background * (1.0 - coverage) + fill * coverage
    return Image.fromarray(np.clip(np.rint(pixels), 0, 255).astype(np.uint8), mode="RGB")


def balanced_draws(values: list[Any], count: int, rng: np.random.Generator) -> list[Any]:
    """``count`` draws from ``values`` in shuffled rounds: each value once per round, so counts differ by <= 1."""
    draws: list[Any] = []
    while len(draws) < count:
        order = rng.permutation(len(values))
        draws.extend(values[index] for index in order[: count - len(draws)])
    return draws


def write_split(split_dir: str | Path, count: int, rng: np.random.Generator) -> list[dict[str, str]]:
    """Write ``count`` PNG images and their ``metadata.jsonl`` into ``split_dir`` (imagefolder layout). Combinations
    are drawn in shuffled rounds of all 432, so every combination appears once before any appears twice."""
    split_dir = Path(split_dir)
    split_dir.mkdir(parents=True, exist_ok=True)
    digits = max(5, len(str(count)))
    records = []
    for index, combination in enumerate(balanced_draws(all_combinations(), count, rng)):
        file_name = f"{index:0{digits}d}.png"
        render(*combination, rng).save(split_dir / file_name, format="PNG")
        records.append({"file_name": file_name,
                        **{column: describe(*combination, language=language)
                           for language, column in CAPTION_COLUMNS.items()}})
    with open(split_dir / METADATA_FILE, "w", encoding="utf-8") as metadata:
        metadata.writelines(json.dumps(record, ensure_ascii=False) + "\n" for record in records)
    return records


def make_splits(
    root: str | Path, num_train: int = 2000, num_validation: int = 200, num_test: int = 200, seed: int = 0
) -> dict[str, Any]:
    """Write ``root/train``, ``root/validation`` and ``root/test`` (imagefolder layout) unless already there.

    The three splits come from independent random streams (``seed`` and the split's index), so they hold different
    renders; with 432 combinations and a few thousand images, most combinations occur in every split (new pixels,
    same kind of picture). The output is a pure function of the parameters (same seed, same file bytes).
    ``root/DONE`` records the parameters as JSON; if it matches, nothing is rewritten, otherwise the splits are
    regenerated from scratch.

    Returns ``{"root": Path, "cached": bool, "splits": {name: {"path": Path, "count": int}}}``.
    """
    root = Path(root)
    counts = {"train": num_train, "validation": num_validation, "test": num_test}
    for name, count in counts.items():
        if count < 0:
            raise ValueError(f"num_{name} must be >= 0, got {count}")
    params = {"generator_version": GENERATOR_VERSION, "seed": seed, **{f"num_{name}": n for name, n in counts.items()}}
    result_splits = {name: {"path": root / name, "count": count} for name, count in counts.items()}

    done_path = root / DONE_FILE
    if done_path.is_file():
        try:
            cached = json.loads(done_path.read_text(encoding="utf-8")) == params
        except json.JSONDecodeError:
            cached = False
        if cached:
            return {"root": root, "cached": True, "splits": result_splits}

    root.mkdir(parents=True, exist_ok=True)
    done_path.unlink(missing_ok=True)
    for split_index, name in enumerate(SPLIT_NAMES):
        split_dir = root / name
        if split_dir.exists():
            shutil.rmtree(split_dir)
        # One independent stream per split: changing one split's size leaves the others' images unchanged.
        rng = np.random.default_rng([seed, split_index])
        write_split(split_dir, counts[name], rng)
    done_path.write_text(json.dumps(params, sort_keys=True) + "\n", encoding="utf-8")
    return {"root": root, "cached": False, "splits": result_splits}


def tokenizer_words() -> list[str]:
    """The whole words of the tokenizer: every caption word (both languages) plus a few common captioning words."""
    return list(dict.fromkeys([*caption_words(), *EXTRA_TOKENIZER_WORDS]))


def build_tokenizer(save_dir: str | Path | None = None) -> T5Tokenizer:
    """A tiny word-level T5 (Unigram) tokenizer: one piece per caption word, single characters as fallback.

    Special ids follow T5: ``<pad>`` 0, ``</s>`` 1, ``<unk>`` 2. Both languages share it, as Flan-T5's tokenizer
    covers English and French. Checks that every caption the generator can write becomes exactly one token per word
    plus ``</s>`` and decodes back to the same string; saves with ``save_pretrained`` if ``save_dir`` is given.
    """
    vocab = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("▁", -3.0)]
    vocab += [("▁" + word, -1.0 - 0.01 * index) for index, word in enumerate(tokenizer_words())]
    vocab += [(character, -5.0) for character in FALLBACK_CHARACTERS]
    tokenizer = T5Tokenizer(vocab=vocab, extra_ids=0)

    if (tokenizer.pad_token_id, tokenizer.eos_token_id, tokenizer.unk_token_id) != (0, 1, 2):
        raise RuntimeError("unexpected special token ids in the demo tokenizer")
    for caption in all_captions("en") + all_captions("fr"):
        ids = tokenizer(caption).input_ids
        if len(ids) != len(caption.split()) + 1 or ids[-1] != tokenizer.eos_token_id or tokenizer.unk_token_id in ids:
            raise RuntimeError(f"caption {caption!r} is not one token per word: {tokenizer.convert_ids_to_tokens(ids)}")
        decoded = tokenizer.decode(ids, skip_special_tokens=True)
        if decoded != caption:
            raise RuntimeError(f"caption {caption!r} decodes to {decoded!r}")

    if save_dir is not None:
        tokenizer.save_pretrained(str(save_dir))
    return tokenizer


def main(argv: list[str] | None = None) -> None:
    """Command line: write the splits (cached) and optionally the tokenizer."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--root", type=Path, required=True, help="folder for train/, validation/, test/")
    parser.add_argument("--num-train", type=int, default=2000)
    parser.add_argument("--num-validation", type=int, default=200)
    parser.add_argument("--num-test", type=int, default=200)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--tokenizer-dir", type=Path, default=None, help="also save the demo tokenizer here")
    args = parser.parse_args(argv)

    result = make_splits(args.root, args.num_train, args.num_validation, args.num_test, args.seed)
    state = "cached" if result["cached"] else "written"
    for name, split in result["splits"].items():
        print(f"{name}: {split['count']} images in {split['path']} ({state})")
    if args.tokenizer_dir is not None:
        tokenizer = build_tokenizer(args.tokenizer_dir)
        print(f"tokenizer: {len(tokenizer)} pieces saved to {args.tokenizer_dir}")


if __name__ == "__main__":
    main()
