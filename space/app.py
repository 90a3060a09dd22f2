"""LoraCaptioner demo: caption an image in the browser. The Hub page of a LoraCaptioner model, as a Gradio Space.

The Hub's serverless inference widget does not run custom-code models, so this Space runs the model itself, loaded
exactly as a user loads it (`AutoModelForImageTextToText` + `AutoProcessor`, `trust_remote_code=True`).

Which model: `--model`, else the `LORACAPTIONER_MODEL` environment variable (a Hub id or a folder; on a Space, set it
as a variable in the Space settings), else `outputs/demo/model`, the folder `make demo` leaves. Pin the code that runs
with `--revision` / `LORACAPTIONER_REVISION` (a commit sha of the model repo).

    python space/app.py                                # the `make demo` model, http://127.0.0.1:7860
    python space/app.py --model your-name/loracaptioner-cc3m --revision <sha> --port 8080
"""

from __future__ import annotations

import argparse
import io
import os
import tempfile
from pathlib import Path

import gradio as gr
import httpx
import torch
from PIL import Image, ImageDraw
from transformers import AutoModelForImageTextToText, AutoProcessor

DEMO_MODEL = Path(__file__).resolve().parent.parent / "outputs" / "demo" / "model"
DECODING = ("greedy", "beam search", "sampling")
MAX_DOWNLOAD_BYTES = 20 * 1024 * 1024
EXAMPLES = (  # (shape, fill colour, size, where): drawn like the `make demo` data, 64x64 on light grey
    ("circle", (220, 40, 40), "large", "center"),
    ("square", (40, 80, 220), "small", "left"),
    ("triangle", (240, 215, 30), "large", "right"),
)


def default_model() -> str | None:
    return os.environ.get("LORACAPTIONER_MODEL") or (str(DEMO_MODEL) if DEMO_MODEL.is_dir() else None)


def draw_example(shape: str, colour: tuple[int, int, int], size: str, where: str) -> Image.Image:
    """One coloured shape on a light grey 64x64 image, the kind of picture the `make demo` model was trained on."""
    image = Image.new("RGB", (64, 64), (210, 210, 210))
    radius = 20 if size == "large" else 9
    centre_x, centre_y = {"center": (32, 32), "left": (16, 32), "right": (48, 32)}[where]
    box = (centre_x - radius, centre_y - radius, centre_x + radius, centre_y + radius)
    draw = ImageDraw.Draw(image)
    if shape == "circle":
        draw.ellipse(box, fill=colour)
    elif shape == "square":
        draw.rectangle(box, fill=colour)
    else:
        draw.polygon([(centre_x, box[1]), (box[0], box[3]), (box[2], box[3])], fill=colour)
    return image


def write_examples(folder: Path) -> list[str]:
    paths = []
    for shape, colour, size, where in EXAMPLES:
        path = folder / f"{size}-{shape}-{where}.png"
        draw_example(shape, colour, size, where).save(path)
        paths.append(str(path))
    return paths


def read_image(upload: dict | None, image_url: str | None) -> Image.Image:
    """The uploaded file (Gradio's file data, `{"path": ..., "orig_name": ...}`), else the image at the URL; a
    `gr.Error` saying what is wrong otherwise."""
    if upload:
        source, file = upload.get("orig_name") or "The uploaded file", upload["path"]
    elif image_url and image_url.strip():
        source, file = repr(image_url.strip()), io.BytesIO(download(image_url.strip()))
    else:
        raise gr.Error("Upload an image or give an image URL first.")
    try:
        return Image.open(file)
    except Image.DecompressionBombError as error:
        raise gr.Error(f"{source} is too large: {error}") from error
    except OSError as error:  # PIL's UnidentifiedImageError
        raise gr.Error(f"{source} is not an image this app can read (PNG, JPEG, WebP, GIF, ...).") from error


def download(url: str) -> bytes:
    """The body at `url`, at most MAX_DOWNLOAD_BYTES of it."""
    try:
        with httpx.stream("GET", url, timeout=15, follow_redirects=True) as response:
            response.raise_for_status()
            body = bytearray()
            for chunk in response.iter_bytes():
                body += chunk
                if len(body) > MAX_DOWNLOAD_BYTES:
                    raise gr.Error(f"The image at {url!r} is larger than {MAX_DOWNLOAD_BYTES // 2**20} MB.")
            return bytes(body)
    except httpx.HTTPError as error:
        raise gr.Error(f"Could not download the image from {url!r}: {error}") from error


def build_app(model_name_or_path: str, revision: str | None = None) -> gr.Blocks:
    model = AutoModelForImageTextToText.from_pretrained(
        model_name_or_path, trust_remote_code=True, revision=revision
    ).eval()
    processor = AutoProcessor.from_pretrained(model_name_or_path, trust_remote_code=True, revision=revision)
    default_max_new_tokens = model.generation_config.max_new_tokens or 32

    def caption(
        image: dict | None,
        image_url: str | None = None,
        decoding: str = "greedy",
        num_beams: int = 4,
        temperature: float = 1.0,
        max_new_tokens: int = default_max_new_tokens,
        prompt: str | None = None,
        seed: int = 0,
    ) -> str:
        """Caption one image (`image`: the upload's file data, `{"path": ...}`; else `image_url`) with the chosen
        decoding; the prompt starts the caption."""
        if decoding not in DECODING:
            raise gr.Error(f"decoding must be one of {', '.join(DECODING)}, got {decoding!r}.")
        pil_image = read_image(image, image_url)
        try:
            inputs = processor(images=pil_image, text=prompt or None, return_tensors="pt")
        except ValueError as error:  # the processor names the problem (undecodable, not an image, ...)
            raise gr.Error(str(error)) from error
        options = {"max_new_tokens": int(max_new_tokens)}
        if decoding == "beam search":
            options["num_beams"] = int(num_beams)
        elif decoding == "sampling":
            options.update(do_sample=True, temperature=float(temperature))
            torch.manual_seed(int(seed or 0))
        with torch.inference_mode():
            caption_ids = model.generate(**inputs, **options)
        return processor.batch_decode(caption_ids, skip_special_tokens=True)[0].strip()

    examples_dir = Path(tempfile.mkdtemp(prefix="loracaptioner-examples-"))
    with gr.Blocks(title="LoraCaptioner") as app:
        gr.Markdown(
            "# LoraCaptioner\n"
            "A frozen CLIP ViT-B/16 sees the image, a LoRA-adapted Flan-T5 decoder writes the caption. "
            f"Model: `{model_name_or_path}`" + (f" at revision `{revision}`" if revision else "") + "."
        )
        with gr.Row():
            with gr.Column():
                image = gr.Image(label="Image", sources=["upload", "clipboard"], height=320)
                image_url = gr.Textbox(
                    label="...or an image URL (used when no image is uploaded)", placeholder="https://..."
                )
                button = gr.Button("Caption", variant="primary", elem_id="caption-button")
                output = gr.Textbox(label="Caption", elem_id="caption", interactive=False)
            with gr.Column():
                decoding = gr.Radio(list(DECODING), value="greedy", label="Decoding")
                num_beams = gr.Slider(2, 8, value=4, step=1, label="Beams (beam search)")
                temperature = gr.Slider(0.1, 2.0, value=1.0, step=0.05, label="Temperature (sampling)")
                seed = gr.Number(value=0, precision=0, label="Seed (sampling)")
                max_new_tokens = gr.Slider(1, 64, value=default_max_new_tokens, step=1, label="Max new tokens")
                prompt = gr.Textbox(label="Prompt (optional): the caption starts with it", placeholder="a photo of")
        inputs = [image, image_url, decoding, num_beams, temperature, max_new_tokens, prompt, seed]
        # preprocess=False: caption() gets the uploaded file itself (Gradio has checked that it is an upload), so the
        # model sees the original bytes, not a re-encoded copy, and a file that is not an image gets this app's message
        button.click(caption, inputs=inputs, outputs=output, api_name="caption", preprocess=False)
        gr.Examples([[path] for path in write_examples(examples_dir)], inputs=[image])
    return app


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=default_model(), help="Hub id or folder (env LORACAPTIONER_MODEL)")
    parser.add_argument("--revision", default=os.environ.get("LORACAPTIONER_REVISION"), help="commit to pin")
    parser.add_argument("--host", default=os.environ.get("GRADIO_SERVER_NAME", "127.0.0.1"))
    parser.add_argument("--port", type=int, default=int(os.environ.get("GRADIO_SERVER_PORT", "7860")))
    args = parser.parse_args(argv)
    if not args.model:
        parser.error("no model: pass --model, set LORACAPTIONER_MODEL, or run `make demo` to make outputs/demo/model")
    build_app(args.model, args.revision).launch(server_name=args.host, server_port=args.port, show_error=True)


if __name__ == "__main__":
    main()
