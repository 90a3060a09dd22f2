"""Captioned-image datasets for training: loading (Hub, imagefolder, webdataset shards), column detection, lazy image
decoding, skipping and counting bad rows, cached vision features, and the collator that turns rows into model inputs."""

from __future__ import annotations

import glob
import hashlib
import math
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import datasets
import torch

from .images import load_image
from .remote_code.processing_loracaptioner import LoraCaptionerProcessor

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


def _problem(image_cell, caption_cell, require_caption: bool = True) -> str:
    """'' when a row is usable, else the reason it is not."""
    if require_caption and not captions_of(caption_cell):
        return "empty caption"
    try:
        load_image(image_cell)
    except ValueError:
        return "undecodable image"
    return ""


def row_key(row: dict, image_column: str, index: int) -> str:
    """What names a row in a predictions file: the webdataset sample key, else the image's file path, else the row's
    index in its split."""
    if row.get("__key__"):
        return str(row["__key__"])
    cell = row[image_column]
    path = cell.get("path") if isinstance(cell, dict) else cell if isinstance(cell, (str, Path)) else None
    return str(path) if path else str(index)


def prepare_split(
    dataset,
    image_column: str,
    caption_column: str | None,
    skipped: SkipCounter,
    one_row_per_caption: bool,
    max_samples: int | None = None,
    num_proc: int | None = None,
    require_caption: bool = True,
):
    """Keep images undecoded (decoded lazily, per batch), drop and count unusable rows, and for training give each
    caption of an image its own row. Output columns: `image` (undecoded) and `caption` (str) for training; `key`
    (see `row_key`), `image` and `references` (list) for evaluation and prediction. With `require_caption=False`
    (a test split to caption) rows without a caption stay, with no references, and `caption_column` may be None."""
    if isinstance(dataset.features, datasets.Features) and isinstance(
        dataset.features.get(image_column), datasets.Image
    ):
        dataset = dataset.cast_column(image_column, datasets.Image(decode=False))
    if max_samples is not None:
        dataset = dataset.select(range(min(max_samples, len(dataset)))) if isinstance(
            dataset, datasets.Dataset) else dataset.take(max_samples)
    if not one_row_per_caption:  # before rows are dropped, so that a row index is the one in the split
        dataset = dataset.map(lambda row, index: {"key": row_key(row, image_column, index)}, with_indices=True)

    def problem(row) -> str:
        return _problem(row[image_column], row[caption_column] if caption_column else None, require_caption)

    if isinstance(dataset, datasets.Dataset):
        problems = dataset.map(
            lambda row: {"problem": problem(row)},
            remove_columns=dataset.column_names, num_proc=num_proc, desc="checking images and captions",
        )["problem"]
        for reason, count in Counter(problems).items():
            if reason:
                skipped.add(reason, count)
        dataset = dataset.select([i for i, reason in enumerate(problems) if not reason])
    else:  # streaming: checked lazily as rows stream by, counted in this process

        def usable(row) -> bool:
            reason = problem(row)
            if reason:
                skipped.add(reason)
            return not reason

        dataset = dataset.filter(usable)

    def to_rows(batch):
        images = batch[image_column]
        texts = batch[caption_column] if caption_column else [None] * len(images)
        if one_row_per_caption:
            pairs = [(image, caption) for image, cell in zip(images, texts) for caption in captions_of(cell)]
            return {"image": [p[0] for p in pairs], "caption": [p[1] for p in pairs]}
        return {"key": batch["key"], "image": images, "references": [captions_of(cell) for cell in texts]}

    columns = dataset.column_names
    return dataset.map(to_rows, batched=True, remove_columns=columns)


VISION_FEATURES_COLUMN = "vision_features"


@dataclass
class CaptionCollator:
    """Rows {`image` | `vision_features`, `caption` | `references`} -> `pixel_values` (or the cached features, in the
    dtype they were stored in, as the model's `image_features` input: the model casts them to its own), `labels`
    (padding = -100, at most the processor's `max_target_length` tokens)
    and, given the model, `decoder_input_ids` (the labels shifted right, made by the model's own
    `prepare_decoder_input_ids_from_labels`, as in `DataCollatorForSeq2Seq`): the Trainer's label smoother takes
    `labels` away from the model, which then needs them. Images are decoded here, lazily; for evaluation rows, the
    first reference is the label (for the loss) and all count for the metrics. A test row without references gets
    labels of -100 only, and a batch where no row has one gets no labels (nothing to compute a loss on)."""

    processor: LoraCaptionerProcessor
    model: object | None = field(default=None, repr=False)

    def __call__(self, rows: list[dict]) -> dict:
        if VISION_FEATURES_COLUMN in rows[0]:  # cached by `cache_vision_features`: no image to decode
            batch = {"image_features": torch.stack([torch.as_tensor(row[VISION_FEATURES_COLUMN]) for row in rows])}
        else:
            images = [load_image(row["image"], f"row {i}") for i, row in enumerate(rows)]
            batch = dict(self.processor(images=images))
        captions = [row["caption"] if "caption" in row else (row["references"] or [None])[0] for row in rows]
        labelled = [i for i, caption in enumerate(captions) if caption is not None]
        if labelled:
            caption_ids = self.processor.make_labels([captions[i] for i in labelled])
            batch["labels"] = torch.full((len(rows), caption_ids.shape[1]), -100, dtype=caption_ids.dtype)
            batch["labels"][labelled] = caption_ids
            if self.model is not None:
                batch["decoder_input_ids"] = self.model.prepare_decoder_input_ids_from_labels(labels=batch["labels"])
        return batch


def vision_features_fingerprint(dataset: datasets.Dataset, model, processor: LoraCaptionerProcessor,
                                dtype: str = "float16") -> str:
    """A fingerprint of what the cached features depend on: the rows, the frozen weights, the image processing and
    the dtype they are stored in (a float32 cache is not reused as a float16 one)."""
    digest = hashlib.sha256(dataset._fingerprint.encode())
    digest.update(dtype.encode())
    for name, tensor in model.get_encoder().state_dict().items():
        if not name.startswith("bridge."):
            digest.update(name.encode())
            digest.update(tensor.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    digest.update(processor.image_processor.to_json_string().encode())
    return digest.hexdigest()[:16]


VISION_FEATURES_DTYPES = ("float16", "float32")


def cache_vision_features(dataset, model, processor: LoraCaptionerProcessor, batch_size: int = 32,
                          dtype: str = "float16"):
    """Map the model's frozen vision part (`encoder.encode_vision`: CLIP tower, final LayerNorm, CLIP projection) over
    every row once and keep its output as a `vision_features` column (written, memory-mapped, to the datasets cache
    and reused by later runs on the same rows, weights and dtype); the `image` column is dropped. The collator hands
    these to the model as `image_features`, which the model casts to its own dtype, so training on them runs only
    the bridge and the decoder.

    Stored as `dtype`: float16 by default, which halves the disk of float32 (rows x tokens x width x 2 bytes, e.g.
    300K CC3M rows x 196 x 512 = 60 GB against 120 GB). Against float32 features it moved the per-step training loss
    by at most 5e-4 at full size and 2e-4 at the tests' tiny size, where bfloat16 moved it by 2.7e-3 and 1.5e-3
    (`bench/epoch_cache.py --rounding_drift [--tiny]`, 6 steps, random weights, losses ~100 at full size).
    float32 gives the losses of training on pixels exactly. A tower whose features overflow float16 is refused with a
    pointer to float32."""
    if dtype not in VISION_FEATURES_DTYPES:
        raise ValueError(f"vision features dtype {dtype!r} is not one of {list(VISION_FEATURES_DTYPES)}")
    if not isinstance(dataset, datasets.Dataset):
        raise ValueError("cached vision features need a map-style dataset: they cannot be used with --streaming")
    if len(dataset) == 0:
        raise ValueError("no training rows to cache vision features for")
    if not model.config.freeze_vision:
        raise ValueError("--cache_vision_features needs a frozen vision tower (--freeze_vision true): this model's "
                         "config has freeze_vision=False, so the tower trains and its output changes every step")
    encoder = model.get_encoder()
    device = next(encoder.parameters()).device
    stored_dtype = getattr(torch, dtype)

    @torch.inference_mode()
    def encode(batch):
        images = [load_image(cell, f"row {i}") for i, cell in enumerate(batch["image"])]
        pixel_values = processor(images=images)["pixel_values"].to(device)
        features = encoder.encode_vision(pixel_values).last_hidden_state
        stored = features.to(stored_dtype)
        if not torch.isfinite(stored).all():
            raise ValueError(f"vision features do not fit in {dtype} (largest magnitude "
                             f"{features.abs().max().item():.3g}): cache them as float32 "
                             "(--vision_features_dtype float32)")
        return {VISION_FEATURES_COLUMN: stored.cpu().numpy()}

    tokens, width = encode(dataset[:1])[VISION_FEATURES_COLUMN].shape[1:]  # one row's shape, for the column type
    features = dataset.map(
        encode, batched=True, batch_size=batch_size, remove_columns=dataset.column_names,
        features=datasets.Features({VISION_FEATURES_COLUMN: datasets.Array2D((tokens, width), dtype)}),
        new_fingerprint=vision_features_fingerprint(dataset, model, processor, dtype), desc="caching vision features",
    )
    cached = datasets.concatenate_datasets([dataset.remove_columns("image"), features], axis=1)
    # Read back in the dtype stored (datasets' numpy format would otherwise give float32).
    return cached.with_format("numpy", columns=[VISION_FEATURES_COLUMN], output_all_columns=True, dtype=dtype)
