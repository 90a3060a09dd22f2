"""Awkward captions and data locations: skipped and counted, truncated, or refused with a message naming the problem."""

import io
import math
import subprocess
import sys

import datasets
import numpy as np
import pytest
from PIL import Image

from conftest import REPO
from loracaptioner import LoraCaptionerProcessor
from loracaptioner.data import CaptionCollator, SkipCounter, captions_of, load_caption_dataset, prepare_split


def png() -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(np.full((8, 8, 3), 120, dtype=np.uint8)).save(buffer, format="PNG")
    return buffer.getvalue()


CAPTIONS = ["a red square", "", " \t ", "a red square " * 800, "ένα κόκκινο τετράγωνο", "赤い四角"]


def test_empty_and_whitespace_csv_cells_are_skipped_and_counted_and_long_and_non_latin_captions_kept(tmp_path):
    with open(tmp_path / "metadata.csv", "w", encoding="utf-8") as metadata:
        metadata.write("file_name,caption\n")
        for i, caption in enumerate(CAPTIONS):
            (tmp_path / f"{i}.png").write_bytes(png())
            metadata.write(f'{i}.png,"{caption}"\n' if caption else f"{i}.png,\n")  # an empty CSV cell reads as None
    skipped = SkipCounter()
    kept = prepare_split(load_caption_dataset(data_dir=str(tmp_path)), "image", "caption", skipped, True)
    assert skipped.reasons == {"empty caption": 2}
    assert sorted(row["caption"] for row in kept) == sorted(
        ["a red square", ("a red square " * 800).strip(), "ένα κόκκινο τετράγωνο", "赤い四角"])


@pytest.mark.parametrize("cell, captions", [
    (None, []), (math.nan, []), ("  ", []), (["", "a blue square", None, "  "], ["a blue square"]),
    (" a dog ", ["a dog"]),
])
def test_caption_cells_none_nan_blank_or_lists_give_the_usable_captions(cell, captions):
    assert captions_of(cell) == captions


def test_a_10000_character_caption_is_truncated_to_max_target_length_with_eos(processor):
    processor = LoraCaptionerProcessor(processor.image_processor, processor.tokenizer, max_target_length=12)
    labels = CaptionCollator(processor)(
        [{"image": png(), "caption": "a red square " * 800}, {"image": png(), "caption": "赤い四角"}])["labels"]
    assert labels.shape[1] == 12
    assert labels[0, -1].item() == processor.tokenizer.eos_token_id  # truncated, still ends like a caption
    assert (labels[1] != -100).sum() >= 2  # non-Latin text is tokenized (to <unk>/pieces) and still trained on


def test_nonexistent_data_paths_are_named_in_the_error(tmp_path):
    with pytest.raises(ValueError, match="no-such-dir.*does not exist"):
        load_caption_dataset(data_dir=str(tmp_path / "no-such-dir"))
    with pytest.raises(ValueError, match="shard.*not found"):
        load_caption_dataset(data_files=str(tmp_path / "shards" / "*.tar"))


def test_train_hf_usage_errors_exit_2_with_one_line_not_a_traceback(tmp_path):
    for args in (["--train_dir", str(tmp_path / "missing"), "--output_dir", str(tmp_path / "out"), "--do_train",
                  "--model_name_or_path", str(tmp_path / "missing-model")],
                 ["--lora_r", "not-a-number", "--output_dir", str(tmp_path / "out")]):
        result = subprocess.run([sys.executable, str(REPO / "train_hf.py"), *args], capture_output=True, text=True,
                                cwd=tmp_path, timeout=120, env={"HF_HUB_OFFLINE": "1", "PATH": "/usr/bin:/bin"})
        assert result.returncode == 2, result.stderr[-2000:]
        assert "Traceback" not in result.stderr, result.stderr[-2000:]
