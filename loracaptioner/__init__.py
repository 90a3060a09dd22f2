"""LoraCaptioner: a frozen CLIP vision tower, a trainable bridge and a LoRA-adapted T5 decoder that writes captions."""

from transformers import AutoConfig, AutoModel, AutoModelForImageTextToText, AutoProcessor

from .remote_code.configuration_loracaptioner import LoraCaptionerConfig
from .hub import push_to_hub, save_for_hub
from .remote_code.modeling_loracaptioner import LoraCaptionerForConditionalGeneration
from .remote_code.processing_loracaptioner import LoraCaptionerProcessor

__version__ = "0.1.0"

# Every save_pretrained() folder carries the three code files and an `auto_map`, so it loads anywhere with
# trust_remote_code=True. A class registers for one Auto class; the config's auto_map adds `AutoModel` by hand.
LoraCaptionerConfig.register_for_auto_class()
LoraCaptionerForConditionalGeneration.register_for_auto_class("AutoModelForImageTextToText")
LoraCaptionerProcessor.register_for_auto_class()

# With the package imported, the Auto classes know the model type without remote code.
AutoConfig.register(LoraCaptionerConfig.model_type, LoraCaptionerConfig, exist_ok=True)
AutoModel.register(LoraCaptionerConfig, LoraCaptionerForConditionalGeneration, exist_ok=True)
AutoModelForImageTextToText.register(LoraCaptionerConfig, LoraCaptionerForConditionalGeneration, exist_ok=True)
AutoProcessor.register(LoraCaptionerConfig, LoraCaptionerProcessor, exist_ok=True)

__all__ = [
    "LoraCaptionerConfig",
    "LoraCaptionerForConditionalGeneration",
    "LoraCaptionerProcessor",
    "push_to_hub",
    "save_for_hub",
    "__version__",
]
