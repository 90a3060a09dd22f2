"""The model card (README.md) of a saved folder: Hub metadata that huggingface_hub's own parsers accept, a model-index
equal to the run's evaluation, usage snippets that run as written, and prose, table and tags that say what a run
really trained."""

import contextlib
import io
import json
import re
import shlex
import shutil
import sys

import numpy as np
import pytest
import torch
from huggingface_hub import ModelCard
from huggingface_hub.repocard_data import eval_results_to_model_index, model_index_to_eval_results
from PIL import Image
from transformers import TrainerState

import train_hf  # the repository root is on sys.path (conftest)
from loracaptioner import LoraCaptionerForConditionalGeneration
from loracaptioner.remote_code.configuration_loracaptioner import DEFAULT_TEXT_MODEL, DEFAULT_VISION_MODEL
from loracaptioner.hub import save_for_hub
from loracaptioner.lora import decoder_lora_config
from loracaptioner.model_card import ADAPTER_DIR, TrainingRun, data_source, write_model_card

EVAL_METRICS = {"eval_loss": 2.31, "eval_cider": 0.4127, "eval_bleu_1": 0.4411, "eval_bleu_2": 0.2803,
                "eval_bleu_3": 0.1702, "eval_bleu_4": 0.1035, "eval_rouge_l": 0.3552, "eval_exact_match": 0.0125,
                "epoch": 8.0}


def cc3m_run(folder, eval_metrics: dict | None = None, lora_r: int = 8) -> str:
    """What train_hf.py leaves in `folder` after the original CC3M recipe (configs/cc3m_seed.yaml), before the card:
    its run record, the Trainer's state, the evaluation results and the LoRA adapter (r=8, alpha=16, dropout 0.1).
    Returns the Hub id the run pushes to."""
    cc3m = data_source("pixparse/cc3m-wds")
    TrainingRun(base_models=[DEFAULT_VISION_MODEL, DEFAULT_TEXT_MODEL], train_data=cc3m, eval_data=cc3m,
                eval_split="validation", num_train_rows=299_988, skipped={"undecodable image": 12},
                per_device_train_batch_size=256, optimizer="adamw_torch", learning_rate=1e-4, lr_scheduler="linear",
                seed=7).save(folder)
    TrainerState(global_step=9375, epoch=8.0).save_to_json(str(folder / "trainer_state.json"))
    (folder / "eval_results.json").unlink(missing_ok=True)
    if eval_metrics:
        (folder / "eval_results.json").write_text(json.dumps(eval_metrics))
    shutil.rmtree(folder / ADAPTER_DIR, ignore_errors=True)
    if lora_r:
        model = LoraCaptionerForConditionalGeneration.from_pretrained(folder)
        decoder_lora_config(model, r=lora_r, alpha=16, dropout=0.1).save_pretrained(folder / ADAPTER_DIR)
    return "someone/loracaptioner-cc3m"


@pytest.fixture(scope="module")
def saved(backbones, processor, tmp_path_factory):
    """A tiny saved LoraCaptioner folder, as train_hf.py or save_pretrained leaves it (before the card)."""
    folder = tmp_path_factory.mktemp("model")
    LoraCaptionerForConditionalGeneration.from_backbones(*backbones).save_pretrained(folder)
    processor.save_pretrained(folder)
    return folder


def code_blocks(text: str, language: str) -> list[str]:
    return re.findall(rf"```{language}\n(.*?)```", text, flags=re.DOTALL)


def test_card_of_a_training_run_has_hub_metadata_that_huggingface_hub_parses(saved):
    write_model_card(saved, cc3m_run(saved, EVAL_METRICS))
    data = ModelCard.load(saved / "README.md", ignore_metadata_errors=False).data
    assert data.library_name == "transformers" and data.pipeline_tag == "image-to-text"
    assert {"image-captioning", "lora", "custom_code"} <= set(data.tags)
    assert data.base_model == ["openai/clip-vit-base-patch16", "google/flan-t5-base"]  # a list of Hub ids
    assert data.datasets == ["pixparse/cc3m-wds"] and data.license == "apache-2.0" and data.language == "en"
    assert {"cider", "bleu", "rouge"} <= set(data.metrics)


def test_model_index_round_trips_to_the_evaluation_metrics_of_the_run(saved):
    write_model_card(saved, cc3m_run(saved, EVAL_METRICS))
    card = ModelCard.load(saved / "README.md")
    model_index = card.data.to_dict()["model-index"]
    name, results = model_index_to_eval_results(model_index)
    assert name == "loracaptioner-cc3m"
    expected = {key.removeprefix("eval_"): value for key, value in EVAL_METRICS.items()
                if key not in ("eval_loss", "epoch")}
    assert {result.metric_type: result.metric_value for result in results} == expected
    assert {(r.task_type, r.dataset_type, r.dataset_split) for r in results} == {
        ("image-to-text", "pixparse/cc3m-wds", "validation")}
    assert eval_results_to_model_index(name, results) == model_index
    assert "| CIDEr-D | 0.4127 |" in card.text and "| BLEU-4 | 0.1035 |" in card.text


def test_card_describes_the_training_run(saved):
    card = write_model_card(saved, cc3m_run(saved, EVAL_METRICS))
    text = card.text
    assert "pixparse/cc3m-wds, 299,988 (image, caption) rows" in text and "12 undecodable image" in text
    assert "9,375 optimizer steps (8.00 epochs, 2,400,000 caption rows seen)" in text
    assert "learning rate 0.0001" in text and "seed 7" in text and "optimizer adamw_torch" in text
    assert "r=8, alpha=16, dropout=0.1" in text and "merged into these weights" in text
    assert "{{" not in text and "None" not in text


def test_card_of_a_full_fine_tune_is_not_tagged_lora(saved):
    card = write_model_card(saved, cc3m_run(saved, lora_r=0))
    assert "lora" not in card.data.tags and "the decoder was fine-tuned fully" in card.text


def test_card_of_a_folder_saved_by_hand_has_no_model_index_and_no_local_paths(model, processor, tmp_path):
    folder = save_for_hub(model, processor, tmp_path / "by-hand")  # backbones from local folders
    card = ModelCard.load(folder / "README.md")
    assert card.data.eval_results is None and "model-index" not in card.data.to_dict()
    assert card.data.base_model is None and card.data.pipeline_tag == "image-to-text"
    assert "No evaluation was run" in card.text and "saved outside train_hf.py" in card.text
    assert "How it was trained is not recorded" in card.text and "lora" not in card.data.tags  # no claim of LoRA
    assert "LoRA" not in card.text.split("## Usage")[0] and table_cell(card.text, "decoder") == "not recorded"
    assert str(tmp_path) not in card.content and "{{" not in card.content
    assert {"config.json", "model.safetensors", "generation_config.json", "processor_config.json",
            "modeling_loracaptioner.py"} <= {path.name for path in folder.iterdir()}


def test_card_of_a_folder_saved_by_hand_names_hub_backbones_as_base_models(model, processor, tmp_path):
    model.config.vision_config._name_or_path = "openai/clip-vit-base-patch16"  # as from_backbones(Hub ids) sets them
    model.config.text_config._name_or_path = "google/flan-t5-base"
    folder = save_for_hub(model, processor, tmp_path / "by-hand", repo_id="someone/captioner")
    card = ModelCard.load(folder / "README.md")
    assert card.data.base_model == ["openai/clip-vit-base-patch16", "google/flan-t5-base"]
    assert 'repo_id = "someone/captioner"' in card.text


def test_command_lines_in_the_card_parse_with_the_cli(saved):
    from loracaptioner.cli import build_parser

    card = write_model_card(saved, cc3m_run(saved))
    commands = [shlex.split(line) for line in code_blocks(card.text, "bash")[0].splitlines() if line.strip()]
    assert commands[0] == ["loracaptioner", "caption", "someone/loracaptioner-cc3m", "images/", "--output",
                           "captions.jsonl"]
    parsed = [build_parser().parse_args(command[1:]) for command in commands]
    assert (parsed[1].format, parsed[1].num_beams, parsed[1].dtype, parsed[1].revision) == ("csv", 4, "bfloat16", "main")


def test_usage_snippets_in_the_card_run_as_written(saved, tmp_path, monkeypatch):
    """Every python block of the card, with the local folder in place of the Hub id (and `photo.jpg` present)."""
    card = write_model_card(saved, cc3m_run(saved, EVAL_METRICS))
    blocks = code_blocks(card.text, "python")
    assert len(blocks) == 2 and "trust_remote_code=True" in blocks[0] and 'revision = "main"' in blocks[0]
    assert 'pipeline("image-text-to-text"' in blocks[1]
    assert "loracaptioner caption someone/loracaptioner-cc3m images/ --output captions.jsonl" in card.text
    assert "inference widget does not run custom-code models" in card.text and "space/" in card.text
    monkeypatch.chdir(tmp_path)
    Image.new("RGB", (48, 40), (200, 30, 30)).save("photo.jpg")
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        for block in blocks:
            exec(block.replace("someone/loracaptioner-cc3m", str(saved)), {})  # noqa: S102 - the card's own code
    captions, piped = printed.getvalue().strip().splitlines()
    assert captions.startswith("['") and "generated_text" in piped


def table_cell(text: str, part: str) -> str:
    """The 'trained' cell of the card's architecture table for `part` ("vision tower", "bridge", "decoder")."""
    row = next(line for line in text.splitlines() if line.startswith(f"| {part} |"))
    return row.strip("| ").split(" | ")[-1]


def opening(text: str) -> str:
    """The card's first paragraph after the title."""
    return text.split("\n\n")[1]


DECODER_MODULES = ("SelfAttention.q, SelfAttention.k, EncDecAttention.q, EncDecAttention.k, DenseReluDense.wi_0, "
                   "DenseReluDense.wi_1, DenseReluDense.wo")
RUNS = {  # flags -> (opening sentence says, table: vision tower, decoder; LoRA line of the training section)
    "lora": ([], ("a frozen **CLIP** vision tower",
                  f"a **T5 decoder** adapted with **LoRA** (on its {DECODER_MODULES} modules)"),
             ("frozen", f"LoRA ({DECODER_MODULES})"), f"dropout=0.0 on the decoder modules {DECODER_MODULES}"),
    "full decoder": (["--lora_r", "0"], ("a frozen **CLIP** vision tower", "a fully fine-tuned **T5 decoder**"),
                     ("frozen", "fine-tuned"), "LoRA: none, the decoder was fine-tuned fully"),
    "tower trained": (["--lora_r", "0", "--freeze_vision", "false"],
                      ("a fine-tuned **CLIP** vision tower", "a fully fine-tuned **T5 decoder**"),
                      ("fine-tuned", "fine-tuned"), "LoRA: none, the decoder was fine-tuned fully"),
}


@pytest.fixture(scope="module")
def four_images(tmp_path_factory):
    folder = tmp_path_factory.mktemp("four")
    with open(folder / "metadata.jsonl", "w") as metadata:
        for i, colour in enumerate(["red", "blue", "green", "yellow"]):
            pixels = np.full((32, 32, 3), [(200, 30, 30), (30, 30, 200), (30, 200, 30), (220, 220, 30)][i], np.uint8)
            Image.fromarray(pixels).save(folder / f"{i}.png")
            metadata.write(json.dumps({"file_name": f"{i}.png", "caption": f"a {colour} square"}) + "\n")
    return folder


@pytest.mark.parametrize("run", RUNS)
def test_card_of_a_run_says_what_it_trained_in_prose_table_training_section_and_tags(run, backbones, four_images,
                                                                                      tmp_path):
    flags, (vision_says, decoder_says), (vision_cell, decoder_cell), lora_line = RUNS[run]
    original = sys.argv
    sys.argv = ["train_hf.py", "--vision_model_name_or_path", backbones[0], "--text_model_name_or_path", backbones[1],
                "--train_dir", str(four_images), "--output_dir", str(tmp_path), "--do_train", "--max_steps", "2",
                "--per_device_train_batch_size", "4", "--learning_rate", "1e-2", "--lora_dropout", "0.0",
                "--save_strategy", "no", "--report_to", "none", "--use_cpu", "--disable_tqdm", "true", *flags]
    try:
        train_hf.main()
    finally:
        sys.argv = original
    card = ModelCard.load(tmp_path / "README.md")
    assert vision_says in opening(card.text) and decoder_says in opening(card.text)
    assert (table_cell(card.text, "vision tower"), table_cell(card.text, "bridge"),
            table_cell(card.text, "decoder")) == (vision_cell, "yes", decoder_cell)
    assert lora_line in card.text
    assert ({"lora", "peft"} <= set(card.data.tags)) == (run == "lora")
    if run != "lora":
        assert "LoRA" not in opening(card.text) and "adapted with" not in card.text
    if run == "tower trained":
        assert "frozen" not in card.text

    # ... and that is what happened to the weights.
    saved = LoraCaptionerForConditionalGeneration.from_pretrained(tmp_path).state_dict()
    start = LoraCaptionerForConditionalGeneration.from_backbones(*backbones).state_dict()

    def changed(name: str) -> bool:
        return not torch.equal(saved[name], start[name])

    tower = [name for name in start if name.startswith("encoder.vision_tower.")]
    assert any(map(changed, tower)) == (vision_cell == "fine-tuned")
    assert changed("decoder.block.0.layer.0.SelfAttention.q.weight")  # a LoRA target: changed either way
    assert changed("decoder.block.0.layer.0.SelfAttention.v.weight") == (run != "lora")  # not a LoRA target
