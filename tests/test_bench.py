"""bench/bench.py as the issue's readers rely on it: one run writes its own markdown (the machine, every workload's
rows, the targets computed from them); rows are timed interleaved after a warm-up; ratios within 5% read "parity";
bench/gpu.sh passes the bench flags it accepts. Tiny shapes, one thread: seconds. No timing is asserted."""

import importlib.util
import json
import re
import shlex
import subprocess
import time

import pytest
import torch
from conftest import REPO

from loracaptioner import LoraCaptionerForConditionalGeneration

# bench/bench.py is a script, not a package module: load it by path under a name of its own.
_spec = importlib.util.spec_from_file_location("loracaptioner_bench", REPO / "bench" / "bench.py")
bench = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(bench)


def table_rows(text: str, first_cell: str) -> list[list[str]]:
    return [[cell.strip() for cell in line.strip("|").split("|")] for line in text.splitlines()
            if line.startswith(f"| {first_cell} |")]


@pytest.fixture(scope="module")
def demo_like_data(model_dir, images, tmp_path_factory) -> str:
    """An imagefolder (metadata.jsonl + image files), as the demo's splits are."""
    folder = tmp_path_factory.mktemp("imagefolder")
    with open(folder / "metadata.jsonl", "w") as metadata:
        for index, image in enumerate(images):
            image.convert("RGB").save(folder / f"{index}.png")
            metadata.write(json.dumps({"file_name": f"{index}.png", "caption": "a red circle"}) + "\n")
    return str(folder)


@pytest.fixture(scope="module")
def tiny_run(model_dir, demo_like_data, tmp_path_factory):
    out = tmp_path_factory.mktemp("bench") / "results.md"
    text = bench.main(["--tiny", "--quick", "--skip", "F,export", "--markdown", str(out), "--quality-model", model_dir,
                       "--quality-data", demo_like_data])
    return text, out


def test_the_markdown_is_the_runs_own_output_and_names_its_command(tiny_run):
    text, out = tiny_run
    assert out.read_text() == text
    assert "python bench/bench.py --tiny --quick --skip F,export --markdown" in text


def test_the_run_names_the_machine_and_its_isa(tiny_run):
    text, _ = tiny_run
    for expected in ("| cpu |", "| ISA flags (lscpu) |", "avx512_bf16", "amx_bf16", "| torch cpu capability |",
                     torch.backends.cpu.get_cpu_capability(), "| threads | 1 |", "load average at start",
                     "load average at end", "GFLOP/s: bf16"):
        assert expected in text


def test_every_workload_has_naive_and_shipped_rows_and_peers_get_the_same_treatments(tiny_run):
    text, _ = tiny_run
    for workload in ("A", "B", "C"):
        rows = table_rows(text, workload)
        assert ["naive original (i)", "fp32"] in [row[1:3] for row in rows]
        assert ["LoraCaptioner", "fp32 (default)"] in [row[1:3] for row in rows]
    a_rows = table_rows(text, "A")
    ours = [row[2] for row in a_rows if row[1] == "LoraCaptioner" and "decoding defaults" not in row[2]]
    peer_treatments = {bench.treatment_of(label) for label in ours if label.endswith(
        tuple(f"({flag})" for flag in bench.PEER_FLAGS))}
    for peer in ("BLIP-base (384 px)", "GIT-base", "ViT + GPT-2"):
        assert {row[2] for row in a_rows if row[1] == peer} == peer_treatments
    defaults = [row for row in a_rows if "shipped decoding defaults" in row[2]]
    assert {row[1] for row in defaults} == {"LoraCaptioner", "naive original (i)"}


def test_every_ratio_is_between_rows_of_the_run_and_the_naive_row_is_parity_with_itself(tiny_run):
    text, _ = tiny_run
    for workload in ("A", "B", "C"):
        naive = next(row for row in table_rows(text, workload) if row[1:3] == ["naive original (i)", "fp32"])
        assert naive[6] == "parity (1.00×)"


def test_training_quality_epochs_and_targets_are_reported(tiny_run):
    text, _ = tiny_run
    assert "## D: LoRA training step" in text
    assert table_rows(text, "naive original (i)") and table_rows(text, "LoraCaptioner")
    assert "## E: vision-feature cache across epochs" in text
    assert "Top-1 next token under teacher forcing vs fp32" in text
    other_paths = [row for row in table_rows(text, "A") if row[1] == "LoraCaptioner"
                   and not row[2].startswith(("fp32", "OpenVINO"))]  # bf16 where it is fast, int8 with torchao
    if other_paths:
        assert table_rows(text, "path") and "top-1 agreement" in text
    else:
        assert "no torch path here computes in other than fp32 (`--dtype auto` picked fp32" in text
    assert re.search(r"How close fp32's own calls are on these inputs: at \d+\.\d% of the positions .* "
                     r"agrees \d+\.\d\d%", text)
    assert "Identical greedy captions vs fp32" in text
    targets = text.split("## Targets")[1]
    for target in ("A: fastest shipped path ≥ 3× naive fp32", "B: batch-1 latency ≤ 0.4× naive",
                   "C: beam 4 ≥ 3×", "D: LoRA training step ≥ naive"):
        assert target in targets
    assert re.search(r"wall time \d+ s \(machine \d+ s, loading \d+ s, A \d+ s", text)


@pytest.mark.skipif(importlib.util.find_spec("torchao") is not None, reason="torchao is installed")
def test_without_torchao_the_int8_paths_say_so(tiny_run):
    text, _ = tiny_run
    assert "| --quantize int8 | – | torchao not installed |" in text


def test_the_lm_head_int8_bound_rounds_each_row_to_its_own_int8_grid():
    weight = torch.randn(6, 40) * torch.tensor([0.01, 0.1, 1.0, 10.0, 100.0, 1e-30])[:, None]
    weight[:, 0] = weight.abs().amax(dim=1) * 1.5  # each row's largest magnitude, positive
    rounded = bench.int8_rows(weight)
    step = weight[:, :1] / 127
    assert (rounded - weight).abs().le(step / 2 * (1 + 1e-5)).all()  # within half a step of its row's grid
    assert torch.allclose(rounded[:, 0], weight[:, 0])  # the largest magnitude is on the grid
    assert torch.equal(bench.int8_rows(rounded), rounded)  # weights on the grid stay put
    assert ((rounded / step).round() - rounded / step).abs().max() < 1e-3  # 255 levels at most per row
    assert torch.equal(bench.int8_rows(torch.zeros(2, 3)), torch.zeros(2, 3))


def test_ratios_within_five_percent_are_parity():
    assert bench.ratio(1.0) == "parity (1.00×)"
    assert bench.ratio(1.04) == "parity (1.04×)"
    assert bench.ratio(0.96) == "parity (0.96×)"
    assert bench.ratio(1.06) == "1.06×"
    assert bench.ratio(0.91) == "0.91×"


def test_rows_are_warmed_up_then_timed_in_rounds_in_rotated_order():
    order = []
    calls = {name: (lambda name=name: order.append(name)) for name in "xyz"}
    times = bench.interleaved(calls, repeats=3, device="cpu")
    assert order == list("xyz") + list("xyz") + list("yzx") + list("zxy")
    assert {name: len(seconds) for name, seconds in times.items()} == {"x": 3, "y": 3, "z": 3}


def test_targets_are_computed_from_the_rows():
    rows = [bench.Row("A", bench.NAIVE, "fp32", 8, [4.0]),
            bench.Row("A", bench.OURS, "fp32 (default)", 8, [3.9]),
            bench.Row("A", bench.OURS, "bf16 (--dtype auto)", 8, [1.0]),
            bench.Row("A", "GIT-base", "fp32", 8, [3.0]),
            bench.Row("A", "GIT-base", "bf16", 8, [1.2]),
            bench.Row("B", bench.NAIVE, "fp32", 1, [1.0]),
            bench.Row("B", bench.OURS, "bf16 (--dtype auto)", 1, [0.5])]
    shipped = ["fp32 (default)", "bf16 (--dtype auto)"]
    table = {row[0]: row[1:] for row in bench.targets(rows, shipped, {"naive fp32": 7.0, "ours fp32": 7.2}, None,
                                                      {}, {"top1": {"bf16 (--dtype auto)": 0.995}})}
    assert table["A: fastest shipped path ≥ 3× naive fp32 (stretch 5×)"] == ["bf16 (--dtype auto): 4.00×",
                                                                              "**met**"]
    assert table["A: ≥ 2× the fastest peer at fp32"] == ["bf16 (--dtype auto) vs GIT-base fp32: 3.00×", "**met**"]
    assert table["A: ≥ 1.3× the fastest peer with the same treatment"] == [
        "bf16 (--dtype auto) vs GIT-base bf16: 1.20×", "**not met**"]
    assert table["B: batch-1 latency ≤ 0.4× naive"] == ["bf16 (--dtype auto): 0.50× naive's latency", "**not met**"]
    assert table["D: LoRA training step ≥ naive (no regression; parity counts)"] == ["fp32: parity (0.97×)",
                                                                                     "**met**"]
    assert table["E: later cached epochs ≤ 1/3 of the first"] == ["–", "not measured"]
    assert table["quality: ≥ 99% top-1 agreement vs fp32 (bf16 (--dtype auto))"] == ["99.50%", "**met**"]


def test_each_export_is_compared_with_the_peers_exported_the_same_way():
    """Each of LoraCaptioner's export rows meets the peers' rows of the same export ("OpenVINO
    (transformers.exporters)", "ONNX Runtime int8 (transformers.exporters)") in the like-for-like table and target,
    never their torch rows nor the other export's."""
    onnx_int8 = "ONNX Runtime int8 (loracaptioner.export)"
    assert bench.peer_export_label(bench.EXPORTED) == "OpenVINO (transformers.exporters)"
    assert bench.peer_export_label(onnx_int8) == "ONNX Runtime int8 (transformers.exporters)"
    rows = [bench.Row("A", bench.NAIVE, "fp32", 8, [4.0]),
            bench.Row("A", bench.OURS, "fp32 (default)", 8, [3.9]),
            bench.Row("A", bench.OURS, bench.EXPORTED, 8, [2.0]),
            bench.Row("A", bench.OURS, onnx_int8, 8, [1.6]),
            bench.Row("A", "GIT-base", "fp32", 8, [3.0]),
            bench.Row("A", "GIT-base", bench.peer_export_label(bench.EXPORTED), 8, [2.8]),
            bench.Row("A", "ViT + GPT-2", bench.peer_export_label(bench.EXPORTED), 8, [3.2]),
            bench.Row("A", "GIT-base", bench.peer_export_label(onnx_int8), 8, [1.9]),
            bench.Row("A", "ViT + GPT-2", bench.peer_export_label(onnx_int8), 8, [1.7])]
    shipped = ["fp32 (default)", bench.EXPORTED, onnx_int8]
    table = {row[0]: row[1:] for row in bench.targets(rows, shipped, {}, None, {}, {})}
    assert table["A: ≥ 1.3× the fastest peer with the same treatment"] == [
        f"{onnx_int8} vs ViT + GPT-2 ONNX Runtime int8: 1.06×", "**not met**"]
    comparisons = bench.peer_comparisons(rows, ["fp32"] + [bench.treatment_of(label) for label in bench.EXPORTS])
    assert comparisons == [["fp32", "2.05", "GIT-base 2.67", "0.77×"], ["OpenVINO", "4.00", "GIT-base 2.86", "1.40×"],
                           ["ONNX Runtime int8", "5.00", "ViT + GPT-2 4.71", "1.06×"]]


def test_when_the_fastest_path_has_no_peer_with_its_treatment_the_fastest_that_has_one_is_compared_too():
    onnx_int8 = "ONNX Runtime int8 (loracaptioner.export)"
    assert onnx_int8 in bench.EXPORTS
    rows = [bench.Row("A", bench.NAIVE, "fp32", 8, [4.0]),
            bench.Row("A", bench.OURS, "fp32 (default)", 8, [3.9]),
            bench.Row("A", bench.OURS, bench.EXPORTED, 8, [2.0]),
            bench.Row("A", bench.OURS, onnx_int8, 8, [1.5]),
            bench.Row("A", "GIT-base", "fp32", 8, [3.0]),
            bench.Row("A", "GIT-base", bench.peer_export_label(bench.EXPORTED), 8, [2.8])]
    shipped = ["fp32 (default)", bench.EXPORTED, onnx_int8]
    like_for_like = [row[1:] for row in bench.targets(rows, shipped, {}, None, {}, {})
                     if row[0] == "A: ≥ 1.3× the fastest peer with the same treatment"]
    assert like_for_like == [[f"{onnx_int8}: no peer row with this treatment", "not measured"],
                             [f"{bench.EXPORTED} vs GIT-base OpenVINO: 1.40×", "**met**"]]
    table = {row[0]: row[1:] for row in bench.targets(rows, shipped, {}, None, {}, {})}
    assert table["A: fastest shipped path ≥ 3× naive fp32 (stretch 5×)"] == [f"{onnx_int8}: 2.67×", "**not met**"]


def test_an_export_is_teacher_forced_one_cached_step_per_token_as_generate_runs_it(model_dir):
    """The top-1 guard on an export (no parameters: its graphs take one token per call) gives the torch model's own
    top-1 tokens when the export computes what the torch model does."""
    model = LoraCaptionerForConditionalGeneration.from_pretrained(model_dir).eval()

    class StepByStep(torch.nn.Module):  # the torch model behind ExportedCaptioner's calling convention
        dtype = torch.float32

        def get_encoder(self):
            return model.get_encoder()

        def forward(self, decoder_input_ids, encoder_outputs, cache, use_cache):
            return model(decoder_input_ids=decoder_input_ids, encoder_outputs=encoder_outputs, cache=cache,
                         use_cache=use_cache)

    vocab = model.config.text_config.vocab_size
    shares = bench.next_token_agreement({"step by step": StepByStep()}, model, vocab, "cpu", images=4, tokens=6)
    assert shares == {"step by step": 1.0}
    px, ids = bench.guard_inputs(model, vocab, images=4, tokens=6)
    stepwise = bench.stepwise_top1(StepByStep(), px, ids)
    assert stepwise.shape == ids.shape and len(set(stepwise.flatten().tolist())) > 1  # not one token everywhere


def test_peak_memory_is_measured_in_a_fresh_process():
    args = bench.parse_args(["--tiny", "--batch", "2", "--tokens", "3"])
    result = bench.measure_memory({"model": bench.NAIVE}, args)
    assert 0 < result["interpreter_bytes"] <= result["load_bytes"]
    assert result["run_bytes"] > 0


def test_cli_refuses_unknown_parts_and_a_missing_gpu():
    with pytest.raises(SystemExit):
        bench.parse_args(["--skip", "A,Z"])
    if not torch.cuda.is_available():
        with pytest.raises(SystemExit):
            bench.parse_args(["--device", "cuda"])


def test_gpu_script_runs_the_bench_with_flags_it_accepts(tmp_path):
    """bench/gpu.sh --dry-run prints its commands; its bench command, moved to the CPU with tiny shapes, runs."""
    dry = subprocess.run(["bash", str(REPO / "bench" / "gpu.sh"), "--dry-run", "--quick"], capture_output=True,
                         text=True, check=True, cwd=REPO).stdout
    command = shlex.split(dry.strip().splitlines()[-1].removeprefix("+ "))
    assert command[:2] == ["timeout", "480"] and command[3] == "bench/bench.py"
    argv = command[4:]
    assert argv[argv.index("--device") + 1] == "cuda" and argv[argv.index("--markdown") + 1] == "bench/results-gpu.md"
    assert {"--compile", "--train-autocast", "--quick"} <= set(argv)
    assert set(argv[argv.index("--skip") + 1].split(",")) == {"E", "F", "quality"}  # A, B, C, D run
    argv[argv.index("--device") + 1] = "cpu"
    argv[argv.index("--markdown") + 1] = str(tmp_path / "results-gpu.md")
    argv.remove("--compile")  # compiling on a CPU takes minutes; bench.compile_rows is what runs on the GPU
    text = bench.main(argv + ["--tiny", "--skip", "E,F,quality,peers,export"])
    assert ["naive original (i)", "bf16 autocast"] in [row[:2] for row in table_rows(text, "naive original (i)")]
    assert ["LoraCaptioner", "bf16 autocast"] in [row[:2] for row in table_rows(text, "LoraCaptioner")]
    assert (tmp_path / "results-gpu.md").read_text() == text


def test_a_row_far_slower_than_the_fastest_is_timed_once_and_said_so():
    order = []

    def call(name, seconds):
        order.append(name)
        time.sleep(seconds)

    calls = {"fast": lambda: call("fast", 0.01), "slow": lambda: call("slow", 0.01 * (bench.SLOW_FACTOR + 3))}
    slow = set()
    times = bench.interleaved(calls, repeats=2, device="cpu", slow=slow)
    assert slow == {"slow"} and order == ["fast", "slow", "fast", "fast"]
    assert len(times["slow"]) == 1 and times["slow"][0] > bench.SLOW_FACTOR * min(times["fast"])
    assert len(times["fast"]) == 2
