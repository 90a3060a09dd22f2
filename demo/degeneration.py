#!/usr/bin/env python
"""Degeneration on the demo's data: does the training recipe make captions repeat, and what do decoding settings do?

Run after `make demo` (it reuses the data, the base and the LoRA row's model, outputs/demo/model):

    python demo/degeneration.py

1. The original's recipe, reproduced on the demo's data from the demo's base (SEED.md): labels padded with the pad
   token instead of -100 (so padding is in the loss), Adam at a constant 1e-4 with no warm-up and no gradient
   clipping, 8 epochs, batch 256, LoRA r=8 / alpha=16 / dropout 0.1 on the seven decoder modules + the bridge, the
   best checkpoint by validation loss. Then the same with only the labels changed (-100), and the demo's own recipe
   with only the labels changed (padding), so each difference has one cause. train_hf.py does not offer padded
   labels (that is the bug it fixes), so this script builds the same Trainer from the package's own parts.
2. For every model: the share of held-out captions that repeat a token 3-gram or run to the length limit without
   </s>, under plain greedy decoding with the original's limit (T5's max_length=20: 19 new tokens).
3. Decoding settings against plain greedy on the demo's LoRA model, on its bridge-only model (a frozen decoder fed
   by a retrained bridge, which repeats) and on the original-recipe model: no_repeat_ngram_size=3,
   repetition_penalty=1.2 and beam search (4 beams): metrics, share of captions that differ from plain greedy,
   share degenerate. Validation first (where a default would be chosen), then test.

Everything is written to outputs/demo/degeneration.md.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(HERE))

import evaluation  # noqa: E402

ORIGINAL_RECIPE = {"learning_rate": 1e-4, "lr_scheduler_type": "constant", "warmup_steps": 0, "num_train_epochs": 8,
                   "per_device_train_batch_size": 256, "optim": "adamw_torch", "weight_decay": 0.0,
                   "max_grad_norm": 0.0}  # AdamW without weight decay is Adam; max_grad_norm 0: no clipping
DEMO_RECIPE = {"learning_rate": 3e-3, "lr_scheduler_type": "cosine", "warmup_steps": 20, "num_train_epochs": 5,
               "per_device_train_batch_size": 32}  # configs/demo.yaml
RUNS = {  # name: (recipe, labels padded with the pad token?)
    "original recipe (padding in the loss)": (ORIGINAL_RECIPE, True),
    "original recipe, labels -100": (ORIGINAL_RECIPE, False),
    "demo recipe, padding in the loss": (DEMO_RECIPE, True),
}
ORIGINAL_LIMIT = {**evaluation.GREEDY, "max_new_tokens": None, "max_length": 20}  # T5's default: 19 new tokens
DECODINGS = {
    "plain greedy": evaluation.GREEDY,
    "no_repeat_ngram_size=3": {**evaluation.GREEDY, "no_repeat_ngram_size": 3},
    "repetition_penalty=1.2": {**evaluation.GREEDY, "repetition_penalty": 1.2},
    "beam search, 4 beams": {**evaluation.GREEDY, "num_beams": 4},
}


def train(base: Path, data_dir: Path, output_dir: Path, recipe: dict, pad_labels: bool) -> None:
    """LoRA (the original's configuration) + bridge on the French captions, as train_hf.py would, except for the
    labels when `pad_labels`; the best epoch by validation loss is merged and saved to `output_dir`."""
    import torch
    from peft import get_peft_model
    from transformers import Seq2SeqTrainingArguments, set_seed

    from loracaptioner import LoraCaptionerForConditionalGeneration, LoraCaptionerProcessor
    from loracaptioner.data import CaptionCollator, SkipCounter, load_caption_dataset, prepare_split
    from loracaptioner.lora import decoder_lora_config
    from loracaptioner.trainer import CaptionTrainer

    torch.set_num_threads(1)  # see THREADS in run_demo.py
    set_seed(0)
    skipped = SkipCounter()
    splits = {name: prepare_split(load_caption_dataset(data_dir=str(data_dir / name)), "image", "caption_fr", skipped,
                                  one_row_per_caption=name == "train") for name in ("train", "validation")}
    model = LoraCaptionerForConditionalGeneration.from_pretrained(base)
    processor = LoraCaptionerProcessor.from_pretrained(base)
    model.freeze_vision()
    model = get_peft_model(model, decoder_lora_config(model, r=8, alpha=16, dropout=0.1))
    collator = CaptionCollator(processor, model=model)

    def collate(rows):
        batch = collator(rows)
        if pad_labels:  # as the original: padding positions are labelled <pad> and count in the loss
            batch["labels"] = batch["labels"].masked_fill(batch["labels"] == -100, processor.tokenizer.pad_token_id)
        return batch

    arguments = Seq2SeqTrainingArguments(
        output_dir=str(output_dir / "checkpoints"), eval_strategy="epoch", save_strategy="epoch",
        load_best_model_at_end=True, metric_for_best_model="loss", greater_is_better=False, save_total_limit=1,
        remove_unused_columns=False, report_to="none", use_cpu=True, seed=0, dataloader_num_workers=0,
        disable_tqdm=True, logging_steps=5, per_device_eval_batch_size=100, **recipe)
    trainer = CaptionTrainer(model=model, args=arguments, train_dataset=splits["train"],
                             eval_dataset=splits["validation"], data_collator=collate)
    trainer.train()
    merged = trainer.model.merge_and_unload()
    merged.save_pretrained(output_dir)
    processor.save_pretrained(output_dir)
    shutil.rmtree(output_dir / "checkpoints")


def decoding_table(model_dir: Path, split_dir: Path, references: list[str]) -> list[str]:
    lines = ["| decoding | exact match | CIDEr-D | BLEU-4 | ROUGE-L | differ from plain greedy | repeats or no </s> |",
             "|---|---:|---:|---:|---:|---:|---:|"]
    plain = None
    for name, decoding in DECODINGS.items():
        captions, degenerate = evaluation.caption_split(model_dir, split_dir, decoding)
        plain = plain or captions
        scores = evaluation.caption_metrics(captions, references)
        differ = sum(a != b for a, b in zip(captions, plain)) / len(captions)
        lines.append(f"| {name} | {scores['exact_match']:.3f} | {scores['cider']:.2f} | {scores['bleu_4']:.3f} | "
                     f"{scores['rouge_l']:.3f} | {differ:.1%} | {sum(degenerate) / len(degenerate):.1%} |")
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output_dir", type=Path, default=REPO / "outputs" / "demo")
    args = parser.parse_args()
    out = args.output_dir.resolve()
    started = time.perf_counter()
    data_dir = out / "data"
    for needed in (out / "base", out / "model", data_dir / "test"):
        if not needed.is_dir():
            sys.exit(f"{needed} is missing: run `make demo` first")
    references = {split: [row["caption_fr"] for row in evaluation.read_split(data_dir / split)]
                  for split in ("validation", "test")}

    demo_lora, bridge_only = "demo's LoRA stage (configs/demo.yaml)", "demo's bridge-only row (decoder frozen)"
    models = {demo_lora: (out / "model", False), bridge_only: (out / "bridge", False)}
    for index, (name, (recipe, pad_labels)) in enumerate(RUNS.items()):
        folder = out / "degeneration" / str(index)
        print(f"training: {name}", flush=True)
        run_started = time.perf_counter()
        train(out / "base", data_dir, folder, recipe, pad_labels)
        print(f"    {time.perf_counter() - run_started:.0f} s", flush=True)
        models[name] = (folder, pad_labels)

    lines = ["# Degeneration on the demo's data", "",
             "Plain greedy decoding with the original's length limit (19 new tokens); \"repeats or no </s>\": captions "
             "that write a token 3-gram twice or run to the limit without </s>.", "",
             "| model | padding labelled | validation: repeats or no </s> | test: repeats or no </s> | "
             "test exact match | test CIDEr-D |", "|---|---|---:|---:|---:|---:|"]
    for name, (folder, pad_labels) in models.items():
        _, val_degenerate = evaluation.caption_split(folder, data_dir / "validation", ORIGINAL_LIMIT)
        test_captions, test_degenerate = evaluation.caption_split(folder, data_dir / "test", ORIGINAL_LIMIT)
        scores = evaluation.caption_metrics(test_captions, references["test"])
        labels = "<pad>" if pad_labels else "-100"
        lines.append(f"| {name} | {labels} | {sum(val_degenerate) / len(val_degenerate):.1%} | "
                     f"{sum(test_degenerate) / len(test_degenerate):.1%} | {scores['exact_match']:.3f} | "
                     f"{scores['cider']:.2f} |")
        print(lines[-1], flush=True)
    for name in (demo_lora, bridge_only, "original recipe (padding in the loss)"):
        for split in ("validation", "test"):
            lines += ["", f"Decoding settings on the {split} split, {name}:", "",
                      *decoding_table(models[name][0], data_dir / split, references[split])]
            print("\n".join(lines[-len(DECODINGS) - 2:]), flush=True)
    lines += ["", f"{os.cpu_count()} CPU cores; {time.perf_counter() - started:.0f} s; load average at the end "
              f"{os.getloadavg()[0]:.1f}."]
    (out / "degeneration.md").write_text("\n".join(lines) + "\n", encoding="utf-8")
    print(f"written: {out / 'degeneration.md'}")


if __name__ == "__main__":
    main()
