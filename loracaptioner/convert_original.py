"""Import the original LoraCaptioner's training output as a LoraCaptioner folder.

The original saved two things: `projection.pt` (the state dict of its bridge, `Linear(512 -> 768)`) and a peft LoRA
adapter for `google/flan-t5-base`, trained while the bridged CLIP patch tokens went into
`T5ForConditionalGeneration(encoder_outputs=...)`. LoraCaptioner's decoder has the very module paths of T5's decoder
(`decoder.block.0.layer.0.SelfAttention.q`), so the decoder's LoRA weights carry over as they are. The original's
target names (`SelfAttention.q`, `DenseReluDense.wo`, ...) matched the T5 *encoder* too; the encoder was bypassed, so
those adapters never took part in a caption and are dropped (and counted).

    loracaptioner convert-original --projection projection.pt --adapter adapter_dir --output out [--no-merge]

(or `python -m loracaptioner.convert_original` with the same options)

writes the re-keyed adapter (LoRA + bridge, for peft) to `out/adapter` and `out` as a merged, Hub-ready LoraCaptioner
(weights, code files, processor, generation config, model card, Inference Endpoints handler), or with `--no-merge`
the base model (bridge included) and processor in `out`.
Both files are read without running pickled code: safetensors, or `torch.load(weights_only=True)`.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import sys
from pathlib import Path

import torch
from peft import LoraConfig, PeftType, get_peft_model, get_peft_model_state_dict, set_peft_model_state_dict
from safetensors.torch import load_file
from transformers import CLIPVisionConfig, T5Config

from .remote_code.configuration_loracaptioner import DEFAULT_TEXT_MODEL, DEFAULT_VISION_MODEL
from .hub import save_for_hub
from .lora import DECODER_LAYER, decoder_lora_config, quiet_peft
from .model_card import ADAPTER_DIR
from .remote_code.modeling_loracaptioner import LoraCaptionerForConditionalGeneration
from .remote_code.processing_loracaptioner import LoraCaptionerProcessor

logger = logging.getLogger("loracaptioner.convert_original")

PEFT_PREFIX = "base_model.model."
# LoraConfig fields that shape the adapter's computation and mean the same on our decoder as on T5's.
_CARRIED_LORA_FIELDS = ("r", "lora_alpha", "lora_dropout", "use_rslora", "use_dora", "rank_pattern", "alpha_pattern")


def load_weights_only(path: Path, what: str) -> dict[str, torch.Tensor]:
    """A `.safetensors` file, or a torch pickle read with `weights_only=True` (tensors only; no code runs)."""
    if not path.is_file():
        raise ValueError(f"{what}: no such file {path}")
    try:
        if path.suffix == ".safetensors":
            state = load_file(path)
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # any unreadable or unsafe file is a problem of the input
        reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise ValueError(f"{what}: {path} is not a weights-only tensor file ({reason})") from error
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ValueError(f"{what}: {path} must hold a state dict of tensors, got {type(state).__name__}")
    return state


def load_bridge(path: Path, image_token_dim: int, d_model: int) -> dict[str, torch.Tensor]:
    """The original's `projection.pt` as our bridge's state dict, shapes checked against the two backbones."""
    state = load_weights_only(path, "--projection")
    # torch.save(linear.state_dict()) gives {weight, bias}; a parent module's or DDP's state dict adds a prefix.
    weights = [k for k in state if k == "weight" or k.endswith(".weight")]
    biases = [k for k in state if k == "bias" or k.endswith(".bias")]
    if len(weights) != 1 or len(biases) != 1 or len(state) != 2:
        raise ValueError(f"--projection: expected the state dict of one nn.Linear (weight and bias), got keys {sorted(state)}")
    weight, bias = state[weights[0]], state[biases[0]]
    if weight.ndim != 2 or bias.shape != weight.shape[:1]:
        raise ValueError(f"--projection: weight {tuple(weight.shape)} and bias {tuple(bias.shape)} are not a Linear layer's")
    out_features, in_features = weight.shape
    if in_features != image_token_dim:
        raise ValueError(f"--projection: the bridge takes {in_features} features, but the vision model's patch tokens "
                         f"have {image_token_dim} (CLIP projection_dim); wrong --vision_model?")
    if out_features != d_model:
        raise ValueError(f"--projection: the bridge writes {out_features} features, but the text model's d_model is "
                         f"{d_model}; wrong --text_model?")
    return {"weight": weight, "bias": bias}


def _lora_config(path: Path) -> LoraConfig:
    """The adapter's LoraConfig. peft 0.2 (the original's) also wrote `merge_weights` (merge into the base weights in
    eval mode: the saved weights are the same either way) and `enable_lora` (LoRA on parts of a fused qkv layer, which
    T5 has none of). They left peft since; passed on, peft would warn that the file comes from a newer peft."""
    try:
        fields = json.loads(path.read_text())
    except (OSError, ValueError) as error:
        raise ValueError(f"--adapter: {path} is not readable JSON ({error})") from error
    if not isinstance(fields, dict):
        raise ValueError(f"--adapter: {path} must hold a JSON object, got {type(fields).__name__}")
    fields.pop("merge_weights", None)
    if fields.pop("enable_lora", None) is not None:
        raise ValueError(f"--adapter: {path} sets enable_lora (LoRA on a fused qkv layer); T5's decoder has none")
    return LoraConfig.from_peft_type(**fields)


def load_original_adapter(adapter_dir: Path) -> tuple[LoraConfig, dict[str, torch.Tensor], int]:
    """The original's LoraConfig, its decoder LoRA weights keyed as on our model, and how many encoder tensors were dropped."""
    if not (adapter_dir / "adapter_config.json").is_file():
        raise ValueError(f"--adapter: {adapter_dir} has no adapter_config.json (expected a peft adapter folder)")
    config = _lora_config(adapter_dir / "adapter_config.json")
    if config.peft_type != PeftType.LORA:
        raise ValueError(f"--adapter: expected a LoRA adapter, got peft_type {config.peft_type}")
    if config.bias != "none":
        raise ValueError(f"--adapter: bias={config.bias!r} adapters train T5's own biases; only bias='none' is supported")
    safetensors_file = adapter_dir / "adapter_model.safetensors"
    weights_file = safetensors_file if safetensors_file.is_file() else adapter_dir / "adapter_model.bin"
    state = load_weights_only(weights_file, "--adapter")

    decoder_state, dropped, foreign = {}, 0, []
    for key, tensor in state.items():
        name = key.removeprefix(PEFT_PREFIX)
        if name.startswith("decoder."):
            decoder_state[name] = tensor
        elif name.startswith("encoder."):
            dropped += 1  # T5 text-encoder adapters: the encoder was bypassed, they never shaped a caption
        else:
            foreign.append(key)
    if foreign:
        raise ValueError(f"--adapter: weights outside the T5 encoder/decoder cannot be imported: {foreign[:5]}")
    if not decoder_state:
        raise ValueError(f"--adapter: {weights_file} holds no LoRA weights on T5 decoder modules")
    return config, decoder_state, dropped


def convert_original(
    projection: str | Path,
    adapter: str | Path,
    output_dir: str | Path,
    vision_model: str = DEFAULT_VISION_MODEL,
    text_model: str = DEFAULT_TEXT_MODEL,
    merge: bool = True,
) -> Path:
    """Convert the original's `projection.pt` + peft adapter into a LoraCaptioner folder at `output_dir` (merged, or
    with `merge=False` the base model there and the adapter in `output_dir/adapter`); returns `output_dir`."""
    output_dir = Path(output_dir)
    # Every input is checked before any backbone weights are loaded (for ViT-B/16 + Flan-T5-base, about 1 GB).
    original_config, decoder_state, dropped = load_original_adapter(Path(adapter))
    bridge = load_bridge(Path(projection), CLIPVisionConfig.from_pretrained(vision_model).projection_dim,
                         T5Config.from_pretrained(text_model).d_model)
    model = LoraCaptionerForConditionalGeneration.from_backbones(vision_model, text_model)
    model.encoder.bridge.load_state_dict(bridge)
    if dropped:
        logger.info(f"dropped {dropped} LoRA tensors of T5 text-encoder modules (the encoder is bypassed)")

    module_names = {key.split(".lora_")[0] for key in decoder_state}
    targets = sorted({DECODER_LAYER.sub("", name) for name in module_names})
    lora_config = decoder_lora_config(model, original_config.r, original_config.lora_alpha,
                                      original_config.lora_dropout, targets)
    lora_config = dataclasses.replace(
        lora_config, **{name: getattr(original_config, name) for name in _CARRIED_LORA_FIELDS})
    with quiet_peft():
        peft_model = get_peft_model(model.eval(), lora_config).eval()

    # The adapter holds the bridge too (as train_hf.py's does), so it adapts a fresh from_backbones() model as well.
    peft_state = {PEFT_PREFIX + key: tensor for key, tensor in decoder_state.items()}
    peft_state.update({f"{PEFT_PREFIX}encoder.bridge.{name}": tensor for name, tensor in bridge.items()})
    expected = set(get_peft_model_state_dict(peft_model))
    missing, unexpected = sorted(expected - set(peft_state)), sorted(set(peft_state) - expected)
    if missing or unexpected:
        raise ValueError(f"--adapter: does not match the decoder of {text_model}: missing {missing[:3]} "
                         f"({len(missing)}), unexpected {unexpected[:3]} ({len(unexpected)})")
    try:
        set_peft_model_state_dict(peft_model, peft_state)
    except RuntimeError as error:  # size mismatches
        raise ValueError(f"--adapter: does not fit the decoder of {text_model}: {str(error).strip()}") from error
    logger.info(f"imported {len(decoder_state)} decoder LoRA tensors on {len(module_names)} modules ({', '.join(targets)})")

    # Nothing is written before every input has been checked. The adapter (LoRA + bridge, for peft) is kept in
    # `adapter/` either way; merged, the folder is Hub-ready, its card written from the folder (config and adapter).
    peft_model.save_pretrained(output_dir / ADAPTER_DIR)
    processor = LoraCaptionerProcessor.from_backbones(vision_model, text_model)
    if merge:
        save_for_hub(peft_model.merge_and_unload(), processor, output_dir)
    else:
        peft_model.unload().save_pretrained(output_dir)
        processor.save_pretrained(output_dir)
    logger.info(f"wrote {'merged LoraCaptioner' if merge else 'base LoraCaptioner and adapter/'} to {output_dir}")
    return output_dir


class _OneLineErrorParser(argparse.ArgumentParser):
    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message}\n")


def main(argv: list[str] | None = None) -> None:
    """`python -m loracaptioner.convert_original ...`: the same options as `loracaptioner convert-original ...`."""
    from .cli import add_convert_arguments

    parser = _OneLineErrorParser(prog="python -m loracaptioner.convert_original", description=__doc__.split("\n\n")[0])
    add_convert_arguments(parser)
    args = parser.parse_args(argv)
    try:
        run(args)
    except (ValueError, OSError) as error:
        parser.error(str(error).replace("\n", " "))


def run(args: argparse.Namespace) -> int:
    """Convert as the command line `args` say; a `ValueError` or `OSError` says which input does not fit."""
    logging.basicConfig(format="%(name)s: %(message)s", level=logging.INFO)
    convert_original(args.projection, args.adapter, args.output, args.vision_model, args.text_model, args.merge)
    return 0


if __name__ == "__main__":
    sys.exit(main())
