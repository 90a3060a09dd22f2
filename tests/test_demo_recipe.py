"""The demo's base is compositional by construction (demo/run_demo.py): its vision tower sees shape, size and position
the same way whatever the colour, and colour reaches the decoder only through the bypass dimensions."""

import sys

import numpy as np
import torch
from PIL import Image

from conftest import REPO

sys.path.insert(0, str(REPO / "demo"))
import run_demo  # noqa: E402

from loracaptioner import LoraCaptionerForConditionalGeneration, LoraCaptionerProcessor  # noqa: E402


def square(colour) -> Image.Image:
    pixels = np.full((64, 64, 3), 100, dtype=np.uint8)
    pixels[16:40, 20:44] = colour
    return Image.fromarray(pixels)


def test_demo_base_tower_sees_the_same_shape_whatever_its_colour_and_colour_only_in_the_bypass(tmp_path):
    run_demo.build_base_init(tmp_path)
    model = LoraCaptionerForConditionalGeneration.from_pretrained(tmp_path).eval()
    processor = LoraCaptionerProcessor.from_pretrained(tmp_path)
    run_demo.isolate_colour_bypass(model, run_demo.BASE_RECIPE["colour_bypass"]["input_scale"])
    with torch.no_grad():
        vit = run_demo.vision_transformer(model)
        vit.pre_layrnorm.weight[list(run_demo.BYPASS_DIMS)] = 1.0  # open the bypass, as finish_base does
        pixel_values = processor(images=[square((180, 0, 0)), square((0, 180, 0)), square((0, 0, 180))])["pixel_values"]
        tokens = model.encoder.vision_tower(pixel_values=pixel_values).last_hidden_state
    shape_dims = [d for d in range(tokens.shape[-1]) if d not in run_demo.BYPASS_DIMS]
    colour_dims = list(run_demo.BYPASS_DIMS)
    torch.testing.assert_close(tokens[0][:, shape_dims], tokens[1][:, shape_dims], atol=1e-4, rtol=0)
    # Red and green (equal R+G+B, mirrored chroma) look exactly alike; blue's chroma has another magnitude, which
    # reaches the other dimensions only through LayerNorm's variance: a few per cent of their spread.
    assert (tokens[0][:, shape_dims] - tokens[2][:, shape_dims]).abs().max() < 0.1 * tokens[0][:, shape_dims].std()
    assert (tokens[0][:, colour_dims] - tokens[1][:, colour_dims]).abs().max() > 1e-2
    assert (tokens[0][:, colour_dims] - tokens[2][:, colour_dims]).abs().max() > 1e-2
