"""`loracaptioner caption MODEL INPUTS...`: caption files, folders, globs, URLs or a list on stdin, in batches, to
JSONL/CSV/TSV, one record per input. Undecodable inputs become error records and the run goes on; a re-run with the
same `--output` captions only what is still missing.

Webdataset tars, parquet files and `--dataset` (a Hub or local `datasets` dataset), and any run launched with several
processes (`torchrun`, `accelerate launch`), are captioned shard by shard, resumably, to `--output` (JSONL, CSV, TSV,
parquet or a `datasets` folder): see `bulk.py`. `loracaptioner merge OUTPUT` joins such a run's parts again.

Exit status: 0 every input captioned; 1 some failed (see their `error`), or the run stopped (out of memory, a model
error: the records written so far stay, and rerunning the same command captions only the rest); 2 usage error (bad
option, model that does not load, no inputs).

The model loads with this package's own classes, so no code from a Hub repo runs (no `trust_remote_code`).
"""

from __future__ import annotations

import argparse
import sys

from .captioning import RunStopped, UsageError
from .quantization import QUANTIZATIONS
from .records import FORMATS


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="loracaptioner", description="Caption images with a LoraCaptioner model.")
    commands = parser.add_subparsers(dest="command", required=True)
    caption = commands.add_parser(
        "caption",
        help="caption images",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    caption.add_argument("model", help="LoraCaptioner folder or Hub id (the base model when --adapter is given)")
    caption.add_argument(
        "inputs", nargs="*",
        help="image files, folders (searched recursively), globs ('photos/**/*.jpg'), http(s) URLs, or - to read "
             "one of those per line from stdin; webdataset .tar and .parquet files, globs and brace patterns of them "
             "('shards/{00000..00099}.tar') are captioned shard by shard",
    )
    caption.add_argument("--adapter", help="peft adapter folder (LoRA + bridge, as train_hf.py writes) to merge")
    caption.add_argument("--revision", help="Hub revision (branch, tag or commit sha) of MODEL")
    caption.add_argument("--output", "-o", help="file to write (default: stdout); a re-run skips what it captioned")
    caption.add_argument("--format", choices=FORMATS,
                         help="output format (default: from --output's suffix, else jsonl); parquet and datasets (a "
                              "folder that datasets.load_dataset loads) for runs over shards")
    caption.add_argument("--batch-size", type=int, default=8)
    caption.add_argument("--prompt", help="start of every caption, which the model continues (e.g. 'a photo of')")
    generation = caption.add_argument_group("generation (default: the model's generation_config.json)")
    generation.add_argument("--num-beams", type=int)
    generation.add_argument("--max-new-tokens", type=int)
    generation.add_argument("--do-sample", action="store_true", default=None, help="sample instead of greedy/beam")
    generation.add_argument("--temperature", type=float)
    generation.add_argument("--top-p", type=float)
    generation.add_argument("--seed", type=int, help="random seed (makes --do-sample repeatable)")
    generation.add_argument(
        "--no-repeat-ngram-size", type=int,
        help="no n-gram of this size twice in a caption (LoraCaptioner models save 3); 0 = off: plain greedy or beam "
             "decoding, as benchmarks and the original LoraCaptioner use",
    )
    generation.add_argument("--repetition-penalty", type=float,
                            help="penalise words already in the caption by this factor (1.0 = off)")
    generation.add_argument("--length-penalty", type=float,
                            help="beam search ranks captions by log-probability / length ** this (1.0, the default: "
                                 "per-word average; higher favours longer captions, lower shorter ones)")
    generation.add_argument("--min-new-tokens", type=int, help="no end of caption before this many tokens (0 = off)")
    hardware = caption.add_argument_group("hardware")
    hardware.add_argument("--device", default="auto", help="auto (cuda, then mps, then cpu), cpu, cuda, cuda:1, mps")
    hardware.add_argument(
        "--dtype", default="auto", choices=("auto", "float32", "bfloat16", "float16"),
        help="auto: bfloat16 on a GPU that supports it; on a CPU, bfloat16 where a short test of its matrix "
             "products (printed on stderr) finds them at least 1.2x as fast as float32's (AMX, some AVX-512 CPUs), "
             "else float32 (on AVX2 CPUs bfloat16 is ~100x slower)",
    )
    hardware.add_argument(
        "--quantize", default="none", choices=QUANTIZATIONS,
        help="int8: the image encoder's linear layers in int8 through torchao (pip install 'loracaptioner[int8]'), "
             "the rest in float32; CPU only. Faster than float32 where int8 products are fast (AVX-512 VNNI), slower "
             "than bfloat16 where --dtype auto picks that (see the README: which path on which hardware)",
    )
    hardware.add_argument("--num-workers", type=int, default=4,
                          help="threads that read, download and decode images; over shards, DataLoader worker "
                               "processes per process that also run the image processor")
    inputs = caption.add_argument_group("inputs")
    inputs.add_argument("--url-timeout", type=float, default=30.0, help="seconds allowed per URL download")
    inputs.add_argument("--max-url-bytes", type=int, default=50_000_000, help="largest download accepted per URL")
    scale = caption.add_argument_group(
        "at scale: webdataset, parquet, datasets; several processes (torchrun / accelerate launch); see loracaptioner/"
        "bulk.py")
    scale.add_argument("--dataset", help="Hub dataset id or local dataset folder to caption")
    scale.add_argument("--dataset-config", "--dataset_config", dest="dataset_config", help="the dataset's config")
    scale.add_argument("--split", default="train", help="the dataset split to caption (default: train)")
    scale.add_argument("--streaming", action="store_true", help="stream the dataset instead of downloading it first")
    scale.add_argument("--image-column", "--image_column", dest="image_column",
                       help="column of images (bytes, {bytes, path} or file paths) of a dataset or parquet files "
                            "(default: image, jpg, png, ... whichever exists)")
    scale.add_argument("--key-column", "--key_column", dest="key_column",
                       help="column that names a row in the output (default: __key__ or key, else the row index)")
    scale.add_argument("--shard-size", type=int, default=1000,
                       help="files, or rows of a non-streaming dataset, per shard (a tar or parquet file is one "
                            "shard, and so is each data file of a streaming dataset)")
    scale.add_argument("--push-to-hub", "--push_to_hub", dest="push_to_hub", metavar="REPO_ID",
                       help="upload the captions as a Hub dataset repo (parquet files + dataset card)")
    scale.add_argument("--hub-private", action="store_true", help="create that dataset repo private")
    caption.add_argument("--quiet", "-q", action="store_true", help="no progress bar")

    merge = commands.add_parser(
        "merge", help="join the per-shard parts of a caption run into its output",
        description="Join OUTPUT.parts/ (left by `loracaptioner caption ... --output OUTPUT` over shards) into OUTPUT, "
                    "in input order. Rank 0 does it at the end of a run; this does it again, in another format, or "
                    "after parts from several machines were copied together.")
    merge.add_argument("output", help="the --output of the caption run")
    merge.add_argument("--to", metavar="PATH", help="write there instead of OUTPUT (format from its suffix)")
    merge.add_argument("--format", choices=FORMATS,
                       help="default: from OUTPUT's suffix, else jsonl")
    merge.add_argument("--split", default="train", help="split name in a datasets folder (default: train)")
    merge.add_argument("--push-to-hub", "--push_to_hub", dest="push_to_hub", metavar="REPO_ID",
                       help="upload the captions as a Hub dataset repo")
    merge.add_argument("--hub-private", action="store_true", help="create that dataset repo private")

    exporting = commands.add_parser(
        "export", help="export a model to OpenVINO or ONNX Runtime; `loracaptioner caption OUTPUT ...` runs the export",
        description="Write MODEL (a LoraCaptioner folder or Hub id, adapter merged) as three graphs (image encoder, "
                    "cross-attention keys/values once per image, one decoder step on a KV cache) through "
                    "transformers.exporters, with its config, generation defaults and processor. "
                    "`loracaptioner caption OUTPUT IMAGES` runs it on the CPU: greedy, sampling and beam search "
                    "through generate(); --dtype auto runs OpenVINO in bfloat16 where bfloat16 is measured faster. "
                    "Needs `pip install openvino` (plus nncf for --quantize int8) or onnxruntime. Which path is "
                    "fastest on which CPU: the README's Speed section.")
    exporting.add_argument("model", help="LoraCaptioner folder or Hub id (float32 weights, no separate adapter)")
    exporting.add_argument("output", help="folder to write the export to")
    exporting.add_argument("--backend", default="openvino", choices=("openvino", "onnx"),
                           help="openvino (default: on AVX-512 the fastest path without int8, in bf16 there; "
                                "bench/export_candidates.md) or onnx (ONNX Runtime; fp32: on AVX2 the fastest "
                                "exact path, 1.1x OpenVINO fp32 on greedy, with 0.64x its peak memory; "
                                "bench/export_candidates-avx2.md)")
    exporting.add_argument("--quantize", default="none", choices=QUANTIZATIONS,
                           help="int8 (OpenVINO: NNCF int8 weights; ONNX: dynamic int8, the fastest path on AVX2: "
                                "1.8-2.1x torch fp32 on batch 8, 2.5-3.3x on batch 1, 0.55x the naive rebuild's "
                                "memory; bench/results-avx2.md). "
                                "Not exact: 86-92%% top-1 agreement with float32 on random weights; the ONNX int8 "
                                "export wrote 99.3%% of the demo model's captions as float32 does (bench/README.md)")

    convert = commands.add_parser(
        "convert-original", help="import the original LoraCaptioner's projection.pt and LoRA adapter",
        description="Write the original LoraCaptioner's projection.pt (its bridge) and peft LoRA adapter (for "
                    "Flan-T5) as a LoraCaptioner folder: merged and Hub-ready, with the adapter kept in "
                    "OUTPUT/adapter; or, with --no-merge, the base model in OUTPUT and the adapter beside it. See "
                    "loracaptioner/convert_original.py.")
    add_convert_arguments(convert)
    return parser


def add_convert_arguments(parser: argparse.ArgumentParser) -> None:
    """The options of `loracaptioner convert-original` (and of `python -m loracaptioner.convert_original`)."""
    from .remote_code.configuration_loracaptioner import DEFAULT_TEXT_MODEL, DEFAULT_VISION_MODEL

    parser.add_argument("--projection", required=True, help="the original's projection.pt (bridge state dict)")
    parser.add_argument("--adapter", required=True, help="the original's peft adapter folder (for Flan-T5)")
    parser.add_argument("--output", "-o", required=True, help="folder to write the LoraCaptioner into")
    parser.add_argument("--vision-model", "--vision_model", dest="vision_model", default=DEFAULT_VISION_MODEL,
                        help="the CLIP checkpoint it used")
    parser.add_argument("--text-model", "--text_model", dest="text_model", default=DEFAULT_TEXT_MODEL,
                        help="the T5 checkpoint its adapter is for")
    parser.add_argument("--no-merge", dest="merge", action="store_false",
                        help="keep LoRA apart: base model in --output, adapter in --output/adapter")


def caption(args: argparse.Namespace) -> int:
    from .bulk import caption_command, uses_shards
    from .captioning import caption_files

    if uses_shards(args):  # datasets, tar or parquet inputs or output, a push, or several processes
        return caption_command(args)
    return caption_files(args)


def convert_original(args: argparse.Namespace) -> int:
    from .convert_original import run

    try:
        return run(args)
    except (ValueError, OSError) as error:  # the inputs do not fit: nothing has been written
        raise UsageError(str(error).replace("\n", " ")) from None


def export_model(args: argparse.Namespace) -> int:
    try:
        from .export import INSTALL_HINTS, export
    except ImportError as error:
        raise UsageError(f"export needs transformers.exporters: {error}") from None
    try:
        folder = export(args.model, args.output, backend=args.backend,
                        quantize=None if args.quantize == "none" else args.quantize)
    except ImportError as error:  # openvino, nncf or onnxruntime missing
        raise UsageError(f"--backend {args.backend}: {error} ({INSTALL_HINTS[args.backend]})") from None
    except (ValueError, OSError) as error:  # not a LoraCaptioner, an unreadable folder
        raise UsageError(f"cannot export {args.model!r}: {str(error).splitlines()[0]}") from None
    print(f"loracaptioner: exported {args.model} to {folder} ({args.backend}); caption with: loracaptioner caption "
          f"{folder} IMAGES", file=sys.stderr)
    return 0


def merge(args: argparse.Namespace) -> int:
    from .bulk import merge_command

    return merge_command(args)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return {"caption": caption, "merge": merge, "convert-original": convert_original,
                "export": export_model}[args.command](args)
    except UsageError as error:
        print(f"loracaptioner: error: {error}", file=sys.stderr)
        return 2
    except RunStopped as error:
        print(f"loracaptioner: error: {error}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("loracaptioner: interrupted (records written so far are kept)", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
