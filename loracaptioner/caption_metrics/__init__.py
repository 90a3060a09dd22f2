"""Caption metrics: CIDEr-D, BLEU-1..4 and ROUGE-L (the local `evaluate` module `caption_metrics.py` in this folder,
equal to pycocoevalcap's scorers) and exact match."""

from __future__ import annotations

from pathlib import Path

# The folder `evaluate.load` takes: it loads the script named after the folder (caption_metrics.py).
CAPTION_METRICS_PATH = Path(__file__).resolve().parent


def load_caption_metrics():
    """The `evaluate` module scoring captions against lists of references (`.compute(predictions=, references=)`)."""
    import evaluate  # only here: it imports transformers.pipelines, seconds of start-up a training-only run skips

    return evaluate.load(str(CAPTION_METRICS_PATH))


def exact_match(predictions: list[str], references: list[list[str]]) -> float:
    """Share of predictions equal (case and surrounding space ignored) to one of their references."""
    def norm(text: str) -> str:
        return " ".join(text.lower().split())

    hits = sum(norm(p) in {norm(r) for r in refs} for p, refs in zip(predictions, references))
    return hits / max(len(predictions), 1)
