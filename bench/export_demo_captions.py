"""Identical greedy captions (saved generation defaults) vs torch fp32 on the demo model's validation split, for the
ONNX Runtime exports (dynamic int8 and fp32) -- the quality guard bench.py runs for its OpenVINO export row, for the
export that bench/export_candidates-avx2.md found fastest on an AVX2-only CPU. Run from the repository root after
`make demo`:  PYTHONPATH=<folder with onnxruntime, onnx, onnxscript> python bench/export_demo_captions.py"""

import json
import subprocess
import sys
import tempfile
from pathlib import Path

import torch
from PIL import Image

from loracaptioner import LoraCaptionerForConditionalGeneration, LoraCaptionerProcessor
from loracaptioner.export import ExportedCaptioner

MODEL, DATA = "outputs/demo/model", Path("outputs/demo/data/validation")
EXPORTS = (("onnx", "int8"), ("onnx", None))  # (backend, quantize) as `loracaptioner export` takes them


def main() -> None:
    processor = LoraCaptionerProcessor.from_pretrained(MODEL)
    rows = [json.loads(line) for line in (DATA / "metadata.jsonl").read_text().splitlines() if line.strip()]
    images = [Image.open(DATA / row["file_name"]) for row in rows]
    torch.set_num_threads(1)  # a tiny model: one thread is faster

    def captions(model) -> list[str]:
        out = []
        for i in range(0, len(images), 32):
            inputs = processor(images=images[i : i + 32])
            with torch.inference_mode():
                out += processor.batch_decode(model.generate(**inputs), skip_special_tokens=True)
        return out

    reference = captions(LoraCaptionerForConditionalGeneration.from_pretrained(MODEL).eval())
    with tempfile.TemporaryDirectory() as work:
        for backend, quantize in EXPORTS:
            folder = f"{work}/{backend}-{quantize}"
            code = f"from loracaptioner.export import export; export({MODEL!r}, {folder!r}, {backend!r}, {quantize!r})"
            subprocess.run([sys.executable, "-c", code], check=True, capture_output=True)  # tracing memory stays there
            same = sum(a == b for a, b in zip(captions(ExportedCaptioner.from_pretrained(folder)), reference))
            print(f"{backend} export, quantize={quantize}: {same}/{len(reference)} captions identical to torch fp32's "
                  f"({same / len(reference):.1%}), {DATA}")


if __name__ == "__main__":
    main()
