"""Captioning at scale: `loracaptioner caption` over shards (webdataset tars, parquet files, a `datasets` dataset, or
long lists of files), in one process or in several launched by `torchrun` / `accelerate launch`.

How a run goes, in each process:

1. `PartialState` (accelerate) says which rank this is and joins the process group the launcher set up.
2. Rank 0 records the run in `OUTPUT.parts/run.json` and finds the shards that are not finished; every rank gets
   that list (`broadcast_object_list`) and takes every `world_size`-th shard of it, starting at its rank.
3. `ShardBatches`, in DataLoader worker processes, reads the rank's shards (worker `w` of `W` takes every `W`-th),
   decodes the images and runs the processor, while the main process runs `generate()` on the batches before.
   A batch never spans two shards, so a shard's captions are the same whichever rank, worker or run made them.
4. The main process writes each shard's records to its part file (`records.Parts`) and renames it when the shard is
   complete; it also writes its progress to `status/`, which rank 0 adds up for the progress bar.
5. Rank 0 waits for every rank's last shard, joins the parts into the output (`records.merge`), prints the summary
   and, with `--push-to-hub`, uploads the captions as a dataset repo.

An image that cannot be read or decoded is an error record. A shard that cannot be read, an out-of-memory error or
a bug stops the run: finished shards stay finished, and rerunning the same command does only the rest.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
import tempfile
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info
from tqdm.auto import tqdm

from . import records as records_io
from .captioning import UsageError, generate_captions, generation_kwargs, processor_inputs, stopped
from .sources import FileListShard, Shard, ShardError, dataset_shards, estimate_counts, find_shards, is_shard_spec


# --------------------------------------------------------------------------------------------- command line
def uses_shards(args: argparse.Namespace) -> bool:
    """Whether `caption` runs over shards: a dataset, tar or parquet inputs, a parquet or datasets output, a push to
    the Hub, or a launch with several processes."""
    from .sources import expand_braces

    sharded = any(is_shard_spec(pattern) for spec in args.inputs for pattern in expand_braces(spec))
    output_format = args.format or (records_io.output_format_of(args.output, None) if args.output else "jsonl")
    return (bool(args.dataset) or sharded or output_format in ("parquet", "datasets") or bool(args.push_to_hub)
            or int(os.environ.get("WORLD_SIZE", "1")) > 1)


def caption_command(args: argparse.Namespace) -> int:
    """`loracaptioner caption` over shards (see the module docstring)."""
    from accelerate import PartialState

    from . import data  # noqa: F401 - the image decoders, imported once here rather than in every DataLoader worker
    from .loading import load_model, pick_dtype

    if args.output is None:
        raise UsageError("--output is needed for datasets, tar or parquet inputs and with several processes: its "
                         "OUTPUT.parts/ folder keeps each shard's captions")
    if args.batch_size < 1 or args.shard_size < 1:
        raise UsageError("--batch-size and --shard-size must be at least 1")
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        if args.device not in ("auto", "cpu"):
            raise UsageError("with several processes the launcher assigns devices: use --device auto or cpu")
        if "-" in args.inputs:
            raise UsageError("- (a list on stdin) needs one process: the launcher gives its processes no stdin")
    use_cpu = args.device == "cpu" or (args.device == "auto" and not torch.cuda.is_available())
    state = PartialState(cpu=use_cpu)
    device = state.device if args.device == "auto" or state.num_processes > 1 else torch.device(args.device)
    try:
        with state.main_process_first():  # rank 0 downloads and prepares a dataset, the others then read its cache
            shards = find_shards(args.inputs, stdin=sys.stdin if "-" in args.inputs else (),
                                 shard_size=args.shard_size, image_column=args.image_column,
                                 key_column=args.key_column, url_timeout=args.url_timeout,
                                 max_url_bytes=args.max_url_bytes)
            if args.dataset:
                shards += dataset_shards(args.dataset, config=args.dataset_config, split=args.split,
                                         streaming=args.streaming, image_column=args.image_column,
                                         key_column=args.key_column, shard_size=args.shard_size)
    except (ValueError, FileNotFoundError) as error:
        raise UsageError(str(error)) from None
    if not shards:
        raise UsageError("no inputs found")
    output_format = records_io.output_format_of(args.output, args.format)
    generation = generation_kwargs(args)
    dtype = pick_dtype(args.dtype, device, args.quantize)
    if state.num_processes > 1:  # one dtype for the whole run: rank 0's (`--dtype auto` measures in each process)
        from accelerate.utils import broadcast_object_list

        dtype = broadcast_object_list([dtype])[0]
    job = CaptionJob(
        output=args.output, output_format=output_format, batch_size=args.batch_size, num_workers=args.num_workers,
        prompt=args.prompt, generation=generation, seed=args.seed, quiet=args.quiet, split=args.split,
        push_to_hub=args.push_to_hub, hub_private=args.hub_private,
        settings={"model": args.model, "revision": args.revision, "adapter": args.adapter,
                  "dtype": str(dtype).removeprefix("torch."), "quantize": args.quantize,
                  "prompt": args.prompt, "generation": generation, "batch_size": args.batch_size, "seed": args.seed},
    )
    try:
        return caption_shards(shards, job, lambda: load_model(args.model, args.revision, args.adapter, device, dtype,
                                                              args.quantize), state)
    finally:
        if torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()


def merge_command(args: argparse.Namespace) -> int:
    try:
        result = records_io.merge(args.output, args.format, args.split, destination=args.to)
    except ValueError as error:
        raise UsageError(str(error)) from None
    print(f"loracaptioner: wrote {result.output} ({_count(result.records, 'record')}, "
          f"{_count(result.errors, 'error')})", file=sys.stderr)
    if args.push_to_hub:
        written_format = records_io.output_format_of(result.output, args.format)
        _push(args.output, result.output if written_format == "datasets" else None, args.split, args.push_to_hub,
              args.hub_private)
    return 1 if result.errors else 0


# ------------------------------------------------------------------------------------------------ the engine
@dataclass
class CaptionJob:
    """What a run over shards does; `settings` are the values its captions depend on (kept in run.json)."""

    output: str
    output_format: str
    batch_size: int = 8
    num_workers: int = 4
    prompt: str | None = None
    generation: dict = field(default_factory=dict)
    seed: int | None = None
    quiet: bool = False
    split: str = "train"
    push_to_hub: str | None = None
    hub_private: bool = False
    settings: dict = field(default_factory=dict)


class ShardBatches(IterableDataset):
    """A rank's shards as batches ready for `generate()`, made in DataLoader workers (worker `w` of `W` takes shards
    `w, w + W, ...`). A batch holds up to `batch_size` decoded images and the error records of the undecodable ones
    between them, never samples of two shards; every shard ends with an empty batch marked `last`."""

    def __init__(self, shards: list[Shard], processor, batch_size: int, prompt: str | None):
        self.shards, self.processor, self.batch_size, self.prompt = shards, processor, batch_size, prompt

    def __iter__(self):
        worker = get_worker_info()
        first, step = (worker.id, worker.num_workers) if worker else (0, 1)
        for shard in self.shards[first::step]:
            yield from self.shard_batches(shard)

    def shard_batches(self, shard: Shard):
        records, images, number = [], [], 0
        for sample in shard.samples():
            if sample.error is not None:
                records.append({**sample.fields, "error": sample.error})
                continue
            try:
                images.append(shard.decode(sample))
                records.append(dict(sample.fields))
            except ValueError as error:  # this image only: unreadable, undecodable, not an image
                records.append({**sample.fields, "error": str(error)})
            if len(images) == self.batch_size:
                yield self.batch(shard, number, records, images)
                records, images, number = [], [], number + 1
        if records:
            yield self.batch(shard, number, records, images)
        yield {"shard": shard.name, "number": number + 1, "records": [], "inputs": None, "last": True}

    def batch(self, shard: Shard, number: int, records: list[dict], images: list) -> dict:
        inputs, errors = processor_inputs(self.processor, images, self.prompt) if images else (None, [])
        decoded = iter(errors)  # one per record without an error, in order
        for record in records:
            if "error" not in record and (error := next(decoded)) is not None:
                name = record.get("path") or f"{record['shard']}:{record['key']}"
                record["error"] = f"{name}: {error}"
        return {"shard": shard.name, "number": number, "records": records, "inputs": inputs, "last": False}


def _as_is(batch):
    return batch


def batch_seed(seed: int, shard_name: str, number: int) -> int:
    """The sampling seed of one batch: the same whichever process captions it."""
    return int.from_bytes(hashlib.sha256(f"{seed}/{shard_name}/{number}".encode()).digest()[:8], "little")


def caption_shards(shards: list[Shard], job: CaptionJob, load_model: Callable[[], tuple], state) -> int:
    """Caption this rank's share of the unfinished `shards`; on rank 0, then wait for the others, merge and report.
    `load_model()` returns (model, processor) on this rank's device. Returns the exit status."""
    parts = records_io.Parts(job.output)
    rank, world_size = state.process_index, state.num_processes
    files = [isinstance(shard, FileListShard) for shard in shards]
    columns = ["path"] * any(files) + ["shard", "key"] * (not all(files)) + ["caption", "error"]
    plan = [None]
    if state.is_main_process:
        try:
            todo = parts.begin(job.settings, [shard.name for shard in shards], columns)
            by_name = {shard.name: shard for shard in shards}
            counts = estimate_counts([by_name[name] for name in todo])
            total = None if None in counts else sum(counts)
            plan = [{"todo": todo, "run": uuid.uuid4().hex, "total": total, "all": [s.name for s in shards]}]
        except ValueError as error:
            plan = [{"error": str(error)}]
    if world_size > 1:
        torch.distributed.broadcast_object_list(plan, src=0)
    plan = plan[0]
    if "error" in plan:
        raise UsageError(plan["error"])
    if plan["all"] != [shard.name for shard in shards]:
        raise UsageError(f"rank {rank} sees other inputs than rank 0: run every process on the same inputs and files")

    by_name = {shard.name: shard for shard in shards}
    mine = [by_name[name] for name in plan["todo"][rank::world_size]]
    board = StatusBoard(parts.status_folder, plan["run"], rank, world_size)
    finished_before = len(shards) - len(plan["todo"])
    if state.is_main_process and finished_before:
        print(f"loracaptioner: {finished_before} of {len(shards)} shards already captioned in {parts.folder}",
              file=sys.stderr)
    progress = None
    try:
        model, processor = load_model() if mine else (None, None)
        board.start()  # the clock of the summary's images/s runs from here: model loading is not captioning
        started = time.monotonic()
        if state.is_main_process:
            progress = Progress(plan["total"], board, disable=job.quiet)
        if mine:
            caption_my_shards(mine, model, processor, job, parts, board, progress)
        board.report(finished=True)
        if not state.is_main_process:
            return 0
        while not board.all_finished():  # the other ranks' last shards
            progress.refresh()
            time.sleep(0.2)
            failed = [status for status in board.read_all() if status.get("failed")]
            if failed:  # (a launcher stops the other processes when one fails; in case it does not)
                raise RuntimeError(f"rank {failed[0]['rank']} stopped: {failed[0]['failed']}")
        progress.refresh(force=True)
        progress.close()
        elapsed = time.monotonic() - started
        result = records_io.merge(job.output, job.output_format, job.split)
    except Exception as error:  # reported, then raised again: a failure stops the run
        board.report(failed=f"{type(error).__name__}: {_last_line(error)}")
        if progress is not None:
            progress.close()
        if isinstance(error, ShardError):
            raise UsageError(f"{_last_line(error)}. Finished shards are kept in {parts.folder}: fix or leave out that "
                             "shard and rerun the same command") from None
        raise stopped(error, f"finished shards are kept in {parts.folder}", _last_line(error)) from error
    print_summary(board.read_all(), elapsed, result, finished_before)
    if job.push_to_hub:
        _push(job.output, result.output if job.output_format == "datasets" else None, job.split, job.push_to_hub,
              job.hub_private)
    return 1 if result.errors and world_size == 1 else 0


def caption_my_shards(shards: list[Shard], model, processor, job: CaptionJob, parts: records_io.Parts,
                      board: StatusBoard, progress: Progress | None) -> None:
    """The main loop of one rank: batches from the DataLoader workers -> generate() -> part files."""
    num_workers = min(job.num_workers, len(shards))
    loader = DataLoader(
        ShardBatches(shards, processor, job.batch_size, job.prompt), batch_size=None, collate_fn=_as_is,
        num_workers=num_workers, prefetch_factor=4 if num_workers else None, pin_memory=model.device.type == "cuda",
    )
    writers: dict[str, records_io.PartWriter] = {}
    try:
        for batch in loader:
            name = batch["shard"]
            if name not in writers:
                writers[name] = parts.open(name)
            writer = writers[name]
            if batch["inputs"] is not None:
                if job.generation.get("do_sample") and job.seed is not None:
                    torch.manual_seed(batch_seed(job.seed, name, batch["number"]))
                captions = iter(generate_captions(model, processor, batch["inputs"], job.generation))
                for record in batch["records"]:
                    if "error" not in record:
                        record["caption"] = next(captions)
            writer.write(batch["records"])
            board.add(len(batch["records"]), sum("error" in record for record in batch["records"]))
            if batch["last"]:
                writers.pop(name).finish()
                board.add(0, 0, shards_done=1)
            board.report(now=batch["last"])
            if progress is not None:
                progress.refresh()
    finally:
        for writer in writers.values():  # unfinished: left as .partial, captioned again by the rerun
            writer.abandon()


def _last_line(error: Exception) -> str:
    """The message of an error, without the traceback a DataLoader worker adds to what it raises again."""
    lines = str(error).strip().splitlines() or [""]
    return lines[-1].split(f"{type(error).__name__}: ", 1)[-1]


def _push(output: str, datasets_folder: str | None, split: str, repo_id: str, private: bool) -> None:
    """Upload the captions of the run with `--output output` as a dataset repo: the datasets folder written, or one
    made from the parts."""
    if datasets_folder is not None:
        commit = records_io.push_captions(datasets_folder, repo_id, private=private or None)
    else:
        with tempfile.TemporaryDirectory() as scratch:
            folder = str(Path(scratch) / "captions")
            records_io.write_datasets_folder(records_io.Parts(output), folder, split)
            commit = records_io.push_captions(folder, repo_id, private=private or None)
    print(f"loracaptioner: pushed the captions to {commit.commit_url}", file=sys.stderr)


# --------------------------------------------------------------------------------------- progress and summary
class StatusBoard:
    """Each rank's progress as a small JSON file in `OUTPUT.parts/status/`, written at most every half second: rank 0
    reads them all for the progress bar, the end of the run and the summary. Files of earlier runs are ignored."""

    def __init__(self, folder: Path, run_id: str, rank: int, world_size: int):
        self.folder, self.run_id, self.rank, self.world_size = folder, run_id, rank, world_size
        self.status = {"run": run_id, "rank": rank, "pid": os.getpid(), "records": 0, "errors": 0, "shards": 0,
                       "seconds": 0.0, "finished": False}
        self.started = time.monotonic()
        self.written = 0.0

    def start(self) -> None:
        self.started = time.monotonic()

    def add(self, records: int, errors: int, shards_done: int = 0) -> None:
        self.status["records"] += records
        self.status["errors"] += errors
        self.status["shards"] += shards_done

    def report(self, finished: bool = False, failed: str | None = None, now: bool = False) -> None:
        """Write this rank's status: at the end, on failure, when `now` (a shard was finished), else at most every
        half second."""
        clock = time.monotonic()
        if not (finished or failed or now) and clock - self.written < 0.5:
            return
        self.status.update(seconds=round(clock - self.started, 3), finished=finished or self.status["finished"])
        if failed:
            self.status["failed"] = failed
        records_io.write_atomically(self.folder / f"rank-{self.rank:05d}.json", json.dumps(self.status))
        self.written = clock

    def read_all(self) -> list[dict]:
        statuses = []
        for rank in range(self.world_size):
            try:
                status = json.loads((self.folder / f"rank-{rank:05d}.json").read_text())
            except (FileNotFoundError, json.JSONDecodeError):
                continue
            if status.get("run") == self.run_id:
                statuses.append(status)
        return statuses

    def all_finished(self) -> bool:
        statuses = self.read_all()
        return len(statuses) == self.world_size and all(status["finished"] for status in statuses)


class Progress:
    """Rank 0's progress bar over all ranks: images (records) per second and, where the shard sizes are known or
    estimated, the ETA."""

    def __init__(self, total: int | None, board: StatusBoard, disable: bool = False):
        self.board = board
        self.bar = tqdm(total=total, unit="img", desc="captioning", file=sys.stderr, disable=disable,
                        dynamic_ncols=True)
        self.read = 0.0

    def refresh(self, force: bool = False) -> None:
        now = time.monotonic()
        if not force and now - self.read < 0.5:
            return
        self.read = now
        statuses = self.board.read_all()
        done = sum(status["records"] for status in statuses)
        if self.bar.total is not None and done > self.bar.total:
            self.bar.total = done  # the shard sizes were estimated
        self.bar.set_postfix(errors=sum(status["errors"] for status in statuses),
                             ranks=f"{sum(not status['finished'] for status in statuses)} busy", refresh=False)
        self.bar.update(done - self.bar.n)

    def close(self) -> None:
        self.bar.close()


def print_summary(statuses: list[dict], elapsed: float, result: records_io.MergeResult, finished_before: int) -> None:
    """Images, errors, images/s, and how evenly the ranks shared the work."""
    records = sum(status["records"] for status in statuses)
    errors = sum(status["errors"] for status in statuses)
    lines = [f"loracaptioner: {records:,} images captioned in {elapsed:.1f} s ({records / max(elapsed, 1e-9):.1f} "
             f"images/s) by {_count(len(statuses), 'process', 'processes')}, {_count(errors, 'error')}"
             + (f"; {finished_before} shards were already done" if finished_before else "")]
    for status in sorted(statuses, key=lambda status: status["rank"]):
        rate = status["records"] / max(status["seconds"], 1e-9)
        lines.append(f"  rank {status['rank']}: {_count(status['records'], 'image')}, "
                     f"{_count(status['shards'], 'shard')}, {status['seconds']:.1f} s, {rate:.1f} images/s")
    if len(statuses) > 1 and records:
        busiest = max(status["records"] for status in statuses)
        lines.append(f"  balance: the busiest process captioned {busiest / (records / len(statuses)):.2f}x the mean")
    lines.append(f"loracaptioner: wrote {result.output} ({_count(result.records, 'record')}, "
                 f"{_count(result.errors, 'error')})")
    print("\n".join(lines), file=sys.stderr)


def _count(number: int, word: str, plural: str | None = None) -> str:
    return f"{number:,} {word if number == 1 else plural or word + 's'}"
