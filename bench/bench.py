"""LoraCaptioner speed benchmark (issue 5): captioning throughput and latency, beam search, LoRA training steps and
peak memory, against the original design rebuilt naively from HF parts and against three peer captioners, all built
from their configs with random weights (speed does not depend on the values) and run on the same inputs in one run.

    python bench/bench.py --markdown bench/results.md   # full-size shapes, sized for <= 8 min on 2 quiet CPU cores
    python bench/bench.py --quick                                     # full-size shapes, one repeat: a smoke run
    python bench/bench.py --tiny                                      # tiny shapes: CI smoke test, seconds
    python bench/bench.py --quality-model outputs/demo/model --quality-data data/synthetic_shapes/test
    python bench/bench.py --device cuda

Every model writes exactly `--tokens` new tokens (`min_new_tokens = max_new_tokens`) with the same decoding settings
(no repetition processors), so all do equal work. Times are medians over `--repeats`; ratios are computed between
rows of the same run. Throughput is the model's own (pixel_values ready); image preprocessing is timed separately.
"""

from __future__ import annotations

import argparse
import gc
import importlib.util
import json
import os
import platform
import statistics
import subprocess
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import torch
from torch import nn

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from transformers import (
    BlipConfig,
    BlipForConditionalGeneration,
    CLIPVisionConfig,
    CLIPVisionModel,
    GitConfig,
    GitForCausalLM,
    GPT2Config,
    T5Config,
    T5ForConditionalGeneration,
    VisionEncoderDecoderConfig,
    VisionEncoderDecoderModel,
    ViTConfig,
)
from transformers.modeling_outputs import BaseModelOutput

from loracaptioner import LoraCaptionerForConditionalGeneration
from loracaptioner.remote_code.configuration_loracaptioner import LoraCaptionerConfig
from loracaptioner.lora import ORIGINAL_LORA_TARGETS, decoder_lora_config, quiet_peft

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
# Equal work for every model: greedy or beam, exactly `tokens` new tokens, no extra logits processors.
EQUAL_WORK = {"do_sample": False, "no_repeat_ngram_size": 0, "repetition_penalty": 1.0, "length_penalty": 1.0}


# ----------------------------------------------------------------------------------------------------------- shapes
def shapes(tiny: bool) -> dict:
    """Config values of every model. Full size: CLIP ViT-B/16 @224 + Flan-T5-base, and the peers' published configs
    (Salesforce/blip-image-captioning-base, microsoft/git-base, nlpconnect/vit-gpt2-image-captioning)."""
    if tiny:
        vit = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, patch_size=8)
        return {
            "clip": dict(vit, image_size=32, projection_dim=24),
            "t5": dict(d_model=32, d_ff=64, d_kv=8, num_heads=4, num_layers=2, num_decoder_layers=2, vocab_size=128),
            "blip_vision": dict(vit, image_size=48),
            "blip_text": dict(vocab_size=128, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                              intermediate_size=64, encoder_hidden_size=32, bos_token_id=3, eos_token_id=2,
                              sep_token_id=2, pad_token_id=0),
            "git_vision": dict(vit, image_size=32),
            "git_text": dict(vocab_size=128, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                             intermediate_size=64),
            "vit": dict(vit, image_size=32),
            "gpt2": dict(vocab_size=128, n_embd=32, n_layer=2, n_head=4),
        }
    vit_b16 = dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12, patch_size=16)
    return {
        "clip": dict(vit_b16, image_size=224, projection_dim=512),
        "t5": dict(d_model=768, d_ff=2048, d_kv=64, num_heads=12, num_layers=12, num_decoder_layers=12,
                   vocab_size=32128),
        "blip_vision": dict(vit_b16, image_size=384),
        "blip_text": dict(vocab_size=30524, hidden_size=768, num_hidden_layers=12, num_attention_heads=12,
                          intermediate_size=3072, encoder_hidden_size=768),
        "git_vision": dict(vit_b16, image_size=224),
        "git_text": dict(vocab_size=30522, hidden_size=768, num_hidden_layers=6, num_attention_heads=12,
                         intermediate_size=3072),
        "vit": dict(vit_b16, image_size=224),
        "gpt2": dict(vocab_size=50257, n_embd=768, n_layer=12, n_head=12),
    }


def t5_config(sh: dict) -> T5Config:
    return T5Config(**sh["t5"], feed_forward_proj="gated-gelu", tie_word_embeddings=False, decoder_start_token_id=0)


# ----------------------------------------------------------------------------------------------------------- models
def build_ours(sh: dict, dtype: torch.dtype = torch.float32, attn: str = "sdpa", device: str = "cpu"):
    """LoraCaptioner through the same loading machinery as `from_pretrained(..., dtype=...)`."""
    config = LoraCaptionerConfig(vision_config=CLIPVisionConfig(**sh["clip"]), text_config=t5_config(sh))
    return LoraCaptionerForConditionalGeneration._from_config(config, dtype=dtype, attn_implementation=attn).to(
        device
    ).eval()


class NaiveOriginal(nn.Module):
    """The original design rebuilt naively from HF parts: CLIPVisionModel -> post_layernorm -> CLIP projection ->
    Linear(512 -> 768) -> a full T5ForConditionalGeneration (its text encoder built but never run) fed `encoder_outputs`."""

    def __init__(self, sh: dict):
        super().__init__()
        vision_config = CLIPVisionConfig(**sh["clip"])
        self.clip = CLIPVisionModel(vision_config)
        self.visual_projection = nn.Linear(vision_config.hidden_size, vision_config.projection_dim, bias=False)
        self.projection = nn.Linear(vision_config.projection_dim, sh["t5"]["d_model"])
        self.t5 = T5ForConditionalGeneration(t5_config(sh))

    def image_tokens(self, pixel_values: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():  # the tower is frozen
            patches = self.clip(pixel_values=pixel_values).last_hidden_state[:, 1:]
            patches = self.visual_projection(self.clip.post_layernorm(patches))
        return self.projection(patches)

    def generate(self, pixel_values: torch.Tensor, **kwargs) -> torch.Tensor:
        encoder_outputs = BaseModelOutput(last_hidden_state=self.image_tokens(pixel_values))
        return self.t5.generate(encoder_outputs=encoder_outputs, **kwargs)


def build_peers(sh: dict, dtype: torch.dtype, device: str) -> dict[str, nn.Module]:
    blip = BlipConfig(vision_config=sh["blip_vision"], text_config=sh["blip_text"])
    git = GitConfig(vision_config=sh["git_vision"], **sh["git_text"])
    vit_gpt2 = VisionEncoderDecoderConfig.from_encoder_decoder_configs(
        ViTConfig(**sh["vit"]), GPT2Config(**sh["gpt2"], bos_token_id=0, eos_token_id=0)
    )
    vit_gpt2.decoder_start_token_id = vit_gpt2.pad_token_id = vit_gpt2.eos_token_id = 0
    models = {
        "BLIP-base (384 px)": BlipForConditionalGeneration(blip),
        "GIT-base": GitForCausalLM(git),
        "ViT + GPT-2": VisionEncoderDecoderModel(vit_gpt2),
    }
    return {name: model.to(device=device, dtype=dtype).eval() for name, model in models.items()}


def image_size(model: nn.Module) -> int:
    if isinstance(model, NaiveOriginal):
        return model.clip.config.image_size
    if isinstance(model, LoraCaptionerForConditionalGeneration):
        return model.config.vision_config.image_size
    if isinstance(model, VisionEncoderDecoderModel):
        return model.config.encoder.image_size
    return model.config.vision_config.image_size


def quantize_int8(model: LoraCaptionerForConditionalGeneration, vision: bool = False):
    """Dynamic int8 (in place) for every Linear of the T5 decoder and the LM head, and with `vision=True` of the CLIP
    tower and CLIP's projection too (the bridge stays fp32): int8 weights, activations quantised at run time, fbgemm
    kernels, CPU only. `torch.ao.quantization.quantize_dynamic` is deprecated in this torch (its successor is the
    torchao package), so this is a measured benchmark option, not part of the model."""
    names = ["decoder", "lm_head"] + (["encoder.vision_tower", "encoder.visual_projection"] if vision else [])
    modules = dict(model.named_modules())
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r"(?s).*torch\.ao\.quantization is deprecated")
        warnings.filterwarnings("ignore", message=r"(?s).*quantize_per_tensor.*deprecated")
        from torch.ao.nn.quantized.dynamic import Linear as DynamicInt8Linear
        from torch.ao.quantization import default_dynamic_qconfig, quantize_dynamic

        spec = {name: default_dynamic_qconfig for name in names if modules.get(name) is not None}
        return quantize_dynamic(model, spec, mapping={nn.Linear: DynamicInt8Linear}, inplace=True)


# ------------------------------------------------------------------------------------------------------- measuring
def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def progress(message: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def median_seconds(fn, repeats: int, device: str) -> float:
    times = []
    for _ in range(repeats):
        sync(device)
        start = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def caption_call(model: nn.Module, pixel_values: torch.Tensor, tokens: int, beams: int = 1, **extra):
    kwargs = dict(EQUAL_WORK, max_new_tokens=tokens, min_new_tokens=tokens, num_beams=beams, **extra)
    with torch.inference_mode():
        return model.generate(pixel_values=pixel_values, **kwargs)


def pixels(model: nn.Module, batch: int, device: str, seed: int = 0) -> torch.Tensor:
    size = image_size(model)
    generator = torch.Generator().manual_seed(seed)
    dtype = next(model.parameters()).dtype
    return torch.randn(batch, 3, size, size, generator=generator).to(device=device, dtype=dtype)


def time_captioning(model, batch: int, tokens: int, beams: int, repeats: int, device: str) -> float:
    """Median seconds for one generate() call on `batch` images, after a small warm-up call."""
    caption_call(model, pixels(model, 1, device), 2, beams)
    px = pixels(model, batch, device)
    return median_seconds(lambda: caption_call(model, px, tokens, beams), repeats, device)


def matmul_flops(device: str, dtype: torch.dtype, size: int, repeats: int) -> float:
    a = torch.randn(size, size, device=device, dtype=dtype)
    b = torch.randn(size, size, device=device, dtype=dtype)
    a @ b
    return 2 * size**3 / median_seconds(lambda: a @ b, repeats, device)


def vision_flops(model: LoraCaptionerForConditionalGeneration, px: torch.Tensor) -> int:
    from torch.utils.flop_counter import FlopCounterMode

    with torch.inference_mode(), FlopCounterMode(display=False) as counter:
        model.encoder(px)
    return counter.get_total_flops()


def train_step_fn(kind: str, sh: dict, batch: int, device: str, seed: int = 0):
    """One LoRA training step (seed config r=8, alpha=16, dropout 0.1, the original's 7 targets, Adam lr 1e-4) on
    `batch` images with 20-token captions. Returns the step function."""
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(seed)
    generator = torch.Generator().manual_seed(seed)
    labels = torch.randint(2, sh["t5"]["vocab_size"], (batch, 20), generator=generator).to(device)
    if kind == "ours":
        model = build_ours(sh, device=device)
        with quiet_peft():
            model = get_peft_model(model, decoder_lora_config(model, r=8, alpha=16, dropout=0.1))

        def loss():
            return model(pixel_values=px, labels=labels).loss
    else:
        model = NaiveOriginal(sh).to(device)
        model.clip.requires_grad_(False)
        model.visual_projection.requires_grad_(False)
        # The original: peft on the whole T5 (encoder modules named alike get adapters that never see a gradient).
        lora = LoraConfig(r=8, lora_alpha=16, lora_dropout=0.1, target_modules=list(ORIGINAL_LORA_TARGETS))
        with quiet_peft():
            model.t5 = get_peft_model(model.t5, lora)

        def loss():
            encoder_outputs = BaseModelOutput(last_hidden_state=model.image_tokens(px))
            return model.t5(encoder_outputs=encoder_outputs, labels=labels).loss
    model.train()
    px = pixels(model, batch, device, seed)
    optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-4)

    def step():
        loss().backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return step


# ---------------------------------------------------------------------------------------------------------- memory
def _hwm_bytes() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    return 0


def _peak_bytes(device: str) -> int:
    return torch.cuda.max_memory_allocated() if device.startswith("cuda") else _hwm_bytes()


def _reset_peak(device: str) -> None:
    gc.collect()
    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    else:
        Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM (peak RSS) to the current RSS


def probe(kind: str, args) -> dict:
    """Run in a fresh process: build one model (peak while loading), then reset the peak and run one workload (peak
    while running, the resident model included). Peak RSS on CPU, peak allocated memory on CUDA."""
    device, sh = args.device, shapes(args.tiny)
    _reset_peak(device)
    result = {"interpreter_bytes": _peak_bytes(device)}
    if kind.startswith("train-"):
        step = train_step_fn(kind.removeprefix("train-"), sh, args.train_batch, device)
        result["load_bytes"] = _peak_bytes(device)
        _reset_peak(device)
        step()
    else:
        if kind == "naive":
            model = NaiveOriginal(sh).to(device).eval()
        else:
            model = build_ours(sh, dtype=DTYPES["bf16" if kind == "ours-bf16" else "fp32"], device=device)
            if kind.startswith("ours-int8"):
                quantize_int8(model, vision=kind == "ours-int8-all")
        result["load_bytes"] = _peak_bytes(device)
        _reset_peak(device)
        caption_call(model, pixels(model, args.batch, device), args.tokens)
    result["run_bytes"] = _peak_bytes(device)
    return result


def measure_memory(kind: str, args) -> dict:
    command = [sys.executable, __file__, "--probe", kind, "--device", args.device, "--batch", str(args.batch),
               "--tokens", str(args.tokens), "--train-batch", str(args.train_batch)] + (["--tiny"] if args.tiny else [])
    result = subprocess.run(command, capture_output=True, text=True, timeout=900, check=False)
    if result.returncode:
        return {"error": result.stderr.strip().splitlines()[-1] if result.stderr.strip() else "failed"}
    return json.loads(result.stdout.strip().splitlines()[-1])


# -------------------------------------------------------------------------------------------------- preprocessing
def torch_preprocess(images, size: int, mean, std) -> torch.Tensor:
    """CLIP's transform in torch (resize shortest edge, bicubic + antialias, centre crop, normalise); images of one
    size are stacked and resized in one call (grouped by size)."""
    groups: dict[tuple, list[int]] = {}
    for index, image in enumerate(images):
        groups.setdefault(image.size, []).append(index)
    out = torch.empty(len(images), 3, size, size)
    mean, std = torch.tensor(mean).view(1, 3, 1, 1), torch.tensor(std).view(1, 3, 1, 1)
    for (width, height), indices in groups.items():
        batch = torch.from_numpy(np.stack([np.asarray(images[i].convert("RGB")) for i in indices]))
        batch = batch.permute(0, 3, 1, 2).float()
        scale = size / min(width, height)
        new_h, new_w = max(size, round(height * scale)), max(size, round(width * scale))
        batch = nn.functional.interpolate(batch, size=(new_h, new_w), mode="bicubic", antialias=True,
                                          align_corners=False)
        top, left = (new_h - size) // 2, (new_w - size) // 2
        batch = batch[:, :, top : top + size, left : left + size].clamp(0, 255) / 255.0
        out[indices] = (batch - mean) / std
    return out


def preprocessing_rows(size: int, repeats: int) -> list[dict]:
    from PIL import Image
    from transformers import CLIPImageProcessorPil

    from loracaptioner.remote_code.processing_loracaptioner import to_rgb_image

    rng = np.random.default_rng(0)
    mixed = [Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)) for h, w in
             [(480, 640), (640, 480), (375, 500), (500, 333), (427, 640), (640, 427), (512, 512), (480, 640)]]
    same = [Image.fromarray(rng.integers(0, 255, (480, 640, 3), dtype=np.uint8)) for _ in range(8)]
    clip_pil = CLIPImageProcessorPil(size={"shortest_edge": size}, crop_size={"height": size, "width": size})
    candidates = {"CLIPImageProcessorPil (+ to_rgb_image, as LoraCaptionerProcessor)":
                  lambda ims: clip_pil([to_rgb_image(im) for im in ims], return_tensors="pt")["pixel_values"],
                  "torch: bicubic+antialias, grouped by size":
                  lambda ims: torch_preprocess(ims, size, clip_pil.image_mean, clip_pil.image_std)}
    if importlib.util.find_spec("torchvision") is not None:  # transformers' default (torchvision) backend
        from transformers import CLIPImageProcessor

        clip_tv = CLIPImageProcessor(size={"shortest_edge": size}, crop_size={"height": size, "width": size})
        candidates["CLIPImageProcessor (torchvision backend)"] = lambda ims: clip_tv(ims, return_tensors="pt")[
            "pixel_values"]
    reference = candidates[next(iter(candidates))](mixed)
    rows = []
    for name, fn in candidates.items():
        row = {"name": name, "max_abs_diff": float((fn(mixed) - reference).abs().max())}
        for label, images in [("b1", mixed[:1]), ("b8 mixed sizes", mixed), ("b8 same size", same)]:
            fn(images)
            row[label] = 1000 * median_seconds(lambda fn=fn, images=images: fn(images), repeats, "cpu") / len(images)
        rows.append(row)
    return rows


# ------------------------------------------------------------------------------------------------------- quality
def quality_guard(model_dir: str, data_dir: str, device: str, batch: int = 16) -> dict:
    """Greedy captions (the saved generation defaults) of the fast paths vs the fp32 reference path (eager attention)
    on every held-out image: share of identical captions."""
    from PIL import Image

    from loracaptioner import LoraCaptionerProcessor

    processor = LoraCaptionerProcessor.from_pretrained(model_dir)
    rows = [json.loads(line) for line in (Path(data_dir) / "metadata.jsonl").read_text().splitlines() if line.strip()]
    images = [Image.open(Path(data_dir) / row["file_name"]) for row in rows]

    def captions(model) -> list[str]:
        out = []
        for i in range(0, len(images), batch):
            inputs = processor(images=images[i : i + batch]).to(device)
            inputs["pixel_values"] = inputs["pixel_values"].to(model.dtype)
            with torch.inference_mode():
                out += processor.batch_decode(model.generate(**inputs), skip_special_tokens=True)
        return out

    def load(**kwargs):
        return LoraCaptionerForConditionalGeneration.from_pretrained(model_dir, **kwargs).to(device).eval()

    reference = captions(load(attn_implementation="eager"))
    variants = {
        "fp32, SDPA (default)": load(),
        "bf16 (`dtype=torch.bfloat16`)": load(dtype=torch.bfloat16),
    }
    if device == "cpu":
        variants["fp32 + dynamic int8 decoder"] = quantize_int8(load())
        variants["fp32 + dynamic int8 decoder & vision"] = quantize_int8(load(), vision=True)
    result = {"images": len(images)}
    for name, model in variants.items():
        fast = captions(model)
        result[name] = sum(a == b for a, b in zip(fast, reference)) / len(reference)
    return result


def static_cache_and_compile(model, px, tokens: int, repeats: int, device: str, base_seconds: float) -> str:
    """generate() with a static cache, then with a static cache + torch.compile of the decoding step (transformers
    compiles automatically only on GPUs; `_compile_all_devices` asks for it on this device too)."""
    from transformers.generation.configuration_utils import CompileConfig

    static = dict(cache_implementation="static")
    caption_call(model, px, tokens, **static)
    static_seconds = median_seconds(lambda: caption_call(model, px, tokens, **static), repeats, device)
    compile_config = CompileConfig(fullgraph=True)
    compile_config._compile_all_devices = True
    compiled = dict(static, compile_config=compile_config)
    start = time.perf_counter()
    caption_call(model, px, tokens, **compiled)
    compile_seconds = time.perf_counter() - start
    compiled_seconds = median_seconds(lambda: caption_call(model, px, tokens, **compiled), repeats, device)
    return (f"static cache: {1000 * static_seconds:.0f} ms, static cache + torch.compile: "
            f"{1000 * compiled_seconds:.0f} ms (first call, compiling: {compile_seconds:.0f} s) vs dynamic cache "
            f"{1000 * base_seconds:.0f} ms per A batch ({base_seconds / compiled_seconds:.2f}× with compile).")


def cross_attention_projections_per_generate(sh: dict, tokens: int) -> dict:
    """How often each decoder layer's cross-attention key projection runs in one greedy generate()."""
    model = build_ours(sh)
    calls = []
    hooks = [block.layer[1].EncDecAttention.k.register_forward_hook(lambda *_: calls.append(1))
             for block in model.decoder.block]
    caption_call(model, pixels(model, 2, "cpu"), tokens)
    for hook in hooks:
        hook.remove()
    return {"layers": len(model.decoder.block), "calls": len(calls), "steps": tokens}


# ------------------------------------------------------------------------------------------------------------ main
def machine(device: str) -> dict:
    info = {"torch": torch.__version__, "threads": torch.get_num_threads(), "python": platform.python_version()}
    import transformers

    info["transformers"] = transformers.__version__
    try:
        lscpu = subprocess.run(["lscpu"], capture_output=True, text=True, check=False).stdout
        info["cpu"] = next(line.split(":", 1)[1].strip() for line in lscpu.splitlines() if "Model name" in line)
    except (OSError, StopIteration):
        info["cpu"] = platform.processor()
    info["cpu capability (torch)"] = torch.backends.cpu.get_cpu_capability()
    if device.startswith("cuda"):
        info["gpu"] = torch.cuda.get_device_name()
    info["load average (1 min) at start"] = round(os.getloadavg()[0], 2)
    return info


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument("--quick", action="store_true", help="one repeat per row, no peers in bf16: a smoke run")
    parser.add_argument("--tiny", action="store_true", help="tiny shapes for every model (CI smoke test)")
    parser.add_argument("--repeats", type=int, default=None, help="timed repeats per row (default 2, batch-1 rows 3x as many; --quick 1)")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--tokens", type=int, default=20)
    parser.add_argument("--train-batch", type=int, default=16)
    parser.add_argument("--bf16", choices=["auto", "on", "off"], default="auto",
                        help="bf16 model rows; auto: only where this device's bf16 matmul is at least half as fast "
                             "as fp32 (on a CPU without AVX-512-BF16/AMX it is ~100x slower)")
    parser.add_argument("--skip", default="",
                        help="comma-separated parts to skip: peers,train,memory,beam,means,compile,prep")
    parser.add_argument("--quality-model", default=None, help="a trained LoraCaptioner folder")
    parser.add_argument("--quality-data", default=None, help="held-out imagefolder (images + metadata.jsonl)")
    parser.add_argument("--markdown", default=None, help="also write the results as markdown to this file")
    parser.add_argument("--probe", default=None, help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def fmt(value, digits=2) -> str:
    return "–" if value is None else f"{value:.{digits}f}"


def main(argv=None) -> str:
    args = parse_args(argv)
    if args.probe:
        print(json.dumps(probe(args.probe, args)))
        return ""
    repeats = args.repeats or (1 if args.quick else 2)
    skip = set(filter(None, args.skip.split(",")))
    device, sh = args.device, shapes(args.tiny)
    torch.manual_seed(0)
    lines: list[str] = []

    def emit(text: str = "") -> None:
        print(text, flush=True)
        lines.append(text)

    started = time.perf_counter()
    info = machine(device)
    label = "tiny shapes" if args.tiny else "full-size shapes (CLIP ViT-B/16 @224 + Flan-T5-base decoder)"
    emit(f"# LoraCaptioner benchmark — {label}{', --quick' if args.quick else ''}")
    emit()
    emit(" · ".join(f"{k}: {v}" for k, v in info.items()))
    emit(f"\nbatch {args.batch}, {args.tokens} new tokens forced, medians over {repeats} repeat(s); random weights.")

    size = 256 if args.tiny else 1024 if device == "cpu" else 4096
    flops = {name: matmul_flops(device, dtype, size, max(repeats, 3)) for name, dtype in DTYPES.items()}
    bf16_rows = args.bf16 == "on" or (args.bf16 == "auto" and flops["bf16"] >= 0.5 * flops["fp32"])
    emit(f"\nmatmul {size}x{size}: fp32 {flops['fp32'] / 1e9:.1f} GFLOP/s, bf16 {flops['bf16'] / 1e9:.1f} GFLOP/s"
         f" → bf16 model rows {'run' if bf16_rows else 'skipped (bf16 slower than fp32 here; --bf16 on forces them)'}")

    # ---- A/B/C: captioning
    naive = NaiveOriginal(sh).to(device).eval()
    candidates = {("LoraCaptioner", "fp32"): build_ours(sh, device=device)}
    if bf16_rows:
        candidates[("LoraCaptioner", "bf16")] = build_ours(sh, dtype=torch.bfloat16, device=device)
    if device == "cpu":  # torch's dynamic int8 kernels are CPU kernels
        candidates[("LoraCaptioner", "fp32 + int8 decoder")] = quantize_int8(build_ours(sh, device=device))
        candidates[("LoraCaptioner", "fp32 + int8 decoder & vision")] = quantize_int8(build_ours(sh, device=device),
                                                                                     vision=True)
    rows = []
    base = {}
    for workload, batch, beams in [("A throughput", args.batch, 1), ("B latency", 1, 1), ("C beam 4", args.batch, 4)]:
        if workload.startswith("C") and "beam" in skip:
            continue
        repeats_here = repeats * 3 if batch == 1 else repeats
        base[workload] = time_captioning(naive, batch, args.tokens, beams, repeats_here, device)
        progress(f"{workload}: naive {base[workload]:.2f} s")
        rows.append((workload, "naive original (i)", "fp32", batch, base[workload]))
        for (name, precision), model in candidates.items():
            seconds = time_captioning(model, batch, args.tokens, beams, repeats_here, device)
            rows.append((workload, name, precision, batch, seconds))
            progress(f"{workload}: {name} {precision} {seconds:.2f} s")
            if workload.startswith("A") and (name, precision) == ("LoraCaptioner", "fp32"):
                caption_seconds = seconds
        if workload.startswith("A") and "peers" not in skip:
            for precision in ["fp32"] + (["bf16"] if bf16_rows else []):
                for name, peer in build_peers(sh, DTYPES[precision], device).items():
                    rows.append((workload, name, precision, batch,
                                 time_captioning(peer, batch, args.tokens, 1, repeats, device)))
                    progress(f"{workload}: {name} {precision} {rows[-1][-1]:.2f} s")
                    del peer
                gc.collect()
    emit("\n## Captioning (A: batch 8 greedy, B: batch 1 greedy, C: beam 4 batch 8)\n")
    emit("| workload | model | precision | images/s | ms / batch | ratio to naive (i) |")
    emit("|---|---|---|---|---|---|")
    for workload, name, precision, batch, seconds in rows:
        emit(f"| {workload} | {name} | {precision} | {batch / seconds:.2f} | {1000 * seconds:.0f} | "
             f"{base[workload] / seconds:.2f}× |")
    peers_a = [(seconds, f"{name} {precision}") for workload, name, precision, _, seconds in rows
               if workload.startswith("A") and name not in ("naive original (i)", "LoraCaptioner")]
    ours_a = [(seconds, precision) for workload, name, precision, _, seconds in rows
              if workload.startswith("A") and name == "LoraCaptioner"]
    if peers_a:
        (peer_seconds, peer), (best_seconds, best) = min(peers_a), min(ours_a)
        fastest = (f"A: the fastest peer is {peer}; the fastest LoraCaptioner ({best}) has "
                   f"{peer_seconds / best_seconds:.2f}× its throughput")
    if not bf16_rows:
        emit("| A throughput | every model | bf16 | skipped: bf16 matmul "
             f"{flops['fp32'] / max(flops['bf16'], 1):.0f}× slower than fp32 on this device | | |")

    if peers_a:
        emit(f"\n{fastest}")

    # ---- vision encoder efficiency
    ours = candidates[("LoraCaptioner", "fp32")]
    px = pixels(ours, args.batch, device)
    with torch.inference_mode():
        ours.encoder(px)
        vision_seconds = median_seconds(lambda: ours.encoder(px), repeats, device)
    achieved = vision_flops(ours, px) / vision_seconds
    emit(f"\nvision encoder (batch {args.batch}, fp32): {1000 * vision_seconds:.0f} ms, "
         f"{achieved / 1e9:.1f} GFLOP/s = {achieved / flops['fp32']:.0%} of the fp32 matmul rate")

    # ---- D: training
    if "train" not in skip:
        emit(f"\n## D: LoRA training step (batch {args.train_batch}, r=8, alpha=16, dropout 0.1, 7 targets, Adam)\n")
        emit("| model | precision | images/s | s / step | ratio to naive |")
        emit("|---|---|---|---|---|")
        train = {}
        for kind in ("naive", "ours"):
            step = train_step_fn(kind, sh, args.train_batch, device)
            step()
            train[kind] = median_seconds(step, repeats, device)
            progress(f"D: {kind} {train[kind]:.2f} s/step")
            del step
            gc.collect()
        for kind, name in (("naive", "naive original (i)"), ("ours", "LoraCaptioner")):
            emit(f"| {name} | fp32 | {args.train_batch / train[kind]:.2f} | {train[kind]:.2f} | "
                 f"{train['naive'] / train[kind]:.2f}× |")
        emit("| LoraCaptioner, cached vision features (E, bench/epoch_cache.py) | | to be filled by the lead | | |")

    # ---- F: memory, each in a fresh process
    if "memory" not in skip:
        emit("\n## F: peak memory (a fresh process per row; CPU: peak RSS, the interpreter with torch included)\n")
        emit("| workload | model | peak MiB while running | ratio to naive | peak MiB while loading | interpreter MiB |")
        emit("|---|---|---|---|---|---|")
        kinds = [("inference", "naive", "naive original (i), fp32"), ("inference", "ours-fp32", "LoraCaptioner fp32")]
        if device == "cpu":
            kinds += [("inference", "ours-int8", "LoraCaptioner fp32 + int8 decoder"),
                      ("inference", "ours-int8-all", "LoraCaptioner fp32 + int8 decoder & vision")]
        if bf16_rows:
            kinds.append(("inference", "ours-bf16", "LoraCaptioner bf16"))
        if "train" not in skip:
            kinds += [("training", "train-naive", "naive original (i), fp32"),
                      ("training", "train-ours", "LoraCaptioner fp32")]
        peaks = {}
        for workload, kind, name in kinds:
            result = measure_memory(kind, args)
            progress(f"F: {kind} {result}")
            if "error" in result:
                emit(f"| {workload} | {name} | failed: {result['error']} | |")
                continue
            peaks[kind] = result["run_bytes"] / 2**20
            reference = peaks.get("train-naive" if workload == "training" else "naive")
            emit(f"| {workload} | {name} | {peaks[kind]:.0f} | {fmt(reference and peaks[kind] / reference)}× | "
                 f"{result['load_bytes'] / 2**20:.0f} | {result['interpreter_bytes'] / 2**20:.0f} |")

    # ---- means
    if "means" not in skip:
        emit("\n## Means, each measured\n")
        with torch.inference_mode():
            eager = build_ours(sh, attn="eager", device=device)
            eager.load_state_dict(ours.state_dict())
            eager.encoder(px)
            eager_seconds = median_seconds(lambda: eager.encoder(px), repeats, device)
            del eager
        emit(f"- CLIP tower attention: eager {1000 * eager_seconds:.0f} ms vs SDPA {1000 * vision_seconds:.0f} ms "
             f"per batch of {args.batch} ({eager_seconds / vision_seconds:.2f}×). T5's decoder also runs SDPA "
             f"(T5 `_supports_sdpa` = {T5ForConditionalGeneration._supports_sdpa} in this transformers).")
        counted = cross_attention_projections_per_generate(sh, args.tokens)
        emit(f"- cross-attention keys: {counted['calls']} calls of `EncDecAttention.k` in one {counted['steps']}-step "
             f"generate over {counted['layers']} layers (once per layer: T5's EncoderDecoderCache keeps them).")
        if "compile" not in skip and not (args.quick or args.tiny):
            emit("- " + static_cache_and_compile(ours, px, args.tokens, repeats, device, base_seconds=caption_seconds))
        emit(f"- no T5 text encoder: LoraCaptioner {sum(p.numel() for p in ours.parameters()) / 1e6:.1f} M "
             f"parameters vs naive {sum(p.numel() for p in naive.parameters()) / 1e6:.1f} M.")
    del naive

    if "prep" not in skip:
        emit("\n## Image preprocessing (ms per image; random 333–640 px RGB images; max |diff| vs the first row)\n")
        emit("| path | batch 1 | batch 8, mixed sizes | batch 8, one size | max abs diff |")
        emit("|---|---|---|---|---|")
        for row in preprocessing_rows(sh["clip"]["image_size"], max(repeats, 3)):
            emit(f"| {row['name']} | {row['b1']:.1f} | {row['b8 mixed sizes']:.1f} | {row['b8 same size']:.1f} | "
                 f"{row['max_abs_diff']:.3f} |")

    if args.quality_model and args.quality_data:
        result = quality_guard(args.quality_model, args.quality_data, device)
        emit(f"\n## Quality guard: greedy captions identical to the fp32 eager reference "
             f"({result.pop('images')} held-out images of {args.quality_model})\n")
        emit("| path | identical captions |")
        emit("|---|---|")
        for name, share in result.items():
            emit(f"| {name} | {share:.1%} |")

    emit(f"\ntotal wall time {time.perf_counter() - started:.0f} s; load average (1 min) at end "
         f"{os.getloadavg()[0]:.2f}")
    text = "\n".join(lines) + "\n"
    if args.markdown:
        Path(args.markdown).write_text(text)
    return text


if __name__ == "__main__":
    main()
