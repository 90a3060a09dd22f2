"""A model ready to caption: device and dtype picked, the model loaded with this package's own classes (no
`trust_remote_code`), a peft adapter merged into it, and its processor (from the model, else from the adapter)."""

from __future__ import annotations

from pathlib import Path

import torch

from .captioning import UsageError

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def pick_device(name: str) -> torch.device:
    if name != "auto":
        try:
            device = torch.device(name)
        except RuntimeError as error:
            raise UsageError(f"unknown --device {name!r} ({error})") from None
        available = {"cuda": torch.cuda.is_available, "mps": torch.backends.mps.is_available}
        if not available.get(device.type, lambda: True)():
            raise UsageError(f"--device {name}: not available on this machine")
        return device
    if torch.cuda.is_available():
        return torch.device("cuda")
    if torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


def pick_dtype(name: str, device: torch.device) -> torch.dtype:
    if name != "auto":
        return DTYPES[name]
    # float16 overflows in T5's feed-forward layers, so a GPU without bfloat16 stays in float32.
    return torch.bfloat16 if device.type == "cuda" and torch.cuda.is_bf16_supported() else torch.float32


def load_model(model_id: str, revision: str | None, adapter: str | None, device: torch.device, dtype: torch.dtype):
    """Model (loaded and merged in float32, then `dtype` on `device`) and processor; a `UsageError` if either fails."""
    from transformers import PretrainedConfig

    from . import LoraCaptionerConfig, LoraCaptionerForConditionalGeneration, LoraCaptionerProcessor

    if not Path(model_id).exists() and (model_id.startswith((".", "/", "~")) or model_id.count("/") > 1):
        raise UsageError(f"model folder {model_id!r} does not exist")
    try:
        model_type = PretrainedConfig.get_config_dict(model_id, revision=revision)[0].get("model_type")
        if model_type != LoraCaptionerConfig.model_type:  # else: a warning and random weights
            raise ValueError(f"it is a {model_type!r} model, not a LoraCaptioner")
        model = LoraCaptionerForConditionalGeneration.from_pretrained(model_id, revision=revision)
    except Exception as error:  # a missing folder, an unknown Hub id, a folder of another model
        raise UsageError(f"cannot load model {model_id!r}: {first_line(error)}") from None
    if adapter is not None:
        from peft import PeftModel

        from .lora import quiet_peft

        try:
            with quiet_peft():
                model = PeftModel.from_pretrained(model, adapter).merge_and_unload()
        except Exception as error:  # not a folder, not a peft adapter, one for another model
            raise UsageError(f"cannot load adapter {adapter!r}: {first_line(error)}") from None
    processor, errors = None, []
    for source in filter(None, (model_id, adapter)):
        try:
            source_revision = revision if source == model_id else None
            processor = LoraCaptionerProcessor.from_pretrained(source, revision=source_revision)
            break
        except Exception as error:
            errors.append(f"{source!r}: {first_line(error)}")
    if processor is None:
        raise UsageError(f"cannot load the processor from {' or '.join(errors)}")
    return model.to(device=device, dtype=dtype).eval(), processor


def first_line(error: BaseException) -> str:
    text = str(error).strip().splitlines()
    return f"{type(error).__name__}: {text[0] if text else ''}"
