"""Tiny backbones, built and saved locally, that go through the very same from_pretrained paths as the Hub ones."""

import os
import sys
from pathlib import Path

# Before transformers / huggingface_hub read it at import: no test may reach the Hub.
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np
import pytest
import torch
from PIL import Image
from transformers import (
    CLIPConfig,
    CLIPImageProcessorPil,
    CLIPModel,
    CLIPTextConfig,
    CLIPVisionConfig,
    T5Config,
    T5ForConditionalGeneration,
    T5Tokenizer,
)

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from loracaptioner import LoraCaptionerForConditionalGeneration, LoraCaptionerProcessor  # noqa: E402

WORDS = (
    "a an the photo of picture small large big tiny red green blue yellow purple orange black white circle square "
    "triangle star on in at left right top bottom middle center and with dog cat tree".split()
)
IMAGE_SIZE = 32


def tiny_tokenizer() -> T5Tokenizer:
    vocab = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("▁", -3.0)]
    vocab += [("▁" + word, -1.0 - i * 0.01) for i, word in enumerate(WORDS)]
    vocab += [(char, -5.0) for char in "abcdefghijklmnopqrstuvwxyz.,'-"]
    return T5Tokenizer(vocab=vocab, extra_ids=0)


def tiny_vision_config(**overrides) -> CLIPVisionConfig:
    kwargs = dict(
        hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        image_size=IMAGE_SIZE, patch_size=8, projection_dim=24,
    )
    return CLIPVisionConfig(**{**kwargs, **overrides})


def tiny_text_config(vocab_size: int, **overrides) -> T5Config:
    kwargs = dict(
        vocab_size=vocab_size, d_model=32, d_ff=64, d_kv=8, num_heads=4, num_layers=3, num_decoder_layers=2,
        feed_forward_proj="gated-gelu", tie_word_embeddings=False, decoder_start_token_id=0, dropout_rate=0.0,
    )
    return T5Config(**{**kwargs, **overrides})


def save_tiny_backbones(root: Path, seed: int = 0) -> tuple[str, str]:
    """A tiny full CLIP checkpoint (like openai/clip-vit-base-patch16) and a tiny T5 (like google/flan-t5-base)."""
    torch.manual_seed(seed)
    tokenizer = tiny_tokenizer()
    clip_dir, t5_dir = root / "clip", root / "t5"
    clip_config = CLIPConfig(
        vision_config=tiny_vision_config().to_dict(),
        text_config=CLIPTextConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                   num_attention_heads=2, vocab_size=50, projection_dim=24).to_dict(),
        projection_dim=24,
    )
    CLIPModel(clip_config).save_pretrained(clip_dir)
    CLIPImageProcessorPil(
        size={"shortest_edge": IMAGE_SIZE}, crop_size={"height": IMAGE_SIZE, "width": IMAGE_SIZE}
    ).save_pretrained(clip_dir)
    T5ForConditionalGeneration(tiny_text_config(len(tokenizer))).save_pretrained(t5_dir)
    tokenizer.save_pretrained(t5_dir)
    return str(clip_dir), str(t5_dir)


@pytest.fixture(scope="session")
def backbones(tmp_path_factory) -> tuple[str, str]:
    return save_tiny_backbones(tmp_path_factory.mktemp("backbones"))


@pytest.fixture(scope="session")
def processor(backbones) -> LoraCaptionerProcessor:
    return LoraCaptionerProcessor.from_backbones(*backbones)


@pytest.fixture()
def model(backbones) -> LoraCaptionerForConditionalGeneration:
    torch.manual_seed(0)
    return LoraCaptionerForConditionalGeneration.from_backbones(*backbones).eval()


@pytest.fixture(scope="session")
def model_dir(backbones, tmp_path_factory) -> str:
    """A saved tiny LoraCaptioner (random weights on the tiny backbones), as the CLI and captioning engine load it."""
    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp("model")
    LoraCaptionerForConditionalGeneration.from_backbones(*backbones).save_pretrained(folder)
    LoraCaptionerProcessor.from_backbones(*backbones).save_pretrained(folder)
    return str(folder)


@pytest.fixture(scope="session")
def images() -> list[Image.Image]:
    """Varied sizes and modes, as users have them."""
    rng = np.random.default_rng(0)
    return [
        Image.fromarray(rng.integers(0, 255, (40, 60, 3), dtype=np.uint8)),
        Image.fromarray(rng.integers(0, 255, (90, 30, 3), dtype=np.uint8)),
        Image.fromarray(rng.integers(0, 255, (32, 32), dtype=np.uint8), mode="L"),
        Image.fromarray(rng.integers(0, 255, (50, 50, 4), dtype=np.uint8), mode="RGBA"),
    ]


# transformers_sdist/ loads transformers' common tests; its stand-in modules are not tests of this project.
collect_ignore = ["transformers_sdist"]


def pytest_configure(config):
    # Marks on transformers' common tests (test_transformers_common.py); its conftest.py, not in the sdist, has them.
    for mark in ("accelerate_tests", "flash_attn_test", "flash_attn_3_test", "flash_attn_4_test", "slow",
                 "torch_compile_test"):
        config.addinivalue_line("markers", f"{mark}: a mark of transformers' own common tests")
