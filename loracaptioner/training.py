"""Training pieces on top of transformers and peft: the LoRA placement (decoder only), caption metrics, a
`Seq2SeqTrainer` that generates with the caption defaults, and finding the checkpoint to resume from."""

from __future__ import annotations

import copy
import json
import logging
import os
import re
import time
from pathlib import Path

from peft import LoraConfig, PeftModel
from transformers import Seq2SeqTrainer
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

logger = logging.getLogger(__name__)

# The original LoraCaptioner's target modules. T5 names them the same in encoder and decoder; the regex below keeps
# adapters off the (never built) text encoder and off the CLIP tower.
ORIGINAL_LORA_TARGETS = (
    "SelfAttention.q",
    "SelfAttention.k",
    "EncDecAttention.q",
    "EncDecAttention.k",
    "DenseReluDense.wi_0",
    "DenseReluDense.wi_1",
    "DenseReluDense.wo",
)
_DECODER_LAYER = r"decoder\.block\.\d+\.layer\.\d+\."


def decoder_lora_config(model, r: int, alpha: int, dropout: float, targets=ORIGINAL_LORA_TARGETS) -> LoraConfig:
    """A peft `LoraConfig` placing adapters on the given T5 decoder modules; the image encoder's modules that the
    model's config trains (`model.trainable_image_modules`: the bridge, and the CLIP tower unless frozen) are trained
    and saved in full. Unknown module names raise a `ValueError` listing the valid ones."""
    linear_names = {
        re.sub(_DECODER_LAYER, "", name)
        for name, module in model.named_modules()
        if re.match(_DECODER_LAYER, name) and type(module).__name__ == "Linear"
    }
    unknown = [name for name in targets if name not in linear_names]
    if unknown:
        raise ValueError(f"unknown LoRA target module(s) {unknown}; valid decoder modules: {sorted(linear_names)}")
    pattern = rf"^{_DECODER_LAYER}(?:{'|'.join(re.escape(name) for name in targets)})$"
    return LoraConfig(r=r, lora_alpha=alpha, lora_dropout=dropout, target_modules=pattern, bias="none",
                      modules_to_save=model.trainable_image_modules)


CAPTION_METRICS_PATH = Path(__file__).resolve().parents[1] / "metrics" / "caption_metrics"


def exact_match(predictions: list[str], references: list[list[str]]) -> float:
    """Share of predictions equal (case and surrounding space ignored) to one of their references."""
    def norm(text: str) -> str:
        return " ".join(text.lower().split())

    hits = sum(norm(p) in {norm(r) for r in refs} for p, refs in zip(predictions, references))
    return hits / max(len(predictions), 1)


class CaptionTrainer(Seq2SeqTrainer):
    """`Seq2SeqTrainer` whose evaluation and prediction give `generate()` one length setting (the model's
    `max_new_tokens`, or `--generation_max_length` in its place when that is given) and leave the model's caption
    generation defaults as they were."""

    def prediction_step(self, model, inputs, prediction_loss_only, ignore_keys=None, **gen_kwargs):
        gen_kwargs = gen_kwargs or dict(getattr(self, "_gen_kwargs", {}))  # what evaluate()/predict() were given
        if gen_kwargs.get("max_length") is not None:  # --generation_max_length replaces the saved max_new_tokens
            gen_kwargs.setdefault("max_new_tokens", None)
        captioner = self.accelerator.unwrap_model(self.model)
        captioner = captioner.get_base_model() if isinstance(captioner, PeftModel) else captioner
        generation_config = copy.deepcopy(captioner.generation_config)
        try:
            return super().prediction_step(model, inputs, prediction_loss_only, ignore_keys=ignore_keys, **gen_kwargs)
        finally:
            # Seq2SeqTrainer.prediction_step (transformers 5.24) writes every global default (max_length=20, ...) into
            # model.generation_config after generating: each later generate() then finds max_length beside
            # max_new_tokens and warns, and a saved model would carry them. Keep the caption defaults.
            captioner.generation_config = generation_config


_CHECKPOINT = re.compile(rf"^{PREFIX_CHECKPOINT_DIR}-(\d+)$")
TRAINER_STATE_NAME = "trainer_state.json"


def checkpoint_problem(checkpoint: str | os.PathLike) -> str:
    """'' when a checkpoint folder was completely written, else what is wrong with it.

    The Trainer (transformers 5.24, `Trainer._save_checkpoint`) writes a checkpoint in place, with no temporary folder
    and no rename: weights, optimizer, scheduler, RNG state, and `trainer_state.json` last. So a folder whose
    `trainer_state.json` is missing, unreadable or of another step was cut off while being written. (Under DDP the
    other ranks write their `rng_state_<rank>.pth` alongside; one missing costs only the exact RNG stream, and the
    Trainer warns.)"""
    state_file = Path(checkpoint) / TRAINER_STATE_NAME
    try:
        state = json.loads(state_file.read_text())
    except FileNotFoundError:
        return f"no {TRAINER_STATE_NAME} (written last: the save was cut off)"
    except (OSError, ValueError) as error:
        return f"unreadable {TRAINER_STATE_NAME} ({type(error).__name__}: {error})"
    match = _CHECKPOINT.match(Path(checkpoint).name)
    if match and state.get("global_step") != int(match.group(1)):
        return f"{TRAINER_STATE_NAME} is for step {state.get('global_step')}, not {match.group(1)}"
    return ""


def last_complete_checkpoint(output_dir: str | os.PathLike, set_aside_incomplete: bool = False) -> str | None:
    """The highest-numbered `checkpoint-N` in `output_dir` that was completely written (see `checkpoint_problem`),
    or None. Newer, incomplete ones are logged and, with `set_aside_incomplete` (the main process only), renamed to
    `checkpoint-N.incomplete-<time>`: left in place, the Trainer would later write step N into the half-written
    folder, and its checkpoint rotation (by modification time) could then delete the newest checkpoint."""
    if not os.path.isdir(output_dir):
        return None
    steps = {int(m.group(1)): name for name in os.listdir(output_dir) if (m := _CHECKPOINT.match(name))}
    for step in sorted(steps, reverse=True):
        path = os.path.join(output_dir, steps[step])
        if not os.path.isdir(path):
            continue
        problem = checkpoint_problem(path)
        if not problem:
            return path
        if set_aside_incomplete:
            aside = f"{path}.incomplete-{int(time.time())}"
            os.rename(path, aside)
            logger.warning(f"skipping incomplete checkpoint {path}: {problem}; moved to {aside}")
        else:
            logger.warning(f"skipping incomplete checkpoint {path}: {problem}")
    return None
