"""Epoch time with and without --cache_vision_features, the loss of training on cached features per storage dtype,
and the disk the cache takes. Full size: a ViT-B/16-shaped CLIP tower and a Flan-T5-base-shaped decoder (random
weights, built from `LoraCaptionerConfig()`'s defaults: nothing is downloaded), LoRA r=8 on the decoder as in
configs/cc3m_seed.yaml, generated 224x224 images with 10-word captions.

    OMP_NUM_THREADS=2 .venv/bin/python bench/epoch_cache.py --images 64 --epochs 3 --batch_size 8
    OMP_NUM_THREADS=2 .venv/bin/python bench/epoch_cache.py --rounding_drift    # float16 vs bfloat16, 6 steps

Uncached, every epoch runs the frozen tower; cached, a first pass runs it once over all images (counted in the first
epoch) and every epoch after runs only bridge + decoder. The same `CaptionTrainer`, `CaptionCollator` and
`cache_vision_features` as train_hf.py, on rows saved to disk as train_hf.py's are, so the cache is the arrow file
train_hf.py would write and its size is read from that file.
"""

from __future__ import annotations

import argparse
import io
import statistics
import sys
import tempfile
import time
from pathlib import Path

import datasets
import numpy as np
import torch
from peft import get_peft_model
from PIL import Image
from transformers import (
    CLIPImageProcessorPil,
    CLIPVisionConfig,
    PrinterCallback,
    Seq2SeqTrainingArguments,
    T5Config,
    T5Tokenizer,
    TrainerCallback,
)

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from loracaptioner import LoraCaptionerConfig, LoraCaptionerForConditionalGeneration, LoraCaptionerProcessor  # noqa: E402
from loracaptioner.data import CaptionCollator, SkipCounter, cache_vision_features, prepare_split  # noqa: E402
from loracaptioner.images import load_image  # noqa: E402
from loracaptioner.lora import decoder_lora_config, quiet_peft  # noqa: E402
from loracaptioner.trainer import CaptionTrainer  # noqa: E402

WORDS = "a the photo of dog cat man woman car tree beach city street red blue green small large on in with".split()
ROWS_PROJECTED = 300_000  # CC3M-seed scale: the disk figure is given per this many rows
TINY_IMAGE_SIZE = 32


class EpochTimer(TrainerCallback):
    def __init__(self):
        self.seconds: list[float] = []

    def on_epoch_begin(self, args, state, control, **kwargs):
        self.started = time.perf_counter()

    def on_epoch_end(self, args, state, control, **kwargs):
        self.seconds.append(time.perf_counter() - self.started)


def generated_rows(count: int, seed: int = 0, image_size: int = 256) -> datasets.Dataset:
    rng = np.random.default_rng(seed)
    images, captions = [], []
    for _ in range(count):
        buffer = io.BytesIO()
        Image.fromarray(rng.integers(0, 255, (image_size, image_size, 3), dtype=np.uint8)).save(buffer, format="JPEG")
        images.append(buffer.getvalue())
        captions.append(" ".join(rng.choice(WORDS, size=10)))
    return prepare_split(datasets.Dataset.from_dict({"image": images, "caption": captions}), "image", "caption",
                         SkipCounter(), one_row_per_caption=True)


def processor(tiny: bool = False) -> LoraCaptionerProcessor:
    vocab = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("▁", -3.0)] + [("▁" + w, -1.0) for w in WORDS]
    tokenizer = T5Tokenizer(vocab=vocab + [(c, -5.0) for c in "abcdefghijklmnopqrstuvwxyz"], extra_ids=0)
    size = {"size": {"shortest_edge": TINY_IMAGE_SIZE},
            "crop_size": {"height": TINY_IMAGE_SIZE, "width": TINY_IMAGE_SIZE}} if tiny else {}
    return LoraCaptionerProcessor(image_processor=CLIPImageProcessorPil(**size), tokenizer=tokenizer)


def config(tiny: bool = False) -> LoraCaptionerConfig:
    """ViT-B/16 + Flan-T5-base shapes, or tiny ones (as the tests' backbones) for a run of a few seconds."""
    if not tiny:
        return LoraCaptionerConfig()
    vision = CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                              image_size=TINY_IMAGE_SIZE, patch_size=8, projection_dim=24)
    text = T5Config(vocab_size=64, d_model=32, d_ff=64, d_kv=8, num_heads=4, num_decoder_layers=2,
                    feed_forward_proj="gated-gelu", tie_word_embeddings=False, decoder_start_token_id=0)
    return LoraCaptionerConfig(vision_config=vision, text_config=text)


def new_model(tiny: bool) -> LoraCaptionerForConditionalGeneration:
    torch.manual_seed(0)  # the same random weights in every run
    return LoraCaptionerForConditionalGeneration(config(tiny))


def with_lora(model):
    with quiet_peft():
        return get_peft_model(model, decoder_lora_config(model, r=8, alpha=16, dropout=0.1))


def cache_bytes(cached: datasets.Dataset, rows: datasets.Dataset) -> int:
    """Bytes of the arrow files the cache added to the rows' own (the `vision_features` column, as written)."""
    added = {f["filename"] for f in cached.cache_files} - {f["filename"] for f in rows.cache_files}
    if not added:
        raise ValueError("the cached features were not written to a file: the rows must be loaded from disk")
    return sum(Path(name).stat().st_size for name in added)


def run(rows, processor, epochs: int, batch_size: int, tiny: bool = False, dtype: str | None = None) -> dict:
    """One training run, on pixels (`dtype=None`) or on features cached as `dtype`: {caching_seconds,
    epoch_seconds, losses (one per step), cache_bytes}."""
    model = new_model(tiny)
    caching_seconds, stored_bytes = 0.0, 0
    if dtype is not None:
        started = time.perf_counter()
        cached = cache_vision_features(rows, model, processor, batch_size=batch_size, dtype=dtype)
        caching_seconds = time.perf_counter() - started
        stored_bytes = cache_bytes(cached, rows)
        rows = cached
    model = with_lora(model)
    timer = EpochTimer()
    with tempfile.TemporaryDirectory() as output_dir:
        args = Seq2SeqTrainingArguments(
            output_dir, num_train_epochs=epochs, per_device_train_batch_size=batch_size, learning_rate=1e-4,
            save_strategy="no", logging_strategy="steps", logging_steps=1, report_to=[], use_cpu=True,
            remove_unused_columns=False, disable_tqdm=True, dataloader_num_workers=0, seed=0,
        )
        trainer = CaptionTrainer(model=model, args=args, train_dataset=rows, callbacks=[timer],
                                 data_collator=CaptionCollator(processor, model=model))
        trainer.remove_callback(PrinterCallback)  # the losses are kept in its state, not printed
        trainer.train()
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    return {"caching_seconds": caching_seconds, "epoch_seconds": timer.seconds, "losses": losses,
            "cache_bytes": stored_bytes}


def measure(images: int = 64, epochs: int = 3, batch_size: int = 8, tiny: bool = False,
            feature_dtypes: tuple[str, ...] = ("float32", "float16")) -> dict:
    """Train the same model from the same weights on pixels, then on features cached in each of `feature_dtypes`
    (float32 first when given: the others' losses are compared with it). Returns:

    - `isa`, `threads`, `images`, `epochs`, `batch_size`, `shapes` ("full": ViT-B/16 + Flan-T5-base; "tiny"),
      `feature_shape` ([tokens, width] of one row's features)
    - `uncached`: {`epoch_seconds`: [s per epoch], `median_seconds`, `losses`: [per step]}
    - `cached`: {dtype: {
        `caching_seconds` (the one pass of the tower), `epoch_seconds` (training only),
        `first_epoch_seconds` (caching pass + first epoch), `later_epoch_seconds` (median of epochs 2..n),
        `later_over_first` (target E: <= 1/3), `later_over_uncached` (vs the uncached median),
        `losses` (per step), `max_loss_difference_vs_float32` (over all steps; None without a float32 run),
        `max_loss_difference_vs_pixels`, `cache_bytes` (the arrow file(s) written), `bytes_per_row`,
        `gb_per_300k_rows` (bytes_per_row x 300,000 / 1e9)}}
    """
    if epochs < 2:
        raise ValueError("later epochs need epochs >= 2")
    feature_dtypes = sorted(feature_dtypes, key=lambda dtype: dtype != "float32")
    caption_processor = processor(tiny)
    with tempfile.TemporaryDirectory() as folder:
        # On disk, as train_hf.py's rows are, so that the cache is an arrow file next to them.
        generated_rows(images, image_size=TINY_IMAGE_SIZE if tiny else 256).save_to_disk(f"{folder}/rows")
        rows = datasets.load_from_disk(f"{folder}/rows")
        row_count = len(rows)
        with torch.inference_mode():
            one_image = caption_processor(images=[load_image(rows[0]["image"])])["pixel_values"]
            feature_shape = list(new_model(tiny).get_encoder().encode_vision(one_image).last_hidden_state.shape[1:])
        pixels = run(rows, caption_processor, epochs, batch_size, tiny)
        cached = {dtype: run(rows, caption_processor, epochs, batch_size, tiny, dtype) for dtype in feature_dtypes}

    uncached_median = statistics.median(pixels["epoch_seconds"])

    def max_difference(losses, reference):
        return max(abs(a - b) for a, b in zip(losses, reference, strict=True))

    for result in cached.values():
        first = result["caching_seconds"] + result["epoch_seconds"][0]
        later = statistics.median(result["epoch_seconds"][1:])
        result.update(
            first_epoch_seconds=first, later_epoch_seconds=later, later_over_first=later / first,
            later_over_uncached=later / uncached_median,
            max_loss_difference_vs_float32=(max_difference(result["losses"], cached["float32"]["losses"])
                                            if "float32" in cached else None),
            max_loss_difference_vs_pixels=max_difference(result["losses"], pixels["losses"]),
            bytes_per_row=result["cache_bytes"] / row_count,
            gb_per_300k_rows=result["cache_bytes"] / row_count * ROWS_PROJECTED / 1e9,
        )
    return {
        "isa": torch.backends.cpu.get_cpu_capability(), "threads": torch.get_num_threads(), "images": images,
        "epochs": epochs, "batch_size": batch_size, "shapes": "tiny" if tiny else "full",
        "feature_shape": feature_shape,
        "uncached": {"epoch_seconds": pixels["epoch_seconds"], "median_seconds": uncached_median,
                     "losses": pixels["losses"]},
        "cached": cached,
    }


def markdown(result: dict) -> str:
    """`measure`'s result as a markdown table, one row per run, with the run's settings above it."""
    shapes = "ViT-B/16 + Flan-T5-base, LoRA r=8" if result["shapes"] == "full" else "tiny test shapes, LoRA r=8"
    tokens, width = result["feature_shape"]
    lines = [
        f"E: {result['images']} images, batch {result['batch_size']}, {result['epochs']} epochs, {shapes} (random "
        f"weights), features {tokens} x {width} per row; ISA {result['isa']}, {result['threads']} threads.",
        "",
        "| run | epoch seconds | first epoch (incl. caching pass) | later epochs (median) | later / first "
        "| later / uncached | max loss diff vs fp32 cache | vs pixels | bytes per row | GB per 300K rows |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    uncached = result["uncached"]
    later = statistics.median(uncached["epoch_seconds"][1:])
    lines.append(f"| uncached | {' / '.join(f'{s:.1f}' for s in uncached['epoch_seconds'])} "
                 f"| {uncached['epoch_seconds'][0]:.1f} | {later:.1f} | {later / uncached['epoch_seconds'][0]:.2f} "
                 f"| {later / uncached['median_seconds']:.2f} | | | | |")
    for dtype, run_result in result["cached"].items():
        versus_fp32 = run_result["max_loss_difference_vs_float32"]
        lines.append(
            f"| cached {dtype} | {run_result['caching_seconds']:.1f} + "
            f"{' / '.join(f'{s:.1f}' for s in run_result['epoch_seconds'])} "
            f"| {run_result['first_epoch_seconds']:.1f} | {run_result['later_epoch_seconds']:.1f} "
            f"| {run_result['later_over_first']:.2f} | {run_result['later_over_uncached']:.2f} "
            f"| {'' if versus_fp32 is None else f'{versus_fp32:.1e}'} "
            f"| {run_result['max_loss_difference_vs_pixels']:.1e} | {run_result['bytes_per_row']:,.0f} "
            f"| {run_result['gb_per_300k_rows']:.1f} |"
        )
    losses = uncached["losses"]
    lines.append("")
    lines.append("Cached epoch seconds: the caching pass + each epoch's training; later / uncached: against the "
                 "median uncached epoch. Loss differences: the largest over all steps of |step loss - the same step's "
                 f"loss| (same weights, data order and dropout; step losses here {min(losses):.3g} to "
                 f"{max(losses):.3g}). Disk: the arrow file(s) the cache wrote, per row, x 300,000.")
    return "\n".join(lines)


def rounding_drift(dtypes: tuple[str, ...] = ("float16", "bfloat16"), steps: int = 6, batch_size: int = 8,
                   tiny: bool = False) -> dict:
    """How far the per-step training loss moves when the features are rounded to each of `dtypes` and upcast again
    (what a cache in that dtype gives), against float32 features: {dtype: [|loss - float32 loss| per step]}, same
    weights, batches, dropout and AdamW steps. How the cache's dtype was chosen; bfloat16 has no datasets/numpy
    dtype, so it is measured here rather than through `cache_vision_features`."""
    caption_processor = processor(tiny)
    rows = generated_rows(2 * batch_size, image_size=TINY_IMAGE_SIZE if tiny else 256)
    with torch.inference_mode():
        pixel_values = caption_processor(images=[load_image(row["image"]) for row in rows])["pixel_values"]
        features = new_model(tiny).get_encoder().encode_vision(pixel_values).last_hidden_state.float()

    def losses(dtype: torch.dtype) -> list[float]:
        model = with_lora(new_model(tiny)).train()
        torch.manual_seed(0)
        optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
        collator = CaptionCollator(caption_processor, model=model)
        step_losses = []
        for step in range(steps):
            batch = [(step * batch_size + i) % len(rows) for i in range(batch_size)]
            loss = model(**collator([{"caption": rows[i]["caption"], "vision_features": features[i].to(dtype)}
                                     for i in batch])).loss
            loss.backward()
            optimizer.step()
            optimizer.zero_grad()
            step_losses.append(loss.item())
        return step_losses

    reference = losses(torch.float32)
    return {dtype: [abs(a - b) for a, b in zip(losses(getattr(torch, dtype)), reference)] for dtype in dtypes}


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=64)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--batch_size", type=int, default=8)
    parser.add_argument("--feature_dtypes", nargs="+", default=["float32", "float16"])
    parser.add_argument("--tiny", action="store_true", help="tiny shapes: a few seconds, for checking the script")
    parser.add_argument("--rounding_drift", action="store_true",
                        help="instead: per-step loss change from features rounded to float16 / bfloat16")
    args = parser.parse_args()
    if args.rounding_drift:
        print(f"ISA {torch.backends.cpu.get_cpu_capability()}, {'tiny' if args.tiny else 'full'} shapes")
        for dtype, drift in rounding_drift(batch_size=args.batch_size, tiny=args.tiny).items():
            print(f"{dtype}: max |loss - float32 loss| {max(drift):.2e}; per step {[f'{d:.1e}' for d in drift]}")
        return
    print(markdown(measure(args.images, args.epochs, args.batch_size, args.tiny, tuple(args.feature_dtypes))))


if __name__ == "__main__":
    main()
