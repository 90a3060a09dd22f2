"""Exported-runtime candidates for captioning on this CPU, timed side by side with torch (issue 11).

LoraCaptioner is exported through `transformers.exporters` as three graphs, each with the exporter's public
`export()`:
  * `image_encoder`: pixels -> image tokens (CLIP tower + projection + bridge), run once per image;
  * `prefill`: the first decoder step on an empty cache; it computes the cross-attention keys/values once;
  * `decode`: one decoder step on a cache (self-attention keys/values growing, cross-attention ones reused).
(`export_for_generation` finds no image encoder to export: `generate()` runs the encoder before the first `forward`,
whose capture it splits; and its decode graph is traced on a cache of length 1, which `torch.export` specialises.)
A greedy loop (`greedy_ids`) drives the graphs through the exporter's own runners; its ids are checked against
torch fp32 `generate()` on the same random model, then every candidate and torch fp32/bf16 are timed interleaved.

Two phases, so the long exports do not hold the exclusive timing lock:
  PYTHONPATH=/tmp/pk_ov:/tmp/pk_ort flock -s /tmp/cpu.lock .venv/bin/python bench/export_candidates.py export
  PYTHONPATH=/tmp/pk_ov:/tmp/pk_ort flock -x /tmp/cpu.lock .venv/bin/python bench/export_candidates.py time \
      --out bench/export_candidates.md
"""

from __future__ import annotations

import argparse
import copy
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
from torch import nn
from transformers import LogitsProcessorList, MinNewTokensLengthLogitsProcessor
from transformers.cache_utils import DynamicCache, EncoderDecoderCache
from transformers.exporters import ExportedModel
from transformers.modeling_outputs import BaseModelOutput

sys.path.insert(0, str(Path(__file__).parent))
import bench  # noqa: E402
from loracaptioner import LoraCaptionerForConditionalGeneration  # noqa: E402

EXPORT_DIR = Path("/tmp/loracaptioner_export_candidates")
TOKENS = 20
# Exported folder and runner options of each candidate. OpenVINO's CPU plugin runs a float32 graph in bf16 on a CPU
# with avx512_bf16 unless told otherwise (the exporter records f32 in the graph's rt_info, which the plugin ignores).
CANDIDATES = {
    "OpenVINO fp32": ("openvino", {"device": "cpu", "config": {"INFERENCE_PRECISION_HINT": "f32"}}),
    "OpenVINO bf16": ("openvino", {"device": "cpu", "config": {"INFERENCE_PRECISION_HINT": "bf16"}}),
    "OpenVINO int8 weights (NNCF), bf16": ("openvino-int8", {"device": "cpu",
                                                             "config": {"INFERENCE_PRECISION_HINT": "bf16"}}),
    "OpenVINO int8 weights (NNCF), fp32": ("openvino-int8", {"device": "cpu",
                                                             "config": {"INFERENCE_PRECISION_HINT": "f32"}}),
    "ONNX Runtime fp32": ("onnx", {"device": "cpu"}),
    "ONNX Runtime int8 dynamic": ("onnx-int8", {"device": "cpu"}),
}


def empty_cache(model) -> EncoderDecoderCache:
    text_config = model.config.text_config
    return EncoderDecoderCache(DynamicCache(config=text_config), DynamicCache(config=text_config))


class DecodeStep(nn.Module):
    """One decoder step on a cache that holds the cross-attention keys/values already. It returns the logits and the
    self-attention cache only: the exported graph then neither copies the unchanged cross-attention cache out each
    step nor passes the image tokens through (as the model's own output, `Seq2SeqLMOutput`, would)."""

    def __init__(self, model: LoraCaptionerForConditionalGeneration):
        super().__init__()
        self.model = model

    def forward(self, decoder_input_ids: torch.Tensor, encoder_outputs: BaseModelOutput, cache: EncoderDecoderCache):
        outputs = self.model(decoder_input_ids=decoder_input_ids, encoder_outputs=encoder_outputs, cache=cache,
                             use_cache=True)
        return outputs.logits, outputs.cache.self_attention_cache


def sample_inputs(model, pixel_values: torch.Tensor) -> dict[str, tuple]:
    """Each graph's module and forward kwargs, taken from a real run. The decode step's cache already holds two
    tokens, so `torch.export` keeps its length dynamic (a length-1 sample is specialised to 1)."""
    with torch.no_grad():
        image_tokens = model.encoder(pixel_values=pixel_values)
        start = torch.full((pixel_values.shape[0], 1), model.config.decoder_start_token_id)
        prefill = dict(decoder_input_ids=start, encoder_outputs=image_tokens, cache=empty_cache(model))
        outputs = model(**copy.deepcopy(prefill), use_cache=True)
        outputs = model(decoder_input_ids=start + 1, encoder_outputs=image_tokens, cache=outputs.cache, use_cache=True)
        decode = dict(decoder_input_ids=start + 2, encoder_outputs=image_tokens, cache=outputs.cache)
    return {
        "image_encoder": (model.encoder, {"pixel_values": pixel_values}),
        "prefill": (model, {**prefill, "use_cache": True}),
        "decode": (DecodeStep(model), decode),
    }


def export(model, pixel_values: torch.Tensor, exporter, config, quantizer=None) -> ExportedModel:
    """The three graphs through `exporter.export`, each optionally quantized by an `ExportQuantizer`."""
    components = {}
    for name, (module, inputs) in sample_inputs(model, pixel_values).items():
        component = exporter.export(module, copy.deepcopy(inputs), config).components["model"]
        if quantizer is not None:
            component.program = quantizer.quantize(component.program, inputs, exporter.export_format)
        components[name] = component
    return ExportedModel(components, exporter.export_format, config=model.config)


def greedy_ids(exported: ExportedModel, pixel_values: torch.Tensor, tokens: int,
               forced_ids: torch.Tensor | None = None) -> torch.Tensor:
    """Greedy search with exactly `tokens` new tokens (</s> suppressed until then, as `min_new_tokens` does): the
    start token and the argmax of every step. With `forced_ids` (start token + `tokens` ids), each step is fed the
    forced token instead of its own argmax (teacher forcing)."""
    runners, config = exported.runners, exported.config
    # OpenVINO must not read these inputs in place: a graph that passes an input straight through to an output (the
    # image tokens) then corrupts the heap on a later call (openvino 2026.4).
    image_tokens = runners["image_encoder"](share_inputs=False, pixel_values=pixel_values)
    encoder_outputs = BaseModelOutput(image_tokens.last_hidden_state)
    ids = torch.full((pixel_values.shape[0], 1), config.decoder_start_token_id)
    processors = LogitsProcessorList([MinNewTokensLengthLogitsProcessor(1, tokens, config.eos_token_id)])
    outputs = runners["prefill"](share_inputs=False, decoder_input_ids=ids, encoder_outputs=encoder_outputs,
                                 cache=None)
    logits, cross_attention_cache = outputs.logits, outputs.cache.cross_attention_cache
    self_attention_cache = outputs.cache.self_attention_cache
    for step in range(tokens):
        next_ids = processors(ids, logits[:, -1].float()).argmax(-1, keepdim=True)
        ids = torch.cat([ids, next_ids], dim=1)
        if step + 1 < tokens:
            fed = next_ids if forced_ids is None else forced_ids[:, step + 1 : step + 2]
            cache = EncoderDecoderCache(self_attention_cache, cross_attention_cache)
            logits, self_attention_cache = runners["decode"](decoder_input_ids=fed, encoder_outputs=encoder_outputs,
                                                             cache=cache)
    return ids


def torch_ids(model, pixel_values: torch.Tensor, tokens: int) -> torch.Tensor:
    with torch.inference_mode():
        return model.generate(pixel_values=pixel_values.to(model.dtype), do_sample=False, num_beams=1,
                              max_new_tokens=tokens, min_new_tokens=tokens, no_repeat_ngram_size=0,
                              repetition_penalty=1.0)


def torch_forced_ids(model, pixel_values: torch.Tensor, forced_ids: torch.Tensor) -> torch.Tensor:
    """`greedy_ids(..., forced_ids=...)` for a torch model: one teacher-forced forward, </s> suppressed."""
    with torch.inference_mode():
        logits = model(pixel_values=pixel_values.to(model.dtype), decoder_input_ids=forced_ids[:, :-1]).logits
        logits[..., model.config.eos_token_id] = -float("inf")
    return torch.cat([forced_ids[:, :1], logits.argmax(-1)], dim=1)


def export_all(folder: Path, tiny: bool) -> None:
    import nncf
    from transformers.exporters import (NNCFOpenVINOQuantizer, NNCFWeightCompressionConfig, OnnxConfig,
                                        OnnxExporter, OnnxRuntimeDynamicConfig, OnnxRuntimeQuantizer,
                                        OpenVINOConfig, OpenVINOExporter)

    torch.manual_seed(0)
    model = bench.build_ours(bench.shapes(tiny))
    model.save_pretrained(folder / "torch")
    pixel_values = torch.randn(2, 3, model.config.vision_config.image_size, model.config.vision_config.image_size)
    openvino = (OpenVINOExporter(), OpenVINOConfig(dynamic=True, stateful=False))
    onnx = (OnnxExporter(), OnnxConfig(dynamic=True))
    int8_weights = NNCFOpenVINOQuantizer(NNCFWeightCompressionConfig(mode=nncf.CompressWeightsMode.INT8_ASYM))
    plans = {
        "openvino": (*openvino, None),
        "openvino-int8": (*openvino, int8_weights),
        "onnx": (*onnx, None),
        "onnx-int8": (*onnx, OnnxRuntimeQuantizer(OnnxRuntimeDynamicConfig())),
    }
    for name, (exporter, config, quantizer) in plans.items():
        start = time.perf_counter()
        export(model, pixel_values, exporter, config, quantizer).save_pretrained(folder / name)
        print(f"exported {name} in {time.perf_counter() - start:.0f} s", flush=True)


def isa() -> str:
    flags = set()
    try:
        flags = set(subprocess.run(["lscpu"], capture_output=True, text=True).stdout.split())
    except OSError:
        pass
    wanted = ["avx2", "avx512f", "avx512_bf16", "avx512_vnni", "amx_bf16", "amx_int8"]
    model_name = ""
    if Path("/proc/cpuinfo").exists():
        model_name = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                           if line.startswith("model name")), "")
    present = " ".join(flag for flag in wanted if flag in flags)
    return (f"{model_name}, {os.cpu_count()} CPUs, torch CPU capability {torch.backends.cpu.get_cpu_capability()}, "
            f"flags: {present}")


def top1_agreement(forced: dict, reference_ids, size: int, images: int = 64, batch: int = 8) -> list[str]:
    """Top-1 next-token agreement with torch fp32 under teacher forcing on torch fp32's greedy captions (random
    weights leave many near-ties, so whole greedy captions drift apart after one flip; this counts each step)."""
    agree = dict.fromkeys(forced, 0)
    for first in range(0, images, batch):
        pixel_values = torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(1000 + first))
        reference = reference_ids(pixel_values)
        for label, call in forced.items():
            agree[label] += (call(pixel_values, reference)[:, 1:] == reference[:, 1:]).sum().item()
    lines = [f"## Top-1 next-token agreement with torch fp32 ({images} images × {TOKENS} tokens, teacher-forced)", "",
             "| path | agreement |", "|---|---|"]
    lines += [f"| {label} | {count / (images * TOKENS):.1%} |" for label, count in agree.items()]
    return lines + [""]


def agreement(ids: torch.Tensor, reference: torch.Tensor) -> str:
    same_captions = (ids == reference).all(dim=1).float().mean().item()
    same_tokens = (ids == reference).float().mean().item()
    return f"{same_captions:.0%} captions, {same_tokens:.0%} tokens"


def time_all(folder: Path, repeats: int, batches: list[int]) -> str:
    import openvino
    import onnxruntime

    model = LoraCaptionerForConditionalGeneration.from_pretrained(folder / "torch").eval()
    model_bf16 = copy.deepcopy(model).to(torch.bfloat16)
    # ONNX Runtime's threads, sized from the process's cores, sleep between calls instead of spinning: spinning
    # threads would starve the torch and OpenVINO calls interleaved with them on this machine's few cores.
    session_options = onnxruntime.SessionOptions()
    session_options.intra_op_num_threads = len(os.sched_getaffinity(0))
    session_options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    exported = {label: ExportedModel.from_pretrained(folder / sub, **options, **(
                    {"session_options": session_options} if sub.startswith("onnx") else {}))
                for label, (sub, options) in CANDIDATES.items()}
    size = model.config.vision_config.image_size
    calls = {"torch fp32": lambda px: torch_ids(model, px, TOKENS),
             "torch bf16": lambda px: torch_ids(model_bf16, px, TOKENS)}
    calls |= {label: (lambda px, e=e: greedy_ids(e, px, TOKENS)) for label, e in exported.items()}
    forced = {"torch fp32": lambda px, ids: torch_forced_ids(model, px, ids),
              "torch bf16": lambda px, ids: torch_forced_ids(model_bf16, px, ids)}
    forced |= {label: (lambda px, ids, e=e: greedy_ids(e, px, TOKENS, forced_ids=ids)) for label, e in exported.items()}

    lines = ["# Exported runtimes vs torch, LoraCaptioner captioning on CPU", "",
             f"Written by `bench/export_candidates.py time` (full-size random LoraCaptioner: CLIP ViT-B/16 @224 + "
             f"Flan-T5-base decoder shapes; greedy, exactly {TOKENS} new tokens, pixel values ready; "
             f"{repeats} repeats, interleaved, median seconds).", "",
             f"- machine: {isa()}; {platform.python_version()}, torch {torch.__version__}, "
             f"torch threads {torch.get_num_threads()}",
             f"- openvino {openvino.__version__}, onnxruntime {onnxruntime.__version__}, "
             f"load average before: {' / '.join(f'{v:.2f}' for v in os.getloadavg())}", ""]
    lines += top1_agreement(forced, lambda px: torch_ids(model, px, TOKENS), size)
    for batch in batches:
        generator = torch.Generator().manual_seed(batch)
        pixel_values = torch.randn(batch, 3, size, size, generator=generator)
        reference = torch_ids(model, pixel_values, TOKENS)
        times = {label: [] for label in calls}
        outputs = {}
        for label, call in calls.items():  # warm-up at this batch size (OpenVINO compiles per shape)
            outputs[label] = call(pixel_values)
        for _ in range(repeats):
            for label, call in calls.items():
                start = time.perf_counter()
                call(pixel_values)
                times[label].append(time.perf_counter() - start)
            print(f"batch {batch}: " + ", ".join(f"{k} {v[-1]:.2f}" for k, v in times.items()), flush=True)
        base = statistics.median(times["torch bf16"])
        lines += [f"## batch {batch}, greedy", "",
                  "| path | median s | all runs s | vs torch bf16 | greedy ids vs torch fp32 |", "|---|---|---|---|---|"]
        for label, runs in times.items():
            median = statistics.median(runs)
            lines.append(f"| {label} | {median:.2f} | {' / '.join(f'{r:.2f}' for r in runs)} | "
                         f"{base / median:.2f}× | {agreement(outputs[label], reference)} |")
        lines.append("")
    return "\n".join(lines)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("phase", choices=["export", "time"])
    parser.add_argument("--folder", type=Path, default=EXPORT_DIR)
    parser.add_argument("--tiny", action="store_true", help="tiny shapes (a smoke test of the script)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--batches", type=int, nargs="+", default=[8, 1])
    parser.add_argument("--out", type=Path, help="write the report here too")
    args = parser.parse_args(argv)
    if args.phase == "export":
        export_all(args.folder, args.tiny)
        return
    report = time_all(args.folder, args.repeats, args.batches)
    print(report)
    if args.out:
        args.out.write_text(report + "\n")


if __name__ == "__main__":
    main()
