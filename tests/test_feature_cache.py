"""--cache_vision_features: the frozen CLIP tower (+ LayerNorm + projection) runs once, its output is cached (in
float16 by default: half the disk, per-step loss within 1e-3 of float32), and training on it (bridge + decoder only)
gives the very losses and adapter of training on pixels when cached in float32."""

import importlib.util
import json
from pathlib import Path

import datasets
import numpy as np
import pytest
import torch
from peft import get_peft_model
from safetensors.torch import load_file
from test_resume import run_in_process, write_imagefolder
from test_training import rows
from transformers import Seq2SeqTrainer, Seq2SeqTrainingArguments

from loracaptioner import LoraCaptionerForConditionalGeneration
from loracaptioner.data import (
    VISION_FEATURES_COLUMN,
    CaptionCollator,
    SkipCounter,
    cache_vision_features,
    prepare_split,
    vision_features_fingerprint,
)
from loracaptioner.lora import decoder_lora_config

_spec = importlib.util.spec_from_file_location(
    "epoch_cache", Path(__file__).resolve().parents[1] / "bench" / "epoch_cache.py")
epoch_cache = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(epoch_cache)


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return write_imagefolder(tmp_path_factory.mktemp("cache_data"), count=8)


@pytest.fixture()
def train_rows():
    in_memory = datasets.Dataset.from_dict({"image": [image for _, image, _ in rows(4)],
                                            "caption": [captions for _, _, captions in rows(4)]})
    return prepare_split(in_memory, "image", "caption", SkipCounter(), one_row_per_caption=True)


def test_features_are_stored_in_float16_by_default(model, processor, train_rows):
    cached_rows = cache_vision_features(train_rows, model, processor)
    assert cached_rows.features[VISION_FEATURES_COLUMN] == datasets.Array2D((16, 24), "float16")
    assert cached_rows[0][VISION_FEATURES_COLUMN].dtype == np.float16
    batch = CaptionCollator(processor, model=model)([cached_rows[i] for i in range(4)])
    assert batch["image_features"].dtype == torch.float16  # as stored; the model casts them to its own dtype
    assert model(**batch).loss.isfinite()
    float32_rows = cache_vision_features(train_rows, model, processor, dtype="float32")
    assert float32_rows.features[VISION_FEATURES_COLUMN] == datasets.Array2D((16, 24), "float32")
    torch.testing.assert_close(torch.as_tensor(cached_rows[0][VISION_FEATURES_COLUMN]).float(),
                               torch.as_tensor(float32_rows[0][VISION_FEATURES_COLUMN]), rtol=1e-3, atol=1e-3)


def test_features_that_overflow_float16_are_refused_with_a_pointer_to_float32(model, processor, train_rows):
    with torch.no_grad():
        model.encoder.visual_projection.weight.mul_(1e6)
    with pytest.raises(ValueError, match=r"do not fit in float16 .*--vision_features_dtype float32"):
        cache_vision_features(train_rows, model, processor)
    assert cache_vision_features(train_rows, model, processor, dtype="float32")[0][VISION_FEATURES_COLUMN].max() > 1e5
    with pytest.raises(ValueError, match="'bfloat16' is not one of"):
        cache_vision_features(train_rows, model, processor, dtype="bfloat16")


def test_cached_float32_features_give_the_loss_and_bridge_gradient_of_pixels(model, processor, train_rows, tmp_path):
    # Batches of 3 in the caching pass: other batches than training's.
    cached_rows = cache_vision_features(train_rows, model, processor, batch_size=3, dtype="float32")
    assert cached_rows.column_names == ["caption", VISION_FEATURES_COLUMN]
    assert cached_rows[0][VISION_FEATURES_COLUMN].shape == (16, 24)  # 4x4 patches (CLS dropped) x projection width

    peft_model = get_peft_model(model, decoder_lora_config(model, r=4, alpha=8, dropout=0.0))
    trainer = Seq2SeqTrainer(model=peft_model, args=Seq2SeqTrainingArguments(tmp_path, use_cpu=True, report_to=[]))
    collator = CaptionCollator(processor, model=peft_model)
    batches = {"pixels": collator([train_rows[i] for i in range(8)]),
               "cached": collator([cached_rows[i] for i in range(8)])}
    assert "pixel_values" in batches["pixels"] and "image_features" in batches["cached"]
    bridge = peft_model.get_base_model().encoder.bridge
    losses, gradients = {}, {}
    for name, batch in batches.items():
        peft_model.zero_grad()
        losses[name] = trainer.compute_loss(peft_model, batch)
        losses[name].backward()
        gradients[name] = next(p.grad for p in bridge.parameters() if p.requires_grad).clone()
    assert abs(losses["cached"].item() - losses["pixels"].item()) <= 1e-6
    assert gradients["pixels"].abs().sum() > 0
    torch.testing.assert_close(gradients["cached"], gradients["pixels"], rtol=0, atol=1e-6)


def test_cache_is_reused_for_the_same_rows_and_weights_and_redone_when_the_tower_changes(model, processor, data_dir):
    from loracaptioner.data import load_caption_dataset

    train_rows = prepare_split(load_caption_dataset(data_dir=str(data_dir)), "image", "caption", SkipCounter(), True)
    first = cache_vision_features(train_rows, model, processor).cache_files
    assert first == cache_vision_features(train_rows, model, processor).cache_files
    float32 = cache_vision_features(train_rows, model, processor, dtype="float32").cache_files
    assert {f["filename"] for f in float32}.isdisjoint({f["filename"] for f in first} - {
        f["filename"] for f in train_rows.cache_files})  # a float32 cache is not reused as a float16 one
    assert vision_features_fingerprint(train_rows, model, processor, "float16") != vision_features_fingerprint(
        train_rows, model, processor, "float32")
    with torch.no_grad():
        model.encoder.visual_projection.weight.mul_(2)
    assert {f["filename"] for f in cache_vision_features(train_rows, model, processor).cache_files} != {
        f["filename"] for f in first}


def test_caching_a_trainable_tower_or_a_stream_is_refused(model, processor, train_rows, backbones, data_dir, tmp_path):
    with pytest.raises(ValueError, match="cannot be used with --streaming"):
        cache_vision_features(train_rows.to_iterable_dataset(), model, processor)
    trainable_tower = LoraCaptionerForConditionalGeneration.from_backbones(*backbones, freeze_vision=False)
    with pytest.raises(ValueError, match="--cache_vision_features needs a frozen vision tower"):
        cache_vision_features(train_rows, trainable_tower, processor)
    for flags, error in ((["--freeze_vision", "false"], "--cache_vision_features needs a frozen vision tower"),
                         (["--streaming"], "cannot be used with --streaming")):
        with pytest.raises(ValueError, match=error):
            run_in_process(["--vision_model_name_or_path", backbones[0], "--text_model_name_or_path", backbones[1],
                            "--train_dir", str(data_dir), "--output_dir", str(tmp_path), "--do_train", "--use_cpu",
                            "--cache_vision_features", *flags])


def test_two_epochs_on_cached_features_match_two_epochs_on_pixels(backbones, data_dir, tmp_path):
    history, adapters = {}, {}
    for name, flags in (("pixels", []), ("cached", ["--cache_vision_features", "--vision_features_dtype", "float32"]),
                        ("cached_float16", ["--cache_vision_features"])):
        run_in_process(["--vision_model_name_or_path", backbones[0], "--text_model_name_or_path", backbones[1],
                        "--train_dir", str(data_dir), "--output_dir", str(tmp_path / name), "--do_train",
                        "--num_train_epochs", "2", "--per_device_train_batch_size", "4", "--learning_rate", "5e-3",
                        "--lora_r", "4", "--lora_alpha", "8", "--lora_dropout", "0.1", "--logging_steps", "1",
                        "--save_strategy", "no", "--report_to", "none", "--use_cpu", "--seed", "0",
                        "--disable_tqdm", "true", *flags])
        state = json.loads((tmp_path / name / "trainer_state.json").read_text())
        history[name] = [entry["loss"] for entry in state["log_history"] if "loss" in entry]
        adapters[name] = load_file(tmp_path / name / "adapter" / "adapter_model.safetensors")
    assert len(history["cached"]) == 8  # 16 rows / 4 per step x 2 epochs
    # Single-threaded the two runs are bit-identical. With several threads the tower's fp32 sums run in another order
    # when the caching pass batches rows differently (1e-7 relative), and Adam's normalised steps carry that into
    # the weights: equal to fp32 rounding, not bit for bit.
    assert history["cached"] == pytest.approx(history["pixels"], rel=1e-6, abs=1e-6)
    assert max((adapters["cached"][k] - adapters["pixels"][k]).abs().max().item() for k in adapters["pixels"]) <= 1e-4
    # The default float16 cache: every step's loss within 1e-3 of the float32 cache's.
    assert max(abs(a - b) for a, b in zip(history["cached_float16"], history["cached"], strict=True)) <= 1e-3


def test_epoch_cache_bench_reports_epochs_losses_and_disk_from_the_files_it_wrote():
    result = epoch_cache.measure(images=8, epochs=2, batch_size=4, tiny=True)
    assert result["shapes"] == "tiny" and result["feature_shape"] == [16, 24]
    assert result["isa"] == torch.backends.cpu.get_cpu_capability()
    assert len(result["uncached"]["epoch_seconds"]) == 2 and len(result["uncached"]["losses"]) == 4
    assert list(result["cached"]) == ["float32", "float16"]
    for dtype, itemsize in (("float32", 4), ("float16", 2)):
        run = result["cached"][dtype]
        assert len(run["epoch_seconds"]) == 2 and run["caching_seconds"] > 0
        assert run["first_epoch_seconds"] == run["caching_seconds"] + run["epoch_seconds"][0]
        assert run["later_over_first"] == run["later_epoch_seconds"] / run["first_epoch_seconds"]
        # Read from the arrow file: the features (16 x 24 per row) plus the file's own few hundred bytes.
        assert 16 * 24 * itemsize <= run["bytes_per_row"] <= 16 * 24 * itemsize + 512
        assert run["cache_bytes"] == run["bytes_per_row"] * 8
        assert run["gb_per_300k_rows"] == pytest.approx(run["bytes_per_row"] * 300_000 / 1e9)
    assert result["cached"]["float32"]["max_loss_difference_vs_float32"] == 0
    assert result["cached"]["float32"]["max_loss_difference_vs_pixels"] <= 1e-5
    assert 0 < result["cached"]["float16"]["max_loss_difference_vs_float32"] <= 1e-3
    table = epoch_cache.markdown(result)
    assert "| cached float16 |" in table and "ISA " + result["isa"] in table
