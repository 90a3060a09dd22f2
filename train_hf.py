#!/usr/bin/env python
"""Fine-tune LoraCaptioner (frozen CLIP tower, trainable bridge, LoRA on the T5 decoder) with the HF Trainer + peft.

    python train_hf.py --train_dir data/train --validation_dir data/val --output_dir out --do_train --do_eval
    python train_hf.py --train_file 'cc3m/{00000..00099}.tar' ...                           # webdataset shards
    python train_hf.py configs/cc3m_seed.yaml                                               # all arguments from a file
    torchrun --nproc_per_node 8 train_hf.py configs/cc3m_seed.yaml                          # DDP; FSDP/DeepSpeed flags pass through
    python train_hf.py --model_name_or_path out --test_dir data/test --output_dir scores --do_predict

A run without --do_train writes no model: only its results (eval_results.json, predict_results.json) and predictions
(generated_predictions.jsonl).

Rerun the same command after an interruption: it resumes from the last *complete* checkpoint in --output_dir
(model, optimizer, scheduler, RNG and data position), skipping and setting aside one that was cut off mid-write.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import sys
import time
from dataclasses import dataclass, field

import datasets
import torch
import transformers
from peft import PeftModel, get_peft_model
from transformers import HfArgumentParser, Seq2SeqTrainingArguments, set_seed

from loracaptioner import LoraCaptionerForConditionalGeneration, LoraCaptionerProcessor
from loracaptioner.caption_metrics import exact_match, load_caption_metrics
from loracaptioner.checkpoints import checkpoint_problem, last_complete_checkpoint
from loracaptioner.remote_code.configuration_loracaptioner import DEFAULT_TEXT_MODEL, DEFAULT_VISION_MODEL
from loracaptioner.data import (
    CAPTION_COLUMNS,
    IMAGE_COLUMNS,
    VISION_FEATURES_DTYPES,
    CaptionCollator,
    SkipCounter,
    cache_vision_features,
    detect_column,
    load_caption_dataset,
    prepare_split,
)
from loracaptioner.hub import push_folder, save_for_hub
from loracaptioner.lora import ORIGINAL_LORA_TARGETS, decoder_lora_config, quiet_peft
from loracaptioner.model_card import ADAPTER_DIR, TrainingRun, data_source
from loracaptioner.trainer import CaptionTrainer

logger = logging.getLogger(__name__)


class UsageError(ValueError):
    """A run that cannot start: its arguments, data paths or model are wrong. Reported in one line, exit code 2."""


@contextlib.contextmanager
def usage_errors():
    """ValueErrors and OSErrors inside become `UsageError`s (a failure while training keeps its traceback)."""
    try:
        yield
    except (ValueError, OSError) as error:
        raise UsageError(str(error)) from error


@dataclass
class ModelArguments:
    vision_model_name_or_path: str = field(
        default=DEFAULT_VISION_MODEL, metadata={"help": "CLIP checkpoint (Hub id or folder) for the vision tower."}
    )
    text_model_name_or_path: str = field(
        default=DEFAULT_TEXT_MODEL, metadata={"help": "T5 checkpoint (Hub id or folder) whose decoder writes captions."}
    )
    model_name_or_path: str | None = field(
        default=None, metadata={"help": "Start from an existing LoraCaptioner folder/Hub id instead of two backbones."}
    )
    use_clip_projection: bool = field(
        default=True, metadata={"help": "Bridge CLIP's projected 512-d patch tokens (True) or the raw 768-d ones."}
    )
    freeze_vision: bool = field(default=True, metadata={"help": "Keep the CLIP vision tower frozen."})
    cache_vision_features: bool = field(
        default=False,
        metadata={"help": "Run the frozen CLIP tower (+ LayerNorm + projection) once over the training rows before "
                          "training, keep its output in the datasets cache (rows x 196 x 512 x 2 bytes for "
                          "ViT-B/16 in float16) and train only bridge + decoder on it. Needs --freeze_vision, no "
                          "--streaming."},
    )
    vision_features_dtype: str = field(
        default="float16",
        metadata={"help": "How --cache_vision_features stores the features: float16 (half the disk; per-step loss "
                          "within 1e-3 of float32) or float32 (the losses of training on pixels, exactly).",
                  "choices": list(VISION_FEATURES_DTYPES)},
    )
    cache_dir: str | None = field(default=None, metadata={"help": "Where to cache downloaded models and datasets."})


@dataclass
class DataArguments:
    dataset_name: str | None = field(default=None, metadata={"help": "Dataset on the Hub or a local dataset script."})
    dataset_config_name: str | None = field(default=None, metadata={"help": "Its configuration name."})
    train_split: str = field(default="train", metadata={"help": "Split of --dataset_name to train on."})
    validation_split: str = field(default="validation", metadata={"help": "Split of --dataset_name to evaluate on."})
    test_split: str = field(default="test", metadata={"help": "Split of --dataset_name to caption with --do_predict."})
    streaming: bool = field(default=False, metadata={"help": "Stream the data instead of downloading it first."})
    train_dir: str | None = field(default=None, metadata={"help": "imagefolder with metadata.jsonl/metadata.csv."})
    validation_dir: str | None = field(default=None, metadata={"help": "imagefolder for evaluation."})
    test_dir: str | None = field(
        default=None, metadata={"help": "imagefolder to caption with --do_predict; its captions, if any, are scored."}
    )
    train_file: list[str] | None = field(
        default=None, metadata={"help": "webdataset .tar shards (jpg/png + txt), globs allowed, e.g. pixparse/cc3m-wds."}
    )
    validation_file: list[str] | None = field(default=None, metadata={"help": "webdataset .tar shards for evaluation."})
    test_file: list[str] | None = field(default=None, metadata={"help": "webdataset .tar shards for --do_predict."})
    image_column: str | None = field(default=None, metadata={"help": f"Image column (default: first of {IMAGE_COLUMNS})."})
    caption_column: str | None = field(
        default=None, metadata={"help": f"Caption column, a string or a list of strings (default: first of {CAPTION_COLUMNS})."}
    )
    max_train_samples: int | None = field(default=None, metadata={"help": "Use only the first N training rows."})
    max_eval_samples: int | None = field(default=None, metadata={"help": "Use only the first N evaluation rows."})
    max_predict_samples: int | None = field(default=None, metadata={"help": "Use only the first N test rows."})
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
    with usage_errors():  # until training starts, a ValueError or OSError is the user's arguments, data or model
        # 1. Arguments (command line, or one .json/.yaml file), logging, seed.
        parser = HfArgumentParser((ModelArguments, DataArguments, LoraArguments, Seq2SeqTrainingArguments))
        if len(sys.argv) == 2 and sys.argv[1].endswith((".json", ".yaml", ".yml")):
            loader = parser.parse_json_file if sys.argv[1].endswith(".json") else parser.parse_yaml_file
            model_args, data_args, lora_args, training_args = loader(os.path.abspath(sys.argv[1]))
        else:
            model_args, data_args, lora_args, training_args = parser.parse_args_into_dataclasses()
        training_args.remove_unused_columns = False  # the collator reads the raw `image` / `caption` columns
        training_args.predict_with_generate = (training_args.predict_with_generate or training_args.do_eval
                                               or training_args.do_predict)
        # The Trainer's own hub push would commit every checkpoint, with training_args.bin and a root
        # adapter_config.json; the repo gets one commit of the final, merged folder instead (step 7).
        push_to_hub, training_args.push_to_hub = training_args.push_to_hub, False
        if push_to_hub and not training_args.do_train:
            raise ValueError("--push_to_hub uploads the model this run trains: use it with --do_train (a run without "
                             "it writes no model)")
        if push_to_hub and lora_args.lora_r > 0 and not lora_args.merge_lora:
            raise ValueError("--push_to_hub uploads the merged LoraCaptioner folder: use it with --merge_lora true "
                             "(output_dir/adapter, the LoRA adapter alone, is written either way).")
        # LoRA and bridge get gradients every step: no graph search
        if training_args.ddp_find_unused_parameters is None:
            training_args.ddp_find_unused_parameters = False

        logging.basicConfig(format="%(asctime)s - %(levelname)s - %(name)s - %(message)s", datefmt="%H:%M:%S",
                            handlers=[logging.StreamHandler(sys.stdout)])
        log_level = training_args.get_process_log_level()
        logger.setLevel(log_level)
        transformers.utils.logging.set_verbosity(log_level)
        logger.info(f"Training/evaluation parameters {training_args}")
        set_seed(training_args.seed)


        # Resume: from --resume_from_checkpoint PATH, else (or with `true`) from output_dir's last *complete*
        # checkpoint.
        resume_from_checkpoint = training_args.resume_from_checkpoint
        if training_args.do_train and resume_from_checkpoint in (None, "true", "True", "last"):
            with training_args.main_process_first(desc="looking for the last complete checkpoint"):
                last_checkpoint = last_complete_checkpoint(training_args.output_dir,
                                                           set_aside_incomplete=training_args.should_save)
            if last_checkpoint is None and resume_from_checkpoint is not None:
                raise ValueError(f"--resume_from_checkpoint {resume_from_checkpoint}: no complete checkpoint in "
                                 f"{training_args.output_dir}")
            if last_checkpoint is not None:
                logger.info(f"Resuming from {last_checkpoint}. Use another --output_dir to start afresh.")
            resume_from_checkpoint = last_checkpoint
        elif training_args.do_train and (problem := checkpoint_problem(resume_from_checkpoint)):
            raise ValueError(f"--resume_from_checkpoint {resume_from_checkpoint}: {problem}")

        # 2. Data: one split each for training, evaluation and prediction, bad rows dropped and counted.
        skipped = SkipCounter()

        def load_split(split, data_dir, data_files, max_samples, for_training=False, for_prediction=False):
            if not (data_args.dataset_name or data_dir or data_files):
                name, flag = (("train", "--do_train") if for_training else ("test", "--do_predict")
                              if for_prediction else ("validation", "--do_eval"))
                raise ValueError(f"{flag} needs data: --{name}_dir, --{name}_file or --dataset_name "
                                 f"(with --{name}_split)")
            raw = load_caption_dataset(data_args.dataset_name, data_args.dataset_config_name, split, data_dir,
                                       data_files, data_args.streaming, model_args.cache_dir)
            columns = list(raw.column_names or next(iter(raw.take(1))).keys())
            image_column = detect_column(columns, data_args.image_column, IMAGE_COLUMNS, "image")
            has_captions = (data_args.caption_column in columns if data_args.caption_column
                            else any(name in columns for name in CAPTION_COLUMNS))
            if for_prediction and not has_captions:  # images to caption, with no references to score against
                logger.info(f"the {split} split has no caption column: its captions are written, not scored")
                caption_column = None
            else:
                caption_column = detect_column(columns, data_args.caption_column, CAPTION_COLUMNS, "caption")
            return prepare_split(raw, image_column, caption_column, skipped, one_row_per_caption=for_training,
                                 max_samples=max_samples, num_proc=data_args.preprocessing_num_workers,
                                 require_caption=not for_prediction)

        train_dataset = eval_dataset = predict_dataset = None
        if training_args.do_train:
            train_dataset = load_split(data_args.train_split, data_args.train_dir, data_args.train_file,
                                       data_args.max_train_samples, for_training=True)
        if training_args.do_eval:
            eval_dataset = load_split(data_args.validation_split, data_args.validation_dir, data_args.validation_file,
                                      data_args.max_eval_samples)
        if training_args.do_predict:
            predict_dataset = load_split(data_args.test_split, data_args.test_dir, data_args.test_file,
                                         data_args.max_predict_samples, for_prediction=True)
            if data_args.streaming:  # the predictions file pairs each caption with its row's key and references
                predict_dataset = datasets.Dataset.from_list(list(predict_dataset))
            if len(predict_dataset) == 0:
                raise ValueError(f"no test rows to caption (skipped: {skipped.summary()})")

        # 3. Model and processor: two backbones (new bridge) or an existing LoraCaptioner; then LoRA on the decoder.
        # The model's config decides what trains (`freeze_vision`); the processor's, how long a caption label gets.
        if model_args.model_name_or_path:
            model = LoraCaptionerForConditionalGeneration.from_pretrained(
                model_args.model_name_or_path, cache_dir=model_args.cache_dir, freeze_vision=model_args.freeze_vision)
            processor = LoraCaptionerProcessor.from_pretrained(model_args.model_name_or_path,
                                                               cache_dir=model_args.cache_dir)
        else:
            model = LoraCaptionerForConditionalGeneration.from_backbones(
                model_args.vision_model_name_or_path, model_args.text_model_name_or_path,
                use_clip_projection=model_args.use_clip_projection, freeze_vision=model_args.freeze_vision,
            )
            processor = LoraCaptionerProcessor.from_backbones(model_args.vision_model_name_or_path,
                                                              model_args.text_model_name_or_path)
        processor.max_target_length = data_args.max_target_length
        if model_args.cache_vision_features and train_dataset is not None:
            model.get_encoder().to(training_args.device)
            with training_args.main_process_first(desc="caching vision features"):
                train_dataset = cache_vision_features(train_dataset, model, processor,
                                                      batch_size=training_args.per_device_eval_batch_size,
                                                      dtype=model_args.vision_features_dtype)
        if lora_args.lora_r > 0 and training_args.do_train:  # evaluating a fresh (zero) adapter would change nothing
            with quiet_peft():
                lora_config = decoder_lora_config(model, lora_args.lora_r, lora_args.lora_alpha, lora_args.lora_dropout,
                                                  lora_args.lora_target_modules)
                model = get_peft_model(model, lora_config)
        if training_args.do_train:
            trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
            total = sum(p.numel() for p in model.parameters())
            logger.info(f"trainable parameters: {trainable:,} of {total:,} ({100 * trainable / total:.2f}%)")

        # 4. Metrics: CIDEr-D, BLEU-1..4, ROUGE-L (local evaluate module) and exact match, against every reference.
        def decode(predicted_ids) -> list[str]:
            predicted_ids = torch.as_tensor(predicted_ids)
            # the Trainer pads gathered predictions with -100
            predicted_ids = predicted_ids.masked_fill(predicted_ids == -100, processor.tokenizer.pad_token_id)
            return [text.strip() for text in processor.batch_decode(predicted_ids, skip_special_tokens=True)]

        eval_references = None if eval_dataset is None or data_args.streaming else eval_dataset["references"]
        predict_references = None if predict_dataset is None else predict_dataset["references"]
        if any(eval_references or []) or any(predict_references or []):
            caption_metrics = load_caption_metrics()

        def compute_metrics_for(references):
            """`compute_metrics` for a split whose rows have these references; rows without any are not scored."""
            if not any(references or []):
                return None

            def compute_metrics(eval_prediction):
                captions = decode(eval_prediction.predictions)
                scored = [(caption, refs) for caption, refs in zip(captions, references) if refs]
                captions, refs = [caption for caption, _ in scored], [refs for _, refs in scored]
                scores = caption_metrics.compute(predictions=captions, references=refs)
                scores["exact_match"] = exact_match(captions, refs)
                return {name: round(float(value), 6) for name, value in scores.items()}

            return compute_metrics

        # 5. Trainer: the collator decodes images lazily (or reads cached features) and builds labels with -100 padding.
        trainer = CaptionTrainer(
            model=model,
            args=training_args,
            train_dataset=train_dataset,
            eval_dataset=eval_dataset,
            data_collator=CaptionCollator(processor, model=model),
            processing_class=processor,
            compute_metrics=compute_metrics_for(eval_references),
        )

    # 6. Train, evaluate, predict.
    summary = {}
    if training_args.do_train:
        started = time.perf_counter()
        result = trainer.train(resume_from_checkpoint=resume_from_checkpoint)
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
    predictions_file = None
    if training_args.do_predict:
        trainer.compute_metrics = compute_metrics_for(predict_references)  # scored against the test references
        result = trainer.predict(predict_dataset, metric_key_prefix="predict")
        metrics = result.metrics
        metrics["predict_samples"] = len(predict_dataset)
        metrics["predict_samples_with_references"] = sum(1 for refs in predict_references if refs)
        trainer.log_metrics("predict", metrics)
        trainer.save_metrics("predict", metrics)  # predict_results.json
        summary["predict"] = {k: v for k, v in metrics.items() if not k.endswith(("runtime", "per_second"))}
        if trainer.is_world_process_zero():  # one row per test image: its key, the caption written, its references
            predictions_file = os.path.join(training_args.output_dir, "generated_predictions.jsonl")
            with open(predictions_file, "w", encoding="utf-8") as handle:
                for key, caption, references in zip(predict_dataset["key"], decode(result.predictions),
                                                    predict_references):
                    record = {"key": key, "caption": caption, "references": references}
                    handle.write(json.dumps(record, ensure_ascii=False) + "\n")

    # 7. Save (training runs only): the adapter (LoRA + bridge) and, merged, a Hub-ready LoraCaptioner folder whose
    # card is written from what the folder holds: config, adapter, trainer state, evaluation results and the run record.
    final_model = trainer.model
    model_dir = None
    if training_args.do_train and trainer.is_world_process_zero():
        if isinstance(final_model, PeftModel):
            final_model.save_pretrained(os.path.join(training_args.output_dir, ADAPTER_DIR))
            if lora_args.merge_lora:
                final_model = final_model.merge_and_unload()
        if not isinstance(final_model, PeftModel):
            TrainingRun(
                base_models=([model_args.model_name_or_path] if model_args.model_name_or_path else
                             [model_args.vision_model_name_or_path, model_args.text_model_name_or_path]),
                train_data=data_source(data_args.dataset_name, data_args.train_dir, data_args.train_file),
                eval_data=data_source(data_args.dataset_name, data_args.validation_dir, data_args.validation_file),
                eval_split=data_args.validation_split,
                num_train_rows=None if data_args.streaming else len(train_dataset),
                skipped=dict(skipped.reasons.most_common()),
                per_device_train_batch_size=training_args.per_device_train_batch_size,
                world_size=training_args.world_size,
                gradient_accumulation_steps=training_args.gradient_accumulation_steps,
                optimizer=str(getattr(training_args.optim, "value", training_args.optim)),
                learning_rate=training_args.learning_rate,
                lr_scheduler=str(getattr(training_args.lr_scheduler_type, "value", training_args.lr_scheduler_type)),
                precision="bf16" if training_args.bf16 else "fp16" if training_args.fp16 else "fp32",
                seed=training_args.seed,
                generation_num_beams=training_args.generation_num_beams,
                generation_max_length=training_args.generation_max_length,
            ).save(training_args.output_dir)
            save_for_hub(final_model, processor, training_args.output_dir, repo_id=training_args.hub_model_id)
            model_dir = os.path.abspath(training_args.output_dir)
        else:
            model_dir = os.path.abspath(os.path.join(training_args.output_dir, ADAPTER_DIR))
        if push_to_hub:  # the merged folder (with --merge_lora false there is none: push_folder says what is missing)
            repo_id = training_args.hub_model_id or os.path.basename(os.path.abspath(training_args.output_dir))
            push_folder(training_args.output_dir, repo_id, token=training_args.hub_token,
                        private=training_args.hub_private_repo, commit_message="train_hf.py")

    # 8. Summary: speed, what was skipped and why, the best checkpoint, where the model and the predictions are.
    summary.update(
        world_size=training_args.world_size, skipped_rows=skipped.total, skipped=dict(skipped.reasons),
        best_metric=trainer.state.best_metric, best_checkpoint=trainer.state.best_model_checkpoint,
        output_dir=os.path.abspath(training_args.output_dir), model=model_dir, predictions=predictions_file,
    )
    if trainer.is_world_process_zero():
        with open(os.path.join(training_args.output_dir, "run_summary.json"), "w") as handle:
            json.dump(summary, handle, indent=2, default=str)
        model_line = (model_dir if training_args.do_train else
                      "none: no --do_train, so no model, adapter or card was written (only results and predictions)")
        logger.warning(
            "\n***** LoraCaptioner run summary *****\n"
            f"  samples/s        : {summary.get('train_samples_per_second')}\n"
            f"  skipped rows     : {skipped.total} ({skipped.summary()})\n"
            f"  best metric      : {trainer.state.best_metric} ({trainer.state.best_model_checkpoint})\n"
            f"  eval             : {summary.get('eval')}\n"
            f"  predict          : {summary.get('predict')}\n"
            f"  predictions      : {predictions_file}\n"
            f"  model            : {model_line}"
        )
    return summary


if __name__ == "__main__":
    try:
        main()
    except UsageError as error:
        print(f"train_hf.py: error: {error}", file=sys.stderr)  # one line, exit code 2, like argparse
        sys.exit(2)
