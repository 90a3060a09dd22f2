"""transformers' own common tests (`ModelTesterMixin`, `ConfigTester`) run against LoraCaptioner with a tiny config.

They come from the sdist of the installed transformers (see transformers_sdist/), so a new release's new common tests
run here as soon as the main venv has it; tests/test_transformers_versions.py runs this file on the oldest supported
release too. This file skips a test only where transformers' own comparable models (Pix2Struct, BLIP,
VisionEncoderDecoder) skip it, with their reason; the mixin's own skips (no accelerator, no flash-attn, no deepspeed,
nothing of the kind in this model) are its own.
"""

import unittest

import pytest
import torch

from conftest import tiny_text_config, tiny_vision_config
from loracaptioner import LoraCaptionerConfig, LoraCaptionerForConditionalGeneration
from transformers_sdist import load

test_modeling_common, test_configuration_common = load()
GenerationTesterMixin = test_modeling_common.GenerationTesterMixin  # the stand-in: see tests/test_generation.py


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """A tiny model's ops are all thread start-up: on a loaded 2-core machine this file took 106 s with two threads,
    12 s with one."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


class LoraCaptionerModelTester:
    """A tiny LoraCaptioner, with inputs, in the shape the common tests expect of an encoder-decoder model."""

    def __init__(self, parent, batch_size: int = 3, decoder_seq_length: int = 7, vocab_size: int = 99):
        self.parent = parent
        self.batch_size = batch_size
        self.seq_length = self.decoder_seq_length = decoder_seq_length
        self.vocab_size = vocab_size
        vision = tiny_vision_config()
        self.image_size, self.patch_size = vision.image_size, vision.patch_size
        # The common tests expect one width, depth and head count for both halves: conftest's tiny backbones have it.
        self.hidden_size, self.num_hidden_layers = vision.hidden_size, vision.num_hidden_layers
        self.num_attention_heads = vision.num_attention_heads
        # The encoder attends over CLIP's CLS token and patches; the decoder's cross-attention keys must be the same
        # tokens for the common attention test, so the tester keeps the CLS token (drop_cls_token=False).
        self.encoder_seq_length = self.key_length = (self.image_size // self.patch_size) ** 2 + 1
        self.is_training = True
        self.caption_ids_also_as_input_ids = False  # see LoraCaptionerCommonTest.test_resize_tokens_embeddings

    def get_config(self) -> LoraCaptionerConfig:
        # freeze_vision=False: the common training and retain-grad tests then reach every weight (the default,
        # frozen, is tests/test_model.py's).
        return LoraCaptionerConfig(
            vision_config=tiny_vision_config(),
            text_config=tiny_text_config(self.vocab_size),
            drop_cls_token=False,
            freeze_vision=False,
        )

    def prepare_config_and_inputs_for_common(self) -> tuple[LoraCaptionerConfig, dict]:
        caption_ids = test_modeling_common.ids_tensor([self.batch_size, self.decoder_seq_length], self.vocab_size)
        inputs = {
            "pixel_values": test_modeling_common.floats_tensor([self.batch_size, 3, self.image_size, self.image_size]),
            "decoder_input_ids": caption_ids,
            "decoder_attention_mask": test_modeling_common.random_attention_mask(caption_ids.shape),
            "labels": caption_ids,
        }
        if self.caption_ids_also_as_input_ids:
            inputs["input_ids"] = caption_ids
        return self.get_config(), inputs


class LoraCaptionerCommonTest(test_modeling_common.ModelTesterMixin, GenerationTesterMixin, unittest.TestCase):
    all_model_classes = (LoraCaptionerForConditionalGeneration,)
    is_encoder_decoder = True
    _is_composite = True  # a CLIP and a T5 sub-model, each with its own sub-config
    # The mixin runs this test only for models whose config file carries a copyright year >= 2023, or that opt in
    # (5.24 on; 5.20 has no opt-in and skips it).
    test_can_init_all_missing_weights_before_2023 = True

    def setUp(self):
        self.model_tester = LoraCaptionerModelTester(self)
        # has_text_modality=False: `vocab_size` is text_config's, not a property of the composite config.
        self.config_tester = test_configuration_common.ConfigTester(
            self, config_class=LoraCaptionerConfig, has_text_modality=False,
            use_clip_projection=False, drop_cls_token=False, freeze_vision=False,
        )

    def test_config(self):
        self.config_tester.run_common_tests()

    # Pix2StructModelTest skips it: "Pix2Struct has no base model, it was implemented before standardization". Neither
    # has this model (nor VisionEncoderDecoderModel): encoder, decoder and lm_head sit on the model itself, which
    # keeps the checkpoint's key names.
    @unittest.skip(reason="No base model: encoder, decoder and lm_head sit on the model itself (as in Pix2Struct)")
    def test_model_base_model_prefix(self):
        pass

    # The resize tests edit `inputs_dict["input_ids"]` in place before each forward pass; a captioner's token ids are
    # its decoder's. So, for these two tests, the tester hands the caption ids under both names (one tensor) and the
    # model gets them as `decoder_input_ids` (Pix2Struct, also without `input_ids`, rewrites both tests instead).
    def _prepare_for_class(self, inputs_dict, model_class, return_labels=False):
        inputs = super()._prepare_for_class(inputs_dict, model_class, return_labels=return_labels)
        inputs.pop("input_ids", None)
        return inputs

    def test_resize_tokens_embeddings(self):
        self.model_tester.caption_ids_also_as_input_ids = True
        super().test_resize_tokens_embeddings()

    def test_resize_embeddings_untied(self):
        self.model_tester.caption_ids_also_as_input_ids = True
        super().test_resize_embeddings_untied()
