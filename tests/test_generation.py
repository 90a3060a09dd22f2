"""generate(): greedy, beam search, sampling, prompts, batching, and the anti-degeneration defaults."""

import pytest
import torch

from loracaptioner.remote_code.modeling_loracaptioner import CAPTION_GENERATION_DEFAULTS


def test_greedy_equals_hand_written_argmax_loop(model, processor, images):
    inputs = processor(images=images[:2])
    generated = model.generate(**inputs, max_new_tokens=8, no_repeat_ngram_size=0, min_new_tokens=8)
    with torch.no_grad():
        image_tokens = model.get_encoder()(inputs["pixel_values"])
        ids = torch.full((2, 1), model.config.decoder_start_token_id)
        for _ in range(8):
            logits = model(encoder_outputs=image_tokens, decoder_input_ids=ids, use_cache=False).logits[:, -1]
            logits[:, model.config.eos_token_id] = -float("inf")  # min_new_tokens
            ids = torch.cat([ids, logits.argmax(-1, keepdim=True)], dim=1)
    assert torch.equal(generated, ids)


def test_generate_beam_search_returns_num_return_sequences(model, processor, images):
    inputs = processor(images=images[:3])
    out = model.generate(**inputs, num_beams=4, num_return_sequences=3, length_penalty=0.6, max_new_tokens=6)
    assert out.shape[0] == 9
    scored = model.generate(**inputs, num_beams=4, num_return_sequences=2, max_new_tokens=6,
                            output_scores=True, return_dict_in_generate=True)
    assert scored.sequences.shape[0] == 6 and scored.sequences_scores.shape == (6,)


def test_beams_share_their_image_and_match_transformers_own_repeat_and_reorder(
        model, processor, images, monkeypatch):
    """transformers' `generate()` repeats an image's tokens for each beam and reorders the whole cache at every step.
    This model keeps the image tokens, and so the cross-attention keys/values, once per image
    (`_expand_inputs_for_generation`, `LoraCaptionerCrossAttention`) and reorders the self-attention cache only
    (`_reorder_cache`): the same beams, beam indices and scores as transformers' own way."""
    from transformers import GenerationMixin
    from transformers.cache_utils import DynamicCache

    inputs = processor(images=images[:3])
    options = dict(num_beams=4, num_return_sequences=2, max_new_tokens=6, min_new_tokens=6, no_repeat_ngram_size=0,
                   output_scores=True, return_dict_in_generate=True)
    image_tokens = model.get_encoder()(inputs["pixel_values"]).last_hidden_state.shape[1]
    reordered_lengths, reorder = [], DynamicCache.reorder_cache

    def spy(cache, beam_idx):
        reordered_lengths.append(cache.get_seq_length())
        return reorder(cache, beam_idx)

    def cross_attention_rows(outputs) -> int:
        cache = getattr(outputs, "cache", None) or outputs.past_key_values
        return cache.cross_attention_cache.layers[0].keys.shape[0]

    monkeypatch.setattr(DynamicCache, "reorder_cache", spy)
    ours = model.generate(**inputs, **options)
    assert reordered_lengths and max(reordered_lengths) < image_tokens  # the self-attention cache only
    assert cross_attention_rows(ours) == 3  # once per image

    # transformers' own: the image tokens repeated per beam, the whole cache reordered
    monkeypatch.setattr(model, "_expand_inputs_for_generation",
                        GenerationMixin._expand_inputs_for_generation.__get__(model))
    monkeypatch.setattr(model, "_reorder_cache", lambda cache, beam_idx: (cache.reorder_cache(beam_idx), cache)[1])
    repeated = model.generate(**inputs, **options)
    assert max(reordered_lengths) == image_tokens and cross_attention_rows(repeated) == 3 * 4
    assert torch.equal(ours.sequences, repeated.sequences) and torch.equal(ours.beam_indices, repeated.beam_indices)
    assert torch.allclose(ours.sequences_scores, repeated.sequences_scores, atol=1e-6, rtol=1e-5)


def test_decoder_rows_sharing_an_image_equal_rows_given_the_image_repeated(model, processor, images):
    """k decoder rows per image (beams, `num_return_sequences`) take the image's tokens once: the logits and cross-
    attention weights are those of the rows given the image's tokens repeated k times, for a prefix of any length."""
    model.set_attn_implementation("eager")  # cross-attention weights
    image_tokens = model.get_encoder()(processor(images=images[:2])["pixel_values"]).last_hidden_state
    generator = torch.Generator().manual_seed(0)
    decoder_input_ids = torch.randint(3, model.config.text_config.vocab_size, (6, 5), generator=generator)
    with torch.no_grad():
        shared = model(decoder_input_ids=decoder_input_ids, encoder_outputs=(image_tokens,), output_attentions=True)
        repeated = model(decoder_input_ids=decoder_input_ids, encoder_outputs=(image_tokens.repeat_interleave(3, 0),),
                         output_attentions=True)
    assert torch.allclose(shared.logits, repeated.logits, atol=1e-5)
    assert len(shared.cross_attentions) == model.config.text_config.num_decoder_layers
    for ours, theirs in zip(shared.cross_attentions, repeated.cross_attentions):
        assert ours.shape == theirs.shape and torch.allclose(ours, theirs, atol=1e-6)
    with pytest.raises(ValueError, match="not a multiple"):
        model(decoder_input_ids=decoder_input_ids[:5], encoder_outputs=(image_tokens,))


def test_sampled_sequences_of_one_image_share_it_and_match_transformers_own_repeat(model, processor, images,
                                                                                   monkeypatch):
    from transformers import GenerationMixin

    inputs = processor(images=images[:2])
    options = dict(do_sample=True, num_return_sequences=3, max_new_tokens=8, top_k=0)
    torch.manual_seed(7)
    ours = model.generate(**inputs, **options)
    monkeypatch.setattr(model, "_expand_inputs_for_generation",
                        GenerationMixin._expand_inputs_for_generation.__get__(model))
    torch.manual_seed(7)
    assert torch.equal(ours, model.generate(**inputs, **options))


def test_sampling_is_reproducible_under_a_seed(model, processor, images):
    inputs = processor(images=images[:2])
    runs = []
    for _ in range(2):
        torch.manual_seed(123)
        runs.append(model.generate(**inputs, do_sample=True, top_p=0.9, temperature=1.5, max_new_tokens=8))
    assert torch.equal(*runs)


def test_batched_generation_equals_one_by_one_for_mixed_image_sizes(model, processor, images):
    batched = model.generate(**processor(images=images), num_beams=2, max_new_tokens=8)
    for i, image in enumerate(images):
        single = model.generate(**processor(images=[image]), num_beams=2, max_new_tokens=8)
        assert torch.equal(batched[i, : single.shape[1]], single[0])
        assert (batched[i, single.shape[1]:] == model.config.pad_token_id).all()


def test_kv_cache_gives_the_same_captions_as_no_cache(model, processor, images):
    inputs = processor(images=images)
    with_cache = model.generate(**inputs, max_new_tokens=8)
    without = model.generate(**inputs, max_new_tokens=8, use_cache=False)
    assert torch.equal(with_cache, without)


def test_text_prompt_becomes_the_decoder_prefix(model, processor, images):
    prompt_ids = processor.tokenizer("a photo of", add_special_tokens=False)["input_ids"]
    inputs = processor(images=images[:2], text="a photo of")
    out = model.generate(**inputs, max_new_tokens=5)
    assert out[:, 1 : 1 + len(prompt_ids)].tolist() == [prompt_ids, prompt_ids]
    assert processor.batch_decode(out, skip_special_tokens=True)[0].startswith("a photo of")


def test_batched_prompts_of_different_lengths_equal_one_by_one(model, processor, images):
    prompts = ["a", "a photo of the"]
    batched = model.generate(**processor(images=images[:2], text=prompts), max_new_tokens=6)
    captions = processor.batch_decode(batched, skip_special_tokens=True)
    for image, prompt, caption in zip(images[:2], prompts, captions):
        single = model.generate(**processor(images=[image], text=prompt), max_new_tokens=6)
        assert processor.decode(single[0], skip_special_tokens=True) == caption


def make_repetitive(model, ranking: list[int]) -> None:
    """Whatever the image and the words so far, rank the next token the same way: `ranking[0]` first, then
    `ranking[1]`, ... (an output layer whose bias alone decides, everything else far behind). The original's failure
    ("tropical" x19 until the length limit) in its simplest form; where </s> sits in the ranking decides what a
    repetition processor can do about it."""
    head = torch.nn.Linear(model.lm_head.in_features, model.lm_head.out_features, bias=True)
    with torch.no_grad():
        head.weight.zero_()
        head.bias.fill_(-10.0)
        for rank, token in enumerate(ranking):
            head.bias[token] = 5.0 - rank
    model.set_output_embeddings(head)


def ids(processor, words: str) -> list[int]:
    return processor.tokenizer.convert_tokens_to_ids(["▁" + word for word in words.split()])


def test_plain_greedy_repeats_the_favourite_word_until_the_length_limit(model, processor, images):
    red, tree = ids(processor, "red tree")
    make_repetitive(model, [red, tree, model.config.eos_token_id])
    plain = model.generate(**processor(images=images[:2]), max_new_tokens=20, no_repeat_ngram_size=0)
    assert plain.shape[1] == 1 + 20 and (plain[:, 1:] == red).all()


@pytest.mark.parametrize(
    ("runners_up", "caption"),
    [
        ("", "red red red"),
        ("tree", "red red red tree red red"),
        ("tree dog", "red red red tree red red dog red red"),
    ],
)
def test_no_repeat_ngram_3_ends_the_caption_only_when_eos_is_the_best_token_left(
    model, processor, images, runners_up, caption
):
    """no_repeat_ngram_size=3 bans a token only where it would complete a 3-gram already written: "red red red" is
    allowed once, then the runners-up take turns with "red" until every continuation of "red red" has been used and
    </s> is the best token left. It stops the repetition only when </s> is the runner-up; otherwise it reshuffles it."""
    make_repetitive(model, [*ids(processor, "red " + runners_up), model.config.eos_token_id])
    out = model.generate(**processor(images=images[:2]), max_new_tokens=32, no_repeat_ngram_size=3)
    assert processor.batch_decode(out, skip_special_tokens=True) == [caption] * 2


def test_repetition_penalty_does_not_stop_a_word_with_a_clear_lead(model, processor, images):
    red, tree = ids(processor, "red tree")
    make_repetitive(model, [red, tree, model.config.eos_token_id])  # logits 5, 4, 3: 5 / 1.2 is still first
    out = model.generate(**processor(images=images[:2]), max_new_tokens=20, no_repeat_ngram_size=0,
                         repetition_penalty=1.2)
    assert (out[:, 1:] == red).all()


def test_the_saved_defaults_on_a_degenerate_model_whose_runner_up_is_not_eos(model, processor, images):
    """What a user gets from `generate()` with no arguments, on a model that repeats with </s> third."""
    make_repetitive(model, [*ids(processor, "red tree"), model.config.eos_token_id])
    assert CAPTION_GENERATION_DEFAULTS == {"max_new_tokens": 32, "no_repeat_ngram_size": 3}
    captions = processor.batch_decode(model.generate(**processor(images=images[:2])), skip_special_tokens=True)
    assert captions == ["red red red tree red red"] * 2  # still degenerate: the defaults reshuffle the repetition


def test_generation_defaults_are_saved(model, tmp_path):
    model.save_pretrained(tmp_path)
    from transformers import GenerationConfig

    saved = GenerationConfig.from_pretrained(tmp_path)
    assert saved.max_new_tokens == 32 and saved.no_repeat_ngram_size == 3
    assert saved.decoder_start_token_id == 0 and saved.eos_token_id == 1
