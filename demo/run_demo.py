#!/usr/bin/env python
"""The offline demo (`make demo`): synthetic captioned shapes -> a tiny base captioner -> LoRA on the frozen base with
train_hf.py -> held-out metrics and captions, and a Hub-ready model folder.

Pretrained CLIP / Flan-T5 weights cannot be downloaded here, so stage 1 trains tiny base backbones itself (cached
between runs). Stage 2 is the real LoraCaptioner recipe: vision tower frozen, decoder base weights frozen, LoRA
adapters + bridge trained by train_hf.py on the training split. The test split holds only colour x shape combinations
that never occur in training.

Why the base is built the way it is: a tower trained from scratch on the coloured training images learns colour-specific
shape detectors (it has never seen a red circle, so it has no "red circle" detector), and a decoder that has read
"red" never predicts "circle" after it. Both made held-out exact match 0%. So the base is made compositional:

* the vision tower is colour-blind: every patch filter sees R+G+B only (equal weights per channel, kept equal because
  stage 1 trains it on achromatic shapes, where the gradients of the three channels are identical). Its shape, size
  and position features are therefore the same for every colour;
* colour reaches the decoder through a few residual dimensions that carry each patch's mean chroma (opponent
  filters) past the transformer layers, which neither read nor write them;
* stage 1 captions read "a small image circle on the left": the word "image" holds the colour's place. Afterwards every
  colour word gets the slot's input embedding, so the decoder cannot condition the shape on the colour it wrote, and
  stage 2 (LoRA) only has to learn which colour word to write there.

Stage 1 never sees the test split, nor any coloured image: it trains on achromatic renders of the same generator.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
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

COLOUR_SLOT = "image"  # stage-1 stand-in for the colour word (a tokenizer word that no demo caption uses)
BYPASS_DIMS = (0, 1, 2, 3)  # residual dimensions of the vision tower that carry colour past its layers
# Mean chroma of a patch, in +- pairs so that the per-token LayerNorm shift cancels out: R-G and (R+G)/2-B.
OPPONENT_FILTERS = ((1.0, -1.0, 0.0), (-1.0, 1.0, 0.0), (1.0, 1.0, -2.0), (-1.0, -1.0, 2.0))

BASE_RECIPE = {  # tiny backbones: CLIP-style ViT (64 px, patch 8) and a 2-layer T5 decoder
    "vision": dict(hidden_size=96, intermediate_size=192, num_hidden_layers=3, num_attention_heads=4, image_size=64,
                   patch_size=8, projection_dim=64),
    "text": dict(d_model=96, d_ff=192, d_kv=24, num_heads=4, num_layers=1, num_decoder_layers=2,
                 feed_forward_proj="gated-gelu", tie_word_embeddings=False, decoder_start_token_id=0, dropout_rate=0.0),
    "captioner": dict(use_clip_projection=False),  # the bridge reads the tower's tokens, colour dimensions included
    "pixels": dict(image_mean=[0.5] * 3, image_std=[0.5] * 3),  # same for every channel: grey stays channel-equal
    "colour_bypass": dict(input_scale=0.2, gain=1.0, output_scale=3.0),
    "colour_word_spread": 0.3,  # how far apart the colour words' output rows start (see finish_base)
    "position_init": 0.5,  # 2-D sin-cos position embeddings (x this): where a shape is, is readable from the start
    "achromatic_images": dict(count=2000, seed=1, grey_levels=(40, 170), small_share=2),  # 2/3 small: the hard ones
    "pretrain": ["--num_train_epochs", "8", "--learning_rate", "2e-3", "--per_device_train_batch_size", "32",
                 "--warmup_steps", "20", "--lr_scheduler_type", "cosine"],
}
LORA_STAGE = ["--lora_r", "8", "--lora_alpha", "16", "--lora_dropout", "0.05", "--num_train_epochs", "8",
              "--learning_rate", "3e-3", "--per_device_train_batch_size", "32", "--warmup_steps", "10",
              "--lr_scheduler_type", "cosine", "--per_device_eval_batch_size", "100"]
COMMON = ["--report_to", "none", "--use_cpu", "--seed", "0", "--logging_steps", "50", "--dataloader_num_workers", "1",
          "--disable_tqdm", "true"]


def run(args: list[str], log_file: Path) -> None:
    command = [sys.executable, str(REPO / "train_hf.py"), *args, *COMMON]
    print("$ python train_hf.py " + " ".join(args), flush=True)
    # One compute thread (the data loader worker has the other core): with two OpenMP threads, any other load on the
    # machine stalls every tiny op at the thread barrier (measured: steps over 10x slower).
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    with open(log_file, "w") as log:
        completed = subprocess.run(command, stdout=log, stderr=subprocess.STDOUT, cwd=REPO, env=env)
    if completed.returncode:
        sys.exit(f"train_hf.py failed (exit {completed.returncode}); see {log_file}")


def write_achromatic_split(root: Path, count: int, seed: int, grey_levels: tuple[int, int],
                           small_share: int = 1) -> None:
    """Grey shapes on the generator's grey background, captioned with COLOUR_SLOT in the colour's place (cached);
    small shapes are drawn `small_share` times as often as large ones.

    Same shapes, sizes, positions, jitter and background as synthetic_shapes.render, but the fill is a random grey
    level and the background noise is the same in all three channels, so no image has any colour at all.
    """
    import numpy as np
    from PIL import Image

    params = {"generator_version": synthetic_shapes.GENERATOR_VERSION, "count": count, "seed": seed,
              "grey_levels": list(grey_levels), "slot": COLOUR_SLOT, "small_share": small_share}
    done = root / synthetic_shapes.DONE_FILE
    if done.is_file() and json.loads(done.read_text()) == params:
        return
    shutil.rmtree(root, ignore_errors=True)
    root.mkdir(parents=True)
    rng = np.random.default_rng(seed)
    size_px = synthetic_shapes.IMAGE_SIZE
    sizes = ["small"] * small_share + [size for size in synthetic_shapes.SIZE_RADII if size != "small"]
    combinations = [(shape, size, position) for shape in synthetic_shapes.SHAPES
                    for size in sizes for position in synthetic_shapes.POSITION_CENTRES]
    records = []
    for index, (shape, size, position) in enumerate(synthetic_shapes.balanced_draws(combinations, count, rng)):
        low, high = synthetic_shapes.BACKGROUND_SHADES
        noise = synthetic_shapes.BACKGROUND_NOISE
        background = rng.integers(low, high + 1) + rng.integers(-noise, noise + 1, size=(size_px, size_px, 1))
        radius = float(rng.uniform(*synthetic_shapes.SIZE_RADII[size]))
        fraction_x, fraction_y = synthetic_shapes.POSITION_CENTRES[position]
        jitter = synthetic_shapes.POSITION_JITTER
        jitter_x, jitter_y = rng.integers(-jitter, jitter + 1, size=2)
        lowest, highest = radius + synthetic_shapes.EDGE_MARGIN, size_px - radius - synthetic_shapes.EDGE_MARGIN
        centre_x = float(np.clip(fraction_x * size_px + jitter_x, lowest, highest))
        centre_y = float(np.clip(fraction_y * size_px + jitter_y, lowest, highest))
        grey = float(rng.uniform(*grey_levels))
        coverage = synthetic_shapes._shape_mask(shape, centre_x, centre_y, radius)[..., None]
        pixels = np.repeat(background * (1.0 - coverage) + grey * coverage, 3, axis=-1)
        file_name = f"{index:05d}.png"
        Image.fromarray(np.clip(np.rint(pixels), 0, 255).astype(np.uint8), mode="RGB").save(root / file_name)
        caption = synthetic_shapes.describe(shape, "red", size, position).split()
        caption[2] = COLOUR_SLOT
        records.append({"file_name": file_name, "caption": " ".join(caption)})
    with open(root / synthetic_shapes.METADATA_FILE, "w", encoding="utf-8") as metadata:
        metadata.writelines(json.dumps(record) + "\n" for record in records)
    done.write_text(json.dumps(params) + "\n")


def vision_transformer(model):
    tower = model.encoder.vision_tower
    return getattr(tower, "vision_model", tower)  # older transformers wrap the transformer once more


def isolate_colour_bypass(model, input_scale: float) -> None:
    """BYPASS_DIMS: opponent (mean chroma) patch filters, no position/CLS part, and no transformer layer reads them
    (LayerNorm weight/bias and reading columns zero) or writes them (writing rows zero)."""
    import torch

    vit = vision_transformer(model)
    dims = list(BYPASS_DIMS)
    with torch.no_grad():
        weight = vit.embeddings.patch_embedding.weight  # (hidden, 3, patch, patch)
        for dim, filter_ in zip(dims, OPPONENT_FILTERS):
            chroma = torch.tensor(filter_, dtype=weight.dtype)[:, None, None]
            weight[dim] = chroma.expand_as(weight[dim]) * input_scale / weight[dim, 0].numel()
        vit.embeddings.position_embedding.weight[:, dims] = 0
        vit.embeddings.class_embedding[dims] = 0
        for layer in vit.encoder.layers:
            for norm in (layer.layer_norm1, layer.layer_norm2):
                norm.weight[dims] = 0
                norm.bias[dims] = 0
            for reader in (layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj, layer.mlp.fc1):
                reader.weight[:, dims] = 0
            for writer in (layer.self_attn.out_proj, layer.mlp.fc2):
                writer.weight[dims] = 0
                writer.bias[dims] = 0


def build_base_init(folder: Path) -> None:
    """A randomly initialised tiny LoraCaptioner + processor with the demo's tokenizer: colour-blind patch filters,
    sin-cos position embeddings, and the colour bypass closed (opened by `finish_base` after stage 1)."""
    import torch
    from transformers import CLIPImageProcessorPil, CLIPVisionConfig, T5Config

    from loracaptioner import LoraCaptionerConfig, LoraCaptionerForConditionalGeneration, LoraCaptionerProcessor

    torch.manual_seed(0)
    tokenizer = synthetic_shapes.build_tokenizer()
    vision = BASE_RECIPE["vision"]
    config = LoraCaptionerConfig(
        vision_config=CLIPVisionConfig(**vision),
        text_config=T5Config(vocab_size=len(tokenizer), **BASE_RECIPE["text"]),
        freeze_vision=False,
        **BASE_RECIPE["captioner"],
    )
    model = LoraCaptionerForConditionalGeneration(config)
    vit = vision_transformer(model)
    with torch.no_grad():
        weight = vit.embeddings.patch_embedding.weight
        weight.copy_(weight.mean(dim=1, keepdim=True).expand_as(weight))  # colour-blind: R, G, B weighted alike
        side = vision["image_size"] // vision["patch_size"]
        vit.embeddings.position_embedding.weight[1:] = sincos_positions(side, vision["hidden_size"]) * BASE_RECIPE[
            "position_init"]
        vit.embeddings.position_embedding.weight[0] = 0
    isolate_colour_bypass(model, BASE_RECIPE["colour_bypass"]["input_scale"])
    with torch.no_grad():
        dims = list(BYPASS_DIMS)
        for norm in (vit.pre_layrnorm, vit.post_layernorm):  # closed while stage 1 learns shapes
            norm.weight[dims] = 0
            norm.bias[dims] = 0
    model.save_pretrained(folder)
    size = vision["image_size"]
    image_processor = CLIPImageProcessorPil(size={"shortest_edge": size}, crop_size={"height": size, "width": size},
                                            **BASE_RECIPE["pixels"])
    LoraCaptionerProcessor(image_processor=image_processor, tokenizer=tokenizer).save_pretrained(folder)


def sincos_positions(side: int, dim: int):
    """2-D sine-cosine position embeddings of a side x side patch grid: a quarter of the channels each for sin/cos of
    y and of x, wavelengths from one grid side down."""
    import torch

    quarter = dim // 4
    frequencies = 1.0 / (10000 ** (torch.arange(quarter) / quarter))
    ys, xs = torch.meshgrid(torch.arange(side, dtype=torch.float32), torch.arange(side, dtype=torch.float32),
                            indexing="ij")

    def encode(values):
        angles = values.flatten()[:, None] * frequencies[None] * (2 * math.pi / side)
        return torch.cat([angles.sin(), angles.cos()], dim=1)

    table = torch.cat([encode(ys), encode(xs)], dim=1)
    return torch.nn.functional.pad(table, (0, dim - table.shape[1]))


def finish_base(stage1: Path, base: Path) -> None:
    """After stage 1: open the colour bypass, and let every colour word take the colour slot's place.

    Input embeddings: each colour word = the slot's, so nothing after the colour can depend on which colour it was.
    Output rows (lm_head): each colour word = the slot's row plus a small distinct part, so a colour is what the
    decoder already writes there and LoRA only learns to tell them apart; the slot itself is never written again.
    """
    import torch

    from loracaptioner import LoraCaptionerForConditionalGeneration, LoraCaptionerProcessor

    model = LoraCaptionerForConditionalGeneration.from_pretrained(stage1)
    processor = LoraCaptionerProcessor.from_pretrained(stage1)
    bypass = BASE_RECIPE["colour_bypass"]
    isolate_colour_bypass(model, bypass["input_scale"])  # undo what stage 1 let drift through LayerNorm statistics
    vit = vision_transformer(model)
    tokenizer = processor.tokenizer
    slot = tokenizer.convert_tokens_to_ids("▁" + COLOUR_SLOT)
    colours = [tokenizer.convert_tokens_to_ids("▁" + colour) for colour in synthetic_shapes.COLOURS]
    with torch.no_grad():
        dims = list(BYPASS_DIMS)
        vit.pre_layrnorm.weight[dims] = bypass["gain"]
        vit.pre_layrnorm.bias[dims] = 0
        vit.post_layernorm.weight[dims] = bypass["output_scale"]
        vit.post_layernorm.bias[dims] = 0
        embeddings, lm_head = model.decoder.embed_tokens.weight, model.lm_head.weight
        embeddings[colours] = embeddings[slot].clone()
        distinct = lm_head[colours] / lm_head[colours].norm(dim=1, keepdim=True) * lm_head[slot].norm()
        lm_head[colours] = lm_head[slot].clone() + BASE_RECIPE["colour_word_spread"] * distinct
        lm_head[slot] = 0
    model.save_pretrained(base)
    processor.save_pretrained(base)
    for name in ("README.md", "run_summary.json", "all_results.json", "train_results.json", "trainer_state.json"):
        if (stage1 / name).exists():
            shutil.copy(stage1 / name, base / name)


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
    synthetic_shapes.make_splits(out / "data", num_train=args.num_train, num_validation=100, num_test=args.num_test,
                                 seed=0)
    data = out / "data"
    print(f"    train {data / 'train'}, held-out test {data / 'test'} "
          f"(colour x shape pairs never seen in training: {synthetic_shapes.held_out_pairs()})")

    recipe_key = hashlib.sha256(json.dumps([BASE_RECIPE, BYPASS_DIMS, OPPONENT_FILTERS, COLOUR_SLOT,
                                            synthetic_shapes.GENERATOR_VERSION], default=str).encode()).hexdigest()[:12]
    base = out / f"base-{recipe_key}"
    if not (base / "model.safetensors").exists():
        print("2/4 tiny base captioner: colour-blind vision tower + decoder, trained fully on achromatic shapes "
              "(cached afterwards):", flush=True)
        achromatic = out / "achromatic"  # not under data/, which datasets would read as one dataset
        write_achromatic_split(achromatic, **BASE_RECIPE["achromatic_images"])
        build_base_init(out / "base-init")
        stage1 = out / f"base-{recipe_key}-stage1"
        run(["--model_name_or_path", str(out / "base-init"), "--train_dir", str(achromatic),
             "--lora_r", "0", "--freeze_vision", "false", "--do_train", "--save_strategy", "no",
             "--output_dir", str(stage1), *BASE_RECIPE["pretrain"]], out / "base.log")
        finish_base(stage1, base)
        shutil.rmtree(stage1)
    else:
        print(f"2/4 tiny base captioner: cached at {base}")

    print("3/4 LoRA on the frozen base (vision tower and decoder weights frozen; LoRA + bridge trained):", flush=True)
    model_dir = out / "model"
    shutil.rmtree(model_dir, ignore_errors=True)  # start afresh (train_hf.py would resume from a checkpoint there)
    run(["--model_name_or_path", str(base), "--train_dir", str(data / "train"), "--validation_dir", str(data / "test"),
         "--do_train", "--do_eval", "--eval_strategy", "no", "--save_strategy", "no",
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
