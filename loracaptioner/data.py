"""Captioned-image datasets for training: loading (Hub, imagefolder, webdataset shards), column detection, lazy image
decoding, skipping and counting bad rows, and the collator that turns rows into `pixel_values` + `labels`."""

from __future__ import annotations

import glob
import io
import math
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import datasets
from PIL import Image

from .processing_loracaptioner import LoraCaptionerProcessor, to_rgb_image

IMAGE_COLUMNS = ("image", "jpg", "jpeg", "png", "webp")
CAPTION_COLUMNS = ("caption", "captions", "text", "txt")


def detect_column(column_names: list[str], given: str | None, candidates: tuple[str, ...], what: str) -> str:
    """The column named `given`, else the first of `candidates` present; a clear error listing what exists."""
    if given is not None:
        if given not in column_names:
            raise ValueError(f"{what} column {given!r} not found; the dataset has columns {sorted(column_names)}")
        return given
    for name in candidates:
        if name in column_names:
            return name
    raise ValueError(
        f"no {what} column found (looked for {list(candidates)}); the dataset has columns {sorted(column_names)}: "
        f"pass --{what}_column"
    )


def load_image(value, name: str = "image") -> Image.Image:
    """A dataset image cell (undecoded `{"bytes", "path"}`, raw bytes, a path or a PIL image) -> RGB PIL image.
    Raises `ValueError` naming the image and the problem."""
    try:
        if isinstance(value, dict):
            name = value.get("path") or name
            value = value.get("bytes") or value.get("path")
        if isinstance(value, (bytes, bytearray)):
            if not value:
                raise ValueError("empty file")
            value = Image.open(io.BytesIO(value))
        elif isinstance(value, (str, Path)):
            if not Path(value).is_file():
                raise ValueError("no such file")
            value = Image.open(value)
        if value is None:
            raise ValueError("no image data")
        return to_rgb_image(value, str(name))
    except ValueError as error:
        raise ValueError(str(error) if str(error).startswith(str(name)) else f"{name}: {error}") from None
    except (OSError, SyntaxError, Image.DecompressionBombError) as error:
        raise ValueError(f"{name}: cannot decode image ({type(error).__name__}: {error})") from None


def captions_of(cell) -> list[str]:
    """The non-empty captions in a caption cell (a string, a list of strings, None or NaN)."""
    if cell is None or (isinstance(cell, float) and math.isnan(cell)):
        return []
    cells = cell if isinstance(cell, (list, tuple)) else [cell]
    return [text.strip() for text in cells if isinstance(text, str) and text.strip()]


def load_caption_dataset(
    dataset_name: str | None = None,
    dataset_config_name: str | None = None,
    split: str = "train",
    data_dir: str | None = None,
    data_files: str | list[str] | None = None,
    streaming: bool = False,
    cache_dir: str | None = None,
):
    """One split from a Hub/local dataset name, an imagefolder (`metadata.jsonl`/`.csv`) or webdataset `.tar` shards."""
    if dataset_name is not None:
        return datasets.load_dataset(dataset_name, dataset_config_name, split=split, streaming=streaming,
                                     cache_dir=cache_dir)
    if data_dir is not None:
        if not Path(data_dir).is_dir():
            raise ValueError(f"data directory {data_dir!r} does not exist")
        return datasets.load_dataset("imagefolder", data_dir=data_dir, split="train", streaming=streaming,
                                     cache_dir=cache_dir)
    if data_files is not None:
        files = [data_files] if isinstance(data_files, str) else list(data_files)
        expanded = [path for pattern in files for path in (sorted(glob.glob(pattern)) if "*" in pattern else [pattern])]
        missing = [f for f in expanded if not Path(f).is_file()]
        if missing or not expanded:
            raise ValueError(f"webdataset shard(s) not found: {missing or files}")
        return datasets.load_dataset("webdataset", data_files={"train": expanded}, split="train", streaming=streaming,
                                     cache_dir=cache_dir)
    raise ValueError("give a dataset name, a data directory or data files")


@dataclass
class SkipCounter:
    """Rows left out, by reason: reported at the end of a run instead of silently dropped."""

    reasons: Counter = field(default_factory=Counter)

    def add(self, reason: str, count: int = 1) -> None:
        self.reasons[reason] += count

    @property
    def total(self) -> int:
        return sum(self.reasons.values())

    def summary(self) -> str:
        return ", ".join(f"{count} {reason}" for reason, count in self.reasons.most_common()) or "none"


def _problem(image_cell, caption_cell) -> str:
    """'' when a row is usable, else the reason it is not."""
    if not captions_of(caption_cell):
        return "empty caption"
    try:
        load_image(image_cell)
    except ValueError:
        return "undecodable image"
    return ""


def prepare_split(
    dataset,
    image_column: str,
    caption_column: str,
    skipped: SkipCounter,
    one_row_per_caption: bool,
    max_samples: int | None = None,
    num_proc: int | None = None,
):
    """Keep images undecoded (decoded lazily, per batch), drop and count unusable rows, and for training give each
    caption of an image its own row. Output columns: `image` (undecoded) and `caption` (str) or `references` (list)."""
    if isinstance(dataset.features, datasets.Features) and isinstance(
        dataset.features.get(image_column), datasets.Image
    ):
        dataset = dataset.cast_column(image_column, datasets.Image(decode=False))
    if max_samples is not None:
        dataset = dataset.select(range(min(max_samples, len(dataset)))) if isinstance(
            dataset, datasets.Dataset) else dataset.take(max_samples)

    if isinstance(dataset, datasets.Dataset):
        problems = dataset.map(
            lambda row: {"problem": _problem(row[image_column], row[caption_column])},
            remove_columns=dataset.column_names, num_proc=num_proc, desc="checking images and captions",
        )["problem"]
        for reason, count in Counter(problems).items():
            if reason:
                skipped.add(reason, count)
        dataset = dataset.select([i for i, reason in enumerate(problems) if not reason])
    else:  # streaming: checked lazily as rows stream by, counted in this process

        def usable(row) -> bool:
            reason = _problem(row[image_column], row[caption_column])
            if reason:
                skipped.add(reason)
            return not reason

        dataset = dataset.filter(usable)

    def to_rows(batch):
        images, texts = batch[image_column], batch[caption_column]
        if one_row_per_caption:
            pairs = [(image, caption) for image, cell in zip(images, texts) for caption in captions_of(cell)]
            return {"image": [p[0] for p in pairs], "caption": [p[1] for p in pairs]}
        return {"image": images, "references": [captions_of(cell) for cell in texts]}

    columns = dataset.column_names
    return dataset.map(to_rows, batched=True, remove_columns=columns)


@dataclass
class CaptionCollator:
    """Rows {`image`, `caption` | `references`} -> `pixel_values` and `labels` (padding = -100). Images are decoded here,
    lazily; for evaluation rows, the first reference is the label (for the loss) and all count for the metrics."""

    processor: LoraCaptionerProcessor
    max_target_length: int = 32

    def __call__(self, rows: list[dict]) -> dict:
        images = [load_image(row["image"], f"row {i}") for i, row in enumerate(rows)]
        captions = [row["caption"] if "caption" in row else row["references"][0] for row in rows]
        batch = self.processor(images=images, text_target=captions, max_target_length=self.max_target_length)
        return dict(batch)
