"""int8 inference through torchao, the way transformers loads quantized models:

    from loracaptioner.quantization import quantization_config
    model = AutoModelForImageTextToText.from_pretrained(folder, trust_remote_code=True, dtype=torch.float32,
                                                        quantization_config=quantization_config("int8"))

(`loracaptioner caption --quantize int8` does this.) The image encoder's linear layers (CLIP's and the bridge) hold
torchao int8 weights and multiply int8 activations, scaled per token at run time; the decoder and its output layer
stay in float32. The image encoder is where the work is (at batch 8, greedy, 20 tokens), and where int8 pays: on an
AVX-512 VNNI CPU the decoder in int8 was no faster (each of its small products quantizes its activations first,
eagerly) and its captions drifted further from float32's. A quantized model saves with `save_pretrained` and loads
back with `from_pretrained(folder, trust_remote_code=True)` alone, where torchao is installed: its config.json
carries the quantization config.

torchao is an optional dependency: `pip install 'loracaptioner[int8]'`. Which path is fastest depends on the CPU (see
the README, "Which path on which hardware"): where bfloat16 is fast, it beats int8.
"""

from __future__ import annotations

import copy
import functools

import torch
from torch import nn

QUANTIZATIONS = ("none", "int8")
TORCHAO_REQUIREMENT = "torchao>=0.18"
INSTALL_HINT = "pip install 'loracaptioner[int8]'"
# Layers left in float32 (see above); named here so that from_pretrained and `quantize` (a model already in memory)
# leave out the very same layers.
MODULES_TO_NOT_CONVERT = ["decoder", "lm_head"]


def require_torchao() -> None:
    """An `ImportError` that says how to install torchao, unless a recent enough one is installed."""
    try:
        import torchao
    except ImportError:
        raise ImportError(f"int8 needs torchao: {INSTALL_HINT}") from None
    if tuple(int(part) for part in torchao.__version__.split(".")[:2] if part.isdigit()) < (0, 18):
        raise ImportError(f"int8 needs {TORCHAO_REQUIREMENT} (torchao {torchao.__version__} is installed): "
                          f"{INSTALL_HINT}")


def torchao_config(name: str):
    """torchao's own config for `name` (an `AOBaseConfig`)."""
    if name not in QUANTIZATIONS or name == "none":
        raise ValueError(f"unknown quantization {name!r}; one of {', '.join(QUANTIZATIONS[1:])}")
    require_torchao()
    from torchao.quantization import Int8DynamicActivationInt8WeightConfig

    # int8 weights and int8 activations (scaled per token at run time): int8 x int8 matrix products (aten._int_mm).
    # int8 weights alone (Int8WeightOnlyConfig) turn back into float before every product: measured no faster than
    # float32, and slower than bfloat16 alone.
    return Int8DynamicActivationInt8WeightConfig()


def quantization_config(name: str):
    """`transformers.TorchAoConfig` for `from_pretrained(..., quantization_config=...)`."""
    from transformers import TorchAoConfig

    return TorchAoConfig(torchao_config(name), modules_to_not_convert=list(MODULES_TO_NOT_CONVERT))


def quantize(model: nn.Module, name: str) -> nn.Module:
    """`model`, already in memory (say, with an adapter merged into it), quantized in place as `from_pretrained(...,
    quantization_config=quantization_config(name))` quantizes the same weights while loading them. For captioning:
    its config does not say it is quantized, so to save an int8 model, save the float one and load it with
    `quantization_config` (then `save_pretrained`)."""
    from torchao.quantization import quantize_
    from transformers.quantizers.quantizers_utils import should_convert_module

    def converted(module: nn.Module, module_name: str) -> bool:  # as from_pretrained: Linear weights not skipped
        return isinstance(module, nn.Linear) and should_convert_module(f"{module_name}.weight", MODULES_TO_NOT_CONVERT)

    with torch.no_grad():
        quantize_(model, torchao_config(name), filter_fn=converted)
    return model


@functools.cache
def int8_speedup(device: torch.device) -> float:
    """How many times faster `name="int8"` linear layers run than float32 ones on `device` (a CPU), on the model's
    shapes (`loading.PROBE_SHAPES`, `loading.relative_speed`; once per process). Measured on a 2-core AMD EPYC with
    AVX2 only (torch capability AVX2): 0.04-0.25x, where torchao's int8 products have no fast kernel."""
    from .loading import PROBE_SHAPES, relative_speed

    generator = torch.Generator().manual_seed(0)
    layers = nn.ModuleList(nn.Linear(width, out, bias=False) for _, width, out in PROBE_SHAPES).to(device)
    quantized = quantize(copy.deepcopy(layers), "int8")
    inputs = [torch.randn(rows, width, generator=generator).to(device) for rows, width, _ in PROBE_SHAPES]

    def run(modules: nn.ModuleList):
        return lambda: [module(x) for module, x in zip(modules, inputs)]

    return relative_speed(run(layers), run(quantized), device)
