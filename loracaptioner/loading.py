"""A model ready to caption: device and dtype picked, the model loaded with this package's own classes (no
`trust_remote_code`), a peft adapter merged into it, optionally quantized (see quantization.py), and its processor
(from the model, else from the adapter)."""

from __future__ import annotations

import functools
import json
import statistics
import sys
import time
from pathlib import Path

import torch

from .captioning import UsageError

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def pick_device(name: str) -> torch.device:
    if name != "auto":
        try:
            device = torch.device(name)
        except RuntimeError as error:
            raise UsageError(f"unknown --device {name!r} ({error})") from None
        available = {"cuda": torch.cuda.is_available, "mps": torch.backends.mps.is_available}
        if not available.get(device.type, lambda: True)():
            raise UsageError(f"--device {name}: not available on this machine")
        return device
    if torch.cuda.is_available():
        return torch.device("cuda")
    if torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


# `--dtype auto` on a CPU picks bfloat16 only when its matrix products are at least this much faster than float32's.
# CPUs differ by two orders of magnitude: bfloat16 ran ~7x faster with AMX, ~4.7x on an AMD EPYC with AVX-512 +
# avx512_bf16 (no AMX), ~0.5x on a Xeon with AVX-512 but no AMX, ~0.01x with AVX2 only. Casts, layer norms and
# softmax do not speed up with it: a ratio near 1 is not worth the rounding.
BF16_MARGIN = 1.2
# (rows, in_features, out_features) of the model's linear layers: one image's CLIP MLP (197 patches, 768 -> 3072)
# cut to 128 rows, and one decoding step of a batch of 8 through the T5 feed-forward (768 -> 2048).
PROBE_SHAPES = ((128, 768, 3072), (8, 768, 2048))


def pick_dtype(name: str, device: torch.device, quantize: str = "none") -> torch.dtype:
    """`--dtype NAME` as a torch dtype; `auto` is bfloat16 on a GPU that supports it (float16 overflows in T5's
    feed-forward layers, so a GPU without bfloat16 stays in float32) and on a CPU whose bfloat16 matrix products are
    measured at least `BF16_MARGIN` times faster than float32's (`bf16_speedup`); else float32. int8 (`quantize`)
    computes in float32."""
    if quantize != "none":
        if name not in ("auto", "float32"):
            raise UsageError(f"--quantize {quantize} computes in float32: use --dtype auto or float32 with it (where "
                             f"--dtype {name} is fast, it is faster alone)")
        return torch.float32
    if name != "auto":
        return DTYPES[name]
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float32
    if device.type != "cpu":
        return torch.float32
    speedup = bf16_speedup(device)
    dtype = torch.bfloat16 if speedup >= BF16_MARGIN else torch.float32
    announce(f"--dtype auto: {str(dtype).removeprefix('torch.')} (bfloat16 matrix products measured {speedup:.2f}x "
             f"as fast as float32 on this CPU, {torch.backends.cpu.get_cpu_capability()}; bfloat16 from "
             f"{BF16_MARGIN}x)")
    return dtype


@functools.cache
def bf16_speedup(device: torch.device) -> float:
    """How many times faster bfloat16 linear layers run than float32 ones on `device`, on the model's shapes
    (`PROBE_SHAPES`, `relative_speed`). Measured once per process and device: ~0.1 s on a 2-core AVX-512 CPU."""
    generator = torch.Generator().manual_seed(0)
    layers = {
        dtype: [(torch.randn(rows, width, generator=generator).to(device, dtype),
                 torch.randn(out, width, generator=generator).to(device, dtype)) for rows, width, out in PROBE_SHAPES]
        for dtype in (torch.float32, torch.bfloat16)
    }

    def products(dtype: torch.dtype):
        return lambda: [torch.nn.functional.linear(inputs, weight) for inputs, weight in layers[dtype]]

    return relative_speed(products(torch.float32), products(torch.bfloat16), device)


def relative_speed(baseline, candidate, device: torch.device, rounds: int = 7) -> float:
    """How many times faster `candidate()` runs than `baseline()`: the median time of `baseline` over `candidate`'s,
    after a warm-up of each (first calls pick kernels and allocate), in `rounds` interleaved rounds whose order
    alternates. Where the candidate is far slower (bfloat16 or int8 on AVX2: 4-100x) it stops after one round."""

    def seconds(call) -> float:
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        call()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        return time.perf_counter() - start

    times = {baseline: [], candidate: []}
    with torch.inference_mode():
        for call in times:
            seconds(call)
        for round_ in range(rounds):
            for call in (baseline, candidate) if round_ % 2 == 0 else (candidate, baseline):
                times[call].append(seconds(call))
            if round_ == 0 and times[candidate][0] > 4 * times[baseline][0]:
                break  # far slower: more rounds would only cost time
    return statistics.median(times[baseline]) / statistics.median(times[candidate])


@functools.cache
def announce(message: str) -> None:
    """`message` on stderr, once per process."""
    print(f"loracaptioner: {message}", file=sys.stderr)


def warn_if_int8_is_slow(device: torch.device) -> None:
    """Say on stderr when torchao int8 linear layers are measured slower than float32 ones on this CPU (`--quantize
    int8` is then slower than the default, e.g. ~20x on AVX2 without VNNI, where torchao's int8 products have no fast
    kernel); the run goes on as asked."""
    from .quantization import int8_speedup

    speedup = int8_speedup(device)
    if speedup < 1:
        announce(f"--quantize int8: torchao int8 linear layers measured {speedup:.2f}x as fast as float32 on this CPU "
                 f"({torch.backends.cpu.get_cpu_capability()}): this run will be slower than without --quantize")


def load_model(model_id: str, revision: str | None, adapter: str | None, device: torch.device, dtype: torch.dtype,
               quantize: str = "none"):
    """Model and processor; a `UsageError` if either fails. The model is loaded and merged in float32, then `dtype` on
    `device`; with `quantize="int8"` its linear layers are torchao int8 (quantization.py): quantized by
    from_pretrained while loading, or, with an adapter, after merging it."""
    from transformers import PretrainedConfig

    from . import LoraCaptionerConfig, LoraCaptionerForConditionalGeneration, LoraCaptionerProcessor

    if not Path(model_id).exists() and (model_id.startswith((".", "/", "~")) or model_id.count("/") > 1):
        raise UsageError(f"model folder {model_id!r} does not exist")
    if (Path(model_id) / "export.json").is_file():
        return load_exported(model_id, adapter, device, dtype, quantize)
    quantization = None
    if quantize != "none":
        from .quantization import quantization_config

        if device.type != "cpu":
            raise UsageError(f"--quantize {quantize} runs on the CPU only (--device cpu); on a GPU use --dtype "
                             "bfloat16")
        try:
            quantization = quantization_config(quantize)
        except (ImportError, ValueError) as error:
            raise UsageError(f"--quantize {quantize}: {error}") from None
        warn_if_int8_is_slow(device)
    try:
        saved = PretrainedConfig.get_config_dict(model_id, revision=revision)[0]
        if saved.get("model_type") != LoraCaptionerConfig.model_type:  # else: a warning and random weights
            raise ValueError(f"it is a {saved.get('model_type')!r} model, not a LoraCaptioner")
        if quantization is not None and adapter is None and "quantization_config" not in saved:
            model = LoraCaptionerForConditionalGeneration.from_pretrained(
                model_id, revision=revision, dtype=dtype, quantization_config=quantization)
        elif adapter is None and "quantization_config" not in saved and dtype != torch.float32:
            model = from_pretrained_lean(model_id, dtype, revision=revision)
        else:  # a model saved quantized loads as it was saved (its config.json says how)
            model = LoraCaptionerForConditionalGeneration.from_pretrained(model_id, revision=revision)
    except Exception as error:  # a missing folder, an unknown Hub id, a folder of another model, no torchao
        raise UsageError(f"cannot load model {model_id!r}: {first_line(error)}") from None
    if getattr(model, "hf_quantizer", None) is not None:
        if adapter is not None:
            raise UsageError(f"model {model_id!r} is saved quantized: merge the adapter into the float model, then "
                             "quantize (--quantize int8)")
        if dtype != torch.float32:
            announce(f"model {model_id!r} is saved quantized: it computes in float32")
        quantization, dtype = model.config.quantization_config, torch.float32
    if adapter is not None:
        from peft import PeftModel

        from .lora import quiet_peft

        try:
            with quiet_peft():
                model = PeftModel.from_pretrained(model, adapter).merge_and_unload()
        except Exception as error:  # not a folder, not a peft adapter, one for another model
            raise UsageError(f"cannot load adapter {adapter!r}: {first_line(error)}") from None
        if quantization is not None:
            from .quantization import quantize as quantize_model

            model = quantize_model(model.to(dtype=dtype), quantize)
    processor, errors = None, []
    for source in filter(None, (model_id, adapter)):
        try:
            source_revision = revision if source == model_id else None
            processor = LoraCaptionerProcessor.from_pretrained(source, revision=source_revision)
            break
        except Exception as error:
            errors.append(f"{source!r}: {first_line(error)}")
    if processor is None:
        raise UsageError(f"cannot load the processor from {' or '.join(errors)}")
    if quantization is None:
        model = model.to(device=device, dtype=dtype)
    return model.eval(), processor


def from_pretrained_lean(model_id: str, dtype: torch.dtype, revision: str | None = None):
    """`LoraCaptionerForConditionalGeneration.from_pretrained(model_id, dtype=dtype)`, without the peak memory of a
    float32 checkpoint loaded in a narrower dtype. from_pretrained memory-maps the checkpoint and keeps the mapping
    until every tensor is loaded, so each float32 page it reads stays resident next to its bfloat16 copy (full size:
    1.84 GB peak RSS for a 0.50 GB model, 0.40 GB of it the interpreter). Here the local safetensors files are read
    one tensor at a time (safetensors' `pread` backend: nothing mapped), each cast as it comes (1.00 GB peak), and the
    tensors handed to from_pretrained as its `state_dict`. Anything else (a Hub id, other weight files) loads through
    from_pretrained itself."""
    from safetensors import safe_open
    from transformers import GenerationConfig

    from . import LoraCaptionerForConditionalGeneration

    folder = Path(model_id)
    index = folder / "model.safetensors.index.json"
    files = ([folder / name for name in sorted(set(json.loads(index.read_text())["weight_map"].values()))]
             if index.is_file() else [folder / "model.safetensors"])
    if revision is not None or not all(file.is_file() for file in files):
        return LoraCaptionerForConditionalGeneration.from_pretrained(model_id, revision=revision, dtype=dtype)
    state_dict = {}
    for file in files:
        with safe_open(file, framework="pt", device="cpu", backend="pread") as weights:
            for name in weights.keys():
                tensor = weights.get_tensor(name)
                state_dict[name] = tensor.to(dtype) if tensor.is_floating_point() else tensor
    config = LoraCaptionerForConditionalGeneration.config_class.from_pretrained(folder)
    model = LoraCaptionerForConditionalGeneration.from_pretrained(None, config=config, state_dict=state_dict,
                                                                  dtype=dtype)
    model.config.name_or_path = model_id  # from_pretrained(None, ...) records None
    if (folder / "generation_config.json").is_file():
        model.generation_config = GenerationConfig.from_pretrained(folder)
    return model


def load_exported(folder: str, adapter: str | None, device: torch.device, dtype: torch.dtype, quantize: str):
    """A folder written by `loracaptioner export` (export.py): its graphs behind `generate()`, on the CPU, in bf16 or
    fp32 (OpenVINO; `dtype` says which) or fp32 (ONNX Runtime)."""
    from . import LoraCaptionerProcessor

    try:
        from .export import INSTALL_HINTS, ExportedCaptioner, backend_of
    except ImportError as error:  # a transformers without `transformers.exporters`
        raise UsageError(f"{folder!r} is an export, which needs transformers.exporters: {first_line(error)}") from None
    if adapter is not None:
        raise UsageError(f"{folder!r} is an export: it runs the weights it was exported with (give `loracaptioner "
                         "export` a model with the adapter merged in); --adapter does not apply")
    if quantize != "none":
        raise UsageError(f"{folder!r} is an export: quantize when exporting (loracaptioner export --quantize int8)")
    if device.type != "cpu":
        raise UsageError(f"{folder!r} is an export, which runs on the CPU: use --device cpu, or the torch model")
    backend = backend_of(folder)
    if dtype not in (torch.float32, torch.bfloat16):
        raise UsageError(f"an export runs in float32 or bfloat16, not {str(dtype).removeprefix('torch.')}")
    if backend != "openvino" and dtype != torch.float32:
        announce(f"{folder!r} is an ONNX Runtime export: it computes in float32")
        dtype = torch.float32
    try:
        model = ExportedCaptioner.from_pretrained(folder, precision="bf16" if dtype == torch.bfloat16 else "fp32")
    except ImportError as error:  # the backend's package is missing
        raise UsageError(f"cannot run the {backend} export {folder!r}: {first_line(error)} "
                         f"({INSTALL_HINTS[backend]})") from None
    except Exception as error:
        raise UsageError(f"cannot load the export {folder!r}: {first_line(error)}") from None
    try:
        processor = LoraCaptionerProcessor.from_pretrained(folder)
    except Exception as error:
        raise UsageError(f"cannot load the processor from {folder!r}: {first_line(error)}") from None
    return model.eval(), processor


def first_line(error: BaseException) -> str:
    text = str(error).strip().splitlines()
    return f"{type(error).__name__}: {text[0] if text else ''}"
