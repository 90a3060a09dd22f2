"""Model cards for saved LoraCaptioner folders, rendered by huggingface_hub from `model_card/template.md`."""

from __future__ import annotations

import json
from pathlib import Path

from huggingface_hub import EvalResult, ModelCard, ModelCardData

TEMPLATE_PATH = Path(__file__).resolve().parents[1] / "model_card" / "template.md"
METRIC_NAMES = {"cider": "CIDEr-D", "bleu_4": "BLEU-4", "bleu_1": "BLEU-1", "rouge_l": "ROUGE-L", "exact_match": "Exact match"}


def _is_hub_id(name: str | None) -> bool:
    return bool(name) and not Path(name).exists() and name.count("/") == 1


def write_model_card(output_dir, model_args=None, data_args=None, lora_args=None, training_args=None, state=None,
                     eval_metrics: dict | None = None, skipped=None, repo_id: str | None = None) -> ModelCard:
    """Render README.md into `output_dir` from the saved config and what the training run knows."""
    output_dir = Path(output_dir)
    config = json.loads((output_dir / "config.json").read_text())
    generation = json.loads((output_dir / "generation_config.json").read_text()) if (
        output_dir / "generation_config.json").exists() else {}
    vision, text = config["vision_config"], config["text_config"]
    repo_id = repo_id or getattr(training_args, "hub_model_id", None) or f"your-name/{output_dir.resolve().name}"

    base_models = []
    if model_args is not None:
        for name in (model_args.model_name_or_path,) if model_args.model_name_or_path else (
                model_args.vision_model_name_or_path, model_args.text_model_name_or_path):
            if _is_hub_id(name):
                base_models.append(name)
    dataset_ids = [data_args.dataset_name] if data_args is not None and _is_hub_id(data_args.dataset_name) else []
    dataset_label = (data_args.dataset_name or data_args.train_dir or ", ".join(data_args.train_file or [])
                     if data_args is not None else None) or "unknown"

    eval_results = []
    for key, pretty in METRIC_NAMES.items():
        value = (eval_metrics or {}).get(f"eval_{key}")
        if value is not None:
            eval_results.append(EvalResult(task_type="image-to-text", task_name="Image Captioning",
                                           dataset_type=dataset_ids[0] if dataset_ids else "custom",
                                           dataset_name=dataset_label, metric_type=key, metric_name=pretty,
                                           metric_value=float(value)))
    card_data = ModelCardData(
        language="en", license="apache-2.0", library_name="transformers", pipeline_tag="image-to-text",
        tags=["image-captioning", "lora", "peft", "custom_code", "clip", "t5", "loracaptioner"],
        base_model=base_models or None, datasets=dataset_ids or None,
        metrics=["cider", "bleu", "rouge"], model_name=output_dir.resolve().name,
        eval_results=eval_results or None,
    )
    if eval_metrics:
        rows = "\n".join(f"| {pretty} | {eval_metrics[f'eval_{key}']:.4f} |" for key, pretty in METRIC_NAMES.items()
                         if f"eval_{key}" in eval_metrics)
        eval_table = f"On {dataset_label} (evaluation split):\n\n| metric | value |\n|---|---|\n{rows}"
    else:
        eval_table = "No evaluation was run for this checkpoint."
    lora_text = (f"r={lora_args.lora_r}, alpha={lora_args.lora_alpha}, dropout={lora_args.lora_dropout} on decoder "
                 f"modules {', '.join(lora_args.lora_target_modules)}; merged into the weights"
                 if lora_args is not None and lora_args.lora_r > 0 else "none (decoder fine-tuned fully)")
    use_projection = config.get("use_clip_projection", True)
    card = ModelCard.from_template(
        card_data,
        template_path=str(TEMPLATE_PATH),
        model_name=output_dir.resolve().name,
        repo_id=repo_id,
        revision="<commit sha>",
        vision_summary=f"{vision['num_hidden_layers']} layers, width {vision['hidden_size']}, patch {vision['patch_size']}, "
                       f"{vision['image_size']} px",
        projection_note=f", CLIP visual projection {vision['hidden_size']} → {vision['projection_dim']}" if use_projection else "",
        bridge_in=vision["projection_dim"] if use_projection else vision["hidden_size"],
        d_model=text["d_model"],
        text_summary=f"{text['num_decoder_layers']} layers, width {text['d_model']}, vocabulary {text['vocab_size']}",
        num_image_tokens=(vision["image_size"] // vision["patch_size"]) ** 2 + (0 if config.get("drop_cls_token", True) else 1),
        decoder_training="LoRA" if lora_args is not None and lora_args.lora_r > 0 else "fine-tuned",
        datasets_text=dataset_label,
        train_rows=getattr(state, "num_train_epochs", None) and "see trainer_state.json" or "n/a",
        skipped_text=(skipped.summary() if skipped is not None else "n/a"),
        global_step=getattr(state, "global_step", "n/a"),
        epochs=getattr(training_args, "num_train_epochs", "n/a"),
        learning_rate=getattr(training_args, "learning_rate", "n/a"),
        batch_size=getattr(training_args, "per_device_train_batch_size", "n/a"),
        world_size=getattr(training_args, "world_size", 1),
        seed=getattr(training_args, "seed", "n/a"),
        lora_text=lora_text,
        eval_table=eval_table,
        generation_text=", ".join(f"`{k}={v}`" for k, v in generation.items()
                                  if k in ("max_new_tokens", "no_repeat_ngram_size", "num_beams")),
        max_new_tokens=generation.get("max_new_tokens", 32),
    )
    card.save(output_dir / "README.md")
    return card
