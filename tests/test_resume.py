"""Interrupted training loses nothing: train_hf.py resumes from a checkpoint (by path, or on its own from output_dir's
last complete one) and ends with the very adapter of an uninterrupted run, data order included; a checkpoint cut off
mid-write (a real SIGKILL, or one built half-written) is never the one resumed from. Label smoothing trains."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch
from conftest import REPO
from safetensors.torch import load_file
from test_training import png_bytes, rows

from loracaptioner.data import CaptionCollator

sys.path.insert(0, str(REPO))
import train_hf  # noqa: E402

STEPS, SAVE_STEPS = 12, 2  # 16 images x 2 captions / batch 8 = 4 steps per epoch: the run crosses 2 epoch ends


def write_imagefolder(folder, count: int = 16):
    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / "metadata.jsonl", "w") as metadata:
        for key, image, captions in rows(count):
            (folder / f"{key}.png").write_bytes(image)
            metadata.write(json.dumps({"file_name": f"{key}.png", "caption": captions}) + "\n")
    return folder


def train_args(backbones, data_dir, output_dir, *extra):
    """A short LoRA run with dropout (so the restored RNG state matters) saving every SAVE_STEPS steps."""
    return ["--vision_model_name_or_path", backbones[0], "--text_model_name_or_path", backbones[1],
            "--train_dir", str(data_dir), "--output_dir", str(output_dir), "--do_train", "--max_steps", str(STEPS),
            "--save_steps", str(SAVE_STEPS), "--per_device_train_batch_size", "8", "--learning_rate", "5e-3",
            "--lora_r", "4", "--lora_alpha", "8", "--lora_dropout", "0.1", "--logging_steps", "1",
            "--report_to", "none", "--use_cpu", "--seed", "0", "--disable_tqdm", "true",
            "--dataloader_num_workers", "0", *extra]


def run_in_process(args):
    original, threads = sys.argv, torch.get_num_threads()
    sys.argv = ["train_hf.py", *args]
    torch.set_num_threads(1)  # as the subprocesses (OMP_NUM_THREADS=1): the same float reductions
    try:
        return train_hf.main()
    finally:
        sys.argv = original
        torch.set_num_threads(threads)


def subprocess_env():
    return {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "PYTHONWARNINGS": "default"}


def adapter(output_dir):
    return load_file(output_dir / "adapter" / "adapter_model.safetensors")


def max_abs_diff(a, b):
    assert a.keys() == b.keys()
    return max((a[name] - b[name]).abs().max().item() for name in a)


def losses(output_dir):
    """The logged training loss of every step, in step order (a gap would be a missing step)."""
    history = json.loads((output_dir / "trainer_state.json").read_text())["log_history"]
    logged = [(entry["step"], entry["loss"]) for entry in history if "loss" in entry]
    assert [step for step, _ in logged] == list(range(1, len(logged) + 1))
    return [loss for _, loss in logged]


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return write_imagefolder(tmp_path_factory.mktemp("resume_data"))


@pytest.fixture(scope="module")
def uninterrupted(backbones, data_dir, tmp_path_factory):
    output_dir = tmp_path_factory.mktemp("uninterrupted")
    run_in_process(train_args(backbones, data_dir, output_dir))
    return output_dir


def test_label_smoothing_trains_and_the_collator_shifts_labels_as_the_model_does(backbones, data_dir, tmp_path,
                                                                                processor, model):
    batch = CaptionCollator(processor, model=model)([{"image": png_bytes((9, 9, 9)), "caption": "a red square"},
                                                        {"image": png_bytes((9, 9, 9)), "caption": "a dog"}])
    assert torch.equal(batch["decoder_input_ids"], model.prepare_decoder_input_ids_from_labels(batch["labels"]))
    assert (batch["decoder_input_ids"] >= 0).all()
    with torch.no_grad():  # the same loss as when the model shifts the labels itself
        torch.testing.assert_close(model(**batch).loss, model(pixel_values=batch["pixel_values"],
                                                              labels=batch["labels"]).loss, rtol=0, atol=0)

    run_in_process(train_args(backbones, data_dir, tmp_path, "--label_smoothing_factor", "0.1", "--max_steps", "2"))
    assert len(losses(tmp_path)) == 2


def test_resume_from_a_checkpoint_continues_its_step_and_ends_like_an_uninterrupted_run(
        backbones, data_dir, uninterrupted, tmp_path):
    shutil.copytree(uninterrupted / "checkpoint-4", tmp_path / "checkpoint-4")
    run_in_process(train_args(backbones, data_dir, tmp_path / "resumed",
                              "--resume_from_checkpoint", str(tmp_path / "checkpoint-4")))
    state = json.loads((tmp_path / "resumed" / "trainer_state.json").read_text())
    assert state["global_step"] == STEPS
    ran = {path.name for path in (tmp_path / "resumed").glob("checkpoint-*")}
    assert ran == {f"checkpoint-{step}" for step in range(6, STEPS + 1, SAVE_STEPS)}  # only the steps after 4 ran
    assert losses(tmp_path / "resumed") == pytest.approx(losses(uninterrupted), abs=1e-6)  # same batches, in order
    assert max_abs_diff(adapter(tmp_path / "resumed"), adapter(uninterrupted)) <= 1e-6


def test_a_sigkilled_run_rerun_resumes_and_ends_like_an_uninterrupted_run(backbones, data_dir, uninterrupted, tmp_path):
    """Killed the moment checkpoint-4's folder appears (checkpoint-2 complete): mostly mid-write of checkpoint-4."""
    command = [sys.executable, str(REPO / "train_hf.py"), *train_args(backbones, data_dir, tmp_path, "--log_level",
                                                                        "info")]
    killed = subprocess.Popen(command, cwd=REPO, env=subprocess_env(), stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 120
        while not (tmp_path / "checkpoint-4").exists() and killed.poll() is None:
            assert time.monotonic() < deadline, "no checkpoint-4 after 120 s"
            time.sleep(0.001)
        killed.send_signal(signal.SIGKILL)
    finally:
        killed.wait(timeout=60)
    assert killed.returncode == -signal.SIGKILL, "the run ended before it could be killed"
    assert (tmp_path / "checkpoint-2" / "trainer_state.json").is_file() and not (tmp_path / "adapter").exists()

    rerun = subprocess.run(command, cwd=REPO, env=subprocess_env(), capture_output=True, text=True, timeout=300)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    output = rerun.stdout + rerun.stderr
    resumed_from = int(output.split(f"Resuming from {tmp_path}/checkpoint-")[1].split(".")[0])
    skipped_4 = f"skipping incomplete checkpoint {tmp_path}/checkpoint-4" in output
    assert resumed_from == 4 or (resumed_from == 2 and skipped_4)
    assert max_abs_diff(adapter(tmp_path), adapter(uninterrupted)) <= 1e-6
    assert losses(tmp_path) == pytest.approx(losses(uninterrupted), abs=1e-6)
    assert "FutureWarning" not in output and "DeprecationWarning" not in output


def test_half_written_checkpoints_are_skipped_set_aside_and_the_last_complete_one_resumed(
        backbones, data_dir, uninterrupted, tmp_path, caplog):
    for step in (4, 6, 8):
        shutil.copytree(uninterrupted / f"checkpoint-{step}", tmp_path / f"checkpoint-{step}")
    (tmp_path / "checkpoint-8" / "trainer_state.json").unlink()  # cut off before its last file
    (tmp_path / "checkpoint-8" / "optimizer.pt").write_bytes(b"PK\x03\x04")
    state_6 = (tmp_path / "checkpoint-6" / "trainer_state.json").read_text()
    (tmp_path / "checkpoint-6" / "trainer_state.json").write_text(state_6[: len(state_6) // 2])  # cut off mid-write
    state_4 = json.loads((tmp_path / "checkpoint-4" / "trainer_state.json").read_text())
    state_4["log_history"][0]["resumed_marker"] = True  # survives into the final state only if step 4 is resumed
    (tmp_path / "checkpoint-4" / "trainer_state.json").write_text(json.dumps(state_4))

    run_in_process(train_args(backbones, data_dir, tmp_path))  # no --resume_from_checkpoint: found on its own

    assert json.loads((tmp_path / "trainer_state.json").read_text())["log_history"][0].get("resumed_marker")
    skipped = [r.getMessage() for r in caplog.records if r.getMessage().startswith("skipping incomplete checkpoint")]
    assert len(skipped) == 2 and "no trainer_state.json" in skipped[0] and "unreadable" in skipped[1]
    assert [len(list(tmp_path.glob(f"checkpoint-{step}.incomplete-*"))) for step in (6, 8)] == [1, 1]
    assert max_abs_diff(adapter(tmp_path), adapter(uninterrupted)) <= 1e-6


def test_resuming_from_a_named_incomplete_checkpoint_is_a_clear_error(backbones, data_dir, tmp_path):
    (tmp_path / "checkpoint-2").mkdir()
    with pytest.raises(ValueError, match=r"checkpoint-2: no trainer_state.json"):
        run_in_process(train_args(backbones, data_dir, tmp_path / "out",
                                  "--resume_from_checkpoint", str(tmp_path / "checkpoint-2")))
