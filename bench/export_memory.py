"""Peak memory of each shipped export against torch and the naive rebuild, a fresh process per row (issue 11, F).

`bench.py`'s F part measures the OpenVINO export only. This run measures every export `loracaptioner export` ships on
one random full-size model (seed 0): OpenVINO at its own precision, ONNX Runtime in fp32 and with dynamic int8, next
to the naive rebuild and LoraCaptioner in torch fp32. Each row runs `bench.measure_memory` (load, then one batch-8
greedy caption of 20 tokens; peak RSS after loading and while running) in a process of its own, twice, interleaved.

  PYTHONPATH=/tmp/pk_ov:/tmp/pk_ort2 .venv/bin/python bench/export_memory.py --out bench/export_memory-avx2.md
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
import export_candidates  # noqa: E402

import bench  # noqa: E402
from loracaptioner.export import export  # noqa: E402

FOLDER = Path("/tmp/loracaptioner_export_memory")
EXPORTS = {  # label: (folder name, backend, quantize), as `loracaptioner export` takes them
    "OpenVINO export (OpenVINO's own precision)": ("openvino", "openvino", None),
    "ONNX Runtime export, fp32": ("onnx", "onnx", None),
    "ONNX Runtime export, dynamic int8 (--quantize int8)": ("onnx-int8", "onnx", "int8"),
}


def build(folder: Path, tiny: bool) -> dict[str, dict]:
    """The specs `bench.measure_memory` takes, one per row; the saved model and its exports, made once."""
    if not (folder / "torch" / "config.json").is_file():
        torch.manual_seed(0)
        bench.build_ours(bench.shapes(tiny)).save_pretrained(folder / "torch")
    specs = {f"{bench.NAIVE}, fp32": {"model": bench.NAIVE},
             f"{bench.OURS}, torch fp32 (default)": {"model": "ours", "flag": "default",
                                                      "folder": str(folder / "torch")}}
    for label, (name, backend, quantize) in EXPORTS.items():
        if not (folder / name / "loracaptioner_export.json").is_file():
            start = time.perf_counter()
            export(folder / "torch", folder / name, backend=backend, quantize=quantize)
            print(f"exported {name} in {time.perf_counter() - start:.0f} s", flush=True)
        specs[f"{bench.OURS}, {label}"] = {"model": bench.EXPORTED, "folder": str(folder / name)}
    return specs


def run(folder: Path, tiny: bool, rounds: int) -> str:
    specs = build(folder, tiny)
    args = argparse.Namespace(device="cpu", tiny=tiny, batch=8, tokens=export_candidates.TOKENS,
                              threads=torch.get_num_threads())
    lines = ["# Peak memory of the shipped exports, a fresh process per row", "",
             f"Written by `bench/export_memory.py` ({'tiny' if tiny else 'full-size'} random LoraCaptioner, one saved "
             "model and its exports through `loracaptioner.export`; each row `bench.measure_memory`: load, then one "
             f"batch-8 greedy caption of {args.tokens} tokens; peak RSS, the interpreter and torch included; "
             f"{rounds} rounds, interleaved).", "",
             f"- machine: {export_candidates.isa()}; Python {platform.python_version()}, torch {torch.__version__}, "
             f"threads {args.threads}; load average before: {' / '.join(f'{v:.2f}' for v in os.getloadavg())}", ""]
    peaks: dict[str, list[int]] = {label: [] for label in specs}
    phases: dict[str, dict] = {}
    for _ in range(rounds):
        for label, spec in specs.items():
            result = bench.measure_memory(spec, args)
            if "error" in result:
                raise SystemExit(f"{label}: {result['error']}")
            peaks[label].append(max(result["load_bytes"], result["run_bytes"]))
            phases[label] = result
    naive = max(peaks[f"{bench.NAIVE}, fp32"])
    lines += ["| row | peak MiB (each round) | × naive | peak MiB after loading | peak MiB while running | "
              "interpreter MiB |", "|---|---|---|---|---|---|"]
    for label, values in peaks.items():
        result = phases[label]
        lines.append(f"| {label} | {' / '.join(str(v >> 20) for v in values)} | "
                     f"{bench.ratio(max(values) / naive)} | "
                     f"{result['load_bytes'] >> 20} | {result['run_bytes'] >> 20} | "
                     f"{result['interpreter_bytes'] >> 20} |")
    return "\n".join(lines)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--folder", type=Path, default=FOLDER, help="the model and its exports are kept here")
    parser.add_argument("--tiny", action="store_true", help="tiny shapes (a smoke run of the script)")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--out", type=Path, help="write the report here too")
    args = parser.parse_args(argv)
    report = run(args.folder, args.tiny, args.rounds)
    print(report)
    if args.out:
        args.out.write_text(report + "\n")


if __name__ == "__main__":
    main()
