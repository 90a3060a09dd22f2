"""A procedurally generated captioned image dataset, and a tiny T5 tokenizer for its words, for the offline demo.

Every image is 64x64 RGB: a light grey, slightly noisy background with ONE coloured shape on it. Its caption says
what is there, e.g. ``"a small red circle on the left"`` or ``"a large blue star in the center"``.

Six (colour, shape) pairs are held out: they never appear in the train and validation splits, and they are the
only pairs in the test split, so the test split measures compositional generalisation (every colour and every shape
is still seen in training, with other partners).

Splits are written in the ``datasets`` "imagefolder" layout (PNG files plus ``metadata.jsonl`` with ``file_name``
and ``caption``), so ``datasets.load_dataset("imagefolder", data_dir=root)`` loads all three at once::

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

# Bump when rendering or sampling changes, so cached splits written by an older version are regenerated.
GENERATOR_VERSION = 1

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
# Circumradius range (pixels) of the shape for each size word.
SIZE_RADII: dict[str, tuple[float, float]] = {"small": (8.0, 10.0), "large": (18.0, 22.0)}
# Centre of each position's region, as fractions of the image side (x, y).
POSITION_CENTRES: dict[str, tuple[float, float]] = {
    "left": (0.25, 0.5),
    "right": (0.75, 0.5),
    "top": (0.5, 0.25),
    "bottom": (0.5, 0.75),
    "center": (0.5, 0.5),
}
COLOUR_JITTER = 15  # per channel, +-
POSITION_JITTER = 3  # pixels, +-
EDGE_MARGIN = 1  # pixels kept free between the shape and the image border
BACKGROUND_SHADES = (195, 225)  # light grey, one shade per image
BACKGROUND_NOISE = 4  # per pixel and channel, +-

SPLIT_NAMES: tuple[str, ...] = ("train", "validation", "test")
DONE_FILE = "DONE"
METADATA_FILE = "metadata.jsonl"
EXTRA_TOKENIZER_WORDS: tuple[str, ...] = (
    "a", "an", "photo", "picture", "image", "of", "the", "in", "on", "with", "and",
)  # fmt: skip
FALLBACK_CHARACTERS = "abcdefghijklmnopqrstuvwxyz0123456789.,'-!?"

Combination = tuple[str, str, str, str]  # (shape, colour, size, position)


def held_out_pairs() -> list[tuple[str, str]]:
    """The (colour, shape) pairs that never appear in train/validation and are the only ones in test.

    A Latin-square-like pick: the i-th colour goes with shape ``i mod 4``, so every colour is held out with exactly
    one shape and each shape loses at most two of its six colours; all colours and shapes remain in training.
    """
    return [(colour, SHAPES[index % len(SHAPES)]) for index, colour in enumerate(COLOURS)]


def seen_pairs() -> list[tuple[str, str]]:
    """The (colour, shape) pairs of the train and validation splits: all pairs except the held-out ones."""
    held_out = set(held_out_pairs())
    return [(colour, shape) for colour in COLOURS for shape in SHAPES if (colour, shape) not in held_out]


def describe(shape: str, colour: str, size: str, position: str) -> str:
    """The caption of an image: ``"a {size} {colour} {shape} on the {position}"`` (``"in the center"`` for center)."""
    for value, allowed in ((shape, SHAPES), (colour, COLOURS), (size, SIZE_RADII), (position, POSITION_CENTRES)):
        if value not in allowed:
            raise ValueError(f"unknown attribute {value!r}; expected one of {list(allowed)}")
    where = "in the center" if position == "center" else f"on the {position}"
    return f"a {size} {colour} {shape} {where}"


def all_captions() -> list[str]:
    """Every caption the generator can write (4 shapes x 6 colours x 2 sizes x 5 positions = 240)."""
    return [
        describe(shape, colour, size, position)
        for shape, colour, size, position in itertools.product(SHAPES, COLOURS, SIZE_RADII, POSITION_CENTRES)
    ]


def caption_words() -> list[str]:
    """All words any caption can contain, each once, in first-seen order."""
    words: dict[str, None] = {}
    for caption in all_captions():
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
    position jitter) all comes from ``rng``, so the same generator state gives the same pixels.
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


def sample_combinations(pairs: list[tuple[str, str]], count: int, rng: np.random.Generator) -> list[Combination]:
    """``count`` (shape, colour, size, position) combinations with balanced pairs, sizes and positions.

    Each attribute comes from its own stream of shuffled rounds (see ``balanced_draws``), so every (colour, shape)
    pair appears as soon as ``count >= len(pairs)``, every size at 2 and every position at 5;
    which size and position go with which pair is random.
    """
    pair_draws = balanced_draws(pairs, count, rng)
    size_draws = balanced_draws(list(SIZE_RADII), count, rng)
    position_draws = balanced_draws(list(POSITION_CENTRES), count, rng)
    return [
        (shape, colour, size, position)
        for (colour, shape), size, position in zip(pair_draws, size_draws, position_draws)
    ]


def write_split(
    split_dir: str | Path, pairs: list[tuple[str, str]], count: int, rng: np.random.Generator
) -> list[dict[str, str]]:
    """Write ``count`` PNG images and their ``metadata.jsonl`` into ``split_dir`` (imagefolder layout)."""
    split_dir = Path(split_dir)
    split_dir.mkdir(parents=True, exist_ok=True)
    digits = max(5, len(str(count)))
    records = []
    for index, (shape, colour, size, position) in enumerate(sample_combinations(pairs, count, rng)):
        file_name = f"{index:0{digits}d}.png"
        render(shape, colour, size, position, rng).save(split_dir / file_name, format="PNG")
        records.append({"file_name": file_name, "caption": describe(shape, colour, size, position)})
    with open(split_dir / METADATA_FILE, "w", encoding="utf-8") as metadata:
        metadata.writelines(json.dumps(record) + "\n" for record in records)
    return records


def make_splits(
    root: str | Path, num_train: int = 2000, num_validation: int = 200, num_test: int = 200, seed: int = 0
) -> dict[str, Any]:
    """Write ``root/train``, ``root/validation`` and ``root/test`` (imagefolder layout) unless already there.

    Train and validation only hold seen (colour, shape) pairs, test only the held-out ones. The output is a pure
    function of the parameters (same seed, same file bytes). ``root/DONE`` records the parameters as JSON; if it
    matches, nothing is rewritten, otherwise the splits are regenerated from scratch.

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
    pairs_by_split = {"train": seen_pairs(), "validation": seen_pairs(), "test": held_out_pairs()}
    for split_index, name in enumerate(SPLIT_NAMES):
        split_dir = root / name
        if split_dir.exists():
            shutil.rmtree(split_dir)
        # One independent stream per split: changing one split's size leaves the others' images unchanged.
        rng = np.random.default_rng([seed, split_index])
        write_split(split_dir, pairs_by_split[name], counts[name], rng)
    done_path.write_text(json.dumps(params, sort_keys=True) + "\n", encoding="utf-8")
    return {"root": root, "cached": False, "splits": result_splits}


def tokenizer_words() -> list[str]:
    """The whole words of the tokenizer: every caption word plus a few common captioning words."""
    return list(dict.fromkeys([*caption_words(), *EXTRA_TOKENIZER_WORDS]))


def build_tokenizer(save_dir: str | Path | None = None) -> T5Tokenizer:
    """A tiny word-level T5 (Unigram) tokenizer: one piece per caption word, single characters as fallback.

    Special ids follow T5: ``<pad>`` 0, ``</s>`` 1, ``<unk>`` 2. Checks that every caption the generator can write
    becomes exactly one token per word plus ``</s>`` and decodes back to the same string; saves with
    ``save_pretrained`` if ``save_dir`` is given.
    """
    vocab = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("▁", -3.0)]
    vocab += [("▁" + word, -1.0 - 0.01 * index) for index, word in enumerate(tokenizer_words())]
    vocab += [(character, -5.0) for character in FALLBACK_CHARACTERS]
    tokenizer = T5Tokenizer(vocab=vocab, extra_ids=0)

    if (tokenizer.pad_token_id, tokenizer.eos_token_id, tokenizer.unk_token_id) != (0, 1, 2):
        raise RuntimeError("unexpected special token ids in the demo tokenizer")
    for caption in all_captions():
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
    print(f"held-out (colour, shape) pairs in test only: {held_out_pairs()}")
    if args.tokenizer_dir is not None:
        tokenizer = build_tokenizer(args.tokenizer_dir)
        print(f"tokenizer: {len(tokenizer)} pieces saved to {args.tokenizer_dir}")


if __name__ == "__main__":
    main()
