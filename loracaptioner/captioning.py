"""`loracaptioner caption` over files and URLs in one process, and the rules both captioning loops (this one and the
sharded one in `bulk.py`) follow for a batch:

- An input whose image cannot be read, decoded or processed (`images.py` and the processor raise `ValueError`) is
  one error record, and the run goes on (`processor_inputs` finds it even inside a batch).
- Anything else, which is everything `generate()` raises (out of memory, a model error, a bug), is not one input's
  fault: the run stops with `RunStopped`, one line and exit status 1. What was written stays, and rerunning the same
  command captions only what is still missing.

The one-process loop: a few threads read and decode the images a little ahead (`decoded`), the main thread runs the
processor and `generate()` on batches of `--batch-size` images, and `records.RecordWriter` writes each record as it
is made (appending to an existing `--output`, whose captioned inputs are skipped).
"""

from __future__ import annotations

import sys
from collections import deque
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

import torch

GENERATION_OPTIONS = ("num_beams", "max_new_tokens", "do_sample", "temperature", "top_p", "no_repeat_ngram_size",
                      "repetition_penalty", "length_penalty", "min_new_tokens")


class UsageError(Exception):
    """A problem with the command line itself: reported in one line, exit status 2."""


class RunStopped(Exception):
    """A failure that is not one input's (out of memory, a model error, a bug): reported in one line, exit status 1;
    the records written so far stay, and a rerun does only the rest."""


def stopped(error: Exception, kept: str, message: str | None = None) -> RunStopped:
    """The `RunStopped` for `error`: what stopped the run (`message`, else the first line of the error's), and where
    the work so far is kept (`kept`)."""
    from .loading import first_line

    what = f"{type(error).__name__}: {message}" if message is not None else first_line(error)
    return RunStopped(f"stopped by {what}; {kept}, and rerunning the same command captions only the rest")


def generation_kwargs(options) -> dict:
    """Only the generation options given on the command line: the rest come from the model's generation_config.json."""
    return {name: getattr(options, name) for name in GENERATION_OPTIONS if getattr(options, name) is not None}


def processor_inputs(processor, images: list, prompt: str | None) -> tuple[dict | None, list[ValueError | None]]:
    """The processor's inputs for the images it accepts (None if none), and per image None or the `ValueError` that
    rejects it: one bad image costs its own record, not its batch's."""
    try:
        return dict(processor(images=images, text=prompt, return_tensors="pt")), [None] * len(images)
    except ValueError:
        if len(images) == 1:
            raise
    errors = []
    for image in images:
        try:
            processor(images=[image], text=prompt, return_tensors="pt")
            errors.append(None)
        except ValueError as error:
            errors.append(error)
    accepted = [image for image, error in zip(images, errors) if error is None]
    return (dict(processor(images=accepted, text=prompt, return_tensors="pt")) if accepted else None), errors


def generate_captions(model, processor, inputs: dict, generation: dict) -> list[str]:
    """One caption per image of `inputs` (the processor's output). Whatever this raises stops the run."""
    inputs = {name: tensor.to(model.device) for name, tensor in inputs.items()}
    inputs["pixel_values"] = inputs["pixel_values"].to(model.dtype)
    with torch.inference_mode():
        caption_ids = model.generate(**inputs, **generation)
    return [caption.strip() for caption in processor.batch_decode(caption_ids, skip_special_tokens=True)]


# ------------------------------------------------------------------------------------------ the one-process loop
def caption_files(args) -> int:
    """`loracaptioner caption` over files, folders, globs and URLs in this process. Returns the exit status."""
    from tqdm.auto import tqdm

    from .loading import first_line, load_model, pick_device, pick_dtype
    from .records import RecordWriter, output_format_of
    from .sources import expand_inputs

    if args.batch_size < 1:
        raise UsageError("--batch-size must be at least 1")
    specs = expand_inputs(args.inputs, sys.stdin if "-" in args.inputs else ())
    if not specs:
        raise UsageError("no inputs found")
    device = pick_device(args.device)
    dtype = pick_dtype(args.dtype, device, args.quantize)
    model, processor = load_model(args.model, args.revision, args.adapter, device, dtype, args.quantize)
    if args.seed is not None:
        torch.manual_seed(args.seed)
    generation = generation_kwargs(args)

    try:
        writer = RecordWriter(args.output, output_format_of(args.output or "", args.format))
    except ValueError as error:  # an --output that is not a file of captions
        raise UsageError(str(error)) from None
    todo = [spec for spec in specs if spec not in writer.captioned]
    if len(todo) < len(specs):
        print(f"loracaptioner: {len(specs) - len(todo)} inputs already captioned in {args.output}", file=sys.stderr)
    failed = 0
    progress = tqdm(total=len(todo), unit="img", desc="captioning", file=sys.stderr, disable=args.quiet)

    def flush(batch: list[tuple[str, object]]) -> None:
        """Caption the batch's images and write its records in input order (decoding errors included)."""
        nonlocal failed
        results = dict(batch)
        images = [(spec, item) for spec, item in batch if not isinstance(item, ValueError)]
        if images:
            inputs, errors = processor_inputs(processor, [image for _, image in images], args.prompt)
            results.update((spec, error) for (spec, _), error in zip(images, errors) if error is not None)
            accepted = [spec for (spec, _), error in zip(images, errors) if error is None]
            if inputs is not None:
                results.update(zip(accepted, generate_captions(model, processor, inputs, generation)))
        for spec, _ in batch:
            if isinstance(results[spec], str):
                writer.write({"path": spec, "caption": results[spec]})
            else:
                failed += 1
                message = str(results[spec])
                writer.write({"path": spec, "error": message if message.startswith(spec)
                              else f"{spec}: {first_line(results[spec])}"})
        progress.update(len(batch))

    batch: list[tuple[str, object]] = []
    try:
        for spec, item in decoded(todo, args.num_workers, args.batch_size, args.url_timeout, args.max_url_bytes):
            batch.append((spec, item))
            if sum(not isinstance(item, ValueError) for _, item in batch) == args.batch_size:
                flush(batch)
                batch = []
        if batch:
            flush(batch)
    except Exception as error:
        kept = f"the records written so far are kept in {args.output}" if args.output else "stdout has those so far"
        raise stopped(error, kept) from error
    finally:
        progress.close()
        writer.close()
    if failed:
        print(f"loracaptioner: {failed} of {len(todo)} inputs failed (records with an 'error')", file=sys.stderr)
    return 1 if failed else 0


def decoded(specs: list[str], num_workers: int, batch_size: int, url_timeout: float,
            max_url_bytes: int) -> Iterator[tuple[str, object]]:
    """(spec, RGB image or its ValueError) in input order, read and decoded by a few threads a little ahead."""
    from .images import read_image

    def result(spec, future) -> tuple[str, object]:
        try:
            return spec, future.result()
        except ValueError as error:
            return spec, error

    with ThreadPoolExecutor(max(num_workers, 1)) as pool:
        ahead: deque = deque()
        for spec in specs:
            ahead.append((spec, pool.submit(read_image, spec, url_timeout, max_url_bytes)))
            if len(ahead) >= max(batch_size * 2, num_workers):
                yield result(*ahead.popleft())
        while ahead:
            yield result(*ahead.popleft())
