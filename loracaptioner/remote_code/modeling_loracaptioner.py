"""LoraCaptioner: CLIP vision tower -> linear bridge -> T5 decoder, composed from transformers' own classes.

Where things happen:
  * image -> tokens: `LoraCaptionerImageEncoder.forward`: `encode_vision` (CLIP patch tokens -> final LayerNorm -> CLIP
    projection; frozen unless `config.freeze_vision` is False, so its output can be cached) -> `bridge`
  * tokens -> caption: the T5 decoder stack (`T5Stack`) cross-attends to the image tokens; `lm_head` picks the words.
The T5 *text encoder* is never built: the image encoder takes its place, so `generate()` treats this exactly like an
encoder-decoder model whose encoder input is `pixel_values`.
"""

import torch
from torch import nn
from transformers import CLIPVisionModel, CLIPVisionModelWithProjection, GenerationMixin, PreTrainedModel
from transformers import initialization as init
from transformers.cache_utils import EncoderDecoderCache
from transformers.modeling_outputs import BaseModelOutput, Seq2SeqLMOutput
from transformers.models.t5.modeling_t5 import T5ForConditionalGeneration, T5LayerCrossAttention, T5Stack
from transformers.utils.deprecation import deprecate_kwarg
from transformers.utils.generic import can_return_tuple, merge_with_config_defaults

from .configuration_loracaptioner import DEFAULT_TEXT_MODEL, DEFAULT_VISION_MODEL, LoraCaptionerConfig

# Caption-sized output (the original stopped at T5's 20 tokens) and no 3-gram twice. Measured (demo/degeneration.py):
# it changes none of the demo LoRA model's held-out captions (none repeats); on demo models that do repeat, it cuts
# repeating captions from ~30% to ~1% with no caption more right. It ends a repetition only once </s> is the best
# token left (tests/test_generation.py); what it costs captions that repeat a phrase legitimately was not measured.
CAPTION_GENERATION_DEFAULTS = {"max_new_tokens": 32, "no_repeat_ngram_size": 3}
# transformers 5.24 renamed the decoder cache argument/output `past_key_values` -> `cache`; speak whichever it speaks.
_CACHE = "cache" if "cache" in Seq2SeqLMOutput.__dataclass_fields__ else "past_key_values"
# `forward(past_key_values=...)` becomes `cache=`: with the FutureWarning T5's own forward gives from 5.24 on (until
# 5.40); silently before 5.24, whose generate() passes `past_key_values` (a deprecation "since 5.0" never warns).
_OLD_CACHE_NAME = deprecate_kwarg("past_key_values", "5.40.0" if _CACHE == "cache" else "5.0", new_name="cache")


class LoraCaptionerImageEncoder(nn.Module):
    """Pixels -> image tokens of the decoder's width: the encoder that `generate()` runs once per image."""

    main_input_name = "pixel_values"

    def __init__(self, config: LoraCaptionerConfig):
        super().__init__()
        vision = config.vision_config
        self.drop_cls_token = config.drop_cls_token
        self.vision_tower = CLIPVisionModel._from_config(vision)
        # CLIP's own visual projection (768 -> 512 in ViT-B/16), applied to every patch token instead of only CLS.
        self.visual_projection = (
            nn.Linear(vision.hidden_size, vision.projection_dim, bias=False) if config.use_clip_projection else None
        )
        # The one new piece: map vision tokens into the T5 decoder's hidden size.
        self.bridge = nn.Linear(config.image_token_dim, config.text_config.d_model)

    def encode_vision(self, pixel_values: torch.Tensor, **flags) -> BaseModelOutput:
        """The vision part, frozen unless `config.freeze_vision` is False: pixels -> CLIP tower -> final LayerNorm ->
        CLIP projection. Its `last_hidden_state` ("image features") is what `forward(image_features=...)` takes."""
        # A frozen tower runs without autograd unless the pixels want gradients. `enable_input_require_grads` (peft
        # with activation checkpointing, the Trainer with adapters) hooks every sub-model's input embeddings, CLIP's
        # patch embedding too: the tower would be recorded for a backward that trains nothing in it (at full size
        # ~4x the backward FLOPs of a LoRA step, ~1.9x the saved activations).
        record = torch.is_grad_enabled() and (pixel_values.requires_grad or self.vision_trains)
        with torch.set_grad_enabled(record):
            vision_outputs = self.vision_tower(pixel_values=pixel_values.to(self.bridge.weight.dtype), **flags)
            image_features = vision_outputs.last_hidden_state[:, int(self.drop_cls_token) :]
            image_features = self.vision_tower.post_layernorm(image_features)
            if self.visual_projection is not None:
                image_features = self.visual_projection(image_features)
        return BaseModelOutput(image_features, vision_outputs.hidden_states, vision_outputs.attentions)

    @property
    def vision_trains(self) -> bool:
        """Whether any weight of the vision part (CLIP tower, projection, adapters placed in them) trains."""
        modules = [self.vision_tower] + ([self.visual_projection] if self.visual_projection is not None else [])
        return any(parameter.requires_grad for module in modules for parameter in module.parameters())

    @can_return_tuple
    def forward(self, pixel_values: torch.Tensor | None = None, output_attentions: bool | None = None,
                output_hidden_states: bool | None = None, image_features: torch.Tensor | None = None,
                **kwargs) -> BaseModelOutput:
        """Image tokens from `pixel_values`, or from `image_features` (`encode_vision`'s output, e.g. cached)."""
        vision = BaseModelOutput(image_features)
        if image_features is None:
            vision = self.encode_vision(pixel_values, output_attentions=output_attentions,
                                        output_hidden_states=output_hidden_states)
        image_tokens = self.bridge(vision.last_hidden_state.to(self.bridge.weight.dtype))
        return BaseModelOutput(image_tokens, vision.hidden_states, vision.attentions)


class LoraCaptionerCrossAttention(T5LayerCrossAttention):
    """T5's cross-attention layer, for decoder rows that share an image.

    `generate()` with `num_beams` or `num_return_sequences` k runs k decoder rows per image; this model keeps the image
    tokens once per image (`_expand_inputs_for_generation`), and here an image's k rows attend to them together, as one
    row of k times the queries. Cross-attention has no position bias and no causal mask, so each query meets the same
    keys and values as it would alone, but those are projected and cached once per image instead of k times (batch 8,
    4 beams, full size: 12 layers x 8 x 196 x 768 keys and values instead of x 32). With one row per image (training,
    greedy search) this is T5's layer unchanged."""

    def forward(self, hidden_states, key_value_states, attention_mask=None, position_bias=None, **kwargs):
        # No branch on the shapes (one row per image folds to itself), so that an export traced with beams keeps this.
        rows, length = hidden_states.shape[:2]
        images = key_value_states.shape[0]
        if rows % images:
            raise ValueError(f"{rows} decoder rows cannot share {images} images' tokens: not a multiple.")
        share = rows // images
        # Row i*share + j of image i becomes queries j*length ... j*length + length - 1 of row i.
        if attention_mask is not None and attention_mask.shape[-2] > 1:  # a mask per image, (images, 1, length, tokens)
            attention_mask = attention_mask.repeat(1, 1, share, 1)
        folded = hidden_states.reshape(images, share * length, hidden_states.shape[-1])
        output, position_bias, weights = super().forward(folded, key_value_states, attention_mask, position_bias,
                                                         **kwargs)
        if weights is not None and share > 1:  # (images, heads, share * length, tokens) -> (rows, heads, length, ...)
            weights = weights.unflatten(2, (share, length)).transpose(1, 2).flatten(0, 1)
        return output.reshape(rows, length, output.shape[-1]), position_bias, weights


class LoraCaptionerForConditionalGeneration(PreTrainedModel, GenerationMixin):
    """
    Image captioner: `encoder` (CLIP vision tower + bridge) turns pixels into image tokens, `decoder` (a T5 decoder
    stack) with `lm_head` writes the caption while cross-attending to them.

    Works with `generate()` (greedy, beam search, sampling; the image is encoded once), the `Trainer` (`labels` with
    -100 ignored) and peft LoRA (target the decoder's `SelfAttention.q`, `EncDecAttention.k`, `DenseReluDense.wi_0`...).
    """

    config_class = LoraCaptionerConfig
    base_model_prefix = "loracaptioner"
    main_input_name = "pixel_values"
    input_modalities = ("image", "text")
    supports_gradient_checkpointing = True
    _supports_sdpa = True
    _supports_flex_attn = True
    _can_compile_fullgraph = True
    _no_split_modules = ["CLIPEncoderLayer", "T5Block"]
    _keep_in_fp32_modules = []

    def __init__(self, config: LoraCaptionerConfig):
        super().__init__(config)
        self.encoder = LoraCaptionerImageEncoder(config)
        self.decoder = T5Stack(config.text_config)  # the config's own text_config, set up as a decoder there
        for index, block in enumerate(self.decoder.block):  # same weights and names; an image's beams attend together
            block.layer[1] = LoraCaptionerCrossAttention(config.text_config, layer_idx=index)
        self.lm_head = nn.Linear(config.text_config.d_model, config.text_config.vocab_size, bias=False)
        # Original T5 (v1.0) scales the decoder output before its tied LM head; T5 v1.1 / Flan-T5 does not.
        self.scale_decoder_outputs = bool(getattr(config.text_config, "scale_decoder_outputs", False))
        self.post_init()
        for name, value in CAPTION_GENERATION_DEFAULTS.items():
            setattr(self.generation_config, name, value)
        self.freeze_vision()

    def save_pretrained(self, save_directory, *args, **kwargs) -> None:
        # A class registers for one Auto class (AutoModelForImageTextToText); AutoModel is written here by hand.
        if self._auto_class is not None:
            auto_map = getattr(self.config, "auto_map", None) or {}
            self.config.auto_map = {**auto_map, "AutoModel": f"modeling_loracaptioner.{type(self).__name__}"}
        super().save_pretrained(save_directory, *args, **kwargs)

    @property
    def trainable_image_modules(self) -> list[str]:
        """The image encoder's modules that train (in full): the bridge, and the CLIP tower and projection unless
        `config.freeze_vision`. With peft, a LoRA config's `modules_to_save`."""
        names = ["bridge"] if self.config.freeze_vision else ["vision_tower", "visual_projection", "bridge"]
        return [name for name in names if getattr(self.encoder, name) is not None]

    def freeze_vision(self) -> None:
        """Apply `config.freeze_vision` (on construction, loading): freeze the encoder's modules that do not train."""
        for name, module in self.encoder.named_children():
            module.requires_grad_(name in self.trainable_image_modules)

    @classmethod
    def from_pretrained(cls, *args, **kwargs) -> PreTrainedModel:
        loaded = super().from_pretrained(*args, **kwargs)  # (model, loading info) with output_loading_info=True
        (loaded[0] if isinstance(loaded, tuple) else loaded).freeze_vision()  # loading drops requires_grad flags
        return loaded

    def initialize_weights(self) -> None:
        # CLIP and T5 by their own schemes: inside a custom-code model transformers would skip their module-level inits
        # (CLIPAttention's q_proj, T5Attention's q...). What a checkpoint filled stays, here as in `_init_weights`.
        self.encoder.vision_tower.initialize_weights()
        self.decoder.initialize_weights()
        super().initialize_weights()

    @torch.no_grad()
    def _init_weights(self, module: nn.Module) -> None:
        # Our own layers only; `transformers.initialization` skips every tensor loaded from a checkpoint.
        if module is self.lm_head:
            init.normal_(module.weight, mean=0.0, std=self.config.text_config.initializer_factor)
        elif isinstance(module, nn.Linear):
            init.normal_(module.weight, mean=0.0, std=module.in_features**-0.5)
            if module.bias is not None:
                init.zeros_(module.bias)

    def get_encoder(self, modality: str | None = None) -> LoraCaptionerImageEncoder:
        return self.encoder

    def get_decoder(self) -> T5Stack:
        return self.decoder

    def get_input_embeddings(self) -> nn.Embedding:
        return self.decoder.embed_tokens

    def set_input_embeddings(self, value: nn.Embedding) -> None:
        self.decoder.embed_tokens = value

    def get_output_embeddings(self) -> nn.Linear:
        return self.lm_head

    def set_output_embeddings(self, value: nn.Linear) -> None:
        self.lm_head = value

    @classmethod
    def from_backbones(cls, vision_model_name_or_path: str = DEFAULT_VISION_MODEL,
                       text_model_name_or_path: str = DEFAULT_TEXT_MODEL, **config_kwargs) -> PreTrainedModel:
        """Build a LoraCaptioner from a pretrained CLIP checkpoint (a full CLIP model or a vision tower) and a T5
        checkpoint (Hub ids or local folders). The bridge is newly initialised; the T5 encoder is dropped."""
        clip = CLIPVisionModelWithProjection.from_pretrained(vision_model_name_or_path)
        t5 = T5ForConditionalGeneration.from_pretrained(text_model_name_or_path)
        config = cls.config_class(vision_config=clip.config, text_config=t5.config, **config_kwargs)
        model = cls(config)
        model.encoder.vision_tower.load_state_dict(clip.vision_model.state_dict())
        if model.encoder.visual_projection is not None:
            model.encoder.visual_projection.load_state_dict(clip.visual_projection.state_dict())
        model.decoder.load_state_dict(t5.decoder.state_dict())
        model.lm_head.load_state_dict(t5.lm_head.state_dict())
        return model

    def prepare_decoder_input_ids_from_labels(self, labels: torch.Tensor) -> torch.Tensor:
        """Teacher forcing: labels shifted right behind the decoder start token, -100 replaced by padding."""
        decoder_input_ids = labels.new_full(labels.shape, self.config.decoder_start_token_id)
        decoder_input_ids[:, 1:] = labels[:, :-1]
        return decoder_input_ids.masked_fill(decoder_input_ids == -100, self.config.pad_token_id)

    def _expand_inputs_for_generation(self, expand_size: int = 1, is_encoder_decoder: bool = False, input_ids=None,
                                      **model_kwargs):
        """`generate()` repeats every input `expand_size` times (`num_beams`, `num_return_sequences`): all but the image
        tokens here, which stay once per image for `LoraCaptionerCrossAttention`."""
        encoder_outputs = model_kwargs.pop("encoder_outputs", None)
        input_ids, model_kwargs = GenerationMixin._expand_inputs_for_generation(self, expand_size, False, input_ids,
                                                                                **model_kwargs)
        if encoder_outputs is not None:
            model_kwargs["encoder_outputs"] = encoder_outputs
        return input_ids, model_kwargs

    def _reorder_cache(self, cache, beam_idx: torch.LongTensor):
        """Beam search's per-step cache reorder (`generate()` calls this hook when a model has it): the self-attention
        cache only. A beam only ever takes over a beam of the same image, and the cross-attention keys/values are the
        image's: held once per image (`LoraCaptionerCrossAttention`), or, where a caller repeated the image tokens for
        each beam, the same on all of them. Either way they stay as they are; reordering repeated ones would copy the
        cache's largest tensors at every step for nothing."""
        if isinstance(cache, EncoderDecoderCache):
            cache.self_attention_cache.reorder_cache(beam_idx)
        else:
            cache.reorder_cache(beam_idx)
        return cache

    @can_return_tuple  # `return_dict` (argument, else config)
    @merge_with_config_defaults  # `use_cache` (argument, else config, else the decoder's own config)
    @_OLD_CACHE_NAME
    def forward(
        self,
        pixel_values: torch.Tensor | None = None,
        decoder_input_ids: torch.LongTensor | None = None,
        decoder_attention_mask: torch.Tensor | None = None,
        encoder_outputs: BaseModelOutput | tuple | None = None,
        image_features: torch.Tensor | None = None,
        cache=None,
        decoder_inputs_embeds: torch.Tensor | None = None,
        labels: torch.LongTensor | None = None,
        use_cache: bool | None = None,
        output_attentions: bool | None = None,
        output_hidden_states: bool | None = None,
        **kwargs,
    ) -> Seq2SeqLMOutput:
        r"""
        pixel_values: `(batch, 3, H, W)` images from the processor; ignored when `encoder_outputs` is given.
        image_features: `(batch, tokens, image_token_dim)` from `encoder.encode_vision` (e.g. cached), for pixels.
        labels: `(batch, length)` caption ids; -100 marks positions left out of the loss. When `decoder_input_ids` is
            not given it is made from `labels` (shifted right behind `decoder_start_token_id`).
        cache: the decoder's key/value cache (`past_key_values` before transformers 5.24).
        """
        num_items_in_batch = kwargs.pop("num_items_in_batch", None)
        # Unless given, from this model's config: an explicit None would reach CLIP and T5 as "off".
        flags = {"output_attentions": output_attentions, "output_hidden_states": output_hidden_states}
        flags = {name: getattr(self.config, name) if value is None else value for name, value in flags.items()}
        if encoder_outputs is None:
            if pixel_values is None and image_features is None:
                raise ValueError("LoraCaptioner needs `pixel_values` (or `image_features`, or `encoder_outputs`).")
            encoder_outputs = self.encoder(pixel_values, image_features=image_features, **flags)
        elif not isinstance(encoder_outputs, BaseModelOutput):
            encoder_outputs = BaseModelOutput(*encoder_outputs)
        image_tokens = encoder_outputs.last_hidden_state

        if labels is not None and decoder_input_ids is None and decoder_inputs_embeds is None:
            decoder_input_ids = self.prepare_decoder_input_ids_from_labels(labels)

        decoder_outputs = self.decoder(
            input_ids=decoder_input_ids, attention_mask=decoder_attention_mask, inputs_embeds=decoder_inputs_embeds,
            encoder_hidden_states=image_tokens, use_cache=use_cache, **flags, **{_CACHE: cache},
        )
        sequence_output = decoder_outputs[0]
        if self.scale_decoder_outputs:
            sequence_output = sequence_output * (self.config.text_config.d_model**-0.5)
        logits = self.lm_head(sequence_output)

        loss = None
        if labels is not None:
            # Sum over tokens / tokens in the whole (accumulated) batch when the Trainer tells us that count.
            loss = nn.functional.cross_entropy(
                logits.flatten(0, 1).float(), labels.to(logits.device).flatten(), ignore_index=-100,
                reduction="mean" if num_items_in_batch is None else "sum",
            )
            if num_items_in_batch is not None:
                loss = loss / num_items_in_batch

        return Seq2SeqLMOutput(
            loss=loss, logits=logits, decoder_hidden_states=decoder_outputs.hidden_states,
            decoder_attentions=decoder_outputs.attentions, cross_attentions=decoder_outputs.cross_attentions,
            encoder_last_hidden_state=image_tokens, encoder_hidden_states=encoder_outputs.hidden_states,
            encoder_attentions=encoder_outputs.attentions, **{_CACHE: getattr(decoder_outputs, _CACHE, None)},
        )


__all__ = [
    "CAPTION_GENERATION_DEFAULTS", "LoraCaptionerCrossAttention", "LoraCaptionerForConditionalGeneration",
    "LoraCaptionerImageEncoder",
]
