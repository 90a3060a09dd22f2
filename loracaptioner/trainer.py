"""`CaptionTrainer`: transformers' `Seq2SeqTrainer`, evaluating and predicting with the model's caption defaults."""

from __future__ import annotations

import copy

from peft import PeftModel
from transformers import Seq2SeqTrainer


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
