"""The peers given LoraCaptioner's runtime treatments: exported through `transformers.exporters` as
`loracaptioner.export` exports LoraCaptioner (OpenVINO at its own precision, or ONNX Runtime with dynamic int8),
captioning through transformers' own `generate()`.

`HfExporter.export_for_generation` traces a generative model's first step (`prefill`) and a later step (`decode`) from
a real `generate()` call; transformers ships no runner that generates with the two, and `ExportedPeer` is that runner:
`generate()` calls its `forward`, which hands each step to the graph traced for it. VisionEncoderDecoder (ViT + GPT-2)
runs its encoder inside `generate()`, outside both graphs, so its encoder is exported as a third graph. BLIP cannot be
exported this way (its `generate()` calls the text decoder's own `generate()`, never its top-level `forward`).
"""

from __future__ import annotations

import copy
import dataclasses
from pathlib import Path

import torch
from torch import nn
from transformers import GenerationMixin, GitForCausalLM, PreTrainedModel, VisionEncoderDecoderModel
from transformers.exporters import ExportedModel
from transformers.modeling_outputs import BaseModelOutput

EXPORTABLE = ("GIT-base", "ViT + GPT-2")
# A saved peer's class, by its config's model type
PEER_CLASSES = {"git": GitForCausalLM, "vision-encoder-decoder": VisionEncoderDecoderModel}
ENCODER = "vision_encoder"  # the folder of a separately exported encoder, next to the generation graphs


def _generate_inputs(model: nn.Module, pixel_values: torch.Tensor) -> dict:
    if isinstance(model, VisionEncoderDecoderModel):
        # A decoder prompt of two tokens: the decode step is then captured on a cache of two, where one would have
        # `torch.export` specialise the cache's length to 1 (GIT's cache starts with its image tokens)
        start = torch.full((pixel_values.shape[0], 2), model.config.decoder_start_token_id)
        return {"pixel_values": pixel_values, "decoder_input_ids": start}
    # GIT starts from its BOS token; without input_ids generate() builds the same, but the capture needs it explicit
    start = torch.full((pixel_values.shape[0], 1), model.config.bos_token_id)
    return {"pixel_values": pixel_values, "input_ids": start}


def export_peer(model: nn.Module, out_dir: str | Path, backend: str = "openvino", quantize: str | None = None) -> Path:
    """Export a peer (fp32, eval) to `out_dir` as `loracaptioner.export.export(..., backend, quantize)` exports
    LoraCaptioner: dynamic shapes, the cache in and out (OpenVINO: a stateless graph, so beam search can reorder it),
    traced at batch 2 (a batch of 1 would be specialised), and with `quantize="int8"` the quantizer LoraCaptioner's
    export applies to each of its graphs, here to each of the peer's."""
    from loracaptioner.export import exporter_for

    exporter, config, quantizer = exporter_for(backend, quantize)
    # export_for_generation quantizes each graph it exports with the config's quantizer
    config = dataclasses.replace(config, quantizer=quantizer)
    size = model.config.encoder.image_size if isinstance(model, VisionEncoderDecoderModel) else \
        model.config.vision_config.image_size
    pixel_values = torch.zeros(2, 3, size, size)
    out_dir = Path(out_dir)
    with torch.no_grad():
        exporter.export_for_generation(model, _generate_inputs(model, pixel_values), config).save_pretrained(out_dir)
        if isinstance(model, VisionEncoderDecoderModel):
            encoder = exporter.export(model.encoder, copy.deepcopy({"pixel_values": pixel_values}), config)
            encoder.save_pretrained(out_dir / ENCODER)
    return out_dir


class _ExportedEncoder(nn.Module):
    main_input_name = "pixel_values"

    def __init__(self, exported: ExportedModel):
        super().__init__()
        self.exported = exported

    def forward(self, pixel_values: torch.Tensor, **kwargs) -> BaseModelOutput:
        # share_inputs=False: see loracaptioner.export._ExportedImageEncoder (openvino 2026.4 heap corruption)
        return self.exported(share_inputs=False, pixel_values=pixel_values)


class ExportedPeer(PreTrainedModel, GenerationMixin):
    """A peer's `export_peer` folder behind `generate()`: the first step runs the `prefill` graph, every later one the
    `decode` graph, each given the forward kwargs it was traced with."""

    def __init__(self, exported: ExportedModel, encoder: ExportedModel | None = None):
        super().__init__(exported.config)
        # as the peer names it: what generate() starts from (GIT: its BOS token, built when not given)
        self.main_input_name = "pixel_values" if exported.config.is_encoder_decoder else "input_ids"
        self.exported = exported
        self.encoder = _ExportedEncoder(encoder) if encoder is not None else None
        if exported.generation_config is not None:
            self.generation_config = exported.generation_config

    @classmethod
    def from_pretrained(cls, folder: str | Path, **runner_kwargs) -> ExportedPeer:
        """An `export_peer` folder, on the CPU; `runner_kwargs` go to the backend's runner (ONNX Runtime's
        `session_options`, OpenVINO's `config`)."""
        folder, runner_kwargs = Path(folder), {"device": "cpu", **runner_kwargs}
        encoder = (ExportedModel.from_pretrained(folder / ENCODER, **runner_kwargs) if (folder / ENCODER).is_dir()
                   else None)
        return cls(ExportedModel.from_pretrained(folder, **runner_kwargs), encoder)

    @property
    def device(self) -> torch.device:
        return torch.device("cpu")

    @property
    def dtype(self) -> torch.dtype:
        return torch.float32

    def get_encoder(self, modality: str | None = None) -> nn.Module:
        return self.encoder

    def forward(self, input_ids=None, pixel_values=None, position_ids=None, attention_mask=None, decoder_input_ids=None,
                encoder_outputs=None, decoder_attention_mask=None, cache=None, **kwargs):
        # The union of the peers' forward arguments, named so that generate() sees the model takes them.
        kwargs.update(input_ids=input_ids, pixel_values=pixel_values, position_ids=position_ids, cache=cache,
                      attention_mask=attention_mask, decoder_input_ids=decoder_input_ids,
                      encoder_outputs=encoder_outputs, decoder_attention_mask=decoder_attention_mask)
        runner = self.exported.runners["prefill" if cache is None or cache.get_seq_length() == 0 else "decode"]
        return runner(share_inputs=False, **{key: kwargs[key] for key in runner.metadata.kwargs if key in kwargs})


def main(argv: list[str] | None = None) -> None:
    """`python bench/exported_peers.py SAVED_PEER OUT [--backend onnx --quantize int8]`: export a saved peer, in a
    process of its own."""
    import argparse

    from transformers import AutoConfig

    parser = argparse.ArgumentParser(description=main.__doc__)
    parser.add_argument("peer", help="a peer's save_pretrained folder (GIT or VisionEncoderDecoder)")
    parser.add_argument("out", help="the folder to write the export to")
    parser.add_argument("--backend", choices=("openvino", "onnx"), default="openvino")
    parser.add_argument("--quantize", choices=("int8",), default=None)
    args = parser.parse_args(argv)
    model_type = AutoConfig.from_pretrained(args.peer).model_type
    if model_type not in PEER_CLASSES:
        parser.error(f"{args.peer}: a {model_type} model; exportable: {sorted(PEER_CLASSES)}")
    export_peer(PEER_CLASSES[model_type].from_pretrained(args.peer, dtype=torch.float32).eval(), args.out,
                args.backend, args.quantize)


if __name__ == "__main__":
    main()
