"""The original's training output (projection.pt + a peft adapter for T5) becomes a LoraCaptioner that computes exactly
what the original computed: the original's forward is re-built here from transformers and peft parts, as it ran."""

import json
import os
import shutil
import subprocess
import sys
import warnings

import pytest
import torch
from conftest import REPO, tiny_text_config, tiny_tokenizer
from peft import LoraConfig, PeftModel, get_peft_model
from safetensors import safe_open
from safetensors.torch import load_file
from test_remote_code import run_as_hub_user
from torch import nn
from transformers import CLIPModel, T5ForConditionalGeneration
from transformers.modeling_outputs import BaseModelOutput

from loracaptioner import LoraCaptionerForConditionalGeneration
from loracaptioner.convert_original import main

ORIGINAL_TARGETS = ["SelfAttention.q", "SelfAttention.k", "EncDecAttention.q", "EncDecAttention.k",
                    "DenseReluDense.wi_0", "DenseReluDense.wi_1", "DenseReluDense.wo"]
CAPTION_TOKENS = 12


class OriginalCaptioner(nn.Module):
    """The original: CLIP patch tokens (no CLS) -> ln_post -> CLIP projection -> bridge -> T5 with LoRA, whose encoder
    is bypassed by handing the image tokens over as `encoder_outputs`."""

    def __init__(self, clip_dir, t5_dir):
        super().__init__()
        self.clip = CLIPModel.from_pretrained(clip_dir)
        self.projection = nn.Linear(self.clip.config.projection_dim, 32)
        t5 = T5ForConditionalGeneration.from_pretrained(t5_dir)
        config = LoraConfig(r=8, lora_alpha=16, lora_dropout=0.1, target_modules=ORIGINAL_TARGETS,
                            task_type="SEQ_2_SEQ_LM")
        self.t5 = get_peft_model(t5, config)
        for name, parameter in self.t5.named_parameters():  # as if trained: every LoRA matrix non-zero
            if "lora_" in name:
                nn.init.normal_(parameter, std=0.05)

    def image_tokens(self, pixel_values):
        patches = self.clip.vision_model(pixel_values=pixel_values).last_hidden_state[:, 1:]
        return BaseModelOutput(last_hidden_state=self.projection(
            self.clip.visual_projection(self.clip.vision_model.post_layernorm(patches))))

    def forward(self, pixel_values, decoder_input_ids):
        return self.t5(encoder_outputs=self.image_tokens(pixel_values), decoder_input_ids=decoder_input_ids).logits

    def caption_ids(self, pixel_values):
        return self.t5.generate(encoder_outputs=self.image_tokens(pixel_values), max_new_tokens=CAPTION_TOKENS,
                                num_beams=1, do_sample=False)


@pytest.fixture(scope="module")
def original(backbones, tmp_path_factory):
    """The original model and its training output: projection.pt and the adapter as safetensors and as .bin."""
    torch.manual_seed(1)
    model = OriginalCaptioner(*backbones).eval()
    root = tmp_path_factory.mktemp("original")
    torch.save(model.projection.state_dict(), root / "projection.pt")
    model.t5.save_pretrained(root / "adapter")
    model.t5.save_pretrained(root / "adapter_bin", safe_serialization=False)
    assert (root / "adapter_bin" / "adapter_model.bin").is_file()
    # the adapter_config.json of peft 0.2 (2023), with its since-removed fields
    (root / "adapter_bin" / "adapter_config.json").write_text(json.dumps({
        "base_model_name_or_path": "google/flan-t5-base", "bias": "none", "enable_lora": None, "fan_in_fan_out": False,
        "inference_mode": True, "lora_alpha": 16, "lora_dropout": 0.1, "merge_weights": False, "modules_to_save": None,
        "peft_type": "LORA", "r": 8, "target_modules": ORIGINAL_TARGETS, "task_type": "SEQ_2_SEQ_LM"}))
    return model, root


def converter_command(root, backbones, output, *extra) -> list[str]:
    return [sys.executable, "-m", "loracaptioner.convert_original", "--projection", str(root / "projection.pt"),
            "--adapter", str(root / "adapter"), "--output", str(output), "--vision_model", backbones[0],
            "--text_model", backbones[1], *extra]


@pytest.fixture(scope="module")
def converted(original, backbones, tmp_path_factory) -> dict:
    """The converter run as a user runs it, merged and --no-merge (two processes at once)."""
    root, out = original[1], tmp_path_factory.mktemp("converted")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    runs = {name: subprocess.Popen(converter_command(root, backbones, out / name, *extra), cwd=REPO, env=env,
                                   stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
            for name, extra in (("merged", ()), ("unmerged", ("--no-merge",)))}
    logs = {name: run.communicate(timeout=300)[1] for name, run in runs.items()}
    for name, run in runs.items():
        assert run.returncode == 0, logs[name][-3000:]
    return {name: (out / name, logs[name]) for name in runs}


def assert_same_as_original(original_model, converted, processor, images):
    pixel_values = processor(images=images)["pixel_values"]
    decoder_input_ids = processor(text_target=["a red square on the left", "a dog"] * 2)["labels"].clamp(min=0)
    decoder_input_ids = converted.prepare_decoder_input_ids_from_labels(decoder_input_ids)
    with torch.no_grad():
        expected = original_model(pixel_values, decoder_input_ids)
        logits = converted(pixel_values=pixel_values, decoder_input_ids=decoder_input_ids).logits
        # merging changes float32 summation order: logits (up to ~25 here) agree to 1e-5 relative
        torch.testing.assert_close(logits, expected, rtol=1e-5, atol=1e-5)
        # the original's decoding (greedy, no repetition guard), asked of the converted model explicitly
        original_ids = original_model.caption_ids(pixel_values)
        ids = converted.generate(pixel_values=pixel_values, max_new_tokens=CAPTION_TOKENS, no_repeat_ngram_size=0,
                                 num_beams=1, do_sample=False)
    assert torch.equal(ids, original_ids)
    return processor.batch_decode(ids, skip_special_tokens=True)


def test_merged_conversion_gives_the_original_logits_and_greedy_captions(original, converted, processor, images):
    output, log = converted["merged"]
    # tiny T5: 3 encoder layers x 5 targeted modules (self-attention q, k; feed-forward wi_0, wi_1, wo) x (A, B)
    assert "dropped 30 LoRA tensors of T5 text-encoder modules" in log
    converted_model = LoraCaptionerForConditionalGeneration.from_pretrained(output).eval()
    assert_same_as_original(original[0], converted_model, processor, images)
    names = set(os.listdir(output))
    assert {"model.safetensors", "config.json", "generation_config.json", "processor_config.json", "README.md",
            "modeling_loracaptioner.py"} <= names
    assert not {name for name in names if name.endswith((".bin", ".pt", ".pkl", ".pth"))}
    assert json.loads((output / "generation_config.json").read_text())["no_repeat_ngram_size"] == 3


def test_adapter_in_the_older_peft_bin_format_converts_to_the_same_model(original, converted, backbones, tmp_path):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        main(["--projection", str(original[1] / "projection.pt"), "--adapter", str(original[1] / "adapter_bin"),
              "--output", str(tmp_path / "from_bin"), "--vision_model", backbones[0], "--text_model", backbones[1]])
    # peft 0.2's since-removed fields are read, not handed to peft (which would say the file is from a newer peft)
    assert not [str(w.message) for w in caught if "peft" in str(w.message).lower()]
    from_bin = load_file(tmp_path / "from_bin" / "model.safetensors")
    from_safetensors = load_file(converted["merged"][0] / "model.safetensors")
    assert from_bin.keys() == from_safetensors.keys()
    assert all(torch.equal(from_bin[name], from_safetensors[name]) for name in from_bin)


def test_merged_conversion_loads_as_remote_code_without_the_package(converted, processor, images, tmp_path):
    output = converted["merged"][0]
    converted_model = LoraCaptionerForConditionalGeneration.from_pretrained(output).eval()
    result, weights = run_as_hub_user(output, tmp_path)
    assert result["module"].startswith("transformers_modules.")
    for name, tensor in converted_model.state_dict().items():
        assert torch.equal(weights[name], tensor), name
    beam = converted_model.generate(**processor(images=images[:2]), num_beams=4)
    assert result["captions"] == processor.batch_decode(beam, skip_special_tokens=True)


def test_unmerged_conversion_gives_base_plus_a_decoder_only_adapter_equal_to_the_original(
        original, converted, processor, images):
    output = converted["unmerged"][0]
    with safe_open(output / "adapter" / "adapter_model.safetensors", "pt") as adapter:
        keys = list(adapter.keys())
    lora_keys = [key for key in keys if "lora_" in key]
    assert len(lora_keys) == 2 * 2 * 7 and all(key.startswith("base_model.model.decoder.block.") for key in lora_keys)
    assert set(keys) - set(lora_keys) == {"base_model.model.encoder.bridge.weight", "base_model.model.encoder.bridge.bias"}
    base = LoraCaptionerForConditionalGeneration.from_pretrained(output)
    assert torch.equal(base.encoder.bridge.weight, original[0].projection.weight)
    adapted = PeftModel.from_pretrained(base, output / "adapter").eval()
    assert_same_as_original(original[0], adapted, processor, images)


def run_main(capsys, *argv) -> str:
    """The CLI's error: exit status 2 and one line, no traceback (after whatever loading progress came before)."""
    with pytest.raises(SystemExit) as exit_info:
        main(list(argv))
    assert exit_info.value.code == 2
    error = capsys.readouterr().err.strip()
    assert "Traceback" not in error
    return error.splitlines()[-1]


def test_bridge_of_the_wrong_width_is_refused_with_the_reason(original, backbones, tmp_path, capsys):
    torch.save(nn.Linear(512, 32).state_dict(), tmp_path / "projection.pt")
    error = run_main(capsys, "--projection", str(tmp_path / "projection.pt"), "--adapter", str(original[1] / "adapter"),
                     "--output", str(tmp_path / "out"), "--vision_model", backbones[0], "--text_model", backbones[1])
    assert "the bridge takes 512 features, but the vision model's patch tokens have 24" in error
    assert not (tmp_path / "out").exists()


class RunsCode:
    def __reduce__(self):
        return (os.system, ("touch pwned",))


def test_projection_with_pickled_code_is_refused_and_not_run(original, backbones, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    torch.save({"weight": RunsCode()}, tmp_path / "projection.pt")
    error = run_main(capsys, "--projection", "projection.pt", "--adapter", str(original[1] / "adapter"),
                     "--output", "out", "--vision_model", backbones[0], "--text_model", backbones[1])
    assert "--projection: projection.pt is not a weights-only tensor file" in error
    assert not (tmp_path / "pwned").exists()


def test_adapter_for_a_deeper_decoder_is_refused_and_nothing_is_written(original, backbones, tmp_path, capsys):
    deeper_t5 = tmp_path / "t5_three_decoder_layers"
    T5ForConditionalGeneration(tiny_text_config(len(tiny_tokenizer()), num_decoder_layers=3)).save_pretrained(deeper_t5)
    tiny_tokenizer().save_pretrained(deeper_t5)
    error = run_main(capsys, "--projection", str(original[1] / "projection.pt"), "--adapter", str(original[1] / "adapter"),
                     "--output", str(tmp_path / "out"), "--vision_model", backbones[0], "--text_model", str(deeper_t5))
    assert f"--adapter: does not match the decoder of {deeper_t5}: missing ['base_model.model.decoder.block.2." in error
    assert not (tmp_path / "out").exists()


def test_an_adapter_on_fused_qkv_layers_is_refused_by_name(original, backbones, tmp_path, capsys):
    adapter = tmp_path / "fused"
    shutil.copytree(original[1] / "adapter_bin", adapter)
    config = json.loads((adapter / "adapter_config.json").read_text())
    (adapter / "adapter_config.json").write_text(json.dumps({**config, "enable_lora": [True, False, True]}))
    error = run_main(capsys, "--projection", str(original[1] / "projection.pt"), "--adapter", str(adapter),
                     "--output", str(tmp_path / "out"), "--vision_model", backbones[0], "--text_model", backbones[1])
    assert error.endswith(f"--adapter: {adapter / 'adapter_config.json'} sets enable_lora (LoRA on a fused qkv layer); "
                          "T5's decoder has none")
    assert not (tmp_path / "out").exists()


def test_missing_adapter_folder_is_named_in_the_error(original, tmp_path, capsys):
    error = run_main(capsys, "--projection", str(original[1] / "projection.pt"), "--adapter", str(tmp_path / "nowhere"),
                     "--output", str(tmp_path / "out"))
    assert error == (f"python -m loracaptioner.convert_original: error: --adapter: {tmp_path / 'nowhere'} has no "
                     "adapter_config.json (expected a peft adapter folder)")


def test_the_convert_original_subcommand_takes_the_same_options_in_the_cli_flag_style(original, converted, backbones,
                                                                                      tmp_path, capsys):
    from loracaptioner.cli import main as loracaptioner_main

    root = original[1]
    assert loracaptioner_main(["convert-original", "--projection", str(root / "projection.pt"), "--adapter",
                               str(root / "adapter"), "-o", str(tmp_path / "out"), "--vision-model", backbones[0],
                               "--text-model", backbones[1]]) == 0
    by_subcommand = LoraCaptionerForConditionalGeneration.from_pretrained(tmp_path / "out").state_dict()
    by_module = LoraCaptionerForConditionalGeneration.from_pretrained(converted["merged"][0]).state_dict()
    assert by_subcommand.keys() == by_module.keys()
    assert all(torch.equal(by_subcommand[name], by_module[name]) for name in by_module)

    code = loracaptioner_main(["convert-original", "--projection", str(root / "projection.pt"), "--adapter",
                               str(tmp_path / "nowhere"), "--output", str(tmp_path / "out2")])
    assert code == 2
    assert capsys.readouterr().err.splitlines()[-1] == (
        f"loracaptioner: error: --adapter: {tmp_path / 'nowhere'} has no adapter_config.json (expected a peft adapter "
        "folder)")
