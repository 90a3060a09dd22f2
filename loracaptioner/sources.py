"""Where the images of a large captioning run come from, cut into *shards*.

A shard is the unit of work of `loracaptioner caption` at scale: one webdataset `.tar`, one parquet file, one shard of
a `datasets` dataset (one data file when streaming, `--shard-size` rows otherwise), or `--shard-size` consecutive
entries of a list of image files and URLs. Processes split the shards between them, DataLoader workers split a
process's shards, one shard's captions are written as one part file, and a rerun skips the shards whose part is
complete (`bulk.py`).

A shard yields `Sample`s: the fields that name the image in the output (`path` for files and URLs; `shard` and `key`
for everything else) and its still undecoded image (bytes, a path, a `datasets` image cell), or the reason it has
none. `Shard.decode` turns a sample into an RGB image or raises `ValueError`: that one image becomes an error record.
A shard that cannot be read at all raises `ShardError`, which stops the run (see `bulk.py`).
"""

from __future__ import annotations

import glob
import hashlib
import re
import sys
import tarfile
import zlib
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

from PIL import Image

from .images import IMAGE_EXTENSIONS, is_url, load_image, read_image

TAR_SUFFIXES = (".tar", ".tar.gz", ".tgz")
PARQUET_SUFFIXES = (".parquet",)
# image members of a webdataset sample, in the order one is preferred when a sample has several
WEBDATASET_IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp", "jfif", "bmp", "gif", "tif", "tiff", "ppm", "pgm")
KEY_COLUMNS = ("__key__", "key")
# a parquet column of image file paths may also carry one of these names
PATH_COLUMNS = ("file_name", "image_path", "filepath", "path")


class ShardError(RuntimeError):
    """A whole shard cannot be read (missing, truncated or not a tar/parquet file): the run stops, finished shards stay
    finished, and the message says which shard it is."""


@dataclass
class Sample:
    """One image of a shard: `fields` name it in the output; `image` is its undecoded data, or `error` says why it
    has none."""

    fields: dict[str, str]
    image: object = None
    error: str | None = None


@dataclass
class Shard:
    """A unit of work with a stable `name` (the name of its part file: the same input gives the same name in every
    process and every rerun) and a `label` (what the output's `shard` column shows)."""

    name: str
    label: str

    def samples(self) -> Iterator[Sample]:
        raise NotImplementedError

    def decode(self, sample: Sample) -> Image.Image:
        """The sample's RGB image, or a `ValueError` naming the image and the problem."""
        return load_image(sample.image, f"{self.label}:{sample.fields['key']}")

    def count(self) -> int | None:
        """How many samples the shard holds, when that is known without reading it."""
        return None


def _name(label: str, readable: str) -> str:
    """A file-system-safe, unique shard name: the readable part plus a hash of the full label."""
    safe = re.sub(r"[^A-Za-z0-9._-]+", "_", readable).strip("._")[-60:] or "shard"
    return f"{safe}-{hashlib.sha1(label.encode()).hexdigest()[:10]}"


# ----------------------------------------------------------------------------------------------- files and URLs
@dataclass
class FileListShard(Shard):
    """Consecutive entries of a list of image files and URLs; the output names each by its `path`."""

    paths: list[str] = field(default_factory=list)
    url_timeout: float = 30.0
    max_url_bytes: int = 50_000_000

    def samples(self) -> Iterator[Sample]:
        for path in self.paths:
            yield Sample({"path": path}, image=path)

    def decode(self, sample: Sample) -> Image.Image:
        return read_image(sample.image, self.url_timeout, self.max_url_bytes)  # as the one-process CLI reads them

    def count(self) -> int:
        return len(self.paths)


# -------------------------------------------------------------------------------------------------- webdataset
def _split_member_name(name: str) -> tuple[str, str] | None:
    """webdataset's rule: the key is the path up to the first dot of the file name, the rest is the extension."""
    match = re.match(r"^((?:.*/|)[^./]+)\.([^/]*)$", name)
    return (match.group(1), match.group(2).lower()) if match else None


@dataclass
class TarShard(Shard):
    """A webdataset shard (the img2dataset and pixparse/cc3m-wds layout: `KEY.jpg` next to `KEY.txt`, `KEY.json`
    ...), read member by member without unpacking. One sample per key; its image is the member with an image
    extension (`jpg` first)."""

    path: str = ""

    def samples(self) -> Iterator[Sample]:
        key, images, others = None, {}, []
        try:
            with tarfile.open(self.path, mode="r|*") as tar:
                for member in tar:
                    parts = _split_member_name(member.name) if member.isfile() else None
                    if parts is None:
                        continue
                    if parts[0] != key:
                        if key is not None:
                            yield self._sample(key, images, others)
                        key, images, others = parts[0], {}, []
                    if parts[1] in WEBDATASET_IMAGE_EXTENSIONS:
                        images[parts[1]] = tar.extractfile(member).read()
                    else:
                        others.append(parts[1])
        except (tarfile.TarError, EOFError, OSError, zlib.error) as error:
            raise ShardError(f"cannot read webdataset shard {self.path} ({type(error).__name__}: {error})") from None
        if key is not None:
            yield self._sample(key, images, others)

    def _sample(self, key: str, images: dict[str, bytes], others: list[str]) -> Sample:
        fields = {"shard": self.label, "key": key}
        for extension in WEBDATASET_IMAGE_EXTENSIONS:
            if extension in images:
                return Sample(fields, image=images[extension])
        return Sample(fields, error=f"{self.label}:{key}: no image in the sample (it has: {', '.join(others)})")

    def count_images(self) -> int:
        """Samples (keys), counted from the member headers alone: the members' data is skipped, not read."""
        with tarfile.open(self.path) as tar:
            keys = {parts[0] for parts in map(_split_member_name, tar.getnames()) if parts}
        return len(keys)


# ----------------------------------------------------------------------------------------------------- parquet
@dataclass
class ParquetShard(Shard):
    """A parquet file whose image column holds encoded images (binary, or `{"bytes", "path"}` as `datasets` writes
    them) or file paths (relative ones are taken from the parquet file's folder). The key is the key column's value,
    else the row's index in the file."""

    path: str = ""
    image_column: str = "image"
    key_column: str | None = None
    num_rows: int | None = None

    def samples(self) -> Iterator[Sample]:
        import pyarrow as pa
        import pyarrow.parquet as pq

        columns = [self.image_column] + ([self.key_column] if self.key_column else [])
        index = 0
        try:
            batches = pq.ParquetFile(self.path).iter_batches(batch_size=256, columns=columns)
            for batch in batches:
                for row in batch.to_pylist():
                    key = row[self.key_column] if self.key_column else index
                    yield Sample({"shard": self.label, "key": str(key)}, image=self._resolve(row[self.image_column]))
                    index += 1
        except (OSError, pa.ArrowException) as error:  # unreadable, truncated, not parquet
            raise ShardError(f"cannot read parquet shard {self.path} ({type(error).__name__}: {error})") from None

    def _resolve(self, cell):
        folder = Path(self.path).parent
        if isinstance(cell, str) and not Path(cell).is_absolute():
            return str(folder / cell)
        if isinstance(cell, dict) and cell.get("bytes") is None and cell.get("path"):
            return {**cell, "path": str(folder / cell["path"])}
        return cell

    def count(self) -> int | None:
        return self.num_rows


def parquet_shard(path: str, image_column: str | None, key_column: str | None) -> ParquetShard:
    """A parquet shard with its image and key columns found from the file's schema (read from its footer only)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from .data import IMAGE_COLUMNS, detect_column

    try:
        metadata = pq.read_metadata(path)
    except (OSError, pa.ArrowException) as error:
        raise ValueError(f"cannot read parquet file {path} ({type(error).__name__}: {error})") from None
    columns = metadata.schema.to_arrow_schema().names
    image_column = detect_column(columns, image_column, IMAGE_COLUMNS + PATH_COLUMNS, "image")
    key_column = _key_column(columns, key_column)
    return ParquetShard(_name(path, Path(path).name), path, path=path, image_column=image_column,
                        key_column=key_column, num_rows=metadata.num_rows)


def _key_column(columns: list[str], given: str | None) -> str | None:
    from .data import detect_column

    if given is not None:
        return detect_column(columns, given, (), "key")
    return next((name for name in KEY_COLUMNS if name in columns), None)


# ---------------------------------------------------------------------------------------------------- datasets
@dataclass
class DatasetShard(Shard):
    """Part of a `datasets` dataset: `rows` of a map-style dataset, or shard `index` of `num_shards` of a streaming
    one (one data file each). The key is the key column (`__key__` for webdataset data), else the row's index (in
    the split for map-style data, in the shard when streaming); webdataset rows show their `__url__` as the shard."""

    dataset: object = None
    image_column: str = "image"
    key_column: str | None = None
    rows: range | None = None
    index: int = 0
    num_shards: int = 1

    def samples(self) -> Iterator[Sample]:
        if self.rows is not None:
            for start in range(self.rows.start, self.rows.stop, 256):
                batch = self.dataset[start : min(start + 256, self.rows.stop)]
                for offset, image in enumerate(batch[self.image_column]):
                    key = batch[self.key_column][offset] if self.key_column else start + offset
                    yield Sample({"shard": self.label, "key": str(key)}, image=image)
        else:
            part = self.dataset.shard(num_shards=self.num_shards, index=self.index, contiguous=True)
            position = 0
            # `iter()`, not `for row in part`: in a DataLoader worker, that would split the shard among the workers
            for batch in part.iter(batch_size=256):
                for offset, image in enumerate(batch[self.image_column]):
                    key = batch[self.key_column][offset] if self.key_column else position
                    label = batch["__url__"][offset] if "__url__" in batch else self.label
                    yield Sample({"shard": str(label), "key": str(key)}, image=image)
                    position += 1

    def count(self) -> int | None:
        return len(self.rows) if self.rows is not None else None


def dataset_shards(name: str, *, config: str | None = None, split: str = "train", streaming: bool = False,
                   image_column: str | None = None, key_column: str | None = None,
                   shard_size: int = 1000) -> list[DatasetShard]:
    """The shards of one split of a Hub dataset, a local dataset folder (data files or `save_to_disk` output)."""
    import datasets

    from .data import IMAGE_COLUMNS, detect_column

    local = Path(name).expanduser()
    if local.is_dir() and ((local / "state.json").is_file() or (local / "dataset_dict.json").is_file()):
        dataset = datasets.load_from_disk(str(local))  # save_to_disk output: map-style, already on disk
        if isinstance(dataset, datasets.DatasetDict):
            if split not in dataset:
                raise ValueError(f"dataset {name} has no split {split!r}; it has {sorted(dataset)}")
            dataset = dataset[split]
    else:
        source = str(local.resolve()) if local.is_dir() else name  # datasets wants a local folder as absolute path
        dataset = datasets.load_dataset(source, config, split=split, streaming=streaming)
    columns = dataset.column_names
    if columns is None:  # a streaming dataset that does not declare its features: look at its first row
        columns = list(next(iter(dataset)))
    image_column = detect_column(columns, image_column, IMAGE_COLUMNS, "image")
    key_column = _key_column(columns, key_column)
    features = dataset.features or {}
    if isinstance(features.get(image_column), datasets.Image):
        dataset = dataset.cast_column(image_column, datasets.Image(decode=False))  # decoded in the workers
    dataset = dataset.select_columns([c for c in (image_column, key_column, "__url__") if c and c in columns])
    identity = f"{name}|{config}|{split}"
    if isinstance(dataset, datasets.Dataset):
        return [
            DatasetShard(_name(f"{identity}|{start}", f"{split}-{start:09d}"), f"{split}[{start}:{stop}]",
                         dataset=dataset, image_column=image_column, key_column=key_column, rows=range(start, stop))
            for start in range(0, len(dataset), shard_size)
            for stop in [min(start + shard_size, len(dataset))]
        ]
    count = dataset.n_shards
    return [
        DatasetShard(_name(f"{identity}|{index}/{count}", f"{split}-{index:05d}-of-{count:05d}"),
                     f"{name}/{split}/{index:05d}-of-{count:05d}", dataset=dataset, image_column=image_column,
                     key_column=key_column, index=index, num_shards=count)
        for index in range(count)
    ]


# ------------------------------------------------------------------------------------------------- the inputs
def expand_braces(pattern: str) -> list[str]:
    """webdataset's shard notation: `{a,b}` alternatives and `{000..099}` ranges (zero-padded like their first
    number), several per pattern: `data/{train,val}-{0..1}.tar` -> 4 names."""
    match = re.search(r"\{([^{}]*)\}", pattern)
    if match is None:
        return [pattern]
    body = match.group(1)
    numeric = re.fullmatch(r"(\d+)\.\.(\d+)", body)
    if numeric:
        first, last = numeric.groups()
        width = len(first) if first.startswith("0") else 0
        choices = [str(number).zfill(width) for number in range(int(first), int(last) + 1)]
    elif "," in body:
        choices = body.split(",")
    else:
        return [pattern]  # a literal brace
    head, tail = pattern[: match.start()], pattern[match.end() :]
    return [name for choice in choices for name in expand_braces(head + choice + tail)]


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


def _images_under(folder: Path) -> list[str]:
    return sorted(
        str(path) for path in folder.rglob("*") if path.suffix.lower() in IMAGE_EXTENSIONS and path.is_file()
    )


def is_shard_spec(spec: str) -> bool:
    """A webdataset tar or a parquet file (or a glob / brace pattern of them): captioned shard by shard."""
    return spec.lower().endswith(TAR_SUFFIXES + PARQUET_SUFFIXES) and not is_url(spec)


def find_shards(specs: Iterable[str], *, stdin: Iterable[str] = (), shard_size: int = 1000,
                image_column: str | None = None, key_column: str | None = None, url_timeout: float = 30.0,
                max_url_bytes: int = 50_000_000) -> list[Shard]:
    """The shards of the command line's inputs, in their order: each tar or parquet file (names, globs and brace
    patterns) is a shard; everything else (files, folders, globs, URLs, `-` for stdin, as the one-process CLI takes
    them) is listed and cut into shards of `shard_size` entries."""
    shards: list[Shard] = []
    pending: list[str] = []

    def add_files() -> None:
        paths = expand_inputs(pending, stdin if "-" in pending else ())
        start_index = sum(isinstance(shard, FileListShard) for shard in shards)
        for offset, start in enumerate(range(0, len(paths), shard_size)):
            chunk = paths[start : start + shard_size]
            number = start_index + offset
            label = f"files {number}: " + "\n".join(chunk)
            shards.append(FileListShard(_name(label, f"files-{number:06d}"), f"files {number}", paths=chunk,
                                        url_timeout=url_timeout, max_url_bytes=max_url_bytes))
        pending.clear()

    for spec in specs:
        for pattern in expand_braces(spec) if not Path(spec).exists() else [spec]:
            if not is_shard_spec(pattern):
                pending.append(pattern)
                continue
            add_files()
            paths = sorted(glob.glob(pattern)) if glob.has_magic(pattern) and not Path(pattern).exists() else [pattern]
            if not paths:
                raise ValueError(f"no files match {pattern}")
            for path in paths:
                if not Path(path).is_file():
                    raise ValueError(f"shard {path} does not exist")
                if path.lower().endswith(PARQUET_SUFFIXES):
                    shards.append(parquet_shard(path, image_column, key_column))
                else:
                    shards.append(TarShard(_name(path, Path(path).name), path, path=path))
    add_files()
    return shards


def estimate_counts(shards: list[Shard]) -> list[int | None]:
    """Samples per shard for the progress bar's total: exact where the shard knows it; for tar shards, the first
    one's count scaled by file size (img2dataset writes shards of equal sample counts)."""
    counts = [shard.count() for shard in shards]
    tars = [shard for shard in shards if isinstance(shard, TarShard)]
    try:
        per_byte = tars[0].count_images() / max(Path(tars[0].path).stat().st_size, 1) if tars else 0
    except (tarfile.TarError, EOFError, OSError, zlib.error):
        return counts  # unknown: the shard's own reading will say what is wrong with it
    for i, shard in enumerate(shards):
        if isinstance(shard, TarShard):
            counts[i] = round(Path(shard.path).stat().st_size * per_byte)
    return counts

