"""`loracaptioner caption MODEL INPUTS...`: caption files, folders, globs, URLs or a list on stdin, in batches, to
JSONL/CSV/TSV, one record per input. Undecodable inputs become error records and the run goes on; a re-run with the
same `--output` captions only what is still missing.

Webdataset tars, parquet files and `--dataset` (a Hub or local `datasets` dataset), and any run launched with several
processes (`torchrun`, `accelerate launch`), are captioned shard by shard, resumably, to `--output` (JSONL, CSV, TSV,
parquet or a `datasets` folder): see `bulk.py`. `loracaptioner merge OUTPUT` joins such a run's parts again.

Exit status: 0 every input captioned, 1 some failed (see their `error`), 2 usage error (bad option, model that does
not load, no inputs).

The model loads with this package's own classes, so no code from a Hub repo runs (no `trust_remote_code`).
"""

from __future__ import annotations

import argparse
import csv
import glob
import json
import os
import sys
import time
import urllib.request
import warnings
from collections import deque
from collections.abc import Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch
from tqdm.auto import tqdm

IMAGE_EXTENSIONS = {
    ".jpg", ".jpeg", ".jfif", ".png", ".webp", ".gif", ".bmp", ".tif", ".tiff", ".ppm", ".pgm", ".pbm", ".pnm", ".tga",
    ".ico",
}
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
FIELDS = ("path", "caption", "error")


class UsageError(Exception):
    """A problem with the command line itself: reported in one line, exit status 2."""


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
    caption.add_argument("--format", choices=("jsonl", "csv", "tsv", "parquet", "datasets"),
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
        "--dtype", default="auto", choices=("auto", *DTYPES),
        help="auto: bfloat16 on a GPU that supports it, else float32. On a CPU, bfloat16 pays only with bf16 matrix "
             "units (Intel AMX); without them it can be many times slower than float32",
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
    merge.add_argument("--format", choices=("jsonl", "csv", "tsv", "parquet", "datasets"),
                       help="default: from OUTPUT's suffix, else jsonl")
    merge.add_argument("--split", default="train", help="split name in a datasets folder (default: train)")
    merge.add_argument("--push-to-hub", "--push_to_hub", dest="push_to_hub", metavar="REPO_ID",
                       help="upload the captions as a Hub dataset repo")
    merge.add_argument("--hub-private", action="store_true", help="create that dataset repo private")
    return parser


# ---------------------------------------------------------------------------------------------------------- inputs
def is_url(spec: str) -> bool:
    return spec.startswith(("http://", "https://"))


def _images_under(folder: Path) -> list[str]:
    return sorted(
        str(path) for path in folder.rglob("*") if path.suffix.lower() in IMAGE_EXTENSIONS and path.is_file()
    )


def expand_inputs(specs: Iterable[str], stdin: Iterable[str] = ()) -> list[str]:
    """Files (named ones kept whatever their suffix, missing ones too: they become error records), folders and globs
    (image suffixes only), URLs, and `-` for one such spec per stdin line; order kept, duplicates dropped."""
    found: list[str] = []
    for spec in specs:
        if spec == "-":
            found += expand_inputs([line.strip() for line in stdin if line.strip() and line.strip() != "-"])
        elif is_url(spec):
            found.append(spec)
        elif Path(spec).is_dir():
            matches = _images_under(Path(spec))
            if not matches:
                print(f"loracaptioner: warning: no images in folder {spec}", file=sys.stderr)
            found += matches
        elif glob.has_magic(spec) and not Path(spec).exists():
            matches = []
            for match in sorted(glob.glob(spec, recursive=True)):
                if Path(match).is_dir():
                    matches += _images_under(Path(match))
                elif Path(match).suffix.lower() in IMAGE_EXTENSIONS:
                    matches.append(match)
            if not matches:
                print(f"loracaptioner: warning: no images match {spec}", file=sys.stderr)
            found += matches
        else:
            found.append(spec)
    return list(dict.fromkeys(found))


def download(url: str, timeout: float, max_bytes: int) -> bytes:
    """The body of `url`, read within `timeout` seconds in all and no longer than `max_bytes`."""
    request = urllib.request.Request(url, headers={"User-Agent": "loracaptioner"})
    deadline = time.monotonic() + timeout
    with urllib.request.urlopen(request, timeout=timeout) as response:
        length = response.headers.get("Content-Length")
        if length and length.isdigit() and int(length) > max_bytes:
            raise ValueError(f"{url}: {length} bytes is more than --max-url-bytes ({max_bytes})")
        body = bytearray()
        while chunk := response.read(1 << 16):
            body += chunk
            if len(body) > max_bytes:
                raise ValueError(f"{url}: more than --max-url-bytes ({max_bytes}) bytes")
            if time.monotonic() > deadline:
                raise ValueError(f"{url}: download took longer than --url-timeout ({timeout} s)")
    return bytes(body)


def read_image(spec: str, timeout: float, max_bytes: int):
    """An RGB PIL image, or a `ValueError` naming `spec` and the problem."""
    from .data import load_image

    try:
        data = download(spec, timeout, max_bytes) if is_url(spec) else Path(spec).read_bytes()
    except ValueError:
        raise
    except FileNotFoundError:
        raise ValueError(f"{spec}: no such file") from None
    except Exception as error:  # HTTP errors, timeouts, refused connections, unreadable files
        raise ValueError(f"{spec}: cannot read ({type(error).__name__}: {error})") from None
    return load_image(data, spec)


def decoded(specs: list[str], args: argparse.Namespace) -> Iterator[tuple[str, object]]:
    """(spec, RGB image or the ValueError) in input order, read and decoded by a few threads a little ahead."""
    with ThreadPoolExecutor(max(args.num_workers, 1)) as pool:
        ahead: deque = deque()
        lookahead = max(args.batch_size * 2, args.num_workers)
        for spec in specs:
            ahead.append((spec, pool.submit(read_image, spec, args.url_timeout, args.max_url_bytes)))
            if len(ahead) >= lookahead:
                yield _result(*ahead.popleft())
        while ahead:
            yield _result(*ahead.popleft())


def _result(spec, future) -> tuple[str, object]:
    try:
        return spec, future.result()
    except ValueError as error:
        return spec, error


# ---------------------------------------------------------------------------------------------------------- output
class RecordWriter:
    """One record per line, flushed as written; appends to an existing `--output` (whose complete records are
    read first, for resuming)."""

    def __init__(self, path: str | None, output_format: str):
        self.format = output_format
        self.captioned: set[str] = set()
        if path is None:
            self.handle = sys.stdout
            needs_header = True
        else:
            needs_header = self._read_existing(path)
            self.handle = open(path, "a", encoding="utf-8", newline="")
        if self.format != "jsonl":
            self.csv = csv.DictWriter(self.handle, FIELDS, delimiter="," if self.format == "csv" else "\t",
                                      lineterminator="\n", extrasaction="ignore")
            if needs_header:
                self.csv.writeheader()
                self.handle.flush()

    def _read_existing(self, path: str) -> bool:
        """Collect captioned paths; drop a last line cut off by a killed run. True if the file needs a header."""
        if not os.path.exists(path) or os.path.getsize(path) == 0:
            return True
        with open(path, "rb+") as handle:
            content = handle.read()
            complete = content[: content.rfind(b"\n") + 1]
            if len(complete) < len(content):
                handle.truncate(len(complete))
        lines = complete.decode("utf-8").splitlines()
        if self.format == "jsonl":
            records = []
            for line in filter(str.strip, lines):
                try:
                    records.append(json.loads(line))
                except json.JSONDecodeError:
                    raise UsageError(f"--output {path} is not a JSONL file of captions: {line[:80]!r}") from None
        else:
            records = list(csv.DictReader(lines, delimiter="," if self.format == "csv" else "\t"))
        self.captioned = {r["path"] for r in records if r.get("path") and r.get("caption") and not r.get("error")}
        return not lines

    def write(self, record: dict) -> None:
        if self.format == "jsonl":
            self.handle.write(json.dumps(record, ensure_ascii=False) + "\n")
        else:
            self.csv.writerow(record)
        self.handle.flush()

    def close(self) -> None:
        if self.handle is not sys.stdout:
            self.handle.close()


# ----------------------------------------------------------------------------------------------------------- model
def pick_device(name: str) -> torch.device:
    if name != "auto":
        try:
            device = torch.device(name)
        except RuntimeError as error:
            raise UsageError(f"unknown --device {name!r} ({error})") from None
        available = {"cuda": torch.cuda.is_available, "mps": torch.backends.mps.is_available}
        if not available.get(device.type, lambda: True)():
            raise UsageError(f"--device {name}: not available on this machine")
        return device
    if torch.cuda.is_available():
        return torch.device("cuda")
    if torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


def pick_dtype(name: str, device: torch.device) -> torch.dtype:
    if name != "auto":
        return DTYPES[name]
    # float16 overflows in T5's feed-forward layers, so a GPU without bfloat16 stays in float32.
    return torch.bfloat16 if device.type == "cuda" and torch.cuda.is_bf16_supported() else torch.float32


def load_model(args: argparse.Namespace, device: torch.device, dtype: torch.dtype):
    """Model (loaded and merged in float32, then `dtype` on `device`) and processor; a `UsageError` if either fails."""
    from transformers import PretrainedConfig

    from . import LoraCaptionerConfig, LoraCaptionerForConditionalGeneration, LoraCaptionerProcessor

    if not Path(args.model).exists() and (args.model.startswith((".", "/", "~")) or args.model.count("/") > 1):
        raise UsageError(f"model folder {args.model!r} does not exist")
    try:
        model_type = PretrainedConfig.get_config_dict(args.model, revision=args.revision)[0].get("model_type")
        if model_type != LoraCaptionerConfig.model_type:  # else: a warning and random weights
            raise ValueError(f"it is a {model_type!r} model, not a LoraCaptioner")
        model = LoraCaptionerForConditionalGeneration.from_pretrained(args.model, revision=args.revision)
    except Exception as error:  # a missing folder, an unknown Hub id, a folder of another model
        raise UsageError(f"cannot load model {args.model!r}: {_first_line(error)}") from None
    if args.adapter is not None:
        from peft import PeftModel

        try:
            with warnings.catch_warnings():  # peft reads `is_gradient_checkpointing`, deprecated in transformers 5.24
                warnings.filterwarnings("ignore", "`is_gradient_checkpointing` is deprecated", FutureWarning)
                model = PeftModel.from_pretrained(model, args.adapter).merge_and_unload()
        except Exception as error:
            raise UsageError(f"cannot load adapter {args.adapter!r}: {_first_line(error)}") from None
    processor, errors = None, []
    for source in filter(None, (args.model, args.adapter)):
        try:
            processor = LoraCaptionerProcessor.from_pretrained(source, revision=args.revision if source == args.model
                                                               else None)
            break
        except Exception as error:
            errors.append(f"{source!r}: {_first_line(error)}")
    if processor is None:
        raise UsageError(f"cannot load the processor from {' or '.join(errors)}")
    return model.to(device=device, dtype=dtype).eval(), processor


def _first_line(error: Exception) -> str:
    text = str(error).strip().splitlines()
    return f"{type(error).__name__}: {text[0] if text else ''}"


def generation_kwargs(args: argparse.Namespace) -> dict:
    """Only the options given: the rest come from the model's generation_config.json."""
    names = ("num_beams", "max_new_tokens", "do_sample", "temperature", "top_p", "no_repeat_ngram_size",
             "repetition_penalty", "length_penalty", "min_new_tokens")
    return {name: getattr(args, name) for name in names if getattr(args, name) is not None}


def caption_batch(model, processor, images: list, args: argparse.Namespace) -> list[str]:
    inputs = processor(images=images, text=args.prompt, return_tensors="pt").to(model.device)
    with torch.inference_mode():
        caption_ids = model.generate(**inputs, **generation_kwargs(args))
    return [caption.strip() for caption in processor.batch_decode(caption_ids, skip_special_tokens=True)]


# ------------------------------------------------------------------------------------------------------------ main
def caption(args: argparse.Namespace) -> int:
    from .bulk import caption_command, uses_shards

    if uses_shards(args):  # datasets, tar or parquet inputs, or several processes
        return caption_command(args)
    if args.batch_size < 1:
        raise UsageError("--batch-size must be at least 1")
    output_format = args.format or {".csv": "csv", ".tsv": "tsv"}.get(Path(args.output or "").suffix.lower(), "jsonl")
    specs = expand_inputs(args.inputs, sys.stdin if "-" in args.inputs else ())
    if not specs:
        raise UsageError("no inputs found")
    device = pick_device(args.device)
    model, processor = load_model(args, device, pick_dtype(args.dtype, device))
    if args.seed is not None:
        torch.manual_seed(args.seed)

    writer = RecordWriter(args.output, output_format)
    todo = [spec for spec in specs if spec not in writer.captioned]
    if len(todo) < len(specs):
        print(f"loracaptioner: {len(specs) - len(todo)} inputs already captioned in {args.output}", file=sys.stderr)
    failed = 0
    progress = tqdm(total=len(todo), unit="img", desc="captioning", file=sys.stderr, disable=args.quiet)

    def flush(batch: list[tuple[str, object]]) -> None:
        """Caption the batch's images and write its records in input order (decoding errors included)."""
        nonlocal failed
        images = [(spec, item) for spec, item in batch if not isinstance(item, Exception)]
        results = dict(batch)
        try:
            if images:
                captions = caption_batch(model, processor, [image for _, image in images], args)
                results.update(zip([spec for spec, _ in images], captions))
        except Exception:  # one image the processor or model rejects: caption the others one by one
            for spec, image in images:
                try:
                    results[spec] = caption_batch(model, processor, [image], args)[0]
                except Exception as error:
                    results[spec] = error
        for spec, _ in batch:
            if isinstance(results[spec], str):
                writer.write({"path": spec, "caption": results[spec]})
            else:
                failed += 1
                message = str(results[spec])
                writer.write({"path": spec, "error": message if message.startswith(spec)
                              else f"{spec}: {_first_line(results[spec])}"})
        progress.update(len(batch))

    batch: list[tuple[str, object]] = []
    try:
        for spec, item in decoded(todo, args):
            batch.append((spec, item))
            if sum(not isinstance(item, Exception) for _, item in batch) == args.batch_size:
                flush(batch)
                batch = []
        if batch:
            flush(batch)
    finally:
        progress.close()
        writer.close()
    if failed:
        print(f"loracaptioner: {failed} of {len(todo)} inputs failed (records with an 'error')", file=sys.stderr)
    return 1 if failed else 0


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if args.command == "merge":
            from .bulk import merge_command

            return merge_command(args)
        return caption(args)
    except UsageError as error:
        print(f"loracaptioner: error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("loracaptioner: interrupted (records written so far are kept)", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
