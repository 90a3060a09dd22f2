"""Caption records on disk: one part file per shard while a run goes, then one output in the format asked for.

`OUTPUT.parts/` holds what a run over shards has done, and is what makes it resumable:

- `<shard>.jsonl`: a finished shard's records in the shard's order. A process writes `<shard>.jsonl.partial` and
  renames it when the shard is complete, so a part that exists is complete and a killed process leaves at most a
  `.partial` behind, which the rerun writes again from the start.
- `run.json`: the settings the captions depend on (a rerun with others is refused), the shards in input order and
  the output's columns: what `merge` joins.
- `status/`: each process's progress, for rank 0's progress bar and the summary.

The one-process CLI (`captioning.py`) writes its records straight to `--output` instead, with `RecordWriter`.

`merge` writes the records of every shard, in input order, as JSONL, CSV or TSV (as the one-process CLI does), one
parquet file, or a `datasets` folder (parquet files under `data/` and a dataset card), which `datasets.load_dataset`
loads and `push_captions` uploads as a dataset repo.
"""

from __future__ import annotations

import csv
import json
import math
import os
import shutil
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from huggingface_hub import CommitInfo, DatasetCard, DatasetCardData, HfApi

FORMATS = ("jsonl", "csv", "tsv", "parquet", "datasets")
FIELDS = ("path", "caption", "error")  # of the one-process CLI's records
ROWS_PER_PARQUET_FILE = 1_000_000  # ~100 MB of captions: within the Hub's recommended file size
CARD_TAG = "loracaptioner"


def output_format_of(output: str, given: str | None) -> str:
    """`--format`, else from `--output`'s suffix (`.csv`, `.tsv`, `.parquet`; a name ending in `/` is a datasets
    folder), else JSONL."""
    if given:
        return given
    if output.endswith(("/", os.sep)):
        return "datasets"
    return {".csv": "csv", ".tsv": "tsv", ".parquet": "parquet"}.get(Path(output).suffix.lower(), "jsonl")


class Parts:
    """The `OUTPUT.parts/` folder of a run (see the module docstring)."""

    def __init__(self, output: str):
        self.output = output.rstrip("/" + os.sep)
        self.folder = Path(self.output + ".parts")
        self.status_folder = self.folder / "status"

    def path(self, shard_name: str) -> Path:
        return self.folder / f"{shard_name}.jsonl"

    def is_finished(self, shard_name: str) -> bool:
        return self.path(shard_name).is_file()

    def read_run(self) -> dict | None:
        run_file = self.folder / "run.json"
        return json.loads(run_file.read_text()) if run_file.is_file() else None

    def begin(self, settings: dict, shard_names: list[str], columns: list[str]) -> list[str]:
        """Record the run (refusing settings other than those of the captions already there) and return the shards
        still to caption, in input order."""
        previous = self.read_run()
        if previous is not None and previous["settings"] != settings:
            before = previous["settings"]
            changed = [f"{key} {before.get(key)!r} then, {settings.get(key)!r} now"
                       for key in sorted(settings.keys() | before.keys()) if settings.get(key) != before.get(key)]
            raise ValueError(f"{self.folder} holds captions made with other settings ({'; '.join(changed)}): give "
                             "another --output, or delete that folder to start over")
        self.folder.mkdir(parents=True, exist_ok=True)
        self.status_folder.mkdir(exist_ok=True)
        write_atomically(self.folder / "run.json",
                         json.dumps({"settings": settings, "columns": columns, "shards": shard_names}, indent=1))
        return [name for name in shard_names if not self.is_finished(name)]

    def open(self, shard_name: str) -> PartWriter:
        return PartWriter(self.path(shard_name))

    def count(self, shard_name: str) -> int:
        with open(self.path(shard_name), "rb") as part:
            return sum(1 for _ in part)

    def records(self, shard_name: str) -> Iterator[dict]:
        with open(self.path(shard_name), encoding="utf-8") as part:
            for line in part:
                yield json.loads(line)

    def joined(self) -> Iterator[dict]:
        """Every shard's records, shards in input order."""
        for name in self.read_run()["shards"]:
            yield from self.records(name)


class PartWriter:
    """One shard's records, appended to `<shard>.jsonl.partial` and renamed to `<shard>.jsonl` by `finish`."""

    def __init__(self, path: Path):
        self.path = path
        self.partial = path.with_name(path.name + ".partial")
        self.handle = open(self.partial, "w", encoding="utf-8")

    def write(self, records: list[dict]) -> None:
        self.handle.write("".join(json.dumps(record, ensure_ascii=False) + "\n" for record in records))

    def finish(self) -> None:
        self.handle.flush()
        os.fsync(self.handle.fileno())  # on disk before the name says "complete"
        self.handle.close()
        os.replace(self.partial, self.path)

    def abandon(self) -> None:
        self.handle.close()


class RecordWriter:
    """The one-process CLI's output (JSONL, CSV or TSV; stdout if `path` is None): one record per line, flushed as
    written; appends to an existing file, whose complete records are read first, for resuming (`captioned`)."""

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
                    raise ValueError(f"--output {path} is not a JSONL file of captions: {line[:80]!r}") from None
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


def write_atomically(path: Path, text: str) -> None:
    temporary = path.with_name(path.name + f".tmp{os.getpid()}")
    temporary.write_text(text, encoding="utf-8")
    os.replace(temporary, path)


# ----------------------------------------------------------------------------------------------------- merging
@dataclass
class MergeResult:
    records: int
    errors: int
    output: str


def merge(output: str, output_format: str | None = None, split: str = "train",
          destination: str | None = None) -> MergeResult:
    """Join the finished parts of `OUTPUT.parts/`, in input order, into `output` (or `destination`). A `ValueError`
    names the shards that are not finished yet."""
    parts = Parts(output)
    run = parts.read_run()
    if run is None:
        raise ValueError(f"{parts.folder} does not exist or has no run.json: nothing to merge")
    missing = [name for name in run["shards"] if not parts.is_finished(name)]
    if missing:
        raise ValueError(f"{len(missing)} of {len(run['shards'])} shards are not finished ({', '.join(missing[:3])}"
                         f"{', ...' if len(missing) > 3 else ''}): rerun the caption command to finish them")
    destination = (destination or parts.output).rstrip("/" + os.sep)
    output_format = output_format_of(destination, output_format)
    if output_format == "datasets":
        counted = write_datasets_folder(parts, destination, split)
    else:
        if Path(destination).is_dir():
            raise ValueError(f"{destination} is a folder: give the {output_format} file another name (merge --to)")
        counted = write_file(parts.joined(), destination, output_format, run["columns"])
    return MergeResult(records=counted[0], errors=counted[1], output=destination)


def write_file(records, output: str, output_format: str, columns: list[str]) -> tuple[int, int]:
    """JSONL (only the fields a record has, as the one-process CLI writes), CSV/TSV (a header of `columns`, empty
    cells for what a record lacks) or one parquet file; written under a temporary name, then renamed."""
    temporary = Path(f"{output}.tmp{os.getpid()}")
    counts = [0, 0]

    def counted(stream):
        for record in stream:
            counts[0] += 1
            counts[1] += "error" in record
            yield record

    if output_format == "parquet":
        _write_parquet(counted(records), temporary, columns)
    else:
        with open(temporary, "w", encoding="utf-8", newline="") as handle:
            if output_format == "jsonl":
                for record in counted(records):
                    handle.write(json.dumps(record, ensure_ascii=False) + "\n")
            else:
                writer = csv.DictWriter(handle, columns, delimiter="," if output_format == "csv" else "\t",
                                        lineterminator="\n")
                writer.writeheader()
                writer.writerows(counted(records))
    os.replace(temporary, output)
    return counts[0], counts[1]


def _write_parquet(records, path: Path, columns: list[str], batch_rows: int = 50_000) -> int:
    """String columns; a missing field is null. Returns the number of rows."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    schema = pa.schema([(name, pa.string()) for name in columns])
    rows = 0
    with pq.ParquetWriter(path, schema) as writer:
        batch = []
        for record in records:
            batch.append(record)
            if len(batch) == batch_rows:
                writer.write_table(pa.Table.from_pylist(batch, schema=schema))
                rows, batch = rows + len(batch), []
        if batch or rows == 0:
            writer.write_table(pa.Table.from_pylist(batch, schema=schema))
            rows += len(batch)
    return rows


def write_datasets_folder(parts: Parts, folder: str, split: str = "train") -> tuple[int, int]:
    """The finished `parts` as `folder/data/<split>-NNNNN-of-NNNNN.parquet` (at most `ROWS_PER_PARQUET_FILE` rows
    each) and a dataset card: `datasets.load_dataset(folder)` loads it, `push_captions` uploads it. An existing
    folder is replaced only if it is one of these (its card is tagged `loracaptioner`)."""
    folder_path = Path(folder)
    if folder_path.exists() and any(folder_path.iterdir()) and not _is_captions_folder(folder_path):
        raise ValueError(f"{folder} exists and is not a captions folder written by loracaptioner: not replacing it")
    run = parts.read_run()
    total = sum(parts.count(name) for name in run["shards"])
    records = parts.joined()
    num_files = max(1, math.ceil(total / ROWS_PER_PARQUET_FILE))
    temporary = Path(f"{folder}.tmp{os.getpid()}")
    shutil.rmtree(temporary, ignore_errors=True)
    (temporary / "data").mkdir(parents=True)
    errors = 0

    def take(stream, count):
        nonlocal errors
        for _, record in zip(range(count), stream):
            errors += "error" in record
            yield record

    for index in range(num_files):
        rows = min(ROWS_PER_PARQUET_FILE, total - index * ROWS_PER_PARQUET_FILE)
        _write_parquet(take(records, rows), temporary / "data" / f"{split}-{index:05d}-of-{num_files:05d}.parquet",
                       run["columns"])
    _dataset_card(run, split, total, errors).save(temporary / "README.md")
    if folder_path.exists():
        shutil.rmtree(folder_path)
    os.replace(temporary, folder_path)
    return total, errors


def _is_captions_folder(folder: Path) -> bool:
    card = folder / "README.md"
    return card.is_file() and CARD_TAG in (DatasetCard.load(card).data.tags or [])


def _dataset_card(run: dict, split: str, total: int, errors: int) -> DatasetCard:
    settings = run["settings"]
    # No `configs:` entry: `data/<split>-NNNNN-of-NNNNN.parquet` is the layout that the Hub and `load_dataset` find
    # by themselves, and with `configs` datasets 5.2 caches a local folder by its name alone (a rewritten or another
    # folder of the same name then loads the old rows).
    data = DatasetCardData(task_categories=["image-to-text"], tags=["image-captioning", CARD_TAG])
    model = settings.get("model") + (f" (revision {settings['revision']})" if settings.get("revision") else "")
    options = ", ".join(f"`{key}={value}`" for key, value in (settings.get("generation") or {}).items())
    columns = ", ".join(f"`{name}`" for name in run["columns"])
    return DatasetCard(
        f"---\n{data.to_yaml()}\n---\n\n# Captions by LoraCaptioner\n\n"
        f"{total:,} images captioned by `loracaptioner caption` with the model `{model}`"
        f"{', prompt ' + repr(settings['prompt']) if settings.get('prompt') else ''}; generation options: "
        f"{options or 'the model defaults'}. {errors:,} could not be captioned: their `error` says why.\n\n"
        f"Columns: {columns}. `path` names an image file or URL; `shard` and `key` name a sample of a webdataset "
        "shard, a parquet file or a dataset (its key column, else its row index).\n\n"
        "```python\nfrom datasets import load_dataset\n"
        f"captions = load_dataset(\"<this repo or folder>\", split=\"{split}\")\n```\n"
    )


def push_captions(folder: str, repo_id: str, *, token: str | bool | None = None, private: bool | None = None,
                  commit_message: str = "Upload captions from loracaptioner") -> CommitInfo:
    """Upload a datasets folder (`write_datasets_folder`) as the dataset repo `repo_id`, in one commit that also
    deletes data files an earlier upload left (so the repo holds this run's rows, once)."""
    api = HfApi(token=token)
    repo_id = api.create_repo(repo_id, repo_type="dataset", private=private, exist_ok=True).repo_id
    return api.upload_folder(repo_id=repo_id, repo_type="dataset", folder_path=folder, commit_message=commit_message,
                             delete_patterns=["data/*"])
