"""Model cards for saved LoraCaptioner folders: `model_card_template.md` (package data, next to this file) rendered
by huggingface_hub's `ModelCard`.

`write_model_card` reads only what is in the folder: config.json and generation_config.json; `adapter/` (the LoRA
adapter, when one was trained or imported); and what a training run leaves there: trainer_state.json,
eval_results.json and `training_run.json` (a `TrainingRun`: data, skipped rows, settings). A card for a folder saved by
hand says "not recorded" where those are missing.
"""

from __future__ import annotations

import dataclasses
import json
import re
from dataclasses import dataclass, field
from pathlib import Path

from huggingface_hub import EvalResult, ModelCard, ModelCardData

from .remote_code.configuration_loracaptioner import LoraCaptionerConfig
from .lora import lora_targets

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
RUN_RECORD_NAME = "training_run.json"
ADAPTER_DIR = "adapter"  # where train_hf.py and convert_original keep the LoRA adapter of a merged folder
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


def data_source(dataset_name: str | None = None, data_dir: str | None = None,
                data_files: list[str] | None = None) -> dict:
    """How a card names data given as `load_caption_dataset` takes it: `{"name": label, "hub_id": id or None}`, with
    local paths cut to their last two components (no absolute path of this machine goes into a card)."""
    if dataset_name:
        hub_id = dataset_name if is_hub_id(dataset_name) else None
        return {"name": dataset_name if hub_id else _local_label(dataset_name), "hub_id": hub_id}
    if data_dir:
        return {"name": f"imagefolder {_local_label(data_dir)}", "hub_id": None}
    if data_files:
        return {"name": "webdataset " + ", ".join(_local_label(file) for file in data_files), "hub_id": None}
    return {"name": None, "hub_id": None}


@dataclass
class TrainingRun:
    """What a training run records beside the model it saves (`training_run.json`), for the card: what it started
    from, its data, the rows it skipped and its settings. Everything else the card says is read from the folder."""

    base_models: list[str] = field(default_factory=list)  # a LoraCaptioner it continued, or the two backbones
    train_data: dict = field(default_factory=data_source)  # `data_source(...)`
    eval_data: dict = field(default_factory=data_source)
    eval_split: str | None = None
    num_train_rows: int | None = None
    skipped: dict[str, int] = field(default_factory=dict)  # reason -> rows
    per_device_train_batch_size: int = 8
    world_size: int = 1
    gradient_accumulation_steps: int = 1
    optimizer: str = ""
    learning_rate: float = 0.0
    lr_scheduler: str = ""
    precision: str = "fp32"
    seed: int = 42
    generation_num_beams: int | None = None  # evaluation's decoding, when it overrode the saved defaults
    generation_max_length: int | None = None

    def save(self, folder) -> None:
        (Path(folder) / RUN_RECORD_NAME).write_text(json.dumps(dataclasses.asdict(self), indent=2) + "\n")

    @classmethod
    def load(cls, folder) -> TrainingRun | None:
        path = Path(folder) / RUN_RECORD_NAME
        return cls(**json.loads(path.read_text())) if path.is_file() else None


def _read_json(path: Path) -> dict | None:
    return json.loads(path.read_text()) if path.is_file() else None


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
    def of(cls, config: LoraCaptionerConfig, adapter: dict | None, run: TrainingRun | None) -> TrainedParts:
        """From the saved config (`freeze_vision`) and the folder's LoRA adapter config (the decoder modules it
        adapts); with no adapter, a training run's record says the decoder was fine-tuned in full. Nothing is
        recorded without either."""
        if adapter is None and run is None:
            return cls()
        return cls(
            vision_tower="frozen" if config.freeze_vision else "fine-tuned",
            decoder="LoRA" if adapter is not None else "fine-tuned",
            lora_modules=lora_targets(adapter["target_modules"]) if adapter is not None else (),
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


def _training_text(trained: TrainedParts, adapter: dict | None, run: TrainingRun | None, state: dict | None) -> str:
    """The card's training section: what the folder records, or one sentence when it was saved by hand."""
    if run is None and adapter is None:
        return f"{NOT_RECORDED.capitalize()}: this folder was saved outside train_hf.py."
    lines = []
    if run is not None:
        rows = f"{run.num_train_rows:,} (image, caption) rows" if run.num_train_rows is not None else None
        skipped = ", ".join(f"{count} {reason}" for reason, count in run.skipped.items()) or "none"
        data_text = ", ".join(part for part in (run.train_data["name"], rows) if part) or NOT_RECORDED
        lines.append(f"- Data: {data_text}; rows skipped (undecodable images, empty captions): {skipped}.")
        effective_batch = run.per_device_train_batch_size * run.gradient_accumulation_steps * run.world_size
        if state and state.get("global_step"):
            lines.append(f"- Steps: {state['global_step']:,} optimizer steps ({state.get('epoch') or 0:.2f} epochs, "
                         f"{state['global_step'] * effective_batch:,} caption rows seen).")
        lines.append(
            f"- Batch: {run.per_device_train_batch_size} per device × {run.world_size} device(s) "
            f"× {run.gradient_accumulation_steps} accumulation = {effective_batch}; optimizer {run.optimizer}, "
            f"learning rate {run.learning_rate:g}, {run.lr_scheduler} schedule; precision {run.precision}; "
            f"seed {run.seed}.")
    else:
        lines.append(f"- Data: {NOT_RECORDED}; rows skipped (undecodable images, empty captions): {NOT_RECORDED}.")
    if trained.decoder == "LoRA":
        lines.append(f"- LoRA: r={adapter['r']}, alpha={adapter['lora_alpha']}, dropout={adapter['lora_dropout']} on "
                     f"the decoder modules {', '.join(trained.lora_modules)}; merged into these weights.")
    else:
        lines.append("- LoRA: none, the decoder was fine-tuned fully.")
    return "\n".join(lines)


def write_model_card(output_dir, repo_id: str | None = None, *, revision: str | None = None,
                     space_id: str | None = None, license: str = "apache-2.0", base_model: list[str] | None = None,
                     datasets: list[str] | None = None) -> ModelCard:
    """Render `output_dir/README.md` for the model saved there, from what the folder holds (see the module's
    docstring), and return the card.

    `repo_id` is the Hub id the usage snippets load (default: a placeholder); `revision` the one they pin (default
    `main`, with a note to pin a commit). `base_model` / `datasets` override the Hub ids found in the folder.
    """
    output_dir = Path(output_dir)
    config = LoraCaptionerConfig.from_pretrained(output_dir)
    generation = _read_json(output_dir / "generation_config.json") or {}
    adapter = _read_json(output_dir / ADAPTER_DIR / "adapter_config.json")
    run = TrainingRun.load(output_dir)
    state = _read_json(output_dir / "trainer_state.json")
    eval_metrics = _read_json(output_dir / "eval_results.json") or {}
    repo_id = repo_id or f"your-name/{output_dir.resolve().name}"
    model_name = repo_id.split("/")[-1]
    trained = TrainedParts.of(config, adapter, run)

    if base_model is None:  # what the run started from, else the backbones' names kept in the sub-configs
        names = run.base_models if run else [config.vision_config._name_or_path, config.text_config._name_or_path]
        base_model = [name for name in names if is_hub_id(name)]
    train_data, eval_data = (run.train_data, run.eval_data) if run else (data_source(), data_source())
    if datasets is None:
        datasets = [train_data["hub_id"]] if train_data["hub_id"] else []
    eval_split = run.eval_split if eval_data["hub_id"] else "validation"
    eval_results = _eval_results(eval_metrics, eval_data["name"] or train_data["name"] or "custom",
                                 eval_data["hub_id"], eval_split)

    tags = ["image-captioning", "custom_code", "clip", "t5", "loracaptioner"]
    if trained.decoder == "LoRA":
        tags[1:1] = ["lora", "peft"]
    card_data = ModelCardData(
        language="en", license=license, library_name="transformers", pipeline_tag="image-to-text", tags=tags,
        base_model=base_model or None, datasets=datasets or None, metrics=HUB_METRICS if eval_results else None,
        model_name=model_name if eval_results else None, eval_results=eval_results or None, widget=WIDGET_EXAMPLES,
    )

    if eval_results:
        num_beams = (run and run.generation_num_beams) or generation.get("num_beams", 1)
        decoding = "greedy decoding" if num_beams == 1 else f"beam search ({num_beams} beams)"
        decoding += " with the saved generation defaults"
        max_length = run and run.generation_max_length  # it counts the decoder's start token
        decoding += f", at most {max_length - 1} new tokens" if max_length else ""
        rows = "\n".join(f"| {result.metric_name} | {result.metric_value:.4f} |" for result in eval_results)
        eval_table = (f"On {eval_results[0].dataset_name} ({eval_results[0].dataset_split} split), "
                      f"{decoding}:\n\n| metric | value |\n|---|---|\n{rows}")
    else:
        eval_table = "No evaluation was run for this checkpoint."
    vision, text = config.vision_config, config.text_config
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
        vision_summary=(f"{vision.num_hidden_layers} layers, width {vision.hidden_size}, patch {vision.patch_size}, "
                        f"{vision.image_size} px"),
        projection_note=(f", CLIP visual projection {vision.hidden_size} → {vision.projection_dim}"
                         if config.use_clip_projection else ""),
        vision_training=trained.table_cell("vision_tower"),
        bridge_training=trained.table_cell("bridge"),
        bridge_in=config.image_token_dim,
        d_model=text.d_model,
        text_summary=f"{text.num_decoder_layers} layers, width {text.d_model}, vocabulary {text.vocab_size}",
        num_image_tokens=config.num_image_tokens,
        decoder_training=trained.table_cell("decoder"),
        eval_table=eval_table,
        generation_text=", ".join(f"`{key}={value}`" for key, value in generation.items()
                                  if key in ("max_new_tokens", "no_repeat_ngram_size", "num_beams")) or "none saved",
        max_new_tokens=generation.get("max_new_tokens", 32),
        training_text=_training_text(trained, adapter, run, state),
    )
    card.save(output_dir / "README.md")
    return card
