"""loracaptioner.export: an OpenVINO or ONNX Runtime export of a tiny saved LoraCaptioner captions exactly as the torch
model does.

Neither runtime is a dependency of the package's environment: the test installs the measured versions once into
`<repo>/.cache/export-runtimes/` (gitignored, pip, from the package index) and runs the export in a subprocess with
them on the path, so the shared environment never imports them. No package index: the test skips, saying so.
"""

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from loracaptioner.export import export

REPO = Path(__file__).resolve().parents[1]
OPENVINO = "openvino==2026.4.1"  # the version bench/export_candidates.md measured
RUNTIMES = REPO / ".cache" / "export-runtimes" / OPENVINO.replace("==", "-")
# ONNX Runtime and what the ONNX exporter needs, the versions bench/export_candidates.md measured
ONNX = ["onnxruntime==1.32.0", "onnx==1.23.2", "onnxscript==0.7.2", "onnx_ir==1.1.0", "ml_dtypes==0.7.0",
        "protobuf==7.36.2", "flatbuffers==25.12.19"]
ONNX_RUNTIMES = REPO / ".cache" / "export-runtimes" / ONNX[0].replace("==", "-")
# backend -> (folder, packages, the module whose folder says they are there)
RUNTIME_PACKAGES = {"openvino": (RUNTIMES, [OPENVINO, "openvino-telemetry"], "openvino"),
                    "onnx": (ONNX_RUNTIMES, ONNX, "onnxruntime")}


def installed(folder: Path, packages: list[str], module: str) -> Path:
    """`packages` pip-installed into `folder` once (or the test skips, saying why not)."""
    if not (folder / module).is_dir():
        # --no-deps: numpy and packaging come from the test's own environment, the one the subprocess runs in.
        command = [sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", str(folder), *packages]
        result = subprocess.run(command, capture_output=True, text=True, timeout=600,
                                env={**os.environ, "PIP_DISABLE_PIP_VERSION_CHECK": "1"})
        if result.returncode != 0:
            pytest.skip(f"could not install {packages} from the package index:\n{result.stderr[-1000:]}")
    return folder


@pytest.fixture(scope="module")
def openvino_path() -> Path:
    return installed(*RUNTIME_PACKAGES["openvino"])


def run_script(runtimes: Path, script: str, *args: str, timeout: int = 300) -> tuple:
    """`script` in a fresh interpreter with the runtimes in `runtimes` and the checkout on its path (it must exit 0):
    what it printed last, as JSON, and its stderr."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(runtimes), str(REPO)])}
    result = subprocess.run([sys.executable, "-c", script, *args], cwd=REPO, env=env, capture_output=True, text=True,
                            timeout=timeout)
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(result.stdout.strip().splitlines()[-1]), result.stderr


# The preamble of the scripts that build a tiny random LoraCaptioner (`model`, `config`), seeded, one thread.
TINY_MODEL = textwrap.dedent("""
    import copy, json, sys
    import torch
    sys.path.insert(0, "tests")
    from conftest import tiny_text_config, tiny_vision_config
    from loracaptioner import LoraCaptionerConfig, LoraCaptionerForConditionalGeneration

    torch.manual_seed(0)
    torch.set_num_threads(1)
    config = LoraCaptionerConfig(vision_config=tiny_vision_config(), text_config=tiny_text_config(99))
    model = LoraCaptionerForConditionalGeneration(config).eval()
""")


CAPTION_THROUGH_EXPORT = TINY_MODEL + textwrap.dedent("""
    from loracaptioner.export import ExportedCaptioner, export

    model.save_pretrained(sys.argv[1] + "/model")
    backend = sys.argv[2]
    export(sys.argv[1] + "/model", sys.argv[1] + "/exported", backend=backend)
    captioner = ExportedCaptioner.from_pretrained(sys.argv[1] + "/exported",
                                                  precision="fp32" if backend == "openvino" else None)
    pixel_values = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    settings = {"defaults": {}, "greedy": {"num_beams": 1, "max_new_tokens": 12},
                "beam 3, 2 returned": {"num_beams": 3, "num_return_sequences": 2, "max_new_tokens": 12}}
    results = {}
    for name, kwargs in settings.items():
        expected = model.generate(pixel_values=pixel_values, **kwargs)
        got = captioner.generate(pixel_values=pixel_values, **kwargs)
        results[name] = {"expected": expected.tolist(), "got": got.tolist()}
    beams = captioner.generate(pixel_values=pixel_values, num_beams=3, max_new_tokens=4, return_dict_in_generate=True)
    cache = getattr(beams, "cache", None) or beams.past_key_values
    cross_attention_rows = cache.cross_attention_cache.layers[0].keys.shape[0]
    op_types = {}
    if backend == "onnx":
        import onnx

        for graph in ("image_encoder", "cross_attention", "decode"):
            proto = onnx.load(f"{sys.argv[1]}/exported/{graph}.onnx", load_external_data=False)
            op_types[graph] = sorted({node.op_type for node in proto.graph.node})
    print(json.dumps({"captions": results, "cross_attention_rows": cross_attention_rows, "op_types": op_types}))
""")


@pytest.mark.parametrize("backend", ["openvino", "onnx"])
def test_export_captions_like_the_torch_model_greedy_and_beam(backend, tmp_path):
    """float32 ids equal the torch model's (its saved defaults, greedy, beam search returning 2 of 3 beams); beam
    search holds the cross-attention cache once per image, as the torch model does; three graphs, no first-step graph
    (the decode graph takes the first step). ONNX: the graphs run ONNX Runtime's fused CPU ops (the faster fp32 export,
    still exact)."""
    results, _ = run_script(installed(*RUNTIME_PACKAGES[backend]), CAPTION_THROUGH_EXPORT, str(tmp_path), backend)
    for name, ids in results["captions"].items():
        assert ids["got"] == ids["expected"], name
    assert results["cross_attention_rows"] == 3  # once per image, not per beam, as in the torch model
    saved = {path.name for path in (tmp_path / "exported").iterdir()}
    assert {"export.json", "loracaptioner_export.json", "config.json", "generation_config.json"} <= saved
    graphs = {name.split(".")[0].removeprefix("openvino_") for name in saved if name.endswith((".xml", ".onnx"))}
    assert graphs == {"image_encoder", "cross_attention", "decode"}
    if backend == "onnx":
        ops = results["op_types"]
        assert {"Attention", "SkipLayerNormalization"} <= set(ops["image_encoder"]), ops["image_encoder"]
        assert "SkipSimplifiedLayerNormalization" in ops["decode"], ops["decode"]


PEERS_THROUGH_EXPORT = textwrap.dedent("""
    import json, sys
    from pathlib import Path
    import torch
    sys.path.insert(0, "bench")
    import bench, exported_peers

    torch.manual_seed(0)
    torch.set_num_threads(1)
    out, backend, quantize = sys.argv[1], sys.argv[2], sys.argv[3] or None
    results, quantized = {}, {}
    for name, peer in bench.build_peers(bench.shapes(tiny=True)).items():
        if name not in exported_peers.EXPORTABLE:
            continue
        folder = f"{out}/{name.replace(' ', '_')}"
        peer.eval().save_pretrained(folder)
        flags = ["--backend", backend] + (["--quantize", quantize] if quantize else [])
        exported_peers.main([folder, folder + "-export", *flags])
        runner = exported_peers.ExportedPeer.from_pretrained(folder + "-export", **bench.runner_options(backend))
        if backend == "onnx":  # which graphs compute their matrix products in int8
            import onnx

            quantized[name] = {str(graph.relative_to(folder + "-export")): any(
                node.op_type == "MatMulInteger" for node in onnx.load(graph, load_external_data=False).graph.node)
                for graph in Path(folder + "-export").rglob("*.onnx")}
        pixel_values = bench.pixels(peer, 3, "cpu", seed=1)  # batch 3: the graphs were traced at batch 2
        for beams in (1, 2):
            expected = bench.caption_call(peer, pixel_values, 10, beams)
            got = bench.caption_call(runner, pixel_values, 10, beams)
            results[f"{name}, {beams} beam(s)"] = {"expected": expected.tolist(), "got": got.tolist()}
    print(json.dumps({"captions": results, "quantized": quantized}))
""")


@pytest.mark.parametrize("backend,quantize", [("openvino", None), ("onnx", "int8")])
def test_the_benchs_exported_peers_caption_like_the_torch_peers(backend, quantize, tmp_path):
    """bench/exported_peers.py, the like-for-like rows' peers (GIT-base, ViT + GPT-2, tiny shapes), given each
    treatment LoraCaptioner's exports get: exported through transformers.exporters' `export_for_generation` and run
    behind `generate()`, greedy and beam search, 10 tokens past the first step (the decode graph runs on a growing
    cache). OpenVINO: their ids equal the torch peers'. ONNX Runtime int8: every graph, the ViT encoder's too, is
    quantized, and at least 90% of the ids agree (on these seeds all do; a graph run for the wrong step agrees far
    less)."""
    runtimes = installed(*RUNTIME_PACKAGES[backend])
    results, _ = run_script(runtimes, PEERS_THROUGH_EXPORT, str(tmp_path), backend, quantize or "", timeout=600)
    captions = results["captions"]
    assert set(captions) == {f"{name}, {beams} beam(s)" for name in ("GIT-base", "ViT + GPT-2") for beams in (1, 2)}
    for name, ids in captions.items():
        assert len(ids["got"][0]) == 11, name
        if quantize is None:
            assert ids["got"] == ids["expected"], name
        else:
            got, expected = torch.tensor(ids["got"]), torch.tensor(ids["expected"])
            assert (got == expected).float().mean() >= 0.9, name
    if quantize:
        assert results["quantized"] == {
            "GIT-base": {"prefill.onnx": True, "decode.onnx": True},
            "ViT + GPT-2": {"prefill.onnx": True, "decode.onnx": True, "vision_encoder/model.onnx": True}}


LEGACY_EXPORT = TINY_MODEL + textwrap.dedent("""
    from transformers.exporters import ExportedModel, OpenVINOConfig, OpenVINOExporter
    from loracaptioner.export import ExportedCaptioner, _empty_cache, _graphs

    pixel_values = torch.zeros(2, 3, 32, 32)
    graphs = _graphs(model, pixel_values)
    with torch.no_grad():
        image_tokens = model.encoder(pixel_values=pixel_values)
    start = torch.full((4, 1), config.decoder_start_token_id)
    # What an export written before the cross_attention graph holds: the first step in a graph of its own (the whole
    # model on an empty cache), and no loracaptioner_export.json (the image tokens are then repeated per beam).
    graphs = {"image_encoder": graphs["image_encoder"], "decode": graphs["decode"],
              "prefill": (model, dict(decoder_input_ids=start, encoder_outputs=image_tokens,
                                      cache=_empty_cache(config), use_cache=True))}
    exporter, export_config = OpenVINOExporter(), OpenVINOConfig(dynamic=True, stateful=False)
    components = {name: exporter.export(module, copy.deepcopy(inputs), export_config).components["model"]
                  for name, (module, inputs) in graphs.items()}
    ExportedModel(components, exporter.export_format, config=config,
                  generation_config=model.generation_config).save_pretrained(sys.argv[1])
    captioner = ExportedCaptioner.from_pretrained(sys.argv[1], precision="fp32")
    pixel_values = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    results = {}
    for name, beams in (("greedy", 1), ("beam 3", 3)):
        results[name] = {
            "expected": model.generate(pixel_values=pixel_values, num_beams=beams, max_new_tokens=12).tolist(),
            "got": captioner.generate(pixel_values=pixel_values, num_beams=beams, max_new_tokens=12).tolist()}
    print(json.dumps(results))
""")


def test_an_export_in_the_earlier_layout_still_captions_like_the_torch_model(openvino_path, tmp_path):
    """An export folder written before the cross_attention graph (its first step in a `prefill` graph, no
    loracaptioner_export.json) loads and captions with the torch model's ids, greedy and beam search:
    `ExportedCaptioner` keeps reading what earlier versions wrote. (The graphs are traced from today's model, whose
    cross-attention takes beams sharing an image or not, so this checks the prefill path, not the per-beam flag.)"""
    results, _ = run_script(openvino_path, LEGACY_EXPORT, str(tmp_path / "legacy"), timeout=600)
    for name, ids in results.items():
        assert ids["got"] == ids["expected"], name
    assert not (tmp_path / "legacy" / "loracaptioner_export.json").exists()


def test_export_names_the_backends_it_knows(tmp_path):
    with pytest.raises(ValueError, match="backend must be one of"):
        export(tmp_path, tmp_path / "out", backend="tensorrt")
    with pytest.raises(ValueError, match="quantize must be None or 'int8'"):
        export(tmp_path, tmp_path / "out", quantize="int4")


CLI_THROUGH_EXPORT = textwrap.dedent("""
    import json, sys
    from loracaptioner.cli import main

    model_dir, exported, images = sys.argv[1], sys.argv[2], sys.argv[3:]
    assert main(["export", model_dir, exported]) == 0
    captions = {}
    for name, folder, dtype in [("torch", model_dir, "float32"), ("export", exported, "float32"),
                                ("export auto", exported, "auto")]:
        output = f"{exported}/{name.replace(' ', '_')}.jsonl"
        assert main(["caption", folder, *images, "--dtype", dtype, "--output", output, "--quiet"]) == 0
        with open(output) as lines:
            captions[name] = {row["path"]: row["caption"] for row in map(json.loads, lines)}
    refused = main(["caption", exported, images[0], "--quantize", "int8", "--quiet"])
    print(json.dumps({"captions": captions, "refused": refused}))
""")


def test_the_cli_exports_and_captions_with_the_export_as_with_the_torch_model(openvino_path, model_dir, images,
                                                                              tmp_path):
    """`loracaptioner export MODEL OUT` then `loracaptioner caption OUT ...`: float32 captions equal the torch model's
    through the same command; --dtype auto (bfloat16 where measured faster) captions every image; a quantization asked
    of an export is refused with exit 2."""
    paths = []
    for number, image in enumerate(images):
        paths.append(str(tmp_path / f"{number}.png"))
        image.save(paths[-1])
    answer, stderr = run_script(openvino_path, CLI_THROUGH_EXPORT, model_dir, str(tmp_path / "exported"), *paths)
    captions = answer["captions"]
    assert captions["export"] == captions["torch"]
    assert len(captions["torch"]) == len(images) and all(captions["torch"].values())
    assert set(captions["export auto"]) == set(captions["torch"])
    assert answer["refused"] == 2
    assert "quantize when exporting" in stderr
