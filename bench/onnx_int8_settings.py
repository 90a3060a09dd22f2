"""ONNX Runtime int8 settings for the exported LoraCaptioner, side by side (issue 11).

`loracaptioner export --backend onnx --quantize int8` ships `quantize_dynamic` with ONNX Runtime's defaults on all
three graphs (transformers' `OnnxRuntimeQuantizer(OnnxRuntimeDynamicConfig())`). This run is what that choice rests
on: the same fp32 export quantized other ways (per-channel weights, 7-bit weights, some graphs or layers kept in fp32,
ONNX Runtime's weight-only `MatMulNBits` in 8 bits, static int8 on the image encoder, and the graphs fused into ONNX
Runtime's own CPU ops first, as `OnnxConfig(ort_fusions="cpu")` does) against the fp32 export and torch fp32: top-1
next-token agreement under teacher forcing (bench/export_candidates.py's guard, 64 images x 20 tokens, random
full-size weights) and batch-1 / batch-8 greedy seconds (20 new tokens, interleaved, medians).

  PYTHONPATH=/tmp/pk_ort2 .venv/bin/python bench/onnx_int8_settings.py --out bench/onnx_int8_settings-avx2.md
"""

from __future__ import annotations

import argparse
import functools
import os
import platform
import shutil
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
import export_candidates  # noqa: E402

import bench  # noqa: E402
from loracaptioner import LoraCaptionerForConditionalGeneration  # noqa: E402
from loracaptioner.export import export  # noqa: E402

FOLDER = Path("/tmp/loracaptioner_onnx_int8_settings")
GRAPHS = ("image_encoder", "cross_attention", "decode")
SHIPPED = "dynamic, ONNX Runtime's defaults, all graphs (shipped)"
CALIBRATION_IMAGES = 16  # the static setting's calibration set: random pixels, as the timed and guarded inputs are
# label: (graphs rewritten; "dynamic" (quantize_dynamic through transformers' OnnxRuntimeQuantizer), "static" (its
# quantize_static, calibrated), "nbits" (onnxruntime's MatMulNBitsQuantizer) or "fused" (transformers'
# `fuse_for_onnxruntime(model, "cpu")`, what `OnnxConfig(ort_fusions="cpu")` runs after the conversion, then dynamic
# int8 unless `fp32`); options; `exclude` names MatMul weights, by shape, left in fp32)
SETTINGS = {
    SHIPPED: (GRAPHS, "dynamic", {}),
    "dynamic, per-channel weights": (GRAPHS, "dynamic", dict(per_channel=True)),
    "dynamic, per-channel 7-bit weights (reduce_range)": (GRAPHS, "dynamic", dict(per_channel=True,
                                                                                   reduce_range=True)),
    "dynamic, lm_head kept fp32": (GRAPHS, "dynamic", dict(exclude="lm_head")),
    "dynamic, T5 feed-forward `wo` kept fp32": (GRAPHS, "dynamic", dict(exclude="wo")),
    "dynamic, image encoder only": (("image_encoder",), "dynamic", {}),
    "dynamic, cross-attention only": (("cross_attention",), "dynamic", {}),
    "dynamic, decode step only": (("decode",), "dynamic", {}),
    "dynamic, image encoder + cross-attention": (("image_encoder", "cross_attention"), "dynamic", {}),
    "MatMulNBits 8-bit weights (block 128), fp32 compute": (GRAPHS, "nbits", dict(bits=8, block_size=128,
                                                                                   is_symmetric=True)),
    "MatMulNBits 8-bit weights (block 128), int8 compute (accuracy_level 4)": (
        GRAPHS, "nbits", dict(bits=8, block_size=128, is_symmetric=True, accuracy_level=4)),
    "static (QDQ, uint8 activations, calibrated), image encoder only": (("image_encoder",), "static", {}),
    "ONNX Runtime's CPU fusions, fp32": (GRAPHS, "fused", dict(fp32=True)),
    "ONNX Runtime's CPU fusions, then dynamic, all graphs": (GRAPHS, "fused", {}),
}


def matmuls_to_keep(path: Path, which: str, config) -> list[str]:
    """Names of the MatMul nodes whose constant weight is `which`: "lm_head" ([d_model, vocab]) or "wo" (T5's
    feed-forward output, [d_ff, d_model])."""
    import onnx

    shape = {"lm_head": [config.text_config.d_model, config.text_config.vocab_size],
             "wo": [config.text_config.d_ff, config.text_config.d_model]}[which]
    proto = onnx.load(str(path), load_external_data=False)
    weights = {initializer.name: list(initializer.dims) for initializer in proto.graph.initializer}
    return [node.name for node in proto.graph.node if node.op_type == "MatMul" and weights.get(node.input[1]) == shape]


def quantize_graph(source: Path, target: Path, kind: str, options: dict, config) -> None:
    import onnx
    import onnx_ir

    if kind == "nbits":
        from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

        quantizer = MatMulNBitsQuantizer(onnx.load(str(source)), **options)
        quantizer.process()
        quantizer.model.save_model_to_file(str(target), use_external_data_format=True)
        return
    from onnxruntime.quantization import QuantType
    from transformers.exporters import (
        ExportFormat,
        OnnxRuntimeDynamicConfig,
        OnnxRuntimeQuantizer,
        OnnxRuntimeStaticConfig,
    )

    options = dict(options)
    if "exclude" in options:
        options["nodes_to_exclude"] = matmuls_to_keep(source, options.pop("exclude"), config)
    graph = onnx_ir.load(str(source))
    if kind == "fused":
        from transformers.exporters.onnxruntime_fusions import fuse_for_onnxruntime

        fuse_for_onnxruntime(graph, "cpu")
        if options.pop("fp32", False):
            onnx_ir.save(graph, str(target), external_data=target.name + ".data")
            return
    if kind == "static":  # ONNX Runtime's advice for x86: uint8 activations, int8 weights; the products only
        size = config.vision_config.image_size
        generator = torch.Generator().manual_seed(2)
        calibration = [{"pixel_values": torch.randn(2, 3, size, size, generator=generator)}
                       for _ in range(CALIBRATION_IMAGES // 2)]
        quantizer = OnnxRuntimeQuantizer(OnnxRuntimeStaticConfig(
            activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8, op_types_to_quantize=["MatMul", "Conv"],
            **options), calibration_dataset=calibration)
    else:
        quantizer = OnnxRuntimeQuantizer(OnnxRuntimeDynamicConfig(**options))
    quantized = quantizer.quantize(graph, {}, ExportFormat.ONNX)
    onnx_ir.save(quantized, str(target), external_data=target.name + ".data")


def build(folder: Path, tiny: bool) -> dict[str, Path]:
    """The fp32 export of one random model (seed 0), and a copy of it per setting with its graphs quantized."""
    if not (folder / "onnx" / "loracaptioner_export.json").is_file():
        torch.manual_seed(0)
        bench.build_ours(bench.shapes(tiny)).save_pretrained(folder / "torch")
        start = time.perf_counter()
        export(folder / "torch", folder / "onnx", backend="onnx")
        print(f"exported in {time.perf_counter() - start:.0f} s", flush=True)
    config = LoraCaptionerForConditionalGeneration.config_class.from_pretrained(folder / "torch")
    folders = {}
    for index, (label, (graphs, kind, options)) in enumerate(SETTINGS.items()):
        out = folders[label] = folder / f"setting{index}"
        if out.is_dir():
            continue
        partial = folder / f"setting{index}.partial"
        shutil.rmtree(partial, ignore_errors=True)
        shutil.copytree(folder / "onnx", partial)
        start = time.perf_counter()
        for graph in graphs:
            for old in partial.glob(f"{graph}.onnx*"):
                old.unlink()
            quantize_graph(folder / "onnx" / f"{graph}.onnx", partial / f"{graph}.onnx", kind, options, config)
        partial.rename(out)
        print(f"{label}: quantized in {time.perf_counter() - start:.0f} s", flush=True)
    return folders


def run(folder: Path, tiny: bool, repeats: int, batches: list[int]) -> str:
    import onnxruntime

    folders = build(folder, tiny)
    torch_model = LoraCaptionerForConditionalGeneration.from_pretrained(folder / "torch").eval()
    models = {"torch fp32": torch_model, "ONNX Runtime fp32": bench.load_export(folder / "onnx")}
    models.update({label: bench.load_export(path) for label, path in folders.items()})
    size = torch_model.config.vision_config.image_size
    start = time.perf_counter()
    lines = ["# ONNX Runtime int8 settings for the LoraCaptioner export", "",
             f"Written by `bench/onnx_int8_settings.py` ({'tiny' if tiny else 'full-size'} random LoraCaptioner; "
             "one fp32 export through `loracaptioner.export`, then each setting quantizes a copy of its graphs: "
             "`quantize_dynamic` through transformers' `OnnxRuntimeQuantizer(OnnxRuntimeDynamicConfig(...))`, as "
             "`export(..., quantize=\"int8\")` runs it, or onnxruntime's `MatMulNBitsQuantizer`).", "",
             f"- machine: {export_candidates.isa()}; Python {platform.python_version()}, torch {torch.__version__}, "
             f"onnxruntime {onnxruntime.__version__}, threads {torch.get_num_threads()}; load average before: "
             f"{' / '.join(f'{v:.2f}' for v in os.getloadavg())}", ""]
    lines += export_candidates.top1_agreement(models, size)
    for batch in batches:
        pixel_values = torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(batch))
        outputs, slow = {}, set()
        calls = {label: functools.partial(export_candidates.caption_into, outputs, label, model, pixel_values, 1)
                 for label, model in models.items()}
        times = bench.interleaved(calls, repeats, "cpu", label=f"batch {batch}", slow=slow)
        base = statistics.median(times["torch fp32"])
        lines += [f"## batch {batch}, greedy, {export_candidates.TOKENS} new tokens", "",
                  "| setting | median s | all runs s | vs torch fp32 | ids vs torch fp32 |", "|---|---|---|---|---|"]
        for label, runs in times.items():
            note = f" [1 run: over {bench.SLOW_FACTOR}× the fastest row's]" if label in slow else ""
            lines.append(f"| {label}{note} | {statistics.median(runs):.2f} | {' / '.join(f'{r:.2f}' for r in runs)} "
                         f"| {base / statistics.median(runs):.2f}× | "
                         f"{export_candidates.agreement(outputs[label], outputs['torch fp32'])} |")
        lines.append("")
    lines.append(f"Measured in {time.perf_counter() - start:.0f} s after the exports.")
    return "\n".join(lines)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--folder", type=Path, default=FOLDER, help="exports are kept here and reused")
    parser.add_argument("--tiny", action="store_true", help="tiny shapes (a smoke run of the script)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--out", type=Path, help="write the report here too")
    args = parser.parse_args(argv)
    report = run(args.folder, args.tiny, args.repeats, args.batches)
    print(report)
    if args.out:
        args.out.write_text(report + "\n")


if __name__ == "__main__":
    main()
