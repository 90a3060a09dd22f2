"""Configuration of LoraCaptioner: a CLIP vision tower, a linear bridge and a T5 decoder."""

from transformers import CLIPVisionConfig, PreTrainedConfig, T5Config

# The backbones whose shapes the defaults below have, and which `from_backbones` loads unless told otherwise.
DEFAULT_VISION_MODEL, DEFAULT_TEXT_MODEL = "openai/clip-vit-base-patch16", "google/flan-t5-base"


class LoraCaptionerConfig(PreTrainedConfig):
    r"""
    Composite configuration: `vision_config` (a [`CLIPVisionConfig`]) and `text_config` (a [`T5Config`]) are the two
    backbones as they are; the fields below describe only the bridge between them.

    The defaults reproduce the original LoraCaptioner: the patch tokens of CLIP ViT-B/16 without the CLS token, after
    the tower's final LayerNorm and CLIP's visual projection (768 -> 512), are mapped by one `Linear(512 -> d_model)`
    into Flan-T5-base's decoder, which cross-attends to them. The T5 text encoder is never built.

    Args:
        vision_config (`CLIPVisionConfig` or `dict`, *optional*): the CLIP vision tower (default: ViT-B/16).
        text_config (`T5Config` or `dict`, *optional*): the T5 model whose decoder writes captions (default: Flan-T5-base).
        use_clip_projection (`bool`, defaults to `True`): pass patch tokens through CLIP's visual projection
            (`hidden_size -> projection_dim`) before the bridge. `False` bridges the raw `hidden_size` tokens.
        drop_cls_token (`bool`, defaults to `True`): drop CLIP's CLS token, keeping only the patch tokens.
        freeze_vision (`bool`, defaults to `True`): keep the vision tower (and CLIP's projection) frozen.
    """

    model_type = "loracaptioner"
    sub_configs = {"vision_config": CLIPVisionConfig, "text_config": T5Config}

    def __init__(
        self,
        vision_config: CLIPVisionConfig | dict | None = None,
        text_config: T5Config | dict | None = None,
        use_clip_projection: bool = True,
        drop_cls_token: bool = True,
        freeze_vision: bool = True,
        **kwargs,
    ):
        if vision_config is None:
            vision_config = CLIPVisionConfig(patch_size=16)  # ViT-B/16: in all else CLIP's defaults (ViT-B/32)
        elif isinstance(vision_config, dict):
            vision_config = CLIPVisionConfig(**{k: v for k, v in vision_config.items() if k != "model_type"})
        if text_config is None:
            text_config = T5Config(
                d_model=768, d_ff=2048, d_kv=64, num_heads=12, num_layers=12, num_decoder_layers=12,
                feed_forward_proj="gated-gelu", vocab_size=32128, tie_word_embeddings=False,
                decoder_start_token_id=0,
            )
        elif isinstance(text_config, dict):
            text_config = T5Config(**{k: v for k, v in text_config.items() if k != "model_type"})
        if not isinstance(vision_config, CLIPVisionConfig):
            raise ValueError(f"vision_config must be a CLIPVisionConfig or a dict, got {type(vision_config).__name__}")
        if not isinstance(text_config, T5Config):
            raise ValueError(f"text_config must be a T5Config or a dict, got {type(text_config).__name__}")
        if use_clip_projection and not vision_config.projection_dim:
            raise ValueError("use_clip_projection=True needs vision_config.projection_dim > 0")
        if vision_config.image_size % vision_config.patch_size:
            raise ValueError(
                f"vision_config.image_size ({vision_config.image_size}) must be a multiple of "
                f"vision_config.patch_size ({vision_config.patch_size})"
            )
        if text_config.num_decoder_layers < 1:
            raise ValueError(f"text_config.num_decoder_layers must be >= 1, got {text_config.num_decoder_layers}")

        # The T5 encoder is not part of this model: text_config describes the decoder the model builds from it (the
        # same object, so later changes reach it), and its depth is what generate() sizes the key/value cache by.
        text_config.num_layers = text_config.num_decoder_layers
        text_config.is_decoder = text_config.is_encoder_decoder = True
        self.vision_config = vision_config
        self.text_config = text_config
        self.use_clip_projection = use_clip_projection
        self.drop_cls_token = drop_cls_token
        self.freeze_vision = freeze_vision
        # The decoder's special tokens are generate()'s too; lm_head is a weight of its own (never tied).
        for name in ("pad_token_id", "eos_token_id"):
            kwargs.setdefault(name, getattr(text_config, name))
        kwargs.setdefault("decoder_start_token_id", getattr(text_config, "decoder_start_token_id", None) or 0)
        kwargs["is_encoder_decoder"] = True
        kwargs["tie_word_embeddings"] = False
        super().__init__(**kwargs)

    @property
    def image_token_dim(self) -> int:
        """Width of the vision tokens that enter the bridge."""
        return self.vision_config.projection_dim if self.use_clip_projection else self.vision_config.hidden_size

    @property
    def num_image_tokens(self) -> int:
        """How many tokens the decoder cross-attends to for one image."""
        num_patches = (self.vision_config.image_size // self.vision_config.patch_size) ** 2
        return num_patches if self.drop_cls_token else num_patches + 1


__all__ = ["DEFAULT_TEXT_MODEL", "DEFAULT_VISION_MODEL", "LoraCaptionerConfig"]
