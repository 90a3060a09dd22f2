"""What train_hf.py needs beyond transformers and peft: the LoRA placement (decoder only) and caption metrics."""

from __future__ import annotations

import re
from pathlib import Path

from peft import LoraConfig

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
    """A peft `LoraConfig` placing adapters on the given T5 decoder modules, with the bridge trained and saved in
    full. Unknown module names raise a `ValueError` listing the valid ones."""
    linear_names = {
        re.sub(_DECODER_LAYER, "", name)
        for name, module in model.named_modules()
        if re.match(_DECODER_LAYER, name) and type(module).__name__ == "Linear"
    }
    unknown = [name for name in targets if name not in linear_names]
    if unknown:
        raise ValueError(f"unknown LoRA target module(s) {unknown}; valid decoder modules: {sorted(linear_names)}")
    pattern = rf"^{_DECODER_LAYER}(?:{'|'.join(re.escape(name) for name in targets)})$"
    return LoraConfig(r=r, lora_alpha=alpha, lora_dropout=dropout, target_modules=pattern, modules_to_save=["bridge"],
                      bias="none")


CAPTION_METRICS_PATH = Path(__file__).resolve().parents[1] / "metrics" / "caption_metrics"


def exact_match(predictions: list[str], references: list[list[str]]) -> float:
    """Share of predictions equal (case and surrounding space ignored) to one of their references."""
    def norm(text: str) -> str:
        return " ".join(text.lower().split())

    hits = sum(norm(p) in {norm(r) for r in refs} for p, refs in zip(predictions, references))
    return hits / max(len(predictions), 1)
