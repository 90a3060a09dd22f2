"""Throughput of `loracaptioner caption` at scale (issue 13): images/s with 0 vs 2 DataLoader workers, 1 vs 2
processes (torchrun, gloo on CPU), against today's one-process CLI over the same images as files, same settings.

    python bench/caption_throughput.py                     # 512 JPEGs (640x480) in 8 webdataset shards
    python bench/caption_throughput.py --images 2048 --markdown bench/caption_throughput.md

The model is tiny (random weights; a 2-layer ViT at 224 px with 32-px patches, a 2-layer T5 decoder, 8 new tokens)
behind the real 224-px CLIP preprocessing, so that reading, decoding and preprocessing the images weigh as much as
they do next to a large model on a GPU. Every configuration runs as its own command, twice: over all the images and
over the first quarter of the shards (files), `--repeats` times each, the fastest counting; images/s = the difference
in images / the difference in seconds, which leaves out what does not grow with the images (interpreter start,
imports, model loading). Runs over shards also report their own images/s (from the end of model loading to the last
shard), shown next to it.
"""

from __future__ import annotations

import argparse
import io
import os
import platform
import re
import shutil
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

REPO = Path(__file__).resolve().parents[1]


def build_tiny_model(folder: Path) -> None:
    """A LoraCaptioner folder with random tiny weights and a full-size (224 px) CLIP image processor."""
    import torch
    from transformers import CLIPImageProcessorPil, CLIPVisionConfig, T5Config, T5Tokenizer

    sys.path.insert(0, str(REPO))
    from loracaptioner import LoraCaptionerConfig, LoraCaptionerForConditionalGeneration, LoraCaptionerProcessor

    words = "a the photo of small large red green blue dog cat tree on in left right top bottom".split()
    vocab = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("▁", -3.0)]
    vocab += [("▁" + word, -1.0 - i * 0.01) for i, word in enumerate(words)] + [(c, -5.0) for c in "abcdefghijk"]
    tokenizer = T5Tokenizer(vocab=vocab, extra_ids=0)
    config = LoraCaptionerConfig(
        vision_config=CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                       num_attention_heads=4, image_size=224, patch_size=32, projection_dim=24),
        text_config=T5Config(vocab_size=len(tokenizer), d_model=32, d_ff=64, d_kv=8, num_heads=4, num_layers=2,
                             num_decoder_layers=2, feed_forward_proj="gated-gelu", tie_word_embeddings=False,
                             decoder_start_token_id=0),
    )
    torch.manual_seed(0)
    LoraCaptionerForConditionalGeneration(config).save_pretrained(folder)
    image_processor = CLIPImageProcessorPil(size={"shortest_edge": 224}, crop_size={"height": 224, "width": 224})
    LoraCaptionerProcessor(image_processor=image_processor, tokenizer=tokenizer).save_pretrained(folder)


def write_images(folder: Path, count: int, shards: int, size: tuple[int, int]) -> None:
    """The same JPEGs twice: as webdataset shards (`shards/NNNNN.tar`, jpg + txt per sample) and as files
    (`files/NNNNN/KEY.jpg`, one folder per shard)."""
    rng = np.random.default_rng(0)
    base = rng.integers(0, 255, (size[1] // 8, size[0] // 8, 3), dtype=np.uint8)
    per_shard = count // shards
    (folder / "shards").mkdir(parents=True)
    for shard in range(shards):
        (folder / "files" / f"{shard:05d}").mkdir(parents=True)
        with tarfile.open(folder / "shards" / f"{shard:05d}.tar", "w") as tar:
            for sample in range(per_shard):
                # a smooth picture with some noise: JPEG sizes and decoding times like photographs'
                picture = Image.fromarray(np.roll(base, shard * per_shard + sample, axis=1)).resize(size)
                noise = rng.integers(-12, 12, (size[1], size[0], 3))
                picture = Image.fromarray(np.clip(np.asarray(picture) + noise, 0, 255).astype(np.uint8))
                buffer = io.BytesIO()
                picture.save(buffer, format="JPEG", quality=90)
                key = f"{shard:05d}{sample:05d}"
                (folder / "files" / f"{shard:05d}" / f"{key}.jpg").write_bytes(buffer.getvalue())
                for name, data in ((f"{key}.jpg", buffer.getvalue()), (f"{key}.txt", b"a caption")):
                    info = tarfile.TarInfo(name)
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))


def timed(command: list[str], env: dict) -> tuple[float, float | None]:
    """Wall-clock seconds of the command, and the images/s its own summary reports (runs over shards only)."""
    start = time.perf_counter()
    result = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, check=False)
    seconds = time.perf_counter() - start
    if result.returncode != 0:
        sys.exit(f"failed ({result.returncode}): {' '.join(command)}\n{result.stderr[-3000:]}")
    reported = re.search(r"\(([\d.]+) images/s\) by", result.stderr)
    return seconds, float(reported.group(1)) if reported else None


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=512)
    parser.add_argument("--shards", type=int, default=8)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--max-new-tokens", type=int, default=8)
    parser.add_argument("--size", default="640x480", help="JPEG width x height")
    parser.add_argument("--work", default=str(REPO / "outputs" / "bench-throughput"), help="scratch folder")
    parser.add_argument("--repeats", type=int, default=2, help="runs per configuration and size; the fastest counts")
    parser.add_argument("--threads", type=int, default=1, help="torch threads per process (OMP_NUM_THREADS)")
    parser.add_argument("--markdown", help="also write the table here")
    args = parser.parse_args(argv)
    work = Path(args.work)
    shutil.rmtree(work, ignore_errors=True)
    size = tuple(int(side) for side in args.size.split("x"))
    build_tiny_model(work / "model")
    write_images(work, args.images, args.shards, size)
    quarter = max(1, args.shards // 4)

    python = [sys.executable]
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    settings = ["--batch-size", str(args.batch_size), "--max-new-tokens", str(args.max_new_tokens), "--quiet"]
    # One torch thread per process in every configuration (torchrun's own default for several processes), so that
    # they differ only in processes and workers: on a busy machine, two threads per op on a tiny model are mostly
    # waiting for each other.
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": str(args.threads)}

    def shards(count: int) -> list[str]:
        return [str(work / "shards" / f"{shard:05d}.tar") for shard in range(count)]

    def files(count: int) -> list[str]:
        return [str(work / "files" / f"{shard:05d}") for shard in range(count)]

    configurations = [
        ("today's CLI: files, 1 process, 4 reader threads (--num-workers 4)", python, files, ["--num-workers", "4"]),
        ("shards, 1 process, 0 DataLoader workers", python, shards, ["--num-workers", "0"]),
        ("shards, 1 process, 2 DataLoader workers", python, shards, ["--num-workers", "2"]),
        ("shards, 2 processes (torchrun), 0 workers each", torchrun, shards, ["--num-workers", "0"]),
        ("shards, 2 processes (torchrun), 1 worker each", torchrun, shards, ["--num-workers", "1"]),
        ("files, 2 processes (torchrun), 1 worker each", torchrun, files,
         ["--num-workers", "1", "--shard-size", str(args.images // args.shards)]),
    ]
    load_before = os.getloadavg()[0]
    rows = []
    for number, (label, launcher, inputs, options) in enumerate(configurations):
        seconds, reported = [], []
        for count in (quarter, args.shards):
            runs = []
            for repeat in range(args.repeats):
                output = work / f"run-{number}-{count}-{repeat}.jsonl"
                command = [*launcher, "-m", "loracaptioner", "caption", str(work / "model"), *inputs(count), "-o",
                           str(output), *settings, *options]
                runs.append(timed(command, env))
            seconds.append(min(run[0] for run in runs))
            reported.append(max((run[1] for run in runs if run[1] is not None), default=None))
        per_shard = args.images // args.shards
        rate = (args.shards - quarter) * per_shard / (seconds[1] - seconds[0])
        rows.append((label, seconds[1], rate, reported[1]))
        print(f"{label}: {rate:.1f} images/s ({seconds[1]:.1f} s for {args.images} images, {seconds[0]:.1f} s for "
              f"{quarter * per_shard}; own summary: {reported[1] or '-'} images/s)", flush=True)

    import torch

    cpu = platform.processor() or "unknown"
    try:
        lscpu = subprocess.run(["lscpu"], capture_output=True, text=True, check=False).stdout
        cpu = next(line.split(":", 1)[1].strip() for line in lscpu.splitlines() if "Model name" in line)
    except (OSError, StopIteration):
        pass
    lines = [
        f"{args.images} JPEGs ({args.size}) in {args.shards} webdataset shards; tiny model, 224-px CLIP preprocessing, "
        f"batch {args.batch_size}, {args.max_new_tokens} new tokens, {args.threads} torch thread(s) per process; "
        f"{os.cpu_count()} CPUs ({cpu}, torch CPU "
        f"capability {torch.backends.cpu.get_cpu_capability()}); load average {load_before:.2f} before, "
        f"{os.getloadavg()[0]:.2f} after",
        "",
        "| configuration | images/s | vs today's CLI | s, all images (incl. start-up) | images/s, run's own summary |",
        "|---|---:|---:|---:|---:|",
    ]
    lines += [f"| {label} | {rate:.1f} | {rate / rows[0][2]:.2f}x | {total:.1f} | {own or '-'} |"
              for label, total, rate, own in rows]
    table = "\n".join(lines)
    print("\n" + table)
    if args.markdown:
        Path(args.markdown).write_text(table + "\n")


if __name__ == "__main__":
    main()
