"""Exported-runtime candidates for captioning on this CPU, timed side by side with torch (issue 11).

LoraCaptioner goes through `transformers.exporters` as loracaptioner/export.py ships it (`export()`: an image encoder,
a cross-attention-cache and a decode-step graph; `ExportedCaptioner`: those graphs behind transformers' own
`generate()`), to OpenVINO (fp32 / bf16 inference precision / NNCF int8 weights) and ONNX Runtime (fp32 / dynamic
int8). Every candidate and torch fp32 / bf16 caption the same pixel values with the same `generate()` settings,
interleaved; quality is top-1 next-token agreement with torch fp32 under teacher forcing, and greedy ids against torch
fp32. (`HfExporter.export_for_generation` does not fit this model: `generate()` runs the image encoder before the first
`forward`, whose capture it splits, so no image encoder is exported; and its decode graph is traced on a cache of length
1, which `torch.export` specialises to 1.)

Two phases, so the long exports do not hold the exclusive timing lock:
  PYTHONPATH=/tmp/pk_ov:/tmp/pk_ort flock -s /tmp/cpu.lock .venv/bin/python bench/export_candidates.py export
  PYTHONPATH=/tmp/pk_ov:/tmp/pk_ort flock -x /tmp/cpu.lock .venv/bin/python bench/export_candidates.py time \
      --out bench/export_candidates.md
"""

from __future__ import annotations

import argparse
import copy
import functools
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
import bench  # noqa: E402
from loracaptioner import LoraCaptionerForConditionalGeneration  # noqa: E402
from loracaptioner.export import ExportedCaptioner, export  # noqa: E402
from loracaptioner.loading import BF16_MARGIN, bf16_speedup  # noqa: E402

EXPORT_DIR = Path("/tmp/loracaptioner_export_candidates")
TOKENS = 20
# OpenVINO's CPU plugin runs a float32 graph in bf16 on a CPU with avx512_bf16 unless told otherwise (the exporter
# records f32 in the graph's rt_info, which the plugin ignores): each OpenVINO candidate names its precision.
EXPORTS = [("openvino", "openvino", None), ("openvino-int8", "openvino", "int8"), ("onnx", "onnx", None),
           ("onnx-int8", "onnx", "int8")]
CANDIDATES = {  # label: (exported folder, precision)
    "OpenVINO fp32": ("openvino", "fp32"),
    "OpenVINO bf16": ("openvino", "bf16"),
    "OpenVINO int8 weights (NNCF), bf16": ("openvino-int8", "bf16"),
    "OpenVINO int8 weights (NNCF), fp32": ("openvino-int8", "fp32"),
    "ONNX Runtime fp32": ("onnx", None),
    "ONNX Runtime int8 dynamic": ("onnx-int8", None),
}


def forced_ids(model, pixel_values: torch.Tensor, forced: torch.Tensor) -> torch.Tensor:
    """Teacher forcing, one cached step at a time as `generate()` runs it: the start token, then each step's argmax
    (</s> suppressed, as `min_new_tokens` does) when fed `forced`'s tokens."""
    with torch.inference_mode():
        encoder_outputs = model.get_encoder()(pixel_values=pixel_values.to(model.dtype))
        cache, predictions = None, [forced[:, :1]]
        for step in range(forced.shape[1] - 1):
            outputs = model(decoder_input_ids=forced[:, step : step + 1], encoder_outputs=encoder_outputs,
                            cache=cache, use_cache=True)
            logits = outputs.logits[:, -1].float()
            logits[:, model.config.eos_token_id] = -float("inf")
            predictions.append(logits.argmax(-1, keepdim=True))
            cache = outputs.cache
    return torch.cat(predictions, dim=1)


def caption_ids(model, pixel_values: torch.Tensor, beams: int) -> torch.Tensor:
    return bench.caption_call(model, pixel_values.to(model.dtype), TOKENS, beams)


def caption_into(outputs: dict, label: str, model, pixel_values: torch.Tensor, beams: int) -> None:
    outputs[label] = caption_ids(model, pixel_values, beams)


def export_all(folder: Path, tiny: bool) -> None:
    torch.manual_seed(0)
    bench.build_ours(bench.shapes(tiny)).save_pretrained(folder / "torch")
    for sub, backend, quantize in EXPORTS:
        start = time.perf_counter()
        export(folder / "torch", folder / sub, backend=backend, quantize=quantize)
        print(f"exported {sub} in {time.perf_counter() - start:.0f} s", flush=True)


def isa() -> str:
    cpu = bench.lscpu()
    flags = set(cpu.get("Flags", "").split())
    present = " ".join(flag for flag in bench.ISA_FLAGS if flag in flags)
    return (f"{cpu.get('Model name', platform.processor())}, {os.cpu_count()} CPUs, torch CPU capability "
            f"{torch.backends.cpu.get_cpu_capability()}, flags: {present}")


def top1_agreement(models: dict, size: int, images: int = 64, batch: int = 8) -> list[str]:
    """Top-1 next-token agreement with torch fp32 under teacher forcing on torch fp32's greedy captions (random
    weights leave many near-ties, so whole greedy captions drift apart after one flip; this counts each step)."""
    agree = dict.fromkeys(models, 0)
    for first in range(0, images, batch):
        pixel_values = torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(1000 + first))
        reference = caption_ids(models["torch fp32"], pixel_values, beams=1)
        for label, model in models.items():
            agree[label] += (forced_ids(model, pixel_values, reference)[:, 1:] == reference[:, 1:]).sum().item()
    lines = [f"## Top-1 next-token agreement with torch fp32 ({images} images × {TOKENS} tokens, teacher-forced)", "",
             "| path | agreement |", "|---|---|"]
    lines += [f"| {label} | {count / (images * TOKENS):.1%} |" for label, count in agree.items()]
    return lines + [""]


def agreement(ids: torch.Tensor, reference: torch.Tensor) -> str:
    same_captions = (ids == reference).all(dim=1).float().mean().item()
    same_tokens = (ids == reference).float().mean().item()
    return f"{same_captions:.0%} captions, {same_tokens:.0%} tokens"


def time_all(folder: Path, repeats: int, workloads: list[tuple[int, int]]) -> str:
    import onnxruntime
    import openvino

    model = LoraCaptionerForConditionalGeneration.from_pretrained(folder / "torch").eval()
    # bf16 only where it is fast (what `--dtype auto` decides): on AVX2 it is emulated, ~4-100x slower than fp32
    bf16 = bf16_speedup(torch.device("cpu"))
    fast_bf16 = bf16 >= BF16_MARGIN
    base = "torch bf16" if fast_bf16 else "torch fp32"
    models = {"torch fp32": model, **({"torch bf16": copy.deepcopy(model).to(torch.bfloat16)} if fast_bf16 else {})}
    for label, (sub, precision) in CANDIDATES.items():
        if precision == "bf16" and not fast_bf16:
            continue
        # ONNX Runtime as bench.py loads it: torch's threads, sleeping rather than spinning between calls
        options = bench.runner_options("onnx") if sub.startswith("onnx") else {"precision": precision}
        models[label] = ExportedCaptioner.from_pretrained(folder / sub, **options)
    size = model.config.vision_config.image_size

    lines = ["# Exported runtimes vs torch, LoraCaptioner captioning on CPU", "",
             f"Written by `bench/export_candidates.py time` (full-size random LoraCaptioner: CLIP ViT-B/16 @224 + "
             f"Flan-T5-base decoder shapes; `generate()`, exactly {TOKENS} new tokens, pixel values ready; the "
             f"exports through loracaptioner/export.py; a full-length warm-up each, then {repeats} rounds, "
             "interleaved, the order rotated per round; median seconds).", "",
             f"- machine: {isa()}; Python {platform.python_version()}, torch {torch.__version__}, "
             f"torch threads {torch.get_num_threads()}",
             f"- openvino {openvino.__version__}, onnxruntime {onnxruntime.__version__}, "
             f"load average before: {' / '.join(f'{v:.2f}' for v in os.getloadavg())}",
             f"- bf16 linear layers measured {bf16:.2f}x fp32 (`loracaptioner.loading.bf16_speedup`): "
             + ("bf16 rows timed" if fast_bf16 else f"under {BF16_MARGIN}x, so no bf16 row (torch or OpenVINO)"), ""]
    lines += top1_agreement(models, size)
    for batch, beams in workloads:
        pixel_values = torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(batch))
        outputs = {}  # each path's ids from its last call
        calls = {label: functools.partial(caption_into, outputs, label, m, pixel_values, beams)
                 for label, m in models.items()}
        search = "greedy" if beams == 1 else f"beam {beams}"
        times = bench.interleaved(calls, repeats, "cpu", label=f"batch {batch} {search}")
        base_seconds = statistics.median(times[base])
        lines += [f"## batch {batch}, {search}", "",
                  f"| path | median s | all runs s | vs {base} | ids vs torch fp32 |", "|---|---|---|---|---|"]
        for label, runs in times.items():
            median = statistics.median(runs)
            lines.append(f"| {label} | {median:.2f} | {' / '.join(f'{r:.2f}' for r in runs)} | "
                         f"{base_seconds / median:.2f}× | {agreement(outputs[label], outputs['torch fp32'])} |")
        lines.append("")
    return "\n".join(lines)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("phase", choices=["export", "time"])
    parser.add_argument("--folder", type=Path, default=EXPORT_DIR)
    parser.add_argument("--tiny", action="store_true", help="tiny shapes (a smoke test of the script)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--workloads", nargs="+", default=["8x1", "1x1", "8x4"],
                        help="batch x beams, e.g. 8x1 (batch 8, greedy) 8x4 (batch 8, beam 4)")
    parser.add_argument("--out", type=Path, help="write the report here too")
    args = parser.parse_args(argv)
    if args.phase == "export":
        export_all(args.folder, args.tiny)
        return
    workloads = [tuple(int(n) for n in workload.split("x")) for workload in args.workloads]
    report = time_all(args.folder, args.repeats, workloads)
    print(report)
    if args.out:
        args.out.write_text(report + "\n")


if __name__ == "__main__":
    main()
