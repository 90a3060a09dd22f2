"""The processor: pixels, prompts, labels, decoding, and its own save/load."""

import numpy as np
import pytest
import torch
from transformers import AutoProcessor

from loracaptioner import LoraCaptionerProcessor


def test_images_of_any_mode_and_numpy_arrays_become_rgb_pixel_values(processor, images):
    arrays = [np.zeros((20, 30, 3), dtype=np.uint8), np.full((25, 25), 200, dtype=np.uint8)]
    out = processor(images=images + arrays)
    assert out["pixel_values"].shape == (len(images) + 2, 3, 32, 32)
    assert out["pixel_values"].dtype == torch.float32
    assert set(out) == {"pixel_values"}


def test_prompt_becomes_left_padded_decoder_prefix_without_eos(processor):
    out = processor(text=["a", "a photo of"])
    ids, mask = out["decoder_input_ids"], out["decoder_attention_mask"]
    start, pad, eos = processor.decoder_start_token_id, processor.tokenizer.pad_token_id, processor.tokenizer.eos_token_id
    assert ids.shape == (2, 4) and (ids[:, -1] != eos).all()
    assert mask.tolist() == [[0, 0, 1, 1], [1, 1, 1, 1]]
    assert ids[0, 2] == start and ids[1, 0] == start and ids[0, 0] == pad


def test_empty_prompt_is_just_the_start_token_and_one_prompt_serves_every_image(processor, images):
    out = processor(images=images[:3], text="")
    assert out["decoder_input_ids"].tolist() == [[processor.decoder_start_token_id]] * 3


def test_text_target_becomes_labels_with_eos_truncation_and_minus_100_padding(processor):
    labels = processor(text_target=["a red circle", "a big blue square on the left of a tree"], max_target_length=6)["labels"]
    eos = processor.tokenizer.eos_token_id
    assert labels.shape == (2, 6)
    assert labels[0].tolist()[3:] == [eos, -100, -100] and labels[0, 2] != -100
    assert labels[1, -1] == eos and (labels[1] != -100).all()


def test_empty_caption_is_a_clear_error(processor):
    with pytest.raises(ValueError, match="caption 1 is empty"):
        processor(text_target=["a dog", "   "])


def test_decode_and_post_process(processor):
    ids = processor.tokenizer(["a red circle", "a dog"], padding=True, return_tensors="pt")["input_ids"]
    ids = torch.cat([torch.zeros(2, 1, dtype=torch.long), ids], dim=1)
    assert processor.batch_decode(ids, skip_special_tokens=True) == ["a red circle", "a dog"]
    assert processor.post_process_image_text_to_text(ids) == ["a red circle", "a dog"]
    assert processor.decode(ids[1], skip_special_tokens=True) == "a dog"


def test_nothing_to_process_is_an_error(processor):
    with pytest.raises(ValueError, match="needs"):
        processor()


def test_save_and_load_with_auto_processor(processor, images, tmp_path):
    processor.max_target_length = 17
    processor.save_pretrained(tmp_path)
    loaded = AutoProcessor.from_pretrained(tmp_path, trust_remote_code=True)
    assert type(loaded).__name__ == "LoraCaptionerProcessor" and loaded.max_target_length == 17
    assert torch.equal(loaded(images=images)["pixel_values"], processor(images=images)["pixel_values"])
    assert loaded.tokenizer("a red dog")["input_ids"] == processor.tokenizer("a red dog")["input_ids"]
    processor.max_target_length = 32
