"""Processor of LoraCaptioner: CLIP's image processor for pixels, T5's tokenizer for prompts, captions and decoding.

Besides torch and transformers it uses only numpy and PIL, which transformers' image processors run on themselves.
"""

import math

import numpy as np
import torch
from PIL import Image, ImageOps
from transformers import BatchFeature, ProcessorMixin

from .configuration_loracaptioner import DEFAULT_TEXT_MODEL, DEFAULT_VISION_MODEL

# Images longer than MAX_ASPECT times their short side are cut to their centre before CLIP's resize-and-centre-crop.
MAX_ASPECT = 20.0
_HIGH_DEPTH_MODES = {"I", "I;16", "I;16B", "I;16L", "I;16N", "F"}


def _white_level(mode: str, values: np.ndarray) -> float:
    """The value that means white: 65535 for 16-bit modes; else by the range in use (1 for floats in [0, 1], 255,
    65535 for 16-bit data in a 32-bit image, which is how PIL opens some 16-bit PNGs and TIFFs, else the maximum)."""
    if mode.startswith("I;16"):
        return 65535.0
    top = float(values.max(initial=0))
    if mode == "F" and top <= 1.0:
        return 1.0
    return next(level for level in (255.0, 65535.0, top) if top <= level)


def to_rgb_image(image, name: str = "image") -> Image.Image:
    """Any PIL image (every mode; EXIF-rotated upright; transparency over white; first frame of an animation) or a
    numpy array / tensor (HW or HWC with 1, 3 or 4 channels, CHW; uint8, or float in [0, 1]) -> an RGB PIL image.
    Anything else raises a `ValueError` naming `name` and the problem."""
    if isinstance(image, Image.Image):
        width, height = image.size
        if width == 0 or height == 0:
            raise ValueError(f"{name}: image has no pixels ({width}x{height})")
        if Image.MAX_IMAGE_PIXELS and width * height > Image.MAX_IMAGE_PIXELS:  # checked before decoding any pixel
            raise ValueError(
                f"{name}: {width}x{height} pixels is more than PIL's Image.MAX_IMAGE_PIXELS ({Image.MAX_IMAGE_PIXELS}),"
                " a possible decompression bomb; raise PIL.Image.MAX_IMAGE_PIXELS to accept it"
            )
        try:
            image.load()
            image = ImageOps.exif_transpose(image)
        except (OSError, SyntaxError, ValueError) as error:
            raise ValueError(f"{name}: cannot decode image ({error})") from error
        if image.mode in _HIGH_DEPTH_MODES:  # 16/32-bit grey: scale to 8 bits, not clip to white
            values = np.asarray(image, dtype=np.float64)
            if not np.isfinite(values).all():
                raise ValueError(f"{name}: image contains NaN or infinite values")
            image = Image.fromarray(np.clip(values / _white_level(image.mode, values) * 255, 0, 255).astype(np.uint8))
        if image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info):
            rgba = image.convert("RGBA")
            background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
            image = Image.alpha_composite(background, rgba)
        return image.convert("RGB")
    if isinstance(image, torch.Tensor):  # numpy has no bfloat16
        image = image.detach().cpu()
        image = (image.float() if image.is_floating_point() else image).numpy()
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
    return to_rgb_image(Image.fromarray(array), name)  # uint8 HW, HWC3, HWC4 -> L, RGB, RGBA


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

    model_input_names = ["pixel_values", "decoder_input_ids", "decoder_attention_mask"]

    def __init__(self, image_processor=None, tokenizer=None, max_target_length: int = 32, **kwargs):
        self.max_target_length = max_target_length
        super().__init__(image_processor, tokenizer, **kwargs)

    @classmethod
    def from_backbones(
        cls,
        vision_model_name_or_path: str = DEFAULT_VISION_MODEL,
        text_model_name_or_path: str = DEFAULT_TEXT_MODEL,
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
        Padding options (`padding`, `padding_side`, `pad_to_multiple_of`), which the image-text-to-text pipeline
        passes for batches, are accepted and have no effect: prompts are always left-padded to the longest.
        """
        for name in ("padding", "padding_side", "pad_to_multiple_of"):
            kwargs.pop(name, None)
        if images is None and text is None and text_target is None:
            raise ValueError("LoraCaptionerProcessor needs `images`, `text` or `text_target`.")
        data = {}
        if images is not None:
            batch = images if isinstance(images, (list, tuple)) else [images]
            rgb_images = [to_rgb_image(image, f"image {i}") for i, image in enumerate(batch)]
            rgb_images = [self._crop_extreme_aspect(image, kwargs) for image in rgb_images]
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

    def _crop_extreme_aspect(self, image: Image.Image, kwargs: dict) -> Image.Image:
        """CLIP resizes the short side to `shortest_edge`, then keeps a centre square: a 1x5000 strip would first
        grow to 224x1120000 (seconds and gigabytes). Beyond `MAX_ASPECT`:1, only the centre `MAX_ASPECT`:1 part, which
        holds that square with room to spare, goes in: the same pixel_values up to a sub-pixel shift of the centre,
        at a tiny fraction of the cost."""
        processor = self.image_processor
        shortest_edge = (getattr(processor, "size", None) or {}).get("shortest_edge")
        crop_size = getattr(processor, "crop_size", None) or {}
        if (
            kwargs.keys() & {"size", "crop_size", "do_resize", "do_center_crop"}
            or not (getattr(processor, "do_resize", False) and getattr(processor, "do_center_crop", False))
            or not shortest_edge
            or max(crop_size.get("height", 0), crop_size.get("width", 0)) > shortest_edge
        ):
            return image
        width, height = image.size
        short, long = min(width, height), max(width, height)
        keep = math.ceil(short * MAX_ASPECT)
        if long <= keep:
            return image
        start = (long - keep) // 2
        box = (start, 0, start + keep, height) if width > height else (0, start, width, start + keep)
        return image.crop(box)

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


__all__ = ["LoraCaptionerProcessor", "to_rgb_image"]
