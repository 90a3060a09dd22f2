#!/usr/bin/env python
"""Fine-tune LoraCaptioner (frozen CLIP tower, trainable bridge, LoRA on the T5 decoder) with the HF Trainer + peft.

    python train_hf.py --train_dir data/train --validation_dir data/val --output_dir out   # imagefolder
    python train_hf.py --train_file 'cc3m/{00000..00099}.tar' ...                           # webdataset shards
    python train_hf.py configs/cc3m_seed.yaml                                               # all arguments from a file
    torchrun --nproc_per_node 8 train_hf.py configs/cc3m_seed.yaml                          # DDP; FSDP/DeepSpeed flags pass through
"""

from __future__ import annotations

import json
import logging
import math
import os
import sys
import time
from dataclasses import dataclass, field

import evaluate
import torch
import transformers
from peft import PeftModel, get_peft_model
from transformers import HfArgumentParser, Seq2SeqTrainer, Seq2SeqTrainingArguments, set_seed
from transformers.trainer_utils import get_last_checkpoint

from loracaptioner import LoraCaptionerForConditionalGeneration, LoraCaptionerProcessor
from loracaptioner.data import (
    CAPTION_COLUMNS,
    IMAGE_COLUMNS,
    CaptionCollator,
    SkipCounter,
    detect_column,
    load_caption_dataset,
    prepare_split,
)
from loracaptioner.training import CAPTION_METRICS_PATH, ORIGINAL_LORA_TARGETS, decoder_lora_config, exact_match

logger = logging.getLogger(__name__)


@dataclass
class ModelArguments:
    vision_model_name_or_path: str = field(
        default="openai/clip-vit-base-patch16", metadata={"help": "CLIP checkpoint (Hub id or folder) for the vision tower."}
    )
    text_model_name_or_path: str = field(
        default="google/flan-t5-base", metadata={"help": "T5 checkpoint (Hub id or folder) whose decoder writes captions."}
    )
    model_name_or_path: str | None = field(
        default=None, metadata={"help": "Start from an existing LoraCaptioner folder/Hub id instead of two backbones."}
    )
    use_clip_projection: bool = field(
        default=True, metadata={"help": "Bridge CLIP's projected 512-d patch tokens (True) or the raw 768-d ones."}
    )
    freeze_vision: bool = field(default=True, metadata={"help": "Keep the CLIP vision tower frozen."})
    cache_dir: str | None = field(default=None, metadata={"help": "Where to cache downloaded models and datasets."})


@dataclass
class DataArguments:
    dataset_name: str | None = field(default=None, metadata={"help": "Dataset on the Hub or a local dataset script."})
    dataset_config_name: str | None = field(default=None, metadata={"help": "Its configuration name."})
    train_split: str = field(default="train", metadata={"help": "Split of --dataset_name to train on."})
    validation_split: str = field(default="validation", metadata={"help": "Split of --dataset_name to evaluate on."})
    streaming: bool = field(default=False, metadata={"help": "Stream the data instead of downloading it first."})
    train_dir: str | None = field(default=None, metadata={"help": "imagefolder with metadata.jsonl/metadata.csv."})
    validation_dir: str | None = field(default=None, metadata={"help": "imagefolder for evaluation."})
    train_file: list[str] | None = field(
        default=None, metadata={"help": "webdataset .tar shards (jpg/png + txt), globs allowed, e.g. pixparse/cc3m-wds."}
    )
    validation_file: list[str] | None = field(default=None, metadata={"help": "webdataset .tar shards for evaluation."})
    image_column: str | None = field(default=None, metadata={"help": f"Image column (default: first of {IMAGE_COLUMNS})."})
    caption_column: str | None = field(
        default=None, metadata={"help": f"Caption column, a string or a list of strings (default: first of {CAPTION_COLUMNS})."}
    )
    max_train_samples: int | None = field(default=None, metadata={"help": "Use only the first N training rows."})
    max_eval_samples: int | None = field(default=None, metadata={"help": "Use only the first N evaluation rows."})
    max_target_length: int = field(default=32, metadata={"help": "Captions are truncated to this many tokens."})
    preprocessing_num_workers: int | None = field(default=None, metadata={"help": "Processes checking the data."})


@dataclass
class LoraArguments:
    lora_r: int = field(default=8, metadata={"help": "LoRA rank; 0 = no LoRA, fine-tune the decoder fully."})
    lora_alpha: int = field(default=16, metadata={"help": "LoRA scaling numerator (alpha / r)."})
    lora_dropout: float = field(default=0.1, metadata={"help": "Dropout on the LoRA path."})
    lora_target_modules: list[str] = field(
        default_factory=lambda: list(ORIGINAL_LORA_TARGETS),
        metadata={"help": "T5 decoder modules that get adapters (the original's seven by default)."},
    )
    merge_lora: bool = field(
        default=True, metadata={"help": "Write a merged, Hub-ready LoraCaptioner to output_dir (adapter kept in output_dir/adapter)."}
    )


def main():
    # 1. Arguments (command line, or one .json/.yaml file), logging, seed.
    parser = HfArgumentParser((ModelArguments, DataArguments, LoraArguments, Seq2SeqTrainingArguments))
    if len(sys.argv) == 2 and sys.argv[1].endswith((".json", ".yaml", ".yml")):
        loader = parser.parse_json_file if sys.argv[1].endswith(".json") else parser.parse_yaml_file
        model_args, data_args, lora_args, training_args = loader(os.path.abspath(sys.argv[1]))
    else:
        model_args, data_args, lora_args, training_args = parser.parse_args_into_dataclasses()
    training_args.remove_unused_columns = False  # the collator reads the raw `image` / `caption` columns
    training_args.predict_with_generate = training_args.predict_with_generate or training_args.do_eval

    logging.basicConfig(format="%(asctime)s - %(levelname)s - %(name)s - %(message)s", datefmt="%H:%M:%S",
                        handlers=[logging.StreamHandler(sys.stdout)])
    log_level = training_args.get_process_log_level()
    logger.setLevel(log_level)
    transformers.utils.logging.set_verbosity(log_level)
    logger.info(f"Training/evaluation parameters {training_args}")
    set_seed(training_args.seed)

    last_checkpoint = None
    if os.path.isdir(training_args.output_dir) and training_args.do_train:
        last_checkpoint = get_last_checkpoint(training_args.output_dir)
        if last_checkpoint is not None and training_args.resume_from_checkpoint is None:
            logger.info(f"Checkpoint found at {last_checkpoint}: resuming. Use another --output_dir to start afresh.")

    # 2. Data: one split each for training and evaluation, bad rows dropped and counted.
    skipped = SkipCounter()

    def load_split(split, data_dir, data_files, max_samples, for_training):
        raw = load_caption_dataset(data_args.dataset_name, data_args.dataset_config_name, split, data_dir, data_files,
                                   data_args.streaming, model_args.cache_dir)
        columns = list(raw.column_names or next(iter(raw.take(1))).keys())
        image_column = detect_column(columns, data_args.image_column, IMAGE_COLUMNS, "image")
        caption_column = detect_column(columns, data_args.caption_column, CAPTION_COLUMNS, "caption")
        return prepare_split(raw, image_column, caption_column, skipped, one_row_per_caption=for_training,
                             max_samples=max_samples, num_proc=data_args.preprocessing_num_workers)

    train_dataset = eval_dataset = None
    if training_args.do_train:
        train_dataset = load_split(data_args.train_split, data_args.train_dir, data_args.train_file,
                                   data_args.max_train_samples, for_training=True)
    if training_args.do_eval:
        eval_dataset = load_split(data_args.validation_split, data_args.validation_dir, data_args.validation_file,
                                  data_args.max_eval_samples, for_training=False)

    # 3. Model and processor: two backbones (new bridge) or an existing LoraCaptioner; then LoRA on the decoder.
    if model_args.model_name_or_path:
        model = LoraCaptionerForConditionalGeneration.from_pretrained(model_args.model_name_or_path,
                                                                      cache_dir=model_args.cache_dir)
        processor = LoraCaptionerProcessor.from_pretrained(model_args.model_name_or_path, cache_dir=model_args.cache_dir)
    else:
        model = LoraCaptionerForConditionalGeneration.from_backbones(
            model_args.vision_model_name_or_path, model_args.text_model_name_or_path,
            use_clip_projection=model_args.use_clip_projection,
        )
        processor = LoraCaptionerProcessor.from_backbones(model_args.vision_model_name_or_path,
                                                          model_args.text_model_name_or_path)
    processor.max_target_length = data_args.max_target_length
    model.config.freeze_vision = model_args.freeze_vision
    model.requires_grad_(True)
    if model_args.freeze_vision:
        model.freeze_vision()
    if lora_args.lora_r > 0:
        model = get_peft_model(model, decoder_lora_config(model, lora_args.lora_r, lora_args.lora_alpha,
                                                          lora_args.lora_dropout, lora_args.lora_target_modules))
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    logger.info(f"trainable parameters: {trainable:,} of {total:,} ({100 * trainable / total:.2f}%)")

    # 4. Metrics: CIDEr-D, BLEU-1..4, ROUGE-L (local evaluate module) and exact match, against every reference.
    caption_metrics = evaluate.load(str(CAPTION_METRICS_PATH))
    references = None if eval_dataset is None or data_args.streaming else eval_dataset["references"]

    def compute_metrics(eval_prediction):
        predicted_ids = eval_prediction.predictions
        predicted_ids = torch.as_tensor(predicted_ids).clamp(min=0)  # -100 pads the gathered predictions
        predictions = [text.strip() for text in processor.batch_decode(predicted_ids, skip_special_tokens=True)]
        refs = references[: len(predictions)]
        scores = caption_metrics.compute(predictions=predictions, references=refs)
        scores["exact_match"] = exact_match(predictions, refs)
        return {name: round(float(value), 6) for name, value in scores.items()}

    # 5. Trainer: the collator decodes images lazily and builds labels with -100 padding.
    trainer = Seq2SeqTrainer(
        model=model,
        args=training_args,
        train_dataset=train_dataset,
        eval_dataset=eval_dataset,
        data_collator=CaptionCollator(processor, data_args.max_target_length),
        processing_class=processor,
        compute_metrics=compute_metrics if references is not None else None,
    )

    # 6. Train, evaluate.
    summary = {}
    if training_args.do_train:
        started = time.perf_counter()
        result = trainer.train(resume_from_checkpoint=training_args.resume_from_checkpoint or last_checkpoint)
        trainer.save_state()
        metrics = result.metrics
        metrics["train_samples_per_second_measured"] = round(
            trainer.state.global_step * training_args.train_batch_size * training_args.gradient_accumulation_steps
            * training_args.world_size / (time.perf_counter() - started), 3)
        trainer.log_metrics("train", metrics)
        trainer.save_metrics("train", metrics)
        summary["train_samples_per_second"] = metrics.get("train_samples_per_second")
    if training_args.do_eval:
        metrics = trainer.evaluate(metric_key_prefix="eval")
        trainer.log_metrics("eval", metrics)
        trainer.save_metrics("eval", metrics)
        summary["eval"] = {k: v for k, v in metrics.items() if not k.endswith(("runtime", "per_second"))}

    # 7. Save: adapter (LoRA + bridge) and, merged, a full Hub-ready LoraCaptioner with code, processor and card.
    final_model = trainer.model
    if trainer.is_world_process_zero():
        if isinstance(final_model, PeftModel):
            final_model.save_pretrained(os.path.join(training_args.output_dir, "adapter"))
            if lora_args.merge_lora:
                final_model = final_model.merge_and_unload()
        if not isinstance(final_model, PeftModel):
            final_model.save_pretrained(training_args.output_dir)
            processor.save_pretrained(training_args.output_dir)
        from loracaptioner.model_card import write_model_card

        write_model_card(training_args.output_dir, model_args=model_args, data_args=data_args, lora_args=lora_args,
                         training_args=training_args, state=trainer.state, eval_metrics=summary.get("eval"),
                         skipped=skipped)
        if training_args.push_to_hub:
            from huggingface_hub import HfApi

            repo_id = training_args.hub_model_id or os.path.basename(os.path.abspath(training_args.output_dir))
            api = HfApi(token=training_args.hub_token)
            api.create_repo(repo_id, private=training_args.hub_private_repo, exist_ok=True)
            api.upload_folder(repo_id=repo_id, folder_path=training_args.output_dir, commit_message="train_hf.py",
                              ignore_patterns=["checkpoint-*", "runs/*", "*.pt"])

    # 8. Summary: speed, what was skipped and why, the best checkpoint, where the model is.
    summary.update(
        skipped_rows=skipped.total, skipped=dict(skipped.reasons), best_metric=trainer.state.best_metric,
        best_checkpoint=trainer.state.best_model_checkpoint, output_dir=os.path.abspath(training_args.output_dir),
    )
    if trainer.is_world_process_zero():
        with open(os.path.join(training_args.output_dir, "run_summary.json"), "w") as handle:
            json.dump(summary, handle, indent=2, default=str)
        logger.warning(
            "\n***** LoraCaptioner run summary *****\n"
            f"  samples/s        : {summary.get('train_samples_per_second')}\n"
            f"  skipped rows     : {skipped.total} ({skipped.summary()})\n"
            f"  best metric      : {trainer.state.best_metric} ({trainer.state.best_model_checkpoint})\n"
            f"  eval             : {summary.get('eval')}\n"
            f"  model            : {summary['output_dir']}"
        )
    return summary


if __name__ == "__main__":
    main()
