#!/usr/bin/env python
"""The offline demo (`make demo`): a captioner that learns English first, then French with LoRA, on synthetic shapes.

Pretrained CLIP and Flan-T5 cannot be downloaded here, so the demo makes its own stand-in for them, and then runs
LoraCaptioner's recipe on it, every step with `train_hf.py`:

1. data: 64x64 images of one coloured shape, each with an English and a French caption (demo/synthetic_shapes.py);
   train, validation and test splits are different renders from different random streams;
2. base: a tiny LoraCaptioner (64 px ViT, 2-layer T5 decoder) built by its own constructor, i.e. every weight set by
   the models' own `_init_weights`, and trained fully (vision tower included, `--lora_r 0 --freeze_vision false`)
   on the English captions. It never sees a French word. Cached in `outputs/demo/base`;
3. adaptation to French, three ways, each from the same base with the vision tower frozen:
   * bridge only: the bridge learns, the decoder stays as it is (LoRA adapters at scale 0, `--lora_alpha 0`,
     receive no gradient and change nothing);
   * LoRA: the original's configuration (r=8, alpha=16, dropout 0.1, its seven decoder modules) + the bridge,
     exactly `configs/demo.yaml`;
   * full decoder fine-tuning (`--lora_r 0`): bridge, decoder and LM head all learn;
4. the report: the base with no adapter and the three adapted models on the same held-out test images, with
   exact match, CIDEr-D, BLEU-4, ROUGE-L, trainable parameters and wall time; printed, written to
   `outputs/demo/report.md`, and drawn with the learning curves and captioned test images in `outputs/demo/report.png`.

No weight is set, copied or masked by hand anywhere (tests/test_demo_recipe.py checks this file). Every choice
(pixel scaling, epochs, learning rates) was made on the validation split (`--tune` repeats those runs); the test
split is read once, at the very end, by `evaluate_on_test`.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(HERE))

import evaluation  # noqa: E402
import report  # noqa: E402
import synthetic_shapes  # noqa: E402

LORA_CONFIG = REPO / "configs" / "demo.yaml"  # the LoRA stage, as `python train_hf.py configs/demo.yaml` runs it
DATA = {"num_train": 3000, "num_validation": 300, "num_test": 500, "seed": 0}
QUICK_DATA = {"num_train": 48, "num_validation": 12, "num_test": 12, "seed": 0}  # --quick: a smoke run for the tests

# The stand-in for pretrained CLIP + Flan-T5, before training. Pixels are scaled to [-0.5, 0.5] (mean 0.5, std 1)
# instead of CLIP's ~[-1.8, 2.1]: CLIP initialises its position embeddings at std 0.02, and full-scale pixels of the
# bright background drown them, so the base hardly learned where a shape is (validation exact match 0.59 after 12
# epochs against 0.98; --tune base).
BASE_MODEL = {
    "vision": dict(hidden_size=96, intermediate_size=192, num_hidden_layers=3, num_attention_heads=4, image_size=64,
                   patch_size=8, projection_dim=64),
    "text": dict(d_model=96, d_ff=192, d_kv=24, num_heads=4, num_layers=2, num_decoder_layers=2,
                 feed_forward_proj="gated-gelu", tie_word_embeddings=False, decoder_start_token_id=0, dropout_rate=0.0),
    "pixels": dict(image_mean=[0.5] * 3, image_std=[1.0] * 3),
    "seed": 0,
}
# Stage 1, the base's training: everything learns, English captions.
BASE_TRAINING = {
    "caption_column": "caption_en", "lora_r": 0, "freeze_vision": False,
    "do_train": True, "do_eval": True, "eval_strategy": "epoch", "save_strategy": "no",
    "num_train_epochs": 12, "learning_rate": 2e-3, "per_device_train_batch_size": 32, "warmup_steps": 20,
    "lr_scheduler_type": "cosine", "dataloader_num_workers": 1,
}
# Stage 2: the LoRA row is configs/demo.yaml; the other two rows change only what makes them what they are, and
# each has its own learning rate, the best on validation (--tune adapt). All three train 12 epochs.
ROW_CHANGES = {
    "bridge": {"lora_alpha": 0, "learning_rate": 3e-2},
    "lora": {},
    "full": {"lora_r": 0, "learning_rate": 3e-3},
}
# Where each row's model is: the LoRA row's is outputs/demo/model, the folder the Space and the README's examples use.
FOLDERS = {"base": "base", "bridge": "bridge", "lora": "model", "full": "full"}
RUN_SETTINGS = {"report_to": "none", "use_cpu": True, "seed": 0, "dataloader_num_workers": 0, "disable_tqdm": True,
                "per_device_eval_batch_size": 100, "logging_steps": 20, "log_level": "info"}
TRAINABLE_LOG = "trainable parameters: "
# One compute thread per train_hf.py run. Measured on the 2-core machine while others used it too: a training step of
# the base took 76-133 ms with one thread and 437-2906 ms with two (the second thread waits at OpenMP barriers
# whenever the other core is busy). The base, trained alone, gives the second core to a data-loading worker instead;
# the three adaptation runs, about equally long, run at once and share the cores.
THREADS = 1


def read_lora_config(out: Path) -> dict:
    """configs/demo.yaml, with its outputs/demo/... paths moved under `out` when the demo writes elsewhere."""
    import yaml

    config = yaml.safe_load(LORA_CONFIG.read_text())
    default_out = REPO / "outputs" / "demo"
    for key in ("model_name_or_path", "train_dir", "validation_dir", "output_dir"):
        config[key] = str(out / (REPO / config[key]).relative_to(default_out))
    return config


def command_line(arguments: dict) -> list[str]:
    """train_hf.py's command line for a dict of its arguments."""
    words = []
    for name, value in arguments.items():
        values = value if isinstance(value, list) else [value]
        words += [f"--{name}", *(str(v).lower() if isinstance(v, bool) else str(v) for v in values)]
    return words


def shell_command(arguments: dict) -> str:
    return f"OMP_NUM_THREADS={THREADS} python train_hf.py {shlex.join(command_line(arguments))}"


def start_train_hf(arguments: dict, log_file: Path) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": str(THREADS), "HF_HUB_OFFLINE": "1"}
    log = open(log_file, "w")
    return subprocess.Popen([sys.executable, "train_hf.py", *command_line(arguments)], stdout=log,
                            stderr=subprocess.STDOUT, cwd=REPO, env=env)


def run_train_hf(jobs: dict[str, tuple[dict, Path]], parallel: int) -> dict[str, float]:
    """Run train_hf.py once per job, `parallel` at a time; returns each job's wall time in seconds."""
    pending, running, wall = list(jobs.items()), {}, {}
    while pending or running:
        while pending and len(running) < parallel:
            name, (arguments, log_file) = pending.pop(0)
            print(f"    $ {shell_command(arguments)}", flush=True)
            running[name] = (start_train_hf(arguments, log_file), time.perf_counter(), log_file)
        time.sleep(0.2)
        for name, (process, started, log_file) in list(running.items()):
            if process.poll() is None:
                continue
            if process.returncode:
                for other, *_ in running.values():
                    other.terminate()
                sys.exit(f"train_hf.py failed (exit {process.returncode}); see {log_file}")
            wall[name] = time.perf_counter() - started
            del running[name]
            print(f"    {name}: {wall[name]:.0f} s", flush=True)
    return wall


def trainable_parameters(log_file: Path) -> int:
    """The count train_hf.py logs ("trainable parameters: 32,352 of 575,744 (5.62%)")."""
    line = next(line for line in log_file.read_text().splitlines() if TRAINABLE_LOG in line)
    return int(line.split(TRAINABLE_LOG)[1].split(" of ")[0].replace(",", ""))


def bridge_parameters(model_dir: Path) -> int:
    """The bridge's parameters: all that the bridge-only row trains (its LoRA matrices, at scale 0, never change)."""
    from loracaptioner import LoraCaptionerForConditionalGeneration

    model = LoraCaptionerForConditionalGeneration.from_pretrained(model_dir)
    return sum(parameter.numel() for parameter in model.get_encoder().bridge.parameters())


def build_base_init(folder: Path, pixels: dict = BASE_MODEL["pixels"]) -> None:
    """The untrained base: `LoraCaptionerForConditionalGeneration(config)` under a fixed seed (each weight drawn by
    CLIP's, T5's or LoraCaptioner's own `_init_weights`), with CLIP's image processor and the demo's tokenizer."""
    import torch
    from transformers import CLIPImageProcessorPil, CLIPVisionConfig, T5Config

    from loracaptioner import LoraCaptionerConfig, LoraCaptionerForConditionalGeneration, LoraCaptionerProcessor

    tokenizer = synthetic_shapes.build_tokenizer()
    config = LoraCaptionerConfig(
        vision_config=CLIPVisionConfig(**BASE_MODEL["vision"]),
        text_config=T5Config(vocab_size=len(tokenizer), **BASE_MODEL["text"]),
        freeze_vision=False,
    )
    torch.manual_seed(BASE_MODEL["seed"])
    LoraCaptionerForConditionalGeneration(config).save_pretrained(folder)
    size = BASE_MODEL["vision"]["image_size"]
    image_processor = CLIPImageProcessorPil(size={"shortest_edge": size}, crop_size={"height": size, "width": size},
                                            **pixels)
    LoraCaptionerProcessor(image_processor=image_processor, tokenizer=tokenizer).save_pretrained(folder)


def base_arguments(out: Path, extra: dict) -> dict:
    return {"model_name_or_path": str(out / "base-init"), "train_dir": str(out / "data" / "train"),
            "validation_dir": str(out / "data" / "validation"), "output_dir": str(out / "base"),
            **RUN_SETTINGS, **BASE_TRAINING, **extra}


def train_base(out: Path, extra: dict) -> dict:
    """Stage 1 (cached): returns what was recorded when the base was trained."""
    arguments = base_arguments(out, extra)
    recipe = {"model": BASE_MODEL, "arguments": arguments, "data": json.loads((out / "data" / "DONE").read_text()),
              "generator_version": synthetic_shapes.GENERATOR_VERSION}
    record_file = out / "base" / "demo_base.json"
    if record_file.is_file() and json.loads(record_file.read_text())["recipe"] == recipe:
        record = json.loads(record_file.read_text())
        print(f"2/4 base: cached in {out / 'base'} (trained in {record['wall_seconds']:.0f} s)")
        return record
    print("2/4 base: a tiny LoraCaptioner from its own random initialisation, trained fully on English captions:",
          flush=True)
    for folder in ("base-init", "base"):
        shutil.rmtree(out / folder, ignore_errors=True)
    build_base_init(out / "base-init")
    wall = run_train_hf({"base": (arguments, out / "base.log")}, parallel=1)["base"]
    record = {"recipe": recipe, "wall_seconds": wall, "trainable": trainable_parameters(out / "base.log"),
              "command": shell_command(arguments)}
    record_file.write_text(json.dumps(record, indent=1) + "\n")
    return record


def stage2_arguments(out: Path, extra: dict) -> dict[str, dict]:
    lora = {**read_lora_config(out), **extra}
    return {row: {**lora, **changes, "output_dir": str(out / FOLDERS[row])} for row, changes in ROW_CHANGES.items()}


def evaluate_on_test(out: Path) -> dict:
    """The only place the test split is read: every row's captions of the test images and their scores."""
    test_dir = out / "data" / "test"
    rows = evaluation.read_split(test_dir)
    french = [row["caption_fr"] for row in rows]
    results = {}
    for row in report.ROWS:
        captions, degenerate = evaluation.caption_split(out / FOLDERS[row], test_dir, evaluation.GREEDY)
        results[row] = {"captions": captions, **evaluation.caption_metrics(captions, french),
                        "degenerate": sum(degenerate) / len(degenerate)}
    results["base_english"] = evaluation.caption_metrics(results["base"]["captions"],
                                                         [row["caption_en"] for row in rows])
    return {"rows": rows, "results": results}


# --tune: the validation runs behind the choices above (they never read the test split).
BASE_GRID = {  # name: (pixel scaling, changed training arguments)
    "CLIP's mean and std": ({}, {}),
    "mean 0.5, std 1": (BASE_MODEL["pixels"], {}),
    "mean 0.5, std 2": ({"image_mean": [0.5] * 3, "image_std": [2.0] * 3}, {}),
    "mean 0.5, std 4": ({"image_mean": [0.5] * 3, "image_std": [4.0] * 3}, {}),
    "mean 0.5, std 1, 8 epochs": (BASE_MODEL["pixels"], {"num_train_epochs": 8}),
}
ADAPT_LEARNING_RATES = {"bridge": (1e-2, 3e-2, 1e-1), "lora": (2e-3, 3e-3, 5e-3), "full": (3e-4, 1e-3, 3e-3)}
ADAPT_GRID = {f"{row}, lr {lr:g}": (row, {"learning_rate": lr})
              for row, learning_rates in ADAPT_LEARNING_RATES.items() for lr in learning_rates}
ADAPT_GRID.update({f"{row}, lr {lr:g}, 8 epochs": (row, {"learning_rate": lr, "num_train_epochs": 8})
                   for row, lr in (("lora", 3e-3), ("full", 1e-3))})


def tune(out: Path, stage: str, extra: dict) -> None:
    """Run one stage's grid on the validation split, two runs at a time, and write out/tune/<stage>.md."""
    folder = out / "tune" / stage
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    jobs = {}
    for index, (name, (setting, changes)) in enumerate((BASE_GRID if stage == "base" else ADAPT_GRID).items()):
        run = folder / str(index)
        if stage == "base":  # setting: the pixel scaling
            build_base_init(run / "init", pixels=setting)
            arguments = {**base_arguments(out, extra), "model_name_or_path": str(run / "init")}
        else:  # setting: the row
            arguments = stage2_arguments(out, extra)[setting]
        jobs[name] = ({**arguments, **changes, "output_dir": str(run / "run")}, folder / f"{index}.log")
    wall = run_train_hf(jobs, parallel=2)
    lines = [f"# Validation runs for the {stage} stage", "",
             "| run | validation exact match after each epoch | last | wall time |", "|---|---|---:|---:|"]
    for index, name in enumerate(jobs):
        curve = report.validation_curve(folder / str(index) / "run")
        lines.append(f"| {name} | {' '.join(f'{value:.3f}' for _, value in curve)} | {curve[-1][1]:.3f} | "
                     f"{wall[name]:.0f} s |")
    lines += ["", f"{os.cpu_count()} CPU cores, two runs at a time; load average at the end "
              f"{os.getloadavg()[0]:.1f}."]
    (out / "tune" / f"{stage}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output_dir", type=Path, default=REPO / "outputs" / "demo")
    parser.add_argument("--quick", action="store_true", help="tiny data and 3 steps per stage: a smoke run (tests)")
    parser.add_argument("--tune", choices=("base", "adapt"),
                        help="instead of the demo, the validation runs behind the choices of one stage")
    args = parser.parse_args()
    started = time.perf_counter()
    out = args.output_dir.resolve()
    out.mkdir(parents=True, exist_ok=True)
    extra = {"max_steps": 3} if args.quick else {}

    print("1/4 data (cached): 64x64 shapes, English and French captions; train / validation / test are separate "
          "renders", flush=True)
    synthetic_shapes.make_splits(out / "data", **(QUICK_DATA if args.quick else DATA))

    if args.tune == "base":
        return tune(out, "base", extra)
    base = train_base(out, extra)
    if args.tune == "adapt":
        return tune(out, "adapt", extra)

    print("3/4 adaptation to French (vision tower frozen), the three runs at once:", flush=True)
    stage2 = stage2_arguments(out, extra)
    for arguments in stage2.values():
        shutil.rmtree(arguments["output_dir"], ignore_errors=True)  # train_hf.py would resume from a checkpoint there
    wall = run_train_hf({row: (arguments, out / f"{row}.log") for row, arguments in stage2.items()}, parallel=3)
    (out / "commands.sh").write_text(
        "# The train_hf.py runs of this demo, in order. base-init is LoraCaptionerForConditionalGeneration(config)\n"
        "# under torch.manual_seed(0) (demo/run_demo.py, build_base_init).\n" + base["command"] + "\n"
        + "".join(shell_command(arguments) + "\n" for arguments in stage2.values()))

    print("4/4 held-out test images (read now, once; every choice above was made on validation):", flush=True)
    test = evaluate_on_test(out)

    trainable = {row: trainable_parameters(out / f"{row}.log") for row in stage2}
    trainable["bridge"] = bridge_parameters(out / FOLDERS["bridge"])
    trainable["base"] = base["trainable"]
    wall["base"] = base["wall_seconds"]
    curves = {row: report.validation_curve(out / FOLDERS[row]) for row in report.ROWS}
    summary = report.write(out, test, trainable, wall, curves, load=os.getloadavg())
    print(summary)
    print(f"Report: {out / 'report.md'}, {out / 'report.png'}; models: "
          f"{', '.join(str(out / folder) for folder in FOLDERS.values())} (the LoRA row's is {out / 'model'})")
    print(f"Demo finished in {time.perf_counter() - started:.0f} s (load average {os.getloadavg()[0]:.1f}).")


if __name__ == "__main__":
    main()
