"""`loracaptioner caption` at scale: webdataset shards, parquet files and `datasets` datasets in; one process or two
(torchrun, gloo on CPU) splitting the shards; per-shard parts, resumed after a rank is killed; bad images as error
records; JSONL / CSV / parquet / datasets-folder output, `merge`, and the push of the captions as a dataset repo."""

import csv
import hashlib
import io
import json
import os
import signal
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import datasets
import httpx2
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from conftest import REPO
from PIL import Image
from test_cli import generate_captions, out_of_memory_on_call
from test_hub_push import FakeHub, serve

from loracaptioner import LoraCaptionerForConditionalGeneration
from loracaptioner.cli import main

NUM_SHARDS, PER_SHARD = 6, 4
BAD_SAMPLES = {(1, 2): b"not a jpeg", (4, 0): b""}  # (shard, sample) -> image bytes that do not decode
NO_IMAGE = (5, 3)  # a sample with a caption and no image
OPTIONS = ["--max-new-tokens", "6", "--dtype", "float32"]  # short captions: a fast test; float32 = generate()'s


def jpeg(seed: int, size=(320, 240)) -> bytes:
    pixels = np.random.default_rng(seed).integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="JPEG")
    return buffer.getvalue()


def add_member(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> Path:
    """img2dataset's layout: NNNNN.tar holding KEY.jpg, KEY.txt, KEY.json per sample."""
    folder = tmp_path_factory.mktemp("shards")
    for shard in range(NUM_SHARDS):
        with tarfile.open(folder / f"{shard:05d}.tar", "w") as tar:
            for sample in range(PER_SHARD):
                key = f"{shard:05d}{sample:04d}"
                if (shard, sample) != NO_IMAGE:
                    add_member(tar, f"{key}.jpg", BAD_SAMPLES.get((shard, sample), jpeg(shard * 100 + sample)))
                add_member(tar, f"{key}.txt", b"a caption")
                add_member(tar, f"{key}.json", json.dumps({"key": key}).encode())
    return folder


def caption(args: list[str]) -> int:
    return main(["caption", *args, *OPTIONS, "--quiet"])


def read_jsonl(path) -> list[dict]:
    return [json.loads(line) for line in Path(path).read_text().splitlines()]


@pytest.fixture(scope="module")
def one_process(model_dir, shards, tmp_path_factory) -> Path:
    """The reference: one process, no DataLoader workers."""
    output = tmp_path_factory.mktemp("one") / "captions.jsonl"
    assert caption([model_dir, str(shards / "*.tar"), "-o", str(output), "--batch-size", "2", "--num-workers",
                    "0"]) == 1  # 1: some images failed
    return output


def torchrun(args: list[str], **popen) -> subprocess.Popen:
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
               "-m", "loracaptioner", "caption", *args, *OPTIONS]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    return subprocess.Popen(command, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            **popen)


def test_one_process_captions_every_sample_of_the_shards_like_generate(one_process, model_dir, shards,
                                                                       tmp_path):
    records = read_jsonl(one_process)
    expected_keys = [(f"{shards}/{s:05d}.tar", f"{s:05d}{i:04d}") for s in range(NUM_SHARDS) for i in range(PER_SHARD)]
    assert [(r["shard"], r["key"]) for r in records] == expected_keys  # input order, one record per sample
    errors = {r["key"]: r["error"] for r in records if "error" in r}
    assert errors == {
        "000010002": f"{shards}/00001.tar:000010002: cannot decode image (UnidentifiedImageError: cannot identify "
                     "image file)",
        "000040000": f"{shards}/00004.tar:000040000: empty file",
        "000050003": f"{shards}/00005.tar:000050003: no image in the sample (it has: txt, json)",
    }
    good = [r for r in records if "caption" in r][:6]
    paths = []
    for record in good:
        shard, sample = int(record["key"][:5]), int(record["key"][5:])
        paths.append(tmp_path / f"{record['key']}.jpg")
        paths[-1].write_bytes(jpeg(shard * 100 + sample))
    assert [r["caption"] for r in good] == generate_captions(model_dir, [str(p) for p in paths], max_new_tokens=6)


def test_two_processes_split_the_shards_and_write_what_one_process_writes(one_process, model_dir, shards,
                                                                          tmp_path):
    output = tmp_path / "captions.jsonl"
    run = torchrun([model_dir, f"{shards}/{{00000..{NUM_SHARDS - 1:05d}}}.tar", "-o", str(output), "--batch-size",
                    "2", "--num-workers", "1"])
    _, stderr = run.communicate(timeout=300)
    assert run.returncode == 0, stderr[-3000:]
    assert output.read_text() == one_process.read_text()  # caption for caption, record for record
    statuses = [json.loads(path.read_text()) for path in sorted((tmp_path / "captions.jsonl.parts/status").iterdir())]
    assert [status["shards"] for status in statuses] == [NUM_SHARDS // 2] * 2  # each rank took its half
    assert "by 2 processes, 3 errors" in stderr and f"rank 1: {NUM_SHARDS // 2 * PER_SHARD} images" in stderr


def test_a_rank_killed_mid_run_is_resumed_to_exactly_the_uninterrupted_output(one_process, model_dir, shards,
                                                                              tmp_path):
    output = tmp_path / "captions.jsonl"
    args = [model_dir, str(shards / "*.tar"), "-o", str(output), "--batch-size", "1", "--num-workers", "0"]
    run = torchrun(args)
    status_file = tmp_path / "captions.jsonl.parts/status/rank-00001.json"
    deadline = time.monotonic() + 240
    status = {}
    while time.monotonic() < deadline and run.poll() is None:
        try:
            status = json.loads(status_file.read_text())
        except (FileNotFoundError, json.JSONDecodeError):
            status = {}
        if status.get("shards", 0) >= 1:
            os.kill(status["pid"], signal.SIGKILL)
            break
        time.sleep(0.01)
    run.communicate(timeout=120)
    assert status.get("shards", 0) >= 1 and not status["finished"], f"rank 1 was not caught mid-run: {status}"
    assert run.returncode != 0  # torchrun saw the rank die and stopped the other one

    parts = tmp_path / "captions.jsonl.parts"
    finished = {path.name: path.stat().st_mtime_ns for path in parts.glob("*.jsonl")}
    assert 1 <= len(finished) < NUM_SHARDS and not output.exists()
    rerun = torchrun(args)
    _, stderr = rerun.communicate(timeout=300)
    assert rerun.returncode == 0, stderr[-3000:]
    assert f"{len(finished)} of {NUM_SHARDS} shards already captioned" in stderr
    assert output.read_text() == one_process.read_text()  # no duplicates, nothing missing, same captions
    assert {name: (parts / name).stat().st_mtime_ns for name in finished} == finished  # finished shards not redone
    assert not list(parts.glob("*.partial"))


def test_a_failure_of_the_model_stops_the_run_and_the_rerun_does_only_the_rest(one_process, model_dir, shards,
                                                                               tmp_path, monkeypatch, capsys):
    output = tmp_path / "captions.jsonl"
    args = [model_dir, str(shards / "*.tar"), "-o", str(output), "--batch-size", "2", "--num-workers", "0"]
    generate = LoraCaptionerForConditionalGeneration.generate
    monkeypatch.setattr(LoraCaptionerForConditionalGeneration, "generate", out_of_memory_on_call(5))
    assert caption(args) == 1  # not an error record per image: the run stops, in one line
    assert capsys.readouterr().err.splitlines()[-1] == (
        "loracaptioner: error: stopped by OutOfMemoryError: CUDA out of memory (pretend); finished shards are kept "
        f"in {tmp_path / 'captions.jsonl.parts'}, and rerunning the same command captions only the rest")
    monkeypatch.setattr(LoraCaptionerForConditionalGeneration, "generate", generate)
    finished = sorted(path.name for path in (tmp_path / "captions.jsonl.parts").glob("*.jsonl"))
    assert len(finished) == 2  # batches 1-4 finished shards 0 and 1
    assert caption(args) == 1
    assert output.read_text() == one_process.read_text()

    assert caption([*args, "--num-beams", "2"]) == 2  # other settings would mix captions of two kinds: refused


def test_a_shard_that_cannot_be_read_stops_the_run_with_one_line(model_dir, shards, tmp_path, capsys):
    (tmp_path / "truncated.tar").write_bytes((shards / "00000.tar").read_bytes()[:3000])
    args = [model_dir, str(shards / "00001.tar"), str(tmp_path / "truncated.tar"), "-o", str(tmp_path / "c.jsonl"),
            "--num-workers", "1"]
    for _ in range(2):  # the second time, shard 00001 is done and the truncated one is the first left
        assert caption(args) == 2
        error = capsys.readouterr().err.splitlines()[-1]
        assert error.startswith(f"loracaptioner: error: cannot read webdataset shard {tmp_path / 'truncated.tar'} (")
        assert error.endswith("rerun the same command")
    assert [path.name[:9] for path in (tmp_path / "c.jsonl.parts").glob("*.jsonl")] == ["00001.tar"]
    (tmp_path / "not.parquet").write_bytes(b"PAR1 and then nothing")
    assert caption([model_dir, str(tmp_path / "not.parquet"), "-o", str(tmp_path / "d.jsonl")]) == 2
    assert capsys.readouterr().err.startswith(f"loracaptioner: error: cannot read parquet file {tmp_path}/not.parquet")


@pytest.fixture(scope="module")
def image_rows(tmp_path_factory) -> list[dict]:
    """Rows of an image dataset as `datasets` stores them ({bytes, path}); row 1's bytes do not decode, row 3 is a
    file on disk."""
    folder = tmp_path_factory.mktemp("images")
    rows = [{"image": {"bytes": jpeg(seed, (40, 30)), "path": None}, "id": f"img-{seed}"} for seed in range(4)]
    rows[1]["image"] = {"bytes": b"\x89PNG broken", "path": None}
    (folder / "on-disk.jpg").write_bytes(jpeg(99, (40, 30)))
    rows[3]["image"] = {"bytes": None, "path": str(folder / "on-disk.jpg")}
    return rows


@pytest.mark.parametrize("layout", ["save_to_disk", "data_files_streaming", "parquet_file"])
def test_datasets_and_parquet_with_bad_images_finish_with_error_records(model_dir, image_rows, tmp_path,
                                                                        layout):
    features = datasets.Features({"image": datasets.Image(), "id": datasets.Value("string")})
    dataset = datasets.Dataset.from_list(image_rows, features=features)
    output = tmp_path / "captions.parquet"
    if layout == "save_to_disk":
        dataset.save_to_disk(tmp_path / "data")
        inputs = ["--dataset", str(tmp_path / "data"), "--key-column", "id", "--shard-size", "3"]
    elif layout == "data_files_streaming":
        (tmp_path / "data").mkdir()
        dataset.select(range(2)).to_parquet(tmp_path / "data" / "train-00000.parquet")
        dataset.select(range(2, 4)).to_parquet(tmp_path / "data" / "train-00001.parquet")
        inputs = ["--dataset", str(tmp_path / "data"), "--streaming", "--key_column", "id"]
    else:  # a parquet file of its own: an image column of {bytes, path}, a path relative to the file, a key column
        cells = [row["image"] for row in image_rows] + [{"bytes": None, "path": "gone.jpg"}]
        pq.write_table(pa.table({"key": [f"img-{i}" for i in range(5)], "image": cells}), tmp_path / "images.parquet")
        inputs = [str(tmp_path / "images.parquet")]
    assert caption([model_dir, *inputs, "-o", str(output), "--batch-size", "2", "--num-workers", "2"]) == 1

    rows = datasets.load_dataset("parquet", data_files=str(output), split="train").to_list()
    assert [row["key"] for row in rows] == [f"img-{i}" for i in range(5 if layout == "parquet_file" else 4)]
    assert [row["error"] is None for row in rows][:4] == [True, False, True, True]
    assert "cannot decode image" in rows[1]["error"] and rows[1]["caption"] is None
    assert all(row["caption"] for row in rows if row["error"] is None)
    if layout == "parquet_file":
        assert rows[4]["error"] == f"{tmp_path / 'gone.jpg'}: no such file"
        assert {row["shard"] for row in rows} == {str(tmp_path / "images.parquet")}


def test_datasets_folder_output_loads_with_load_dataset_and_merge_writes_other_formats(one_process, model_dir,
                                                                                      shards, tmp_path):
    output = tmp_path / "captions"
    assert caption([model_dir, str(shards / "0000[0-2].tar"), "-o", f"{output}/", "--batch-size", "2",
                    "--num-workers", "1"]) == 1
    loaded = datasets.load_dataset(str(output), split="train")
    reference = read_jsonl(one_process)[: 3 * PER_SHARD]
    assert loaded.column_names == ["shard", "key", "caption", "error"]
    assert [(row["key"], row["caption"], row["error"]) for row in loaded] == [
        (r["key"], r.get("caption"), r.get("error")) for r in reference]
    assert "loracaptioner" in (output / "README.md").read_text()

    merged = tmp_path / "elsewhere.csv"
    assert main(["merge", str(output), "--to", str(merged)]) == 1  # the same parts, joined again as CSV
    rows = list(csv.DictReader(merged.open()))
    assert list(rows[0]) == ["shard", "key", "caption", "error"]
    assert [(row["key"], row["caption"]) for row in rows] == [(r["key"], r.get("caption", "")) for r in reference]
    assert main(["merge", str(tmp_path / "never-run.jsonl")]) == 2


class FakeDatasetHub(FakeHub):
    """test_hub_push's in-memory Hub, with the dataset-repo endpoints a captions push uses: the same create / validate
    / preupload / commit calls under /api/datasets/, the repo's file listing, and deletions in a commit."""

    def answer(self, request: httpx2.Request) -> httpx2.Response:
        parts = request.url.path.strip("/").split("/")
        if parts[:2] == ["api", "datasets"] and len(parts) > 4 and parts[4] == "tree":
            repo = self.files.get("/".join(parts[2:4]), {})
            return httpx2.Response(200, json=[{"type": "file", "path": path, "size": len(content),
                                               "oid": hashlib.sha1(content).hexdigest()}
                                              for path, content in sorted(repo.items())])
        if parts[:2] == ["api", "datasets"] and len(parts) > 4 and parts[4] == "commit":
            return self.commit("/".join(parts[2:4]), request.content, f"{request.url.scheme}://{request.url.host}")
        if parts[:2] == ["api", "datasets"]:
            request.url = request.url.copy_with(path=request.url.path.replace("/api/datasets/", "/api/models/", 1))
        return super().answer(request)

    def commit(self, repo_id: str, payload: bytes, base: str) -> httpx2.Response:
        deleted = [json.loads(line)["value"]["path"] for line in payload.splitlines()
                   if line.strip() and json.loads(line)["key"] == "deletedFile"]
        kept = b"\n".join(line for line in payload.splitlines()
                          if line.strip() and json.loads(line)["key"] != "deletedFile")
        for path in deleted:
            self.files.get(repo_id, {}).pop(path, None)
        return super().commit(repo_id, kept, base)


@pytest.fixture()
def dataset_hub(monkeypatch, tmp_path):
    yield from serve(FakeDatasetHub(), monkeypatch, tmp_path)


def test_push_to_hub_uploads_the_captions_as_a_dataset_repo_that_load_dataset_reads(one_process, model_dir, shards,
                                                                                    dataset_hub, tmp_path):
    repo_id = "someone/captions"
    dataset_hub.files[repo_id] = {"data/train-00000-of-00003.parquet": b"an earlier upload"}
    output = tmp_path / "captions.jsonl"
    args = [model_dir, str(shards / "0000[0-1].tar"), "-o", str(output), "--batch-size", "2", "--push-to-hub", repo_id]
    assert caption(args) == 1
    assert len(dataset_hub.commits) == 1 and dataset_hub.commits[0]["repo"] == repo_id
    assert sorted(dataset_hub.files[repo_id]) == ["README.md", "data/train-00000-of-00001.parquet"]  # old file gone
    repo = dataset_hub.materialize(repo_id, tmp_path / "repo")
    pushed = datasets.load_dataset(str(repo), split="train")
    assert pushed.to_list() == [{"shard": r["shard"], "key": r["key"], "caption": r.get("caption"),
                                 "error": r.get("error")} for r in read_jsonl(output)]
    assert read_jsonl(output) == read_jsonl(one_process)[: 2 * PER_SHARD]
