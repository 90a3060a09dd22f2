"""LoraCaptioner exported through `transformers.exporters` (OpenVINO or ONNX Runtime), and captioning with the export.

`export(model_dir, out_dir)` writes three graphs, each traced by the exporter's own `export()`:
  * `image_encoder`: pixels -> image tokens (CLIP tower, projection, bridge), run once per image;
  * `cross_attention`: image tokens -> every decoder layer's cross-attention keys/values, once per image
    (`CrossAttentionCache`);
  * `decode`: one decoder step on that cache: logits and the grown self-attention cache (`DecodeStep`), the first step
    too, on an empty self-attention cache, so the decoder's weights are in one graph only.
`ExportedCaptioner.from_pretrained(out_dir)` runs them behind transformers' own `generate()` (greedy, beam search,
logits processors, the model's generation defaults), the KV cache held in torch tensors between the graphs.

Measured (bench/export_candidates.md; AMD EPYC, AVX-512 with avx512_bf16 and VNNI, no AMX, 2 cores; full-size random
weights, 20 tokens, one run, medians of 3): OpenVINO bf16 is 1.38x torch bf16 on batch 8 greedy, 1.54x on batch 1 and
1.17x on batch 8 beam 4; OpenVINO fp32 is 1.48x torch fp32 on batch 8 greedy, with identical ids. On an AVX2-only CPU
(bench/results-avx2.md) OpenVINO runs in fp32: 1.42x the naive rebuild on batch 8 greedy, 2.08x on beam 4, 0.65x its
batch-1 latency; ONNX Runtime with dynamic int8 is faster, 2.09x, 2.85x and 0.39x, at 0.55x the naive rebuild's peak
memory, with captions near fp32's (99.3% identical on the demo model), not equal. The `openvino` package is needed to
export and to run (`pip install openvino`, plus `nncf` for `quantize="int8"`).
"""

from __future__ import annotations

import copy
import json
from pathlib import Path

import torch
from torch import nn
from transformers import GenerationMixin, PreTrainedModel
from transformers.cache_utils import DynamicCache, EncoderDecoderCache
from transformers.exporters import ExportedModel
from transformers.modeling_outputs import BaseModelOutput, Seq2SeqLMOutput

from .remote_code.configuration_loracaptioner import LoraCaptionerConfig
from .remote_code.modeling_loracaptioner import LoraCaptionerForConditionalGeneration

BACKENDS = ("openvino", "onnx")
# What to install for a backend: to export (nncf only for int8 with OpenVINO) and to run an export.
INSTALL_HINTS = {"openvino": "pip install 'loracaptioner[openvino]'", "onnx": "pip install 'loracaptioner[onnx]'"}
# Precision OpenVINO computes in, by name. Its CPU plugin picks bf16 by itself on a CPU with avx512_bf16 or AMX.
PRECISIONS = {"fp32": "f32", "bf16": "bf16"}
# What the graphs expect beyond `export.json`: the decoder graphs take an image's tokens and cross-attention cache once
# per image, whatever the beams (exports written before this file took them once per beam, as transformers repeats).
LAYOUT_FILE = "loracaptioner_export.json"
LAYOUT = {"image_tokens": "once per image"}


class CrossAttentionCache(nn.Module):
    """Image tokens -> the cross-attention cache: what a first decoder step stores for every layer, computed by the
    model's own first step (the keys/values depend on the image tokens alone, so tracing keeps only their projections
    of the decoder's weights). Exported apart from the decode graph, the first step can run in that graph on an empty
    self-attention cache, instead of in a graph of its own holding the decoder's weights a second time."""

    def __init__(self, model: LoraCaptionerForConditionalGeneration):
        super().__init__()
        self.model = model

    def forward(self, encoder_outputs: BaseModelOutput) -> DynamicCache:
        tokens = encoder_outputs.last_hidden_state
        start = torch.full((tokens.shape[0], 1), self.model.config.decoder_start_token_id, device=tokens.device)
        outputs = self.model(decoder_input_ids=start, encoder_outputs=encoder_outputs,
                             cache=_empty_cache(self.model.config), use_cache=True)
        return outputs.cache.cross_attention_cache


class DecodeStep(nn.Module):
    """One decoder step on a cache that already holds the cross-attention keys/values. Returns the logits and the
    self-attention cache only, so the exported graph neither copies the unchanged cross-attention cache out at every
    step nor passes the image tokens through (as the model's own `Seq2SeqLMOutput` would): with those copies, OpenVINO
    bf16 took 1.77 s on full-size batch-8 greedy, without them 1.08 s (bench/export_candidates.py, first two runs)."""

    def __init__(self, model: LoraCaptionerForConditionalGeneration):
        super().__init__()
        self.model = model

    def forward(self, decoder_input_ids: torch.Tensor, encoder_outputs: BaseModelOutput, cache: EncoderDecoderCache):
        outputs = self.model(decoder_input_ids=decoder_input_ids, encoder_outputs=encoder_outputs, cache=cache,
                             use_cache=True)
        return outputs.logits, outputs.cache.self_attention_cache


def backend_of(folder: str | Path) -> str:
    """The backend an `export()` folder was written for (`BACKENDS`), from its `export.json`."""
    return json.loads((Path(folder) / "export.json").read_text())["export_format"]


def _empty_cache(config: LoraCaptionerConfig) -> EncoderDecoderCache:
    return EncoderDecoderCache(DynamicCache(config=config.text_config), DynamicCache(config=config.text_config))


def _graphs(model: LoraCaptionerForConditionalGeneration, pixel_values: torch.Tensor) -> dict[str, tuple]:
    """Each graph's module and sample forward kwargs, from a real run. The decode sample has two rows per image, as
    beam search runs them (`LoraCaptionerCrossAttention`: the image tokens and cross-attention keys/values once per
    image); one row per image traces the same graph, with the two batch sizes one. Its cache holds two tokens already:
    `torch.export` specialises a length-1 sample to 1, which would fix the cache's length (the graph still runs on an
    empty one, the first step)."""
    with torch.no_grad():
        image_tokens = model.encoder(pixel_values=pixel_values)
        start = torch.full((2 * pixel_values.shape[0], 1), model.config.decoder_start_token_id)
        outputs = model(decoder_input_ids=start, encoder_outputs=image_tokens, cache=_empty_cache(model.config),
                        use_cache=True)
        outputs = model(decoder_input_ids=start + 1, encoder_outputs=image_tokens, cache=outputs.cache, use_cache=True)
        decode = dict(decoder_input_ids=start + 2, encoder_outputs=image_tokens, cache=outputs.cache)
    return {
        "image_encoder": (model.encoder, {"pixel_values": pixel_values}),
        "cross_attention": (CrossAttentionCache(model), {"encoder_outputs": image_tokens}),
        "decode": (DecodeStep(model), decode),
    }


def _empty_self_attention_cache(cross_attention: DynamicCache, rows: int) -> DynamicCache:
    """A self-attention cache of `rows` rows and no tokens yet, shaped and typed like the cross-attention cache."""
    cache = DynamicCache()
    for index, layer in enumerate(cross_attention.layers):
        heads, width = layer.keys.shape[1], layer.keys.shape[3]
        empty = layer.keys.new_zeros(rows, heads, 0, width)
        cache.update(empty, empty.clone(), index)
    return cache


def export(model_dir: str | Path, out_dir: str | Path, backend: str = "openvino", quantize: str | None = None) -> Path:
    """Export a saved LoraCaptioner (fp32 weights) to `out_dir`: the three graphs, `export.json`, the config and
    generation config, and the processor when `model_dir` has one.

    backend: `"openvino"` (the fastest exact path on the AVX-512 CPU measured, in bf16 there) or `"onnx"` (ONNX
        Runtime; on an AVX2-only CPU the fastest path with `quantize="int8"` and, fp32 graphs fused for its CPU ops,
        the fastest exact one: 1.10-1.13x OpenVINO fp32 on greedy, parity on beam 4; bench/export_candidates-avx2.md).
    quantize: `None`, or `"int8"`: int8 weights (NNCF weight compression) for OpenVINO, dynamic int8 (ONNX Runtime's
        `quantize_dynamic`) for ONNX. Measured on random full-size weights (bench/export_candidates.md, AVX-512 +
        avx512_bf16): OpenVINO int8 weights 1.11x OpenVINO bf16 on batch 8 greedy, 1.2x on batch 1, parity on beam 4;
        87-91% top-1 agreement with fp32 against bf16's 95-96%.
    """
    exporter, config, quantizer = exporter_for(backend, quantize)
    model = LoraCaptionerForConditionalGeneration.from_pretrained(model_dir, dtype=torch.float32).eval()

    size = model.config.vision_config.image_size
    pixel_values = torch.zeros(2, 3, size, size)  # batch 2: a batch of 1 would be specialised, like length 1
    components = {}
    for name, (module, inputs) in _graphs(model, pixel_values).items():
        component = exporter.export(module, copy.deepcopy(inputs), config).components["model"]
        if quantizer is not None:
            component.program = quantizer.quantize(component.program, inputs, exporter.export_format)
        components[name] = component
    out_dir = Path(out_dir)
    ExportedModel(components, exporter.export_format, config=model.config,
                  generation_config=model.generation_config).save_pretrained(out_dir)
    (out_dir / LAYOUT_FILE).write_text(json.dumps(LAYOUT, indent=2) + "\n")
    try:
        from transformers import AutoProcessor

        AutoProcessor.from_pretrained(model_dir).save_pretrained(out_dir)
    except OSError:  # a folder with no processor files: the export is still usable with pixel values
        pass
    return out_dir


def exporter_for(backend: str, quantize: str | None = None) -> tuple:
    """What `export()` exports with, for `backend` and `quantize` (checked): the `transformers.exporters` exporter, its
    config (dynamic shapes; OpenVINO stateless, so the runner hands the cache in and out and beam search can reorder
    it as torch does; ONNX fp32 fused for ONNX Runtime's CPU provider) and the int8 quantizer, or `None`."""
    from transformers.exporters import OnnxConfig, OnnxExporter, OpenVINOConfig, OpenVINOExporter

    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if quantize not in (None, "int8"):
        raise ValueError(f"quantize must be None or 'int8', got {quantize!r}")
    quantizer = _int8_quantizer(backend) if quantize else None
    if backend == "openvino":
        return OpenVINOExporter(), OpenVINOConfig(dynamic=True, stateful=False), quantizer
    # fp32 graphs fused into ONNX Runtime's own CPU ops (Attention, SkipLayerNormalization, ...): exact, and 1.14x /
    # 1.20x the unfused graphs at batch 8 / 1 (bench/onnx_int8_settings-avx2.md). Not before int8: there they cost
    # 3.5 points of top-1 agreement and gain only at batch 1.
    return OnnxExporter(), OnnxConfig(dynamic=True, ort_fusions=None if quantize else "cpu"), quantizer


def _int8_quantizer(backend: str):
    if backend == "openvino":
        import nncf
        from transformers.exporters import NNCFOpenVINOQuantizer, NNCFWeightCompressionConfig

        return NNCFOpenVINOQuantizer(NNCFWeightCompressionConfig(mode=nncf.CompressWeightsMode.INT8_ASYM))
    from transformers.exporters import OnnxRuntimeDynamicConfig, OnnxRuntimeQuantizer

    return OnnxRuntimeQuantizer(OnnxRuntimeDynamicConfig())


class _ExportedImageEncoder(nn.Module):
    """The `image_encoder` graph as `generate()` calls an encoder: pixels in, `BaseModelOutput` out."""

    main_input_name = "pixel_values"

    def __init__(self, runner):
        super().__init__()
        self.runner = runner

    def forward(self, pixel_values: torch.Tensor, **kwargs) -> BaseModelOutput:
        # OpenVINO must copy its inputs here: a graph passing an input straight to an output otherwise corrupts the
        # heap on a later call (openvino 2026.4). `share_inputs` is ignored by ONNX Runtime.
        image_tokens = self.runner(share_inputs=False, pixel_values=pixel_values.float())
        return BaseModelOutput(image_tokens.last_hidden_state)


class ExportedCaptioner(PreTrainedModel, GenerationMixin):
    """An exported LoraCaptioner behind transformers' `generate()`: greedy and beam search, logits processors and the
    saved generation defaults work as on the torch model, the graphs doing the model's work.

    ```python
    captioner = ExportedCaptioner.from_pretrained("exported", precision="bf16")
    caption_ids = captioner.generate(pixel_values=processor(images=images, return_tensors="pt").pixel_values)
    ```
    """

    config_class = LoraCaptionerConfig
    main_input_name = "pixel_values"

    def __init__(self, exported: ExportedModel, layout: dict | None = None):
        super().__init__(exported.config)
        self.exported = exported
        self.image_tokens_once_per_image = (layout or {}).get("image_tokens") == LAYOUT["image_tokens"]
        self.encoder = _ExportedImageEncoder(exported.runners["image_encoder"])
        if exported.generation_config is not None:
            self.generation_config = exported.generation_config

    @classmethod
    def from_pretrained(cls, folder: str | Path, precision: str | None = None, **runner_kwargs) -> ExportedCaptioner:
        """Load an `export()` folder. precision (OpenVINO): `"bf16"` or `"fp32"`; `None` leaves OpenVINO's choice (bf16
        on a CPU with avx512_bf16 or AMX). `runner_kwargs` go to the backend's runner (`session_options`, `config`)."""
        if backend_of(folder) == "openvino":
            runner_kwargs.setdefault("device", "cpu")
            if precision is not None:
                properties = {"INFERENCE_PRECISION_HINT": PRECISIONS[precision]}
                runner_kwargs["config"] = {**properties, **runner_kwargs.get("config", {})}
        elif precision not in (None, "fp32"):
            raise ValueError(f"ONNX Runtime runs the export in fp32; precision {precision!r} is OpenVINO's.")
        layout = Path(folder) / LAYOUT_FILE
        return cls(ExportedModel.from_pretrained(folder, **runner_kwargs),
                   json.loads(layout.read_text()) if layout.is_file() else None)

    # Beam search reorders the self-attention cache only: the image's cross-attention keys/values are held once per
    # image (or, in an export that predates that layout, the same on all of its beams); the model's own hook.
    _reorder_cache = LoraCaptionerForConditionalGeneration._reorder_cache

    def _expand_inputs_for_generation(self, *args, **kwargs):
        # Beams share their image's tokens as in the torch model, unless the export predates that layout.
        if self.image_tokens_once_per_image:
            return LoraCaptionerForConditionalGeneration._expand_inputs_for_generation(self, *args, **kwargs)
        return super()._expand_inputs_for_generation(*args, **kwargs)

    @property
    def device(self) -> torch.device:
        return torch.device("cpu")

    @property
    def dtype(self) -> torch.dtype:
        return torch.float32

    def get_encoder(self, modality: str | None = None) -> nn.Module:
        return self.encoder

    def forward(self, decoder_input_ids: torch.Tensor, encoder_outputs: BaseModelOutput,
                cache: EncoderDecoderCache | None = None, **kwargs) -> Seq2SeqLMOutput:
        runners = self.exported.runners
        if cache is None or cache.get_seq_length() == 0:
            if "prefill" in runners:  # an export written before the cross_attention graph: the first step apart
                outputs = runners["prefill"](share_inputs=False, decoder_input_ids=decoder_input_ids,
                                             encoder_outputs=encoder_outputs, cache=None)
                return Seq2SeqLMOutput(logits=outputs.logits, cache=outputs.cache)
            cross_attention = runners["cross_attention"](encoder_outputs=encoder_outputs)
            cache = EncoderDecoderCache(
                _empty_self_attention_cache(cross_attention, decoder_input_ids.shape[0]), cross_attention
            )
        logits, self_attention_cache = runners["decode"](decoder_input_ids=decoder_input_ids,
                                                         encoder_outputs=encoder_outputs, cache=cache)
        return Seq2SeqLMOutput(logits=logits, cache=EncoderDecoderCache(self_attention_cache,
                                                                        cache.cross_attention_cache))


__all__ = [
    "BACKENDS", "INSTALL_HINTS", "CrossAttentionCache", "DecodeStep", "ExportedCaptioner", "backend_of", "export",
    "exporter_for",
]
