"""The demo's evaluation: caption a split with a saved model folder, score the captions, and spot degenerate ones.

Models are loaded the way a user loads them (`AutoModelForImageTextToText` + `AutoProcessor`, `trust_remote_code`),
and every decoding setting is passed explicitly, so the scores do not depend on the defaults saved in the folder.
"""

from __future__ import annotations

import json
from pathlib import Path

# Plain greedy decoding: the argmax word at every step, no repetition processors, stop at </s> or after 32 words.
GREEDY = {"num_beams": 1, "do_sample": False, "no_repeat_ngram_size": 0, "repetition_penalty": 1.0,
          "max_new_tokens": 32}


def read_split(split_dir: str | Path) -> list[dict]:
    """The rows of an imagefolder split: `file_name` plus one caption per language."""
    with open(Path(split_dir) / "metadata.jsonl", encoding="utf-8") as metadata:
        return [json.loads(line) for line in metadata]


def load_model(model_dir: str | Path):
    from transformers import AutoModelForImageTextToText, AutoProcessor
    from transformers.utils import logging

    logging.disable_progress_bar()
    model = AutoModelForImageTextToText.from_pretrained(model_dir, trust_remote_code=True).eval()
    processor = AutoProcessor.from_pretrained(model_dir, trust_remote_code=True)
    return model, processor


def caption_split(model_dir: str | Path, split_dir: str | Path, decoding: dict,
                  batch_size: int = 100) -> tuple[list[str], list[bool]]:
    """Every image of a split captioned with `decoding`: the captions, and for each whether it is degenerate."""
    from PIL import Image

    model, processor = load_model(model_dir)
    limit = decoding.get("max_new_tokens") or decoding["max_length"] - 1  # max_length counts the start token
    rows = read_split(split_dir)
    captions, degenerate = [], []
    for start in range(0, len(rows), batch_size):
        images = [Image.open(Path(split_dir) / row["file_name"]) for row in rows[start : start + batch_size]]
        output = model.generate(**processor(images=images), **decoding)
        captions += [text.strip() for text in processor.batch_decode(output, skip_special_tokens=True)]
        for sequence in output[:, 1:].tolist():  # after the decoder start token; padding only follows </s>
            degenerate.append(is_degenerate(sequence, model.config.eos_token_id, limit))
    return captions, degenerate


def caption_metrics(predictions: list[str], references: list[str]) -> dict[str, float]:
    """Exact match, CIDEr-D, BLEU-4 and ROUGE-L of one caption per image against its one reference."""
    from loracaptioner.caption_metrics import exact_match, load_caption_metrics

    refs = [[reference] for reference in references]
    scores = load_caption_metrics().compute(predictions=predictions, references=refs)
    return {"exact_match": exact_match(predictions, refs), "cider": scores["cider"], "bleu_4": scores["bleu_4"],
            "rouge_l": scores["rouge_l"]}


def is_degenerate(ids: list[int], eos_token_id: int, max_new_tokens: int) -> bool:
    """True for generated ids (start token excluded) with a token 3-gram that occurs twice before </s>, or that ran
    to the length limit without </s>. Every token counts, <pad> included (a model trained on padded labels may write
    it)."""
    finished = eos_token_id in ids
    words = ids[: ids.index(eos_token_id)] if finished else ids
    trigrams = [tuple(words[i : i + 3]) for i in range(len(words) - 2)]
    return len(set(trigrams)) < len(trigrams) or (not finished and len(ids) >= max_new_tokens)
