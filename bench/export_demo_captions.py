"""Identical greedy captions (saved generation defaults) vs torch fp32 on the demo model's validation split, for the
ONNX Runtime exports (dynamic int8 and fp32): bench.py's captions guard (`bench.identical_captions`), which bench.py
runs for its OpenVINO export row, for the export that bench/export_candidates-avx2.md found fastest on an AVX2-only
CPU. Run from the repository root after `make demo`:
    PYTHONPATH=<folder with onnxruntime, onnx, onnxscript> python bench/export_demo_captions.py"""

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
import bench  # noqa: E402

MODEL, DATA = "outputs/demo/model", "outputs/demo/data/validation"
EXPORTS = {"onnx export, quantize=int8": ("onnx", "int8"), "onnx export, quantize=None": ("onnx", None)}


def main() -> None:
    reference = bench.Treatment("fp32", "default", {"dtype": torch.float32})
    count, shares = bench.identical_captions(MODEL, DATA, [reference], "cpu", exports=EXPORTS)
    for label, share in shares.items():
        print(f"{label}: {round(share * count)}/{count} captions identical to torch fp32's ({share:.1%}), {DATA}")


if __name__ == "__main__":
    main()
