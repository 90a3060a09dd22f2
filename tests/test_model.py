"""The composition changes nothing: each half computes what transformers' own classes compute."""

import copy

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import CLIPVisionModel, CLIPVisionModelWithProjection, T5ForConditionalGeneration
from transformers.modeling_outputs import BaseModelOutput, Seq2SeqLMOutput
from transformers.models.t5.modeling_t5 import T5Stack

from loracaptioner import LoraCaptionerConfig, LoraCaptionerForConditionalGeneration
from conftest import tiny_text_config, tiny_vision_config


def test_from_backbones_puts_every_weight_where_it_belongs(backbones, model):
    clip = CLIPVisionModelWithProjection.from_pretrained(backbones[0])
    t5 = T5ForConditionalGeneration.from_pretrained(backbones[1])
    for name, tensor in clip.vision_model.state_dict().items():
        assert torch.equal(model.encoder.vision_tower.state_dict()[name], tensor), name
    assert torch.equal(model.encoder.visual_projection.weight, clip.visual_projection.weight)
    for name, tensor in t5.decoder.state_dict().items():
        assert torch.equal(model.decoder.state_dict()[name], tensor), name
    assert torch.equal(model.lm_head.weight, t5.lm_head.weight)


def test_t5_text_encoder_is_not_kept(model, tmp_path):
    assert not any(name.startswith("encoder.block") or ".EncDecAttention." in name and name.startswith("encoder")
                   for name in model.state_dict())
    model.save_pretrained(tmp_path)
    from safetensors import safe_open

    with safe_open(tmp_path / "model.safetensors", "pt") as saved:
        names = list(saved.keys())
    assert names and all(name.startswith(("encoder.vision_tower", "encoder.visual_projection", "encoder.bridge",
                                          "decoder.", "lm_head")) for name in names)


def test_image_tokens_are_clip_patch_tokens_through_final_layernorm_and_projection(backbones, model):
    clip = CLIPVisionModelWithProjection.from_pretrained(backbones[0]).eval()
    pixel_values = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        hidden = clip.vision_model(pixel_values=pixel_values).last_hidden_state
        expected = clip.visual_projection(clip.vision_model.post_layernorm(hidden[:, 1:]))
        expected = model.encoder.bridge(expected)
        image_tokens = model.get_encoder()(pixel_values).last_hidden_state
    assert image_tokens.shape == (2, model.config.num_image_tokens, model.config.text_config.d_model)
    torch.testing.assert_close(image_tokens, expected, rtol=0, atol=1e-6)
    # CLIP's pooled embedding is the same projection of the (normalised) CLS token: the weights are CLIP's own.
    with torch.no_grad():
        pooled = clip(pixel_values=pixel_values).image_embeds
        cls = clip.visual_projection(clip.vision_model.post_layernorm(hidden[:, 0]))
    torch.testing.assert_close(pooled, cls)


def test_decoder_logits_equal_t5_with_encoder_outputs(backbones, model):
    t5 = T5ForConditionalGeneration.from_pretrained(backbones[1]).eval()
    pixel_values = torch.randn(2, 3, 32, 32)
    labels = torch.tensor([[5, 9, 12, 1], [7, 8, 1, -100]])
    with torch.no_grad():
        image_tokens = model.get_encoder()(pixel_values).last_hidden_state
        ours = model(pixel_values=pixel_values, labels=labels)
        theirs = t5(encoder_outputs=BaseModelOutput(last_hidden_state=image_tokens), labels=labels)
    torch.testing.assert_close(ours.logits, theirs.logits, rtol=0, atol=1e-6)
    torch.testing.assert_close(ours.loss, theirs.loss)


def test_loss_ignores_minus_100_and_equals_hand_computed_cross_entropy(model):
    pixel_values = torch.randn(2, 3, 32, 32)
    labels = torch.tensor([[5, 9, 12, 1], [7, 1, -100, -100]])
    with torch.no_grad():
        out = model(pixel_values=pixel_values, labels=labels)
    log_probs = out.logits.log_softmax(-1)
    picked = [-log_probs[b, t, labels[b, t]] for b in range(2) for t in range(4) if labels[b, t] != -100]
    torch.testing.assert_close(out.loss, torch.stack(picked).mean())
    # What sits under -100 changes nothing.
    with torch.no_grad():
        other = model(pixel_values=pixel_values, labels=labels,
                      decoder_input_ids=model.prepare_decoder_input_ids_from_labels(labels))
    torch.testing.assert_close(out.loss, other.loss)
    # Trainer's gradient accumulation passes the token count of the whole accumulated batch.
    with torch.no_grad():
        summed = model(pixel_values=pixel_values, labels=labels, num_items_in_batch=torch.tensor(12))
    torch.testing.assert_close(summed.loss, torch.stack(picked).sum() / 12)


def test_vision_tower_frozen_and_bridge_trainable_by_default(model):
    trainable = {name for name, p in model.named_parameters() if p.requires_grad}
    assert "encoder.bridge.weight" in trainable
    assert not any(name.startswith(("encoder.vision_tower", "encoder.visual_projection")) for name in trainable)


def test_image_features_from_encode_vision_give_the_loss_of_pixels(model):
    """What `cache_vision_features` stores (`encode_vision`) is what `forward(image_features=...)` takes."""
    pixel_values, labels = torch.randn(2, 3, 32, 32), torch.tensor([[5, 6, 1], [7, 1, -100]])
    with torch.no_grad():
        image_features = model.get_encoder().encode_vision(pixel_values).last_hidden_state
        from_features = model(image_features=image_features, labels=labels)
        from_pixels = model(pixel_values=pixel_values, labels=labels)
    assert image_features.shape == (2, model.config.num_image_tokens, model.config.image_token_dim)
    torch.testing.assert_close(from_features.loss, from_pixels.loss, rtol=0, atol=0)
    torch.testing.assert_close(from_features.encoder_last_hidden_state, from_pixels.encoder_last_hidden_state)


def test_the_config_decides_what_trains_at_construction_and_after_loading(model, tmp_path):
    model.save_pretrained(tmp_path)
    for freeze_vision, modules in ((True, ["bridge"]), (False, ["vision_tower", "visual_projection", "bridge"])):
        loaded = LoraCaptionerForConditionalGeneration.from_pretrained(tmp_path, freeze_vision=freeze_vision)
        assert loaded.trainable_image_modules == modules
        trainable = {name.split(".")[1] for name, p in loaded.encoder.named_parameters(prefix="encoder")
                     if p.requires_grad}
        assert trainable == set(modules)
        assert all(p.requires_grad for p in loaded.decoder.parameters())


def test_without_clip_projection_bridge_maps_raw_patch_tokens(tokenizer_len=99):
    config = LoraCaptionerConfig(vision_config=tiny_vision_config(), text_config=tiny_text_config(tokenizer_len),
                                 use_clip_projection=False)
    model = LoraCaptionerForConditionalGeneration(config)
    assert model.encoder.visual_projection is None
    assert model.encoder.bridge.in_features == config.vision_config.hidden_size
    tokens = model.get_encoder()(torch.randn(1, 3, 32, 32)).last_hidden_state
    assert tokens.shape == (1, 16, config.text_config.d_model)


def test_config_round_trip(tmp_path):
    config = LoraCaptionerConfig(vision_config=tiny_vision_config(), text_config=tiny_text_config(77),
                                 drop_cls_token=False)
    config.save_pretrained(tmp_path)
    loaded = LoraCaptionerConfig.from_pretrained(tmp_path)
    assert loaded.to_dict() == config.to_dict()
    assert loaded.vision_config.projection_dim == 24 and loaded.text_config.vocab_size == 77
    assert loaded.num_image_tokens == 17
    assert LoraCaptionerConfig.from_dict(config.to_dict()).to_dict() == config.to_dict()


def test_default_config_is_clip_vit_b16_and_flan_t5_base():
    config = LoraCaptionerConfig()
    assert (config.vision_config.hidden_size, config.vision_config.patch_size, config.vision_config.projection_dim) == (768, 16, 512)
    assert (config.text_config.d_model, config.text_config.num_decoder_layers) == (768, 12)
    assert config.num_image_tokens == 196 and config.image_token_dim == 512


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(vision_config=tiny_vision_config(projection_dim=0)), "projection_dim"),
        (dict(vision_config=tiny_vision_config(image_size=30)), "multiple of"),
        (dict(text_config=tiny_text_config(10, num_decoder_layers=0)), "num_decoder_layers"),
        (dict(vision_config="clip"), "vision_config"),
    ],
)
def test_inconsistent_config_raises_value_error(kwargs, message):
    with pytest.raises(ValueError, match=message):
        LoraCaptionerConfig(**kwargs)


def test_weights_are_not_reinitialised_on_load(model, tmp_path):
    """transformers 5 initialises whatever a checkpoint did not fill: loaded tensors must come back bit-exact."""
    model.save_pretrained(tmp_path)
    for _ in range(2):
        loaded = LoraCaptionerForConditionalGeneration.from_pretrained(tmp_path)
        for name, tensor in model.state_dict().items():
            assert torch.equal(loaded.state_dict()[name], tensor), name


def test_fresh_model_initialises_its_own_layers():
    config = LoraCaptionerConfig(vision_config=tiny_vision_config(), text_config=tiny_text_config(50))
    torch.manual_seed(0)
    model = LoraCaptionerForConditionalGeneration(config)
    assert model.encoder.bridge.bias.abs().max() == 0
    std = model.encoder.bridge.weight.std().item()
    assert 0.5 * 24**-0.5 < std < 1.5 * 24**-0.5
    assert torch.isfinite(torch.cat([p.flatten() for p in model.parameters()])).all()


CAPTION_INPUTS = dict(decoder_input_ids=torch.tensor([[0, 5, 9, 12], [0, 7, 8, 1]]))


def _has_cache(output) -> bool:
    return bool({"cache", "past_key_values"} & set(output.keys()))  # its name depends on the transformers version


def test_config_output_flags_and_use_cache_are_forward_defaults(model):
    """`model.config.output_hidden_states = True`, as users and libraries set it, is what forward does unless told."""
    model.set_attn_implementation("eager")  # attentions can be output only from eager attention
    inputs = dict(pixel_values=torch.randn(2, 3, 32, 32), **CAPTION_INPUTS)
    with torch.no_grad():
        plain = model(**inputs)
    assert plain.encoder_hidden_states is None and plain.decoder_attentions is None and _has_cache(plain)

    model.config.output_attentions = model.config.output_hidden_states = True
    model.config.use_cache = False
    with torch.no_grad():
        told_by_config = model(**inputs)
        told_by_arguments = model(**inputs, output_attentions=False, output_hidden_states=False, use_cache=True)
    vision_layers, decoder_layers = model.config.vision_config.num_hidden_layers, model.config.text_config.num_layers
    assert len(told_by_config.encoder_hidden_states) == vision_layers + 1
    assert len(told_by_config.encoder_attentions) == vision_layers
    assert len(told_by_config.decoder_hidden_states) == decoder_layers + 1
    assert len(told_by_config.decoder_attentions) == len(told_by_config.cross_attentions) == decoder_layers
    assert not _has_cache(told_by_config)
    # An argument still wins over the config.
    assert told_by_arguments.encoder_hidden_states is None and told_by_arguments.cross_attentions is None
    assert _has_cache(told_by_arguments)


def test_return_dict_false_gives_a_tuple(model):
    inputs = dict(pixel_values=torch.randn(2, 3, 32, 32), labels=CAPTION_INPUTS["decoder_input_ids"])
    with torch.no_grad():
        as_dict = model(**inputs)
        as_tuple = model(**inputs, return_dict=False)
        model.config.return_dict = False
        by_config = model(**inputs)
    assert isinstance(as_tuple, tuple) and isinstance(by_config, tuple)
    torch.testing.assert_close(as_tuple[0], as_dict.loss)
    torch.testing.assert_close(as_tuple[1], as_dict.logits)
    torch.testing.assert_close(by_config[1], as_dict.logits)


def test_decoder_runs_on_the_configs_own_text_config(model):
    """`model.config.text_config` is the decoder's config: a change to it reaches the decoder."""
    assert model.decoder.config is model.config.text_config
    model.config.text_config.use_cache = False
    with torch.no_grad():
        output = model(pixel_values=torch.randn(2, 3, 32, 32), **CAPTION_INPUTS)
    assert not _has_cache(output)


@pytest.mark.skipif("cache" not in Seq2SeqLMOutput.__dataclass_fields__,
                    reason="before transformers 5.24 `past_key_values` is the cache's only name")
def test_past_key_values_still_works_with_a_deprecation_warning(model):
    ids = CAPTION_INPUTS["decoder_input_ids"]
    with torch.no_grad():
        image_tokens = model.get_encoder()(torch.randn(2, 3, 32, 32))
        full = model(encoder_outputs=image_tokens, decoder_input_ids=ids, use_cache=False).logits
        cache = model(encoder_outputs=image_tokens, decoder_input_ids=ids[:, :3], use_cache=True).cache
        with pytest.warns(FutureWarning, match="`past_key_values` is deprecated"):
            old_name = model(encoder_outputs=image_tokens, decoder_input_ids=ids[:, 3:],
                             past_key_values=copy.deepcopy(cache)).logits
        new_name = model(encoder_outputs=image_tokens, decoder_input_ids=ids[:, 3:], cache=copy.deepcopy(cache)).logits
    torch.testing.assert_close(old_name, new_name, rtol=0, atol=0)
    torch.testing.assert_close(old_name[:, -1], full[:, -1], rtol=1e-5, atol=1e-5)  # the cache was used, not dropped


def test_weights_missing_from_a_checkpoint_get_clip_and_t5s_own_initialisation(model, tmp_path):
    """transformers initialises what a checkpoint lacks with `_init_weights`: CLIP's and T5's own schemes, as their
    classes give them (CLIP's q_proj is not N(0, 0.02); T5's q is not N(0, 1))."""
    clip_q = "encoder.vision_tower.encoder.layers.0.self_attn.q_proj.weight"
    t5_q = "decoder.block.0.layer.0.SelfAttention.q.weight"
    model.save_pretrained(tmp_path)
    saved = load_file(tmp_path / "model.safetensors")
    save_file({name: tensor for name, tensor in saved.items() if name not in (clip_q, t5_q)},
              tmp_path / "model.safetensors", metadata={"format": "pt"})
    torch.manual_seed(0)
    loaded = LoraCaptionerForConditionalGeneration.from_pretrained(tmp_path)
    clip = CLIPVisionModel(model.config.vision_config)
    t5_decoder = T5Stack(copy.deepcopy(model.config.text_config))
    own_schemes = {clip_q: clip.encoder.layers[0].self_attn.q_proj.weight,
                   t5_q: t5_decoder.block[0].layer[0].SelfAttention.q.weight}
    for name, reference in own_schemes.items():
        ratio = loaded.state_dict()[name].std().item() / reference.std().item()
        assert 0.8 < ratio < 1.25, (name, ratio)
    for name, tensor in saved.items():  # and everything the checkpoint had stays as it was
        if name not in own_schemes:
            assert torch.equal(loaded.state_dict()[name], tensor), name
