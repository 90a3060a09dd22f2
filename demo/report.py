"""The demo's report: a table (printed and in report.md) and report.png (learning curves + captioned test images)."""

from __future__ import annotations

import functools
import json
import os
from pathlib import Path

from PIL import Image, ImageDraw, ImageFont

ROWS = {
    "base": "base, no adapter",
    "bridge": "bridge only (LoRA off)",
    "lora": "LoRA r=8, alpha=16, 7 targets + bridge",
    "full": "full decoder fine-tuning (--lora_r 0)",
}
SHORT = {"base": "base", "bridge": "bridge", "lora": "LoRA", "full": "full FT"}
COLOURS = {"base": (120, 120, 120), "bridge": (230, 140, 20), "lora": (30, 110, 220), "full": (40, 160, 70)}
SAMPLE_IMAGES = 8


def validation_curve(model_dir: Path) -> list[tuple[float, float]]:
    """(epoch, validation exact match) after every epoch, from the Trainer's log."""
    state = json.loads((model_dir / "trainer_state.json").read_text())
    by_epoch = {entry["epoch"]: entry["eval_exact_match"] for entry in state["log_history"]
                if "eval_exact_match" in entry}  # the evaluation after training repeats the last epoch's
    return sorted(by_epoch.items())


def curve_table(curves: dict[str, list[tuple[float, float]]]) -> list[str]:
    epochs = [epoch for epoch, _ in next(iter(curves.values()))]
    return ["| model | " + " | ".join(f"epoch {epoch:g}" for epoch in epochs) + " |", "|---|" + "---:|" * len(epochs),
            *[f"| {SHORT[row]} | " + " | ".join(f"{value:.3f}" for _, value in curve) + " |"
              for row, curve in curves.items()]]


def table(test: dict, trainable: dict, wall: dict) -> list[str]:
    results = test["results"]
    lines = ["| model | exact match | CIDEr-D | BLEU-4 | ROUGE-L | repeats or no </s> | trainable parameters | "
             "wall time |", "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for row, name in ROWS.items():
        scores = results[row]
        params = f"{trainable[row]:,}" + (" (stage 1: all, English)" if row == "base" else "")
        time = f"{wall[row]:.0f} s" + (" (stage 1)" if row == "base" else "")
        lines.append(f"| {name} | {scores['exact_match']:.3f} | {scores['cider']:.2f} | {scores['bleu_4']:.3f} | "
                     f"{scores['rouge_l']:.3f} | {scores['degenerate']:.1%} | {params} | {time} |")
    return lines


def write(out: Path, test: dict, trainable: dict, wall: dict, curves: dict, load: tuple[float, float, float]) -> str:
    """Write report.md and report.png into `out`; returns the text to print."""
    rows, results = test["rows"], test["results"]
    english = results["base_english"]
    base_on_english = (f"The base on its own task, the English captions of the same test images: exact match "
                       f"{english['exact_match']:.3f}, CIDEr-D {english['cider']:.2f}, BLEU-4 {english['bleu_4']:.3f}, "
                       f"ROUGE-L {english['rouge_l']:.3f}.")
    lines = [
        "# LoraCaptioner demo: a base that learned English, adapted to French",
        "",
        f"Held-out **test** split: {len(rows)} images (renders that no training run and no choice ever saw; read once, "
        "after all training), scored against their French captions. Decoding: plain greedy (no repetition "
        "processors), at most 32 tokens. \"repeats or no </s>\": captions with a token 3-gram written twice, or "
        "that ran to the length limit.",
        "",
        *table(test, trainable, wall),
        "",
        base_on_english,
        "",
        "Validation exact match after each epoch: the base on English captions,",
        "",
        *curve_table({"base": curves["base"]}),
        "",
        "and the adaptation runs on French captions:",
        "",
        *curve_table({row: curves[row] for row in ("bridge", "lora", "full")}),
        "",
        f"First {SAMPLE_IMAGES} test images (report.png shows them):",
        "",
        "| image | reference | " + " | ".join(SHORT[row] for row in ROWS) + " |",
        "|---|---|" + "---|" * len(ROWS),
        *[f"| {rows[i]['file_name']} | {rows[i]['caption_fr']} | "
          + " | ".join(results[row]["captions"][i] for row in ROWS) + " |"
          for i in range(min(SAMPLE_IMAGES, len(rows)))],
        "",
        f"Wall times are for {os.cpu_count()} CPU cores, the three adaptation runs at once (one thread each); load "
        f"average at the end {load[0]:.1f} / {load[1]:.1f} / {load[2]:.1f} (1 / 5 / 15 min). The train_hf.py "
        "commands are in commands.sh.",
    ]
    (out / "report.md").write_text("\n".join(lines) + "\n", encoding="utf-8")
    draw_report(out, rows, results, curves)
    return "\n".join(table(test, trainable, wall)) + "\n\n" + base_on_english


def fit(text: str, width: int, size: int) -> str:
    """`text`, shortened with "..." to at most `width` pixels in font(size)."""
    if font(size).getlength(text) <= width:
        return text
    while text and font(size).getlength(text + "...") > width:
        text = text[:-1]
    return text + "..."


@functools.lru_cache
def font(size: int) -> ImageFont.ImageFont:
    try:  # DejaVu has the French accents; Pillow's built-in font does not
        return ImageFont.truetype("DejaVuSans.ttf", size)
    except OSError:
        return ImageFont.load_default(size)


def draw_curves(draw: ImageDraw.ImageDraw, box: tuple[int, int, int, int], title: str,
                curves: dict[str, list[tuple[float, float]]]) -> None:
    """Validation exact match (0..1) against epoch, one line per model, inside `box` (left, top, right, bottom)."""
    left, top, right, bottom = box
    plot_left, plot_top, plot_bottom = left + 45, top + 28, bottom - 30
    epochs = max((epoch for curve in curves.values() for epoch, _ in curve), default=1)
    draw.text((left, top), title, fill="black", font=font(15))

    def point(epoch: float, value: float) -> tuple[float, float]:
        return (plot_left + (right - plot_left) * epoch / epochs, plot_bottom - (plot_bottom - plot_top) * value)

    for tick in (0, 0.25, 0.5, 0.75, 1.0):
        y = point(0, tick)[1]
        draw.line([(plot_left, y), (right, y)], fill=(225, 225, 225))
        draw.text((left + 8, y - 7), f"{tick:.2f}", fill="black", font=font(11))
    for epoch in range(0, int(epochs) + 1):
        x = point(epoch, 0)[0]
        draw.text((x - 3, plot_bottom + 4), str(epoch), fill="black", font=font(11))
    draw.text((right - 40, plot_bottom + 16), "epoch", fill="black", font=font(11))
    draw.line([(plot_left, plot_top), (plot_left, plot_bottom), (right, plot_bottom)], fill="black")
    for index, (row, curve) in enumerate(curves.items()):
        points = [point(0, 0)] + [point(epoch, value) for epoch, value in curve]
        draw.line(points, fill=COLOURS[row], width=3)
        for x, y in points[1:]:
            draw.ellipse((x - 3, y - 3, x + 3, y + 3), fill=COLOURS[row])
        legend_y = (plot_top + plot_bottom) // 2 + 18 * index  # mid-height, right: clear of every curve here
        draw.line([(right - 150, legend_y + 7), (right - 125, legend_y + 7)], fill=COLOURS[row], width=3)
        draw.text((right - 118, legend_y), SHORT[row], fill="black", font=font(12))


def draw_report(out: Path, rows: list[dict], results: dict, curves: dict) -> None:
    width, chart_height, cell_height, image_side = 1400, 300, 150, 128
    count = min(SAMPLE_IMAGES, len(rows))
    height = 40 + chart_height + 30 + cell_height * ((count + 1) // 2) + 10
    canvas = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(canvas)
    draw.text((20, 10), "LoraCaptioner demo: validation exact match while training, and held-out test images "
              "(plain greedy)", fill="black", font=font(18))
    draw_curves(draw, (20, 45, 660, 45 + chart_height), "1. base: English captions, everything trained",
                {"base": curves["base"]})
    draw_curves(draw, (720, 45, 1370, 45 + chart_height), "2. adaptation to French, vision tower frozen",
                {row: curves[row] for row in ("bridge", "lora", "full")})
    grid_top = 45 + chart_height + 30
    for i in range(count):
        x = 20 + (i % 2) * (width // 2)
        y = grid_top + (i // 2) * cell_height
        image = Image.open(out / "data" / "test" / rows[i]["file_name"]).convert("RGB")
        canvas.paste(image.resize((image_side, image_side), Image.Resampling.NEAREST), (x, y))
        text_x = x + image_side + 12
        text_width = width // 2 - image_side - 40
        draw.text((text_x, y), fit(f"reference: {rows[i]['caption_fr']}", text_width, 13), fill="black", font=font(13))
        for line, row in enumerate(ROWS, start=1):
            caption = results[row]["captions"][i]
            right = caption == rows[i]["caption_fr"]
            colour = (20, 130, 40) if right else (200, 30, 30)
            text = fit(f"{SHORT[row]}: {caption}", text_width - 20, 13) + ("" if right else "  ✗")
            draw.text((text_x, y + 24 * line), text, fill=colour, font=font(13))
    canvas.save(out / "report.png")
