"""Model cards for saved LoraCaptioner folders: `model_card_template.md` (package data, next to this file) rendered
by huggingface_hub's `ModelCard`.

`write_model_card` reads what the folder itself says (config.json, generation_config.json) and, when a training run
wrote the folder, what the run knows (train_hf.py's argument dataclasses, the `TrainerState`, evaluation metrics,
skipped rows). Every training argument is optional: a card for a folder saved by hand says "not recorded" instead.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

from huggingface_hub import EvalResult, ModelCard, ModelCardData

TEMPLATE_PATH = Path(__file__).with_name("model_card_template.md")  # package data, in every install
# evaluation metric key (without the "eval_" prefix) -> name on the card, in the order of the card's table
METRIC_NAMES = {
    "cider": "CIDEr-D",
    "bleu_1": "BLEU-1",
    "bleu_2": "BLEU-2",
    "bleu_3": "BLEU-3",
    "bleu_4": "BLEU-4",
    "rouge_l": "ROUGE-L",
    "exact_match": "Exact match",
}
HUB_METRICS = ["cider", "bleu", "rouge", "exact_match"]  # the card's `metrics:` field (Hub metric ids)
NOT_RECORDED = "not recorded"
# The card's `widget:` example images (the Hub's own sample images, as other image-to-text cards use them)
WIDGET_EXAMPLES = [
    {"src": f"https://huggingface.co/datasets/mishig/sample_images/resolve/main/{name}", "example_title": title}
    for name, title in (("tiger.jpg", "Tiger"), ("teapot.jpg", "Teapot"), ("football-match.jpg", "Football match"))
]
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


def is_hub_id(name: str | None) -> bool:
    """A `namespace/name` Hub repo id, not a path on this machine."""
    return bool(name) and _HUB_ID.match(name) is not None and not Path(name).exists() and ".." not in name


def _local_label(path: str) -> str:
    """A local data path as the card shows it: its last two components, never this machine's absolute path."""
    return "/".join(Path(path.rstrip("/")).parts[-2:]) if path else path


def _dataset_label(data_args, split: str) -> tuple[str | None, str | None]:
    """(label, Hub id or None) of the training (`split="train"`) or evaluation data named by train_hf's DataArguments."""
    if data_args is None:
        return None, None
    if data_args.dataset_name:
        hub_id = data_args.dataset_name if is_hub_id(data_args.dataset_name) else None
        name = data_args.dataset_name if hub_id else _local_label(data_args.dataset_name)
        return name, hub_id
    folder = data_args.train_dir if split == "train" else data_args.validation_dir
    files = data_args.train_file if split == "train" else data_args.validation_file
    if folder:
        return f"imagefolder {_local_label(folder)}", None
    if files:
        return "webdataset " + ", ".join(_local_label(file) for file in files), None
    return None, None


def _base_models(config: dict, model_args) -> list[str]:
    """Hub ids this model was built from: the LoraCaptioner it continued, else the CLIP and T5 backbones."""
    if model_args is not None:
        names = [model_args.model_name_or_path] if model_args.model_name_or_path else [
            model_args.vision_model_name_or_path, model_args.text_model_name_or_path]
    else:  # a folder saved by hand: the backbones' names are kept in the sub-configs
        names = [config["vision_config"].get("_name_or_path"), config["text_config"].get("_name_or_path")]
    return [name for name in names if is_hub_id(name)]


def _eval_results(eval_metrics: dict, dataset_label: str, dataset_id: str | None, split: str | None) -> list[EvalResult]:
    return [
        EvalResult(task_type="image-to-text", task_name="Image Captioning", dataset_type=dataset_id or "custom",
                   dataset_name=dataset_label, dataset_split=split, metric_type=key, metric_name=pretty,
                   metric_value=float(eval_metrics[f"eval_{key}"]))
        for key, pretty in METRIC_NAMES.items() if eval_metrics.get(f"eval_{key}") is not None
    ]


@dataclass(frozen=True)
class TrainedParts:
    """What a run trained, the one source of the card's opening sentence, its architecture table, its LoRA line and
    its tags: so they cannot disagree. None: not recorded (a folder saved by hand)."""

    vision_tower: str | None = None  # "frozen" or "fine-tuned"
    decoder: str | None = None  # "LoRA" or "fine-tuned"
    lora_modules: tuple[str, ...] = ()

    @classmethod
    def of(cls, config: dict, lora_args=None) -> TrainedParts:
        """From the saved config (`freeze_vision`) and train_hf.py's LoRA arguments (`lora_r`, `lora_target_modules`);
        nothing is recorded without the LoRA arguments."""
        if lora_args is None:
            return cls()
        return cls(
            vision_tower="frozen" if config.get("freeze_vision", True) else "fine-tuned",
            decoder="LoRA" if lora_args.lora_r > 0 else "fine-tuned",
            lora_modules=tuple(lora_args.lora_target_modules) if lora_args.lora_r > 0 else (),
        )

    def summary(self) -> str:
        """The card's opening sentence, less its subject."""
        if self.decoder is None:
            return ("a CLIP vision tower, a linear **bridge** and a **T5 decoder** that cross-attends to the image's "
                    "patch tokens and writes the caption (the T5 text encoder is not used). How it was trained is "
                    f"{NOT_RECORDED}")
        decoder = (f"a **T5 decoder** adapted with **LoRA** (on its {', '.join(self.lora_modules)} modules)"
                   if self.decoder == "LoRA" else "a fully fine-tuned **T5 decoder**")
        return (f"a {self.vision_tower} **CLIP** vision tower, a trained linear **bridge**, and {decoder} that "
                "cross-attends to the image's patch tokens and writes the caption (the T5 text encoder is not used)")

    def table_cell(self, part: str) -> str:
        """The 'trained' cell of the architecture table for `vision_tower`, `bridge` or `decoder`."""
        if self.decoder is None:
            return NOT_RECORDED
        if part == "bridge":
            return "yes"
        if part == "decoder" and self.decoder == "LoRA":
            return f"LoRA ({', '.join(self.lora_modules)})"
        return getattr(self, part)


def _value(option) -> str:
    """An argument as the command line spells it (`adamw_torch_fused`, not `OptimizerNames.ADAMW_TORCH_FUSED`)."""
    return str(getattr(option, "value", option))


def _training_text(trained: TrainedParts, data_args, lora_args, training_args, state, skipped,
                   num_train_rows: int | None) -> str:
    """The card's training section: what the run recorded, or one sentence when the folder was saved by hand."""
    if all(part is None for part in (data_args, lora_args, training_args, state, skipped, num_train_rows)):
        return f"{NOT_RECORDED.capitalize()}: this folder was saved outside train_hf.py."
    label = _dataset_label(data_args, "train")[0]
    rows = f"{num_train_rows:,} (image, caption) rows" if num_train_rows is not None else None
    skipped_text = skipped.summary() if skipped is not None else NOT_RECORDED
    data_text = ", ".join(part for part in (label, rows) if part) or NOT_RECORDED
    lines = [f"- Data: {data_text}; rows skipped (undecodable images, empty captions): {skipped_text}."]
    effective_batch = None
    if training_args is not None:
        effective_batch = (training_args.per_device_train_batch_size * training_args.gradient_accumulation_steps
                           * training_args.world_size)
        precision = "bf16" if training_args.bf16 else "fp16" if training_args.fp16 else "fp32"
        lines.append(
            f"- Batch: {training_args.per_device_train_batch_size} per device × {training_args.world_size} device(s) "
            f"× {training_args.gradient_accumulation_steps} accumulation = {effective_batch}; optimizer "
            f"{_value(training_args.optim)}, learning rate {training_args.learning_rate:g}, "
            f"{_value(training_args.lr_scheduler_type)} schedule; precision {precision}; seed {training_args.seed}.")
    if state is not None and state.global_step:
        seen = f", {state.global_step * effective_batch:,} caption rows seen" if effective_batch else ""
        lines.insert(1, f"- Steps: {state.global_step:,} optimizer steps ({state.epoch or 0:.2f} epochs{seen}).")
    if trained.decoder == "LoRA":
        merged = "merged into these weights" if getattr(lora_args, "merge_lora", True) else "kept as a separate adapter"
        lines.append(f"- LoRA: r={lora_args.lora_r}, alpha={lora_args.lora_alpha}, dropout={lora_args.lora_dropout} on "
                     f"the decoder modules {', '.join(trained.lora_modules)}; {merged}.")
    elif trained.decoder == "fine-tuned":
        lines.append("- LoRA: none, the decoder was fine-tuned fully.")
    else:
        lines.append(f"- LoRA: {NOT_RECORDED}.")
    return "\n".join(lines)


def write_model_card(output_dir, model_args=None, data_args=None, lora_args=None, training_args=None, state=None,
                     eval_metrics: dict | None = None, skipped=None, repo_id: str | None = None, *,
                     num_train_rows: int | None = None, revision: str | None = None, space_id: str | None = None,
                     license: str = "apache-2.0", base_model: list[str] | None = None,
                     datasets: list[str] | None = None) -> ModelCard:
    """Render `output_dir/README.md` for the model saved there and return the card.

    `model_args`, `data_args`, `lora_args`, `training_args` are train_hf.py's argument dataclasses, `state` the
    Trainer's `TrainerState`, `eval_metrics` the `trainer.evaluate()` dict (`eval_cider`, `eval_bleu_4`, ...: they fill
    the card's `model-index`), `skipped` the run's `SkipCounter`. `repo_id` is the Hub id the usage snippets load
    (default: `--hub_model_id`, else a placeholder); `revision` the one they pin (default `main`, with a note to pin a
    commit). `base_model` / `datasets` override the Hub ids found in the arguments and the config.
    """
    output_dir = Path(output_dir)
    config = json.loads((output_dir / "config.json").read_text())
    generation_path = output_dir / "generation_config.json"
    generation = json.loads(generation_path.read_text()) if generation_path.exists() else {}
    vision, text = config["vision_config"], config["text_config"]
    repo_id = repo_id or getattr(training_args, "hub_model_id", None) or f"your-name/{output_dir.resolve().name}"
    model_name = repo_id.split("/")[-1]
    trained = TrainedParts.of(config, lora_args)

    base_model = base_model if base_model is not None else _base_models(config, model_args)
    train_label, train_dataset_id = _dataset_label(data_args, "train")
    eval_label, eval_dataset_id = _dataset_label(data_args, "validation")
    if datasets is None:
        datasets = [train_dataset_id] if train_dataset_id else []
    eval_split = getattr(data_args, "validation_split", None) if eval_dataset_id else "validation"
    eval_results = _eval_results(eval_metrics or {}, eval_label or train_label or "custom", eval_dataset_id, eval_split)

    tags = ["image-captioning", "custom_code", "clip", "t5", "loracaptioner"]
    if trained.decoder == "LoRA":
        tags[1:1] = ["lora", "peft"]
    card_data = ModelCardData(
        language="en", license=license, library_name="transformers", pipeline_tag="image-to-text", tags=tags,
        base_model=base_model or None, datasets=datasets or None, metrics=HUB_METRICS if eval_results else None,
        model_name=model_name if eval_results else None, eval_results=eval_results or None, widget=WIDGET_EXAMPLES,
    )

    if eval_results:
        num_beams = getattr(training_args, "generation_num_beams", None) or generation.get("num_beams", 1)
        decoding = "greedy decoding" if num_beams == 1 else f"beam search ({num_beams} beams)"
        decoding += " with the saved generation defaults"
        max_length = getattr(training_args, "generation_max_length", None)  # it counts the decoder's start token
        decoding += f", at most {max_length - 1} new tokens" if max_length else ""
        rows = "\n".join(f"| {result.metric_name} | {result.metric_value:.4f} |" for result in eval_results)
        eval_table = (f"On {eval_results[0].dataset_name} ({eval_results[0].dataset_split} split), "
                      f"{decoding}:\n\n| metric | value |\n|---|---|\n{rows}")
    else:
        eval_table = "No evaluation was run for this checkpoint."
    use_projection = config.get("use_clip_projection", True)
    card = ModelCard.from_template(
        card_data,
        template_path=str(TEMPLATE_PATH),
        model_name=model_name,
        summary=trained.summary(),
        repo_id=repo_id,
        revision=revision or "main",
        space_text=(f"the [demo Space](https://huggingface.co/spaces/{space_id})" if space_id else
                    f"the Gradio app in LoraCaptioner's `space/` folder (`python space/app.py --model {repo_id} "
                    "--revision <commit sha>`), which runs locally or as a Space"),
        vision_summary=(f"{vision['num_hidden_layers']} layers, width {vision['hidden_size']}, patch "
                        f"{vision['patch_size']}, {vision['image_size']} px"),
        projection_note=(f", CLIP visual projection {vision['hidden_size']} → {vision['projection_dim']}"
                         if use_projection else ""),
        vision_training=trained.table_cell("vision_tower"),
        bridge_training=trained.table_cell("bridge"),
        bridge_in=vision["projection_dim"] if use_projection else vision["hidden_size"],
        d_model=text["d_model"],
        text_summary=f"{text['num_decoder_layers']} layers, width {text['d_model']}, vocabulary {text['vocab_size']}",
        num_image_tokens=((vision["image_size"] // vision["patch_size"]) ** 2
                          + (0 if config.get("drop_cls_token", True) else 1)),
        decoder_training=trained.table_cell("decoder"),
        eval_table=eval_table,
        generation_text=", ".join(f"`{key}={value}`" for key, value in generation.items()
                                  if key in ("max_new_tokens", "no_repeat_ngram_size", "num_beams")) or "none saved",
        max_new_tokens=generation.get("max_new_tokens", 32),
        training_text=_training_text(trained, data_args, lora_args, training_args, state, skipped, num_train_rows),
    )
    card.save(output_dir / "README.md")
    return card
