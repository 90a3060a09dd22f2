"""Epoch time with and without --cache_vision_features, at full size: a ViT-B/16-shaped CLIP tower and a
Flan-T5-base-shaped decoder (random weights, built from `LoraCaptionerConfig()`'s defaults: nothing is downloaded),
LoRA r=8 on the decoder as in configs/cc3m_seed.yaml, generated 224x224 images with 10-word captions.

    OMP_NUM_THREADS=2 .venv/bin/python bench/epoch_cache.py --images 64 --epochs 3 --batch_size 8

Uncached, every epoch runs the frozen tower; cached, a first pass runs it once over all images (counted in the first
epoch) and every epoch after runs only bridge + decoder. Prints each epoch's seconds and the medians. The same
`CaptionTrainer`, `CaptionCollator` and `cache_vision_features` as train_hf.py.
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
from transformers import CLIPImageProcessorPil, Seq2SeqTrainingArguments, T5Tokenizer, TrainerCallback

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from loracaptioner import LoraCaptionerConfig, LoraCaptionerForConditionalGeneration, LoraCaptionerProcessor  # noqa: E402
from loracaptioner.data import CaptionCollator, SkipCounter, cache_vision_features, prepare_split  # noqa: E402
from loracaptioner.lora import decoder_lora_config, quiet_peft  # noqa: E402
from loracaptioner.trainer import CaptionTrainer  # noqa: E402

WORDS = "a the photo of dog cat man woman car tree beach city street red blue green small large on in with".split()


class EpochTimer(TrainerCallback):
    def __init__(self):
        self.seconds: list[float] = []

    def on_epoch_begin(self, args, state, control, **kwargs):
        self.started = time.perf_counter()

    def on_epoch_end(self, args, state, control, **kwargs):
        self.seconds.append(time.perf_counter() - self.started)


def generated_rows(count: int, seed: int = 0) -> datasets.Dataset:
    rng = np.random.default_rng(seed)
    images, captions = [], []
    for _ in range(count):
        buffer = io.BytesIO()
        Image.fromarray(rng.integers(0, 255, (256, 256, 3), dtype=np.uint8)).save(buffer, format="JPEG")
        images.append(buffer.getvalue())
        captions.append(" ".join(rng.choice(WORDS, size=10)))
    return prepare_split(datasets.Dataset.from_dict({"image": images, "caption": captions}), "image", "caption",
                         SkipCounter(), one_row_per_caption=True)


def processor() -> LoraCaptionerProcessor:
    vocab = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("▁", -3.0)] + [("▁" + w, -1.0) for w in WORDS]
    tokenizer = T5Tokenizer(vocab=vocab + [(c, -5.0) for c in "abcdefghijklmnopqrstuvwxyz"], extra_ids=0)
    return LoraCaptionerProcessor(image_processor=CLIPImageProcessorPil(), tokenizer=tokenizer)


def run(rows, processor, epochs: int, batch_size: int, cache: bool) -> tuple[float, list[float]]:
    """(seconds of the caching pass, seconds of each epoch)."""
    torch.manual_seed(0)
    model = LoraCaptionerForConditionalGeneration(LoraCaptionerConfig())  # ViT-B/16 + Flan-T5-base shapes
    caching_seconds = 0.0
    if cache:
        started = time.perf_counter()
        rows = cache_vision_features(rows, model, processor, batch_size=batch_size)
        caching_seconds = time.perf_counter() - started
    with quiet_peft():
        model = get_peft_model(model, decoder_lora_config(model, r=8, alpha=16, dropout=0.1))
    timer = EpochTimer()
    with tempfile.TemporaryDirectory() as output_dir:
        args = Seq2SeqTrainingArguments(
            output_dir, num_train_epochs=epochs, per_device_train_batch_size=batch_size, learning_rate=1e-4,
            save_strategy="no", logging_strategy="no", report_to=[], use_cpu=True, remove_unused_columns=False,
            disable_tqdm=True, dataloader_num_workers=0, seed=0,
        )
        CaptionTrainer(model=model, args=args, train_dataset=rows, data_collator=CaptionCollator(processor, model=model),
                       callbacks=[timer]).train()
    return caching_seconds, timer.seconds


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=64)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--batch_size", type=int, default=8)
    args = parser.parse_args()
    rows, caption_processor = generated_rows(args.images), processor()
    print(f"{args.images} images, {args.epochs} epochs, batch {args.batch_size}, "
          f"torch threads {torch.get_num_threads()}")

    _, uncached = run(rows, caption_processor, args.epochs, args.batch_size, cache=False)
    caching, cached = run(rows, caption_processor, args.epochs, args.batch_size, cache=True)
    first_cached = caching + cached[0]
    print(f"uncached epochs (s): {[round(s, 1) for s in uncached]}  median {statistics.median(uncached):.1f}")
    print(f"cached: caching pass {caching:.1f} s, epochs (s): {[round(s, 1) for s in cached]}")
    print(f"cached first epoch incl. caching pass: {first_cached:.1f} s")
    later = statistics.median(cached[1:]) if len(cached) > 1 else float("nan")
    print(f"cached epochs after the first: median {later:.1f} s = {later / first_cached:.2f} of the first cached "
          f"epoch, {later / statistics.median(uncached):.2f} of the uncached median")


if __name__ == "__main__":
    main()
