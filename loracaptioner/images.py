"""Reading images: a file, a URL, bytes or a dataset cell -> an RGB PIL image, or a `ValueError` naming the image and
the problem. A `ValueError` from here is one input's fault (its error record); the captioning loops
(`captioning.py`, `bulk.py`) treat every other failure as the run's. The pixel rules themselves (modes, EXIF,
transparency, decompression bombs) are the processor's `to_rgb_image`."""

from __future__ import annotations

import http.client
import io
import time
import urllib.request
from pathlib import Path

from PIL import Image, UnidentifiedImageError

from .remote_code.processing_loracaptioner import to_rgb_image

IMAGE_EXTENSIONS = {
    ".jpg", ".jpeg", ".jfif", ".png", ".webp", ".gif", ".bmp", ".tif", ".tiff", ".ppm", ".pgm", ".pbm", ".pnm", ".tga",
    ".ico",
}


def is_url(spec: str) -> bool:
    return spec.startswith(("http://", "https://"))


def load_image(value, name: str | None = None) -> Image.Image:
    """A dataset image cell (undecoded `{"bytes", "path"}`, raw bytes, a path or a PIL image) -> RGB PIL image.
    Raises `ValueError` naming the image (its path, else `name`) and the problem."""
    if isinstance(value, dict):
        name = value.get("path") or name
        value = value["bytes"] if value.get("bytes") is not None else value.get("path")
    if isinstance(value, (str, Path)):
        name = name or str(value)
    name = name or "image"
    try:
        if isinstance(value, (bytes, bytearray)):
            if not value:
                raise ValueError("empty file")
            try:
                value = Image.open(io.BytesIO(value))
            except UnidentifiedImageError:  # PIL's message names the BytesIO by its address: new in every run
                raise UnidentifiedImageError("cannot identify image file") from None
        elif isinstance(value, (str, Path)):
            if not Path(value).is_file():
                raise ValueError("no such file")
            if Path(value).stat().st_size == 0:
                raise ValueError("empty file")
            value = Image.open(value)
        if value is None:
            raise ValueError("no image data")
        return to_rgb_image(value, str(name))
    except ValueError as error:
        raise ValueError(str(error) if str(error).startswith(str(name)) else f"{name}: {error}") from None
    except (OSError, SyntaxError, Image.DecompressionBombError) as error:
        raise ValueError(f"{name}: cannot decode image ({type(error).__name__}: {error})") from None


def download(url: str, timeout: float, max_bytes: int) -> bytes:
    """The body of `url`, read within `timeout` seconds in all and no longer than `max_bytes`. (transformers'
    `image_utils.load_image` fetches URLs too, but with a per-request timeout and no size limit: a slow or huge
    response would hold a worker for as long as the server likes.)"""
    request = urllib.request.Request(url, headers={"User-Agent": "loracaptioner"})
    deadline = time.monotonic() + timeout
    with urllib.request.urlopen(request, timeout=timeout) as response:
        length = response.headers.get("Content-Length")
        if length and length.isdigit() and int(length) > max_bytes:
            raise ValueError(f"{url}: {length} bytes is more than --max-url-bytes ({max_bytes})")
        body = bytearray()
        while chunk := response.read(1 << 16):
            body += chunk
            if len(body) > max_bytes:
                raise ValueError(f"{url}: more than --max-url-bytes ({max_bytes}) bytes")
            if time.monotonic() > deadline:
                raise ValueError(f"{url}: download took longer than --url-timeout ({timeout} s)")
    return bytes(body)


def read_image(spec: str, timeout: float, max_bytes: int) -> Image.Image:
    """The image file or http(s) URL `spec` as an RGB PIL image, or a `ValueError` naming `spec` and the problem."""
    try:
        data = download(spec, timeout, max_bytes) if is_url(spec) else Path(spec).read_bytes()
    except ValueError:
        raise
    except FileNotFoundError:
        raise ValueError(f"{spec}: no such file") from None
    except (OSError, http.client.HTTPException) as error:  # HTTP errors, timeouts, refused connections, unreadable
        raise ValueError(f"{spec}: cannot read ({type(error).__name__}: {error})") from None
    return load_image(data, spec)
