"""The fast paths give the captions of the reference path: SDPA vs eager attention (fp32: identical), a static cache,
bf16 loading (`from_pretrained(..., dtype=torch.bfloat16)`), cross-attention keys computed once. No timings are
asserted: speed is measured by bench/bench.py (tests/test_bench.py runs it); int8 is tested with the quantization
module."""

import torch

from loracaptioner import LoraCaptionerForConditionalGeneration

GREEDY_20 = dict(max_new_tokens=20, min_new_tokens=20, do_sample=False, no_repeat_ngram_size=0)


def _captions(model, inputs, **kwargs):
    with torch.inference_mode():
        return model.generate(**inputs, **{**GREEDY_20, **kwargs})


def test_sdpa_and_eager_attention_write_identical_fp32_captions(model, processor, images, tmp_path):
    model.save_pretrained(tmp_path)
    eager = LoraCaptionerForConditionalGeneration.from_pretrained(tmp_path, attn_implementation="eager").eval()
    sdpa = LoraCaptionerForConditionalGeneration.from_pretrained(tmp_path).eval()
    assert sdpa.encoder.vision_tower.config._attn_implementation == "sdpa"
    inputs = processor(images=images)
    assert torch.equal(_captions(sdpa, inputs), _captions(eager, inputs))
    assert torch.equal(_captions(sdpa, inputs, num_beams=3), _captions(eager, inputs, num_beams=3))


def test_static_cache_writes_the_same_captions_as_the_dynamic_cache(model, processor, images):
    inputs = processor(images=images)
    assert torch.equal(_captions(model, inputs, cache_implementation="static"), _captions(model, inputs))


def test_bfloat16_loading_is_one_argument_and_stays_within_bf16_rounding_of_fp32(model, processor, images, tmp_path):
    model.save_pretrained(tmp_path)
    bf16 = LoraCaptionerForConditionalGeneration.from_pretrained(tmp_path, dtype=torch.bfloat16).eval()
    assert {p.dtype for p in bf16.parameters()} == {torch.bfloat16}
    inputs = processor(images=images)  # fp32 pixel_values, as the processor gives them
    ids = _captions(bf16, inputs)
    assert ids.shape == (len(images), 21)
    with torch.inference_mode():
        reference = model(**inputs, decoder_input_ids=ids).logits
        logits = bf16(**inputs, decoder_input_ids=ids).logits.float()
    assert (logits - reference).abs().max() < 0.05 * reference.abs().max()


def test_cross_attention_keys_and_values_are_computed_once_per_generate(model, processor, images):
    calls = []
    for block in model.decoder.block:
        for projection in (block.layer[1].EncDecAttention.k, block.layer[1].EncDecAttention.v):
            projection.register_forward_hook(lambda *_: calls.append(1))
    _captions(model, processor(images=images))
    assert len(calls) == 2 * len(model.decoder.block)  # 20 steps, yet one projection per layer
