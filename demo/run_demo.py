#!/usr/bin/env python
"""The offline demo (`make demo`): synthetic captioned shapes -> a tiny base captioner -> LoRA on the frozen base with
train_hf.py -> held-out metrics and captions, and a Hub-ready model folder.

Pretrained CLIP / Flan-T5 weights cannot be downloaded here, so stage 1 trains tiny base backbones itself (fully, on
half of the training images; cached between runs). Stage 2 is the real LoraCaptioner recipe: vision tower frozen,
decoder base weights frozen, LoRA adapters + bridge trained by train_hf.py. The test split holds only colour x shape
combinations that never occur in training.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(HERE))

import synthetic_shapes  # noqa: E402

BASE_RECIPE = {  # tiny backbones: CLIP-style ViT (64 px, patch 8) and a 2-layer T5 decoder
    "vision": dict(hidden_size=96, intermediate_size=192, num_hidden_layers=3, num_attention_heads=4, image_size=64,
                   patch_size=8, projection_dim=64),
    "text": dict(d_model=96, d_ff=192, d_kv=24, num_heads=4, num_layers=1, num_decoder_layers=2,
                 feed_forward_proj="gated-gelu", tie_word_embeddings=False, decoder_start_token_id=0, dropout_rate=0.0),
    "pretrain": ["--max_train_samples", "1000", "--num_train_epochs", "12", "--learning_rate", "2e-3",
                 "--per_device_train_batch_size", "32", "--warmup_steps", "20", "--lr_scheduler_type", "cosine"],
}
LORA_STAGE = ["--lora_r", "8", "--lora_alpha", "16", "--lora_dropout", "0.05", "--num_train_epochs", "4",
              "--learning_rate", "3e-3", "--per_device_train_batch_size", "32", "--warmup_steps", "10",
              "--lr_scheduler_type", "cosine", "--per_device_eval_batch_size", "64"]
COMMON = ["--report_to", "none", "--use_cpu", "--seed", "0", "--logging_steps", "20", "--dataloader_num_workers", "0",
          "--disable_tqdm", "true"]


def run(args: list[str], log_file: Path) -> None:
    command = [sys.executable, str(REPO / "train_hf.py"), *args, *COMMON]
    print("$ python train_hf.py " + " ".join(args), flush=True)
    with open(log_file, "w") as log:
        completed = subprocess.run(command, stdout=log, stderr=subprocess.STDOUT, cwd=REPO)
    if completed.returncode:
        sys.exit(f"train_hf.py failed (exit {completed.returncode}); see {log_file}")


def build_base_init(folder: Path) -> None:
    """A randomly initialised tiny LoraCaptioner + processor with the demo's tokenizer."""
    import torch
    from transformers import CLIPImageProcessorPil, CLIPVisionConfig, T5Config

    from loracaptioner import LoraCaptionerConfig, LoraCaptionerForConditionalGeneration, LoraCaptionerProcessor

    torch.manual_seed(0)
    tokenizer = synthetic_shapes.build_tokenizer()
    config = LoraCaptionerConfig(
        vision_config=CLIPVisionConfig(**BASE_RECIPE["vision"]),
        text_config=T5Config(vocab_size=len(tokenizer), **BASE_RECIPE["text"]),
        freeze_vision=False,
    )
    LoraCaptionerForConditionalGeneration(config).save_pretrained(folder)
    size = BASE_RECIPE["vision"]["image_size"]
    image_processor = CLIPImageProcessorPil(size={"shortest_edge": size}, crop_size={"height": size, "width": size})
    LoraCaptionerProcessor(image_processor=image_processor, tokenizer=tokenizer).save_pretrained(folder)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output_dir", default=str(REPO / "outputs" / "demo"))
    parser.add_argument("--num_train", type=int, default=2000)
    parser.add_argument("--num_test", type=int, default=200)
    args = parser.parse_args()
    started = time.perf_counter()
    out = Path(args.output_dir)
    out.mkdir(parents=True, exist_ok=True)

    print("1/4 synthetic data (cached):", flush=True)
    splits = synthetic_shapes.make_splits(out / "data", num_train=args.num_train, num_validation=100,
                                          num_test=args.num_test, seed=0)
    data = out / "data"
    print(f"    train {data / 'train'}, held-out test {data / 'test'} "
          f"(colour x shape pairs never seen in training: {synthetic_shapes.held_out_pairs()})")

    recipe_key = hashlib.sha256(json.dumps([BASE_RECIPE, str(splits)], default=str).encode()).hexdigest()[:12]
    base = out / f"base-{recipe_key}"
    if not (base / "model.safetensors").exists():
        print("2/4 tiny base captioner, trained fully on half of the training images (cached afterwards):")
        build_base_init(out / "base-init")
        run(["--model_name_or_path", str(out / "base-init"), "--train_dir", str(data / "train"),
             "--lora_r", "0", "--freeze_vision", "false", "--do_train", "--save_strategy", "no",
             "--output_dir", str(base), *BASE_RECIPE["pretrain"]], out / "base.log")
    else:
        print(f"2/4 tiny base captioner: cached at {base}")

    print("3/4 LoRA on the frozen base (vision tower and decoder weights frozen; LoRA + bridge trained):")
    model_dir = out / "model"
    shutil.rmtree(model_dir, ignore_errors=True)  # train_hf.py would otherwise resume from its last checkpoint
    run(["--model_name_or_path", str(base), "--train_dir", str(data / "train"), "--validation_dir", str(data / "test"),
         "--do_train", "--do_eval", "--eval_strategy", "no", "--save_strategy", "epoch", "--save_total_limit", "1",
         "--output_dir", str(model_dir), *LORA_STAGE], out / "lora.log")

    print("4/4 held-out evaluation (unseen colour x shape combinations):")
    summary = json.loads((model_dir / "run_summary.json").read_text())
    for name, value in sorted(summary["eval"].items()):
        print(f"    {name:24s} {value}")
    show_captions(model_dir, data / "test")
    print(f"\nModel folder (Hub-ready, loads with trust_remote_code=True): {model_dir}")
    print(f"Demo finished in {time.perf_counter() - started:.0f} s.")


def show_captions(model_dir: Path, test_dir: Path, count: int = 8) -> None:
    from PIL import Image
    from transformers import AutoModelForImageTextToText, AutoProcessor

    model = AutoModelForImageTextToText.from_pretrained(model_dir, trust_remote_code=True).eval()
    processor = AutoProcessor.from_pretrained(model_dir, trust_remote_code=True)
    rows = [json.loads(line) for line in (test_dir / "metadata.jsonl").read_text().splitlines()[:count]]
    images = [Image.open(test_dir / row["file_name"]) for row in rows]
    captions = processor.batch_decode(model.generate(**processor(images=images)), skip_special_tokens=True)
    print("\n    held-out image           reference                          model")
    for row, caption in zip(rows, captions):
        mark = "ok" if caption == row["caption"] else "--"
        print(f"    {row['file_name']:24s} {row['caption']:34s} {caption}  [{mark}]")


if __name__ == "__main__":
    main()
