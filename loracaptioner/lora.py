"""LoRA placement: peft adapters on the T5 decoder's modules only, never on the CLIP tower; the image encoder's
modules that the model's config trains (`model.trainable_image_modules`) are trained and saved in full beside them."""

from __future__ import annotations

import contextlib
import re
import warnings
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # peft is imported where LoRA is placed: `import loracaptioner` (and the model card) go without it
    from peft import LoraConfig

# The original LoraCaptioner's target modules. T5 names them the same in encoder and decoder; DECODER_LAYER keeps
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
# The prefix of a module inside one of the decoder's layers: `decoder.block.0.layer.1.` + `EncDecAttention.q`.
DECODER_LAYER = re.compile(r"^decoder\.block\.\d+\.layer\.\d+\.")


def decoder_lora_config(model, r: int, alpha: int, dropout: float, targets=ORIGINAL_LORA_TARGETS) -> LoraConfig:
    """A peft `LoraConfig` placing adapters on the given T5 decoder modules (`targets`, named as in
    `ORIGINAL_LORA_TARGETS`); `modules_to_save` is what the model's config trains in full (the bridge, and the CLIP
    tower unless frozen). Unknown module names raise a `ValueError` listing the valid ones."""
    from peft import LoraConfig

    linear_names = {
        DECODER_LAYER.sub("", name)
        for name, module in model.named_modules()
        if DECODER_LAYER.match(name) and type(module).__name__ == "Linear"
    }
    unknown = [name for name in targets if name not in linear_names]
    if unknown:
        raise ValueError(f"unknown LoRA target module(s) {unknown}; valid decoder modules: {sorted(linear_names)}")
    pattern = rf"{DECODER_LAYER.pattern}(?:{'|'.join(re.escape(name) for name in targets)})$"
    return LoraConfig(r=r, lora_alpha=alpha, lora_dropout=dropout, target_modules=pattern, bias="none",
                      modules_to_save=model.trainable_image_modules)


@contextlib.contextmanager
def quiet_peft():
    """Around peft's `get_peft_model` / `PeftModel.from_pretrained`: peft reads `is_gradient_checkpointing`, which
    transformers 5.24 deprecates with a FutureWarning that is neither ours nor the user's to act on."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", "`is_gradient_checkpointing` is deprecated", FutureWarning)
        yield


def lora_targets(target_modules: str | list[str]) -> tuple[str, ...]:
    """The decoder modules named in a saved adapter's `target_modules` (the pattern `decoder_lora_config` writes, or
    a list of names), in their order."""
    if not isinstance(target_modules, str):
        return tuple(target_modules)
    alternatives = re.search(r"\(\?:(.*)\)\$$", target_modules)
    names = alternatives.group(1).split("|") if alternatives else [target_modules]
    return tuple(re.sub(r"\\(.)", r"\1", name) for name in names)
