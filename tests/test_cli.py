"""`loracaptioner caption`: inputs of every kind, three output formats, resuming, bad inputs as error records, usage
errors as exit 2, URLs (served locally), adapters, and captions equal to `model.generate()`."""

import csv
import functools
import http.server
import io
import json
import os
import subprocess
import sys
import threading
import time
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from loracaptioner import LoraCaptionerForConditionalGeneration, LoraCaptionerProcessor, loading
from loracaptioner.cli import main
from loracaptioner.loading import BF16_MARGIN, bf16_speedup, pick_dtype


def write_image(path: Path, seed: int, size=(40, 30)) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    pixels = np.random.default_rng(seed).integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)
    Image.fromarray(pixels).save(path)
    return str(path)


def generate_captions(model_dir: str, paths: list[str], seed: int | None = None, prompt=None, dtype=torch.float32,
                      **options) -> list[str]:
    """What a user writes by hand: the model's own generate() on the same images, in one batch."""
    model = LoraCaptionerForConditionalGeneration.from_pretrained(model_dir, dtype=dtype).eval()
    processor = LoraCaptionerProcessor.from_pretrained(model_dir)
    if seed is not None:
        torch.manual_seed(seed)
    inputs = processor(images=[Image.open(path) for path in paths], text=prompt)
    inputs["pixel_values"] = inputs["pixel_values"].to(dtype)
    return [c.strip() for c in processor.batch_decode(model.generate(**inputs, **options), skip_special_tokens=True)]


def run(args: list[str], capsys) -> tuple[int, str, str]:
    """The CLI in float32, as `generate_captions` by default (`--dtype auto` is tested on its own: it picks bfloat16
    on CPUs where that is faster), unless `args` say otherwise."""
    code = main(["caption", *args, *([] if "--dtype" in args else ["--dtype", "float32"]), "--quiet"])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def out_of_memory_on_call(number: int):
    """A `generate` that runs out of memory (pretended) on its `number`-th call: the model is the boundary."""
    generate, calls = LoraCaptionerForConditionalGeneration.generate, []

    def generate_or_run_out_of_memory(self, *arguments, **options):
        calls.append(1)
        if len(calls) == number:
            raise torch.OutOfMemoryError("CUDA out of memory (pretend)")
        return generate(self, *arguments, **options)

    return generate_or_run_out_of_memory


def jsonl(text: str) -> list[dict]:
    return [json.loads(line) for line in text.splitlines()]


@pytest.mark.parametrize(
    "cli_options, generate_options",
    [
        ([], {}),
        (["--num-beams", "3", "--max-new-tokens", "6"], {"num_beams": 3, "max_new_tokens": 6}),
        (["--prompt", "a photo of"], {"prompt": "a photo of"}),
        (["--do-sample", "--seed", "3", "--top-p", "0.9", "--temperature", "0.7"],
         {"seed": 3, "do_sample": True, "top_p": 0.9, "temperature": 0.7}),
        (["--num-beams", "3", "--repetition-penalty", "1.5", "--length-penalty", "0.5", "--min-new-tokens", "6",
          "--no-repeat-ngram-size", "2"],
         {"num_beams": 3, "repetition_penalty": 1.5, "length_penalty": 0.5, "min_new_tokens": 6,
          "no_repeat_ngram_size": 2}),
        (["--no-repeat-ngram-size", "0", "--repetition-penalty", "1.0", "--length-penalty", "1.0",
          "--min-new-tokens", "0"],
         {"no_repeat_ngram_size": 0, "repetition_penalty": 1.0, "length_penalty": 1.0, "min_new_tokens": 0}),
    ],
    ids=["defaults", "beam-search", "prompt", "sampling", "repetition-and-length", "plain-greedy"],
)
def test_captions_equal_model_generate_with_the_same_options(model_dir, tmp_path, capsys, cli_options,
                                                            generate_options):
    paths = [write_image(tmp_path / f"{i}.png", seed=i, size=(30 + 10 * i, 40)) for i in range(3)]
    code, out, _ = run([model_dir, *paths, "--batch-size", "3", *cli_options], capsys)
    assert code == 0
    records = jsonl(out)
    assert [r["path"] for r in records] == paths
    assert [r["caption"] for r in records] == generate_captions(model_dir, paths, **generate_options)
    assert all(r["caption"] for r in records)


def save_repetitive_model(model_dir: str, folder: Path, word: str = "red") -> str:
    """The original's failure in its purest form, saved: whatever the image, the decoder's state is the same, its
    best next word is always `word` and its second best end-of-caption."""
    model = LoraCaptionerForConditionalGeneration.from_pretrained(model_dir)
    processor = LoraCaptionerProcessor.from_pretrained(model_dir)
    word_id = processor.tokenizer.convert_tokens_to_ids("▁" + word)
    with torch.no_grad():
        for name, weight in model.decoder.named_parameters():  # every block adds nothing to the embedding...
            if name.endswith(("SelfAttention.o.weight", "EncDecAttention.o.weight", "DenseReluDense.wo.weight")):
                weight.zero_()
        model.get_input_embeddings().weight.fill_(1.0)  # ... which is the same for every token
        model.decoder.final_layer_norm.weight.fill_(1.0)
        model.lm_head.weight.zero_()
        model.lm_head.weight[word_id] = 2.0 / model.config.text_config.d_model
        model.lm_head.weight[model.config.text_config.eos_token_id] = 1.0 / model.config.text_config.d_model
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    return str(folder)


def test_no_repeat_ngram_size_0_gives_plain_greedy_which_loops_where_the_default_stops(model_dir, tmp_path, capsys):
    repetitive = save_repetitive_model(model_dir, tmp_path / "repetitive")
    image = write_image(tmp_path / "a.png", 0)
    code, out, _ = run([repetitive, image], capsys)
    assert code == 0 and jsonl(out)[0]["caption"] == "red red red"  # the saved no_repeat_ngram_size=3
    code, out, _ = run([repetitive, image, "--no-repeat-ngram-size", "0"], capsys)
    assert code == 0 and jsonl(out)[0]["caption"] == " ".join(["red"] * 32)  # up to the saved max_new_tokens


def test_folders_are_searched_recursively_and_globs_and_a_stdin_list_are_expanded(model_dir, tmp_path, capsys,
                                                                                   monkeypatch):
    in_folder = [write_image(tmp_path / "photos" / "a.png", 0), write_image(tmp_path / "photos" / "deep" / "b.JPG", 1)]
    (tmp_path / "photos" / "notes.txt").write_text("not an image, and not an image suffix: left out")
    by_glob = [write_image(tmp_path / "more" / f"{i}.webp", 2 + i) for i in range(2)]
    listed = [write_image(tmp_path / "listed" / f"{i}.bmp", 4 + i) for i in range(2)]
    monkeypatch.setattr(sys, "stdin", io.StringIO("\n".join(listed) + "\n\n"))
    code, out, _ = run([model_dir, str(tmp_path / "photos"), str(tmp_path / "more" / "*.webp"), "-",
                        "--batch-size", "2"], capsys)
    assert code == 0
    assert [r["path"] for r in jsonl(out)] == [*in_folder, *by_glob, *listed]


@pytest.mark.parametrize("output_format, delimiter", [("csv", ","), ("tsv", "\t")])
def test_csv_and_tsv_output_has_a_header_and_one_row_per_input(model_dir, tmp_path, capsys, output_format, delimiter):
    paths = [write_image(tmp_path / "with, comma.png", 0), str(tmp_path / "missing.png")]
    code, out, _ = run([model_dir, *paths, "--format", output_format], capsys)
    assert code == 1
    rows = list(csv.DictReader(io.StringIO(out), delimiter=delimiter))
    assert list(rows[0]) == ["path", "caption", "error"]
    assert rows[0]["path"] == paths[0] and rows[0]["caption"] and not rows[0]["error"]
    assert rows[1]["path"] == paths[1] and not rows[1]["caption"] and "no such file" in rows[1]["error"]
    # --output's suffix picks the format when --format is not given
    written = tmp_path / f"captions.{output_format}"
    assert run([model_dir, paths[0], "--output", str(written)], capsys)[0] == 0
    assert written.read_text().splitlines()[0] == delimiter.join(["path", "caption", "error"])


def test_bad_files_become_error_records_and_their_batch_keeps_its_other_captions(model_dir, tmp_path, capsys):
    good = [write_image(tmp_path / f"good{i}.png", i) for i in range(3)]
    not_an_image = tmp_path / "notes.jpg"
    not_an_image.write_text("hello")
    inputs = [good[0], str(not_an_image), good[1], str(tmp_path / "missing.png"), good[2]]
    code, out, err = run([model_dir, *inputs, "--batch-size", "4"], capsys)
    assert code == 1
    records = {r["path"]: r for r in jsonl(out)}
    assert set(records) == set(inputs)
    assert [records[p]["caption"] for p in good] == generate_captions(model_dir, good)
    assert records[str(not_an_image)]["error"].startswith(f"{not_an_image}: cannot decode image")
    assert records[str(tmp_path / "missing.png")]["error"] == f"{tmp_path / 'missing.png'}: no such file"
    assert "2 of 5 inputs failed" in err


def test_rerun_with_the_same_output_skips_captioned_inputs_and_retries_failed_ones(model_dir, tmp_path, capsys):
    paths = [write_image(tmp_path / f"{i}.png", i) for i in range(2)]
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"")
    output = tmp_path / "captions.jsonl"
    assert run([model_dir, *paths, str(broken), "--output", str(output)], capsys)[0] == 1
    first = jsonl(output.read_text())
    assert [("caption" in r, "error" in r) for r in first] == [(True, False), (True, False), (False, True)]

    write_image(broken, 7)  # fixed since; and the last run was killed in the middle of a record:
    with output.open("a") as handle:
        handle.write('{"path": "half a rec')
    code, _, err = run([model_dir, *paths, str(broken), "--output", str(output)], capsys)
    assert code == 0 and "2 inputs already captioned" in err
    records = jsonl(output.read_text())
    assert records[:3] == first
    assert len(records) == 4 and records[3]["path"] == str(broken) and records[3]["caption"]


def test_usage_errors_exit_2_with_one_line_and_no_traceback(model_dir, tmp_path, capsys):
    image = write_image(tmp_path / "a.png", 0)
    code, out, err = run([str(tmp_path / "no-such-model"), image], capsys)
    assert code == 2 and out == ""
    assert err.count("\n") == 1
    assert err == f"loracaptioner: error: model folder '{tmp_path}/no-such-model' does not exist\n"
    code, _, err = run([str(Path(model_dir).parent), image], capsys)  # a folder, but no model in it
    assert code == 2 and err.startswith("loracaptioner: error: cannot load model") and err.count("\n") == 1
    (tmp_path / "empty").mkdir()
    code, _, err = run([model_dir, str(tmp_path / "empty")], capsys)
    assert code == 2 and err.splitlines()[-1] == "loracaptioner: error: no inputs found"
    with pytest.raises(SystemExit) as exit_info:
        main(["caption", model_dir, image, "--dtype", "float8"])
    assert exit_info.value.code == 2


@pytest.mark.parametrize("speedup, picked", [(0.01, torch.float32), (0.5, torch.float32), (BF16_MARGIN - 0.01,
                                                                                            torch.float32),
                                             (BF16_MARGIN, torch.bfloat16), (4.7, torch.bfloat16)],
                         ids=["avx2", "avx512-no-amx", "just-below-margin", "at-margin", "avx512-bf16"])
def test_dtype_auto_on_a_cpu_picks_bfloat16_only_where_its_matmuls_are_measured_faster(monkeypatch, capsys, speedup,
                                                                                       picked):
    # the measurement (what this CPU does) is the boundary: bf16_speedup's result stands for another CPU's
    monkeypatch.setattr(loading, "bf16_speedup", lambda device: speedup)
    assert pick_dtype("auto", torch.device("cpu")) == picked
    assert pick_dtype("auto", torch.device("cpu")) == picked
    err = capsys.readouterr().err  # the choice and its reason, once
    assert err == (f"loracaptioner: --dtype auto: {str(picked).removeprefix('torch.')} (bfloat16 matrix products "
                   f"measured {speedup:.2f}x as fast as float32 on this CPU, "
                   f"{torch.backends.cpu.get_cpu_capability()}; bfloat16 from {BF16_MARGIN}x)\n")
    assert pick_dtype("float32", torch.device("cpu")) == torch.float32  # an explicit dtype: no measurement
    assert pick_dtype("bfloat16", torch.device("cpu")) == torch.bfloat16
    assert capsys.readouterr().err == ""


def test_bf16_speedup_is_measured_once_per_process_and_device():
    cpu = torch.device("cpu")
    speedup = bf16_speedup(cpu)
    assert 0 < speedup < float("inf")
    started = time.perf_counter()
    assert bf16_speedup(cpu) == speedup  # cached: the same figure, at once
    assert time.perf_counter() - started < 0.001


def test_dtype_auto_captions_equal_generate_in_the_dtype_it_picked(model_dir, tmp_path, capsys):
    paths = [write_image(tmp_path / f"{i}.png", seed=i) for i in range(3)]
    code, out, _ = run([model_dir, *paths, "--dtype", "auto"], capsys)
    picked = pick_dtype("auto", torch.device("cpu"))
    assert code == 0
    assert [r["caption"] for r in jsonl(out)] == generate_captions(model_dir, paths, dtype=picked)


class _Handler(http.server.SimpleHTTPRequestHandler):
    def do_GET(self):
        if self.path == "/slow.png":
            time.sleep(6)
        return super().do_GET()

    def log_message(self, *args):
        pass


@pytest.fixture()
def http_root(tmp_path):
    root = tmp_path / "site"
    root.mkdir()
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(_Handler, directory=str(root)))
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield root, f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


def test_urls_are_downloaded_with_a_size_limit_and_a_timeout(model_dir, http_root, capsys):
    root, base = http_root
    good = write_image(root / "good.png", 0)
    write_image(root / "big.png", 1, size=(300, 300))
    write_image(root / "slow.png", 2)
    urls = [f"{base}/good.png", f"{base}/big.png", f"{base}/slow.png", f"{base}/missing.png"]
    code, out, _ = run([model_dir, *urls, "--max-url-bytes", "20000", "--url-timeout", "2"], capsys)
    assert code == 1
    records = {r["path"]: r for r in jsonl(out)}
    assert records[urls[0]]["caption"] == generate_captions(model_dir, [good])[0]
    assert "more than --max-url-bytes (20000)" in records[urls[1]]["error"]
    assert "timed out" in records[urls[2]]["error"]
    assert "404" in records[urls[3]]["error"]


def test_an_adapter_is_merged_into_the_base_model(model_dir, tmp_path, capsys):
    from peft import PeftModel, get_peft_model

    from loracaptioner.lora import decoder_lora_config

    base = LoraCaptionerForConditionalGeneration.from_pretrained(model_dir)
    config = decoder_lora_config(base, r=4, alpha=8, dropout=0.0)
    config.init_lora_weights = False  # random LoRA weights: the adapter changes the model
    torch.manual_seed(1)
    paths = [write_image(tmp_path / f"{i}.png", i) for i in range(3)]
    with warnings.catch_warnings():  # peft reads `is_gradient_checkpointing`, deprecated in transformers 5.24
        warnings.filterwarnings("ignore", "`is_gradient_checkpointing` is deprecated", FutureWarning)
        get_peft_model(base, config).save_pretrained(tmp_path / "adapter")
        merged = PeftModel.from_pretrained(LoraCaptionerForConditionalGeneration.from_pretrained(model_dir),
                                           tmp_path / "adapter").merge_and_unload().eval()

    with warnings.catch_warnings():
        warnings.simplefilter("error", FutureWarning)
        code, out, _ = run([model_dir, *paths, "--adapter", str(tmp_path / "adapter")], capsys)
    assert code == 0
    merged.save_pretrained(tmp_path / "merged")
    LoraCaptionerProcessor.from_pretrained(model_dir).save_pretrained(tmp_path / "merged")
    captions = [r["caption"] for r in jsonl(out)]
    assert captions == generate_captions(str(tmp_path / "merged"), paths)
    assert captions != generate_captions(model_dir, paths)  # the adapter did change the model


def test_the_console_script_runs_and_reports_its_exit_status(model_dir, tmp_path):
    image = write_image(tmp_path / "a.png", 0)
    script = Path(sys.executable).parent / "loracaptioner"
    result = subprocess.run(
        [str(script), "caption", model_dir, image, str(tmp_path / "missing.png"), "--format", "tsv"],
        capture_output=True, text=True, timeout=300, check=False,
        env={**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"},
    )
    assert result.returncode == 1, result.stderr
    header, captioned, failed = result.stdout.splitlines()
    assert header == "path\tcaption\terror"
    assert captioned.startswith(f"{image}\t") and failed.startswith(f"{tmp_path / 'missing.png'}\t\t")
    assert "captioning: 100%" in result.stderr and "2/2" in result.stderr  # the progress bar


def test_out_of_memory_stops_the_run_in_one_line_keeping_the_records_written_and_a_rerun_resumes(
        model_dir, tmp_path, capsys, monkeypatch):
    paths = [write_image(tmp_path / f"{i}.png", i) for i in range(5)]
    output = tmp_path / "captions.jsonl"
    args = [model_dir, *paths, "--output", str(output), "--batch-size", "2", "--num-workers", "1"]
    generate = LoraCaptionerForConditionalGeneration.generate
    monkeypatch.setattr(LoraCaptionerForConditionalGeneration, "generate", out_of_memory_on_call(2))
    code, _, err = run(args, capsys)
    assert code == 1 and "Traceback" not in err
    assert err.splitlines()[-1] == (
        "loracaptioner: error: stopped by OutOfMemoryError: CUDA out of memory (pretend); the records written so far "
        f"are kept in {output}, and rerunning the same command captions only the rest")
    first = jsonl(output.read_text())
    assert [r["path"] for r in first] == paths[:2] and all("caption" in r for r in first)  # no error records

    monkeypatch.setattr(LoraCaptionerForConditionalGeneration, "generate", generate)
    code, _, err = run(args, capsys)
    assert code == 0 and "2 inputs already captioned" in err
    records = jsonl(output.read_text())
    assert records[:2] == first and [r["path"] for r in records] == paths
    assert [r["caption"] for r in records] == generate_captions(model_dir, paths)


def test_an_image_the_processor_rejects_is_one_error_record_and_its_batch_is_captioned(model_dir, tmp_path, capsys,
                                                                                       monkeypatch):
    paths = [write_image(tmp_path / f"{i}.png", i) for i in range(3)]
    odd = write_image(tmp_path / "odd.png", 3, size=(31, 17))
    process = LoraCaptionerProcessor.__call__

    def refuse_31_by_17(self, images=None, **options):
        if any(image.size == (31, 17) for image in images):
            raise ValueError("image 1: pretend the processor cannot take this one")
        return process(self, images=images, **options)

    monkeypatch.setattr(LoraCaptionerProcessor, "__call__", refuse_31_by_17)
    code, out, err = run([model_dir, paths[0], odd, *paths[1:], "--batch-size", "4"], capsys)
    assert code == 1 and "1 of 4 inputs failed" in err
    records = {r["path"]: r for r in jsonl(out)}
    assert records[odd]["error"] == f"{odd}: ValueError: image 1: pretend the processor cannot take this one"
    monkeypatch.setattr(LoraCaptionerProcessor, "__call__", process)
    assert [records[p]["caption"] for p in paths] == generate_captions(model_dir, paths)


@pytest.mark.parametrize("max_shard_size", [None, "200KB"])
def test_the_lean_bfloat16_load_equals_from_pretrained_in_bfloat16(model_dir, tmp_path, max_shard_size):
    """`--dtype bfloat16` reads a float32 checkpoint one tensor at a time (no float32 copy held while loading): the
    model must be exactly what `from_pretrained(folder, dtype=torch.bfloat16)` gives, sharded checkpoints too."""
    folder = model_dir
    if max_shard_size is not None:
        folder = str(tmp_path / "sharded")
        LoraCaptionerForConditionalGeneration.from_pretrained(model_dir).save_pretrained(
            folder, max_shard_size=max_shard_size)
        assert (Path(folder) / "model.safetensors.index.json").is_file()
    reference = LoraCaptionerForConditionalGeneration.from_pretrained(folder, dtype=torch.bfloat16).eval()
    lean = loading.from_pretrained_lean(folder, torch.bfloat16).eval()
    expected, got = reference.state_dict(), lean.state_dict()
    assert got.keys() == expected.keys()
    assert all(got[name].dtype == torch.bfloat16 and torch.equal(got[name], expected[name]) for name in expected)
    assert lean.generation_config.to_dict() == reference.generation_config.to_dict()
    assert lean.config.to_dict() == reference.config.to_dict()
    assert [p.requires_grad for p in lean.parameters()] == [p.requires_grad for p in reference.parameters()]
    pixel_values = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0)).to(torch.bfloat16)
    with torch.inference_mode():
        assert torch.equal(lean.generate(pixel_values=pixel_values), reference.generate(pixel_values=pixel_values))
