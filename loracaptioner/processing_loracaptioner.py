"""Processor of LoraCaptioner: CLIP's image processor for pixels, T5's tokenizer for prompts, captions and decoding.

Besides torch and transformers it uses only numpy and PIL, which transformers' image processors run on themselves.
"""

import numpy as np
import torch
from PIL import Image, ImageOps
from transformers import BatchFeature, ProcessorMixin

_HIGH_DEPTH_MODES = {"I", "I;16", "I;16B", "I;16L", "I;16N", "F"}


def to_rgb_image(image, name: str = "image") -> Image.Image:
    """Any PIL image (every mode; EXIF-rotated upright; transparency over white; first frame of an animation) or a
    numpy array / tensor (HW or HWC with 1, 3 or 4 channels, CHW; uint8, or float in [0, 1]) -> an RGB PIL image.
    Anything else raises a `ValueError` naming `name` and the problem."""
    if isinstance(image, Image.Image):
        try:
            image.load()
            image = ImageOps.exif_transpose(image)
        except (OSError, SyntaxError, ValueError) as error:
            raise ValueError(f"{name}: cannot decode image ({error})") from error
        if image.mode in _HIGH_DEPTH_MODES:  # 16/32-bit grey: scale to 8 bits instead of clipping to white
            values = np.asarray(image, dtype=np.float64)
            if not np.isfinite(values).all():
                raise ValueError(f"{name}: image contains NaN or infinite values")
            peak = 1.0 if image.mode == "F" and values.max(initial=0) <= 1.0 else max(values.max(initial=0), 255.0)
            image = Image.fromarray(np.clip(values / peak * 255.0, 0, 255).astype(np.uint8), mode="L")
        if image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info):
            rgba = image.convert("RGBA")
            background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
            image = Image.alpha_composite(background, rgba)
        return image.convert("RGB")
    if isinstance(image, torch.Tensor):
        image = image.detach().cpu().numpy()
    if not isinstance(image, np.ndarray):
        raise ValueError(f"{name}: expected a PIL image, numpy array or tensor, got {type(image).__name__}")
    array = image
    if array.ndim == 3 and array.shape[0] in (1, 3, 4) and array.shape[-1] not in (1, 3, 4):
        array = array.transpose(1, 2, 0)  # CHW -> HWC
    if array.ndim == 3 and array.shape[-1] == 1:
        array = array[..., 0]
    if array.ndim not in (2, 3) or (array.ndim == 3 and array.shape[-1] not in (3, 4)) or 0 in array.shape:
        raise ValueError(f"{name}: array of shape {tuple(image.shape)} is not an image (HW, HWC or CHW)")
    if array.dtype.kind == "f":
        if not np.isfinite(array).all():
            raise ValueError(f"{name}: image contains NaN or infinite values")
        array = array * 255.0 if array.max(initial=0) <= 1.0 else array
    elif array.dtype.kind not in "biu":
        raise ValueError(f"{name}: unsupported array dtype {array.dtype}")
    array = np.clip(array, 0, 255).astype(np.uint8)
    return to_rgb_image(Image.fromarray(array, mode={2: "L", 3: "RGB", 4: "RGBA"}[array.shape[-1] if array.ndim == 3 else 2]), name)


class LoraCaptionerProcessor(ProcessorMixin):
    """
    Turns images into `pixel_values` (CLIP preprocessing; any PIL mode or numpy array, converted to RGB), an optional
    text prompt into the decoder prefix (`decoder_input_ids`, left-padded, with `decoder_attention_mask`) that the
    caption continues, and target captions (`text_target=`) into `labels` (EOS-terminated, truncated to
    `max_target_length`, padding = -100) for training.

    ```python
    inputs = processor(images=[image], text="a photo of", return_tensors="pt")
    captions = processor.batch_decode(model.generate(**inputs), skip_special_tokens=True)
    ```
    """

    def __init__(self, image_processor=None, tokenizer=None, max_target_length: int = 32, **kwargs):
        self.max_target_length = max_target_length
        super().__init__(image_processor, tokenizer, **kwargs)

    @classmethod
    def from_backbones(
        cls,
        vision_model_name_or_path: str = "openai/clip-vit-base-patch16",
        text_model_name_or_path: str = "google/flan-t5-base",
        **kwargs,
    ) -> "LoraCaptionerProcessor":
        """The CLIP image processor and the T5 tokenizer of two backbone checkpoints (Hub ids or local folders)."""
        from transformers import AutoImageProcessor, AutoTokenizer

        image_processor = AutoImageProcessor.from_pretrained(vision_model_name_or_path)
        tokenizer = AutoTokenizer.from_pretrained(text_model_name_or_path)
        return cls(image_processor=image_processor, tokenizer=tokenizer, **kwargs)

    @property
    def decoder_start_token_id(self) -> int:
        # T5 starts decoding from its pad token.
        return self.tokenizer.pad_token_id

    def __call__(
        self,
        images=None,
        text: str | list[str] | None = None,
        text_target: str | list[str] | None = None,
        return_tensors: str | None = "pt",
        max_target_length: int | None = None,
        **kwargs,
    ) -> BatchFeature:
        """
        images: one image or a list (PIL images, numpy arrays or tensors) -> `pixel_values`.
        text: decoder prompt(s) the caption continues (`""` = caption from scratch) -> `decoder_input_ids` and
            `decoder_attention_mask`; one prompt is repeated for every image.
        text_target: target caption(s) -> `labels`.
        """
        if images is None and text is None and text_target is None:
            raise ValueError("LoraCaptionerProcessor needs `images`, `text` or `text_target`.")
        data = {}
        if images is not None:
            batch = images if isinstance(images, (list, tuple)) else [images]
            rgb_images = [to_rgb_image(image, f"image {i}") for i, image in enumerate(batch)]
            data.update(self.image_processor(rgb_images, return_tensors="pt", **kwargs))
            num_images = data["pixel_values"].shape[0]
        if text is not None:
            prompts = [text] if isinstance(text, str) else list(text)
            if images is not None and len(prompts) == 1 and num_images > 1:
                prompts = prompts * num_images
            data.update(self._encode_prompts(prompts))
        if text_target is not None:
            captions = [text_target] if isinstance(text_target, str) else list(text_target)
            data["labels"] = self.make_labels(captions, max_target_length)
        return BatchFeature(data=data, tensor_type=return_tensors)

    def _encode_prompts(self, prompts: list[str]) -> dict[str, torch.Tensor]:
        """Decoder prefixes: start token + prompt tokens (no EOS: the caption goes on), left-padded."""
        token_ids = self.tokenizer(prompts, add_special_tokens=False)["input_ids"]
        rows = [[self.decoder_start_token_id, *ids] for ids in token_ids]
        width = max(len(row) for row in rows)
        decoder_input_ids = torch.full((len(rows), width), self.tokenizer.pad_token_id, dtype=torch.long)
        decoder_attention_mask = torch.zeros((len(rows), width), dtype=torch.long)
        for i, row in enumerate(rows):
            decoder_input_ids[i, width - len(row) :] = torch.tensor(row)
            decoder_attention_mask[i, width - len(row) :] = 1
        return {"decoder_input_ids": decoder_input_ids, "decoder_attention_mask": decoder_attention_mask}

    def make_labels(self, captions: list[str], max_target_length: int | None = None) -> torch.Tensor:
        """Caption ids ending in EOS, truncated to `max_target_length` tokens, padded with -100 (ignored by the loss)."""
        for i, caption in enumerate(captions):
            if not isinstance(caption, str) or not caption.strip():
                raise ValueError(f"caption {i} is empty or not a string: {caption!r}")
        encoded = self.tokenizer(
            captions,
            max_length=max_target_length or self.max_target_length,
            truncation=True,
            padding="longest",
            return_tensors="pt",
        )
        return encoded["input_ids"].masked_fill(encoded["attention_mask"] == 0, -100)

    @property
    def model_input_names(self) -> list[str]:
        return ["pixel_values", "decoder_input_ids", "decoder_attention_mask"]


__all__ = ["LoraCaptionerProcessor", "to_rgb_image"]
