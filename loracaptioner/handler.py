"""Inference Endpoints handler of a LoraCaptioner folder: `save_for_hub` and `push_to_hub` copy this file into every
Hub-ready folder as `handler.py`, next to a `requirements.txt`, and Hugging Face Inference Endpoints runs it.

The toolkit imports this file from the model folder, builds `EndpointHandler(path)` once and calls it on each
request body:

    {"inputs": IMAGE or [IMAGE, ...], "parameters": {"num_beams": 4, "max_new_tokens": 20, "prompt": "a photo of"}}

IMAGE is raw bytes, a base64 string (a `data:image/...;base64,` URL too) or an http(s) URL; a request sent with an
`image/*` content type reaches the handler as a PIL image, which is accepted as well. `parameters` are `generate()`
options (unknown ones are refused, not ignored) plus `prompt`, the start of the caption, and `seed`, for sampling.
The answer has the shape of transformers' image-to-text pipeline: `[{"generated_text": caption}]` for one image
(one entry per `num_return_sequences`), a list of those for a list of images. A malformed request raises
`ValueError` with the reason, which the toolkit returns as a 400 error.

It imports only torch, transformers, pillow and the standard library, and loads the model and the processor from
the folder's own code files (`trust_remote_code=True`): nothing of the LoraCaptioner package is needed.
"""

from __future__ import annotations

import base64
import binascii
import io
import urllib.request

import torch
from PIL import Image
from transformers import AutoModelForImageTextToText, AutoProcessor

# generate() options a request may set, with their types
GENERATION_PARAMETERS = {
    "max_new_tokens": int, "min_new_tokens": int, "num_beams": int, "num_return_sequences": int, "do_sample": bool,
    "temperature": float, "top_k": int, "top_p": float, "repetition_penalty": float, "length_penalty": float,
    "no_repeat_ngram_size": int, "early_stopping": bool,
}
MAX_IMAGES = 64
MAX_IMAGE_BYTES = 20_000_000
URL_TIMEOUT_SECONDS = 15


class EndpointHandler:
    """Captions the images of a request with the LoraCaptioner model in `path` (see the module docstring)."""

    def __init__(self, path: str = ""):
        folder = path or "."
        self.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        # float16 overflows in T5's feed-forward layers: bfloat16 where the GPU has it, else float32
        dtype = torch.bfloat16 if self.device.type == "cuda" and torch.cuda.is_bf16_supported() else torch.float32
        self.model = AutoModelForImageTextToText.from_pretrained(folder, trust_remote_code=True, dtype=dtype)
        self.model.to(self.device).eval()
        self.processor = AutoProcessor.from_pretrained(folder, trust_remote_code=True)

    def __call__(self, data: dict) -> list:
        if not isinstance(data, dict) or "inputs" not in data:
            raise ValueError('the request needs "inputs": an image (bytes, base64 string or http(s) URL) or a list '
                             f"of them; got {_describe(data)}")
        inputs = data["inputs"]
        several = isinstance(inputs, list)
        items = inputs if several else [inputs]
        if not items or len(items) > MAX_IMAGES:
            raise ValueError(f'"inputs" holds {len(items)} images; send 1 to {MAX_IMAGES}')
        images = [_read_image(item, f"inputs[{i}]" if several else "inputs") for i, item in enumerate(items)]
        options, prompt, seed = _parameters(data.get("parameters"))

        batch = self.processor(images=images, text=prompt, return_tensors="pt").to(self.device)
        batch["pixel_values"] = batch["pixel_values"].to(self.model.dtype)
        if seed is not None:
            torch.manual_seed(seed)
        with torch.inference_mode():
            caption_ids = self.model.generate(**batch, **options)
        captions = [text.strip() for text in self.processor.batch_decode(caption_ids, skip_special_tokens=True)]
        per_image = options.get("num_return_sequences", 1)
        answers = [[{"generated_text": caption} for caption in captions[i * per_image : (i + 1) * per_image]]
                   for i in range(len(images))]
        return answers if several else answers[0]


def _parameters(parameters) -> tuple[dict, str | None, int | None]:
    """(generate() options, prompt, seed) from the request's `parameters`; a `ValueError` for anything else."""
    if parameters is None:
        return {}, None, None
    if not isinstance(parameters, dict):
        raise ValueError(f'"parameters" must be an object of generation options, got {_describe(parameters)}')
    options, prompt, seed = {}, None, None
    for name, value in parameters.items():
        if name == "prompt":
            if not isinstance(value, str):
                raise ValueError(f'parameter "prompt" must be a string, got {_describe(value)}')
            prompt = value
        elif name == "seed":
            if not isinstance(value, int) or isinstance(value, bool):
                raise ValueError(f'parameter "seed" must be an integer, got {_describe(value)}')
            seed = value
        elif name in GENERATION_PARAMETERS:
            kind = GENERATION_PARAMETERS[name]
            accepted = (int, float) if kind is float else (kind,)
            if not isinstance(value, accepted) or (kind is not bool and isinstance(value, bool)):
                raise ValueError(f'parameter "{name}" must be {kind.__name__}, got {_describe(value)}')
            options[name] = kind(value)
        else:
            known = ", ".join(sorted([*GENERATION_PARAMETERS, "prompt", "seed"]))
            raise ValueError(f'unknown parameter "{name}"; accepted: {known}')
    return options, prompt, seed


def _read_image(item, where: str) -> Image.Image:
    """A PIL image from raw bytes, a base64 string, a data: URL, an http(s) URL, or a PIL image as it is."""
    if isinstance(item, Image.Image):
        return item
    if isinstance(item, str):
        text = item.strip()
        if text.startswith(("http://", "https://")):
            return _open(_download(text, where), where)
        if text.startswith("data:"):
            text = text.partition(",")[2]
        try:
            item = base64.b64decode(text, validate=True)
        except (binascii.Error, ValueError):
            raise ValueError(f"{where}: a string must be an http(s) URL or a base64-encoded image, and this is "
                             f"neither: {item[:40]!r}") from None
    if isinstance(item, (bytes, bytearray)):
        return _open(bytes(item), where)
    raise ValueError(f"{where}: expected image bytes, a base64 string or an http(s) URL, got {_describe(item)}")


def _open(data: bytes, where: str) -> Image.Image:
    if len(data) > MAX_IMAGE_BYTES:
        raise ValueError(f"{where}: {len(data)} bytes is more than the {MAX_IMAGE_BYTES} accepted")
    try:
        image = Image.open(io.BytesIO(data))
        image.load()
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as error:
        raise ValueError(f"{where}: not an image that Pillow can read ({type(error).__name__})") from None
    return image


def _download(url: str, where: str) -> bytes:
    request = urllib.request.Request(url, headers={"User-Agent": "loracaptioner-endpoint"})
    try:
        with urllib.request.urlopen(request, timeout=URL_TIMEOUT_SECONDS) as response:
            data = response.read(MAX_IMAGE_BYTES + 1)
    except OSError as error:  # HTTP errors, timeouts, refused connections
        raise ValueError(f"{where}: cannot download {url} ({type(error).__name__}: {error})") from None
    return data


def _describe(value) -> str:
    text = repr(value)
    return f"{type(value).__name__} {text[:60]}{'...' if len(text) > 60 else ''}"
