"""Awkward images, made here, through the three doors a user has: the processor, the `loracaptioner caption` command
and training data loading. Each one becomes pixel_values / a caption, or a ValueError (an error record, a skipped
and counted row) that names the input and the problem."""

import io
import json
import struct
import warnings
import zlib
from pathlib import Path

import datasets
import numpy as np
import pytest
import torch
from PIL import Image

from loracaptioner import LoraCaptionerForConditionalGeneration
from loracaptioner.cli import main
from loracaptioner.data import SkipCounter, load_image, prepare_split

RNG = np.random.default_rng(0)
PHOTO = Image.fromarray(RNG.integers(0, 255, (60, 80, 3), dtype=np.uint8))


def png_header(width: int, height: int) -> bytes:
    """A PNG that claims `width`x`height` pixels in a few bytes: how a decompression bomb looks before decoding."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"")) + chunk(b"IEND", b"")


def orientation(value: int) -> Image.Exif:
    exif = Image.Exif()
    exif[0x0112] = value  # EXIF Orientation; 6: the camera was turned 90 degrees clockwise
    return exif


def encoded(image: Image.Image, image_format: str, **options) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, image_format, **options)
    return buffer.getvalue()


def animation(image_format: str) -> bytes:
    red, blue = Image.new("RGB", (20, 20), (255, 0, 0)), Image.new("RGB", (20, 20), (0, 0, 255))
    return encoded(red, image_format, save_all=True, append_images=[blue], duration=100, loop=0)


def high_depth(mode: str, nan: bool = False) -> Image.Image:
    values = RNG.random((20, 30)).astype(np.float32)
    if nan:
        values[3, 4] = np.nan
    if mode == "F":
        return Image.fromarray(values, mode="F")
    return Image.fromarray((values * 60000).astype(np.uint16 if mode == "I;16" else np.int32))


def transparent_palette() -> Image.Image:
    image = PHOTO.convert("P", palette=Image.Palette.ADAPTIVE, colors=16)
    image.info["transparency"] = 0
    return image


JPEG = encoded(PHOTO.resize((300, 300)), "JPEG")
# name -> (file content, None if it must caption, else a regex of the problem the error must name)
FILES = {
    "zero-bytes.png": (b"", r"empty file"),
    "truncated.jpg": (JPEG[: len(JPEG) // 2], r"cannot decode image .*truncated"),
    "text.jpg": (b"just some text, saved as .jpg", r"cannot (decode|identify)"),
    "one-pixel.png": (encoded(Image.new("RGB", (1, 1), (9, 9, 9)), "PNG"), None),
    "strip-1x5000.png": (encoded(PHOTO.resize((1, 5000)), "PNG"), None),
    "strip-5000x1.png": (encoded(PHOTO.resize((5000, 1)), "PNG"), None),
    "bomb-1e8-pixels.png": (png_header(10_000, 10_000), r"MAX_IMAGE_PIXELS"),
    "bomb-1e10-pixels.png": (png_header(100_000, 100_000), r"decompression bomb"),
    "exif-rotated.jpg": (encoded(PHOTO, "JPEG", exif=orientation(6)), None),
    "animated.gif": (animation("GIF"), None),
    "animated.webp": (animation("WEBP"), None),
    "photo.png": (encoded(PHOTO, "PNG"), None),
    "photo.jpeg": (encoded(PHOTO, "JPEG"), None),
    "photo.webp": (encoded(PHOTO, "WEBP"), None),
    "photo.bmp": (encoded(PHOTO, "BMP"), None),
    "mode-YCbCr.jpg": (encoded(PHOTO.convert("YCbCr"), "JPEG"), None),
    "mode-P-transparent.png": (encoded(transparent_palette(), "PNG"), None),
    "mode-F-nan.tif": (encoded(high_depth("F", nan=True), "TIFF"), r"NaN"),
    **{f"mode-{mode}.tif": (encoded(PHOTO.convert(mode), "TIFF"), None) for mode in ("1", "L", "LA", "RGBA", "CMYK")},
    **{f"mode-{mode}.tif": (encoded(high_depth(mode), "TIFF"), None) for mode in ("I", "I;16", "F")},
}
# PIL itself refuses to open these, before any of our code runs (a user of the processor never gets an image).
PIL_CANNOT_OPEN = {"zero-bytes.png", "text.jpg", "bomb-1e10-pixels.png"}


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("awkward")
    for name, (content, _) in FILES.items():
        (root / name).write_bytes(content)
    return root


def assert_names_the_problem(message: str, name: str, pattern: str) -> None:
    assert name in message, message
    assert __import__("re").search(pattern, message), message


@pytest.fixture(autouse=True)
def quiet_bomb_warnings():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # PIL warns, then we raise
        yield


@pytest.mark.parametrize("name", [name for name in FILES if name not in PIL_CANNOT_OPEN])
def test_processor_door(processor, folder, name):
    _, problem = FILES[name]
    image = Image.open(folder / name)
    if problem is None:
        assert processor(images=[image])["pixel_values"].shape == (1, 3, 32, 32)
    else:
        with pytest.raises(ValueError) as error:
            processor(images=[PHOTO, image])
        assert_names_the_problem(str(error.value), "image 1", problem)


def data_cell(folder: Path, name: str, kind: str):
    """An image cell as datasets gives it undecoded: imagefolder (a path) or webdataset/parquet (the bytes)."""
    if kind == "path":
        return {"bytes": None, "path": str(folder / name)}
    return {"bytes": (folder / name).read_bytes(), "path": name}


DATA_DOOR_CASES = [(name, kind) for name in FILES for kind in ("path", "bytes")]


@pytest.mark.parametrize("name, kind", DATA_DOOR_CASES)
def test_training_data_door_load_image(folder, name, kind):
    _, problem = FILES[name]
    cell = data_cell(folder, name, kind)
    if problem is None:
        assert load_image(cell, "row 0").mode == "RGB"
    else:
        with pytest.raises(ValueError) as error:
            load_image(cell, "row 0")
        assert_names_the_problem(str(error.value), cell["path"], problem)


def test_training_data_door_prepare_split_skips_and_counts_bad_images(folder):
    names = sorted(FILES)
    dataset = datasets.Dataset.from_dict(
        {"image": [str(folder / name) for name in names], "caption": ["a photo"] * len(names)}
    ).cast_column("image", datasets.Image())
    skipped = SkipCounter()
    kept = prepare_split(dataset, "image", "caption", skipped, one_row_per_caption=True)
    bad = [name for name in names if FILES[name][1] is not None]
    assert len(kept) == len(names) - len(bad)
    assert skipped.reasons == {"undecodable image": len(bad)}


def test_cli_door_writes_an_error_record_for_each_bad_file_and_captions_the_others(backbones, folder, tmp_path,
                                                                                    capsys):
    from loracaptioner import LoraCaptionerProcessor

    LoraCaptionerForConditionalGeneration.from_backbones(*backbones).save_pretrained(tmp_path / "model")
    LoraCaptionerProcessor.from_backbones(*backbones).save_pretrained(tmp_path / "model")
    code = main(["caption", str(tmp_path / "model"), str(folder), "--batch-size", "4", "--max-new-tokens", "3", "-q"])
    records = {Path(r["path"]).name: r for r in map(json.loads, capsys.readouterr().out.splitlines())}
    assert code == 1
    assert set(records) == set(FILES)
    for name, (_, problem) in FILES.items():
        if problem is None:
            assert records[name].get("caption"), records[name]
        else:
            assert_names_the_problem(records[name]["error"], str(folder / name), problem)


# ----- what the pixels become


def pixels(processor, image) -> torch.Tensor:
    return processor(images=image)["pixel_values"]


def test_exif_rotated_photos_are_captioned_upright(processor, folder):
    stored = Image.open(folder / "exif-rotated.jpg")
    as_stored = Image.fromarray(np.asarray(stored))  # the decoded pixels without their EXIF
    upright = as_stored.transpose(Image.Transpose.ROTATE_270)  # what orientation 6 asks for, done by hand
    assert torch.equal(pixels(processor, stored), pixels(processor, upright))
    assert not torch.equal(pixels(processor, stored), pixels(processor, as_stored))


def test_exif_rotation_gives_the_upright_image_exactly(processor, tmp_path):
    upright = PHOTO.resize((40, 20))
    upright.transpose(Image.Transpose.ROTATE_90).save(tmp_path / "r.png", exif=orientation(6))
    assert torch.equal(pixels(processor, Image.open(tmp_path / "r.png")), pixels(processor, upright))


@pytest.mark.parametrize("name", ["animated.gif", "animated.webp"])
def test_animations_are_captioned_from_their_first_frame(processor, folder, name):
    red = Image.new("RGB", (20, 20), (255, 0, 0))
    assert torch.allclose(pixels(processor, Image.open(folder / name)), pixels(processor, red), atol=0.05)


def gradient(width: int, height: int) -> Image.Image:
    rows, columns = np.mgrid[0:height, 0:width]
    down, across = rows / max(height - 1, 1), columns / max(width - 1, 1)
    return Image.fromarray((np.stack([down, across, down * across], axis=-1) * 255).astype(np.uint8))


@pytest.mark.parametrize("size", [(1, 5000), (5000, 1), (7, 2000), (2, 999), (30, 500)])
def test_extreme_aspect_ratios_give_the_image_processors_own_pixel_values(processor, size):
    strip = gradient(*size)
    # the image processor alone first resizes a 1x5000 strip to 32x160000 (224x1120000 for the real CLIP);
    # the processor cuts it to its centre first: the same up to a sub-pixel shift (one grey level here)
    expected = processor.image_processor([strip], return_tensors="pt")["pixel_values"]
    assert torch.allclose(pixels(processor, strip), expected, atol=0.02)
    if max(size) / min(size) <= 20:  # up to 20:1 the image goes in whole
        assert torch.equal(pixels(processor, strip), expected)


def test_transparency_is_laid_over_white_and_high_depth_grey_is_scaled_not_clipped(processor):
    clear = Image.new("RGBA", (8, 8), (0, 0, 0, 0))
    white = Image.new("RGB", (8, 8), (255, 255, 255))
    assert torch.equal(pixels(processor, clear), pixels(processor, white))
    palette = Image.new("P", (8, 8), 0)
    palette.info["transparency"] = 0
    assert torch.equal(pixels(processor, palette), pixels(processor, white))
    mid_grey = Image.new("RGB", (8, 8), (128, 128, 128))
    sixteen_bit = Image.fromarray(np.full((8, 8), 32896, dtype=np.uint16))  # 32896 / 65535 * 255 = 128
    assert sixteen_bit.mode == "I;16"
    assert torch.equal(pixels(processor, sixteen_bit), pixels(processor, mid_grey))
    assert torch.equal(pixels(processor, sixteen_bit.convert("I")), pixels(processor, mid_grey))
    assert torch.equal(pixels(processor, Image.new("I", (8, 8), 128)), pixels(processor, mid_grey))  # 8-bit in I
    assert torch.equal(pixels(processor, Image.new("F", (8, 8), 128 / 255)), pixels(processor, mid_grey))


@pytest.mark.parametrize("mode", ["1", "L", "LA", "P", "PA", "RGB", "RGBA", "CMYK", "YCbCr", "I", "I;16", "F"])
def test_every_pil_mode_becomes_rgb_pixel_values(processor, mode):
    image = high_depth(mode) if mode in ("I", "I;16", "F") else PHOTO.convert(mode)
    assert pixels(processor, image).shape == (1, 3, 32, 32)


ARRAYS = {
    "HWC uint8": (RNG.integers(0, 255, (20, 30, 3), dtype=np.uint8), None),
    "HW uint8": (RNG.integers(0, 255, (20, 30), dtype=np.uint8), None),
    "HWC float in [0, 1]": (RNG.random((20, 30, 3)), None),
    "HWC RGBA": (RNG.integers(0, 255, (20, 30, 4), dtype=np.uint8), None),
    "CHW float": (RNG.random((3, 20, 30)).astype(np.float32), None),
    "float with NaN": (np.full((20, 30, 3), np.nan), r"NaN"),
    "no pixels": (np.zeros((0, 30, 3), dtype=np.uint8), r"not an image"),
    "4-D batch": (np.zeros((2, 20, 30, 3), dtype=np.uint8), r"not an image"),
    "strings": (np.full((20, 30), "x"), r"unsupported array dtype"),
    "CHW bfloat16 tensor": (torch.rand(3, 20, 30).bfloat16(), None),
    "a file name": ("photo.jpg", r"expected a PIL image, numpy array or tensor, got str"),
}


@pytest.mark.parametrize("name", ARRAYS)
def test_arrays_and_tensors_become_pixel_values_or_a_clear_error(processor, name):
    array, problem = ARRAYS[name]
    if problem is None:
        assert pixels(processor, array).shape == (1, 3, 32, 32)
    else:
        with pytest.raises(ValueError) as error:
            processor(images=[ARRAYS["HW uint8"][0], array])
        assert_names_the_problem(str(error.value), "image 1", problem)


def test_float_arrays_in_0_1_equal_their_uint8_image(processor):
    image = RNG.integers(0, 255, (20, 30, 3), dtype=np.uint8)
    assert torch.allclose(pixels(processor, image / 255.0), pixels(processor, image), atol=1e-5)
