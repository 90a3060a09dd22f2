"""train_hf.py and its parts: data in three layouts, bad rows skipped and counted, LoRA on the decoder only, a short
run that learns, adapter reload, merged == unmerged, generation without length warnings, and --do_predict."""

import io
import json
import logging
import sys
import tarfile

import datasets
import numpy as np
import pytest
import torch
from peft import PeftModel, get_peft_model
from PIL import Image

from conftest import REPO
from loracaptioner import LoraCaptionerForConditionalGeneration, LoraCaptionerProcessor
from loracaptioner.data import CaptionCollator, SkipCounter, load_caption_dataset, prepare_split
from loracaptioner.lora import decoder_lora_config

sys.path.insert(0, str(REPO))
import train_hf  # noqa: E402

COLOURS = {"red": (220, 30, 30), "blue": (30, 30, 220), "green": (30, 200, 30), "yellow": (230, 220, 30)}


def png_bytes(colour) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(np.full((32, 32, 3), colour, dtype=np.uint8)).save(buffer, format="PNG")
    return buffer.getvalue()


def rows(count: int):
    names = list(COLOURS)
    for i in range(count):
        name = names[i % len(names)]
        yield f"{i:04d}", png_bytes(COLOURS[name]), [f"a {name} square", f"the {name} square"]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """The same rows as an imagefolder, as webdataset shards, plus a corrupt image and an empty caption."""
    root = tmp_path_factory.mktemp("data")
    folder, shards = root / "folder", root / "shards"
    folder.mkdir(), shards.mkdir()
    with open(folder / "metadata.jsonl", "w") as metadata, tarfile.open(shards / "00000.tar", "w") as tar:
        for key, image, captions in [*rows(16), ("bad1", b"not an image", ["a broken file"]),
                                     ("bad2", png_bytes((1, 2, 3)), ["  "])]:
            (folder / f"{key}.png").write_bytes(image)
            metadata.write(json.dumps({"file_name": f"{key}.png", "caption": captions}) + "\n")
            for suffix, payload in (("png", image), ("txt", captions[0].encode())):
                info = tarfile.TarInfo(f"{key}.{suffix}")
                info.size = len(payload)
                tar.addfile(info, io.BytesIO(payload))
    return folder, shards


def test_imagefolder_webdataset_and_in_memory_give_the_same_examples(data):
    folder, shards = data
    from_folder = prepare_split(load_caption_dataset(data_dir=str(folder)), "image", "caption", SkipCounter(), True)
    from_shards = prepare_split(load_caption_dataset(data_files=str(shards / "*.tar")), "png", "txt", SkipCounter(), True)
    in_memory = datasets.Dataset.from_dict({"image": [image for _, image, _ in rows(16)],
                                            "caption": [captions for _, _, captions in rows(16)]})
    from_memory = prepare_split(in_memory, "image", "caption", SkipCounter(), True)
    first_captions = [row["caption"] for row in from_folder][::2]
    assert first_captions == [row["caption"] for row in from_shards] == [row["caption"] for row in from_memory][::2]
    assert len(from_folder) == 32  # two captions per image: one training row each
    image = lambda row: np.asarray(Image.open(io.BytesIO(row["image"]["bytes"] if isinstance(row["image"], dict) else row["image"])))  # noqa: E731
    assert all((image(a) == image(b)).all() for a, b in zip(from_shards, from_memory.select(range(0, 32, 2))))


def test_corrupt_images_and_empty_captions_are_skipped_and_counted(data):
    skipped = SkipCounter()
    evaluation = prepare_split(load_caption_dataset(data_dir=str(data[0])), "image", "caption", skipped, False)
    assert len(evaluation) == 16 and skipped.reasons == {"undecodable image": 1, "empty caption": 1}
    assert evaluation[0]["references"] == ["a red square", "the red square"]
    streamed = SkipCounter()
    stream = prepare_split(load_caption_dataset(data_dir=str(data[0]), streaming=True), "image", "caption", streamed, True)
    assert sum(1 for _ in stream) == 32 and streamed.total == 2


def test_missing_caption_column_lists_the_columns(data):
    from loracaptioner.data import detect_column

    with pytest.raises(ValueError, match=r"columns \['image', 'label'\]"):
        detect_column(["image", "label"], None, ("caption", "text"), "caption")


def test_collator_masks_padding_with_minus_100(processor):
    rows_ = [{"image": png_bytes((9, 9, 9)), "caption": "a red square"}, {"image": png_bytes((9, 9, 9)), "caption": "a dog"}]
    processor = LoraCaptionerProcessor(processor.image_processor, processor.tokenizer, max_target_length=8)
    batch = CaptionCollator(processor)(rows_)
    assert batch["pixel_values"].shape == (2, 3, 32, 32)
    assert batch["labels"][1].tolist()[-1] == -100 and (batch["labels"][0] != -100).all()


def test_lora_only_in_decoder_and_only_lora_and_bridge_train(model):
    peft_model = get_peft_model(model, decoder_lora_config(model, r=4, alpha=8, dropout=0.0))
    lora_modules = [name for name, _ in peft_model.named_modules() if name.endswith("lora_A")]
    assert lora_modules and all(".decoder.block." in name for name in lora_modules)
    assert len(lora_modules) == 2 * (2 + 2 + 3)  # 2 layers x (2 self-attn + 2 cross-attn + 3 feed-forward)
    trainable = [name for name, p in peft_model.named_parameters() if p.requires_grad]
    assert all("lora_" in name or ".bridge." in name for name in trainable)
    assert any(".bridge." in name for name in trainable)


def test_unknown_lora_target_lists_valid_names(model):
    with pytest.raises(ValueError, match=r"unknown LoRA target module\(s\) \['SelfAttention.qq'\]; valid.*EncDecAttention.o"):
        decoder_lora_config(model, r=4, alpha=8, dropout=0.0, targets=["SelfAttention.qq"])


def run_train_hf(args: list[str]) -> tuple[dict, str]:
    """train_hf.py in this process: its summary, and its log (train_hf.py's and transformers' records)."""
    log = io.StringIO()
    handler = logging.StreamHandler(log)
    loggers = [logging.getLogger(), logging.getLogger("transformers")]  # transformers' logger does not propagate
    original = sys.argv
    sys.argv = ["train_hf.py", *args]
    for logger in loggers:
        logger.addHandler(handler)
    try:
        summary = train_hf.main()
    finally:
        sys.argv = original
        for logger in loggers:
            logger.removeHandler(handler)
    return summary, log.getvalue()


LENGTH_WARNING = "Both `max_new_tokens`"


@pytest.fixture(scope="module")
def trained(data, backbones, tmp_path_factory):
    """One short train_hf.py run: imagefolder data, LoRA, evaluation with generation, merged output."""
    output_dir = tmp_path_factory.mktemp("run")
    summary, log = run_train_hf([
        "--vision_model_name_or_path", backbones[0], "--text_model_name_or_path", backbones[1],
        "--train_dir", str(data[0]), "--validation_dir", str(data[0]), "--output_dir", str(output_dir),
        "--do_train", "--do_eval", "--num_train_epochs", "6", "--per_device_train_batch_size", "8",
        "--learning_rate", "5e-3", "--lora_r", "8", "--lora_alpha", "16", "--lora_dropout", "0.0",
        "--logging_steps", "1", "--save_strategy", "epoch", "--save_total_limit", "1", "--report_to", "none",
        "--use_cpu", "--seed", "0", "--disable_tqdm", "true", "--generation_max_length", "8",
    ])
    return output_dir, summary, backbones, log


def test_short_run_lowers_the_loss_and_reports_what_it_skipped(trained):
    output_dir, summary, *_ = trained
    history = json.loads((output_dir / "trainer_state.json").read_text())["log_history"]
    losses = [entry["loss"] for entry in history if "loss" in entry]
    assert losses[-1] < 0.5 * losses[0]
    assert summary["skipped"] == {"undecodable image": 2, "empty caption": 2}  # train and eval splits
    assert {"eval_cider", "eval_bleu_4", "eval_rouge_l", "eval_exact_match"} <= set(summary["eval"])
    assert json.loads((output_dir / "run_summary.json").read_text())["skipped_rows"] == 4


def test_adapter_holds_only_lora_and_bridge_and_reloads_to_identical_generations(trained, processor):
    output_dir, _, backbones, _ = trained
    from safetensors import safe_open

    with safe_open(output_dir / "adapter" / "adapter_model.safetensors", "pt") as adapter:
        names = list(adapter.keys())
    assert names and all("lora_" in name or "bridge" in name for name in names)
    base = LoraCaptionerForConditionalGeneration.from_pretrained(output_dir)  # merged
    adapted = PeftModel.from_pretrained(
        LoraCaptionerForConditionalGeneration.from_backbones(*backbones), output_dir / "adapter").eval()
    pixel_values = processor(images=[Image.open(io.BytesIO(png_bytes(c))) for c in COLOURS.values()])["pixel_values"]
    labels = processor(text_target=["a red square"] * 4)["labels"]
    with torch.no_grad():
        merged_logits = base.eval()(pixel_values=pixel_values, labels=labels).logits
        adapter_logits = adapted(pixel_values=pixel_values, labels=labels).logits
    torch.testing.assert_close(merged_logits, adapter_logits, rtol=0, atol=1e-5)
    assert torch.equal(base.generate(pixel_values=pixel_values), adapted.generate(pixel_values=pixel_values))


def test_merged_folder_is_hub_ready(trained):
    output_dir = trained[0]
    names = {path.name for path in output_dir.iterdir()}
    assert {"config.json", "model.safetensors", "generation_config.json", "processor_config.json", "README.md",
            "modeling_loracaptioner.py", "configuration_loracaptioner.py", "processing_loracaptioner.py"} <= names
    card = (output_dir / "README.md").read_text()
    assert "greedy decoding with the saved generation defaults, at most 7 new tokens" in card  # --generation_max_length 8


def test_merged_folder_keeps_the_caption_generation_defaults_after_generate_evaluation(trained):
    """Seq2SeqTrainer's evaluation fills model.generation_config with every default (max_length=20, ...); saved,
    that would make each generate() warn about max_length beside max_new_tokens."""
    saved = json.loads((trained[0] / "generation_config.json").read_text())
    assert saved["max_new_tokens"] == 32 and saved["no_repeat_ngram_size"] == 3
    assert "max_length" not in saved


def test_training_log_has_no_generation_length_warning(trained):
    """Evaluation generates with one length setting: --generation_max_length here, in place of the model's
    max_new_tokens (not beside it), so no batch warns that both were set."""
    log = trained[3]
    assert "LoraCaptioner run summary" in log and "eval_cider" in log  # the whole run's log was captured
    assert LENGTH_WARNING not in log


@pytest.mark.parametrize("name", ["cc3m_seed.yaml", "demo.yaml"])
def test_shipped_configs_parse(name):
    import yaml
    from transformers import HfArgumentParser, Seq2SeqTrainingArguments

    values = yaml.safe_load((REPO / "configs" / name).read_text())
    values["use_cpu"] = True  # the seed config asks for bf16 on GPUs; this machine has none
    parser = HfArgumentParser((train_hf.ModelArguments, train_hf.DataArguments, train_hf.LoraArguments,
                               Seq2SeqTrainingArguments))
    model_args, data_args, lora_args, training_args = parser.parse_dict(values)
    if name == "cc3m_seed.yaml":
        assert (data_args.dataset_name, data_args.max_train_samples) == ("pixparse/cc3m-wds", 300_000)
        assert (lora_args.lora_r, lora_args.lora_alpha, lora_args.lora_dropout) == (8, 16, 0.1)
        assert (training_args.learning_rate, training_args.num_train_epochs) == (1e-4, 8)


def test_report_to_tensorboard_writes_the_training_loss_under_output_dir_runs(data, backbones, tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    args = ["train_hf.py", "--vision_model_name_or_path", backbones[0], "--text_model_name_or_path", backbones[1],
            "--train_dir", str(data[0]), "--output_dir", str(tmp_path), "--do_train", "--max_steps", "2",
            "--per_device_train_batch_size", "8", "--logging_steps", "1", "--save_strategy", "no",
            "--report_to", "tensorboard", "--use_cpu", "--disable_tqdm", "true"]
    original = sys.argv
    sys.argv = args
    try:
        train_hf.main()
    finally:
        sys.argv = original
    event_files = list((tmp_path / "runs").glob("*/events.out.tfevents.*"))
    assert len(event_files) == 1
    events = EventAccumulator(str(event_files[0].parent)).Reload()
    assert [event.step for event in events.Scalars("train/loss")] == [1, 2]


@pytest.fixture(scope="module")
def test_split(tmp_path_factory):
    """A held-out imagefolder: three captioned images, one without a caption, one that does not decode."""
    folder = tmp_path_factory.mktemp("test-split")
    with open(folder / "metadata.jsonl", "w") as metadata:
        for key, image, captions in [("red", png_bytes(COLOURS["red"]), ["a red square"]),
                                     ("blue", png_bytes(COLOURS["blue"]), ["a blue square", "the blue square"]),
                                     ("green", png_bytes(COLOURS["green"]), ["a green square"]),
                                     ("uncaptioned", png_bytes(COLOURS["yellow"]), []),
                                     ("broken", b"not an image", ["a broken file"])]:
            (folder / f"{key}.png").write_bytes(image)
            metadata.write(json.dumps({"file_name": f"{key}.png", "caption": captions}) + "\n")
    return folder


@pytest.fixture(scope="module")
def predicted(trained, data, test_split, tmp_path_factory):
    """Evaluation and prediction only, on the trained model: two evaluation batches, no --generation_max_length."""
    output_dir = tmp_path_factory.mktemp("predict")
    summary, log = run_train_hf([
        "--model_name_or_path", str(trained[0]), "--validation_dir", str(data[0]), "--test_dir", str(test_split),
        "--output_dir", str(output_dir), "--do_eval", "--do_predict", "--per_device_eval_batch_size", "2",
        "--report_to", "none", "--use_cpu", "--disable_tqdm", "true",
    ])
    return output_dir, summary, log


def read_jsonl(path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def generated_captions(model_dir, images) -> list[str]:
    """What a user gets from the saved model's own generate() with its saved defaults."""
    from loracaptioner import LoraCaptionerProcessor

    model = LoraCaptionerForConditionalGeneration.from_pretrained(model_dir).eval()
    processor = LoraCaptionerProcessor.from_pretrained(model_dir)
    captions = processor.batch_decode(model.generate(**processor(images=images)), skip_special_tokens=True)
    return [caption.strip() for caption in captions]


def test_do_predict_writes_one_prediction_per_test_image_equal_to_generate(trained, predicted, test_split):
    output_dir = predicted[0]
    records = read_jsonl(output_dir / "generated_predictions.jsonl")
    names = ["red", "blue", "green", "uncaptioned"]  # "broken" is skipped and counted
    assert [record["key"] for record in records] == [str(test_split / f"{name}.png") for name in names]
    assert [record["references"] for record in records] == [
        ["a red square"], ["a blue square", "the blue square"], ["a green square"], []]
    images = [Image.open(test_split / f"{name}.png") for name in names]
    assert [record["caption"] for record in records] == generated_captions(trained[0], images)
    # the validation split's corrupt image and empty caption, and the test split's corrupt image (its uncaptioned
    # image is captioned, not skipped)
    assert predicted[1]["skipped"] == {"undecodable image": 2, "empty caption": 1}


def test_do_predict_scores_the_captions_that_have_references(predicted):
    import evaluate

    from loracaptioner.caption_metrics import CAPTION_METRICS_PATH, exact_match

    output_dir = predicted[0]
    results = json.loads((output_dir / "predict_results.json").read_text())
    assert results["predict_samples"] == 4 and results["predict_samples_with_references"] == 3
    scored = [record for record in read_jsonl(output_dir / "generated_predictions.jsonl") if record["references"]]
    captions, references = [r["caption"] for r in scored], [r["references"] for r in scored]
    expected = evaluate.load(str(CAPTION_METRICS_PATH)).compute(predictions=captions, references=references)
    assert results["predict_cider"] == pytest.approx(expected["cider"], abs=1e-6)
    assert results["predict_bleu_4"] == pytest.approx(expected["bleu_4"], abs=1e-6)
    assert results["predict_exact_match"] == pytest.approx(exact_match(captions, references), abs=1e-6)
    assert "predict_loss" in results


def test_a_run_without_do_train_writes_results_and_predictions_but_no_model_and_says_so(predicted):
    output_dir, summary, log = predicted
    assert {path.name for path in output_dir.iterdir()} == {
        "eval_results.json", "predict_results.json", "all_results.json", "generated_predictions.jsonl",
        "run_summary.json"}
    assert summary["model"] is None and "eval_cider" in summary["eval"] and "predict_cider" in summary["predict"]
    assert "no --do_train, so no model, adapter or card was written" in log


def test_evaluation_and_prediction_over_several_batches_do_not_warn_about_lengths(predicted):
    log = predicted[2]
    assert "predict_cider" in log  # the whole run's log was captured
    assert LENGTH_WARNING not in log


def test_do_predict_on_streamed_shards_without_captions_writes_predictions_and_no_scores(trained, tmp_path):
    shard = tmp_path / "test.tar"
    with tarfile.open(shard, "w") as tar:
        for key, colour in (("sample-a", "red"), ("sample-b", "blue")):
            payload = png_bytes(COLOURS[colour])
            info = tarfile.TarInfo(f"{key}.png")
            info.size = len(payload)
            tar.addfile(info, io.BytesIO(payload))
    summary, _ = run_train_hf([
        "--model_name_or_path", str(trained[0]), "--test_file", str(shard), "--streaming", "--output_dir",
        str(tmp_path / "out"), "--do_predict", "--report_to", "none", "--use_cpu", "--disable_tqdm", "true"])
    records = read_jsonl(tmp_path / "out" / "generated_predictions.jsonl")
    assert [(r["key"], r["references"]) for r in records] == [("sample-a", []), ("sample-b", [])]
    images = [Image.open(io.BytesIO(png_bytes(COLOURS[colour]))) for colour in ("red", "blue")]
    assert [record["caption"] for record in records] == generated_captions(trained[0], images)
    results = json.loads((tmp_path / "out" / "predict_results.json").read_text())
    assert results["predict_samples"] == 2 and results["predict_samples_with_references"] == 0
    assert not any(name.startswith(("predict_cider", "predict_bleu", "predict_loss")) for name in results)


def test_push_to_hub_without_do_train_is_refused_before_anything_runs(tmp_path):
    with pytest.raises(ValueError, match="--push_to_hub uploads the model this run trains: use it with --do_train"):
        run_train_hf(["--output_dir", str(tmp_path), "--do_eval", "--push_to_hub", "--use_cpu"])


def test_lora_with_a_trainable_vision_tower_trains_the_tower_in_full(backbones):
    """The model's config says what trains; peft's `modules_to_save` follows it instead of freezing the tower."""
    model = LoraCaptionerForConditionalGeneration.from_backbones(*backbones, freeze_vision=False)
    peft_model = get_peft_model(model, decoder_lora_config(model, r=4, alpha=8, dropout=0.0))
    trainable = [name for name, p in peft_model.named_parameters() if p.requires_grad]
    for part in (".vision_tower.", ".visual_projection.", ".bridge.", ".lora_A."):
        assert any(part in name for name in trainable), part
    assert not any(".lora_" in name and ".decoder." not in name for name in trainable)


def test_do_predict_without_test_data_names_the_flags_and_writes_nothing(trained, data, tmp_path):
    """The issue's command: --validation_dir given, no test data. Refused before anything runs or is written."""
    with pytest.raises(ValueError, match=r"--do_predict needs data: --test_dir, --test_file or --dataset_name"):
        run_train_hf(["--model_name_or_path", str(trained[0]), "--validation_dir", str(data[0]), "--output_dir",
                      str(tmp_path / "out"), "--do_predict", "--use_cpu"])
    assert not (tmp_path / "out").exists()
