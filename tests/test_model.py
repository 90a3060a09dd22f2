"""The composition changes nothing: each half computes what transformers' own classes compute."""

import pytest
import torch
from transformers import CLIPVisionModelWithProjection, T5ForConditionalGeneration
from transformers.modeling_outputs import BaseModelOutput

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
